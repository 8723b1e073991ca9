//! The saturation gate: the last admission stage, always present.
//!
//! A request with no candidate left (empty pool, a subset hint matching none) is refused here,
//! before the detector is asked. A sheddable request (priority < 0) is refused when the
//! configured detector finds its candidates saturated (≥ 1.0); everything else is admitted:
//! without flow control there is no queue in the EPP (upstream's behaviour with the
//! `flowControl` gate off).

use std::sync::Arc;

use super::{Admission, AdmissionStage, AdmitFuture, Refusal};
use crate::scheduler::{PluginName, SchedulingContext, SchedulingError, plugin::SaturationDetector};

/// The gate's name in timers and logs (not a config type: the gate is always there).
pub const SATURATION_GATE: &str = "saturation-gate";

/// Refuses sheddable requests on a saturated pool.
pub struct SaturationGate {
    name: PluginName,
    detector: Arc<dyn SaturationDetector>,
}

impl SaturationGate {
    /// The gate over `detector`.
    pub fn new(detector: Arc<dyn SaturationDetector>) -> Self {
        Self {
            name: PluginName {
                kind: SATURATION_GATE,
                name: SATURATION_GATE.into(),
            },
            detector,
        }
    }

    fn run(&self, cx: &Admission<'_>) -> Result<(), Refusal> {
        if cx.candidates.is_empty() {
            return Err(Refusal::NoCandidates);
        }
        let ctx = SchedulingContext {
            snapshot: cx.snapshot,
            request: &cx.request,
            body: &cx.body,
            target_model: &cx.target_model,
            now: cx.now,
            priority: cx.priority,
        };
        shed_when_saturated(&*self.detector, &ctx, &cx.candidates).map_err(Refusal::Scheduling)
    }
}

/// Refuse a sheddable request (priority < 0) whose `candidates` `detector` finds saturated; the
/// detector is asked only for sheddable requests.
///
/// # Errors
/// [`SchedulingError::Saturated`].
pub fn shed_when_saturated(
    detector: &dyn SaturationDetector,
    ctx: &SchedulingContext<'_>,
    candidates: &[crate::datastore::EndpointId],
) -> Result<(), SchedulingError> {
    if ctx.priority < 0 && detector.saturation(ctx.snapshot, ctx.now, candidates) >= 1.0 {
        return Err(SchedulingError::Saturated);
    }
    Ok(())
}

impl AdmissionStage for SaturationGate {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn admit<'s, 'c: 's>(&'s self, cx: &'s mut Admission<'c>) -> AdmitFuture<'s> {
        Box::pin(std::future::ready(self.run(cx)))
    }
}
