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
//!
//! Blocks computed ahead by the prefetcher ([`BlockCache::prefetch`]) live in
//! the same budget, flagged until a reader takes them: a flagged block that is
//! evicted was wasted work, and the bytes still flagged are what the
//! prefetcher may not exceed (see [`BlockCache::pending_prefetch`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

/// Identifies a block: a file number and the block's index in that file.
pub type BlockKey = (u32, u64);

/// A computed block, shared by the cache and the readers copying from it.
pub type Block = Arc<Vec<u8>>;

#[derive(Default)]
struct Slot {
    data: Mutex<Option<Block>>,
    /// Put here by the prefetcher and not yet read.
    prefetched: AtomicBool,
    /// Bytes of it served to sequential readers ([`BlockCache::served`]).
    served: AtomicU64,
}

struct Inner {
    lru: LruCache<BlockKey, (Arc<Slot>, u64)>,
    bytes: u64,
    /// Buffers of prefetched blocks a sequential reader is done with, for
    /// the next prefetch: on a VM, memory freed and allocated again is
    /// often fresh to the host, and touching fresh pages cost ~2 s/GiB here
    /// (docs/PERFORMANCE.md, the machine), more than computing the block.
    spare: Vec<Vec<u8>>,
}

/// Spare buffers kept (1 MiB each at most): enough for the workers to keep
/// reusing while a reader consumes; outside the budget, so kept small.
const SPARES: usize = 4;

pub struct BlockCache {
    inner: Mutex<Inner>,
    capacity: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Bytes of blocks the prefetcher put here that nobody has read yet.
    pending: AtomicU64,
    prefetch_blocks: AtomicU64,
    prefetch_hits: AtomicU64,
    prefetch_wasted: AtomicU64,
    /// Readers waiting on a slot another thread is filling (tests use it to
    /// know every reader has arrived, instead of sleeping).
    #[cfg(test)]
    waiting: std::sync::atomic::AtomicUsize,
}

/// Counters for `.reshardfs/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    pub capacity: u64,
    pub blocks: usize,
    /// Blocks computed ahead by the prefetcher.
    pub prefetch_blocks: u64,
    /// Of those, blocks a reader then took from the cache.
    pub prefetch_hits: u64,
    /// Of those, blocks evicted before anyone read them.
    pub prefetch_wasted: u64,
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
                spare: Vec::new(),
            }),
            capacity,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            prefetch_blocks: AtomicU64::new(0),
            prefetch_hits: AtomicU64::new(0),
            prefetch_wasted: AtomicU64::new(0),
            #[cfg(test)]
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of prefetched blocks not yet read (being computed included).
    pub fn pending_prefetch(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// A slot leaves the prefetched state (read, evicted or failed): its
    /// bytes no longer count against the prefetcher. Returns whether it was
    /// in that state.
    fn unflag(&self, slot: &Slot, len: u64) -> bool {
        let was = slot.prefetched.swap(false, Ordering::Relaxed);
        if was {
            self.pending.fetch_sub(len, Ordering::Relaxed);
        }
        was
    }

    /// Computes block `key` ahead of its reader, unless it is cached or
    /// being computed already. Returns whether it computed the block.
    pub fn prefetch<E>(
        &self,
        key: BlockKey,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let (slot, spare) = {
            let mut g = lock(&self.inner);
            if g.lru.contains(&key) {
                return Ok(false);
            }
            let slot = Arc::new(Slot::default());
            slot.prefetched.store(true, Ordering::Relaxed);
            self.pending.fetch_add(len as u64, Ordering::Relaxed);
            g.lru.put(key, (slot.clone(), len as u64));
            g.bytes += len as u64;
            self.evict(&mut g);
            (slot, g.spare.pop())
        };
        // Held while computing: a reader arriving now waits for this
        // computation rather than starting its own.
        let mut data = lock(&slot.data);
        let mut buf = spare.unwrap_or_default();
        buf.resize(len, 0);
        let failed = Failed::new(self, key, &slot, len as u64);
        fill(&mut buf)?;
        failed.disarm();
        *data = Some(Arc::new(buf));
        self.prefetch_blocks.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Drops block `key` from the cache: a sequential reader has taken it
    /// and the kernel's page cache now holds those bytes, so keeping it
    /// would only take budget from blocks still to come.
    pub fn remove(&self, key: BlockKey) {
        let mut g = lock(&self.inner);
        if let Some((slot, len)) = g.lru.pop(&key) {
            g.bytes -= len;
            self.unflag(&slot, len);
        }
    }

    /// A sequential reader was served `bytes` of block `key` (of `len`
    /// bytes); once as many as the block holds were, the block leaves the
    /// cache, as a whole block read at once does ([`BlockCache::remove`]):
    /// the kernel's page cache holds its bytes now. For readers whose
    /// requests straddle blocks (a `safe_open` map's faults are read around
    /// the faulting page, 1 MiB from anywhere), which otherwise left every
    /// block they read in the cache until evicted, and each new block was
    /// fresh memory. True when the block left.
    pub fn served(&self, key: BlockKey, bytes: u64, len: u64) -> bool {
        let mut g = lock(&self.inner);
        let Some((slot, _)) = g.lru.peek(&key) else {
            return false;
        };
        if slot.served.fetch_add(bytes, Ordering::Relaxed) + bytes < len {
            return false;
        }
        if let Some((slot, len)) = g.lru.pop(&key) {
            g.bytes -= len;
            self.unflag(&slot, len);
        }
        true
    }

    /// Keeps the buffer of a block a reader has finished with (and the
    /// cache no longer holds) for the next prefetch.
    pub fn recycle(&self, block: Block) {
        if let Ok(buf) = Arc::try_unwrap(block) {
            let mut g = lock(&self.inner);
            if g.spare.len() < SPARES {
                g.spare.push(buf);
            }
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
                Some((slot, _)) => {
                    if self.unflag(slot, len as u64) {
                        self.prefetch_hits.fetch_add(1, Ordering::Relaxed);
                    }
                    slot.clone()
                }
                None => {
                    let slot = Arc::new(Slot::default());
                    g.lru.put(key, (slot.clone(), len as u64));
                    g.bytes += len as u64;
                    self.evict(&mut g);
                    slot
                }
            }
        };
        #[cfg(test)]
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut data = lock(&slot.data);
        #[cfg(test)]
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        if let Some(block) = data.as_ref() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(block.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // A spare when there is one: a `safe_open` reader's 1 MiB reads
        // come offset from the blocks and go through here, and a new
        // buffer for each cost the daemon 332 k minor faults over a 1.5 GB
        // view (a `cat`'s pass, which takes spares, 80 k).
        let spare = lock(&self.inner).spare.pop();
        let mut buf = spare.unwrap_or_default();
        buf.resize(len, 0);
        let failed = Failed::new(self, key, &slot, len as u64);
        fill(&mut buf)?;
        failed.disarm();
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
                Some((_, (slot, len))) => {
                    g.bytes -= len;
                    if self.unflag(&slot, len) {
                        self.prefetch_wasted.fetch_add(1, Ordering::Relaxed);
                    }
                    if g.spare.len() < SPARES
                        && let Some(buf) = unshared(slot)
                    {
                        g.spare.push(buf);
                    }
                }
                None => break,
            }
        }
    }

    /// Removes a slot whose computation failed (or panicked), if it is
    /// still the cached one.
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
            prefetch_blocks: self.prefetch_blocks.load(Ordering::Relaxed),
            prefetch_hits: self.prefetch_hits.load(Ordering::Relaxed),
            prefetch_wasted: self.prefetch_wasted.load(Ordering::Relaxed),
        }
    }
}

/// The buffer of an evicted slot that nobody holds (no reader, no filler:
/// so its lock is free), and whose block nobody holds either.
fn unshared(slot: Arc<Slot>) -> Option<Vec<u8>> {
    let data = Arc::try_unwrap(slot).ok()?.data.into_inner().ok()??;
    Arc::try_unwrap(data).ok()
}

/// Until disarmed, a slot being filled whose computation failed, returned
/// early or panicked: dropped, it takes the slot out of the cache (and out
/// of the prefetcher's pending bytes), so the next reader computes the
/// block anew instead of finding an empty slot. Dropped before the slot's
/// data lock (declared after it): a reader waiting on that lock finds the
/// slot empty, no longer cached, and computes the block itself.
struct Failed<'a> {
    cache: &'a BlockCache,
    key: BlockKey,
    slot: &'a Arc<Slot>,
    len: u64,
    armed: bool,
}

impl<'a> Failed<'a> {
    fn new(cache: &'a BlockCache, key: BlockKey, slot: &'a Arc<Slot>, len: u64) -> Self {
        Failed {
            cache,
            key,
            slot,
            len,
            armed: true,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Failed<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.cache.unflag(self.slot, self.len);
            self.cache.forget(self.key, self.slot);
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
    fn a_block_served_whole_in_parts_leaves_and_lends_its_buffer() {
        let c = BlockCache::new(4000);
        let fill = |v: u8| {
            move |b: &mut [u8]| -> Result<(), ()> {
                b.fill(v);
                Ok(())
            }
        };
        let b = c.get((0, 0), 1000, fill(1)).unwrap();
        assert!(!c.served((0, 0), 600, 1000), "part of it: kept");
        assert!(c.contains((0, 0)));
        assert!(c.served((0, 0), 400, 1000), "the rest: it leaves");
        assert!(!c.contains((0, 0)) && c.stats().bytes == 0);
        assert!(!c.served((0, 0), 1000, 1000), "not cached any more");
        let at = b.as_ptr();
        c.recycle(b);
        // The next block computed fills that buffer, all of it anew.
        let next = c.get((0, 1), 1000, fill(2)).unwrap();
        assert_eq!(next.as_ptr(), at);
        assert!(next.iter().all(|&x| x == 2));
    }

    #[test]
    fn an_evicted_block_nobody_holds_lends_its_buffer() {
        let c = BlockCache::new(2000);
        let fill = |b: &mut [u8]| -> Result<(), ()> {
            b.fill(3);
            Ok(())
        };
        let at = c.get((0, 0), 1000, fill).unwrap().as_ptr();
        let held = c.get((0, 1), 1000, fill).unwrap();
        // A third block evicts block 0 (held by nobody) and is computed
        // into its buffer.
        let third = c.get((0, 2), 1000, fill).unwrap();
        assert_eq!(third.as_ptr(), at);
        assert!(third.iter().all(|&x| x == 3));
        // A fourth evicts block 1, still held: that buffer is not lent.
        let fourth = c.get((0, 3), 1000, fill).unwrap();
        assert_ne!(fourth.as_ptr(), held.as_ptr());
        assert!(held.iter().all(|&x| x == 3));
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
    fn a_computation_that_panics_is_not_cached() {
        let c = BlockCache::new(1 << 20);
        for prefetch in [false, true] {
            let key = (u32::from(prefetch), 0);
            let before = c.stats().bytes;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if prefetch {
                    let _ = c.prefetch(key, 100, |_| -> Result<(), ()> { panic!("a bug") });
                } else {
                    let _ = c.get(key, 100, |_| -> Result<(), ()> { panic!("a bug") });
                }
            }));
            assert!(r.is_err());
            assert!(!c.contains(key), "prefetch={prefetch}");
            assert_eq!(c.pending_prefetch(), 0);
            assert_eq!(c.stats().bytes, before);
            let b = c.get(key, 100, |b| -> Result<(), ()> {
                b.fill(7);
                Ok(())
            });
            assert_eq!(b.unwrap()[99], 7);
        }
        assert_eq!(c.stats().prefetch_hits, 0);
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
        // The first reader's computation holds until the seven others wait
        // on the same slot: all eight overlap, deterministically.
        const READERS: usize = 8;
        let c = Arc::new(BlockCache::new(1 << 20));
        let fills = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(std::sync::Barrier::new(READERS));
        std::thread::scope(|s| {
            for _ in 0..READERS {
                let (c, fills, start) = (c.clone(), fills.clone(), start.clone());
                s.spawn(move || {
                    start.wait();
                    let b = c
                        .get((0, 42), 4096, |b: &mut [u8]| -> Result<(), ()> {
                            fills.fetch_add(1, Ordering::SeqCst);
                            let deadline =
                                std::time::Instant::now() + std::time::Duration::from_secs(30);
                            while c.waiting.load(Ordering::SeqCst) < READERS - 1 {
                                assert!(std::time::Instant::now() < deadline, "readers never met");
                                std::thread::yield_now();
                            }
                            b.fill(9);
                            Ok(())
                        })
                        .unwrap();
                    assert!(b.iter().all(|&x| x == 9));
                });
            }
        });
        assert_eq!(fills.load(Ordering::SeqCst), 1);
        assert_eq!(c.stats().misses, 1);
        assert_eq!(c.stats().hits, READERS as u64 - 1);
    }

    #[test]
    fn prefetched_blocks_are_counted_as_hits_or_waste() {
        let c = BlockCache::new(3000);
        let fill = |b: &mut [u8]| -> Result<(), ()> {
            b.fill(3);
            Ok(())
        };
        assert!(c.prefetch((0, 0), 1000, fill).unwrap());
        assert!(!c.prefetch((0, 0), 1000, fill).unwrap(), "already cached");
        assert!(c.prefetch((0, 1), 1000, fill).unwrap());
        assert_eq!(c.pending_prefetch(), 2000);
        // Read: a hit, no longer pending; the data is the prefetched one.
        assert_eq!(c.get((0, 0), 1000, |_: &mut [u8]| Err(())).unwrap()[0], 3);
        assert_eq!(c.pending_prefetch(), 1000);
        c.remove((0, 0));
        // Three more blocks push (0, 1) out unread: wasted.
        for i in 2..5 {
            c.get((1, i), 1000, fill).unwrap();
        }
        let s = c.stats();
        assert_eq!(
            (s.prefetch_blocks, s.prefetch_hits, s.prefetch_wasted),
            (2, 1, 1)
        );
        assert_eq!(c.pending_prefetch(), 0);
        assert!(s.bytes <= 3000);
        // A failed prefetch leaves nothing behind.
        assert!(c.prefetch((2, 0), 1000, |_: &mut [u8]| Err("x")).is_err());
        assert_eq!(c.pending_prefetch(), 0);
        assert!(!c.contains((2, 0)));
    }
}
