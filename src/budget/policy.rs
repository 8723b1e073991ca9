//! Budgets as data: who pays (tenant), which layers apply (tenant total, per model), each
//! layer's limits (a window, a unit, an amount), prices, and the request's estimate. Pure: time
//! comes in as milliseconds since the epoch.
//!
//! A limit's window is either fixed (a duration; windows are epoch multiples, as OpenAI's
//! per-minute limits are) or a calendar period (day, week from Monday, month) in the policy's
//! time zone, so "per day" ends at local midnight, also across daylight-saving changes. Money
//! is counted in nano units of the configured currency (10⁻⁹), an integer: prices per million
//! tokens with up to nine decimals are exact and costs round up to the next nano unit.

use std::{collections::HashMap, time::Duration};

use jiff::{Timestamp, ToSpan, Zoned, civil::Date, tz::TimeZone};

/// Nano units (10⁻⁹) in one currency unit.
pub const NANOS_PER_UNIT: u64 = 1_000_000_000;

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

    /// Who pays.
    pub fn tenant_name(&self) -> &str {
        let (LayerKey::Tenant { tenant } | LayerKey::Model { tenant, .. }) = self;
        tenant
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Tokens (prompt and output together).
    Tokens,
    /// Money, in nano units of the policy's currency.
    Spend,
}

impl Unit {
    /// The label in metrics, headers and store keys.
    pub fn label(self) -> &'static str {
        match self {
            Unit::Tokens => "tokens",
            Unit::Spend => "spend",
        }
    }
}

/// The window a limit counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// Fixed windows of this many milliseconds, aligned to the Unix epoch.
    Fixed {
        /// Window length in milliseconds (> 0).
        ms: u64,
    },
    /// From local midnight to the next.
    Day,
    /// From Monday's local midnight to the next Monday's.
    Week,
    /// From the first of the month's local midnight to the next month's.
    Month,
}

impl Period {
    /// A fixed window of `d` (at least one millisecond).
    pub fn fixed(d: Duration) -> Self {
        Period::Fixed {
            ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1),
        }
    }

    /// The label in messages, metrics, headers and store keys: `60s`, `1500ms`, `day`, `week`,
    /// `month`.
    pub fn label(self) -> String {
        match self {
            Period::Fixed { ms } if ms % 1000 == 0 => format!("{}s", ms / 1000),
            Period::Fixed { ms } => format!("{ms}ms"),
            Period::Day => "day".into(),
            Period::Week => "week".into(),
            Period::Month => "month".into(),
        }
    }

    /// The window of this period containing `now_ms`, in `tz` for calendar periods.
    pub fn window_at(self, now_ms: u64, tz: &TimeZone) -> Window {
        let (id, ends_ms) = match self {
            Period::Fixed { ms } => (now_ms / ms, (now_ms / ms).saturating_add(1).saturating_mul(ms)),
            calendar => calendar_bounds(calendar, now_ms, tz).unwrap_or_else(|| {
                // Only a clock past the year 9999 gets here: count in nominal lengths.
                let len = calendar.nominal_ms();
                (now_ms / len, (now_ms / len + 1).saturating_mul(len))
            }),
        };
        Window {
            id,
            ends_ms,
            remaining_ms: ends_ms.saturating_sub(now_ms).max(1),
        }
    }

    /// The period's usual length (a calendar period's varies).
    pub fn nominal_ms(self) -> u64 {
        const DAY: u64 = 86_400_000;
        match self {
            Period::Fixed { ms } => ms,
            Period::Day => DAY,
            Period::Week => 7 * DAY,
            Period::Month => 30 * DAY,
        }
    }
}

/// `(window id, end in epoch ms)` of a calendar period: the id is the start in epoch seconds.
fn calendar_bounds(period: Period, now_ms: u64, tz: &TimeZone) -> Option<(u64, u64)> {
    let now: Zoned = Timestamp::from_millisecond(i64::try_from(now_ms).ok()?)
        .ok()?
        .to_zoned(tz.clone());
    let today = now.date();
    let (first, next): (Date, Date) = match period {
        Period::Day => (today, today.tomorrow().ok()?),
        Period::Week => {
            let first = today
                .checked_sub(i64::from(today.weekday().to_monday_zero_offset()).days())
                .ok()?;
            (first, first.checked_add(7.days()).ok()?)
        }
        Period::Month => {
            let first = today.first_of_month();
            (first, first.checked_add(1.month()).ok()?)
        }
        Period::Fixed { .. } => return None,
    };
    // Local midnight; where a time-zone change skips midnight, the first instant after it.
    let start = first.to_zoned(tz.clone()).ok()?.start_of_day().ok()?;
    let end = next.to_zoned(tz.clone()).ok()?.start_of_day().ok()?;
    let id = u64::try_from(start.timestamp().as_second()).ok()?;
    let ends_ms = u64::try_from(end.timestamp().as_millisecond()).ok()?;
    Some((id, ends_ms))
}

/// The calendar windows computed last, one per calendar period: consecutive requests fall in
/// the same day, week and month, so the time-zone arithmetic (a few hundred nanoseconds per
/// period) runs once per window instead of once per request. A memo of a pure function: it
/// never changes an answer.
#[derive(Debug, Default)]
pub struct CalendarMemo {
    windows: parking_lot::Mutex<smallvec::SmallVec<[Remembered; 3]>>,
}

/// A remembered calendar window: `(period, window id, start ms, end ms)`.
type Remembered = (Period, u64, u64, u64);

impl Clone for CalendarMemo {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for CalendarMemo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl CalendarMemo {
    /// `period`'s window at `now_ms` in `tz`, from the memo when `now_ms` is inside the one
    /// computed last.
    fn window_at(&self, period: Period, now_ms: u64, tz: &TimeZone) -> Window {
        if let Period::Fixed { .. } = period {
            return period.window_at(now_ms, tz);
        }
        let hit = self
            .windows
            .lock()
            .iter()
            .find(|(p, _, start, end)| *p == period && (*start..*end).contains(&now_ms))
            .map(|&(_, id, _, ends_ms)| Window {
                id,
                ends_ms,
                remaining_ms: ends_ms - now_ms,
            });
        if let Some(w) = hit {
            return w;
        }
        let w = period.window_at(now_ms, tz);
        let start = w.id.saturating_mul(1000);
        let mut windows = self.windows.lock();
        windows.retain(|(p, ..)| *p != period);
        // Only a real calendar window (its id is its start) is remembered.
        if start <= now_ms && w.ends_ms - start <= 32 * Period::Day.nominal_ms() {
            windows.push((period, w.id, start, w.ends_ms));
        }
        w
    }
}

/// One window of a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// Which window of its period (fixed: epoch ms / length; calendar: start in epoch seconds).
    pub id: u64,
    /// When it ends, in epoch milliseconds.
    pub ends_ms: u64,
    /// Milliseconds from the decision to the end (≥ 1).
    pub remaining_ms: u64,
}

/// One limit of a layer: at most `amount` of `unit` per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The window.
    pub period: Period,
    /// What is counted.
    pub unit: Unit,
    /// Tokens, or nano units of money.
    pub amount: u64,
}

/// What a store keys one counter by: a layer's usage of one unit in one period.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CounterKey {
    /// Which layer.
    pub layer: LayerKey,
    /// Which period.
    pub period: Period,
    /// Which unit.
    pub unit: Unit,
}

/// One counter a request must fit into, in the window of its decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// Which counter.
    pub key: CounterKey,
    /// The limit in its unit.
    pub limit: u64,
    /// The window the request is charged to.
    pub window: Window,
}

impl Counter {
    /// A short name for headers and metrics: `tenant-day-tokens`, `model-60s-spend`.
    pub fn name(&self) -> String {
        let layer = if self.key.layer.is_model() {
            "model"
        } else {
            "tenant"
        };
        format!("{layer}-{}-{}", self.key.period.label(), self.key.unit.label())
    }
}

/// What a request costs, in both units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    /// Tokens.
    pub tokens: u64,
    /// Nano units of money.
    pub nanos: u64,
}

impl Charge {
    /// The amount in `unit`.
    pub fn of(self, unit: Unit) -> u64 {
        match unit {
            Unit::Tokens => self.tokens,
            Unit::Spend => self.nanos,
        }
    }
}

/// A model's prices, in nano units per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prices {
    /// Uncached prompt tokens.
    pub input: u64,
    /// Prompt tokens the model server found cached.
    pub cached_input: u64,
    /// Output tokens.
    pub output: u64,
}

impl Prices {
    /// The cost of `prompt` tokens (of which `cached` were cached) and `output` tokens, rounded
    /// up to the next nano unit.
    pub fn cost(&self, prompt: u64, cached: u64, output: u64) -> u64 {
        let cached = cached.min(prompt);
        let per_million = u128::from(prompt - cached) * u128::from(self.input)
            + u128::from(cached) * u128::from(self.cached_input)
            + u128::from(output) * u128::from(self.output);
        u64::try_from(per_million.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

/// A model's budget inside a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelBudget {
    /// Its limits.
    pub limits: Vec<Limit>,
    /// Model to use instead when one of these limits is exhausted.
    pub fallback_model: Option<String>,
}

/// A tenant's budget.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantBudget {
    /// Limits on all models together.
    pub limits: Vec<Limit>,
    /// Per-model budgets.
    pub models: HashMap<String, ModelBudget>,
}

/// The whole policy.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetPolicy {
    /// Time zone of calendar windows.
    pub time_zone: TimeZone,
    /// Currency of prices and spend limits (ISO 4217 code, for messages and metrics).
    pub currency: String,
    /// Prices by model (a model without prices costs nothing).
    pub prices: HashMap<String, Prices>,
    /// Share of a limit (per mille) past which answers carry a warning.
    pub soft_threshold_permille: Option<u16>,
    /// Named tenants.
    pub tenants: HashMap<String, TenantBudget>,
    /// Tenants not listed (`None` = unlimited).
    pub default_tenant: Option<TenantBudget>,
    /// Output tokens assumed when the request sets no `max_tokens`.
    pub default_output_tokens: u64,
    /// The calendar windows in use (leave it default).
    pub calendar: CalendarMemo,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        Self {
            time_zone: TimeZone::UTC,
            currency: "USD".into(),
            prices: HashMap::new(),
            soft_threshold_permille: None,
            tenants: HashMap::new(),
            default_tenant: None,
            default_output_tokens: 256,
            calendar: CalendarMemo::default(),
        }
    }
}

impl BudgetPolicy {
    /// The budget of `tenant`, if any applies.
    pub fn tenant(&self, tenant: &str) -> Option<&TenantBudget> {
        self.tenants.get(tenant).or(self.default_tenant.as_ref())
    }

    /// Whether any limit applies to `tenant` on `model`.
    pub fn applies(&self, tenant: &str, model: &str) -> bool {
        self.tenant(tenant).is_some_and(|t| {
            !t.limits.is_empty() || t.models.get(model).is_some_and(|m| !m.limits.is_empty())
        })
    }

    /// The counters a request of `tenant` for `model` at `now_ms` must fit, tenant limits
    /// first, each in its window.
    pub fn counters(&self, tenant: &str, model: &str, now_ms: u64) -> Vec<Counter> {
        let Some(t) = self.tenant(tenant) else {
            return Vec::new();
        };
        let model_limits = t
            .models
            .get(model)
            .map(|m| m.limits.as_slice())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(t.limits.len() + model_limits.len());
        let layers = [
            (LayerKey::tenant(tenant), t.limits.as_slice()),
            (LayerKey::model(tenant, model), model_limits),
        ];
        for (layer, limits) in layers {
            for l in limits {
                out.push(Counter {
                    key: CounterKey {
                        layer: layer.clone(),
                        period: l.period,
                        unit: l.unit,
                    },
                    limit: l.amount,
                    window: self.calendar.window_at(l.period, now_ms, &self.time_zone),
                });
            }
        }
        out
    }

    /// The fallback model for `tenant` and `model`, if configured.
    pub fn fallback(&self, tenant: &str, model: &str) -> Option<&str> {
        self.tenant(tenant)?.models.get(model)?.fallback_model.as_deref()
    }

    /// The prices of `model` (zero when none are configured).
    pub fn prices(&self, model: &str) -> Prices {
        self.prices.get(model).copied().unwrap_or_default()
    }

    /// What to reserve for a request to `model`: the prompt estimate plus the output cap (or
    /// the default estimate), priced as uncached input (the cache is known only afterwards).
    pub fn estimate(&self, model: &str, prompt_tokens: u64, max_output_tokens: Option<u64>) -> Charge {
        let output = max_output_tokens.unwrap_or(self.default_output_tokens);
        Charge {
            tokens: prompt_tokens.saturating_add(output),
            nanos: self.prices(model).cost(prompt_tokens, 0, output),
        }
    }

    /// What a served request of `model` actually cost, from the answer's usage.
    pub fn actual(&self, model: &str, prompt: u64, cached: u64, output: u64, total: u64) -> Charge {
        Charge {
            tokens: total.max(prompt.saturating_add(output)),
            nanos: self.prices(model).cost(prompt, cached, output),
        }
    }

    /// Whether `used` of `limit` is past the soft threshold.
    pub fn past_soft_threshold(&self, used: u64, limit: u64) -> bool {
        self.soft_threshold_permille
            .is_some_and(|p| u128::from(used) * 1000 >= u128::from(limit) * u128::from(p))
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

/// Format nano units of money as a decimal with at least two and at most nine decimals:
/// `500.00`, `0.0125`, `0.000000001`.
pub fn money_text(nanos: u64) -> String {
    let whole = nanos / NANOS_PER_UNIT;
    let frac = format!("{:09}", nanos % NANOS_PER_UNIT);
    let trimmed = frac.trim_end_matches('0');
    let digits = if trimmed.len() < 2 { &frac[..2] } else { trimmed };
    format!("{whole}.{digits}")
}

#[cfg(test)]
mod tests;
