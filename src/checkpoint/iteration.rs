//! An iteration folder with `metadata.json`: every tensor's layout and
//! slices, checked against the rank files that hold them.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use serde_json::Value;

use super::header::{MINDSPORE_DTYPES, dtype_from_mindspore, elem_size};
use super::layout::{Layout, checked_product, unravel};
use super::limits::{MAX_METADATA_BYTES, MAX_TENSORS, MAX_WORLD};
use super::mapped::RankFile;
use super::metadata::{self, ChunkJson, StorageEntry, TensorMeta, from_value};
use super::names::{self, Kind};
use super::paths::{FileSet, Links, read_small};
use super::source::{Chunk, Iteration, Tensor, read_common};
use crate::error::{Error, Result};
use crate::{bad, bail};

pub(crate) fn kind_of_file(name: &str) -> Kind {
    match names::parse_rank_file_name(name) {
        Some(n) => n.kind,
        None if name.starts_with("opt") || name.contains("-opt") => Kind::Opt,
        None => Kind::Model,
    }
}

/// Loads an iteration folder with metadata.json and checks it against its rank files.
pub(crate) fn load_iteration(dir: &Path, name: Option<String>) -> Result<Iteration> {
    let meta_path = dir.join(names::METADATA);
    let raw = read_small(&meta_path, MAX_METADATA_BYTES)?;
    let json: Value = serde_json::from_slice(&raw)
        .map_err(|e| bad!("{}: not valid JSON: {e}", meta_path.display()))?;
    let mp = meta_path.display();
    let sdm = json
        .get("state_dict_metadata")
        .ok_or_else(|| bad!("{mp}: missing key `state_dict_metadata`"))?
        .as_object()
        .ok_or_else(|| bad!("{mp}: `state_dict_metadata` is not an object"))?;
    let sd = json
        .get("storage_data")
        .ok_or_else(|| bad!("{mp}: missing key `storage_data`"))?
        .as_object()
        .ok_or_else(|| bad!("{mp}: `storage_data` is not an object"))?;
    if sdm.is_empty() {
        bail!("{mp}: `state_dict_metadata` lists no tensors");
    }
    if sdm.len() > MAX_TENSORS {
        bail!(
            "{mp}: `state_dict_metadata` lists {} tensors, more than the {MAX_TENSORS} supported",
            sdm.len()
        );
    }

    // storage_data, grouped by shard id.
    let mut storage: HashMap<(String, u64), Vec<StorageEntry>> = HashMap::new();
    // Every file named, in order of first mention, to open in parallel.
    let mut named: Vec<String> = Vec::new();
    let mut named_set: std::collections::HashSet<String> = std::collections::HashSet::new();
    for (key, value) in sd {
        let (tname, k) =
            metadata::parse_shard_id(key).map_err(|e| bad!("{mp}: storage_data: {e}"))?;
        let mut entries: Vec<StorageEntry> =
            from_value(value).map_err(|e| bad!("{mp}: storage_data[{key:?}]: {e}"))?;
        if entries.is_empty() {
            bail!("{mp}: storage_data[{key:?}] lists no file");
        }
        if !sdm.contains_key(&tname) {
            bail!(
                "{mp}: storage_data[{key:?}] names tensor {tname}, which state_dict_metadata does not list"
            );
        }
        entries.sort_by_key(|e| e.storage_rank);
        for e in &entries {
            if named_set.insert(e.file_name.clone()) {
                named.push(e.file_name.clone());
            }
        }
        if storage.insert((tname, k), entries).is_some() {
            bail!("{mp}: storage_data lists shard id {key:?} twice");
        }
    }

    let mut files = FileSet {
        dir,
        named_in: &meta_path,
        links: Links::Inside,
        files: Vec::new(),
        index: HashMap::new(),
    };
    files.preopen(&named);
    let mut tensors = Vec::with_capacity(sdm.len());
    let mut max_rank = 0u64;
    let mut used_shards = 0usize;
    for (tname, value) in sdm {
        let tm: TensorMeta = from_value(value).map_err(|e| bad!("{mp}: tensor {tname}: {e}"))?;
        let t = check_tensor(tname, &tm, &storage, &mut files, &mp.to_string())?;
        used_shards += t.chunks.len();
        if let Some(l) = &t.layout {
            max_rank = max_rank.max(l.rank_list.iter().copied().max().unwrap_or(0));
        }
        for c in &t.chunks {
            max_rank = max_rank.max(c.holders.iter().map(|h| h.1).max().unwrap_or(0));
        }
        tensors.push(t);
    }
    if used_shards != storage.len() {
        // Some key names a slice index beyond the tensor's grid.
        let mut extra: Vec<String> = storage
            .keys()
            .filter(|(n, k)| {
                tensors
                    .iter()
                    .find(|t| &t.name == n)
                    .is_none_or(|t| *k >= t.chunks.len() as u64)
            })
            .map(|(n, k)| metadata::format_shard_id(n, *k))
            .collect();
        extra.sort();
        bail!(
            "{mp}: storage_data lists {} shard id(s) that match no chunk, e.g. {}",
            extra.len(),
            extra.first().map(String::as_str).unwrap_or("?")
        );
    }

    if max_rank >= MAX_WORLD {
        bail!("{mp}: names rank {max_rank}, beyond the {MAX_WORLD} ranks supported");
    }
    let world = max_rank + 1;
    let stage_devices = tensors
        .iter()
        .find_map(|t| t.layout.as_ref().map(Layout::devices))
        .unwrap_or(world);
    for t in &mut tensors {
        t.stage = match &t.layout {
            Some(l) => l.rank_list.iter().min().copied().unwrap_or(0) / l.devices(),
            None => t.chunks[0].holders[0].1 / stage_devices,
        };
    }
    let stages = world.div_ceil(stage_devices);
    let prefix = common_prefix(&files.files, dir)?;
    let common_json = read_common(dir)?;
    Ok(Iteration {
        dir: dir.to_path_buf(),
        name,
        prefix,
        files: files.files,
        tensors,
        common_json,
        world,
        stage_devices,
        stages,
        parts: Vec::new(),
        omitted: Vec::new(),
        model: None,
    })
}

/// The prefix the source's rank files share (`gpt` in `gpt-model-...`).
pub(crate) fn common_prefix(files: &[RankFile], dir: &Path) -> Result<Option<String>> {
    let mut prefixes: Vec<Option<String>> = files
        .iter()
        .filter_map(|f| names::parse_rank_file_name(&f.name))
        .map(|n| n.prefix)
        .collect();
    prefixes.sort();
    prefixes.dedup();
    match prefixes.len() {
        0 => Ok(None),
        1 => Ok(prefixes.pop().flatten()),
        _ => {
            log::warn!(
                "{}: rank files use several prefixes ({:?}); the view uses the first",
                dir.display(),
                prefixes
            );
            Ok(prefixes.swap_remove(0))
        }
    }
}

/// Checks one tensor's metadata entry, as three checks in turn: its grid
/// (shape, layout and fragmentation agree, [`check_grid`]), each of its
/// chunks ([`check_chunk`]), and each file said to hold a chunk
/// ([`check_holder`]).
fn check_tensor(
    name: &str,
    tm: &TensorMeta,
    storage: &HashMap<(String, u64), Vec<StorageEntry>>,
    files: &mut FileSet<'_>,
    mp: &str,
) -> Result<Tensor> {
    let at = |what: String| bad!("{mp}: tensor {name}: {what}");
    let grid = check_grid(tm, &at)?;
    let ms_dtype = tm.properties.dtype.clone();
    // A name MindSpore does not define is refused, not passed through to the
    // view's metadata.json: a loader would fail on it far from its cause.
    let meta_dtype = dtype_from_mindspore(&ms_dtype).ok_or_else(|| {
        at(format!(
            "properties.dtype {ms_dtype:?} is not one of MindSpore's dtype names ({})",
            MINDSPORE_DTYPES.join(", ")
        ))
    })?;
    let mut seen = Seen::default();
    let mut chunks: Vec<Option<Chunk>> = vec![None; grid.nchunks as usize];
    for (ci, c) in tm.chunk.iter().enumerate() {
        let k = check_chunk(ci, c, &grid, &chunks, &at)?;
        let entries = storage.get(&(name.to_string(), k)).ok_or_else(|| {
            at(format!(
                "slice [{k}] has no storage_data entry {}",
                metadata::format_shard_id(name, k)
            ))
        })?;
        let start: Vec<u64> = unravel(k, &grid.frag)
            .iter()
            .zip(&grid.chunk_shape)
            .map(|(g, c)| g * c)
            .collect();
        let mut holders = Vec::with_capacity(entries.len());
        let mut chosen: Option<Chunk> = None;
        for e in entries {
            let fi = files.get(&e.file_name, || format!("tensor {name}: slice [{k}]: "))?;
            let want = Holder {
                name,
                k,
                shape: &tm.global_shape,
                chunk_shape: &grid.chunk_shape,
                start: &start,
                ms_dtype: &ms_dtype,
                dtype: meta_dtype,
            };
            let (offset, origin, stored_shape) =
                check_holder(&files.files[fi], &want, &mut seen, &at)?;
            holders.push((fi, e.storage_rank));
            // Reads come from the lowest storage rank holding the slice by
            // default; the others stored the same way are alternatives.
            match &mut chosen {
                None => {
                    chosen = Some(Chunk {
                        file: fi,
                        offset,
                        origin,
                        stored_shape,
                        holders: Vec::new(),
                        others: Vec::new(),
                    })
                }
                Some(c) if c.origin == origin && c.stored_shape == stored_shape => {
                    c.others.push((fi, offset))
                }
                Some(_) => {}
            }
        }
        let mut chunk = chosen.ok_or_else(|| at(format!("slice [{k}] has no file")))?;
        chunk.holders = holders;
        chunks[k as usize] = Some(chunk);
    }
    let chunks: Vec<Chunk> = chunks.into_iter().flatten().collect();
    let dtype = seen
        .dtype
        .ok_or_else(|| at("no slice is stored anywhere".into()))?;
    grid.nelems
        .checked_mul(elem_size(dtype))
        .ok_or_else(|| at("byte size overflows".into()))?;
    Ok(Tensor {
        name: name.to_string(),
        kind: seen.kind.map(|k| k.0).unwrap_or(Kind::Model),
        dtype,
        ms_dtype,
        global_shape: tm.global_shape.clone(),
        layout: grid.layout,
        frag: grid.frag,
        chunk_shape: grid.chunk_shape,
        chunks,
        stage: 0,
        allow_shape_mismatch: tm.properties.allow_shape_mismatch,
        allow_to_save: tm.properties.allow_to_save,
        assembly: None,
        rules: Default::default(),
    })
}

/// How a tensor is cut: its layout (if any) and the grid of slices.
struct Grid {
    shape: Vec<u64>,
    layout: Option<Layout>,
    /// Slices per dimension (`axis_fragmentations`).
    frag: Vec<u64>,
    chunk_shape: Vec<u64>,
    nchunks: u64,
    nelems: u64,
}

/// The grid check: the element count fits, the layout is valid, and
/// `axis_fragmentations` has a positive divisor of each dimension, agreeing
/// with the layout's splits.
fn check_grid(tm: &TensorMeta, at: &impl Fn(String) -> Error) -> Result<Grid> {
    let shape = &tm.global_shape;
    let ndim = shape.len();
    let nelems =
        checked_product(shape).ok_or_else(|| at("global_shape: element count overflows".into()))?;
    let layout = match &tm.layout {
        Some(lj) => Some(Layout::from_json(lj, ndim).map_err(at)?),
        None => None,
    };
    // A 0-d tensor has no dimensions to split; tolerate `[1]` for it.
    let frag: Vec<u64> = if ndim == 0 && tm.axis_fragmentations.iter().all(|&f| f == 1) {
        Vec::new()
    } else {
        tm.axis_fragmentations.clone()
    };
    if frag.len() != ndim {
        return Err(at(format!(
            "axis_fragmentations has {} entries, global_shape {:?} has {ndim} dimensions",
            frag.len(),
            shape
        )));
    }
    for (d, (&f, &s)) in frag.iter().zip(shape).enumerate() {
        if f == 0 || s % f != 0 {
            return Err(at(format!(
                "axis_fragmentations[{d}] = {f} does not split dimension {d} of size {s} evenly"
            )));
        }
    }
    if let Some(l) = &layout {
        let want = l.fragmentations();
        if let Some(d) = (0..ndim).find(|&d| want[d] != frag[d]) {
            return Err(at(format!(
                "axis_fragmentations[{d}] is {}, but the layout splits dimension {d} into {}",
                frag[d], want[d]
            )));
        }
    }
    let chunk_shape: Vec<u64> = shape.iter().zip(&frag).map(|(s, f)| s / f).collect();
    let nchunks =
        checked_product(&frag).ok_or_else(|| at("axis_fragmentations overflow".into()))?;
    if tm.chunk.len() as u64 != nchunks {
        return Err(at(format!(
            "chunk lists {} slices, but axis_fragmentations {:?} make {nchunks}: the slices {}",
            tm.chunk.len(),
            frag,
            if (tm.chunk.len() as u64) < nchunks {
                "leave a gap"
            } else {
                "overlap"
            }
        )));
    }
    Ok(Grid {
        shape: shape.clone(),
        layout,
        frag,
        chunk_shape,
        nchunks,
        nelems,
    })
}

/// The chunk check: entry `ci` of `chunk` names one slice of the grid, by
/// its index, with the grid's slice shape, and no other entry named it
/// before. Returns the slice's index.
fn check_chunk(
    ci: usize,
    c: &ChunkJson,
    grid: &Grid,
    found: &[Option<Chunk>],
    at: &impl Fn(String) -> Error,
) -> Result<u64> {
    let nchunks = grid.nchunks;
    let k = match c.global_offset.as_slice() {
        [k] => *k,
        other => {
            return Err(at(format!(
                "chunk[{ci}].global_offset is {other:?}; expected [k], the slice's index in the axis_fragmentations grid"
            )));
        }
    };
    if k >= nchunks {
        return Err(at(format!(
            "chunk[{ci}].global_offset [{k}] is outside the {nchunks} slices of axis_fragmentations {:?}",
            grid.frag
        )));
    }
    if c.local_shape != grid.chunk_shape {
        return Err(at(format!(
            "chunk[{ci}].local_shape is {:?}; global_shape {:?} split by {:?} gives {:?}, so the slices would overlap or leave a gap",
            c.local_shape, grid.shape, grid.frag, grid.chunk_shape
        )));
    }
    if found[k as usize].is_some() {
        return Err(at(format!(
            "chunk[{ci}] repeats slice [{k}]: the slices overlap"
        )));
    }
    Ok(k)
}

/// What a file holding slice `k` of a tensor must hold.
struct Holder<'a> {
    name: &'a str,
    k: u64,
    shape: &'a [u64],
    chunk_shape: &'a [u64],
    /// The slice's start in global coordinates.
    start: &'a [u64],
    ms_dtype: &'a str,
    dtype: Dtype,
}

/// What the files seen so far hold the tensor as.
#[derive(Default)]
struct Seen {
    dtype: Option<Dtype>,
    /// The kind of file (model or opt) and the first file it was seen in.
    kind: Option<(Kind, String)>,
}

/// The holder check: file `f` is of the same kind as the tensor's other
/// files, holds the tensor with metadata.json's dtype (as every other file
/// does) and with the slice's shape or the whole tensor's. Returns the
/// stored tensor's offset, the global coordinates of its first element
/// and its shape.
fn check_holder(
    f: &RankFile,
    want: &Holder<'_>,
    seen: &mut Seen,
    at: &impl Fn(String) -> Error,
) -> Result<(u64, Vec<u64>, Vec<u64>)> {
    let (name, k) = (want.name, want.k);
    let fk = kind_of_file(&f.name);
    match &seen.kind {
        None => seen.kind = Some((fk, f.name.clone())),
        Some((k0, f0)) if *k0 != fk => {
            return Err(at(format!(
                "stored both in {f0} ({}) and in {} ({})",
                k0.as_str(),
                f.name,
                fk.as_str()
            )));
        }
        _ => {}
    }
    let st = f.tensors.get(name).ok_or_else(|| {
        bad!(
            "{}: tensor {name} is missing (metadata.json says slice [{k}] is here)",
            f.path.display()
        )
    })?;
    if st.dtype != want.dtype {
        bail!(
            "{}: tensor {name}: dtype is {:?}, but metadata.json says {} ({:?})",
            f.path.display(),
            st.dtype,
            want.ms_dtype,
            want.dtype
        );
    }
    match seen.dtype {
        None => seen.dtype = Some(st.dtype),
        Some(d) if d != st.dtype => bail!(
            "{}: tensor {name}: dtype is {:?}, but other files hold it as {d:?}",
            f.path.display(),
            st.dtype
        ),
        _ => {}
    }
    let origin = if st.shape == want.chunk_shape {
        want.start.to_vec()
    } else if st.shape == want.shape {
        vec![0; want.shape.len()]
    } else {
        bail!(
            "{}: tensor {name}: shape is {:?}, but metadata.json says slice [{k}] has local_shape {:?} (global_shape {:?})",
            f.path.display(),
            st.shape,
            want.chunk_shape,
            want.shape
        );
    };
    Ok((st.offset, origin, st.shape.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::tests::{f32s, fixture, input_err, write_st};
    use serde_json::json;
    use std::fs;

    const F0: &str = "model-0000000-0000002.safetensors";
    const F1: &str = "model-0000001-0000002.safetensors";

    /// Rows of `w` (f32 `[4, 2]`, element i = i): slice k holds rows 2k, 2k+1.
    fn w_rows(k: usize) -> Vec<u8> {
        let all: Vec<f32> = (0..8).map(|i| i as f32).collect();
        f32s(&all[k * 4..k * 4 + 4])
    }

    /// Rewrites rank 1's file of [`tp2`] with `w` stored as `name`, `shape`,
    /// `data`; `n` as before.
    fn rewrite_f1_w(dir: &Path, name: &str, shape: &[u64], data: &[u8]) {
        let n = f32s(&[9.0, 10.0]);
        write_st(
            dir,
            F1,
            &[(name, "F32", shape, data), ("n", "F32", &[2], &n)],
        );
    }

    fn layout(tensor_map: serde_json::Value) -> serde_json::Value {
        json!({"device_matrix": [2], "tensor_map": tensor_map, "interleaved_parallel": false,
               "alias_name": ["tp"], "rank_list": [0, 1]})
    }

    /// A tp=2 iteration written by hand: `w` f32 `[4, 2]` split on rows
    /// (slice 0 in rank 0's file, slice 1 in rank 1's), `n` f32 `[2]`
    /// replicated in both files, its storage entries listed highest rank
    /// first. Returns its metadata.json, not yet written.
    fn tp2(dir: &Path) -> serde_json::Value {
        let n = f32s(&[9.0, 10.0]);
        write_st(
            dir,
            F0,
            &[("w", "F32", &[2, 2], &w_rows(0)), ("n", "F32", &[2], &n)],
        );
        write_st(
            dir,
            F1,
            &[("w", "F32", &[2, 2], &w_rows(1)), ("n", "F32", &[2], &n)],
        );
        json!({
            "state_dict_metadata": {
                "w": {"properties": {"dtype": "Float32"}, "global_shape": [4, 2],
                      "axis_fragmentations": [2, 1], "layout": layout(json!([0, -1])),
                      "chunk": [{"global_offset": [0], "local_shape": [2, 2]},
                                {"global_offset": [1], "local_shape": [2, 2]}]},
                "n": {"properties": {"dtype": "Float32"}, "global_shape": [2],
                      "axis_fragmentations": [1], "layout": layout(json!([-1])),
                      "chunk": [{"global_offset": [0], "local_shape": [2]}]}
            },
            "storage_data": {
                "('w', (0,))": [{"file_name": F0, "storage_rank": 0}],
                "('w', (1,))": [{"file_name": F1, "storage_rank": 1}],
                "('n', (0,))": [{"file_name": F1, "storage_rank": 1, "rank_group": [0, 1]},
                                {"file_name": F0, "storage_rank": 0, "rank_group": [0, 1]}]
            }
        })
    }

    fn load(dir: &Path, meta: &serde_json::Value) -> Result<Iteration> {
        fs::write(dir.join("metadata.json"), serde_json::to_vec(meta).unwrap()).unwrap();
        load_iteration(dir, None)
    }

    fn meta_path(dir: &Path) -> String {
        dir.join("metadata.json").display().to_string()
    }

    /// Where a file's data section starts, from its own first 8 bytes.
    fn data_start(path: &Path) -> u64 {
        let b = fs::read(path).unwrap();
        u64::from_le_bytes(b[..8].try_into().unwrap()) + 8
    }

    #[test]
    fn a_hand_written_tp2_iteration_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let it = load(dir, &tp2(dir)).unwrap();
        assert_eq!((it.world, it.stage_devices, it.stages), (2, 2, 1));
        assert_eq!(it.prefix, None);
        assert_eq!(it.tensors.len(), 2);
        let w = &it.tensors[0];
        assert_eq!(w.name, "w");
        assert_eq!(
            (w.kind, w.dtype, w.ms_dtype.as_str()),
            (Kind::Model, Dtype::F32, "Float32")
        );
        assert_eq!(
            (w.frag.clone(), w.chunk_shape.clone()),
            (vec![2, 1], vec![2, 2])
        );
        assert_eq!(w.chunks.len(), 2);
        for (k, file) in [F0, F1].into_iter().enumerate() {
            let c = &w.chunks[k];
            assert_eq!(it.files[c.file].name, file);
            assert_eq!(c.origin, vec![2 * k as u64, 0]);
            assert_eq!(c.stored_shape, vec![2, 2]);
            // w is the first tensor of each file: its bytes start the data.
            assert_eq!(c.offset, data_start(&dir.join(file)));
            assert_eq!(it.files[c.file].bytes(c.offset, 16), w_rows(k).as_slice());
        }
        assert!(it.tensors.iter().all(|t| t.stage == 0));
    }

    #[test]
    fn replicas_are_holders_and_the_lowest_rank_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let it = load(dir, &tp2(dir)).unwrap();
        let n = it.tensors.iter().find(|t| t.name == "n").unwrap();
        assert_eq!(n.chunks.len(), 1);
        let c = &n.chunks[0];
        let holders: Vec<(&str, u64)> = c
            .holders
            .iter()
            .map(|&(f, r)| (it.files[f].name.as_str(), r))
            .collect();
        assert_eq!(holders, vec![(F0, 0), (F1, 1)]);
        assert_eq!(it.files[c.file].name, F0);
        // n follows w's 16 bytes in rank 0's file.
        assert_eq!(c.offset, data_start(&dir.join(F0)) + 16);
        // Rank 1's copy, stored the same way, is the other place to read it,
        // where the reader's own files are rank 1's.
        let f = |name: &str| it.files.iter().position(|x| x.name == name).unwrap();
        let in_f1 = (f(F1), data_start(&dir.join(F1)) + 16);
        assert_eq!(c.others, vec![in_f1]);
        assert_eq!(c.read_from(&[f(F1)]), in_f1);
        assert_eq!(c.read_from(&[f(F0), f(F1)]), (c.file, c.offset));
        assert_eq!(c.read_from(&[]), (c.file, c.offset));
        let w = it.tensors.iter().find(|t| t.name == "w").unwrap();
        assert!(
            w.chunks.iter().all(|c| c.others.is_empty()),
            "w's slices have one copy each"
        );
    }

    #[test]
    fn a_whole_tensor_file_serves_a_slice() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let meta = tp2(dir);
        let whole: Vec<u8> = [w_rows(0), w_rows(1)].concat();
        rewrite_f1_w(dir, "w", &[4, 2], &whole);
        let it = load(dir, &meta).unwrap();
        let c = &it.tensors[0].chunks[1];
        assert_eq!(it.files[c.file].name, F1);
        assert_eq!(c.origin, vec![0, 0]);
        assert_eq!(c.stored_shape, vec![4, 2]);
        assert_eq!(it.tensors[0].chunk_shape, vec![2, 2]);
        assert_eq!(c.offset, data_start(&dir.join(F1)));
    }

    #[test]
    fn chunks_that_leave_a_gap_or_overlap() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mp = meta_path(dir);
        let mut meta = tp2(dir);
        let chunk = |k: u64| json!({"global_offset": [k], "local_shape": [2, 2]});
        meta["state_dict_metadata"]["w"]["chunk"] = json!([chunk(0)]);
        input_err(load(dir, &meta), &[&mp, "tensor w", "chunk", "leave a gap"]);
        meta["state_dict_metadata"]["w"]["chunk"] = json!([chunk(0), chunk(1), chunk(1)]);
        input_err(load(dir, &meta), &[&mp, "tensor w", "chunk", "overlap"]);
        meta["state_dict_metadata"]["w"]["chunk"] = json!([chunk(0), chunk(0)]);
        input_err(
            load(dir, &meta),
            &[&mp, "tensor w", "chunk[1]", "slice [0]", "overlap"],
        );
        meta["state_dict_metadata"]["w"]["chunk"] =
            json!([chunk(0), {"global_offset": [1], "local_shape": [2, 1]}]);
        input_err(load(dir, &meta), &[&mp, "tensor w", "chunk[1].local_shape"]);
    }

    #[test]
    fn axis_fragmentations_must_match_the_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut meta = tp2(dir);
        // Splits dimension 1 while the layout splits dimension 0.
        meta["state_dict_metadata"]["w"]["axis_fragmentations"] = json!([1, 2]);
        meta["state_dict_metadata"]["w"]["chunk"] = json!([
            {"global_offset": [0], "local_shape": [4, 1]},
            {"global_offset": [1], "local_shape": [4, 1]}]);
        input_err(
            load(dir, &meta),
            &[
                &meta_path(dir),
                "tensor w",
                "axis_fragmentations[0]",
                "layout",
            ],
        );
    }

    #[test]
    fn a_slice_without_storage_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut meta = tp2(dir);
        meta["storage_data"]
            .as_object_mut()
            .unwrap()
            .remove("('w', (1,))");
        input_err(
            load(dir, &meta),
            &[
                &meta_path(dir),
                "tensor w",
                "slice [1]",
                "storage_data",
                "('w', (1,))",
            ],
        );
    }

    #[test]
    fn a_storage_entry_beyond_the_grid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut meta = tp2(dir);
        meta["storage_data"]["('w', (2,))"] = json!([{"file_name": F0, "storage_rank": 0}]);
        input_err(
            load(dir, &meta),
            &[&meta_path(dir), "storage_data", "('w', (2,))"],
        );
        let mut meta = tp2(dir);
        meta["storage_data"]["('v', (0,))"] = json!([{"file_name": F0, "storage_rank": 0}]);
        input_err(
            load(dir, &meta),
            &[&meta_path(dir), "storage_data", "tensor v"],
        );
    }

    #[test]
    fn a_file_named_that_does_not_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut meta = tp2(dir);
        meta["storage_data"]["('w', (1,))"] =
            json!([{"file_name": "model-0000009-0000002.safetensors", "storage_rank": 1}]);
        input_err(
            load(dir, &meta),
            &[
                &meta_path(dir),
                "tensor w",
                "slice [1]",
                "model-0000009-0000002.safetensors",
            ],
        );
    }

    #[test]
    fn a_file_missing_the_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let meta = tp2(dir);
        rewrite_f1_w(dir, "x", &[2, 2], &w_rows(1));
        input_err(
            load(dir, &meta),
            &[
                &dir.join(F1).display().to_string(),
                "tensor w",
                "missing",
                "slice [1]",
            ],
        );
    }

    #[test]
    fn a_dtype_other_than_metadata_says() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut meta = tp2(dir);
        meta["state_dict_metadata"]["w"]["properties"]["dtype"] = json!("BFloat16");
        input_err(
            load(dir, &meta),
            &[
                &dir.join(F0).display().to_string(),
                "tensor w",
                "dtype",
                "F32",
                "BFloat16",
            ],
        );
        meta["state_dict_metadata"]["w"]["properties"]["dtype"] = json!("Float33");
        input_err(
            load(dir, &meta),
            &[&meta_path(dir), "tensor w", "properties.dtype", "Float33"],
        );
    }

    #[test]
    fn a_shape_neither_slice_nor_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let meta = tp2(dir);
        rewrite_f1_w(dir, "w", &[1, 4], &w_rows(1));
        input_err(
            load(dir, &meta),
            &[
                &dir.join(F1).display().to_string(),
                "tensor w",
                "shape is [1, 4]",
                "local_shape",
            ],
        );
    }

    #[test]
    fn missing_top_level_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut meta = tp2(dir);
        meta.as_object_mut().unwrap().remove("storage_data");
        input_err(load(dir, &meta), &[&meta_path(dir), "storage_data"]);
        input_err(
            load(dir, &json!({"state_dict_metadata": {}, "storage_data": {}})),
            &[&meta_path(dir), "state_dict_metadata"],
        );
    }

    #[test]
    fn the_gpt_fixture_has_two_stages_of_four() {
        // tests/fixtures/README.md: dp=2 x tp=2, 2 pipeline stages, 8
        // ranks, prefix gpt; layer i of 2 on stage i*2//2, the embedding
        // on the first stage.
        let dir = fixture("gpt-dp2-tp2-pp2-bf16/iteration_00000001");
        let it = load_iteration(&dir, Some("iteration_00000001".into())).unwrap();
        assert_eq!((it.world, it.stages, it.stage_devices), (8, 2, 4));
        assert_eq!(it.prefix.as_deref(), Some("gpt"));
        assert_eq!(it.files.len(), 16);
        let t = |n: &str| it.tensors.iter().find(|t| t.name == n).unwrap();
        assert_eq!(t("embedding.word_embeddings.weight").stage, 0);
        assert_eq!(t("decoder.layers.0.input_layernorm.weight").stage, 0);
        assert_eq!(t("decoder.layers.1.input_layernorm.weight").stage, 1);
        assert_eq!(t("adam_m.decoder.layers.1.input_layernorm.weight").stage, 1);
        assert_eq!(
            t("decoder.layers.1.input_layernorm.weight").kind,
            Kind::Model
        );
        assert_eq!(t("adam_v.embedding.word_embeddings.weight").kind, Kind::Opt);
        assert_eq!(t("embedding.word_embeddings.weight").dtype, Dtype::BF16);
        assert_eq!(
            t("adam_m.embedding.word_embeddings.weight").dtype,
            Dtype::F32
        );
        // Slice 0 of the embedding is held by ranks 0 and 2; rank 0 is read.
        let c = &t("embedding.word_embeddings.weight").chunks[0];
        let holders: Vec<u64> = c.holders.iter().map(|h| h.1).collect();
        assert_eq!(holders, vec![0, 2]);
        assert_eq!(
            it.files[c.file].name,
            "gpt-model-0000000-0000008.safetensors"
        );
    }
}
