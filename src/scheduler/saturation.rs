//! Saturation detectors: `utilization-detector` (default) and `concurrency-detector`.
//!
//! Each answers "how full is this set of endpoints" (≥ 1.0 = saturated, which sheds sheddable
//! requests) and can also serve as a filter that keeps the endpoints with headroom, failing open
//! (returning its input) when none has any, so saturation alone never turns into an error.
//! Stale or never-scraped metrics count as saturated for that endpoint: an endpoint we cannot see
//! is not assumed idle.

use std::time::Duration;

use rand::RngCore;
use serde::Deserialize;

use super::plugin::{CycleState, Filter, PluginName, SaturationDetector, SchedulingContext};
use crate::{
    clock::Timestamp,
    config::{ConfigIssue, PluginSpec, parse_duration},
    datastore::{Endpoint, EndpointId, Snapshot},
};

/// Raw parameters of `utilization-detector`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct UtilizationParams {
    /// Waiting-queue depth at which an endpoint is full.
    pub queue_depth_threshold: f64,
    /// KV utilization at which an endpoint is full.
    pub kv_cache_util_threshold: f64,
    /// Metrics older than this count as saturated (Go duration, e.g. `200ms`).
    pub metrics_staleness_threshold: String,
    /// Extra room allowed by the filter, as a fraction of each threshold.
    pub headroom: f64,
}

impl Default for UtilizationParams {
    fn default() -> Self {
        Self {
            queue_depth_threshold: 5.0,
            kv_cache_util_threshold: 0.8,
            metrics_staleness_threshold: "200ms".into(),
            headroom: 0.0,
        }
    }
}

/// Queue/KV utilization detector.
pub struct UtilizationDetector {
    name: PluginName,
    queue: f64,
    kv: f64,
    staleness: Duration,
    headroom: f64,
}

fn issue(spec: &PluginSpec, field: &str, reason: String) -> ConfigIssue {
    ConfigIssue {
        path: format!("{}.parameters.{field}", spec.path),
        reason,
    }
}

impl UtilizationDetector {
    /// Build from validated parameters.
    ///
    /// # Errors
    /// A threshold out of range (queue > 0, KV in (0, 1], staleness > 0, headroom ≥ 0).
    pub fn from_params(
        name: PluginName,
        p: &UtilizationParams,
        spec: &PluginSpec,
    ) -> Result<Self, ConfigIssue> {
        // Each rule keeps the saturation formula finite and meaningful.
        if p.queue_depth_threshold.is_nan() || p.queue_depth_threshold <= 0.0 {
            return Err(issue(spec, "queueDepthThreshold", "must be > 0".into()));
        }
        if !(0.0..=1.0).contains(&p.kv_cache_util_threshold) || p.kv_cache_util_threshold == 0.0 {
            return Err(issue(spec, "kvCacheUtilThreshold", "must be in (0, 1]".into()));
        }
        let staleness = parse_duration(&p.metrics_staleness_threshold)
            .map_err(|e| issue(spec, "metricsStalenessThreshold", e))?;
        if staleness.is_zero() {
            return Err(issue(spec, "metricsStalenessThreshold", "must be > 0".into()));
        }
        if p.headroom.is_nan() || p.headroom < 0.0 {
            return Err(issue(spec, "headroom", "must be >= 0".into()));
        }
        Ok(Self {
            name,
            queue: p.queue_depth_threshold,
            kv: p.kv_cache_util_threshold,
            staleness,
            headroom: p.headroom,
        })
    }

    /// The default detector (upstream defaults).
    pub fn default_detector() -> Self {
        Self {
            name: PluginName {
                kind: "utilization-detector",
                name: "utilization-detector".into(),
            },
            queue: 5.0,
            kv: 0.8,
            staleness: Duration::from_millis(200),
            headroom: 0.0,
        }
    }

    fn endpoint_saturation(&self, now: Timestamp, e: &Endpoint) -> f64 {
        if !e.is_fresh(now, self.staleness) {
            return 1.0;
        }
        let q = f64::from(e.metrics.waiting) / self.queue;
        let kv = e.metrics.kv_usage.map_or(0.0, |kv| kv / self.kv);
        q.max(kv)
    }
}

impl SaturationDetector for UtilizationDetector {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn saturation(&self, snapshot: &Snapshot, now: Timestamp, candidates: &[EndpointId]) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let sum: f64 = candidates
            .iter()
            .map(|id| {
                snapshot
                    .get(*id)
                    .map_or(1.0, |e| self.endpoint_saturation(now, e))
            })
            .sum();
        sum / candidates.len() as f64
    }
}

impl Filter for UtilizationDetector {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn filter(
        &self,
        ctx: &SchedulingContext<'_>,
        _: &CycleState,
        candidates: &mut Vec<EndpointId>,
        _: &mut dyn RngCore,
    ) {
        let (q_max, kv_max) = (
            self.queue * (1.0 + self.headroom),
            self.kv * (1.0 + self.headroom),
        );
        let has_room = |id: &EndpointId| {
            ctx.snapshot.get(*id).is_some_and(|e| {
                e.is_fresh(ctx.now, self.staleness)
                    && f64::from(e.metrics.waiting) < q_max
                    && e.metrics.kv_usage.is_none_or(|kv| kv < kv_max)
            })
        };
        if candidates.iter().any(has_room) {
            candidates.retain(has_room);
        }
    }
}

/// Raw parameters of `concurrency-detector`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ConcurrencyParams {
    /// `requests` or `tokens`.
    pub concurrency_mode: String,
    /// In-flight requests per endpoint at which it is full.
    pub max_concurrency: u64,
    /// In-flight tokens per endpoint at which it is full.
    pub max_token_concurrency: u64,
    /// Extra room allowed by the filter.
    pub headroom: f64,
}

impl Default for ConcurrencyParams {
    fn default() -> Self {
        Self {
            concurrency_mode: "requests".into(),
            max_concurrency: 100,
            max_token_concurrency: 1_000_000,
            headroom: 0.0,
        }
    }
}

/// In-flight concurrency detector (EPP-local counts, no scrape needed).
pub struct ConcurrencyDetector {
    name: PluginName,
    tokens: bool,
    capacity: f64,
    headroom: f64,
}

impl ConcurrencyDetector {
    /// Build from parameters.
    ///
    /// # Errors
    /// Unknown mode, zero capacity or negative headroom.
    pub fn from_params(
        name: PluginName,
        p: &ConcurrencyParams,
        spec: &PluginSpec,
    ) -> Result<Self, ConfigIssue> {
        let tokens = match p.concurrency_mode.as_str() {
            "requests" => false,
            "tokens" => true,
            other => {
                return Err(issue(
                    spec,
                    "concurrencyMode",
                    format!("expected requests or tokens, got {other:?}"),
                ));
            }
        };
        let capacity = if tokens {
            p.max_token_concurrency
        } else {
            p.max_concurrency
        };
        if capacity == 0 {
            let field = if tokens {
                "maxTokenConcurrency"
            } else {
                "maxConcurrency"
            };
            return Err(issue(spec, field, "must be > 0".into()));
        }
        if p.headroom.is_nan() || p.headroom < 0.0 {
            return Err(issue(spec, "headroom", "must be >= 0".into()));
        }
        Ok(Self {
            name,
            tokens,
            capacity: capacity as f64,
            headroom: p.headroom,
        })
    }

    fn load(&self, e: &Endpoint) -> f64 {
        if self.tokens {
            e.live.in_flight_tokens() as f64
        } else {
            f64::from(e.live.in_flight_requests())
        }
    }
}

impl SaturationDetector for ConcurrencyDetector {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn saturation(&self, snapshot: &Snapshot, _now: Timestamp, candidates: &[EndpointId]) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let load: f64 = candidates
            .iter()
            .filter_map(|id| snapshot.get(*id))
            .map(|e| self.load(e))
            .sum();
        load / (self.capacity * candidates.len() as f64)
    }
}

impl Filter for ConcurrencyDetector {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn filter(
        &self,
        ctx: &SchedulingContext<'_>,
        _: &CycleState,
        candidates: &mut Vec<EndpointId>,
        _: &mut dyn RngCore,
    ) {
        let limit = self.capacity * (1.0 + self.headroom);
        let has_room = |id: &EndpointId| ctx.snapshot.get(*id).is_some_and(|e| self.load(e) < limit);
        if candidates.iter().any(has_room) {
            candidates.retain(has_room);
        }
    }
}
