//! Reading a source checkpoint and checking that it is whole and consistent.
//!
//! Everything a view will ever need from the source is established here, once:
//! which file and byte offset holds each slice of each tensor. Every
//! cross-check happens here too, so a checkpoint that loads is one the plan
//! and the byte engine can serve without further validation.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::Value;

use crate::error::{Result, source_io};
use crate::format::metadata::{self, StorageEntry, TensorMeta, from_value};
use crate::format::names::{self, Kind};
use crate::format::rankfile::{RankFile, dtype_from_mindspore, dtype_to_mindspore, elem_size};
use crate::layout::{Layout, checked_product};
use crate::{bad, bail};

/// metadata.json larger than this is refused rather than parsed: parsing
/// costs several times the file in memory. A 70B save's is 2.6 MB; this
/// allows about a million storage entries.
const MAX_METADATA_BYTES: u64 = 256 << 20;
/// Tensors per iteration, and rank files per iteration (each is mapped and
/// has a SIGBUS guard entry).
const MAX_TENSORS: usize = 1 << 20;
const MAX_FILES: usize = 1 << 15;
/// common.json and the tracker are small; a large one is not a checkpoint's.
const MAX_SMALL_FILE_BYTES: u64 = 16 << 20;

/// A loaded source checkpoint.
#[derive(Debug)]
pub struct Source {
    pub path: PathBuf,
    pub kind: SourceKind,
    pub iterations: Vec<Iteration>,
}

#[derive(Debug)]
pub enum SourceKind {
    /// A checkpoint root: the tracker (kept byte for byte) and iteration folders.
    Root { tracker: Vec<u8>, latest: u64 },
    /// One iteration folder with metadata.json.
    Iteration,
    /// Plain safetensors without metadata.json: every tensor whole.
    Plain,
}

/// One iteration: its rank files and every tensor's slices.
#[derive(Debug)]
pub struct Iteration {
    pub dir: PathBuf,
    /// `iteration_N` when part of a root, else `None`.
    pub name: Option<String>,
    pub prefix: Option<String>,
    pub files: Vec<RankFile>,
    /// In metadata.json order (file order for plain sources).
    pub tensors: Vec<Tensor>,
    pub common_json: Option<Vec<u8>>,
    /// Ranks in the source job, pipeline stages included.
    pub world: u64,
    /// Ranks per pipeline stage (the product of the device matrix).
    pub stage_devices: u64,
    pub stages: u64,
}

/// One tensor of the source and where each of its slices is stored.
#[derive(Debug)]
pub struct Tensor {
    pub name: String,
    pub kind: Kind,
    pub dtype: Dtype,
    /// MindSpore's name for the dtype, as the source wrote it.
    pub ms_dtype: String,
    pub global_shape: Vec<u64>,
    pub layout: Option<Layout>,
    /// Slices per dimension (`axis_fragmentations`).
    pub frag: Vec<u64>,
    /// The shape of every slice: `global_shape / frag`.
    pub chunk_shape: Vec<u64>,
    /// Indexed by the slice's row-major grid index.
    pub chunks: Vec<Chunk>,
    /// The source pipeline stage holding the tensor.
    pub stage: u64,
    /// MindSpore's `allow_shape_mismatch` / `allow_to_save`, passed to the view.
    pub allow_shape_mismatch: bool,
    pub allow_to_save: bool,
}

/// One slice of a tensor as stored on disk.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The replica reads come from: an index into `Iteration::files`.
    pub file: usize,
    /// Byte offset of the stored tensor's first element in that file.
    pub offset: u64,
    /// Global coordinates of the stored tensor's first element: the slice's
    /// start, or all zeros when a file holds the whole tensor.
    pub origin: Vec<u64>,
    pub stored_shape: Vec<u64>,
    /// Every (file, storage rank) holding this slice.
    pub holders: Vec<(usize, u64)>,
}

impl Tensor {
    pub fn elem_size(&self) -> u64 {
        elem_size(self.dtype)
    }
    pub fn nbytes(&self) -> u64 {
        self.global_shape.iter().product::<u64>() * self.elem_size()
    }
}

impl Iteration {
    pub fn has_opt(&self) -> bool {
        self.tensors.iter().any(|t| t.kind == Kind::Opt)
    }
}

impl Source {
    /// Loads and checks a checkpoint root, an iteration folder or a plain folder.
    pub fn open(path: &Path) -> Result<Source> {
        // Every path kept is absolute: the mount's daemon leaves the working
        // directory, and still checks source paths on every read.
        let abs = fs::canonicalize(path).map_err(|e| source_io(path, e))?;
        Self::open_at(&abs)
    }

    fn open_at(path: &Path) -> Result<Source> {
        let meta = fs::metadata(path).map_err(|e| source_io(path, e))?;
        if !meta.is_dir() {
            bail!(
                "{}: not a directory; give a checkpoint root, an iteration folder or a folder of safetensors files",
                path.display()
            );
        }
        let tracker_path = path.join(names::TRACKER);
        if tracker_path.exists() {
            return Self::open_root(path, &tracker_path);
        }
        if path.join(names::METADATA).exists() {
            let it = load_iteration(path, None)?;
            return Ok(Source {
                path: path.to_path_buf(),
                kind: SourceKind::Iteration,
                iterations: vec![it],
            });
        }
        let iteration_dirs = list_iteration_dirs(path)?;
        if !iteration_dirs.is_empty() {
            bail!(
                "{}: has iteration folders but no {}; give one iteration folder instead",
                path.display(),
                names::TRACKER
            );
        }
        let it = load_plain(path)?;
        Ok(Source {
            path: path.to_path_buf(),
            kind: SourceKind::Plain,
            iterations: vec![it],
        })
    }

    fn open_root(path: &Path, tracker_path: &Path) -> Result<Source> {
        let tracker = read_small(tracker_path, MAX_SMALL_FILE_BYTES)?;
        let text = String::from_utf8_lossy(&tracker);
        let latest: u64 = text.trim().parse().map_err(|_| {
            bad!(
                "{}: expected the latest iteration as a bare decimal number, found {:?}",
                tracker_path.display(),
                text.chars().take(40).collect::<String>()
            )
        })?;
        let dirs = list_iteration_dirs(path)?;
        if !dirs.iter().any(|(n, _)| *n == latest) {
            bail!(
                "{}: names iteration {latest}, but {} does not exist",
                tracker_path.display(),
                path.join(names::iteration_dir(latest)).display()
            );
        }
        let mut iterations = Vec::with_capacity(dirs.len());
        for (_, name) in dirs {
            iterations.push(load_iteration(&path.join(&name), Some(name))?);
        }
        Ok(Source {
            path: path.to_path_buf(),
            kind: SourceKind::Root { tracker, latest },
            iterations,
        })
    }
}

/// `iteration_N` folders of a root, by number.
fn list_iteration_dirs(path: &Path) -> Result<Vec<(u64, String)>> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(path).map_err(|e| source_io(path, e))? {
        let entry = entry.map_err(|e| source_io(path, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = names::parse_iteration_dir(&name)
            && entry.path().is_dir()
        {
            dirs.push((n, name));
        }
    }
    dirs.sort();
    if let Some(w) = dirs.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!(
            "{}: {} and {} are the same iteration",
            path.display(),
            w[0].1,
            w[1].1
        );
    }
    Ok(dirs)
}

/// common.json, kept byte for byte, when the folder has one.
fn read_common(dir: &Path) -> Result<Option<Vec<u8>>> {
    let path = dir.join(names::COMMON);
    if path.exists() {
        read_small(&path, MAX_SMALL_FILE_BYTES).map(Some)
    } else {
        Ok(None)
    }
}

fn read_small(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let len = fs::metadata(path).map_err(|e| source_io(path, e))?.len();
    if len > cap {
        bail!(
            "{}: {len} bytes, more than the {cap} this file may hold",
            path.display()
        );
    }
    fs::read(path).map_err(|e| source_io(path, e))
}

/// Opens a file named by the checkpoint, refusing names and links that lead
/// outside the folder: a checkpoint only ever names its own files.
fn open_rank_file(
    dir: &Path,
    file_name: &str,
    named_in: &Path,
    referrer: impl FnOnce() -> String,
) -> Result<RankFile> {
    let bare = !file_name.is_empty()
        && file_name != "."
        && file_name != ".."
        && !file_name.contains('/')
        && !file_name.contains('\0');
    if !bare {
        bail!(
            "{}: {}file_name {file_name:?} is not a bare file name in the same folder",
            named_in.display(),
            referrer()
        );
    }
    let path = dir.join(file_name);
    if !path.exists() {
        bail!(
            "{}: {}names {file_name}, which does not exist in {}",
            named_in.display(),
            referrer(),
            dir.display()
        );
    }
    let real = fs::canonicalize(&path).map_err(|e| source_io(&path, e))?;
    let real_dir = fs::canonicalize(dir).map_err(|e| source_io(dir, e))?;
    if real.parent() != Some(real_dir.as_path()) {
        bail!(
            "{}: is a link to {}, outside the checkpoint folder",
            path.display(),
            real.display()
        );
    }
    RankFile::open(&path)
}

/// Files of an iteration, opened once each and addressed by index.
struct FileSet<'a> {
    dir: &'a Path,
    named_in: &'a Path,
    files: Vec<RankFile>,
    index: HashMap<String, usize>,
}

impl FileSet<'_> {
    /// The index of file `name`, opening it on first use; `referrer` says
    /// who named it, for the message if it cannot be opened.
    fn get(&mut self, name: &str, referrer: impl FnOnce() -> String) -> Result<usize> {
        if let Some(&i) = self.index.get(name) {
            return Ok(i);
        }
        if self.files.len() >= MAX_FILES {
            bail!(
                "{}: names more than {MAX_FILES} rank files, more than supported",
                self.named_in.display()
            );
        }
        let f = open_rank_file(self.dir, name, self.named_in, referrer)?;
        self.files.push(f);
        self.index.insert(name.to_string(), self.files.len() - 1);
        Ok(self.files.len() - 1)
    }
}

fn kind_of_file(name: &str) -> Kind {
    match names::parse_rank_file_name(name) {
        Some(n) => n.kind,
        None if name.starts_with("opt") || name.contains("-opt") => Kind::Opt,
        None => Kind::Model,
    }
}

/// Loads an iteration folder with metadata.json and checks it against its rank files.
fn load_iteration(dir: &Path, name: Option<String>) -> Result<Iteration> {
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
        if storage.insert((tname, k), entries).is_some() {
            bail!("{mp}: storage_data lists shard id {key:?} twice");
        }
    }

    let mut files = FileSet {
        dir,
        named_in: &meta_path,
        files: Vec::new(),
        index: HashMap::new(),
    };
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
    })
}

/// The prefix the source's rank files share (`gpt` in `gpt-model-...`).
fn common_prefix(files: &[RankFile], dir: &Path) -> Result<Option<String>> {
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

/// Checks one tensor's metadata entry against its layout, chunks and files.
fn check_tensor(
    name: &str,
    tm: &TensorMeta,
    storage: &HashMap<(String, u64), Vec<StorageEntry>>,
    files: &mut FileSet<'_>,
    mp: &str,
) -> Result<Tensor> {
    let at = |what: String| bad!("{mp}: tensor {name}: {what}");
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

    let ms_dtype = tm.properties.dtype.clone();
    let meta_dtype = dtype_from_mindspore(&ms_dtype);
    let mut dtype: Option<Dtype> = None;
    let mut kind: Option<(Kind, String)> = None;
    let mut chunks: Vec<Option<Chunk>> = vec![None; nchunks as usize];
    for (ci, c) in tm.chunk.iter().enumerate() {
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
                "chunk[{ci}].global_offset [{k}] is outside the {nchunks} slices of axis_fragmentations {frag:?}"
            )));
        }
        if c.local_shape != chunk_shape {
            return Err(at(format!(
                "chunk[{ci}].local_shape is {:?}; global_shape {shape:?} split by {frag:?} gives {chunk_shape:?}, so the slices would overlap or leave a gap",
                c.local_shape
            )));
        }
        if chunks[k as usize].is_some() {
            return Err(at(format!(
                "chunk[{ci}] repeats slice [{k}]: the slices overlap"
            )));
        }
        let entries = storage.get(&(name.to_string(), k)).ok_or_else(|| {
            at(format!(
                "slice [{k}] has no storage_data entry {}",
                metadata::format_shard_id(name, k)
            ))
        })?;
        let grid = crate::layout::unravel(k, &frag);
        let start: Vec<u64> = grid.iter().zip(&chunk_shape).map(|(g, c)| g * c).collect();
        let mut holders = Vec::with_capacity(entries.len());
        let mut chosen: Option<(usize, u64, Vec<u64>, Vec<u64>)> = None;
        for e in entries {
            let fi = files.get(&e.file_name, || format!("tensor {name}: slice [{k}]: "))?;
            let f = &files.files[fi];
            let fk = kind_of_file(&f.name);
            match &kind {
                None => kind = Some((fk, f.name.clone())),
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
            if let Some(md) = meta_dtype
                && st.dtype != md
            {
                bail!(
                    "{}: tensor {name}: dtype is {:?}, but metadata.json says {ms_dtype}",
                    f.path.display(),
                    st.dtype
                );
            }
            match dtype {
                None => dtype = Some(st.dtype),
                Some(d) if d != st.dtype => bail!(
                    "{}: tensor {name}: dtype is {:?}, but other files hold it as {d:?}",
                    f.path.display(),
                    st.dtype
                ),
                _ => {}
            }
            let origin = if st.shape == chunk_shape {
                start.clone()
            } else if st.shape == *shape {
                vec![0; ndim]
            } else {
                bail!(
                    "{}: tensor {name}: shape is {:?}, but metadata.json says slice [{k}] has local_shape {:?} (global_shape {:?})",
                    f.path.display(),
                    st.shape,
                    chunk_shape,
                    shape
                );
            };
            holders.push((fi, e.storage_rank));
            if chosen.is_none() {
                chosen = Some((fi, st.offset, origin, st.shape.clone()));
            }
        }
        let (file, offset, origin, stored_shape) =
            chosen.ok_or_else(|| at(format!("slice [{k}] has no file")))?;
        chunks[k as usize] = Some(Chunk {
            file,
            offset,
            origin,
            stored_shape,
            holders,
        });
    }
    let chunks: Vec<Chunk> = chunks.into_iter().flatten().collect();
    let dtype = dtype.ok_or_else(|| at("no slice is stored anywhere".into()))?;
    nelems
        .checked_mul(elem_size(dtype))
        .ok_or_else(|| at("byte size overflows".into()))?;
    Ok(Tensor {
        name: name.to_string(),
        kind: kind.map(|k| k.0).unwrap_or(Kind::Model),
        dtype,
        ms_dtype,
        global_shape: shape.clone(),
        layout,
        frag,
        chunk_shape,
        chunks,
        stage: 0,
        allow_shape_mismatch: tm.properties.allow_shape_mismatch,
        allow_to_save: tm.properties.allow_to_save,
    })
}

/// Loads a folder of plain safetensors files: a single-card save, a Hugging
/// Face folder with `model.safetensors`, or one with an index.json.
fn load_plain(dir: &Path) -> Result<Iteration> {
    let mut file_names: Vec<String> = Vec::new();
    let index = fs::read_dir(dir)
        .map_err(|e| source_io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".safetensors.index.json"));
    if let Some(index) = index {
        let ip = dir.join(&index);
        let raw = read_small(&ip, MAX_METADATA_BYTES)?;
        let json: Value = serde_json::from_slice(&raw)
            .map_err(|e| bad!("{}: not valid JSON: {e}", ip.display()))?;
        let map: BTreeMap<String, String> = from_value(
            json.get("weight_map")
                .ok_or_else(|| bad!("{}: missing key `weight_map`", ip.display()))?,
        )
        .map_err(|e| bad!("{}: weight_map: {e}", ip.display()))?;
        file_names.extend(map.into_values());
        file_names.sort();
        file_names.dedup();
    } else {
        for e in fs::read_dir(dir).map_err(|e| source_io(dir, e))? {
            let e = e.map_err(|e| source_io(dir, e))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".safetensors") && !n.starts_with('.') {
                file_names.push(n);
            }
        }
        file_names.sort();
    }
    if file_names.is_empty() {
        bail!(
            "{}: no checkpoint here: expected {} (a checkpoint root), {} (an iteration folder) or *.safetensors files",
            dir.display(),
            names::TRACKER,
            names::METADATA
        );
    }
    let named_in = dir.to_path_buf();
    let mut set = FileSet {
        dir,
        named_in: &named_in,
        files: Vec::new(),
        index: HashMap::new(),
    };
    let mut tensors: Vec<Tensor> = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for fname in &file_names {
        let fi = set.get(fname, String::new)?;
        let f = &set.files[fi];
        let mut stored: Vec<(&String, &crate::format::rankfile::StoredTensor)> =
            f.tensors.iter().collect();
        stored.sort_by_key(|(_, st)| st.offset);
        for (tname, st) in stored {
            if let Some(other) = seen.insert(tname.clone(), f.name.clone()) {
                bail!(
                    "{}: tensor {tname} is also in {other}; a plain folder must hold each tensor once",
                    f.path.display()
                );
            }
            let ndim = st.shape.len();
            tensors.push(Tensor {
                name: tname.clone(),
                kind: kind_of_file(&f.name),
                dtype: st.dtype,
                ms_dtype: dtype_to_mindspore(st.dtype),
                global_shape: st.shape.clone(),
                layout: None,
                frag: vec![1; ndim],
                chunk_shape: st.shape.clone(),
                chunks: vec![Chunk {
                    file: fi,
                    offset: st.offset,
                    origin: vec![0; ndim],
                    stored_shape: st.shape.clone(),
                    holders: vec![(fi, 0)],
                }],
                stage: 0,
                allow_shape_mismatch: false,
                allow_to_save: true,
            });
        }
    }
    if tensors.is_empty() {
        bail!("{}: the safetensors files hold no tensors", dir.display());
    }
    let prefix = common_prefix(&set.files, dir)?;
    let common_json = read_common(dir)?;
    Ok(Iteration {
        dir: dir.to_path_buf(),
        name: None,
        prefix,
        files: set.files,
        tensors,
        common_json,
        world: 1,
        stage_devices: 1,
        stages: 1,
    })
}
