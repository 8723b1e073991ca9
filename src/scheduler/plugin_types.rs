//! Every plugin type name this EPP accepts in `plugins[].type`, once: the registry's table, the
//! plugins' default names and the tests all use these constants. The upstream names are kept
//! as they are so configurations carry over.

/// `queue-scorer` (upstream).
pub const QUEUE_SCORER: &str = "queue-scorer";
/// `running-requests-size-scorer` (upstream).
pub const RUNNING_REQUESTS_SIZE_SCORER: &str = "running-requests-size-scorer";
/// `kv-cache-utilization-scorer` (upstream).
pub const KV_CACHE_UTILIZATION_SCORER: &str = "kv-cache-utilization-scorer";
/// `kv-cache-scorer`, the older name of the KV scorer.
pub const KV_CACHE_SCORER: &str = "kv-cache-scorer";
/// `lora-affinity-scorer` (upstream).
pub const LORA_AFFINITY_SCORER: &str = "lora-affinity-scorer";
/// `prefix-cache-scorer` (upstream).
pub const PREFIX_CACHE_SCORER: &str = "prefix-cache-scorer";
/// `token-load-scorer` (upstream; reads in-flight load).
pub const TOKEN_LOAD_SCORER: &str = "token-load-scorer";
/// `prefill-backlog-scorer` (ours; reads the prefix match and in-flight prefill work).
pub const PREFILL_BACKLOG_SCORER: &str = "prefill-backlog-scorer";
/// `approx-prefix-cache-producer` (upstream).
pub const APPROX_PREFIX_CACHE_PRODUCER: &str = "approx-prefix-cache-producer";
/// `inflight-load-producer` (upstream; its counting is always on here, as upstream creates it
/// whenever a plugin reads in-flight load).
pub const INFLIGHT_LOAD_PRODUCER: &str = "inflight-load-producer";
/// `max-score-picker` (upstream).
pub const MAX_SCORE_PICKER: &str = "max-score-picker";
/// `random-picker` (upstream).
pub const RANDOM_PICKER: &str = "random-picker";
/// `round-robin-picker` (ours).
pub const ROUND_ROBIN_PICKER: &str = "round-robin-picker";
/// `weighted-random-picker` (upstream).
pub const WEIGHTED_RANDOM_PICKER: &str = "weighted-random-picker";
/// `single-profile-handler` (upstream).
pub const SINGLE_PROFILE_HANDLER: &str = "single-profile-handler";
/// `utilization-detector` (upstream saturation detector).
pub const UTILIZATION_DETECTOR: &str = "utilization-detector";
/// `concurrency-detector` (upstream saturation detector).
pub const CONCURRENCY_DETECTOR: &str = "concurrency-detector";
/// `low-queue-filter` (upstream legacy filter).
pub const LOW_QUEUE_FILTER: &str = "low-queue-filter";
/// `lora-affinity-filter` (upstream legacy filter).
pub const LORA_AFFINITY_FILTER: &str = "lora-affinity-filter";
/// `least-queue-filter` (upstream legacy filter).
pub const LEAST_QUEUE_FILTER: &str = "least-queue-filter";
/// `least-kv-cache-filter` (upstream legacy filter).
pub const LEAST_KV_CACHE_FILTER: &str = "least-kv-cache-filter";
/// `decision-tree-filter` (upstream).
pub const DECISION_TREE_FILTER: &str = "decision-tree-filter";
/// `prefix-cache-affinity-filter` (llm-d).
pub const PREFIX_CACHE_AFFINITY_FILTER: &str = "prefix-cache-affinity-filter";
/// `inference-objectives` (ours: objective priorities without the CRD).
pub const INFERENCE_OBJECTIVES: &str = "inference-objectives";
/// `prompt-guard` (ours, an admission stage).
pub const PROMPT_GUARD: &str = "prompt-guard";
/// `token-budget` (ours, an admission stage).
pub const TOKEN_BUDGET: &str = "token-budget";
/// `openai-parser` (upstream's parser plugin; parsing is built in).
pub const OPENAI_PARSER: &str = "openai-parser";
/// `passthrough-parser` (upstream): the body is not read; routing uses load signals only.
pub const PASSTHROUGH_PARSER: &str = "passthrough-parser";
/// `metrics-data-source` (upstream data layer; read by the metrics collector).
pub const METRICS_DATA_SOURCE: &str = "metrics-data-source";
/// `core-metrics-extractor` (upstream data layer; read by the metrics collector).
pub const CORE_METRICS_EXTRACTOR: &str = "core-metrics-extractor";
/// `fcfs-ordering-policy` (upstream flow control, the default ordering).
pub const FCFS_ORDERING_POLICY: &str = "fcfs-ordering-policy";
/// `edf-ordering-policy` (upstream flow control).
pub const EDF_ORDERING_POLICY: &str = "edf-ordering-policy";
/// `global-strict-fairness-policy` (upstream flow control, the default fairness).
pub const GLOBAL_STRICT_FAIRNESS_POLICY: &str = "global-strict-fairness-policy";
/// `round-robin-fairness-policy` (upstream flow control).
pub const ROUND_ROBIN_FAIRNESS_POLICY: &str = "round-robin-fairness-policy";
/// `token-weighted-fairness-policy` (ours: fairness measured in estimated tokens).
pub const TOKEN_WEIGHTED_FAIRNESS_POLICY: &str = "token-weighted-fairness-policy";
/// `static-usage-limit-policy` (upstream flow control, the default usage limit).
pub const STATIC_USAGE_LIMIT_POLICY: &str = "static-usage-limit-policy";
