//! `token-load-scorer`: prefer endpoints with fewer estimated tokens in flight from this EPP,
//! `1 − min(tokens, T) / T` with `T = queueThresholdTokens` (default 4,194,304).
//!
//! The signal is EPP-local (booked at pick time, released at response end), so it reacts within
//! the same burst, before any scrape.

use serde::Deserialize;

use crate::{
    datastore::EndpointId,
    scheduler::plugin::{CycleState, PluginName, SchedulingContext, Scorer},
};

/// Parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TokenLoadParams {
    /// Tokens at which an endpoint scores 0.
    pub queue_threshold_tokens: u64,
}

impl Default for TokenLoadParams {
    fn default() -> Self {
        Self {
            queue_threshold_tokens: 4_194_304,
        }
    }
}

/// In-flight token load scorer.
pub struct TokenLoadScorer {
    name: PluginName,
    threshold: u64,
}

impl TokenLoadScorer {
    /// A scorer named `name` (a zero threshold is treated as 1).
    pub fn new(name: PluginName, params: &TokenLoadParams) -> Self {
        Self {
            name,
            threshold: params.queue_threshold_tokens.max(1),
        }
    }
}

impl Scorer for TokenLoadScorer {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn score(&self, ctx: &SchedulingContext<'_>, _: &CycleState, candidates: &[EndpointId], out: &mut [f64]) {
        for (slot, id) in out.iter_mut().zip(candidates) {
            let tokens = ctx.snapshot.get(*id).map_or(0, |e| e.live.in_flight_tokens());
            *slot = 1.0 - tokens.min(self.threshold) as f64 / self.threshold as f64;
        }
    }
}
