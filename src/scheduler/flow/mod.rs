//! Flow control (the `flowControl` feature gate): while the pool is saturated, admitted requests
//! wait in the EPP, in priority bands of per-tenant flows, and are released one at a time as the
//! pool's saturation drops below the band's ceiling ("late binding": the endpoint is chosen when
//! a request leaves the queue, with the metrics of that moment).
//!
//! Pure, like the rest of the scheduler: [`FlowQueues`] holds the queued requests and makes
//! every decision (capacity, which band, which flow, which request, expiry) from the time and the
//! saturation it is handed. Its two drivers only wait: the server's dispatcher task
//! (`crate::flow_dispatch`) and the simulator's event loop call the same methods in the same
//! order, so a replay queues exactly as the server does.
//!
//! Semantics are upstream's (llm-d-router `pkg/epp/flowcontrol`, GIE before it):
//! - a flow is `{fairness id, priority}`; the fairness id comes from
//!   `x-gateway-inference-fairness-id` (default `default-flow`), the priority from the objective;
//! - capacity is checked at enqueue, globally then per band; a full queue refuses (429);
//! - a dispatch cycle releases at most one request: bands from the highest priority down; when
//!   the pool's saturation reaches the band's ceiling (the usage-limit policy) the whole cycle
//!   stops (strict priority: a lower band never overtakes a blocked higher one); otherwise the
//!   band's fairness policy picks a flow and its ordering policy the request;
//! - a request waits at most the TTL (`defaultRequestTTL`, or `noEndpointRequestTTL` while the
//!   pool is empty), counted from its enqueue or from the last change between the two regimes.
//!
//! Ours, off unless configured: the `token-weighted-fairness-policy` (see [`Fairness`]) and the
//! `retry-after` estimate from the measured drain rate ([`FlowQueues::retry_after_ms`]).
//!
//! Invariants: the queued bytes and requests never exceed any configured cap (checked before an
//! item is stored); state exists only for queued requests (an empty flow is dropped at once, the
//! token-weighted service record is bounded), so memory is bounded by `maxRequests` whatever the
//! fairness ids clients send.

mod policy;
mod queues;

pub use policy::{BandPolicy, Fairness, FlowControlPolicy, Ordering};
pub use queues::{CapacityRejection, Dispatched, Expired, FlowQueues, NewItem, Ticket};

/// The default fairness id (upstream's), for requests without the header.
pub const DEFAULT_FLOW: &str = "default-flow";

/// The longest fairness id kept as sent; longer ones are cut (at a character boundary): flows are
/// keyed by it and no real tenant name is that long.
pub const MAX_FAIRNESS_ID_BYTES: usize = 256;

/// Upstream waits this long between dispatch cycles while requests are queued (its ticker):
/// at most one request leaves per cycle, so this paces releases into a pool whose scraped
/// metrics do not yet show the last ones.
pub const DISPATCH_TICK_NS: u64 = 1_000_000;

/// Why flow control did not let a request through (upstream's outcomes and messages; the
/// status each gets is the server's business).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowRefusal {
    /// A cap would be passed (upstream: 429, or 503 while the pool is empty).
    #[error("{}request rejected pre-queue: queue at capacity", if *.pool_empty { "no endpoints available: " } else { "" })]
    QueueFull {
        /// The pool had no endpoint.
        pool_empty: bool,
        /// Estimated wait before a retry can be queued, ms.
        retry_after_ms: u64,
    },
    /// The request waited its whole TTL (503).
    #[error("request timed out in queue{}: request evicted from queue: request TTL expired", if *.pool_empty { " and no endpoints are available" } else { "" })]
    Expired {
        /// The pool had no endpoint.
        pool_empty: bool,
        /// Estimated wait before a retry is worth it, ms.
        retry_after_ms: u64,
    },
    /// The client went away while the request was queued (nobody reads the answer).
    #[error("client disconnected: request evicted from queue: request context cancelled")]
    ClientGone,
    /// The EPP is stopping.
    #[error("flow controller shutting down: flow controller is not running")]
    ShuttingDown,
}

impl FlowRefusal {
    /// The queue's estimate of when a retry is worth it, ms, when it made one.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            FlowRefusal::QueueFull { retry_after_ms, .. } | FlowRefusal::Expired { retry_after_ms, .. } => {
                Some(*retry_after_ms)
            }
            _ => None,
        }
    }

    /// Upstream's `outcome` label of the flow-control metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            FlowRefusal::QueueFull {
                pool_empty: false, ..
            } => "RejectedCapacity",
            FlowRefusal::QueueFull { pool_empty: true, .. } => "RejectedNoEndpoints",
            FlowRefusal::Expired {
                pool_empty: false, ..
            } => "EvictedTTL",
            FlowRefusal::Expired { pool_empty: true, .. } => "EvictedNoEndpoints",
            FlowRefusal::ClientGone => "EvictedContextCancelled",
            FlowRefusal::ShuttingDown => "RejectedOther",
        }
    }
}
