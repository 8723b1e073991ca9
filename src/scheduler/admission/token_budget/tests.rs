use super::*;
use crate::budget::Period;

fn spec(params: &str) -> PluginSpec {
    PluginSpec {
        name: "b".into(),
        plugin_type: "token-budget".into(),
        parameters: serde_yaml_ng::from_str(params).unwrap(),
        path: "plugins[0]".into(),
    }
}

fn name() -> PluginName {
    PluginName {
        kind: "token-budget",
        name: "b".into(),
    }
}

fn budget(params: &str) -> TokenBudget {
    TokenBudget::from_config(name(), &spec(params)).unwrap()
}

fn refused(params: &str) -> String {
    match TokenBudget::from_config(name(), &spec(params)) {
        Ok(_) => panic!("accepted: {params}"),
        Err(e) => e.to_string(),
    }
}

fn ms(text: &str) -> u64 {
    let t: jiff::Timestamp = text.parse().unwrap();
    u64::try_from(t.as_millisecond()).unwrap()
}

const PARAMS: &str = "window: 60s\ntenants:\n  team-a:\n    tokens: 1000\n    models:\n      gpt-4o: {tokens: 100, fallbackModel: llama}\n      llama: {tokens: 500}\n";

async fn admitted(b: &TokenBudget, tenant: &str, model: &str, tokens: u64, now: u64) -> Admitted {
    match b.admit(tenant, model, tokens, Some(0), now).await.unwrap() {
        BudgetDecision::Admitted(a) => a,
        other => panic!("not admitted: {other:?}"),
    }
}

async fn rejected(b: &TokenBudget, tenant: &str, model: &str, tokens: u64, now: u64) -> Rejection {
    match b.admit(tenant, model, tokens, Some(0), now).await.unwrap() {
        BudgetDecision::Rejected(r) => r,
        other => panic!("not rejected: {other:?}"),
    }
}

#[tokio::test]
async fn reserve_reject_fallback_and_window_reset() {
    let b = budget(PARAMS);
    let a = admitted(&b, "team-a", "gpt-4o", 80, 0).await;
    assert_eq!(
        (a.tightest_tokens(), a.fallback.as_deref()),
        (Some((100, 20, 60_000)), None)
    );
    // gpt-4o is exhausted: the fallback model takes the request.
    let f = admitted(&b, "team-a", "gpt-4o", 80, 1).await;
    assert_eq!(f.fallback.as_deref(), Some("llama"));
    assert_eq!(f.model, "llama");
    assert_eq!(f.tightest_tokens(), Some((500, 420, 59_999)));
    // Unknown tenants are unlimited without a default tenant.
    assert_eq!(
        b.admit("other", "gpt-4o", 1_000_000, None, 2).await.unwrap(),
        BudgetDecision::Unlimited
    );
    // The tenant counter refuses with no fallback possible.
    let r = rejected(&b, "team-a", "llama", 900, 30_000).await;
    assert_eq!(
        (
            r.model.clone(),
            r.limit(),
            r.used,
            r.requested,
            r.retry_after_ms()
        ),
        (None, 1000, 160, 900, 30_000)
    );
    assert_eq!(
        r.message(),
        "Token budget exceeded for tenant team-a: limit 1000 tokens per 60s, used 160, requested 900. Try again in 30s."
    );
    // A new window re-admits.
    rejected(&b, "team-a", "llama", 450, 59_999).await;
    admitted(&b, "team-a", "llama", 450, 60_000).await;
}

#[tokio::test]
async fn settle_uses_actual_usage() {
    let b = budget(PARAMS);
    let a = admitted(&b, "team-a", "gpt-4o", 90, 0).await;
    b.settle(&a, Charge { tokens: 10, nanos: 0 }).await.unwrap();
    let again = admitted(&b, "team-a", "gpt-4o", 90, 1).await;
    assert_eq!(again.fallback, None);
}

const DAILY: &str = "
timeZone: America/New_York
tenants:
  team-a:
    tokens: 600
    limits: [{window: day, tokens: 1000}, {window: week, tokens: 1500}]
";

#[tokio::test]
async fn a_daily_total_refuses_one_token_over_and_the_next_local_day_admits() {
    let b = budget(DAILY);
    // 1 December 2026, local time in New York (UTC-5).
    let morning = ms("2026-12-01T14:00:00Z");
    admitted(&b, "team-a", "m", 600, morning).await;
    // The per-minute counter has turned; the day has 400 left.
    let r = rejected(&b, "team-a", "m", 401, morning + 60_000).await;
    assert_eq!(r.counter.name(), "tenant-day-tokens");
    assert_eq!((r.limit(), r.used, r.requested), (1000, 600, 401));
    // Local midnight is 05:00 UTC on 2 December: 14 h 59 min away.
    assert_eq!(r.retry_after_ms(), ms("2026-12-02T05:00:00Z") - morning - 60_000);
    assert_eq!(
        r.message(),
        "Token budget exceeded for tenant team-a: limit 1000 tokens per day, used 600, requested 401. Try again in 14h59m0s."
    );
    let a = admitted(&b, "team-a", "m", 400, morning + 60_000).await;
    assert_eq!(a.tightest_tokens(), Some((1000, 0, r.retry_after_ms())));
    // 04:59:59 UTC is still 1 December in New York.
    rejected(&b, "team-a", "m", 1, ms("2026-12-02T04:59:59Z")).await;
    // The next local day admits again, until the week's total refuses.
    admitted(&b, "team-a", "m", 500, ms("2026-12-02T05:00:00Z")).await;
    let week = rejected(&b, "team-a", "m", 1, ms("2026-12-02T05:01:00Z")).await;
    assert_eq!(week.counter.key.period, Period::Week);
    // The week ends at local midnight on Monday 7 December.
    assert_eq!(week.counter.window.ends_ms, ms("2026-12-07T05:00:00Z"));
    assert_eq!(
        week.message(),
        "Token budget exceeded for tenant team-a: limit 1500 tokens per week, used 1500, requested 1. Try again in 119h59m0s."
    );
    // Sunday 23:59:59 in New York is still that week; Monday's first second admits again.
    rejected(&b, "team-a", "m", 1, ms("2026-12-07T04:59:59Z")).await;
    admitted(&b, "team-a", "m", 600, ms("2026-12-07T05:00:00Z")).await;
}

const MONEY: &str = "
currency: EUR
prices:
  big: {input: 3.00, cachedInput: 0.30, output: 15.00}
  small: {input: 0.10, output: 0.40}
tenants:
  team-a:
    limits: [{window: month, spend: 1.00}]
    models:
      big: {limits: [{window: day, spend: 0.05}], fallbackModel: small}
";

#[tokio::test]
async fn spend_is_reserved_at_list_price_and_refused_by_one_cent() {
    let b = budget(MONEY);
    let now = ms("2026-12-02T10:00:00Z");
    // 10,000 prompt tokens of `big` at 3.00/M = 0.03 EUR.
    let a = admitted(&b, "team-a", "big", 10_000, now).await;
    assert_eq!(
        a.reserved,
        Charge {
            tokens: 10_000,
            nanos: 30_000_000
        }
    );
    assert_eq!(a.tightest_tokens(), None);
    // Without a fallback: 0.03 more would cross the day's 0.05 by one cent and is refused;
    // 0.019998 fits, and then 0.000003 more crosses it.
    let strict = budget(&MONEY.replace(", fallbackModel: small", ""));
    admitted(&strict, "team-a", "big", 10_000, now).await;
    let r = rejected(&strict, "team-a", "big", 10_000, now).await;
    assert_eq!(
        (r.counter.name(), r.used, r.requested),
        ("model-day-spend".to_owned(), 30_000_000, 30_000_000)
    );
    assert!(r.is_spend());
    rejected(&strict, "team-a", "big", 6_667, now).await;
    admitted(&strict, "team-a", "big", 6_666, now).await;
    rejected(&strict, "team-a", "big", 1, now).await;
    // The model refused, and the fallback `small` took the request in the first budget.
    let f = admitted(&b, "team-a", "big", 10_000, now).await;
    assert_eq!(f.fallback.as_deref(), Some("small"));
    assert_eq!(f.reserved.nanos, 1_000_000); // 10,000 × 0.10/M
    // Settlement prices cached prompt tokens at the cached price: 8,000 of 10,000 cached and
    // 100 output tokens cost 2,000 × 3.00 + 8,000 × 0.30 + 100 × 15.00 per million.
    let actual = b.policy.actual("big", 10_000, 8_000, 100, 10_100);
    assert_eq!(actual.nanos, 6_000_000 + 2_400_000 + 1_500_000);
    b.settle(&a, actual).await.unwrap();
    // The day's 0.05 now has 0.05 - 0.0099 = 0.0401 left: 13,366 prompt tokens still fit on
    // `big` (13,367 would cost 0.040101).
    assert_eq!(admitted(&b, "team-a", "big", 13_366, now).await.fallback, None);
    assert_eq!(
        admitted(&b, "team-a", "big", 1, now).await.fallback.as_deref(),
        Some("small")
    );
}

#[tokio::test]
async fn spend_refusals_name_the_money() {
    let b = budget(MONEY);
    let now = ms("2026-12-31T22:00:00Z");
    // 400,000 prompt tokens of `small` at 0.10/M cost 0.04 EUR: the month's 1.00 holds 25.
    for _ in 0..25 {
        admitted(&b, "team-a", "small", 400_000, now).await;
    }
    let r = rejected(&b, "team-a", "small", 1, now).await;
    assert_eq!(r.counter.name(), "tenant-month-spend");
    assert_eq!(
        r.message(),
        "Spend budget exceeded for tenant team-a: limit 1.00 EUR per month, used 1.00 EUR, requested 0.0000001 EUR. Try again in 2h0m0s."
    );
    // January admits again.
    admitted(&b, "team-a", "small", 1, ms("2027-01-01T00:00:00Z")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_requests_against_a_budget_for_ten_admit_ten() {
    let b = Arc::new(budget(
        "tenants:\n  t:\n    limits: [{window: day, tokens: 100}]\n",
    ));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { b.admit("t", "m", 10, Some(0), 5).await.unwrap() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), BudgetDecision::Admitted(_)) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10);
}

#[test]
fn config_mistakes_are_refused_with_their_path() {
    assert_eq!(
        refused("tenants: {a: {limits: [{window: fortnight, tokens: 1}]}}"),
        "plugins[0].parameters.tenants.a.limits[0].window: invalid duration \"fortnight\"; or one of day, week, month"
    );
    assert_eq!(
        refused("tenants: {a: {limits: [{window: day}]}}"),
        "plugins[0].parameters.tenants.a.limits[0]: names neither tokens nor spend"
    );
    assert_eq!(
        refused("tenants: {a: {tokens: 5, limits: [{window: 60s, tokens: 1}]}}"),
        "plugins[0].parameters.tenants.a.limits[0].tokens: a second tokens limit per 60s"
    );
    assert_eq!(
        refused("tenants: {a: {models: {gpt: {spend: 5}}}}"),
        "plugins[0].parameters.tenants.a.models.gpt.spend: model gpt has no price under prices"
    );
    assert_eq!(
        refused("tenants: {a: {models: {gpt: {fallbackModel: x}}}}"),
        "plugins[0].parameters.tenants.a.models.gpt: names no limit (tokens, spend or limits)"
    );
    assert_eq!(
        refused("tenants: {a: {spend: -1}}"),
        "plugins[0].parameters.tenants.a.spend: -1 is not an amount between 0 and 9000000"
    );
    assert_eq!(
        refused("prices: {m: {input: .nan, output: 1}}"),
        "plugins[0].parameters.prices.m.input: NaN is not an amount between 0 and 9000000"
    );
    assert!(
        refused("timeZone: Mars/Olympus")
            .starts_with("plugins[0].parameters.timeZone: unknown time zone \"Mars/Olympus\"")
    );
    assert_eq!(
        refused("currency: dollars"),
        "plugins[0].parameters.currency: \"dollars\" is not an ISO 4217 code such as USD"
    );
    assert_eq!(
        refused("softThreshold: 80"),
        "plugins[0].parameters.softThreshold: 80 is not in (0, 1]"
    );
    assert!(refused("tenantFrom: certificate").contains("tenantFrom"));
}

#[test]
fn spiffe_ids_name_the_namespace_or_the_service_account() {
    let ns = TenantSource::Spiffe {
        service_account: false,
    };
    let sa = TenantSource::Spiffe {
        service_account: true,
    };
    let id = "spiffe://cluster.local/ns/team-a/sa/chatbot";
    assert_eq!(ns.from_spiffe(id).as_deref(), Some("team-a"));
    assert_eq!(sa.from_spiffe(id).as_deref(), Some("team-a/chatbot"));
    for bad in [
        "https://cluster.local/ns/team-a/sa/chatbot",
        "spiffe://cluster.local/ns/team-a",
        "spiffe://cluster.local/ns//sa/x",
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://cluster.local",
    ] {
        assert_eq!(ns.from_spiffe(bad), None, "{bad}");
    }
    assert_eq!(TenantSource::Header("x".into()).from_spiffe(id), None);
    let b = budget("tenantFrom: spiffeNamespace");
    assert_eq!(b.tenant_source, ns);
    assert_eq!(b.tenant_source.header(), None);
}

/// The pure library has no Redis client: a config asking for the shared store is refused by name,
/// never counted in memory behind the operator's back.
#[cfg(not(feature = "server"))]
#[test]
fn without_the_server_feature_a_redis_store_is_refused() {
    assert_eq!(
        refused("store: {redis: {url: \"redis://127.0.0.1:6379\"}}\ntenants: {a: {tokens: 5}}"),
        "plugins[0].parameters.store.redis: this build of epp has no Redis client (the `server` feature is off), so redis://127.0.0.1:6379 cannot be used; use `store: {memory: {}}`"
    );
}
