//! A block cache bounded in bytes, for the mount's reads.
//!
//! View bytes are computed in fixed-size blocks. The cache keeps recently used
//! blocks (LRU) up to a byte budget. Two properties matter under concurrent
//! FUSE requests:
//! * concurrent misses on one block compute it once: the first reader fills
//!   the block's slot while the others wait on that slot's lock, not on a
//!   global one;
//! * the global lock only guards the LRU bookkeeping; bytes are computed and
//!   copied outside it.
//!
//! A failed computation is not cached: the slot is dropped and the next read
//! tries again (and fails again if the source is still broken).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

/// Identifies a block: a file number and the block's index in that file.
pub type BlockKey = (u32, u64);

/// A computed block, shared by the cache and the readers copying from it.
pub type Block = Arc<Vec<u8>>;

#[derive(Default)]
struct Slot {
    data: Mutex<Option<Block>>,
}

struct Inner {
    lru: LruCache<BlockKey, (Arc<Slot>, u64)>,
    bytes: u64,
}

pub struct BlockCache {
    inner: Mutex<Inner>,
    capacity: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Counters for `.reshardfs/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    pub capacity: u64,
    pub blocks: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the LRU inconsistent in a
    // way that matters more than refusing service would.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlockCache {
    pub fn new(capacity: u64) -> Self {
        BlockCache {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            capacity,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The block `key` of `len` bytes, computed by `fill` on a miss.
    pub fn get<E>(
        &self,
        key: BlockKey,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Block, E> {
        let slot = {
            let mut g = lock(&self.inner);
            match g.lru.get(&key) {
                Some((slot, _)) => slot.clone(),
                None => {
                    let slot = Arc::new(Slot::default());
                    g.lru.put(key, (slot.clone(), len as u64));
                    g.bytes += len as u64;
                    self.evict(&mut g);
                    slot
                }
            }
        };
        let mut data = lock(&slot.data);
        if let Some(block) = data.as_ref() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(block.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let mut buf = vec![0u8; len];
        if let Err(e) = fill(&mut buf) {
            drop(data);
            self.forget(key, &slot);
            return Err(e);
        }
        let block = Arc::new(buf);
        *data = Some(block.clone());
        Ok(block)
    }

    /// Drops least recently used blocks until the budget holds. Readers
    /// holding a dropped block (or waiting on its slot) still get it: only
    /// the cache forgets it.
    fn evict(&self, g: &mut Inner) {
        while g.bytes > self.capacity {
            match g.lru.pop_lru() {
                Some((_, (_, len))) => g.bytes -= len,
                None => break,
            }
        }
    }

    /// Removes a slot whose computation failed, if it is still the cached one.
    fn forget(&self, key: BlockKey, slot: &Arc<Slot>) {
        let mut g = lock(&self.inner);
        if g.lru.peek(&key).is_some_and(|(s, _)| Arc::ptr_eq(s, slot))
            && let Some((_, len)) = g.lru.pop(&key)
        {
            g.bytes -= len;
        }
    }

    /// Whether the block is cached (or being computed), without touching
    /// its recency.
    pub fn contains(&self, key: BlockKey) -> bool {
        lock(&self.inner).lru.contains(&key)
    }

    pub fn stats(&self) -> CacheStats {
        let g = lock(&self.inner);
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: g.bytes,
            capacity: self.capacity,
            blocks: g.lru.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn hits_misses_and_byte_budget() {
        let c = BlockCache::new(3000);
        let fills = AtomicUsize::new(0);
        let fill = |b: &mut [u8]| -> Result<(), ()> {
            fills.fetch_add(1, Ordering::SeqCst);
            b.fill(7);
            Ok(())
        };
        for i in 0..3 {
            assert_eq!(c.get((0, i), 1000, fill).unwrap().len(), 1000);
        }
        c.get((0, 0), 1000, fill).unwrap();
        assert_eq!(fills.load(Ordering::SeqCst), 3);
        // A fourth block evicts the least recently used one, (0, 1).
        c.get((0, 3), 1000, fill).unwrap();
        let s = c.stats();
        assert_eq!((s.bytes, s.blocks, s.hits, s.misses), (3000, 3, 1, 4));
        c.get((0, 1), 1000, fill).unwrap();
        assert_eq!(fills.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn a_block_larger_than_the_budget_is_served_but_not_kept() {
        let c = BlockCache::new(10);
        let b = c.get((1, 0), 100, |b: &mut [u8]| -> Result<(), ()> {
            b.fill(1);
            Ok(())
        });
        assert_eq!(b.unwrap().len(), 100);
        assert_eq!((c.stats().blocks, c.stats().bytes), (0, 0));
    }

    #[test]
    fn failures_are_not_cached() {
        let c = BlockCache::new(1000);
        assert!(c.get((0, 0), 10, |_: &mut [u8]| Err("boom")).is_err());
        assert_eq!(c.stats().blocks, 0);
        assert_eq!(c.stats().bytes, 0);
        let b = c.get((0, 0), 10, |b: &mut [u8]| -> Result<(), ()> {
            b.fill(2);
            Ok(())
        });
        assert_eq!(b.unwrap()[0], 2);
    }

    #[test]
    fn concurrent_misses_compute_once() {
        let c = Arc::new(BlockCache::new(1 << 20));
        let fills = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (c, fills) = (c.clone(), fills.clone());
                s.spawn(move || {
                    let b = c
                        .get((0, 42), 4096, |b: &mut [u8]| -> Result<(), ()> {
                            fills.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            b.fill(9);
                            Ok(())
                        })
                        .unwrap();
                    assert!(b.iter().all(|&x| x == 9));
                });
            }
        });
        assert_eq!(fills.load(Ordering::SeqCst), 1);
    }
}
