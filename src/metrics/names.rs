//! Names, labels and buckets of the metrics this EPP exports: the upstream names first, extras
//! under the same prefixes. One table, so dashboards built for the Go EPP keep working.

/// Requests scheduled successfully.
pub const REQUEST_TOTAL: &str = "inference_objective_request_total";
/// Requests that ended in an error answer.
pub const REQUEST_ERROR_TOTAL: &str = "inference_objective_request_error_total";
/// Request duration, request headers to response end.
pub const REQUEST_DURATION_SECONDS: &str = "inference_objective_request_duration_seconds";
/// Request body sizes.
pub const REQUEST_SIZES: &str = "inference_objective_request_sizes";
/// Response body sizes.
pub const RESPONSE_SIZES: &str = "inference_objective_response_sizes";
/// Prompt tokens reported by the model server.
pub const INPUT_TOKENS: &str = "inference_objective_input_tokens";
/// Generated tokens reported by the model server.
pub const OUTPUT_TOKENS: &str = "inference_objective_output_tokens";
/// Cached prompt tokens reported by the model server.
pub const PROMPT_CACHED_TOKENS: &str = "inference_objective_prompt_cached_tokens";
/// Requests in flight per model.
pub const RUNNING_REQUESTS: &str = "inference_objective_running_requests";
/// Duration divided by output tokens.
pub const NORMALIZED_TPOT_SECONDS: &str = "inference_objective_normalized_time_per_output_token_seconds";
/// Endpoints with fresh metrics.
pub const POOL_READY_PODS: &str = "inference_pool_ready_pods";
/// Mean KV utilization over fresh endpoints.
pub const POOL_AVG_KV: &str = "inference_pool_average_kv_cache_utilization";
/// Mean waiting queue over fresh endpoints.
pub const POOL_AVG_QUEUE: &str = "inference_pool_average_queue_size";
/// Mean running requests over fresh endpoints.
pub const POOL_AVG_RUNNING: &str = "inference_pool_average_running_requests";
/// Waiting queue per endpoint.
pub const POOL_PER_POD_QUEUE: &str = "inference_pool_per_pod_queue_size";
/// Build information.
pub const EXTENSION_INFO: &str = "inference_extension_info";
/// Scheduler cycle duration.
pub const SCHEDULER_E2E_SECONDS: &str = "inference_extension_scheduler_e2e_duration_seconds";
/// Last request-body message in → routing answer out (this EPP's own metric).
pub const REQUEST_DECISION_SECONDS: &str = "inference_extension_request_decision_duration_seconds";
/// Scheduling attempts.
pub const SCHEDULER_ATTEMPTS_TOTAL: &str = "inference_extension_scheduler_attempts_total";
/// Per-plugin duration.
pub const PLUGIN_DURATION_SECONDS: &str = "inference_extension_plugin_duration_seconds";
/// Entries in the approximate prefix index.
pub const PREFIX_INDEXER_SIZE: &str = "inference_extension_prefix_indexer_size";
/// Matched share of each request's prompt blocks on the chosen endpoint.
pub const PREFIX_INDEXER_HIT_RATIO: &str = "inference_extension_prefix_indexer_hit_ratio";
/// Matched prompt bytes on the chosen endpoint.
pub const PREFIX_INDEXER_HIT_BYTES: &str = "inference_extension_prefix_indexer_hit_bytes";
/// Prompt tokens the prefix index predicted cached on the chosen endpoint, in the model server's
/// count, over the responses that reported cached tokens (extra).
pub const PREFIX_CACHE_PREDICTED_TOKENS: &str = "inference_extension_prefix_cache_predicted_tokens_total";
/// Cached prompt tokens the model servers reported for those responses (extra).
pub const PREFIX_CACHE_REPORTED_TOKENS: &str = "inference_extension_prefix_cache_reported_tokens_total";
/// Of the predicted tokens, those the model server did not find cached (extra).
pub const PREFIX_CACHE_OVERPREDICTED_TOKENS: &str =
    "inference_extension_prefix_cache_overpredicted_tokens_total";
/// Index entries forgotten after a model server found less cached than predicted (extra).
pub const PREFIX_INDEXER_FORGOTTEN_BLOCKS: &str = "inference_extension_prefix_indexer_forgotten_blocks_total";
/// Heap bytes of the prefix index (extra).
pub const PREFIX_INDEXER_BYTES: &str = "inference_extension_prefix_indexer_bytes";
/// Tasks alive in the EPP's async runtime, read when the page is rendered (extra; the Go EPP's
/// `go_goroutines` counterpart: a count that keeps growing under steady load is a leak).
pub const RUNTIME_ALIVE_TASKS: &str = "inference_extension_runtime_alive_tasks";
/// Duration of model-server scrapes (extra).
pub const SCRAPE_DURATION_SECONDS: &str = "inference_extension_model_server_scrape_duration_seconds";
/// Tokens reserved by the token budget, by tenant and model.
pub const BUDGET_RESERVED_TOKENS: &str = "inference_extension_budget_reserved_tokens_total";
/// Tokens settled from actual usage, by tenant and model.
pub const BUDGET_SETTLED_TOKENS: &str = "inference_extension_budget_settled_tokens_total";
/// Requests refused by the token budget.
pub const BUDGET_REJECTIONS: &str = "inference_extension_budget_rejections_total";
/// Requests sent to a fallback model.
pub const BUDGET_FALLBACKS: &str = "inference_extension_budget_fallbacks_total";
/// Money settled from actual usage at the configured prices, by tenant, model and currency.
pub const BUDGET_SPEND: &str = "inference_extension_budget_spend_total";
/// Share of each budget limit used after the latest admission (configured tenants only), by
/// tenant, layer (`tenant` or the model), window and unit.
pub const BUDGET_USAGE_RATIO: &str = "inference_extension_budget_usage_ratio";
/// The token budget's soft threshold as a share of each limit (the alert compares usage with it).
pub const BUDGET_SOFT_THRESHOLD: &str = "inference_extension_budget_soft_threshold_ratio";
/// Admissions that left a limit past the soft threshold, by tenant, layer, window and unit.
pub const BUDGET_WARNINGS: &str = "inference_extension_budget_soft_threshold_crossings_total";
/// Config file reloads by result: `success`, `invalid`, `unsupported`, `read_error` (extra).
pub const CONFIG_RELOADS: &str = "inference_extension_config_reload_total";
/// How many reloads the running scheduling profile is past the config read at start (extra).
pub const CONFIG_GENERATION: &str = "inference_extension_config_generation";
/// Budget store failures.
pub const BUDGET_STORE_ERRORS: &str = "inference_extension_budget_store_errors_total";
/// Requests refused or masked by prompt guards, by guard, rule and action.
pub const GUARD_HITS: &str = "inference_extension_prompt_guard_hits_total";
/// Scrapes of model-server metrics that failed (extra), by reason.
pub const SCRAPE_ERRORS_TOTAL: &str = "inference_extension_model_server_scrape_errors_total";
/// Scheduler scores repaired by the framework (extra), by kind.
pub const SCORE_REPAIRS_TOTAL: &str = "inference_extension_scheduler_score_repairs_total";

/// Time requests spent in the flow-control queue, by outcome.
pub const FLOW_CONTROL_QUEUE_DURATION_SECONDS: &str =
    "inference_extension_flow_control_request_queue_duration_seconds";
/// Duration of flow-control dispatch cycles.
pub const FLOW_CONTROL_DISPATCH_CYCLE_SECONDS: &str =
    "inference_extension_flow_control_dispatch_cycle_duration_seconds";
/// Duration of enqueue calls, by outcome (`NotYetFinalized` when queued).
pub const FLOW_CONTROL_ENQUEUE_SECONDS: &str =
    "inference_extension_flow_control_request_enqueue_duration_seconds";
/// Requests in the flow-control queue.
pub const FLOW_CONTROL_QUEUE_SIZE: &str = "inference_extension_flow_control_queue_size";
/// Bytes in the flow-control queue.
pub const FLOW_CONTROL_QUEUE_BYTES: &str = "inference_extension_flow_control_queue_bytes";
/// The pool's saturation as flow control last saw it.
pub const FLOW_CONTROL_POOL_SATURATION: &str = "inference_extension_flow_control_pool_saturation";

/// Queue-duration buckets (seconds), as llm-d-router.
pub const FLOW_QUEUE_BUCKETS: [f64; 16] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Dispatch-cycle and enqueue buckets (seconds), as llm-d-router.
pub const FLOW_CYCLE_BUCKETS: [f64; 10] =
    [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1];

/// Request-duration buckets (seconds), as upstream.
pub const DURATION_BUCKETS: [f64; 35] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0,
    20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0,
    3600.0,
];

/// Buckets of the decision latency (seconds): fine around the 2 ms target.
pub const DECISION_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
];
/// Scheduler and plugin duration buckets (seconds), as upstream.
pub const SCHEDULER_BUCKETS: [f64; 10] = [0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1];

/// Normalized time-per-output-token buckets (seconds).
pub const TPOT_BUCKETS: [f64; 13] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Request-size buckets (bytes): powers of two from 64 B to 1 GiB.
pub fn request_size_buckets() -> Vec<f64> {
    (6..=30).map(|p| f64::from(1u32 << p)).collect()
}

/// Response-size buckets (bytes), upstream's list (32778 is upstream's, not a typo here).
pub const RESPONSE_SIZE_BUCKETS: [f64; 16] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32778.0,
    65536.0, 131072.0,
];

/// Input-token buckets.
pub const INPUT_TOKEN_BUCKETS: [f64; 19] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32778.0,
    65536.0, 131072.0, 262144.0, 524288.0, 1048576.0,
];

/// Output-token buckets.
pub const OUTPUT_TOKEN_BUCKETS: [f64; 11] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 8192.0,
];

/// Error codes used in `error_code` labels.
pub mod error_code {
    /// 400.
    pub const BAD_REQUEST: &str = "BadRequest";
    /// 403.
    pub const FORBIDDEN: &str = "Forbidden";
    /// 429.
    pub const RESOURCE_EXHAUSTED: &str = "ResourceExhausted";
    /// 503.
    pub const SERVICE_UNAVAILABLE: &str = "ServiceUnavailable";
    /// 500.
    pub const INTERNAL: &str = "Internal";
}
