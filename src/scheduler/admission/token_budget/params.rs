//! The `token-budget` plugin's parameters: strict decoding into [`BudgetPolicy`] and the store,
//! with the path of every mistake.

use std::{collections::HashMap, sync::Arc, time::Duration};

use jiff::tz::TimeZone;
use serde::Deserialize;

use super::TenantSource;
use crate::{
    budget::{
        BudgetPolicy, BudgetStore, Limit, MemoryStore, ModelBudget, NANOS_PER_UNIT, Period, Prices,
        TenantBudget, Unit,
    },
    config::{ConfigIssue, PluginSpec, decode_plugin_params, parse_duration},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Params {
    #[serde(default = "default_header")]
    tenant_header: String,
    #[serde(default)]
    tenant_from: TenantFrom,
    #[serde(default = "default_window")]
    window: String,
    #[serde(default)]
    time_zone: Option<String>,
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default)]
    prices: HashMap<String, PriceParams>,
    soft_threshold: Option<f64>,
    #[serde(default)]
    tenants: HashMap<String, LayerParams>,
    default_tenant: Option<LayerParams>,
    #[serde(default = "default_output")]
    default_output_tokens: u64,
    store: Option<StoreParams>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            tenant_header: default_header(),
            tenant_from: TenantFrom::default(),
            window: default_window(),
            time_zone: None,
            currency: default_currency(),
            prices: HashMap::new(),
            soft_threshold: None,
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
fn default_currency() -> String {
    "USD".into()
}
fn default_output() -> u64 {
    256
}

/// Where the tenant comes from.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
enum TenantFrom {
    /// `tenantHeader` (set by the gateway, e.g. from a JWT claim).
    #[default]
    Header,
    /// The namespace of the caller's SPIFFE identity.
    SpiffeNamespace,
    /// `namespace/service-account` of the caller's SPIFFE identity.
    SpiffeServiceAccount,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PriceParams {
    input: f64,
    cached_input: Option<f64>,
    output: f64,
}

/// A tenant's or a model's limits. `tokens` and `spend` are per `window` (the plugin's);
/// `limits` adds others.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LayerParams {
    tokens: Option<u64>,
    spend: Option<f64>,
    #[serde(default)]
    limits: Vec<LimitParams>,
    #[serde(default)]
    models: HashMap<String, LayerParams>,
    fallback_model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitParams {
    window: String,
    tokens: Option<u64>,
    spend: Option<f64>,
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

/// The largest amount of money a limit or price may name: nine million currency units. The
/// Redis store's Lua script counts in doubles, exact up to 2^53 nano units (9.007 million
/// units); a larger limit would let replicas' counts round.
const MAX_MONEY: f64 = 9.0e6;

/// The Redis store the replicas share; a refusal names the field at fault.
#[cfg(feature = "server")]
fn redis_store(r: &RedisParams, timeout: Duration) -> Result<Arc<dyn BudgetStore>, (&'static str, String)> {
    let store = crate::budget::RedisStore::new(&r.url, timeout).map_err(|e| ("store.redis.url", e.reason))?;
    Ok(Arc::new(store))
}

/// Without the `server` feature there is no Redis client: a config asking for one is refused
/// rather than silently counted in memory.
#[cfg(not(feature = "server"))]
fn redis_store(r: &RedisParams, _: Duration) -> Result<Arc<dyn BudgetStore>, (&'static str, String)> {
    Err((
        "store.redis",
        format!(
            "this build of epp has no Redis client (the `server` feature is off), so {} cannot be used; use `store: {{memory: {{}}}}`",
            r.url
        ),
    ))
}

/// Everything the plugin's parameters configure.
pub(super) struct Decoded {
    pub policy: BudgetPolicy,
    pub tenant_source: TenantSource,
    pub store: Arc<dyn BudgetStore>,
    pub fail_open: bool,
}

/// Decode and check the parameters of `spec`.
pub(super) fn decode(spec: &PluginSpec) -> Result<Decoded, ConfigIssue> {
    let p: Params = decode_plugin_params(spec)?;
    let at = |field: &str, reason: String| ConfigIssue {
        path: format!("{}.parameters.{field}", spec.path),
        reason,
    };
    let window = parse_period(&p.window).map_err(|e| at("window", e))?;
    let time_zone = match &p.time_zone {
        None => TimeZone::UTC,
        Some(name) => {
            TimeZone::get(name).map_err(|e| at("timeZone", format!("unknown time zone {name:?}: {e}")))?
        }
    };
    if p.currency.len() != 3 || !p.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(at(
            "currency",
            format!("{:?} is not an ISO 4217 code such as USD", p.currency),
        ));
    }
    let mut prices = HashMap::new();
    for (model, price) in &p.prices {
        let field = |f: &str| format!("prices.{model}.{f}");
        let per_million = |f: &str, v: f64| money(v).map_err(|e| at(&field(f), e));
        prices.insert(
            model.clone(),
            Prices {
                input: per_million("input", price.input)?,
                cached_input: per_million("cachedInput", price.cached_input.unwrap_or(price.input))?,
                output: per_million("output", price.output)?,
            },
        );
    }
    let soft_threshold_permille = match p.soft_threshold {
        None => None,
        Some(t) if t > 0.0 && t <= 1.0 => Some((t * 1000.0).round() as u16),
        Some(t) => return Err(at("softThreshold", format!("{t} is not in (0, 1]"))),
    };
    let layers = Layers {
        window,
        prices: &prices,
        at: &at,
    };
    let mut tenants = HashMap::new();
    for (name, t) in p.tenants {
        tenants.insert(name.clone(), layers.tenant(&format!("tenants.{name}"), t)?);
    }
    let default_tenant = match p.default_tenant {
        Some(t) => Some(layers.tenant("defaultTenant", t)?),
        None => None,
    };
    let (store, fail_open): (Arc<dyn BudgetStore>, bool) = match &p.store {
        Some(StoreParams {
            redis: Some(r),
            memory: None,
        }) => {
            let timeout = match &r.timeout {
                Some(t) => parse_duration(t).map_err(|e| at("store.redis.timeout", e))?,
                None => Duration::from_millis(100),
            };
            let store = redis_store(r, timeout).map_err(|(field, e)| at(field, e))?;
            (store, r.fail_open)
        }
        Some(StoreParams {
            memory: Some(_),
            redis: None,
        })
        | None => (
            Arc::new(MemoryStore::new().with_configured_tenants(tenants.keys().cloned())),
            true,
        ),
        Some(_) => return Err(at("store", "exactly one of memory and redis".into())),
    };
    let tenant_source = match p.tenant_from {
        TenantFrom::Header => TenantSource::Header(p.tenant_header.to_ascii_lowercase()),
        TenantFrom::SpiffeNamespace => TenantSource::Spiffe {
            service_account: false,
        },
        TenantFrom::SpiffeServiceAccount => TenantSource::Spiffe {
            service_account: true,
        },
    };
    Ok(Decoded {
        policy: BudgetPolicy {
            time_zone,
            currency: p.currency,
            prices,
            soft_threshold_permille,
            tenants,
            default_tenant,
            default_output_tokens: p.default_output_tokens,
            calendar: Default::default(),
        },
        tenant_source,
        store,
        fail_open,
    })
}

/// `60s`, `1h` (fixed windows) or `day`, `week`, `month` (calendar windows).
fn parse_period(text: &str) -> Result<Period, String> {
    match text {
        "day" => Ok(Period::Day),
        "week" => Ok(Period::Week),
        "month" => Ok(Period::Month),
        other => {
            let d = parse_duration(other).map_err(|e| format!("{e}; or one of day, week, month"))?;
            if d.is_zero() {
                return Err("must be > 0".into());
            }
            Ok(Period::fixed(d))
        }
    }
}

/// An amount of money (or a price per million tokens) in nano units.
fn money(v: f64) -> Result<u64, String> {
    if !v.is_finite() || !(0.0..=MAX_MONEY).contains(&v) {
        return Err(format!("{v} is not an amount between 0 and {MAX_MONEY}"));
    }
    Ok((v * NANOS_PER_UNIT as f64).round() as u64)
}

/// Turns tenant and model parameters into budgets.
struct Layers<'a, F: Fn(&str, String) -> ConfigIssue> {
    window: Period,
    prices: &'a HashMap<String, Prices>,
    at: &'a F,
}

impl<F: Fn(&str, String) -> ConfigIssue> Layers<'_, F> {
    fn tenant(&self, path: &str, t: LayerParams) -> Result<TenantBudget, ConfigIssue> {
        if let Some(fallback) = &t.fallback_model {
            return Err((self.at)(
                &format!("{path}.fallbackModel"),
                format!("a fallback ({fallback}) belongs to a model, under models"),
            ));
        }
        let limits = self.limits(path, &t, None)?;
        let mut models = HashMap::new();
        for (name, m) in t.models {
            let at = format!("{path}.models.{name}");
            if !m.models.is_empty() {
                return Err((self.at)(&format!("{at}.models"), "models do not nest".into()));
            }
            let limits = self.limits(&at, &m, Some(&name))?;
            if limits.is_empty() {
                return Err((self.at)(&at, "names no limit (tokens, spend or limits)".into()));
            }
            models.insert(
                name,
                ModelBudget {
                    limits,
                    fallback_model: m.fallback_model,
                },
            );
        }
        Ok(TenantBudget { limits, models })
    }

    /// The limits of one layer: the `tokens`/`spend` shorthands in the plugin's window, then
    /// `limits`. `model` is set for a model's layer: money there needs the model's price.
    fn limits(&self, path: &str, p: &LayerParams, model: Option<&str>) -> Result<Vec<Limit>, ConfigIssue> {
        let mut out: Vec<(String, Limit)> = Vec::new();
        let mut push = |field: String, period: Period, tokens: Option<u64>, spend: Option<f64>| {
            if let Some(amount) = tokens {
                out.push((
                    format!("{field}tokens"),
                    Limit {
                        period,
                        unit: Unit::Tokens,
                        amount,
                    },
                ));
            }
            if let Some(v) = spend {
                let amount = money(v).map_err(|e| (self.at)(&format!("{field}spend"), e))?;
                out.push((
                    format!("{field}spend"),
                    Limit {
                        period,
                        unit: Unit::Spend,
                        amount,
                    },
                ));
            }
            Ok::<(), ConfigIssue>(())
        };
        push(format!("{path}."), self.window, p.tokens, p.spend)?;
        for (i, l) in p.limits.iter().enumerate() {
            let field = format!("{path}.limits[{i}].");
            let period = parse_period(&l.window).map_err(|e| (self.at)(&format!("{field}window"), e))?;
            if l.tokens.is_none() && l.spend.is_none() {
                return Err((self.at)(
                    &format!("{path}.limits[{i}]"),
                    "names neither tokens nor spend".into(),
                ));
            }
            push(field, period, l.tokens, l.spend)?;
        }
        for (i, (field, l)) in out.iter().enumerate() {
            if out[..i]
                .iter()
                .any(|(_, o)| o.period == l.period && o.unit == l.unit)
            {
                return Err((self.at)(
                    field,
                    format!("a second {} limit per {}", l.unit.label(), l.period.label()),
                ));
            }
            if let Some(m) = model
                && l.unit == Unit::Spend
                && !self.prices.contains_key(m)
            {
                return Err((self.at)(field, format!("model {m} has no price under prices")));
            }
        }
        Ok(out.into_iter().map(|(_, l)| l).collect())
    }
}
