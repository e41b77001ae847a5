//! Serving a view: attributes, listings, open handles and bytes of every
//! node of the tree, through the block cache, with live counters. No FUSE
//! types here: the FUSE adapter ([`super::fuse`]) only translates, and
//! this is tested without a mount.
//!
//! [`read`] is the read path (what a request for view bytes does, and the
//! per-thread state it keeps); [`stats`] the counters and
//! `.reshardfs/stats`; [`passthrough`] which view files the kernel reads
//! itself, and their backing files; prefetch lives in [`super::prefetch`].

pub mod passthrough;
mod read;
pub(crate) mod stats;

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use crate::mount::cache::BlockCache;
use crate::mount::prefetch::{PrefetchConfig, Prefetcher, Sequential};
use crate::mount::sync;
use crate::mount::tree::{Content, Ino, Tree};
use crate::reshard::engine::SourceFault;
use crate::reshard::plan::Plan;
use passthrough::{Backing, Open, Passthrough};
use stats::{Counter, Counters};

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
    /// Permission bits ([`crate::mount::access`]).
    pub perm: u16,
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

/// Mount-wide state the request threads and the prefetch workers share.
pub(crate) struct Core {
    plan: Plan,
    tree: Tree,
    cache: BlockCache,
    counters: Counters,
    started: Instant,
    block_size: u64,
    /// `--serve-zeros`: view files read as zeros past their headers.
    zeros: bool,
    /// What `.reshardfs/stats` shows as `prefetch_window`.
    prefetch_window: u64,
    /// View files that are a source file whole, read by the kernel itself.
    passthrough: Passthrough,
    /// Distinguishes servers in per-thread state (never reused).
    id: usize,
    /// Per source iteration: some of its files are objects, whose reads
    /// are answered from the store's blocks where they can be.
    objects: Vec<bool>,
}

/// What an open handle carries.
enum Handle {
    /// A live file, rendered once at open so that one reader's several
    /// reads see one consistent text.
    Snapshot(Arc<[u8]>),
    /// A view file: where its reader is, for prefetch.
    View(Arc<Sequential>),
    /// A view file that is a source file whole, open by passthrough or
    /// through the daemon (then with its reader, when prefetching): its
    /// opens are counted so that the kernel's rule holds (every open of a
    /// file open by passthrough names the same backing file).
    Whole {
        ino: Ino,
        seq: Option<Arc<Sequential>>,
    },
}

/// A handle returned by [`Server::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// The content changes while mounted: the kernel must not cache it.
    pub direct_io: bool,
    /// Open by passthrough: the kernel reads this backing file itself.
    pub passthrough: Option<Backing>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("no such file")]
    NotFound,
    #[error("is a directory")]
    IsDir,
    #[error("not a directory")]
    NotDir,
    /// A view file open by passthrough whose source file changed since:
    /// another open would be handed the changed file, or refused by the
    /// kernel (EIO either way).
    #[error("its source file changed")]
    SourceChanged,
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
    prefetcher: Prefetcher,
}

impl Server {
    /// For benchmarks: view files keep their names, sizes and headers but
    /// their tensors read as zeros, so a run measures FUSE itself with
    /// zero-cost data (and a loader can still open the files).
    pub fn serve_zeros(mut self) -> Self {
        if let Some(core) = Arc::get_mut(&mut self.core) {
            core.zeros = true;
            core.prefetch_window = 0;
        }
        self.core.passthrough.turn_off();
        self.prefetcher = Prefetcher::off();
        self
    }

    /// Every view file served through the daemon, also those that are a
    /// source file whole (`--no-passthrough`).
    pub fn without_passthrough(self) -> Self {
        self.core.passthrough.turn_off();
        self
    }

    /// At the FUSE handshake: whether to ask the kernel for passthrough
    /// (then with this stacking depth), given whether it offers it. Logs
    /// once why not, when it is wanted and cannot be had.
    pub fn negotiate_passthrough(&self, kernel_offers: bool) -> Option<u32> {
        let may = passthrough::may_register();
        self.core
            .passthrough
            .negotiate(kernel_offers, may)
            .then_some(passthrough::MAX_STACK_DEPTH)
    }

    /// A server with the default prefetch ([`PrefetchConfig::default`]).
    pub fn new(plan: Plan, cache_bytes: u64) -> Server {
        Server::with_prefetch(plan, cache_bytes, PrefetchConfig::default())
    }

    pub fn with_prefetch(plan: Plan, cache_bytes: u64, prefetch: PrefetchConfig) -> Server {
        let tree = Tree::build(&plan);
        let block_size = block_size_for(cache_bytes);
        let advise_ahead = plan
            .source
            .iterations
            .iter()
            .flat_map(|it| &it.files)
            .any(|f| f.advice_reads_ahead());
        let prefetcher = Prefetcher::new(prefetch, cache_bytes, block_size, advise_ahead);
        let whole = plan
            .iterations
            .iter()
            .flat_map(|it| &it.files)
            .filter(|f| f.whole_source.is_some())
            .count();
        let objects = plan
            .source
            .iterations
            .iter()
            .map(|it| it.files.iter().any(|f| f.object().is_some()))
            .collect();
        Server {
            core: Arc::new(Core {
                passthrough: Passthrough::new(true, whole),
                objects,
                plan,
                tree,
                cache: BlockCache::new(cache_bytes),
                counters: Counters::default(),
                started: Instant::now(),
                block_size,
                zeros: false,
                prefetch_window: prefetcher.window(),
                id: {
                    static NEXT: std::sync::atomic::AtomicUsize =
                        std::sync::atomic::AtomicUsize::new(1);
                    NEXT.fetch_add(1, Ordering::Relaxed)
                },
            }),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            prefetcher,
        }
    }

    /// A bug caught by a guard (a request that panicked, answered EIO by
    /// the FUSE adapter): counted as `internal_errors` and logged at error
    /// level with `what` (the operation, the file, the offset) and what
    /// became of the request (`outcome`).
    pub fn internal_error(&self, what: &str, payload: &(dyn std::any::Any + Send), outcome: &str) {
        self.core.internal_error(what, payload, outcome);
    }

    /// Every folder the source's bytes live in, the source's first
    /// ([`crate::checkpoint::source::Source::real_dirs`]).
    pub fn source_dirs(&self) -> Vec<std::path::PathBuf> {
        self.core.plan.source.real_dirs()
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

    /// Opens a file for reading, never by passthrough (nothing to
    /// register a backing file with).
    pub fn open(&self, ino: Ino) -> Result<Opened, OpenError> {
        self.open_file(ino, None)
    }

    /// Opens a file for reading; a view file that is a source file whole
    /// by passthrough when it may be ([`passthrough`]), `register` handing
    /// the source file to the kernel.
    pub fn open_with(
        &self,
        ino: Ino,
        register: &mut passthrough::Register<'_>,
    ) -> Result<Opened, OpenError> {
        self.open_file(ino, Some(register))
    }

    fn open_file(
        &self,
        ino: Ino,
        register: Option<&mut passthrough::Register<'_>>,
    ) -> Result<Opened, OpenError> {
        let a = self.attr(ino).ok_or(OpenError::NotFound)?;
        if a.kind == NodeKind::Dir {
            return Err(OpenError::IsDir);
        }
        let view = match self.core.tree.get(ino).map(|n| &n.content) {
            Some(&Content::View { it, file, .. }) => Some((it, file)),
            _ => None,
        };
        let reader = || (self.prefetcher.window() > 0).then(Arc::default);
        let whole = view.and_then(|(it, file)| {
            let f = self.core.plan.iterations[it].files[file].whole_source?;
            Some(&self.core.plan.source.iterations[it].files[f])
        });
        let mut passthrough = None;
        let handle = if a.live {
            Handle::Snapshot(Arc::from(self.core.stats_text().into_bytes()))
        } else if let Some(source) = whole {
            match self.core.passthrough.open(ino, source, register) {
                Open::Kernel(b) => {
                    self.core.counters.add(Counter::PassthroughOpens, 1);
                    passthrough = Some(b);
                    Handle::Whole { ino, seq: None }
                }
                Open::Daemon => {
                    self.core.counters.add(Counter::PassthroughFallbacks, 1);
                    Handle::Whole { ino, seq: reader() }
                }
                Open::Refuse => {
                    self.core.counters.add(Counter::ReadErrors, 1);
                    log::error!(
                        "{}: not opened: its source file {} changed (truncated, deleted, replaced or rewritten) while the view file is open",
                        self.core.tree.path(ino),
                        source.path.display()
                    );
                    return Err(OpenError::SourceChanged);
                }
            }
        } else if let (Some(_), Some(seq)) = (view, reader()) {
            Handle::View(seq)
        } else {
            // Fixed bytes: nothing to remember.
            return Ok(Opened {
                fh: 0,
                direct_io: false,
                passthrough: None,
            });
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        sync::write(&self.handles).insert(fh, handle);
        Ok(Opened {
            fh,
            direct_io: a.live,
            passthrough,
        })
    }

    /// Forgets a handle (unknown handles are ignored); the last handle of a
    /// view file open by passthrough unregisters its backing file.
    pub fn release(&self, fh: u64) {
        if fh != 0 {
            let gone = sync::write(&self.handles).remove(&fh);
            match gone {
                Some(Handle::View(seq)) => seq.close(),
                Some(Handle::Whole { ino, seq }) => {
                    if let Some(seq) = seq {
                        seq.close();
                    }
                    self.core.passthrough.release(ino);
                }
                _ => {}
            }
        }
    }

    /// Open handles (for tests and stats).
    pub fn open_handles(&self) -> usize {
        sync::read(&self.handles).len()
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
            match sync::read(&self.handles).get(&fh) {
                Some(Handle::Snapshot(t)) => Found::Snapshot(t.clone()),
                Some(Handle::View(s) | Handle::Whole { seq: Some(s), .. }) => {
                    Found::View(s.clone())
                }
                // A passthrough handle's reads go to the kernel; any that
                // comes here is served as without a handle.
                Some(Handle::Whole { seq: None, .. }) | None => Found::None,
            }
        };
        match found {
            Found::Snapshot(text) => {
                self.core.counters.add(Counter::Reads, 1);
                Ok(out(&[IoSlice::new(slice_at(&text, offset, size))]))
            }
            Found::View(seq) => self.core.read(
                ino,
                offset,
                size,
                true,
                |view| {
                    self.prefetcher
                        .on_read(&self.core, view, &seq, offset, size)
                },
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
        self.core.read(ino, offset, size, false, |_| (), out)
    }

    /// `.reshardfs/stats`: one `key: value` per line.
    pub fn stats_text(&self) -> String {
        self.core.stats_text()
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
            perm: node.perm,
        })
    }

    fn internal_error(&self, what: &str, payload: &(dyn std::any::Any + Send), outcome: &str) {
        self.counters.add(Counter::InternalErrors, 1);
        log::error!(
            "internal error (a bug): {what} panicked: {}; {outcome}",
            sync::panic_message(payload)
        );
    }

    /// `.reshardfs/stats`: one `key: value` per line.
    fn stats_text(&self) -> String {
        stats::render(&stats::Snapshot {
            counters: &self.counters,
            cache: self.cache.stats(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            block_size: self.block_size,
            prefetch_window: self.prefetch_window,
            backing_files: self.passthrough.backing_files(),
        })
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
                offset: None,
            },
        )
        .unwrap()
    }

    /// A server that prefetches even though the fixtures sit in the page
    /// cache ([`Mode::Always`]).
    fn always_ahead(cache: u64) -> Server {
        let p = plan("tests/fixtures/tp4-f32", &[("tp", 2)], None);
        let config = PrefetchConfig {
            mode: crate::mount::prefetch::Mode::Always,
            ..PrefetchConfig::default()
        };
        Server::with_prefetch(p, cache, config)
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
        read_all: impl FnMut(Ino, u64) -> Vec<u8>,
    ) {
        let by_rank = tensors_by_rank(s, dir, read_all);
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

    /// The tensors of the view files in `dir`, each read whole through
    /// `read_all`, merged per rank.
    fn tensors_by_rank(
        s: &Server,
        dir: Ino,
        mut read_all: impl FnMut(Ino, u64) -> Vec<u8>,
    ) -> BTreeMap<u64, Tensors> {
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
        by_rank
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
    fn serve_zeros_keeps_the_headers_and_zeroes_the_tensors() {
        let s = server(1 << 20).serve_zeros();
        let it = s.tree().lookup(ROOT, "iteration_00000005").unwrap();
        // Requests that straddle the end of the header.
        let by_rank = tensors_by_rank(&s, it, |ino, size| {
            read_in_chunks(size, 7777, |o, n| s.read(ino, o, n, joined).unwrap())
        });
        let dir = Path::new("tests/fixtures/expected/tp4-f32.tp=2");
        assert_eq!(by_rank.len(), std::fs::read_dir(dir).unwrap().count());
        for (rank, got) in by_rank {
            let want =
                tensors(&std::fs::read(dir.join(format!("rank-{rank}.safetensors"))).unwrap());
            assert_eq!(got.len(), want.len(), "rank {rank}");
            for (name, (dtype, shape, data)) in &want {
                let (d, sh, bytes) = &got[name];
                assert_eq!((d, sh), (dtype, shape), "rank {rank}: {name}");
                assert!(
                    bytes.len() == data.len() && bytes.iter().all(|&b| b == 0),
                    "rank {rank}: {name} is not all zeros"
                );
            }
        }
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

    #[test]
    fn whole_source_files_are_opened_by_passthrough_and_counted() {
        // tp4-f32 with its own strategy: every view file is a source file.
        let s = Server::new(plan("tests/fixtures/tp4-f32", &[("tp", 4)], None), 1 << 20);
        assert!(s.core.passthrough.negotiate(true, true));
        let f = view_file(&s, "model-0000002-0000004.safetensors");
        let registered = std::cell::RefCell::new(Vec::new());
        let mut register = |file: &std::fs::File| {
            use std::os::unix::fs::MetadataExt;
            registered.borrow_mut().push(file.metadata().unwrap().ino());
            Ok(Backing::new(()))
        };
        let a = s.open_with(f, &mut register).unwrap();
        let b = s.open_with(f, &mut register).unwrap();
        assert!(a.passthrough.is_some() && a.passthrough == b.passthrough);
        assert!(!a.direct_io && a.fh != 0 && a.fh != b.fh);
        // The descriptor handed over is the source file's own.
        let want = std::fs::metadata(
            "tests/fixtures/tp4-f32/iteration_00000005/model-0000002-0000004.safetensors",
        )
        .unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(*registered.borrow(), vec![want.ino()]);
        assert_eq!(stat(&s, "passthrough_opens"), 2);
        assert_eq!(stat(&s, "passthrough_backing_files"), 1);
        // A read that still comes through such a handle is served.
        let whole = s.read(f, 0, 1 << 20, joined).unwrap();
        assert_eq!(s.read_handle(f, a.fh, 0, 1 << 20, joined).unwrap(), whole);
        s.release(a.fh);
        s.release(b.fh);
        assert_eq!(stat(&s, "passthrough_backing_files"), 0);
        // Metadata and the counters are never passed through.
        let it = s.tree().lookup(ROOT, "iteration_00000005").unwrap();
        let meta = s.tree().lookup(it, "metadata.json").unwrap();
        assert_eq!(s.open_with(meta, &mut register).unwrap().passthrough, None);
        // Turned off: through the daemon, counted as such.
        let s = Server::new(plan("tests/fixtures/tp4-f32", &[("tp", 4)], None), 1 << 20)
            .without_passthrough();
        assert!(!s.core.passthrough.negotiate(true, true));
        let h = s.open_with(f, &mut register).unwrap();
        assert_eq!(h.passthrough, None);
        assert_eq!(registered.borrow().len(), 1);
        assert_eq!(stat(&s, "passthrough_fallbacks"), 1);
        s.release(h.fh);
        assert_eq!(s.open_handles(), 0);
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
        let s = always_ahead(64 << 10);
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
        let s = always_ahead(64 << 10);
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
