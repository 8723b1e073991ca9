//! Kubernetes discovery, objectives and leader election against a local API server that speaks
//! the real JSON (lists, watch streams, bookmarks, 410 Gone, optimistic concurrency).

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

#[path = "support/fake_kube.rs"]
mod fake_kube;

use std::time::Duration;

use epp::{
    app::{RunningApp, start_with_client},
    config::{Flags, normalize_go_args},
};
use fake_kube::*;
use serde_json::json;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn flags(extra: &[&str]) -> Flags {
    let mut args: Vec<String> = [
        "epp",
        "--pool-namespace=ns",
        "--secure-serving=false",
        "--grpc-port=0",
        "--grpc-health-port=0",
        "--metrics-port=0",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    <Flags as clap::Parser>::try_parse_from(normalize_go_args(args)).unwrap()
}

/// The endpoint set as sorted `name address` strings, and whether the pool is synced.
fn endpoints(app: &RunningApp) -> (Vec<String>, bool) {
    let snap = app.reader.load();
    let mut v: Vec<String> = snap
        .endpoints
        .iter()
        .map(|e| format!("{} {}", e.spec.key.name, e.spec.address))
        .collect();
    v.sort();
    (v, snap.synced)
}

/// Poll (bounded: 10 s) until `want` holds.
async fn eventually(app: &RunningApp, want: (Vec<&str>, bool), what: &str) {
    let want = (want.0.into_iter().map(String::from).collect::<Vec<_>>(), want.1);
    for _ in 0..400 {
        if endpoints(app) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: expected {want:?}, have {:?}", endpoints(app));
}

/// The `readiness` status of the app's health service.
async fn readiness(app: &RunningApp) -> ServingStatus {
    let channel =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", app.health_addr.port()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Poll (bounded: 10 s) until the app's readiness is `want`.
async fn eventually_ready(app: &RunningApp, want: ServingStatus, what: &str) {
    let mut have = ServingStatus::Unknown;
    for _ in 0..400 {
        have = readiness(app).await;
        if have == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: readiness {have:?}, expected {want:?}");
}

/// Regression: without HA, readiness stopped following the pool once `start` returned (its
/// leadership channel closed and the task watching both ended), so a pool that synced after
/// that (any real API server) left the EPP not ready forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ha_readiness_follows_a_pool_that_syncs_after_start() {
    let kube = FakeKube::start().await;
    let app = start_with_client(flags(&["--pool-name=pool"]), Some(kube.client()))
        .await
        .unwrap();
    // No pool yet: not ready, and still not ready well after `start` returned.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(readiness(&app).await, ServingStatus::NotServing);
    kube.apply(POOLS, pool("pool", json!({"app": "vllm"}), &[8000]))
        .await;
    kube.apply(PODS, pod("a", "10.0.0.1", true, json!({"app": "vllm"})))
        .await;
    eventually(&app, (vec!["a-rank-0 10.0.0.1:8000"], true), "synced").await;
    eventually_ready(&app, ServingStatus::Serving, "pool synced").await;
    kube.delete(POOLS, "pool").await;
    eventually_ready(&app, ServingStatus::NotServing, "pool deleted").await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_pool_through_pod_churn_port_changes_and_deletion() {
    let kube = FakeKube::start().await;
    kube.apply(POOLS, pool("pool", json!({"app": "vllm"}), &[8000]))
        .await;
    kube.apply(PODS, pod("a", "10.0.0.1", true, json!({"app": "vllm"})))
        .await;
    kube.apply(PODS, pod("b", "10.0.0.2", false, json!({"app": "vllm"})))
        .await;
    kube.apply(PODS, pod("c", "10.0.0.3", true, json!({"app": "other"})))
        .await;
    let app = start_with_client(flags(&["--pool-name=pool"]), Some(kube.client()))
        .await
        .unwrap();

    eventually(
        &app,
        (vec!["a-rank-0 10.0.0.1:8000"], true),
        "initial sync: ready pods only",
    )
    .await;

    kube.apply(PODS, pod("b", "10.0.0.2", true, json!({"app": "vllm"})))
        .await;
    eventually(
        &app,
        (vec!["a-rank-0 10.0.0.1:8000", "b-rank-0 10.0.0.2:8000"], true),
        "pod became ready",
    )
    .await;

    kube.delete(PODS, "a").await;
    eventually(&app, (vec!["b-rank-0 10.0.0.2:8000"], true), "pod deleted").await;

    kube.apply(PODS, pod("b", "10.0.0.2", true, json!({"app": "other"})))
        .await;
    eventually(&app, (vec![], true), "labels no longer match").await;

    // Selector and port change: full resync against the new selector.
    kube.apply(POOLS, pool("pool", json!({"app": "other"}), &[8000, 8001]))
        .await;
    eventually(
        &app,
        (
            vec![
                "b-rank-0 10.0.0.2:8000",
                "b-rank-1 10.0.0.2:8001",
                "c-rank-0 10.0.0.3:8000",
                "c-rank-1 10.0.0.3:8001",
            ],
            true,
        ),
        "selector and ports changed",
    )
    .await;

    // The active-ports annotation narrows one pod to one port.
    let mut c = pod("c", "10.0.0.3", true, json!({"app": "other"}));
    c["metadata"]["annotations"] = json!({"inference.networking.k8s.io/active-ports": "8001"});
    kube.apply(PODS, c).await;
    eventually(
        &app,
        (
            vec![
                "b-rank-0 10.0.0.2:8000",
                "b-rank-1 10.0.0.2:8001",
                "c-rank-1 10.0.0.3:8001",
            ],
            true,
        ),
        "annotation",
    )
    .await;

    kube.delete(POOLS, "pool").await;
    eventually(&app, (vec![], false), "pool deleted: no endpoints, not ready").await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_resume_after_410_gone_and_disconnects() {
    let kube = FakeKube::start().await;
    kube.apply(POOLS, pool("pool", json!({"app": "vllm"}), &[8000]))
        .await;
    kube.apply(PODS, pod("a", "10.0.0.1", true, json!({"app": "vllm"})))
        .await;
    let app = start_with_client(flags(&["--pool-name=pool"]), Some(kube.client()))
        .await
        .unwrap();
    eventually(&app, (vec!["a-rank-0 10.0.0.1:8000"], true), "initial").await;

    // History is compacted and every watch dropped; a change happens while nobody watches.
    kube.compact().await;
    kube.apply(PODS, pod("b", "10.0.0.2", true, json!({"app": "vllm"})))
        .await;
    eventually(
        &app,
        (vec!["a-rank-0 10.0.0.1:8000", "b-rank-0 10.0.0.2:8000"], true),
        "relisted after 410",
    )
    .await;

    // And the watch works again afterwards.
    kube.delete(PODS, "a").await;
    eventually(&app, (vec!["b-rank-0 10.0.0.2:8000"], true), "watching again").await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objectives_of_the_pool_set_priorities() {
    let kube = FakeKube::start().await;
    kube.apply(POOLS, pool("pool", json!({"app": "vllm"}), &[8000]))
        .await;
    let objective = |name: &str, pool: &str, priority: i32| {
        json!({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceObjective",
               "metadata": {"name": name, "namespace": "ns"}, "spec": {"priority": priority, "poolRef": {"name": pool}}})
    };
    kube.apply(OBJECTIVES, objective("batch", "pool", -1)).await;
    kube.apply(OBJECTIVES, objective("other-pool", "elsewhere", 5))
        .await;
    let app = start_with_client(flags(&["--pool-name=pool"]), Some(kube.client()))
        .await
        .unwrap();
    let priorities = |app: &RunningApp| {
        let mut v: Vec<(String, i32)> = app
            .reader
            .load()
            .objectives
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort();
        v
    };
    for _ in 0..400 {
        if priorities(&app) == vec![("batch".to_owned(), -1)] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(priorities(&app), vec![("batch".to_owned(), -1)]);
    kube.apply(OBJECTIVES, objective("chat", "pool", 2)).await;
    for _ in 0..400 {
        if priorities(&app).len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        priorities(&app),
        vec![("batch".to_owned(), -1), ("chat".to_owned(), 2)]
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_selector_mode_needs_no_pool_crd() {
    let kube = FakeKube::start().await;
    kube.apply(
        PODS,
        pod("a", "10.0.0.1", true, json!({"app": "vllm", "tier": "gpu"})),
    )
    .await;
    kube.apply(PODS, pod("b", "10.0.0.2", true, json!({"app": "vllm"})))
        .await;
    let app = start_with_client(
        flags(&[
            "--endpoint-selector=app=vllm,tier=gpu",
            "--endpoint-target-ports=8000,8000,9000",
        ]),
        Some(kube.client()),
    )
    .await
    .unwrap();
    eventually(
        &app,
        (vec!["a-rank-0 10.0.0.1:8000", "a-rank-1 10.0.0.1:9000"], true),
        "standalone",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_hands_over_and_followers_stay_warm() {
    let kube = FakeKube::start().await;
    kube.apply(POOLS, pool("pool", json!({"app": "vllm"}), &[8000]))
        .await;
    kube.apply(PODS, pod("a", "10.0.0.1", true, json!({"app": "vllm"})))
        .await;
    let first = start_with_client(
        flags(&["--pool-name=pool", "--ha-enable-leader-election"]),
        Some(kube.client()),
    )
    .await
    .unwrap();
    until_leader(&first, 5000, "the first replica leads").await;
    let second = start_with_client(
        flags(&["--pool-name=pool", "--ha-enable-leader-election"]),
        Some(kube.client()),
    )
    .await
    .unwrap();
    // The follower discovers the pool too (warm), but does not lead.
    eventually(
        &second,
        (vec!["a-rank-0 10.0.0.1:8000"], true),
        "follower datastore warm",
    )
    .await;
    assert!(!*second.leader.borrow());
    let lease = kube
        .get(LEASES, "epp-ns-pool.gateway-api-inference-extension.sigs.k8s.io")
        .await
        .unwrap();
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 4);

    // The leader shuts down and releases the lease: the follower takes over within a renewal.
    first.shutdown().await;
    until_leader(&second, 10000, "the follower took over").await;
    let lease = kube
        .get(LEASES, "epp-ns-pool.gateway-api-inference-extension.sigs.k8s.io")
        .await
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    second.shutdown().await;
}

/// Wait (polled every 25 ms, at most `within_ms`) until `app` leads; fail with `what` if not.
async fn until_leader(app: &RunningApp, within_ms: u64, what: &str) {
    for _ in 0..within_ms / 25 {
        if *app.leader.borrow() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(*app.leader.borrow(), "{what}");
}

/// Whether `app` stays leader for all of `span` (polled every 25 ms).
async fn leads_throughout(app: &RunningApp, span: Duration) -> bool {
    let until = tokio::time::Instant::now() + span;
    while tokio::time::Instant::now() < until {
        if !*app.leader.borrow() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_rides_out_failed_renewals_until_the_renew_deadline() {
    let kube = FakeKube::start().await;
    kube.apply(POOLS, pool("pool", json!({"app": "vllm"}), &[8000]))
        .await;
    let app = start_with_client(
        flags(&[
            "--pool-name=pool",
            "--ha-enable-leader-election",
            "--ha-lease-duration=2s",
            "--ha-renew-deadline=1s",
            "--ha-retry-period=100ms",
        ]),
        Some(kube.client()),
    )
    .await
    .unwrap();
    until_leader(&app, 5000, "the replica leads").await;
    // An API blip shorter than the renew deadline: still leading (and ready) throughout.
    kube.set_leases_down(true);
    assert!(
        leads_throughout(&app, Duration::from_millis(500)).await,
        "a leader steps down only past the renew deadline"
    );
    kube.set_leases_down(false);
    assert!(leads_throughout(&app, Duration::from_millis(300)).await);
    // An outage past the deadline: it steps down (before its lease of 2 s could be taken).
    kube.set_leases_down(true);
    let down_at = tokio::time::Instant::now();
    while *app.leader.borrow() && down_at.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let stepped_down_after = down_at.elapsed();
    assert!(!*app.leader.borrow(), "stepped down");
    assert!(
        stepped_down_after >= Duration::from_millis(800) && stepped_down_after < Duration::from_secs(2),
        "past the 1 s deadline, within the 2 s lease: {stepped_down_after:?}"
    );
    // The API answers again: it leads again.
    kube.set_leases_down(false);
    until_leader(&app, 5000, "leads again once renewals succeed").await;
    app.shutdown().await;
}
