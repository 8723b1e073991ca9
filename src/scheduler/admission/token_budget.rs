//! `token-budget`: the admission adapter over [`crate::budget`].
//!
//! ```yaml
//! - type: token-budget
//!   parameters:
//!     tenantHeader: x-gateway-inference-fairness-id   # default
//!     window: 60s
//!     tenants:
//!       team-a:
//!         tokens: 500000
//!         models:
//!           gpt-4o: {tokens: 10000, fallbackModel: llama-3-8b}
//!     defaultTenant: {tokens: 100000}                 # absent = unlimited
//!     defaultOutputTokens: 256                        # output estimate without max_tokens
//!     store: {memory: {}}
//! ```

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use serde::Deserialize;

use super::{
    Admission, AdmissionEvent, AdmissionStage, AdmitFuture, BudgetReservation, MAX_TENANT_BYTES, Refusal,
};
use crate::{
    budget::{
        BudgetPolicy, BudgetStore, Layer, MemoryStore, ModelBudget, RedisStore, Reservation, TenantBudget,
        Window,
    },
    config::{ConfigIssue, PluginSpec, decode_plugin_params, parse_duration},
    scheduler::plugin::PluginName,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Params {
    #[serde(default = "default_header")]
    tenant_header: String,
    #[serde(default = "default_window")]
    window: String,
    #[serde(default)]
    tenants: HashMap<String, TenantParams>,
    default_tenant: Option<TenantParams>,
    #[serde(default = "default_output")]
    default_output_tokens: u64,
    store: Option<StoreParams>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            tenant_header: default_header(),
            window: default_window(),
            tenants: HashMap::new(),
            default_tenant: None,
            default_output_tokens: default_output(),
            store: None,
        }
    }
}

fn default_header() -> String {
    "x-gateway-inference-fairness-id".into()
}
fn default_window() -> String {
    "60s".into()
}
fn default_output() -> u64 {
    256
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantParams {
    tokens: Option<u64>,
    #[serde(default)]
    models: HashMap<String, ModelParams>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ModelParams {
    tokens: u64,
    fallback_model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreParams {
    memory: Option<serde_yaml_ng::Value>,
    redis: Option<RedisParams>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RedisParams {
    url: String,
    #[serde(default = "fail_open_default")]
    fail_open: bool,
    /// Per-call timeout (Go duration), default 100ms.
    timeout: Option<String>,
}

fn fail_open_default() -> bool {
    true
}

fn tenant(p: TenantParams) -> TenantBudget {
    TenantBudget {
        tokens: p.tokens,
        models: p
            .models
            .into_iter()
            .map(|(k, m)| {
                (
                    k,
                    ModelBudget {
                        tokens: m.tokens,
                        fallback_model: m.fallback_model,
                    },
                )
            })
            .collect(),
    }
}

/// The outcome of budget admission for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetDecision {
    /// No budget applies to this tenant and model.
    Unlimited,
    /// Reserved; settle later with these layers and window.
    Admitted(Admitted),
    /// Over budget on one layer.
    Rejected(Rejection),
}

/// A successful reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Layers charged.
    pub layers: Vec<Layer>,
    /// Window charged.
    pub window: Window,
    /// Tokens reserved.
    pub reserved: u64,
    /// Limit of the tightest layer.
    pub limit: u64,
    /// Remaining tokens on the tightest layer.
    pub remaining: u64,
    /// The model actually used when the requested one was exhausted.
    pub fallback: Option<String>,
}

/// Why a request does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Who pays.
    pub tenant: String,
    /// Which model (or `None` for the tenant-wide layer).
    pub model: Option<String>,
    /// The layer's limit.
    pub limit: u64,
    /// Tokens used in the window.
    pub used: u64,
    /// Tokens the request needed.
    pub requested: u64,
    /// Window length in seconds, for the message.
    pub window_secs: u64,
    /// Milliseconds until the window resets.
    pub retry_after_ms: u64,
}

impl Rejection {
    /// The client-facing message.
    pub fn message(&self) -> String {
        let on = self
            .model
            .as_deref()
            .map(|m| format!(" on model {m}"))
            .unwrap_or_default();
        format!(
            "Token budget exceeded for tenant {}{on}: limit {} per {}s, used {}, requested {}. Try again in {}s.",
            self.tenant,
            self.limit,
            self.window_secs,
            self.used,
            self.requested,
            self.retry_after_ms.div_ceil(1000)
        )
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
    store: Arc<dyn BudgetStore>,
    fail_open: bool,
    outage: AtomicBool,
}

impl TokenBudget {
    /// Build from a config entry.
    ///
    /// # Errors
    /// Unknown fields, a bad window, or an unsupported store.
    pub fn from_config(name: PluginName, spec: &PluginSpec) -> Result<Self, ConfigIssue> {
        let p: Params = decode_plugin_params(spec)?;
        let at = |field: &str, reason: String| ConfigIssue {
            path: format!("{}.parameters.{field}", spec.path),
            reason,
        };
        let window = parse_duration(&p.window).map_err(|e| at("window", e))?;
        if window.is_zero() {
            return Err(at("window", "must be > 0".into()));
        }
        let (store, fail_open): (Arc<dyn BudgetStore>, bool) = match &p.store {
            Some(StoreParams {
                redis: Some(r),
                memory: None,
            }) => {
                let timeout = match &r.timeout {
                    Some(t) => parse_duration(t).map_err(|e| at("store.redis.timeout", e))?,
                    None => std::time::Duration::from_millis(100),
                };
                let store =
                    RedisStore::new(&r.url, window, timeout).map_err(|e| at("store.redis.url", e.reason))?;
                (Arc::new(store), r.fail_open)
            }
            Some(StoreParams {
                memory: Some(_),
                redis: None,
            })
            | None => (
                Arc::new(MemoryStore::new().with_configured_tenants(p.tenants.keys().cloned())),
                true,
            ),
            Some(_) => return Err(at("store", "exactly one of memory and redis".into())),
        };
        Ok(Self {
            name,
            policy: BudgetPolicy {
                tenant_header: p.tenant_header.to_ascii_lowercase(),
                window,
                tenants: p.tenants.into_iter().map(|(k, t)| (k, tenant(t))).collect(),
                default_tenant: p.default_tenant.map(tenant),
                default_output_tokens: p.default_output_tokens,
            },
            store,
            fail_open,
            outage: AtomicBool::new(false),
        })
    }

    /// A budget over an explicit store (tests, the simulator, other backends).
    pub fn with_store(
        name: PluginName,
        policy: BudgetPolicy,
        store: Arc<dyn BudgetStore>,
        fail_open: bool,
    ) -> Self {
        Self {
            name,
            policy,
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

    /// The model names this budget configures (per-model layers and fallbacks).
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
        amount: u64,
        window: Window,
    ) -> Result<Result<Admitted, (usize, u64, Vec<Layer>)>, crate::budget::StoreError> {
        let layers = self.policy.layers(tenant, model);
        if layers.is_empty() {
            return Ok(Ok(Admitted {
                layers,
                window,
                reserved: 0,
                limit: 0,
                remaining: 0,
                fallback: None,
            }));
        }
        match self.store.reserve(&layers, amount, window).await? {
            Reservation::Admitted { remaining } => {
                let (i, rem) = remaining
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, r)| **r)
                    .map(|(i, r)| (i, *r))
                    .unwrap_or((0, 0));
                let limit = layers.get(i).map_or(0, |l| l.limit);
                Ok(Ok(Admitted {
                    layers,
                    window,
                    reserved: amount,
                    limit,
                    remaining: rem,
                    fallback: None,
                }))
            }
            Reservation::Rejected { layer, used } => Ok(Err((layer, used, layers))),
        }
    }

    /// Reserve `amount` tokens for `tenant` on `model` at `now_ms` (wall clock, so replicas
    /// agree on windows), falling back to the model's `fallbackModel` when only the model layer
    /// is exhausted.
    ///
    /// # Errors
    /// The store's error.
    pub async fn admit(
        &self,
        tenant: &str,
        model: &str,
        amount: u64,
        now_ms: u64,
    ) -> Result<BudgetDecision, crate::budget::StoreError> {
        let window = self.policy.window_at(now_ms);
        if self.policy.layers(tenant, model).is_empty() {
            return Ok(BudgetDecision::Unlimited);
        }
        let (layer, used, layers) = match self.try_model(tenant, model, amount, window).await? {
            Ok(a) => return Ok(BudgetDecision::Admitted(a)),
            Err(r) => r,
        };
        // A store could name a layer that does not exist (a corrupt Redis answer): blame the last.
        let Some(rejected) = layers.get(layer).or(layers.last()) else {
            return Ok(BudgetDecision::Unlimited);
        };
        let model_layer = rejected.key.is_model();
        let limit = rejected.limit;
        if model_layer
            && let Some(fallback) = self.policy.fallback(tenant, model)
            && let Ok(mut a) = self.try_model(tenant, fallback, amount, window).await?
        {
            a.fallback = Some(fallback.to_owned());
            return Ok(BudgetDecision::Admitted(a));
        }
        Ok(BudgetDecision::Rejected(Rejection {
            tenant: tenant.to_owned(),
            model: model_layer.then(|| model.to_owned()),
            limit,
            used,
            requested: amount,
            window_secs: self.policy.window.as_secs(),
            retry_after_ms: window.remaining_ms,
        }))
    }

    /// Replace a reservation by the actual usage.
    ///
    /// # Errors
    /// The store's error.
    pub async fn settle(&self, a: &Admitted, actual: u64) -> Result<(), crate::budget::StoreError> {
        if a.layers.is_empty() {
            return Ok(());
        }
        self.store.settle(&a.layers, a.window, a.reserved, actual).await
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
        let amount = self
            .policy
            .estimate(cx.request.estimated_prompt_tokens(), cx.request.max_output_tokens);
        let decided = self.admit(tenant, &served, amount, cx.unix_ms).await;
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
                    tokens: admitted.reserved,
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
                Err(Refusal::OverBudget(rejection))
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
mod tests {
    use super::*;

    fn budget(params: &str) -> TokenBudget {
        let spec = PluginSpec {
            name: "b".into(),
            plugin_type: "token-budget".into(),
            parameters: serde_yaml_ng::from_str(params).unwrap(),
            path: "plugins[0]".into(),
        };
        TokenBudget::from_config(
            PluginName {
                kind: "token-budget",
                name: "b".into(),
            },
            &spec,
        )
        .unwrap()
    }

    const PARAMS: &str = "window: 60s\ntenants:\n  team-a:\n    tokens: 1000\n    models:\n      gpt-4o: {tokens: 100, fallbackModel: llama}\n      llama: {tokens: 500}\n";

    #[tokio::test]
    async fn reserve_reject_fallback_and_window_reset() {
        let b = budget(PARAMS);
        let BudgetDecision::Admitted(a) = b.admit("team-a", "gpt-4o", 80, 0).await.unwrap() else {
            panic!()
        };
        assert_eq!((a.limit, a.remaining, a.fallback.as_deref()), (100, 20, None));
        // gpt-4o is exhausted: the fallback model takes the request.
        let BudgetDecision::Admitted(f) = b.admit("team-a", "gpt-4o", 80, 1).await.unwrap() else {
            panic!()
        };
        assert_eq!(f.fallback.as_deref(), Some("llama"));
        assert_eq!(f.remaining, 420);
        // Unknown tenants are unlimited without a default tenant.
        assert_eq!(
            b.admit("other", "gpt-4o", 1_000_000, 2).await.unwrap(),
            BudgetDecision::Unlimited
        );
        // The tenant layer rejects with no fallback possible.
        let BudgetDecision::Rejected(r) = b.admit("team-a", "llama", 900, 30_000).await.unwrap() else {
            panic!()
        };
        assert_eq!(
            (r.model.clone(), r.limit, r.used, r.requested, r.retry_after_ms),
            (None, 1000, 160, 900, 30_000)
        );
        assert_eq!(
            r.message(),
            "Token budget exceeded for tenant team-a: limit 1000 per 60s, used 160, requested 900. Try again in 30s."
        );
        // A new window re-admits.
        assert!(matches!(
            b.admit("team-a", "llama", 450, 59_999).await.unwrap(),
            BudgetDecision::Rejected(_)
        ));
        assert!(matches!(
            b.admit("team-a", "llama", 450, 60_000).await.unwrap(),
            BudgetDecision::Admitted(_)
        ));
    }

    #[tokio::test]
    async fn settle_uses_actual_usage() {
        let b = budget(PARAMS);
        let BudgetDecision::Admitted(a) = b.admit("team-a", "gpt-4o", 90, 0).await.unwrap() else {
            panic!()
        };
        b.settle(&a, 10).await.unwrap();
        assert!(matches!(
            b.admit("team-a", "gpt-4o", 90, 1).await.unwrap(),
            BudgetDecision::Admitted(Admitted { fallback: None, .. })
        ));
    }
}
