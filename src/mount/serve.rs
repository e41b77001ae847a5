//! Serving a view: attributes and bytes of every node of the tree, through
//! the block cache, with live counters. No FUSE types here: the FUSE adapter
//! (`fs`) only translates, and this is tested without a mount.

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Instant, SystemTime};

use crate::checkpoint::source::Iteration;
use crate::mount::cache::BlockCache;
use crate::mount::prefetch::{Job, PrefetchConfig, Sequential, Workers, source_spans};
use crate::mount::tree::{Content, Ino, Tree};
use crate::reshard::engine::{Piece, Served, SourceFault, Touched, check_files, gather, read_file};
use crate::reshard::plan::Plan;

/// View bytes are computed and cached in blocks of at most this size: large
/// enough that a sequential reader computes each block once for several
/// kernel requests, small enough that a random reader wastes little.
pub const MAX_BLOCK_SIZE: u64 = 1 << 20;

/// A request answered from the source maps ([`gather`]) has at most this
/// many pieces, and pieces of [`MIN_PIECE`] bytes on average at least: the
/// kernel takes up to 1024 slices in one `writev`, and for narrower pieces
/// (a column split into 1 KiB rows) gathering them by copying is cheaper
/// than handing the kernel hundreds of slices that each start a page.
/// Two more are allowed for the partial pieces at a request's ends: a 1 MiB
/// request into a column split of 4 KiB rows (Qwen3's `linear_proj` at
/// hidden 4096, tp=2) starts mid-row and has 257 pieces, and without the
/// allowance every such request fell back to a copy (120 of Q1's 1986).
const MAX_PIECES: usize = 256;
const MIN_PIECE: usize = 4096;
const END_PIECES: usize = 2;

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
    /// Per request thread: the pieces of a request answered from the maps.
    static PIECES: std::cell::RefCell<Vec<Piece>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per request thread: source spans read and not yet released, with the
    /// server and iteration they belong to.
    static TOUCHED: std::cell::RefCell<(usize, usize, Touched)> =
        std::cell::RefCell::new((0, 0, Touched::default()));
}

/// Source spans a request thread may keep mapped before releasing them
/// (counted in the 2 MiB units the kernel maps): releasing after every 1 MiB
/// block cost ~12% of a cold read in TLB shootdowns. Request threads and
/// prefetch workers (4 by default) each hold up to this much, so it is kept
/// at 8 MiB: at 16 MiB the 16-reader load test's daemon reached 99-111 MiB
/// against its 96 MiB bound on a loaded machine (60-64 MiB when quiet).
const RELEASE_EVERY: u64 = 8 << 20;

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    /// Reads of whole blocks computed straight into a scratch buffer or
    /// answered from the maps.
    direct_reads: AtomicU64,
    /// Of those, answered from the maps (no copy in the daemon).
    mapped_reads: AtomicU64,
    bytes_served: AtomicU64,
    source_bytes_read: AtomicU64,
    read_errors: AtomicU64,
    /// Requests that panicked (bugs), answered EIO by the FUSE adapter.
    internal_errors: AtomicU64,
    /// Source bytes the prefetch workers asked the kernel to read ahead
    /// (`MADV_WILLNEED`; sources on FUSE and network mounts).
    prefetch_advised: AtomicU64,
}

/// Mount-wide state the request threads and the prefetch workers share.
struct Core {
    plan: Plan,
    tree: Tree,
    cache: BlockCache,
    counters: Counters,
    started: Instant,
    block_size: u64,
    zeros: bool,
    /// Bound of a reader's prefetch window in bytes (0: no prefetch).
    window: u64,
    /// Tests: work ahead even when the source is in the page cache.
    ahead_when_resident: bool,
    /// Prefetch also advises the source spans ahead (`MADV_WILLNEED`):
    /// some source file is on a FUSE or network mount (see `Server::ahead`).
    /// Known once the files are open, so set at mount, not per read.
    advise_ahead: bool,
    /// Distinguishes servers in per-thread state (never reused).
    id: usize,
}

/// What an open handle carries.
enum Handle {
    /// A live file, rendered once at open so that one reader's several
    /// reads see one consistent text.
    Snapshot(Arc<[u8]>),
    /// A view file: where its reader is, for prefetch.
    View(Arc<Sequential>),
}

/// A handle returned by [`Server::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// The content changes while mounted: the kernel must not cache it.
    pub direct_io: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("no such file")]
    NotFound,
    #[error("is a directory")]
    IsDir,
    #[error("not a directory")]
    NotDir,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: Ino,
    /// Where the listing resumes after this entry.
    pub next: u64,
    pub kind: NodeKind,
    pub name: String,
}

/// Serves a view: attributes, listings, open handles and bytes. Everything
/// the FUSE adapter needs, so that the adapter holds no state.
pub struct Server {
    core: Arc<Core>,
    /// Open handles. Read-locked on every read (shared, never contended by
    /// other reads); written only at open and release.
    handles: RwLock<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    prefetch: PrefetchConfig,
    /// Started on the first open: a server that is only inspected (tests,
    /// `--serve-zeros`) starts no threads.
    workers: OnceLock<Option<Workers>>,
}

/// Benchmarking knob, `RESHARDFS_PREFETCH=advise|both|always` (default:
/// compute blocks ahead, and advise the source spans too where the source
/// is on a FUSE or network mount): 1 = only advise the source spans
/// (`MADV_WILLNEED`), 3 = advise and compute whatever the storage, 4 =
/// compute even when the source is in the page cache. See `Server::ahead`
/// for the measurements.
static PREFETCH_MODE: std::sync::LazyLock<u8> =
    std::sync::LazyLock::new(|| match std::env::var("RESHARDFS_PREFETCH").as_deref() {
        Ok("advise") => 1,
        Ok("both") => 3,
        // Tests: compute ahead even when the source is in the page cache
        // (the integration tests' sources always are).
        Ok("always") => 4,
        _ => 2,
    });

/// What `--serve-zeros` replies with: no allocation, no computation.
static ZEROS: [u8; MAX_BLOCK_SIZE as usize] = [0; MAX_BLOCK_SIZE as usize];

impl Server {
    /// For benchmarks: view files keep their names and sizes but read as
    /// zeros, so a run measures FUSE itself with zero-cost data.
    pub fn serve_zeros(mut self) -> Self {
        if let Some(core) = Arc::get_mut(&mut self.core) {
            core.zeros = true;
            core.window = 0;
        }
        self
    }

    /// Tests: prefetch as if the source were never in the page cache.
    #[cfg(test)]
    fn always_ahead(mut self) -> Self {
        if let Some(core) = Arc::get_mut(&mut self.core) {
            core.ahead_when_resident = true;
        }
        self
    }

    /// A server with the default prefetch ([`PrefetchConfig::default`]).
    pub fn new(plan: Plan, cache_bytes: u64) -> Server {
        Server::with_prefetch(plan, cache_bytes, PrefetchConfig::default())
    }

    pub fn with_prefetch(plan: Plan, cache_bytes: u64, prefetch: PrefetchConfig) -> Server {
        let tree = Tree::build(&plan);
        let block_size = block_size_for(cache_bytes);
        // Blocks computed ahead and not yet read never take more than half
        // the budget: the rest stays for random readers.
        let window = if prefetch.workers == 0 {
            0
        } else {
            prefetch.window.min(cache_bytes / 2)
        };
        let window = if window < block_size { 0 } else { window };
        let advise_ahead = plan
            .source
            .iterations
            .iter()
            .flat_map(|it| &it.files)
            .any(|f| f.advice_reads_ahead());
        Server {
            core: Arc::new(Core {
                plan,
                tree,
                cache: BlockCache::new(cache_bytes),
                counters: Counters::default(),
                started: Instant::now(),
                block_size,
                zeros: false,
                window,
                ahead_when_resident: false,
                advise_ahead,
                id: {
                    static NEXT: std::sync::atomic::AtomicUsize =
                        std::sync::atomic::AtomicUsize::new(1);
                    NEXT.fetch_add(1, Ordering::Relaxed)
                },
            }),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            prefetch,
            workers: OnceLock::new(),
        }
    }

    /// Counts a request that panicked (see `fuse::GuardedFs`).
    pub fn count_internal_error(&self) {
        self.core
            .counters
            .internal_errors
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The source's canonical path (a mount must not hide it).
    pub fn source_path(&self) -> &std::path::Path {
        &self.core.plan.source.path
    }

    pub fn tree(&self) -> &Tree {
        &self.core.tree
    }

    pub fn attr(&self, ino: Ino) -> Option<Attr> {
        self.core.attr(ino)
    }

    pub fn lookup(&self, parent: Ino, name: &str) -> Option<Attr> {
        self.attr(self.core.tree.lookup(parent, name)?)
    }

    /// Children of a directory, sorted by name.
    pub fn children(&self, ino: Ino) -> Option<&[(String, Ino)]> {
        match &self.core.tree.get(ino)?.content {
            Content::Dir(c) => Some(c),
            _ => None,
        }
    }

    /// The listing of directory `ino` from position `offset`: `.`, `..`,
    /// then the children by name. Offsets are positions in this fixed
    /// listing: the kernel resumes a listing by handing back the `next` of
    /// the last entry it took.
    pub fn readdir(&self, ino: Ino, offset: u64) -> Result<Vec<DirEntry>, OpenError> {
        let tree = &self.core.tree;
        let node = tree.get(ino).ok_or(OpenError::NotFound)?;
        let Content::Dir(children) = &node.content else {
            return Err(OpenError::NotDir);
        };
        let dots = [(".", ino), ("..", node.parent)];
        let entries = dots
            .iter()
            .map(|&(n, i)| (n, i, NodeKind::Dir))
            .chain(children.iter().map(|(n, i)| {
                // From the tree: attr() would render the counters file.
                let kind = if tree.is_dir(*i) {
                    NodeKind::Dir
                } else {
                    NodeKind::File
                };
                (n.as_str(), *i, kind)
            }));
        Ok(entries
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .map(|(pos, (name, ino, kind))| DirEntry {
                ino,
                next: pos as u64 + 1,
                kind,
                name: name.to_string(),
            })
            .collect())
    }

    /// Opens a file for reading.
    pub fn open(&self, ino: Ino) -> Result<Opened, OpenError> {
        let a = self.attr(ino).ok_or(OpenError::NotFound)?;
        if a.kind == NodeKind::Dir {
            return Err(OpenError::IsDir);
        }
        let handle = if a.live {
            Handle::Snapshot(Arc::from(self.core.stats_text().into_bytes()))
        } else if self.core.window > 0
            && matches!(
                self.core.tree.get(ino).map(|n| &n.content),
                Some(Content::View { .. })
            )
        {
            Handle::View(Arc::default())
        } else {
            // Fixed bytes: nothing to remember.
            return Ok(Opened {
                fh: 0,
                direct_io: false,
            });
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, handle);
        Ok(Opened {
            fh,
            direct_io: a.live,
        })
    }

    /// Forgets a handle (unknown handles are ignored).
    pub fn release(&self, fh: u64) {
        if fh != 0 {
            let gone = self
                .handles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&fh);
            if let Some(Handle::View(seq)) = gone {
                seq.close();
            }
        }
    }

    /// Open handles (for tests and stats).
    pub fn open_handles(&self) -> usize {
        self.handles.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Reads through handle `fh` from [`Server::open`]: a live file's
    /// snapshot, or a view file with prefetch for sequential readers.
    pub fn read_handle<R>(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        size: usize,
        out: impl FnOnce(&[IoSlice<'_>]) -> R,
    ) -> Result<R, ReadError> {
        enum Found {
            Snapshot(Arc<[u8]>),
            View(Arc<Sequential>),
            None,
        }
        let found = if fh == 0 {
            Found::None
        } else {
            match self
                .handles
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&fh)
            {
                Some(Handle::Snapshot(t)) => Found::Snapshot(t.clone()),
                Some(Handle::View(s)) => Found::View(s.clone()),
                None => Found::None,
            }
        };
        match found {
            Found::Snapshot(text) => {
                self.core.counters.reads.fetch_add(1, Ordering::Relaxed);
                Ok(out(&[IoSlice::new(slice_at(&text, offset, size))]))
            }
            Found::View(seq) => self.core.read(
                ino,
                offset,
                size,
                Some(&seq),
                || self.ahead(ino, offset, size, &seq),
                out,
            ),
            Found::None => self.read(ino, offset, size, out),
        }
    }

    /// Reads up to `size` bytes at `offset` and hands them to `out` (one
    /// call; an empty slice at or past the end of the file). No handle: no
    /// prefetch.
    pub fn read<R>(
        &self,
        ino: Ino,
        offset: u64,
        size: usize,
        out: impl FnOnce(&[IoSlice<'_>]) -> R,
    ) -> Result<R, ReadError> {
        self.core.read(ino, offset, size, None, || (), out)
    }

    /// Tells the reader's sequential state about a read and queues the
    /// work ahead of it, if any.
    fn ahead(&self, ino: Ino, offset: u64, size: usize, seq: &Arc<Sequential>) {
        let core = &self.core;
        let Some(Content::View { it, file, id }) = core.tree.get(ino).map(|n| &n.content) else {
            return;
        };
        let vf = &core.plan.iterations[*it].files[*file];
        let end = vf.size.min(offset.saturating_add(size as u64));
        let Some(blocks) = seq.on_read(offset, end, vf.size, core.block_size, core.window) else {
            return;
        };
        // Work ahead only for bytes nobody has asked the storage for yet.
        // Source already in the page cache (or being read into it, see
        // `RankFile::is_resident`): nothing more to ask for, and the
        // reader's own computation into its hot per-thread buffer is the
        // cheapest there is (computing ahead on another core cost ~40% more
        // daemon CPU per byte, in cache misses).
        let bs = core.block_size;
        let source = &core.plan.source.iterations[*it];
        let mut resident = !core.ahead_when_resident && *PREFETCH_MODE != 4;
        source_spans(
            source,
            vf,
            blocks.start * bs,
            vf.size.min(blocks.end * bs),
            |f, s, e| {
                resident = resident && source.files[f].is_resident(s, e - s);
            },
        );
        if resident {
            return;
        }
        // The workers computing the blocks keeps a local disk busy ahead of
        // the reader: their page faults read ahead, a window of several MiB
        // each. Advising the spans as well (MADV_WILLNEED) only cost there:
        // a column-split view from the throttled image (bench section 12)
        // read in 3.0 s with advice alone, 1.6 s with advice and computing,
        // 1.5 s computing alone (2 runs each); advice 128 KiB at a time
        // read the row-split view in 4.3 s instead of 1.5 (5 runs: small
        // I/Os under an IOPS limit). On a FUSE or network mount a fault
        // reads one 128 KiB window and waits: there the advice, a window
        // per call, is what keeps the server busy ahead. sshfs `--unshard`,
        // ratio to `cat` (5 runs): computing 0.82x, advice 0.93x, both
        // 1.01x, neither 0.81x. `RESHARDFS_PREFETCH=advise|both` forces it.
        let (advise, compute) = match *PREFETCH_MODE {
            1 => (true, false),
            3 => (true, true),
            _ => (core.advise_ahead, true),
        };
        let Some(workers) = self.workers() else {
            return;
        };
        let job = |blocks, advise| Job {
            it: *it,
            file: *file,
            id: *id,
            blocks,
            advise,
            reader: seq.clone(),
        };
        // The advice first: the storage starts on the whole range at once
        // while the workers compute block by block.
        if advise {
            workers.submit(job(blocks.clone(), true));
        }
        if compute {
            for b in blocks {
                if !workers.submit(job(b..b + 1, false)) {
                    break;
                }
            }
        }
    }

    fn workers(&self) -> Option<&Workers> {
        self.workers
            .get_or_init(|| {
                (self.core.window > 0 && self.prefetch.workers > 0).then(|| {
                    let core = self.core.clone();
                    // Enough queue for every worker's share of a full window
                    // plus the advice jobs.
                    let queue = 2 * (core.window / core.block_size) as usize + 16;
                    Workers::start(
                        self.prefetch.workers,
                        queue,
                        Arc::new(move |job: Job| core.work(job)),
                    )
                })
            })
            .as_ref()
    }

    /// `.reshardfs/stats`: one `key: value` per line.
    pub fn stats_text(&self) -> String {
        self.core.stats_text()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Stop the workers (they hold the core) before the rest goes.
        drop(self.workers.take());
    }
}

impl Core {
    fn attr(&self, ino: Ino) -> Option<Attr> {
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

    /// A read; `before` runs once the node is known to be a view file,
    /// before its bytes are computed (where prefetch is queued).
    fn read<R>(
        &self,
        ino: Ino,
        offset: u64,
        size: usize,
        seq: Option<&Sequential>,
        before: impl FnOnce(),
        out: impl FnOnce(&[IoSlice<'_>]) -> R,
    ) -> Result<R, ReadError> {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let out = |bytes: &[IoSlice<'_>]| {
            let n: usize = bytes.iter().map(|b| b.len()).sum();
            self.counters
                .bytes_served
                .fetch_add(n as u64, Ordering::Relaxed);
            out(bytes)
        };
        let node = self.tree.get(ino).ok_or(ReadError::NotFound)?;
        let result = match &node.content {
            Content::Dir(_) => Err(ReadError::IsDir),
            Content::Bytes(b) => Ok(out(&[IoSlice::new(slice_at(b, offset, size))])),
            Content::Stats => Ok(out(&[IoSlice::new(slice_at(
                self.stats_text().as_bytes(),
                offset,
                size,
            ))])),
            &Content::View { it, file, id } => {
                before();
                self.read_view(it, file, id, offset, size, seq.is_some(), out)
            }
        };
        if let Err(ReadError::Source(e)) = &result {
            self.counters.read_errors.fetch_add(1, Ordering::Relaxed);
            log::error!("{}: {e}", self.tree.path(ino));
        }
        result
    }

    /// A view file's bytes: whole blocks nobody cached straight from the
    /// engine, everything else through the block cache. `sequential`: the
    /// read comes through a handle with prefetch, so whole blocks it takes
    /// from the cache (prefetched ones) leave it: the kernel's page cache
    /// holds them now.
    #[allow(clippy::too_many_arguments)]
    fn read_view<R>(
        &self,
        it: usize,
        file: usize,
        id: u32,
        offset: u64,
        size: usize,
        sequential: bool,
        out: impl FnOnce(&[IoSlice<'_>]) -> R,
    ) -> Result<R, ReadError> {
        let vf = &self.plan.iterations[it].files[file];
        let end = vf.size.min(offset.saturating_add(size as u64));
        if offset >= end {
            return Ok(out(&[]));
        }
        let n = (end - offset) as usize;
        if self.zeros {
            return Ok(if n <= ZEROS.len() {
                out(&[IoSlice::new(&ZEROS[..n])])
            } else {
                out(&[IoSlice::new(&vec![0u8; n])])
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
            // touch of a page). When the range is a few pieces of the
            // header and the source maps, reply with those (no copy in the
            // daemon at all); else compute into this thread's buffer.
            let source = &self.plan.source.iterations[it];
            let max = (n / MIN_PIECE).clamp(1, MAX_PIECES) + END_PIECES;
            if PIECES.with_borrow_mut(|p| gather(source, vf, offset, n as u64, max, p).is_some()) {
                return self.reply_from_pieces(it, vf, out);
            }
            return SCRATCH.with_borrow_mut(|scratch| {
                if scratch.len() < n {
                    scratch.resize(n, 0);
                }
                self.read_source(it, vf, offset, &mut scratch[..n])?;
                self.counters.direct_reads.fetch_add(1, Ordering::Relaxed);
                Ok(out(&[IoSlice::new(&scratch[..n])]))
            });
        }
        let block = |b: u64| {
            let start = b * bs;
            let len = bs.min(vf.size - start) as usize;
            let got = self.cache.get((id, b), len, |buf| {
                self.read_source(it, vf, start, buf).map(|_| ())
            });
            if sequential && whole_blocks {
                self.cache.remove((id, b));
            }
            got
        };
        if first == last {
            // The common case: reply straight from the cached block.
            let data = block(first)?;
            let lo = (offset - first * bs) as usize;
            let r = out(&[IoSlice::new(&data[lo..lo + n])]);
            if sequential && whole_blocks {
                self.cache.recycle(data);
            }
            return Ok(r);
        }
        let mut buf = Vec::with_capacity(n);
        for b in first..=last {
            let data = block(b)?;
            let lo = offset.max(b * bs) - b * bs;
            let hi = end.min((b + 1) * bs) - b * bs;
            buf.extend_from_slice(&data[lo as usize..hi as usize]);
        }
        Ok(out(&[IoSlice::new(&buf)]))
    }

    /// A prefetch worker's job.
    fn work(&self, job: Job) {
        // Skipped if the handle was released or the reader has passed
        // these blocks already.
        let bs = self.block_size;
        if job.reader.is_closed() || job.reader.position() >= job.blocks.end * bs {
            return;
        }
        let vf = &self.plan.iterations[job.it].files[job.file];
        let source = &self.plan.source.iterations[job.it];
        if job.advise {
            // Block by block, so the storage gets the requests in the order
            // the reader needs them: one call for the whole range asked for
            // each source file's part of the range in turn, and a reader of
            // a column split (every block from 4 files) then waited behind
            // the whole window of the first file (throttled image, bench
            // section 12: 2.5-3.0 s instead of 1.6 s).
            for b in job.blocks {
                let start = b * bs;
                if start >= vf.size {
                    break;
                }
                source_spans(source, vf, start, vf.size.min(start + bs), |f, s, e| {
                    source.files[f].will_need(s, e - s);
                    self.counters
                        .prefetch_advised
                        .fetch_add(e - s, Ordering::Relaxed);
                });
            }
            return;
        }
        for b in job.blocks {
            let start = b * bs;
            if start >= vf.size {
                return;
            }
            let len = bs.min(vf.size - start);
            // Never more than half the budget in blocks nobody read yet.
            if self.cache.pending_prefetch() + len > self.cache.capacity() / 2 {
                return;
            }
            let r = self.cache.prefetch((job.id, b), len as usize, |buf| {
                self.read_source(job.it, vf, start, buf).map(|_| ())
            });
            if let Err(e) = r {
                // Not counted as a read error: no reader asked yet; the
                // reader's own read fails and counts.
                log::debug!("prefetch: {e}");
                return;
            }
        }
    }

    /// Replies with the pieces [`gather`] left in this thread's `PIECES`:
    /// slices of the header and of the source maps, which the kernel copies
    /// into the reader's page cache with one `writev`, the daemon copying
    /// nothing (a row split's slices, a Hugging Face part, the rows of a
    /// fused tensor: most of a view's bytes). Each source file is checked
    /// first (still the one planned, not truncated under the map); a
    /// truncation racing the kernel's copy faults in the kernel, which then
    /// fails the read with EIO, so no zeros are ever served. The pages the
    /// copy mapped are released with this thread's other spans.
    fn reply_from_pieces<R>(
        &self,
        it: usize,
        vf: &crate::reshard::plan::VirtualFile,
        out: impl FnOnce(&[IoSlice<'_>]) -> R,
    ) -> Result<R, ReadError> {
        let source = &self.plan.source.iterations[it];
        PIECES.with_borrow(|pieces| {
            let spans = || {
                pieces.iter().filter_map(|p| match *p {
                    Piece::Source { file, at, len } => Some((file, at, len)),
                    Piece::Header { .. } => None,
                })
            };
            check_files(source, spans().map(|(file, _, _)| file))?;
            let from_source: u64 = spans().map(|(_, _, len)| len).sum();
            let slices: Vec<IoSlice<'_>> = pieces
                .iter()
                .map(|p| IoSlice::new(p.bytes(source, vf)))
                .collect();
            let r = out(&slices);
            self.counters.direct_reads.fetch_add(1, Ordering::Relaxed);
            self.counters.mapped_reads.fetch_add(1, Ordering::Relaxed);
            self.counters
                .source_bytes_read
                .fetch_add(from_source, Ordering::Relaxed);
            self.with_touched(it, |touched, source| {
                for (file, at, len) in spans() {
                    touched.add(file, at, at + len);
                }
                if touched.span_bytes() >= RELEASE_EVERY {
                    touched.release(source);
                }
            });
            Ok(r)
        })
    }

    /// Runs `f` with this thread's not-yet-released source spans, made
    /// this server's and iteration `it`'s first (spans of another server
    /// are forgotten: tests run several per thread; spans of another
    /// iteration are released).
    fn with_touched<R>(&self, it: usize, f: impl FnOnce(&mut Touched, &Iteration) -> R) -> R {
        let me = self.id;
        TOUCHED.with_borrow_mut(|(held_by, held_it, touched)| {
            if *held_by != me {
                *touched = Touched::default();
                *held_by = me;
                *held_it = it;
            } else if *held_it != it {
                touched.release(&self.plan.source.iterations[*held_it]);
                *held_it = it;
            }
            f(touched, &self.plan.source.iterations[it])
        })
    }

    /// The engine's read, with this thread's spans released now and then.
    fn read_source(
        &self,
        it: usize,
        vf: &crate::reshard::plan::VirtualFile,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Served, SourceFault> {
        self.with_touched(it, |touched, source| {
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
            "pid: {}\nuptime_s: {:.1}\nreads: {}\ndirect_reads: {}\nmapped_reads: {}\nbytes_served: {}\nsource_bytes_read: {}\nread_errors: {}\ninternal_errors: {}\ncache_hits: {}\ncache_misses: {}\ncache_bytes: {}\ncache_capacity: {}\ncache_blocks: {}\nblock_size: {}\nprefetch_window: {}\nprefetch_blocks: {}\nprefetch_hits: {}\nprefetch_wasted: {}\nprefetch_advised: {}\n",
            std::process::id(),
            self.started.elapsed().as_secs_f64(),
            get(&c.reads),
            get(&c.direct_reads),
            get(&c.mapped_reads),
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
            self.window,
            cache.prefetch_blocks,
            cache.prefetch_hits,
            cache.prefetch_wasted,
            get(&c.prefetch_advised),
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

    /// A reply's slices, one after the other.
    fn joined(slices: &[IoSlice<'_>]) -> Vec<u8> {
        slices.iter().flat_map(|s| s.iter()).copied().collect()
    }
    use crate::checkpoint::source::Source;
    use crate::mount::tree::{INFO_DIR, ROOT};
    use crate::reshard::target::TargetSpec;
    use safetensors::SafeTensors;
    use std::collections::BTreeMap;
    use std::path::Path;

    fn plan(src: &str, sizes: &[(&str, u64)], pp: Option<u64>) -> Plan {
        Plan::build(
            Source::open(Path::new(src)).unwrap(),
            TargetSpec::Mesh {
                sizes: sizes.iter().map(|&(a, n)| (a.to_string(), n)).collect(),
                pp,
            },
        )
        .unwrap()
    }

    fn server(cache: u64) -> Server {
        Server::new(plan("tests/fixtures/tp4-f32", &[("tp", 2)], None), cache)
    }

    fn view_file(s: &Server, name: &str) -> Ino {
        let it = s.tree().lookup(ROOT, "iteration_00000005").unwrap();
        s.tree().lookup(it, name).unwrap()
    }

    /// Every tensor of a safetensors file: name -> (dtype, shape, bytes).
    type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

    fn tensors(bytes: &[u8]) -> Tensors {
        SafeTensors::deserialize(bytes)
            .unwrap()
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let d = format!("{:?}", v.dtype());
                (n, (d, v.shape().to_vec(), v.data().to_vec()))
            })
            .collect()
    }

    /// The view files of every rank, read whole through `read_all`, merged
    /// per rank, must hold exactly what MindSpore Transformers' own
    /// reshard wrote for that rank (`tests/fixtures/expected/`): the
    /// reference is independent of this code.
    fn check_against_mindspore(
        s: &Server,
        dir: Ino,
        expected: &str,
        mut read_all: impl FnMut(Ino, u64) -> Vec<u8>,
    ) {
        let mut by_rank: BTreeMap<u64, Tensors> = BTreeMap::new();
        for (name, ino) in s.children(dir).unwrap() {
            if !name.ends_with(".safetensors") {
                continue;
            }
            let rank: u64 = name.rsplit('-').nth(1).unwrap().parse().unwrap();
            let size = s.attr(*ino).unwrap().size;
            let bytes = read_all(*ino, size);
            assert_eq!(bytes.len() as u64, size, "{name}");
            by_rank.entry(rank).or_default().extend(tensors(&bytes));
        }
        let dir = Path::new("tests/fixtures/expected").join(expected);
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(by_rank.len(), files, "ranks in {}", dir.display());
        for (rank, got) in by_rank {
            let want =
                tensors(&std::fs::read(dir.join(format!("rank-{rank}.safetensors"))).unwrap());
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "rank {rank}"
            );
            for (name, w) in &want {
                assert!(
                    got[name] == *w,
                    "rank {rank}: {name} differs from MindSpore's"
                );
            }
        }
    }

    /// Reads a file whole in requests of `chunk` bytes through `read`.
    fn read_in_chunks(
        size: u64,
        chunk: usize,
        mut read: impl FnMut(u64, usize) -> Vec<u8>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < size {
            let part = read(off, chunk);
            assert!(!part.is_empty(), "short read at {off} of {size}");
            off += part.len() as u64;
            out.extend(part);
        }
        assert!(read(size, chunk).is_empty(), "bytes past the end");
        out
    }

    #[test]
    fn views_hold_what_mindspore_wrote_at_any_request_size() {
        // Large and tiny caches (4 KiB blocks), request sizes that are and
        // are not multiples of the block, with and without handles.
        for cache in [1 << 20, 4096, 64 << 10] {
            let s = server(cache);
            let it = s.tree().lookup(ROOT, "iteration_00000005").unwrap();
            for chunk in [1usize << 20, 4096, 7777, 100] {
                check_against_mindspore(&s, it, "tp4-f32.tp=2", |f, size| {
                    read_in_chunks(size, chunk, |o, n| s.read(f, o, n, joined).unwrap())
                });
                check_against_mindspore(&s, it, "tp4-f32.tp=2", |f, size| {
                    let h = s.open(f).unwrap();
                    let got = read_in_chunks(size, chunk, |o, n| {
                        s.read_handle(f, h.fh, o, n, joined).unwrap()
                    });
                    s.release(h.fh);
                    got
                });
            }
            assert_eq!(s.open_handles(), 0);
            let stats = s.stats_text();
            assert!(stats.contains("read_errors: 0"), "{stats}");
            assert!(stats.contains(&format!("pid: {}", std::process::id())));
        }
    }

    #[test]
    fn gpt_with_optimizer_and_pipeline_matches_mindspore() {
        let p = plan(
            "tests/fixtures/gpt-dp2-tp2-pp2-bf16",
            &[("dp", 1), ("tp", 4)],
            Some(1),
        );
        let s = Server::new(p, 64 << 10);
        let it = s.tree().lookup(ROOT, "iteration_00000001").unwrap();
        check_against_mindspore(&s, it, "gpt-dp2-tp2-pp2-bf16.dp=1,tp=4,pp=1", |f, size| {
            let h = s.open(f).unwrap();
            let got = read_in_chunks(size, 16 << 10, |o, n| {
                s.read_handle(f, h.fh, o, n, joined).unwrap()
            });
            s.release(h.fh);
            got
        });
    }

    #[test]
    fn block_sizes_follow_the_budget() {
        assert_eq!(block_size_for(1 << 30), MAX_BLOCK_SIZE);
        assert_eq!(block_size_for(64 << 10), 16 << 10);
        assert_eq!(block_size_for(100_000), 16 << 10);
        assert_eq!(block_size_for(0), 4096);
    }

    #[test]
    fn errors_for_directories_and_unknown_nodes() {
        let s = server(4096);
        let it = s.tree().lookup(ROOT, "iteration_00000005").unwrap();
        assert!(matches!(s.read(it, 0, 1, |_| ()), Err(ReadError::IsDir)));
        assert!(matches!(
            s.read(9999, 0, 1, |_| ()),
            Err(ReadError::NotFound)
        ));
        assert_eq!(s.open(it), Err(OpenError::IsDir));
        assert_eq!(s.open(9999), Err(OpenError::NotFound));
        let f = view_file(&s, "model-0000000-0000002.safetensors");
        assert_eq!(s.readdir(f, 0), Err(OpenError::NotDir));
        assert_eq!(s.readdir(9999, 0), Err(OpenError::NotFound));
    }

    #[test]
    fn listings_resume_at_any_offset() {
        let s = server(1 << 20);
        let it = s.tree().lookup(ROOT, "iteration_00000005").unwrap();
        let all = s.readdir(it, 0).unwrap();
        let names: Vec<_> = all.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        // Hand-written: the folder as MindSpore writes a tp=2 save.
        assert_eq!(
            names,
            [
                (".", NodeKind::Dir),
                ("..", NodeKind::Dir),
                ("common.json", NodeKind::File),
                ("metadata.json", NodeKind::File),
                ("model-0000000-0000002.safetensors", NodeKind::File),
                ("model-0000001-0000002.safetensors", NodeKind::File),
            ]
        );
        assert_eq!((all[0].ino, all[1].ino), (it, ROOT));
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.next, i as u64 + 1);
            assert_eq!(s.readdir(it, e.next).unwrap(), all[i + 1..]);
        }
        assert!(s.readdir(it, 1000).unwrap().is_empty());
        let root = s.readdir(ROOT, 0).unwrap();
        assert_eq!(root[1].ino, ROOT, "the root is its own parent");
    }

    #[test]
    fn the_stats_file_is_a_snapshot_per_open() {
        let s = server(1 << 20);
        let stats = s
            .tree()
            .lookup(s.tree().lookup(ROOT, INFO_DIR).unwrap(), "stats");
        let stats = stats.unwrap();
        let h = s.open(stats).unwrap();
        assert!(h.direct_io);
        let text = |fh| s.read_handle(stats, fh, 0, 1 << 16, joined).unwrap();
        let before = text(h.fh);
        // Reads in between change the counters, not what this handle sees.
        let f = view_file(&s, "model-0000000-0000002.safetensors");
        s.read(f, 0, 100, |_| ()).unwrap();
        assert_eq!(text(h.fh), before);
        let h2 = s.open(stats).unwrap();
        assert_ne!(h2.fh, h.fh);
        assert_ne!(text(h2.fh), before);
        assert_eq!(s.open_handles(), 2);
        s.release(h.fh);
        s.release(h2.fh);
        s.release(h2.fh);
        assert_eq!(s.open_handles(), 0);
        let f = s.open(f).unwrap();
        assert!(!f.direct_io);
    }

    fn stat(s: &Server, key: &str) -> u64 {
        let text = s.stats_text();
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("{key} not in {text}"));
        line.parse().unwrap()
    }

    /// Waits (bounded) until `cond` holds: prefetch runs in other threads.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn sequential_readers_are_prefetched_for_and_random_ones_not() {
        // 64 KiB cache: 16 KiB blocks, at most 32 KiB prefetched. The
        // fixture sits in the page cache; pretend it does not.
        let s = server(64 << 10).always_ahead();
        let f = view_file(&s, "model-0000001-0000002.safetensors");
        let size = s.attr(f).unwrap().size;
        let bs = 16 << 10;
        assert!(size > 8 * bs, "fixture too small: {size}");
        let whole = s.read(f, 0, size as usize, joined).unwrap();
        let h = s.open(f).unwrap();
        let read = |b: u64| s.read_handle(f, h.fh, b * bs, bs as usize, joined).unwrap();
        assert_eq!(read(0), whole[..bs as usize]);
        assert_eq!(read(1), whole[bs as usize..2 * bs as usize]);
        // Two sequential reads: block 2 is computed ahead...
        eventually("block 2 prefetched", || stat(&s, "prefetch_blocks") >= 1);
        // ... and the reader takes it from the cache.
        assert_eq!(read(2), whole[2 * bs as usize..3 * bs as usize]);
        assert_eq!(stat(&s, "prefetch_hits"), 1);
        let mut b = 3;
        while b * bs < size {
            let got = read(b);
            let lo = (b * bs) as usize;
            assert_eq!(got, whole[lo..(lo + bs as usize).min(whole.len())]);
            b += 1;
        }
        s.release(h.fh);
        assert!(stat(&s, "cache_bytes") <= 64 << 10);
        assert_eq!(stat(&s, "read_errors"), 0);

        // The same reader with the source in the page cache (the whole
        // file was just read): no work ahead, the reader computes itself.
        let s = server(64 << 10);
        let h = s.open(f).unwrap();
        for b in 0..size.div_ceil(bs) {
            s.read_handle(f, h.fh, b * bs, bs as usize, |_| ()).unwrap();
        }
        assert_eq!(stat(&s, "prefetch_blocks"), 0);

        // A random reader through another server: nothing prefetched.
        let s = server(64 << 10).always_ahead();
        let h = s.open(f).unwrap();
        for off in [9 * bs + 5, 2 * bs, 7 * bs + 100, 100, 5 * bs, 8 * bs + 7] {
            let got = s.read_handle(f, h.fh, off, 4096, joined).unwrap();
            assert_eq!(got, whole[off as usize..off as usize + 4096]);
        }
        assert_eq!(stat(&s, "prefetch_blocks"), 0);

        // With prefetch off, handles carry nothing.
        let p = plan("tests/fixtures/tp4-f32", &[("tp", 2)], None);
        let s = Server::with_prefetch(p, 64 << 10, PrefetchConfig::off());
        let h = s.open(f).unwrap();
        assert_eq!(h.fh, 0);
        for b in 0..size.div_ceil(bs) {
            s.read_handle(f, h.fh, b * bs, bs as usize, |_| ()).unwrap();
        }
        assert_eq!(stat(&s, "prefetch_blocks"), 0);
        assert_eq!(stat(&s, "prefetch_window"), 0);
    }
}
