//! Path safety and capped reads: a checkpoint only ever names its own
//! files, and no file it names is read into memory beyond a fixed cap
//! (the caps are in [`super::limits`]).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use std::os::unix::fs::OpenOptionsExt;

use super::limits::MAX_FILES;
use super::mapped::RankFile;
use super::store;
use crate::error::{Error, Result, source_io};
use crate::{bad, bail};

/// Reads a whole file of at most `cap` bytes, from the store that holds it.
pub(crate) fn read_small(path: &Path, cap: u64) -> Result<Vec<u8>> {
    store::of(path)?.read_small(path, cap)
}

/// [`read_small`] on the file system. The cap holds while reading, not
/// only by the size `stat` reports: a FIFO or a device (`/dev/zero` given
/// as `--strategy`) reports 0 and would otherwise be read forever.
pub(crate) fn read_local_small(path: &Path, cap: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = fs::File::open(path).map_err(|e| source_io(path, e))?;
    let mut buf = Vec::new();
    file.take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| source_io(path, e))?;
    if buf.len() as u64 > cap {
        bail!(
            "{}: more than the {cap} bytes this file may hold",
            path.display()
        );
    }
    Ok(buf)
}

/// How a folder's symlinks are read.
///
/// A Checkpoint 2.0 folder names its own files in `metadata.json`: a
/// `file_name` is a bare name, and a link leading out of the folder is
/// refused, so that a checkpoint can only ever name its own files. A
/// Hugging Face or plain folder is different: the Hub cache
/// (`huggingface_hub`, `from_pretrained`) keeps every file of a snapshot as
/// a link to `../../blobs/<sha256>`, and every loader reads through such
/// links. There a link is followed wherever it leads, as long as it ends at
/// a regular file the user can open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Links must stay inside the folder (`metadata.json`'s `file_name`s).
    Inside,
    /// Links are followed to any regular file (Hugging Face and plain folders).
    Follow,
}

/// A rank file as a checkpoint names it: the folder, the name, the file
/// that names it and who in that file (`referrer`, for messages), and where
/// a link may lead.
pub struct Named<'a> {
    pub dir: &'a Path,
    pub file_name: &'a str,
    pub named_in: &'a Path,
    pub links: Links,
    pub referrer: &'a dyn Fn() -> String,
}

impl Named<'_> {
    /// The file's path, in its folder.
    pub fn path(&self) -> PathBuf {
        self.dir.join(self.file_name)
    }

    /// The error for a name its folder does not hold, whatever the store.
    pub fn missing(&self) -> Error {
        bad!(
            "{}: {}names {}, which does not exist in {}",
            self.named_in.display(),
            (self.referrer)(),
            self.file_name,
            self.dir.display()
        )
    }
}

/// Opens a file named by the checkpoint, from the store that holds its
/// folder: the name must be a bare name in the folder; where its link may
/// lead is its `links` rule.
pub(crate) fn open_rank_file(n: &Named<'_>) -> Result<RankFile> {
    let file_name = n.file_name;
    let bare = !file_name.is_empty()
        && file_name != "."
        && file_name != ".."
        && !file_name.contains('/')
        && !file_name.contains('\0');
    if !bare {
        bail!(
            "{}: {}file_name {file_name:?} is not a bare file name in the same folder",
            n.named_in.display(),
            (n.referrer)()
        );
    }
    store::of(n.dir)?.open_rank_file(n)
}

/// [`open_rank_file`] on the file system, the name checked bare. Whatever
/// the rule for links, only a regular file is opened: a FIFO would block
/// the open (and every read) forever, and a directory or a device is no
/// safetensors file.
pub(crate) fn open_local_rank_file(n: &Named<'_>) -> Result<RankFile> {
    let (dir, links) = (n.dir, n.links);
    let path = n.path();
    let missing = || n.missing();
    let link = match fs::symlink_metadata(&path) {
        Ok(m) => m.file_type().is_symlink(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
        Err(e) => return Err(source_io(&path, e)),
    };
    if link && links == Links::Inside && !path.exists() {
        return Err(missing());
    }
    let target = || match fs::read_link(&path) {
        Ok(t) => format!(" (a link to {})", t.display()),
        Err(_) => String::new(),
    };
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => bail!(
            "{}: a loop of symbolic links{}; it leads to no file",
            path.display(),
            target()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{}: a dangling link{}: the file it names does not exist (an incomplete download?)",
            path.display(),
            target()
        ),
        Err(e) => return Err(source_io(&path, e)),
    };
    if let Some(what) = not_a_file(&meta) {
        bail!(
            "{}: is {what}{}, not a safetensors file",
            path.display(),
            if link { target() } else { String::new() }
        );
    }
    // Open once, then check the file that was opened (not the path, which a
    // symlink swapped in after the check could redirect), and map that
    // same descriptor. O_NONBLOCK: a FIFO swapped in after the check must
    // not block the open; it changes nothing for a regular file.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| source_io(&path, e))?;
    let opened = file.metadata().map_err(|e| source_io(&path, e))?;
    if let Some(what) = not_a_file(&opened) {
        bail!(
            "{}: changed while being opened (now {what})",
            path.display()
        );
    }
    if links == Links::Inside {
        let real_dir = fs::canonicalize(dir).map_err(|e| source_io(dir, e))?;
        let real = opened_path(&file, &path)?;
        if real.parent() != Some(real_dir.as_path()) {
            bail!(
                "{}: is a link to {}, outside the checkpoint folder",
                path.display(),
                real.display()
            );
        }
    }
    RankFile::from_file(file, &path)
}

/// What a file that is not a regular file is, for messages.
fn not_a_file(m: &fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_char_device() || t.is_block_device() {
        Some("a device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

/// Where an opened file really is: the kernel's own answer in
/// `/proc/self/fd`; without /proc, the canonical path, accepted only if it
/// names the very file opened (same device and inode).
fn opened_path(file: &fs::File, path: &Path) -> Result<std::path::PathBuf> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    if let Ok(p) = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
        return Ok(p);
    }
    let real = fs::canonicalize(path).map_err(|e| source_io(path, e))?;
    let opened = file.metadata().map_err(|e| source_io(path, e))?;
    let named = fs::metadata(&real).map_err(|e| source_io(&real, e))?;
    if (opened.dev(), opened.ino()) != (named.dev(), named.ino()) {
        bail!(
            "{}: changed while being opened (now a link to {})",
            path.display(),
            real.display()
        );
    }
    Ok(real)
}

/// Files of an iteration, opened once each and addressed by index.
pub(crate) struct FileSet<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) named_in: &'a Path,
    /// Where the folder's links may lead.
    pub(crate) links: Links,
    pub(crate) files: Vec<RankFile>,
    pub(crate) index: HashMap<String, usize>,
}

impl FileSet<'_> {
    /// The index of file `name`, opening it on first use; `referrer` says
    /// who named it, for the message if it cannot be opened.
    pub(crate) fn get(&mut self, name: &str, referrer: impl Fn() -> String) -> Result<usize> {
        if let Some(&i) = self.index.get(name) {
            return Ok(i);
        }
        if self.files.len() >= MAX_FILES {
            bail!(
                "{}: names more than {MAX_FILES} rank files, more than supported",
                self.named_in.display()
            );
        }
        let f = open_rank_file(&Named {
            dir: self.dir,
            file_name: name,
            named_in: self.named_in,
            links: self.links,
            referrer: &referrer,
        })?;
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
        // These threads allocate (headers), and each would get a malloc
        // arena of its own that outlives it, unless the process runs with
        // one arena: `main` asks for that at start-up (see its
        // `tune_process`).
        let threads = todo.len().min(PREOPEN_THREADS);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let (dir, named_in, links) = (self.dir, self.named_in, self.links);
        let mut opened: Vec<(usize, RankFile)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(name) = todo.get(i) else { break };
                            let named = Named {
                                dir,
                                file_name: name,
                                named_in,
                                links,
                                referrer: &String::new,
                            };
                            if let Ok(f) = open_rank_file(&named) {
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

/// `path` made absolute with every symlink resolved, also when its last
/// components do not exist yet (an export's DEST). Resolved front to back:
/// each existing component is canonicalized (so a `..` after it goes to its
/// real parent); once one is missing, the rest cannot hold a symlink and is
/// resolved lexically.
pub fn resolve_maybe_missing(path: &Path) -> std::io::Result<std::path::PathBuf> {
    use std::path::Component;
    let abs = std::path::absolute(path)?;
    let mut base = std::path::PathBuf::new();
    let mut missing = false;
    for c in abs.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => base.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                base.pop();
            }
            Component::Normal(name) => {
                let next = base.join(name);
                if missing {
                    base = next;
                    continue;
                }
                match fs::symlink_metadata(&next) {
                    Ok(_) => base = fs::canonicalize(&next)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        missing = true;
                        base = next;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(base)
}

/// How `other` (a mount point or an export's DEST) overlaps the source at
/// `source`, both resolved through symlinks: `Some("is")`, `Some("lies
/// inside")` or `Some("contains")`, or `None` when they are apart. Writing
/// into or mounting over the source would destroy or hide it.
pub fn overlap_with_source(source: &Path, other: &Path) -> std::io::Result<Option<&'static str>> {
    let source = fs::canonicalize(source)?;
    let other = resolve_maybe_missing(other)?;
    Ok(if other == source {
        Some("is")
    } else if other.starts_with(&source) {
        Some("lies inside")
    } else if source.starts_with(&other) {
        Some("contains")
    } else {
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_reads_are_capped_while_reading() {
        let e = read_small(Path::new("/dev/zero"), 1 << 10).unwrap_err();
        assert!(e.to_string().contains("more than the 1024 bytes"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("f"), b"12345").unwrap();
        assert_eq!(read_small(&tmp.path().join("f"), 5).unwrap(), b"12345");
        assert!(read_small(&tmp.path().join("f"), 4).is_err());
    }

    #[test]
    fn the_opened_file_is_what_is_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("it");
        fs::create_dir(&dir).unwrap();
        let f = fs::File::create(dir.join("a.safetensors")).unwrap();
        let p = opened_path(&f, &dir.join("a.safetensors")).unwrap();
        assert_eq!(p, fs::canonicalize(dir.join("a.safetensors")).unwrap());
        // A link leading outside is refused by what the kernel opened.
        fs::write(tmp.path().join("outside"), b"x").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), dir.join("b.safetensors")).unwrap();
        let e = open_rank_file(&Named {
            dir: &dir,
            file_name: "b.safetensors",
            named_in: Path::new("metadata.json"),
            links: Links::Inside,
            referrer: &String::new,
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("outside the checkpoint folder"),
            "{e}"
        );
    }

    /// `open_rank_file` of `name` in `dir` under `links`.
    fn open(dir: &Path, name: &str, links: Links) -> Result<RankFile> {
        open_rank_file(&Named {
            dir,
            file_name: name,
            named_in: Path::new("index.json"),
            links,
            referrer: &String::new,
        })
    }

    #[test]
    fn a_plain_folder_follows_links_to_regular_files_only() {
        use crate::checkpoint::source::tests::{f32s, input_err, safetensors};
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        // A Hub cache snapshot: the file is a relative link into blobs/.
        let snap = tmp.path().join("snapshots/abc");
        let blobs = tmp.path().join("blobs");
        fs::create_dir_all(&snap).unwrap();
        fs::create_dir_all(&blobs).unwrap();
        fs::write(
            blobs.join("2887e7"),
            safetensors(&[("w", "F32", &[1], &f32s(&[1.0]))]),
        )
        .unwrap();
        symlink("../../blobs/2887e7", snap.join("model.safetensors")).unwrap();
        let f = open(&snap, "model.safetensors", Links::Follow).unwrap();
        assert_eq!(f.path, snap.join("model.safetensors"));
        assert_eq!(f.real_path, fs::canonicalize(blobs.join("2887e7")).unwrap());
        assert!(f.is_unchanged());
        // The strict rule of a Checkpoint 2.0 folder still refuses it.
        let e = input_err(
            open(&snap, "model.safetensors", Links::Inside),
            &["outside"],
        );
        assert!(e.contains("2887e7"), "{e}");

        let at = |n: &str| snap.join(n).display().to_string();
        symlink("../../blobs/gone", snap.join("dangling.safetensors")).unwrap();
        symlink("loop2.safetensors", snap.join("loop1.safetensors")).unwrap();
        symlink("loop1.safetensors", snap.join("loop2.safetensors")).unwrap();
        symlink("../../blobs", snap.join("dir.safetensors")).unwrap();
        symlink("/dev/null", snap.join("dev.safetensors")).unwrap();
        nix::unistd::mkfifo(
            &snap.join("fifo.safetensors"),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        symlink("fifo.safetensors", snap.join("tofifo.safetensors")).unwrap();
        for (name, words) in [
            ("dangling.safetensors", &["dangling", "blobs/gone"][..]),
            ("loop1.safetensors", &["loop"][..]),
            ("dir.safetensors", &["a directory", "blobs"][..]),
            ("dev.safetensors", &["a device", "/dev/null"][..]),
            ("fifo.safetensors", &["FIFO"][..]),
            ("tofifo.safetensors", &["FIFO"][..]),
        ] {
            let p = at(name);
            let mut want = vec![p.as_str()];
            want.extend(words);
            input_err(open(&snap, name, Links::Follow), &want);
        }
        // Whatever the rule, a FIFO is refused, not opened (which would block).
        input_err(open(&snap, "fifo.safetensors", Links::Inside), &["FIFO"]);
        input_err(
            open(&snap, "missing.safetensors", Links::Follow),
            &["index.json", "missing.safetensors", "does not exist"],
        );
    }

    #[test]
    fn overlaps_through_symlinks_and_missing_parts() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("ckpt");
        fs::create_dir_all(src.join("iteration_1")).unwrap();
        std::os::unix::fs::symlink(&src, tmp.path().join("link")).unwrap();
        let o = |p: &Path| overlap_with_source(&src, p).unwrap();
        assert_eq!(o(&src), Some("is"));
        assert_eq!(o(&tmp.path().join("link")), Some("is"));
        assert_eq!(o(&tmp.path().join("link/iteration_1")), Some("lies inside"));
        assert_eq!(o(&tmp.path().join("link/new/deeper")), Some("lies inside"));
        assert_eq!(o(&tmp.path().join("x/../ckpt")), Some("is"));
        assert_eq!(o(&tmp.path().join("link/new/..")), Some("is"));
        assert_eq!(o(tmp.path()), Some("contains"));
        assert_eq!(o(&tmp.path().join("other")), None);
        assert_eq!(o(&tmp.path().join("ckpt2")), None);
    }
}
