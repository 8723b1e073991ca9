//! Where budget counters live: the [`BudgetStore`] trait and the in-memory store (exact for one
//! replica; sharded, keeping the current window only, at most [`DEFAULT_MAX_LAYERS`] layers).
//! Reservation is atomic across every layer of a request: all fit and all are charged, or
//! nothing is.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    hash::{BuildHasher, RandomState},
    pin::Pin,
};

use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;

use super::policy::{Layer, LayerKey, Window};

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
    /// Charged on every layer; `remaining[i]` is layer `i`'s remaining tokens afterwards.
    Admitted {
        /// Remaining tokens per layer.
        remaining: Vec<u64>,
    },
    /// Layer `layer` cannot fit the amount; nothing was charged.
    Rejected {
        /// Index of the first layer that did not fit.
        layer: usize,
        /// Tokens already used on it in this window.
        used: u64,
    },
}

/// Budget counters.
pub trait BudgetStore: Send + Sync {
    /// Atomically charge `amount` on every layer in `window` if it fits all of them.
    fn reserve<'a>(
        &'a self,
        layers: &'a [Layer],
        amount: u64,
        window: Window,
    ) -> StoreFuture<'a, Reservation>;
    /// Replace a reservation of `reserved` by the `actual` usage (in the reservation's window).
    fn settle<'a>(
        &'a self,
        layers: &'a [Layer],
        window: Window,
        reserved: u64,
        actual: u64,
    ) -> StoreFuture<'a, ()>;
}

/// Shards of the in-memory store: reservations of different tenants rarely wait on each other.
const SHARDS: usize = 16;

/// Layers the in-memory store counts at most in one window (over all shards): the bound on
/// state keyed by client input (a tenant header with a `defaultTenant` budget makes one layer
/// per distinct value). A request that would need a new layer past it is refused, as if its
/// budget were used up, until the window turns.
pub const DEFAULT_MAX_LAYERS: usize = 65_536;

/// One shard: the counters of the current window only (older windows are dropped as soon as a
/// reservation of a newer one arrives).
#[derive(Debug, Default)]
struct Shard {
    window: u64,
    used: HashMap<LayerKey, u64>,
}

/// In-process counters: exact for a single EPP replica.
///
/// Bounded: only the current window is kept, and at most [`DEFAULT_MAX_LAYERS`] layers in it
/// (or the capacity given to [`MemoryStore::with_capacity`]).
#[derive(Debug)]
pub struct MemoryStore {
    shards: [Mutex<Shard>; SHARDS],
    max_per_shard: usize,
    hasher: RandomState,
    /// Tenants the config names: their layers are bounded by the config, so they are never
    /// refused for room (a flood of unlisted tenants cannot lock them out).
    configured: HashSet<String>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_MAX_LAYERS)
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store counting at most about `max_layers` layers per window.
    pub fn with_capacity(max_layers: usize) -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
            max_per_shard: max_layers.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            configured: HashSet::new(),
        }
    }

    /// This store, never refusing room to the layers of `tenants` (the config's).
    pub fn with_configured_tenants(mut self, tenants: impl IntoIterator<Item = String>) -> Self {
        self.configured = tenants.into_iter().collect();
        self
    }

    fn is_configured(&self, key: &LayerKey) -> bool {
        let (LayerKey::Tenant { tenant } | LayerKey::Model { tenant, .. }) = key;
        self.configured.contains(tenant)
    }

    fn shard_of(&self, key: &LayerKey) -> usize {
        (self.hasher.hash_one(key) % SHARDS as u64) as usize
    }

    /// Layers counted now (all shards), for tests and gauges.
    pub fn layers_counted(&self) -> usize {
        self.shards.iter().map(|s| s.lock().used.len()).sum()
    }

    /// Reserve synchronously (the memory store never waits).
    pub fn reserve_now(&self, layers: &[Layer], amount: u64, window: Window) -> Reservation {
        // Every shard a layer lives in is locked, in index order (no deadlock), for the whole
        // check-then-charge: all layers fit and are charged, or none is.
        let mut order: SmallVec<[usize; 2]> = layers.iter().map(|l| self.shard_of(&l.key)).collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: SmallVec<[(usize, MutexGuard<'_, Shard>); 2]> =
            order.iter().map(|&i| (i, self.shards[i].lock())).collect();
        for (_, shard) in &mut guards {
            if window.id > shard.window {
                shard.window = window.id;
                shard.used.clear();
            }
        }
        // A request that took its window just before a concurrent one moved the shard to the
        // next: its window's counters are gone, and charging the next window would never be
        // refunded (settlement is per window). It goes through uncharged, as at a window's start.
        if guards.iter().any(|(_, shard)| window.id < shard.window) {
            return Reservation::Admitted {
                remaining: layers.iter().map(|l| l.limit.saturating_sub(amount)).collect(),
            };
        }
        let shard_index = |key: &LayerKey| {
            let i = self.shard_of(key);
            guards.iter().position(|(g, _)| *g == i).unwrap_or(0)
        };
        let positions: SmallVec<[usize; 2]> = layers.iter().map(|l| shard_index(&l.key)).collect();
        for (i, (l, &at)) in layers.iter().zip(&positions).enumerate() {
            let shard = &guards[at].1;
            let used = shard.used.get(&l.key).copied();
            if used.is_none() && shard.used.len() >= self.max_per_shard && !self.is_configured(&l.key) {
                return Reservation::Rejected {
                    layer: i,
                    used: l.limit,
                };
            }
            let used = used.unwrap_or(0);
            if used.saturating_add(amount) > l.limit {
                return Reservation::Rejected { layer: i, used };
            }
        }
        let mut remaining = Vec::with_capacity(layers.len());
        for (l, &at) in layers.iter().zip(&positions) {
            let counter = guards[at].1.used.entry(l.key.clone()).or_insert(0);
            *counter = counter.saturating_add(amount);
            remaining.push(l.limit.saturating_sub(*counter));
        }
        Reservation::Admitted { remaining }
    }

    /// Settle synchronously. A reservation of a window that is over is not changed (its
    /// counters are gone with it).
    pub fn settle_now(&self, layers: &[Layer], window: Window, reserved: u64, actual: u64) {
        for l in layers {
            let mut shard = self.shards[self.shard_of(&l.key)].lock();
            if shard.window != window.id {
                continue;
            }
            if let Some(n) = shard.used.get_mut(&l.key) {
                *n = n.saturating_sub(reserved).saturating_add(actual);
            }
        }
    }
}

impl BudgetStore for MemoryStore {
    fn reserve<'a>(
        &'a self,
        layers: &'a [Layer],
        amount: u64,
        window: Window,
    ) -> StoreFuture<'a, Reservation> {
        let r = self.reserve_now(layers, amount, window);
        Box::pin(async move { Ok(r) })
    }

    fn settle<'a>(
        &'a self,
        layers: &'a [Layer],
        window: Window,
        reserved: u64,
        actual: u64,
    ) -> StoreFuture<'a, ()> {
        self.settle_now(layers, window, reserved, actual);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<Layer> {
        vec![
            Layer {
                key: LayerKey::tenant("a"),
                limit: 100,
            },
            Layer {
                key: LayerKey::model("a", "x"),
                limit: 30,
            },
        ]
    }

    #[test]
    fn all_layers_or_nothing_and_windows_reset() {
        let s = MemoryStore::new();
        let w0 = Window {
            id: 0,
            remaining_ms: 1000,
        };
        assert_eq!(
            s.reserve_now(&layers(), 20, w0),
            Reservation::Admitted {
                remaining: vec![80, 10]
            }
        );
        assert_eq!(
            s.reserve_now(&layers(), 20, w0),
            Reservation::Rejected { layer: 1, used: 20 }
        );
        // The rejected request charged nothing on the tenant layer either.
        assert_eq!(
            s.reserve_now(&layers()[..1], 80, w0),
            Reservation::Admitted { remaining: vec![0] }
        );
        let w1 = Window {
            id: 1,
            remaining_ms: 1000,
        };
        assert_eq!(
            s.reserve_now(&layers(), 20, w1),
            Reservation::Admitted {
                remaining: vec![80, 10]
            }
        );
    }

    #[test]
    fn settle_replaces_the_reservation_by_actual_usage() {
        let s = MemoryStore::new();
        let w = Window {
            id: 5,
            remaining_ms: 1,
        };
        s.reserve_now(&layers(), 30, w);
        s.settle_now(&layers(), w, 30, 12);
        assert_eq!(
            s.reserve_now(&layers(), 18, w),
            Reservation::Admitted {
                remaining: vec![70, 0]
            }
        );
    }

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let s = std::sync::Arc::new(MemoryStore::new());
        let w = Window {
            id: 0,
            remaining_ms: 1,
        };
        let admitted = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        std::thread::scope(|scope| {
            for _ in 0..100 {
                let (s, admitted) = (s.clone(), admitted.clone());
                scope.spawn(move || {
                    if matches!(
                        s.reserve_now(
                            &[Layer {
                                key: LayerKey::tenant("t"),
                                limit: 100
                            }],
                            10,
                            w
                        ),
                        Reservation::Admitted { .. }
                    ) {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(admitted.load(std::sync::atomic::Ordering::Relaxed), 10);
    }

    #[test]
    fn past_windows_are_dropped_and_new_layers_past_the_capacity_are_refused() {
        let s = MemoryStore::with_capacity(SHARDS); // one layer per shard
        let w = |id| Window { id, remaining_ms: 1 };
        let tenant = |i: usize| {
            [Layer {
                key: LayerKey::tenant(&format!("t{i}")),
                limit: 10,
            }]
        };
        let admitted = (0..200)
            .filter(|i| matches!(s.reserve_now(&tenant(*i), 1, w(0)), Reservation::Admitted { .. }))
            .count();
        assert!(admitted <= SHARDS, "{admitted} admitted");
        assert!(s.layers_counted() <= SHARDS);
        // A layer already counted still takes reservations at capacity.
        let counted = (0..200)
            .find(|i| matches!(s.reserve_now(&tenant(*i), 1, w(0)), Reservation::Admitted { .. }))
            .unwrap();
        assert_eq!(
            s.reserve_now(&tenant(counted), 8, w(0)),
            Reservation::Admitted { remaining: vec![0] }
        );
        // The next window starts empty in every shard it touches: the old counters are gone.
        for i in 0..200 {
            s.reserve_now(&tenant(i), 1, w(1));
        }
        assert!(s.layers_counted() <= SHARDS);
        assert_eq!(
            s.reserve_now(&tenant(counted), 9, w(2)),
            Reservation::Admitted { remaining: vec![1] }
        );
        // A reservation of a window that is over is not charged to the current one.
        assert_eq!(
            s.reserve_now(&tenant(counted), 5, w(1)),
            Reservation::Admitted { remaining: vec![5] }
        );
        // A settlement of a window that is over changes nothing.
        s.settle_now(&tenant(counted), w(1), 9, 0);
        assert_eq!(
            s.reserve_now(&tenant(counted), 2, w(2)),
            Reservation::Rejected { layer: 0, used: 9 }
        );
    }

    #[test]
    fn layers_in_two_shards_are_reserved_together() {
        let s = MemoryStore::new();
        let w0 = Window {
            id: 0,
            remaining_ms: 1,
        };
        // Many tenant/model pairs: most pairs live in two shards.
        for t in 0..50 {
            let layers = [
                Layer {
                    key: LayerKey::tenant(&format!("t{t}")),
                    limit: 100,
                },
                Layer {
                    key: LayerKey::model(&format!("t{t}"), "m"),
                    limit: 30,
                },
            ];
            assert_eq!(
                s.reserve_now(&layers, 30, w0),
                Reservation::Admitted {
                    remaining: vec![70, 0]
                }
            );
            assert_eq!(
                s.reserve_now(&layers, 1, w0),
                Reservation::Rejected { layer: 1, used: 30 }
            );
            assert_eq!(
                s.reserve_now(&layers[..1], 70, w0),
                Reservation::Admitted { remaining: vec![0] },
                "the refused request charged the tenant layer nothing"
            );
        }
    }

    #[test]
    fn a_configured_tenant_is_never_refused_for_room() {
        let s = MemoryStore::with_capacity(SHARDS).with_configured_tenants(["vip".to_owned()]);
        let w0 = Window {
            id: 0,
            remaining_ms: 1,
        };
        for i in 0..200 {
            let flood = [Layer {
                key: LayerKey::tenant(&format!("t{i}")),
                limit: 10,
            }];
            s.reserve_now(&flood, 1, w0);
        }
        let vip = [Layer {
            key: LayerKey::model("vip", "gpt-4o"),
            limit: 10,
        }];
        assert_eq!(
            s.reserve_now(&vip, 1, w0),
            Reservation::Admitted { remaining: vec![9] }
        );
    }
}
