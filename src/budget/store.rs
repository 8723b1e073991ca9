//! Where budget counters live: the [`BudgetStore`] trait and the in-memory store (exact for one
//! replica). Reservation is atomic across every layer of a request: all fit and all are charged,
//! or nothing is.

use std::{collections::HashMap, future::Future, pin::Pin};

use parking_lot::Mutex;

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

/// In-process counters: exact for a single EPP replica.
#[derive(Debug, Default)]
pub struct MemoryStore {
    used: Mutex<HashMap<LayerKey, (u64, u64)>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reserve synchronously (the memory store never waits).
    pub fn reserve_now(&self, layers: &[Layer], amount: u64, window: Window) -> Reservation {
        let mut used = self.used.lock();
        let current = |used: &HashMap<LayerKey, (u64, u64)>, key: &LayerKey| match used.get(key) {
            Some((w, n)) if *w == window.id => *n,
            _ => 0,
        };
        for (i, l) in layers.iter().enumerate() {
            let u = current(&used, &l.key);
            if u.saturating_add(amount) > l.limit {
                return Reservation::Rejected { layer: i, used: u };
            }
        }
        let mut remaining = Vec::with_capacity(layers.len());
        for l in layers {
            let u = current(&used, &l.key) + amount;
            used.insert(l.key.clone(), (window.id, u));
            remaining.push(l.limit.saturating_sub(u));
        }
        remaining.shrink_to_fit();
        Reservation::Admitted { remaining }
    }

    /// Settle synchronously.
    pub fn settle_now(&self, layers: &[Layer], window: Window, reserved: u64, actual: u64) {
        let mut used = self.used.lock();
        for l in layers {
            if let Some((w, n)) = used.get_mut(&l.key)
                && *w == window.id
            {
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
}
