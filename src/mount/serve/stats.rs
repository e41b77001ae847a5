//! `.reshardfs/stats`: the daemon's counters, and the one table that says
//! what each line of the file is, in order, and where its value comes from.
//! The file, and the list of its keys in `.reshardfs/README` and the docs,
//! come from [`STATS`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::checkpoint::s3::store as s3store;
use crate::mount::cache::CacheStats;

/// The daemon's own counters (the cache keeps its own, [`CacheStats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    Reads,
    DirectReads,
    MappedReads,
    BytesServed,
    SourceBytesRead,
    ReadErrors,
    InternalErrors,
    PrefetchAdvised,
    PassthroughOpens,
    PassthroughFallbacks,
}

const COUNTERS: usize = Counter::PassthroughFallbacks as usize + 1;

#[derive(Default)]
pub(crate) struct Counters([AtomicU64; COUNTERS]);

impl Counters {
    pub(crate) fn add(&self, c: Counter, n: u64) {
        self.0[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self, c: Counter) -> u64 {
        self.0[c as usize].load(Ordering::Relaxed)
    }
}

/// Where a line's value comes from.
#[derive(Clone, Copy)]
pub(crate) enum Value {
    Pid,
    /// Seconds since the server started, to 0.1 s.
    Uptime,
    Counter(Counter),
    Cache(fn(&CacheStats) -> u64),
    BlockSize,
    PrefetchWindow,
    BackingFiles,
    /// One of the object stores' totals ([`s3store::totals`]).
    Store(usize),
}

/// Every line of `.reshardfs/stats`, in order: key, value, meaning.
pub(crate) const STATS: &[(&str, Value, &str)] = &[
    ("pid", Value::Pid, "the daemon's process id"),
    ("uptime_s", Value::Uptime, "seconds since the mount started"),
    ("reads", Value::Counter(Counter::Reads), "read requests"),
    (
        "direct_reads",
        Value::Counter(Counter::DirectReads),
        "requests computed or gathered for themselves, not cached",
    ),
    (
        "mapped_reads",
        Value::Counter(Counter::MappedReads),
        "of those, answered straight from the source maps or the object store's blocks",
    ),
    (
        "bytes_served",
        Value::Counter(Counter::BytesServed),
        "bytes returned to readers",
    ),
    (
        "source_bytes_read",
        Value::Counter(Counter::SourceBytesRead),
        "bytes read from source files",
    ),
    (
        "read_errors",
        Value::Counter(Counter::ReadErrors),
        "reads (and opens) failed with EIO (a source file changed or became unreadable)",
    ),
    (
        "internal_errors",
        Value::Counter(Counter::InternalErrors),
        "requests and prefetch jobs that panicked (a bug: please report it)",
    ),
    ("cache_hits", Value::Cache(|c| c.hits), "block cache hits"),
    (
        "cache_misses",
        Value::Cache(|c| c.misses),
        "block cache misses",
    ),
    (
        "cache_bytes",
        Value::Cache(|c| c.bytes),
        "bytes in the block cache",
    ),
    (
        "cache_capacity",
        Value::Cache(|c| c.capacity),
        "the block cache's budget (--cache-size)",
    ),
    (
        "cache_blocks",
        Value::Cache(|c| c.blocks as u64),
        "blocks in the block cache",
    ),
    ("block_size", Value::BlockSize, "bytes per cache block"),
    (
        "prefetch_window",
        Value::PrefetchWindow,
        "the most bytes computed ahead of one reader (0: prefetch off)",
    ),
    (
        "prefetch_blocks",
        Value::Cache(|c| c.prefetch_blocks),
        "blocks computed ahead of sequential readers",
    ),
    (
        "prefetch_hits",
        Value::Cache(|c| c.prefetch_hits),
        "of those, read by their reader",
    ),
    (
        "prefetch_wasted",
        Value::Cache(|c| c.prefetch_wasted),
        "of those, evicted before anyone read them",
    ),
    (
        "prefetch_advised",
        Value::Counter(Counter::PrefetchAdvised),
        "source bytes asked of a FUSE or network source ahead of readers",
    ),
    (
        "passthrough_opens",
        Value::Counter(Counter::PassthroughOpens),
        "opens of view files that are a source file whole, handed to the kernel (FUSE passthrough: their reads never reach the daemon)",
    ),
    (
        "passthrough_fallbacks",
        Value::Counter(Counter::PassthroughFallbacks),
        "opens of such files served through the daemon instead (passthrough off or refused, or the source changed)",
    ),
    (
        "passthrough_backing_files",
        Value::BackingFiles,
        "source files registered with the kernel now (one per such file open by passthrough)",
    ),
    (
        "s3_requests",
        Value::Store(0),
        "requests sent to object stores (listings, GETs; retries included)",
    ),
    (
        "s3_bytes_fetched",
        Value::Store(1),
        "object bytes fetched (headers, small files and blocks)",
    ),
    (
        "s3_retries",
        Value::Store(2),
        "requests tried again after a 5xx, SlowDown, reset, timeout or short answer",
    ),
    (
        "s3_failures",
        Value::Store(3),
        "requests that failed for good (retries spent, or an answer no retry changes)",
    ),
];

/// What a rendering needs besides the counters.
pub(crate) struct Snapshot<'a> {
    pub counters: &'a Counters,
    pub cache: CacheStats,
    pub uptime_s: f64,
    pub block_size: u64,
    pub prefetch_window: u64,
    pub backing_files: u64,
}

/// The file: one `key: value` per line, in [`STATS`]'s order.
pub(crate) fn render(s: &Snapshot<'_>) -> String {
    let mut out = String::new();
    for (key, value, _) in STATS {
        let _ = match value {
            Value::Pid => writeln!(out, "{key}: {}", std::process::id()),
            Value::Uptime => writeln!(out, "{key}: {:.1}", s.uptime_s),
            Value::Counter(c) => writeln!(out, "{key}: {}", s.counters.get(*c)),
            Value::Cache(f) => writeln!(out, "{key}: {}", f(&s.cache)),
            Value::BlockSize => writeln!(out, "{key}: {}", s.block_size),
            Value::PrefetchWindow => writeln!(out, "{key}: {}", s.prefetch_window),
            Value::BackingFiles => writeln!(out, "{key}: {}", s.backing_files),
            Value::Store(i) => writeln!(out, "{key}: {}", s3store::totals()[*i]),
        };
    }
    out
}

/// The keys and their meanings, aligned, for `.reshardfs/README`.
pub(crate) fn legend() -> String {
    let width = STATS.iter().map(|(k, _, _)| k.len()).max().unwrap_or(0);
    STATS
        .iter()
        .map(|(k, _, what)| format!("    {k:<width$}  {what}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_a_line_and_keys_are_unique() {
        let mut keys: Vec<&str> = STATS.iter().map(|(k, _, _)| *k).collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "a key listed twice");
        for c in 0..COUNTERS {
            assert!(
                STATS
                    .iter()
                    .any(|(_, v, _)| matches!(v, Value::Counter(x) if *x as usize == c)),
                "counter {c} is never shown"
            );
        }
        let counters = Counters::default();
        counters.add(Counter::ReadErrors, 3);
        let text = render(&Snapshot {
            counters: &counters,
            cache: CacheStats {
                hits: 7,
                misses: 0,
                bytes: 0,
                capacity: 0,
                blocks: 0,
                prefetch_blocks: 0,
                prefetch_hits: 0,
                prefetch_wasted: 0,
            },
            uptime_s: 1.5,
            block_size: 4096,
            prefetch_window: 0,
            backing_files: 2,
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), STATS.len());
        assert!(lines.contains(&"read_errors: 3"), "{text}");
        assert!(lines.contains(&"cache_hits: 7"), "{text}");
        assert!(lines.contains(&"block_size: 4096"), "{text}");
        assert!(lines.contains(&"uptime_s: 1.5"), "{text}");
        assert!(lines.contains(&"passthrough_backing_files: 2"), "{text}");
        assert!(legend().contains("internal_errors"));
    }

    #[test]
    fn the_readme_lists_every_key() {
        let readme = include_str!("../../../README.md");
        for (k, _, _) in STATS {
            assert!(
                readme.contains(&format!("`{k}`")),
                "README.md does not list `{k}`"
            );
        }
    }
}
