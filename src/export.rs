//! `export`: writes a view to disk, with the same tree a mount shows.
//!
//! Files are written in parallel, each under a temporary name and renamed
//! when complete, so an interrupted export never leaves a file that looks
//! whole. The tracker is written last, so a loader never finds a root whose
//! latest iteration is still being written. A view file that is a source
//! file whole (the plan marks it) is copied by the kernel
//! (`copy_file_range`), or shares its extents where the filesystem can.

use std::collections::HashSet;
use std::fs;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

use crate::bail;
use crate::checkpoint::names;
use crate::checkpoint::paths::overlap_with_source;
use crate::error::{Error, Result};
use crate::reshard::engine::Engine;
use crate::reshard::namespace::Content;
use crate::reshard::plan::Plan;

/// How much of a view file is produced per engine call.
const BUF_BYTES: usize = 8 << 20;

pub struct ExportOptions {
    /// Write into a non-empty destination.
    pub force: bool,
    /// Files written at once.
    pub threads: usize,
    /// Draw a progress bar (only when stderr is a terminal).
    pub progress: bool,
}

#[derive(Debug, Default)]
pub struct ExportStats {
    pub files: usize,
    pub bytes: u64,
    /// Of the files, view files copied whole from their source file.
    pub copied_whole: usize,
}

/// One file to write: its final path and where its bytes come from.
struct Job<'a> {
    path: PathBuf,
    content: Content<'a>,
}

impl Job<'_> {
    fn size(&self, plan: &Plan) -> u64 {
        match &self.content {
            Content::Bytes(b) => b.len() as u64,
            Content::View { it, file } => plan.iterations[*it].files[*file].size,
            Content::Dir => 0,
        }
    }
}

/// The view's entries ([`Plan::entries`]) under `dest`: the files to write
/// in parallel, the folders to create, and the tracker (if any), written
/// last.
fn jobs<'a>(plan: &'a Plan, dest: &Path) -> (Vec<Job<'a>>, Vec<PathBuf>, Option<Job<'a>>) {
    let mut jobs = Vec::new();
    let mut dirs = Vec::new();
    let mut tracker = None;
    for e in plan.entries() {
        let is_tracker = e.is_tracker();
        let job = Job {
            path: dest.join(&e.path),
            content: e.content,
        };
        match job.content {
            Content::Dir => dirs.push(job.path),
            _ if is_tracker => tracker = Some(job),
            _ => jobs.push(job),
        }
    }
    (jobs, dirs, tracker)
}

/// The folders that hold view files (where rank files of an earlier view
/// may linger).
fn rank_file_dirs(jobs: &[Job<'_>]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for j in jobs {
        if let (Content::View { .. }, Some(d)) = (&j.content, j.path.parent())
            && !dirs.iter().any(|x| x == d)
        {
            dirs.push(d.to_path_buf());
        }
    }
    dirs
}

/// Writes the view of `plan` under `dest`.
pub fn export(plan: &Plan, dest: &Path, opts: &ExportOptions) -> Result<ExportStats> {
    refuse_overlap(&plan.source.real_dirs(), dest)?;
    prepare_dest(dest, opts.force)?;
    let (jobs, dirs, tracker) = jobs(plan, dest);
    let stale = stale_rank_files(&rank_file_dirs(&jobs), &jobs, &source_files(plan))?;
    for d in &dirs {
        fs::create_dir_all(d).map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
    }
    let size = |j: &Job<'_>| j.size(plan);
    let total: u64 = jobs.iter().map(size).sum::<u64>() + tracker.as_ref().map_or(0, size);
    let bar = if opts.progress && std::io::stderr().is_terminal() {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };

    let engine = Engine::new(plan);
    let next = AtomicUsize::new(0);
    let copied_whole = AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let threads = opts.threads.clamp(1, jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; BUF_BYTES];
                loop {
                    if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { return };
                    match write_job(plan, &engine, job, &mut buf, &bar) {
                        Ok(true) => {
                            copied_whole.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        bar.abandon();
        return Err(e);
    }
    remove_stale_rank_files(&stale)?;
    if let Some(t) = &tracker {
        write_job(plan, &engine, t, &mut [], &bar)?;
    }
    bar.finish_and_clear();
    Ok(ExportStats {
        files: jobs.len() + usize::from(tracker.is_some()),
        bytes: total,
        copied_whole: copied_whole.into_inner(),
    })
}

/// After a forced export over an earlier view, rank files the new view does
/// not have (another world size, say) would sit beside the new metadata.json
/// and mislead a loader: they are removed once the view is written. Listed
/// before anything is written, so that a file the source holds (a hard link
/// of one, say) is refused before DEST changes: `--force` never deletes it.
fn stale_rank_files(
    dirs: &[PathBuf],
    jobs: &[Job<'_>],
    source: &HashSet<(u64, u64)>,
) -> Result<Vec<PathBuf>> {
    let written: HashSet<&Path> = jobs.iter().map(|j| j.path.as_path()).collect();
    let mut stale = Vec::new();
    for dir in dirs {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let is_rank_file = name
                .to_str()
                .is_some_and(|n| names::parse_rank_file_name(n).is_some());
            if is_rank_file && !written.contains(path.as_path()) {
                if let Ok(m) = fs::symlink_metadata(&path)
                    && source.contains(&(m.dev(), m.ino()))
                {
                    bail!(
                        "{}: is a file of the source checkpoint (a hard link to it); --force never removes one",
                        path.display()
                    );
                }
                stale.push(path);
            }
        }
    }
    Ok(stale)
}

fn remove_stale_rank_files(stale: &[PathBuf]) -> Result<()> {
    for path in stale {
        log::info!("removing {}, left by an earlier export", path.display());
        fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing stale {}", path.display()), e))?;
    }
    Ok(())
}

/// Refuses a DEST that is the source, lies inside it or contains it (after
/// resolving symlinks), with or without `--force`: `export CKPT CKPT --force`
/// once replaced the user's checkpoint with the view. The same holds for a
/// folder the source's links lead to (`dirs` after the first: a Hub
/// snapshot's `blobs/`).
fn refuse_overlap(dirs: &[std::path::PathBuf], dest: &Path) -> Result<()> {
    for (i, dir) in dirs.iter().enumerate() {
        let how = overlap_with_source(dir, dest)
            .map_err(|e| crate::bad!("{}: cannot resolve the destination: {e}", dest.display()))?;
        let Some(how) = how else { continue };
        if i == 0 {
            bail!(
                "{}: the destination {how} the source {}; export to a folder apart from it (--force does not change this)",
                dest.display(),
                dir.display()
            );
        }
        bail!(
            "{}: the destination {how} {}, which holds the source's files (the links in {} lead there); export to a folder apart from it (--force does not change this)",
            dest.display(),
            dir.display(),
            dirs[0].display()
        );
    }
    Ok(())
}

/// Device and inode of every file the source holds.
fn source_files(plan: &Plan) -> HashSet<(u64, u64)> {
    let mut out = HashSet::new();
    if let Ok(m) = fs::metadata(plan.source.path.join(names::TRACKER)) {
        out.insert((m.dev(), m.ino()));
    }
    for it in &plan.source.iterations {
        let others = [names::METADATA, names::COMMON].map(|n| it.dir.join(n));
        for p in it.files.iter().map(|f| f.path.clone()).chain(others) {
            if let Ok(m) = fs::metadata(&p) {
                out.insert((m.dev(), m.ino()));
            }
        }
    }
    out
}

/// Refuses a destination that holds anything, unless forced.
fn prepare_dest(dest: &Path, force: bool) -> Result<()> {
    match fs::metadata(dest) {
        Ok(m) if !m.is_dir() => bail!("{}: exists and is not a directory", dest.display()),
        Ok(_) => {
            let mut entries = fs::read_dir(dest)
                .map_err(|e| Error::io(format!("reading {}", dest.display()), e))?;
            if entries.next().is_some() && !force {
                bail!(
                    "{}: is not empty; pass --force to write into it anyway",
                    dest.display()
                );
            }
            Ok(())
        }
        Err(_) => fs::create_dir_all(dest)
            .map_err(|e| Error::io(format!("creating {}", dest.display()), e)),
    }
}

/// Writes one file under a temporary name in its folder, renamed over the
/// final name once complete (`tempfile`'s `persist`); a failed write leaves
/// nothing (the temporary file is removed when dropped). True when a view
/// file was copied whole from its source file.
fn write_job(
    plan: &Plan,
    engine: &Engine<'_>,
    job: &Job<'_>,
    buf: &mut [u8],
    bar: &ProgressBar,
) -> Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let name = job
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = job.path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".reshardfs-tmp")
        // As File::create: 0666 less the umask (tempfile's default is 0600).
        .permissions(fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(|e| Error::io(format!("creating a temporary file in {}", dir.display()), e))?;
    let ctx = |what: &str| format!("{what} {}", job.path.display());
    let mut whole = false;
    match &job.content {
        Content::Bytes(b) => {
            tmp.write_all(b).map_err(|e| Error::io(ctx("writing"), e))?;
            bar.inc(b.len() as u64);
        }
        Content::Dir => {}
        &Content::View { it, file } => {
            let size = engine.size(it, file);
            let mut off = 0u64;
            let source = plan.iterations[it].files[file]
                .whole_source
                .map(|f| &plan.source.iterations[it].files[f]);
            if let Some(src) = source {
                off = copy_whole(src, tmp.as_file(), size, bar).map_err(|e| match e {
                    CopyError::Changed => crate::bad!(
                        "{}: the source file changed (truncated, deleted, replaced or rewritten) or became unreadable while in use",
                        src.path.display()
                    ),
                    CopyError::Io(e) => Error::io(
                        format!("copying {} to {}", src.path.display(), job.path.display()),
                        e,
                    ),
                })?;
                whole = off == size;
            }
            while off < size {
                let n = engine
                    .read(it, file, off, buf)
                    .map_err(|e| crate::bad!("{e}"))?
                    .bytes;
                if n == 0 {
                    break;
                }
                tmp.write_all(&buf[..n])
                    .map_err(|e| Error::io(ctx("writing"), e))?;
                off += n as u64;
                bar.inc(n as u64);
            }
        }
    }
    tmp.persist(&job.path).map_err(|e| {
        Error::io(
            format!(
                "renaming {} to {}",
                e.file.path().display(),
                job.path.display()
            ),
            e.error,
        )
    })?;
    Ok(whole)
}

/// Copies the source file `src`, `size` bytes, whole into `out` at its
/// position, with `copy_file_range`: the kernel copies in-kernel (or, on a
/// filesystem with reflinks such as XFS or btrfs, shares the extents; NFS
/// copies on the server), and no byte passes through this process. From
/// the descriptor the plan mapped, checked unchanged before and after (as
/// the engine checks every read). Returns the bytes copied: `size`, or 0
/// when the filesystems cannot (`EXDEV`, `EINVAL`, `ENOSYS`,
/// `EOPNOTSUPP`), and the caller writes the file with the engine.
fn copy_whole(
    src: &crate::checkpoint::mapped::RankFile,
    out: &fs::File,
    size: u64,
    bar: &ProgressBar,
) -> std::result::Result<u64, CopyError> {
    use std::os::fd::AsRawFd;
    /// Per call, so the progress bar moves.
    const STEP: u64 = 64 << 20;
    let file = src.if_unchanged().ok_or(CopyError::Changed)?;
    let mut off_in: libc::loff_t = 0;
    let mut done = 0u64;
    while done < size {
        let n = (size - done).min(STEP) as usize;
        // SAFETY: both descriptors are open for the call; `off_in` is a
        // valid loff_t the kernel advances; a null `off_out` copies at (and
        // advances) `out`'s own position.
        let r = unsafe {
            libc::copy_file_range(
                file.as_raw_fd(),
                &mut off_in,
                out.as_raw_fd(),
                std::ptr::null_mut(),
                n,
                0,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            let unsupported = matches!(
                e.raw_os_error(),
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
            );
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if unsupported && done == 0 {
                log::debug!(
                    "{}: copy_file_range: {e}; copying through the engine",
                    src.path.display()
                );
                return Ok(0);
            }
            return Err(CopyError::Io(e));
        }
        if r == 0 {
            // The file ended early: it shrank since planning.
            return Err(CopyError::Changed);
        }
        done += r as u64;
        bar.inc(r as u64);
    }
    if src.if_unchanged().is_none() {
        return Err(CopyError::Changed);
    }
    Ok(done)
}

enum CopyError {
    /// The source is no longer the file planned: bad input, as a read of it.
    Changed,
    Io(std::io::Error),
}
