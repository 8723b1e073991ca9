//! Where budget counters live: the [`BudgetStore`] trait and the in-memory store (exact for one
//! replica; sharded, at most [`DEFAULT_MAX_COUNTERS`] counters).
//! Reservation is atomic across every counter of a request: all fit and all are charged, or
//! nothing is.

use std::{
    collections::HashSet,
    future::Future,
    hash::{BuildHasher, RandomState},
    pin::Pin,
};

use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;

use super::policy::{Charge, Counter, CounterKey, LayerKey};
use crate::prehashed::PrehashedMap;

/// A boxed future, so the trait stays object-safe.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The store could not be reached or answered nonsense.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("budget store unavailable: {reason}")]
pub struct StoreError {
    /// What failed.
    pub reason: String,
}

/// The answer to a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Charged on every counter; `used[i]` is counter `i`'s usage afterwards, in its unit.
    Admitted {
        /// Usage per counter, this request included.
        used: Vec<u64>,
    },
    /// Counter `counter` cannot fit the charge; nothing was charged.
    Rejected {
        /// Index of the first counter that did not fit.
        counter: usize,
        /// Its usage in this window before the request.
        used: u64,
    },
}

/// Budget counters.
pub trait BudgetStore: Send + Sync {
    /// Atomically charge every counter (in its unit and window) if the charge fits all of
    /// them.
    fn reserve<'a>(&'a self, counters: &'a [Counter], charge: Charge) -> StoreFuture<'a, Reservation>;
    /// Replace a reservation of `reserved` by the `actual` cost (in the reservation's windows).
    fn settle<'a>(&'a self, counters: &'a [Counter], reserved: Charge, actual: Charge)
    -> StoreFuture<'a, ()>;
}

/// Shards of the in-memory store: reservations of different tenants rarely wait on each other.
const SHARDS: usize = 16;

/// Counters the in-memory store keeps at most (over all shards): the bound on state keyed by
/// client input (a tenant header with a `defaultTenant` budget makes counters per distinct
/// value). Counters whose window ended make room first; a request that would need a new
/// counter past the bound is refused, as if its budget were used up, until room frees.
pub const DEFAULT_MAX_COUNTERS: usize = 65_536;

/// One counter's state: its window and what was used in it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    window: u64,
    ends_ms: u64,
    used: u64,
}

/// The counters whose keys share one hash (almost always one).
type Bucket = SmallVec<[(CounterKey, Slot); 1]>;

/// One shard of counters, keyed by the key's hash, computed once per counter and request (the
/// keys hold the tenant's and model's names: hashing them is most of a reservation's cost).
#[derive(Debug, Default)]
struct Shard {
    slots: PrehashedMap<Bucket>,
    len: usize,
}

impl Shard {
    fn get(&self, hash: u64, key: &CounterKey) -> Option<&Slot> {
        self.slots
            .get(&hash)?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, s)| s)
    }

    fn get_mut(&mut self, hash: u64, key: &CounterKey) -> Option<&mut Slot> {
        self.slots
            .get_mut(&hash)?
            .iter_mut()
            .find(|(k, _)| k == key)
            .map(|(_, s)| s)
    }

    fn insert(&mut self, hash: u64, key: CounterKey, slot: Slot) {
        self.slots.entry(hash).or_default().push((key, slot));
        self.len += 1;
    }

    /// Drop counters whose window ended before `now_ms` (they would restart at zero anyway).
    fn evict_ended(&mut self, now_ms: u64) {
        self.slots.retain(|_, bucket| {
            bucket.retain(|(_, s)| s.ends_ms > now_ms);
            !bucket.is_empty()
        });
        self.len = self.slots.values().map(SmallVec::len).sum();
    }
}

/// In-process counters: exact for a single EPP replica.
///
/// Bounded: at most [`DEFAULT_MAX_COUNTERS`] counters (or the capacity given to
/// [`MemoryStore::with_capacity`]); a counter restarts at zero when its next window begins.
#[derive(Debug)]
pub struct MemoryStore {
    shards: [Mutex<Shard>; SHARDS],
    max_per_shard: usize,
    hasher: RandomState,
    /// Tenants the config names: their counters are bounded by the config, so they are never
    /// refused for room (a flood of unlisted tenants cannot lock them out).
    configured: HashSet<String>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_MAX_COUNTERS)
    }
}

/// What a reservation does to one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Count in the slot's window (restarting it when the counter's window is newer).
    Count,
    /// The request's window is already over (a newer one started while it was decided): it
    /// goes through this counter uncharged, as at a window's start; charging the newer window
    /// would never be refunded (settlement is per window).
    Skip,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store keeping at most about `max_counters` counters.
    pub fn with_capacity(max_counters: usize) -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
            max_per_shard: max_counters.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            configured: HashSet::new(),
        }
    }

    /// This store, never refusing room to the counters of `tenants` (the config's).
    pub fn with_configured_tenants(mut self, tenants: impl IntoIterator<Item = String>) -> Self {
        self.configured = tenants.into_iter().collect();
        self
    }

    fn is_configured(&self, key: &LayerKey) -> bool {
        self.configured.contains(key.tenant_name())
    }

    /// The key's hash and its shard. The shard is taken from the hash's middle bits: the map
    /// inside a shard indexes by the low bits and tags by the high ones.
    fn locate(&self, key: &CounterKey) -> (u64, usize) {
        let hash = self.hasher.hash_one(key);
        (hash, ((hash >> 32) % SHARDS as u64) as usize)
    }

    /// Counters kept now (all shards), for tests and gauges.
    pub fn counters_kept(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len).sum()
    }

    /// Reserve synchronously (the memory store never waits).
    pub fn reserve_now(&self, counters: &[Counter], charge: Charge) -> Reservation {
        // Every shard a counter lives in is locked, in index order (no deadlock), for the whole
        // check-then-charge: all counters fit and are charged, or none is.
        let located: SmallVec<[(u64, usize); 4]> = counters.iter().map(|c| self.locate(&c.key)).collect();
        let mut order: SmallVec<[usize; 4]> = located.iter().map(|(_, shard)| *shard).collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: SmallVec<[(usize, MutexGuard<'_, Shard>); 4]> =
            order.iter().map(|&i| (i, self.shards[i].lock())).collect();
        let at = |shard: usize| guards.iter().position(|(g, _)| *g == shard).unwrap_or(0);
        let positions: SmallVec<[usize; 4]> = located.iter().map(|&(_, s)| at(s)).collect();
        let mut steps: SmallVec<[Step; 4]> = SmallVec::with_capacity(counters.len());
        for (i, ((c, &pos), &(hash, _))) in counters.iter().zip(&positions).zip(&located).enumerate() {
            let amount = charge.of(c.key.unit);
            let shard = &mut guards[pos].1;
            let used = match shard.get(hash, &c.key) {
                Some(slot) if slot.window > c.window.id => {
                    steps.push(Step::Skip);
                    continue;
                }
                Some(slot) if slot.window == c.window.id => slot.used,
                Some(_) => 0,
                None => {
                    if shard.len >= self.max_per_shard && !self.is_configured(&c.key.layer) {
                        let now_ms = c.window.ends_ms.saturating_sub(c.window.remaining_ms);
                        shard.evict_ended(now_ms);
                        if shard.len >= self.max_per_shard {
                            return Reservation::Rejected {
                                counter: i,
                                used: c.limit,
                            };
                        }
                    }
                    0
                }
            };
            if used.saturating_add(amount) > c.limit {
                return Reservation::Rejected { counter: i, used };
            }
            steps.push(Step::Count);
        }
        let mut used = Vec::with_capacity(counters.len());
        for (((c, &pos), step), &(hash, _)) in counters.iter().zip(&positions).zip(steps).zip(&located) {
            let amount = charge.of(c.key.unit);
            if step == Step::Skip {
                used.push(amount);
                continue;
            }
            let fresh = Slot {
                window: c.window.id,
                ends_ms: c.window.ends_ms,
                used: amount,
            };
            let shard = &mut guards[pos].1;
            // Looked up before inserting: the key (its strings) is cloned only for a new counter.
            match shard.get_mut(hash, &c.key) {
                Some(slot) if slot.window == c.window.id => {
                    slot.used = slot.used.saturating_add(amount);
                    used.push(slot.used);
                }
                Some(slot) => {
                    *slot = fresh;
                    used.push(amount);
                }
                None => {
                    shard.insert(hash, c.key.clone(), fresh);
                    used.push(amount);
                }
            }
        }
        Reservation::Admitted { used }
    }

    /// Settle synchronously. A counter whose window is over is not changed (its usage is gone
    /// with it).
    pub fn settle_now(&self, counters: &[Counter], reserved: Charge, actual: Charge) {
        for c in counters {
            let (hash, at) = self.locate(&c.key);
            let mut shard = self.shards[at].lock();
            if let Some(slot) = shard.get_mut(hash, &c.key)
                && slot.window == c.window.id
            {
                slot.used = slot
                    .used
                    .saturating_sub(reserved.of(c.key.unit))
                    .saturating_add(actual.of(c.key.unit));
            }
        }
    }
}

impl BudgetStore for MemoryStore {
    fn reserve<'a>(&'a self, counters: &'a [Counter], charge: Charge) -> StoreFuture<'a, Reservation> {
        let r = self.reserve_now(counters, charge);
        Box::pin(async move { Ok(r) })
    }

    fn settle<'a>(
        &'a self,
        counters: &'a [Counter],
        reserved: Charge,
        actual: Charge,
    ) -> StoreFuture<'a, ()> {
        self.settle_now(counters, reserved, actual);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::policy::{Period, Unit, Window};

    fn counter(layer: LayerKey, unit: Unit, limit: u64, window: u64) -> Counter {
        Counter {
            key: CounterKey {
                layer,
                period: Period::Fixed { ms: 1000 },
                unit,
            },
            limit,
            window: Window {
                id: window,
                ends_ms: (window + 1) * 1000,
                remaining_ms: 1000,
            },
        }
    }

    fn tokens(n: u64) -> Charge {
        Charge { tokens: n, nanos: 0 }
    }

    fn counters(window: u64) -> Vec<Counter> {
        vec![
            counter(LayerKey::tenant("a"), Unit::Tokens, 100, window),
            counter(LayerKey::model("a", "x"), Unit::Tokens, 30, window),
        ]
    }

    #[test]
    fn all_counters_or_nothing_and_windows_reset() {
        let s = MemoryStore::new();
        assert_eq!(
            s.reserve_now(&counters(0), tokens(20)),
            Reservation::Admitted { used: vec![20, 20] }
        );
        assert_eq!(
            s.reserve_now(&counters(0), tokens(20)),
            Reservation::Rejected { counter: 1, used: 20 }
        );
        // The rejected request charged nothing on the tenant counter either.
        assert_eq!(
            s.reserve_now(&counters(0)[..1], tokens(80)),
            Reservation::Admitted { used: vec![100] }
        );
        assert_eq!(
            s.reserve_now(&counters(1), tokens(20)),
            Reservation::Admitted { used: vec![20, 20] }
        );
    }

    #[test]
    fn each_unit_counts_its_own_amount() {
        let s = MemoryStore::new();
        let both = [
            counter(LayerKey::tenant("a"), Unit::Tokens, 100, 0),
            counter(LayerKey::tenant("a"), Unit::Spend, 1_000, 0),
        ];
        let charge = Charge {
            tokens: 10,
            nanos: 600,
        };
        assert_eq!(
            s.reserve_now(&both, charge),
            Reservation::Admitted { used: vec![10, 600] }
        );
        // Tokens would fit; money is one nano unit short.
        assert_eq!(
            s.reserve_now(
                &both,
                Charge {
                    tokens: 10,
                    nanos: 401
                }
            ),
            Reservation::Rejected {
                counter: 1,
                used: 600
            }
        );
        assert_eq!(
            s.reserve_now(
                &both,
                Charge {
                    tokens: 10,
                    nanos: 400
                }
            ),
            Reservation::Admitted {
                used: vec![20, 1_000]
            }
        );
        s.settle_now(
            &both,
            Charge {
                tokens: 10,
                nanos: 400,
            },
            Charge {
                tokens: 4,
                nanos: 100,
            },
        );
        assert_eq!(
            s.reserve_now(
                &both,
                Charge {
                    tokens: 0,
                    nanos: 300
                }
            ),
            Reservation::Admitted {
                used: vec![14, 1_000]
            }
        );
    }

    #[test]
    fn settle_replaces_the_reservation_by_actual_usage() {
        let s = MemoryStore::new();
        s.reserve_now(&counters(5), tokens(30));
        s.settle_now(&counters(5), tokens(30), tokens(12));
        assert_eq!(
            s.reserve_now(&counters(5), tokens(18)),
            Reservation::Admitted { used: vec![30, 30] }
        );
    }

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let s = std::sync::Arc::new(MemoryStore::new());
        let admitted = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        std::thread::scope(|scope| {
            for _ in 0..100 {
                let (s, admitted) = (s.clone(), admitted.clone());
                scope.spawn(move || {
                    let c = [counter(LayerKey::tenant("t"), Unit::Tokens, 100, 0)];
                    if matches!(s.reserve_now(&c, tokens(10)), Reservation::Admitted { .. }) {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(admitted.load(std::sync::atomic::Ordering::Relaxed), 10);
    }

    #[test]
    fn ended_windows_make_room_and_new_counters_past_the_capacity_are_refused() {
        let s = MemoryStore::with_capacity(SHARDS); // one counter per shard
        let tenant = |i: usize, w: u64| [counter(LayerKey::tenant(&format!("t{i}")), Unit::Tokens, 10, w)];
        let admitted = (0..200)
            .filter(|i| {
                matches!(
                    s.reserve_now(&tenant(*i, 0), tokens(1)),
                    Reservation::Admitted { .. }
                )
            })
            .count();
        assert!(admitted <= SHARDS, "{admitted} admitted");
        assert!(s.counters_kept() <= SHARDS);
        // A counter already kept still takes reservations at capacity.
        let kept = (0..200)
            .find(|i| {
                matches!(
                    s.reserve_now(&tenant(*i, 0), tokens(1)),
                    Reservation::Admitted { .. }
                )
            })
            .unwrap();
        assert_eq!(
            s.reserve_now(&tenant(kept, 0), tokens(8)),
            Reservation::Admitted { used: vec![10] }
        );
        // In the next window the ended counters make room for new tenants.
        let admitted = (0..200)
            .filter(|i| {
                matches!(
                    s.reserve_now(&tenant(*i, 1), tokens(1)),
                    Reservation::Admitted { .. }
                )
            })
            .count();
        assert!(admitted >= 1, "ended counters were not evicted");
        assert!(s.counters_kept() <= SHARDS);
        // A reservation of a window that is over is not charged to the current one.
        let current = (0..200)
            .find(|i| {
                matches!(
                    s.reserve_now(&tenant(*i, 1), tokens(0)),
                    Reservation::Admitted { .. }
                )
            })
            .unwrap();
        assert_eq!(
            s.reserve_now(&tenant(current, 0), tokens(5)),
            Reservation::Admitted { used: vec![5] }
        );
        // A settlement of a window that is over changes nothing.
        s.settle_now(&tenant(current, 0), tokens(9), tokens(0));
        assert_eq!(
            s.reserve_now(&tenant(current, 1), tokens(9)),
            Reservation::Admitted { used: vec![10] }
        );
    }

    #[test]
    fn counters_in_several_shards_are_reserved_together() {
        let s = MemoryStore::new();
        for t in 0..50 {
            let c = [
                counter(LayerKey::tenant(&format!("t{t}")), Unit::Tokens, 100, 0),
                counter(LayerKey::model(&format!("t{t}"), "m"), Unit::Tokens, 30, 0),
            ];
            assert_eq!(
                s.reserve_now(&c, tokens(30)),
                Reservation::Admitted { used: vec![30, 30] }
            );
            assert_eq!(
                s.reserve_now(&c, tokens(1)),
                Reservation::Rejected { counter: 1, used: 30 }
            );
            assert_eq!(
                s.reserve_now(&c[..1], tokens(70)),
                Reservation::Admitted { used: vec![100] },
                "the refused request charged the tenant counter nothing"
            );
        }
    }

    #[test]
    fn a_configured_tenant_is_never_refused_for_room() {
        let s = MemoryStore::with_capacity(SHARDS).with_configured_tenants(["vip".to_owned()]);
        for i in 0..200 {
            s.reserve_now(
                &[counter(LayerKey::tenant(&format!("t{i}")), Unit::Tokens, 10, 0)],
                tokens(1),
            );
        }
        let vip = [counter(LayerKey::model("vip", "gpt-4o"), Unit::Tokens, 10, 0)];
        assert_eq!(
            s.reserve_now(&vip, tokens(1)),
            Reservation::Admitted { used: vec![1] }
        );
    }
}
