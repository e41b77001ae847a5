//! Where a source's files live: the one interface through which the
//! checkpoint readers list folders, read small files and open rank files,
//! whatever the storage.
//!
//! Two stores implement it: the local file system ([`Local`]: rank files
//! memory-mapped, exactly as before the seam) and S3-compatible object
//! stores ([`crate::checkpoint::s3::store::ObjectStore`]: listings by
//! ListObjectsV2, small files by one GET, rank files read by ranged GETs).
//! A path says which store holds it: `s3://bucket/key...` an object store,
//! anything else the file system. Paths rather than a store handed down
//! every call keep the readers (`source`, `iteration`, `plain`, `models`)
//! as they were, naming files in messages as the user named them; the
//! dispatch is here and only here ([`of`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::mapped::RankFile;
use super::paths::{self, Named};
use super::s3;
use crate::error::{Result, source_io};

/// What a name in a folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    /// Neither: a FIFO, a device, a socket (only on a local file system).
    Other,
}

/// One name in a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
}

/// What the checkpoint readers ask of a storage.
pub trait Store: Send + Sync {
    /// The names directly in folder `dir`, in no particular order. A link
    /// counts as what it leads to; one that leads nowhere is a file (the
    /// reader that opens it says why it cannot).
    fn list(&self, dir: &Path) -> Result<Vec<Entry>>;
    /// What `path` is, `None` when nothing is there.
    fn kind(&self, path: &Path) -> Result<Option<EntryKind>>;
    /// Whether anything is at `path`, a link leading nowhere included
    /// (whose reader then says why it cannot read it).
    fn exists(&self, path: &Path) -> Result<bool> {
        Ok(self.kind(path)?.is_some())
    }
    /// A whole file of at most `cap` bytes.
    fn read_small(&self, path: &Path, cap: u64) -> Result<Vec<u8>>;
    /// Opens the rank file `n` names (a bare name, checked by the caller),
    /// its header read and checked.
    fn open_rank_file(&self, n: &Named<'_>) -> Result<RankFile>;
    /// The path every later use names the source by: absolute, links
    /// resolved, on the file system.
    fn canonical(&self, path: &Path) -> Result<PathBuf>;
    /// Whether the store is this machine's file system (its files can be
    /// stat-ed, mapped, passed through, and overlap a mount point).
    fn is_local(&self) -> bool;
}

/// The store that holds `path`.
pub fn of(path: &Path) -> Result<Arc<dyn Store>> {
    match path.to_str().and_then(s3::Location::parse) {
        Some(loc) => Ok(s3::store::for_bucket(&loc?.bucket)?),
        None => Ok(Arc::new(Local)),
    }
}

/// Whether `path` names an object in a store rather than a local file.
pub fn is_remote(path: &Path) -> bool {
    path.to_str().and_then(s3::Location::parse).is_some()
}

/// The local file system.
#[derive(Debug, Clone, Copy)]
pub struct Local;

impl Store for Local {
    fn list(&self, dir: &Path) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| source_io(dir, e))? {
            let e = e.map_err(|e| source_io(dir, e))?;
            let kind = match std::fs::metadata(e.path()) {
                Ok(m) if m.is_dir() => EntryKind::Dir,
                Ok(m) if !m.is_file() => EntryKind::Other,
                _ => EntryKind::File,
            };
            out.push(Entry {
                name: e.file_name().to_string_lossy().into_owned(),
                kind,
            });
        }
        Ok(out)
    }

    fn kind(&self, path: &Path) -> Result<Option<EntryKind>> {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => Ok(Some(EntryKind::Dir)),
            Ok(_) => Ok(Some(EntryKind::File)),
            // Nothing there (or a dangling link): absent. Anything else (a
            // dead mount's ENOTCONN, EACCES) is the user's to know.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                Ok(None)
            }
            Err(e) => Err(source_io(path, e)),
        }
    }

    fn exists(&self, path: &Path) -> Result<bool> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(source_io(path, e)),
        }
    }

    fn read_small(&self, path: &Path, cap: u64) -> Result<Vec<u8>> {
        paths::read_local_small(path, cap)
    }

    fn open_rank_file(&self, n: &Named<'_>) -> Result<RankFile> {
        paths::open_local_rank_file(n)
    }

    fn canonical(&self, path: &Path) -> Result<PathBuf> {
        std::fs::canonicalize(path).map_err(|e| source_io(path, e))
    }

    fn is_local(&self) -> bool {
        true
    }
}
