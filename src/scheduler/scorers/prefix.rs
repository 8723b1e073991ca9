//! `prefix-cache-scorer`: prefer endpoints that already hold the longest prefix of the prompt,
//! `matched blocks / total blocks` from the prefix producer (0 without hashes).

use crate::{
    datastore::EndpointId,
    scheduler::plugin::{CycleState, Needs, PluginName, SchedulingContext, Scorer},
};

/// Prefix-match ratio scorer.
pub struct PrefixCacheScorer {
    name: PluginName,
}

impl PrefixCacheScorer {
    /// A scorer named `name`.
    pub fn new(name: PluginName) -> Self {
        Self { name }
    }
}

impl Scorer for PrefixCacheScorer {
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
        let Some(m) = state.prefix.as_ref().filter(|m| !m.hashes.is_empty()) else {
            out.fill(0.0);
            return;
        };
        let total = m.hashes.len() as f64;
        for (slot, id) in out.iter_mut().zip(candidates) {
            *slot = ctx
                .snapshot
                .get(*id)
                .map_or(0.0, |e| f64::from(m.matched_blocks(e.uid)) / total);
        }
    }
}
