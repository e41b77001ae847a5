//! The FUSE adapter: translates kernel requests to [`Server`] calls.
//!
//! Nothing is decided here that the server or the tree does not already
//! know, and no state is kept here: open handles, their snapshots and
//! listings live in [`Server`], where they are unit-tested. View files are opened with the kernel's page cache kept (their bytes
//! never change while mounted); the counters file is opened direct-I/O so every
//! read sees fresh numbers.

use std::ffi::OsStr;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::mount::serve::{Attr, NodeKind, OpenError, ReadError, Server};

/// Attributes of the view never change while mounted.
const TTL: Duration = Duration::from_secs(3600);
/// Largest read request and readahead asked of the kernel.
const MAX_IO: u32 = 1 << 20;

pub struct ViewFs {
    server: Server,
    uid: u32,
    gid: u32,
}

impl ViewFs {
    pub fn new(server: Server) -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        ViewFs { server, uid, gid }
    }

    fn file_attr(&self, a: &Attr) -> FileAttr {
        let (kind, perm, nlink) = match a.kind {
            NodeKind::Dir => (FileType::Directory, 0o555, 2),
            NodeKind::File => (FileType::RegularFile, 0o444, 1),
        };
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: a.mtime,
            mtime: a.mtime,
            ctime: a.mtime,
            crtime: a.mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: MAX_IO,
        }
    }

    fn ttl(a: &Attr) -> Duration {
        if a.live { Duration::ZERO } else { TTL }
    }
}

fn open_errno(e: OpenError) -> Errno {
    match e {
        OpenError::NotFound => Errno::ENOENT,
        OpenError::IsDir => Errno::EISDIR,
        OpenError::NotDir => Errno::ENOTDIR,
    }
}

impl Filesystem for ViewFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large requests: the kernel sends reads of up to max(max_write,
        // max_readahead) bytes once FUSE_MAX_PAGES is negotiated.
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        if let Err(max) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match name.to_str().and_then(|n| self.server.lookup(parent.0, n)) {
            Some(a) => reply.entry(&Self::ttl(&a), &self.file_attr(&a), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.server.attr(ino.0) {
            Some(a) => reply.attr(&Self::ttl(&a), &self.file_attr(&a)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.server.open(ino.0) {
            Ok(o) if o.direct_io => reply.opened(FileHandle(o.fh), FopenFlags::FOPEN_DIRECT_IO),
            Ok(o) => reply.opened(FileHandle(o.fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(open_errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // `reply` moves into the closure on success; keep errors for after.
        let mut reply = Some(reply);
        let result = self
            .server
            .read_handle(ino.0, fh.0, offset, size as usize, |slices| {
                if let Some(r) = reply.take() {
                    r.data_vectored(slices);
                }
            });
        if let (Err(e), Some(r)) = (result, reply) {
            r.error(match e {
                ReadError::NotFound => Errno::ENOENT,
                ReadError::IsDir => Errno::EISDIR,
                ReadError::Source(_) => Errno::EIO,
            });
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.server.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.server.attr(ino.0) {
            Some(a) if a.kind == NodeKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.server.readdir(ino.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(open_errno(e)),
        };
        for e in entries {
            let kind = match e.kind {
                NodeKind::Dir => FileType::Directory,
                NodeKind::File => FileType::RegularFile,
            };
            if reply.add(INodeNo(e.ino), e.next, kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.server.tree().len() as u64;
        reply.statfs(0, 0, 0, files, 0, MAX_IO, 255, MAX_IO);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if self.server.attr(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if mask.contains(fuser::AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }
}

/// The panic policy of the daemon.
///
/// A panic in a request handler is a bug. Left alone, it ends one of fuser
/// 0.18's worker threads for good: the kernel gets EIO for that request and
/// the mount slowly stops answering as threads die, while the log (filtered
/// at `--log-level`) says nothing. `GuardedFs` runs every handler of
/// [`ViewFs`] under `catch_unwind` instead: the request's reply, dropped
/// unanswered while unwinding, answers EIO (fuser replies EIO for a reply
/// dropped unsent), the panic is logged at error level with the operation,
/// the file and the offset, counted as `internal_errors` in
/// `.reshardfs/stats`, and the worker thread carries on with the next request.
///
/// Kept as a wrapper apart from `ViewFs` so the adapter's handlers stay as
/// they are; every method `ViewFs` implements must be forwarded here (one it
/// does not forward falls back to fuser's default, ENOSYS).
pub struct GuardedFs {
    inner: ViewFs,
    /// Test-only hook (debug builds): a read of a file with this name panics.
    panic_on_read: Option<String>,
}

/// Environment variable naming a file whose reads panic, read once at
/// start-up and only in debug builds: how the tests inject a bug.
pub const TEST_PANIC_ON_READ: &str = "RESHARDFS_TEST_PANIC_ON_READ";

impl GuardedFs {
    pub fn new(inner: ViewFs) -> Self {
        let panic_on_read = if cfg!(debug_assertions) {
            std::env::var(TEST_PANIC_ON_READ).ok()
        } else {
            None
        };
        GuardedFs {
            inner,
            panic_on_read,
        }
    }

    /// Runs one handler; see the type's documentation for what a panic does.
    fn guard(&self, op: &str, ino: INodeNo, offset: Option<u64>, f: impl FnOnce()) {
        let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) else {
            return;
        };
        self.inner.server.count_internal_error();
        let msg = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = offset.map_or(String::new(), |o| format!(" at offset {o}"));
        log::error!(
            "internal error (a bug): {op} of {}{at} panicked: {msg}; answered EIO",
            self.inner.server.tree().path(ino.0)
        );
    }
}

impl Filesystem for GuardedFs {
    fn init(&mut self, req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.inner.init(req, config)
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.guard("lookup", parent, None, || {
            self.inner.lookup(req, parent, name, reply)
        });
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.guard("getattr", ino, None, || {
            self.inner.getattr(req, ino, fh, reply)
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.guard("open", ino, None, || {
            self.inner.open(req, ino, flags, reply)
        });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.guard("read", ino, Some(offset), || {
            if let Some(name) = &self.panic_on_read
                && self
                    .inner
                    .server
                    .tree()
                    .path(ino.0)
                    .ends_with(name.as_str())
            {
                panic!("injected by {TEST_PANIC_ON_READ} (tests only)");
            }
            self.inner
                .read(req, ino, fh, offset, size, flags, lock_owner, reply)
        });
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.guard("flush", ino, None, || {
            self.inner.flush(req, ino, fh, lock_owner, reply)
        });
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        self.guard("release", ino, None, || {
            self.inner
                .release(req, ino, fh, flags, lock_owner, flush, reply)
        });
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.guard("opendir", ino, None, || {
            self.inner.opendir(req, ino, flags, reply)
        });
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.guard("readdir", ino, Some(offset), || {
            self.inner.readdir(req, ino, fh, offset, reply)
        });
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.guard("statfs", ino, None, || self.inner.statfs(req, ino, reply));
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.guard("getxattr", ino, None, || {
            self.inner.getxattr(req, ino, name, size, reply)
        });
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.guard("listxattr", ino, None, || {
            self.inner.listxattr(req, ino, size, reply)
        });
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.guard("access", ino, None, || {
            self.inner.access(req, ino, mask, reply)
        });
    }
}
