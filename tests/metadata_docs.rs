//! A view's `metadata.json`, parsed, against the whole document MindSpore's own
//! code wrote for the same strategy: every field of every tensor
//! (`state_dict_metadata`) and every holder of every slice (`storage_data`:
//! `file_name`, `storage_rank`, `rank_group`). The references are the fixtures'
//! own metadata.json files (written by MindSpore Transformers' `save_metadata`)
//! and the expected folders' (written by its converter), never the code under test.
//!
//! Directions: each MindSpore-written checkpoint viewed under its own strategy
//! (a mesh of the same sizes, and `--strategy` its own metadata.json); each
//! Hugging Face fixture viewed under the strategy its expected folder was
//! written for (as a mesh and as `--strategy`).

use std::path::{Path, PathBuf};

use reshardfs::checkpoint::source::Source;
use reshardfs::reshard::plan::{Plan, ViewOptions};
use reshardfs::reshard::target::TargetSpec;
use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn mesh(sizes: &[(&str, u64)], pp: Option<u64>) -> TargetSpec {
    TargetSpec::Mesh {
        sizes: sizes.iter().map(|&(a, n)| (a.to_string(), n)).collect(),
        pp,
        offset: None,
    }
}

/// The view's metadata.json of the source's only iteration, as served.
fn view_metadata_bytes(src: &Path, spec: TargetSpec) -> Vec<u8> {
    let plan = Plan::build_with(Source::open(src).unwrap(), spec, ViewOptions::default())
        .unwrap_or_else(|e| panic!("{}: cannot plan the view: {e}", src.display()));
    assert_eq!(plan.iterations.len(), 1, "{}: one iteration", src.display());
    let (_, bytes) = plan.iterations[0]
        .small
        .iter()
        .find(|(n, _)| n == "metadata.json")
        .unwrap_or_else(|| panic!("{}: the view has no metadata.json", src.display()));
    bytes.clone()
}

/// The view's metadata.json of the source's only iteration, parsed.
fn view_metadata(src: &Path, spec: TargetSpec) -> Value {
    serde_json::from_slice(&view_metadata_bytes(src, spec))
        .expect("the view's metadata.json is not JSON")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every difference, named by its JSON path, so that a failure says which
/// tensor's which field (or which slice's which holder) is wrong.
fn diff(path: &str, got: &Value, want: &Value, out: &mut Vec<String>) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            for (k, wv) in w {
                match g.get(k) {
                    Some(gv) => diff(&format!("{path}/{k}"), gv, wv, out),
                    None => out.push(format!("{path}/{k}: missing (want {wv})")),
                }
            }
            for k in g.keys().filter(|k| !w.contains_key(*k)) {
                out.push(format!("{path}/{k}: not expected (got {})", g[k]));
            }
        }
        (Value::Array(g), Value::Array(w)) if g.len() == w.len() => {
            for (i, (gv, wv)) in g.iter().zip(w).enumerate() {
                diff(&format!("{path}[{i}]"), gv, wv, out);
            }
        }
        _ if got == want => {}
        _ => out.push(format!("{path}: got {got}, want {want}")),
    }
}

fn assert_same_document(what: &str, got: &Value, want: &Value) {
    let mut d = Vec::new();
    diff("", got, want, &mut d);
    assert!(
        d.is_empty(),
        "{what}: the view's metadata.json differs from MindSpore's in {} place(s):\n  {}",
        d.len(),
        d.iter().take(20).cloned().collect::<Vec<_>>().join("\n  ")
    );
}

/// The MindSpore-written checkpoints, their iteration folder, and the mesh
/// sizes they were saved with (tests/fixtures/README.md).
/// Mesh sizes by alias, as `--mesh` takes them.
type Sizes = &'static [(&'static str, u64)];

const MF_FIXTURES: &[(&str, &str, Sizes)] = &[
    (
        "gpt-dp2-tp2-pp2-bf16",
        "iteration_00000001",
        &[("dp", 2), ("tp", 2)],
    ),
    ("tp4-f32", "iteration_00000005", &[("tp", 4)]),
    (
        "qwen3-tiny-mf-tp2-pp2-f32",
        "iteration_00001000",
        &[("dp", 1), ("tp", 2)],
    ),
    (
        "qwen3-moe-tiny-mf-dp2-tp2-ep2-f32",
        "iteration_00001000",
        &[("dp", 2), ("tp", 2)],
    ),
];

#[test]
fn a_view_under_the_sources_own_strategy_has_its_metadata_json() {
    for &(name, iteration, sizes) in MF_FIXTURES {
        let src = fixture(name);
        let want = read_json(&src.join(iteration).join("metadata.json"));
        // No new sizes at all, the same sizes spelled out, and --strategy
        // the source's own metadata.json: one document.
        let keep = view_metadata(&src, mesh(&[], None));
        assert_same_document(&format!("{name}, no new sizes"), &keep, &want);
        let same = view_metadata(&src, mesh(sizes, None));
        assert_same_document(&format!("{name}, {sizes:?}"), &same, &want);
        let strategy = src.join(iteration).join("metadata.json");
        let own = view_metadata(&src, TargetSpec::Strategy(strategy.clone()));
        assert_same_document(&format!("{name}, --strategy its own"), &own, &want);
        // Beyond the parsed document: MindSpore's order too (model shards
        // before optimizer shards, rank by rank, each in tensor order), so
        // the file is byte for byte the source's.
        let bytes = view_metadata_bytes(&src, mesh(sizes, None));
        assert!(
            bytes == std::fs::read(&strategy).unwrap(),
            "{name}: the view's metadata.json under the source's own strategy is not byte for byte the source's"
        );
    }
}

/// The Hugging Face fixtures and the strategy their expected folder was
/// written under by MindSpore Transformers' converter.
const HF_FIXTURES: &[(&str, &str, Sizes, Option<u64>)] = &[
    (
        "qwen3-tiny-hf",
        "expected/qwen3-tiny-hf.dp=1,tp=2,pp=2",
        &[("dp", 1), ("tp", 2)],
        Some(2),
    ),
    (
        "qwen3-moe-tiny-hf",
        "expected/qwen3-moe-tiny-hf.dp=2,tp=2,ep=4",
        &[("dp", 2), ("tp", 2), ("ep", 4)],
        None,
    ),
];

#[test]
fn a_view_of_a_hugging_face_source_has_mindspore_transformers_metadata_json() {
    for &(name, expected, sizes, pp) in HF_FIXTURES {
        let src = fixture(name);
        let want_path = fixture(expected).join("metadata.json");
        let want = read_json(&want_path);
        let got = view_metadata(&src, mesh(sizes, pp));
        assert_same_document(&format!("{name}, {sizes:?} pp={pp:?}"), &got, &want);
        let got = view_metadata(&src, TargetSpec::Strategy(want_path));
        assert_same_document(&format!("{name}, --strategy {expected}"), &got, &want);
    }
}

/// MindSpore writes a dtype as `Float32` or `float32` by run mode: a view
/// that does not change a tensor's dtype keeps the source's spelling (so
/// the source's own strategy still gives its metadata.json byte for byte).
#[test]
fn an_unchanged_dtype_keeps_the_sources_spelling() {
    let src = fixture("tp4-f32");
    let tmp = std::env::temp_dir().join(format!("reshardfs-dtype-case-{}", std::process::id()));
    let it = tmp.join("iteration_00000005");
    std::fs::create_dir_all(&it).unwrap();
    for e in std::fs::read_dir(src.join("iteration_00000005")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), it.join(e.file_name())).unwrap();
    }
    let meta_path = it.join("metadata.json");
    let meta = std::fs::read_to_string(&meta_path).unwrap();
    assert!(meta.contains("\"Float32\""), "the fixture spells Float32");
    std::fs::write(&meta_path, meta.replace("\"Float32\"", "\"float32\"")).unwrap();
    let got = view_metadata_bytes(&it, mesh(&[("tp", 4)], None));
    let want = std::fs::read(&meta_path).unwrap();
    let resharded = view_metadata(&it, mesh(&[("tp", 2)], None));
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(
        got == want,
        "the view's metadata.json respelled the source's float32"
    );
    for (n, m) in resharded["state_dict_metadata"].as_object().unwrap() {
        assert_eq!(
            m["properties"]["dtype"], "float32",
            "{n}: tp=2 respelled float32"
        );
    }
}
