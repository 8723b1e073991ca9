//! The emulated pods over real HTTP: OpenAI answers with usage from the engine model, prefix
//! hits, queueing visible in `/metrics`, refusals, and aborts when the client goes away.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::time::Duration;

use epp_sim::{
    emulator::{Emulator, PodConfig},
    engine::{EngineProfile, MetricsDialect},
};
use serde_json::{Value, json};

fn long_prompt() -> String {
    (0..600).map(|i| format!("word{i} ")).collect()
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new().post(url).json(body).send().await.unwrap()
}

async fn metrics_page(addr: &str) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn metric(addr: &str, name: &str) -> f64 {
    let text = metrics_page(addr).await;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

#[tokio::test]
async fn a_repeated_prompt_is_a_prefix_hit_in_usage_and_metrics() {
    let emulator = Emulator::start(vec![PodConfig::default()], 0).await.unwrap();
    let addr = emulator.addrs[0].to_string();
    let url = format!("http://{addr}/v1/chat/completions");
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": long_prompt()}], "max_tokens": 3});
    let first: Value = post(&url, &body).await.json().await.unwrap();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(first["usage"]["completion_tokens"], 3);
    assert_eq!(first["object"], "chat.completion");
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let second: Value = post(&url, &body).await.json().await.unwrap();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // Every full 16-token block but the last is reused.
    assert_eq!(cached, (prompt - 1) / 16 * 16);
    assert_eq!(metric(&addr, "vllm:prefix_cache_hits_total").await, cached as f64);
    assert_eq!(
        metric(&addr, "vllm:prefix_cache_queries_total").await,
        2.0 * prompt as f64
    );
    assert_eq!(metric(&addr, "vllm:generation_tokens_total").await, 6.0);
    assert_eq!(metric(&addr, "vllm:num_requests_running").await, 0.0);
    emulator.shutdown().await;
}

#[tokio::test]
async fn streams_one_event_per_token_then_usage_and_done() {
    let emulator = Emulator::start(vec![PodConfig::default()], 0).await.unwrap();
    let url = format!("http://{}/v1/completions", emulator.addrs[0]);
    let body = json!({"model": "m", "prompt": "hello there", "max_tokens": 5, "stream": true,
        "stream_options": {"include_usage": true}});
    let text = post(&url, &body).await.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 5 + 2, "{text}");
    assert_eq!(events[6], "data: [DONE]");
    let usage: Value = serde_json::from_str(events[5].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(usage["choices"], json!([]));
    let last: Value = serde_json::from_str(events[4].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"], Value::Null);
    emulator.shutdown().await;
}

/// Send `requests` of 200 output tokens at once to one pod serving one sequence at a time and
/// wait (bounded) until its `/metrics` shows one running and the rest waiting under the gauge
/// names given; returns what it last showed, and the pod's address once all are answered.
async fn one_at_a_time(metrics: MetricsDialect, requests: usize, gauges: [&str; 2]) -> ((f64, f64), String) {
    let config = PodConfig {
        profile: EngineProfile {
            max_num_seqs: 1,
            metrics,
            ..EngineProfile::h100()
        },
        ..PodConfig::default()
    };
    let emulator = Emulator::start(vec![config], 0).await.unwrap();
    let addr = emulator.addrs[0].to_string();
    let url = format!("http://{addr}/v1/completions");
    // Requests of 200 tokens (~1.4 s each at ~7 ms per decode step), one at a time.
    let mut calls = Vec::new();
    for _ in 0..requests {
        let url = url.clone();
        calls.push(tokio::spawn(async move {
            post(&url, &json!({"model": "m", "prompt": "x", "max_tokens": 200}))
                .await
                .status()
        }));
    }
    let wanted = (1.0, (requests - 1) as f64);
    let mut seen = (0.0, 0.0);
    for _ in 0..100 {
        seen = (metric(&addr, gauges[0]).await, metric(&addr, gauges[1]).await);
        if seen == wanted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let page = metrics_page(&addr).await;
    emulator.shutdown().await;
    (seen, page)
}

#[tokio::test]
async fn requests_beyond_max_num_seqs_show_up_as_waiting() {
    let gauges = ["vllm:num_requests_running", "vllm:num_requests_waiting"];
    let (seen, _) = one_at_a_time(MetricsDialect::Vllm, 3, gauges).await;
    assert_eq!(seen, (1.0, 2.0));
}

#[tokio::test]
async fn a_llamacpp_profile_serves_llama_server_metrics() {
    let gauges = ["llamacpp:requests_processing", "llamacpp:requests_deferred"];
    let (seen, page) = one_at_a_time(MetricsDialect::Llamacpp, 2, gauges).await;
    assert_eq!(seen, (1.0, 1.0));
    assert!(page.contains("\nllamacpp:tokens_predicted_total 400\n"), "{page}");
    assert!(!page.contains("vllm:"), "{page}");
}

#[tokio::test]
async fn impossible_requests_get_vllm_style_400s() {
    let config = PodConfig {
        profile: EngineProfile {
            max_model_len: 1_000,
            ..EngineProfile::h100()
        },
        ..PodConfig::default()
    };
    let emulator = Emulator::start(vec![config], 0).await.unwrap();
    let r = post(
        &format!("http://{}/v1/completions", emulator.addrs[0]),
        &json!({"model": "m", "prompt": "x", "max_tokens": 5_000}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e["error"]["message"],
        "This model's maximum context length is 1000 tokens. However, you requested 5001 tokens."
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_client_that_goes_away_frees_the_engine() {
    let emulator = Emulator::start(vec![PodConfig::default()], 0).await.unwrap();
    let addr = emulator.addrs[0].to_string();
    let mut r = post(
        &format!("http://{addr}/v1/completions"),
        &json!({"model": "m", "prompt": "x", "max_tokens": 100_000, "stream": true}),
    )
    .await;
    assert!(r.chunk().await.unwrap().is_some(), "first event");
    assert_eq!(metric(&addr, "vllm:num_requests_running").await, 1.0);
    drop(r);
    let mut running = 1.0;
    for _ in 0..200 {
        running = metric(&addr, "vllm:num_requests_running").await;
        if running == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(running, 0.0, "the aborted request left the engine");
    assert_eq!(metric(&addr, "vllm:kv_cache_usage_perc").await, 0.0);
    emulator.shutdown().await;
}

#[tokio::test]
async fn open_loop_trace_load_measures_ttft_and_reads_cached_tokens() {
    use epp_sim::{
        trace_load::{TraceLoadConfig, run},
        workload::generate::{GeneratorParams, shared_prefix},
    };
    let config = PodConfig {
        time_scale: 20.0,
        ..PodConfig::default()
    };
    let emulator = Emulator::start(vec![config], 0).await.unwrap();
    let params = GeneratorParams {
        requests: 40,
        rate: 200.0,
        groups: 2,
        prefix_tokens: 512,
        users: 4,
        question_tokens: 32,
        output_tokens: 8,
        ..Default::default()
    };
    let workload = shared_prefix(&params, 3);
    let cfg = TraceLoadConfig {
        url: format!("http://{}", emulator.addrs[0]),
        model: "m".into(),
        tenant_header: "x-tenant".into(),
        timeout: Duration::from_secs(30),
    };
    let report = run(&workload, &cfg).await;
    assert_eq!(report.requests, 40);
    assert_eq!(report.status.get(&200), Some(&40), "{report:?}");
    assert_eq!(report.per_pod.values().sum::<usize>(), 40);
    assert!(report.ttft.p50_s > 0.0 && report.ttft.p50_s <= report.e2e.p50_s);
    assert!(report.ttft.max_s <= report.e2e.max_s);
    // Two groups of 512 shared tokens: after the first request of each, most prompt is cached.
    assert!(report.cached_share > 0.5, "{}", report.cached_share);
    emulator.shutdown().await;
}

#[tokio::test]
async fn the_page_fault_hook_breaks_and_restores_metrics() {
    let emulator = Emulator::start(vec![PodConfig::default()], 0).await.unwrap();
    let addr = emulator.addrs[0].to_string();
    let client = reqwest::Client::new();
    let set = |mode: &'static str| {
        client
            .post(format!("http://{addr}/emulator/page"))
            .body(mode)
            .send()
    };
    let vllm = &epp::scrape::engines::builtin_engines()[0];
    assert!(epp::scrape::engines::extract(vllm, &metrics_page(&addr).await).found_required);

    assert_eq!(set("garbage").await.unwrap().status(), 204);
    let garbage = metrics_page(&addr).await;
    let read = epp::scrape::engines::extract(vllm, &garbage);
    assert!(
        !read.found_required,
        "a garbage page gives the EPP nothing: {read:?}"
    );
    assert!(read.bad_lines > 0);

    assert_eq!(set("slow").await.unwrap().status(), 204);
    let slow = client
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(
        slow.unwrap_err().is_timeout(),
        "a slow page does not answer in time"
    );

    let refused = set("sideways").await.unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(set("normal").await.unwrap().status(), 204);
    assert_eq!(metric(&addr, "vllm:num_requests_waiting").await, 0.0);
    emulator.shutdown().await;
}
