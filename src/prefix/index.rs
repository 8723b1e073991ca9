//! Approximate index of which endpoints hold which prompt blocks in their KV cache.
//!
//! "Approximate" because the EPP cannot see the engines' caches: it records what it routed and
//! evicts in least-recently-used order per endpoint, with a capacity close to the engine's block
//! count. Memory is bounded by construction: at most `capacity` live entries per endpoint, and the
//! per-endpoint recency queue is compacted when stale entries pile up.
//!
//! Invariants: every live `(hash, endpoint)` entry appears once in `holders` and has exactly one
//! queue entry with the same stamp; `live` counts those entries.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasherDefault, Hasher},
};

use parking_lot::Mutex;
use smallvec::SmallVec;

use super::hash::BlockHash;
use crate::datastore::EndpointUid;

/// Hasher for keys that are already uniformly distributed hashes.
#[derive(Default)]
struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type Holders = SmallVec<[(u32, u32); 2]>;

#[derive(Default)]
struct EndpointLru {
    /// `(hash, stamp)` in insertion order; an entry is stale when its stamp no longer matches.
    queue: VecDeque<(u64, u32)>,
    live: usize,
    capacity: usize,
}

#[derive(Default)]
struct Inner {
    holders: HashMap<u64, Holders, BuildHasherDefault<PassThroughHasher>>,
    endpoints: HashMap<u32, EndpointLru>,
    stamp: u32,
}

/// Thread-safe approximate prefix index. Critical sections are short and never span I/O.
#[derive(Default)]
pub struct PrefixIndex {
    inner: Mutex<Inner>,
}

impl PrefixIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Walk `hashes` in order and count, per endpoint, how many of them it holds; stop at the
    /// first block no endpoint holds (later blocks cannot be cached without it). `out` is cleared
    /// and receives `(endpoint, matched blocks)`.
    pub fn match_blocks(&self, hashes: &[BlockHash], out: &mut Vec<(EndpointUid, u32)>) {
        out.clear();
        let inner = self.inner.lock();
        for h in hashes {
            let Some(holders) = inner.holders.get(&h.0) else {
                break;
            };
            for &(uid, _) in holders {
                match out.iter_mut().find(|(u, _)| u.0 == uid) {
                    Some((_, n)) => *n += 1,
                    None => out.push((EndpointUid(uid), 1)),
                }
            }
        }
    }

    /// Record that `endpoint` now holds `hashes`, evicting its least recently used blocks beyond
    /// `capacity` (at least 1).
    pub fn insert(&self, endpoint: EndpointUid, hashes: &[BlockHash], capacity: usize) {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let lru = inner.endpoints.entry(endpoint.0).or_default();
        lru.capacity = capacity.max(1);
        for h in hashes {
            inner.stamp = inner.stamp.wrapping_add(1);
            let stamp = inner.stamp;
            let holders = inner.holders.entry(h.0).or_default();
            match holders.iter_mut().find(|(u, _)| *u == endpoint.0) {
                Some(entry) => entry.1 = stamp,
                None => {
                    holders.push((endpoint.0, stamp));
                    lru.live += 1;
                }
            }
            lru.queue.push_back((h.0, stamp));
        }
        while lru.live > lru.capacity {
            let Some((h, stamp)) = lru.queue.pop_front() else {
                break;
            };
            if let Some(holders) = inner.holders.get_mut(&h)
                && let Some(pos) = holders.iter().position(|&e| e == (endpoint.0, stamp))
            {
                holders.swap_remove(pos);
                lru.live -= 1;
                if holders.is_empty() {
                    inner.holders.remove(&h);
                }
            }
        }
        // Re-inserted blocks leave stale queue entries behind; drop them once they dominate.
        if lru.queue.len() > 2 * lru.capacity + 1024 {
            let holders = &inner.holders;
            lru.queue.retain(|&(h, stamp)| {
                holders
                    .get(&h)
                    .is_some_and(|hs| hs.contains(&(endpoint.0, stamp)))
            });
        }
    }

    /// Forget every endpoint for which `keep` is false.
    pub fn retain_endpoints(&self, mut keep: impl FnMut(EndpointUid) -> bool) {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let gone: Vec<u32> = inner
            .endpoints
            .keys()
            .copied()
            .filter(|&u| !keep(EndpointUid(u)))
            .collect();
        for uid in gone {
            let Some(lru) = inner.endpoints.remove(&uid) else {
                continue;
            };
            for (h, _) in lru.queue {
                if let Some(holders) = inner.holders.get_mut(&h) {
                    holders.retain(|(u, _)| *u != uid);
                    if holders.is_empty() {
                        inner.holders.remove(&h);
                    }
                }
            }
        }
    }

    /// Live entries of one endpoint.
    pub fn entries_of(&self, endpoint: EndpointUid) -> usize {
        self.inner.lock().endpoints.get(&endpoint.0).map_or(0, |l| l.live)
    }

    /// Live `(block, endpoint)` entries.
    pub fn entries(&self) -> usize {
        self.inner.lock().endpoints.values().map(|l| l.live).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(v: &[u64]) -> Vec<BlockHash> {
        v.iter().copied().map(BlockHash).collect()
    }

    #[test]
    fn match_walk_counts_leading_blocks_per_endpoint() {
        let idx = PrefixIndex::new();
        idx.insert(EndpointUid(1), &hs(&[1, 2, 3]), 100);
        idx.insert(EndpointUid(2), &hs(&[1]), 100);
        let mut out = Vec::new();
        idx.match_blocks(&hs(&[1, 2, 9, 3]), &mut out);
        out.sort();
        assert_eq!(out, vec![(EndpointUid(1), 2), (EndpointUid(2), 1)]);
    }

    #[test]
    fn lru_evicts_oldest_and_never_exceeds_capacity() {
        let idx = PrefixIndex::new();
        idx.insert(EndpointUid(1), &hs(&[1, 2, 3]), 3);
        idx.insert(EndpointUid(1), &hs(&[1]), 3); // touch 1
        idx.insert(EndpointUid(1), &hs(&[4]), 3); // evicts 2
        assert_eq!(idx.entries(), 3);
        let mut out = Vec::new();
        idx.match_blocks(&hs(&[2]), &mut out);
        assert!(out.is_empty());
        idx.match_blocks(&hs(&[1]), &mut out);
        assert_eq!(out, vec![(EndpointUid(1), 1)]);
        for i in 0..10_000u64 {
            idx.insert(EndpointUid(1), &hs(&[i % 7, 100 + i]), 3);
            assert!(idx.entries() <= 3);
        }
    }

    #[test]
    fn removed_endpoints_are_purged() {
        let idx = PrefixIndex::new();
        idx.insert(EndpointUid(1), &hs(&[1, 2]), 10);
        idx.insert(EndpointUid(2), &hs(&[1]), 10);
        idx.retain_endpoints(|u| u != EndpointUid(1));
        assert_eq!(idx.entries(), 1);
        let mut out = Vec::new();
        idx.match_blocks(&hs(&[1, 2]), &mut out);
        assert_eq!(out, vec![(EndpointUid(2), 1)]);
    }
}
