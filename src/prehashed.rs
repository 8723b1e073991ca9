//! Maps keyed by values that are already uniformly distributed hashes (prefix blocks, budget
//! counters hashed with a random key): hashing them again would only cost time.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

/// A hasher that passes a `u64` key through.
#[derive(Debug, Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `u64` keys; this keeps the trait's contract for others.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A map from hashes to `V`.
pub type PrehashedMap<V> = HashMap<u64, V, BuildHasherDefault<PassThroughHasher>>;
