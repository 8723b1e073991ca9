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
//! - `cost(e) = ahead(e) + (1 + b) × own(e)`, where `b` (with `recomputeAware`, the default)
//!   counts requests waiting for a first token: every token recomputed on `e` also delays the
//!   requests that queue behind it, so when queues form, a cache hit is worth more than a short
//!   wait, and at light load the rule is simply the shortest estimated wait. Whose requests:
//!   - `recomputeQueue: poolMean` (the default): the mean per candidate, the load level of the
//!     pool, the same `b` for every candidate;
//!   - `recomputeQueue: endpoint` (opt-in): `e`'s own, the requests a recompute on `e` actually
//!     delays. A candidate with an empty queue then pays its recompute once, so a pod the index
//!     credits with every hot prefix, and which queues every request because it really keeps
//!     fewer of them (a small cache), stops winning against an idle pod merely because the
//!     pool's mean queue is long: on pools of one-slot servers a herd breaks up. On batching
//!     engines it recomputes more than it saves (multi-LoRA and agent loops lose up to 6x in the
//!     routing matrix), which is why it is not the default (BENCHMARKS.md, "Many seeds").
//!   - `recomputeQueue: auto` (opt-in; `recommended` sets it): `endpoint` for a candidate whose
//!     scrapes have shown it a one-slot server ([`SlotEvidence::one_slot`]: requests queued
//!     behind one running request through its answer, in two scrapes in a row, and never two
//!     running), `poolMean` for every other. On a one-slot server every request waits behind
//!     all the others sent there, so its own queue is what a recompute there delays; on a
//!     batching engine an idle-looking pod may lack the adapter or the batch room, and the
//!     pool's level is the better guess. Until an endpoint has shown such a queue it counts as
//!     batching; in the routing matrix (vLLM pods) no pod ever does, and `auto` scores exactly
//!     as `poolMean`.
//!
//! - `countPrefillProgress` (opt-in; `recommended` sets it): on a candidate read as a one-slot
//!   server, the request it is computing (the oldest without a first byte, once nothing answers
//!   ahead of it) counts in `ahead(e)` by what is left of its prompt, at the endpoint's prefill
//!   rate learned from its earlier prompts ([`HeadPrefill::progress_tokens`]). Without it a
//!   one-slot server forty seconds into a minute-long prompt looks as far from free as one that
//!   has not begun, and a recompute elsewhere looks cheaper than the wait. Batching engines,
//!   which compute many prompts at once, are counted whole as before.
//!
//! The score is `1 − cost(e) / max cost` (all 1 when every cost is 0), so the picker takes the
//! cheapest endpoint. Invariants: scores are in `[0, 1]`; without a prefix match the scorer
//! compares backlogs alone (`H = 0`). What it does not see: decode load, other EPP replicas'
//! requests and the engine's own queue, which the scraped queue and KV scorers add when combined.

use serde::Deserialize;

use crate::{
    datastore::EndpointId,
    scheduler::plugin::{CycleState, Needs, PluginName, SchedulingContext, Scorer},
};
#[cfg(doc)]
use crate::{
    datastore::{HeadPrefill, SlotEvidence},
    scheduler::plugin::PrefixMatch,
};

/// Parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PrefillBacklogParams {
    /// Weigh recomputed tokens by `1 + b` (see the module doc); `false` weighs them once.
    pub recompute_aware: bool,
    /// Whose waiting requests `b` counts (see the module doc).
    pub recompute_queue: RecomputeQueue,
    /// Count a one-slot server's request in progress by what is left of its prompt (see the
    /// module doc).
    pub count_prefill_progress: bool,
}

/// Whose waiting requests the recompute weight `b` counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RecomputeQueue {
    /// The mean over the candidates (the load level of the pool).
    #[default]
    PoolMean,
    /// The candidate's own: the requests a recompute there delays.
    Endpoint,
    /// The candidate's own where its scrapes show a one-slot server, the pool's mean elsewhere.
    Auto,
}

impl Default for PrefillBacklogParams {
    fn default() -> Self {
        Self {
            recompute_aware: true,
            recompute_queue: RecomputeQueue::PoolMean,
            count_prefill_progress: false,
        }
    }
}

/// Prefill-backlog scorer.
pub struct PrefillBacklogScorer {
    name: PluginName,
    recompute_aware: bool,
    recompute_queue: RecomputeQueue,
    count_prefill_progress: bool,
}

impl PrefillBacklogScorer {
    /// A scorer named `name`.
    pub fn new(name: PluginName, params: &PrefillBacklogParams) -> Self {
        Self {
            name,
            recompute_aware: params.recompute_aware,
            recompute_queue: params.recompute_queue,
            count_prefill_progress: params.count_prefill_progress,
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
            let endpoint = ctx.snapshot.get(*id);
            let live = endpoint.map(|e| &e.live);
            let one_slot = endpoint.is_some_and(|e| e.metrics.slots.one_slot());
            let progress = match endpoint {
                Some(e) if one_slot && self.count_prefill_progress => {
                    e.metrics.head.progress_tokens(ctx.now, e.live.oldest_prefill())
                }
                _ => 0,
            };
            let ahead = live.map_or(0, |l| l.prefill_tokens().saturating_sub(progress)) as f64;
            let own_queue = match self.recompute_queue {
                RecomputeQueue::PoolMean => false,
                RecomputeQueue::Endpoint => true,
                RecomputeQueue::Auto => one_slot,
            };
            // `b` is 0 without `recomputeAware`, whichever queue it would count.
            let b = if own_queue && self.recompute_aware {
                f64::from(live.map_or(0, |l| l.prefilling_requests()))
            } else {
                b
            };
            *slot = ahead + (1.0 + b) * *slot;
            max = max.max(*slot);
        }
        for slot in out.iter_mut() {
            *slot = if max > 0.0 { 1.0 - *slot / max } else { 1.0 };
        }
    }
}
