//! Two `epp` processes sharing one budget in a real `redis-server`, driven over ext_proc as
//! Envoy drives them: requests of one tenant alternate between the replicas, each answer's usage
//! settles the shared counters, and the request that would cross the daily total is refused by
//! whichever replica gets it, with the other replica's usage counted.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/replica.rs"]
mod replica;
mod support;

use std::time::Duration;

use redis_server::start_redis;
use replica::{Replica, start_epp};
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A model server's `/metrics` (a real vLLM page) on 127.0.0.1: the replicas are ready once
/// they have scraped it. The model server's answers are the test's own.
async fn serve_metrics() -> u16 {
    let page = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/vllm-v1.prom"
    ))
    .unwrap();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(page.clone())),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn start_replica(redis_port: u16, pod_port: u16) -> Replica {
    let config = format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: token-budget
  parameters:
    timeZone: America/New_York
    tenants:
      team-a: {{limits: [{{window: day, tokens: 100}}]}}
    store: {{redis: {{url: \"redis://127.0.0.1:{redis_port}\", failOpen: false, timeout: 500ms}}}}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
"
    );
    let flags = [
        format!("--endpoints=127.0.0.1:{pod_port}"),
        "--secure-serving=false".to_owned(),
        "--metrics-endpoint-auth=false".to_owned(),
        format!("--config-text={config}"),
    ];
    start_epp(&flags, &[])
}

/// Wait (at most 10 s) until the replica's health service says SERVING.
async fn wait_serving(r: &Replica) {
    let mut seen = Vec::new();
    for _ in 0..200 {
        let status = match Channel::from_shared(format!("http://127.0.0.1:{}", r.health))
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => match HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
            {
                Ok(answer) => format!("{:?}", answer.get_ref().status()),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if status == "Serving" {
            return;
        }
        seen.push(status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen.dedup();
    panic!("replica on {} never served: {seen:?}", r.grpc);
}

/// One request of `tenant` through the replica, answered by the model server with `usage`
/// totalling 15 tokens: `Ok(())` when routed (and settled), `Err((status, body))` when the
/// EPP answered itself.
async fn request(r: &Replica, tenant: &str) -> Result<(), (i32, String)> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", r.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    tx.send(req_headers(
        &[
            (":path", "/v1/completions"),
            ("x-gateway-inference-fairness-id", tenant),
        ],
        false,
    ))
    .await
    .unwrap();
    // "abcdefgh" is 10 bytes with its quotes: 2 prompt tokens (bytes / 4), plus max_tokens 10:
    // 12 reserved.
    tx.send(req_body(
        br#"{"model":"m","prompt":"abcdefgh","max_tokens":10}"#,
        true,
    ))
    .await
    .unwrap();
    let mut inbound = client
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // The headers answer with the destination, then the body.
    for _ in 0..2 {
        let msg = inbound.message().await.unwrap().unwrap();
        if let Answer::Immediate { status, body, .. } = decode(&msg) {
            return Err((status, body));
        }
    }
    tx.send(resp_headers(
        &[(":status", "200"), ("content-type", "application/json")],
        false,
    ))
    .await
    .unwrap();
    inbound.message().await.unwrap().unwrap();
    let usage = br#"{"object":"text_completion","usage":{"prompt_tokens":5,"completion_tokens":10,"total_tokens":15}}"#;
    tx.send(resp_body(usage, true)).await.unwrap();
    inbound.message().await.unwrap().unwrap();
    drop(tx);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_epp_processes_share_a_daily_total_in_redis() {
    let redis = start_redis().await;
    let pod = serve_metrics().await;
    let replicas = [start_replica(redis.port, pod), start_replica(redis.port, pod)];
    for r in &replicas {
        wait_serving(r).await;
    }
    // 15 tokens each, settled: six requests use 90 of the day's 100, alternating replicas.
    for i in 0..6 {
        request(&replicas[i % 2], "team-a")
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e:?}"));
        // Settlement is written after the answer: give it a moment before the next admission.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The seventh (12 reserved) would cross 100 on either replica.
    for r in &replicas {
        let (status, body) = request(r, "team-a").await.unwrap_err();
        assert_eq!(status, 429, "{body}");
        assert!(
            body.contains(
                "Token budget exceeded for tenant team-a: limit 100 tokens per day, used 90, requested 12."
            ),
            "{body}"
        );
    }
    // Each replica counted the refusal it answered.
    for r in &replicas {
        let page = reqwest::get(format!("http://127.0.0.1:{}/metrics", r.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            page.contains(r#"inference_extension_budget_rejections_total{model_name="m",tenant="team-a"} 1"#),
            "{page}"
        );
    }
    // Another tenant is not listed: unlimited on both.
    for r in &replicas {
        request(r, "team-b").await.unwrap();
    }
}
