//! Model-server stand-ins: HTTP servers on loopback whose `/metrics` page reports exactly the
//! values a test sets (vLLM names), whatever traffic they receive.
//!
//! The upstream EPP's hermetic tests feed fixed metrics to the scheduler through a fake metrics
//! client; these stand-ins give the same fixtures to a live EPP, scraped over HTTP, behind a real
//! Envoy. Unlike the [emulator](epp_sim::emulator), nothing here models an engine: a request is
//! answered with a small OpenAI-style JSON body after a configurable delay, and the page does not
//! move, so any change in the EPP's picks comes from the EPP alone.
//!
//! Each stand-in binds its own loopback address (`127.0.0.x`), because upstream matches subset
//! hints by IP only: distinct addresses let a hint name one pod. Every answer names its pod in
//! `x-stand-in-pod` (the index), the model it was asked for in `x-received-model` and the
//! xxHash64 of the body it received in `x-received-body-xxh64` (hex). A streaming request
//! (`"stream": true`) is answered as Server-Sent Events: one content chunk, a usage-only chunk,
//! `[DONE]`. The page changes only when a test sets it ([`StandIns::set_metrics`]: saturation
//! that clears), and the `x-test-tag` header of every request is logged in arrival order
//! ([`StandIns::arrivals`]: the order requests left a queue). [`StandIns::start_epp`] starts the
//! EPP over them, as the end-to-end tests need it.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use epp::{
    app::RunningApp,
    config::{Flags, normalize_go_args},
};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::envoy::wait_until_scraped;

/// What one stand-in's `/metrics` page reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FixedMetrics {
    /// `vllm:num_requests_waiting`.
    pub waiting: u32,
    /// `vllm:num_requests_running`.
    pub running: u32,
    /// `vllm:kv_cache_usage_perc`, a fraction in [0, 1].
    pub kv_usage: f64,
    /// `running_lora_adapters` of `vllm:lora_requests_info`; no series when this and `waiting_adapters` are empty.
    pub active_adapters: Vec<String>,
    /// `waiting_lora_adapters`.
    pub waiting_adapters: Vec<String>,
    /// `max_lora` (upstream's hermetic fixtures leave it 0).
    pub max_lora: u32,
}

impl FixedMetrics {
    /// A pod reporting `waiting` queued requests, `kv_usage`, and `adapters` loaded.
    pub fn new(waiting: u32, kv_usage: f64, adapters: &[&str]) -> Self {
        Self {
            waiting,
            kv_usage,
            active_adapters: adapters.iter().map(|s| (*s).to_owned()).collect(),
            ..Self::default()
        }
    }

    /// The same, with `max_lora` set.
    pub fn max_lora(mut self, max_lora: u32) -> Self {
        self.max_lora = max_lora;
        self
    }

    /// The exposition text, in vLLM v1's names.
    pub fn page(&self) -> String {
        let mut page = format!(
            "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"stand-in\"}} {}\n\
             # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"stand-in\"}} {}\n\
             # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{model_name=\"stand-in\"}} {}\n",
            self.waiting, self.running, self.kv_usage
        );
        if !self.active_adapters.is_empty() || !self.waiting_adapters.is_empty() {
            page.push_str(&format!(
                "# TYPE vllm:lora_requests_info gauge\nvllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} 1.7e+09\n",
                self.max_lora,
                self.active_adapters.join(","),
                self.waiting_adapters.join(",")
            ));
        }
        page
    }
}

/// One stand-in's state.
struct Pod {
    index: usize,
    page: Mutex<String>,
    answer_after: Duration,
    served: AtomicU64,
    arrivals: Arc<Mutex<Vec<String>>>,
}

/// Running stand-ins.
pub struct StandIns {
    /// Their addresses, in the order given.
    pub addrs: Vec<SocketAddr>,
    pods: Vec<Arc<Pod>>,
    arrivals: Arc<Mutex<Vec<String>>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl StandIns {
    /// Start one stand-in per entry: pod `i` on `127.0.0.<first_host + i>` (a free port),
    /// answering each request after `answer_after`.
    ///
    /// # Errors
    /// When an address cannot be bound (a host byte past 255 included).
    pub async fn start(
        pods: Vec<FixedMetrics>,
        first_host: u8,
        answer_after: Duration,
    ) -> std::io::Result<Self> {
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut started = Self {
            addrs: Vec::new(),
            pods: Vec::new(),
            arrivals: Arc::default(),
            cancel: cancel.clone(),
            tasks: tasks.clone(),
        };
        // On an error below, `started` drops with the servers already spawned: cancel them.
        let stop_on_error = cancel.clone().drop_guard();
        for (index, metrics) in pods.into_iter().enumerate() {
            let host = u8::try_from(usize::from(first_host) + index)
                .map_err(|_| std::io::Error::other("stand-in host byte past 255"))?;
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, host));
            let listener = TcpListener::bind((ip, 0)).await?;
            let addr = listener.local_addr()?;
            let pod = Arc::new(Pod {
                index,
                page: Mutex::new(metrics.page()),
                answer_after,
                served: AtomicU64::new(0),
                arrivals: started.arrivals.clone(),
            });
            let app = Router::new()
                .route("/metrics", get(metrics_page))
                .route("/{*path}", post(answer))
                .with_state(pod.clone());
            let token = cancel.clone();
            tasks.spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { token.cancelled().await })
                    .await;
            });
            started.addrs.push(addr);
            started.pods.push(pod);
        }
        let _ = stop_on_error.disarm();
        Ok(started)
    }

    /// Replace what pod `i`'s page reports (from its next scrape on).
    pub fn set_metrics(&self, i: usize, metrics: &FixedMetrics) {
        if let Some(p) = self.pods.get(i) {
            *p.page.lock() = metrics.page();
        }
    }

    /// The `x-test-tag` of every request received so far, in arrival order, all pods together.
    pub fn arrivals(&self) -> Vec<String> {
        self.arrivals.lock().clone()
    }

    /// Requests pod `i` has answered.
    pub fn served(&self, i: usize) -> u64 {
        self.pods.get(i).map_or(0, |p| p.served.load(Ordering::Relaxed))
    }

    /// Start the EPP (in this process, ports chosen by the system, TLS as by default) over every
    /// stand-in, with `extra_flags`, and wait (at most 5 s) until it has scraped each of them.
    ///
    /// # Errors
    /// Bad flags, a failed start, or a stand-in not scraped in time.
    pub async fn start_epp(&self, extra_flags: &[String]) -> anyhow::Result<RunningApp> {
        let endpoints: Vec<String> = self.addrs.iter().map(ToString::to_string).collect();
        let mut args = vec![
            "epp".to_owned(),
            format!("--endpoints={}", endpoints.join(",")),
            "--grpc-port=0".to_owned(),
            "--grpc-health-port=0".to_owned(),
            "--metrics-port=0".to_owned(),
        ];
        args.extend(extra_flags.iter().cloned());
        let flags = <Flags as clap::Parser>::try_parse_from(normalize_go_args(args))?;
        let app = epp::app::start(flags).await?;
        if !wait_until_scraped(&app.reader, self.addrs.len(), Duration::from_secs(5)).await {
            app.shutdown().await;
            anyhow::bail!("the EPP did not scrape every stand-in within 5 s");
        }
        Ok(app)
    }

    /// Stop every stand-in.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn metrics_page(State(pod): State<Arc<Pod>>) -> String {
    pod.page.lock().clone()
}

/// The digest a stand-in reports for a body it received.
pub fn body_digest(body: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh64::xxh64(body, 0))
}

/// An OpenAI-style answer naming the pod and the model it was asked for.
async fn answer(State(pod): State<Arc<Pod>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(tag) = headers.get("x-test-tag").and_then(|v| v.to_str().ok()) {
        pod.arrivals.lock().push(tag.to_owned());
    }
    let parsed = serde_json::from_slice::<Value>(&body).ok();
    let model = parsed
        .as_ref()
        .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default();
    let stream = parsed
        .as_ref()
        .and_then(|v| v.get("stream").and_then(Value::as_bool))
        .unwrap_or(false);
    tokio::time::sleep(pod.answer_after).await;
    pod.served.fetch_add(1, Ordering::Relaxed);
    let chat = uri.path().ends_with("/chat/completions");
    let mut response = if stream {
        sse_answer(&model, chat)
    } else {
        (StatusCode::OK, axum::Json(json_answer(&model, chat))).into_response()
    };
    let headers = response.headers_mut();
    headers.insert("x-stand-in-pod", HeaderValue::from(pod.index));
    if let Ok(v) = HeaderValue::from_str(&body_digest(&body)) {
        headers.insert("x-received-body-xxh64", v);
    }
    if let Ok(v) = HeaderValue::from_str(&model) {
        headers.insert("x-received-model", v);
    }
    response
}

/// A streamed answer: one content chunk, a usage-only chunk (as vLLM sends with
/// `include_usage`), `[DONE]`.
fn sse_answer(model: &str, chat: bool) -> Response {
    let (object, choice) = if chat {
        (
            "chat.completion.chunk",
            json!({"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}),
        )
    } else {
        (
            "text_completion",
            json!({"index": 0, "text": "ok", "finish_reason": "stop"}),
        )
    };
    let content = json!({"id": "stand-in", "object": object, "model": model, "choices": [choice]});
    let usage = json!({"id": "stand-in", "object": object, "model": model, "choices": [],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
    let text = format!("data: {content}\n\ndata: {usage}\n\ndata: [DONE]\n\n");
    let mut response = (StatusCode::OK, text).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("text/event-stream"));
    response
}

/// A complete (non-streamed) answer.
fn json_answer(model: &str, chat: bool) -> Value {
    if chat {
        json!({"id": "stand-in", "object": "chat.completion", "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    } else {
        json!({"id": "stand-in", "object": "text_completion", "model": model,
               "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    }
}
