//! Regression (security issue, bounded labels): request-supplied model names, rewrite targets and
//! tenants must not grow the metric page or the EPP's memory. Before, one request with a 1 MiB
//! model name made `/metrics` 291 MB, and 5,000 tenants of 8 KiB added 140 MB of RSS.
//!
//! Its own test binary, so the process's RSS is this test's alone.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

mod support;

use std::collections::BTreeSet;

use epp::datastore::testing::SnapshotBuilder;
use support::*;

const CONFIG: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: token-budget
  parameters:
    tenants:
      team-a:
        models:
          gpt-4o: {tokens: 1000000000, fallbackModel: llama}
    defaultTenant: {tokens: 1000000000}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
";

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Distinct values of `label` on the page.
fn values_of(page: &str, label: &str) -> BTreeSet<String> {
    let key = format!("{label}=\"");
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let at = l.find(&key)? + key.len();
            Some(l[at..at + l[at..].find('"')?].to_owned())
        })
        .collect()
}

#[tokio::test]
async fn thousands_of_long_and_distinct_values_keep_the_page_and_memory_bounded() {
    let pods = SnapshotBuilder::new()
        .endpoint("10.0.0.1:8000", |_| {})
        .endpoint("10.0.0.2:8000", |_| {})
        .build();
    let server = TestServer::start(pods, Some(CONFIG)).await;
    let client = server.client().await;
    let exchange = |model: String, rewrite: String, tenant: String| {
        let mut client = client.clone();
        async move {
            let body = format!(r#"{{"model":"{model}","prompt":"hi","max_tokens":1}}"#);
            let msgs = vec![
                req_headers(
                    &[
                        (":path", "/v1/completions"),
                        ("x-gateway-model-name-rewrite", &rewrite),
                        ("x-gateway-inference-fairness-id", &tenant),
                    ],
                    false,
                ),
                req_body(body.as_bytes(), true),
                resp_headers(&[(":status", "404")], true),
            ];
            run_exchange(&mut client, msgs).await
        }
    };
    // Warm up (first series, allocator pools), then measure.
    for i in 0..50 {
        exchange(format!("warm-{i}"), format!("warm-{i}"), "team-a".into()).await;
        exchange("gpt-4o".into(), "gpt-4o".into(), "team-a".into()).await;
    }
    let rss_before = rss_bytes();
    let long = "x".repeat(20 * 1024);
    for i in 0..3_000 {
        let model = if i % 3 == 0 {
            format!("{long}{i}")
        } else {
            format!("model-{i}")
        };
        let tenant = format!("tenant-{i}-{}", "t".repeat(200));
        exchange(model, format!("target-{i}"), tenant).await;
    }
    let page = server.metrics.render();
    let rss_after = rss_bytes();
    assert!(page.len() < 2_000_000, "page of {} bytes", page.len());
    let models = values_of(&page, "model_name");
    // Model names appear as requested and as served (the budget series name the served
    // model): two per admitted pair at most, plus the two configured ones and `other`.
    assert!(models.len() <= 2 * 64 + 3, "{} model names", models.len());
    assert!(models.contains("other"));
    assert!(models.iter().all(|m| m.len() <= 128));
    let targets = values_of(&page, "target_model_name");
    assert!(targets.len() <= 64 + 3, "{} target names", targets.len());
    assert_eq!(
        values_of(&page, "tenant"),
        ["default".to_owned(), "team-a".to_owned()].into(),
        "tenants are labelled by their configured name or default"
    );
    // Every request ended: the running gauge is back to zero under every label, never below.
    let running: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("inference_objective_running_requests{"))
        .collect();
    assert!(!running.is_empty());
    assert!(running.iter().all(|l| l.ends_with(" 0")), "{running:?}");
    // 3,000 requests carrying 7 MB of model names and 0.6 MB of tenant names: the EPP keeps a
    // bounded page and the tenants' budget counters (about 3,000 × 220 bytes).
    let grown = rss_after.saturating_sub(rss_before);
    assert!(grown < 32 << 20, "RSS grew by {grown} bytes");
}
