//! Built-in pickers: `max-score-picker` (random tie-break) and `random-picker`.

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

#[cfg(test)]
mod tests {
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
