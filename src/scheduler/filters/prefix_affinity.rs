//! `prefix-cache-affinity-filter`: "sticky until saturated", in the style of llm-d's 2026 default.
//!
//! Keep only the endpoints that already hold most of the prompt (prefix ratio ≥ `threshold`),
//! so a conversation or a shared system prompt stays where its KV cache is; release the stickiness
//! when that would cost too much: when the best sticky endpoint's estimated time to first token
//! exceeds the best other endpoint's by more than `maxTTFTPenaltyMs`. The TTFT estimate is the
//! endpoint's in-flight tokens divided by `peakPrefillThroughput`. With probability
//! `explorationProbability` the filter steps aside so new endpoints warm up.

use rand::{Rng, RngCore};
use serde::Deserialize;

use crate::{
    datastore::EndpointId,
    scheduler::plugin::{CycleState, Filter, Needs, PluginName, SchedulingContext},
};

/// Parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PrefixAffinityParams {
    /// Minimum prefix ratio to count as sticky.
    pub threshold: f64,
    /// Probability of skipping the filter.
    pub exploration_probability: f64,
    /// Extra estimated TTFT (ms) a sticky endpoint may cost before stickiness is released.
    #[serde(rename = "maxTTFTPenaltyMs")]
    pub max_ttft_penalty_ms: f64,
    /// Prefill throughput (tokens/s) used to turn in-flight tokens into a TTFT estimate.
    pub peak_prefill_throughput: f64,
}

impl Default for PrefixAffinityParams {
    fn default() -> Self {
        Self {
            threshold: 0.8,
            exploration_probability: 0.0,
            max_ttft_penalty_ms: 18_000.0,
            peak_prefill_throughput: 15_928.0,
        }
    }
}

/// The filter.
pub struct PrefixAffinityFilter {
    name: PluginName,
    p: PrefixAffinityParams,
}

impl PrefixAffinityFilter {
    /// A filter named `name`.
    pub fn new(name: PluginName, p: PrefixAffinityParams) -> Self {
        Self { name, p }
    }
}

impl Filter for PrefixAffinityFilter {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn needs(&self) -> Needs {
        Needs { prefix_match: true }
    }

    fn filter(
        &self,
        ctx: &SchedulingContext<'_>,
        state: &CycleState,
        c: &mut Vec<EndpointId>,
        rng: &mut dyn RngCore,
    ) {
        let Some(m) = state.prefix.as_ref().filter(|m| !m.hashes.is_empty()) else {
            return;
        };
        if self.p.exploration_probability > 0.0 && rng.random::<f64>() < self.p.exploration_probability {
            return;
        }
        let total = m.hashes.len() as f64;
        let sticky = |id: &EndpointId| {
            ctx.snapshot
                .get(*id)
                .is_some_and(|e| f64::from(m.matched_blocks(e.uid)) / total >= self.p.threshold)
        };
        let ttft_ms = |id: &EndpointId| {
            ctx.snapshot.get(*id).map_or(f64::INFINITY, |e| {
                e.live.in_flight_tokens() as f64 / self.p.peak_prefill_throughput.max(1.0) * 1000.0
            })
        };
        let best_sticky = c
            .iter()
            .filter(|id| sticky(id))
            .map(ttft_ms)
            .fold(f64::INFINITY, f64::min);
        if best_sticky.is_infinite() {
            return; // nothing sticky: every candidate stays
        }
        let best_other = c
            .iter()
            .filter(|id| !sticky(id))
            .map(ttft_ms)
            .fold(f64::INFINITY, f64::min);
        if best_sticky - best_other > self.p.max_ttft_penalty_ms {
            return; // saturated: release stickiness
        }
        c.retain(sticky);
    }
}
