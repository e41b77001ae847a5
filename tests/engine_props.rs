//! Property test of the planner and byte engine: random tensors, random source
//! layouts, random targets (`--mesh`, `--mesh` with `--pp`, `--strategy`,
//! `--unshard`), random read ranges. Expected bytes come from slicing the
//! full tensor element by element with this file's own layout math, and
//! expected headers are written by hand from the format, both from
//! docs/FORMAT.md (§2, §4, §5) and the README's rules, independently of `src/`.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use reshardfs::checkpoint::source::Source;
use reshardfs::reshard::engine::{Engine, gather, with_pieces};
use reshardfs::reshard::plan::Plan;
use reshardfs::reshard::target::TargetSpec;

const ALIASES: [&str; 3] = ["dp", "tp", "cp"];

#[derive(Debug, Clone)]
struct Case {
    /// Source device matrix and the target's sizes for the same axes.
    src_dm: Vec<u64>,
    dst_dm: Vec<u64>,
    tensors: Vec<TensorCase>,
    reads: Vec<(u64, u64)>,
    target: Target,
    /// Name the first tensor as the embedding, the last as the output layer
    /// (each only when a layer tensor remains): where `--pp` puts tensors
    /// outside the layers.
    embedding: bool,
    output: bool,
}

/// Which kind of target, with what it needs.
#[derive(Debug, Clone)]
enum Target {
    /// `--mesh` with `dst_dm`, and `--pp N` (N = 1 + n % layers) when given.
    Mesh {
        pp: Option<u64>,
    },
    /// `--strategy` {name: layout} with `dst_dm`, each tensor's own map, and
    /// its ranks in an order drawn from `perm_seed`.
    Strategy {
        perm_seed: u64,
    },
    Unshard,
}

impl Case {
    fn name(&self, ti: usize) -> String {
        let n = self.tensors.len();
        if self.embedding && n >= 2 && ti == 0 {
            "embedding.word_embeddings.weight".into()
        } else if self.output && n >= 2 + usize::from(self.embedding) && ti == n - 1 {
            "output_layer.weight".into()
        } else {
            format!(
                "decoder.layers.{}.w",
                ti - usize::from(self.embedding && n >= 2)
            )
        }
    }

    fn layers(&self) -> u64 {
        (0..self.tensors.len())
            .filter(|&ti| self.name(ti).starts_with("decoder.layers."))
            .count() as u64
    }

    /// The rank list of tensor `ti` in a `--strategy` target: 0..S in an
    /// order drawn from the seed (Fisher-Yates with xorshift).
    fn strategy_ranks(&self, ti: usize, seed: u64) -> Vec<u64> {
        let s: u64 = self.dst_dm.iter().product();
        let mut ranks: Vec<u64> = (0..s).collect();
        let mut rng = (seed ^ (ti as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        for i in (1..ranks.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ranks.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        ranks
    }
}

#[derive(Debug, Clone)]
struct TensorCase {
    dtype: (&'static str, u64),
    /// Per dimension, the device axes splitting it (axis indices).
    map: Vec<Vec<usize>>,
    /// Per dimension, a multiplier; the size is multiplier * lcm of splits.
    mult: Vec<u64>,
}

fn splits(dm: &[u64], map: &[Vec<usize>]) -> Vec<u64> {
    map.iter()
        .map(|axes| axes.iter().map(|&a| dm[a]).product())
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl TensorCase {
    fn shape(&self, c: &Case) -> Vec<u64> {
        let s = splits(&c.src_dm, &self.map);
        let t = splits(&c.dst_dm, &self.map);
        (0..self.map.len())
            .map(|d| s[d] / gcd(s[d], t[d]) * t[d] * self.mult[d])
            .collect()
    }
}

/// Coordinates of rank position `i` in `dm`, last axis fastest.
fn coords(mut i: u64, dm: &[u64]) -> Vec<u64> {
    let mut c = vec![0; dm.len()];
    for a in (0..dm.len()).rev() {
        c[a] = i % dm[a];
        i /= dm[a];
    }
    c
}

/// (start, shape) of rank position `i`'s slice: docs/FORMAT.md §4.3.
fn slice_of(i: u64, dm: &[u64], map: &[Vec<usize>], shape: &[u64]) -> (Vec<u64>, Vec<u64>) {
    let ids = piece_ids(i, dm, map);
    let mut start = vec![];
    let mut len = vec![];
    for (d, axes) in map.iter().enumerate() {
        let split: u64 = axes.iter().map(|&a| dm[a]).product();
        len.push(shape[d] / split);
        start.push(ids[d] * (shape[d] / split));
    }
    (start, len)
}

/// Per dimension, which piece rank position `i` holds (first axis most significant).
fn piece_ids(i: u64, dm: &[u64], map: &[Vec<usize>]) -> Vec<u64> {
    let c = coords(i, dm);
    map.iter()
        .map(|axes| axes.iter().fold(0, |acc, &a| acc * dm[a] + c[a]))
        .collect()
}

/// Row-major bytes of the box (start, len) of a full tensor.
fn cut(full: &[u8], shape: &[u64], es: u64, start: &[u64], len: &[u64]) -> Vec<u8> {
    let n: u64 = len.iter().product();
    let mut out = Vec::with_capacity((n * es) as usize);
    for e in 0..n {
        let local = coords(e, len);
        let mut flat = 0;
        for d in 0..shape.len() {
            flat = flat * shape[d] + start[d] + local[d];
        }
        out.extend_from_slice(&full[(flat * es) as usize..((flat + 1) * es) as usize]);
    }
    out
}

/// A tensor a target rank holds: (tensor index, slice start, slice shape).
type Held = (usize, Vec<u64>, Vec<u64>);

/// A rank file's tensors: name -> (dtype, shape, bytes).
type RankTensors = BTreeMap<String, (&'static str, Vec<u64>, Vec<u8>)>;

/// A safetensors header as docs/FORMAT.md §2 describes MindSpore's: length
/// prefix, `__metadata__` `{"format":"ms"}` first, keys sorted, tensors back
/// to back in key order, padded with spaces to a multiple of 8. Built here by
/// hand, not by the crate's `build_header`, so a view's header is checked
/// against the format, not against the code under test.
fn header_bytes(tensors: &[(&str, &str, &[u64])]) -> Vec<u8> {
    let mut sorted: Vec<_> = tensors.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut header = String::from(r#"{"__metadata__":{"format":"ms"}"#);
    let mut at = 0u64;
    for (name, dtype, shape) in sorted {
        let n = shape.iter().product::<u64>() * dtype_size(dtype);
        header += &format!(
            r#","{name}":{{"dtype":"{dtype}","shape":{},"data_offsets":[{at},{}]}}"#,
            serde_json::to_string(shape).unwrap(),
            at + n
        );
        at += n;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out
}

fn dtype_size(dtype: &str) -> u64 {
    match dtype {
        "F32" => 4,
        "BF16" => 2,
        "U8" => 1,
        _ => 8,
    }
}

fn write_safetensors(path: &Path, tensors: &RankTensors) {
    let entries: Vec<(&str, &str, &[u64])> = tensors
        .iter()
        .map(|(n, (d, s, _))| (n.as_str(), *d, s.as_slice()))
        .collect();
    let mut file = header_bytes(&entries);
    for (_, _, bytes) in tensors.values() {
        file.extend_from_slice(bytes);
    }
    std::fs::write(path, file).unwrap();
}

fn ms_dtype(st: &str) -> &'static str {
    match st {
        "F32" => "Float32",
        "BF16" => "BFloat16",
        "U8" => "UInt8",
        _ => "Int64",
    }
}

/// Writes the case's source checkpoint; returns the full tensors.
fn write_source(c: &Case, dir: &Path, seed: u64) -> BTreeMap<String, (Vec<u64>, u64, Vec<u8>)> {
    let world: u64 = c.src_dm.iter().product();
    let mut full = BTreeMap::new();
    let mut files: Vec<RankTensors> = vec![BTreeMap::new(); world as usize];
    let mut sdm = serde_json::Map::new();
    let mut storage = serde_json::Map::new();
    let mut rng = seed | 1;
    for (ti, t) in c.tensors.iter().enumerate() {
        let name = c.name(ti);
        let shape = t.shape(c);
        let es = t.dtype.1;
        let n: u64 = shape.iter().product();
        let bytes: Vec<u8> = (0..n * es)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng as u8
            })
            .collect();
        let frag = splits(&c.src_dm, &t.map);
        let chunk: Vec<u64> = shape.iter().zip(&frag).map(|(s, f)| s / f).collect();
        let nchunks: u64 = frag.iter().product();
        let mut holders: Vec<Vec<u64>> = vec![vec![]; nchunks as usize];
        for r in 0..world {
            let (start, len) = slice_of(r, &c.src_dm, &t.map, &shape);
            let k = piece_ids(r, &c.src_dm, &t.map)
                .iter()
                .zip(&frag)
                .fold(0, |acc, (id, f)| acc * f + id);
            holders[k as usize].push(r);
            files[r as usize].insert(
                name.clone(),
                (
                    t.dtype.0,
                    len.clone(),
                    cut(&bytes, &shape, es, &start, &len),
                ),
            );
        }
        let tensor_map = json_map(&t.map, c.src_dm.len());
        sdm.insert(
            name.clone(),
            serde_json::json!({
                "properties": {"dtype": ms_dtype(t.dtype.0), "replica_id": [], "allow_shape_mismatch": false, "allow_to_save": true},
                "global_shape": shape,
                "axis_fragmentations": frag,
                "layout": {"device_matrix": c.src_dm, "tensor_map": tensor_map, "interleaved_parallel": false,
                           "alias_name": &ALIASES[..c.src_dm.len()], "rank_list": (0..world).collect::<Vec<_>>()},
                "chunk": (0..nchunks).map(|k| serde_json::json!({"global_offset": [k], "local_shape": chunk})).collect::<Vec<_>>(),
            }),
        );
        for (k, ranks) in holders.iter().enumerate() {
            let entries: Vec<serde_json::Value> = ranks
                .iter()
                .map(|r| serde_json::json!({"file_name": format!("model-{r:07}-{world:07}.safetensors"), "storage_rank": r, "rank_group": ranks}))
                .collect();
            storage.insert(format!("('{name}', ({k},))"), serde_json::json!(entries));
        }
        full.insert(name, (shape, es, bytes));
    }
    for (r, f) in files.iter().enumerate() {
        write_safetensors(&dir.join(format!("model-{r:07}-{world:07}.safetensors")), f);
    }
    let meta = serde_json::json!({"state_dict_metadata": sdm, "storage_data": storage});
    std::fs::write(
        dir.join("metadata.json"),
        serde_json::to_vec(&meta).unwrap(),
    )
    .unwrap();
    full
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=3)
        .prop_flat_map(|axes| {
            (
                proptest::collection::vec(1u64..=3, axes),
                proptest::collection::vec(1u64..=4, axes),
                proptest::collection::vec(tensor_case(axes), 1..4),
                proptest::collection::vec((0u64..100_000, 1u64..5000), 1..12),
                target(),
                any::<bool>(),
                any::<bool>(),
            )
        })
        .prop_map(
            |(src_dm, dst_dm, tensors, reads, target, embedding, output)| Case {
                src_dm,
                dst_dm,
                tensors,
                reads,
                target,
                embedding,
                output,
            },
        )
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        2 => Just(Target::Mesh { pp: None }),
        2 => (0u64..8).prop_map(|n| Target::Mesh { pp: Some(n) }),
        1 => any::<u64>().prop_map(|perm_seed| Target::Strategy { perm_seed }),
        1 => Just(Target::Unshard),
    ]
}

fn tensor_case(axes: usize) -> impl Strategy<Value = TensorCase> {
    let dtypes = prop_oneof![
        Just(("F32", 4u64)),
        Just(("BF16", 2)),
        Just(("U8", 1)),
        Just(("I64", 8))
    ];
    (0usize..=3)
        .prop_flat_map(move |ndim| {
            (
                dtypes.clone(),
                // Each axis goes to one dimension or none (ndim means none).
                proptest::collection::vec(0..=ndim, axes),
                proptest::collection::vec(0u64..=3, ndim),
                any::<bool>(),
            )
        })
        .prop_map(|(dtype, owner, mult, reverse)| {
            let ndim = mult.len();
            let mut map = vec![vec![]; ndim];
            for (axis, &d) in owner.iter().enumerate() {
                if d < ndim {
                    map[d].push(axis);
                }
            }
            if reverse {
                map.iter_mut().for_each(|m| m.reverse());
            }
            // Mostly non-empty tensors; an occasional zero-sized dimension.
            let mult = mult
                .into_iter()
                .map(|m| if m == 3 { 0 } else { m + 1 })
                .collect();
            TensorCase { dtype, map, mult }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn every_view_byte_equals_slicing_the_full_tensor(c in case(), seed in any::<u64>()) {
        let dir = tempfile::tempdir().unwrap();
        let full = write_source(&c, dir.path(), seed);
        let s: u64 = c.dst_dm.iter().product();
        let layers = c.layers();
        // The target, and the expected holders: per target rank, each tensor
        // it holds with the slice, from this file's own reading of the README
        // rules and docs/FORMAT.md §4.
        let (spec, world) = match &c.target {
            Target::Mesh { pp } => {
                let sizes: Vec<(String, u64)> = ALIASES.iter().zip(&c.dst_dm).map(|(a, n)| (a.to_string(), *n)).collect();
                let pp = pp.map(|n| 1 + n % layers.max(1));
                // A split that does not divide the layers needs MindSpore
                // Transformers' offset: the one that puts layer i on stage
                // i*N/L, the rule the expectation below follows.
                let offset = pp.filter(|&n| layers % n != 0).map(|n| {
                    (0..n)
                        .map(|st| {
                            let held = (0..layers).filter(|i| i * n / layers == st).count() as i64;
                            held - (layers / n) as i64
                        })
                        .collect()
                });
                (TargetSpec::Mesh { sizes, pp, offset }, s * pp.unwrap_or(1))
            }
            Target::Strategy { perm_seed } => {
                let path = dir.path().join("strategy.json");
                let mut obj = serde_json::Map::new();
                for (ti, t) in c.tensors.iter().enumerate() {
                    obj.insert(c.name(ti), serde_json::json!({
                        "device_matrix": c.dst_dm,
                        "tensor_map": json_map(&t.map, c.dst_dm.len()),
                        "alias_name": &ALIASES[..c.dst_dm.len()],
                        "rank_list": c.strategy_ranks(ti, *perm_seed),
                    }));
                }
                std::fs::write(&path, serde_json::to_vec(&obj).unwrap()).unwrap();
                (TargetSpec::Strategy(path), s)
            }
            Target::Unshard => (TargetSpec::Unshard, 1),
        };
        // rank -> [(tensor index, start, len)]
        let mut holds: Vec<Vec<Held>> = vec![vec![]; world as usize];
        for (ti, t) in c.tensors.iter().enumerate() {
            let name = c.name(ti);
            let shape = &full[&name].0;
            match &c.target {
                Target::Unshard => holds[0].push((ti, vec![0; shape.len()], shape.clone())),
                Target::Strategy { perm_seed } => {
                    for (i, r) in c.strategy_ranks(ti, *perm_seed).into_iter().enumerate() {
                        let (start, len) = slice_of(i as u64, &c.dst_dm, &t.map, shape);
                        holds[r as usize].push((ti, start, len));
                    }
                }
                Target::Mesh { pp } => {
                    let stages = world / s;
                    let stage = match (pp, name.strip_prefix("decoder.layers.")) {
                        (None, _) => 0,
                        (Some(_), Some(rest)) => {
                            let i: u64 = rest.split('.').next().unwrap().parse().unwrap();
                            i * stages / layers
                        }
                        // A single-stage source: the output layer goes last,
                        // everything else outside the layers first.
                        (Some(_), None) if name == "output_layer.weight" => stages - 1,
                        (Some(_), None) => 0,
                    };
                    for i in 0..s {
                        let (start, len) = slice_of(i, &c.dst_dm, &t.map, shape);
                        holds[(stage * s + i) as usize].push((ti, start, len));
                    }
                }
            }
        }
        let plan = Plan::build(Source::open(dir.path()).unwrap(), spec).unwrap();
        let ip = &plan.iterations[0];
        prop_assert_eq!(ip.world, world);
        prop_assert_eq!(ip.files.len() as u64, world);
        let engine = Engine::new(&plan);
        for (fi, vf) in ip.files.iter().enumerate() {
            // Expected file: a header built by hand from the expected
            // holdings, then each tensor's slice cut from the full tensor,
            // in name order.
            let mut mine: Vec<(String, &Held)> =
                holds[vf.rank as usize].iter().map(|h| (c.name(h.0), h)).collect();
            mine.sort_by(|a, b| a.0.cmp(&b.0));
            let entries: Vec<(&str, &str, &[u64])> = mine
                .iter()
                .map(|(n, (ti, _, len))| (n.as_str(), c.tensors[*ti].dtype.0, len.as_slice()))
                .collect();
            let mut want = header_bytes(&entries);
            prop_assert!(vf.header == want, "file {}: header differs:\n got  {}\n want {}",
                vf.name, String::from_utf8_lossy(&vf.header[8..]), String::from_utf8_lossy(&want[8..]));
            for (n, (_, start, len)) in &mine {
                let (shape, es, bytes) = &full[n];
                want.extend(cut(bytes, shape, *es, start, len));
            }
            prop_assert_eq!(vf.size, want.len() as u64);
            // One read of everything, then random ranges (some past the end).
            let mut got = vec![0u8; want.len() + 7];
            let n = engine.read(0, fi, 0, &mut got).unwrap().bytes;
            prop_assert_eq!(n, want.len());
            prop_assert!(got[..n] == want[..], "file {} differs", vf.name);
            for &(off, len) in &c.reads {
                let off = off % (want.len() as u64 + 2);
                let mut buf = vec![0u8; len as usize];
                let n = engine.read(0, fi, off, &mut buf).unwrap().bytes;
                let end = (off as usize + len as usize).min(want.len());
                let expect = if off as usize >= want.len() { &[][..] } else { &want[off as usize..end] };
                prop_assert_eq!(&buf[..n], expect, "file {} range {}+{}", vf.name, off, len);
            }
            // Ranges the server may send straight from the source maps, as
            // pieces, must be exactly the expected bytes: the whole file,
            // each tensor, and the random ranges; with few pieces allowed,
            // only when they suffice.
            let src = &plan.source.iterations[0];
            let whole = vf.tensors.iter().map(|t| (t.offset, t.len));
            let mut pieces = Vec::new();
            for (off, len) in [(0, vf.size)].into_iter().chain(whole).chain(c.reads.iter().copied()) {
                let fits = len > 0 && off.checked_add(len).is_some_and(|e| e <= vf.size);
                for max in [1, 4, usize::MAX] {
                    let got = gather(src, vf, off, len, max, &mut pieces);
                    if max == usize::MAX {
                        prop_assert_eq!(got.is_some(), fits, "file {} gather {}+{}", vf.name, off, len);
                    }
                    if got.is_some() {
                        prop_assert!(pieces.len() <= max);
                        let bytes = with_pieces(src, vf, &pieces, |s| s.iter().flat_map(|b| b.iter().copied()).collect::<Vec<u8>>()).unwrap();
                        prop_assert!(bytes == want[off as usize..(off + len) as usize],
                            "file {} pieces {}+{} (at most {})", vf.name, off, len, max);
                    }
                }
            }
        }
    }
}

/// A tensor map in MindSpore's JSON form (values count axes from the last).
fn json_map(map: &[Vec<usize>], axes: usize) -> Vec<serde_json::Value> {
    map.iter()
        .map(|m| match m.as_slice() {
            [] => serde_json::json!(-1),
            [a] => serde_json::json!(axes - 1 - a),
            many => serde_json::json!(many.iter().map(|a| axes - 1 - a).collect::<Vec<_>>()),
        })
        .collect()
}
