//! Replays every saved fuzz input (the seeds, and every case a fuzz run
//! found, kept under `fuzz/regressions/<target>/`) through the same property
//! checks the fuzz targets run.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use reshardfs::checkpoint::source::Source;
use reshardfs::fuzzing;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["seeds", "regressions"] {
        let dir = Path::new("fuzz").join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            let data = std::fs::read(&p).unwrap();
            out.push((p, data));
        }
    }
    assert!(!out.is_empty(), "no saved inputs for {target}");
    out
}

#[test]
fn shard_id_inputs() {
    for (_, data) in inputs("shard_id") {
        fuzzing::shard_id(&data);
    }
}

#[test]
fn safetensors_header_inputs() {
    for (_, data) in inputs("safetensors_header") {
        fuzzing::safetensors_header(&data);
    }
}

#[test]
fn metadata_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Path::new("tests/fixtures/tp4-f32/iteration_00000005");
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    for (_, data) in inputs("metadata") {
        fuzzing::metadata(tmp.path(), &data);
    }
}

#[test]
fn plan_inputs() {
    let source = Arc::new(Source::open(Path::new("tests/fixtures/gpt-dp2-tp2-pp2-bf16")).unwrap());
    for (_, data) in inputs("plan") {
        fuzzing::plan(source.clone(), &data);
    }
}
