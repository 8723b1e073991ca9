//! Built-in pickers: `max-score-picker` (random tie-break), `random-picker`,
//! `weighted-random-picker`, and `round-robin-picker` (ours: a baseline, not an upstream plugin).

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::{RngCore, seq::SliceRandom};
use serde::Deserialize;

use crate::{
    datastore::EndpointId,
    scheduler::plugin::{Picker, PluginName, ScoredEndpoint},
};

/// Parameters shared by the pickers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PickerParams {
    /// How many endpoints to return (primary first, then fallbacks); values ≤ 0 mean 1.
    pub max_num_of_endpoints: i64,
}

impl Default for PickerParams {
    fn default() -> Self {
        Self {
            max_num_of_endpoints: 1,
        }
    }
}

impl PickerParams {
    fn count(&self) -> usize {
        usize::try_from(self.max_num_of_endpoints).unwrap_or(1).max(1)
    }
}

/// Highest total score wins; equal scores are broken uniformly at random.
pub struct MaxScorePicker {
    name: PluginName,
    count: usize,
}

impl MaxScorePicker {
    /// A picker returning up to `params.maxNumOfEndpoints` endpoints.
    pub fn new(name: PluginName, params: &PickerParams) -> Self {
        Self {
            name,
            count: params.count(),
        }
    }
}

impl Picker for MaxScorePicker {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn pick(&self, scored: &mut [ScoredEndpoint], rng: &mut dyn RngCore, out: &mut Vec<EndpointId>) {
        // Shuffle, then a stable sort: ties keep their random order.
        scored.shuffle(rng);
        scored.sort_by(|a, b| b.score.total_cmp(&a.score));
        out.extend(scored.iter().take(self.count).map(|s| s.id));
    }
}

/// Uniformly random endpoints, ignoring scores.
pub struct RandomPicker {
    name: PluginName,
    count: usize,
}

impl RandomPicker {
    /// A picker returning up to `params.maxNumOfEndpoints` endpoints.
    pub fn new(name: PluginName, params: &PickerParams) -> Self {
        Self {
            name,
            count: params.count(),
        }
    }
}

impl Picker for RandomPicker {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn pick(&self, scored: &mut [ScoredEndpoint], rng: &mut dyn RngCore, out: &mut Vec<EndpointId>) {
        scored.shuffle(rng);
        out.extend(scored.iter().take(self.count).map(|s| s.id));
    }
}

/// Candidates in turn, ignoring scores: the n-th request goes to candidate `n mod len` in
/// endpoint order. A baseline for comparisons; upstream has no such picker.
pub struct RoundRobinPicker {
    name: PluginName,
    count: usize,
    next: AtomicUsize,
}

impl RoundRobinPicker {
    /// A picker returning up to `params.maxNumOfEndpoints` consecutive endpoints.
    pub fn new(name: PluginName, params: &PickerParams) -> Self {
        Self {
            name,
            count: params.count(),
            next: AtomicUsize::new(0),
        }
    }
}

impl Picker for RoundRobinPicker {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn pick(&self, scored: &mut [ScoredEndpoint], _rng: &mut dyn RngCore, out: &mut Vec<EndpointId>) {
        if scored.is_empty() {
            return;
        }
        scored.sort_by_key(|s| s.id);
        let start = self.next.fetch_add(1, Ordering::Relaxed) % scored.len();
        let n = self.count.min(scored.len());
        out.extend((0..n).map(|k| scored[(start + k) % scored.len()].id));
    }
}

/// Random endpoints with probability proportional to their score (A-Res weighted sampling without
/// replacement: key `U^(1/score)`, highest keys win). Scores ≤ 0 are never chosen unless every
/// score is ≤ 0, in which case this behaves as `random-picker`.
pub struct WeightedRandomPicker {
    name: PluginName,
    count: usize,
}

impl WeightedRandomPicker {
    /// A picker returning up to `params.maxNumOfEndpoints` endpoints.
    pub fn new(name: PluginName, params: &PickerParams) -> Self {
        Self {
            name,
            count: params.count(),
        }
    }
}

impl Picker for WeightedRandomPicker {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn pick(&self, scored: &mut [ScoredEndpoint], rng: &mut dyn RngCore, out: &mut Vec<EndpointId>) {
        if scored.iter().all(|s| s.score <= 0.0) {
            scored.shuffle(rng);
            out.extend(scored.iter().take(self.count).map(|s| s.id));
            return;
        }
        // Reuse the score slot for the key: the caller does not read scores after picking.
        for s in scored.iter_mut() {
            s.score = if s.score > 0.0 {
                let u: f64 = rand::Rng::random::<f64>(rng).max(1e-10);
                u.powf(1.0 / s.score)
            } else {
                0.0
            };
        }
        scored.sort_by(|a, b| b.score.total_cmp(&a.score));
        out.extend(
            scored
                .iter()
                .filter(|s| s.score > 0.0)
                .take(self.count)
                .map(|s| s.id),
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_robin_takes_candidates_in_turn() {
        use rand::SeedableRng;
        let picker = RoundRobinPicker::new(
            PluginName {
                kind: "round-robin-picker",
                name: "rr".into(),
            },
            &PickerParams::default(),
        );
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let picks: Vec<u32> = (0..5)
            .map(|_| {
                let mut scored: Vec<ScoredEndpoint> = [2, 0, 1]
                    .into_iter()
                    .map(|i| ScoredEndpoint {
                        id: EndpointId(i),
                        score: f64::from(i),
                    })
                    .collect();
                let mut out = Vec::new();
                picker.pick(&mut scored, &mut rng, &mut out);
                out[0].0
            })
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1]);
    }

    use rand::{SeedableRng, rngs::SmallRng};

    use super::*;

    fn name() -> PluginName {
        PluginName {
            kind: "max-score-picker",
            name: "p".into(),
        }
    }

    fn scored(v: &[f64]) -> Vec<ScoredEndpoint> {
        v.iter()
            .enumerate()
            .map(|(i, s)| ScoredEndpoint {
                id: EndpointId(i as u32),
                score: *s,
            })
            .collect()
    }

    #[test]
    fn max_score_orders_best_first_and_breaks_ties_randomly() {
        let p = MaxScorePicker::new(
            name(),
            &PickerParams {
                max_num_of_endpoints: 2,
            },
        );
        let mut rng = SmallRng::seed_from_u64(1);
        let mut out = Vec::new();
        p.pick(&mut scored(&[0.5, 2.0, 1.0]), &mut rng, &mut out);
        assert_eq!(out, vec![EndpointId(1), EndpointId(2)]);

        let single = MaxScorePicker::new(name(), &PickerParams::default());
        let mut seen = [0u32; 3];
        for _ in 0..300 {
            out.clear();
            single.pick(&mut scored(&[1.0, 1.0, 0.0]), &mut rng, &mut out);
            seen[out[0].index()] += 1;
        }
        assert!(seen[0] > 100 && seen[1] > 100 && seen[2] == 0, "{seen:?}");
    }

    #[test]
    fn max_score_upstream_vectors() {
        let mut rng = SmallRng::seed_from_u64(5);
        let run = |v: &[f64], n: i64, rng: &mut SmallRng| {
            let p = MaxScorePicker::new(
                name(),
                &PickerParams {
                    max_num_of_endpoints: n,
                },
            );
            let mut s = scored(v);
            let mut out = Vec::new();
            p.pick(&mut s, rng, &mut out);
            out.iter().map(|id| v[id.index()]).collect::<Vec<f64>>()
        };
        assert_eq!(run(&[10.0, 25.0, 15.0], 1, &mut rng), vec![25.0]);
        assert_eq!(run(&[50.0, 50.0, 30.0], 2, &mut rng), vec![50.0, 50.0]);
        assert_eq!(run(&[20.0, 25.0, 30.0], 2, &mut rng), vec![30.0, 25.0]);
        assert_eq!(run(&[20.0, 25.0, 30.0], 4, &mut rng), vec![30.0, 25.0, 20.0]);
        assert_eq!(run(&[30.0, 25.0, 30.0], 3, &mut rng), vec![30.0, 30.0, 25.0]);
    }

    #[test]
    fn weighted_random_follows_score_shares_within_five_percent() {
        let p = WeightedRandomPicker::new(name(), &PickerParams::default());
        let mut rng = SmallRng::seed_from_u64(11);
        for weights in [
            vec![10.0, 90.0],
            vec![100.0, 100.0, 100.0],
            vec![30.0, 0.0],
            vec![100.0, 90.0, 50.0, 30.0, 20.0],
        ] {
            let mut counts = vec![0usize; weights.len()];
            for _ in 0..10_000 {
                let mut out = Vec::new();
                p.pick(&mut scored(&weights), &mut rng, &mut out);
                counts[out[0].index()] += 1;
            }
            let total: f64 = weights.iter().sum();
            for (i, w) in weights.iter().enumerate() {
                let share = counts[i] as f64 / 10_000.0;
                assert!(
                    (share - w / total).abs() <= 0.05,
                    "{weights:?}: endpoint {i} got {share}"
                );
            }
            if weights[1] == 0.0 {
                assert_eq!(counts[1], 0, "a zero score is never chosen");
            }
        }
    }

    #[test]
    fn random_picker_returns_only_candidates() {
        let p = RandomPicker::new(
            name(),
            &PickerParams {
                max_num_of_endpoints: 5,
            },
        );
        let mut rng = SmallRng::seed_from_u64(2);
        let mut out = Vec::new();
        p.pick(&mut scored(&[0.0, 0.0]), &mut rng, &mut out);
        out.sort();
        assert_eq!(out, vec![EndpointId(0), EndpointId(1)]);
    }
}
