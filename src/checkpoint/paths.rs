//! Path safety and size caps: a checkpoint only ever names its own files,
//! and no file it names is read into memory beyond a fixed cap.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use super::mapped::RankFile;
use crate::bail;
use crate::error::{Result, source_io};

/// metadata.json larger than this is refused rather than parsed: parsing
/// costs several times the file in memory. A 70B save's is 2.6 MB; this
/// allows about a million storage entries.
pub(crate) const MAX_METADATA_BYTES: u64 = 256 << 20;
/// Tensors per iteration, and rank files per iteration (each is mapped and
/// has a SIGBUS guard entry).
pub(crate) const MAX_TENSORS: usize = 1 << 20;
pub(crate) const MAX_FILES: usize = 1 << 15;
/// common.json and the tracker are small; a large one is not a checkpoint's.
pub(crate) const MAX_SMALL_FILE_BYTES: u64 = 16 << 20;

pub(crate) fn read_small(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let len = fs::metadata(path).map_err(|e| source_io(path, e))?.len();
    if len > cap {
        bail!(
            "{}: {len} bytes, more than the {cap} this file may hold",
            path.display()
        );
    }
    fs::read(path).map_err(|e| source_io(path, e))
}

/// Opens a file named by the checkpoint, refusing names and links that lead
/// outside the folder: a checkpoint only ever names its own files.
pub(crate) fn open_rank_file(
    dir: &Path,
    file_name: &str,
    named_in: &Path,
    referrer: impl FnOnce() -> String,
) -> Result<RankFile> {
    let bare = !file_name.is_empty()
        && file_name != "."
        && file_name != ".."
        && !file_name.contains('/')
        && !file_name.contains('\0');
    if !bare {
        bail!(
            "{}: {}file_name {file_name:?} is not a bare file name in the same folder",
            named_in.display(),
            referrer()
        );
    }
    let path = dir.join(file_name);
    if !path.exists() {
        bail!(
            "{}: {}names {file_name}, which does not exist in {}",
            named_in.display(),
            referrer(),
            dir.display()
        );
    }
    let real = fs::canonicalize(&path).map_err(|e| source_io(&path, e))?;
    let real_dir = fs::canonicalize(dir).map_err(|e| source_io(dir, e))?;
    if real.parent() != Some(real_dir.as_path()) {
        bail!(
            "{}: is a link to {}, outside the checkpoint folder",
            path.display(),
            real.display()
        );
    }
    RankFile::open(&path)
}

/// Files of an iteration, opened once each and addressed by index.
pub(crate) struct FileSet<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) named_in: &'a Path,
    pub(crate) files: Vec<RankFile>,
    pub(crate) index: HashMap<String, usize>,
}

impl FileSet<'_> {
    /// The index of file `name`, opening it on first use; `referrer` says
    /// who named it, for the message if it cannot be opened.
    pub(crate) fn get(&mut self, name: &str, referrer: impl FnOnce() -> String) -> Result<usize> {
        if let Some(&i) = self.index.get(name) {
            return Ok(i);
        }
        if self.files.len() >= MAX_FILES {
            bail!(
                "{}: names more than {MAX_FILES} rank files, more than supported",
                self.named_in.display()
            );
        }
        let f = open_rank_file(self.dir, name, self.named_in, referrer)?;
        self.files.push(f);
        self.index.insert(name.to_string(), self.files.len() - 1);
        Ok(self.files.len() - 1)
    }

    /// Opens the files `names` will be asked for, all at once on several
    /// threads, before the checks ask for them one by one: a cold mount
    /// waits for each file's header pages, and 128 rank files (a 70B save)
    /// read one after another took most of a cold mount's second.
    ///
    /// Only successes are kept, in `names` order; a file that fails to open
    /// here is opened again by [`FileSet::get`], which reports it with the
    /// tensor that names it, exactly as without this step.
    pub(crate) fn preopen(&mut self, names: &[String]) {
        let mut seen = std::collections::HashSet::new();
        let todo: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| !self.index.contains_key(*n) && seen.insert(*n))
            .collect();
        if todo.len() < 2 || self.files.len() + todo.len() > MAX_FILES {
            return;
        }
        let threads = todo.len().min(PREOPEN_THREADS);
        // Every thread that allocates gets its own glibc malloc arena, and
        // arenas outlive their threads: the mount's request threads then
        // took them over and the daemon's RSS ran 30-65 MiB further over
        // the cache budget (bench row 7: 278-322 MiB peak vs 246-256 MiB for
        // a 205 MiB cache). The daemon runs with one arena anyway (see
        // `mount::daemon`); ask for it before these threads start.
        // SAFETY: mallopt only tunes the allocator.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let (dir, named_in) = (self.dir, self.named_in);
        let mut opened: Vec<(usize, RankFile)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(name) = todo.get(i) else { break };
                            if let Ok(f) = open_rank_file(dir, name, named_in, String::new) {
                                mine.push((i, f));
                            }
                        }
                        mine
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
        opened.sort_by_key(|(i, _)| *i);
        for (i, f) in opened {
            self.index.insert(todo[i].to_string(), self.files.len());
            self.files.push(f);
        }
    }
}

/// Threads opening rank files at once ([`FileSet::preopen`]): they wait for
/// the storage, not the CPU; 16 covers a network filesystem's latency.
const PREOPEN_THREADS: usize = 16;
