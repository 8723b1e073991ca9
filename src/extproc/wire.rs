//! Header names, metadata keys and body limits of the Endpoint Picker Protocol, in one place.

/// Destination header and `envoy.lb` metadata key (EPP → proxy).
pub const DESTINATION_ENDPOINT: &str = "x-gateway-destination-endpoint";
/// Metadata namespace for the destination and the served endpoint.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Metadata namespace of the gateway's subset hint.
pub const SUBSET_HINT_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Key of the subset hint inside its namespace.
pub const SUBSET_HINT_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Key of the served endpoint (proxy → EPP, on response headers).
pub const SERVED_ENDPOINT_KEY: &str = "x-gateway-destination-endpoint-served";
/// Objective header (priority selection), upstream and successor spellings.
pub const OBJECTIVE_HEADERS: [&str; 2] = ["x-gateway-inference-objective", "x-llm-d-inference-objective"];
/// Model-rewrite header, upstream and successor spellings.
pub const MODEL_REWRITE_HEADERS: [&str; 2] = ["x-gateway-model-name-rewrite", "x-llm-d-model-name-rewrite"];
/// Fairness (tenant) header, upstream and successor spellings.
pub const FAIRNESS_HEADERS: [&str; 2] = ["x-gateway-inference-fairness-id", "x-llm-d-inference-fairness-id"];
/// Request id header.
pub const REQUEST_ID: &str = "x-request-id";
/// Marker set on every response-headers answer.
pub const WENT_INTO_RESP_HEADERS: &str = "x-went-into-resp-headers";
/// Request header asking for a decision explanation (honoured with `--explain-decisions`).
pub const DEBUG_REQUEST: &str = "x-epp-debug";
/// Response header carrying the decision explanation.
pub const DECISION_EXPLANATION: &str = "x-epp-decision";
/// Model used instead of the requested one when its budget is exhausted.
pub const MODEL_FALLBACK: &str = "x-gateway-model-fallback";
/// OpenAI-style token rate-limit headers.
pub const RATELIMIT_LIMIT_TOKENS: &str = "x-ratelimit-limit-tokens";
/// Remaining tokens in the window.
pub const RATELIMIT_REMAINING_TOKENS: &str = "x-ratelimit-remaining-tokens";
/// Time until the window resets (`37s`).
pub const RATELIMIT_RESET_TOKENS: &str = "x-ratelimit-reset-tokens";
/// Every budget limit of the request (draft-ietf-httpapi-ratelimit-headers):
/// `"tenant-day-tokens";q=1000000;w=86400`.
pub const RATELIMIT_POLICY: &str = "ratelimit-policy";
/// What is left of each: `"tenant-day-tokens";r=2500;t=3600`.
pub const RATELIMIT: &str = "ratelimit";
/// Limits past the budget's soft threshold: `tenant-day-tokens 83%`.
pub const BUDGET_WARNING: &str = "x-gateway-budget-warning";
/// The conformance suite's request header naming the endpoints a request may go to.
pub const TEST_ENDPOINT_SELECTION: &str = "test-epp-endpoint-selection";
/// The conformance suite's response header echoing the endpoint that served.
pub const CONFORMANCE_SERVED_ENDPOINT: &str = "x-conformance-test-served-endpoint";
/// Reason header on immediate responses (successor convention).
pub const DROPPED_REASON: &str = "x-llm-d-request-dropped-reason";
/// Largest body chunk sent back to Envoy in one `streamed_response`.
pub const BODY_CHUNK_BYTES: usize = 62_000;
/// Largest request body accepted (bodies above get 413); bounds memory per stream.
pub const MAX_REQUEST_BODY_BYTES: usize = 64 << 20;
/// Response bytes kept to read `usage` from a non-streaming JSON answer.
pub const MAX_RESPONSE_USAGE_BYTES: usize = 4 << 20;
