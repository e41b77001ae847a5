//! Property test of the planner and byte engine: random tensors, random source
//! and target layouts, random read ranges. Expected bytes come from slicing
//! the full tensor element by element with this file's own layout math,
//! written from docs/FORMAT.md §4 independently of `src/reshard/layout.rs`.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use reshardfs::checkpoint::source::Source;
use reshardfs::reshard::engine::Engine;
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

/// A rank file's tensors: name -> (dtype, shape, bytes).
type RankTensors = BTreeMap<String, (&'static str, Vec<u64>, Vec<u8>)>;

fn write_safetensors(path: &Path, tensors: &RankTensors) {
    let mut header = String::from(r#"{"__metadata__":{"format":"ms"}"#);
    let mut data = Vec::new();
    for (name, (dtype, shape, bytes)) in tensors {
        header += &format!(
            r#","{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{},{}]}}"#,
            data.len(),
            data.len() + bytes.len()
        );
        data.extend_from_slice(bytes);
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&data);
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
        let name = format!("decoder.layers.{ti}.w");
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
        let tensor_map: Vec<serde_json::Value> = t
            .map
            .iter()
            .map(|axes| match axes.as_slice() {
                [] => serde_json::json!(-1),
                [a] => serde_json::json!(c.src_dm.len() - 1 - a),
                many => serde_json::json!(
                    many.iter()
                        .map(|a| c.src_dm.len() - 1 - a)
                        .collect::<Vec<_>>()
                ),
            })
            .collect();
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
            )
        })
        .prop_map(|(src_dm, dst_dm, tensors, reads)| Case {
            src_dm,
            dst_dm,
            tensors,
            reads,
        })
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
        let sizes: Vec<(String, u64)> = ALIASES.iter().zip(&c.dst_dm).map(|(a, n)| (a.to_string(), *n)).collect();
        let plan = Plan::build(Source::open(dir.path()).unwrap(), TargetSpec::Mesh { sizes, pp: None }).unwrap();
        let ip = &plan.iterations[0];
        let world: u64 = c.dst_dm.iter().product();
        prop_assert_eq!(ip.world, world);
        let engine = Engine::new(&plan);
        for (fi, vf) in ip.files.iter().enumerate() {
            // Expected file: the plan's header, then each tensor's slice cut
            // from the full tensor by this test's own layout math.
            let mut want = vf.header.clone();
            for (ti, t) in c.tensors.iter().enumerate() {
                let name = format!("decoder.layers.{ti}.w");
                let (shape, es, bytes) = &full[&name];
                let (start, len) = slice_of(vf.rank, &c.dst_dm, &t.map, shape);
                want.extend(cut(bytes, shape, *es, &start, &len));
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
        }
    }
}
