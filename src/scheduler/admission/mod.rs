//! Admission: the stages every request passes before it is scheduled, one small trait.
//!
//! The registry builds the stages in this order, whatever the order of `plugins:` (each is
//! declared there, with no profile entry):
//! 1. `prompt-guard` ([`PromptGuards`], every configured guard in config order over one parse of
//!    the prompt): a rejected prompt costs nothing further, and the budget sees the prompt the
//!    model server will get;
//! 2. `token-budget` ([`TokenBudget`]): reserves the estimate, may switch the target model to a
//!    fallback;
//! 3. the saturation gate ([`SaturationGate`], always present): refuses a sheddable request when
//!    its candidates are saturated. Flow control takes this place when it exists.
//!
//! A stage reads and amends one [`Admission`] (the request as it will be served, the target
//! model, the priority, the reservation) and either lets the request go on or refuses it with a
//! [`Refusal`]. What a stage did that an operator counts is left in [`Admission::events`]; the
//! server turns those into metrics and logs, the simulator into its report. The one await is the
//! budget store (the simulator plugs in the in-memory store, which never waits).

pub mod prompt_guard;
pub mod saturation_gate;
pub mod token_budget;

use std::{borrow::Cow, future::Future, pin::Pin, sync::Arc};

pub use prompt_guard::{GuardOutcome, PromptGuard, PromptGuards};
pub use saturation_gate::SaturationGate;
pub use token_budget::{Admitted, BudgetDecision, Rejection, SPIFFE_ATTRIBUTE, TenantSource, TokenBudget};

use super::{PluginName, SchedulingError};
use crate::{
    clock::Timestamp,
    datastore::{EndpointId, Snapshot},
    parser::LlmRequest,
};

/// The longest tenant name a budget accepts (state is kept per tenant: its size is bounded).
pub const MAX_TENANT_BYTES: usize = 256;

/// What a stage's check resolves to.
pub type AdmitFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send + 'a>>;

/// One admission stage.
pub trait AdmissionStage: Send + Sync {
    /// Identity (for timers and logs).
    fn name(&self) -> &PluginName;
    /// Let the request in (possibly amended) or refuse it.
    fn admit<'s, 'c: 's>(&'s self, cx: &'s mut Admission<'c>) -> AdmitFuture<'s>;
}

/// The request going through admission, and what the stages decided so far.
pub struct Admission<'a> {
    /// The pool, loaded once for this request.
    pub snapshot: &'a Snapshot,
    /// The candidates the request may go to (the pool, or the gateway's subset).
    pub candidates: Vec<EndpointId>,
    /// The tenant the request is charged to, when the gateway named one.
    pub tenant: Option<&'a str>,
    /// Scheduling time.
    pub now: Timestamp,
    /// Wall-clock milliseconds since the Unix epoch (budget windows: replicas agree on them).
    pub unix_ms: u64,
    /// The request as it will be served (parsed again after a guard masked it).
    pub request: Cow<'a, LlmRequest>,
    /// The body `request` was parsed from.
    pub body: Cow<'a, [u8]>,
    /// The model the request will be served as.
    pub target_model: String,
    /// Priority of the request's objective (negative = sheddable).
    pub priority: i32,
    /// `(placeholder, original)` pairs to restore in the response (masked prompt values).
    pub restore: Vec<(Vec<u8>, Vec<u8>)>,
    /// The budget reservation, once made.
    pub reservation: Option<BudgetReservation>,
    /// What the stages did, for metrics and reports.
    pub events: Vec<AdmissionEvent>,
}

/// Tokens reserved for one request, settled with the actual usage when its response ends (or
/// with zero when it is refused after the reservation).
#[derive(Clone)]
pub struct BudgetReservation {
    /// The budget that holds it.
    pub budget: Arc<TokenBudget>,
    /// What was reserved, on which layers.
    pub admitted: Admitted,
    /// The tenant's metric label: its configured name, or `default` (an unlisted or absent
    /// tenant).
    pub tenant: String,
    /// The model charged: the fallback when one was taken, else the model served (the
    /// rewrite target, or the requested model).
    pub model: String,
}

impl std::fmt::Debug for BudgetReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetReservation")
            .field("admitted", &self.admitted)
            .field("tenant", &self.tenant)
            .field("model", &self.model)
            .finish()
    }
}

impl BudgetReservation {
    /// Replace the reservation by what was actually used.
    ///
    /// # Errors
    /// The store's error.
    pub async fn settle(&self, actual: crate::budget::Charge) -> Result<(), crate::budget::StoreError> {
        self.budget.settle(&self.admitted, actual).await
    }

    /// What an answer's `usage` cost, at the charged model's prices.
    pub fn actual(&self, usage: &crate::parser::Usage) -> crate::budget::Charge {
        self.budget.policy.actual(
            &self.admitted.model,
            usage.prompt_tokens,
            usage.cached_tokens.unwrap_or(0),
            usage.completion_tokens,
            usage.total_tokens,
        )
    }

    /// Whether tokens are held (a budget layer applies), so usage must be read to settle.
    pub fn holds_tokens(&self) -> bool {
        !self.admitted.counters.is_empty()
    }
}

/// Something an admission stage did that operators count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionEvent {
    /// A guard masked values in the prompt.
    GuardMasked {
        /// The guard's name.
        guard: Arc<str>,
    },
    /// A guard refused the prompt.
    GuardRejected {
        /// The guard's name.
        guard: Arc<str>,
        /// The matching rule (never the text).
        rule: String,
    },
    /// Tokens were reserved.
    BudgetReserved {
        /// Who pays, as labelled: the configured tenant name, or `default`.
        tenant: String,
        /// The model charged.
        model: String,
        /// Tokens reserved.
        tokens: u64,
    },
    /// The served model's budget was exhausted and its fallback took the request.
    BudgetFallback {
        /// Who pays, as labelled: the configured tenant name, or `default`.
        tenant: String,
        /// The model that would have been served (after a rewrite).
        requested: String,
        /// The model served.
        fallback: String,
    },
    /// The request did not fit its budget.
    BudgetRejected {
        /// Who pays, as labelled: the configured tenant name, or `default`.
        tenant: String,
        /// The model it would have been served as (after a rewrite).
        model: String,
    },
    /// The budget store answered after failing (`reachable`), or failed.
    BudgetStore {
        /// Whether this call reached the store.
        reachable: bool,
        /// Whether this call starts or ends an outage (log once, not per request).
        changed: bool,
        /// The store's error, when it failed.
        error: Option<String>,
        /// Whether requests are admitted while the store is down.
        fail_open: bool,
    },
}

/// Why the EPP answers a request itself instead of routing it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A prompt guard refused the request (status and message from its `customResponse`).
    #[error("{message}")]
    Guard {
        /// HTTP status.
        status: u16,
        /// Client-facing message.
        message: String,
    },
    /// A prompt guard could not read the prompt (nesting past the JSON parser's limit): it is
    /// refused rather than forwarded unscanned.
    #[error("the prompt cannot be scanned by the prompt guard ({reason}); it was not forwarded")]
    Unscannable {
        /// The parser's message.
        reason: String,
    },
    /// The tenant header is longer than [`MAX_TENANT_BYTES`]: budgets keep state per tenant,
    /// and no tenant name is that long.
    #[error("the tenant header is longer than {MAX_TENANT_BYTES} bytes")]
    TenantTooLong,
    /// Over the token budget.
    #[error("{}", .0.message())]
    OverBudget(Box<Rejection>),
    /// The budget store is unreachable and the budget fails closed.
    #[error("token budget store unavailable")]
    BudgetStoreUnavailable,
    /// No endpoint to start from (empty pool, subset hint matching none).
    #[error("failed to find endpoint candidates for serving the request")]
    NoCandidates,
    /// A request without a body found the pool empty (upstream's answer: 500, this message).
    #[error("no pods available in datastore")]
    NoPods,
    /// The scheduler could not place the request (saturated, filters removed every endpoint).
    #[error("{0}")]
    Scheduling(SchedulingError),
    /// Flow control did not let the request through (queue full, TTL, client gone).
    #[error("{0}")]
    Flow(crate::scheduler::flow::FlowRefusal),
    /// An invariant broke inside the EPP.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Refusal {
    /// A short, fixed label for reports and metrics: `guard`, `budget`, `budget-store`,
    /// `no-candidates`, `saturated`, `no-endpoint`, `queue-full`, `queue-timeout`,
    /// `client-gone`, `shutting-down`, `internal`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Guard { .. } | Refusal::Unscannable { .. } => "guard",
            Refusal::OverBudget(_) | Refusal::TenantTooLong => "budget",
            Refusal::BudgetStoreUnavailable => "budget-store",
            Refusal::NoCandidates | Refusal::NoPods | Refusal::Scheduling(SchedulingError::NoCandidates) => {
                "no-candidates"
            }
            Refusal::Scheduling(SchedulingError::Saturated) => "saturated",
            Refusal::Scheduling(SchedulingError::Profile { .. }) => "no-endpoint",
            Refusal::Flow(f) => match f {
                crate::scheduler::flow::FlowRefusal::QueueFull { .. } => "queue-full",
                crate::scheduler::flow::FlowRefusal::Expired { .. } => "queue-timeout",
                crate::scheduler::flow::FlowRefusal::ClientGone => "client-gone",
                crate::scheduler::flow::FlowRefusal::ShuttingDown => "shutting-down",
            },
            Refusal::Internal(_) => "internal",
        }
    }
}
