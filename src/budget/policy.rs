//! Token budgets as data: who pays (tenant), which layers apply (tenant total, per model), the
//! window, and the request's token estimate. Pure: time comes in as milliseconds since the epoch.

use std::{collections::HashMap, time::Duration};

/// Which budget a layer is: a tenant's total, or one model of a tenant. Stores key their
/// counters by it (the Redis store renders it as text at its own edge).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LayerKey {
    /// All models of a tenant together.
    Tenant {
        /// Who pays.
        tenant: String,
    },
    /// One model of a tenant.
    Model {
        /// Who pays.
        tenant: String,
        /// The model.
        model: String,
    },
}

impl LayerKey {
    /// The tenant-wide layer of `tenant`.
    pub fn tenant(tenant: &str) -> Self {
        LayerKey::Tenant {
            tenant: tenant.to_owned(),
        }
    }

    /// The layer of `model` inside `tenant`.
    pub fn model(tenant: &str, model: &str) -> Self {
        LayerKey::Model {
            tenant: tenant.to_owned(),
            model: model.to_owned(),
        }
    }

    /// Whether this is a per-model layer (a fallback model may then take the request).
    pub fn is_model(&self) -> bool {
        matches!(self, LayerKey::Model { .. })
    }
}

/// One budget layer a request must fit into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Which budget.
    pub key: LayerKey,
    /// Tokens per window.
    pub limit: u64,
}

/// A model's budget inside a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelBudget {
    /// Tokens per window.
    pub tokens: u64,
    /// Model to use instead when this one is exhausted.
    pub fallback_model: Option<String>,
}

/// A tenant's budget.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantBudget {
    /// Tokens per window for all models together (`None` = no tenant-wide limit).
    pub tokens: Option<u64>,
    /// Per-model budgets.
    pub models: HashMap<String, ModelBudget>,
}

/// A fixed budget window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Window index (epoch milliseconds / window length).
    pub id: u64,
    /// Milliseconds until the window ends.
    pub remaining_ms: u64,
}

/// The whole policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetPolicy {
    /// Header naming the tenant.
    pub tenant_header: String,
    /// Window length.
    pub window: Duration,
    /// Named tenants.
    pub tenants: HashMap<String, TenantBudget>,
    /// Tenants not listed (`None` = unlimited).
    pub default_tenant: Option<TenantBudget>,
    /// Output tokens assumed when the request sets no `max_tokens`.
    pub default_output_tokens: u64,
}

impl BudgetPolicy {
    /// The budget of `tenant`, if any applies.
    pub fn tenant(&self, tenant: &str) -> Option<&TenantBudget> {
        self.tenants.get(tenant).or(self.default_tenant.as_ref())
    }

    /// The layers a request of `tenant` for `model` must fit (tenant total first).
    pub fn layers(&self, tenant: &str, model: &str) -> Vec<Layer> {
        let Some(t) = self.tenant(tenant) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(2);
        if let Some(limit) = t.tokens {
            out.push(Layer {
                key: LayerKey::tenant(tenant),
                limit,
            });
        }
        if let Some(m) = t.models.get(model) {
            out.push(Layer {
                key: LayerKey::model(tenant, model),
                limit: m.tokens,
            });
        }
        out
    }

    /// The fallback model for `tenant` and `model`, if configured.
    pub fn fallback(&self, tenant: &str, model: &str) -> Option<&str> {
        self.tenant(tenant)?.models.get(model)?.fallback_model.as_deref()
    }

    /// The window containing `now_ms`.
    pub fn window_at(&self, now_ms: u64) -> Window {
        let len = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX).max(1);
        Window {
            id: now_ms / len,
            remaining_ms: len - now_ms % len,
        }
    }

    /// Tokens to reserve: the prompt estimate plus the output cap (or the default estimate).
    pub fn estimate(&self, prompt_tokens: u64, max_output_tokens: Option<u64>) -> u64 {
        prompt_tokens.saturating_add(max_output_tokens.unwrap_or(self.default_output_tokens))
    }
}

/// Format a duration the way OpenAI's `x-ratelimit-reset-*` headers do (`37s`, `6m0s`, `12ms`).
pub fn reset_text(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms.div_ceil(1000);
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec}s"),
        (h, min, sec) => format!("{h}h{min}m{sec}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BudgetPolicy {
        let mut team = TenantBudget {
            tokens: Some(500),
            models: HashMap::new(),
        };
        team.models.insert(
            "gpt-4o".into(),
            ModelBudget {
                tokens: 100,
                fallback_model: Some("llama".into()),
            },
        );
        BudgetPolicy {
            tenant_header: "x-gateway-inference-fairness-id".into(),
            window: Duration::from_secs(60),
            tenants: [("team-a".to_owned(), team)].into(),
            default_tenant: Some(TenantBudget {
                tokens: Some(50),
                models: HashMap::new(),
            }),
            default_output_tokens: 256,
        }
    }

    #[test]
    fn layers_and_fallbacks() {
        let p = policy();
        assert_eq!(
            p.layers("team-a", "gpt-4o"),
            vec![
                Layer {
                    key: LayerKey::tenant("team-a"),
                    limit: 500
                },
                Layer {
                    key: LayerKey::model("team-a", "gpt-4o"),
                    limit: 100
                }
            ]
        );
        assert_eq!(
            p.layers("team-a", "other"),
            vec![Layer {
                key: LayerKey::tenant("team-a"),
                limit: 500
            }]
        );
        assert_eq!(
            p.layers("stranger", "x"),
            vec![Layer {
                key: LayerKey::tenant("stranger"),
                limit: 50
            }]
        );
        assert_eq!(p.fallback("team-a", "gpt-4o"), Some("llama"));
        assert_eq!(p.fallback("team-a", "other"), None);
    }

    #[test]
    fn windows_and_reset_text() {
        let p = policy();
        assert_eq!(
            p.window_at(61_500),
            Window {
                id: 1,
                remaining_ms: 58_500
            }
        );
        assert_eq!(reset_text(12), "12ms");
        assert_eq!(reset_text(36_500), "37s");
        assert_eq!(reset_text(360_000), "6m0s");
        assert_eq!(reset_text(3_600_000), "1h0m0s");
        assert_eq!(p.estimate(100, None), 356);
        assert_eq!(p.estimate(100, Some(10)), 110);
    }
}
