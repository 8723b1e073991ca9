//! The EPP's own Prometheus metrics (registry, vectors and the pool-gauge refresher).

use std::{collections::HashMap, time::Instant};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
    core::{Collector, MetricVec, MetricVecBuilder},
    proto::LabelPair,
};

use super::{
    labels::ModelLabels,
    names::{self, *},
};
use crate::{clock::Timestamp, datastore::Snapshot};

/// Every metric the EPP exports, registered in one registry.
pub struct EppMetrics {
    registry: Registry,
    /// `inference_objective_request_total{model_name,target_model_name,priority}`.
    pub request_total: IntCounterVec,
    /// `inference_objective_request_error_total{model_name,target_model_name,error_code}`.
    pub request_error_total: IntCounterVec,
    /// Request duration.
    pub request_duration: HistogramVec,
    /// Request sizes.
    pub request_sizes: HistogramVec,
    /// Response sizes.
    pub response_sizes: HistogramVec,
    /// Input tokens.
    pub input_tokens: HistogramVec,
    /// Output tokens.
    pub output_tokens: HistogramVec,
    /// Cached prompt tokens.
    pub prompt_cached_tokens: HistogramVec,
    /// Normalized TPOT.
    pub normalized_tpot: HistogramVec,
    /// Running requests per model.
    pub running_requests: IntGaugeVec,
    /// Pool gauges.
    pub pool_ready_pods: IntGaugeVec,
    /// Pool mean KV.
    pub pool_avg_kv: GaugeVec,
    /// Pool mean queue.
    pub pool_avg_queue: GaugeVec,
    /// Pool mean running.
    pub pool_avg_running: GaugeVec,
    /// Queue per endpoint.
    pub pool_per_pod_queue: GaugeVec,
    /// Scheduler cycle.
    pub scheduler_e2e: Histogram,
    /// Last request-body message in → routing answer handed to the stream.
    pub request_decision: Histogram,
    /// Scheduling attempts.
    pub scheduler_attempts: IntCounterVec,
    /// Per-plugin duration.
    pub plugin_duration: HistogramVec,
    /// Scrape failures by reason.
    pub scrape_errors: IntCounterVec,
    /// Scrape durations.
    pub scrape_duration: Histogram,
    /// Prefix index entries.
    pub prefix_indexer_size: prometheus::IntGauge,
    /// Prefix index heap bytes.
    pub prefix_indexer_bytes: prometheus::IntGauge,
    /// Tasks alive in the async runtime, set when the page is rendered.
    pub runtime_alive_tasks: prometheus::IntGauge,
    /// Cached prompt tokens predicted by the prefix index, in the servers' count.
    pub prefix_cache_predicted: prometheus::IntCounter,
    /// Cached prompt tokens reported by the servers.
    pub prefix_cache_reported: prometheus::IntCounter,
    /// Predicted cached tokens the servers did not find.
    pub prefix_cache_overpredicted: prometheus::IntCounter,
    /// Index entries forgotten on cache misses.
    pub prefix_indexer_forgotten: prometheus::IntCounter,
    /// Prefix hit ratio per request.
    pub prefix_hit_ratio: Histogram,
    /// Prefix hit bytes per request.
    pub prefix_hit_bytes: Histogram,
    /// Score repairs by kind.
    pub score_repairs: IntCounterVec,
    /// Budget tokens reserved.
    pub budget_reserved: IntCounterVec,
    /// Budget tokens settled.
    pub budget_settled: IntCounterVec,
    /// Budget rejections.
    pub budget_rejections: IntCounterVec,
    /// Budget fallbacks.
    pub budget_fallbacks: IntCounterVec,
    /// Budget store errors.
    pub budget_store_errors: prometheus::IntCounter,
    /// Config reloads by result.
    pub config_reloads: IntCounterVec,
    /// Reloads applied since start.
    pub config_generation: prometheus::IntGauge,
    /// Money settled.
    pub budget_spend: prometheus::CounterVec,
    /// Share of each budget limit used.
    pub budget_usage_ratio: prometheus::GaugeVec,
    /// Admissions past a soft threshold.
    pub budget_warnings: IntCounterVec,
    /// The soft threshold (no labels; absent until a budget with one admitted a request, so
    /// that an unset threshold never reads as 0).
    pub budget_soft_threshold: prometheus::GaugeVec,
    /// Guard hits.
    pub guard_hits: IntCounterVec,
    /// Flow control: time in queue by outcome.
    pub flow_queue_duration: HistogramVec,
    /// Flow control: dispatch cycle duration.
    pub flow_dispatch_cycle: Histogram,
    /// Flow control: enqueue duration by outcome.
    pub flow_enqueue_duration: HistogramVec,
    /// Flow control: queued requests.
    pub flow_queue_size: IntGaugeVec,
    /// Flow control: queued bytes.
    pub flow_queue_bytes: IntGaugeVec,
    /// Flow control: the pool's saturation.
    pub flow_pool_saturation: GaugeVec,
    /// The bounded label values of request-supplied model names.
    pub labels: ModelLabels,
}

/// Labels of the flow-control queue gauges, in order.
pub const FLOW_QUEUE_LABELS: [&str; 5] = [
    "fairness_id",
    "priority",
    "inference_pool",
    "model_name",
    "target_model_name",
];

/// Remove every series of `vec` whose labels `doomed` picks.
fn remove_series<T: MetricVecBuilder>(vec: &MetricVec<T>, doomed: &dyn Fn(&[LabelPair]) -> bool) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels = metric.get_label();
            if doomed(labels) {
                let by_name: HashMap<&str, &str> = labels.iter().map(|l| (l.name(), l.value())).collect();
                let _ = vec.remove(&by_name);
            }
        }
    }
}

fn label<'a>(labels: &'a [LabelPair], name: &str) -> Option<&'a str> {
    labels.iter().find(|l| l.name() == name).map(|l| l.value())
}

fn hist(
    name: &str,
    help: &str,
    buckets: Vec<f64>,
    labels: &[&str],
) -> Result<HistogramVec, prometheus::Error> {
    HistogramVec::new(
        HistogramOpts::new(name, format!("[ALPHA] {help}")).buckets(buckets),
        labels,
    )
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, format!("[ALPHA] {help}"))
}

const MODEL_LABELS: [&str; 2] = ["model_name", "target_model_name"];

impl EppMetrics {
    /// Create and register every metric.
    ///
    /// # Errors
    /// Only if two metrics share a name (a programming error caught by tests).
    pub fn new() -> Result<Self, prometheus::Error> {
        let m = Self {
            registry: Registry::new(),
            request_total: IntCounterVec::new(
                opts(
                    REQUEST_TOTAL,
                    "Counter of inference objective requests broken out for each model and target model.",
                ),
                &["model_name", "target_model_name", "priority"],
            )?,
            request_error_total: IntCounterVec::new(
                opts(
                    REQUEST_ERROR_TOTAL,
                    "Counter of inference objective requests errors broken out for each model and target model.",
                ),
                &["model_name", "target_model_name", "error_code"],
            )?,
            request_duration: hist(
                REQUEST_DURATION_SECONDS,
                "Inference objective response latency distribution in seconds for each model and target model.",
                DURATION_BUCKETS.to_vec(),
                &MODEL_LABELS,
            )?,
            request_sizes: hist(
                REQUEST_SIZES,
                "Inference objective requests size distribution in bytes for each model and target model.",
                request_size_buckets(),
                &MODEL_LABELS,
            )?,
            response_sizes: hist(
                RESPONSE_SIZES,
                "Inference objective responses size distribution in bytes for each model and target model.",
                RESPONSE_SIZE_BUCKETS.to_vec(),
                &MODEL_LABELS,
            )?,
            input_tokens: hist(
                INPUT_TOKENS,
                "Inference objective input token count distribution for requests in each model.",
                INPUT_TOKEN_BUCKETS.to_vec(),
                &MODEL_LABELS,
            )?,
            output_tokens: hist(
                OUTPUT_TOKENS,
                "Inference objective output token count distribution for requests in each model.",
                OUTPUT_TOKEN_BUCKETS.to_vec(),
                &MODEL_LABELS,
            )?,
            prompt_cached_tokens: hist(
                PROMPT_CACHED_TOKENS,
                "Inference objective prompt cached token count distribution for requests in each model.",
                INPUT_TOKEN_BUCKETS.to_vec(),
                &MODEL_LABELS,
            )?,
            normalized_tpot: hist(
                NORMALIZED_TPOT_SECONDS,
                "Inference objective latency divided by number of output tokens in seconds for each model and target model.",
                TPOT_BUCKETS.to_vec(),
                &MODEL_LABELS,
            )?,
            running_requests: IntGaugeVec::new(
                opts(
                    RUNNING_REQUESTS,
                    "Inference objective number of running requests in each model.",
                ),
                &["model_name"],
            )?,
            pool_ready_pods: IntGaugeVec::new(
                opts(
                    POOL_READY_PODS,
                    "The number of ready pods in the inference server pool.",
                ),
                &["name"],
            )?,
            pool_avg_kv: GaugeVec::new(
                opts(
                    POOL_AVG_KV,
                    "The average kv cache utilization for an inference server pool.",
                ),
                &["name"],
            )?,
            pool_avg_queue: GaugeVec::new(
                opts(
                    POOL_AVG_QUEUE,
                    "The average number of requests pending in the model server queue.",
                ),
                &["name"],
            )?,
            pool_avg_running: GaugeVec::new(
                opts(
                    POOL_AVG_RUNNING,
                    "The average number of requests running in the model server.",
                ),
                &["name"],
            )?,
            pool_per_pod_queue: GaugeVec::new(
                opts(
                    POOL_PER_POD_QUEUE,
                    "The total number of requests pending in the model server queue for each underlying pod.",
                ),
                &["name", "model_server_pod"],
            )?,
            scheduler_e2e: Histogram::with_opts(
                HistogramOpts::new(
                    SCHEDULER_E2E_SECONDS,
                    "[ALPHA] End-to-end scheduling latency distribution in seconds.",
                )
                .buckets(SCHEDULER_BUCKETS.to_vec()),
            )?,
            request_decision: Histogram::with_opts(
                HistogramOpts::new(
                    REQUEST_DECISION_SECONDS,
                    "Time from a request body's last message to the routing answer handed to the ext_proc stream, in seconds.",
                )
                .buckets(DECISION_BUCKETS.to_vec()),
            )?,
            scheduler_attempts: IntCounterVec::new(
                opts(SCHEDULER_ATTEMPTS_TOTAL, "Total number of scheduling attempts."),
                &["status", "target_model_name", "pod_name", "namespace", "port"],
            )?,
            plugin_duration: hist(
                PLUGIN_DURATION_SECONDS,
                "Plugin processing latency distribution in seconds for each extension point, plugin type and plugin name.",
                SCHEDULER_BUCKETS.to_vec(),
                &["extension_point", "plugin_type", "plugin_name"],
            )?,
            scrape_errors: IntCounterVec::new(
                opts(
                    SCRAPE_ERRORS_TOTAL,
                    "Model-server metric scrapes that failed, by reason.",
                ),
                &["reason"],
            )?,
            scrape_duration: Histogram::with_opts(
                HistogramOpts::new(
                    SCRAPE_DURATION_SECONDS,
                    "Duration of model-server metric scrapes, successful or not.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
                ]),
            )?,
            prefix_indexer_size: prometheus::IntGauge::with_opts(opts(
                PREFIX_INDEXER_SIZE,
                "Size of the prefix indexer.",
            ))?,
            prefix_indexer_bytes: prometheus::IntGauge::with_opts(opts(
                PREFIX_INDEXER_BYTES,
                "Heap bytes held by the prefix indexer.",
            ))?,
            runtime_alive_tasks: prometheus::IntGauge::with_opts(opts(
                RUNTIME_ALIVE_TASKS,
                "Tasks alive in the EPP's async runtime when this page was rendered.",
            ))?,
            prefix_cache_predicted: prometheus::IntCounter::with_opts(opts(
                PREFIX_CACHE_PREDICTED_TOKENS,
                "Prompt tokens the prefix index predicted cached on the chosen endpoint, in the model server's count, over responses reporting cached tokens.",
            ))?,
            prefix_cache_reported: prometheus::IntCounter::with_opts(opts(
                PREFIX_CACHE_REPORTED_TOKENS,
                "Cached prompt tokens the model servers reported for those responses.",
            ))?,
            prefix_cache_overpredicted: prometheus::IntCounter::with_opts(opts(
                PREFIX_CACHE_OVERPREDICTED_TOKENS,
                "Predicted cached prompt tokens the model servers did not find cached.",
            ))?,
            prefix_indexer_forgotten: prometheus::IntCounter::with_opts(opts(
                PREFIX_INDEXER_FORGOTTEN_BLOCKS,
                "Prefix index entries forgotten because a model server found less cached than predicted.",
            ))?,
            prefix_hit_ratio: Histogram::with_opts(
                HistogramOpts::new(
                    PREFIX_INDEXER_HIT_RATIO,
                    "[ALPHA] Ratio of prefix length matched to total prefix length in the cache lookup.",
                )
                .buckets((0..=10).map(|i| f64::from(i) / 10.0).collect()),
            )?,
            prefix_hit_bytes: Histogram::with_opts(
                HistogramOpts::new(
                    PREFIX_INDEXER_HIT_BYTES,
                    "[ALPHA] Length of the prefix match in number of bytes in the cache lookup.",
                )
                .buckets(
                    std::iter::once(0.0)
                        .chain((4..=16).map(|p| f64::from(1u32 << p)))
                        .collect(),
                ),
            )?,
            budget_reserved: IntCounterVec::new(
                opts(BUDGET_RESERVED_TOKENS, "Tokens reserved by token budgets."),
                &["tenant", "model_name"],
            )?,
            budget_settled: IntCounterVec::new(
                opts(BUDGET_SETTLED_TOKENS, "Tokens settled from actual usage."),
                &["tenant", "model_name"],
            )?,
            budget_rejections: IntCounterVec::new(
                opts(BUDGET_REJECTIONS, "Requests refused by token budgets."),
                &["tenant", "model_name"],
            )?,
            budget_fallbacks: IntCounterVec::new(
                opts(
                    BUDGET_FALLBACKS,
                    "Requests sent to a fallback model by token budgets.",
                ),
                &["tenant", "model_name", "fallback_model"],
            )?,
            budget_store_errors: prometheus::IntCounter::with_opts(opts(
                BUDGET_STORE_ERRORS,
                "Token budget store failures.",
            ))?,
            config_reloads: IntCounterVec::new(
                opts(CONFIG_RELOADS, "Config file reloads by result."),
                &["result"],
            )?,
            config_generation: prometheus::IntGauge::with_opts(opts(
                CONFIG_GENERATION,
                "Config reloads applied since start (0: the config read at start).",
            ))?,
            budget_spend: prometheus::CounterVec::new(
                opts(
                    BUDGET_SPEND,
                    "Money settled from actual usage at the configured prices.",
                ),
                &["tenant", "model_name", "currency"],
            )?,
            budget_usage_ratio: prometheus::GaugeVec::new(
                opts(
                    BUDGET_USAGE_RATIO,
                    "Share of each budget limit used after the latest admission (configured tenants).",
                ),
                &["tenant", "layer", "window", "unit"],
            )?,
            budget_soft_threshold: prometheus::GaugeVec::new(
                opts(
                    BUDGET_SOFT_THRESHOLD,
                    "The token budget's soft threshold as a share of each limit (set once a request was admitted).",
                ),
                &[],
            )?,
            budget_warnings: IntCounterVec::new(
                opts(
                    BUDGET_WARNINGS,
                    "Admissions that left a budget limit past its soft threshold.",
                ),
                &["tenant", "layer", "window", "unit"],
            )?,
            guard_hits: IntCounterVec::new(
                opts(
                    GUARD_HITS,
                    "Prompt guard hits by guard, rule and action (never the matched text).",
                ),
                &["guard", "rule", "action"],
            )?,
            score_repairs: IntCounterVec::new(
                opts(
                    SCORE_REPAIRS_TOTAL,
                    "Scorer outputs the scheduler repaired (non_finite, clamped).",
                ),
                &["kind"],
            )?,
            flow_queue_duration: hist(
                FLOW_CONTROL_QUEUE_DURATION_SECONDS,
                "Time requests spent in the flow-control queue.",
                FLOW_QUEUE_BUCKETS.to_vec(),
                &[
                    "fairness_id",
                    "priority",
                    "outcome",
                    "inference_pool",
                    "model_name",
                    "target_model_name",
                ],
            )?,
            flow_dispatch_cycle: Histogram::with_opts(
                HistogramOpts::new(
                    FLOW_CONTROL_DISPATCH_CYCLE_SECONDS,
                    "[ALPHA] Duration of flow-control dispatch cycles.",
                )
                .buckets(FLOW_CYCLE_BUCKETS.to_vec()),
            )?,
            flow_enqueue_duration: hist(
                FLOW_CONTROL_ENQUEUE_SECONDS,
                "Duration of flow-control enqueue calls.",
                FLOW_CYCLE_BUCKETS.to_vec(),
                &["fairness_id", "priority", "outcome"],
            )?,
            flow_queue_size: IntGaugeVec::new(
                opts(FLOW_CONTROL_QUEUE_SIZE, "Requests in the flow-control queue."),
                &FLOW_QUEUE_LABELS,
            )?,
            flow_queue_bytes: IntGaugeVec::new(
                opts(FLOW_CONTROL_QUEUE_BYTES, "Bytes in the flow-control queue."),
                &FLOW_QUEUE_LABELS,
            )?,
            flow_pool_saturation: GaugeVec::new(
                opts(
                    FLOW_CONTROL_POOL_SATURATION,
                    "The pool's saturation as flow control last saw it.",
                ),
                &["inference_pool"],
            )?,
            labels: ModelLabels::default(),
        };
        let info = IntGaugeVec::new(
            opts(
                names::EXTENSION_INFO,
                "General information of the current build of Inference Extension.",
            ),
            &["commit", "build_ref"],
        )?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION"), "epp-rs"])
            .set(1);
        m.registry.register(Box::new(info))?;
        for c in [
            Box::new(m.request_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.request_error_total.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.request_sizes.clone()),
            Box::new(m.response_sizes.clone()),
            Box::new(m.input_tokens.clone()),
            Box::new(m.output_tokens.clone()),
            Box::new(m.prompt_cached_tokens.clone()),
            Box::new(m.normalized_tpot.clone()),
            Box::new(m.running_requests.clone()),
            Box::new(m.pool_ready_pods.clone()),
            Box::new(m.pool_avg_kv.clone()),
            Box::new(m.pool_avg_queue.clone()),
            Box::new(m.pool_avg_running.clone()),
            Box::new(m.pool_per_pod_queue.clone()),
            Box::new(m.scheduler_e2e.clone()),
            Box::new(m.request_decision.clone()),
            Box::new(m.scheduler_attempts.clone()),
            Box::new(m.plugin_duration.clone()),
            Box::new(m.scrape_errors.clone()),
            Box::new(m.score_repairs.clone()),
            Box::new(m.budget_reserved.clone()),
            Box::new(m.budget_settled.clone()),
            Box::new(m.budget_rejections.clone()),
            Box::new(m.budget_fallbacks.clone()),
            Box::new(m.budget_store_errors.clone()),
            Box::new(m.budget_spend.clone()),
            Box::new(m.config_reloads.clone()),
            Box::new(m.config_generation.clone()),
            Box::new(m.budget_usage_ratio.clone()),
            Box::new(m.budget_warnings.clone()),
            Box::new(m.budget_soft_threshold.clone()),
            Box::new(m.guard_hits.clone()),
            Box::new(m.scrape_duration.clone()),
            Box::new(m.prefix_indexer_size.clone()),
            Box::new(m.prefix_indexer_bytes.clone()),
            Box::new(m.runtime_alive_tasks.clone()),
            Box::new(m.prefix_cache_predicted.clone()),
            Box::new(m.prefix_cache_reported.clone()),
            Box::new(m.prefix_cache_overpredicted.clone()),
            Box::new(m.prefix_indexer_forgotten.clone()),
            Box::new(m.prefix_hit_ratio.clone()),
            Box::new(m.prefix_hit_bytes.clone()),
            Box::new(m.flow_queue_duration.clone()),
            Box::new(m.flow_dispatch_cycle.clone()),
            Box::new(m.flow_enqueue_duration.clone()),
            Box::new(m.flow_queue_size.clone()),
            Box::new(m.flow_queue_bytes.clone()),
            Box::new(m.flow_pool_saturation.clone()),
        ] {
            m.registry.register(c)?;
        }
        Ok(m)
    }

    /// These metrics with `known` model names (the configuration's) always labelled as they are.
    pub fn with_known_models(mut self, known: impl IntoIterator<Item = String>) -> Self {
        self.labels = ModelLabels::new(known);
        self
    }

    /// Drop the label pairs idle since [`IDLE_AFTER`](super::labels::IDLE_AFTER) and every series
    /// that names them: a pair's two-label series, and the one-label series of a value no pair
    /// admits any more. Run on the refresher's period, off the request path.
    pub fn drop_idle_labels(&self, now: Instant) {
        self.labels.drop_idle(now, |idle, gone| {
            let doomed = |labels: &[LabelPair]| {
                let model = label(labels, "model_name");
                let target = label(labels, "target_model_name");
                let pair = idle
                    .iter()
                    .any(|(m, t)| model == Some(m.as_str()) && target == Some(t.as_str()));
                let value = [model, target, label(labels, "fallback_model")]
                    .into_iter()
                    .flatten()
                    .any(|v| gone.contains(&v));
                pair || value
            };
            remove_series(&self.request_total, &doomed);
            remove_series(&self.request_error_total, &doomed);
            for h in [
                &self.request_duration,
                &self.request_sizes,
                &self.response_sizes,
                &self.input_tokens,
                &self.output_tokens,
                &self.prompt_cached_tokens,
                &self.normalized_tpot,
            ] {
                remove_series(h, &doomed);
            }
            remove_series(&self.running_requests, &doomed);
            remove_series(&self.scheduler_attempts, &doomed);
            for c in [
                &self.budget_reserved,
                &self.budget_settled,
                &self.budget_rejections,
                &self.budget_fallbacks,
            ] {
                remove_series(c, &doomed);
            }
        });
    }

    /// The exposition text of every metric.
    pub fn render(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let alive = runtime.metrics().num_alive_tasks();
            self.runtime_alive_tasks
                .set(i64::try_from(alive).unwrap_or(i64::MAX));
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Refresh the pool gauges from `snapshot`: endpoints whose metrics are younger than
    /// `staleness` at `now` count as ready and enter the averages.
    pub fn refresh_pool_gauges(
        &self,
        pool: &str,
        snapshot: &Snapshot,
        now: Timestamp,
        staleness: std::time::Duration,
    ) {
        let fresh: Vec<_> = snapshot
            .endpoints
            .iter()
            .filter(|e| e.metrics.scraped_at.is_some_and(|t| now.since(t) <= staleness))
            .collect();
        self.pool_ready_pods
            .with_label_values(&[pool])
            .set(fresh.len() as i64);
        let n = fresh.len().max(1) as f64;
        let kv: f64 = fresh.iter().filter_map(|e| e.metrics.kv_usage).sum();
        self.pool_avg_kv.with_label_values(&[pool]).set(kv / n);
        let q: f64 = fresh.iter().map(|e| f64::from(e.metrics.waiting)).sum();
        self.pool_avg_queue.with_label_values(&[pool]).set(q / n);
        let r: f64 = fresh.iter().map(|e| f64::from(e.metrics.running)).sum();
        self.pool_avg_running.with_label_values(&[pool]).set(r / n);
        self.pool_per_pod_queue.reset();
        for e in snapshot.endpoints.iter() {
            self.pool_per_pod_queue
                .with_label_values(&[pool, &e.spec.key.name])
                .set(f64::from(e.metrics.waiting));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::labels::IDLE_AFTER;

    #[test]
    fn idle_label_pairs_leave_the_page_with_their_series() {
        let m = EppMetrics::new().unwrap().with_known_models(["known".to_owned()]);
        let t0 = Instant::now();
        for (model, target) in [("a", "b"), ("a", "c"), ("known", "known")] {
            let pair = m.labels.pair(model, target, t0, false);
            m.request_total
                .with_label_values(&[&pair.model, &pair.target, "0"])
                .inc();
            m.request_duration
                .with_label_values(&[&pair.model, &pair.target])
                .observe(1.0);
            m.budget_reserved
                .with_label_values(&["default", &m.labels.model(target)])
                .inc();
        }
        // ("a", "c") is used again later: only ("a", "b") is idle at t0 + IDLE_AFTER.
        m.labels.pair("a", "c", t0 + IDLE_AFTER / 2, false);
        m.drop_idle_labels(t0 + IDLE_AFTER);
        let page = m.render();
        assert!(!page.contains(r#"target_model_name="b""#), "{page}");
        assert!(
            !page.contains(r#"model_name="b""#),
            "b is in no pair any more: {page}"
        );
        assert!(
            page.contains(r#"model_name="a",priority="0",target_model_name="c""#),
            "{page}"
        );
        assert!(page.contains(r#"model_name="known""#), "{page}");
    }
}
