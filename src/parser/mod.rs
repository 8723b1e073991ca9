//! Pure parsing of what flows through the EPP: request bodies into [`LlmRequest`], response
//! usage (JSON and SSE), streaming byte replacement (model-name and placeholder restore), SSE
//! event splitting, and body edits (the model rewrite, asking for `include_usage` for budget
//! settlement) applied in one pass.
//!
//! No I/O and no clock; every function is deterministic in its input, so the simulator and the
//! server share it.

pub mod api;
pub mod edit;
pub mod request;
pub mod restore;
pub mod sse_filter;
pub mod usage;

pub use api::ApiKind;
pub use edit::{BodyEdit, apply_edits, model_edit, usage_edit};
pub use request::{
    LlmRequest, RequestError, parse_request, parse_request_as, passthrough_request, replace_model,
};
pub use restore::{ModelRestorer, StreamReplacer, model_patterns};
pub use sse_filter::{EventSplitter, MAX_HELD_EVENT_BYTES, UsageEventFilter};
pub use usage::{SseUsageScanner, Usage, usage_from_json};
