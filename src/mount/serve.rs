//! Serving a view: attributes and bytes of every node of the tree, through
//! the block cache, with live counters. No FUSE types here: the FUSE adapter
//! (`fs`) only translates, and this is tested without a mount.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use crate::mount::cache::BlockCache;
use crate::mount::tree::{Content, Ino, Tree};
use crate::report;
use crate::reshard::engine::{Served, SourceFault, Touched, read_file};
use crate::reshard::plan::Plan;

/// View bytes are computed and cached in blocks of at most this size: large
/// enough that a sequential reader computes each block once for several
/// kernel requests, small enough that a random reader wastes little.
pub const MAX_BLOCK_SIZE: u64 = 1 << 20;

/// The block size for a cache budget: at most a quarter of the budget (so a
/// small cache still holds a few blocks and never exceeds its budget), a
/// power of two between 4 KiB and [`MAX_BLOCK_SIZE`].
pub fn block_size_for(cache_bytes: u64) -> u64 {
    let quarter = (cache_bytes / 4).clamp(4096, MAX_BLOCK_SIZE);
    1 << (63 - quarter.leading_zeros())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    File,
}

#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: Ino,
    pub kind: NodeKind,
    pub size: u64,
    pub mtime: SystemTime,
    /// Content that changes while mounted (counters): never cache it.
    pub live: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no such file")]
    NotFound,
    #[error("is a directory")]
    IsDir,
    #[error(transparent)]
    Source(#[from] SourceFault),
}

thread_local! {
    /// Per request thread: where whole-block reads are computed (reused, so
    /// its pages are touched once).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per request thread: source spans read and not yet released, with the
    /// server and iteration they belong to.
    static TOUCHED: std::cell::RefCell<(usize, usize, Touched)> =
        std::cell::RefCell::new((0, 0, Touched::default()));
}

/// Source spans a request thread may keep mapped before releasing them:
/// releasing after every 1 MiB block cost ~12% of a cold read in TLB
/// shootdowns; this keeps the daemon's RSS within threads x 16 MiB of the
/// cache budget.
const RELEASE_EVERY: u64 = 16 << 20;

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    /// Reads of whole blocks computed straight into a scratch buffer.
    direct_reads: AtomicU64,
    bytes_served: AtomicU64,
    source_bytes_read: AtomicU64,
    read_errors: AtomicU64,
    /// Requests that panicked (bugs), answered EIO by the FUSE adapter.
    internal_errors: AtomicU64,
}

pub struct Server {
    plan: Plan,
    tree: Tree,
    cache: BlockCache,
    counters: Counters,
    started: Instant,
    block_size: u64,
    zeros: bool,
    /// Distinguishes servers in per-thread state (never reused).
    id: usize,
}

/// What `--serve-zeros` replies with: no allocation, no computation.
static ZEROS: [u8; MAX_BLOCK_SIZE as usize] = [0; MAX_BLOCK_SIZE as usize];

impl Server {
    /// For benchmarks: view files keep their names and sizes but read as
    /// zeros, so a run measures FUSE itself with zero-cost data.
    pub fn serve_zeros(mut self) -> Self {
        self.zeros = true;
        self
    }

    pub fn new(plan: Plan, cache_bytes: u64) -> Server {
        let report = report::plan(&plan);
        let tree = Tree::build(&plan, &report);
        Server {
            plan,
            tree,
            cache: BlockCache::new(cache_bytes),
            counters: Counters::default(),
            started: Instant::now(),
            block_size: block_size_for(cache_bytes),
            zeros: false,
            id: {
                static NEXT: std::sync::atomic::AtomicUsize =
                    std::sync::atomic::AtomicUsize::new(1);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
        }
    }

    /// Counts a request that panicked (see `fuse::GuardedFs`).
    pub fn count_internal_error(&self) {
        self.counters
            .internal_errors
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The source's canonical path (a mount must not hide it).
    pub fn source_path(&self) -> &std::path::Path {
        &self.plan.source.path
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    pub fn attr(&self, ino: Ino) -> Option<Attr> {
        let node = self.tree.get(ino)?;
        let (kind, size, live) = match &node.content {
            Content::Dir(_) => (NodeKind::Dir, 0, false),
            Content::Bytes(b) => (NodeKind::File, b.len() as u64, false),
            Content::View { it, file, .. } => (
                NodeKind::File,
                self.plan.iterations[*it].files[*file].size,
                false,
            ),
            Content::Stats => (NodeKind::File, self.stats_text().len() as u64, true),
        };
        Some(Attr {
            ino,
            kind,
            size,
            mtime: node.mtime,
            live,
        })
    }

    pub fn lookup(&self, parent: Ino, name: &str) -> Option<Attr> {
        self.attr(self.tree.lookup(parent, name)?)
    }

    /// Children of a directory, sorted by name.
    pub fn children(&self, ino: Ino) -> Option<&[(String, Ino)]> {
        match &self.tree.get(ino)?.content {
            Content::Dir(c) => Some(c),
            _ => None,
        }
    }

    /// Reads up to `size` bytes at `offset` and hands them to `out` (one
    /// call; an empty slice at or past the end of the file).
    pub fn read<R>(
        &self,
        ino: Ino,
        offset: u64,
        size: usize,
        out: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, ReadError> {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let out = |bytes: &[u8]| {
            self.counters
                .bytes_served
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            out(bytes)
        };
        let node = self.tree.get(ino).ok_or(ReadError::NotFound)?;
        let result = match &node.content {
            Content::Dir(_) => Err(ReadError::IsDir),
            Content::Bytes(b) => Ok(out(slice_at(b, offset, size))),
            Content::Stats => Ok(out(slice_at(self.stats_text().as_bytes(), offset, size))),
            &Content::View { it, file, id } => self.read_view(it, file, id, offset, size, out),
        };
        if let Err(ReadError::Source(e)) = &result {
            self.counters.read_errors.fetch_add(1, Ordering::Relaxed);
            log::error!("{}: {e}", self.tree.path(ino));
        }
        result
    }

    /// A view file's bytes: whole blocks nobody cached straight from the
    /// engine, everything else through the block cache.
    fn read_view<R>(
        &self,
        it: usize,
        file: usize,
        id: u32,
        offset: u64,
        size: usize,
        out: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, ReadError> {
        let vf = &self.plan.iterations[it].files[file];
        let end = vf.size.min(offset.saturating_add(size as u64));
        if offset >= end {
            return Ok(out(&[]));
        }
        let n = (end - offset) as usize;
        if self.zeros {
            return Ok(if n <= ZEROS.len() {
                out(&ZEROS[..n])
            } else {
                out(&vec![0u8; n])
            });
        }
        let bs = self.block_size;
        let first = offset / bs;
        let last = (end - 1) / bs;
        let whole_blocks = offset.is_multiple_of(bs) && (end.is_multiple_of(bs) || end == vf.size);
        if whole_blocks && !(first..=last).any(|b| self.cache.contains((id, b))) {
            // A request for whole blocks nobody has cached: the sequential
            // reader's case (1 MiB readahead requests). The kernel keeps
            // these pages itself, so caching them too would only cost
            // memory, and fresh cache memory is what costs most here (first
            // touch of a page). Compute into this thread's reused buffer.
            return SCRATCH.with_borrow_mut(|scratch| {
                if scratch.len() < n {
                    scratch.resize(n, 0);
                }
                self.read_source(it, vf, offset, &mut scratch[..n])?;
                self.counters.direct_reads.fetch_add(1, Ordering::Relaxed);
                Ok(out(&scratch[..n]))
            });
        }
        let block = |b: u64| {
            let start = b * bs;
            let len = bs.min(vf.size - start) as usize;
            self.cache.get((id, b), len, |buf| {
                self.read_source(it, vf, start, buf).map(|_| ())
            })
        };
        if first == last {
            // The common case: reply straight from the cached block.
            let data = block(first)?;
            let lo = (offset - first * bs) as usize;
            return Ok(out(&data[lo..lo + n]));
        }
        let mut buf = Vec::with_capacity(n);
        for b in first..=last {
            let data = block(b)?;
            let lo = offset.max(b * bs) - b * bs;
            let hi = end.min((b + 1) * bs) - b * bs;
            buf.extend_from_slice(&data[lo as usize..hi as usize]);
        }
        Ok(out(&buf))
    }

    /// The engine's read, with this thread's spans released now and then.
    fn read_source(
        &self,
        it: usize,
        vf: &crate::reshard::plan::VirtualFile,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Served, SourceFault> {
        let me = self.id;
        TOUCHED.with_borrow_mut(|(held_by, held_it, touched)| {
            if *held_by != me {
                // Spans of another server (tests run several per thread):
                // not ours to release; forget them.
                *touched = Touched::default();
                *held_by = me;
                *held_it = it;
            } else if *held_it != it {
                touched.release(&self.plan.source.iterations[*held_it]);
                *held_it = it;
            }
            let source = &self.plan.source.iterations[it];
            let got = read_file(source, vf, offset, buf, touched);
            if got.is_err() || touched.span_bytes() >= RELEASE_EVERY {
                touched.release(source);
            }
            if let Ok(g) = &got {
                self.counters
                    .source_bytes_read
                    .fetch_add(g.from_source as u64, Ordering::Relaxed);
            }
            got
        })
    }

    /// `.reshardfs/stats`: one `key: value` per line.
    pub fn stats_text(&self) -> String {
        let c = &self.counters;
        let cache = self.cache.stats();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "pid: {}\nuptime_s: {:.1}\nreads: {}\ndirect_reads: {}\nbytes_served: {}\nsource_bytes_read: {}\nread_errors: {}\ninternal_errors: {}\ncache_hits: {}\ncache_misses: {}\ncache_bytes: {}\ncache_capacity: {}\ncache_blocks: {}\nblock_size: {}\n",
            std::process::id(),
            self.started.elapsed().as_secs_f64(),
            get(&c.reads),
            get(&c.direct_reads),
            get(&c.bytes_served),
            get(&c.source_bytes_read),
            get(&c.read_errors),
            get(&c.internal_errors),
            cache.hits,
            cache.misses,
            cache.bytes,
            cache.capacity,
            cache.blocks,
            self.block_size,
        )
    }
}

/// `b[offset..offset+size]`, clipped to `b`.
pub fn slice_at(b: &[u8], offset: u64, size: usize) -> &[u8] {
    let start = (offset.min(b.len() as u64)) as usize;
    let end = start.saturating_add(size).min(b.len());
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::Source;
    use crate::mount::tree::ROOT;
    use crate::reshard::target::TargetSpec;
    use std::path::Path;

    fn server(cache: u64) -> Server {
        let plan = Plan::build(
            Source::open(Path::new("tests/fixtures/tp4-f32")).unwrap(),
            TargetSpec::Mesh {
                sizes: vec![("tp".into(), 2)],
                pp: None,
            },
        )
        .unwrap();
        Server::new(plan, cache)
    }

    #[test]
    fn reads_match_the_engine_at_any_offset_and_count() {
        let s = server(1 << 20);
        let it = s.tree().lookup(ROOT, "iteration_00000005").unwrap();
        let f = s
            .tree()
            .lookup(it, "model-0000001-0000002.safetensors")
            .unwrap();
        let size = s.attr(f).unwrap().size;
        let whole = s.read(f, 0, size as usize + 10, |b| b.to_vec()).unwrap();
        assert_eq!(whole.len() as u64, size);
        for (off, len) in [(0, 8), (7, 1000), (size - 3, 100), (size, 5), (size + 9, 5)] {
            let part = s.read(f, off, len, |b| b.to_vec()).unwrap();
            let lo = off.min(size) as usize;
            let hi = (off as usize + len).min(size as usize);
            assert_eq!(part, whole[lo..hi.max(lo)]);
        }
        let stats = s.stats_text();
        assert!(stats.contains("read_errors: 0"), "{stats}");
        assert!(stats.contains(&format!("pid: {}", std::process::id())));
    }

    #[test]
    fn block_sizes_follow_the_budget() {
        assert_eq!(block_size_for(1 << 30), MAX_BLOCK_SIZE);
        assert_eq!(block_size_for(64 << 10), 16 << 10);
        assert_eq!(block_size_for(100_000), 16 << 10);
        assert_eq!(block_size_for(0), 4096);
    }

    #[test]
    fn small_caches_still_serve_and_count() {
        let s = server(4096);
        let it = s.tree().lookup(ROOT, "iteration_00000005").unwrap();
        let f = s
            .tree()
            .lookup(it, "model-0000000-0000002.safetensors")
            .unwrap();
        let a = s.read(f, 100, 5000, |b| b.to_vec()).unwrap();
        let b = s.read(f, 100, 5000, |b| b.to_vec()).unwrap();
        assert_eq!(a, b);
        assert!(s.read(it, 0, 1, |_| ()).is_err());
        assert!(matches!(
            s.read(9999, 0, 1, |_| ()),
            Err(ReadError::NotFound)
        ));
    }
}
