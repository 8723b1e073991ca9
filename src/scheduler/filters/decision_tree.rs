//! `decision-tree-filter`: run a filter, then continue on success or failure with others.
//!
//! A non-empty result goes to `nextOnSuccess` (or `nextOnSuccessOrFailure`), or is returned when
//! neither is set; an empty result sends the **original input** to `nextOnFailure` (or
//! `nextOnSuccessOrFailure`), or returns empty when neither is set.

use std::sync::Arc;

use rand::RngCore;

use crate::{
    datastore::EndpointId,
    scheduler::plugin::{CycleState, Filter, PluginName, SchedulingContext},
};

/// A built decision tree node.
pub struct DecisionTreeFilter {
    /// Identity.
    pub name: PluginName,
    /// The filter run first.
    pub current: Arc<dyn Filter>,
    /// Next on a non-empty result.
    pub next_on_success: Option<Arc<dyn Filter>>,
    /// Next on an empty result (gets the original input).
    pub next_on_failure: Option<Arc<dyn Filter>>,
    /// Next either way (when the specific branch is not set).
    pub next_on_success_or_failure: Option<Arc<dyn Filter>>,
}

impl Filter for DecisionTreeFilter {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn filter(
        &self,
        ctx: &SchedulingContext<'_>,
        state: &CycleState,
        c: &mut Vec<EndpointId>,
        rng: &mut dyn RngCore,
    ) {
        let original = c.clone();
        self.current.filter(ctx, state, c, rng);
        if !c.is_empty() {
            if let Some(next) = self
                .next_on_success
                .as_ref()
                .or(self.next_on_success_or_failure.as_ref())
            {
                next.filter(ctx, state, c, rng);
            }
        } else if let Some(next) = self
            .next_on_failure
            .as_ref()
            .or(self.next_on_success_or_failure.as_ref())
        {
            *c = original;
            next.filter(ctx, state, c, rng);
        }
    }
}
