//! FUSE passthrough: view files that are a source file whole, read by the
//! kernel straight from that file.
//!
//! The plan marks every view file that is, byte for byte, one source file
//! ([`crate::reshard::plan::VirtualFile::whole_source`]): every file of a
//! change of data parallelism alone, of a view with the source's own
//! strategy. Linux 6.9+ can serve such a file itself: the open is answered
//! with `FOPEN_PASSTHROUGH` and a backing file registered with
//! `FUSE_DEV_IOC_BACKING_OPEN`, and the reader's `read`, `mmap` and
//! readahead then go to the source file and its page cache; no request
//! reaches the daemon. Warm reads through the daemon stop at the FUSE
//! ceiling (2.25 GB/s here, against 6.27 GB/s for the page cache) and a
//! FUSE file's page cache is 4 KiB pages (docs/PERFORMANCE.md).
//!
//! This module decides, and keeps the backing files; the FUSE adapter only
//! registers a file when asked and translates the answer. Its rules:
//!
//! * **When to ask the kernel at all** ([`Passthrough::negotiate`]): only
//!   when some view file is a source file whole, the kernel offers it, and
//!   this process may register backing files (`CAP_SYS_ADMIN`, checked by
//!   the kernel for every registration: an ordinary user's mount never
//!   may). Otherwise, one log line says why, and those files are served as
//!   every other.
//! * **What is registered** is the descriptor the plan mapped and checked
//!   ([`RankFile::if_unchanged`]), never a path opened again, and only
//!   while the path still names it unchanged: a source truncated, deleted,
//!   replaced or rewritten since planning is never handed to the kernel.
//!   Such an open goes through the daemon, whose reads then fail with EIO
//!   as they do for any view file.
//! * **One backing file per view file**, shared by all its open handles and
//!   unregistered with the last: the kernel requires every open of an inode
//!   that is open by passthrough to name the same backing file, and refuses
//!   passthrough while the inode is open through its page cache (the open
//!   fails with EIO). So a view file open through the daemon stays so until
//!   its last handle closes, and one open by passthrough takes every open
//!   by passthrough until then.
//! * **A refusal** (the kernel's answer to a registration) switches
//!   passthrough off for the rest of the mount, with one log line; files
//!   already open by passthrough keep their backing file.

use std::any::Any;
use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use crate::checkpoint::mapped::RankFile;
use crate::mount::sync;
use crate::mount::tree::Ino;

/// The stacking depth asked of the kernel: a backing file may then lie on a
/// stacked filesystem itself (overlayfs, as a container's root often is),
/// where depth 1 would make the kernel refuse it (ELOOP). 2 is the kernel's
/// maximum; its cost is that the mount cannot be a lower layer of an
/// overlayfs.
pub const MAX_STACK_DEPTH: u32 = 2;

/// A backing file registered with the kernel: the FUSE adapter's handle for
/// it (fuser's `BackingId`, which unregisters it when dropped), opaque here
/// so that the server needs no FUSE types. Clones share one registration;
/// the last one dropped ends it.
#[derive(Clone)]
pub struct Backing(Arc<dyn Any + Send + Sync>);

impl Backing {
    pub fn new<T: Any + Send + Sync>(id: T) -> Backing {
        Backing(Arc::new(id))
    }

    /// The adapter's handle, as it made it.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Backing")
    }
}

impl PartialEq for Backing {
    fn eq(&self, other: &Backing) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Backing {}

/// Hands a source file to the kernel as a backing file (the FUSE
/// adapter's `open_backing`).
pub type Register<'a> = dyn FnMut(&File) -> std::io::Result<Backing> + 'a;

/// Why passthrough is off for a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Off {
    /// `--no-passthrough` (or a server for benchmarks, `--serve-zeros`).
    NotWanted,
    /// No view file is a source file whole.
    NothingToPass,
    /// The kernel does not offer it (before Linux 6.9, or built without
    /// `CONFIG_FUSE_PASSTHROUGH`).
    Kernel,
    /// This process lacks `CAP_SYS_ADMIN`, which registering needs.
    Capability,
    /// The kernel refused to register a source file.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Wanted; the FUSE handshake has not said yet whether it is possible.
    Pending,
    On,
    Off(Off),
}

/// How one open of a view file that is a source file whole is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Open {
    /// By passthrough, with this backing file.
    Kernel(Backing),
    /// Through the daemon, as any view file.
    Daemon,
    /// Refused (EIO): the source file changed while the view file is open
    /// by passthrough, where the kernel would refuse a daemon open anyway.
    Refuse,
}

/// The open handles of one view file, and how they are served.
struct Slot {
    open: u64,
    /// `None`: open through the daemon.
    backing: Option<Backing>,
}

/// Passthrough for one mount: whether it is on, and the backing file of
/// every view file open by passthrough.
pub struct Passthrough {
    state: Mutex<State>,
    /// Per view file open since passthrough was on. Opens and releases are
    /// rare next to reads, which never come here.
    slots: Mutex<HashMap<Ino, Slot>>,
    /// View files that are a source file whole.
    candidates: usize,
}

impl Passthrough {
    /// For a view with `candidates` files that are a source file whole;
    /// `wanted`: not turned off by the user.
    pub fn new(wanted: bool, candidates: usize) -> Passthrough {
        Passthrough {
            state: Mutex::new(if wanted {
                State::Pending
            } else {
                State::Off(Off::NotWanted)
            }),
            slots: Mutex::new(HashMap::new()),
            candidates,
        }
    }

    /// Turns it off before the FUSE handshake (`--no-passthrough`).
    pub fn turn_off(&self) {
        *sync::lock(&self.state) = State::Off(Off::NotWanted);
    }

    /// At the FUSE handshake: whether to ask the kernel for passthrough,
    /// given whether it offers it and whether this process may register
    /// backing files ([`may_register`]). When it is wanted and not
    /// possible, logs why once (the files are then served as any other).
    pub fn negotiate(&self, kernel_offers: bool, may_register: bool) -> bool {
        let mut state = sync::lock(&self.state);
        if *state != State::Pending {
            return *state == State::On;
        }
        let n = self.candidates;
        let off = if n == 0 {
            Some(Off::NothingToPass)
        } else if !kernel_offers {
            Some(Off::Kernel)
        } else if !may_register {
            Some(Off::Capability)
        } else {
            None
        };
        *state = match off {
            Some(o) => State::Off(o),
            None => State::On,
        };
        let through_daemon = format!(
            "the {n} view file(s) that are a source file whole are served through the daemon"
        );
        match off {
            None => log::info!(
                "FUSE passthrough on: the kernel reads the {n} view file(s) that are a source file whole straight from that file"
            ),
            Some(Off::NothingToPass) => {
                log::debug!("FUSE passthrough not asked for: no view file is a source file whole")
            }
            Some(Off::Kernel) => log::warn!(
                "FUSE passthrough off: the kernel does not offer it (Linux 6.9 or later, built with CONFIG_FUSE_PASSTHROUGH); {through_daemon}"
            ),
            Some(Off::Capability) => log::warn!(
                "FUSE passthrough off: registering a source file with the kernel needs CAP_SYS_ADMIN, which this process lacks (a mount by an ordinary user); {through_daemon}"
            ),
            Some(Off::NotWanted | Off::Refused) => {}
        }
        off.is_none()
    }

    /// Why it is off, if it is (`None`: on, or not negotiated yet).
    pub fn off(&self) -> Option<Off> {
        match *sync::lock(&self.state) {
            State::Off(o) => Some(o),
            State::On | State::Pending => None,
        }
    }

    /// How to answer an open of view file `ino`, which is `source` whole.
    /// `register` hands a file to the kernel (the FUSE adapter's
    /// `open_backing`); it is called only when passthrough is on, the
    /// source unchanged, and the view file not open already. Without one
    /// (an open outside FUSE) the file is opened through the daemon. Every
    /// open answered `Kernel` or `Daemon` is matched by one
    /// [`Passthrough::release`].
    pub fn open(&self, ino: Ino, source: &RankFile, register: Option<&mut Register<'_>>) -> Open {
        let mut slots = sync::lock(&self.slots);
        let on = *sync::lock(&self.state) == State::On;
        let unchanged = source.if_unchanged();
        if let Some(slot) = slots.get_mut(&ino) {
            return match (&slot.backing, unchanged) {
                (Some(_), None) => Open::Refuse,
                (Some(b), Some(_)) => {
                    slot.open += 1;
                    Open::Kernel(b.clone())
                }
                (None, _) => {
                    slot.open += 1;
                    Open::Daemon
                }
            };
        }
        let backing = match (unchanged, register) {
            (Some(file), Some(register)) if on => match register(file) {
                Ok(b) => Some(b),
                Err(e) => {
                    self.refused(source, &e);
                    None
                }
            },
            _ => None,
        };
        // Opens through the daemon are counted only while passthrough is
        // on (or was, for this file): once off, nothing can conflict.
        if backing.is_some() || on {
            slots.insert(
                ino,
                Slot {
                    open: 1,
                    backing: backing.clone(),
                },
            );
        }
        backing.map_or(Open::Daemon, Open::Kernel)
    }

    /// The kernel refused `source`: off for the rest of the mount, said once.
    fn refused(&self, source: &RankFile, e: &std::io::Error) {
        let mut state = sync::lock(&self.state);
        if *state != State::On {
            return;
        }
        *state = State::Off(Off::Refused);
        let why = match e.raw_os_error() {
            Some(libc::EPERM) => " (registering needs CAP_SYS_ADMIN)",
            Some(libc::ELOOP) => " (the source's filesystem is stacked too deep for passthrough)",
            _ => "",
        };
        log::warn!(
            "FUSE passthrough off: the kernel refused {}: {e}{why}; from now on view files that are a source file whole are served through the daemon",
            source.path.display()
        );
    }

    /// One handle of view file `ino` closed; the last one of a file open by
    /// passthrough unregisters its backing file. Unknown files are ignored.
    pub fn release(&self, ino: Ino) {
        let mut slots = sync::lock(&self.slots);
        if let Some(slot) = slots.get_mut(&ino) {
            slot.open = slot.open.saturating_sub(1);
            if slot.open == 0 {
                slots.remove(&ino);
            }
        }
    }

    /// Backing files registered now (one per view file open by passthrough).
    pub fn backing_files(&self) -> u64 {
        sync::lock(&self.slots)
            .values()
            .filter(|s| s.backing.is_some())
            .count() as u64
    }
}

/// Whether this process may register backing files: the kernel asks for
/// `CAP_SYS_ADMIN` (in the initial user namespace; in another one the
/// registration itself is refused, and [`Passthrough::open`] falls back).
pub fn may_register() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    procfs::process::Process::myself()
        .and_then(|p| p.status())
        .is_ok_and(|s| s.capeff & (1 << CAP_SYS_ADMIN) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A source rank file in a temporary folder.
    fn rank_file() -> (tempfile::TempDir, RankFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model-0000000-0000001.safetensors");
        std::fs::copy(
            "tests/fixtures/tp4-f32/iteration_00000005/model-0000000-0000004.safetensors",
            &path,
        )
        .unwrap();
        let f = RankFile::open(&path).unwrap();
        (dir, f)
    }

    /// A registration that counts the live backing files it made.
    struct Kernel {
        made: Cell<u32>,
        live: Arc<()>,
        refuse: Option<i32>,
    }

    impl Kernel {
        fn new(refuse: Option<i32>) -> Kernel {
            Kernel {
                made: Cell::new(0),
                live: Arc::new(()),
                refuse,
            }
        }

        fn register(&self) -> impl FnMut(&File) -> std::io::Result<Backing> + '_ {
            |_file| match self.refuse {
                Some(e) => Err(std::io::Error::from_raw_os_error(e)),
                None => {
                    self.made.set(self.made.get() + 1);
                    Ok(Backing::new(self.live.clone()))
                }
            }
        }

        /// Backing files not yet dropped.
        fn live(&self) -> usize {
            Arc::strong_count(&self.live) - 1
        }
    }

    fn on() -> Passthrough {
        let p = Passthrough::new(true, 1);
        assert!(p.negotiate(true, true));
        p
    }

    #[test]
    fn one_backing_file_per_view_file_shared_and_dropped_with_the_last_handle() {
        let (_d, src) = rank_file();
        let k = Kernel::new(None);
        let p = on();
        let a = p.open(7, &src, Some(&mut k.register()));
        let b = p.open(7, &src, Some(&mut k.register()));
        let (Open::Kernel(x), Open::Kernel(y)) = (&a, &b) else {
            panic!("{a:?} {b:?}");
        };
        assert_eq!(x, y, "both handles name the same backing file");
        assert_eq!(k.made.get(), 1);
        // Another view file of the same source: its own registration.
        assert!(matches!(
            p.open(8, &src, Some(&mut k.register())),
            Open::Kernel(_)
        ));
        assert_eq!((k.made.get(), p.backing_files()), (2, 2));
        drop((a, b));
        p.release(7);
        assert_eq!(p.backing_files(), 2, "one handle of 7 is still open");
        p.release(7);
        p.release(8);
        assert_eq!((p.backing_files(), k.live()), (0, 0));
        p.release(7); // an unknown file is ignored
        // Opened again: registered anew.
        assert!(matches!(
            p.open(7, &src, Some(&mut k.register())),
            Open::Kernel(_)
        ));
        assert_eq!(k.made.get(), 3);
    }

    #[test]
    fn a_changed_source_is_never_registered() {
        let (_d, src) = rank_file();
        let k = Kernel::new(None);
        let p = on();
        let held = p.open(1, &src, Some(&mut k.register()));
        assert!(matches!(held, Open::Kernel(_)));
        // Replaced by a new save (another inode, same bytes).
        let tmp = src.path.with_extension("new");
        std::fs::copy(&src.path, &tmp).unwrap();
        std::fs::rename(&tmp, &src.path).unwrap();
        // Open by passthrough already: the kernel would refuse a daemon
        // open, and the backing file must not be handed out again.
        assert_eq!(p.open(1, &src, Some(&mut k.register())), Open::Refuse);
        // Not open yet: through the daemon (whose reads fail), counted so
        // that no passthrough open can join it.
        assert_eq!(p.open(2, &src, Some(&mut k.register())), Open::Daemon);
        assert_eq!(k.made.get(), 1);
        p.release(1);
        p.release(2);
        assert_eq!(p.backing_files(), 0);
    }

    #[test]
    fn a_file_open_through_the_daemon_stays_so_until_closed() {
        let (_d, src) = rank_file();
        let k = Kernel::new(None);
        let p = Passthrough::new(true, 1);
        // Before the handshake (never in a mount): through the daemon.
        assert_eq!(p.open(1, &src, Some(&mut k.register())), Open::Daemon);
        assert!(p.negotiate(true, true));
        let old = std::fs::metadata(&src.path).unwrap().modified().unwrap();
        let later = old + std::time::Duration::from_secs(5);
        let touch = |t| {
            std::fs::File::options()
                .write(true)
                .open(&src.path)
                .unwrap()
                .set_modified(t)
                .unwrap()
        };
        touch(later);
        assert_eq!(p.open(2, &src, Some(&mut k.register())), Open::Daemon);
        // The file is as planned again; 2 is still open through the daemon.
        touch(old);
        assert_eq!(p.open(2, &src, Some(&mut k.register())), Open::Daemon);
        assert_eq!(k.made.get(), 0);
        p.release(2);
        p.release(2);
        assert!(matches!(
            p.open(2, &src, Some(&mut k.register())),
            Open::Kernel(_)
        ));
    }

    #[test]
    fn a_refusal_turns_it_off_and_open_files_keep_theirs() {
        let (_d, src) = rank_file();
        let ok = Kernel::new(None);
        let p = on();
        assert!(matches!(
            p.open(1, &src, Some(&mut ok.register())),
            Open::Kernel(_)
        ));
        let no = Kernel::new(Some(libc::EPERM));
        assert_eq!(p.open(2, &src, Some(&mut no.register())), Open::Daemon);
        assert_eq!(p.off(), Some(Off::Refused));
        // File 1 is still open by passthrough: its new opens join it.
        assert!(matches!(
            p.open(1, &src, Some(&mut ok.register())),
            Open::Kernel(_)
        ));
        assert_eq!(ok.made.get(), 1);
        // Nothing is registered any more.
        assert_eq!(p.open(3, &src, Some(&mut ok.register())), Open::Daemon);
        assert_eq!(ok.made.get(), 1);
        p.release(1);
        p.release(1);
        p.release(2);
        assert_eq!((p.backing_files(), ok.live()), (0, 0));
    }

    #[test]
    fn without_a_kernel_to_register_with_it_is_the_daemon() {
        let (_d, src) = rank_file();
        let p = on();
        assert_eq!(p.open(1, &src, None), Open::Daemon);
        assert_eq!(p.off(), None, "not a refusal");
        // Counted: a passthrough open may not join it.
        let k = Kernel::new(None);
        assert_eq!(p.open(1, &src, Some(&mut k.register())), Open::Daemon);
        p.release(1);
        p.release(1);
        assert!(matches!(
            p.open(1, &src, Some(&mut k.register())),
            Open::Kernel(_)
        ));
    }

    #[test]
    fn negotiation_asks_only_when_it_can_help() {
        let cases = [
            (true, 3, true, true, None),
            (false, 3, true, true, Some(Off::NotWanted)),
            (true, 0, true, true, Some(Off::NothingToPass)),
            (true, 3, false, true, Some(Off::Kernel)),
            (true, 3, true, false, Some(Off::Capability)),
        ];
        for (wanted, n, offers, may, off) in cases {
            let p = Passthrough::new(wanted, n);
            assert_eq!(p.negotiate(offers, may), off.is_none());
            assert_eq!(p.off(), off);
        }
        let p = Passthrough::new(true, 1);
        p.turn_off();
        assert!(!p.negotiate(true, true));
        // Off: nothing registered, nothing counted.
        let (_d, src) = rank_file();
        let k = Kernel::new(None);
        assert_eq!(p.open(1, &src, Some(&mut k.register())), Open::Daemon);
        assert_eq!((k.made.get(), p.backing_files()), (0, 0));
    }

    #[test]
    fn root_may_register() {
        // The suite runs as root (CI); an ordinary user's case is tested
        // by mounting as one (tests/python/test_user_mount.py).
        assert_eq!(may_register(), nix::unistd::geteuid().is_root());
    }
}
