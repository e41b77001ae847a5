//! The read path: what a request for a view file's bytes does.
//!
//! A request for whole blocks nobody cached (a sequential reader's) is
//! answered straight from the source maps or the object store's blocks
//! when its pieces are few and wide enough, else computed into this
//! thread's buffer; from objects, any request that is so few pieces is
//! answered so; anything else goes through the block cache. Source spans a
//! thread has read stay mapped until enough have piled up to release them
//! in one go.

use std::io::IoSlice;

use super::stats::Counter;
use super::{Core, ReadError, slice_at};
use crate::checkpoint::source::Iteration;
use crate::mount::cache::BlockCache;
use crate::mount::hooks;
use crate::mount::prefetch::{Backend, ViewFile};
use crate::mount::tree::{Content, Ino};
use crate::reshard::engine::{
    Piece, Served, SourceFault, Touched, check_files, gather, read_file, with_pieces,
};
use crate::reshard::plan::VirtualFile;

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
/// prefetch workers (2 by default) each hold up to this much, so it is kept
/// at 8 MiB: at 16 MiB the 16-reader load test's daemon reached 99-111 MiB
/// against its 96 MiB bound on a loaded machine (60-64 MiB when quiet).
const RELEASE_EVERY: u64 = 8 << 20;

/// What `--serve-zeros` replies with: no allocation, no computation.
static ZEROS: [u8; super::MAX_BLOCK_SIZE as usize] = [0; super::MAX_BLOCK_SIZE as usize];

impl Core {
    /// A read; `before` runs once the node is known to be a view file,
    /// before its bytes are computed (where prefetch is queued).
    /// `sequential`: the read comes through a handle with prefetch.
    pub(super) fn read<R>(
        &self,
        ino: Ino,
        offset: u64,
        size: usize,
        sequential: bool,
        before: impl FnOnce(ViewFile),
        out: impl FnOnce(&[IoSlice<'_>]) -> R,
    ) -> Result<R, ReadError> {
        self.counters.add(Counter::Reads, 1);
        let out = |bytes: &[IoSlice<'_>]| {
            let n: usize = bytes.iter().map(|b| b.len()).sum();
            self.counters.add(Counter::BytesServed, n as u64);
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
                before(ViewFile { it, file, id });
                self.read_view(it, file, id, offset, size, sequential, out)
            }
        };
        if let Err(ReadError::Source(e)) = &result {
            self.counters.add(Counter::ReadErrors, 1);
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
            // The header as it is, so that a loader can open the file.
            let head = vf
                .header_range(offset, end)
                .map_or(&[][..], |r| &vf.header[r]);
            let rest = n - head.len();
            let big;
            let zeros = if rest <= ZEROS.len() {
                &ZEROS[..rest]
            } else {
                big = vec![0u8; rest];
                &big[..]
            };
            return Ok(out(&[IoSlice::new(head), IoSlice::new(zeros)]));
        }
        let bs = self.block_size;
        let first = offset / bs;
        let last = (end - 1) / bs;
        let whole_blocks = offset.is_multiple_of(bs) && (end.is_multiple_of(bs) || end == vf.size);
        let uncached = !(first..=last).any(|b| self.cache.contains((id, b)));
        if uncached && (whole_blocks || self.objects[it]) {
            // A request for whole blocks nobody has cached: the sequential
            // reader's case (1 MiB readahead requests). The kernel keeps
            // these pages itself, so caching them too would only cost
            // memory, and fresh cache memory is what costs most here (first
            // touch of a page). When the range is a few pieces of the
            // header, the source maps and the store's blocks, reply with
            // those (no copy in the daemon at all); else compute into this
            // thread's buffer. From objects any request is answered so if
            // it can be, whole blocks or not: the store's blocks are their
            // cache already, and a `safe_open` reader's faults come as
            // 1 MiB requests that straddle two view blocks.
            if self.gather(it, vf, offset, n) {
                return self.reply_from_pieces(it, vf, out);
            }
        }
        if uncached && whole_blocks {
            return SCRATCH.with_borrow_mut(|scratch| {
                if scratch.len() < n {
                    scratch.resize(n, 0);
                }
                self.read_source(it, vf, offset, &mut scratch[..n])?;
                self.counters.add(Counter::DirectReads, 1);
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
            if sequential
                && (whole_blocks || self.cache.served((id, first), n as u64, data.len() as u64))
            {
                self.cache.recycle(data);
            }
            return Ok(r);
        }
        // Across blocks: a slice of each, gathered by the kernel's copy.
        // Copied into a new buffer instead, every such request took fresh
        // pages: a `safe_open` reader's faults reach the daemon as 1 MiB
        // reads offset from the blocks (the kernel reads around the
        // faulting page), and a 1.5 GB view cost the daemon 344 k minor
        // faults.
        let held = (first..=last).map(block).collect::<Result<Vec<_>, _>>()?;
        let part = |b: u64| {
            let lo = offset.max(b * bs) - b * bs;
            let hi = end.min((b + 1) * bs) - b * bs;
            lo as usize..hi as usize
        };
        let slices: Vec<IoSlice<'_>> = held
            .iter()
            .zip(first..)
            .map(|(data, b)| IoSlice::new(&data[part(b)]))
            .collect();
        let r = out(&slices);
        drop(slices);
        if sequential {
            for (data, b) in held.into_iter().zip(first..) {
                if self
                    .cache
                    .served((id, b), part(b).len() as u64, data.len() as u64)
                {
                    self.cache.recycle(data);
                }
            }
        }
        Ok(r)
    }

    /// Whether bytes `[offset, offset + n)` of `vf` are a few pieces of the
    /// header, the source maps and the store's blocks ([`gather`]); if so,
    /// they are left in this thread's `PIECES`.
    fn gather(&self, it: usize, vf: &VirtualFile, offset: u64, n: usize) -> bool {
        let source = &self.plan.source.iterations[it];
        let max = (n / MIN_PIECE).clamp(1, MAX_PIECES) + END_PIECES;
        PIECES.with_borrow_mut(|p| gather(source, vf, offset, n as u64, max, p).is_some())
    }

    /// Replies with the pieces [`gather`] left in this thread's `PIECES`:
    /// slices of the header, of the source maps and of the store's blocks
    /// (held until the reply is written), which the kernel copies into the
    /// reader's page cache with one `writev`, the daemon copying nothing (a
    /// row split's slices, a Hugging Face part, the rows of a fused tensor:
    /// most of a view's bytes). Each source file is checked first (still
    /// the one planned, not truncated under the map); a truncation racing
    /// the kernel's copy faults in the kernel, which then fails the read
    /// with EIO, so no zeros are ever served. The pages the copy mapped are
    /// released with this thread's other spans.
    fn reply_from_pieces<R>(
        &self,
        it: usize,
        vf: &VirtualFile,
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
            let r = with_pieces(source, vf, pieces, out)?;
            self.counters.add(Counter::DirectReads, 1);
            self.counters.add(Counter::MappedReads, 1);
            self.counters.add(Counter::SourceBytesRead, from_source);
            self.with_touched(it, |touched, source| {
                // An object's blocks are not mapped: nothing to release.
                for (file, at, len) in
                    spans().filter(|&(f, _, _)| source.files[f].object().is_none())
                {
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
        vf: &VirtualFile,
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
                    .add(Counter::SourceBytesRead, g.from_source as u64);
            }
            got
        })
    }
}

/// What the prefetch workers do, they do through the read path: the same
/// engine, the same per-thread spans, the same cache.
impl Backend for Core {
    fn source(&self, it: usize) -> &Iteration {
        &self.plan.source.iterations[it]
    }

    fn view_file(&self, it: usize, file: usize) -> &VirtualFile {
        &self.plan.iterations[it].files[file]
    }

    fn cache(&self) -> &BlockCache {
        &self.cache
    }

    fn compute(
        &self,
        it: usize,
        vf: &VirtualFile,
        start: u64,
        buf: &mut [u8],
    ) -> Result<(), SourceFault> {
        if hooks::get().panic_in_prefetch.as_deref() == Some(vf.name.as_str()) {
            panic!("injected by RESHARDFS_TEST_PANIC_IN_PREFETCH (tests only)");
        }
        self.read_source(it, vf, start, buf).map(|_| ())
    }

    fn in_place(&self, it: usize, vf: &VirtualFile, start: u64, len: u64) -> bool {
        self.objects[it] && self.gather(it, vf, start, len as usize)
    }

    fn count_advised(&self, bytes: u64) {
        self.counters.add(Counter::PrefetchAdvised, bytes);
    }

    fn internal_error(&self, what: &str, payload: &(dyn std::any::Any + Send)) {
        Core::internal_error(self, what, payload, "its blocks are left to the reader");
    }
}
