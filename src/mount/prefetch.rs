//! Prefetch for sequential readers of view files: when to work ahead of a
//! reader, and the workers that do it.
//!
//! A FUSE read is served one request at a time per reader: the kernel asks
//! for a block, the daemon faults in the source pages (waiting for the disk),
//! copies, replies, and only then is the next request computed. Cold, disk
//! time and copy time add up. Here, once a handle reads sequentially,
//! background workers compute the blocks after its position into the block
//! cache, where the reader's requests then find them; their page faults keep
//! the storage busy ahead of the reader. On a FUSE or network source they
//! also ask the kernel for the source spans ahead (`MADV_WILLNEED`, a
//! readahead window per call), since a fault there waits for one small
//! window at a time ([`Prefetcher::on_read`] has the measurements). From
//! an object store the advice fetches the objects' blocks ahead, and a
//! block the reader's requests will take from those blocks as they are
//! ([`Backend::in_place`]) is not computed at all.
//!
//! The window of blocks kept ahead starts at one block and doubles with every
//! sequential read up to the configured bound (so a reader that stops early
//! wastes little), and drops to nothing on a seek. It never holds more than
//! half of the cache budget in blocks nobody has read yet, so prefetch never
//! pushes the daemon past `--cache-size` and never evicts everything else.
//! Nothing is queued when the source spans ahead are already in the page
//! cache, or being read into it (`cachestat`): then the reader computing
//! into its own buffer is cheapest.
//!
//! The idea follows mountpoint-s3's prefetcher (a growing window of requests
//! in flight per open file, reset on seeks); the code is this project's own.
//! A job that panics (a bug) is caught, logged and counted as an internal
//! error; its worker carries on with the next job.

use std::any::Any;
use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use crate::checkpoint::source::Iteration;
use crate::mount::cache::BlockCache;
use crate::mount::sync::lock;
use crate::reshard::engine::SourceFault;
use crate::reshard::plan::VirtualFile;

/// Default bound of the window kept ahead of a sequential reader. Through
/// sshfs (bench section 13's setup) 4, 16 and 64 MiB read a cold tp=2 view
/// at the same speed within this machine's noise (3.6-6.1 s for 768 MiB,
/// two runs each); 16 MiB keeps 16 requests of 1 MiB in flight, enough for
/// a network filesystem's latency, and costs at most 16 MiB of cache.
pub const DEFAULT_WINDOW: u64 = 16 << 20;

/// How prefetch is set up for a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Bound of the window, in bytes; 0 turns prefetch off.
    pub window: u64,
    /// Background threads computing blocks (they mostly wait for the disk).
    pub workers: usize,
    pub mode: Mode,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            window: DEFAULT_WINDOW,
            workers: 2,
            mode: Mode::Auto,
        }
    }
}

impl PrefetchConfig {
    pub fn off() -> Self {
        PrefetchConfig {
            window: 0,
            workers: 0,
            mode: Mode::Auto,
        }
    }
}

/// What prefetch does ahead of a sequential reader. Only [`Mode::Auto`] is
/// for users; the others are for measuring and testing
/// (`RESHARDFS_PREFETCH`, read by `main`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Compute blocks ahead when their source is not in the page cache; on
    /// a FUSE or network source, also advise its spans.
    #[default]
    Auto,
    /// `advise`: only advise the source spans (`MADV_WILLNEED`).
    Advise,
    /// `both`: advise and compute, whatever the storage.
    Both,
    /// `always`: compute even when the source is in the page cache (the
    /// integration tests' sources always are).
    Always,
}

impl Mode {
    /// The environment variable that picks a mode.
    pub const ENV: &'static str = "RESHARDFS_PREFETCH";

    /// `advise`, `both` or `always`; anything else is [`Mode::Auto`].
    pub fn parse(s: &str) -> Mode {
        match s {
            "advise" => Mode::Advise,
            "both" => Mode::Both,
            "always" => Mode::Always,
            _ => Mode::Auto,
        }
    }
}

/// Per open handle: where the reader is and how far ahead work was asked.
#[derive(Debug, Default)]
pub struct Sequential {
    state: Mutex<SeqState>,
    /// The handle was released: work still queued for it is skipped.
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default, Clone, Copy)]
struct SeqState {
    /// End of the furthest read so far.
    next: u64,
    /// Sequential reads in a row.
    run: u32,
    /// Current window, in bytes (0 until the reader looks sequential).
    window: u64,
    /// Block-aligned offset up to which blocks were already asked for.
    issued: u64,
}

impl Sequential {
    /// Marks the handle released.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// End of the furthest read so far.
    pub fn position(&self) -> u64 {
        lock(&self.state).next
    }

    /// Records a read of `[offset, end)` of a file of `size` bytes and
    /// returns the blocks (of `bs` bytes) to fetch ahead now, if any.
    ///
    /// A read counts as sequential when it starts within a window of where
    /// the last one ended, either side: the kernel's readahead requests
    /// reach the daemon's threads out of order. Anything else is a seek and
    /// resets the window.
    pub fn on_read(
        &self,
        offset: u64,
        end: u64,
        size: u64,
        bs: u64,
        max_window: u64,
    ) -> Option<Range<u64>> {
        if max_window == 0 || bs == 0 {
            return None;
        }
        let mut s = lock(&self.state);
        let slack = s.window.max(2 * bs);
        let sequential = offset <= s.next.saturating_add(slack)
            && offset.saturating_add(slack) >= s.next
            && (s.run > 0 || offset == 0);
        if !sequential {
            *s = SeqState {
                next: end,
                run: 1,
                window: 0,
                issued: end.next_multiple_of(bs),
            };
            return None;
        }
        s.run = s.run.saturating_add(1);
        s.next = s.next.max(end);
        // Two reads in a row before anything is fetched: a random reader
        // that happens to start at 0 gets nothing.
        if s.run < 2 {
            return None;
        }
        s.window = if s.window == 0 {
            bs
        } else {
            s.window.saturating_mul(2)
        }
        .min(max_window.max(bs));
        let from = s.issued.max(s.next.next_multiple_of(bs));
        let to = s
            .next
            .saturating_add(s.window)
            .next_multiple_of(bs)
            .min(size.next_multiple_of(bs));
        if from >= to {
            return None;
        }
        s.issued = to;
        Some(from / bs..to / bs)
    }
}

/// Work ahead of one reader: advise the source spans of `blocks`, or
/// compute them into the cache.
#[derive(Debug, Clone)]
pub struct Job {
    pub it: usize,
    pub file: usize,
    pub id: u32,
    pub blocks: Range<u64>,
    pub advise: bool,
    /// The reader it is for: work it has already read past, or for a
    /// handle since closed, is skipped.
    pub reader: Arc<Sequential>,
}

/// A job's body, and what is done with the payload of one that panicked.
pub type Work = Arc<dyn Fn(Job) + Send + Sync>;
pub type OnPanic = Arc<dyn Fn(&Job, &(dyn Any + Send)) + Send + Sync>;

/// Background workers and the queue feeding them. Dropping it stops the
/// workers (after the jobs they hold) and waits for them.
pub struct Workers {
    tx: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` workers running `work` on each job. The queue holds a
    /// bounded number of jobs; when it is full new jobs are dropped (the
    /// reader computes those blocks itself), never waited for. A job that
    /// panics is handed to `on_panic` and its worker goes on: unguarded, a
    /// panic ended the worker for good, silently.
    pub fn start(n: usize, queue: usize, work: Work, on_panic: OnPanic) -> Workers {
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..n)
            .filter_map(|i| {
                let (rx, work, on_panic) = (rx.clone(), work.clone(), on_panic.clone());
                std::thread::Builder::new()
                    .name(format!("prefetch-{i}"))
                    .spawn(move || worker(&rx, &*work, &*on_panic))
                    .map_err(|e| log::warn!("cannot start a prefetch thread: {e}"))
                    .ok()
            })
            .collect::<Vec<_>>();
        Workers {
            tx: (!threads.is_empty()).then_some(tx),
            threads,
        }
    }

    /// Queues a job; false if the queue is full or there are no workers.
    pub fn submit(&self, job: Job) -> bool {
        match &self.tx {
            Some(tx) => match tx.try_send(job) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        }
    }
}

fn worker(
    rx: &Mutex<Receiver<Job>>,
    work: &(dyn Fn(Job) + Send + Sync),
    on_panic: &(dyn Fn(&Job, &(dyn Any + Send)) + Send + Sync),
) {
    loop {
        // The lock is held only while waiting for the next job.
        let job = match lock(rx).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let kept = job.clone();
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(job))) {
            on_panic(&kept, &*payload);
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the prefetcher needs of the server it works for.
pub trait Backend: Send + Sync + 'static {
    /// Iteration `it` of the source.
    fn source(&self, it: usize) -> &Iteration;
    /// View file `file` of iteration `it`.
    fn view_file(&self, it: usize, file: usize) -> &VirtualFile;
    fn cache(&self) -> &BlockCache;
    /// Computes the bytes of `vf` (of iteration `it`) from `start` into
    /// `buf`, as a reader's request would.
    fn compute(
        &self,
        it: usize,
        vf: &VirtualFile,
        start: u64,
        buf: &mut [u8],
    ) -> Result<(), SourceFault>;
    /// Whether a reader's request for bytes `[start, start + len)` of `vf`
    /// is answered from the object store's blocks as they are (no copy):
    /// then computing it ahead would only copy it; asking the store for
    /// those blocks (the advice) is what prepares it.
    fn in_place(&self, it: usize, vf: &VirtualFile, start: u64, len: u64) -> bool;
    /// Counts source bytes asked of the kernel ahead of a reader.
    fn count_advised(&self, bytes: u64);
    /// A job panicked (a bug): count and log it, naming `what`.
    fn internal_error(&self, what: &str, payload: &(dyn Any + Send));
}

/// A view file as the prefetcher knows it.
#[derive(Debug, Clone, Copy)]
pub struct ViewFile {
    pub it: usize,
    pub file: usize,
    /// The file's number in the block cache's keys.
    pub id: u32,
}

/// Decides what to do ahead of each sequential reader, and does it on its
/// workers (started on the first job, so a server that is only inspected
/// starts no threads).
pub struct Prefetcher {
    config: PrefetchConfig,
    /// Bound of a reader's window in bytes (0: no prefetch).
    window: u64,
    block_size: u64,
    /// Prefetch also advises the source spans ahead (`MADV_WILLNEED`):
    /// some source file is on a FUSE or network mount. Known once the
    /// files are open, so decided at mount, not per read.
    advise_ahead: bool,
    workers: OnceLock<Option<Workers>>,
}

impl Prefetcher {
    /// Prefetch for a cache of `cache_bytes` in blocks of `block_size`.
    /// Blocks computed ahead and not yet read never take more than half
    /// the budget: the rest stays for random readers.
    pub fn new(
        config: PrefetchConfig,
        cache_bytes: u64,
        block_size: u64,
        advise_ahead: bool,
    ) -> Self {
        let window = if config.workers == 0 {
            0
        } else {
            config.window.min(cache_bytes / 2)
        };
        Prefetcher {
            config,
            window: if window < block_size { 0 } else { window },
            block_size,
            advise_ahead,
            workers: OnceLock::new(),
        }
    }

    /// No prefetch at all.
    pub fn off() -> Self {
        Prefetcher::new(PrefetchConfig::off(), 0, 1, false)
    }

    /// Bound of a reader's window in bytes; 0 when prefetch is off.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Tells `seq` (the reader of `view`) about a read of `size` bytes at
    /// `offset` and queues the work ahead of it, if any.
    pub fn on_read<B: Backend>(
        &self,
        backend: &Arc<B>,
        view: ViewFile,
        seq: &Arc<Sequential>,
        offset: u64,
        size: usize,
    ) {
        let vf = backend.view_file(view.it, view.file);
        let end = vf.size.min(offset.saturating_add(size as u64));
        let bs = self.block_size;
        let Some(blocks) = seq.on_read(offset, end, vf.size, bs, self.window) else {
            return;
        };
        // Work ahead only for bytes nobody has asked the storage for yet.
        // Source already in the page cache (or being read into it, see
        // `RankFile::is_resident`): nothing more to ask for, and the
        // reader's own computation into its hot per-thread buffer is the
        // cheapest there is (computing ahead on another core cost ~40% more
        // daemon CPU per byte, in cache misses).
        let source = backend.source(view.it);
        let mut resident = self.config.mode != Mode::Always;
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
        // 1.01x, neither 0.81x.
        let (advise, compute) = match self.config.mode {
            Mode::Advise => (true, false),
            Mode::Both => (true, true),
            Mode::Auto | Mode::Always => (self.advise_ahead, true),
        };
        let Some(workers) = self.workers(backend) else {
            return;
        };
        let job = |blocks, advise| Job {
            it: view.it,
            file: view.file,
            id: view.id,
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

    fn workers<B: Backend>(&self, backend: &Arc<B>) -> Option<&Workers> {
        self.workers
            .get_or_init(|| {
                (self.window > 0 && self.config.workers > 0).then(|| {
                    // Enough queue for every worker's share of a full window
                    // plus the advice jobs.
                    let queue = 2 * (self.window / self.block_size) as usize + 16;
                    let bs = self.block_size;
                    let (b, b2) = (backend.clone(), backend.clone());
                    Workers::start(
                        self.config.workers,
                        queue,
                        Arc::new(move |job: Job| run(&*b, bs, job)),
                        Arc::new(move |job: &Job, payload: &(dyn Any + Send)| {
                            let vf = b2.view_file(job.it, job.file);
                            let what = format!(
                                "prefetch of {} blocks {}..{}",
                                vf.name, job.blocks.start, job.blocks.end
                            );
                            b2.internal_error(&what, payload);
                        }),
                    )
                })
            })
            .as_ref()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Stop the workers (they hold the backend) first.
        drop(self.workers.take());
    }
}

/// A worker's job: advise the source spans of the job's blocks, or compute
/// them into the cache.
fn run(backend: &dyn Backend, bs: u64, job: Job) {
    // Skipped if the handle was released or the reader has passed these
    // blocks already.
    if job.reader.is_closed() || job.reader.position() >= job.blocks.end * bs {
        return;
    }
    let vf = backend.view_file(job.it, job.file);
    let source = backend.source(job.it);
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
                source.files[f].read_ahead(s, e - s);
                backend.count_advised(e - s);
            });
        }
        return;
    }
    let cache = backend.cache();
    for b in job.blocks {
        let start = b * bs;
        if start >= vf.size {
            return;
        }
        let len = bs.min(vf.size - start);
        if backend.in_place(job.it, vf, start, len) {
            continue;
        }
        // Never more than half the budget in blocks nobody read yet.
        if cache.pending_prefetch() + len > cache.capacity() / 2 {
            return;
        }
        let r = cache.prefetch((job.id, b), len as usize, |buf| {
            backend.compute(job.it, vf, start, buf)
        });
        if let Err(e) = r {
            // Not counted as a read error: no reader asked yet; the
            // reader's own read fails and counts.
            log::debug!("prefetch: {e}");
            return;
        }
    }
}

/// Calls `each(file, start, end)` for the source byte spans that bytes
/// `[start, end)` of view file `vf` are copied from: for every tensor in the
/// range, the whole rows (along dimension 0) of every stored slice the range
/// touches. A superset of what the copy reads (exact for dimension-0 splits;
/// whole stored rows for the others), merged per file where adjacent, so
/// that advising them asks the disk for long runs.
pub fn source_spans(
    source: &Iteration,
    vf: &VirtualFile,
    start: u64,
    end: u64,
    mut each: impl FnMut(usize, u64, u64),
) {
    let mut spans: Vec<(usize, u64, u64)> = Vec::new();
    let first = vf.tensors.partition_point(|t| t.offset + t.len <= start);
    for pt in &vf.tensors[first..] {
        if pt.offset >= end {
            break;
        }
        if pt.len == 0 {
            continue;
        }
        let Some(t) = source.tensors.get(pt.source) else {
            continue;
        };
        let es = t.elem_size().max(1);
        let a = start.max(pt.offset) - pt.offset;
        let b = end.min(pt.offset + pt.len) - pt.offset;
        let shape = &pt.slice.shape;
        // Global rows (dimension 0) the range covers.
        let rows: Range<u64> = match shape.split_first() {
            None => 0..1,
            Some((_, rest)) => {
                let inner = rest.iter().product::<u64>().max(1);
                let lo = a / es / inner;
                let hi = (b.div_ceil(es).saturating_sub(1)) / inner;
                pt.slice.start[0] + lo..pt.slice.start[0] + hi + 1
            }
        };
        for c in &t.chunks {
            let (lo, hi, row_bytes) = match (c.origin.split_first(), c.stored_shape.split_first()) {
                (Some((&o0, orest)), Some((&s0, srest))) => {
                    // Skip stored slices that miss the target slice in the
                    // inner dimensions (another column block).
                    let misses = orest.iter().zip(srest).enumerate().any(|(d, (&o, &s))| {
                        let (ts, tl) = (pt.slice.start[d + 1], shape[d + 1]);
                        o >= ts + tl || o + s <= ts
                    });
                    if misses {
                        continue;
                    }
                    let lo = rows.start.max(o0);
                    let hi = rows.end.min(o0 + s0);
                    if lo >= hi {
                        continue;
                    }
                    let row_bytes = srest.iter().product::<u64>() * es;
                    (lo - o0, hi - o0, row_bytes)
                }
                _ => (0, 1, es),
            };
            // The replica the copy reads (the view file's own where it has one).
            let (file, offset) = c.read_from(&vf.home);
            let s = offset + lo * row_bytes;
            let e = offset + hi * row_bytes;
            match spans
                .iter_mut()
                .find(|x| x.0 == file && x.2 >= s && x.1 <= e)
            {
                Some(x) => {
                    x.1 = x.1.min(s);
                    x.2 = x.2.max(e);
                }
                None => spans.push((file, s, e)),
            }
        }
    }
    for (f, s, e) in spans {
        each(f, s, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_window_grows_then_resets_on_a_seek() {
        let s = Sequential::default();
        let size = 100 * MIB;
        // First read: nothing yet (a random reader may start at 0 too).
        assert_eq!(s.on_read(0, MIB, size, MIB, 8 * MIB), None);
        // Sequential: 1, 2, 4, 8 blocks ahead of the reader, never twice.
        assert_eq!(s.on_read(MIB, 2 * MIB, size, MIB, 8 * MIB), Some(2..3));
        assert_eq!(s.on_read(2 * MIB, 3 * MIB, size, MIB, 8 * MIB), Some(3..5));
        assert_eq!(s.on_read(3 * MIB, 4 * MIB, size, MIB, 8 * MIB), Some(5..8));
        assert_eq!(s.on_read(4 * MIB, 5 * MIB, size, MIB, 8 * MIB), Some(8..13));
        // Bounded by the configured window.
        assert_eq!(
            s.on_read(5 * MIB, 6 * MIB, size, MIB, 8 * MIB),
            Some(13..14)
        );
        // Out of order by a block (two request threads): still sequential.
        assert_eq!(
            s.on_read(7 * MIB, 8 * MIB, size, MIB, 8 * MIB),
            Some(14..16)
        );
        assert_eq!(s.on_read(6 * MIB, 7 * MIB, size, MIB, 8 * MIB), None);
        // A seek: nothing, and the window starts over.
        assert_eq!(s.on_read(60 * MIB, 61 * MIB, size, MIB, 8 * MIB), None);
        assert_eq!(
            s.on_read(61 * MIB, 62 * MIB, size, MIB, 8 * MIB),
            Some(62..63)
        );
        // Never past the end of the file.
        assert_eq!(s.on_read(99 * MIB, 100 * MIB, size, MIB, 8 * MIB), None);
    }

    #[test]
    fn a_released_handle_says_so() {
        let s = Sequential::default();
        assert!(!s.is_closed());
        s.close();
        assert!(s.is_closed());
    }

    #[test]
    fn random_readers_and_disabled_prefetch_get_nothing() {
        let s = Sequential::default();
        for off in [50u64, 3, 80, 17, 64, 9, 33] {
            assert_eq!(
                s.on_read(off * MIB, off * MIB + 4096, 100 * MIB, MIB, 8 * MIB),
                None
            );
        }
        let s = Sequential::default();
        for i in 0..10 {
            assert_eq!(s.on_read(i * MIB, (i + 1) * MIB, 100 * MIB, MIB, 0), None);
        }
    }

    #[test]
    fn workers_run_jobs_and_stop_when_dropped() {
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let d = done.clone();
        let w = Workers::start(
            2,
            64,
            Arc::new(move |j: Job| {
                d.fetch_add(j.blocks.start, std::sync::atomic::Ordering::SeqCst);
            }),
            Arc::new(|_: &Job, _: &(dyn Any + Send)| unreachable!("no job panics")),
        );
        let reader = Arc::new(Sequential::default());
        for block in 1..=10 {
            assert!(w.submit(Job {
                it: 0,
                file: 0,
                id: 0,
                blocks: block..block + 1,
                advise: false,
                reader: reader.clone(),
            }));
        }
        drop(w);
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 55);
    }

    #[test]
    fn a_job_that_panics_is_reported_and_its_worker_goes_on() {
        use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
        let done = Arc::new(AtomicU64::new(0));
        let panics = Arc::new(Mutex::new(Vec::new()));
        let (d, p) = (done.clone(), panics.clone());
        // One worker: every job after a panic runs on the same thread.
        let w = Workers::start(
            1,
            64,
            Arc::new(move |j: Job| {
                if j.blocks.start.is_multiple_of(3) {
                    panic!("block {}", j.blocks.start);
                }
                d.fetch_add(1, SeqCst);
            }),
            Arc::new(move |j: &Job, payload: &(dyn Any + Send)| {
                let msg = crate::mount::sync::panic_message(payload).to_string();
                lock(&p).push((j.blocks.start, msg));
            }),
        );
        let reader = Arc::new(Sequential::default());
        for block in 1..=9 {
            assert!(w.submit(Job {
                it: 0,
                file: 0,
                id: 0,
                blocks: block..block + 1,
                advise: false,
                reader: reader.clone(),
            }));
        }
        drop(w);
        assert_eq!(done.load(SeqCst), 6, "the jobs after each panic ran");
        let got = lock(&panics).clone();
        assert_eq!(
            got,
            vec![
                (3, "block 3".to_string()),
                (6, "block 6".to_string()),
                (9, "block 9".to_string())
            ]
        );
    }
}
