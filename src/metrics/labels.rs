//! Bounded label values: every label value that comes from a request (the requested model, the
//! model it is served as) goes through [`ModelLabels`] before it names a series.
//!
//! Why: a label value is a new set of series (about 140 per model pair: counters, the running
//! gauge, eight histograms), and a request's `model` or rewrite header is whatever the client
//! sends. Unbounded, one request with a 1 MiB model name made `/metrics` 291 MB.
//!
//! Rules (the invariant this module keeps):
//! - a value longer than [`MAX_LABEL_BYTES`] is never used: it becomes [`OTHER`];
//! - a `(model, target)` pair is used as it is when both are names the configuration knows
//!   (budget models and fallbacks), or while fewer than [`MAX_MODEL_PAIRS`] other pairs are in
//!   use; every other pair is counted as `(other, other)`;
//! - a pair not used for [`IDLE_AFTER`] and with no request running is dropped, with its series
//!   ([`EppMetrics::drop_idle_labels`](super::exported::EppMetrics::drop_idle_labels)), which
//!   frees its place.
//!
//! So the model-labelled series are bounded by (known pairs + 64 + 1) × ~140 whatever the
//! traffic. Tenant labels are bounded by the budget itself (configured names or `default`).

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use parking_lot::Mutex;

/// The value that stands for every label value not admitted.
pub const OTHER: &str = "other";
/// The longest label value used (longer ones are [`OTHER`]); model names in use are far shorter.
pub const MAX_LABEL_BYTES: usize = 128;
/// Pairs of names the configuration does not know that are labelled as they are, at most.
pub const MAX_MODEL_PAIRS: usize = 64;
/// A pair unused for this long (and with no request running) is dropped with its series.
pub const IDLE_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
struct PairUse {
    last_used: Instant,
    running: u32,
}

/// The label values of model pairs, bounded.
#[derive(Debug, Default)]
pub struct ModelLabels {
    known: HashSet<String>,
    pairs: Mutex<HashMap<(String, String), PairUse>>,
}

/// A pair of label values as admitted: borrowed from the request, or [`OTHER`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPair<'a> {
    /// `model_name`.
    pub model: Cow<'a, str>,
    /// `target_model_name`.
    pub target: Cow<'a, str>,
}

impl ModelLabels {
    /// Labels that always admit the names in `known` (configured models).
    pub fn new(known: impl IntoIterator<Item = String>) -> Self {
        Self {
            known: known.into_iter().filter(|k| k.len() <= MAX_LABEL_BYTES).collect(),
            pairs: Mutex::default(),
        }
    }

    /// The labels of `(model, target)`, noting a use at `now`; `running` counts a request that
    /// starts now (released with [`release`](Self::release)).
    pub fn pair<'a>(&self, model: &'a str, target: &'a str, now: Instant, running: bool) -> ModelPair<'a> {
        let other = ModelPair {
            model: Cow::Borrowed(OTHER),
            target: Cow::Borrowed(OTHER),
        };
        // `other` itself is reserved: a client naming its model `other` is counted with the
        // folded values, never as a pair of its own.
        if model.len() > MAX_LABEL_BYTES
            || target.len() > MAX_LABEL_BYTES
            || model == OTHER
            || target == OTHER
        {
            return other;
        }
        if self.known.contains(model) && self.known.contains(target) {
            return ModelPair {
                model: Cow::Borrowed(model),
                target: Cow::Borrowed(target),
            };
        }
        let mut pairs = self.pairs.lock();
        let key = (model.to_owned(), target.to_owned());
        let full = pairs.len() >= MAX_MODEL_PAIRS;
        match pairs.get_mut(&key) {
            Some(u) => {
                u.last_used = now;
                u.running += u32::from(running);
            }
            None if full => return other,
            None => {
                pairs.insert(
                    key,
                    PairUse {
                        last_used: now,
                        running: u32::from(running),
                    },
                );
            }
        }
        ModelPair {
            model: Cow::Borrowed(model),
            target: Cow::Borrowed(target),
        }
    }

    /// A request counted by [`pair`](Self::pair) with `running` ended.
    pub fn release(&self, model: &str, target: &str, now: Instant) {
        if let Some(u) = self.pairs.lock().get_mut(&(model.to_owned(), target.to_owned())) {
            u.running = u.running.saturating_sub(1);
            u.last_used = now;
        }
    }

    /// The label of a single model value (a metric labelled by model alone): admitted when the
    /// configuration knows it or an admitted pair holds it.
    pub fn model<'a>(&self, model: &'a str) -> Cow<'a, str> {
        if model.len() <= MAX_LABEL_BYTES
            && (self.known.contains(model) || self.pairs.lock().keys().any(|(m, t)| m == model || t == model))
        {
            Cow::Borrowed(model)
        } else {
            Cow::Borrowed(OTHER)
        }
    }

    /// Forget the pairs idle since before `now − IDLE_AFTER` with nothing running, and call
    /// `remove` with them and the values no pair admits any more, while no request can take
    /// them up again (the pairs stay locked), so their series go before anyone counts on them.
    pub fn drop_idle(&self, now: Instant, remove: impl FnOnce(&[(String, String)], &[&str])) {
        let mut pairs = self.pairs.lock();
        let idle: Vec<(String, String)> = pairs
            .iter()
            .filter(|(_, u)| u.running == 0 && now.saturating_duration_since(u.last_used) >= IDLE_AFTER)
            .map(|(k, _)| k.clone())
            .collect();
        if idle.is_empty() {
            return;
        }
        for k in &idle {
            pairs.remove(k);
        }
        let mut gone: Vec<&str> = idle
            .iter()
            .flat_map(|(m, t)| [m.as_str(), t.as_str()])
            .filter(|v| !self.known.contains(*v) && !pairs.keys().any(|(m, t)| m == v || t == v))
            .collect();
        gone.sort_unstable();
        gone.dedup();
        remove(&idle, &gone);
    }

    /// Pairs admitted now (not counting known ones).
    pub fn admitted(&self) -> usize {
        self.pairs.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_and_surplus_values_fold_into_other_and_idle_pairs_free_their_place() {
        let labels = ModelLabels::new(["gpt-4o".to_owned(), "llama".to_owned()]);
        let t0 = Instant::now();
        let long = "m".repeat(MAX_LABEL_BYTES + 1);
        assert_eq!(labels.pair(&long, "llama", t0, false).model, OTHER);
        assert_eq!(labels.model(&long), OTHER);
        // Known pairs never take a place.
        assert_eq!(labels.pair("gpt-4o", "llama", t0, false).target, "llama");
        assert_eq!(labels.admitted(), 0);
        let names: Vec<String> = (0..MAX_MODEL_PAIRS + 10).map(|i| format!("m{i}")).collect();
        for (i, n) in names.iter().enumerate() {
            let p = labels.pair(n, n, t0, i == 0);
            let want = if i < MAX_MODEL_PAIRS { n.as_str() } else { OTHER };
            assert_eq!(p.model, want, "{n}");
        }
        assert_eq!(labels.admitted(), MAX_MODEL_PAIRS);
        assert_eq!(labels.model("m3"), "m3");
        assert_eq!(labels.model("m70"), OTHER);
        // Idle pairs go, except one with a request running.
        let later = t0 + IDLE_AFTER;
        let mut dropped = Vec::new();
        labels.drop_idle(later, |idle, gone| {
            dropped = idle.to_vec();
            assert_eq!(gone.len(), MAX_MODEL_PAIRS - 1, "each value was in one pair");
        });
        assert_eq!(dropped.len(), MAX_MODEL_PAIRS - 1);
        assert!(!dropped.contains(&("m0".to_owned(), "m0".to_owned())));
        assert_eq!(labels.pair("m70", "m70", later, false).model, "m70");
        labels.release("m0", "m0", later);
        let mut count = 0;
        labels.drop_idle(later + IDLE_AFTER, |idle, _| count = idle.len());
        assert_eq!(count, 2);
        assert_eq!(labels.admitted(), 0);
        // A client's model named `other` is folded, never a pair of its own.
        assert_eq!(labels.pair(OTHER, "x", later, true).target, OTHER);
        assert_eq!(labels.admitted(), 0);
    }
}
