//! The headers a budget adds to answers: OpenAI's `x-ratelimit-*-tokens` for the tightest token
//! limit, the IETF draft's `ratelimit-policy` and `ratelimit` for every limit (tokens and
//! money, each named `<layer>-<window>-<unit>`), and a warning for limits past the soft
//! threshold. Money appears in millionths of the currency (`qu="usd-micros"`): the draft's
//! fields carry integers.

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;

use super::{
    encode::set_header,
    wire::{
        BUDGET_WARNING, MODEL_FALLBACK, RATELIMIT, RATELIMIT_LIMIT_TOKENS, RATELIMIT_POLICY,
        RATELIMIT_REMAINING_TOKENS, RATELIMIT_RESET_TOKENS,
    },
};
use crate::{
    budget::{BudgetPolicy, Counter, Period, Unit, reset_text},
    scheduler::admission::{Admitted, Rejection},
};

/// Headers of an answer the budget admitted.
pub fn admitted(a: &Admitted, policy: &BudgetPolicy) -> Vec<HeaderValueOption> {
    let mut out = Vec::with_capacity(7);
    if let Some((limit, remaining, reset_ms)) = a.tightest_tokens() {
        out.extend(openai(limit, remaining, reset_ms));
    }
    let usage: Vec<(&Counter, u64)> = a.usage().collect();
    if !usage.is_empty() {
        let policies: Vec<String> = usage
            .iter()
            .map(|(c, _)| policy_item(c, &policy.currency))
            .collect();
        let left: Vec<String> = usage.iter().map(|(c, used)| remaining_item(c, *used)).collect();
        out.push(set_header(RATELIMIT_POLICY, policies.join(", ").as_bytes()));
        out.push(set_header(RATELIMIT, left.join(", ").as_bytes()));
    }
    let warnings: Vec<String> = usage
        .iter()
        .filter(|(c, used)| policy.past_soft_threshold(*used, c.limit))
        .map(|(c, used)| format!("{} {}%", c.name(), percent(*used, c.limit)))
        .collect();
    if !warnings.is_empty() {
        out.push(set_header(BUDGET_WARNING, warnings.join(", ").as_bytes()));
    }
    if let Some(f) = &a.fallback {
        out.push(set_header(MODEL_FALLBACK, f.as_bytes()));
    }
    out
}

/// Headers of a refusal: when to retry, and the limit that refused.
pub fn refused(r: &Rejection) -> Vec<HeaderValueOption> {
    let ms = r.retry_after_ms();
    let mut out = vec![
        set_header("retry-after", ms.div_ceil(1000).max(1).to_string().as_bytes()),
        set_header("retry-after-ms", ms.to_string().as_bytes()),
    ];
    if !r.is_spend() {
        out.extend(openai(r.limit(), r.limit().saturating_sub(r.used), ms));
    }
    out.push(set_header(
        RATELIMIT_POLICY,
        policy_item(&r.counter, &r.currency).as_bytes(),
    ));
    out.push(set_header(
        RATELIMIT,
        remaining_item(&r.counter, r.used).as_bytes(),
    ));
    out
}

/// OpenAI-style token rate-limit headers.
fn openai(limit: u64, remaining: u64, reset_ms: u64) -> [HeaderValueOption; 3] {
    [
        set_header(RATELIMIT_LIMIT_TOKENS, limit.to_string().as_bytes()),
        set_header(RATELIMIT_REMAINING_TOKENS, remaining.to_string().as_bytes()),
        set_header(RATELIMIT_RESET_TOKENS, reset_text(reset_ms).as_bytes()),
    ]
}

/// A counter's amount in the header's unit: tokens, or millionths of the currency.
fn header_amount(c: &Counter, v: u64) -> u64 {
    match c.key.unit {
        Unit::Tokens => v,
        Unit::Spend => v / 1000,
    }
}

fn policy_item(c: &Counter, currency: &str) -> String {
    let unit = match c.key.unit {
        Unit::Tokens => "tokens".to_owned(),
        Unit::Spend => format!("{}-micros", currency.to_ascii_lowercase()),
    };
    let window = match c.key.period {
        Period::Fixed { ms } => format!(";w={}", ms.div_ceil(1000)),
        // A calendar period's length varies; its reset is in `ratelimit`.
        _ => String::new(),
    };
    format!(
        "\"{}\";q={};qu=\"{unit}\"{window}",
        c.name(),
        header_amount(c, c.limit)
    )
}

fn remaining_item(c: &Counter, used: u64) -> String {
    format!(
        "\"{}\";r={};t={}",
        c.name(),
        header_amount(c, c.limit.saturating_sub(used)),
        c.window.remaining_ms.div_ceil(1000)
    )
}

fn percent(used: u64, limit: u64) -> u64 {
    if limit == 0 {
        return 100;
    }
    u64::try_from(u128::from(used) * 100 / u128::from(limit)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Charge, CounterKey, LayerKey, Window};

    fn header_text(h: &[HeaderValueOption]) -> Vec<(String, String)> {
        h.iter()
            .filter_map(|o| o.header.as_ref())
            .map(|h| (h.key.clone(), String::from_utf8_lossy(&h.raw_value).into_owned()))
            .collect()
    }

    fn counter(layer: LayerKey, period: Period, unit: Unit, limit: u64, remaining_ms: u64) -> Counter {
        Counter {
            key: CounterKey { layer, period, unit },
            limit,
            window: Window {
                id: 1,
                ends_ms: remaining_ms,
                remaining_ms,
            },
        }
    }

    #[test]
    fn every_limit_is_listed_and_the_ones_past_the_threshold_warned() {
        let policy = BudgetPolicy {
            soft_threshold_permille: Some(800),
            ..BudgetPolicy::default()
        };
        let a = Admitted {
            counters: vec![
                counter(
                    LayerKey::tenant("t"),
                    Period::Fixed { ms: 60_000 },
                    Unit::Tokens,
                    1000,
                    30_500,
                ),
                counter(
                    LayerKey::tenant("t"),
                    Period::Day,
                    Unit::Tokens,
                    10_000,
                    3_600_000,
                ),
                counter(
                    LayerKey::model("t", "m"),
                    Period::Month,
                    Unit::Spend,
                    5_000_000_000,
                    86_400_000,
                ),
            ],
            reserved: Charge {
                tokens: 100,
                nanos: 1,
            },
            used: vec![100, 8_300, 4_500_000_000],
            model: "m".into(),
            fallback: Some("m".into()),
        };
        assert_eq!(
            header_text(&admitted(&a, &policy)),
            [
                // The token limit with the fewest tokens left: this minute's.
                ("x-ratelimit-limit-tokens", "1000"),
                ("x-ratelimit-remaining-tokens", "900"),
                ("x-ratelimit-reset-tokens", "31s"),
                (
                    "ratelimit-policy",
                    "\"tenant-60s-tokens\";q=1000;qu=\"tokens\";w=60, \"tenant-day-tokens\";q=10000;qu=\"tokens\", \"model-month-spend\";q=5000000;qu=\"usd-micros\""
                ),
                (
                    "ratelimit",
                    "\"tenant-60s-tokens\";r=900;t=31, \"tenant-day-tokens\";r=1700;t=3600, \"model-month-spend\";r=500000;t=86400"
                ),
                ("x-gateway-budget-warning", "tenant-day-tokens 83%, model-month-spend 90%"),
                ("x-gateway-model-fallback", "m"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }
}
