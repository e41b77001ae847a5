//! Property test of the Qwen3-MoE map and the byte engine's transposed
//! tiles: random expert counts and sizes, dtypes of 2 and 4 bytes, random
//! expert parallelism and casts, read at ranges that start and end mid-row
//! and mid-tile. The expected bytes are built here element by element from
//! the fixtures README's definition (`weight1[J·H + h, f] = gate_J[f, h]`,
//! `weight1[J·H + h, F + f] = up_J[f, h]`, `weight2[J·F + f, h] =
//! down_J[h, f]`; experts split on dimension 0 over `ep`, the router
//! whole), independently of `src/`; and the Hugging Face → MindSpore
//! Transformers → Hugging Face round trip gives the original bytes back.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use reshardfs::checkpoint::models::{self, ModelChoice};
use reshardfs::checkpoint::source::Source;
use reshardfs::export::{ExportOptions, export};
use reshardfs::reshard::engine::Engine;
use reshardfs::reshard::plan::{HfOptions, Plan, ViewOptions};
use reshardfs::reshard::target::TargetSpec;
use safetensors::Dtype;

mod common;
use common::{bytes_for, cast, es, expected_file, write_safetensors};

#[derive(Debug, Clone)]
struct Case {
    experts: u64,
    hidden: u64,
    moe_ff: u64,
    /// ep divides the experts; the job is dp = ep * dp_mul, tp = 1.
    ep: u64,
    dp_mul: u64,
    dtype: Dtype,
    cast: Option<Dtype>,
    seed: u64,
    reads: Vec<(u64, u64)>,
}

type Tensors = BTreeMap<String, (Vec<u64>, Vec<u8>)>;

const HEADS: u64 = 2;
const HEAD_DIM: u64 = 2;
const VOCAB: u64 = 6;

fn expert(j: u64, w: &str) -> String {
    format!("model.layers.0.mlp.experts.{j}.{w}_proj.weight")
}

/// A one-layer Qwen3-MoE Hugging Face folder (one group of 2 heads of 2).
fn write_hf(dir: &Path, c: &Case) -> Tensors {
    let (h, f) = (c.hidden, c.moe_ff);
    let mut shapes: Vec<(String, Vec<u64>)> = vec![
        ("model.embed_tokens.weight".into(), vec![VOCAB, h]),
        ("lm_head.weight".into(), vec![VOCAB, h]),
        ("model.norm.weight".into(), vec![h]),
        ("model.layers.0.input_layernorm.weight".into(), vec![h]),
        (
            "model.layers.0.post_attention_layernorm.weight".into(),
            vec![h],
        ),
        (
            "model.layers.0.self_attn.q_proj.weight".into(),
            vec![HEADS * HEAD_DIM, h],
        ),
        (
            "model.layers.0.self_attn.k_proj.weight".into(),
            vec![HEAD_DIM, h],
        ),
        (
            "model.layers.0.self_attn.v_proj.weight".into(),
            vec![HEAD_DIM, h],
        ),
        (
            "model.layers.0.self_attn.o_proj.weight".into(),
            vec![h, HEADS * HEAD_DIM],
        ),
        (
            "model.layers.0.self_attn.q_norm.weight".into(),
            vec![HEAD_DIM],
        ),
        (
            "model.layers.0.self_attn.k_norm.weight".into(),
            vec![HEAD_DIM],
        ),
        ("model.layers.0.mlp.gate.weight".into(), vec![c.experts, h]),
    ];
    for j in 0..c.experts {
        shapes.push((expert(j, "gate"), vec![f, h]));
        shapes.push((expert(j, "up"), vec![f, h]));
        shapes.push((expert(j, "down"), vec![h, f]));
    }
    let mut tensors = BTreeMap::new();
    for (name, shape) in shapes {
        let n = shape.iter().product::<u64>() as usize;
        let b = bytes_for(&name, n, c.seed, c.dtype);
        tensors.insert(name, (shape, b));
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors, c.dtype);
    let config = serde_json::json!({
        "model_type": "qwen3_moe", "hidden_size": h, "num_attention_heads": HEADS,
        "num_key_value_heads": 1, "head_dim": HEAD_DIM, "intermediate_size": 4,
        "num_hidden_layers": 1, "vocab_size": VOCAB, "tie_word_embeddings": false,
        "num_local_experts": c.experts, "moe_intermediate_size": f, "num_experts_per_tok": 1,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    tensors
}

/// Element `(r, c)` of a row-major `[rows, cols]` tensor of `e`-byte elements.
fn at(b: &[u8], cols: u64, e: usize, r: u64, c: u64) -> &[u8] {
    let i = ((r * cols + c) as usize) * e;
    &b[i..i + e]
}

/// weight1 and weight2 by their definition, element by element.
fn stacked(c: &Case, hf: &Tensors) -> (Vec<u8>, Vec<u8>) {
    let (h, f, e) = (c.hidden, c.moe_ff, es(c.dtype));
    let mut w1 = Vec::new();
    let mut w2 = Vec::new();
    for j in 0..c.experts {
        let (gate, up, down) = (
            &hf[&expert(j, "gate")].1,
            &hf[&expert(j, "up")].1,
            &hf[&expert(j, "down")].1,
        );
        for hh in 0..h {
            for ff in 0..2 * f {
                let src = if ff < f {
                    at(gate, h, e, ff, hh)
                } else {
                    at(up, h, e, ff - f, hh)
                };
                w1.extend_from_slice(src);
            }
        }
        for ff in 0..f {
            for hh in 0..h {
                w2.extend_from_slice(at(down, f, e, hh, ff));
            }
        }
    }
    (w1, w2)
}

/// Rank `r`'s part of the experts: block `r % ep` of `ep` along rows.
fn ep_rows(b: &[u8], rows: u64, row_bytes: usize, ep: u64, r: u64) -> Vec<u8> {
    let per = (rows / ep) as usize * row_bytes;
    let k = (r % ep) as usize;
    b[k * per..(k + 1) * per].to_vec()
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![1u64, 2, 3, 4, 6]),
        1u64..40,
        1u64..40,
        prop::sample::select(vec![1u64, 2, 3]),
        1u64..3,
        prop::sample::select(vec![Dtype::BF16, Dtype::F32, Dtype::F16]),
        prop::sample::select(vec![None, Some(Dtype::F32), Some(Dtype::BF16)]),
        any::<u64>(),
        prop::collection::vec((any::<u64>(), 0u64..9000), 1..8),
    )
        .prop_map(
            |(experts, hidden, moe_ff, ep, dp_mul, dtype, cast, seed, reads)| {
                // ep must divide the expert count.
                let ep = if experts.is_multiple_of(ep) { ep } else { 1 };
                Case {
                    experts,
                    hidden,
                    moe_ff,
                    ep,
                    dp_mul,
                    dtype,
                    cast,
                    seed,
                    reads,
                }
            },
        )
}

fn mesh(c: &Case) -> TargetSpec {
    TargetSpec::Mesh {
        sizes: vec![("dp".into(), c.ep * c.dp_mul), ("ep".into(), c.ep)],
        pp: None,
        offset: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(80))]
    #[test]
    fn expert_views_match_the_definition(c in arb_case()) {
        let dir = tempfile::tempdir().unwrap();
        let hf = write_hf(dir.path(), &c);
        let (w1, w2) = stacked(&c, &hf);
        let source = Source::open(dir.path()).unwrap();
        let plan = Plan::build_with(source, mesh(&c), ViewOptions { dtype: c.cast, ..Default::default() }).unwrap();
        let view = c.cast.unwrap_or(c.dtype);
        let (h, f, e) = (c.hidden, c.moe_ff, es(c.dtype));
        let ip = &plan.iterations[0];
        prop_assert_eq!(ip.world, c.ep * c.dp_mul);
        let engine = Engine::new(&plan);
        for (fi, vf) in ip.files.iter().enumerate() {
            let mut whole = vec![0u8; vf.size as usize];
            prop_assert_eq!(engine.read(0, fi, 0, &mut whole).unwrap().bytes as u64, vf.size);
            // Only the experts and the router: the rest is the dense map's.
            let mut expect: Tensors = BTreeMap::new();
            let r = vf.rank;
            expect.insert("decoder.layers.0.mlp.experts.weight1".into(), (
                vec![c.experts * h / c.ep, 2 * f],
                cast(&ep_rows(&w1, c.experts * h, (2 * f) as usize * e, c.ep, r), c.dtype, view)));
            expect.insert("decoder.layers.0.mlp.experts.weight2".into(), (
                vec![c.experts * f / c.ep, h],
                cast(&ep_rows(&w2, c.experts * f, h as usize * e, c.ep, r), c.dtype, view)));
            let router = &hf["model.layers.0.mlp.gate.weight"];
            expect.insert("decoder.layers.0.mlp.router.weight".into(), (router.0.clone(), cast(&router.1, c.dtype, view)));
            // Every other tensor is whole (tp = 1): its bytes as stored.
            for (hn, mn) in [
                ("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
                ("lm_head.weight", "output_layer.weight"),
                ("model.norm.weight", "decoder.final_layernorm.weight"),
                ("model.layers.0.input_layernorm.weight", "decoder.layers.0.input_layernorm.weight"),
                ("model.layers.0.post_attention_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight"),
                ("model.layers.0.self_attn.o_proj.weight", "decoder.layers.0.self_attention.linear_proj.weight"),
                ("model.layers.0.self_attn.q_norm.weight", "decoder.layers.0.self_attention.q_layernorm.weight"),
                ("model.layers.0.self_attn.k_norm.weight", "decoder.layers.0.self_attention.k_layernorm.weight"),
            ] {
                let (s, b) = &hf[hn];
                expect.insert(mn.into(), (s.clone(), cast(b, c.dtype, view)));
            }
            // One group: QKV is q, then k, then v.
            let mut qkv = Vec::new();
            for x in ["q", "k", "v"] {
                qkv.extend(hf[&format!("model.layers.0.self_attn.{x}_proj.weight")].1.clone());
            }
            expect.insert("decoder.layers.0.self_attention.linear_qkv.weight".into(),
                (vec![(HEADS + 2) * HEAD_DIM, h], cast(&qkv, c.dtype, view)));
            let want = expected_file(&whole, &expect, view);
            prop_assert!(whole == want, "file {} differs", vf.name);
            for &(a, len) in &c.reads {
                let a = a % (vf.size + 1);
                let mut buf = vec![0u8; len as usize];
                let n = engine.read(0, fi, a, &mut buf).unwrap().bytes;
                let end = (a as usize + len as usize).min(whole.len());
                prop_assert_eq!(n, end - a as usize);
                prop_assert!(buf[..n] == whole[a as usize..end], "{} at {a} len {len}", vf.name);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    /// Hugging Face → MindSpore Transformers under ep (exported, so the
    /// experts are stored in ep slices) → `--hf`: each expert transposed
    /// back out of the slices, the original bytes.
    #[test]
    fn experts_round_trip_through_mindformers(c in arb_case()) {
        let dir = tempfile::tempdir().unwrap();
        let hf_dir = dir.path().join("hf");
        std::fs::create_dir(&hf_dir).unwrap();
        let hf = write_hf(&hf_dir, &c);
        let mf_dir = dir.path().join("mf");
        let widen = c.cast.filter(|&d| d == Dtype::F32);
        let plan = Plan::build_with(Source::open(&hf_dir).unwrap(), mesh(&c), ViewOptions { dtype: widen, ..Default::default() }).unwrap();
        export(&plan, &mf_dir, &ExportOptions { force: false, threads: 2, progress: false }).unwrap();
        let mf = Source::open(&mf_dir).unwrap();
        let back = models::as_hf(mf, ModelChoice::parse("qwen3_moe").unwrap(), None).unwrap();
        let plan = Plan::build_with(back, TargetSpec::Unshard, ViewOptions {
            dtype: widen.map(|_| c.dtype),
            hf: Some(HfOptions { max_shard_size: 1 + c.seed % 8192, ..Default::default() }),
            ..Default::default()
        }).unwrap();
        let engine = Engine::new(&plan);
        let mut seen = BTreeMap::new();
        for (fi, vf) in plan.iterations[0].files.iter().enumerate() {
            let mut whole = vec![0u8; vf.size as usize];
            engine.read(0, fi, 0, &mut whole).unwrap();
            // Random ranges equal the whole file's bytes there.
            for &(a, len) in &c.reads {
                let a = a % (vf.size + 1);
                let mut buf = vec![0u8; len as usize];
                let n = engine.read(0, fi, a, &mut buf).unwrap().bytes;
                let end = (a as usize + len as usize).min(whole.len());
                prop_assert!(buf[..n] == whole[a as usize..end], "{} at {a} len {len}", vf.name);
            }
            let n = u64::from_le_bytes(whole[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&whole[8..8 + n]).unwrap();
            for (name, v) in header.as_object().unwrap() {
                if name == "__metadata__" { continue; }
                let a = v["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
                let b = v["data_offsets"][1].as_u64().unwrap() as usize + 8 + n;
                let shape: Vec<u64> = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
                seen.insert(name.clone(), (shape, whole[a..b].to_vec()));
            }
        }
        prop_assert_eq!(seen.len(), hf.len());
        for (name, (shape, bytes)) in &hf {
            let (s, b) = &seen[name];
            prop_assert_eq!(s, shape, "{}", name);
            prop_assert!(b == bytes, "{} differs", name);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    /// A Hugging Face folder shown with `--hf` (another shard size, a
    /// cast): each expert is a transposed tile of `weight1`/`weight2`, which
    /// are themselves transposed tiles of the folder's experts, so the
    /// engine transposes out of an assembled part. The original tensors,
    /// cast as asked.
    #[test]
    fn experts_round_trip_without_a_copy_between(c in arb_case()) {
        let dir = tempfile::tempdir().unwrap();
        let hf = write_hf(dir.path(), &c);
        let v = models::hf_view(Source::open(dir.path()).unwrap(), ModelChoice::Auto, None).unwrap();
        let plan = Plan::build_with(v.source, TargetSpec::Unshard, ViewOptions {
            dtype: c.cast,
            hf: Some(HfOptions { max_shard_size: 1 + c.seed % 8192, files: v.files, ..Default::default() }),
            ..Default::default()
        }).unwrap();
        let view = c.cast.unwrap_or(c.dtype);
        let engine = Engine::new(&plan);
        let mut seen = BTreeMap::new();
        for (fi, vf) in plan.iterations[0].files.iter().enumerate() {
            let mut whole = vec![0u8; vf.size as usize];
            prop_assert_eq!(engine.read(0, fi, 0, &mut whole).unwrap().bytes as u64, vf.size);
            for &(a, len) in &c.reads {
                let a = a % (vf.size + 1);
                let mut buf = vec![0u8; len as usize];
                let n = engine.read(0, fi, a, &mut buf).unwrap().bytes;
                let end = (a as usize + len as usize).min(whole.len());
                prop_assert!(buf[..n] == whole[a as usize..end], "{} at {a} len {len}", vf.name);
            }
            let n = u64::from_le_bytes(whole[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&whole[8..8 + n]).unwrap();
            for (name, v) in header.as_object().unwrap() {
                if name == "__metadata__" { continue; }
                let a = v["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
                let b = v["data_offsets"][1].as_u64().unwrap() as usize + 8 + n;
                let shape: Vec<u64> = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
                seen.insert(name.clone(), (shape, whole[a..b].to_vec()));
            }
        }
        prop_assert_eq!(seen.len(), hf.len());
        for (name, (shape, bytes)) in &hf {
            let (s, b) = &seen[name];
            prop_assert_eq!(s, shape, "{}", name);
            prop_assert!(*b == cast(bytes, c.dtype, view), "{} differs", name);
        }
    }
}
