//! `prefill-backlog-scorer` (ours): prefer the endpoint where the request's first token should
//! come soonest, estimated in prompt tokens still to compute there.
//!
//! For each candidate `e`, with `P` the request's estimated prompt tokens and `H(e)` the prompt
//! tokens the prefix index says `e` holds ([`PrefixMatch::held_tokens`]):
//! - `own(e) = max(0, P − H(e))`: the tokens this request would compute on `e`;
//! - `ahead(e)`: the prompt tokens of the requests this EPP sent to `e` that have not answered
//!   their first byte yet, each counted as what it was expected to compute there
//!   ([`EndpointLive::prefill_tokens`](crate::datastore::EndpointLive::prefill_tokens)): the
//!   prefill work a request sent now waits behind (engines prefill first come, first served);
//! - `cost(e) = ahead(e) + (1 + b) × own(e)`, where `b` (with `recomputeAware`, the default) is
//!   the mean number of such waiting requests per candidate: every token recomputed on `e` also
//!   delays the requests that will queue behind it, so when queues form, a cache hit is worth
//!   more than a short wait, and at light load the rule is simply the shortest estimated wait.
//!
//! The score is `1 − cost(e) / max cost` (all 1 when every cost is 0), so the picker takes the
//! cheapest endpoint. Invariants: scores are in `[0, 1]`; without a prefix match the scorer
//! compares backlogs alone (`H = 0`). What it does not see: decode load, other EPP replicas'
//! requests and the engine's own queue, which the scraped queue and KV scorers add when combined.

use serde::Deserialize;

#[cfg(doc)]
use crate::scheduler::plugin::PrefixMatch;
use crate::{
    datastore::EndpointId,
    scheduler::plugin::{CycleState, Needs, PluginName, SchedulingContext, Scorer},
};

/// Parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PrefillBacklogParams {
    /// Weigh recomputed tokens by `1 + b` (see the module doc); `false` weighs them once.
    pub recompute_aware: bool,
}

impl Default for PrefillBacklogParams {
    fn default() -> Self {
        Self {
            recompute_aware: true,
        }
    }
}

/// Prefill-backlog scorer.
pub struct PrefillBacklogScorer {
    name: PluginName,
    recompute_aware: bool,
}

impl PrefillBacklogScorer {
    /// A scorer named `name`.
    pub fn new(name: PluginName, params: &PrefillBacklogParams) -> Self {
        Self {
            name,
            recompute_aware: params.recompute_aware,
        }
    }
}

impl Scorer for PrefillBacklogScorer {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn needs(&self) -> Needs {
        Needs { prefix_match: true }
    }

    fn score(
        &self,
        ctx: &SchedulingContext<'_>,
        state: &CycleState,
        candidates: &[EndpointId],
        out: &mut [f64],
    ) {
        let prompt = ctx.request.estimated_prompt_tokens() as f64;
        let prefix = state.prefix.as_ref();
        let mut waiting = 0u64;
        for (slot, id) in out.iter_mut().zip(candidates) {
            let Some(e) = ctx.snapshot.get(*id) else {
                *slot = prompt;
                continue;
            };
            // Scratch use of `out`: the tokens this request would compute here.
            *slot = (prompt - prefix.map_or(0.0, |m| m.held_tokens(e.uid) as f64)).max(0.0);
            waiting += u64::from(e.live.prefilling_requests());
        }
        let b = if self.recompute_aware && !candidates.is_empty() {
            waiting as f64 / candidates.len() as f64
        } else {
            0.0
        };
        let mut max = 0.0f64;
        for (slot, id) in out.iter_mut().zip(candidates) {
            let ahead = ctx.snapshot.get(*id).map_or(0, |e| e.live.prefill_tokens()) as f64;
            *slot = ahead + (1.0 + b) * *slot;
            max = max.max(*slot);
        }
        for slot in out.iter_mut() {
            *slot = if max > 0.0 { 1.0 - *slot / max } else { 1.0 };
        }
    }
}
