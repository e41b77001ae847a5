//! A source rank file: memory-mapped, its header checked, guarded against
//! SIGBUS, and able to tell when the file under it has changed.
//!
//! Kept apart from [`super::header`] (the pure format) because everything here
//! is about living with a file that another process may truncate, replace or
//! rewrite while a view serves from it.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::header::{StoredTensor, parse_header};
use super::s3::store::ObjectFile;
use super::{guard, storage};
use crate::bad;
use crate::error::{Result, source_io};

/// A source rank file, its header checked: memory-mapped from the file
/// system, or an object read by ranged GETs.
#[derive(Debug)]
pub struct RankFile {
    pub name: String,
    /// The name the folder gives the file (a link, in a Hub cache
    /// snapshot): what messages say, and what [`RankFile::is_unchanged`]
    /// stats, following the link, so that a link pointed elsewhere and a
    /// blob replaced under it are both seen. `s3://bucket/key` for an object.
    pub path: PathBuf,
    /// Where the file opened really is (the link's target): its folder is
    /// part of the source a mount must not hide and an export must not
    /// write into.
    pub real_path: PathBuf,
    pub tensors: HashMap<String, StoredTensor>,
    backing: Backing,
}

/// Where a rank file's bytes are.
#[derive(Debug)]
enum Backing {
    Mapped(Mapped),
    Object(ObjectFile),
}

/// A local file's map and what guards it.
#[derive(Debug)]
struct Mapped {
    map: Mmap,
    /// The file mapped, kept open to ask which of its pages are in the page
    /// cache ([`RankFile::is_resident`]). One descriptor per source file;
    /// `main` raises the soft limit on them to the hard one.
    file: File,
    /// The map's entry in the SIGBUS guard.
    region: guard::RegionId,
    /// What the path named when opened: a later change means the bytes we
    /// map are no longer the checkpoint's.
    identity: Identity,
    /// Set on a FUSE or network filesystem: how much one `MADV_WILLNEED`
    /// call reads there ([`storage::advice_window`]).
    advice_window: Option<u64>,
}

/// Device, inode, size and modification time of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Identity {
    fn of(m: &std::fs::Metadata) -> Identity {
        use std::os::unix::fs::MetadataExt;
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

/// Brings in the header's pages and only those: a fault on a fresh map
/// reads ahead a whole readahead window (8 MiB on this project's machine),
/// so parsing the header of 128 rank files read 1 GiB and took most of a
/// cold mount (0.69 s of a 70B-shaped checkpoint; see docs/PERFORMANCE.md, cold mounts).
/// Random access while the length is read, then the header range asked for
/// in one go, then normal readahead again for the data.
fn read_header_pages(map: &Mmap, path: &Path) {
    let advise = |a: memmap2::Advice| {
        if let Err(e) = map.advise(a) {
            log::debug!("{}: madvise: {e}", path.display());
        }
    };
    advise(memmap2::Advice::Random);
    if let Some(len) = map.get(..8) {
        let mut n = [0u8; 8];
        n.copy_from_slice(len);
        let end = u64::from_le_bytes(n)
            .saturating_add(8)
            .min(map.len() as u64);
        if let Err(e) = map.advise_range(memmap2::Advice::WillNeed, 0, end as usize) {
            log::debug!("{}: madvise: {e}", path.display());
        }
    }
    advise(memmap2::Advice::Normal);
}

impl RankFile {
    pub fn open(path: &Path) -> Result<RankFile> {
        let file = File::open(path).map_err(|e| source_io(path, e))?;
        RankFile::from_file(file, path)
    }

    /// A rank file from a file already opened (and checked) by the caller,
    /// so that what is mapped is exactly what was checked: reopening by
    /// path would let a symlink swapped in meanwhile escape the check.
    /// `path` names it in messages and in the later identity checks.
    pub fn from_file(file: File, path: &Path) -> Result<RankFile> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let meta = file.metadata().map_err(|e| source_io(path, e))?;
        let identity = Identity::of(&meta);
        // The kernel's own answer for the descriptor; without /proc, the
        // path resolved (the same file unless swapped meanwhile).
        let real_path = {
            use std::os::fd::AsRawFd;
            std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .or_else(|_| std::fs::canonicalize(path))
                .unwrap_or_else(|_| path.to_path_buf())
        };
        let len = meta.len();
        if len < 8 {
            return Err(bad!(
                "{}: not a safetensors file: {len} bytes, shorter than the 8-byte header length",
                path.display()
            ));
        }
        // SAFETY: a read-only map; a file changed under it is caught by the
        // SIGBUS guard and the identity check, never trusted silently.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| source_io(path, e))?;
        let region = guard::register(map.as_ptr(), map.len());
        read_header_pages(&map, path);
        let tensors = match parse_header(&map) {
            Ok(t) => t,
            Err(e) => {
                // The map is dropped here: its guard entry must not outlive it.
                guard::unregister(region);
                return Err(bad!("{}: {e}", path.display()));
            }
        };
        Ok(RankFile {
            name,
            path: path.to_path_buf(),
            real_path,
            tensors,
            backing: Backing::Mapped(Mapped {
                map,
                file,
                region,
                advice_window: storage::advice_window(identity.dev),
                identity,
            }),
        })
    }

    /// A rank file that is an object in a store, its header already read
    /// and checked by the store.
    pub fn from_object(
        path: PathBuf,
        tensors: HashMap<String, StoredTensor>,
        object: ObjectFile,
    ) -> RankFile {
        RankFile {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            real_path: path.clone(),
            path,
            tensors,
            backing: Backing::Object(object),
        }
    }

    /// The object behind the file, if it is one.
    pub fn object(&self) -> Option<&ObjectFile> {
        match &self.backing {
            Backing::Object(o) => Some(o),
            Backing::Mapped(_) => None,
        }
    }

    /// Bytes of the map; `None` for an object (read those through
    /// [`RankFile::object`]). Ranges come from headers checked at open.
    pub fn map_bytes(&self, offset: u64, len: u64) -> Option<&[u8]> {
        match &self.backing {
            Backing::Mapped(m) => Some(&m.map[offset as usize..(offset + len) as usize]),
            Backing::Object(_) => None,
        }
    }

    /// The file's length when it was opened (the length mapped).
    pub fn size(&self) -> u64 {
        match &self.backing {
            Backing::Mapped(m) => m.identity.len,
            Backing::Object(o) => o.size(),
        }
    }

    /// The open file, while it still holds the bytes that were planned
    /// ([`RankFile::is_unchanged`], not shrunk under the map): for handing
    /// the file itself to the kernel (passthrough) or to `copy_file_range`.
    /// The descriptor is the one mapped and checked, never a reopened path.
    /// `None` for an object: there is no local file to hand over.
    pub fn if_unchanged(&self) -> Option<&File> {
        let Backing::Mapped(m) = &self.backing else {
            return None;
        };
        (self.is_unchanged() && !self.is_damaged()).then_some(&m.file)
    }

    /// Drops `[offset, offset+len)` from this process's page tables once
    /// copied: the pages stay in the page cache (a later read maps them again
    /// at the cost of a minor fault), but they no longer count towards the
    /// process's RSS, which the cache budget alone should bound.
    pub fn release(&self, offset: u64, len: u64) {
        let Backing::Mapped(m) = &self.backing else {
            return;
        };
        // Widen to whole 2 MiB spans: the kernel maps large folios and
        // faults around a touched page, so pages just outside the range
        // were mapped by this read too.
        const SPAN: u64 = 2 << 20;
        let end = (offset + len)
            .next_multiple_of(SPAN)
            .min(m.map.len() as u64);
        let offset = offset / SPAN * SPAN;
        if offset >= end {
            return;
        }
        // SAFETY: MADV_DONTNEED on a read-only shared file map only unmaps
        // pages; their contents (the file's) are unchanged on the next access.
        let r = unsafe {
            m.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                offset as usize,
                (end - offset) as usize,
            )
        };
        if let Err(e) = r {
            log::debug!("{}: madvise: {e}", self.path.display());
        }
    }

    /// [`RankFile::will_need`] for a reader in order, who will read on past
    /// the range: an object's blocks are fetched in runs that may reach
    /// past it ([`ObjectFile::read_ahead`]).
    pub fn read_ahead(&self, offset: u64, len: u64) {
        match &self.backing {
            Backing::Object(o) => o.read_ahead(offset, len),
            Backing::Mapped(_) => self.will_need(offset, len),
        }
    }

    /// Asks the kernel to start reading `[offset, offset+len)` now
    /// (`MADV_WILLNEED`: asynchronous readahead into the page cache), so
    /// that a copy from it later finds the pages there instead of faulting
    /// them in one readahead window at a time. Only advice: errors are
    /// logged, never fatal.
    /// For an object, the blocks are fetched ahead into the store's cache.
    pub fn will_need(&self, offset: u64, len: u64) {
        let m = match &self.backing {
            Backing::Mapped(m) => m,
            Backing::Object(o) => return o.will_need(offset, len),
        };
        let page = guard::page_size();
        let end = offset.saturating_add(len).min(m.map.len() as u64);
        let offset = offset / page * page;
        // One call reads at most one window of its range, so on a FUSE or
        // network mount the range is asked for a window at a time.
        // Measured on sshfs, 768 MiB read cold from a map, 16 MiB advised
        // ahead: one call per range 5.8-6.2 s, one per 128 KiB 2.7 s
        // (`cat`: 2.2 s). On a block device the window is several MiB and
        // small calls only split the I/O: one call per range.
        let step = m.advice_window.unwrap_or(u64::MAX);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(step);
            if let Err(e) = m
                .map
                .advise_range(memmap2::Advice::WillNeed, at as usize, n as usize)
            {
                log::debug!("{}: madvise(WILLNEED): {e}", self.path.display());
                return;
            }
            at += n;
        }
    }

    /// Whether advice ([`RankFile::will_need`]) is how to read ahead of
    /// this file: it is on a FUSE or network filesystem.
    /// An object is read ahead by asking for it, too.
    pub fn advice_reads_ahead(&self) -> bool {
        match &self.backing {
            Backing::Mapped(m) => m.advice_window.is_some(),
            Backing::Object(_) => true,
        }
    }

    /// Whether every page of `[offset, offset+len)` is in the page cache,
    /// or already being read into it: nothing is left to ask the storage
    /// for. Asked of `cachestat`, which counts pages under read I/O, else of
    /// `mincore`, which does not (see [`storage::cached_pages`] for why
    /// `cachestat` and the measurement). Prefetch skips such spans; that
    /// they may still be on their way changed no cold read measurably
    /// (9 interleaved runs through sshfs, `--unshard`: 0.92x of `cat` against
    /// 0.90x with `mincore`; 7 runs of a column split on the local disk, the
    /// throttled image and sshfs: 1.03x/0.98x, 1.00x/1.03x, 0.80x/0.76x).
    /// On error, false (the caller then prepares as if it had to wait).
    /// For an object: whether the store's cache holds it.
    pub fn is_resident(&self, offset: u64, len: u64) -> bool {
        let m = match &self.backing {
            Backing::Mapped(m) => m,
            Backing::Object(o) => return o.is_cached(offset, len),
        };
        let page = guard::page_size();
        let end = offset.saturating_add(len).min(m.map.len() as u64);
        let start = offset / page * page;
        if start >= end {
            return true;
        }
        let pages = (end - start).div_ceil(page);
        match storage::cached_pages(&m.file, start, end - start) {
            Some(cached) => cached >= pages,
            None => m.resident(start, end, pages),
        }
    }

    /// Whether the file has shrunk (or failed) under its map since it was
    /// opened: bytes copied from it may then be zeros and must not be served.
    /// Cheap (an atomic load): checked after every copy.
    /// An object is, once a GET found it changed.
    pub fn is_damaged(&self) -> bool {
        match &self.backing {
            Backing::Mapped(m) => guard::is_damaged(m.region),
            Backing::Object(o) => o.is_damaged(),
        }
    }

    /// Whether the path still names the file that was opened, unchanged:
    /// a source deleted, replaced (renamed over) or rewritten in place
    /// since the view was planned no longer holds the bytes the plan
    /// describes. A `stat`: checked once per read, not per copy.
    /// An object is checked by every GET instead (`If-Match` its ETag):
    /// true until one found it changed.
    pub fn is_unchanged(&self) -> bool {
        match &self.backing {
            Backing::Mapped(m) => {
                std::fs::metadata(&self.path).is_ok_and(|s| Identity::of(&s) == m.identity)
            }
            Backing::Object(o) => !o.is_damaged(),
        }
    }
}

/// What the tests reach past the interface for.
#[cfg(test)]
impl RankFile {
    pub(crate) fn bytes(&self, offset: u64, len: u64) -> &[u8] {
        self.map_bytes(offset, len).expect("a mapped file")
    }

    fn mapped(&self) -> &Mapped {
        match &self.backing {
            Backing::Mapped(m) => m,
            Backing::Object(_) => panic!("not a mapped file"),
        }
    }

    fn mapped_resident(&self, start: u64, end: u64, pages: u64) -> bool {
        self.mapped().resident(start, end, pages)
    }
}

impl Mapped {
    /// [`RankFile::is_resident`] by `mincore`, for kernels without
    /// `cachestat`: `[start, end)` within the map, `start` page-aligned,
    /// `pages` pages long.
    fn resident(&self, start: u64, end: u64, pages: u64) -> bool {
        let mut vec = vec![0u8; pages as usize];
        // SAFETY: the range lies within the map (the caller clipped it, start
        // page-aligned, the map itself page-aligned); `vec` has one byte
        // per page of it, as mincore writes.
        let r = unsafe {
            libc::mincore(
                self.map.as_ptr().add(start as usize) as *mut libc::c_void,
                (end - start) as usize,
                vec.as_mut_ptr(),
            )
        };
        r == 0 && vec.iter().all(|v| v & 1 == 1)
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        guard::unregister(self.region);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::tests::{f32s, input_err, safetensors};
    use safetensors::Dtype;
    use std::fs;

    fn two_tensors() -> Vec<u8> {
        safetensors(&[
            ("a", "F32", &[2, 2], &f32s(&[1.0, 2.0, 3.0, 4.0])),
            ("b", "U8", &[3], &[7, 8, 9]),
        ])
    }

    #[test]
    fn bytes_read_back_as_written() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model-0000000-0000001.safetensors");
        let raw = two_tensors();
        fs::write(&path, &raw).unwrap();
        let f = RankFile::open(&path).unwrap();
        assert_eq!(f.name, "model-0000000-0000001.safetensors");
        assert_eq!(f.path, path);
        let data = u64::from_le_bytes(raw[..8].try_into().unwrap()) + 8;
        let a = &f.tensors["a"];
        assert_eq!(
            (a.dtype, a.shape.clone(), a.offset, a.len),
            (Dtype::F32, vec![2, 2], data, 16)
        );
        let b = &f.tensors["b"];
        assert_eq!(
            (b.dtype, b.shape.clone(), b.offset, b.len),
            (Dtype::U8, vec![3], data + 16, 3)
        );
        assert_eq!(
            f.bytes(a.offset, a.len),
            f32s(&[1.0, 2.0, 3.0, 4.0]).as_slice()
        );
        assert_eq!(f.bytes(b.offset, b.len), &[7, 8, 9]);
        // Advice changes no bytes.
        f.will_need(0, raw.len() as u64);
        f.release(0, raw.len() as u64);
        assert_eq!(f.bytes(b.offset, b.len), &[7, 8, 9]);
        assert!(f.is_resident(0, 0));
    }

    #[test]
    fn residency_follows_the_page_cache() {
        // On the project's own filesystem, not /tmp: tmpfs pages cannot
        // leave the page cache, and this test needs them to.
        let tmp = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = tmp.path().join("x.safetensors");
        let raw = safetensors(&[("w", "U8", &[64 << 10], &vec![5u8; 64 << 10])]);
        fs::write(&path, &raw).unwrap();
        File::open(&path).unwrap().sync_all().unwrap();
        let f = RankFile::open(&path).unwrap();
        let len = raw.len() as u64;
        let pages = len.div_ceil(guard::page_size());
        assert!(f.is_resident(0, len) && f.mapped_resident(0, len, pages));
        // Unmapped (the header was read through the map) and dropped: clean
        // pages of a file nobody maps leave the cache on this advice.
        f.release(0, len);
        nix::fcntl::posix_fadvise(
            &f.mapped().file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        assert!(
            !f.is_resident(0, len),
            "cachestat (or mincore) still finds the pages"
        );
        assert!(
            !f.mapped_resident(0, len, pages),
            "mincore still finds the pages"
        );
        // Read back into the cache: resident by either count.
        assert_eq!(fs::read(&path).unwrap().len(), raw.len());
        assert!(f.is_resident(0, len) && f.mapped_resident(0, len, pages));
        assert!(f.is_resident(len - 1, 100));
    }

    #[test]
    fn an_intact_file_is_neither_damaged_nor_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.safetensors");
        fs::write(&path, two_tensors()).unwrap();
        let f = RankFile::open(&path).unwrap();
        let a = f.tensors["a"].clone();
        assert_eq!(f.bytes(a.offset, a.len).len(), 16);
        assert!(!f.is_damaged());
        assert!(f.is_unchanged());
    }

    #[test]
    fn a_file_rewritten_in_place_is_changed() {
        use std::io::{Seek, SeekFrom, Write};
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.safetensors");
        let raw = two_tensors();
        fs::write(&path, &raw).unwrap();
        let f = RankFile::open(&path).unwrap();
        // Same inode, same length, other bytes; an mtime set apart so the
        // change shows whatever the filesystem's timestamp granularity.
        let mut w = fs::OpenOptions::new().write(true).open(&path).unwrap();
        w.seek(SeekFrom::Start(raw.len() as u64 - 1)).unwrap();
        w.write_all(&[0]).unwrap();
        w.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
            .unwrap();
        drop(w);
        assert!(!f.is_unchanged());
        assert!(!f.is_damaged());
    }

    #[test]
    fn a_file_replaced_or_deleted_is_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("x.safetensors");
        fs::write(&path, two_tensors()).unwrap();
        let f = RankFile::open(&path).unwrap();
        // Renamed over with identical bytes: another inode.
        let other = tmp.path().join("new");
        fs::write(&other, two_tensors()).unwrap();
        fs::rename(&other, &path).unwrap();
        assert!(!f.is_unchanged());
        let g = RankFile::open(&path).unwrap();
        assert!(g.is_unchanged());
        fs::remove_file(&path).unwrap();
        assert!(!g.is_unchanged());
        // The map outlives the name.
        let b = g.tensors["b"].clone();
        assert_eq!(g.bytes(b.offset, b.len), &[7, 8, 9]);
    }

    #[test]
    fn a_linked_file_is_checked_through_its_link() {
        // A Hub cache snapshot: the name is a link to ../blobs/<hash>. The
        // identity is the blob's; the check stats the link, so both a blob
        // replaced under it and the link pointed elsewhere are changes.
        let tmp = tempfile::tempdir().unwrap();
        let blobs = tmp.path().join("blobs");
        let snap = tmp.path().join("snap");
        fs::create_dir_all(&blobs).unwrap();
        fs::create_dir_all(&snap).unwrap();
        fs::write(blobs.join("a"), two_tensors()).unwrap();
        fs::write(blobs.join("b"), two_tensors()).unwrap();
        let link = snap.join("model.safetensors");
        std::os::unix::fs::symlink("../blobs/a", &link).unwrap();
        let f = RankFile::open(&link).unwrap();
        assert_eq!(f.path, link);
        assert_eq!(f.real_path, fs::canonicalize(blobs.join("a")).unwrap());
        assert!(f.is_unchanged());
        // The blob replaced (renamed over, identical bytes): another inode.
        fs::write(blobs.join("new"), two_tensors()).unwrap();
        fs::rename(blobs.join("new"), blobs.join("a")).unwrap();
        assert!(!f.is_unchanged());
        // The link pointed at another blob.
        let g = RankFile::open(&link).unwrap();
        assert!(g.is_unchanged());
        fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("../blobs/b", &link).unwrap();
        assert!(!g.is_unchanged());
    }

    #[test]
    fn not_a_safetensors_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("short.safetensors");
        fs::write(&path, b"1234").unwrap();
        input_err(
            RankFile::open(&path),
            &[&path.display().to_string(), "4 bytes"],
        );
        // A header length beyond the end of the file.
        let mut raw = 1000u64.to_le_bytes().to_vec();
        raw.extend_from_slice(b"{}      ");
        fs::write(&path, &raw).unwrap();
        input_err(
            RankFile::open(&path),
            &[&path.display().to_string(), "header"],
        );
        // Data offsets that do not match the dtype and shape.
        let mut bad = safetensors(&[("a", "F32", &[2, 2], &[0u8; 8])]);
        bad.extend_from_slice(&[0u8; 8]);
        fs::write(&path, &bad).unwrap();
        input_err(RankFile::open(&path), &[&path.display().to_string()]);
        let missing = tmp.path().join("missing.safetensors");
        input_err(RankFile::open(&missing), &[&missing.display().to_string()]);
    }
}
