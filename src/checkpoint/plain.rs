//! A folder of plain safetensors files without `metadata.json`: a
//! single-card save, or a Hugging Face folder read tensor by tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;

use super::header::dtype_to_mindspore;
use super::iteration::{common_prefix, kind_of_file};
use super::limits::{MAX_CONFIG_BYTES, MAX_METADATA_BYTES};
use super::metadata::from_value;
use super::names;
use super::paths::{FileSet, Links, read_small};
use super::source::{Chunk, Iteration, Tensor, read_common};
use super::store::{self, EntryKind};
use crate::error::Result;
use crate::{bad, bail};

/// transformers' single-file checkpoint name.
const SINGLE: &str = "model.safetensors";
/// transformers' index of a sharded checkpoint.
const INDEX: &str = "model.safetensors.index.json";

/// Which files of a folder hold its weights.
#[derive(Debug, PartialEq, Eq)]
enum Weights {
    /// One safetensors file: every tensor it holds.
    File(String),
    /// An index: the tensors its `weight_map` places, in the files it names.
    Index(String),
    /// Every `*.safetensors` file (a single-card save without an index).
    All,
}

/// Which files hold a folder's weights, chosen as transformers'
/// `from_pretrained` chooses them (`_get_resolved_checkpoint_files` in
/// transformers 5.24's `modeling_utils.py`), so that a view shows the model
/// transformers would load from the folder: the file `config.json`'s
/// `transformers_weights` names, if any; else `model.safetensors` when it
/// is a file (an index beside it is then ignored, as by transformers: a
/// folder holding both is ambiguous, and which model it holds is the one
/// transformers loads); else `model.safetensors.index.json`. A folder
/// transformers would not load (other names: a single-card save) keeps
/// reshardfs's own rule: the one other index, or every `*.safetensors` file.
fn choose_weights(dir: &Path) -> Result<Weights> {
    let store = store::of(dir)?;
    let is_file = |n: &str| {
        store
            .kind(&dir.join(n))
            .is_ok_and(|k| k == Some(EntryKind::File))
    };
    if let Some(named) = transformers_weights(dir)? {
        if !is_file(&named) {
            bail!(
                "{}: transformers_weights names {named}, which is not a file in {}",
                dir.join("config.json").display(),
                dir.display()
            );
        }
        return Ok(if named.ends_with(".safetensors.index.json") {
            Weights::Index(named)
        } else {
            Weights::File(named)
        });
    }
    let mut indexes: Vec<String> = store
        .list(dir)?
        .into_iter()
        .map(|e| e.name)
        // A dotfile (`._model.safetensors.index.json`, macOS's companion of
        // a copied file) is not an index, as a dotfile is not a shard.
        .filter(|n| n.ends_with(".safetensors.index.json") && !n.starts_with('.'))
        .collect();
    indexes.sort();
    if is_file(SINGLE) {
        if !indexes.is_empty() {
            log::warn!(
                "{}: holds both {SINGLE} and {}; reading {SINGLE} alone, as transformers' from_pretrained does",
                dir.display(),
                indexes.join(", ")
            );
        }
        return Ok(Weights::File(SINGLE.into()));
    }
    // transformers' own index wins; any other must be the only one, or
    // which tensors the folder holds would depend on listing order.
    if indexes.iter().any(|n| n == INDEX) {
        return Ok(Weights::Index(INDEX.into()));
    }
    if indexes.len() > 1 {
        bail!(
            "{}: several index files ({}); keep one, or name the folder of one model",
            dir.display(),
            indexes.join(", ")
        );
    }
    Ok(indexes.pop().map_or(Weights::All, Weights::Index))
}

/// `transformers_weights` of the folder's `config.json`: the weights file
/// transformers loads instead of its default names. A config.json that
/// does not parse is left to the model maps to report (or, with `--model
/// none`, ignored, as it says nothing about the weights then).
fn transformers_weights(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("config.json");
    if store::of(&path)?.kind(&path)? != Some(EntryKind::File) {
        return Ok(None);
    }
    let raw = read_small(&path, MAX_CONFIG_BYTES)?;
    let Ok(json) = serde_json::from_slice::<Value>(&raw) else {
        return Ok(None);
    };
    let Some(v) = json.get("transformers_weights") else {
        return Ok(None);
    };
    let Some(named) = v.as_str() else {
        bail!(
            "{}: transformers_weights is {v}, expected a file name",
            path.display()
        );
    };
    let bare = !named.is_empty() && !named.contains(['/', '\\', '\0']) && named != "..";
    if !bare || !(named.ends_with(".safetensors") || named.ends_with(".safetensors.index.json")) {
        bail!(
            "{}: transformers_weights is {named:?}; reshardfs reads a *.safetensors or *.safetensors.index.json file named bare, in the same folder",
            path.display()
        );
    }
    Ok(Some(named.to_string()))
}

/// Loads a folder of plain safetensors files: a single-card save, or a
/// Hugging Face folder, its weights as [`choose_weights`] says.
pub(crate) fn load_plain(dir: &Path) -> Result<Iteration> {
    let mut file_names: Vec<String> = Vec::new();
    // With an index, the tensors it names and the file it says holds each.
    let mut listed: Option<(std::path::PathBuf, BTreeMap<String, String>)> = None;
    match choose_weights(dir)? {
        Weights::Index(index) => {
            let ip = dir.join(&index);
            let raw = read_small(&ip, MAX_METADATA_BYTES)?;
            let json: Value = serde_json::from_slice(&raw)
                .map_err(|e| bad!("{}: not valid JSON: {e}", ip.display()))?;
            let map: BTreeMap<String, String> = from_value(
                json.get("weight_map")
                    .ok_or_else(|| bad!("{}: missing key `weight_map`", ip.display()))?,
            )
            .map_err(|e| bad!("{}: weight_map: {e}", ip.display()))?;
            file_names.extend(map.values().cloned());
            file_names.sort();
            file_names.dedup();
            listed = Some((ip, map));
        }
        Weights::File(name) => file_names.push(name),
        Weights::All => {
            for e in store::of(dir)?.list(dir)? {
                let n = e.name;
                if n.ends_with(".safetensors") && !n.starts_with('.') {
                    file_names.push(n);
                }
            }
            file_names.sort();
        }
    }
    if file_names.is_empty() {
        bail!(
            "{}: no checkpoint here: expected {} (a checkpoint root), {} (an iteration folder) or *.safetensors files",
            dir.display(),
            names::TRACKER,
            names::METADATA
        );
    }
    let named_in = match &listed {
        Some((ip, _)) => ip.clone(),
        None => dir.to_path_buf(),
    };
    let mut set = FileSet {
        dir,
        named_in: &named_in,
        // A Hub cache snapshot is links into ../../blobs: follow them.
        links: Links::Follow,
        files: Vec::new(),
        index: HashMap::new(),
    };
    let mut tensors: Vec<Tensor> = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for fname in &file_names {
        let fi = match &listed {
            Some(_) => set.get(fname, || "weight_map ".to_string())?,
            None => set.get(fname, String::new)?,
        };
        let f = &set.files[fi];
        if let Some((ip, map)) = &listed {
            // Every tensor the index places in this file must be there.
            if let Some(missing) = map
                .iter()
                .find(|(t, file)| *file == fname && !f.tensors.contains_key(*t))
            {
                bail!(
                    "{}: weight_map says tensor {} is in {fname}, but {} does not hold it",
                    ip.display(),
                    missing.0,
                    f.path.display()
                );
            }
        }
        let mut stored: Vec<(&String, &super::header::StoredTensor)> = f.tensors.iter().collect();
        stored.sort_by_key(|(_, st)| st.offset);
        for (tname, st) in stored {
            if let Some((ip, map)) = &listed
                && map.get(tname) != Some(fname)
            {
                log::warn!(
                    "{}: holds {tname}, which {} does not place there; left out",
                    f.path.display(),
                    ip.display()
                );
                continue;
            }
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
                    others: Vec::new(),
                }],
                stage: 0,
                allow_shape_mismatch: false,
                allow_to_save: true,
                assembly: None,
                rules: Default::default(),
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
        parts: Vec::new(),
        omitted: Vec::new(),
        model: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::names::Kind;
    use crate::checkpoint::source::tests::{f32s, input_err, write_st};
    use safetensors::Dtype;
    use serde_json::json;
    use std::fs;

    fn write_index(dir: &Path, name: &str, map: serde_json::Value) {
        let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
        fs::write(dir.join(name), serde_json::to_vec(&index).unwrap()).unwrap();
    }

    fn names(it: &Iteration) -> Vec<&str> {
        it.tensors.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn every_tensor_whole_in_file_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // Written b before a: the order within the file is by offset.
        write_st(
            dir,
            "model.safetensors",
            &[
                ("b", "F32", &[2, 3], &f32s(&[0.0; 6])),
                ("a", "BF16", &[4], &[0u8; 8]),
            ],
        );
        // A dotfile (an editor's or a copy's leftover) is not read.
        fs::write(dir.join(".model.safetensors.swp"), b"junk").unwrap();
        fs::write(dir.join(".partial.safetensors"), b"junk").unwrap();
        let it = load_plain(dir).unwrap();
        assert_eq!(names(&it), vec!["b", "a"]);
        assert_eq!((it.world, it.stages, it.stage_devices), (1, 1, 1));
        assert_eq!(it.files.len(), 1);
        let b = &it.tensors[0];
        assert_eq!(
            (b.dtype, b.ms_dtype.as_str(), b.kind),
            (Dtype::F32, "Float32", Kind::Model)
        );
        assert_eq!(b.frag, vec![1, 1]);
        assert_eq!(b.chunk_shape, vec![2, 3]);
        assert_eq!(b.chunks.len(), 1);
        assert_eq!(b.chunks[0].origin, vec![0, 0]);
        assert_eq!(b.chunks[0].holders, vec![(0, 0)]);
        let raw = fs::read(dir.join("model.safetensors")).unwrap();
        let data = u64::from_le_bytes(raw[..8].try_into().unwrap()) + 8;
        assert_eq!(b.chunks[0].offset, data);
        assert_eq!(it.tensors[1].chunks[0].offset, data + 24);
        assert_eq!(it.tensors[1].ms_dtype, "BFloat16");
    }

    #[test]
    fn an_empty_folder_says_what_was_expected() {
        let tmp = tempfile::tempdir().unwrap();
        input_err(
            load_plain(tmp.path()),
            &[
                &tmp.path().display().to_string(),
                names::TRACKER,
                names::METADATA,
                "safetensors",
            ],
        );
    }

    /// A folder of `file` (tensor `a`) and `model.safetensors.index.json`
    /// mapping `map`: loading it fails, naming the index and `more`
    /// (`{dir}` in an item stands for the folder).
    fn index_err(file: &str, map: serde_json::Value, more: &[&str]) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_st(dir, file, &[("a", "F32", &[1], &f32s(&[1.0]))]);
        write_index(dir, "model.safetensors.index.json", map);
        let index = dir.join("model.safetensors.index.json");
        let d = dir.display().to_string();
        let more: Vec<String> = more.iter().map(|m| m.replace("{dir}", &d)).collect();
        let mut want = vec![index.display().to_string()];
        want.extend(more);
        input_err(
            load_plain(dir),
            &want.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }

    #[test]
    fn the_index_names_a_missing_file() {
        index_err(
            "model-00001-of-00002.safetensors",
            json!({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}),
            &["weight_map", "model-00002-of-00002.safetensors"],
        );
    }

    #[test]
    fn the_index_places_a_tensor_the_file_lacks() {
        index_err(
            "model-00001-of-00001.safetensors",
            json!({"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}),
            &[
                "{dir}/model-00001-of-00001.safetensors",
                "weight_map",
                "tensor b",
            ],
        );
    }

    #[test]
    fn tensors_not_in_the_index_are_left_out() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let shard = "model-00001-of-00001.safetensors";
        write_st(
            dir,
            shard,
            &[
                ("a", "F32", &[1], &f32s(&[1.0])),
                ("extra", "F32", &[1], &f32s(&[2.0])),
            ],
        );
        // A file the index does not name is not read at all.
        write_st(
            dir,
            "stray.safetensors",
            &[("a", "F32", &[1], &f32s(&[3.0]))],
        );
        write_index(dir, INDEX, json!({"a": shard}));
        let it = load_plain(dir).unwrap();
        assert_eq!(names(&it), vec!["a"]);
        assert_eq!(it.files.len(), 1);
        assert_eq!(it.files[0].name, shard);
    }

    #[test]
    fn model_safetensors_wins_over_an_index_as_in_transformers() {
        // transformers 5.24's from_pretrained on a local folder: the file
        // config.json's transformers_weights names, else model.safetensors
        // if it is a file, else model.safetensors.index.json.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_st(dir, SINGLE, &[("single", "F32", &[1], &f32s(&[1.0]))]);
        write_st(
            dir,
            "model-00001-of-00001.safetensors",
            &[("sharded", "F32", &[1], &f32s(&[2.0]))],
        );
        write_index(
            dir,
            INDEX,
            json!({"sharded": "model-00001-of-00001.safetensors"}),
        );
        assert_eq!(choose_weights(dir).unwrap(), Weights::File(SINGLE.into()));
        let it = load_plain(dir).unwrap();
        assert_eq!(names(&it), vec!["single"]);
        assert_eq!(it.files.len(), 1);
        // transformers_weights decides before either.
        fs::write(
            dir.join("config.json"),
            br#"{"transformers_weights": "model.safetensors.index.json"}"#,
        )
        .unwrap();
        assert_eq!(choose_weights(dir).unwrap(), Weights::Index(INDEX.into()));
        assert_eq!(names(&load_plain(dir).unwrap()), vec!["sharded"]);
        fs::write(
            dir.join("config.json"),
            br#"{"transformers_weights": "model-00001-of-00001.safetensors"}"#,
        )
        .unwrap();
        assert_eq!(names(&load_plain(dir).unwrap()), vec!["sharded"]);
        let cfg = dir.join("config.json").display().to_string();
        for (bad, word) in [
            (r#""gone.safetensors""#, "not a file"),
            (r#""../x.safetensors""#, "bare"),
            (r#""pytorch_model.bin""#, "*.safetensors"),
            ("3", "expected a file name"),
        ] {
            fs::write(
                dir.join("config.json"),
                format!(r#"{{"transformers_weights": {bad}}}"#),
            )
            .unwrap();
            input_err(load_plain(dir), &[&cfg, "transformers_weights", word]);
        }
        // A config.json that does not parse says nothing about the weights
        // here (the model maps report it).
        fs::write(dir.join("config.json"), b"{").unwrap();
        assert_eq!(choose_weights(dir).unwrap(), Weights::File(SINGLE.into()));
        // A dangling model.safetensors link is not a file: the index is read.
        fs::remove_file(dir.join("config.json")).unwrap();
        fs::remove_file(dir.join(SINGLE)).unwrap();
        std::os::unix::fs::symlink("gone", dir.join(SINGLE)).unwrap();
        assert_eq!(choose_weights(dir).unwrap(), Weights::Index(INDEX.into()));
    }

    #[test]
    fn several_index_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_st(dir, "x.safetensors", &[("a", "F32", &[1], &f32s(&[1.0]))]);
        write_st(dir, "y.safetensors", &[("b", "F32", &[1], &f32s(&[2.0]))]);
        write_index(
            dir,
            "x.safetensors.index.json",
            json!({"a": "x.safetensors"}),
        );
        write_index(
            dir,
            "y.safetensors.index.json",
            json!({"b": "y.safetensors"}),
        );
        input_err(
            load_plain(dir),
            &[
                &dir.display().to_string(),
                "several index files",
                "x.safetensors.index.json",
                "y.safetensors.index.json",
            ],
        );
        // transformers' own index wins over the others.
        write_index(
            dir,
            "model.safetensors.index.json",
            json!({"b": "y.safetensors"}),
        );
        let it = load_plain(dir).unwrap();
        assert_eq!(names(&it), vec!["b"]);
    }

    #[test]
    fn a_single_other_index_is_used() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_st(dir, "x.safetensors", &[("a", "F32", &[1], &f32s(&[1.0]))]);
        write_st(dir, "y.safetensors", &[("b", "F32", &[1], &f32s(&[2.0]))]);
        write_index(
            dir,
            "x.safetensors.index.json",
            json!({"a": "x.safetensors"}),
        );
        let it = load_plain(dir).unwrap();
        assert_eq!(names(&it), vec!["a"]);
    }

    #[test]
    fn an_index_without_weight_map() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_st(
            dir,
            "model-00001-of-00001.safetensors",
            &[("a", "F32", &[1], &f32s(&[1.0]))],
        );
        fs::write(dir.join(INDEX), b"{\"metadata\": {}}").unwrap();
        input_err(
            load_plain(dir),
            &[&dir.join(INDEX).display().to_string(), "weight_map"],
        );
    }

    #[test]
    fn a_tensor_in_two_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_st(dir, "a.safetensors", &[("t", "F32", &[1], &f32s(&[1.0]))]);
        write_st(dir, "b.safetensors", &[("t", "F32", &[1], &f32s(&[2.0]))]);
        input_err(
            load_plain(dir),
            &[
                &dir.join("b.safetensors").display().to_string(),
                "tensor t",
                "a.safetensors",
            ],
        );
    }

    #[test]
    fn a_dotfile_index_is_not_read() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_st(
            dir,
            "model.safetensors",
            &[("a", "F32", &[1], &f32s(&[1.0]))],
        );
        // What macOS leaves beside a copied file (AppleDouble): not JSON.
        fs::write(
            dir.join("._model.safetensors.index.json"),
            b"\x00\x05\x16\x07",
        )
        .unwrap();
        let it = load_plain(dir).unwrap();
        assert_eq!(names(&it), vec!["a"]);
    }
}
