//! Keeps a source file that shrinks under a memory map from killing the process.
//!
//! Touching a mapped page past the end of a file that was truncated after it
//! was mapped raises SIGBUS, whose default action ends the process: for a
//! mount, every reader of every file would lose the daemon. Each source map is
//! registered here; the SIGBUS handler, when the faulting address lies in a
//! registered map, marks that map *damaged*, maps a zero page over the fault so
//! the interrupted copy can finish, and returns. The engine checks the damage
//! flag after copying and turns the read into an error (EIO), so no zeros are
//! ever served as data. A fault anywhere else restores the default action and
//! crashes as before.
//!
//! The handler only reads atomics and calls `mmap`, both async-signal-safe.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Maps registered at most (two files per rank of a 32k-rank job).
const MAX_REGIONS: usize = 1 << 16;

struct Region {
    start: AtomicUsize,
    len: AtomicUsize,
    damaged: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Region = Region {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    damaged: AtomicBool::new(false),
};
static REGIONS: [Region; MAX_REGIONS] = [EMPTY; MAX_REGIONS];
static COUNT: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();

/// A registered map; `None` when the table is full (the map is then unguarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionId(Option<usize>);

/// Registers `[ptr, ptr+len)` and installs the handler on first use.
pub fn register(ptr: *const u8, len: usize) -> RegionId {
    INSTALL.call_once(install);
    let i = COUNT.fetch_add(1, Ordering::AcqRel);
    if i >= MAX_REGIONS {
        log::warn!(
            "more than {MAX_REGIONS} source maps: further maps are not guarded against truncation"
        );
        return RegionId(None);
    }
    // Publication order: `COUNT` already shows slot `i` to the handler, so
    // the slot must never look live before it is whole. `len` is stored
    // last (Release) and read first (Acquire) by the handler, which skips a
    // slot whose `len` is 0; so a live-looking slot always has its `start`.
    // (Storing `len` first left a window in which the slot read as
    // `[0, len)`, and a stray fault at a low address would have been
    // patched with zeros instead of crashing.)
    let r = &REGIONS[i];
    r.start.store(ptr as usize, Ordering::Relaxed);
    r.len.store(len, Ordering::Release);
    RegionId(Some(i))
}

/// The system's page size (4 KiB on x86-64; 16 or 64 KiB on some arm64),
/// read once with the handler's installation.
pub fn page_size() -> u64 {
    INSTALL.call_once(install);
    PAGE.load(Ordering::Relaxed) as u64
}

/// Whether a fault has hit this map: its file shrank (or its disk failed)
/// since it was mapped.
pub fn is_damaged(id: RegionId) -> bool {
    id.0.is_some_and(|i| REGIONS[i].damaged.load(Ordering::Acquire))
}

/// Forgets a map that is about to be unmapped, so a later map at the same
/// addresses is not mistaken for it.
pub fn unregister(id: RegionId) {
    if let Some(i) = id.0 {
        REGIONS[i].len.store(0, Ordering::Release);
    }
}

fn install() {
    // SAFETY: sysconf and sigaction with a fully initialised struct.
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE);
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            log::warn!(
                "cannot install the SIGBUS handler: a source truncated while in use will end the process"
            );
        }
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let n = COUNT.load(Ordering::Acquire).min(MAX_REGIONS);
    for r in &REGIONS[..n] {
        // `len` first: see `register`.
        let len = r.len.load(Ordering::Acquire);
        if len == 0 {
            continue;
        }
        let start = r.start.load(Ordering::Relaxed);
        if addr >= start && addr - start < len {
            r.damaged.store(true, Ordering::Release);
            let page = PAGE.load(Ordering::Relaxed);
            let at = addr & !(page - 1);
            // SAFETY: replaces one page inside a map we own with zeros.
            let p = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                return;
            }
            break;
        }
    }
    // Not one of ours (or the patch failed): the default action, on return.
    // SAFETY: resetting a signal disposition is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}
