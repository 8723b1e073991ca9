//! The Redis budget store against a real `redis-server` started by the test: counters shared by
//! two EPP budget instances (as two replicas would), atomic under concurrency, and the
//! fail-open / fail-closed behaviour when Redis dies.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use epp::{
    budget::{BudgetPolicy, RedisStore, TenantBudget},
    scheduler::{
        PluginName,
        admission::{BudgetDecision, TokenBudget},
    },
};

struct Redis {
    child: Child,
    port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_redis() -> Redis {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (apt-get install redis-server; .ci/run does it)");
    let store = RedisStore::new(
        &format!("redis://127.0.0.1:{port}"),
        Duration::from_secs(60),
        Duration::from_millis(200),
    )
    .unwrap();
    for _ in 0..100 {
        if store.ping().await.is_ok() {
            return Redis { child, port };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("redis-server did not answer within 5 s");
}

fn budget(port: u16, fail_open: bool) -> TokenBudget {
    let policy = BudgetPolicy {
        tenant_header: "x-gateway-inference-fairness-id".into(),
        window: Duration::from_secs(60),
        tenants: [(
            "team-a".to_owned(),
            TenantBudget {
                tokens: Some(100),
                models: Default::default(),
            },
        )]
        .into(),
        default_tenant: None,
        default_output_tokens: 0,
    };
    let store = RedisStore::new(
        &format!("redis://127.0.0.1:{port}"),
        policy.window,
        Duration::from_millis(200),
    )
    .unwrap();
    TokenBudget::with_store(
        PluginName {
            kind: "token-budget",
            name: "b".into(),
        },
        policy,
        Arc::new(store),
        fail_open,
    )
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
            b.admit("team-a", "m", 10, 1_000).await.unwrap()
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
    let BudgetDecision::Rejected(r) = replicas[0].admit("team-a", "m", 10, 1_001).await.unwrap() else {
        panic!()
    };
    assert_eq!(r.used, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_is_shared() {
    let redis = start_redis().await;
    let (a, b) = (budget(redis.port, true), budget(redis.port, true));
    let BudgetDecision::Admitted(res) = a.admit("team-a", "m", 90, 5_000).await.unwrap() else {
        panic!()
    };
    a.settle(&res, 20).await.unwrap();
    assert!(matches!(
        b.admit("team-a", "m", 80, 5_001).await.unwrap(),
        BudgetDecision::Admitted(_)
    ));
    assert!(matches!(
        b.admit("team-a", "m", 1, 5_002).await.unwrap(),
        BudgetDecision::Rejected(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_is_an_error_the_caller_can_fail_open_on() {
    let redis = start_redis().await;
    let open = budget(redis.port, true);
    let closed = budget(redis.port, false);
    assert!(matches!(
        open.admit("team-a", "m", 10, 0).await.unwrap(),
        BudgetDecision::Admitted(_)
    ));
    drop(redis); // killed mid-test
    let started = std::time::Instant::now();
    assert!(open.admit("team-a", "m", 10, 1).await.is_err());
    assert!(closed.admit("team-a", "m", 10, 1).await.is_err());
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
