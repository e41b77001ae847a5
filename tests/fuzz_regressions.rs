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

/// A stable stand-in for the fuzzer (which needs nightly): 600 inputs drawn
/// with a fixed xorshift, mesh sizes small and of any magnitude, through the
/// plan property (every tensor once per holding rank, bytes as the slices
/// say) on every `cargo test --features fuzzing` (scripts/test.sh).
#[test]
fn plan_property_on_generated_inputs() {
    let source = Arc::new(Source::open(Path::new("tests/fixtures/gpt-dp2-tp2-pp2-bf16")).unwrap());
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..600 {
        let mut data = vec![if next() % 5 == 0 { 2 } else { 0 }];
        for _ in 0..3 {
            match next() % 4 {
                // Small sizes, as real jobs use.
                0 | 1 => data.push((next() % 9) as u8),
                // Any magnitude: a power of two, or any u64.
                2 => {
                    data.push(0xf0);
                    data.extend_from_slice(&(1u64 << (next() % 64)).to_le_bytes());
                }
                _ => {
                    data.push(0xf0);
                    data.extend_from_slice(&next().to_le_bytes());
                }
            }
        }
        fuzzing::plan(source.clone(), &data);
    }
}

/// The plan property is not vacuous: a tensor laid out twice for one rank,
/// or a file size that does not add up, fails it.
#[test]
fn the_plan_property_catches_a_broken_plan() {
    use reshardfs::reshard::plan::Plan;
    use reshardfs::reshard::target::TargetSpec;
    let source = Arc::new(Source::open(Path::new("tests/fixtures/tp4-f32")).unwrap());
    let spec = || TargetSpec::Mesh {
        sizes: vec![("tp".into(), 2)],
        pp: None,
        offset: None,
    };
    let plan = Plan::build(source.clone(), spec()).unwrap();
    fuzzing::check_plan(&plan);

    let mut twice = Plan::build(source.clone(), spec()).unwrap();
    let f = &mut twice.iterations[0].files[0];
    let mut extra = f.tensors[0].clone();
    extra.offset = f.size;
    f.size += extra.len;
    f.tensors.push(extra);
    assert!(std::panic::catch_unwind(|| fuzzing::check_plan(&twice)).is_err());

    let mut short = Plan::build(source, spec()).unwrap();
    short.iterations[0].files[1].size -= 1;
    assert!(std::panic::catch_unwind(|| fuzzing::check_plan(&short)).is_err());
}
