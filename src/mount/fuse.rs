//! The FUSE adapter: translates kernel requests to [`Server`] calls.
//!
//! Nothing is decided here that the server or the tree does not already
//! know, and no state is kept here: open handles, their snapshots and
//! listings live in [`Server`], where they are unit-tested. View files are
//! opened with the kernel's page cache kept (their bytes never change while
//! mounted), or by passthrough when the server says so (it decides, and
//! keeps the backing files: [`crate::mount::serve::passthrough`]); the
//! counters file is opened direct-I/O so every read sees fresh numbers.
//!
//! **The panic policy.** A panic in a request handler is a bug. Left alone,
//! it ends one of fuser 0.18's worker threads for good: the kernel gets EIO
//! for that request and the mount slowly stops answering as threads die,
//! while the log (filtered at `--log-level`) says nothing. Every handler
//! here runs its body inside [`ViewFs::guard`] instead: the request's
//! reply, dropped unanswered while unwinding, answers EIO (fuser replies EIO
//! for a reply dropped unsent), the panic is logged at error level with the
//! operation, the file and the offset, counted as `internal_errors` in
//! `.reshardfs/stats`, and the worker thread carries on with the next
//! request. The prefetch workers have the same guard
//! ([`crate::mount::prefetch`]).

use std::ffi::OsStr;
use std::time::Duration;

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::mount::hooks;
use crate::mount::serve::passthrough::Backing;
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
        let (kind, nlink) = match a.kind {
            NodeKind::Dir => (FileType::Directory, 2),
            NodeKind::File => (FileType::RegularFile, 1),
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
            perm: a.perm,
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

    /// Runs one handler's body; see the module for what a panic does.
    fn guard(&self, op: &str, ino: INodeNo, offset: Option<u64>, f: impl FnOnce()) {
        let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) else {
            return;
        };
        let at = offset.map_or(String::new(), |o| format!(" at offset {o}"));
        let what = format!("{op} of {}{at}", self.server.tree().path(ino.0));
        self.server.internal_error(&what, &*payload, "answered EIO");
    }
}

fn open_errno(e: OpenError) -> Errno {
    match e {
        OpenError::NotFound => Errno::ENOENT,
        OpenError::IsDir => Errno::EISDIR,
        OpenError::NotDir => Errno::ENOTDIR,
        OpenError::SourceChanged => Errno::EIO,
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
        let offered = config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH);
        if let Some(depth) = self.server.negotiate_passthrough(offered)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && let Err(max) = config.set_max_stack_depth(depth)
        {
            let _ = config.set_max_stack_depth(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.guard("lookup", parent, None, || {
            match name.to_str().and_then(|n| self.server.lookup(parent.0, n)) {
                Some(a) => reply.entry(&Self::ttl(&a), &self.file_attr(&a), Generation(0)),
                None => reply.error(Errno::ENOENT),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.guard("getattr", ino, None, || match self.server.attr(ino.0) {
            Some(a) => reply.attr(&Self::ttl(&a), &self.file_attr(&a)),
            None => reply.error(Errno::ENOENT),
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.guard("open", ino, None, || {
            if flags.acc_mode() != OpenAccMode::O_RDONLY {
                return reply.error(Errno::EROFS);
            }
            let opened = self.server.open_with(ino.0, &mut |file| {
                reply.open_backing(file).map(Backing::new)
            });
            match opened {
                Ok(o) => match (&o.passthrough, o.direct_io) {
                    (Some(b), _) => match b.get::<BackingId>() {
                        Some(id) => {
                            reply.opened_passthrough(FileHandle(o.fh), FopenFlags::empty(), id)
                        }
                        // Only this adapter makes backing files: never.
                        None => reply.error(Errno::EIO),
                    },
                    (None, true) => reply.opened(FileHandle(o.fh), FopenFlags::FOPEN_DIRECT_IO),
                    (None, false) => reply.opened(FileHandle(o.fh), FopenFlags::FOPEN_KEEP_CACHE),
                },
                Err(e) => reply.error(open_errno(e)),
            }
        });
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
        self.guard("read", ino, Some(offset), || {
            if let Some(name) = &hooks::get().panic_on_read
                && self.server.tree().path(ino.0).ends_with(name.as_str())
            {
                panic!("injected by RESHARDFS_TEST_PANIC_ON_READ (tests only)");
            }
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
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.guard("flush", ino, None, || {
            reply.ok();
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.guard("release", ino, None, || {
            self.server.release(fh.0);
            reply.ok();
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.guard("opendir", ino, None, || match self.server.attr(ino.0) {
            Some(a) if a.kind == NodeKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.guard("readdir", ino, Some(offset), || {
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
        });
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.guard("statfs", ino, None, || {
            let files = self.server.tree().len() as u64;
            reply.statfs(0, 0, 0, files, 0, MAX_IO, 255, MAX_IO);
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        self.guard("getxattr", ino, None, || {
            reply.error(Errno::ENODATA);
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.guard("listxattr", ino, None, || {
            if size == 0 {
                reply.size(0);
            } else {
                reply.data(&[]);
            }
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.guard("access", ino, None, || {
            if self.server.attr(ino.0).is_none() {
                return reply.error(Errno::ENOENT);
            }
            if mask.contains(fuser::AccessFlags::W_OK) {
                return reply.error(Errno::EROFS);
            }
            reply.ok();
        });
    }
}
