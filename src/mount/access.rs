//! Who may read a view's files: never more than may read the source files
//! they are made of.
//!
//! The mount is served by the mounting user's daemon, which reads every
//! source file, and with `--allow-other` the kernel lets other users in by
//! the modes the view reports (`default_permissions`). Were every view file
//! `r--r--r--`, a shard written `rw-------` (as transformers writes them)
//! would be readable by anyone through the view. So each node's mode grants
//! a class of users (the mounting user's group, everyone else) read only
//! where every source file it is made of grants that class read, and every
//! folder above that file grants it search: a readable file in a private
//! home directory is not readable by others. The mounting user, the owner
//! of every node, could read all of them (the daemon did), and keeps read.
//!
//! The rule is strict on purpose: a class is granted only if the source
//! grants read to all of its members, owner and group bits included (a file
//! `rw----r--` denies its group, so it grants nobody), and a file or folder
//! with a POSIX ACL, whose entries the mode bits do not show, grants nobody
//! beyond the mounting user.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Read (files) and search (folders) in a mode's class bits.
const READ: u32 = 4;
const SEARCH: u32 = 1;

/// A file's or folder's mode and group, as `stat` gives them, and whether
/// it carries an access ACL.
#[derive(Debug, Clone, Copy)]
pub struct Perm {
    pub mode: u32,
    pub gid: u32,
    pub acl: bool,
}

impl Perm {
    /// `stat` (links followed) and the ACL of `path`; `None` if either
    /// cannot be asked (then nothing is granted).
    fn of(path: &Path) -> Option<Perm> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Perm {
            mode: m.mode(),
            gid: m.gid(),
            acl: has_acl(path)?,
        })
    }
}

/// Whether `path` has a POSIX access ACL (`system.posix_acl_access`);
/// `None` when that cannot be told.
fn has_acl(path: &Path) -> Option<bool> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let name = c"system.posix_acl_access";
    // SAFETY: both strings are NUL-terminated; a zero-sized query writes nothing.
    let n = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    if n >= 0 {
        return Some(true);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENODATA) | Some(libc::ENOTSUP) => Some(false),
        _ => None,
    }
}

/// Who besides the mounting user may read a node: the members of the
/// mounting user's group (the node's group), and everyone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub group: bool,
    pub other: bool,
}

impl Grant {
    pub const ALL: Grant = Grant {
        group: true,
        other: true,
    };
    pub const NONE: Grant = Grant {
        group: false,
        other: false,
    };

    /// What `p` grants (`bit`: read or search) to the members of group
    /// `gid` and to everyone else: a class gets it only if every member
    /// does, so the owner and group bits must grant it too (a member may
    /// own the file, or be in its group).
    fn of(p: &Perm, bit: u32, gid: u32) -> Grant {
        if p.acl {
            return Grant::NONE;
        }
        let (u, g, o) = (
            p.mode & (bit << 6) != 0,
            p.mode & (bit << 3) != 0,
            p.mode & bit != 0,
        );
        Grant {
            group: u && g && (o || p.gid == gid),
            other: u && g && o,
        }
    }

    pub fn and(self, o: Grant) -> Grant {
        Grant {
            group: self.group && o.group,
            other: self.other && o.other,
        }
    }

    /// A file's mode: read for the owner, and for the classes granted.
    pub fn file_mode(self) -> u16 {
        0o400 | if self.group { 0o040 } else { 0 } | if self.other { 0o004 } else { 0 }
    }

    /// A folder's mode: read and search, as for files.
    pub fn dir_mode(self) -> u16 {
        0o500 | if self.group { 0o050 } else { 0 } | if self.other { 0o005 } else { 0 }
    }
}

/// The grants of source paths, each path and folder asked once.
pub struct Access {
    /// The mounting user's group: the group every node shows.
    gid: u32,
    dirs: HashMap<PathBuf, Grant>,
    files: HashMap<PathBuf, Grant>,
}

impl Access {
    pub fn new(gid: u32) -> Access {
        Access {
            gid,
            dirs: HashMap::new(),
            files: HashMap::new(),
        }
    }

    /// What reading the file named `path` takes: read on the file it leads
    /// to, and search on every folder above `path` and above `real` (where
    /// its link leads: a Hub snapshot's `blobs/`).
    ///
    /// An object in a store has no modes: whoever holds the mounting user's
    /// credentials may read it, and `--allow-other` is the user lending
    /// them, so it grants everything (without that option the kernel lets
    /// no other user in anyway).
    pub fn file(&mut self, path: &Path, real: &Path) -> Grant {
        if crate::checkpoint::store::is_remote(path) {
            return Grant::ALL;
        }
        if let Some(&g) = self.files.get(path) {
            return g;
        }
        let mut g = Perm::of(path).map_or(Grant::NONE, |p| Grant::of(&p, READ, self.gid));
        for p in [path, real] {
            for dir in p.ancestors().skip(1) {
                g = g.and(self.dir(dir));
            }
        }
        self.files.insert(path.to_path_buf(), g);
        g
    }

    /// Search on one folder.
    fn dir(&mut self, dir: &Path) -> Grant {
        if dir.as_os_str().is_empty() {
            return Grant::ALL;
        }
        if let Some(&g) = self.dirs.get(dir) {
            return g;
        }
        let g = Perm::of(dir).map_or(Grant::NONE, |p| Grant::of(&p, SEARCH, self.gid));
        self.dirs.insert(dir.to_path_buf(), g);
        g
    }

    /// [`Access::file`] of a file that may be absent (a folder's optional
    /// `common.json`): an absent file grants everything, as it holds nothing.
    pub fn optional(&mut self, path: &Path) -> Grant {
        if std::fs::symlink_metadata(path).is_err() {
            return Grant::ALL;
        }
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        self.file(path, &real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn perm(mode: u32, gid: u32) -> Perm {
        Perm {
            mode,
            gid,
            acl: false,
        }
    }

    #[test]
    fn a_class_is_granted_only_what_all_its_members_are() {
        let g = |mode, gid| Grant::of(&perm(mode, gid), READ, 100);
        assert_eq!(g(0o644, 5), Grant::ALL);
        assert_eq!(g(0o600, 100), Grant::NONE);
        // The group's own bits count for its members, others' for the rest.
        assert_eq!(
            g(0o640, 100),
            Grant {
                group: true,
                other: false
            }
        );
        assert_eq!(g(0o640, 5), Grant::NONE);
        // The group denied: a member of it reading as "other" is denied.
        assert_eq!(g(0o604, 5), Grant::NONE);
        // The owner denied: a member may be the owner.
        assert_eq!(g(0o044, 5), Grant::NONE);
        // Folders: search, not read.
        assert_eq!(Grant::of(&perm(0o711, 5), SEARCH, 100), Grant::ALL);
        assert_eq!(Grant::of(&perm(0o700, 5), SEARCH, 100), Grant::NONE);
        let acl = Perm {
            acl: true,
            ..perm(0o644, 100)
        };
        assert_eq!(Grant::of(&acl, READ, 100), Grant::NONE);
        assert_eq!(Grant::ALL.file_mode(), 0o444);
        assert_eq!(Grant::ALL.dir_mode(), 0o555);
        assert_eq!(Grant::NONE.file_mode(), 0o400);
        assert_eq!(
            Grant {
                group: true,
                other: false
            }
            .dir_mode(),
            0o550
        );
    }

    #[test]
    fn a_file_counts_with_every_folder_above_it_and_its_links_target() {
        use std::fs;
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        fs::create_dir(&base).unwrap();
        // `tempdir` makes its folder 0700: open it, and take what the
        // folders above it grant as they are.
        let chmod =
            |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        chmod(tmp.path(), 0o755);
        chmod(&base, 0o755);
        let mut a = Access::new(u32::MAX);
        let above = tmp
            .path()
            .ancestors()
            .fold(Grant::ALL, |g, d| g.and(a.dir(d)));
        let snap = base.join("snap");
        let blobs = base.join("blobs");
        fs::create_dir(&snap).unwrap();
        fs::create_dir(&blobs).unwrap();
        fs::write(blobs.join("x"), b"x").unwrap();
        std::os::unix::fs::symlink("../blobs/x", snap.join("f")).unwrap();
        let real = fs::canonicalize(blobs.join("x")).unwrap();
        let grant = |a: &mut Access| a.file(&snap.join("f"), &real);
        chmod(&real, 0o644);
        chmod(&snap, 0o755);
        chmod(&blobs, 0o755);
        assert_eq!(grant(&mut Access::new(u32::MAX)), above);
        // The blob private: nobody else.
        chmod(&real, 0o600);
        assert_eq!(grant(&mut Access::new(u32::MAX)), Grant::NONE);
        // The blob readable, its folder closed: nobody else either.
        chmod(&real, 0o644);
        chmod(&blobs, 0o700);
        assert_eq!(grant(&mut Access::new(u32::MAX)), Grant::NONE);
        chmod(&blobs, 0o755);
        chmod(&snap, 0o700);
        assert_eq!(grant(&mut Access::new(u32::MAX)), Grant::NONE);
        // A file that cannot be asked about grants nothing; one absent,
        // everything.
        let mut a = Access::new(u32::MAX);
        assert_eq!(a.file(&base.join("gone"), &base.join("gone")), Grant::NONE);
        assert_eq!(a.optional(&base.join("gone")), Grant::ALL);
    }
}
