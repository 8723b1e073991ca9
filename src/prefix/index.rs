//! Approximate index of which endpoints hold which prompt blocks in their KV cache.
//!
//! "Approximate" because the EPP cannot see the engines' caches: it records what it routed and
//! forgets in least-recently-routed order per endpoint, with a capacity close to the engine's
//! block count.
//!
//! Layout, chosen for memory (≤ 32 bytes per (block, endpoint) entry) and for readers that never
//! wait on each other:
//! - the block map is split into [`SHARDS`] shards by block hash, each behind a `RwLock`; a
//!   lookup takes read locks only, so concurrent requests match in parallel;
//! - in each shard, a block held by one endpoint costs one 16-byte map slot (hash → holder),
//!   the common case; blocks shared by several endpoints (system prompts) keep their other
//!   holders in a small side map;
//! - each endpoint owns a ring of the block hashes routed to it (8 bytes per slot). Writing past
//!   the ring's capacity evicts the oldest slot. A holder remembers the ring position of its
//!   latest insert, so re-routing a block refreshes it and the older ring slot is ignored when
//!   it is evicted (least-recently-routed eviction without a linked list).
//!
//! Invariants: a holder `(uid, pos)` exists only while endpoint `uid`'s ring slot `pos` still
//! holds that hash; an endpoint never has more live holders than its ring capacity.

use std::{collections::HashMap, sync::Arc};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use smallvec::SmallVec;

use super::hash::BlockHash;
use crate::datastore::EndpointUid;

/// Number of block-map shards (a power of two).
pub const SHARDS: usize = 16;

type Map<V> = crate::prehashed::PrehashedMap<V>;

/// An endpoint holding a block, and the ring position of its latest insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    uid: u32,
    pos: u32,
}

#[derive(Default)]
struct Shard {
    first: Map<Holder>,
    others: Map<SmallVec<[Holder; 3]>>,
}

impl Shard {
    fn upsert(&mut self, hash: u64, h: Holder) -> bool {
        match self.first.get_mut(&hash) {
            None => {
                self.first.insert(hash, h);
                true
            }
            Some(first) if first.uid == h.uid => {
                first.pos = h.pos;
                false
            }
            Some(_) => {
                let others = self.others.entry(hash).or_default();
                match others.iter_mut().find(|o| o.uid == h.uid) {
                    Some(o) => {
                        o.pos = h.pos;
                        false
                    }
                    None => {
                        others.push(h);
                        true
                    }
                }
            }
        }
    }

    /// Remove `uid` from `hash` if `pos` matches (or always, with `None`). Returns whether removed.
    fn remove(&mut self, hash: u64, uid: u32, pos: Option<u32>) -> bool {
        let matches = |h: &Holder| h.uid == uid && pos.is_none_or(|p| h.pos == p);
        if self.first.get(&hash).is_some_and(matches) {
            // Promote another holder, if any, into the primary slot.
            match self.others.get_mut(&hash).and_then(|o| o.pop()) {
                Some(next) => {
                    self.first.insert(hash, next);
                    if self.others.get(&hash).is_some_and(|o| o.is_empty()) {
                        self.others.remove(&hash);
                    }
                }
                None => {
                    self.first.remove(&hash);
                }
            }
            return true;
        }
        let Some(others) = self.others.get_mut(&hash) else {
            return false;
        };
        let Some(i) = others.iter().position(matches) else {
            return false;
        };
        others.swap_remove(i);
        if others.is_empty() {
            self.others.remove(&hash);
        }
        true
    }

    fn bytes(&self) -> usize {
        let slot = std::mem::size_of::<(u64, Holder)>() + 1;
        let other_slot = std::mem::size_of::<(u64, SmallVec<[Holder; 3]>)>() + 1;
        self.first.capacity() * slot + self.others.capacity() * other_slot
    }
}

struct Ring {
    hashes: Vec<u64>,
    capacity: usize,
    /// Total inserts so far; slot of insert `n` is `n % capacity`.
    head: u64,
    /// Inserts before this one were forgotten early ([`PrefixIndex::forget_oldest`]).
    tail: u64,
    live: usize,
}

/// One planned write of an insert.
struct Op {
    hash: u64,
    pos: u32,
    add: bool,
}

fn shard_of(hash: u64) -> usize {
    // The low bits feed hashbrown's bucket index; shard on the high bits instead.
    (hash >> 60) as usize % SHARDS
}

/// Thread-safe approximate prefix index.
pub struct PrefixIndex {
    shards: Box<[RwLock<Shard>]>,
    rings: Mutex<HashMap<u32, Arc<Mutex<Ring>>>>,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl PrefixIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            rings: Mutex::new(HashMap::new()),
        }
    }

    /// Walk `hashes` in order and count, per endpoint, how many of them it holds; stop at the
    /// first block no endpoint holds (later blocks cannot be cached without it). `out` is cleared
    /// and receives `(endpoint, matched blocks)`. Takes read locks only.
    pub fn match_blocks(&self, hashes: &[BlockHash], out: &mut Vec<(EndpointUid, u32)>) {
        out.clear();
        let mut guards: [Option<RwLockReadGuard<'_, Shard>>; SHARDS] = Default::default();
        let credit =
            |uid: u32, out: &mut Vec<(EndpointUid, u32)>| match out.iter_mut().find(|(u, _)| u.0 == uid) {
                Some((_, n)) => *n += 1,
                None => out.push((EndpointUid(uid), 1)),
            };
        for h in hashes {
            let s = shard_of(h.0);
            let shard = guards[s].get_or_insert_with(|| self.shards[s].read());
            let Some(first) = shard.first.get(&h.0) else { break };
            credit(first.uid, out);
            if let Some(others) = shard.others.get(&h.0) {
                for o in others {
                    credit(o.uid, out);
                }
            }
        }
    }

    /// Record that `endpoint` now holds `hashes`. Its ring is created with `capacity` slots (at
    /// least 1) on first use; inserting past it evicts the endpoint's least recently routed blocks.
    pub fn insert(&self, endpoint: EndpointUid, hashes: &[BlockHash], capacity: usize) {
        if hashes.is_empty() {
            return;
        }
        let ring = self
            .rings
            .lock()
            .entry(endpoint.0)
            .or_insert_with(|| {
                Arc::new(Mutex::new(Ring {
                    hashes: Vec::new(),
                    capacity: capacity.max(1),
                    head: 0,
                    tail: 0,
                    live: 0,
                }))
            })
            .clone();
        let mut ring = ring.lock();
        // Plan the writes in order, then apply them one shard at a time (one lock per shard, not
        // per block). A stable sort keeps each hash's operations in their original order, so an
        // eviction of a block added earlier in the same batch finds it.
        let mut ops: Vec<Op> = Vec::with_capacity(hashes.len() * 2);
        for h in hashes {
            let pos = ring.head;
            let slot = (pos % ring.capacity as u64) as usize;
            if ring.hashes.len() < ring.capacity {
                if ring.hashes.len() == ring.hashes.capacity() {
                    // Grow geometrically but never past the capacity: a full ring holds exactly
                    // `capacity` slots.
                    let extra = ring.hashes.len().max(64).min(ring.capacity - ring.hashes.len());
                    ring.hashes.reserve_exact(extra);
                }
                ring.hashes.push(h.0);
            } else {
                let old = std::mem::replace(&mut ring.hashes[slot], h.0);
                ops.push(Op {
                    hash: old,
                    pos: (pos - ring.capacity as u64) as u32,
                    add: false,
                });
            }
            ops.push(Op {
                hash: h.0,
                pos: pos as u32,
                add: true,
            });
            ring.head += 1;
        }
        ops.sort_by_key(|op| shard_of(op.hash));
        for group in ops.chunk_by(|a, b| shard_of(a.hash) == shard_of(b.hash)) {
            let mut shard = self.shards[shard_of(group[0].hash)].write();
            for op in group {
                if op.add {
                    if shard.upsert(
                        op.hash,
                        Holder {
                            uid: endpoint.0,
                            pos: op.pos,
                        },
                    ) {
                        ring.live += 1;
                    }
                } else if shard.remove(op.hash, endpoint.0, Some(op.pos)) {
                    ring.live -= 1;
                }
            }
        }
    }

    /// Forget `endpoint`'s `n` least recently routed blocks (fewer if it holds fewer): the engine
    /// evidently evicted blocks the index still credits it with, and the oldest are the likeliest
    /// to be gone too. Ring slots whose block was routed again since are skipped (the newer
    /// insert stands). Returns how many entries were removed. Runs in at most one pass over the
    /// endpoint's ring.
    pub fn forget_oldest(&self, endpoint: EndpointUid, n: usize) -> usize {
        let Some(ring) = self.rings.lock().get(&endpoint.0).cloned() else {
            return 0;
        };
        let mut ring = ring.lock();
        let mut pos = ring.tail.max(ring.head.saturating_sub(ring.capacity as u64));
        let mut removed = 0;
        while removed < n && pos < ring.head {
            let hash = ring.hashes[(pos % ring.capacity as u64) as usize];
            if self.shards[shard_of(hash)]
                .write()
                .remove(hash, endpoint.0, Some(pos as u32))
            {
                removed += 1;
            }
            pos += 1;
        }
        ring.tail = pos;
        ring.live -= removed;
        removed
    }

    /// Forget every endpoint for which `keep` is false.
    pub fn retain_endpoints(&self, mut keep: impl FnMut(EndpointUid) -> bool) {
        let gone: Vec<(u32, Arc<Mutex<Ring>>)> = {
            let mut rings = self.rings.lock();
            let ids: Vec<u32> = rings.keys().copied().filter(|u| !keep(EndpointUid(*u))).collect();
            ids.into_iter()
                .filter_map(|u| rings.remove(&u).map(|r| (u, r)))
                .collect()
        };
        for (uid, ring) in gone {
            let ring = ring.lock();
            let mut hashes = ring.hashes.clone();
            hashes.sort_unstable_by_key(|h| shard_of(*h));
            for chunk in hashes.chunk_by(|a, b| shard_of(*a) == shard_of(*b)) {
                let mut shard = self.shards[shard_of(chunk[0])].write();
                for h in chunk {
                    shard.remove(*h, uid, None);
                }
            }
        }
    }

    /// Live entries of one endpoint.
    pub fn entries_of(&self, endpoint: EndpointUid) -> usize {
        let ring = self.rings.lock().get(&endpoint.0).cloned();
        ring.map_or(0, |r| r.lock().live)
    }

    /// Live `(block, endpoint)` entries.
    pub fn entries(&self) -> usize {
        let rings: Vec<_> = self.rings.lock().values().cloned().collect();
        rings.iter().map(|r| r.lock().live).sum()
    }

    /// Heap bytes held by the index (maps at their allocated capacity, plus rings).
    pub fn allocated_bytes(&self) -> usize {
        let shards: usize = self.shards.iter().map(|s| s.read().bytes()).sum();
        let rings: Vec<_> = self.rings.lock().values().cloned().collect();
        let ring_bytes: usize = rings.iter().map(|r| r.lock().hashes.capacity() * 8).sum();
        shards + ring_bytes
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
    fn forgetting_drops_the_least_recently_routed_and_keeps_the_ring_consistent() {
        let idx = PrefixIndex::new();
        let one = EndpointUid(1);
        idx.insert(one, &hs(&(0..10).collect::<Vec<_>>()), 100);
        idx.insert(EndpointUid(2), &hs(&[1]), 100);
        idx.insert(one, &hs(&[0]), 100); // refresh 0: its first insert is stale
        // The three oldest live blocks: 1, 2 and 3 (the first insert of 0 is stale).
        assert_eq!(idx.forget_oldest(one, 3), 3);
        let mut out = Vec::new();
        idx.match_blocks(&hs(&[0]), &mut out);
        assert_eq!(out, vec![(one, 1)], "0 was routed again since");
        idx.match_blocks(&hs(&[1]), &mut out);
        assert_eq!(out, vec![(EndpointUid(2), 1)], "another endpoint keeps its copy");
        idx.match_blocks(&hs(&[3]), &mut out);
        assert!(out.is_empty());
        idx.match_blocks(&hs(&[4]), &mut out);
        assert_eq!(out, vec![(one, 1)]);
        assert_eq!(idx.entries_of(one), 7);
        assert_eq!(idx.forget_oldest(one, 1_000), 7);
        assert_eq!(idx.entries_of(one), 0);
        assert_eq!(idx.forget_oldest(one, 1), 0);
        assert_eq!(idx.forget_oldest(EndpointUid(9), 1), 0, "unknown endpoint");
        // Wrapping past the forgotten slots takes nothing away twice.
        idx.insert(one, &hs(&(100..250).collect::<Vec<_>>()), 100);
        assert_eq!(idx.entries_of(one), 100);
        assert_eq!(idx.forget_oldest(one, 40), 40);
        assert_eq!(idx.entries_of(one), 60);
        idx.insert(one, &hs(&(300..340).collect::<Vec<_>>()), 100);
        assert_eq!(idx.entries_of(one), 100);
    }

    #[test]
    fn oldest_routed_blocks_are_evicted_first_and_capacity_holds() {
        let idx = PrefixIndex::new();
        idx.insert(EndpointUid(1), &hs(&[1, 2, 3]), 4);
        idx.insert(EndpointUid(1), &hs(&[1]), 4); // refresh 1: ring 1 2 3 1
        idx.insert(EndpointUid(1), &hs(&[4]), 4); // overwrites slot of the first 1 (stale): nothing lost
        assert_eq!(idx.entries(), 4);
        idx.insert(EndpointUid(1), &hs(&[5]), 4); // overwrites 2
        let mut out = Vec::new();
        idx.match_blocks(&hs(&[2]), &mut out);
        assert!(out.is_empty(), "2 was the least recently routed");
        idx.match_blocks(&hs(&[1]), &mut out);
        assert_eq!(out, vec![(EndpointUid(1), 1)], "1 was refreshed");
        for i in 0..10_000u64 {
            idx.insert(EndpointUid(1), &hs(&[i % 7, 100 + i]), 3);
            assert!(idx.entries_of(EndpointUid(1)) <= 4);
        }
    }

    #[test]
    fn shared_blocks_keep_every_holder_and_survive_one_removal() {
        let idx = PrefixIndex::new();
        for uid in 1..=4 {
            idx.insert(EndpointUid(uid), &hs(&[7]), 10);
        }
        let mut out = Vec::new();
        idx.match_blocks(&hs(&[7]), &mut out);
        assert_eq!(out.len(), 4);
        idx.retain_endpoints(|u| u != EndpointUid(1));
        idx.match_blocks(&hs(&[7]), &mut out);
        out.sort();
        assert_eq!(
            out,
            vec![(EndpointUid(2), 1), (EndpointUid(3), 1), (EndpointUid(4), 1)]
        );
        assert_eq!(idx.entries(), 3);
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

    #[test]
    fn bytes_per_entry_at_capacity_stay_under_32() {
        let idx = PrefixIndex::new();
        let cap = 20_000;
        let mut next = 0u64;
        for uid in 0..8 {
            for _ in 0..cap / 256 + 1 {
                let hs: Vec<BlockHash> = (0..256)
                    .map(|_| {
                        next += 1;
                        BlockHash(next.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    })
                    .collect();
                idx.insert(EndpointUid(uid), &hs, cap);
            }
        }
        let per_entry = idx.allocated_bytes() as f64 / idx.entries() as f64;
        assert_eq!(idx.entries(), 8 * cap);
        // 160,000 entries in 16 shards of 16,384 buckets (61 % full) plus exact rings.
        assert!(per_entry <= 36.0, "{per_entry} bytes per entry");
    }
}
