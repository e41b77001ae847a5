//! The byte engine: any byte range of any view file, computed from the
//! memory-mapped source slices.
//!
//! A read walks the requested range in *runs*: maximal stretches contiguous
//! both in the target slice and in the stored source slice. Runs grow from one
//! row of a piece to whole slices wherever the two layouts agree on the inner
//! dimensions, so copying is done with `copy_from_slice` over long spans, never
//! element by element. The same engine serves `export` and the FUSE mount.

use std::path::PathBuf;

use safetensors::Dtype;

use crate::checkpoint::header::elem_size;
use crate::checkpoint::layout::{ravel, unravel_into};
use crate::checkpoint::source::{Assembly, Iteration, RowMap, Tensor, TileMap};
use crate::reshard::cast;
use crate::reshard::plan::{IterationPlan, Plan, PlannedTensor, VirtualFile};

/// A source file changed under the view: its bytes can no longer be trusted.
#[derive(Debug, thiserror::Error)]
#[error("{}: the source file changed (truncated, deleted, replaced or rewritten) or became unreadable while in use", path.display())]
pub struct SourceFault {
    pub path: PathBuf,
}

/// The source iteration as one read of one view file sees it: the
/// iteration itself (through `Deref`), the replica each slice is read from
/// (the view file's [`VirtualFile::home`]), and its bytes, from the map of
/// a local file or, for an object, from the store's blocks, which the read
/// keeps alive while it copies from them ([`Pins`]).
pub(crate) struct Src<'a> {
    it: &'a Iteration,
    home: &'a [usize],
    pins: Pins,
}

impl<'a> Src<'a> {
    pub(crate) fn new(it: &'a Iteration, vf: &'a VirtualFile) -> Src<'a> {
        Src {
            it,
            home: &vf.home,
            pins: Pins::default(),
        }
    }

    /// Bytes `[at, at + len)` of source file `f` (a range its header
    /// placed). An object's come from the blocks of the store's cache,
    /// fetched now if they are not there; a fetch that fails fails the read
    /// (and a changed object marks the file damaged, failing every later
    /// read of it).
    fn bytes(&self, f: usize, at: u64, len: u64) -> Result<&[u8], SourceFault> {
        let file = &self.it.files[f];
        if let Some(b) = file.map_bytes(at, len) {
            return Ok(b);
        }
        let fault = || SourceFault {
            path: file.path.clone(),
        };
        let Some(o) = file.object() else {
            return Err(fault());
        };
        if len == 0 {
            return Ok(&[]);
        }
        let bs = o.block_size();
        let (first, last) = (at / bs, (at + len - 1) / bs);
        if first == last {
            let block = o.block(first, len).map_err(|_| fault())?;
            let block = self.pins.keep(block);
            let from = (at - first * bs) as usize;
            return Ok(&block[from..from + len as usize]);
        }
        // Across blocks: ask for all of them at once (the store's fetchers
        // get them in parallel), then copy them together.
        o.will_need(at, len);
        let mut joined = vec![0u8; len as usize];
        o.read(at, &mut joined).map_err(|_| fault())?;
        Ok(self.pins.keep(std::sync::Arc::from(joined)))
    }
}

impl std::ops::Deref for Src<'_> {
    type Target = Iteration;
    fn deref(&self) -> &Iteration {
        self.it
    }
}

/// Blocks a read copies from, kept alive until it ends: an append-only
/// list whose entries never move, so a slice of one lives as long as the
/// list. Cells of a fixed array, then the next array, each set once
/// (`OnceCell`), so no borrow outlives a `RefCell` guard; most reads pin a
/// handful of blocks, none are allocated for a local source.
#[derive(Default)]
struct Pins {
    cells: [std::cell::OnceCell<std::sync::Arc<[u8]>>; 16],
    used: std::cell::Cell<usize>,
    next: std::cell::OnceCell<Box<Pins>>,
}

impl Pins {
    fn keep(&self, block: std::sync::Arc<[u8]>) -> &[u8] {
        let i = self.used.get();
        // The rows of one tensor come from the same block, span after span.
        if let Some(same) = self.cells[..i]
            .iter()
            .rev()
            .filter_map(|c| c.get())
            .find(|b| std::sync::Arc::ptr_eq(b, &block))
        {
            return same;
        }
        if i < self.cells.len() {
            self.used.set(i + 1);
            return self.cells[i].get_or_init(|| block);
        }
        self.next.get_or_init(Box::default).keep(block)
    }
}

/// What one read produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Bytes written to the caller's buffer.
    pub bytes: usize,
    /// Of those, bytes copied from source files (the rest is generated header).
    pub from_source: usize,
}

/// Reads view files of a plan.
pub struct Engine<'p> {
    plan: &'p Plan,
}

impl<'p> Engine<'p> {
    pub fn new(plan: &'p Plan) -> Self {
        Engine { plan }
    }

    /// The size of file `file` of iteration `it`.
    pub fn size(&self, it: usize, file: usize) -> u64 {
        self.plan.iterations[it].files[file].size
    }

    /// Fills `buf` with the bytes of file `file` of iteration `it` starting at
    /// `offset`; returns how many bytes were written (short only at the end of
    /// the file).
    pub fn read(
        &self,
        it: usize,
        file: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Served, SourceFault> {
        let plan: &IterationPlan = &self.plan.iterations[it];
        let source: &Iteration = &self.plan.source.iterations[it];
        let mut touched = Touched::default();
        let r = read_file(source, &plan.files[file], offset, buf, &mut touched);
        touched.release(source);
        r
    }
}

/// Reads a range of one view file. The source spans copied from are added
/// to `touched`; the caller releases them ([`Touched::release`]) when it
/// likes: after every read bounds RSS tightest, every few MiB costs fewer
/// TLB shootdowns.
pub fn read_file(
    source: &Iteration,
    vf: &VirtualFile,
    offset: u64,
    buf: &mut [u8],
    touched: &mut Touched,
) -> Result<Served, SourceFault> {
    if offset >= vf.size {
        return Ok(Served::default());
    }
    let end = vf.size.min(offset + buf.len() as u64);
    let total = (end - offset) as usize;
    let mut out = &mut buf[..total];
    let mut mine = Touched::default();
    let source = &Src::new(source, vf);
    for seg in segments(vf, offset, end) {
        match seg {
            Segment::Header(r) => {
                let n = r.len();
                out[..n].copy_from_slice(&vf.header[r]);
                out = &mut out[n..];
            }
            Segment::Tensor(pt, at, n) => {
                let (now, rest) = out.split_at_mut(n as usize);
                let copied = copy_tensor(source, pt, at, now, &mut mine);
                if copied.is_err() {
                    touched.merge(&mine);
                }
                copied?;
                out = rest;
            }
        }
    }
    touched.merge(&mine);
    mine.check_unchanged(source)?;
    let hlen = vf.header.len() as u64;
    Ok(Served {
        bytes: total,
        from_source: (end - offset.max(hlen).min(end)) as usize,
    })
}

/// A stretch of a view file: part of its generated header, or bytes
/// `[at, at + len)` of one planned tensor's data.
enum Segment<'a> {
    Header(std::ops::Range<usize>),
    Tensor(&'a PlannedTensor, u64, u64),
}

/// The stretches bytes `[offset, end)` of `vf` are made of, in order
/// (`end` at most the file's size): the header, then the tensors, which lie
/// back to back after it. Shared by the copy ([`read_file`]) and the list
/// of pieces ([`gather`]).
fn segments(vf: &VirtualFile, offset: u64, end: u64) -> impl Iterator<Item = Segment<'_>> {
    let header = vf.header_range(offset, end).map(Segment::Header);
    let from = offset.max(vf.header.len() as u64);
    let first = vf.tensors.partition_point(|t| t.offset + t.len <= from);
    let tensors = vf.tensors[first..]
        .iter()
        .take_while(move |pt| pt.offset < end)
        .filter_map(move |pt| {
            let start = from.max(pt.offset);
            let stop = (pt.offset + pt.len).min(end);
            (stop > start).then(|| Segment::Tensor(pt, start - pt.offset, stop - start))
        });
    header.into_iter().chain(tensors)
}

/// The span of each source file reads copied from, so the pages can be
/// released from the process's page tables afterwards (see
/// [`crate::checkpoint::mapped::RankFile::release`]).
#[derive(Default)]
pub struct Touched(Vec<(usize, u64, u64)>);

impl Touched {
    /// Bytes the spans may keep mapped, summed over files: each widened to
    /// whole 2 MiB units, as the kernel maps large folios and faults around a
    /// touched page. Counting only the bytes copied let scattered small reads
    /// (16 random readers) keep far more mapped than the release threshold
    /// meant (RSS 108 MiB over a 96 MiB budget).
    pub fn span_bytes(&self) -> u64 {
        const UNIT: u64 = 2 << 20;
        self.0
            .iter()
            .map(|t| t.2.div_ceil(UNIT) * UNIT - t.1 / UNIT * UNIT)
            .sum()
    }

    /// The files the spans lie in, sorted, each once.
    #[cfg(test)]
    pub(crate) fn files(&self) -> Vec<usize> {
        let mut f: Vec<usize> = self.0.iter().map(|t| t.0).collect();
        f.sort_unstable();
        f.dedup();
        f
    }

    fn merge(&mut self, other: &Touched) {
        for &(file, start, end) in &other.0 {
            self.add(file, start, end);
        }
    }

    /// Records `[start, end)` of `file`, merged with a span of the same file
    /// it overlaps or nearly touches. Spans far apart stay apart: a fused
    /// tensor reads rows of parts that lie 100 MB apart in one file, and
    /// one span covering both would make every release unmap (and count)
    /// everything in between.
    pub fn add(&mut self, file: usize, start: u64, end: u64) {
        /// Releases are widened to 2 MiB anyway; closer spans are one.
        const SLACK: u64 = 2 << 20;
        match self.0.iter_mut().find(|t| {
            t.0 == file && start <= t.2.saturating_add(SLACK) && t.1 <= end.saturating_add(SLACK)
        }) {
            Some(t) => {
                t.1 = t.1.min(start);
                t.2 = t.2.max(end);
            }
            None => self.0.push((file, start, end)),
        }
    }

    /// Releases every span (of `source`, the iteration they were read
    /// from) and forgets them.
    pub fn release(&mut self, source: &Iteration) {
        for &(file, start, end) in &self.0 {
            source.files[file].release(start, end - start);
        }
        self.0.clear();
    }

    /// Fails the read if a file it copied from was deleted, replaced or
    /// rewritten since planning (its bytes may belong to another save).
    fn check_unchanged(&self, source: &Iteration) -> Result<(), SourceFault> {
        check_files(source, self.0.iter().map(|&(file, _, _)| file))
    }
}

/// Fails if one of `files` was deleted, replaced or rewritten since
/// planning, or faulted under its map: its bytes may not be the
/// checkpoint's. A `stat` per file, however often it is named (a fused
/// tensor's request has a hundred spans of the same two files; a `stat` per
/// span put path lookup and `statx` at ~5% of the daemon's samples on the
/// bench's Q1 view).
/// Allocates nothing (random 4 KiB reads pass here too): the files seen
/// are kept on the stack, the first 16 of them (a request spans a few;
/// past 16 a file met again is only checked again).
pub fn check_files(
    source: &Iteration,
    files: impl IntoIterator<Item = usize>,
) -> Result<(), SourceFault> {
    let mut seen = [0usize; 16];
    let mut n = 0;
    for file in files {
        if seen[..n].contains(&file) {
            continue;
        }
        if n < seen.len() {
            seen[n] = file;
            n += 1;
        }
        let f = &source.files[file];
        if !f.is_unchanged() || f.is_damaged() {
            return Err(SourceFault {
                path: f.path.clone(),
            });
        }
    }
    Ok(())
}

/// Where a view file's bytes come from, one piece of a read after another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Bytes `[start, end)` of the file's generated header.
    Header { start: usize, end: usize },
    /// `len` bytes of source file `file` from offset `at`; of an object,
    /// within one block of its store.
    Source { file: usize, at: u64, len: u64 },
}

/// Hands `out` the bytes of `pieces` (as [`gather`] lists them for `vf`),
/// in order: slices of the header, of the source maps and of the store's
/// blocks, each an object's block kept alive until `out` returns
/// ([`Src::bytes`], the copy's own source of bytes). When several pieces
/// are of objects, all their blocks are asked for before the first is
/// waited on, so the store's fetchers get them in parallel. A fetch that
/// fails fails the read, as [`read_file`]'s does. The caller checks the
/// source files first ([`check_files`]): a truncated file's pages fault
/// rather than read as data.
pub fn with_pieces<R>(
    source: &Iteration,
    vf: &VirtualFile,
    pieces: &[Piece],
    out: impl FnOnce(&[std::io::IoSlice<'_>]) -> R,
) -> Result<R, SourceFault> {
    let objects = || {
        pieces.iter().filter_map(|p| match *p {
            Piece::Source { file, at, len } => source.files[file].object().map(|o| (o, at, len)),
            Piece::Header { .. } => None,
        })
    };
    if objects().nth(1).is_some() {
        for (o, at, len) in objects() {
            o.will_need(at, len);
        }
    }
    let src = Src::new(source, vf);
    let slices = pieces
        .iter()
        .map(|p| match *p {
            Piece::Header { start, end } => Ok(&vf.header[start..end]),
            Piece::Source { file, at, len } => src.bytes(file, at, len),
        })
        .map(|b| b.map(std::io::IoSlice::new))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(out(&slices))
}

/// The pieces bytes `[offset, offset + len)` of view file `vf` are made of,
/// in order, when there are at most `max` of them and no byte needs
/// converting (a cast): then the bytes can go to the reader straight from
/// the header, the source maps and the store's blocks, gathered by the
/// kernel's copy (`writev`), with no copy in the daemon. Consecutive stored
/// spans are one piece, but an object's piece never crosses one of its
/// blocks. `None` past the end, on a cast, or with more pieces (a column
/// split into many narrow rows is cheaper to gather by copying than to hand
/// to the kernel as hundreds of slices); `pieces` is cleared first.
pub fn gather(
    source: &Iteration,
    vf: &VirtualFile,
    offset: u64,
    len: u64,
    max: usize,
    pieces: &mut Vec<Piece>,
) -> Option<()> {
    pieces.clear();
    let end = offset.checked_add(len)?;
    if len == 0 || end > vf.size {
        return None;
    }
    let source = &Src::new(source, vf);
    for seg in segments(vf, offset, end) {
        let (pt, at, n) = match seg {
            Segment::Header(r) => {
                pieces.push(Piece::Header {
                    start: r.start,
                    end: r.end,
                });
                continue;
            }
            Segment::Tensor(pt, at, n) => (pt, at, n),
        };
        let t = &source.tensors[pt.source];
        if pt.dtype != t.dtype {
            return None;
        }
        let region = Region {
            start: &pt.slice.start,
            shape: &pt.slice.shape,
        };
        walk_region(source, t, region, at, n, &mut |file, at, len| {
            // A map is one piece however long; an object's piece ends
            // where its block does.
            let block = source.files[file]
                .object()
                .map_or(u64::MAX, |o| o.block_size());
            let (mut at, end) = (at, at + len);
            while at < end {
                let stop = end.min((at / block).saturating_add(1).saturating_mul(block));
                if let Some(Piece::Source {
                    file: f,
                    at: a,
                    len: l,
                }) = pieces.last_mut()
                    && *f == file
                    && *a + *l == at
                    && *a / block == at / block
                {
                    *l += stop - at;
                } else if pieces.len() == max {
                    return Err(());
                } else {
                    pieces.push(Piece::Source {
                        file,
                        at,
                        len: stop - at,
                    });
                }
                at = stop;
            }
            Ok(())
        })
        .ok()?;
    }
    Some(())
}

/// Bytes `[at, at + len)` of `region` of a stored tensor, when they lie in
/// one stored slice whose other dimensions the region covers exactly (so
/// its rows follow each other in the file): `(file, offset)`. Allocates
/// nothing: the copy path asks it for every run of rows.
fn stored_span(
    home: &[usize],
    t: &Tensor,
    region: Region<'_>,
    at: u64,
    len: u64,
) -> Option<(usize, u64)> {
    let es = t.elem_size();
    let Some((&rows, inner)) = region.shape.split_first() else {
        // A 0-d tensor: its one element.
        let (file, offset) = t.chunks.first()?.read_from(home);
        return Some((file, offset + at));
    };
    let row_bytes = inner.iter().product::<u64>() * es;
    if row_bytes == 0 || rows == 0 || len == 0 {
        return None;
    }
    let first_row = region.start[0] + at / row_bytes;
    let last_row = region.start[0] + (at + len - 1) / row_bytes;
    // The slice holding the first row; every row read must be in it (a file
    // holding the whole tensor holds the other slices' rows too, but the
    // replica read is chosen per slice).
    let d0 = first_row / t.chunk_shape[0];
    if last_row >= (d0 + 1) * t.chunk_shape[0] {
        return None;
    }
    let k = (1..region.shape.len()).fold(d0, |k, d| {
        k * t.frag[d] + region.start[d] / t.chunk_shape[d]
    });
    let chunk = &t.chunks[k as usize];
    let whole_inner = (1..region.shape.len())
        .all(|d| region.shape[d] == chunk.stored_shape[d] && region.start[d] == chunk.origin[d]);
    whole_inner.then(|| {
        let (file, offset) = chunk.read_from(home);
        (
            file,
            offset + (first_row - chunk.origin[0]) * row_bytes + at % row_bytes,
        )
    })
}

/// Copies bytes `[at, at + out.len())` of a planned tensor's target slice,
/// cast to the view's dtype when it differs from the source's.
fn copy_tensor(
    source: &Src<'_>,
    pt: &PlannedTensor,
    at: u64,
    out: &mut [u8],
    touched: &mut Touched,
) -> Result<(), SourceFault> {
    let t: &Tensor = &source.tensors[pt.source];
    let region = Region {
        start: &pt.slice.start,
        shape: &pt.slice.shape,
    };
    // A transposed tile is copied element by element (in blocks), so its
    // range must start and end on elements: the cast path does that, with
    // no conversion when the dtype stays.
    if pt.dtype == t.dtype && is_spans(source, t) {
        copy_region(source, t, region, at, out, touched)
    } else {
        copy_cast(source, t, pt.dtype, region, at, out, touched)
    }
}

/// Whether every byte of `t` lies in spans of stored bytes, in row-major
/// order: the tensor is stored, or made of whole rows of parts that are.
/// False when a transposed tile is anywhere in its making: such bytes are
/// gathered element by element, never handed to the kernel as slices.
fn is_spans(source: &Iteration, t: &Tensor) -> bool {
    match &t.assembly {
        None => true,
        Some(Assembly::Rows(m)) => m
            .segments
            .iter()
            .all(|s| is_spans(source, &source.parts[s.part])),
        Some(Assembly::Tiles(_)) => false,
    }
}

/// A box of a tensor, in global coordinates.
#[derive(Clone, Copy)]
struct Region<'a> {
    start: &'a [u64],
    shape: &'a [u64],
}

/// Like [`copy_region`], but the bytes are those of the region cast to
/// `to`. Whole elements are converted straight from the source maps into
/// `out`, span by span as [`walk_region`] finds them: gathering them into a
/// scratch buffer first was one more copy of every source byte (a float32
/// source's view in bfloat16 reads twice the bytes it serves). An element
/// the range starts or ends inside goes through an element-sized buffer.
fn copy_cast(
    source: &Src<'_>,
    t: &Tensor,
    to: Dtype,
    region: Region<'_>,
    at: u64,
    out: &mut [u8],
    touched: &mut Touched,
) -> Result<(), SourceFault> {
    let (es_in, es_out) = (t.elem_size(), elem_size(to));
    // Elements `first..` converted into `out`, a whole number of them: the
    // walk starts at an element, so every span it finds is whole elements.
    let cast_elems = |first: u64, out: &mut [u8], touched: &mut Touched| {
        let len = out.len() as u64 / es_out * es_in;
        fill(source, t, to, region, first * es_in, len, out, touched)
    };
    // Bytes `[from, from + out.len())` of element `elem`, through a buffer
    // of one element: the range may start or end inside one.
    let part = |elem: u64, from: usize, out: &mut [u8], touched: &mut Touched| {
        let mut one = [0u8; 16];
        let one = &mut one[..es_out as usize];
        cast_elems(elem, one, touched)?;
        out.copy_from_slice(&one[from..from + out.len()]);
        Ok(())
    };
    let mut elem = at / es_out;
    let mut done = 0usize;
    let skip = (at % es_out) as usize;
    if skip != 0 {
        done = (es_out as usize - skip).min(out.len());
        part(elem, skip, &mut out[..done], touched)?;
        elem += 1;
    }
    let whole = (out.len() - done) / es_out as usize * es_out as usize;
    if whole > 0 {
        cast_elems(elem, &mut out[done..done + whole], touched)?;
        done += whole;
        elem += whole as u64 / es_out;
    }
    if done < out.len() {
        part(elem, 0, &mut out[done..], touched)?;
    }
    Ok(())
}

/// Copies bytes `[at, at + out.len())` of the row-major bytes of `region`
/// of tensor `t`, from wherever its elements are stored.
fn copy_region(
    source: &Src<'_>,
    t: &Tensor,
    region: Region<'_>,
    at: u64,
    out: &mut [u8],
    touched: &mut Touched,
) -> Result<(), SourceFault> {
    fill(
        source,
        t,
        t.dtype,
        region,
        at,
        out.len() as u64,
        out,
        touched,
    )
}

/// Fills `out` from bytes `[at, at + len)` of the row-major bytes of
/// `region` of tensor `t`, converted from the tensor's dtype to `to`: a
/// plain copy when they are the same (then `at` and `len` may cut
/// elements, unless a transposed tile is involved), else whole elements.
#[allow(clippy::too_many_arguments)]
fn fill(
    source: &Src<'_>,
    t: &Tensor,
    to: Dtype,
    region: Region<'_>,
    at: u64,
    len: u64,
    out: &mut [u8],
    touched: &mut Touched,
) -> Result<(), SourceFault> {
    match &t.assembly {
        None => fill_stored(source, t, to, region, at, len, out, touched),
        Some(Assembly::Rows(map)) => {
            let ratio = |n: u64| (n * elem_size(to) / t.elem_size()) as usize;
            let mut done = 0usize;
            for_each_run(t, map, region, at, len, |part, sub, within, n| {
                let end = done + ratio(n);
                let part = &source.parts[part];
                fill(
                    source,
                    part,
                    to,
                    sub,
                    within,
                    n,
                    &mut out[done..end],
                    touched,
                )?;
                done = end;
                Ok(())
            })
        }
        Some(Assembly::Tiles(map)) => fill_tiles(source, t, map, to, region, at, len, out, touched),
    }
}

/// [`fill`] for a stored tensor: each stored span converted as the walk
/// finds it, straight from the source map into `out`.
#[allow(clippy::too_many_arguments)]
fn fill_stored(
    source: &Src<'_>,
    t: &Tensor,
    to: Dtype,
    region: Region<'_>,
    at: u64,
    len: u64,
    out: &mut [u8],
    touched: &mut Touched,
) -> Result<(), SourceFault> {
    let (es_in, es_out) = (t.elem_size(), elem_size(to));
    let mut done = 0usize;
    walk_stored(source.home, t, region, at, len, &mut |f, src, n| {
        // Same dtype: n bytes, possibly cutting elements; a cast: whole
        // elements, each es_out bytes.
        let end = done + (n * es_out / es_in) as usize;
        cast::convert(t.dtype, to, source.bytes(f, src, n)?, &mut out[done..end]);
        touched.add(f, src, src + n);
        done = end;
        // Checked after the copy: a fault during it has set the flag by now.
        check_damage(source, f)
    })
}

/// A fault under the map of file `f` during a copy from it: the copy may
/// hold zeros, so the read fails.
fn check_damage(source: &Iteration, f: usize) -> Result<(), SourceFault> {
    let file = &source.files[f];
    if file.is_damaged() {
        return Err(SourceFault {
            path: file.path.clone(),
        });
    }
    Ok(())
}

/// Walks bytes `[at, at + len)` of the row-major bytes of `region` of
/// tensor `t` as the stored spans they lie in, in order: `emit(file,
/// offset, len)` for each, for the gather of a vectored reply ([`gather`]).
/// An error from `emit` stops the walk, and so does a transposed tile,
/// whose bytes are no spans.
fn walk_region(
    source: &Src<'_>,
    t: &Tensor,
    region: Region<'_>,
    at: u64,
    len: u64,
    emit: &mut impl FnMut(usize, u64, u64) -> Result<(), ()>,
) -> Result<(), ()> {
    match &t.assembly {
        Some(Assembly::Rows(map)) => for_each_run(t, map, region, at, len, |part, sub, w, n| {
            walk_region(source, &source.parts[part], sub, w, n, emit)
        }),
        Some(Assembly::Tiles(_)) => Err(()),
        None => walk_stored(source.home, t, region, at, len, emit),
    }
}

/// A region of a tensor assembled from rows of parts, cut at the row map's
/// segment boundaries into runs of consecutive part rows: `each(part,
/// region of the part, offset in it, bytes)` for each, in order. Rows are
/// outermost, so the runs' bytes follow each other in the output.
fn for_each_run<E>(
    t: &Tensor,
    map: &RowMap,
    region: Region<'_>,
    mut at: u64,
    len: u64,
    mut each: impl FnMut(usize, Region<'_>, u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let Some((&rows, inner)) = region.shape.split_first() else {
        return Ok(());
    };
    let row_bytes = inner.iter().product::<u64>() * t.elem_size();
    if row_bytes == 0 || rows == 0 {
        return Ok(());
    }
    let mut start = region.start.to_vec();
    let mut shape = region.shape.to_vec();
    let mut done = 0u64;
    while done < len {
        let r = at / row_bytes;
        let within = at % row_bytes;
        let (part, part_row, run) = map.locate(region.start[0] + r);
        let run = run.min(rows - r);
        start[0] = part_row;
        shape[0] = run;
        let n = (run * row_bytes - within).min(len - done);
        let sub = Region {
            start: &start,
            shape: &shape,
        };
        each(part, sub, within, n)?;
        done += n;
        at += n;
    }
    Ok(())
}

/// [`fill`] for a 2-D tensor made of tiles ([`TileMap`]): whole elements
/// only (`at` and `len` are multiples of the element size). The range is
/// cut into blocks of whole rows within one band (or a piece of one row at
/// the range's ends), and each block into its tiles: a copied tile is read
/// row by row from its part, a transposed one by [`transpose_from`].
#[allow(clippy::too_many_arguments)]
fn fill_tiles(
    source: &Src<'_>,
    t: &Tensor,
    map: &TileMap,
    to: Dtype,
    region: Region<'_>,
    at: u64,
    len: u64,
    out: &mut [u8],
    touched: &mut Touched,
) -> Result<(), SourceFault> {
    let (es_in, es_out) = (t.elem_size(), elem_size(to));
    let (&[r0, c0], &[_, cols]) = (region.start, region.shape) else {
        return Ok(());
    };
    if cols == 0 || es_in == 0 {
        return Ok(());
    }
    let mut e = at / es_in;
    let end = e + len / es_in;
    let mut o = 0usize;
    while e < end {
        let (i, j) = (e / cols, e % cols);
        let row = r0 + i;
        let band = map.band(row);
        let left = end - e;
        // Whole rows to the band's end, or what is left of this row.
        let (nrows, gcol, ncols) = if j == 0 && left >= cols {
            ((left / cols).min(band.start + band.rows - row), c0, cols)
        } else {
            (1, c0 + j, (cols - j).min(left))
        };
        let n = (nrows * ncols * es_out) as usize;
        let block = Block {
            row,
            rows: nrows,
            col: gcol,
            cols: ncols,
        };
        fill_block(source, band, to, block, &mut out[o..o + n], touched)?;
        o += n;
        e += nrows * ncols;
    }
    Ok(())
}

/// Rows `row..row+rows` and columns `col..col+cols` of a tiled tensor, in
/// global coordinates, all in one band.
#[derive(Clone, Copy)]
struct Block {
    row: u64,
    rows: u64,
    col: u64,
    cols: u64,
}

/// One block of a band into `out` (row-major, `block.cols` elements of
/// `to` per row), tile by tile.
fn fill_block(
    source: &Src<'_>,
    band: &crate::checkpoint::source::Band,
    to: Dtype,
    block: Block,
    out: &mut [u8],
    touched: &mut Touched,
) -> Result<(), SourceFault> {
    let es_out = elem_size(to) as usize;
    let stride = block.cols as usize * es_out;
    let first = band.tiles.partition_point(|t| t.col + t.cols <= block.col);
    for tile in &band.tiles[first..] {
        if tile.col >= block.col + block.cols {
            break;
        }
        let a = tile.col.max(block.col);
        let b = (tile.col + tile.cols).min(block.col + block.cols);
        let in_band = block.row - band.start..block.row - band.start + block.rows;
        let (prows, pcols) = tile.source(in_band, a - tile.col..b - tile.col);
        let part = &source.parts[tile.part];
        let dst = &mut out[(a - block.col) as usize * es_out..];
        if tile.transposed {
            transpose_from(source, part, to, prows, pcols, dst, stride, touched)?;
            continue;
        }
        // Copied: the part's rows, each into its row of the block.
        let width = (b - a) as usize * es_out;
        for (q, prow) in prows.enumerate() {
            let (start, shape) = ([prow, pcols.start], [1, pcols.end - pcols.start]);
            let sub = Region {
                start: &start,
                shape: &shape,
            };
            let n = shape[1] * part.elem_size();
            let at = q * stride;
            fill(
                source,
                part,
                to,
                sub,
                0,
                n,
                &mut dst[at..at + width],
                touched,
            )?;
        }
    }
    Ok(())
}

/// Writes the transpose of rows `prows` x columns `pcols` of 2-D tensor
/// `part` into `dst`: output row `q`, column `c` is the part's element
/// `(prows.start + c, pcols.start + q)`, cast to `to`; output rows are
/// `stride` bytes apart. Straight from the source map where the rectangle
/// lies in stored slices (cut at their edges), a cache-friendly block at a
/// time; through a small buffer when the part is itself assembled.
#[allow(clippy::too_many_arguments)]
fn transpose_from(
    source: &Src<'_>,
    part: &Tensor,
    to: Dtype,
    prows: std::ops::Range<u64>,
    pcols: std::ops::Range<u64>,
    dst: &mut [u8],
    stride: usize,
    touched: &mut Touched,
) -> Result<(), SourceFault> {
    let (es_in, es_out) = (part.elem_size() as usize, elem_size(to) as usize);
    if part.assembly.is_some() {
        // Read the rectangle row-major, a bounded piece at a time, then
        // transpose it from the buffer.
        const ROWS: u64 = 64;
        let mut buf = Vec::new();
        let mut r = prows.start;
        while r < prows.end {
            let n = ROWS.min(prows.end - r);
            let width = pcols.end - pcols.start;
            buf.resize((n * width) as usize * es_out, 0);
            let (start, shape) = ([r, pcols.start], [n, width]);
            let sub = Region {
                start: &start,
                shape: &shape,
            };
            let len = n * width * part.elem_size();
            // Whole elements, so the cast path's element handling is not
            // needed: `fill` converts span by span.
            fill(source, part, to, sub, 0, len, &mut buf, touched)?;
            // The buffer's `n` rows of `width` elements become output
            // columns `r - prows.start ..`, one output row per part column.
            let c0 = (r - prows.start) as usize * es_out;
            transpose(
                &buf,
                width as usize * es_out,
                es_out,
                n as usize,
                width as usize,
                &mut dst[c0..],
                stride,
            );
            r += n;
        }
        return Ok(());
    }
    // A stored part: cut the rectangle at its slices' edges; each piece
    // lies in one stored slice, whose rows are `row_bytes` apart in a file.
    let (Some(&ch0), Some(&ch1)) = (part.chunk_shape.first(), part.chunk_shape.get(1)) else {
        return Ok(());
    };
    let mut r = prows.start;
    while r < prows.end {
        let r_end = prows.end.min((r / ch0 + 1) * ch0);
        let mut c = pcols.start;
        while c < pcols.end {
            let c_end = pcols.end.min((c / ch1 + 1) * ch1);
            let k = (r / ch0) * part.frag[1] + c / ch1;
            let chunk = &part.chunks[k as usize];
            let (file, offset) = chunk.read_from(source.home);
            let row_bytes = chunk.stored_shape[1] as usize * es_in;
            let first = offset
                + ((r - chunk.origin[0]) * chunk.stored_shape[1] + (c - chunk.origin[1]))
                    * es_in as u64;
            let (nr, nc) = ((r_end - r) as usize, (c_end - c) as usize);
            let span = ((nr - 1) * row_bytes + nc * es_in) as u64;
            let src = source.bytes(file, first, span)?;
            // Output rows (c..c_end of the part) start at output row c - pcols.start,
            // output columns (r..r_end) at r - prows.start.
            let at = (c - pcols.start) as usize * stride + (r - prows.start) as usize * es_out;
            if part.dtype == to {
                transpose(src, row_bytes, es_in, nr, nc, &mut dst[at..], stride);
            } else {
                // Transposed in the source dtype into a buffer, then each
                // output row cast.
                let mut buf = vec![0u8; nr * nc * es_in];
                transpose(src, row_bytes, es_in, nr, nc, &mut buf, nr * es_in);
                for q in 0..nc {
                    let o = at + q * stride;
                    cast::convert(
                        part.dtype,
                        to,
                        &buf[q * nr * es_in..(q + 1) * nr * es_in],
                        &mut dst[o..o + nr * es_out],
                    );
                }
            }
            touched.add(file, first, first + span);
            check_damage(source, file)?;
            c = c_end;
        }
        r = r_end;
    }
    Ok(())
}

/// `dst[q][c] = src[c][q]` for `c < rows` (rows of `src`, `src_stride`
/// bytes apart) and `q < cols` (elements of `es` bytes along them); rows of
/// `dst` are `dst_stride` bytes apart. In square blocks, so that both sides
/// stay in cache.
fn transpose(
    src: &[u8],
    src_stride: usize,
    es: usize,
    rows: usize,
    cols: usize,
    dst: &mut [u8],
    dst_stride: usize,
) {
    match es {
        1 => transpose_n::<1>(src, src_stride, rows, cols, dst, dst_stride),
        2 => transpose_n::<2>(src, src_stride, rows, cols, dst, dst_stride),
        4 => transpose_n::<4>(src, src_stride, rows, cols, dst, dst_stride),
        8 => transpose_n::<8>(src, src_stride, rows, cols, dst, dst_stride),
        _ => {
            for c in 0..rows {
                for q in 0..cols {
                    let s = c * src_stride + q * es;
                    let d = q * dst_stride + c * es;
                    dst[d..d + es].copy_from_slice(&src[s..s + es]);
                }
            }
        }
    }
}

fn transpose_n<const N: usize>(
    src: &[u8],
    src_stride: usize,
    rows: usize,
    cols: usize,
    dst: &mut [u8],
    dst_stride: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    // Every element read and written lies inside the slices: checked once
    // here, so the loop below indexes by pointer (a bounds check and a
    // memcpy call per 2-byte element made it 0.25 GB/s).
    assert!((rows - 1) * src_stride + cols * N <= src.len());
    assert!((cols - 1) * dst_stride + rows * N <= dst.len());
    // Square blocks: B source rows stay in cache while their B columns are
    // written out, and B destination rows while they are filled. On the
    // bench's Q5 shape (bf16, 2048 x 256, `transpose_speed`): B = 8 2.2
    // GB/s, 16 9.3-9.9, 32 9.3-10.3, 64 7.0.
    const B: usize = 16;
    let (s0, d0) = (src.as_ptr(), dst.as_mut_ptr());
    for c0 in (0..rows).step_by(B) {
        let c1 = (c0 + B).min(rows);
        for q0 in (0..cols).step_by(B) {
            let q1 = (q0 + B).min(cols);
            for q in q0..q1 {
                for c in c0..c1 {
                    // SAFETY: c < rows and q < cols, so both ranges of N
                    // bytes lie inside the slices (asserted above), and a
                    // shared and a mutable slice never overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            s0.add(c * src_stride + q * N),
                            d0.add(q * dst_stride + c * N),
                            N,
                        );
                    }
                }
            }
        }
    }
}

/// A region of a stored tensor, walked run by run through its slices.
fn walk_stored<E>(
    home: &[usize],
    t: &Tensor,
    region: Region<'_>,
    mut at: u64,
    len: u64,
    emit: &mut impl FnMut(usize, u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let es = t.elem_size();
    let shape = region.shape;
    let start = region.start;
    let n = shape.len();
    // A region whose bytes are one span of one slice (a Hugging Face part
    // behind a fused tensor, a row split): one span, without the per-run
    // walk below. Fused gate/up rows are 8 KiB each at hidden 4096, so the
    // walk's set-up per row was a measurable share of a fused view's copy.
    if let Some((f, src)) = stored_span(home, t, region, at, len) {
        return emit(f, src, len);
    }
    // Coordinates of the run's first element: local, global, and its source
    // slice in the grid. Allocated once per call, rewritten per run (runs can
    // be as short as one row piece).
    let mut idx = vec![0u64; n];
    let mut global = vec![0u64; n];
    let mut grid = vec![0u64; n];
    let mut done = 0u64;
    while done < len {
        let elem = at / es;
        let intra = at % es;
        unravel_into(elem, shape, &mut idx);
        for d in 0..n {
            global[d] = start[d] + idx[d];
            grid[d] = global[d] / t.chunk_shape[d];
        }
        let chunk = &t.chunks[ravel(&grid, &t.frag) as usize];

        // Grow the run outward while the inner dimensions are whole in both
        // the target slice and the stored slice (same extent, same origin).
        let mut run_elems = 1u64;
        if n > 0 {
            let mut d = n - 1;
            let mut inner = 1u64;
            while d > 0 && chunk.stored_shape[d] == shape[d] && chunk.origin[d] == start[d] {
                inner *= shape[d];
                d -= 1;
            }
            let piece_end = shape[d].min((grid[d] + 1) * t.chunk_shape[d] - start[d]);
            let passed = ravel(&idx[d + 1..], &shape[d + 1..]);
            run_elems = (piece_end - idx[d]) * inner - passed;
        }
        let src_elem = (0..n).fold(0u64, |acc, d| {
            acc * chunk.stored_shape[d] + (global[d] - chunk.origin[d])
        });
        let (file, offset) = chunk.read_from(home);
        let src = offset + src_elem * es + intra;
        let take = (run_elems * es - intra).min(len - done);
        emit(file, src, take)?;
        done += take;
        at += take;
    }
    Ok(())
}

/// The engine's own behaviour on checkpoints small enough to reason about
/// by hand (the property tests in tests/engine_props.rs cover random
/// layouts against element-wise slicing).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::Source;
    use crate::checkpoint::source::tests::{band, data_start, f32s, tile, write_st};
    use crate::reshard::plan::ViewOptions;
    use crate::reshard::target::TargetSpec;
    use serde_json::json;
    use std::path::Path;

    const F0: &str = "model-0000000-0000002.safetensors";
    const F1: &str = "model-0000001-0000002.safetensors";

    /// `w` f32 `[4, 2]` with `w[i][j] = 2i + j`, split on dimension 1 over
    /// two ranks (rank r holds column r), and `n` f32 `[2]` = [8, 9] held
    /// whole by both: a column split, whose rows are 4-byte runs.
    fn columns(dir: &Path) {
        let col = |r: usize| f32s(&(0..4).map(|i| (2 * i + r) as f32).collect::<Vec<_>>());
        let n = f32s(&[8.0, 9.0]);
        write_st(
            dir,
            F0,
            &[("n", "F32", &[2], &n), ("w", "F32", &[4, 1], &col(0))],
        );
        write_st(
            dir,
            F1,
            &[("n", "F32", &[2], &n), ("w", "F32", &[4, 1], &col(1))],
        );
        let entry = |f: &str, r: u64| json!([{"file_name": f, "storage_rank": r}]);
        let meta = json!({
            "state_dict_metadata": {
                "n": {"properties": {"dtype": "Float32"}, "global_shape": [2],
                      "axis_fragmentations": [1], "layout": null,
                      "chunk": [{"global_offset": [0], "local_shape": [2]}]},
                "w": {"properties": {"dtype": "Float32"}, "global_shape": [4, 2],
                      "axis_fragmentations": [1, 2],
                      "layout": {"device_matrix": [2], "tensor_map": [-1, 0],
                                 "alias_name": ["tp"], "rank_list": [0, 1]},
                      "chunk": [{"global_offset": [0], "local_shape": [4, 1]},
                                {"global_offset": [1], "local_shape": [4, 1]}]}},
            "storage_data": {
                "('n', (0,))": [{"file_name": F0, "storage_rank": 0},
                                {"file_name": F1, "storage_rank": 1}],
                "('w', (0,))": entry(F0, 0),
                "('w', (1,))": entry(F1, 1)}
        });
        std::fs::write(dir.join("metadata.json"), meta.to_string()).unwrap();
    }

    fn unshard(dir: &Path, dtype: Option<Dtype>) -> Plan {
        let options = ViewOptions {
            dtype,
            ..ViewOptions::default()
        };
        Plan::build_with(Source::open(dir).unwrap(), TargetSpec::Unshard, options).unwrap()
    }

    /// The view file's data section, by hand: n then w, row-major.
    fn want_data() -> Vec<u8> {
        let mut v = f32s(&[8.0, 9.0]);
        v.extend(f32s(&(0..8).map(|x| x as f32).collect::<Vec<_>>()));
        v
    }

    fn read_all(plan: &Plan, from: u64, len: usize) -> (Vec<u8>, Served) {
        let mut buf = vec![0u8; len];
        let got = Engine::new(plan).read(0, 0, from, &mut buf).unwrap();
        buf.truncate(got.bytes);
        (buf, got)
    }

    #[test]
    fn a_column_split_reads_back_whole_at_any_offset() {
        let tmp = tempfile::tempdir().unwrap();
        columns(tmp.path());
        let plan = unshard(tmp.path(), None);
        let vf = &plan.iterations[0].files[0];
        let hlen = vf.header.len();
        assert_eq!(vf.size as usize, hlen + 40);
        let (all, served) = read_all(&plan, 0, 4096);
        assert_eq!(&all[..hlen], vf.header.as_slice());
        assert_eq!(&all[hlen..], want_data().as_slice());
        assert_eq!(served.bytes, hlen + 40);
        assert_eq!(served.from_source, 40, "the header is generated");
        // Any range, starting and ending inside elements and the header.
        for from in [0, 3, hlen as u64 - 1, hlen as u64 + 5, hlen as u64 + 13] {
            for len in [1, 2, 7, 33, 4096] {
                let (part, _) = read_all(&plan, from, len);
                let end = (from as usize + len).min(all.len());
                assert_eq!(part, &all[from as usize..end], "from {from} len {len}");
            }
        }
        // At and past the end: nothing.
        assert_eq!(read_all(&plan, vf.size, 10).0, Vec::<u8>::new());
        assert_eq!(read_all(&plan, vf.size + 100, 10).1, Served::default());
    }

    #[test]
    fn gather_lists_the_runs_and_merges_what_is_contiguous() {
        let tmp = tempfile::tempdir().unwrap();
        columns(tmp.path());
        let plan = unshard(tmp.path(), None);
        let (source, vf) = (&plan.source.iterations[0], &plan.iterations[0].files[0]);
        let hlen = vf.header.len();
        let mut pieces = Vec::new();
        gather(source, vf, 0, vf.size, 100, &mut pieces).unwrap();
        // The header, then n and w's rows: one element from each file in
        // turn, n and w[0][0] one piece (they follow each other in rank 0's
        // file).
        assert_eq!(
            pieces[0],
            Piece::Header {
                start: 0,
                end: hlen
            }
        );
        assert_eq!(pieces.len(), 1 + 8);
        assert!(
            matches!(pieces[1], Piece::Source { len: 12, .. }),
            "{:?}",
            pieces[1]
        );
        let files: Vec<usize> = pieces[1..]
            .iter()
            .map(|p| match p {
                Piece::Source { file, .. } => *file,
                Piece::Header { .. } => panic!("a header piece among the data"),
            })
            .collect();
        let (f0, f1) = (
            source.tensors[0].chunks[0].file,
            1 - source.tensors[0].chunks[0].file,
        );
        assert_eq!(files, vec![f0, f1, f0, f1, f0, f1, f0, f1]);
        let bytes = with_pieces(source, vf, &pieces, |s| {
            s.iter()
                .flat_map(|b| b.iter().copied())
                .collect::<Vec<u8>>()
        })
        .unwrap();
        assert_eq!(bytes, read_all(&plan, 0, vf.size as usize).0);
        // Too many pieces for `max`, past the end, or empty: no list.
        assert!(gather(source, vf, 0, vf.size, 8, &mut pieces).is_none());
        assert!(gather(source, vf, 0, vf.size + 1, 100, &mut pieces).is_none());
        assert!(gather(source, vf, 0, 0, 100, &mut pieces).is_none());
        // A range starting at the data: no header piece, not even an
        // empty one; n and w[0][0], 12 bytes of rank 0's file.
        gather(source, vf, hlen as u64, 12, 100, &mut pieces).unwrap();
        assert_eq!(pieces.len(), 1, "{pieces:?}");
        assert!(matches!(pieces[0], Piece::Source { len: 12, .. }));
        // A range inside w's rows: partial elements at both ends.
        let at = hlen as u64 + 8 + 2;
        gather(source, vf, at, 5, 100, &mut pieces).unwrap();
        let bytes = with_pieces(source, vf, &pieces, |s| {
            s.iter()
                .flat_map(|b| b.iter().copied())
                .collect::<Vec<u8>>()
        })
        .unwrap();
        assert_eq!(bytes, want_data()[10..15]);
    }

    #[test]
    fn a_cast_converts_every_element_and_never_gathers() {
        let tmp = tempfile::tempdir().unwrap();
        columns(tmp.path());
        let plan = unshard(tmp.path(), Some(Dtype::BF16));
        let (source, vf) = (&plan.source.iterations[0], &plan.iterations[0].files[0]);
        let hlen = vf.header.len();
        assert_eq!(vf.size as usize, hlen + 20);
        // Small integers are exact in bfloat16: the high half of each f32.
        let want: Vec<u8> = (0..10)
            .map(|i| [8.0f32, 9.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0][i])
            .flat_map(|v: f32| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let (all, _) = read_all(&plan, 0, 4096);
        assert_eq!(&all[hlen..], want.as_slice());
        // Odd offsets and lengths cut elements: the bytes are the same.
        for from in (hlen as u64..vf.size).step_by(3) {
            let (part, _) = read_all(&plan, from, 5);
            let end = (from as usize + 5).min(all.len());
            assert_eq!(part, &all[from as usize..end], "from {from}");
        }
        let mut pieces = Vec::new();
        assert!(gather(source, vf, hlen as u64, 20, 100, &mut pieces).is_none());
    }

    #[test]
    fn touched_spans_merge_when_close_and_stay_apart_when_far() {
        const MIB: u64 = 1 << 20;
        let mut t = Touched::default();
        t.add(0, 0, 100);
        t.add(0, 100, 200);
        t.add(0, MIB, MIB + 10);
        assert_eq!(t.0, vec![(0, 0, MIB + 10)], "within 2 MiB: one span");
        t.add(1, 0, 10);
        t.add(0, 100 * MIB, 100 * MIB + 1);
        assert_eq!(t.0.len(), 3, "other files and far spans stay apart");
        // Counted in whole 2 MiB units: [0, 1 MiB+10) -> 2 MiB; file 1 -> 2
        // MiB; the byte at 100 MiB -> 2 MiB.
        assert_eq!(t.span_bytes(), 6 * MIB);
    }

    /// The spans a read copied from, by source file: in each rank file
    /// the data follows an 8-byte length and the header it gives; n (8
    /// bytes, read from rank 0's copy) then w's column (16 bytes).
    /// Released, they are forgotten.
    #[test]
    fn a_read_records_the_spans_it_copied_and_release_forgets_them() {
        let tmp = tempfile::tempdir().unwrap();
        columns(tmp.path());
        let plan = unshard(tmp.path(), None);
        let (source, vf) = (&plan.source.iterations[0], &plan.iterations[0].files[0]);
        let data_start = |name: &str| data_start(&tmp.path().join(name));
        let file = |name: &str| source.files.iter().position(|f| f.name == name).unwrap();
        let (f0, f1) = (file(F0), file(F1));
        assert_eq!(source.tensors[0].name, "n");
        assert_eq!(source.tensors[0].chunks[0].file, f0, "n read from rank 0");
        let (d0, d1) = (data_start(F0), data_start(F1));
        let mut touched = Touched::default();
        let mut buf = vec![0u8; vf.size as usize];
        read_file(source, vf, 0, &mut buf, &mut touched).unwrap();
        let mut got = touched.0.clone();
        got.sort_unstable();
        let mut want = vec![(f0, d0, d0 + 24), (f1, d1 + 8, d1 + 24)];
        want.sort_unstable();
        assert_eq!(got, want);
        touched.release(source);
        assert!(touched.0.is_empty());
        assert_eq!(touched.span_bytes(), 0);
    }

    /// The one-span fast path of the copy: a range of a region that is one
    /// stored slice's whole rows is one span of its file, at the slice's
    /// offset plus the range's; a region that cuts the slice's inner
    /// dimension is not. Offsets by hand from the rank files' layout (n,
    /// then w's column, after the header).
    #[test]
    fn a_range_of_one_slices_rows_is_one_span() {
        let tmp = tempfile::tempdir().unwrap();
        columns(tmp.path());
        let plan = unshard(tmp.path(), None);
        let source = &plan.source.iterations[0];
        let data_start = |name: &str| data_start(&tmp.path().join(name));
        let file = |name: &str| source.files.iter().position(|f| f.name == name).unwrap();
        let (n, w) = (&source.tensors[0], &source.tensors[1]);
        assert_eq!((n.name.as_str(), w.name.as_str()), ("n", "w"));
        let region = |start: &'static [u64], shape: &'static [u64]| Region { start, shape };
        // w's column 1 (rank 1's slice, after n's 8 bytes): rows 1..4 are
        // bytes 4..16 of the region, the last byte the slice's last.
        assert_eq!(
            stored_span(&[], w, region(&[0, 1], &[4, 1]), 4, 12),
            Some((file(F1), data_start(F1) + 8 + 4))
        );
        assert_eq!(
            stored_span(&[], w, region(&[0, 1], &[4, 1]), 0, 1),
            Some((file(F1), data_start(F1) + 8))
        );
        // n's second element, from rank 0's copy.
        assert_eq!(
            stored_span(&[], n, region(&[0], &[2]), 4, 4),
            Some((file(F0), data_start(F0) + 4))
        );
        // Both columns: rows are not contiguous in any file.
        assert_eq!(stored_span(&[], w, region(&[0, 0], &[4, 2]), 0, 8), None);
    }

    /// A one-rank checkpoint in `dir`: `w`, f32 `[rows, cols]`, bytes
    /// `i % 251`; returns its rank file's bytes.
    fn one_rank(dir: &Path, rows: u64, cols: u64) -> Vec<u8> {
        let data: Vec<u8> = (0..rows * cols * 4).map(|i| (i % 251) as u8).collect();
        let file =
            crate::checkpoint::source::tests::safetensors(&[("w", "F32", &[rows, cols], &data)]);
        std::fs::write(dir.join(ONE), &file).unwrap();
        let meta = json!({
            "state_dict_metadata": {
                "w": {"properties": {"dtype": "Float32"}, "global_shape": [rows, cols],
                      "axis_fragmentations": [1, 1], "layout": null,
                      "chunk": [{"global_offset": [0], "local_shape": [rows, cols]}]}},
            "storage_data": {"('w', (0,))": [{"file_name": ONE, "storage_rank": 0}]}
        });
        std::fs::write(dir.join("metadata.json"), meta.to_string()).unwrap();
        file
    }

    const ONE: &str = "model-0000000-0000001.safetensors";

    /// View offset of byte `at` of the rank file of [`one_rank`], whose
    /// data the view's one tensor is.
    fn view_offset(plan: &Plan, file: &[u8], at: u64) -> u64 {
        let data_start = 8 + u64::from_le_bytes(file[..8].try_into().unwrap());
        plan.iterations[0].files[0].tensors[0].offset + at - data_start
    }

    /// An object's bytes come from the store's blocks (8 MiB): a range
    /// inside block 1 or 2, one across a boundary, one ending on the first
    /// byte of block 1, one from two bytes into block 1 to two bytes into
    /// block 2, and the whole tensor are the rank file's own bytes.
    #[test]
    fn an_objects_bytes_are_its_blocks_at_any_offset() {
        use crate::checkpoint::s3::mem::Objects;
        use crate::checkpoint::s3::store::{BLOCK_SIZE, ObjectStore, register};
        let tmp = tempfile::tempdir().unwrap();
        // 20 MiB of data: blocks 0, 1 and 2.
        let file = one_rank(tmp.path(), 5, 1 << 20);
        let objects = std::sync::Arc::new(Objects::new("mem-engine-blocks"));
        for name in [ONE, "metadata.json"] {
            objects.put(
                &format!("ck/{name}"),
                std::fs::read(tmp.path().join(name)).unwrap(),
            );
        }
        register(ObjectStore::new(objects, 64 << 20));
        let src = Source::open(Path::new("s3://mem-engine-blocks/ck")).unwrap();
        let plan = Plan::build(src, TargetSpec::Unshard).unwrap();
        let engine = Engine::new(&plan);
        let bs = BLOCK_SIZE;
        let data_start = 8 + u64::from_le_bytes(file[..8].try_into().unwrap());
        let end = file.len() as u64;
        for (from, to) in [
            (bs + 100, bs + 4196),
            (2 * bs + 8, 2 * bs + 1000),
            (bs - 10, bs + 10),
            (bs - 100, bs + 1),
            (bs + 2, 2 * bs + 2),
            (data_start, end),
        ] {
            let mut buf = vec![0u8; (to - from) as usize];
            let got = engine
                .read(0, 0, view_offset(&plan, &file, from), &mut buf)
                .unwrap();
            assert_eq!(got.bytes, buf.len());
            assert!(
                buf == file[from as usize..to as usize],
                "rank file bytes {from}..{to}"
            );
        }
    }

    /// The Rss of the maps of `path` in this process, in KiB.
    fn mapped_kib(path: &Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let path = path.to_str().unwrap();
        let mut total = 0;
        let mut ours = false;
        for line in smaps.lines() {
            if let Some(kib) = line.strip_prefix("Rss:") {
                if ours {
                    total += kib
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap();
                }
            } else if line.contains('-') && line.split_whitespace().count() >= 5 {
                // A map's first line: range, perms, offset, dev, inode [path].
                ours = line.ends_with(path);
            }
        }
        total
    }

    /// Releasing what a read copied from unmaps those pages: the source
    /// map's Rss falls back to nothing (what bounds the daemon's RSS).
    #[test]
    fn release_unmaps_the_pages_a_read_touched() {
        let tmp = tempfile::tempdir().unwrap();
        // 8 MiB of data, four 2 MiB release units.
        one_rank(tmp.path(), 2, 1 << 20);
        let plan = unshard(tmp.path(), None);
        let (source, vf) = (&plan.source.iterations[0], &plan.iterations[0].files[0]);
        let path = source.files[0].path.clone();
        let mut touched = Touched::default();
        let mut buf = vec![0u8; vf.size as usize];
        read_file(source, vf, 0, &mut buf, &mut touched).unwrap();
        let before = mapped_kib(&path);
        assert!(before >= 4 << 10, "{before} KiB mapped after reading 8 MiB");
        touched.release(source);
        assert_eq!(mapped_kib(&path), 0, "{before} KiB mapped before");
    }

    /// Pins keep every block a read copies from, the first 16 in place
    /// and the rest in the next list, each handed back unchanged; a block
    /// kept again is the same slice.
    #[test]
    fn pins_keep_every_block_they_are_given() {
        let pins = Pins::default();
        let blocks: Vec<std::sync::Arc<[u8]>> = (0..40u8)
            .map(|i| std::sync::Arc::from(vec![i; 3]))
            .collect();
        let kept: Vec<&[u8]> = blocks.iter().map(|b| pins.keep(b.clone())).collect();
        for (i, k) in kept.iter().enumerate() {
            assert_eq!(*k, &[i as u8; 3][..], "block {i}");
        }
        assert!(std::ptr::eq(pins.keep(blocks[3].clone()), kept[3]));
        assert_eq!(pins.used.get(), 16);
    }

    /// `p` f32 `[4, 4]`, `p[i][j] = 10i + j`, cut in four quarters over
    /// four ranks: rank `r` holds rows `2(r / 2)..`, columns `2(r % 2)..`
    /// (device matrix `[2, 2]`, tensor map `[1, 0]`; slice `k` = rank `k`).
    fn quarters(dir: &Path) {
        let mut storage = serde_json::Map::new();
        for r in 0..4u64 {
            let (r0, c0) = (2 * (r / 2), 2 * (r % 2));
            let q: Vec<f32> = (0..4)
                .map(|e| (10 * (r0 + e / 2) + c0 + e % 2) as f32)
                .collect();
            let name = format!("model-{r:07}-0000004.safetensors");
            write_st(dir, &name, &[("p", "F32", &[2, 2], &f32s(&q))]);
            storage.insert(
                format!("('p', ({r},))"),
                json!([{"file_name": name, "storage_rank": r, "rank_group": [r]}]),
            );
        }
        let meta = json!({
            "state_dict_metadata": {
                "p": {"properties": {"dtype": "Float32"}, "global_shape": [4, 4],
                      "axis_fragmentations": [2, 2],
                      "layout": {"device_matrix": [2, 2], "tensor_map": [1, 0],
                                 "alias_name": ["dp", "tp"], "rank_list": [0, 1, 2, 3]},
                      "chunk": (0..4).map(|k| json!({"global_offset": [k], "local_shape": [2, 2]}))
                          .collect::<Vec<_>>()}},
            "storage_data": storage,
        });
        std::fs::write(dir.join("metadata.json"), meta.to_string()).unwrap();
    }

    fn p(i: u64, j: u64) -> f32 {
        (10 * i + j) as f32
    }

    /// Where `p[i][j]` lies: (rank, byte offset in that rank's file).
    fn p_at(dir: &Path, i: u64, j: u64) -> (u64, u64) {
        let r = 2 * (i / 2) + j / 2;
        let data = data_start(&dir.join(format!("model-{r:07}-0000004.safetensors")));
        (r, data + 4 * (2 * (i % 2) + j % 2))
    }

    /// The runs a walk over a region of `p` emits, as (rank, offset, len):
    /// each the longest stretch of one file the range holds, in order.
    #[test]
    fn a_walk_emits_the_longest_runs_of_one_file() {
        let tmp = tempfile::tempdir().unwrap();
        quarters(tmp.path());
        let src = Source::open(tmp.path()).unwrap();
        let it = &src.iterations[0];
        let t = &it.tensors[0];
        let home: Vec<usize> = (0..it.files.len()).collect();
        let rank = |f: usize| {
            let name = &it.files[f].name;
            name[6..13].parse::<u64>().unwrap()
        };
        let walk = |start: [u64; 2], shape: [u64; 2], at: u64, len: u64| {
            let mut runs = Vec::new();
            let region = Region {
                start: &start,
                shape: &shape,
            };
            walk_stored::<()>(&home, t, region, at, len, &mut |f, o, n| {
                runs.push((rank(f), o, n));
                Ok(())
            })
            .unwrap();
            runs
        };
        let at = |i, j| p_at(tmp.path(), i, j);
        // The whole tensor: each row is two runs of two elements.
        let whole: Vec<(u64, u64, u64)> = (0..4)
            .flat_map(|i| {
                let ((r0, o0), (r1, o1)) = (at(i, 0), at(i, 2));
                [(r0, o0, 8), (r1, o1, 8)]
            })
            .collect();
        assert_eq!(walk([0, 0], [4, 4], 0, 64), whole);
        // One quarter, the last: one run of its whole slice.
        let (r, o) = at(2, 2);
        assert_eq!(walk([2, 2], [2, 2], 0, 16), vec![(r, o, 16)]);
        // The right half: a run per slice, two rows each; from inside an
        // element to inside another.
        let ((r1, o1), (r3, o3)) = (at(0, 2), at(2, 2));
        assert_eq!(
            walk([0, 2], [4, 2], 0, 32),
            vec![(r1, o1, 16), (r3, o3, 16)]
        );
        assert_eq!(
            walk([0, 2], [4, 2], 6, 20),
            vec![(r1, o1 + 6, 10), (r3, o3, 10)]
        );
        // Nothing asked, nothing emitted.
        assert_eq!(walk([0, 0], [4, 4], 0, 0), vec![]);
        assert_eq!(walk([2, 2], [2, 2], 0, 0), vec![]);
    }

    /// An f32 tensor of `shape` made of the tiles of `map`.
    fn tiled(name: &str, shape: [u64; 2], map: &TileMap) -> Tensor {
        Tensor {
            name: name.into(),
            kind: crate::checkpoint::names::Kind::Model,
            dtype: Dtype::F32,
            ms_dtype: "Float32".into(),
            chunk_shape: shape.to_vec(),
            global_shape: shape.to_vec(),
            layout: None,
            frag: vec![1, 1],
            chunks: Vec::new(),
            stage: 0,
            allow_shape_mismatch: false,
            allow_to_save: true,
            assembly: Some(Assembly::Tiles(map.clone())),
            rules: Default::default(),
        }
    }

    /// The runs of a 3-D tensor split on its first dimension, `e` f32
    /// `[4, 2, 3]` over two ranks (rank `r` holds `e[2r..2r + 2]`): from an
    /// element inside the first slice's second row, one run to that slice's
    /// end, then the other slice whole.
    #[test]
    fn a_walk_from_inside_a_slice_of_whole_inner_dimensions_runs_to_its_end() {
        let tmp = tempfile::tempdir().unwrap();
        let mut storage = serde_json::Map::new();
        for r in 0..2u64 {
            let e: Vec<f32> = (0..12).map(|k| (12 * r + k) as f32).collect();
            let name = format!("model-{r:07}-0000002.safetensors");
            write_st(tmp.path(), &name, &[("e", "F32", &[2, 2, 3], &f32s(&e))]);
            storage.insert(
                format!("('e', ({r},))"),
                json!([{"file_name": name, "storage_rank": r, "rank_group": [r]}]),
            );
        }
        let meta = json!({
            "state_dict_metadata": {
                "e": {"properties": {"dtype": "Float32"}, "global_shape": [4, 2, 3],
                      "axis_fragmentations": [2, 1, 1],
                      "layout": {"device_matrix": [2], "tensor_map": [0, -1, -1],
                                 "alias_name": ["tp"], "rank_list": [0, 1]},
                      "chunk": (0..2).map(|k| json!({"global_offset": [k], "local_shape": [2, 2, 3]}))
                          .collect::<Vec<_>>()}},
            "storage_data": storage,
        });
        std::fs::write(tmp.path().join("metadata.json"), meta.to_string()).unwrap();
        let src = Source::open(tmp.path()).unwrap();
        let it = &src.iterations[0];
        let home: Vec<usize> = (0..it.files.len()).collect();
        let file = |r: u64| {
            let name = format!("model-{r:07}-0000002.safetensors");
            let f = it.files.iter().position(|f| f.name == name).unwrap();
            (f, data_start(&tmp.path().join(name)))
        };
        let ((f0, d0), (f1, d1)) = (file(0), file(1));
        let (start, shape) = ([0u64, 0, 0], [4u64, 2, 3]);
        let region = Region {
            start: &start,
            shape: &shape,
        };
        // Element (0, 1, 1) is the 5th of the tensor, bytes 16.. of slice 0.
        let mut runs = Vec::new();
        walk_stored::<()>(&home, &it.tensors[0], region, 16, 80, &mut |f, o, n| {
            runs.push((f, o, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(runs, vec![(f0, d0 + 16, 32), (f1, d1, 48)]);
    }

    /// A tensor made of tiles of `p`, copied and transposed, each cutting
    /// across `p`'s quarters, and one made of a transposed tile of that
    /// assembled tensor: every element where the tiles' definition puts
    /// it (`source::Tile`), in f32 and cast to bf16, at any offset.
    #[test]
    fn tiles_copied_and_transposed_across_slices_read_back_as_defined() {
        let tmp = tempfile::tempdir().unwrap();
        quarters(tmp.path());
        // m [4, 6]: rows 0..3 are p[1 + i][j] for j < 3, then p[j][1 + i];
        // row 3 is p[j][3] for j < 4, then p[2][1 + j].
        let m_map = TileMap {
            bands: vec![
                band(
                    0,
                    3,
                    vec![tile(0, 3, 0, 1, 0, false), tile(3, 3, 0, 0, 1, true)],
                ),
                band(
                    3,
                    1,
                    vec![tile(0, 4, 0, 0, 3, true), tile(4, 2, 0, 2, 1, false)],
                ),
            ],
        };
        let m = |i: u64, j: u64| match (i, j) {
            (0..3, 0..3) => p(1 + i, j),
            (0..3, _) => p(j - 3, 1 + i),
            (_, 0..4) => p(j, 3),
            _ => p(2, 1 + (j - 4)),
        };
        // n [6, 4]: the transpose of m, out of m itself.
        let n_map = TileMap {
            bands: vec![band(0, 6, vec![tile(0, 4, 1, 0, 0, true)])],
        };
        let mut want = Vec::new();
        for i in 0..4 {
            want.extend((0..6).map(|j| m(i, j)));
        }
        for i in 0..6 {
            want.extend((0..4).map(|j| m(j, i)));
        }
        for dtype in [None, Some(Dtype::BF16)] {
            let mut src = Source::open(tmp.path()).unwrap();
            let it = &mut src.iterations[0];
            let p_t = it.tensors.remove(0);
            it.parts = vec![p_t, tiled("m", [4, 6], &m_map)];
            it.tensors = vec![tiled("m", [4, 6], &m_map), tiled("n", [6, 4], &n_map)];
            let options = ViewOptions {
                dtype,
                ..ViewOptions::default()
            };
            let plan = Plan::build_with(src, TargetSpec::Unshard, options).unwrap();
            let hlen = plan.iterations[0].files[0].header.len();
            let data: Vec<u8> = match dtype {
                None => f32s(&want),
                // Small integers: bf16 holds them exactly, in f32's top half.
                Some(_) => want
                    .iter()
                    .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
                    .collect(),
            };
            let (all, _) = read_all(&plan, 0, 1 << 16);
            assert_eq!(&all[hlen..], data.as_slice(), "{dtype:?}");
            let es = if dtype.is_some() { 2 } else { 4 };
            // Ranges that start and end mid-row and mid-tile, in whole
            // elements (a tile's ends) and not (a cast cuts none).
            for from in (0..data.len() as u64).step_by(es * 5) {
                for len in [es, 3 * es, 7 * es, 13 * es, data.len()] {
                    let (got, _) = read_all(&plan, hlen as u64 + from, len);
                    let end = (from as usize + len).min(data.len());
                    assert_eq!(
                        got,
                        &data[from as usize..end],
                        "{dtype:?} from {from} len {len}"
                    );
                }
            }
        }
    }

    /// A transposed tile of `p` whole: each quarter is read as one span of
    /// its file (two rows of two elements), and the read records exactly
    /// those spans.
    #[test]
    fn a_transposed_tile_records_the_spans_it_read() {
        let tmp = tempfile::tempdir().unwrap();
        quarters(tmp.path());
        let mut src = Source::open(tmp.path()).unwrap();
        let it = &mut src.iterations[0];
        let p_t = it.tensors.remove(0);
        let map = TileMap {
            bands: vec![band(0, 4, vec![tile(0, 4, 0, 0, 0, true)])],
        };
        it.parts = vec![p_t];
        it.tensors = vec![tiled("t", [4, 4], &map)];
        let plan = Plan::build_with(src, TargetSpec::Unshard, ViewOptions::default()).unwrap();
        let (source, vf) = (&plan.source.iterations[0], &plan.iterations[0].files[0]);
        let mut touched = Touched::default();
        let mut buf = vec![0u8; vf.size as usize];
        read_file(source, vf, 0, &mut buf, &mut touched).unwrap();
        let want_data: Vec<f32> = (0..16).map(|e| p(e % 4, e / 4)).collect();
        assert_eq!(&buf[vf.header.len()..], f32s(&want_data).as_slice());
        let mut got = touched.0.clone();
        got.sort_unstable();
        let mut want: Vec<(usize, u64, u64)> = (0..4u64)
            .map(|r| {
                let (i, j) = (2 * (r / 2), 2 * (r % 2));
                let (_, o) = p_at(tmp.path(), i, j);
                let name = format!("model-{r:07}-0000004.safetensors");
                let f = source.files.iter().position(|f| f.name == name).unwrap();
                (f, o, o + 16)
            })
            .collect();
        want.sort_unstable();
        assert_eq!(got, want);
    }

    /// A transposed tile of an assembled part taller than the 64 rows the
    /// part is read in at a time: each piece's columns land after the
    /// previous piece's, in f32 and cast to bf16.
    #[test]
    fn a_transposed_tile_of_a_tall_assembled_part_reads_back_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let file = one_rank(tmp.path(), 70, 2);
        let data = &file[file.len() - 70 * 2 * 4..];
        // m [70, 2] copies w; n [2, 70] is m transposed.
        let m_map = TileMap {
            bands: vec![band(0, 70, vec![tile(0, 2, 0, 0, 0, false)])],
        };
        let n_map = TileMap {
            bands: vec![band(0, 2, vec![tile(0, 70, 1, 0, 0, true)])],
        };
        let mut src = Source::open(tmp.path()).unwrap();
        let it = &mut src.iterations[0];
        let w = it.tensors.remove(0);
        it.parts = vec![w, tiled("m", [70, 2], &m_map)];
        it.tensors = vec![tiled("n", [2, 70], &n_map)];
        let plan = Plan::build_with(src, TargetSpec::Unshard, ViewOptions::default()).unwrap();
        let hlen = plan.iterations[0].files[0].header.len();
        let mut want = Vec::new();
        for q in 0..2 {
            for c in 0..70 {
                let at = (c * 2 + q) * 4;
                want.extend_from_slice(&data[at..at + 4]);
            }
        }
        let (all, _) = read_all(&plan, 0, 1 << 16);
        assert!(all[hlen..] == want[..], "n read whole");
        // From the second row's middle, past the 64th column.
        let from = hlen + (70 + 60) * 4;
        let (part, _) = read_all(&plan, from as u64, 8 * 4);
        assert!(
            part[..] == want[from - hlen..from - hlen + 32],
            "n from column 60 of row 1"
        );
    }

    /// The transpose of a rectangle, for every element size (those of no
    /// dtype through the element-by-element fallback), past one 16 x 16
    /// block, between padded rows; an empty one writes nothing.
    #[test]
    fn transpose_writes_each_element_where_the_definition_puts_it() {
        for es in [1usize, 2, 3, 4, 8, 16] {
            for (rows, cols) in [(1, 1), (3, 5), (17, 2), (20, 33)] {
                let (ss, ds) = (cols * es + 3, rows * es + 5);
                let src: Vec<u8> = (0..rows * ss).map(|i| (i * 7 % 251) as u8).collect();
                let mut dst = vec![0xAAu8; cols * ds];
                transpose(&src, ss, es, rows, cols, &mut dst, ds);
                let mut want = vec![0xAAu8; cols * ds];
                for c in 0..rows {
                    for q in 0..cols {
                        let (s, d) = (c * ss + q * es, q * ds + c * es);
                        want[d..d + es].copy_from_slice(&src[s..s + es]);
                    }
                }
                assert!(dst == want, "es {es}, {rows} x {cols}");
            }
            let mut dst = vec![0xAAu8; 8];
            transpose(&[], es, es, 0, 3, &mut dst, es);
            transpose(&[], es, es, 3, 0, &mut dst, es);
            assert_eq!(dst, vec![0xAAu8; 8], "es {es}");
        }
    }

    #[test]
    fn a_replaced_source_file_fails_the_read() {
        let tmp = tempfile::tempdir().unwrap();
        columns(tmp.path());
        let plan = unshard(tmp.path(), None);
        let source = &plan.source.iterations[0];
        assert!(check_files(source, [0, 1, 0, 1]).is_ok());
        // Rank 1's file replaced by a copy of itself (another inode).
        let p = tmp.path().join(F1);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, &bytes).unwrap();
        let f1 = source.files.iter().position(|f| f.name == F1).unwrap();
        let e = check_files(source, [1 - f1, f1]).unwrap_err();
        assert_eq!(e.path, source.files[f1].path);
        let mut buf = vec![0u8; 4096];
        assert!(Engine::new(&plan).read(0, 0, 0, &mut buf).is_err());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release --lib -- --ignored transpose_speed --nocapture`
    #[test]
    #[ignore]
    fn transpose_speed() {
        // The bench's Q5 shape: one expert's gate read back out of weight1
        // (part rows of 1536 bf16, 2048 of them), 256 output rows per 1 MiB.
        let (rows, cols, es) = (2048usize, 256usize, 2usize);
        let src_stride = 1536 * es;
        let src: Vec<u8> = (0..rows * src_stride).map(|i| (i * 7) as u8).collect();
        let dst_stride = rows * es;
        let mut dst = vec![0u8; cols * dst_stride];
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for _ in 0..20 {
                transpose(&src, src_stride, es, rows, cols, &mut dst, dst_stride);
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "transpose: {:.2} GB/s of output",
                (20 * cols * dst_stride) as f64 / s / 1e9
            );
            // Against a plain copy of as many bytes (what a row split costs).
            let n = cols * dst_stride;
            let t = std::time::Instant::now();
            for _ in 0..20 {
                std::hint::black_box(&mut dst[..n])
                    .copy_from_slice(std::hint::black_box(&src[..n]));
            }
            let s = t.elapsed().as_secs_f64();
            println!("copy:      {:.2} GB/s", (20 * n) as f64 / s / 1e9);
        }
        // Checked once: dst[q][c] = src[c][q].
        assert_eq!(dst[3 * dst_stride + 5 * es], src[5 * src_stride + 3 * es]);
    }
}
