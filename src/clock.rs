//! Time as data.
//!
//! The request path and the pure modules (`scheduler`, `prefix`, `parser`) never read a clock:
//! callers pass a [`Timestamp`] in. Servers read time through [`Clock`], so the simulator can drive
//! logical time through the very same code.

use std::time::{Duration, Instant};

/// Nanoseconds since an arbitrary origin (process start for [`MonotonicClock`], simulation start
/// in the simulator). Integer, so simulated time never suffers float rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// `self` moved forward by `d` (saturating).
    pub fn after(self, d: Duration) -> Timestamp {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(nanos))
    }
}

/// A source of [`Timestamp`]s.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// Wall-free monotonic clock whose origin is its creation.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose `Timestamp(0)` is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Timestamp {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        Timestamp(nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_saturates_and_after_adds() {
        let a = Timestamp(1_000);
        let b = a.after(Duration::from_micros(2));
        assert_eq!(b, Timestamp(3_000));
        assert_eq!(b.since(a), Duration::from_nanos(2_000));
        assert_eq!(a.since(b), Duration::ZERO);
    }
}
