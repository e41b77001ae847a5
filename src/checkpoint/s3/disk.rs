//! `--cache-dir`: object blocks kept on a local disk, so that a second job
//! start on the same node fetches from the store only what is new.
//!
//! One file per block, named by a hash of (bucket, key, ETag, block): a
//! block is only ever found for the very object version it was fetched
//! from, so a replaced object misses and is fetched anew (its old blocks
//! age out). Files are written to a temporary name and renamed, so a
//! reader never sees half a block; a file whose length is not the block's
//! is ignored and removed. The folder is bounded in bytes: the least
//! recently used files go first (use is tracked in memory; at start the
//! files found are ordered by modification time). Errors of the disk
//! cache never fail a read: they are logged and the store is asked.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Result, source_io};

/// A bounded folder of blocks.
pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    state: Mutex<State>,
}

struct State {
    /// Name -> (size, last use); `clock` orders uses.
    files: HashMap<String, (u64, u64)>,
    bytes: u64,
    clock: u64,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiskCache({})", self.dir.display())
    }
}

/// FNV-1a, 128 bits as two 64-bit lanes with different seeds: a file name
/// that is stable across runs (std's hasher is seeded per process).
fn name_of(parts: &[&str]) -> String {
    let mut h = [0xcbf2_9ce4_8422_2325u64, 0x6c62_272e_07bb_0142u64];
    for (lane, seed) in h.iter_mut().zip([0u8, 0x5a]) {
        for p in parts {
            for b in p.bytes().chain([0u8]) {
                *lane ^= u64::from(b ^ seed);
                *lane = lane.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    format!("{:016x}{:016x}", h[0], h[1])
}

impl DiskCache {
    /// Opens (making it, mode 0700) the cache folder `dir`, bounded to
    /// `capacity` bytes; files beyond the bound (a smaller bound than last
    /// time) are removed now.
    pub fn open(dir: &Path, capacity: u64) -> Result<DiskCache> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| source_io(dir, e))?;
        let mut found: Vec<(std::time::SystemTime, String, u64)> = Vec::new();
        for e in fs::read_dir(dir).map_err(|e| source_io(dir, e))? {
            let Ok(e) = e else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(m) = e.metadata() else { continue };
            if name.starts_with(".tmp-") {
                // Left by a process that died while writing.
                let _ = fs::remove_file(e.path());
            } else if m.is_file() && name.len() == 32 {
                let t = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                found.push((t, name, m.len()));
            }
        }
        found.sort();
        let mut state = State {
            files: HashMap::new(),
            bytes: 0,
            clock: 0,
        };
        for (_, name, size) in found {
            state.clock += 1;
            state.bytes += size;
            state.files.insert(name, (size, state.clock));
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            capacity,
            state: Mutex::new(state),
        };
        cache.evict(0);
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The block named by `parts` if the folder holds it whole (`len`
    /// bytes; any length when `None`, for the caller to check).
    pub fn get(&self, parts: &[&str], len: Option<usize>) -> Option<Vec<u8>> {
        let name = name_of(parts);
        {
            let mut s = self.lock();
            s.clock += 1;
            let clock = s.clock;
            s.files.get_mut(&name)?.1 = clock;
        }
        let path = self.dir.join(&name);
        match fs::read(&path) {
            Ok(data) if len.is_none_or(|n| data.len() == n) => Some(data),
            Ok(_) | Err(_) => {
                self.forget(&name);
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Keeps `data` as the block named by `parts`, making room first.
    pub fn put(&self, parts: &[&str], data: &[u8]) {
        let size = data.len() as u64;
        if size > self.capacity {
            return;
        }
        let name = name_of(parts);
        if self.lock().files.contains_key(&name) {
            return;
        }
        self.evict(size);
        let tmp = self.dir.join(format!(".tmp-{name}-{}", std::process::id()));
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(data))
            .and_then(|()| fs::rename(&tmp, self.dir.join(&name)));
        match written {
            Ok(()) => {
                let mut s = self.lock();
                s.clock += 1;
                let clock = s.clock;
                if s.files.insert(name, (size, clock)).is_none() {
                    s.bytes += size;
                }
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                log::warn!(
                    "--cache-dir {}: cannot keep a block: {e}",
                    self.dir.display()
                );
            }
        }
    }

    fn forget(&self, name: &str) {
        let mut s = self.lock();
        if let Some((size, _)) = s.files.remove(name) {
            s.bytes -= size;
        }
    }

    /// Removes the least recently used files until `room` more bytes fit.
    fn evict(&self, room: u64) {
        let victims: Vec<String> = {
            let mut s = self.lock();
            let mut order: Vec<(u64, String, u64)> = s
                .files
                .iter()
                .map(|(n, &(size, t))| (t, n.clone(), size))
                .collect();
            order.sort();
            let mut out = Vec::new();
            for (_, name, size) in order {
                if s.bytes + room <= self.capacity {
                    break;
                }
                s.files.remove(&name);
                s.bytes -= size;
                out.push(name);
            }
            out
        };
        for name in victims {
            let _ = fs::remove_file(self.dir.join(name));
        }
    }

    /// Bytes the folder holds (by this process's count).
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_back_whole_and_the_folder_keeps_its_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let c = DiskCache::open(&dir, 10).unwrap();
        c.put(&["b", "k", "e1", "0"], b"abcd");
        assert_eq!(
            c.get(&["b", "k", "e1", "0"], Some(4)).as_deref(),
            Some(&b"abcd"[..])
        );
        // Another ETag is another block.
        assert_eq!(c.get(&["b", "k", "e2", "0"], Some(4)), None);
        c.put(&["b", "k", "e1", "1"], b"efgh");
        c.get(&["b", "k", "e1", "0"], Some(4)).unwrap();
        // Over the bound: the least recently used (block 1) goes.
        c.put(&["b", "k", "e1", "2"], b"ijkl");
        assert!(c.bytes() <= 10);
        assert_eq!(c.get(&["b", "k", "e1", "1"], Some(4)), None);
        assert!(c.get(&["b", "k", "e1", "0"], Some(4)).is_some());
        // A new process finds what is there; a wrong length is a miss.
        drop(c);
        let c = DiskCache::open(&dir, 10).unwrap();
        assert_eq!(c.bytes(), 8);
        assert_eq!(c.get(&["b", "k", "e1", "2"], Some(5)), None);
        assert_eq!(c.bytes(), 4);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
