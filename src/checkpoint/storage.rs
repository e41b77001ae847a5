//! Where the source lives, as far as reading it cold is concerned.
//!
//! The byte engine reads the source through memory maps. A page fault on a
//! map reads one readahead window and waits for it; on a FUSE or network
//! filesystem the window is 128 KiB unless someone raised it, and each
//! window is a round trip. Reading the 768 MiB bench checkpoint cold
//! through sshfs took 5.2 s through a map against 2.5 s for `cat`, and
//! 1.6-2.2 s once the sshfs mount's `read_ahead_kb` was 1024 (docs/PERFORMANCE.md,
//! cold reads). Prefetch now asks for the windows ahead of a sequential reader
//! ([`advice_window`]), which brought the view to `cat`'s speed, and a
//! larger window still made both faster (2.15 -> 1.51 s for `cat`, 2.15 ->
//! 1.78 s for the view). Only root can raise it, so reshardfs says how.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::statfs::{FUSE_SUPER_MAGIC, FsType, NFS_SUPER_MAGIC, SMB_SUPER_MAGIC, statfs};

/// Below this, faults on a network source wait for every window.
const ENOUGH_KIB: u64 = 1024;

/// CIFS (the `cifs` module's magic; `nix` names only the older SMB one).
const CIFS_MAGIC: i64 = 0xFF53_4D42;

/// A hint when `dir` lies on a FUSE or network filesystem with less
/// readahead than [`ENOUGH_KIB`]: what it is and the command that raises
/// it. `None` when it cannot tell (no such device in `/sys/class/bdi`).
pub fn readahead_hint(dir: &Path) -> Option<String> {
    let kind = network_kind(statfs(dir).ok()?.filesystem_type())?;
    let (path, kib) = bdi_read_ahead(std::fs::metadata(dir).ok()?.dev())?;
    hint(dir, kind, kib, &path)
}

/// How much of a range one `MADV_WILLNEED` call reads on the filesystem of
/// device `dev`, when that filesystem is one where advice is how to read
/// ahead: a FUSE or network mount (an anonymous device, major 0, with its
/// own entry in `/sys/class/bdi`). `None` elsewhere: block devices (their
/// window is several MiB, and measured there advice only cost: see
/// `Prefetcher::on_read`), and anonymous devices without a bdi (tmpfs, btrfs,
/// overlayfs).
///
/// The kernel caps one call at the larger of the bdi's readahead and its
/// I/O size (`force_page_cache_ra`). A FUSE mount's I/O size is the 128 KiB
/// default, so there the window is the readahead, at least 128 KiB; other
/// network filesystems are taken to be alike (not measured here). Read when
/// a rank file is opened: a window raised later only makes each call ask
/// for less than it could.
pub fn advice_window(dev: u64) -> Option<u64> {
    if nix::sys::stat::major(dev) != 0 {
        return None;
    }
    bdi_read_ahead(dev).map(|(_, kib)| window_for(kib))
}

/// The readahead of device `dev`'s bdi in KiB, with the sysfs file that
/// holds it (and raises it, for root).
fn bdi_read_ahead(dev: u64) -> Option<(String, u64)> {
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    let kib = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
    Some((path, kib))
}

fn window_for(read_ahead_kib: u64) -> u64 {
    read_ahead_kib.clamp(128, 1 << 20) << 10
}

// `f_type`'s width differs between architectures (i64 here, u32 or i32
// elsewhere): the conversion is useless only on some of them.
#[allow(clippy::useless_conversion)]
fn network_kind(t: FsType) -> Option<&'static str> {
    match t {
        FUSE_SUPER_MAGIC => Some("a FUSE filesystem (sshfs, s3fs, ...)"),
        NFS_SUPER_MAGIC => Some("NFS"),
        SMB_SUPER_MAGIC => Some("SMB"),
        t if i64::from(t.0) & 0xFFFF_FFFF == CIFS_MAGIC => Some("CIFS"),
        _ => None,
    }
}

fn hint(dir: &Path, kind: &str, kib: u64, sysfs: &str) -> Option<String> {
    (kib < ENOUGH_KIB).then(|| {
        format!(
            "{} is on {kind} with {kib} KiB of readahead: cold reads through the view wait for \
             the source every {kib} KiB. As root, `echo {ENOUGH_KIB} > {sysfs}` (on every node \
             that mounts it) lets each wait bring {ENOUGH_KIB} KiB; see docs/PERFORMANCE.md.",
            dir.display()
        )
    })
}

/// `cachestat(2)`'s number: 451 on every architecture, as are all system
/// calls added since Linux 5.1 (`libc` names it for only a few targets).
const SYS_CACHESTAT: libc::c_long = 451;

/// Cleared once the kernel refuses `cachestat` (before Linux 6.5, or a
/// seccomp filter): the callers then ask `mincore`, without a failed call
/// each time.
static CACHESTAT: AtomicBool = AtomicBool::new(true);

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// How many of the pages of `file` that `[offset, offset+len)` touches are
/// in the page cache (`cachestat`, Linux 6.5); `None` where the kernel
/// cannot say. `len` must not be 0 (to the kernel that means "to the end of
/// the file").
///
/// Why not `mincore` on the map: for pages the process has not mapped,
/// `mincore` looks each 4 KiB page up in the page cache on its own, while
/// `cachestat` walks the cache's folios once. Measured per MiB of the
/// bench's Q1 source, in the page cache: `mincore` 38-41 us, `cachestat`
/// 6-7 us. Prefetch checks the source of every block a sequential reader
/// is about to need, so on Q1 `mincore` was 5.5% of the daemon's samples.
pub fn cached_pages(file: &File, offset: u64, len: u64) -> Option<u64> {
    if len == 0 || offset.checked_add(len).is_none() || !CACHESTAT.load(Ordering::Relaxed) {
        return None;
    }
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes one `struct cachestat`
    // into `stat`; both live across the call, with the kernel's layout.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
            CACHESTAT.store(false, Ordering::Relaxed);
        }
        log::debug!("cachestat: {e}");
        return None;
    }
    Some(stat.nr_cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_only_below_enough() {
        let p = Path::new("/mnt/ckpt");
        let s = "/sys/class/bdi/0:45/read_ahead_kb";
        let h = hint(p, "NFS", 128, s).unwrap();
        assert!(h.contains("/mnt/ckpt is on NFS with 128 KiB"), "{h}");
        assert!(
            h.contains("echo 1024 > /sys/class/bdi/0:45/read_ahead_kb"),
            "{h}"
        );
        assert_eq!(hint(p, "NFS", 1024, s), None);
        assert_eq!(hint(p, "NFS", 4096, s), None);
    }

    #[test]
    fn advice_windows_are_the_readahead_at_least_128_kib() {
        assert_eq!(window_for(0), 128 << 10);
        assert_eq!(window_for(128), 128 << 10);
        assert_eq!(window_for(1024), 1 << 20);
        // Block devices never: their advice is one call per range.
        assert_eq!(advice_window(nix::sys::stat::makedev(8, 0)), None);
        // A major-0 device with no bdi entry (never allocated this high).
        assert_eq!(advice_window(nix::sys::stat::makedev(0, 1 << 19)), None);
    }

    #[test]
    fn cachestat_counts_the_pages_of_a_range() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, vec![1u8; 5 * 4096]).unwrap();
        let f = File::open(&path).unwrap();
        // Just written, so in the page cache. Only a kernel older than 6.5
        // may have no cachestat (the callers then ask mincore).
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut v = release.split(|c: char| !c.is_ascii_digit());
        let major: u32 = v.next().unwrap().parse().unwrap();
        let minor: u32 = v.next().unwrap().parse().unwrap();
        // Bytes 4106..8202 touch pages 1 and 2.
        match cached_pages(&f, 4096 + 10, 4096) {
            Some(cached) => assert_eq!(cached, 2),
            None => assert!((major, minor) < (6, 5), "no cachestat on Linux {release}"),
        }
        assert_eq!(cached_pages(&f, 0, 0), None);
        assert_eq!(cached_pages(&f, u64::MAX, 2), None);
    }

    #[test]
    fn local_filesystems_get_no_hint() {
        assert_eq!(network_kind(nix::sys::statfs::EXT4_SUPER_MAGIC), None);
        assert_eq!(network_kind(nix::sys::statfs::TMPFS_MAGIC), None);
        assert!(network_kind(FUSE_SUPER_MAGIC).is_some());
        // A directory on a local filesystem gets no hint; one that cannot be
        // read gets none either (no error, no panic).
        let tmp = tempfile::tempdir().unwrap();
        let kind = statfs(tmp.path()).unwrap().filesystem_type();
        assert_eq!(network_kind(kind), None, "the temporary directory is local");
        assert_eq!(readahead_hint(tmp.path()), None);
        assert_eq!(readahead_hint(&tmp.path().join("absent")), None);
    }
}
