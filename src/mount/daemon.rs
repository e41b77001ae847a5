//! Mounting: checks on the mount point, the background daemon, signals.
//!
//! Like other FUSE tools, `mount` returns only once the mount is live. The
//! whole plan is built and checked before anything is mounted; the process
//! then forks, the child mounts and reports back through a pipe, and the
//! parent exits with the child's verdict (waiting at most 30 s, with the
//! daemon's start-up log in hand). A mount that failed leaves nothing
//! behind. Root mounts with mount(2) through fuser; an ordinary user through
//! the setuid helper `fusermount3`, as libfuse does.

use std::fs::File;
use std::io::{IoSliceMut, PipeReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use nix::unistd::{AccessFlags, ForkResult};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::bail;
use crate::checkpoint::paths::overlap_with_source;
use crate::error::{Error, Result};
use crate::mount::fuse::ViewFs;
use crate::mount::hooks;
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
    // A FUSE mount whose daemon died: the path resolves (realpath needs no
    // stat of the mount's root), but every stat of it fails with ENOTCONN.
    let dead = |e: &std::io::Error| e.raw_os_error() == Some(libc::ENOTCONN);
    let dead_here = || {
        crate::bad!(
            "{}: a dead mount is left here (transport endpoint is not connected: its daemon is gone); run `umount {}` (or `fusermount3 -u {}`) first",
            mnt.display(),
            mnt.display(),
            mnt.display()
        )
    };
    let canon = match std::fs::canonicalize(mnt) {
        Ok(p) => p,
        Err(e) if dead(&e) => return Err(dead_here()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{}: the mount point does not exist", mnt.display())
        }
        Err(e) => bail!("{}: {e}", mnt.display()),
    };
    match std::fs::metadata(&canon) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("{}: the mount point is not a directory", mnt.display()),
        Err(e) if dead(&e) => return Err(dead_here()),
        Err(e) => bail!("{}: {e}", mnt.display()),
    }
    if let Some(m) = mounted_at(&canon) {
        bail!(
            "{}: already a mount point ({}); unmount it first or choose another folder",
            mnt.display(),
            m.fs_type
        );
    }
    Ok(canon)
}

/// The last mount at `path` in /proc/self/mountinfo (read with `procfs`).
fn mounted_at(path: &Path) -> Option<procfs::process::MountInfo> {
    let infos = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .ok()?;
    infos
        .0
        .into_iter()
        .rev()
        .find(|m| unescape_mountinfo(&m.mount_point.to_string_lossy()) == path.to_string_lossy())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`; `procfs`
/// hands mount points over still escaped.
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
    // fails: the view's own bytes come from under the mount. So does
    // mounting over the folder a source's links lead to (a Hub snapshot's
    // blobs/).
    let dirs = server.source_dirs();
    for (i, dir) in dirs.iter().enumerate() {
        let Some(how) = overlap_with_source(dir, &mnt)
            .map_err(|e| crate::bad!("{}: cannot resolve the mount point: {e}", mnt.display()))?
        else {
            continue;
        };
        if i == 0 {
            bail!(
                "{}: the mount point {how} the source {}; mounting there would hide it",
                mnt.display(),
                dir.display()
            );
        }
        bail!(
            "{}: the mount point {how} {}, which holds the source's files (the links in {} lead there); mounting there would hide them",
            mnt.display(),
            dir.display(),
            dirs[0].display()
        );
    }
    // What the environment lacks is found here, before anything runs.
    let mounter = Mounter::choose(opts.allow_other)?;
    let fs = ViewFs::new(server);
    if opts.foreground {
        let signals = stop_signals()?;
        let session = start(fs, &mnt, opts, &mounter)?;
        log::info!("mounted at {} (pid {})", mnt.display(), std::process::id());
        return run(session, &mnt, &mounter, signals);
    }
    daemonize(fs, &mnt, opts, &mounter)
}

/// `/dev/fuse`, the kernel's FUSE device.
const FUSE_DEVICE: &str = "/dev/fuse";

/// How this process mounts.
#[derive(Debug, Clone)]
enum Mounter {
    /// mount(2) itself: root. fuser's own path (it opens /dev/fuse and mounts).
    Direct,
    /// Through the setuid helper `fusermount3`, as libfuse does for an
    /// ordinary user: it opens /dev/fuse (mode 0600 on many machines and
    /// containers, where fuser 0.18's own path fails with EACCES before it
    /// ever tries fusermount3), mounts, and passes the descriptor back.
    Fusermount(PathBuf),
}

impl Mounter {
    /// Picks how to mount, or says what the environment lacks (exit 2: the
    /// environment is the user's to fix).
    fn choose(allow_other: bool) -> Result<Mounter> {
        match std::fs::metadata(FUSE_DEVICE) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{FUSE_DEVICE} does not exist: FUSE is not available here; load the kernel module (`modprobe fuse`), or start the container with the device (e.g. `docker run --device /dev/fuse --cap-add SYS_ADMIN`)"
            ),
            Err(e) => bail!("{FUSE_DEVICE}: {e}"),
        }
        if nix::unistd::geteuid().is_root() {
            return Ok(Mounter::Direct);
        }
        let fusermount = find_fusermount3();
        // fusermount3 opens /dev/fuse with the caller's own rights (libfuse
        // drops its setuid privileges for that open), so an ordinary user
        // needs the device readable and writable (mode 0666, as Debian's
        // fuse3 udev rule sets it) whatever else is installed. Measured here:
        // with /dev/fuse 0600, fusermount3 3.14 fails with "failed to open
        // /dev/fuse: Permission denied".
        let usable =
            nix::unistd::access(FUSE_DEVICE, AccessFlags::R_OK | AccessFlags::W_OK).is_ok();
        let bin = match (usable, fusermount) {
            (true, Some(bin)) => bin,
            (false, None) => bail!(
                "cannot mount as an ordinary user: {FUSE_DEVICE} is not readable and writable by this user, and fusermount3 is not installed; install it (Debian/Ubuntu: `apt install fuse3`, which also makes {FUSE_DEVICE} mode 0666), or mount as root"
            ),
            (false, Some(_)) => bail!(
                "cannot mount as an ordinary user: {FUSE_DEVICE} is not readable and writable by this user (fusermount3 opens it with the user's rights); make it mode 0666 (as Debian's fuse3 package does, e.g. `chmod 0666 {FUSE_DEVICE}`), or mount as root"
            ),
            (true, None) => bail!(
                "cannot mount as an ordinary user: fusermount3 is not installed; install it (Debian/Ubuntu: `apt install fuse3`), or mount as root"
            ),
        };
        if allow_other && !user_allow_other() {
            bail!(
                "--allow-other: an ordinary user may use it only when /etc/fuse.conf has the line `user_allow_other` (ask the administrator to add it), or mount as root"
            );
        }
        Ok(Mounter::Fusermount(bin))
    }
}

/// `fusermount3`: `$FUSERMOUNT_PATH` if set (as fuser and libfuse allow),
/// else the first in `$PATH`, `/usr/bin` or `/bin`.
fn find_fusermount3() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if let Some(p) = std::env::var_os("FUSERMOUNT_PATH") {
        let p = PathBuf::from(p);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join("fusermount3"))
        .find(|p| executable(p))
}

/// Whether `/etc/fuse.conf` lets ordinary users mount with `allow_other`.
fn user_allow_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf").is_ok_and(|text| {
        text.lines()
            .any(|l| l.split('#').next().unwrap_or("").trim() == "user_allow_other")
    })
}

fn config(opts: &MountOptions) -> Config {
    let mut c = Config::default();
    // Keep in step with `fusermount_options`.
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

/// `config`'s mount options as `fusermount3 -o` takes them.
fn fusermount_options(opts: &MountOptions) -> String {
    let mut o = "ro,nodev,nosuid,noatime,default_permissions,fsname=reshardfs,subtype=reshardfs"
        .to_string();
    if opts.allow_other {
        o.push_str(",allow_other");
    }
    o
}

/// Mounts and completes the FUSE handshake: when this returns the mount is live.
fn start(
    fs: ViewFs,
    mnt: &Path,
    opts: &MountOptions,
    mounter: &Mounter,
) -> Result<Session<ViewFs>> {
    if hooks::get().hang_before_mount {
        log::warn!("test hook RESHARDFS_TEST_HANG_BEFORE_MOUNT: hanging before mounting");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let config = config(opts);
    let session = match mounter {
        Mounter::Direct => Session::new(fs, mnt, &config)
            .map_err(|e| Error::io(format!("mounting at {}", mnt.display()), e))?,
        Mounter::Fusermount(bin) => {
            let fd = fusermount_mount(bin, mnt, opts)?;
            let acl = config.acl;
            match Session::from_fd(fs, fd, acl, config) {
                Ok(s) => s,
                Err(e) => {
                    let _ = fusermount_unmount(bin, mnt);
                    return Err(Error::io(format!("starting FUSE at {}", mnt.display()), e));
                }
            }
        }
    };
    raise_readahead(mnt);
    Ok(session)
}

/// Mounts through `fusermount3`: it mounts `/dev/fuse` at `mnt` and passes
/// the descriptor back over a socket named in `_FUSE_COMMFD` (libfuse's
/// protocol). Its refusals (a mount point the user may not write, ...) are
/// the user's to fix: exit 2 with its message.
fn fusermount_mount(bin: &Path, mnt: &Path, opts: &MountOptions) -> Result<OwnedFd> {
    let io = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", bin.display()), e);
    let (ours, theirs) = UnixStream::pair().map_err(|e| io("a socket for", e))?;
    // The helper finds its end by number; a duplicate has no close-on-exec
    // flag, so it survives the exec. No other thread runs here, so no other
    // child can inherit it.
    let inherited = nix::unistd::dup(&theirs).map_err(|e| io("passing a socket to", e.into()))?;
    drop(theirs);
    let child = Command::new(bin)
        .arg("-o")
        .arg(fusermount_options(opts))
        .arg("--")
        .arg(mnt)
        .env("_FUSE_COMMFD", inherited.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io("running", e))?;
    drop(inherited);
    let fd = receive_fd(&ours);
    drop(ours);
    let out = child.wait_with_output().map_err(|e| io("waiting for", e))?;
    match fd {
        Ok(fd) => Ok(fd),
        Err(e) => {
            let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if said.is_empty() {
                Err(Error::io(
                    format!(
                        "mounting at {} through {} ({})",
                        mnt.display(),
                        bin.display(),
                        out.status
                    ),
                    e,
                ))
            } else {
                bail!(
                    "mounting at {} through {}: {said}",
                    mnt.display(),
                    bin.display()
                )
            }
        }
    }
}

/// Receives the one descriptor `fusermount3` sends (SCM_RIGHTS).
fn receive_fd(sock: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r?,
        }
    };
    let mut got = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel has just installed `fd` in this
                // process's table for us; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                got.get_or_insert(owned);
            }
        }
    }
    got.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "fusermount3 passed no /dev/fuse descriptor",
        )
    })
}

/// `fusermount3 -u MNT`, lazily (`-z`) when files are still open.
fn fusermount_unmount(bin: &Path, mnt: &Path) -> std::io::Result<()> {
    let run = |lazy: bool| {
        let mut c = Command::new(bin);
        c.arg("-u").arg("-q");
        if lazy {
            c.arg("-z");
        }
        c.arg("--")
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
    };
    let out = run(false)?;
    if out.status.success() {
        return Ok(());
    }
    let out = run(true)?;
    if out.status.success() {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "{} -u -z {}: {}",
        bin.display(),
        mnt.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Readahead the kernel applies to the mount, in KiB.
const READ_AHEAD_KB: u32 = 1024;

/// The kernel reads a FUSE file in requests of its bdi's `read_ahead_kb`
/// (128 KiB by default), whatever the FUSE handshake allows. Raising it to
/// 1 MiB cuts the requests per byte by 8 (zero-cost data: 2.9 -> 3.2 GB/s on
/// this machine). Needs root; without it the mount works with the default.
fn raise_readahead(mnt: &Path) {
    let Some(dev) = mounted_at(mnt).map(|m| m.majmin) else {
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

/// Catches the stop signals from before mounting (one arriving meanwhile
/// waits for the signal thread, instead of killing a half-mounted process).
fn stop_signals() -> Result<Signals> {
    Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| Error::io("catching stop signals", e))
}

/// Serves until the mount goes away: `umount`/`fusermount3 -u`, or a stop
/// signal, which detaches the mount (lazily, so open files finish) and ends
/// the loop once the kernel lets go.
fn run(
    mut session: Session<ViewFs>,
    mnt: &Path,
    mounter: &Mounter,
    mut signals: Signals,
) -> Result<()> {
    // The unmounter takes the mount out of the session, so the session does
    // not try (and warn about failing) to unmount it again when it ends.
    let mut unmounter = session.unmount_callable();
    let target = mnt.to_path_buf();
    let mounter = mounter.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Some(sig) = signals.forever().next() else {
                return;
            };
            log::info!("signal {sig}: unmounting");
            let result = match &mounter {
                // Busy (files still open): detach now, finish their reads,
                // and end once the kernel lets go.
                Mounter::Direct => unmounter.unmount().or_else(|_| {
                    nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH)
                        .map_err(std::io::Error::from)
                }),
                Mounter::Fusermount(bin) => fusermount_unmount(bin, &target),
            };
            if let Err(e) = result {
                log::error!("unmount failed: {e}");
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

/// How long `mount` waits for its daemon to report the mount live (as
/// mount-s3 does): a source on a hung network filesystem must not hang the
/// command forever.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn start_timeout() -> Duration {
    // Tests shorten it.
    hooks::get().start_timeout.unwrap_or(START_TIMEOUT)
}

/// At most this much of the daemon's start-up log is kept for a message.
const STARTUP_LOG_BYTES: usize = 64 << 10;

/// Forks a daemon that mounts and serves; returns once it reports the mount
/// live, or with its error (and its exit code). Until then the daemon's log
/// comes to this process through a pipe, so that a daemon that fails or
/// hangs at start-up is reported with what it logged.
fn daemonize(fs: ViewFs, mnt: &Path, opts: &MountOptions, mounter: &Mounter) -> Result<()> {
    let mut log_file = match &opts.log_file {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| crate::bad!("--log-file {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let (status_rx, mut status_tx) =
        std::io::pipe().map_err(|e| Error::io("creating a pipe", e))?;
    let (log_rx, log_tx) = std::io::pipe().map_err(|e| Error::io("creating a pipe", e))?;
    // The child of a fork holds only the thread that forked, so no other
    // thread may run here: planning's only threads (the rank files'
    // pre-open, `checkpoint::paths`) are scoped and joined before it
    // returns, and the prefetch workers start at the first open, in the
    // child.
    debug_assert_eq!(settled_threads(), 1, "fork with other threads running");
    // SAFETY: this is the process's only thread (above), so the child is
    // a faithful copy and may do anything.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(Error::io("forking the daemon", e.into())),
        Ok(ForkResult::Child) => {
            drop(status_rx);
            drop(log_rx);
            detach(log_tx.as_fd());
            let code = match stop_signals().and_then(|s| Ok((s, start(fs, mnt, opts, mounter)?))) {
                Ok((signals, session)) => {
                    // Live: from here the log goes to --log-file or nowhere,
                    // and the start-up pipe closes.
                    redirect_output(log_file.as_ref());
                    drop(log_tx);
                    log::info!("mounted at {} (pid {})", mnt.display(), std::process::id());
                    let _ = status_tx.write_all(b"0");
                    drop(status_tx);
                    match run(session, mnt, mounter, signals) {
                        Ok(()) => 0,
                        Err(e) => {
                            log::error!("{e}");
                            1
                        }
                    }
                }
                Err(e) => {
                    let _ = write!(status_tx, "{}{e}", e.exit_code());
                    e.exit_code()
                }
            };
            std::process::exit(code);
        }
        Ok(ForkResult::Parent { child }) => {
            drop(status_tx);
            drop(log_tx);
            let r = wait_for_daemon(status_rx, log_rx, start_timeout());
            let (answer, logged) = match r {
                Ok(x) => x,
                Err(logged) => {
                    // Hung: kill it, and take down a mount it may have made.
                    let _ = kill(child, Signal::SIGKILL);
                    let _ = nix::sys::wait::waitpid(child, None);
                    if mounted_at(mnt).is_some_and(|m| m.fs_type.starts_with("fuse")) {
                        let _ = match mounter {
                            Mounter::Direct => {
                                nix::mount::umount2(mnt, nix::mount::MntFlags::MNT_DETACH)
                                    .map_err(std::io::Error::from)
                            }
                            Mounter::Fusermount(bin) => fusermount_unmount(bin, mnt),
                        };
                    }
                    return Err(Error::io(
                        "starting the daemon",
                        std::io::Error::other(format!(
                            "it did not report a live mount within {} s, so it was killed; it logged:\n{}",
                            start_timeout().as_secs(),
                            shown(&logged)
                        )),
                    ));
                }
            };
            if let Some(f) = log_file.as_mut() {
                let _ = f.write_all(&logged);
            }
            match answer.split_at_checked(1) {
                Some(("0", _)) => Ok(()),
                Some(("2", msg)) => Err(Error::Input(msg.to_string())),
                Some((_, msg)) => Err(Error::io(
                    "starting the daemon",
                    std::io::Error::other(msg.to_string()),
                )),
                None => {
                    let _ = nix::sys::wait::waitpid(child, None);
                    Err(Error::io(
                        "starting the daemon",
                        std::io::Error::other(format!(
                            "it exited before mounting; it logged:\n{}",
                            shown(&logged)
                        )),
                    ))
                }
            }
        }
    }
}

/// Threads of this process (`/proc/self/task`), for the fork's check.
fn threads_now() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(1, Iterator::count)
}

/// The process's threads once those that are exiting have gone: a joined
/// thread has run its last user code, but the kernel may list it in
/// `/proc/self/task` a little longer (the join returns when the thread
/// clears its id, before its task is reaped). Without the wait the debug
/// build's check before `fork` failed now and then (1 in 833 tests, 2
/// threads listed).
fn settled_threads() -> usize {
    for _ in 0..100 {
        let n = threads_now();
        if n == 1 {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    threads_now()
}

fn shown(logged: &[u8]) -> String {
    let text = String::from_utf8_lossy(logged);
    let text = text.trim_end();
    if text.is_empty() {
        "(nothing)".into()
    } else {
        text.to_string()
    }
}

/// Reads the daemon's verdict and its start-up log until the verdict pipe
/// closes, for at most `limit`: `Ok((verdict, log))`, or `Err(log)` when
/// the time ran out.
fn wait_for_daemon(
    mut status: PipeReader,
    mut log: PipeReader,
    limit: Duration,
) -> std::result::Result<(String, Vec<u8>), Vec<u8>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = Instant::now() + limit;
    let mut answer = Vec::new();
    let mut logged = Vec::new();
    let mut log_open = true;
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(logged);
        }
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let (status_ready, log_ready) = {
            let mut fds = vec![PollFd::new(status.as_fd(), PollFlags::POLLIN)];
            if log_open {
                fds.push(PollFd::new(log.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return Err(logged),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), fds.get(1).is_some_and(ready))
        };
        if log_ready {
            match log.read(&mut buf) {
                Ok(0) | Err(_) => log_open = false,
                Ok(n) => {
                    logged.extend_from_slice(&buf[..n]);
                    if logged.len() > STARTUP_LOG_BYTES {
                        logged.drain(..logged.len() - STARTUP_LOG_BYTES);
                    }
                }
            }
        }
        if status_ready {
            match status.read(&mut buf) {
                Ok(0) | Err(_) => {
                    // Verdict complete: collect what is left of the log
                    // without waiting (the daemon has closed it, or a
                    // failed daemon has exited).
                    while log_open {
                        let mut fds = [PollFd::new(log.as_fd(), PollFlags::POLLIN)];
                        if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1)) {
                            break;
                        }
                        match log.read(&mut buf) {
                            Ok(0) | Err(_) => log_open = false,
                            Ok(n) => logged.extend_from_slice(&buf[..n]),
                        }
                    }
                    return Ok((String::from_utf8_lossy(&answer).into_owned(), logged));
                }
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    }
}

/// Makes the child a daemon: its own session, the root as working folder,
/// stdin from /dev/null, stdout and stderr (and so the log) to `log`.
fn detach(log: std::os::fd::BorrowedFd<'_>) {
    let _ = nix::unistd::setsid();
    let _ = nix::unistd::chdir("/");
    if let Ok(null) = File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
    }
    let _ = nix::unistd::dup2_stdout(log);
    let _ = nix::unistd::dup2_stderr(log);
}

/// Points stdout and stderr at the log file, or at /dev/null.
fn redirect_output(log: Option<&File>) {
    let null = File::options().write(true).open("/dev/null");
    let out = match (log, &null) {
        (Some(f), _) => f.as_fd(),
        (None, Ok(n)) => n.as_fd(),
        (None, Err(_)) => return,
    };
    let _ = nix::unistd::dup2_stdout(out);
    let _ = nix::unistd::dup2_stderr(out);
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
