//! The reshard plan: every file of the view, its exact size and header, and
//! for each tensor the target slice whose bytes the engine will produce.
//!
//! Planning reads no tensor data: its cost grows with tensors and ranks, not
//! with bytes, so a view of any size is listed (and mounted) at once.

use std::sync::Arc;

use safetensors::Dtype;
use serde::Serialize;

use crate::checkpoint::header::{HeaderEntry, build_header, dtype_to_mindspore, elem_size};
use crate::checkpoint::layout::{Slice, checked_product, ravel};
use crate::checkpoint::limits::MAX_SLICES;
use crate::checkpoint::metadata::{
    ChunkJson, Properties, StorageEntry, TensorMeta, format_shard_id,
};
use crate::checkpoint::models;
use crate::checkpoint::names::{self, Kind};
use crate::checkpoint::source::{Assembly, Iteration, RowMap, Source, SourceKind, Tensor, TileMap};
use crate::error::Result;
use crate::reshard::cast;
use crate::reshard::target::{Placement, TargetSpec};

/// The whole view of a source under one target.
#[derive(Debug)]
pub struct Plan {
    /// Shared so that several plans (targets) of one source load it once.
    pub source: Arc<Source>,
    pub spec: TargetSpec,
    pub options: ViewOptions,
    /// Parallel to `source.iterations`.
    pub iterations: Vec<IterationPlan>,
}

/// How the view's files look, beyond which ranks hold what.
#[derive(Debug, Clone, Default)]
pub struct ViewOptions {
    /// Floating-point tensors are cast to this dtype when read; `None`
    /// keeps every tensor's own (a cast is never silent).
    pub dtype: Option<Dtype>,
    /// The rank files' prefix (default: the source's).
    pub prefix: Option<String>,
    /// Show each iteration as a Hugging Face folder instead of rank files.
    pub hf: Option<HfOptions>,
    /// Leave out the source tensors the model map does not know, instead
    /// of refusing the source (`--drop-unknown-tensors`).
    pub drop_unknown: bool,
}

/// A Hugging Face folder view: whole tensors in `model-0000i-of-0000N`
/// shards with an index, plus the model's other files.
#[derive(Debug, Clone, Default)]
pub struct HfOptions {
    /// A shard holds at most this many bytes of tensor data, unless one
    /// tensor alone is larger (then it is alone), as transformers shards.
    pub max_shard_size: u64,
    /// Files shown beside the weights byte for byte (config.json,
    /// tokenizer files...), by name.
    pub files: Vec<(String, Vec<u8>)>,
    /// Fields set in a generated config.json (`--hf-config KEY=VALUE`).
    pub config_overrides: Vec<(String, serde_json::Value)>,
    /// The folder `files` were read from (who may read them there bounds
    /// who may read them in a mount).
    pub files_dir: Option<std::path::PathBuf>,
}

/// The Hugging Face index of a sharded folder.
pub const HF_INDEX: &str = "model.safetensors.index.json";

/// The view of one iteration folder.
#[derive(Debug)]
pub struct IterationPlan {
    pub world: u64,
    pub placements: Vec<Placement>,
    /// Model files for ranks `0..world`, then opt files (when the source
    /// has them); or a Hugging Face view's shards.
    pub files: Vec<VirtualFile>,
    /// Small files beside them, by name: the view's metadata.json (in
    /// MindSpore's schema) and common.json; or a Hugging Face view's index,
    /// config.json and the other files it shows.
    pub small: Vec<(String, Vec<u8>)>,
    /// How the view was made, for `plan` and `.reshardfs/summary`: the
    /// model map, where its sizes came from, a generated config.json.
    pub notes: Vec<String>,
    /// What the user must be told on stderr when the view is made: fields
    /// of a generated config.json that were assumed, tensors left out on
    /// request. A view never changes the model in silence.
    pub warnings: Vec<String>,
}

/// One safetensors file of the view.
#[derive(Debug)]
pub struct VirtualFile {
    pub name: String,
    pub rank: u64,
    pub kind: Kind,
    /// Length prefix and JSON, padded: the file's first bytes.
    pub header: Vec<u8>,
    /// In file order; their bytes follow the header back to back.
    pub tensors: Vec<PlannedTensor>,
    pub size: u64,
    /// Set when the file is, byte for byte, source file
    /// `Iteration::files[i]` whole ([`whole_source_file`]): a mount can
    /// then let the kernel read that file itself (FUSE passthrough) and
    /// `export` can copy it whole.
    pub whole_source: Option<usize>,
    /// Source files (sorted) its replicated slices are read from where they
    /// have a copy ([`home_files`], [`Chunk::read_from`]).
    pub home: Vec<usize>,
}

impl VirtualFile {
    /// The part of its header that bytes `[offset, end)` cover, if any.
    pub fn header_range(&self, offset: u64, end: u64) -> Option<std::ops::Range<usize>> {
        let hlen = self.header.len() as u64;
        // Both within the header, so they fit a usize.
        (offset < hlen).then(|| offset as usize..hlen.min(end) as usize)
    }
}

/// One tensor of a view file: which slice of which source tensor.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// Index into `Iteration::tensors`.
    pub source: usize,
    /// The target slice in global coordinates.
    pub slice: Slice,
    /// The dtype served: the source tensor's, or the view's `--dtype`.
    pub dtype: Dtype,
    /// Absolute offset of its first byte in the view file.
    pub offset: u64,
    pub len: u64,
}

/// A box of a target slice that comes from one source slice.
#[derive(Debug, Clone, Serialize)]
pub struct SourceRegion {
    /// The source slice's grid index (`k` in its shard id).
    pub chunk: u64,
    /// Index into `Iteration::files` of the replica read.
    #[serde(skip)]
    pub file: usize,
    /// Start and shape in global coordinates (of the part, for a part).
    pub start: Vec<u64>,
    pub shape: Vec<u64>,
    /// For a tensor assembled from rows of others (a fused QKV, or q_proj
    /// read out of one): the stored tensor read, an index into
    /// `Iteration::parts`.
    #[serde(skip)]
    pub part: Option<usize>,
}

impl Plan {
    /// Plans the view of every iteration of `source` under `spec`.
    pub fn build(source: impl Into<Arc<Source>>, spec: TargetSpec) -> Result<Plan> {
        Plan::build_with(source, spec, ViewOptions::default())
    }

    /// Plans the view of every iteration of `source` under `spec`, its files
    /// shaped by `options`.
    pub fn build_with(
        source: impl Into<Arc<Source>>,
        spec: TargetSpec,
        options: ViewOptions,
    ) -> Result<Plan> {
        let source = source.into();
        if let Some(d) = options.dtype
            && !cast::is_target(d)
        {
            crate::bail!("--dtype {d:?}: a view can be cast to bf16, f16 or f32 only");
        }
        let mut iterations = Vec::with_capacity(source.iterations.len());
        for it in &source.iterations {
            let left_out = models::check_left_out(it, options.drop_unknown);
            let planned = left_out.and_then(|left_out| {
                let mut p = match &options.hf {
                    Some(hf) => plan_hf(it, &options, hf),
                    None => spec
                        .resolve(it)
                        .and_then(|t| plan_iteration(it, t.placements, t.world, &options)),
                }?;
                p.warnings.extend(left_out);
                Ok(p)
            });
            iterations.push(planned.map_err(|e| in_iteration(e, it))?);
        }
        Ok(Plan {
            source,
            spec,
            options,
            iterations,
        })
    }

    /// The tracker's bytes when the source is a checkpoint root.
    pub fn tracker(&self) -> Option<&[u8]> {
        match &self.source.kind {
            SourceKind::Root { tracker, .. } => Some(tracker),
            _ => None,
        }
    }
}

/// In a checkpoint root, says which iteration a target failed on.
fn in_iteration(e: crate::error::Error, it: &Iteration) -> crate::error::Error {
    match (e, &it.name) {
        (crate::error::Error::Input(m), Some(n)) => crate::bad!("{n}: {m}"),
        (e, _) => e,
    }
}

fn model_notes(it: &Iteration) -> Vec<String> {
    match &it.model {
        Some(m) => std::iter::once(format!("model map {}", m.model_type))
            .chain(m.notes.iter().cloned())
            .collect(),
        None => Vec::new(),
    }
}

/// The dtype tensor `t` is served in.
pub fn view_dtype(t: &Tensor, options: &ViewOptions) -> Dtype {
    match options.dtype {
        Some(d) if cast::is_float(t.dtype) => d,
        _ => t.dtype,
    }
}

fn plan_iteration(
    it: &Iteration,
    placements: Vec<Placement>,
    world: u64,
    options: &ViewOptions,
) -> Result<IterationPlan> {
    let prefix = options.prefix.as_deref().or(it.prefix.as_deref());
    let slices = placements
        .iter()
        .try_fold(0usize, |acc, p| acc.checked_add(p.ranks.len()))
        .unwrap_or(usize::MAX);
    if slices > MAX_SLICES {
        crate::bail!(
            "target: {slices} tensor slices across {world} ranks, more than the {MAX_SLICES} a view may have"
        );
    }
    // Which (tensor, position in ranks) each target rank holds.
    let mut held: Vec<Vec<(usize, usize)>> = vec![Vec::new(); world as usize];
    for (ti, p) in placements.iter().enumerate() {
        for (pos, &r) in p.ranks.iter().enumerate() {
            held[r as usize].push((ti, pos));
        }
    }
    let kinds: &[Kind] = if it.has_opt() {
        &[Kind::Model, Kind::Opt]
    } else {
        &[Kind::Model]
    };
    let mut files = Vec::with_capacity(world as usize * kinds.len());
    for &kind in kinds {
        for (rank, tensors) in held.iter().enumerate() {
            let mut mine: Vec<(usize, usize)> = tensors
                .iter()
                .copied()
                .filter(|&(ti, _)| it.tensors[ti].kind == kind)
                .collect();
            // Keys sorted, data in key order: how MindSpore writes rank files.
            mine.sort_by(|a, b| it.tensors[a.0].name.cmp(&it.tensors[b.0].name));
            let name = names::rank_file_name(prefix, kind, rank as u64, world);
            let slices: Vec<(usize, Slice)> = mine
                .iter()
                .map(|&(ti, pos)| (ti, placements[ti].slice(pos, &it.tensors[ti].global_shape)))
                .collect();
            let mut vf = plan_file(it, name, &slices, options, "ms")?;
            vf.rank = rank as u64;
            vf.kind = kind;
            files.push(vf);
        }
    }
    let mut small = vec![(
        names::METADATA.to_string(),
        view_metadata(it, &placements, world, prefix, options)?,
    )];
    if let Some(common) = &it.common_json {
        small.push((names::COMMON.to_string(), common.clone()));
    }
    Ok(IterationPlan {
        world,
        placements,
        files,
        small,
        notes: model_notes(it),
        warnings: Vec::new(),
    })
}

/// An iteration as a Hugging Face folder: every tensor whole, in the
/// source's order, cut into shards of at most `max_shard_size` bytes, with
/// the index transformers reads and the model's other files.
fn plan_hf(it: &Iteration, options: &ViewOptions, hf: &HfOptions) -> Result<IterationPlan> {
    let placements: Vec<Placement> = it
        .tensors
        .iter()
        .map(|_| Placement {
            layout: None,
            ranks: vec![0],
        })
        .collect();
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_bytes = 0u64;
    let mut total = 0u64;
    let mut params = 0u64;
    for (ti, t) in it.tensors.iter().enumerate() {
        if t.kind != Kind::Model {
            continue;
        }
        let n = t.global_shape.iter().product::<u64>();
        let bytes = n * elem_size(view_dtype(t, options));
        if !current.is_empty() && current_bytes.saturating_add(bytes) > hf.max_shard_size {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(ti);
        current_bytes += bytes;
        total += bytes;
        params += n;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    if shards.is_empty() {
        crate::bail!("{}: no model tensors to show", it.dir.display());
    }
    let count = shards.len();
    let mut files = Vec::with_capacity(count);
    let mut weight_map = serde_json::Map::new();
    let mut entries: Vec<(String, String)> = Vec::new();
    for (i, mut shard) in shards.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        shard.sort_by(|a, b| it.tensors[*a].name.cmp(&it.tensors[*b].name));
        let slices: Vec<(usize, Slice)> = shard
            .iter()
            .map(|&ti| (ti, Slice::whole(&it.tensors[ti].global_shape)))
            .collect();
        for &ti in &shard {
            entries.push((it.tensors[ti].name.clone(), name.clone()));
        }
        let mut vf = plan_file(it, name, &slices, options, "pt")?;
        vf.rank = i as u64;
        files.push(vf);
    }
    entries.sort();
    for (t, f) in entries {
        weight_map.insert(t, serde_json::Value::String(f));
    }
    let index = serde_json::json!({
        "metadata": {"total_parameters": params, "total_size": total},
        "weight_map": weight_map,
    });
    let mut index = serde_json::to_vec_pretty(&index)
        .map_err(|e| crate::Error::Input(format!("internal: index.json: {e}")))?;
    index.push(b'\n');
    let mut small = vec![(HF_INDEX.to_string(), index)];
    small.extend(hf.files.iter().cloned());
    let mut notes = model_notes(it);
    let mut warnings = Vec::new();
    let dtype = view_float_dtype(it, options);
    if let Some((_, raw)) = small.iter_mut().find(|(n, _)| n == models::CONFIG) {
        if !hf.config_overrides.is_empty() {
            crate::bail!(
                "--hf-config sets fields of a generated config.json, but this view shows the model folder's own config.json as it is; edit that file instead"
            );
        }
        // The folder's config.json, but stating the view's dtype.
        if let Some(d) = dtype
            && let Some(restated) = models::config_with_dtype(raw, d, options.dtype.is_some())
        {
            *raw = restated;
            notes.push(format!(
                "config.json as in the model's folder, but for its dtype: {}, the view's",
                models::torch_dtype_name(d)
            ));
        }
    } else {
        let Some(model) = &it.model else {
            crate::bail!(
                "{}: no config.json to show: give --hf-files DIR (the model's Hugging Face folder) or --model qwen3 to generate one",
                it.dir.display()
            );
        };
        let config = &model.config;
        config.check_overrides(&hf.config_overrides)?;
        let dtype = dtype.unwrap_or(Dtype::BF16);
        small.push((
            models::CONFIG.into(),
            config.render_with(dtype, &hf.config_overrides),
        ));
        let note = config.note(&hf.config_overrides);
        notes.push(note.clone());
        warnings.push(note);
    }
    Ok(IterationPlan {
        world: 1,
        placements,
        files,
        small,
        notes,
        warnings,
    })
}

/// The dtype a Hugging Face view's `config.json` states: the view's dtype
/// of its first floating-point model tensor (none: no float tensors).
fn view_float_dtype(it: &Iteration, options: &ViewOptions) -> Option<Dtype> {
    it.tensors
        .iter()
        .find(|t| t.kind == Kind::Model && cast::is_float(t.dtype))
        .map(|t| view_dtype(t, options))
}

/// One view file holding `slices` (tensor index, slice) back to back in the
/// order given, its header's `__metadata__` saying `format`.
fn plan_file(
    it: &Iteration,
    name: String,
    slices: &[(usize, Slice)],
    options: &ViewOptions,
    format: &str,
) -> Result<VirtualFile> {
    let dtypes: Vec<Dtype> = slices
        .iter()
        .map(|(ti, _)| view_dtype(&it.tensors[*ti], options))
        .collect();
    let entries: Vec<HeaderEntry<'_>> = slices
        .iter()
        .zip(&dtypes)
        .map(|((ti, s), &dtype)| HeaderEntry {
            name: &it.tensors[*ti].name,
            dtype,
            shape: &s.shape,
        })
        .collect();
    let (header, offsets) = build_header(&entries, format)?;
    let base = header.len() as u64;
    // Sizes come from headers and metadata.json: every product and sum is
    // checked, so a hostile shape is refused rather than wrapped.
    let tensors: Vec<PlannedTensor> = slices
        .iter()
        .zip(dtypes)
        .zip(offsets)
        .map(|(((ti, slice), dtype), off)| {
            let t = &it.tensors[*ti];
            let len = checked_product(&slice.shape)
                .and_then(|n| n.checked_mul(elem_size(dtype)));
            let offset = base.checked_add(off);
            match (len, offset) {
                (Some(len), Some(offset)) if offset.checked_add(len).is_some() => {
                    Ok(PlannedTensor {
                        source: *ti,
                        slice: slice.clone(),
                        dtype,
                        offset,
                        len,
                    })
                }
                _ => Err(crate::bad!(
                    "view file {name}: tensor {}: its slice {:?} at offset {off} overflows a 64-bit file size",
                    t.name,
                    slice.shape
                )),
            }
        })
        .collect::<Result<_>>()?;
    let size = tensors.last().map_or(base, |t| t.offset + t.len);
    let whole_source = whole_source_file(it, &header, &tensors, size);
    // A file that is a source file whole reads every slice from that file,
    // as passthrough would.
    let home = match whole_source {
        Some(f) => vec![f],
        None => home_files(it, &tensors),
    };
    Ok(VirtualFile {
        name,
        rank: 0,
        kind: Kind::Model,
        header,
        tensors,
        size,
        whole_source,
        home,
    })
}

/// The source files holding the one copy of some slice a view file reads,
/// sorted: where it reads its replicated slices from too
/// ([`Chunk::read_from`]). Empty (every slice read from its default
/// replica) when the file reads no replicated slice, which costs one look
/// at each of its tensors' slices; the pieces are listed only otherwise.
fn home_files(it: &Iteration, tensors: &[PlannedTensor]) -> Vec<usize> {
    let replicated = tensors.iter().any(|pt| {
        let t = &it.tensors[pt.source];
        t.assembly.is_some() || t.chunks.iter().any(|c| !c.others.is_empty())
    });
    if !replicated {
        return Vec::new();
    }
    let mut home = Vec::new();
    for pt in tensors {
        let t = &it.tensors[pt.source];
        for r in pieces(it, t, &pt.slice, &[]) {
            let stored = r.part.map_or(t, |p| &it.parts[p]);
            if let Some(c) = stored.chunks.get(r.chunk as usize)
                && c.others.is_empty()
            {
                home.push(c.file);
            }
        }
    }
    home.sort_unstable();
    home.dedup();
    home
}

/// The source file that a view file with this header, these tensors and
/// this size is, byte for byte, whole; if any. So it is when every tensor
/// is one stored slice, read as stored (no cast, not assembled from other
/// tensors' rows or tiles), that one file holds at the offset it has in the view, and
/// the header and length are the file's own. The most common reshard, a
/// change of data parallelism alone, gives only such files (and so do a
/// view with the source's own strategy, a Hugging Face view that keeps the
/// source's shards, a plain folder viewed whole).
///
/// A slice may be held by several files (data-parallel replicas), and
/// which of them a view rank's replicated tensors would be read from
/// depends on the file: the candidates are the holders of the slice held
/// by fewest files, and the first that holds every other slice in place
/// wins (the file is then read from it alone, [`VirtualFile::home`]). Its
/// header is compared with the view's (its first bytes, read when the
/// source was opened): no tensor data is read. A file with no tensors
/// (nothing to gain) is never one.
fn whole_source_file(
    it: &Iteration,
    header: &[u8],
    tensors: &[PlannedTensor],
    size: u64,
) -> Option<usize> {
    let mut chunks = Vec::with_capacity(tensors.len());
    for pt in tensors {
        let t = &it.tensors[pt.source];
        if t.assembly.is_some()
            || pt.dtype != t.dtype
            || pt.slice.shape != t.chunk_shape
            || piece_count(it, t, &pt.slice) != 1
        {
            return None;
        }
        let k = pieces(it, t, &pt.slice, &[]).pop()?.chunk;
        chunks.push((pt, t, t.chunks.get(usize::try_from(k).ok()?)?));
    }
    let (_, _, fewest) = chunks.iter().min_by_key(|(_, _, c)| c.holders.len())?;
    let f = fewest.holders.iter().map(|h| h.0).find(|&f| {
        it.files[f].size() == size
            && chunks
                .iter()
                .all(|&(pt, t, c)| holds_in_place(it, f, pt, t, c))
    })?;
    let source = &it.files[f];
    // The length was compared: the header lies within the file.
    (source.map_bytes(0, header.len() as u64) == Some(header) && !source.is_damaged()).then_some(f)
}

/// Whether file `f` holds `chunk` of `t` stored exactly as `pt`'s slice
/// (that slice's box, not the whole tensor) at `pt`'s own offset.
fn holds_in_place(
    it: &Iteration,
    f: usize,
    pt: &PlannedTensor,
    t: &Tensor,
    chunk: &crate::checkpoint::source::Chunk,
) -> bool {
    if chunk.file == f {
        return chunk.origin == pt.slice.start
            && chunk.stored_shape == pt.slice.shape
            && chunk.offset == pt.offset;
    }
    // Another replica: its own stored copy, under the same name.
    chunk.holders.iter().any(|h| h.0 == f)
        && it.files[f]
            .tensors
            .get(&t.name)
            .is_some_and(|st| st.shape == pt.slice.shape && st.offset == pt.offset)
}

/// The view's metadata.json: MindSpore's own schema, describing the target
/// layout and pointing every slice at the view files that hold it, so that
/// MindSpore Transformers loads the view as an ordinary checkpoint.
fn view_metadata(
    it: &Iteration,
    placements: &[Placement],
    world: u64,
    prefix: Option<&str>,
    options: &ViewOptions,
) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    struct MetadataOut {
        state_dict_metadata: serde_json::Map<String, serde_json::Value>,
        storage_data: serde_json::Map<String, serde_json::Value>,
    }
    let mut sdm = serde_json::Map::new();
    let mut shards: Vec<(u64, usize, u64, Vec<u64>)> = Vec::new();
    for (ti, (t, p)) in it.tensors.iter().zip(placements).enumerate() {
        let frag: Vec<u64> = match &p.layout {
            Some(l) => l.fragmentations(),
            None => vec![1; t.global_shape.len()],
        };
        let chunk_shape: Vec<u64> = t
            .global_shape
            .iter()
            .zip(&frag)
            .map(|(s, f)| s / f)
            .collect();
        let nchunks: u64 = frag.iter().product();
        let replica_id: Vec<u64> = match &p.layout {
            Some(l) => (0..p.ranks.len()).map(|i| l.replica_id(i)).collect(),
            None => (0..p.ranks.len() as u64).collect(),
        };
        let meta = TensorMeta {
            properties: Properties {
                dtype: match view_dtype(t, options) {
                    d if d == t.dtype => t.ms_dtype.clone(),
                    d => dtype_to_mindspore(d),
                },
                replica_id: Some(serde_json::json!(replica_id)),
                allow_shape_mismatch: t.allow_shape_mismatch,
                allow_to_save: t.allow_to_save,
            },
            global_shape: t.global_shape.clone(),
            axis_fragmentations: frag.clone(),
            layout: p.layout.as_ref().map(|l| l.to_json()),
            chunk: (0..nchunks)
                .map(|k| ChunkJson {
                    global_offset: vec![k],
                    local_shape: chunk_shape.clone(),
                })
                .collect(),
        };
        let value = serde_json::to_value(&meta)
            .map_err(|e| crate::internal!("metadata for {}: {e}", t.name))?;
        sdm.insert(t.name.clone(), value);

        // Holders of each slice, by grid index.
        let mut by_chunk: Vec<Vec<u64>> = vec![Vec::new(); nchunks as usize];
        for (pos, &r) in p.ranks.iter().enumerate() {
            let k = p.layout.as_ref().map_or(0, |l| l.grid_index(pos));
            by_chunk[k as usize].push(r);
        }
        for (k, mut ranks) in by_chunk.into_iter().enumerate() {
            ranks.sort_unstable();
            shards.push((ranks.first().copied().unwrap_or(0), ti, k as u64, ranks));
        }
    }
    // MindSpore lists model shards before optimizer shards, rank by rank,
    // each in tensor order; doing the same makes the metadata.json of a view
    // with the source's own strategy byte-identical to the source's.
    shards.sort_by_key(|s| (it.tensors[s.1].kind, s.0, s.1, s.2));
    let mut storage = serde_json::Map::new();
    for (_, ti, k, ranks) in shards {
        let t = &it.tensors[ti];
        let entries: Vec<StorageEntry> = ranks
            .iter()
            .map(|&r| StorageEntry {
                file_name: names::rank_file_name(prefix, t.kind, r, world),
                storage_rank: r,
                rank_group: Some(ranks.clone()),
            })
            .collect();
        let entries = serde_json::to_value(entries)
            .map_err(|e| crate::internal!("storage_data for {}: {e}", t.name))?;
        storage.insert(format_shard_id(&t.name, k), entries);
    }
    serde_json::to_vec(&MetadataOut {
        state_dict_metadata: sdm,
        storage_data: storage,
    })
    .map_err(|e| crate::internal!("cannot serialize metadata.json: {e}"))
}

/// The pieces of a target slice: its intersections with the source slices,
/// each read from one replica. They tile the slice. For a tensor assembled
/// from parts, the pieces of the parts' regions it draws on (per part, the
/// bounding box of what it reads). `home`: the reading view file's
/// [`VirtualFile::home`], which picks the replica each piece is read from.
pub fn pieces(it: &Iteration, t: &Tensor, slice: &Slice, home: &[usize]) -> Vec<SourceRegion> {
    if t.assembly.is_some() {
        return part_slices(it, t, slice)
            .into_iter()
            .flat_map(|(p, s)| {
                // The innermost part is the one stored: keep its name.
                pieces(it, &it.parts[p], &s, home)
                    .into_iter()
                    .map(move |mut r| {
                        r.part.get_or_insert(p);
                        r
                    })
            })
            .collect();
    }
    stored_pieces(t, slice, home)
}

fn stored_pieces(t: &Tensor, slice: &Slice, home: &[usize]) -> Vec<SourceRegion> {
    let per_dim: Vec<Vec<(u64, u64, u64)>> = (0..slice.shape.len())
        .map(|d| intervals(slice.start[d], slice.shape[d], t.chunk_shape[d]))
        .collect();
    if per_dim.iter().any(Vec::is_empty) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut pick = vec![0usize; per_dim.len()];
    loop {
        let grid: Vec<u64> = pick.iter().zip(&per_dim).map(|(&i, v)| v[i].0).collect();
        let k = ravel(&grid, &t.frag);
        out.push(SourceRegion {
            chunk: k,
            file: t.chunks[k as usize].read_from(home).0,
            start: pick.iter().zip(&per_dim).map(|(&i, v)| v[i].1).collect(),
            shape: pick.iter().zip(&per_dim).map(|(&i, v)| v[i].2).collect(),
            part: None,
        });
        // Odometer over the per-dimension intervals, last fastest.
        let mut d = pick.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            pick[d] += 1;
            if pick[d] < per_dim[d].len() {
                break;
            }
            pick[d] = 0;
        }
    }
}

/// For a tensor assembled from parts: per part it draws on, the bounding
/// slice of the part that `slice` reads.
pub fn part_slices(it: &Iteration, t: &Tensor, slice: &Slice) -> Vec<(usize, Slice)> {
    match &t.assembly {
        Some(Assembly::Rows(map)) => row_part_slices(it, map, slice),
        Some(Assembly::Tiles(map)) => tile_part_slices(map, slice),
        None => Vec::new(),
    }
}

/// Grows the slice kept for `part` in `out` to hold `add`, or adds it.
fn merge_box(out: &mut Vec<(usize, Slice)>, part: usize, add: Slice) {
    match out.iter_mut().find(|(p, _)| *p == part) {
        Some((_, sl)) => {
            for d in 0..sl.start.len() {
                let end = (sl.start[d] + sl.shape[d]).max(add.start[d] + add.shape[d]);
                sl.start[d] = sl.start[d].min(add.start[d]);
                sl.shape[d] = end - sl.start[d];
            }
        }
        None => out.push((part, add)),
    }
}

/// [`part_slices`] for a tiled tensor: per band and tile the slice meets,
/// the part's rectangle it comes from.
fn tile_part_slices(map: &TileMap, slice: &Slice) -> Vec<(usize, Slice)> {
    let (&[rs, cs], &[rn, cn]) = (slice.start.as_slice(), slice.shape.as_slice()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for band in &map.bands {
        let (a, b) = (rs.max(band.start), (rs + rn).min(band.start + band.rows));
        if a >= b {
            continue;
        }
        for tile in &band.tiles {
            let (c, d) = (cs.max(tile.col), (cs + cn).min(tile.col + tile.cols));
            if c >= d {
                continue;
            }
            let (pr, pc) = tile.source(a - band.start..b - band.start, c - tile.col..d - tile.col);
            let add = Slice {
                start: vec![pr.start, pc.start],
                shape: vec![pr.end - pr.start, pc.end - pc.start],
            };
            merge_box(&mut out, tile.part, add);
        }
    }
    out
}

/// [`part_slices`] for a tensor made of rows of parts: the part's rows
/// (other dimensions as in `slice`), computed per segment of the row map,
/// not per row.
fn row_part_slices(it: &Iteration, map: &RowMap, slice: &Slice) -> Vec<(usize, Slice)> {
    let (Some(&first), Some(&rows)) = (slice.start.first(), slice.shape.first()) else {
        return Vec::new();
    };
    if rows == 0 {
        return Vec::new();
    }
    let last = first + rows - 1;
    let (p0, p1) = (first / map.period, last / map.period);
    let mut out: Vec<(usize, Slice)> = Vec::new();
    let period = map.period;
    for s in &map.segments {
        // The first and last rows of this segment inside [first, last].
        let lo = if first < p0 * period + s.out_start + s.len {
            first.max(p0 * period + s.out_start)
        } else {
            (p0 + 1) * period + s.out_start
        };
        let hi = if last >= p1 * period + s.out_start {
            last.min(p1 * period + s.out_start + s.len - 1)
        } else if p1 > 0 {
            (p1 - 1) * period + s.out_start + s.len - 1
        } else {
            continue;
        };
        if lo > hi {
            continue;
        }
        let row = |r: u64| (r / period) * s.stride + s.base + (r % period - s.out_start);
        let (a, b) = (row(lo), row(hi));
        let part_rows = it.parts[s.part].global_shape.first().copied().unwrap_or(0);
        let b = b.min(part_rows.saturating_sub(1));
        if a > b {
            continue;
        }
        let mut start = slice.start.clone();
        let mut shape = slice.shape.clone();
        start[0] = a;
        shape[0] = b + 1 - a;
        merge_box(&mut out, s.part, Slice { start, shape });
    }
    out
}

/// How many pieces `pieces` would return, without building them.
pub fn piece_count(it: &Iteration, t: &Tensor, slice: &Slice) -> u64 {
    if t.assembly.is_some() {
        return part_slices(it, t, slice)
            .iter()
            .map(|(p, s)| piece_count(it, &it.parts[*p], s))
            .sum();
    }
    (0..slice.shape.len())
        .map(|d| intervals(slice.start[d], slice.shape[d], t.chunk_shape[d]).len() as u64)
        .product()
}

/// Cuts `[start, start+len)` at multiples of `chunk`: (chunk index, start, len).
fn intervals(start: u64, len: u64, chunk: u64) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let end = start + len;
    let mut at = start;
    while at < end {
        let c = at / chunk;
        let stop = end.min((c + 1) * chunk);
        out.push((c, at, stop - at));
        at = stop;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reshard::engine::Engine;
    use std::path::Path;

    fn mesh(src: &str, sizes: &[(&str, u64)], options: ViewOptions) -> Plan {
        let spec = TargetSpec::Mesh {
            sizes: sizes.iter().map(|&(a, n)| (a.to_string(), n)).collect(),
            pp: None,
            offset: None,
        };
        Plan::build_with(Source::open(Path::new(src)).unwrap(), spec, options).unwrap()
    }

    /// (view file, source file it is marked as) for every view file.
    fn marked(plan: &Plan) -> Vec<(String, Option<String>)> {
        let it = &plan.source.iterations[0];
        plan.iterations[0]
            .files
            .iter()
            .map(|vf| {
                let f = vf.whole_source.map(|i| it.files[i].name.clone());
                (vf.name.clone(), f)
            })
            .collect()
    }

    /// Every view file, read whole through the engine, against every
    /// source file read from disk: a file is marked exactly when its bytes
    /// are that source file's.
    fn marks_match_the_bytes(plan: &Plan) {
        let engine = Engine::new(plan);
        let it = &plan.source.iterations[0];
        let sources: Vec<Vec<u8>> = it
            .files
            .iter()
            .map(|f| std::fs::read(&f.path).unwrap())
            .collect();
        for (i, vf) in plan.iterations[0].files.iter().enumerate() {
            let mut buf = vec![0u8; vf.size as usize];
            engine.read(0, i, 0, &mut buf).unwrap();
            let equal: Vec<usize> = (0..sources.len()).filter(|&s| sources[s] == buf).collect();
            match vf.whole_source {
                Some(s) => assert!(
                    equal.contains(&s),
                    "{} is not {}",
                    vf.name,
                    it.files[s].name
                ),
                None => assert!(
                    equal.is_empty(),
                    "{} equals a source file, unmarked",
                    vf.name
                ),
            }
        }
    }

    #[test]
    fn a_data_parallel_change_gives_source_files_whole() {
        // dp=2 x tp=2 x pp=2 to dp=1: view rank (stage p, tp t) is source
        // rank 4p + t, whose replicated tensors the engine reads from rank
        // 0 of the stage: still that file, whole.
        let p = mesh(
            "tests/fixtures/gpt-dp2-tp2-pp2-bf16",
            &[("dp", 1)],
            ViewOptions::default(),
        );
        let got = marked(&p);
        let want: Vec<(String, Option<String>)> = [
            ("model", 0, 0),
            ("model", 1, 1),
            ("model", 2, 4),
            ("model", 3, 5),
            ("opt", 0, 0),
            ("opt", 1, 1),
            ("opt", 2, 4),
            ("opt", 3, 5),
        ]
        .iter()
        .map(|&(k, v, s)| {
            (
                format!("gpt-{k}-{v:07}-0000004.safetensors"),
                Some(format!("gpt-{k}-{s:07}-0000008.safetensors")),
            )
        })
        .collect();
        assert_eq!(got, want);
        marks_match_the_bytes(&p);
        // The source's own strategy: every file is itself.
        let p = mesh(
            "tests/fixtures/tp4-f32",
            &[("tp", 4)],
            ViewOptions::default(),
        );
        assert!(
            marked(&p)
                .iter()
                .all(|(v, s)| s.as_deref() == Some(v.as_str()))
        );
        marks_match_the_bytes(&p);
    }

    #[test]
    fn replicated_slices_are_read_from_the_view_files_own_source_files() {
        // tp=4 viewed as tp=2: view rank r holds tp slices 2r and 2r+1, so
        // its split tensors come from source ranks 2r and 2r+1; its
        // replicated ones (held by all four) must come from those too, not
        // from rank 0 (one more object, or one more file's pages, per rank).
        let p = mesh(
            "tests/fixtures/tp4-f32",
            &[("tp", 2)],
            ViewOptions::default(),
        );
        let it = &p.source.iterations[0];
        let rank_file = |r: u64| {
            let name = format!("model-{r:07}-0000004.safetensors");
            it.files.iter().position(|f| f.name == name).unwrap()
        };
        let replicated = it
            .tensors
            .iter()
            .filter(|t| t.chunks.iter().any(|c| c.holders.len() == 4))
            .count();
        assert!(
            replicated > 0,
            "the fixture has tensors held by all four ranks"
        );
        for vf in &p.iterations[0].files {
            if vf.kind != Kind::Model {
                continue;
            }
            let mut own = vec![rank_file(2 * vf.rank), rank_file(2 * vf.rank + 1)];
            own.sort_unstable();
            // What the plan says (`plan`, `.reshardfs/plan/`, access rules)...
            let mut planned: Vec<usize> = vf
                .tensors
                .iter()
                .flat_map(|pt| pieces(it, &it.tensors[pt.source], &pt.slice, &vf.home))
                .map(|r| r.file)
                .collect();
            planned.sort_unstable();
            planned.dedup();
            assert_eq!(
                planned, own,
                "{}: the source files its pieces name",
                vf.name
            );
            // ...and what the engine reads.
            let mut buf = vec![0u8; vf.size as usize];
            let mut touched = crate::reshard::engine::Touched::default();
            crate::reshard::engine::read_file(it, vf, 0, &mut buf, &mut touched).unwrap();
            assert_eq!(touched.files(), own, "{}: the source files read", vf.name);
        }
    }

    #[test]
    fn resharded_or_cast_files_are_not_source_files() {
        let p = mesh(
            "tests/fixtures/tp4-f32",
            &[("tp", 2)],
            ViewOptions::default(),
        );
        assert!(marked(&p).iter().all(|(_, s)| s.is_none()));
        marks_match_the_bytes(&p);
        let p = mesh(
            "tests/fixtures/gpt-dp2-tp2-pp2-bf16",
            &[("tp", 4)],
            ViewOptions::default(),
        );
        assert!(marked(&p).iter().all(|(_, s)| s.is_none()));
        // A cast changes the bf16 model files; the f32 optimizer files
        // stay what they are.
        let cast = ViewOptions {
            dtype: Some(Dtype::F32),
            ..ViewOptions::default()
        };
        let p = mesh("tests/fixtures/gpt-dp2-tp2-pp2-bf16", &[("dp", 1)], cast);
        for (v, s) in marked(&p) {
            assert_eq!(s.is_some(), v.contains("-opt-"), "{v}: {s:?}");
        }
        marks_match_the_bytes(&p);
    }

    #[test]
    fn intervals_cut_at_chunk_boundaries() {
        assert_eq!(intervals(0, 8, 4), vec![(0, 0, 4), (1, 4, 4)]);
        assert_eq!(intervals(2, 4, 4), vec![(0, 2, 2), (1, 4, 2)]);
        assert_eq!(intervals(4, 2, 4), vec![(1, 4, 2)]);
        assert_eq!(intervals(0, 0, 4), vec![]);
    }

    fn view_metadata_json(plan: &Plan) -> serde_json::Value {
        let (_, b) = plan.iterations[0]
            .small
            .iter()
            .find(|(n, _)| n == "metadata.json")
            .expect("the view has a metadata.json");
        serde_json::from_slice(b).unwrap()
    }

    /// A `--strategy` tensor with a null layout: the view's metadata.json
    /// names its holders (and only them) in storage_data, one whole slice
    /// with a replica per holder; the rank files of exactly those ranks
    /// hold it.
    #[test]
    fn a_null_layout_in_the_view_metadata_names_its_holders() {
        let meta_path = Path::new("tests/fixtures/tp4-f32/iteration_00000005/metadata.json");
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(meta_path).unwrap()).unwrap();
        let name = "decoder.layers.1.pre_mlp_layernorm.weight";
        meta["state_dict_metadata"][name]["layout"] = serde_json::Value::Null;
        meta["storage_data"][format!("('{name}', (0,))")] = serde_json::json!([
            {"file_name": "model-0000001-0000004.safetensors", "storage_rank": 1, "rank_group": [1, 3]},
            {"file_name": "model-0000003-0000004.safetensors", "storage_rank": 3, "rank_group": [1, 3]},
        ]);
        let sp =
            std::env::temp_dir().join(format!("reshardfs-plan-null-{}.json", std::process::id()));
        std::fs::write(&sp, serde_json::to_vec(&meta).unwrap()).unwrap();
        let plan = Plan::build_with(
            Source::open(Path::new("tests/fixtures/tp4-f32")).unwrap(),
            TargetSpec::Strategy(sp.clone()),
            ViewOptions {
                prefix: Some("px".into()),
                ..ViewOptions::default()
            },
        );
        std::fs::remove_file(&sp).unwrap();
        let plan = plan.unwrap();
        let got = view_metadata_json(&plan);
        assert_eq!(
            got["storage_data"][format!("('{name}', (0,))")],
            serde_json::json!([
                {"file_name": "px-model-0000001-0000004.safetensors", "storage_rank": 1, "rank_group": [1, 3]},
                {"file_name": "px-model-0000003-0000004.safetensors", "storage_rank": 3, "rank_group": [1, 3]},
            ]),
            "{name}: storage_data must name ranks 1 and 3, each with rank_group [1, 3]"
        );
        let t = &got["state_dict_metadata"][name];
        assert_eq!(t["layout"], serde_json::Value::Null, "{name}: layout");
        assert_eq!(t["axis_fragmentations"], serde_json::json!([1]), "{name}");
        assert_eq!(
            t["properties"]["replica_id"],
            serde_json::json!([0, 1]),
            "{name}"
        );
        assert_eq!(
            t["chunk"],
            serde_json::json!([{"global_offset": [0], "local_shape": [64]}]),
            "{name}: one whole slice"
        );
        let it = &plan.source.iterations[0];
        let holders: Vec<u64> = plan.iterations[0]
            .files
            .iter()
            .filter(|f| {
                f.tensors
                    .iter()
                    .any(|pt| it.tensors[pt.source].name == name)
            })
            .map(|f| f.rank)
            .collect();
        assert_eq!(holders, vec![1, 3], "{name}: the rank files holding it");
    }

    /// A cast view's metadata.json names the cast dtype in MindSpore's
    /// spelling for every cast tensor, and its rank files by the view's prefix.
    #[test]
    fn a_cast_view_metadata_names_the_served_dtype_and_prefix() {
        let opts = ViewOptions {
            dtype: Some(Dtype::BF16),
            prefix: Some("cast".into()),
            ..ViewOptions::default()
        };
        let plan = mesh("tests/fixtures/tp4-f32", &[("tp", 2)], opts);
        let got = view_metadata_json(&plan);
        let sdm = got["state_dict_metadata"].as_object().unwrap();
        assert_eq!(sdm.len(), 17);
        for (n, m) in sdm {
            assert_eq!(m["properties"]["dtype"], "BFloat16", "{n}: dtype");
        }
        for (k, v) in got["storage_data"].as_object().unwrap() {
            for e in v.as_array().unwrap() {
                let f = e["file_name"].as_str().unwrap();
                let r = e["storage_rank"].as_u64().unwrap();
                assert_eq!(f, format!("cast-model-{r:07}-0000002.safetensors"), "{k}");
            }
        }
        let same = mesh(
            "tests/fixtures/tp4-f32",
            &[("tp", 2)],
            ViewOptions::default(),
        );
        for (n, m) in view_metadata_json(&same)["state_dict_metadata"]
            .as_object()
            .unwrap()
        {
            assert_eq!(m["properties"]["dtype"], "Float32", "{n}: an uncast dtype");
        }
    }

    /// `plan` and `.reshardfs/summary` say which model map made the view
    /// and what it assumed; a source without a model map gets no note.
    #[test]
    fn notes_name_the_model_map() {
        let p = mesh(
            "tests/fixtures/qwen3-tiny-hf",
            &[("tp", 2)],
            ViewOptions::default(),
        );
        let model = p.source.iterations[0].model.as_ref().unwrap();
        let mut want = vec!["model map qwen3".to_string()];
        want.extend(model.notes.iter().cloned());
        assert_eq!(p.iterations[0].notes, want);
        let p = mesh(
            "tests/fixtures/tp4-f32",
            &[("tp", 2)],
            ViewOptions::default(),
        );
        assert_eq!(p.iterations[0].notes, Vec::<String>::new());
    }

    /// `--dtype` casts floating-point tensors only: an integer tensor keeps
    /// its dtype (and its MindSpore dtype name in metadata.json).
    #[test]
    fn a_cast_leaves_integer_tensors_alone() {
        let mut src = Source::open(Path::new("tests/fixtures/tp4-f32")).unwrap();
        let t = &mut src.iterations[0].tensors[0];
        let cast = ViewOptions {
            dtype: Some(Dtype::BF16),
            ..ViewOptions::default()
        };
        assert_eq!(view_dtype(t, &cast), Dtype::BF16);
        assert_eq!(view_dtype(t, &ViewOptions::default()), Dtype::F32);
        t.dtype = Dtype::I64;
        assert_eq!(view_dtype(t, &cast), Dtype::I64, "an I64 tensor was cast");
    }

    /// A view of more tensor slices than MAX_SLICES is refused before any
    /// file is planned: 17 tensors each on 2^20 ranks (dp 2^18 x tp 4).
    #[test]
    fn too_many_slices_are_refused() {
        let spec = TargetSpec::Mesh {
            sizes: vec![("dp".into(), 1 << 18), ("tp".into(), 4)],
            pp: None,
            offset: None,
        };
        let src = Source::open(Path::new("tests/fixtures/tp4-f32")).unwrap();
        let e = Plan::build_with(src, spec, ViewOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("17825792 tensor slices") && msg.contains(&MAX_SLICES.to_string()),
            "{msg}"
        );
    }

    /// A Hugging Face view's shards as transformers cuts them: tensors in
    /// order, a new shard when the next tensor would take this one past
    /// `max_shard_size` (a shard exactly full is full, not over), a tensor
    /// larger than the limit alone; the index's totals are the tensors'
    /// bytes and elements.
    #[test]
    fn hugging_face_shards_fill_up_to_the_limit() {
        let src = Arc::new(Source::open(Path::new("tests/fixtures/qwen3-tiny-hf")).unwrap());
        let it = &src.iterations[0];
        // (name, elements, bytes) of each model tensor, in order, as bf16.
        let tensors: Vec<(String, u64, u64)> = it
            .tensors
            .iter()
            .filter(|t| t.kind == Kind::Model)
            .map(|t| {
                let n: u64 = t.global_shape.iter().product();
                (t.name.clone(), n, n * 2)
            })
            .collect();
        let total: u64 = tensors.iter().map(|t| t.2).sum();
        let params: u64 = tensors.iter().map(|t| t.1).sum();
        let first_two = tensors[0].2 + tensors[1].2;
        for max in [
            1,
            first_two - 1,
            first_two,
            first_two + 1,
            60_000,
            total,
            u64::MAX,
        ] {
            let options = ViewOptions {
                dtype: Some(Dtype::BF16),
                hf: Some(HfOptions {
                    max_shard_size: max,
                    ..HfOptions::default()
                }),
                ..ViewOptions::default()
            };
            let plan = Plan::build_with(src.clone(), TargetSpec::Unshard, options).unwrap();
            // The expected shards, by the rule above.
            let mut want: Vec<Vec<&str>> = vec![];
            let mut bytes = 0;
            for (name, _, b) in &tensors {
                if want.last().is_none_or(|s| !s.is_empty() && bytes + b > max) {
                    want.push(vec![]);
                    bytes = 0;
                }
                want.last_mut().unwrap().push(name);
                bytes += b;
            }
            let ip = &plan.iterations[0];
            let got: Vec<Vec<&str>> = ip
                .files
                .iter()
                .map(|f| {
                    let mut v: Vec<&str> = f
                        .tensors
                        .iter()
                        .map(|t| it.tensors[t.source].name.as_str())
                        .collect();
                    v.sort_unstable();
                    v
                })
                .collect();
            for w in &mut want {
                w.sort_unstable();
            }
            assert_eq!(got, want, "max_shard_size {max}: the shards");
            let (_, index) = ip.small.iter().find(|(n, _)| n == HF_INDEX).unwrap();
            let index: serde_json::Value = serde_json::from_slice(index).unwrap();
            assert_eq!(index["metadata"]["total_size"], total, "max {max}");
            assert_eq!(index["metadata"]["total_parameters"], params, "max {max}");
            let count = want.len();
            for (i, shard) in want.iter().enumerate() {
                for n in shard {
                    assert_eq!(
                        index["weight_map"][*n],
                        format!("model-{:05}-of-{count:05}.safetensors", i + 1),
                        "max {max}: {n}"
                    );
                }
            }
        }
    }

    fn hf_view(src: &str, dtype: Option<Dtype>, files: Vec<(String, Vec<u8>)>) -> Plan {
        hf_view_with(
            src,
            crate::checkpoint::models::ModelChoice::Auto,
            dtype,
            files,
        )
    }

    fn hf_view_with(
        src: &str,
        model: crate::checkpoint::models::ModelChoice,
        dtype: Option<Dtype>,
        files: Vec<(String, Vec<u8>)>,
    ) -> Plan {
        let options = ViewOptions {
            dtype,
            hf: Some(HfOptions {
                max_shard_size: u64::MAX,
                files,
                ..HfOptions::default()
            }),
            ..ViewOptions::default()
        };
        let source = Source::open_with(Path::new(src), model).unwrap();
        // As `--hf` prepares its source (a MindSpore Transformers checkpoint
        // read back through the model's map).
        let source = match model {
            crate::checkpoint::models::ModelChoice::Map(_) => {
                models::hf_view(source, model, None).unwrap().source
            }
            _ => source,
        };
        Plan::build_with(source, TargetSpec::Unshard, options).unwrap()
    }

    fn small_file<'a>(plan: &'a Plan, name: &str) -> &'a [u8] {
        let small = &plan.iterations[0].small;
        let (_, b) = small
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("the view has no {name}"));
        b
    }

    /// A Hugging Face view shows the folder's own config.json (and the files
    /// beside it) byte for byte, restated only for a dtype the view changes,
    /// which the notes say; without one, it generates config.json stating
    /// the dtype of the view's model tensors (an f32 source: float32).
    #[test]
    fn a_hugging_face_view_states_its_dtype_in_config_json() {
        let dir = Path::new("tests/fixtures/qwen3-tiny-hf");
        let files: Vec<(String, Vec<u8>)> = ["config.json", "generation_config.json"]
            .iter()
            .map(|n| (n.to_string(), std::fs::read(dir.join(n)).unwrap()))
            .collect();
        // The dtype a config.json states (transformers writes `dtype`, older
        // versions `torch_dtype`).
        let cfg = |b: &[u8]| -> serde_json::Value {
            let c: serde_json::Value = serde_json::from_slice(b).unwrap();
            let key = if c.get("dtype").is_some() {
                "dtype"
            } else {
                "torch_dtype"
            };
            serde_json::json!({"torch_dtype": c[key].clone(), "all": c})
        };
        let p = hf_view("tests/fixtures/qwen3-tiny-hf", None, files.clone());
        for (n, b) in &files {
            assert_eq!(small_file(&p, n), &b[..], "{n}: not the folder's own");
        }
        let p = hf_view(
            "tests/fixtures/qwen3-tiny-hf",
            Some(Dtype::F32),
            files.clone(),
        );
        assert_eq!(cfg(small_file(&p, "config.json"))["torch_dtype"], "float32");
        assert_eq!(
            small_file(&p, "generation_config.json"),
            &files[1].1[..],
            "generation_config.json changed"
        );
        assert!(
            p.iterations[0].notes.iter().any(|n| n
                .contains("config.json as in the model's folder")
                && n.contains("float32")),
            "{:?}",
            p.iterations[0].notes
        );
        // A generated config.json: the MindSpore Transformers source is f32.
        let qwen3 = crate::checkpoint::models::ModelChoice::parse("qwen3").unwrap();
        let p = hf_view_with(
            "tests/fixtures/qwen3-tiny-mf-tp2-pp2-f32",
            qwen3,
            None,
            vec![],
        );
        let c = cfg(small_file(&p, "config.json"));
        assert_eq!(c["torch_dtype"], "float32", "{}", c["all"]);
        assert!(
            !p.iterations[0].warnings.is_empty(),
            "a generated config.json is warned of"
        );
        // gpt: bf16 model tensors, f32 optimizer states; the view's dtype
        // is its model tensors'.
        let own = br#"{"torch_dtype": "float16"}"#.to_vec();
        let p = hf_view(
            "tests/fixtures/gpt-dp2-tp2-pp2-bf16",
            None,
            vec![("config.json".into(), own)],
        );
        assert_eq!(
            cfg(small_file(&p, "config.json"))["torch_dtype"],
            "bfloat16"
        );
        // Whatever comes first: an f32 optimizer state first in the
        // source's order changes nothing.
        let mut src = Source::open(Path::new("tests/fixtures/gpt-dp2-tp2-pp2-bf16")).unwrap();
        let it = &mut src.iterations[0];
        let opt = it.tensors.iter().position(|t| t.kind == Kind::Opt).unwrap();
        assert_eq!(it.tensors[opt].dtype, Dtype::F32);
        it.tensors.swap(0, opt);
        let options = ViewOptions {
            hf: Some(HfOptions {
                max_shard_size: u64::MAX,
                files: vec![(
                    "config.json".into(),
                    br#"{"torch_dtype": "float16"}"#.to_vec(),
                )],
                ..HfOptions::default()
            }),
            ..ViewOptions::default()
        };
        let p = Plan::build_with(src, TargetSpec::Unshard, options).unwrap();
        assert_eq!(
            cfg(small_file(&p, "config.json"))["torch_dtype"],
            "bfloat16",
            "an optimizer state first decided the view's dtype"
        );
    }

    /// A view file whose header, size and first slice are a source file's,
    /// but one of whose tensors comes from another file (a strategy that
    /// permutes one tensor's ranks), is not that source file whole.
    #[test]
    fn a_file_mixing_two_source_files_is_not_marked_whole() {
        let meta_path = Path::new("tests/fixtures/tp4-f32/iteration_00000005/metadata.json");
        let mut meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(meta_path).unwrap()).unwrap();
        let name = "decoder.layers.1.mlp.linear_fc2.weight";
        meta["state_dict_metadata"][name]["layout"]["rank_list"] = serde_json::json!([1, 0, 2, 3]);
        let sp =
            std::env::temp_dir().join(format!("reshardfs-plan-mixed-{}.json", std::process::id()));
        std::fs::write(&sp, serde_json::to_vec(&meta).unwrap()).unwrap();
        let plan = Plan::build_with(
            Source::open(Path::new("tests/fixtures/tp4-f32")).unwrap(),
            TargetSpec::Strategy(sp.clone()),
            ViewOptions::default(),
        );
        std::fs::remove_file(&sp).unwrap();
        let plan = plan.unwrap();
        let m = marked(&plan);
        assert_eq!(
            m[0].1, None,
            "rank 0 holds {name} from rank 1's file: not rank 0's file whole"
        );
        assert_eq!(
            m[1].1, None,
            "rank 1 holds {name} from rank 0's file: not rank 1's file whole"
        );
        assert_eq!(m[2].1.as_deref(), Some("model-0000002-0000004.safetensors"));
        marks_match_the_bytes(&plan);
    }

    /// A source file whose tensors lie exactly where a view file's do, of
    /// the same size, is still not that file whole when their headers
    /// differ: here only in `__metadata__`, a MindSpore-written file
    /// (`"format": "ms"`) under a Hugging Face view (`"pt"`), the same
    /// length. The view serves its own header; passthrough would serve
    /// the source's.
    #[test]
    fn a_source_file_whose_header_differs_is_not_marked_whole() {
        use crate::checkpoint::source::tests::{f32s, write_st};
        let tmp = tempfile::tempdir().unwrap();
        write_st(
            tmp.path(),
            "model.safetensors",
            &[("w", "F32", &[2], &f32s(&[1.0, 2.0]))],
        );
        let src = tmp.path().to_str().unwrap();
        // The control: unsharded as MindSpore rank files (`"ms"`), the
        // view file is the source file.
        let p = Plan::build_with(
            Source::open(tmp.path()).unwrap(),
            TargetSpec::Unshard,
            ViewOptions::default(),
        )
        .unwrap();
        let (name, whole) = &marked(&p)[0];
        assert_eq!(whole.as_deref(), Some("model.safetensors"), "{name}");
        marks_match_the_bytes(&p);
        let config = vec![("config.json".to_string(), b"{}".to_vec())];
        let p = hf_view(src, None, config);
        let (name, whole) = &marked(&p)[0];
        assert_eq!(*whole, None, "{name}: its header says \"pt\"");
        marks_match_the_bytes(&p);
    }

    /// Every size of a view file is checked: slices whose end passes 2^64
    /// bytes once the header is counted are refused, naming one (the
    /// header builder checks the data alone, not the header before it).
    #[test]
    fn a_view_file_past_64_bit_sizes_is_refused() {
        use crate::checkpoint::source::tests::{f32s, write_st};
        let tmp = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..8).map(|i| format!("w{i}")).collect();
        let data = f32s(&[1.0]);
        let tensors: Vec<(&str, &str, &[u64], &[u8])> = names
            .iter()
            .map(|n| (n.as_str(), "F32", &[1u64][..], &data[..]))
            .collect();
        write_st(tmp.path(), "model.safetensors", &tensors);
        let src = Source::open(tmp.path()).unwrap();
        let it = &src.iterations[0];
        // Eight slices of 4 * (2^59 - 1) = 2^61 - 4 bytes (a safetensors
        // header counts a tensor's bits in 64: at most 2^61 bytes each):
        // 2^64 - 32 bytes of data, within a u64, not with the header.
        let slices: Vec<(usize, Slice)> = (0..8)
            .map(|ti| {
                let shape = vec![(1 << 59) - 1];
                (
                    ti,
                    Slice {
                        start: vec![0],
                        shape,
                    },
                )
            })
            .collect();
        let e = plan_file(
            it,
            "v.safetensors".into(),
            &slices,
            &ViewOptions::default(),
            "pt",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.exit_code(), 2, "{msg}");
        assert!(
            msg.contains("v.safetensors") && msg.contains("tensor w") && msg.contains("overflows"),
            "{msg}"
        );
    }

    /// A view file is a source file whole only when each of its slices is
    /// one stored slice: a slice of a stored slice's shape but off the
    /// chunk grid (one row earlier, so it straddles two) is not, even where
    /// a data-parallel replica holds the slice it ends in at the same
    /// offset. (No target makes such a slice today: `Layout::slice` starts
    /// every slice on a multiple of its extent.)
    #[test]
    fn a_slice_off_the_chunk_grid_is_no_source_files_whole() {
        let p = mesh(
            "tests/fixtures/gpt-dp2-tp2-pp2-bf16",
            &[("dp", 1)],
            ViewOptions::default(),
        );
        let it = &p.source.iterations[0];
        let vf = &p.iterations[0].files[1];
        let whole = |tensors: &[PlannedTensor]| {
            whole_source_file(it, &vf.header, tensors, vf.size).map(|f| it.files[f].name.clone())
        };
        assert_eq!(
            whole(&vf.tensors).as_deref(),
            Some("gpt-model-0000001-0000008.safetensors")
        );
        // A tensor split on rows whose slice here is the second half.
        let i = vf
            .tensors
            .iter()
            .position(|pt| {
                let t = &it.tensors[pt.source];
                t.frag[0] == 2 && pt.slice.start[0] > 0 && t.chunks[1].holders.len() == 2
            })
            .expect("a row-split tensor held by two data-parallel replicas");
        let mut shifted = vf.tensors.clone();
        shifted[i].slice.start[0] -= 1;
        assert_eq!(whole(&shifted), None);
    }

    /// The box kept per part grows to hold every box added for it: the
    /// smallest box holding both, in every dimension.
    #[test]
    fn merged_boxes_bound_what_they_hold() {
        let b = |start: [u64; 2], shape: [u64; 2]| Slice {
            start: start.to_vec(),
            shape: shape.to_vec(),
        };
        let mut out = vec![(0, b([2, 1], [2, 3]))];
        merge_box(&mut out, 0, b([6, 2], [2, 4]));
        assert_eq!(out, vec![(0, b([2, 1], [6, 5]))]);
        merge_box(&mut out, 0, b([0, 0], [1, 1]));
        assert_eq!(out, vec![(0, b([0, 0], [8, 6]))]);
        merge_box(&mut out, 0, b([3, 3], [1, 1]));
        assert_eq!(
            out,
            vec![(0, b([0, 0], [8, 6]))],
            "a box inside changes nothing"
        );
        merge_box(&mut out, 1, b([5, 5], [1, 2]));
        assert_eq!(out, vec![(0, b([0, 0], [8, 6])), (1, b([5, 5], [1, 2]))]);
    }

    /// A target slice counts one piece per source slice it meets: tp4 to
    /// tp2, a row-split tensor's half meets two quarters, a replicated
    /// norm one copy.
    #[test]
    fn pieces_count_the_source_slices_met() {
        let plan = mesh(
            "tests/fixtures/tp4-f32",
            &[("tp", 2)],
            ViewOptions::default(),
        );
        let it = &plan.source.iterations[0];
        let vf = &plan.iterations[0].files[0];
        let count = |name: &str| {
            let pt = vf
                .tensors
                .iter()
                .find(|pt| it.tensors[pt.source].name == name)
                .unwrap();
            let t = &it.tensors[pt.source];
            let n = piece_count(it, t, &pt.slice);
            assert_eq!(n, pieces(it, t, &pt.slice, &[]).len() as u64, "{name}");
            n
        };
        assert_eq!(count("embedding.word_embeddings.weight"), 2);
        assert_eq!(count("decoder.final_layernorm.weight"), 1);
    }

    fn sl(start: [u64; 2], shape: [u64; 2]) -> Slice {
        Slice {
            start: start.to_vec(),
            shape: shape.to_vec(),
        }
    }

    /// A fused QKV's slice draws, per part, on the bounding box of the
    /// rows it reads. The tiny Qwen3 (tests/fixtures/README.md): 4 heads,
    /// 2 key/value groups, head_dim 16, hidden 64, so each 64-row group of
    /// `linear_qkv` is 32 q rows, 16 k rows, 16 v rows; fused row `r` of
    /// group `g = r / 64`, `w = r % 64`, is q row `32g + w`, k row
    /// `16g + w - 32` or v row `16g + w - 48`. Expected boxes by hand.
    #[test]
    fn a_fused_slice_draws_on_the_rows_of_its_parts() {
        let src = Source::open(Path::new("tests/fixtures/qwen3-tiny-hf")).unwrap();
        let it = &src.iterations[0];
        let t = it
            .tensors
            .iter()
            .find(|t| t.name == "decoder.layers.0.self_attention.linear_qkv.weight")
            .unwrap();
        assert_eq!(t.global_shape, vec![128, 64]);
        let part = |x: &str| {
            let name = format!("model.layers.0.self_attn.{x}_proj.weight");
            it.parts.iter().position(|p| p.name == name).unwrap()
        };
        let (q, k, v) = (part("q"), part("k"), part("v"));
        let got = |start, shape| part_slices(it, t, &sl(start, shape));
        assert_eq!(
            got([0, 0], [128, 64]),
            vec![
                (q, sl([0, 0], [64, 64])),
                (k, sl([0, 0], [32, 64])),
                (v, sl([0, 0], [32, 64]))
            ]
        );
        // Rows 40..100, columns 8..24: k 8..16, v 0..16 (group 0), q
        // 32..64, k 16..20 (group 1).
        assert_eq!(
            got([40, 8], [60, 16]),
            vec![
                (q, sl([32, 8], [32, 16])),
                (k, sl([8, 8], [12, 16])),
                (v, sl([0, 8], [16, 16]))
            ]
        );
        // Inside one segment: k rows 1..3 only; one row, k row 1.
        assert_eq!(got([33, 0], [2, 64]), vec![(k, sl([1, 0], [2, 64]))]);
        assert_eq!(got([33, 0], [1, 64]), vec![(k, sl([1, 0], [1, 64]))]);
        // Across a period boundary: v 12..16, then q 32..38.
        assert_eq!(
            got([60, 0], [10, 64]),
            vec![(q, sl([32, 0], [6, 64])), (v, sl([12, 0], [4, 64]))]
        );
        // Starting in period 1 after its q rows: k 20..32, v 16..32.
        assert_eq!(
            got([100, 0], [28, 64]),
            vec![(k, sl([20, 0], [12, 64])), (v, sl([16, 0], [16, 64]))]
        );
        // Ending before a segment of period 0: q rows 5..10 only.
        assert_eq!(got([5, 0], [5, 64]), vec![(q, sl([5, 0], [5, 64]))]);
        assert_eq!(got([5, 0], [0, 64]), vec![], "no rows, no parts");
    }

    /// A part read out of a fused tensor with a stride and a base: k rows
    /// as a row map over the 96-row `gate_proj`, 16 rows out of every 40
    /// starting at 8 (hand-made). Output row `r` is part row
    /// `40 * (r / 16) + 8 + r % 16`.
    #[test]
    fn a_strided_row_map_draws_on_every_period() {
        let src = Source::open(Path::new("tests/fixtures/qwen3-tiny-hf")).unwrap();
        let it = &src.iterations[0];
        let p = it
            .parts
            .iter()
            .position(|p| p.name == "model.layers.0.mlp.gate_proj.weight")
            .unwrap();
        assert_eq!(it.parts[p].global_shape, vec![96, 64]);
        let map = RowMap {
            period: 16,
            segments: vec![crate::checkpoint::source::RowSegment {
                out_start: 0,
                len: 16,
                part: p,
                stride: 40,
                base: 8,
            }],
        };
        // Rows 10..20: part rows 18..24 and 48..52.
        assert_eq!(
            row_part_slices(it, &map, &sl([10, 3], [10, 5])),
            vec![(p, sl([18, 3], [34, 5]))]
        );
        // Rows 16..18 of period 1 only: part rows 48..50.
        assert_eq!(
            row_part_slices(it, &map, &sl([16, 0], [2, 64])),
            vec![(p, sl([48, 0], [2, 64]))]
        );
        // Rows 30..42 are part rows 62..64 and 88..98, past the part's 96
        // rows: the box stops at its last row.
        assert_eq!(
            row_part_slices(it, &map, &sl([30, 0], [12, 64])),
            vec![(p, sl([62, 0], [34, 64]))]
        );
        // Rows 30..40 end at part row 95 exactly: no clamp needed.
        assert_eq!(
            row_part_slices(it, &map, &sl([30, 0], [10, 64])),
            vec![(p, sl([62, 0], [34, 64]))]
        );
        // Rows 30..34: part rows 62..64 and 88..90.
        assert_eq!(
            row_part_slices(it, &map, &sl([30, 0], [4, 64])),
            vec![(p, sl([62, 0], [28, 64]))]
        );
        // Two segments of a 4-row period, the first with a stride wider
        // than its length: rows 0..2 of each period are `gate_proj` rows
        // `10 * (r / 4) + r % 4`, rows 2..4 `up_proj` rows `2 * (r / 4) +
        // r % 4 - 2`. Rows 2..10: up 0, 1; gate 10, 11; up 2, 3; gate 20,
        // 21.
        let u = it
            .parts
            .iter()
            .position(|p| p.name == "model.layers.0.mlp.up_proj.weight")
            .unwrap();
        let seg = |out_start, part, stride| crate::checkpoint::source::RowSegment {
            out_start,
            len: 2,
            part,
            stride,
            base: 0,
        };
        let map = RowMap {
            period: 4,
            segments: vec![seg(0, p, 10), seg(2, u, 2)],
        };
        assert_eq!(
            row_part_slices(it, &map, &sl([2, 0], [8, 64])),
            vec![(p, sl([10, 0], [12, 64])), (u, sl([0, 0], [4, 64]))]
        );
    }

    /// A tiled tensor's slice draws, per part, on the bounding box of the
    /// part's elements it reads, a transposed tile's rows and columns
    /// swapped. A hand-made 4 x 6 map: band 0 (rows 0..2) is columns 0..3
    /// of part 0 copied from (0, 0) and columns 3..6 of part 1 transposed
    /// from (5, 1); band 1 (row 2) is columns 0..2 and 2..6 of part 0,
    /// copied from (2, 0) and (2, 2); band 2 (row 3) is part 2.
    #[test]
    fn a_tiled_slice_draws_on_the_rectangles_of_its_parts() {
        use crate::checkpoint::source::tests::{band, tile};
        let map = TileMap {
            bands: vec![
                band(
                    0,
                    2,
                    vec![tile(0, 3, 0, 0, 0, false), tile(3, 3, 1, 5, 1, true)],
                ),
                band(
                    2,
                    1,
                    vec![tile(0, 2, 0, 2, 0, false), tile(2, 4, 0, 2, 2, false)],
                ),
                band(3, 1, vec![tile(0, 6, 2, 0, 0, false)]),
            ],
        };
        // Rows 1..3, columns 2..5. Element (1, 2) is part 0's (1, 2);
        // (1, 3) and (1, 4) are part 1's (5, 2) and (6, 2) (output (i, j)
        // of a transposed tile is the part's (row + j, col0 + i)); (2, 2..5)
        // are part 0's (2, 2..5). Band 1's first tile and band 2 are not
        // met (the slice ends at their edges).
        assert_eq!(
            tile_part_slices(&map, &sl([1, 2], [2, 3])),
            vec![(0, sl([1, 2], [2, 3])), (1, sl([5, 2], [2, 1]))]
        );
        // The whole tensor: part 0 rows 0..3 x columns 0..6, part 1's 3 x 2
        // transposed rectangle, part 2's row.
        assert_eq!(
            tile_part_slices(&map, &sl([0, 0], [4, 6])),
            vec![
                (0, sl([0, 0], [3, 6])),
                (1, sl([5, 1], [3, 2])),
                (2, sl([0, 0], [1, 6]))
            ]
        );
        // Row 3 only: part 2's columns 1..4.
        assert_eq!(
            tile_part_slices(&map, &sl([3, 1], [1, 3])),
            vec![(2, sl([0, 1], [1, 3]))]
        );
    }
}
