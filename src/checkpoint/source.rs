//! A source checkpoint as the rest of the pipeline sees it, and how a path is
//! recognised as a checkpoint root, one iteration folder or a plain folder.
//!
//! Everything a view will ever need from the source is established when it
//! is opened, once: which file and byte offset holds each slice of each
//! tensor. The cross-checks live in [`super::iteration`] and
//! [`super::plain`], so a checkpoint that opens is one the plan and the byte
//! engine can serve without further validation.

use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::header::elem_size;
use super::hub;
use super::iteration::load_iteration;
use super::layout::Layout;
use super::limits::MAX_SMALL_FILE_BYTES;
use super::mapped::RankFile;
use super::models::{self, ModelChoice, ModelInfo};
use super::names::{self, Kind};
use super::paths::read_small;
use super::plain::load_plain;
use super::store::{self, EntryKind, Store};
use crate::bad;
use crate::bail;
use crate::error::Result;

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
    /// Stored tensors that are not in the view themselves but whose rows
    /// make up tensors that are ([`RowMap`]): a Hugging Face folder's
    /// `q_proj`/`k_proj`/`v_proj` behind MindSpore Transformers' fused `linear_qkv`,
    /// or the other way round.
    pub parts: Vec<Tensor>,
    /// Source tensors a model map knows nothing of, left out of the view.
    pub omitted: Vec<String>,
    /// What a model map did to this iteration, for `inspect` and summaries.
    pub model: Option<ModelInfo>,
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
    /// Set when the tensor is assembled from `Iteration::parts` rather
    /// than stored: `chunks` is then empty and `frag` all ones.
    pub assembly: Option<Assembly>,
    /// What a target may not do to this tensor.
    pub rules: SplitRules,
}

/// Constraints a model puts on how a tensor may be split.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitRules {
    /// Dimension 0 may only be cut between whole groups of this many rows,
    /// named for messages: a fused QKV's key/value groups, a fused gate/up's
    /// row pairs. A cut inside a group would give a rank half a head.
    pub dim0_group: Option<(u64, &'static str)>,
    /// A split that does not divide the tensor leaves it whole instead of
    /// failing (MindSpore Transformers' embedding when the vocabulary does not divide).
    pub whole_if_uneven: bool,
}

/// Rows of a tensor taken from rows of other tensors, in a pattern that
/// repeats every `period` rows. Row `R` lies in period `p = R / period` at
/// `w = R % period`; the segment holding `w` says which part it comes from
/// and that part's row: `p * stride + base + (w - out_start)`.
///
/// One small pattern describes both directions of a fused tensor without
/// materialising anything: QKV fused per key/value group (period
/// `(heads/groups + 2) * head_dim`, three segments) and gate/up interleaved
/// row by row (period 2), and each of their parts read back out of the
/// fused tensor (one segment with a stride).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowMap {
    pub period: u64,
    /// Sorted by `out_start`, tiling `0..period`.
    pub segments: Vec<RowSegment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSegment {
    pub out_start: u64,
    pub len: u64,
    /// Index into `Iteration::parts`.
    pub part: usize,
    /// Part rows per period.
    pub stride: u64,
    /// The part's row for `out_start` in period 0.
    pub base: u64,
}

/// How a tensor is made of other tensors (`Iteration::parts`), described,
/// never materialised: the engine reads its bytes from the parts' stored
/// slices when asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assembly {
    /// Whole rows of parts, in a repeating pattern (fused QKV and gate/up,
    /// and each part read back out of them).
    Rows(RowMap),
    /// Rectangles of 2-D parts, each copied or transposed (Qwen3-MoE's
    /// experts stacked as one matrix, and each expert read back out).
    Tiles(TileMap),
}

impl Assembly {
    pub fn rows(&self) -> Option<&RowMap> {
        match self {
            Assembly::Rows(m) => Some(m),
            Assembly::Tiles(_) => None,
        }
    }

    /// The parts the assembly reads, each once, in order of first use.
    pub fn parts(&self) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        let mut add = |p: usize| {
            if !out.contains(&p) {
                out.push(p);
            }
        };
        match self {
            Assembly::Rows(m) => m.segments.iter().for_each(|s| add(s.part)),
            Assembly::Tiles(t) => t
                .bands
                .iter()
                .flat_map(|b| &b.tiles)
                .for_each(|t| add(t.part)),
        }
        out
    }
}

/// A 2-D tensor cut into bands of whole rows, each band into tiles side by
/// side, each tile taken from a rectangle of a 2-D part, copied or
/// transposed. Qwen3-MoE's `weight1` `[E·H, 2F]` is E bands of H rows, each
/// `[gate_Jᵀ | up_Jᵀ]`: two transposed tiles; one expert's `gate_J` read
/// back out of it is one band, one tile, transposed from rows `J·H..` of
/// `weight1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileMap {
    /// Sorted by `start`, tiling the tensor's rows.
    pub bands: Vec<Band>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Band {
    /// The band's first row and its row count.
    pub start: u64,
    pub rows: u64,
    /// Sorted by `col`, tiling the tensor's columns.
    pub tiles: Vec<Tile>,
}

/// Columns `col..col+cols` of a band, from part `part`: output element
/// `(band.start + i, col + j)` is the part's element `(row + i, col0 + j)`,
/// or, `transposed`, `(row + j, col0 + i)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tile {
    pub col: u64,
    pub cols: u64,
    /// Index into `Iteration::parts`.
    pub part: usize,
    /// The part's element that lands at the tile's first element.
    pub row: u64,
    pub col0: u64,
    pub transposed: bool,
}

impl TileMap {
    /// The band holding row `row` (rows past the end: the last band).
    pub fn band(&self, row: u64) -> &Band {
        let i = self
            .bands
            .partition_point(|b| b.start + b.rows <= row)
            .min(self.bands.len() - 1);
        &self.bands[i]
    }
}

impl Tile {
    /// The rectangle of the part that output rows `rows` (of its band,
    /// counted from the band's start) and columns `cols` (of the tile,
    /// counted from its first) come from: `(part rows, part columns)`.
    pub fn source(
        &self,
        rows: std::ops::Range<u64>,
        cols: std::ops::Range<u64>,
    ) -> (std::ops::Range<u64>, std::ops::Range<u64>) {
        let (r, c) = if self.transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        (
            self.row + r.start..self.row + r.end,
            self.col0 + c.start..self.col0 + c.end,
        )
    }
}

impl RowMap {
    /// The part holding row `row`, that part's row, and how many rows from
    /// `row` on come from consecutive rows of the same part.
    pub fn locate(&self, row: u64) -> (usize, u64, u64) {
        let p = row / self.period;
        let w = row % self.period;
        let i = self
            .segments
            .partition_point(|s| s.out_start + s.len <= w)
            .min(self.segments.len() - 1);
        let s = &self.segments[i];
        let within = w - s.out_start;
        (s.part, p * s.stride + s.base + within, s.len - within)
    }
}

/// One slice of a tensor as stored on disk.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The replica reads come from by default (the lowest storage rank
    /// holding the slice): an index into `Iteration::files`.
    pub file: usize,
    /// Byte offset of the stored tensor's first element in that file.
    pub offset: u64,
    /// Global coordinates of the stored tensor's first element: the slice's
    /// start, or all zeros when a file holds the whole tensor.
    pub origin: Vec<u64>,
    pub stored_shape: Vec<u64>,
    /// Every (file, storage rank) holding this slice.
    pub holders: Vec<(usize, u64)>,
    /// The other holders that store it as `file` does (same origin and
    /// stored shape), so a read may come from any of them: `(file,
    /// offset)`, by rank. Empty when the slice has one copy.
    pub others: Vec<(usize, u64)>,
}

impl Chunk {
    /// Where a view file whose own source files are `home` (sorted) reads
    /// this slice: `(file, offset)`. A replica in one of them when the
    /// slice has one there, else the default. A view rank then reads its
    /// replicated tensors (norms, data-parallel copies) from the files it
    /// reads anyway rather than from rank 0's: on an object store, whose
    /// blocks are 8 MiB, a norm read from rank 0's object fetches a block of
    /// it again after the reader of rank 0 has moved on (measured: 10% more
    /// bytes fetched than served for tp=8 viewed as tp=2, docs/PERFORMANCE.md).
    pub fn read_from(&self, home: &[usize]) -> (usize, u64) {
        if self.others.is_empty() || home.is_empty() || home.binary_search(&self.file).is_ok() {
            return (self.file, self.offset);
        }
        self.others
            .iter()
            .copied()
            .find(|(f, _)| home.binary_search(f).is_ok())
            .unwrap_or((self.file, self.offset))
    }
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
        Self::open_with(path, ModelChoice::Auto)
    }

    /// Like [`Source::open`]; a folder of safetensors files with a model's
    /// `config.json` is read through that model's map (`model` overrides
    /// the detection): a Hugging Face Qwen3 folder becomes the MindSpore
    /// Transformers checkpoint it converts to.
    /// A Hugging Face Hub cache folder (`models--ORG--NAME`) or a ref file
    /// in one (`.../refs/main`) is read as the snapshot it names.
    pub fn open_with(path: &Path, model: ModelChoice) -> Result<Source> {
        let store = store::of(path)?;
        let snapshot = match store.is_local() {
            true => hub::resolve(path)?,
            false => None,
        };
        let path = snapshot.as_deref().unwrap_or(path);
        // Every path kept is absolute: the mount's daemon leaves the working
        // directory, and still checks source paths on every read.
        let abs = store.canonical(path)?;
        models::read_through(Self::open_at(store.as_ref(), &abs)?, model)
    }

    /// Every folder the source's bytes live in: its own, and those its
    /// files' links lead to (a Hub snapshot's `blobs/`), each once, the
    /// source's first. A mount over any of them would hide the bytes the
    /// view serves, and an export into one would write among them.
    /// None for a source in an object store.
    pub fn real_dirs(&self) -> Vec<PathBuf> {
        if self.is_remote() {
            return Vec::new();
        }
        let mut out = vec![self.path.clone()];
        for f in self.iterations.iter().flat_map(|it| &it.files) {
            if let Some(d) = f.real_path.parent()
                && !out.iter().any(|o| o == d)
            {
                out.push(d.to_path_buf());
            }
        }
        out
    }

    /// Whether the source lies in an object store.
    pub fn is_remote(&self) -> bool {
        store::is_remote(&self.path)
    }

    fn open_at(store: &dyn Store, path: &Path) -> Result<Source> {
        if store.kind(path)? != Some(EntryKind::Dir) {
            bail!(
                "{}: not a directory; give a checkpoint root, an iteration folder or a folder of safetensors files",
                path.display()
            );
        }
        let tracker_path = path.join(names::TRACKER);
        if store.kind(&tracker_path)?.is_some() {
            return Self::open_root(store, path, &tracker_path);
        }
        if store.kind(&path.join(names::METADATA))?.is_some() {
            let it = load_iteration(path, None)?;
            return Ok(Source {
                path: path.to_path_buf(),
                kind: SourceKind::Iteration,
                iterations: vec![it],
            });
        }
        let iteration_dirs = list_iteration_dirs(store, path)?;
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

    fn open_root(store: &dyn Store, path: &Path, tracker_path: &Path) -> Result<Source> {
        let tracker = read_small(tracker_path, MAX_SMALL_FILE_BYTES)?;
        let text = String::from_utf8_lossy(&tracker);
        let latest: u64 = text.trim().parse().map_err(|_| {
            bad!(
                "{}: expected the latest iteration as a bare decimal number, found {:?}",
                tracker_path.display(),
                text.chars().take(40).collect::<String>()
            )
        })?;
        let dirs = list_iteration_dirs(store, path)?;
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
fn list_iteration_dirs(store: &dyn Store, path: &Path) -> Result<Vec<(u64, String)>> {
    let mut dirs = Vec::new();
    for entry in store.list(path)? {
        if let Some(n) = names::parse_iteration_dir(&entry.name)
            && entry.kind == EntryKind::Dir
        {
            dirs.push((n, entry.name));
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
pub(crate) fn read_common(dir: &Path) -> Result<Option<Vec<u8>>> {
    let path = dir.join(names::COMMON);
    if store::of(&path)?.kind(&path)?.is_some() {
        read_small(&path, MAX_SMALL_FILE_BYTES).map(Some)
    } else {
        Ok(None)
    }
}

/// Shared by the unit tests of the other `checkpoint` modules: tiny
/// checkpoints written by hand from the format (docs/FORMAT.md), never by
/// the code under test.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::Error;
    use serde_json::{Value, json};
    use std::fs;

    /// A safetensors file from the format alone: an 8-byte little-endian
    /// header length, the JSON header (padded with spaces to a multiple of
    /// 8), then the tensors' bytes back to back in the order given.
    pub(crate) fn safetensors(tensors: &[(&str, &str, &[u64], &[u8])]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "ms"}));
        let mut at = 0usize;
        for (name, dtype, shape, data) in tensors {
            header.insert(
                (*name).into(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + data.len()]}),
            );
            at += data.len();
        }
        let mut text = serde_json::to_vec(&Value::Object(header)).unwrap();
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&text);
        for (_, _, _, data) in tensors {
            out.extend_from_slice(data);
        }
        out
    }

    /// Little-endian f32 bytes.
    pub(crate) fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A tile of a [`TileMap`] band, for tests that write maps by hand.
    pub(crate) fn tile(
        col: u64,
        cols: u64,
        part: usize,
        row: u64,
        col0: u64,
        transposed: bool,
    ) -> Tile {
        Tile {
            col,
            cols,
            part,
            row,
            col0,
            transposed,
        }
    }

    /// A band of a [`TileMap`]: rows `start..start + rows`, made of `tiles`.
    pub(crate) fn band(start: u64, rows: u64, tiles: Vec<Tile>) -> Band {
        Band { start, rows, tiles }
    }

    /// Where the data of the safetensors file at `path` starts: after its
    /// 8-byte length and the header that length gives.
    pub(crate) fn data_start(path: &Path) -> u64 {
        let b = fs::read(path).unwrap();
        8 + u64::from_le_bytes(b[..8].try_into().unwrap())
    }

    /// Writes `tensors` as `dir/name`.
    pub(crate) fn write_st(dir: &Path, name: &str, tensors: &[(&str, &str, &[u64], &[u8])]) {
        fs::write(dir.join(name), safetensors(tensors)).unwrap();
    }

    /// The crate's copy of a fixture (tests/fixtures).
    pub(crate) fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel)
    }

    /// Asserts a bad-input error (exit code 2) whose message holds every
    /// one of `parts`; returns the message.
    pub(crate) fn input_err<T: std::fmt::Debug>(r: Result<T>, parts: &[&str]) -> String {
        let e = r.expect_err("expected an error");
        assert!(matches!(e, Error::Input(_)), "not an input error: {e:?}");
        assert_eq!(e.exit_code(), 2);
        let msg = e.to_string();
        for p in parts {
            assert!(msg.contains(p), "{msg:?} does not name {p:?}");
        }
        msg
    }

    /// A one-tensor plain folder: `w`, f32 `[2]`.
    fn plain_dir(dir: &Path) {
        write_st(
            dir,
            "model.safetensors",
            &[("w", "F32", &[2], &f32s(&[1.0, 2.0]))],
        );
    }

    fn qwen3() -> ModelChoice {
        ModelChoice::parse("qwen3").unwrap()
    }

    fn canon(p: &Path) -> String {
        fs::canonicalize(p).unwrap().display().to_string()
    }

    #[test]
    fn a_root_with_its_tracker() {
        let root = fixture("tp4-f32");
        let src = Source::open(&root).unwrap();
        assert_eq!(src.path, fs::canonicalize(&root).unwrap());
        match &src.kind {
            SourceKind::Root { tracker, latest } => {
                assert_eq!(tracker, b"5");
                assert_eq!(*latest, 5);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(src.iterations.len(), 1);
        let it = &src.iterations[0];
        assert_eq!(it.name.as_deref(), Some("iteration_00000005"));
        assert_eq!((it.world, it.stages, it.stage_devices), (4, 1, 4));
        assert_eq!(it.prefix, None);
        assert!(it.common_json.is_some());
    }

    #[test]
    fn one_iteration_folder() {
        let dir = fixture("tp4-f32/iteration_00000005");
        let src = Source::open(&dir).unwrap();
        assert!(matches!(src.kind, SourceKind::Iteration));
        assert_eq!(src.iterations.len(), 1);
        assert_eq!(src.iterations[0].name, None);
        assert_eq!(src.iterations[0].files.len(), 4);
    }

    #[test]
    fn a_plain_folder() {
        let tmp = tempfile::tempdir().unwrap();
        plain_dir(tmp.path());
        let src = Source::open(tmp.path()).unwrap();
        assert!(matches!(src.kind, SourceKind::Plain));
        let it = &src.iterations[0];
        assert_eq!((it.world, it.stages, it.stage_devices), (1, 1, 1));
        assert_eq!(it.tensors.len(), 1);
        assert_eq!(it.tensors[0].name, "w");
        assert_eq!(it.tensors[0].global_shape, vec![2]);
        assert!(it.model.is_none());
    }

    #[test]
    fn a_hugging_face_qwen3_folder_becomes_mindformers_tensors() {
        let src = Source::open(&fixture("qwen3-tiny-hf")).unwrap();
        assert!(matches!(src.kind, SourceKind::Plain));
        let it = &src.iterations[0];
        assert_eq!(
            it.model.as_ref().map(|m| m.model_type.as_str()),
            Some("qwen3")
        );
        let shape = |n: &str| {
            it.tensors
                .iter()
                .find(|t| t.name == n)
                .unwrap_or_else(|| panic!("no {n}"))
                .global_shape
                .clone()
        };
        // tests/fixtures/README.md: vocab 256, hidden 64, intermediate 96,
        // 4 heads in 2 groups of head_dim 16.
        assert_eq!(shape("embedding.word_embeddings.weight"), vec![256, 64]);
        assert_eq!(
            shape("decoder.layers.0.self_attention.linear_qkv.weight"),
            vec![(4 + 2 * 2) * 16, 64]
        );
        assert_eq!(
            shape("decoder.layers.1.mlp.linear_fc1.weight"),
            vec![2 * 96, 64]
        );
        assert!(!it.tensors.iter().any(|t| t.name.starts_with("model.")));
    }

    #[test]
    fn model_none_keeps_the_stored_names() {
        let src = Source::open_with(&fixture("qwen3-tiny-hf"), ModelChoice::None).unwrap();
        let it = &src.iterations[0];
        assert!(it.model.is_none());
        let names: Vec<&str> = it.tensors.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"model.embed_tokens.weight"), "{names:?}");
        assert!(names.contains(&"model.layers.0.self_attn.q_proj.weight"));
        assert!(names.iter().all(|n| !n.contains("linear_qkv")));
    }

    #[test]
    fn an_unsupported_model_type_names_the_supported_ones() {
        let tmp = tempfile::tempdir().unwrap();
        plain_dir(tmp.path());
        fs::write(
            tmp.path().join("config.json"),
            br#"{"model_type": "llama"}"#,
        )
        .unwrap();
        let cfg = canon(&tmp.path().join("config.json"));
        input_err(
            Source::open(tmp.path()),
            &[&cfg, "model_type", "\"llama\"", "qwen3", "--model none"],
        );
        // --model none reads it as it is.
        let src = Source::open_with(tmp.path(), ModelChoice::None).unwrap();
        assert_eq!(src.iterations[0].tensors[0].name, "w");
        // --model qwen3 says which it found.
        input_err(Source::open_with(tmp.path(), qwen3()), &[&cfg, "llama"]);
    }

    #[test]
    fn model_qwen3_needs_a_config_or_qwen3_tensors() {
        let tmp = tempfile::tempdir().unwrap();
        plain_dir(tmp.path());
        input_err(
            Source::open_with(tmp.path(), qwen3()),
            &[&canon(tmp.path()), "config.json", "--model qwen3"],
        );
        let gpt = fixture("gpt-dp2-tp2-pp2-bf16");
        input_err(
            Source::open_with(&gpt, qwen3()),
            &[&canon(&gpt), "iteration_00000001", "--model qwen3"],
        );
    }

    #[test]
    fn iteration_folders_without_a_tracker() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("iteration_00000001")).unwrap();
        plain_dir(tmp.path());
        input_err(
            Source::open(tmp.path()),
            &[&canon(tmp.path()), names::TRACKER, "iteration folders"],
        );
    }

    #[test]
    fn a_tracker_naming_a_missing_iteration() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("iteration_00000001")).unwrap();
        fs::write(tmp.path().join(names::TRACKER), b"7\n").unwrap();
        input_err(
            Source::open(tmp.path()),
            &[
                &canon(&tmp.path().join(names::TRACKER)),
                "iteration 7",
                "iteration_00000007",
            ],
        );
    }

    #[test]
    fn a_tracker_that_is_not_a_number() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(names::TRACKER), b"latest").unwrap();
        input_err(
            Source::open(tmp.path()),
            &[&canon(&tmp.path().join(names::TRACKER)), "\"latest\""],
        );
    }

    #[test]
    fn two_folders_of_the_same_iteration() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("iteration_1")).unwrap();
        fs::create_dir(tmp.path().join("iteration_00000001")).unwrap();
        fs::write(tmp.path().join(names::TRACKER), b"1").unwrap();
        input_err(
            Source::open(tmp.path()),
            &[
                &canon(tmp.path()),
                "iteration_1",
                "iteration_00000001",
                "same iteration",
            ],
        );
    }

    #[test]
    fn not_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("model.safetensors");
        plain_dir(tmp.path());
        input_err(Source::open(&f), &[&canon(&f), "not a directory"]);
        let missing = tmp.path().join("nowhere");
        input_err(Source::open(&missing), &["nowhere"]);
    }
}
