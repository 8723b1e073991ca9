//! `kv-cache-utilization-scorer`: prefer endpoints with free KV cache, `1 − utilization`.
//!
//! An engine that does not report KV utilization (llama.cpp, a vLLM page without the gauge) is
//! *unknown*, not empty: it gets the mean score of the candidates that do report (or 1 when none
//! do, so a pool of such engines ties and the other scorers decide), so it neither wins nor loses
//! on KV.

use crate::{
    datastore::EndpointId,
    scheduler::plugin::{CycleState, PluginName, SchedulingContext, Scorer},
};

/// The value that stands for an unknown among `known` values: their mean, clamped to their range
/// so that rounding never puts it outside (equal known values give exactly that value, and an
/// unknown endpoint then ties with them). `None` when nothing is known.
pub fn neutral_mean(known: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n, mut lo, mut hi) = (0.0, 0u32, f64::INFINITY, f64::NEG_INFINITY);
    for v in known {
        sum += v;
        n += 1;
        lo = lo.min(v);
        hi = hi.max(v);
    }
    (n > 0).then(|| (sum / f64::from(n)).clamp(lo, hi))
}

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
        for (slot, id) in out.iter_mut().zip(candidates) {
            *slot = match ctx.snapshot.get(*id).and_then(|e| e.metrics.kv_usage) {
                Some(kv) => 1.0 - kv,
                None => f64::NAN, // unknown, replaced below
            };
        }
        let neutral = neutral_mean(out.iter().copied().filter(|s| !s.is_nan())).unwrap_or(1.0);
        for slot in out.iter_mut().filter(|s| s.is_nan()) {
            *slot = neutral;
        }
    }
}
