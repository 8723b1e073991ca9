//! The Redis budget store against a real `redis-server` started by the test: counters shared by
//! two EPP budget instances (as two replicas would), atomic under concurrency, and the
//! fail-open / fail-closed behaviour when Redis dies.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

#[path = "support/redis_server.rs"]
mod redis_server;

use std::{sync::Arc, time::Duration};

use redis_server::start_redis;

use epp::{
    budget::Charge,
    config::PluginSpec,
    scheduler::{
        PluginName,
        admission::{BudgetDecision, TokenBudget},
    },
};

/// A budget of one replica over the Redis at `port`, as the config declares it.
fn replica(port: u16, fail_open: bool, tenants: &str) -> TokenBudget {
    let params = format!(
        "timeZone: Asia/Tokyo\ncurrency: USD\nprices:\n  m: {{input: 1.00, cachedInput: 0.10, output: 4.00}}\n\
         store: {{redis: {{url: \"redis://127.0.0.1:{port}\", failOpen: {fail_open}, timeout: 200ms}}}}\n\
         tenants:\n{tenants}"
    );
    let spec = PluginSpec {
        name: "b".into(),
        plugin_type: "token-budget".into(),
        parameters: serde_yaml_ng::from_str(&params).unwrap(),
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

fn budget(port: u16, fail_open: bool) -> TokenBudget {
    replica(port, fail_open, "  team-a: {tokens: 100}\n")
}

fn tokens(n: u64) -> Charge {
    Charge { tokens: n, nanos: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_budget_without_overshoot() {
    let redis = start_redis().await;
    let replicas = [
        Arc::new(budget(redis.port, true)),
        Arc::new(budget(redis.port, true)),
    ];
    // 100 simultaneous requests of 10 tokens against a 100-token budget, across both replicas.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let b = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            b.admit("team-a", "m", 10, Some(0), 1_000).await.unwrap()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), BudgetDecision::Admitted(_)) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10);
    // Settling returns unused tokens to both replicas' view.
    let BudgetDecision::Rejected(r) = replicas[0]
        .admit("team-a", "m", 10, Some(0), 1_001)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(r.used, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_is_shared() {
    let redis = start_redis().await;
    let (a, b) = (budget(redis.port, true), budget(redis.port, true));
    let BudgetDecision::Admitted(res) = a.admit("team-a", "m", 90, Some(0), 5_000).await.unwrap() else {
        panic!()
    };
    a.settle(&res, tokens(20)).await.unwrap();
    assert!(matches!(
        b.admit("team-a", "m", 80, Some(0), 5_001).await.unwrap(),
        BudgetDecision::Admitted(_)
    ));
    assert!(matches!(
        b.admit("team-a", "m", 1, Some(0), 5_002).await.unwrap(),
        BudgetDecision::Rejected(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_is_an_error_the_caller_can_fail_open_on() {
    let redis = start_redis().await;
    let open = budget(redis.port, true);
    let closed = budget(redis.port, false);
    assert!(matches!(
        open.admit("team-a", "m", 10, Some(0), 0).await.unwrap(),
        BudgetDecision::Admitted(_)
    ));
    drop(redis); // killed mid-test
    let started = std::time::Instant::now();
    assert!(open.admit("team-a", "m", 10, Some(0), 1).await.is_err());
    assert!(closed.admit("team-a", "m", 10, Some(0), 1).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the store timeout"
    );
    assert!(open.fail_open() && !closed.fail_open());
    assert!(
        open.note_store_health(false),
        "the first failure starts an outage (logged once)"
    );
    assert!(
        !open.note_store_health(false),
        "later failures are not logged again"
    );
    assert!(open.note_store_health(true), "recovery is logged once");
}

fn ms(text: &str) -> u64 {
    let t: jiff::Timestamp = text.parse().unwrap();
    u64::try_from(t.as_millisecond()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_calendar_totals_and_spend() {
    let redis = start_redis().await;
    let tenants = "  team-a:\n    limits: [{window: day, tokens: 1000}, {window: month, spend: 0.01}]\n";
    let (a, b) = (
        replica(redis.port, false, tenants),
        replica(redis.port, false, tenants),
    );
    // 23:30 UTC on 2 December is 08:30 on 3 December in Tokyo.
    let now = ms("2026-12-02T23:30:00Z");
    let BudgetDecision::Admitted(first) = a.admit("team-a", "m", 600, Some(0), now).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        first.reserved,
        Charge {
            tokens: 600,
            nanos: 600_000
        }
    );
    // The other replica sees the day's 600 tokens: 401 more are one token too many.
    let BudgetDecision::Rejected(r) = b.admit("team-a", "m", 401, Some(0), now).await.unwrap() else {
        panic!()
    };
    assert_eq!((r.counter.name().as_str(), r.used), ("tenant-day-tokens", 600));
    assert_eq!(r.retry_after_ms(), ms("2026-12-03T15:00:00Z") - now);
    // Settled from usage: 600 prompt tokens of which 500 cached and 100 output tokens cost
    // 100 × 1.00 + 500 × 0.10 + 100 × 4.00 per million = 0.00055.
    let actual = a.policy.actual("m", 600, 500, 100, 700);
    assert_eq!(
        actual,
        Charge {
            tokens: 700,
            nanos: 550_000
        }
    );
    a.settle(&first, actual).await.unwrap();
    // The next Tokyo day (from 15:00 UTC): the day's tokens are back, the month's money is not.
    let tomorrow = ms("2026-12-03T15:00:00Z");
    let BudgetDecision::Admitted(_) = b.admit("team-a", "m", 1000, Some(0), tomorrow).await.unwrap() else {
        panic!()
    };
    // A day later the month has 0.01 - 0.00055 - 0.001 = 0.00845 left: 8,450 tokens at
    // 1.00/M fit, 8,451 do not (a replica with a larger daily total shares the same counters).
    let later = ms("2026-12-04T15:00:00Z");
    let big = replica(
        redis.port,
        false,
        "  team-a:\n    limits: [{window: day, tokens: 100000}, {window: month, spend: 0.01}]\n",
    );
    let BudgetDecision::Rejected(r) = big.admit("team-a", "m", 8_451, Some(0), later).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        (r.counter.name().as_str(), r.used),
        ("tenant-month-spend", 1_550_000)
    );
    assert!(matches!(
        big.admit("team-a", "m", 8_450, Some(0), later).await.unwrap(),
        BudgetDecision::Admitted(_)
    ));
}
