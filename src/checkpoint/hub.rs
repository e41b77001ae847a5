//! The Hugging Face Hub cache as `huggingface_hub` lays it out, so that a
//! downloaded model is read where it lies:
//!
//! ```text
//! models--ORG--NAME/
//!   refs/main                 the revision `main` names (a commit hash, no newline)
//!   snapshots/<revision>/     the model's files, each a link to ../../blobs/<hash>
//!   blobs/<hash>              the bytes
//! ```
//!
//! `models--ORG--NAME` and `models--ORG--NAME/refs/<ref>` are shorthands for
//! the snapshot the ref names; a snapshot folder itself is a plain Hugging
//! Face folder whose files are links (read as [`super::paths::Links::Follow`]
//! says).

use std::fs;
use std::path::{Path, PathBuf};

use super::names;
use super::paths::read_small;
use crate::bail;
use crate::error::{Result, source_io};

/// A ref file holds one revision name; anything long is not one.
const MAX_REF_BYTES: u64 = 1024;

/// The snapshot folder `path` names when it is a Hub cache repository
/// folder or a ref file in one; `None` when it is neither (then `path` is
/// read as it is).
pub fn resolve(path: &Path) -> Result<Option<PathBuf>> {
    let Ok(meta) = fs::metadata(path) else {
        return Ok(None);
    };
    if meta.is_file() {
        return match repo_of_ref(path) {
            Some(repo) => snapshot_named(&repo, path).map(Some),
            None => Ok(None),
        };
    }
    if !meta.is_dir() || !is_repo(path) {
        return Ok(None);
    }
    let main = path.join("refs").join("main");
    if !main.is_file() {
        bail!(
            "{}: a Hugging Face Hub cache folder without refs/main; give the snapshot to read (snapshots: {}) or a ref file (refs: {})",
            path.display(),
            listing(&path.join("snapshots")),
            listing(&path.join("refs"))
        );
    }
    snapshot_named(path, &main).map(Some)
}

/// Whether `dir` is a Hub cache repository folder: `refs/` and `snapshots/`
/// folders, and no checkpoint of its own.
fn is_repo(dir: &Path) -> bool {
    if !dir.join("refs").is_dir() || !dir.join("snapshots").is_dir() {
        return false;
    }
    if dir.join(names::TRACKER).exists() || dir.join(names::METADATA).exists() {
        return false;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    !entries
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
}

/// The repository folder of a ref file: the parent of the `refs` folder
/// above it (refs may nest: `refs/pr/1`).
fn repo_of_ref(file: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(file).ok()?;
    let mut at = abs.parent();
    while let Some(dir) = at {
        if dir.file_name().is_some_and(|n| n == "refs") {
            let repo = dir.parent()?;
            return is_repo(repo).then(|| repo.to_path_buf());
        }
        at = dir.parent();
    }
    None
}

/// `repo/snapshots/<revision>` for the revision the ref file `r` holds.
fn snapshot_named(repo: &Path, r: &Path) -> Result<PathBuf> {
    let raw = read_small(r, MAX_REF_BYTES)?;
    let rev = String::from_utf8_lossy(&raw).trim().to_string();
    let bare = !rev.is_empty()
        && rev != "."
        && rev != ".."
        && !rev.contains(['/', '\\', '\0'])
        && !rev.chars().any(char::is_whitespace);
    if !bare {
        bail!(
            "{}: expected a revision name (a commit hash), found {:?}",
            r.display(),
            rev.chars().take(80).collect::<String>()
        );
    }
    let snapshot = repo.join("snapshots").join(&rev);
    match fs::metadata(&snapshot) {
        Ok(m) if m.is_dir() => Ok(snapshot),
        Ok(_) => bail!("{}: not a folder", snapshot.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{}: names revision {rev}, but {} does not exist (snapshots: {})",
            r.display(),
            snapshot.display(),
            listing(&repo.join("snapshots"))
        ),
        Err(e) => Err(source_io(&snapshot, e)),
    }
}

/// The names in `dir`, sorted, for messages.
fn listing(dir: &Path) -> String {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::tests::input_err;
    use std::os::unix::fs::symlink;

    /// A repository folder as huggingface_hub writes it: one revision,
    /// `refs/main` naming it (no newline), a file linked into blobs/.
    fn repo(base: &Path) -> PathBuf {
        let repo = base.join("models--org--name");
        fs::create_dir_all(repo.join("refs")).unwrap();
        fs::create_dir_all(repo.join("blobs")).unwrap();
        fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        fs::write(repo.join("refs/main"), b"abc123").unwrap();
        fs::write(repo.join("blobs/0f0f"), b"{}").unwrap();
        symlink(
            "../../blobs/0f0f",
            repo.join("snapshots/abc123/config.json"),
        )
        .unwrap();
        repo
    }

    #[test]
    fn a_repository_and_its_refs_name_the_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let r = repo(tmp.path());
        let snap = r.join("snapshots/abc123");
        assert_eq!(resolve(&r).unwrap(), Some(snap.clone()));
        assert_eq!(resolve(&r.join("refs/main")).unwrap(), Some(snap.clone()));
        // A nested ref (refs/pr/1), with a newline as an editor leaves it.
        fs::create_dir_all(r.join("refs/pr")).unwrap();
        fs::write(r.join("refs/pr/1"), b"abc123\n").unwrap();
        assert_eq!(resolve(&r.join("refs/pr/1")).unwrap(), Some(snap.clone()));
        // The snapshot itself, or any other folder, is read as it is.
        assert_eq!(resolve(&snap).unwrap(), None);
        assert_eq!(resolve(tmp.path()).unwrap(), None);
        assert_eq!(resolve(&snap.join("config.json")).unwrap(), None);
        assert_eq!(resolve(&tmp.path().join("missing")).unwrap(), None);
    }

    #[test]
    fn a_ref_naming_a_missing_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let r = repo(tmp.path());
        fs::write(r.join("refs/main"), b"def456").unwrap();
        let main = r.join("refs/main").display().to_string();
        input_err(resolve(&r), &[&main, "def456", "does not exist", "abc123"]);
        fs::write(r.join("refs/main"), b"../../etc").unwrap();
        input_err(resolve(&r), &[&main, "revision name"]);
        fs::write(r.join("refs/main"), b"").unwrap();
        input_err(resolve(&r), &[&main, "revision name"]);
    }

    #[test]
    fn a_repository_without_refs_main_lists_what_there_is() {
        let tmp = tempfile::tempdir().unwrap();
        let r = repo(tmp.path());
        fs::remove_file(r.join("refs/main")).unwrap();
        fs::write(r.join("refs/v1"), b"abc123").unwrap();
        input_err(
            resolve(&r),
            &[&r.display().to_string(), "refs/main", "abc123", "v1"],
        );
    }

    #[test]
    fn a_checkpoint_with_such_folders_is_not_a_repository() {
        let tmp = tempfile::tempdir().unwrap();
        let r = repo(tmp.path());
        fs::write(r.join("model.safetensors"), b"x").unwrap();
        assert_eq!(resolve(&r).unwrap(), None);
        assert_eq!(resolve(&r.join("refs/main")).unwrap(), None);
    }
}
