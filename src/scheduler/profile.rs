//! A scheduling profile: filters in order, weighted scorers, one picker.

use std::sync::Arc;

use rand::RngCore;

use super::plugin::{
    CycleState, ExtensionPoint, Filter, Picker, PluginTimer, SchedulingContext, ScoredEndpoint, Scorer,
};
use crate::datastore::EndpointId;

/// A scorer with its weight.
pub struct WeightedScorer {
    /// The scorer.
    pub scorer: Arc<dyn Scorer>,
    /// Multiplier of its [0, 1] score (not normalised across scorers, as upstream).
    pub weight: f64,
}

/// Why a profile produced no endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// A filter removed every candidate.
    #[error("no endpoints available for the given request (filtered out by {filtered_by})")]
    AllFiltered {
        /// The filter's instance name.
        filtered_by: Arc<str>,
    },
    /// The picker chose nothing.
    #[error("picker {picker} returned no endpoint")]
    NothingPicked {
        /// The picker's instance name.
        picker: Arc<str>,
    },
}

/// Reusable per-request buffers, so a cycle allocates nothing once warmed up. Set `explain` to
/// `Some(Explanation::default())` before a cycle to have it record why the winner won.
#[derive(Default)]
pub struct Scratch {
    totals: Vec<f64>,
    single: Vec<f64>,
    scored: Vec<ScoredEndpoint>,
    /// Filled during the cycle when set.
    pub explain: Option<Explanation>,
}

/// Why a cycle picked what it picked: candidates removed by each filter, and each scorer's
/// weighted contribution for the winner and the runner-up.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Explanation {
    /// `(filter, candidates before, candidates after)`, in order.
    pub filters: Vec<(Arc<str>, usize, usize)>,
    /// Scorer names, in order.
    pub scorers: Vec<Arc<str>>,
    /// Weighted contributions per candidate (row per scorer); only kept while explaining.
    contributions: Vec<Vec<f64>>,
    candidates: Vec<EndpointId>,
    /// `(endpoint, total, per-scorer weighted scores)` of the winner, then the runner-up.
    pub ranking: Vec<(EndpointId, f64, Vec<f64>)>,
}

impl Explanation {
    /// One line, e.g. `filter utilization-detector 3->2; winner 10.0.0.1:8000 total=4.200
    /// (queue-scorer=2.000 kv-cache-utilization-scorer=2.200); runner-up ...`.
    pub fn render(&self, address: impl Fn(EndpointId) -> String) -> String {
        let mut parts: Vec<String> = self
            .filters
            .iter()
            .map(|(name, before, after)| format!("filter {name} {before}->{after}"))
            .collect();
        for (i, (id, total, scores)) in self.ranking.iter().enumerate() {
            let detail: Vec<String> = self
                .scorers
                .iter()
                .zip(scores)
                .map(|(n, v)| format!("{n}={v:.3}"))
                .collect();
            let role = if i == 0 { "winner" } else { "runner-up" };
            parts.push(format!(
                "{role} {} total={total:.3} ({})",
                address(*id),
                detail.join(" ")
            ));
        }
        parts.join("; ")
    }
}

/// One configured profile.
pub struct Profile {
    /// Profile name.
    pub name: Arc<str>,
    /// Filters, run in order.
    pub filters: Vec<Arc<dyn Filter>>,
    /// Weighted scorers.
    pub scorers: Vec<WeightedScorer>,
    /// The picker.
    pub picker: Arc<dyn Picker>,
}

/// Counts of scores the framework had to repair, reported by [`Profile::run`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScoreRepairs {
    /// Non-finite scores replaced by 0.
    pub non_finite: u32,
    /// Scores clamped into [0, 1].
    pub clamped: u32,
}

impl Profile {
    /// Filter, score and pick. `candidates` is filtered in place; the chosen endpoints (best
    /// first) are pushed to `picked`.
    ///
    /// # Errors
    /// [`ProfileError`] when filters leave nothing or the picker picks nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        ctx: &SchedulingContext<'_>,
        state: &CycleState,
        candidates: &mut Vec<EndpointId>,
        scratch: &mut Scratch,
        rng: &mut dyn RngCore,
        timer: Option<&dyn PluginTimer>,
        picked: &mut Vec<EndpointId>,
    ) -> Result<ScoreRepairs, ProfileError> {
        for filter in &self.filters {
            let started = timer.map(|t| t.start());
            let before = candidates.len();
            filter.filter(ctx, state, candidates, rng);
            if let Some(e) = scratch.explain.as_mut() {
                e.filters
                    .push((filter.name().name.clone(), before, candidates.len()));
            }
            if let (Some(t), Some(s)) = (timer, started) {
                t.record(ExtensionPoint::Filter, filter.name(), s);
            }
            if candidates.is_empty() {
                return Err(ProfileError::AllFiltered {
                    filtered_by: filter.name().name.clone(),
                });
            }
        }

        let n = candidates.len();
        scratch.totals.clear();
        scratch.totals.resize(n, 0.0);
        let mut repairs = ScoreRepairs::default();
        if let Some(e) = scratch.explain.as_mut() {
            e.scorers = self
                .scorers
                .iter()
                .map(|s| s.scorer.name().name.clone())
                .collect();
            e.contributions.clear();
            e.candidates = candidates.clone();
        }
        for ws in &self.scorers {
            scratch.single.clear();
            scratch.single.resize(n, 0.0);
            let started = timer.map(|t| t.start());
            ws.scorer.score(ctx, state, candidates, &mut scratch.single);
            if let (Some(t), Some(s)) = (timer, started) {
                t.record(ExtensionPoint::Scorer, ws.scorer.name(), s);
            }
            for (total, raw) in scratch.totals.iter_mut().zip(&scratch.single) {
                let v = if !raw.is_finite() {
                    repairs.non_finite += 1;
                    0.0
                } else if !(0.0..=1.0).contains(raw) {
                    repairs.clamped += 1;
                    raw.clamp(0.0, 1.0)
                } else {
                    *raw
                };
                *total += v * ws.weight;
            }
            if let Some(e) = scratch.explain.as_mut() {
                let row = scratch.single.iter().map(|raw| {
                    let v = if raw.is_finite() { raw.clamp(0.0, 1.0) } else { 0.0 };
                    v * ws.weight
                });
                e.contributions.push(row.collect());
            }
        }

        scratch.scored.clear();
        scratch.scored.extend(
            candidates
                .iter()
                .zip(&scratch.totals)
                .map(|(id, score)| ScoredEndpoint {
                    id: *id,
                    score: *score,
                }),
        );
        let started = timer.map(|t| t.start());
        self.picker.pick(&mut scratch.scored, rng, picked);
        if let (Some(t), Some(s)) = (timer, started) {
            t.record(ExtensionPoint::Picker, self.picker.name(), s);
        }
        if picked.is_empty() {
            return Err(ProfileError::NothingPicked {
                picker: self.picker.name().name.clone(),
            });
        }
        if let Some(e) = scratch.explain.as_mut() {
            let row_of = |id: EndpointId| e.candidates.iter().position(|c| *c == id);
            let mut ranked: Vec<usize> = (0..e.candidates.len()).collect();
            ranked.sort_by(|a, b| scratch.totals[*b].total_cmp(&scratch.totals[*a]));
            let winner = row_of(picked[0]);
            let runner_up = ranked.into_iter().find(|r| Some(*r) != winner);
            e.ranking = [winner, runner_up]
                .into_iter()
                .flatten()
                .map(|r| {
                    (
                        e.candidates[r],
                        scratch.totals[r],
                        e.contributions.iter().map(|c| c[r]).collect(),
                    )
                })
                .collect();
            e.contributions.clear();
        }
        Ok(repairs)
    }
}
