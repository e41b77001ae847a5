//! Property test of the Qwen3 model map through the planner and byte engine:
//! random Qwen3 shapes written as Hugging Face folders (random dtype, random
//! bytes), viewed as MindSpore Transformers checkpoints under random tp (and
//! cast to another dtype), read at random ranges. The expected bytes are
//! built here element by element from the fixtures README's definition of the
//! fused layouts (QKV per key/value group, gate/up row by row) and tp row or
//! column slicing, and the expected casts with the `half` crate's conversions,
//! independently of `src/`.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use reshardfs::checkpoint::source::Source;

mod common;
use common::{Split, bytes_for, cast, es, expected_file, write_safetensors};
use reshardfs::reshard::engine::{Engine, gather, with_pieces};
use reshardfs::reshard::plan::{Plan, ViewOptions};
use reshardfs::reshard::target::TargetSpec;
use safetensors::Dtype;

#[derive(Debug, Clone)]
struct Case {
    heads_per_group: u64,
    groups: u64,
    head_dim: u64,
    hidden: u64,
    intermediate: u64,
    vocab: u64,
    /// tp divides `groups`, `intermediate`, `hidden` and the q rows.
    tp: u64,
    dtype: Dtype,
    cast: Option<Dtype>,
    seed: u64,
    reads: Vec<(u64, u64)>,
}

impl Case {
    /// A vocabulary tp does not divide: the embedding stays whole, and the
    /// output layer (always split) is left out by tying the embeddings.
    fn tied(&self) -> bool {
        !self.vocab.is_multiple_of(self.tp)
    }
}

/// Writes a one-layer Qwen3 Hugging Face folder; returns its tensors.
fn write_hf(dir: &Path, c: &Case) -> BTreeMap<String, (Vec<u64>, Vec<u8>)> {
    let heads = c.heads_per_group * c.groups;
    let hd = c.head_dim;
    let h = c.hidden;
    let shapes: Vec<(&str, Vec<u64>)> = vec![
        ("model.embed_tokens.weight", vec![c.vocab, h]),
        (
            "model.layers.0.self_attn.q_proj.weight",
            vec![heads * hd, h],
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            vec![c.groups * hd, h],
        ),
        (
            "model.layers.0.self_attn.v_proj.weight",
            vec![c.groups * hd, h],
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            vec![h, heads * hd],
        ),
        ("model.layers.0.self_attn.q_norm.weight", vec![hd]),
        ("model.layers.0.self_attn.k_norm.weight", vec![hd]),
        (
            "model.layers.0.mlp.gate_proj.weight",
            vec![c.intermediate, h],
        ),
        ("model.layers.0.mlp.up_proj.weight", vec![c.intermediate, h]),
        (
            "model.layers.0.mlp.down_proj.weight",
            vec![h, c.intermediate],
        ),
        ("model.layers.0.input_layernorm.weight", vec![h]),
        ("model.layers.0.post_attention_layernorm.weight", vec![h]),
        ("model.norm.weight", vec![h]),
    ];
    let mut shapes = shapes;
    if !c.tied() {
        shapes.push(("lm_head.weight", vec![c.vocab, h]));
    }
    let mut tensors = BTreeMap::new();
    for (name, shape) in shapes {
        let n = shape.iter().product::<u64>() as usize;
        tensors.insert(
            name.to_string(),
            (shape, bytes_for(name, n, c.seed, c.dtype)),
        );
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors, c.dtype);
    let config = serde_json::json!({
        "model_type": "qwen3", "hidden_size": h, "num_attention_heads": heads,
        "num_key_value_heads": c.groups, "head_dim": hd, "intermediate_size": c.intermediate,
        "num_hidden_layers": 1, "vocab_size": c.vocab, "tie_word_embeddings": c.tied(),
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    tensors
}

/// The MindFormers tensors of the definition: fused QKV per group, fc1
/// row by row, renamed others.
fn mf_tensors(c: &Case, hf: &BTreeMap<String, (Vec<u64>, Vec<u8>)>) -> BTreeMap<String, Split> {
    let e = es(c.dtype);
    let row = c.hidden as usize * e;
    let get = |n: &str| hf[n].1.clone();
    let mut out = BTreeMap::new();
    // (name, shape, bytes, split dimension on tp)
    let mut qkv = Vec::new();
    let (q, k, v) = (
        get("model.layers.0.self_attn.q_proj.weight"),
        get("model.layers.0.self_attn.k_proj.weight"),
        get("model.layers.0.self_attn.v_proj.weight"),
    );
    let r = (c.heads_per_group * c.head_dim) as usize;
    let hd = c.head_dim as usize;
    for g in 0..c.groups as usize {
        qkv.extend_from_slice(&q[g * r * row..(g + 1) * r * row]);
        qkv.extend_from_slice(&k[g * hd * row..(g + 1) * hd * row]);
        qkv.extend_from_slice(&v[g * hd * row..(g + 1) * hd * row]);
    }
    let rows = c.groups * (c.heads_per_group + 2) * c.head_dim;
    out.insert(
        "decoder.layers.0.self_attention.linear_qkv.weight".into(),
        (vec![rows, c.hidden], qkv, Some(0)),
    );
    let (gate, up) = (
        get("model.layers.0.mlp.gate_proj.weight"),
        get("model.layers.0.mlp.up_proj.weight"),
    );
    let mut fc1 = Vec::new();
    for i in 0..c.intermediate as usize {
        fc1.extend_from_slice(&gate[i * row..(i + 1) * row]);
        fc1.extend_from_slice(&up[i * row..(i + 1) * row]);
    }
    out.insert(
        "decoder.layers.0.mlp.linear_fc1.weight".into(),
        (vec![2 * c.intermediate, c.hidden], fc1, Some(0)),
    );
    for (h, m, split) in [
        (
            "model.embed_tokens.weight",
            "embedding.word_embeddings.weight",
            if c.vocab.is_multiple_of(c.tp) {
                Some(0)
            } else {
                None
            },
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            "decoder.layers.0.self_attention.linear_proj.weight",
            Some(1),
        ),
        (
            "model.layers.0.self_attn.q_norm.weight",
            "decoder.layers.0.self_attention.q_layernorm.weight",
            None,
        ),
        (
            "model.layers.0.self_attn.k_norm.weight",
            "decoder.layers.0.self_attention.k_layernorm.weight",
            None,
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            "decoder.layers.0.mlp.linear_fc2.weight",
            Some(1),
        ),
        (
            "model.layers.0.input_layernorm.weight",
            "decoder.layers.0.input_layernorm.weight",
            None,
        ),
        (
            "model.layers.0.post_attention_layernorm.weight",
            "decoder.layers.0.pre_mlp_layernorm.weight",
            None,
        ),
        ("model.norm.weight", "decoder.final_layernorm.weight", None),
        ("lm_head.weight", "output_layer.weight", Some(0)),
    ] {
        let Some((shape, b)) = hf.get(h).cloned() else {
            continue;
        };
        out.insert(m.to_string(), (shape, b, split));
    }
    out
}

/// Rank `rank`'s slice of a 1-D or 2-D tensor split `tp` ways on `split`.
fn tp_slice(
    shape: &[u64],
    b: &[u8],
    e: usize,
    split: Option<usize>,
    tp: u64,
    rank: u64,
) -> (Vec<u64>, Vec<u8>) {
    let Some(d) = split else {
        return (shape.to_vec(), b.to_vec());
    };
    let rows = shape[0] as usize;
    let cols = if shape.len() > 1 {
        shape[1] as usize
    } else {
        1
    };
    let mut s = shape.to_vec();
    s[d] /= tp;
    let mut out = Vec::new();
    if d == 0 {
        let per = rows / tp as usize;
        out.extend_from_slice(
            &b[rank as usize * per * cols * e..(rank as usize + 1) * per * cols * e],
        );
    } else {
        let per = cols / tp as usize;
        for r in 0..rows {
            let at = (r * cols + rank as usize * per) * e;
            out.extend_from_slice(&b[at..at + per * e]);
        }
    }
    (s, out)
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        1u64..4,
        prop::sample::select(vec![1u64, 2, 4]),
        1u64..5,
        1u64..4,
        1u64..4,
        1u64..20,
        prop::sample::select(vec![1u64, 2, 4]),
        prop::sample::select(vec![Dtype::F32, Dtype::BF16, Dtype::F16]),
        prop::sample::select(vec![
            None,
            Some(Dtype::F32),
            Some(Dtype::BF16),
            Some(Dtype::F16),
        ]),
        any::<u64>(),
        prop::collection::vec((any::<u64>(), 0u64..5000), 1..6),
    )
        .prop_map(
            |(hpg, groups, hd, hmul, imul, vocab, tp, dtype, cast, seed, reads)| {
                // tp must divide the groups, the intermediate size, hidden (o_proj
                // and down_proj columns) and the q rows: make the sizes multiples.
                let tp = tp.min(groups);
                Case {
                    heads_per_group: hpg,
                    groups,
                    head_dim: hd * 2,
                    hidden: hmul * tp * 2,
                    intermediate: imul * tp,
                    vocab,
                    tp,
                    dtype,
                    cast,
                    seed,
                    reads,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(120))]
    #[test]
    fn qwen3_views_match_the_definition(c in arb_case()) {
        let dir = tempfile::tempdir().unwrap();
        let hf = write_hf(dir.path(), &c);
        let mf = mf_tensors(&c, &hf);
        let source = Source::open(dir.path()).unwrap();
        let spec = TargetSpec::Mesh { sizes: vec![("tp".into(), c.tp)], pp: None, offset: None };
        let plan = Plan::build_with(source, spec, ViewOptions { dtype: c.cast, ..Default::default() }).unwrap();
        let view_dtype = c.cast.unwrap_or(c.dtype);
        let e = es(c.dtype);
        let ip = &plan.iterations[0];
        prop_assert_eq!(ip.world, c.tp);
        let engine = Engine::new(&plan);
        for (fi, vf) in ip.files.iter().enumerate() {
            let expect: BTreeMap<String, (Vec<u64>, Vec<u8>)> = mf
                .iter()
                .map(|(n, (shape, b, split))| {
                    let (s, b) = tp_slice(shape, b, e, *split, c.tp, vf.rank);
                    (n.clone(), (s, cast(&b, c.dtype, view_dtype)))
                })
                .collect();
            let mut whole = vec![0u8; vf.size as usize];
            let got = engine.read(0, fi, 0, &mut whole).unwrap();
            prop_assert_eq!(got.bytes as u64, vf.size);
            let want = expected_file(&whole, &expect, view_dtype);
            prop_assert!(whole == want, "file {} differs", vf.name);
            for &(at, len) in &c.reads {
                let at = at % (vf.size + 1);
                let mut buf = vec![0u8; len as usize];
                let n = engine.read(0, fi, at, &mut buf).unwrap().bytes;
                let end = (at as usize + len as usize).min(whole.len());
                prop_assert_eq!(n, end - at as usize);
                prop_assert!(buf[..n] == whole[at as usize..end], "{} at {at} len {len}", vf.name);
            }
            // Ranges the server may send straight from the source maps, as
            // pieces: gathered, exactly the expected bytes; and always
            // possible without a cast.
            let src = &plan.source.iterations[0];
            let cast = |at: u64, len: u64| vf.tensors.iter().any(|t| {
                t.dtype != src.tensors[t.source].dtype && t.len > 0
                    && t.offset < at + len && at < t.offset + t.len
            });
            let tensors = vf.tensors.iter().map(|t| (t.offset, t.len));
            let mut pieces = Vec::new();
            for (at, len) in tensors.chain(c.reads.iter().map(|&(a, l)| (a % (vf.size + 1), l))) {
                let fits = len > 0 && at + len <= vf.size;
                let got = gather(src, vf, at, len, usize::MAX, &mut pieces);
                prop_assert_eq!(got.is_some(), fits && !cast(at, len), "{} gather {}+{}", vf.name, at, len);
                if got.is_some() {
                    let bytes = with_pieces(src, vf, &pieces, |s| s.iter().flat_map(|b| b.iter().copied()).collect::<Vec<u8>>()).unwrap();
                    prop_assert!(bytes == whole[at as usize..(at + len) as usize],
                        "{} pieces {at}+{len}", vf.name);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(60))]
    /// Hugging Face → MindFormers view (exported, under random tp and an
    /// optional cast to float32) → `--hf` view: the original tensors again,
    /// cast back to the original dtype when the MF copy was widened.
    #[test]
    fn qwen3_round_trips_through_mindformers(c in arb_case()) {
        use reshardfs::checkpoint::models::{self, ModelChoice};
        use reshardfs::export::{ExportOptions, export};
        use reshardfs::reshard::plan::HfOptions;
        let dir = tempfile::tempdir().unwrap();
        let hf_dir = dir.path().join("hf");
        std::fs::create_dir(&hf_dir).unwrap();
        let hf = write_hf(&hf_dir, &c);
        let mf_dir = dir.path().join("mf");
        let widen = c.cast.filter(|&d| d == Dtype::F32);
        let spec = TargetSpec::Mesh { sizes: vec![("tp".into(), c.tp)], pp: None, offset: None };
        let plan = Plan::build_with(Source::open(&hf_dir).unwrap(), spec, ViewOptions { dtype: widen, ..Default::default() }).unwrap();
        export(&plan, &mf_dir, &ExportOptions { force: false, threads: 2, progress: false }).unwrap();

        let mf = Source::open(&mf_dir).unwrap();
        let back = models::as_hf(mf, ModelChoice::parse("qwen3").unwrap(), None).unwrap();
        let plan = Plan::build_with(back, TargetSpec::Unshard, ViewOptions {
            dtype: widen.map(|_| c.dtype),
            hf: Some(HfOptions { max_shard_size: 1 + c.seed % 4096, ..Default::default() }),
            ..Default::default()
        }).unwrap();
        let engine = Engine::new(&plan);
        let mut seen = BTreeMap::new();
        for (fi, vf) in plan.iterations[0].files.iter().enumerate() {
            let mut whole = vec![0u8; vf.size as usize];
            engine.read(0, fi, 0, &mut whole).unwrap();
            let n = u64::from_le_bytes(whole[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&whole[8..8 + n]).unwrap();
            prop_assert_eq!(&header["__metadata__"]["format"], "pt");
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
