//! The one boundary where failures become protocol answers: OpenAI-style JSON error bodies with
//! the Endpoint Picker Protocol's status codes.

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse;
use serde_json::json;

use super::{
    encode::{immediate, set_header},
    wire::DROPPED_REASON,
};
use crate::{
    metrics::names::error_code,
    parser::RequestError,
    scheduler::{
        SchedulingError,
        admission::{Refusal, Rejection},
        flow::FlowRefusal,
    },
};

/// The status that ends a stream whose next message could not be read, when the proxy is there
/// to read it: a message that does not decode is the sender's error (`INVALID_ARGUMENT`), one past
/// the size limit `RESOURCE_EXHAUSTED`. `None` for a transport failure (the proxy reset the
/// stream or went away): nobody would read an answer.
pub fn unreadable_message_status(read_error: &tonic::Status) -> Option<tonic::Status> {
    match read_error.code() {
        // tonic maps a protobuf decode failure to INTERNAL with prost's message.
        tonic::Code::Internal if read_error.message().starts_with("failed to decode") => {
            Some(tonic::Status::invalid_argument(format!(
                "undecodable ext_proc message: {}",
                read_error.message()
            )))
        }
        tonic::Code::OutOfRange => Some(tonic::Status::resource_exhausted(format!(
            "ext_proc message too large: {}",
            read_error.message()
        ))),
        _ => None,
    }
}

/// Why a request is answered by the EPP instead of a model server.
#[derive(Debug, thiserror::Error)]
pub enum EppError {
    /// The body is unusable.
    #[error(transparent)]
    BadRequest(#[from] RequestError),
    /// The body exceeds the size cap.
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge {
        /// The cap.
        limit: usize,
    },
    /// No endpoint to start from (empty pool, subset hint matching none).
    #[error("failed to find endpoint candidates for serving the request")]
    NoCandidates,
    /// A request without a body found the pool empty.
    #[error("no pods available in datastore")]
    NoPods,
    /// The scheduler could not place the request (filters removed every endpoint).
    #[error("{0}")]
    Scheduling(SchedulingError),
    /// The budget store is unreachable and the budget fails closed.
    #[error("token budget store unavailable")]
    BudgetStoreUnavailable,
    /// Over the token budget.
    #[error("{}", .0.message())]
    OverBudget(Box<Rejection>),
    /// A prompt guard refused the request (status and message from its `customResponse`).
    #[error("{message}")]
    Guard {
        /// HTTP status.
        status: u16,
        /// Client-facing message.
        message: String,
    },
    /// A prompt guard could not scan the prompt, or a header a budget keys by is unusable.
    #[error("{0}")]
    Unusable(Refusal),
    /// Flow control did not let the request through.
    #[error("{0}")]
    Flow(FlowRefusal),
    /// An invariant broke inside the EPP.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The request bodies the EPP holds while reading them have reached the process-wide limit.
    #[error("the EPP is holding its limit of request body bytes ({limit}); retry shortly")]
    BodyMemoryExhausted {
        /// The limit.
        limit: usize,
    },
    /// The proxy streams the request body in `STREAMED` mode, where the route must be chosen
    /// before any of the body arrives: the body could be neither read for routing nor scanned by
    /// a guard, so the request is refused rather than routed blind.
    #[error(
        "the ext_proc filter sends the request body in STREAMED mode, which this EPP does not support: set request_body_mode to FULL_DUPLEX_STREAMED (or BUFFERED)"
    )]
    StreamedBodyMode,
}

impl From<Refusal> for EppError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Guard { status, message } => EppError::Guard { status, message },
            r @ (Refusal::Unscannable { .. } | Refusal::TenantTooLong) => EppError::Unusable(r),
            Refusal::OverBudget(rejection) => EppError::OverBudget(rejection),
            Refusal::BudgetStoreUnavailable => EppError::BudgetStoreUnavailable,
            Refusal::NoCandidates => EppError::NoCandidates,
            Refusal::NoPods => EppError::NoPods,
            Refusal::Scheduling(e) => EppError::Scheduling(e),
            Refusal::Flow(f) => EppError::Flow(f),
            Refusal::Internal(what) => EppError::Internal(what),
        }
    }
}

impl EppError {
    /// HTTP status sent to the client.
    pub fn http_status(&self) -> u16 {
        match self {
            EppError::BadRequest(_) | EppError::Unusable(_) => 400,
            EppError::BodyTooLarge { .. } => 413,
            EppError::NoCandidates => 503,
            EppError::Scheduling(SchedulingError::NoCandidates) => 503,
            EppError::Scheduling(SchedulingError::Profile { .. } | SchedulingError::Saturated) => 429,
            EppError::Internal(_) | EppError::NoPods | EppError::StreamedBodyMode => 500,
            EppError::Guard { status, .. } => *status,
            EppError::OverBudget(_) => 429,
            EppError::BudgetStoreUnavailable | EppError::BodyMemoryExhausted { .. } => 503,
            // Upstream (GIE): a full queue is 429, or 503 while the pool is empty; every
            // eviction is 503.
            EppError::Flow(FlowRefusal::QueueFull {
                pool_empty: false, ..
            }) => 429,
            EppError::Flow(_) => 503,
        }
    }

    /// Upstream error code, for the `error_code` metric label.
    pub fn code(&self) -> &'static str {
        match self.http_status() {
            400 | 413 => error_code::BAD_REQUEST,
            403 => error_code::FORBIDDEN,
            429 => error_code::RESOURCE_EXHAUSTED,
            503 => error_code::SERVICE_UNAVAILABLE,
            _ => error_code::INTERNAL,
        }
    }

    /// OpenAI error `type` and `code`.
    fn openai_kind(&self) -> (&'static str, &'static str) {
        match self {
            EppError::BadRequest(_) | EppError::Unusable(_) => ("invalid_request_error", "invalid_request"),
            EppError::BodyTooLarge { .. } => ("invalid_request_error", "request_too_large"),
            EppError::NoCandidates
            | EppError::NoPods
            | EppError::Scheduling(SchedulingError::NoCandidates) => {
                ("server_error", "no_endpoints_available")
            }
            EppError::Scheduling(SchedulingError::Profile { .. } | SchedulingError::Saturated) => {
                ("server_overloaded", "rate_limit_exceeded")
            }
            EppError::Internal(_) => ("server_error", "internal_error"),
            EppError::StreamedBodyMode => ("server_error", "unsupported_body_mode"),
            EppError::BodyMemoryExhausted { .. } => ("server_overloaded", "server_busy"),
            EppError::Guard { .. } => ("invalid_request_error", "content_policy_violation"),
            // Money gone is OpenAI's `insufficient_quota` (its clients do not retry it); tokens
            // per window are a rate limit.
            EppError::OverBudget(r) if r.is_spend() => ("insufficient_quota", "insufficient_quota"),
            EppError::OverBudget(_) => ("rate_limit_error", "rate_limit_exceeded"),
            EppError::BudgetStoreUnavailable => ("server_error", "budget_store_unavailable"),
            EppError::Flow(FlowRefusal::QueueFull { .. }) => ("rate_limit_error", "queue_full"),
            EppError::Flow(FlowRefusal::Expired { .. }) => ("server_overloaded", "queue_timeout"),
            EppError::Flow(FlowRefusal::ClientGone | FlowRefusal::ShuttingDown) => {
                ("server_error", "service_unavailable")
            }
        }
    }

    /// Successor's dropped-reason header value, where one applies.
    fn dropped_reason(&self) -> Option<&'static str> {
        match self {
            EppError::NoCandidates
            | EppError::NoPods
            | EppError::Scheduling(SchedulingError::NoCandidates) => Some("rejected-no-endpoints"),
            EppError::Scheduling(SchedulingError::Profile { .. } | SchedulingError::Saturated) => {
                Some("rejected-saturated")
            }
            EppError::Flow(
                FlowRefusal::QueueFull { pool_empty: true, .. }
                | FlowRefusal::Expired { pool_empty: true, .. },
            ) => Some("rejected-no-endpoints"),
            EppError::Flow(FlowRefusal::QueueFull { .. }) => Some("rejected-saturated"),
            EppError::Flow(FlowRefusal::Expired { .. }) => Some("rejected-ttl-expired"),
            EppError::Flow(FlowRefusal::ClientGone) => Some("rejected-context-cancelled"),
            EppError::Flow(FlowRefusal::ShuttingDown) => Some("rejected-shutting-down"),
            _ => None,
        }
    }

    /// The OpenAI-style JSON body.
    pub fn body(&self) -> Vec<u8> {
        let (kind, code) = self.openai_kind();
        let param = match self {
            EppError::BadRequest(e) => e.param(),
            _ => None,
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
            .to_string()
            .into_bytes()
    }

    /// The immediate response that ends the exchange.
    pub fn to_response(&self) -> ProcessingResponse {
        let mut headers = vec![set_header("content-type", b"application/json")];
        if let Some(reason) = self.dropped_reason() {
            headers.push(set_header(DROPPED_REASON, reason.as_bytes()));
        }
        match self {
            EppError::OverBudget(r) => headers.extend(super::budget_headers::refused(r)),
            // The queue's estimate from its drain rate.
            EppError::Flow(f) if f.retry_after_ms().is_some() => {
                let ms = f.retry_after_ms().unwrap_or(1_000);
                headers.push(set_header(
                    "retry-after",
                    ms.div_ceil(1000).max(1).to_string().as_bytes(),
                ));
                headers.push(set_header("retry-after-ms", ms.to_string().as_bytes()));
            }
            // Saturation frees with the next scrape, held bodies as soon as other requests are
            // routed: one second is enough for either.
            EppError::BodyMemoryExhausted { .. } => headers.push(set_header("retry-after", b"1")),
            _ if self.http_status() == 429 => headers.push(set_header("retry-after", b"1")),
            _ => {}
        }
        let details = format!("epp_{}", self.code());
        immediate(self.http_status(), headers, self.body(), &details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_openai_shaped() {
        let e = EppError::BadRequest(RequestError::MissingModel);
        assert_eq!(e.http_status(), 400);
        assert_eq!(
            String::from_utf8(e.body()).unwrap(),
            r#"{"error":{"code":"invalid_request","message":"model not found in request body","param":"model","type":"invalid_request_error"}}"#
        );
        assert_eq!(EppError::NoCandidates.http_status(), 503);
        assert_eq!(EppError::NoPods.http_status(), 500);
        assert_eq!(EppError::NoPods.code(), "Internal");
        assert_eq!(EppError::Internal("x").code(), "Internal");
    }
}
