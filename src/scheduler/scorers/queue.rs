//! `queue-scorer`: prefer endpoints with shorter waiting queues.
//!
//! Min-max normalised over the candidates: `(max − q) / (max − min)`; when every queue is equal
//! every candidate scores 1. The count is the scraped gauge and nothing else, as upstream: with
//! the same scraped metrics every decision is upstream's, whatever requests came before. Load
//! this EPP has dispatched since the scrape is a separate signal (in-flight load, read by
//! `token-load-scorer` and `concurrency-detector`).

use crate::{
    datastore::EndpointId,
    scheduler::plugin::{CycleState, PluginName, SchedulingContext, Scorer},
};

/// Which per-endpoint count is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueSignal {
    /// Waiting requests (`queue-scorer`).
    Waiting,
    /// Running requests (`running-requests-size-scorer`).
    Running,
}

/// Min-max scorer over a request count.
pub struct QueueScorer {
    name: PluginName,
    signal: QueueSignal,
}

impl QueueScorer {
    /// A scorer named `name` over `signal`.
    pub fn new(name: PluginName, signal: QueueSignal) -> Self {
        Self { name, signal }
    }
}

impl Scorer for QueueScorer {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn score(&self, ctx: &SchedulingContext<'_>, _: &CycleState, candidates: &[EndpointId], out: &mut [f64]) {
        let value = |id: &EndpointId| {
            ctx.snapshot.get(*id).map_or(0, |e| match self.signal {
                QueueSignal::Waiting => e.metrics.waiting,
                QueueSignal::Running => e.metrics.running,
            })
        };
        let (min, max) = candidates
            .iter()
            .map(value)
            .fold((u32::MAX, 0), |(lo, hi), q| (lo.min(q), hi.max(q)));
        for (slot, id) in out.iter_mut().zip(candidates) {
            *slot = if max <= min {
                1.0
            } else {
                f64::from(max - value(id)) / f64::from(max - min)
            };
        }
    }
}
