//! The properties the fuzz targets check, shared with the regression test
//! that replays every saved input (`tests/fuzz_regressions.rs`), so a case
//! found once is checked on every `cargo test`. Each function panics when a
//! property fails; any input may be rejected, none may crash.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use crate::checkpoint::header::parse_header;
use crate::checkpoint::metadata::{format_shard_id, parse_shard_id};
use crate::checkpoint::source::Source;
use crate::reshard::engine::Engine;
use crate::reshard::plan::Plan;
use crate::reshard::target::TargetSpec;

/// Any string parses or is rejected; what parses formats back to a key
/// that parses to the same id.
pub fn shard_id(data: &[u8]) {
    let Ok(key) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((name, k)) = parse_shard_id(key) {
        let again = format_shard_id(&name, k);
        assert_eq!(parse_shard_id(&again), Ok((name, k)), "{again}");
    }
}

/// Any bytes as a rank file: accepted tensors lie inside the buffer.
pub fn safetensors_header(data: &[u8]) {
    if let Ok(tensors) = parse_header(data) {
        for t in tensors.values() {
            let end = t.offset.checked_add(t.len);
            assert!(end.is_some_and(|e| e <= data.len() as u64), "{t:?}");
        }
    }
}

/// Any bytes as `dir/metadata.json` (dir holding real rank files): the
/// iteration loads or is rejected; what loads plans and reads.
pub fn metadata(dir: &Path, data: &[u8]) {
    std::fs::write(dir.join("metadata.json"), data).expect("writing the fuzz input");
    let Ok(source) = Source::open(dir) else {
        return;
    };
    let spec = TargetSpec::Mesh {
        sizes: Vec::new(),
        pp: None,
        offset: None,
    };
    if let Ok(plan) = Plan::build(source, spec) {
        check_plan(&plan);
        read_ends(&plan);
    }
}

/// The first byte picks a target kind for `source`: mesh sizes for dp/tp
/// and a stage count from the next bytes, a strategy file holding the rest,
/// or unshard. The plan is built or rejected; what is built holds every
/// tensor once per holding rank with the bytes its slices say
/// ([`check_plan`]), and reads.
///
/// Each mesh size is one byte `b` (`b % 9`, the small sizes real jobs use)
/// or, when `b >= 0xf0`, the next 8 bytes as a little-endian `u64`: sizes of
/// any magnitude, where products and sums must be checked, not wrapped.
pub fn plan(source: Arc<Source>, data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut strategy_file = None;
    let spec = match mode % 3 {
        0 => {
            let mut at = rest;
            let mut size = || -> Option<u64> {
                let (&b, tail) = at.split_first()?;
                at = tail;
                if b < 0xf0 {
                    return Some(u64::from(b % 9));
                }
                let (wide, tail) = at.split_first_chunk::<8>()?;
                at = tail;
                Some(u64::from_le_bytes(*wide))
            };
            let dp = size().unwrap_or(1);
            let tp = size().unwrap_or(1);
            let pp = size();
            let mut sizes = vec![("dp".to_string(), dp), ("tp".to_string(), tp)];
            sizes.retain(|(_, n)| *n > 0);
            TargetSpec::Mesh {
                sizes,
                pp,
                offset: None,
            }
        }
        1 => {
            let mut f = tempfile_in_tmp();
            f.1.write_all(rest).expect("writing the strategy file");
            let spec = TargetSpec::Strategy(f.0.clone());
            strategy_file = Some(f);
            spec
        }
        _ => TargetSpec::Unshard,
    };
    let built = Plan::build(source, spec);
    if let Some((path, _)) = strategy_file {
        let _ = std::fs::remove_file(path);
    }
    if let Ok(plan) = built {
        check_plan(&plan);
        read_ends(&plan);
    }
}

/// The plan's own consistency, computed from the placements, not from the
/// files it laid out: every source tensor appears in the view exactly once
/// per rank that holds it (in a file of its kind), nowhere else; each
/// tensor's slices lie inside it and tile it; each file's tensors are back to
/// back after its header; and the view's data bytes sum to what the slices
/// say (slice elements x element size, over every holder).
pub fn check_plan(plan: &Plan) {
    use std::collections::{BTreeSet, HashMap};
    let product = |v: &[u64]| v.iter().try_fold(1u64, |a, &x| a.checked_mul(x));
    for (ip, it) in plan.iterations.iter().zip(&plan.source.iterations) {
        let mut seen: HashMap<(usize, u64), u32> = HashMap::new();
        let mut data_bytes = 0u64;
        for vf in &ip.files {
            let mut at = vf.header.len() as u64;
            for pt in &vf.tensors {
                let t = &it.tensors[pt.source];
                assert_eq!(
                    t.kind, vf.kind,
                    "{}: tensor {} in a file of another kind",
                    vf.name, t.name
                );
                assert_eq!(
                    pt.offset, at,
                    "{}: tensor {} is not right after the previous one",
                    vf.name, t.name
                );
                let elems =
                    product(&pt.slice.shape).expect("a planned slice's element count overflows");
                assert_eq!(
                    pt.len,
                    elems * t.elem_size(),
                    "{}: tensor {} length",
                    vf.name,
                    t.name
                );
                for (d, (&s, &n)) in pt.slice.start.iter().zip(&pt.slice.shape).enumerate() {
                    assert!(
                        s.checked_add(n).is_some_and(|e| e <= t.global_shape[d]),
                        "{}: tensor {} dimension {d} slice {s}+{n} outside {}",
                        vf.name,
                        t.name,
                        t.global_shape[d]
                    );
                }
                at += pt.len;
                data_bytes += pt.len;
                *seen.entry((pt.source, vf.rank)).or_default() += 1;
            }
            assert_eq!(vf.size, at, "{}: size is not header + tensors", vf.name);
        }
        let mut want_bytes = 0u64;
        for (ti, (t, p)) in it.tensors.iter().zip(&ip.placements).enumerate() {
            assert!(!p.ranks.is_empty(), "tensor {} has no holder", t.name);
            let mut starts = BTreeSet::new();
            let mut slice_elems = 0;
            for (pos, &r) in p.ranks.iter().enumerate() {
                assert_eq!(
                    seen.remove(&(ti, r)),
                    Some(1),
                    "tensor {} on rank {r}: not exactly once",
                    t.name
                );
                let s = p.slice(pos, &t.global_shape);
                slice_elems = product(&s.shape).expect("slice elements");
                want_bytes += slice_elems * t.elem_size();
                starts.insert(s.start);
            }
            let whole = product(&t.global_shape).expect("tensor elements");
            if whole > 0 {
                assert_eq!(
                    starts.len() as u64 * slice_elems,
                    whole,
                    "tensor {}: its slices do not tile it",
                    t.name
                );
            }
        }
        assert!(
            seen.is_empty(),
            "tensors on ranks that do not hold them: {:?}",
            seen.keys().take(5).collect::<Vec<_>>()
        );
        assert_eq!(
            data_bytes, want_bytes,
            "the view's bytes differ from what the slices say"
        );
    }
}

/// A fresh file under the temp dir (no extra dependency for the library).
fn tempfile_in_tmp() -> (std::path::PathBuf, std::fs::File) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "reshardfs-fuzz-{}-{}.json",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let f = std::fs::File::create(&path).expect("creating a temp file");
    (path, f)
}

/// Every file's first bytes and last 100 bytes read, and the size holds
/// (the first and last 64 files of a larger view: enough for the property,
/// cheap for a view of a million ranks).
fn read_ends(plan: &Plan) {
    let engine = Engine::new(plan);
    for (it, ip) in plan.iterations.iter().enumerate() {
        let n = ip.files.len();
        for (i, f) in ip.files.iter().enumerate() {
            if i >= 64 && i + 64 < n {
                continue;
            }
            let mut buf = [0u8; 4096];
            let tail = engine
                .read(it, i, f.size.saturating_sub(100), &mut buf)
                .expect("reading a planned file");
            assert_eq!(tail.bytes as u64, f.size.min(100));
            engine
                .read(it, i, 0, &mut buf)
                .expect("reading a planned file");
        }
    }
}
