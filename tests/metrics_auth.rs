//! `--metrics-endpoint-auth` (upstream's default `true`): `/metrics` requires a bearer token that
//! passes a TokenReview and a SubjectAccessReview for `get /metrics`, asked of a local API server
//! speaking the real review JSON. Regression (security issue): the flag used to be accepted and
//! ignored, so a drop-in replacement silently exposed its metrics.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

#[path = "support/fake_kube.rs"]
mod fake_kube;

use epp::{
    app::{RunningApp, start_with_client},
    config::{Flags, normalize_go_args},
};
use fake_kube::*;
use serde_json::json;

async fn app(kube: &FakeKube, extra: &[&str]) -> RunningApp {
    kube.apply(POOLS, pool("pool", json!({"app": "vllm"}), &[8000]))
        .await;
    let mut args: Vec<String> = [
        "epp",
        "--pool-name=pool",
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
    let flags = <Flags as clap::Parser>::try_parse_from(normalize_go_args(args)).unwrap();
    start_with_client(flags, Some(kube.client())).await.unwrap()
}

/// Status and body of `/metrics` with `token`.
async fn scrape(app: &RunningApp, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("http://127.0.0.1:{}/metrics", app.metrics_addr.port()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A scrape once the pool gauges are on the page: they appear with the pool's first sync, which
/// a loaded machine may not have reached when the app has just started (bounded: 5 s).
async fn scrape_synced(app: &RunningApp, token: Option<&str>) -> (u16, String) {
    let mut last = scrape(app, token).await;
    for _ in 0..100 {
        if last.0 != 200 || last.1.contains("# TYPE inference_pool_ready_pods gauge") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        last = scrape(app, token).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_token_the_cluster_authorizes() {
    let kube = FakeKube::start().await;
    kube.add_token("prometheus-token", "system:serviceaccount:monitoring:prometheus")
        .await;
    kube.add_token("other-token", "system:serviceaccount:ns:other")
        .await;
    kube.allow_metrics("system:serviceaccount:monitoring:prometheus")
        .await;
    let app = app(&kube, &[]).await;

    assert_eq!(scrape(&app, None).await, (401, "Unauthorized\n".into()));
    assert_eq!(scrape(&app, Some("forged")).await, (401, "Unauthorized\n".into()));
    assert_eq!(
        scrape(&app, Some("other-token")).await,
        (403, "Forbidden\n".into())
    );
    let (status, page) = scrape_synced(&app, Some("prometheus-token")).await;
    assert_eq!(status, 200);
    assert!(page.contains("# TYPE inference_pool_ready_pods gauge"), "{page}");

    // Verdicts on tokens that authenticate are cached: scraping again asks the API server
    // nothing, even while it is down; a forged token is asked about again.
    let calls = kube.review_calls().await;
    kube.set_reviews_down(true).await;
    assert_eq!(scrape(&app, Some("prometheus-token")).await.0, 200);
    assert_eq!(scrape(&app, Some("other-token")).await.0, 403);
    assert_eq!(kube.review_calls().await, calls);
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/metrics", app.metrics_addr.port()))
        .header("authorization", "BEARER prometheus-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the scheme is case-insensitive");
    assert_eq!(
        scrape(&app, Some("forged")).await.0,
        500,
        "not cached: the API is asked and down"
    );
    // A token it has not seen cannot be reviewed: nothing is served on doubt.
    let (status, body) = scrape(&app, Some("new-token")).await;
    assert_eq!(
        (status, body.as_str()),
        (500, "cannot review the request with the Kubernetes API\n")
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_auth_false_serves_the_page_open() {
    let kube = FakeKube::start().await;
    let app = app(&kube, &["--metrics-endpoint-auth=false"]).await;
    let (status, page) = scrape_synced(&app, None).await;
    assert_eq!(status, 200);
    assert!(page.contains("# TYPE inference_pool_ready_pods gauge"), "{page}");
    assert_eq!(kube.review_calls().await, 0);
    app.shutdown().await;
}
