//! Flow-control policies as data: fairness between flows, ordering inside a flow, the usage
//! limit (ceiling) per band, and the resolved configuration that holds them.

use std::{collections::BTreeMap, sync::Arc};

use crate::scheduler::plugin::SaturationDetector;

/// How a band chooses the flow that sends next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fairness {
    /// `global-strict-fairness-policy` (upstream's default): the flow whose head request comes
    /// first by the band's ordering policy (with FCFS, the oldest request of the band).
    GlobalStrict,
    /// `round-robin-fairness-policy` (upstream): one request per flow per turn, flows in
    /// fairness-id order, starting after the flow served last.
    RoundRobin,
    /// `token-weighted-fairness-policy` (ours): the flow that has received the fewest estimated
    /// tokens (prompt + expected output) goes next, measured on a virtual clock so that a flow
    /// that was idle does not bank credit (start-time fair queueing over tokens). One tenant's
    /// long prompts count for what they cost, not as one request each.
    TokenWeighted,
}

/// How a flow orders its own requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// `fcfs-ordering-policy` (upstream's default): by enqueue time.
    Fcfs,
    /// `edf-ordering-policy` (upstream): by deadline, enqueue time + TTL (no TTL: last), ties by
    /// enqueue time. With one TTL for every request, as upstream, it orders as FCFS does.
    Edf,
}

/// One band's limits and policies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandPolicy {
    /// Byte cap of the band.
    pub max_bytes: u64,
    /// Request cap of the band.
    pub max_requests: u64,
    /// Between flows.
    pub fairness: Fairness,
    /// Inside a flow.
    pub ordering: Ordering,
}

/// Flow control as configured: built by the registry from the `flowControl` section.
#[derive(Clone)]
pub struct FlowControlPolicy {
    /// Global byte cap (0 = none).
    pub max_bytes: u64,
    /// Global request cap (0 = none).
    pub max_requests: u64,
    /// Queue TTL while the pool has endpoints, ns (0 = none).
    pub ttl_ns: u64,
    /// Queue TTL while the pool is empty, ns (0 = none).
    pub no_endpoint_ttl_ns: u64,
    /// Listed bands by priority.
    pub bands: BTreeMap<i32, BandPolicy>,
    /// Template of other bands with priority ≥ 0.
    pub default_band: BandPolicy,
    /// Template of other bands with priority < 0.
    pub default_negative_band: BandPolicy,
    /// `static-usage-limit-policy`'s threshold: a band dispatches while the pool's saturation is
    /// below it (upstream default 1.0, the same for every band).
    pub ceiling: f64,
    /// The detector whose saturation over the whole pool gates dispatch.
    pub detector: Arc<dyn SaturationDetector>,
}

impl std::fmt::Debug for FlowControlPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowControlPolicy")
            .field("max_bytes", &self.max_bytes)
            .field("max_requests", &self.max_requests)
            .field("ttl_ns", &self.ttl_ns)
            .field("no_endpoint_ttl_ns", &self.no_endpoint_ttl_ns)
            .field("bands", &self.bands)
            .field("default_band", &self.default_band)
            .field("ceiling", &self.ceiling)
            .field("detector", &self.detector.name().name)
            .finish_non_exhaustive()
    }
}

impl FlowControlPolicy {
    /// The policy of `priority`'s band: the listed one, else the template for its sign.
    pub fn band(&self, priority: i32) -> BandPolicy {
        match self.bands.get(&priority) {
            Some(b) => *b,
            None if priority < 0 => self.default_negative_band,
            None => self.default_band,
        }
    }

    /// The ceiling of `priority`'s band (the static policy gives every band the same).
    pub fn ceiling(&self, _priority: i32) -> f64 {
        self.ceiling
    }

    /// The TTL, ns, in the current regime (0 = none).
    pub fn ttl_ns(&self, pool_empty: bool) -> u64 {
        if pool_empty {
            self.no_endpoint_ttl_ns
        } else {
            self.ttl_ns
        }
    }
}
