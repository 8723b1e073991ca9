//! `lora-affinity-scorer`: prefer endpoints that already serve the request's adapter.
//!
//! For the target model: 1.0 when the adapter is running; else 0.8 when the endpoint has a free
//! adapter slot (`running + waiting < max`); else 0.6 when the adapter is waiting; else 0. The
//! capacity test comes before the waiting test, as upstream. An endpoint that reports no LoRA
//! state has no adapters and no free slots.

use crate::{
    datastore::EndpointId,
    datastore::LoraState,
    scheduler::plugin::{CycleState, PluginName, SchedulingContext, Scorer},
};

/// LoRA affinity scorer.
pub struct LoraAffinityScorer {
    name: PluginName,
}

impl LoraAffinityScorer {
    /// A scorer named `name`.
    pub fn new(name: PluginName) -> Self {
        Self { name }
    }
}

/// The upstream affinity value of `lora` for `adapter`.
pub fn lora_affinity(lora: Option<&LoraState>, adapter: &str) -> f64 {
    let Some(l) = lora else { return 0.0 };
    if l.is_running(adapter) {
        1.0
    } else if ((l.running.len() + l.waiting.len()) as u64) < u64::from(l.max_active) {
        0.8
    } else if l.is_waiting(adapter) {
        0.6
    } else {
        0.0
    }
}

impl Scorer for LoraAffinityScorer {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn score(&self, ctx: &SchedulingContext<'_>, _: &CycleState, candidates: &[EndpointId], out: &mut [f64]) {
        for (slot, id) in out.iter_mut().zip(candidates) {
            *slot = ctx
                .snapshot
                .get(*id)
                .map_or(0.0, |e| lora_affinity(e.metrics.lora.as_ref(), ctx.target_model));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn l(running: &[&str], waiting: &[&str], max: u32) -> LoraState {
        LoraState {
            running: running.iter().map(|s| Arc::from(*s)).collect(),
            waiting: waiting.iter().map(|s| Arc::from(*s)).collect(),
            max_active: max,
        }
    }

    #[test]
    fn upstream_vectors() {
        let cases: [(&[&str], &[&str], u32, f64); 8] = [
            (&["m1"], &[], 5, 1.0),
            (&["m2"], &["m1"], 2, 0.6),
            (&["m2"], &["m3"], 2, 0.0),
            (&[], &[], 0, 0.0),
            (&["m2"], &["m1"], 5, 0.8),
            (&["m2"], &[], 2, 0.8),
            (&["m3"], &["m1"], 2, 0.6),
            (&["m4", "m5"], &[], 2, 0.0),
        ];
        for (running, waiting, max, want) in cases {
            assert_eq!(
                lora_affinity(Some(&l(running, waiting, max)), "m1"),
                want,
                "{running:?} {waiting:?} {max}"
            );
        }
        assert_eq!(lora_affinity(None, "m1"), 0.0);
    }
}
