//! `kv-cache-utilization-scorer`: prefer endpoints with free KV cache, `1 − utilization`.
//!
//! An engine that does not report KV utilization is *unknown*, not empty: it gets the mean score
//! of the candidates that do report (or 1 when none do), so it neither wins nor loses on KV.

use crate::{
    datastore::EndpointId,
    scheduler::plugin::{CycleState, PluginName, SchedulingContext, Scorer},
};

/// `1 − kv` scorer.
pub struct KvCacheScorer {
    name: PluginName,
}

impl KvCacheScorer {
    /// A scorer named `name`.
    pub fn new(name: PluginName) -> Self {
        Self { name }
    }
}

impl Scorer for KvCacheScorer {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn score(&self, ctx: &SchedulingContext<'_>, _: &CycleState, candidates: &[EndpointId], out: &mut [f64]) {
        let (mut sum, mut known) = (0.0, 0u32);
        for (slot, id) in out.iter_mut().zip(candidates) {
            if let Some(kv) = ctx.snapshot.get(*id).and_then(|e| e.metrics.kv_usage) {
                *slot = 1.0 - kv;
                sum += *slot;
                known += 1;
            } else {
                *slot = f64::NAN; // marked unknown, replaced below
            }
        }
        let neutral = if known == 0 { 1.0 } else { sum / f64::from(known) };
        for slot in out.iter_mut().filter(|s| s.is_nan()) {
            *slot = neutral;
        }
    }
}
