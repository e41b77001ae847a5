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
    };
    if let Ok(plan) = Plan::build(source, spec) {
        read_ends(&plan);
    }
}

/// The first byte picks a target kind for `source`: mesh sizes for dp/tp
/// and a stage count from the next bytes, a strategy file holding the rest,
/// or unshard. The plan is built or rejected; what is built reads.
pub fn plan(source: Arc<Source>, data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut strategy_file = None;
    let spec = match mode % 3 {
        0 => {
            let b = |i: usize| u64::from(*rest.get(i).unwrap_or(&1) % 9);
            let mut sizes = vec![("dp".to_string(), b(0)), ("tp".to_string(), b(1))];
            sizes.retain(|(_, n)| *n > 0);
            let pp = rest.get(2).map(|&p| u64::from(p % 4));
            TargetSpec::Mesh { sizes, pp }
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
        read_ends(&plan);
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

/// Every file's first bytes and last 100 bytes read, and the size holds.
fn read_ends(plan: &Plan) {
    let engine = Engine::new(plan);
    for (it, ip) in plan.iterations.iter().enumerate() {
        for (i, f) in ip.files.iter().enumerate() {
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
