//! Mounting: checks on the mount point, the background daemon, signals.
//!
//! Like other FUSE tools, `mount` returns only once the mount is live. The
//! whole plan is built and checked before anything is mounted; the process
//! then forks, the child mounts and reports back through a pipe, and the
//! parent exits with the child's verdict. A mount that failed leaves nothing
//! behind.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use fuser::{Config, MountOption, Session, SessionACL};

use crate::bail;
use crate::checkpoint::paths::overlap_with_source;
use crate::error::{Error, Result};
use crate::mount::fuse::{GuardedFs, ViewFs};
use crate::mount::serve::Server;

pub struct MountOptions {
    /// Stay attached, logging to stderr, instead of daemonizing.
    pub foreground: bool,
    /// FUSE request threads.
    pub threads: usize,
    /// Let other users read the mount (needs `user_allow_other` for non-root).
    pub allow_other: bool,
    /// Where the background daemon writes its log (default: nowhere).
    pub log_file: Option<PathBuf>,
}

/// Checks that `mnt` can take a mount and returns its canonical path.
pub fn check_mount_point(mnt: &Path) -> Result<PathBuf> {
    let canon = match std::fs::canonicalize(mnt) {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "{}: a dead mount is left here (transport endpoint is not connected); run `umount {}` first",
            mnt.display(),
            mnt.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{}: the mount point does not exist", mnt.display())
        }
        Err(e) => bail!("{}: {e}", mnt.display()),
    };
    match std::fs::metadata(&canon) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("{}: the mount point is not a directory", mnt.display()),
        Err(e) => bail!("{}: {e}", mnt.display()),
    }
    if let Some(fstype) = mounted_at(&canon) {
        bail!(
            "{}: already a mount point ({fstype}); unmount it first or choose another folder",
            mnt.display()
        );
    }
    Ok(canon)
}

/// The filesystem type mounted at `path`, from /proc/self/mountinfo.
fn mounted_at(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let point = unescape_mountinfo(fields.get(4)?);
        if Path::new(&point) != path {
            return None;
        }
        let dash = fields.iter().position(|f| *f == "-")?;
        Some(
            fields
                .get(dash + 1)
                .copied()
                .unwrap_or("unknown")
                .to_string(),
        )
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mounts `server` at `mnt` and serves it until unmounted: in this process
/// with `foreground`, else in a daemon, returning once the mount is live.
pub fn mount(server: Server, mnt: &Path, opts: &MountOptions) -> Result<()> {
    let mnt = check_mount_point(mnt)?;
    // Mounting over the source hides it, and every read of the view then
    // fails: the view's own bytes come from under the mount.
    let src = server.source_path();
    if let Some(how) = overlap_with_source(src, &mnt)
        .map_err(|e| crate::bad!("{}: cannot resolve the mount point: {e}", mnt.display()))?
    {
        bail!(
            "{}: the mount point {how} the source {}; mounting there would hide it",
            mnt.display(),
            src.display()
        );
    }
    // Cache blocks are allocated by one request thread and often freed
    // (evicted) by another; with glibc's per-thread arenas the freed space
    // stays pinned in the arena it came from, and the daemon's RSS ran
    // 40-110 MiB over the cache budget. One arena keeps RSS within a few
    // MiB of it (measured: 213 MiB peak for a 200 MiB cache, was 328 MiB).
    // SAFETY: mallopt only tunes the allocator.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let fs = GuardedFs::new(ViewFs::new(server));
    if opts.foreground {
        let session = start(fs, &mnt, opts)?;
        log::info!("mounted at {} (pid {})", mnt.display(), std::process::id());
        return run(session, &mnt);
    }
    daemonize(fs, &mnt, opts)
}

fn config(opts: &MountOptions) -> Config {
    let mut c = Config::default();
    c.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("reshardfs".into()),
        MountOption::Subtype("reshardfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
    ];
    // The ACL also sets the kernel's allow_other option.
    if opts.allow_other {
        c.acl = SessionACL::All;
    } else {
        c.acl = SessionACL::Owner;
    }
    c.n_threads = Some(opts.threads.max(1));
    c.clone_fd = true;
    c
}

/// Mounts and completes the FUSE handshake: when this returns the mount is live.
fn start(fs: GuardedFs, mnt: &Path, opts: &MountOptions) -> Result<Session<GuardedFs>> {
    block_stop_signals();
    let session = Session::new(fs, mnt, &config(opts))
        .map_err(|e| Error::io(format!("mounting at {}", mnt.display()), e))?;
    raise_readahead(mnt);
    Ok(session)
}

/// Readahead the kernel applies to the mount, in KiB.
const READ_AHEAD_KB: u32 = 1024;

/// The kernel reads a FUSE file in requests of its bdi's `read_ahead_kb`
/// (128 KiB by default), whatever the FUSE handshake allows. Raising it to
/// 1 MiB cuts the requests per byte by 8 (zero-cost data: 2.9 -> 3.2 GB/s on
/// this machine). Needs root; without it the mount works with the default.
fn raise_readahead(mnt: &Path) {
    let Some(dev) = mount_device(mnt) else {
        log::debug!("{}: no device number in mountinfo", mnt.display());
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&knob, READ_AHEAD_KB.to_string()) {
        Ok(()) => log::debug!("{knob} = {READ_AHEAD_KB}"),
        Err(e) => {
            log::info!("cannot raise readahead ({knob}: {e}); reads stay at the kernel default")
        }
    }
}

/// The `major:minor` of the filesystem mounted at `path` (the last such mount).
fn mount_device(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let point = unescape_mountinfo(fields.get(4)?);
        (Path::new(&point) == path).then(|| fields.get(2).map(|s| s.to_string()))?
    })
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the stop signals in this thread and every thread it starts, so
/// that only the signal thread (sigwait) sees them.
fn block_stop_signals() {
    let set = stop_set();
    // SAFETY: changes this thread's mask only.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Serves until the mount goes away: `umount`, or a stop signal, which
/// detaches the mount (lazily, so open files finish) and ends the loop once
/// the kernel lets go.
fn run(mut session: Session<GuardedFs>, mnt: &Path) -> Result<()> {
    let target = std::ffi::CString::new(mnt.as_os_str().as_bytes())
        .map_err(|_| crate::bad!("{}: path holds a NUL byte", mnt.display()))?;
    // The unmounter takes the mount out of the session, so the session does
    // not try (and warn about failing) to unmount it again when it ends.
    let mut unmounter = session.unmount_callable();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = stop_set();
            let mut sig: libc::c_int = 0;
            // SAFETY: waits for one of the blocked signals.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            log::info!("signal {sig}: unmounting");
            if unmounter.unmount().is_ok() {
                return;
            }
            // Busy (files still open): detach now, finish their reads, and
            // end once the kernel lets go.
            // SAFETY: a plain syscall on a valid C string.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                log::error!("unmount failed: {}", std::io::Error::last_os_error());
                std::process::exit(1);
            }
        })
        .map_err(|e| Error::io("starting the signal thread", e))?;
    session
        .run()
        .map_err(|e| Error::io(format!("serving {}", mnt.display()), e))?;
    log::info!("unmounted {}", mnt.display());
    Ok(())
}

/// Forks a daemon that mounts and serves; returns once it reports the mount
/// live, or with its error (and its exit code).
fn daemonize(fs: GuardedFs, mnt: &Path, opts: &MountOptions) -> Result<()> {
    let log = match &opts.log_file {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| crate::bad!("--log-file {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(Error::io(
            "creating a pipe",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: each fd is owned by exactly one File from here on.
    let (mut rx, mut tx) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: no other thread runs yet (planning is single-threaded), so the
    // child is a faithful copy.
    match unsafe { libc::fork() } {
        -1 => Err(Error::io(
            "forking the daemon",
            std::io::Error::last_os_error(),
        )),
        0 => {
            drop(rx);
            detach(log.as_ref());
            let code = match start(fs, mnt, opts) {
                Ok(session) => {
                    let _ = tx.write_all(b"0");
                    drop(tx);
                    log::info!("mounted at {} (pid {})", mnt.display(), std::process::id());
                    match run(session, mnt) {
                        Ok(()) => 0,
                        Err(e) => {
                            log::error!("{e}");
                            1
                        }
                    }
                }
                Err(e) => {
                    let _ = write!(tx, "{}{e}", e.exit_code());
                    e.exit_code()
                }
            };
            std::process::exit(code);
        }
        _child => {
            drop(tx);
            let mut answer = String::new();
            let _ = rx.read_to_string(&mut answer);
            match answer.split_at_checked(1) {
                Some(("0", _)) => Ok(()),
                Some(("2", msg)) => Err(Error::Input(msg.to_string())),
                Some((_, msg)) => Err(Error::io(
                    "starting the daemon",
                    std::io::Error::other(msg.to_string()),
                )),
                None => Err(Error::io(
                    "starting the daemon",
                    std::io::Error::other("it exited before mounting; see --log-file"),
                )),
            }
        }
    }
}

/// Makes the child a daemon: its own session, stdin from /dev/null, stdout
/// and stderr (and so the log) to the log file or /dev/null.
fn detach(log: Option<&File>) {
    // SAFETY: fd plumbing on fds this process owns.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            let out = log.map_or(null, |f| f.as_raw_fd());
            libc::dup2(out, 1);
            libc::dup2(out, 2);
            if null > 2 {
                libc::close(null);
            }
        }
        let _ = libc::chdir(c"/".as_ptr());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
    }

    #[test]
    fn mount_point_checks() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_mount_point(d.path()).is_ok());
        let e = check_mount_point(&d.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let e = check_mount_point(&f).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let e = check_mount_point(Path::new("/proc")).unwrap_err();
        assert!(e.to_string().contains("already a mount point"), "{e}");
    }
}
