//! The KV cache of one engine: a fixed pool of blocks with a prefix cache, as vLLM V1 keeps it.
//!
//! Invariants:
//! - a block is either referenced (`refs > 0`, not in the free queue) or free (in the queue);
//! - a free block may still hold a cached hash: it is reusable by a later prefix hit until the
//!   queue hands it out for new data, which evicts the hash (least recently freed first);
//! - `cached` maps each hash to exactly one block, and that block carries the hash.

use std::collections::HashMap;

/// Index of a block in the pool.
pub type BlockId = u32;

const NIL: u32 = u32::MAX;

/// The block pool with its LRU free queue (an intrusive doubly linked list over block ids).
#[derive(Debug)]
pub struct BlockPool {
    refs: Vec<u32>,
    hash: Vec<Option<u64>>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    free: u32,
    cached: HashMap<u64, BlockId>,
}

impl BlockPool {
    /// A pool of `n` free, empty blocks.
    pub fn new(n: u32) -> Self {
        let mut pool = Self {
            refs: vec![0; n as usize],
            hash: vec![None; n as usize],
            prev: vec![NIL; n as usize],
            next: vec![NIL; n as usize],
            head: NIL,
            tail: NIL,
            free: 0,
            cached: HashMap::new(),
        };
        for b in 0..n {
            pool.push_back(b);
        }
        pool
    }

    /// Blocks in the pool.
    pub fn capacity(&self) -> u32 {
        self.refs.len() as u32
    }

    /// Free blocks (including free blocks that still hold a cached prefix).
    pub fn free_blocks(&self) -> u32 {
        self.free
    }

    /// Fraction of blocks in use, as vLLM reports `kv_cache_usage_perc`.
    pub fn usage(&self) -> f64 {
        1.0 - f64::from(self.free) / f64::from(self.capacity().max(1))
    }

    /// Leading blocks of `hashes` present in the cache (without taking them).
    pub fn cached_prefix(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.cached.contains_key(h)).count()
    }

    /// Free blocks among the first `n` of `hashes` (they leave the free queue when taken).
    pub fn free_among_cached(&self, hashes: &[u64], n: usize) -> u32 {
        hashes[..n]
            .iter()
            .filter_map(|h| self.cached.get(h))
            .filter(|b| self.refs[**b as usize] == 0)
            .count() as u32
    }

    /// Take a reference on the cached blocks of the first `n` hashes (which must be cached).
    pub fn take_cached(&mut self, hashes: &[u64], n: usize, out: &mut Vec<BlockId>) {
        for h in &hashes[..n] {
            if let Some(&b) = self.cached.get(h) {
                if self.refs[b as usize] == 0 {
                    self.unlink(b);
                }
                self.refs[b as usize] += 1;
                out.push(b);
            }
        }
    }

    /// Take `n` blocks for new data, evicting the cached hashes they held; `false` (and nothing
    /// taken) when fewer than `n` are free.
    pub fn allocate(&mut self, n: u32, out: &mut Vec<BlockId>) -> bool {
        if n > self.free {
            return false;
        }
        for _ in 0..n {
            let b = self.head;
            self.unlink(b);
            if let Some(h) = self.hash[b as usize].take() {
                self.cached.remove(&h);
            }
            self.refs[b as usize] = 1;
            out.push(b);
        }
        true
    }

    /// Record that `block` now holds the full block `hash` (first holder wins: a duplicate computed
    /// concurrently stays uncached).
    pub fn register(&mut self, block: BlockId, hash: u64) {
        if self.hash[block as usize].is_none() && !self.cached.contains_key(&hash) {
            self.hash[block as usize] = Some(hash);
            self.cached.insert(hash, block);
        }
    }

    /// Release a request's blocks, last block first, so that on eviction its tail goes before
    /// its prefix (which other requests are likelier to share).
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            let refs = &mut self.refs[b as usize];
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.push_back(b);
            }
        }
    }

    fn push_back(&mut self, b: BlockId) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.free += 1;
    }

    fn unlink(&mut self, b: BlockId) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_survive_release_until_reallocated_oldest_first() {
        let mut pool = BlockPool::new(4);
        let mut a = Vec::new();
        assert!(pool.allocate(2, &mut a));
        pool.register(a[0], 100);
        pool.register(a[1], 101);
        pool.release(&a);
        assert_eq!(pool.free_blocks(), 4);
        assert_eq!(pool.cached_prefix(&[100, 101, 102]), 2);
        // Two fresh blocks come from the never-used ones first, then the released tail (101).
        let mut b = Vec::new();
        assert!(pool.allocate(3, &mut b));
        assert_eq!(
            pool.cached_prefix(&[100, 101]),
            1,
            "the tail block was evicted first"
        );
        assert!(!pool.allocate(2, &mut b), "only one block left");
        assert_eq!(pool.free_blocks(), 1);
    }

    #[test]
    fn taking_a_cached_free_block_removes_it_from_the_free_queue() {
        let mut pool = BlockPool::new(2);
        let mut a = Vec::new();
        assert!(pool.allocate(1, &mut a));
        pool.register(a[0], 7);
        pool.release(&a);
        assert_eq!(pool.free_among_cached(&[7], 1), 1);
        let mut b = Vec::new();
        pool.take_cached(&[7], 1, &mut b);
        assert_eq!(b, a);
        assert_eq!(pool.free_blocks(), 1);
        assert!((pool.usage() - 0.5).abs() < 1e-12);
        let mut c = Vec::new();
        assert!(pool.allocate(1, &mut c));
        assert_ne!(c[0], a[0]);
        assert_eq!(pool.cached_prefix(&[7]), 1, "a referenced block is never evicted");
    }
}
