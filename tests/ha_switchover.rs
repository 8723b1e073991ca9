//! HA switchover under load: two `epp` processes with `--ha-enable-leader-election` against a
//! local Kubernetes API server (the real JSON), pods serving real `/metrics` pages on loopback,
//! and a client that routes one request every 20 ms through whichever replica reports SERVING
//! on its gRPC health port, as a gateway behind readiness does. The leader is killed (SIGKILL:
//! no lease release) or stopped (SIGTERM: released); the test reports how long until the
//! follower is ready and routes, and in what state it takes over (metrics warm, prefix index
//! cold), and fails if the takeover misses the lease's bound.
//!
//! The figures are printed (`cargo test --test ha_switchover -- --nocapture`) and recorded in
//! `docs/reliability.md`.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

#[path = "support/fake_kube.rs"]
mod fake_kube;
#[path = "support/replica.rs"]
mod replica;
mod support;

use std::{
    ffi::OsStr,
    process::Command,
    time::{Duration, Instant},
};

use fake_kube::*;
use replica::{Replica, free_port, start_epp};
use serde_json::json;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn start_replica(kubeconfig: &std::path::Path, name: &str) -> Replica {
    let flags = [
        "--pool-name=pool",
        "--pool-namespace=ns",
        "--ha-enable-leader-election",
        "--secure-serving=false",
        "--metrics-endpoint-auth=false",
    ]
    .map(String::from);
    start_epp(
        &flags,
        &[
            ("KUBECONFIG", kubeconfig.as_os_str()),
            ("POD_NAME", OsStr::new(name)),
        ],
    )
}

/// Whether the replica's health service says SERVING (false when it does not answer).
async fn serving(health: u16) -> bool {
    let Ok(channel) = Channel::from_shared(format!("http://127.0.0.1:{health}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(200))
        .connect()
        .await
    else {
        return false;
    };
    let answer = tokio::time::timeout(
        Duration::from_millis(500),
        HealthClient::new(channel).check(HealthCheckRequest::default()),
    )
    .await;
    matches!(answer, Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving)
}

/// Route one request through the replica's ext_proc port; the destination it picked.
async fn route(grpc: u16) -> Option<String> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(200))
        .connect()
        .await
        .ok()?;
    let mut client =
        envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(req_headers(&[(":path", "/v1/completions")], false))
        .await
        .ok()?;
    tx.send(req_body(
        br#"{"model":"m","prompt":"shared prefix of the switchover test","max_tokens":3}"#,
        true,
    ))
    .await
    .ok()?;
    let mut inbound = tokio::time::timeout(Duration::from_secs(1), client.process(ReceiverStream::new(rx)))
        .await
        .ok()?
        .ok()?
        .into_inner();
    for _ in 0..4 {
        let msg = tokio::time::timeout(Duration::from_secs(1), inbound.message())
            .await
            .ok()?
            .ok()??;
        if let Answer::RequestHeaders {
            destination: Some(d), ..
        } = decode(&msg)
        {
            return Some(d);
        }
    }
    None
}

/// A value on the replica's `/metrics` page (summed over series; NaN while it does not answer).
async fn page_value(metrics: u16, name: &str) -> f64 {
    let Ok(answer) = reqwest::get(format!("http://127.0.0.1:{metrics}/metrics")).await else {
        return f64::NAN;
    };
    let text = answer.text().await.unwrap_or_default();
    let mut sum = 0.0;
    epp::scrape::exposition::for_each_sample(&text, |s| {
        if s.name == name {
            sum += s.value;
        }
    });
    sum
}

/// Pods on 127.0.0.2 and 127.0.0.3 (one port) serving a real vLLM page.
async fn serve_pages() -> u16 {
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/vllm-v1.prom"
    ))
    .unwrap();
    let port = free_port();
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
        let page = page.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || std::future::ready(page.clone())),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
    }
    port
}

/// The time from `from` until `done` holds, polled every 20 ms for at most `within`.
async fn time_until<F: std::future::Future<Output = bool>>(
    from: Instant,
    within: Duration,
    mut done: impl FnMut() -> F,
) -> Option<Duration> {
    while from.elapsed() < within {
        if done().await {
            return Some(from.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Two replicas, the first leading and routing; returns them once both are warm.
async fn pool_with_two_replicas(kube: &FakeKube, kubeconfig: &std::path::Path) -> (Replica, Replica) {
    let port = serve_pages().await;
    kube.apply(POOLS, pool("pool", json!({"app": "vllm"}), &[port]))
        .await;
    kube.apply(PODS, pod("a", "127.0.0.2", true, json!({"app": "vllm"})))
        .await;
    kube.apply(PODS, pod("b", "127.0.0.3", true, json!({"app": "vllm"})))
        .await;
    let first = start_replica(kubeconfig, "replica-1");
    let led = time_until(Instant::now(), Duration::from_secs(10), || serving(first.health)).await;
    assert!(led.is_some(), "the first replica leads");
    let second = start_replica(kubeconfig, "replica-2");
    // The follower is up and has scraped both pods (warm), but does not serve.
    let warm = time_until(Instant::now(), Duration::from_secs(10), || async {
        page_value(second.metrics, "inference_pool_ready_pods").await == 2.0
    })
    .await;
    assert!(warm.is_some(), "the follower's metrics are warm");
    assert!(!serving(second.health).await, "the follower is not ready");
    // Traffic through the leader fills its prefix index.
    for _ in 0..20 {
        assert!(route(first.grpc).await.is_some(), "the leader routes");
    }
    (first, second)
}

fn kubeconfig(kube: &FakeKube) -> tempfile_path::Path {
    tempfile_path::write(&format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://{}'}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: fake, user: u, namespace: ns}}\ncurrent-context: c\n",
        kube.addr
    ))
}

/// A kubeconfig file removed on drop.
mod tempfile_path {
    pub struct Path(std::path::PathBuf);
    impl std::ops::Deref for Path {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    pub fn write(text: &str) -> Path {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("epp-ha-{}-{n}.kubeconfig", std::process::id()));
        std::fs::write(&p, text).unwrap();
        Path(p)
    }
}

/// Kill or stop the leader while a client routes every 20 ms; how long until the follower
/// serves and routes, and its state then.
async fn switchover(signal: &str) -> (Duration, Duration, f64, f64) {
    let kube = FakeKube::start().await;
    let config = kubeconfig(&kube);
    let (mut first, second) = pool_with_two_replicas(&kube, &config).await;
    let killed = Instant::now();
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &first.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The client keeps trying the replica that is ready; none is until the follower leads.
    let ready = time_until(killed, Duration::from_secs(20), || serving(second.health))
        .await
        .unwrap_or_else(|| panic!("{signal}: the follower never became ready"));
    let prefix_entries = page_value(second.metrics, "inference_extension_prefix_indexer_size").await;
    let ready_pods = page_value(second.metrics, "inference_pool_ready_pods").await;
    let routes = time_until(killed, Duration::from_secs(20), || async {
        route(second.grpc).await.is_some()
    })
    .await
    .unwrap();
    let _ = first.child.wait();
    let lease = kube
        .get(LEASES, "epp-ns-pool.gateway-api-inference-extension.sigs.k8s.io")
        .await
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-2");
    println!(
        "{signal}: follower ready after {:.2} s, routing after {:.2} s; at takeover {ready_pods} ready pods scraped, {prefix_entries} prefix-index entries",
        ready.as_secs_f64(),
        routes.as_secs_f64()
    );
    (ready, routes, ready_pods, prefix_entries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_the_lease() {
    let (ready, routes, ready_pods, prefix_entries) = switchover("KILL").await;
    // Nobody releases the lease: the follower takes over once it expires (4 s after the last
    // renewal, at most 500 ms before the kill) at its next attempt (every 500 ms).
    assert!(
        ready >= Duration::from_secs(3),
        "not before the lease expired: {ready:?}"
    );
    assert!(
        ready <= Duration::from_millis(5500),
        "within the lease and one retry: {ready:?}"
    );
    assert!(routes >= ready);
    assert_eq!(ready_pods, 2.0, "metrics warm at takeover");
    assert_eq!(prefix_entries, 0.0, "the prefix index starts cold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_hands_over_within_a_retry() {
    let (ready, _, ready_pods, _) = switchover("TERM").await;
    // The leader releases the lease on SIGTERM: the follower's next attempt takes it.
    assert!(
        ready <= Duration::from_millis(1500),
        "within a retry period or so: {ready:?}"
    );
    assert_eq!(ready_pods, 2.0);
}
