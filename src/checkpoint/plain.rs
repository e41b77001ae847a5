//! A folder of plain safetensors files without `metadata.json`: a
//! single-card save, or a Hugging Face folder read tensor by tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use serde_json::Value;

use super::header::dtype_to_mindspore;
use super::iteration::{common_prefix, kind_of_file};
use super::metadata::from_value;
use super::names;
use super::paths::{FileSet, MAX_METADATA_BYTES, read_small};
use super::source::{Chunk, Iteration, Tensor, read_common};
use crate::error::{Result, source_io};
use crate::{bad, bail};

/// Loads a folder of plain safetensors files: a single-card save, a Hugging
/// Face folder with `model.safetensors`, or one with an index.json.
pub(crate) fn load_plain(dir: &Path) -> Result<Iteration> {
    let mut file_names: Vec<String> = Vec::new();
    // With an index, the tensors it names and the file it says holds each.
    let mut listed: Option<(std::path::PathBuf, BTreeMap<String, String>)> = None;
    let mut indexes: Vec<String> = fs::read_dir(dir)
        .map_err(|e| source_io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors.index.json"))
        .collect();
    indexes.sort();
    // transformers' own index wins; any other must be the only one, or
    // which tensors the folder holds would depend on listing order.
    let index = if indexes.iter().any(|n| n == "model.safetensors.index.json") {
        Some("model.safetensors.index.json".to_string())
    } else if indexes.len() > 1 {
        bail!(
            "{}: several index files ({}); keep one, or name the folder of one model",
            dir.display(),
            indexes.join(", ")
        );
    } else {
        indexes.pop()
    };
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
        file_names.extend(map.values().cloned());
        file_names.sort();
        file_names.dedup();
        listed = Some((ip, map));
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
    let named_in = match &listed {
        Some((ip, _)) => ip.clone(),
        None => dir.to_path_buf(),
    };
    let mut set = FileSet {
        dir,
        named_in: &named_in,
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
                }],
                stage: 0,
                allow_shape_mismatch: false,
                allow_to_save: true,
                rows: None,
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
