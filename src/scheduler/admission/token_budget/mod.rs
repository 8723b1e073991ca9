//! `token-budget`: the admission adapter over [`crate::budget`].
//!
//! ```yaml
//! - type: token-budget
//!   parameters:
//!     tenantHeader: x-gateway-inference-fairness-id   # default; or tenantFrom: spiffeNamespace
//!     window: 60s                                     # the window of `tokens`/`spend` below
//!     timeZone: Europe/Berlin                         # calendar windows (default UTC)
//!     currency: USD
//!     prices:                                         # per million tokens
//!       gpt-4o: {input: 2.50, cachedInput: 1.25, output: 10.00}
//!     softThreshold: 0.8                              # warn past 80 % of any limit
//!     tenants:
//!       team-a:
//!         tokens: 500000                              # per minute, all models together
//!         limits:
//!           - {window: day, tokens: 20000000}
//!           - {window: month, spend: 500}
//!         models:
//!           gpt-4o: {tokens: 10000, fallbackModel: llama-3-8b}
//!     defaultTenant: {tokens: 100000}                 # absent = unlimited
//!     defaultOutputTokens: 256                        # output estimate without max_tokens
//!     store: {memory: {}}
//! ```
//!
//! Every limit of every layer (tenant, then model) is one counter; a request is admitted only
//! if it fits all of them, and a refusal names the counter that refused and when its window
//! ends. Money is reserved at the uncached input price and settled from the answer's `usage`
//! (cached prompt tokens at the cached price).

mod params;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use super::{
    Admission, AdmissionEvent, AdmissionStage, AdmitFuture, BudgetReservation, MAX_TENANT_BYTES, Refusal,
};
use crate::{
    budget::{BudgetPolicy, BudgetStore, Charge, Counter, Reservation, Unit, money_text},
    config::{ConfigIssue, PluginSpec},
    scheduler::plugin::PluginName,
};

/// Where a request's tenant comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantSource {
    /// A request header (lower case) the gateway sets, e.g. from a JWT claim.
    Header(String),
    /// The caller's SPIFFE identity (`spiffe://<trust domain>/ns/<namespace>/sa/<account>`),
    /// the URI SAN of its mTLS client certificate, which Envoy passes to ext_proc as the
    /// request attribute [`SPIFFE_ATTRIBUTE`]: the namespace, or `namespace/account`.
    Spiffe {
        /// Whether the service account is part of the tenant.
        service_account: bool,
    },
}

/// The Envoy request attribute carrying the client certificate's first URI SAN.
pub const SPIFFE_ATTRIBUTE: &str = "connection.uri_san_peer_certificate";

impl TenantSource {
    /// The header to read, when the tenant comes from one.
    pub fn header(&self) -> Option<&str> {
        match self {
            TenantSource::Header(h) => Some(h),
            TenantSource::Spiffe { .. } => None,
        }
    }

    /// The tenant named by a SPIFFE id, or `None` when `uri` is not a workload id of the
    /// Kubernetes shape.
    pub fn from_spiffe(&self, uri: &str) -> Option<String> {
        let TenantSource::Spiffe { service_account } = self else {
            return None;
        };
        let path = uri.strip_prefix("spiffe://")?.split_once('/')?.1;
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        if ns.is_empty() || sa.is_empty() {
            return None;
        }
        Some(if *service_account {
            format!("{ns}/{sa}")
        } else {
            ns.to_owned()
        })
    }
}

/// The outcome of budget admission for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetDecision {
    /// No budget applies to this tenant and model.
    Unlimited,
    /// Reserved; settle later with these counters.
    Admitted(Admitted),
    /// Over budget on one counter.
    Rejected(Rejection),
}

/// A successful reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Counters charged, each in its window.
    pub counters: Vec<Counter>,
    /// What was reserved.
    pub reserved: Charge,
    /// Each counter's usage afterwards (in its unit).
    pub used: Vec<u64>,
    /// The model charged (its prices settle the answer).
    pub model: String,
    /// The model actually used when the requested one was exhausted.
    pub fallback: Option<String>,
}

impl Admitted {
    /// `(limit, remaining, reset ms)` of the token counter with the fewest tokens left, for
    /// OpenAI's `x-ratelimit-*-tokens` headers.
    pub fn tightest_tokens(&self) -> Option<(u64, u64, u64)> {
        self.counters
            .iter()
            .zip(&self.used)
            .filter(|(c, _)| c.key.unit == Unit::Tokens)
            .map(|(c, used)| (c.limit, c.limit.saturating_sub(*used), c.window.remaining_ms))
            .min_by_key(|(_, remaining, _)| *remaining)
    }

    /// Each counter with its usage, for the `ratelimit` headers and usage gauges.
    pub fn usage(&self) -> impl Iterator<Item = (&Counter, u64)> {
        self.counters.iter().zip(self.used.iter().copied())
    }
}

/// Why a request does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Who pays.
    pub tenant: String,
    /// Which model (or `None` for the tenant-wide layer).
    pub model: Option<String>,
    /// The counter that refused (its window is the one named).
    pub counter: Counter,
    /// Its usage in the window, in its unit.
    pub used: u64,
    /// What the request needed, in its unit.
    pub requested: u64,
    /// The currency of a spend limit.
    pub currency: String,
}

impl Rejection {
    /// Milliseconds until the refusing window ends.
    pub fn retry_after_ms(&self) -> u64 {
        self.counter.window.remaining_ms
    }

    /// The limit, in the counter's unit.
    pub fn limit(&self) -> u64 {
        self.counter.limit
    }

    /// Whether money ran out (OpenAI answers `insufficient_quota` then, which its clients do
    /// not retry).
    pub fn is_spend(&self) -> bool {
        self.counter.key.unit == Unit::Spend
    }

    /// The client-facing message.
    pub fn message(&self) -> String {
        let on = self
            .model
            .as_deref()
            .map(|m| format!(" on model {m}"))
            .unwrap_or_default();
        let period = self.counter.key.period.label();
        let reset = crate::budget::reset_text(self.retry_after_ms());
        if self.is_spend() {
            let c = &self.currency;
            format!(
                "Spend budget exceeded for tenant {}{on}: limit {} {c} per {period}, used {} {c}, requested {} {c}. Try again in {reset}.",
                self.tenant,
                money_text(self.counter.limit),
                money_text(self.used),
                money_text(self.requested),
            )
        } else {
            format!(
                "Token budget exceeded for tenant {}{on}: limit {} tokens per {period}, used {}, requested {}. Try again in {reset}.",
                self.tenant, self.counter.limit, self.used, self.requested,
            )
        }
    }
}

/// The tenant charged when the gateway names none.
pub const DEFAULT_TENANT: &str = "default";

/// A configured token budget.
pub struct TokenBudget {
    /// Identity.
    pub name: PluginName,
    /// The budget policy.
    pub policy: BudgetPolicy,
    /// Where the tenant comes from.
    pub tenant_source: TenantSource,
    store: Arc<dyn BudgetStore>,
    fail_open: bool,
    outage: AtomicBool,
}

/// What one reservation attempt gave: admitted, or the index of the refusing counter, its
/// usage and the counters tried.
type Attempt = Result<Admitted, (usize, u64, Vec<Counter>, Charge)>;

impl TokenBudget {
    /// Build from a config entry.
    ///
    /// # Errors
    /// Unknown fields, a bad window, price or time zone, or an unsupported store.
    pub fn from_config(name: PluginName, spec: &PluginSpec) -> Result<Self, ConfigIssue> {
        let d = params::decode(spec)?;
        Ok(Self {
            name,
            policy: d.policy,
            tenant_source: d.tenant_source,
            store: d.store,
            fail_open: d.fail_open,
            outage: AtomicBool::new(false),
        })
    }

    /// A budget over an explicit store (tests, the simulator, other backends), tenants named
    /// by the default header.
    pub fn with_store(
        name: PluginName,
        policy: BudgetPolicy,
        store: Arc<dyn BudgetStore>,
        fail_open: bool,
    ) -> Self {
        Self {
            name,
            policy,
            tenant_source: TenantSource::Header("x-gateway-inference-fairness-id".into()),
            store,
            fail_open,
            outage: AtomicBool::new(false),
        }
    }

    /// The metric label of `tenant`: its name when the config names it, else `default`.
    pub fn tenant_label<'a>(&self, tenant: &'a str) -> &'a str {
        if self.policy.tenants.contains_key(tenant) {
            tenant
        } else {
            DEFAULT_TENANT
        }
    }

    /// The model names this budget configures (per-model layers, fallbacks and prices).
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.policy
            .tenants
            .values()
            .chain(self.policy.default_tenant.as_ref())
            .flat_map(|t| {
                t.models
                    .iter()
                    .flat_map(|(name, m)| std::iter::once(name.as_str()).chain(m.fallback_model.as_deref()))
            })
            .chain(self.policy.prices.keys().map(String::as_str))
    }

    /// Whether requests are admitted while the store is unreachable.
    pub fn fail_open(&self) -> bool {
        self.fail_open
    }

    /// Record the store's health; returns true when this call starts or ends an outage (log it
    /// once, not per request).
    pub fn note_store_health(&self, healthy: bool) -> bool {
        self.outage.swap(!healthy, Ordering::Relaxed) == healthy
    }

    async fn try_model(
        &self,
        tenant: &str,
        model: &str,
        estimate: (u64, Option<u64>),
        now_ms: u64,
    ) -> Result<Attempt, crate::budget::StoreError> {
        let counters = self.policy.counters(tenant, model, now_ms);
        let charge = self.policy.estimate(model, estimate.0, estimate.1);
        if counters.is_empty() {
            return Ok(Ok(Admitted {
                counters,
                reserved: Charge::default(),
                used: Vec::new(),
                model: model.to_owned(),
                fallback: None,
            }));
        }
        Ok(match self.store.reserve(&counters, charge).await? {
            Reservation::Admitted { used } => Ok(Admitted {
                counters,
                reserved: charge,
                used,
                model: model.to_owned(),
                fallback: None,
            }),
            Reservation::Rejected { counter, used } => Err((counter, used, counters, charge)),
        })
    }

    /// Reserve a request of `prompt_tokens` and at most `max_output_tokens` for `tenant` on
    /// `model` at `now_ms` (wall clock, so replicas agree on windows), falling back to the
    /// model's `fallbackModel` when a model limit refuses.
    ///
    /// # Errors
    /// The store's error.
    pub async fn admit(
        &self,
        tenant: &str,
        model: &str,
        prompt_tokens: u64,
        max_output_tokens: Option<u64>,
        now_ms: u64,
    ) -> Result<BudgetDecision, crate::budget::StoreError> {
        if !self.policy.applies(tenant, model) {
            return Ok(BudgetDecision::Unlimited);
        }
        let estimate = (prompt_tokens, max_output_tokens);
        let (index, used, counters, charge) = match self.try_model(tenant, model, estimate, now_ms).await? {
            Ok(a) => return Ok(BudgetDecision::Admitted(a)),
            Err(r) => r,
        };
        // A store could name a counter that does not exist (a corrupt Redis answer): blame the
        // last.
        let Some(rejected) = counters.get(index).or(counters.last()) else {
            return Ok(BudgetDecision::Unlimited);
        };
        let model_layer = rejected.key.layer.is_model();
        if model_layer
            && let Some(fallback) = self.policy.fallback(tenant, model)
            && let Ok(mut a) = self.try_model(tenant, fallback, estimate, now_ms).await?
        {
            a.fallback = Some(fallback.to_owned());
            return Ok(BudgetDecision::Admitted(a));
        }
        Ok(BudgetDecision::Rejected(Rejection {
            tenant: tenant.to_owned(),
            model: model_layer.then(|| model.to_owned()),
            counter: rejected.clone(),
            used,
            requested: charge.of(rejected.key.unit),
            currency: self.policy.currency.clone(),
        }))
    }

    /// Replace a reservation by the actual cost.
    ///
    /// # Errors
    /// The store's error.
    pub async fn settle(&self, a: &Admitted, actual: Charge) -> Result<(), crate::budget::StoreError> {
        if a.counters.is_empty() {
            return Ok(());
        }
        self.store.settle(&a.counters, a.reserved, actual).await
    }
}

impl TokenBudget {
    /// Reserve the request's estimate for its tenant and the model it will be served as (after
    /// a rewrite: a client must not escape a model's budget by naming another model and
    /// rewriting to it), switching the target model to the fallback when the budget chose one.
    async fn run(self: &Arc<Self>, cx: &mut Admission<'_>) -> Result<(), Refusal> {
        let tenant = cx.tenant.unwrap_or(DEFAULT_TENANT);
        if tenant.len() > MAX_TENANT_BYTES {
            return Err(Refusal::TenantTooLong);
        }
        // Metrics name a tenant the config names; every other value is `default` (the header is
        // client input: its values must not become series).
        let label = self.tenant_label(tenant).to_owned();
        let served = cx.target_model.clone();
        let prompt_tokens = cx.request.estimated_prompt_tokens();
        let decided = self
            .admit(
                tenant,
                &served,
                prompt_tokens,
                cx.request.max_output_tokens,
                cx.unix_ms,
            )
            .await;
        let reachable = decided.is_ok();
        cx.events.push(AdmissionEvent::BudgetStore {
            reachable,
            changed: self.note_store_health(reachable),
            error: decided.as_ref().err().map(ToString::to_string),
            fail_open: self.fail_open,
        });
        match decided {
            Ok(BudgetDecision::Unlimited) => Ok(()),
            Ok(BudgetDecision::Admitted(admitted)) => {
                let model = admitted.fallback.clone().unwrap_or_else(|| served.clone());
                cx.events.push(AdmissionEvent::BudgetReserved {
                    tenant: label.clone(),
                    model: model.clone(),
                    tokens: admitted.reserved.tokens,
                });
                if let Some(fallback) = &admitted.fallback {
                    cx.events.push(AdmissionEvent::BudgetFallback {
                        tenant: label.clone(),
                        requested: served,
                        fallback: fallback.clone(),
                    });
                    cx.target_model = fallback.clone();
                }
                cx.reservation = Some(BudgetReservation {
                    budget: self.clone(),
                    admitted,
                    tenant: label,
                    model,
                });
                Ok(())
            }
            Ok(BudgetDecision::Rejected(rejection)) => {
                cx.events.push(AdmissionEvent::BudgetRejected {
                    tenant: label,
                    model: served,
                });
                Err(Refusal::OverBudget(Box::new(rejection)))
            }
            Err(_) if self.fail_open => Ok(()),
            Err(_) => Err(Refusal::BudgetStoreUnavailable),
        }
    }
}

/// The token budget as an admission stage (one budget per config).
pub struct BudgetStage(pub Arc<TokenBudget>);

impl AdmissionStage for BudgetStage {
    fn name(&self) -> &PluginName {
        &self.0.name
    }

    fn admit<'s, 'c: 's>(&'s self, cx: &'s mut Admission<'c>) -> AdmitFuture<'s> {
        Box::pin(self.0.run(cx))
    }
}

#[cfg(test)]
mod tests;
