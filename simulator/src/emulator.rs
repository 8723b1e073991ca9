//! Stand-in vLLM pods: an OpenAI-compatible HTTP server per pod with a `/metrics` page in vLLM's
//! names, for demos and end-to-end tests.
//!
//! Each pod runs requests on a fixed number of slots (`max_num_seqs`); requests beyond wait, and
//! the waiting and running counts are what `/metrics` reports, so the EPP sees real load. Prompt
//! prefixes this pod has served before are "cached" and skip most of their prefill time, which is
//! what makes prefix-aware routing visible. Every response names the pod that served it in the
//! `x-emulated-pod` header and echoes the model it was asked for in `x-received-model`.
//!
//! This is a stand-in, not the engine model: timing is a simple per-token cost.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{Mutex, Notify, Semaphore, mpsc},
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Bytes of prompt per cached block (about 64 tokens).
const BLOCK_BYTES: usize = 256;

/// Timing and capacity of one emulated pod.
#[derive(Debug, Clone)]
pub struct PodConfig {
    /// Concurrent sequences (`max_num_seqs`).
    pub slots: u32,
    /// Prefill cost per uncached prompt block.
    pub prefill_per_block: Duration,
    /// Decode cost per output token.
    pub per_token: Duration,
    /// Output tokens when the request does not say.
    pub default_output_tokens: u32,
    /// Added to the reported waiting queue (tests use it to make one pod look busy).
    pub extra_waiting: u32,
    /// KV blocks reported in `vllm:cache_config_info`.
    pub num_gpu_blocks: u32,
}

impl Default for PodConfig {
    fn default() -> Self {
        Self {
            slots: 4,
            prefill_per_block: Duration::from_micros(400),
            per_token: Duration::from_millis(2),
            default_output_tokens: 16,
            extra_waiting: 0,
            num_gpu_blocks: 4096,
        }
    }
}

/// Shared state of one pod.
pub struct PodState {
    /// `ip:port` of this pod.
    pub name: String,
    config: PodConfig,
    slots: Arc<Semaphore>,
    waiting: AtomicU32,
    running: AtomicU32,
    served: AtomicU64,
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
    cache: Mutex<HashSet<u64>>,
    /// Streams that ask for it (`x-emulator-hold: 1`) pause after their first event until this
    /// is notified: tests use it to prove events reach the client one by one.
    pub release: Notify,
}

impl PodState {
    /// Requests served so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn metrics_text(&self) -> String {
        let waiting = self.waiting.load(Ordering::Relaxed) + self.config.extra_waiting;
        let running = self.running.load(Ordering::Relaxed);
        let kv = f64::from(running) / f64::from(self.config.slots.max(1)) * 0.5;
        format!(
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{engine=\"0\",model_name=\"emulated\"}} {waiting}.0\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{{engine=\"0\",model_name=\"emulated\"}} {running}.0\n\
             # TYPE vllm:kv_cache_usage_perc gauge\n\
             vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"emulated\"}} {kv}\n\
             # TYPE vllm:cache_config_info gauge\n\
             vllm:cache_config_info{{block_size=\"16\",engine=\"0\",num_gpu_blocks=\"{}\"}} 1.0\n\
             # TYPE vllm:prefix_cache_queries counter\n\
             vllm:prefix_cache_queries_total{{engine=\"0\",model_name=\"emulated\"}} {}.0\n\
             # TYPE vllm:prefix_cache_hits counter\n\
             vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"emulated\"}} {}.0\n",
            self.config.num_gpu_blocks,
            self.prefix_queries.load(Ordering::Relaxed),
            self.prefix_hits.load(Ordering::Relaxed),
        )
    }
}

/// Running emulated pods.
pub struct Emulator {
    /// Their states, in start order.
    pub pods: Vec<Arc<PodState>>,
    /// Their addresses.
    pub addrs: Vec<SocketAddr>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Emulator {
    /// Start one pod per config on 127.0.0.1 (`base_port` 0 picks free ports; otherwise
    /// consecutive ports from it).
    ///
    /// # Errors
    /// When a port cannot be bound.
    pub async fn start(configs: Vec<PodConfig>, base_port: u16) -> std::io::Result<Self> {
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut pods = Vec::new();
        let mut addrs = Vec::new();
        for (i, config) in configs.into_iter().enumerate() {
            let port = if base_port == 0 { 0 } else { base_port + i as u16 };
            let listener = TcpListener::bind(("127.0.0.1", port)).await?;
            let addr = listener.local_addr()?;
            let state = Arc::new(PodState {
                name: addr.to_string(),
                slots: Arc::new(Semaphore::new(config.slots as usize)),
                config,
                waiting: AtomicU32::new(0),
                running: AtomicU32::new(0),
                served: AtomicU64::new(0),
                prefix_queries: AtomicU64::new(0),
                prefix_hits: AtomicU64::new(0),
                cache: Mutex::new(HashSet::new()),
                release: Notify::new(),
            });
            let app = Router::new()
                .route("/v1/completions", post(generate))
                .route("/v1/chat/completions", post(generate))
                .route("/v1/models", get(models))
                .route("/health", get(|| async { "ok" }))
                .route("/metrics", get(metrics))
                .with_state(state.clone());
            let token = cancel.clone();
            tasks.spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { token.cancelled().await })
                    .await;
            });
            pods.push(state);
            addrs.push(addr);
        }
        Ok(Self {
            pods,
            addrs,
            cancel,
            tasks,
        })
    }

    /// Stop every pod.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn metrics(State(pod): State<Arc<PodState>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        pod.metrics_text(),
    )
}

async fn models(State(pod): State<Arc<PodState>>) -> Response {
    let mut r = axum::Json(json!({"object": "list", "data": [{"id": "emulated", "object": "model"}]}))
        .into_response();
    tag(&mut r, &pod, None);
    r
}

fn tag(r: &mut Response, pod: &PodState, model: Option<&str>) {
    if let Ok(v) = HeaderValue::from_str(&pod.name) {
        r.headers_mut().insert("x-emulated-pod", v);
    }
    if let Some(v) = model.and_then(|m| HeaderValue::from_str(m).ok()) {
        r.headers_mut().insert("x-received-model", v);
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}})))
        .into_response()
}

/// Prompt blocks of a request, chained so that equal prefixes give equal leading hashes.
fn prompt_blocks(body: &Value) -> Vec<u64> {
    let text = body
        .get("messages")
        .or_else(|| body.get("prompt"))
        .map(Value::to_string)
        .unwrap_or_default();
    let mut prev = 0u64;
    text.as_bytes()
        .chunks(BLOCK_BYTES)
        .map(|c| {
            prev = xxhash_rust::xxh64::xxh64(c, prev);
            prev
        })
        .collect()
}

async fn generate(State(pod): State<Arc<PodState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let Some(model) = req.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    let chat = uri.path().ends_with("/chat/completions");
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_tokens = req
        .get("max_tokens")
        .or_else(|| req.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map_or(pod.config.default_output_tokens, |v| v.clamp(1, 4096) as u32);
    let hold = headers.get("x-emulator-hold").is_some();
    // With `x-emulator-echo`, the answer repeats the last prompt text the pod received (and names
    // it in `x-received-prompt`): tests see exactly what reached the model server.
    let echo = headers.get("x-emulator-echo").is_some().then(|| {
        req.pointer("/messages")
            .and_then(Value::as_array)
            .and_then(|m| m.last())
            .and_then(|m| m.get("content"))
            .or_else(|| req.get("prompt"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    });

    // Queue for a slot, as a continuous-batching engine's waiting queue.
    pod.waiting.fetch_add(1, Ordering::Relaxed);
    let permit = pod.slots.clone().acquire_owned().await;
    pod.waiting.fetch_sub(1, Ordering::Relaxed);
    let Ok(permit) = permit else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    pod.running.fetch_add(1, Ordering::Relaxed);
    pod.served.fetch_add(1, Ordering::Relaxed);

    // Prefill: only the blocks past the cached prefix cost time.
    let blocks = prompt_blocks(&req);
    let cached = {
        let mut cache = pod.cache.lock().await;
        let hit = blocks.iter().take_while(|b| cache.contains(b)).count();
        cache.extend(blocks.iter().copied());
        hit
    };
    let block_tokens = (BLOCK_BYTES / 4) as u64;
    pod.prefix_queries
        .fetch_add(blocks.len() as u64 * block_tokens, Ordering::Relaxed);
    pod.prefix_hits
        .fetch_add(cached as u64 * block_tokens, Ordering::Relaxed);
    tokio::time::sleep(pod.config.prefill_per_block * (blocks.len() - cached) as u32).await;

    let prompt_tokens = (body.len() / 4).max(1) as u64;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": max_tokens,
        "total_tokens": prompt_tokens + u64::from(max_tokens),
        "prompt_tokens_details": {"cached_tokens": cached as u64 * block_tokens},
    });
    let object = if chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    let id = format!("cmpl-{}", pod.served());

    if !stream {
        tokio::time::sleep(pod.config.per_token * max_tokens).await;
        pod.running.fetch_sub(1, Ordering::Relaxed);
        drop(permit);
        let text = echo.clone().unwrap_or_else(|| "tok ".repeat(max_tokens as usize));
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        let mut r = axum::Json(
            json!({"id": id, "object": object, "model": model, "choices": [choice], "usage": usage}),
        )
        .into_response();
        tag(&mut r, &pod, Some(&model));
        if let Some(v) = echo.as_deref().and_then(|e| HeaderValue::from_str(e).ok()) {
            r.headers_mut().insert("x-received-prompt", v);
        }
        return r;
    }

    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let chunk_object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let pod2 = pod.clone();
    let model2 = model.clone();
    tokio::spawn(async move {
        let _permit = permit;
        for i in 0..max_tokens {
            let choice = if chat {
                json!({"index": 0, "delta": {"content": "tok "}, "finish_reason": null})
            } else {
                json!({"index": 0, "text": "tok ", "finish_reason": null})
            };
            let mut event = json!({"id": id, "object": chunk_object, "model": model2, "choices": [choice]});
            if include_usage {
                event["usage"] = Value::Null;
            }
            if tx
                .send(Ok(Bytes::from(format!("data: {event}\n\n"))))
                .await
                .is_err()
            {
                break;
            }
            if i == 0 && hold {
                pod2.release.notified().await;
            }
            tokio::time::sleep(pod2.config.per_token).await;
        }
        if include_usage {
            let event =
                json!({"id": id, "object": chunk_object, "model": model2, "choices": [], "usage": usage});
            let _ = tx.send(Ok(Bytes::from(format!("data: {event}\n\n")))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        pod2.running.fetch_sub(1, Ordering::Relaxed);
    });
    let mut r = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/event-stream"));
    tag(&mut r, &pod, Some(&model));
    r
}
