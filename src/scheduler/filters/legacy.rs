//! The v0.5-era filters still found in deployed configs: `low-queue-filter`,
//! `least-queue-filter`, `least-kv-cache-filter` and `lora-affinity-filter`.
//!
//! Queue counts are the scraped waiting gauge, as upstream.

use rand::{Rng, RngCore};
use serde::Deserialize;

use crate::{
    datastore::EndpointId,
    scheduler::{
        plugin::{CycleState, Filter, PluginName, SchedulingContext},
        scorers::neutral_mean,
    },
};

/// `low-queue-filter` parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LowQueueParams {
    /// Keep endpoints whose queue is at most this.
    pub threshold: u32,
}

impl Default for LowQueueParams {
    fn default() -> Self {
        Self { threshold: 128 }
    }
}

/// Keep `queue ≤ threshold`.
pub struct LowQueueFilter {
    name: PluginName,
    threshold: u32,
}

impl LowQueueFilter {
    /// A filter named `name`.
    pub fn new(name: PluginName, p: &LowQueueParams) -> Self {
        Self {
            name,
            threshold: p.threshold,
        }
    }
}

impl Filter for LowQueueFilter {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn filter(
        &self,
        ctx: &SchedulingContext<'_>,
        _: &CycleState,
        c: &mut Vec<EndpointId>,
        _: &mut dyn RngCore,
    ) {
        c.retain(|id| {
            ctx.snapshot
                .get(*id)
                .is_some_and(|e| e.metrics.waiting <= self.threshold)
        });
    }
}

/// Keep `q ≤ min + (max − min) / n` (integer division), as upstream.
pub struct LeastQueueFilter {
    name: PluginName,
}

impl LeastQueueFilter {
    /// A filter named `name`.
    pub fn new(name: PluginName) -> Self {
        Self { name }
    }
}

impl Filter for LeastQueueFilter {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn filter(
        &self,
        ctx: &SchedulingContext<'_>,
        _: &CycleState,
        c: &mut Vec<EndpointId>,
        _: &mut dyn RngCore,
    ) {
        if c.is_empty() {
            return;
        }
        let q = |id: &EndpointId| ctx.snapshot.get(*id).map_or(u32::MAX, |e| e.metrics.waiting);
        let min = c.iter().map(q).min().unwrap_or(0);
        let max = c.iter().map(q).max().unwrap_or(0);
        let limit = min + (max - min) / c.len() as u32;
        c.retain(|id| q(id) <= limit);
    }
}

/// Keep `kv ≤ min + (max − min) / n` (float division).
///
/// An endpoint whose engine reports no KV utilization (llama.cpp, an old vLLM page) is *unknown*,
/// neither empty nor full: it is judged as the mean of the candidates that do report, the same
/// neutral value the `kv-cache-utilization-scorer` gives it. When no candidate reports KV the
/// filter has nothing to compare and keeps them all.
pub struct LeastKvCacheFilter {
    name: PluginName,
}

impl LeastKvCacheFilter {
    /// A filter named `name`.
    pub fn new(name: PluginName) -> Self {
        Self { name }
    }
}

impl Filter for LeastKvCacheFilter {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn filter(
        &self,
        ctx: &SchedulingContext<'_>,
        _: &CycleState,
        c: &mut Vec<EndpointId>,
        _: &mut dyn RngCore,
    ) {
        let known = |id: &EndpointId| ctx.snapshot.get(*id).and_then(|e| e.metrics.kv_usage);
        let Some(neutral) = neutral_mean(c.iter().filter_map(known)) else {
            return;
        };
        let kv = |id: &EndpointId| known(id).unwrap_or(neutral);
        let min = c.iter().map(kv).fold(f64::INFINITY, f64::min);
        let max = c.iter().map(kv).fold(f64::NEG_INFINITY, f64::max);
        let limit = min + (max - min) / c.len() as f64;
        c.retain(|id| kv(id) <= limit);
    }
}

/// `lora-affinity-filter` parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraAffinityParams {
    /// Probability of choosing the affinity set when both sets are non-empty.
    pub threshold: f64,
}

impl Default for LoraAffinityParams {
    fn default() -> Self {
        Self { threshold: 0.999 }
    }
}

/// Prefer endpoints with the adapter running or waiting; else those with a free slot.
pub struct LoraAffinityFilter {
    name: PluginName,
    threshold: f64,
}

impl LoraAffinityFilter {
    /// A filter named `name`.
    pub fn new(name: PluginName, p: &LoraAffinityParams) -> Self {
        Self {
            name,
            threshold: p.threshold,
        }
    }
}

impl Filter for LoraAffinityFilter {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn filter(
        &self,
        ctx: &SchedulingContext<'_>,
        _: &CycleState,
        c: &mut Vec<EndpointId>,
        rng: &mut dyn RngCore,
    ) {
        let adapter = ctx.target_model;
        let affinity = |id: &EndpointId| {
            ctx.snapshot
                .get(*id)
                .and_then(|e| e.metrics.lora.as_ref())
                .is_some_and(|l| l.is_running(adapter) || l.is_waiting(adapter))
        };
        let available = |id: &EndpointId| {
            !affinity(id)
                && ctx
                    .snapshot
                    .get(*id)
                    .and_then(|e| e.metrics.lora.as_ref())
                    .is_some_and(|l| ((l.running.len() + l.waiting.len()) as u64) < u64::from(l.max_active))
        };
        let has_affinity = c.iter().any(affinity);
        let has_available = c.iter().any(available);
        let keep_affinity = match (has_affinity, has_available) {
            (true, true) => rng.random::<f64>() < self.threshold,
            (true, false) => true,
            (false, true) => false,
            (false, false) => {
                c.clear();
                return;
            }
        };
        if keep_affinity {
            c.retain(affinity);
        } else {
            c.retain(available);
        }
    }
}
