//! Emulated vLLM pods: an OpenAI-compatible HTTP server per pod, driven in real time by the
//! [engine model](crate::engine), with a `/metrics` page in vLLM's names.
//!
//! Each pod owns one engine task that runs steps back to back while there is work, sleeping
//! each step's modelled duration divided by `time_scale` (infinite = no sleeping), and hands the
//! tokens of each step to the requests' streams. What `/metrics` shows (queue, running, KV
//! usage, LoRA adapters, prefix-cache counters) is the engine's state after the latest step, so
//! the EPP sees real load and real cache behaviour. Prompts are hashed in 64-byte blocks (16
//! tokens at four bytes per token), so shared prompt prefixes become prefix-cache hits.
//!
//! Test hooks (request headers): `x-emulator-hold` pauses a stream after its first event until
//! [`PodState::release`] is notified; `x-emulator-echo` answers with the last prompt text the pod
//! received (also in `x-received-prompt`). Every response names its pod in `x-emulated-pod` and
//! the model it was asked for in `x-received-model` (and the `traceparent` it received in
//! `x-received-traceparent`). Fault hook (for the soak): `POST
//! /emulator/page` with `garbage`, `slow` or `normal` makes `/metrics` answer bytes that are no
//! exposition, answer only after [`SLOW_PAGE`], or answer normally again.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
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
    sync::{Notify, mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::engine::{Engine, EngineEvent, EngineGauges, EngineProfile, EngineRequest, MetricsDialect};

/// Bytes of prompt per token (the EPP's estimate as well).
const BYTES_PER_TOKEN: usize = 4;

/// How long a `slow` page takes to answer: past the EPP's scrape timeout (90 % of its scrape
/// interval, 45 ms by default) for any interval up to half a minute.
pub const SLOW_PAGE: Duration = Duration::from_secs(30);

/// What `/metrics` answers (set through `POST /emulator/page`).
const PAGE_NORMAL: u8 = 0;
const PAGE_GARBAGE: u8 = 1;
const PAGE_SLOW: u8 = 2;

/// One emulated pod's engine and behaviour.
#[derive(Debug, Clone)]
pub struct PodConfig {
    /// The engine model (capacity and timing).
    pub profile: EngineProfile,
    /// Simulated seconds per wall second (1 = real time; `f64::INFINITY` = as fast as possible).
    pub time_scale: f64,
    /// Output tokens when the request does not say.
    pub default_output_tokens: u32,
    /// Added to the reported waiting queue (tests use it to make one pod look busy).
    pub extra_waiting: u32,
    /// Model names served as LoRA adapters; any other model name is the base model.
    pub adapters: Vec<String>,
}

impl Default for PodConfig {
    fn default() -> Self {
        Self {
            profile: EngineProfile::h100(),
            time_scale: 1.0,
            default_output_tokens: 16,
            extra_waiting: 0,
            adapters: Vec::new(),
        }
    }
}

impl PodConfig {
    /// Pods that answer as fast as they can, one output token by default (latency baselines).
    pub fn instant() -> Self {
        Self {
            time_scale: f64::INFINITY,
            default_output_tokens: 1,
            ..Self::default()
        }
    }
}

enum Command {
    Submit(EngineRequest, mpsc::UnboundedSender<Progress>),
    Abort(u64),
}

#[derive(Debug, Clone, Copy)]
enum Progress {
    First { cached: u32 },
    Token,
    Finished { output: u32 },
}

/// Shared state of one pod.
pub struct PodState {
    /// `ip:port` of this pod.
    pub name: String,
    config: PodConfig,
    commands: mpsc::UnboundedSender<Command>,
    gauges: watch::Receiver<EngineGauges>,
    served: AtomicU64,
    next_id: AtomicU64,
    /// The `/metrics` fault in force (`PAGE_*`).
    page: std::sync::atomic::AtomicU8,
    tasks: TaskTracker,
    /// Streams that ask for it (`x-emulator-hold: 1`) pause after their first event until this
    /// is notified: tests use it to prove events reach the client one by one.
    pub release: Notify,
}

impl PodState {
    /// Requests accepted so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// The engine's gauges after its latest step.
    pub fn gauges(&self) -> EngineGauges {
        self.gauges.borrow().clone()
    }

    fn metrics_text(&self) -> String {
        let g = self.gauges();
        let p = &self.config.profile;
        let model = &p.model;
        let waiting = g.waiting + self.config.extra_waiting;
        if p.metrics == MetricsDialect::Llamacpp {
            // `llama-server --metrics`: unlabelled, no KV utilization, no adapters.
            return format!(
                "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n\
                 # TYPE llamacpp:prompt_tokens_total counter\n\
                 llamacpp:prompt_tokens_total {}\n\
                 # HELP llamacpp:tokens_predicted_total Number of generation tokens processed.\n\
                 # TYPE llamacpp:tokens_predicted_total counter\n\
                 llamacpp:tokens_predicted_total {}\n\
                 # HELP llamacpp:requests_processing Number of requests processing.\n\
                 # TYPE llamacpp:requests_processing gauge\n\
                 llamacpp:requests_processing {}\n\
                 # HELP llamacpp:requests_deferred Number of requests deferred.\n\
                 # TYPE llamacpp:requests_deferred gauge\n\
                 llamacpp:requests_deferred {waiting}\n",
                g.prompt_tokens, g.generation_tokens, g.running,
            );
        }
        let join = |v: &[Arc<str>]| v.iter().map(|a| a.as_ref()).collect::<Vec<_>>().join(",");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        format!(
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{engine=\"0\",model_name=\"{model}\"}} {waiting}.0\n\
             # HELP vllm:num_requests_running Number of requests in model execution batches.\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{{engine=\"0\",model_name=\"{model}\"}} {}.0\n\
             # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
             # TYPE vllm:kv_cache_usage_perc gauge\n\
             vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"{model}\"}} {}\n\
             # HELP vllm:lora_requests_info Running stats on lora requests.\n\
             # TYPE vllm:lora_requests_info gauge\n\
             vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {now:.3}\n\
             # HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
             # TYPE vllm:cache_config_info gauge\n\
             vllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"{}\",engine=\"0\",num_gpu_blocks=\"{}\"}} 1.0\n\
             # TYPE vllm:prefix_cache_queries counter\n\
             vllm:prefix_cache_queries_total{{engine=\"0\",model_name=\"{model}\"}} {}.0\n\
             # TYPE vllm:prefix_cache_hits counter\n\
             vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"{model}\"}} {}.0\n\
             # TYPE vllm:num_preemptions counter\n\
             vllm:num_preemptions_total{{engine=\"0\",model_name=\"{model}\"}} {}.0\n\
             # TYPE vllm:prompt_tokens counter\n\
             vllm:prompt_tokens_total{{engine=\"0\",model_name=\"{model}\"}} {}.0\n\
             # TYPE vllm:generation_tokens counter\n\
             vllm:generation_tokens_total{{engine=\"0\",model_name=\"{model}\"}} {}.0\n",
            g.running,
            g.kv_usage,
            p.max_loras,
            join(&g.running_adapters),
            join(&g.waiting_adapters),
            p.block_size,
            if p.enable_prefix_caching { "True" } else { "False" },
            p.num_gpu_blocks,
            g.prefix_queries,
            g.prefix_hits,
            g.preemptions,
            g.prompt_tokens,
            g.generation_tokens,
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
    /// When a port cannot be bound or a profile is invalid.
    pub async fn start(configs: Vec<PodConfig>, base_port: u16) -> std::io::Result<Self> {
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut pods = Vec::new();
        let mut addrs = Vec::new();
        for (i, config) in configs.into_iter().enumerate() {
            config.profile.validate().map_err(std::io::Error::other)?;
            let port = if base_port == 0 { 0 } else { base_port + i as u16 };
            let listener = TcpListener::bind(("127.0.0.1", port)).await?;
            let addr = listener.local_addr()?;
            let (commands, command_rx) = mpsc::unbounded_channel();
            let mut engine = Engine::new(config.profile.clone());
            engine.set_token_events(true);
            let (gauges_tx, gauges) = watch::channel(engine.gauges());
            tasks.spawn(drive(
                engine,
                command_rx,
                gauges_tx,
                config.time_scale,
                cancel.clone(),
            ));
            let state = Arc::new(PodState {
                name: addr.to_string(),
                config,
                commands,
                gauges,
                served: AtomicU64::new(0),
                next_id: AtomicU64::new(0),
                page: std::sync::atomic::AtomicU8::new(PAGE_NORMAL),
                tasks: tasks.clone(),
                release: Notify::new(),
            });
            let app = Router::new()
                .route("/v1/completions", post(generate))
                .route("/v1/chat/completions", post(generate))
                .route("/v1/models", get(models))
                .route("/health", get(|| async { "ok" }))
                .route("/metrics", get(metrics))
                .route("/emulator/page", post(set_page))
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

/// The engine task: steps while there is work, in (scaled) real time.
async fn drive(
    mut engine: Engine,
    mut commands: mpsc::UnboundedReceiver<Command>,
    gauges: watch::Sender<EngineGauges>,
    time_scale: f64,
    cancel: CancellationToken,
) {
    let mut waiters: HashMap<u64, mpsc::UnboundedSender<Progress>> = HashMap::new();
    let mut events = Vec::new();
    loop {
        while let Ok(c) = commands.try_recv() {
            apply(&mut engine, &mut waiters, c);
        }
        if engine.is_idle() {
            gauges.send_replace(engine.gauges());
            tokio::select! {
                c = commands.recv() => match c {
                    Some(c) => apply(&mut engine, &mut waiters, c),
                    None => return,
                },
                () = cancel.cancelled() => return,
            }
            continue;
        }
        let started = Instant::now();
        let Some(ns) = engine.step(&mut events) else {
            continue;
        };
        gauges.send_replace(engine.gauges());
        if time_scale.is_finite() && time_scale > 0.0 {
            let wall = Duration::from_nanos((ns as f64 / time_scale) as u64);
            tokio::select! {
                () = tokio::time::sleep_until(started + wall) => {}
                () = cancel.cancelled() => return,
            }
        } else {
            tokio::task::yield_now().await;
        }
        for event in events.drain(..) {
            let (id, progress) = match event {
                EngineEvent::FirstToken { id, cached_tokens } => (
                    id,
                    Progress::First {
                        cached: cached_tokens,
                    },
                ),
                EngineEvent::Token { id } => (id, Progress::Token),
                EngineEvent::Finished { id, output_tokens } => (
                    id,
                    Progress::Finished {
                        output: output_tokens,
                    },
                ),
            };
            let finished = matches!(progress, Progress::Finished { .. });
            let delivered = waiters.get(&id).is_some_and(|tx| tx.send(progress).is_ok());
            if finished {
                waiters.remove(&id);
            } else if !delivered {
                // The client went away: stop spending the engine on it.
                engine.abort(id);
                waiters.remove(&id);
            }
        }
    }
}

fn apply(engine: &mut Engine, waiters: &mut HashMap<u64, mpsc::UnboundedSender<Progress>>, c: Command) {
    match c {
        Command::Submit(req, tx) => {
            let id = req.id;
            // Admissibility was checked by the handler; a refusal here only drops the stream.
            if engine.submit(req).is_ok() {
                waiters.insert(id, tx);
            }
        }
        Command::Abort(id) => {
            engine.abort(id);
            waiters.remove(&id);
        }
    }
}

/// Aborts the request in the engine unless disarmed (the handler or stream was dropped early).
struct AbortOnDrop {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
    armed: bool,
}

impl AbortOnDrop {
    /// The request ended normally: nothing to abort. (A method, so that a closure moving the
    /// guard captures all of it, not just the flag.)
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.commands.send(Command::Abort(self.id));
        }
    }
}

async fn metrics(State(pod): State<Arc<PodState>>) -> impl IntoResponse {
    match pod.page.load(Ordering::Relaxed) {
        PAGE_GARBAGE => {
            // What a broken exporter might send: wanted names with unterminated labels or no
            // value, binary, lines that are no sample.
            let garbage = "vllm:num_requests_waiting{model_name=\"x\n\u{0}\u{7f}{{{ not a sample\nvllm:num_requests_running\n"
                .repeat(64);
            return ([("content-type", "text/plain; version=0.0.4")], garbage);
        }
        PAGE_SLOW => {
            // Until the page is set back (so a stopping pod is not held up by a scrape).
            let until = Instant::now() + SLOW_PAGE;
            while pod.page.load(Ordering::Relaxed) == PAGE_SLOW && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        _ => {}
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        pod.metrics_text(),
    )
}

/// The fault hook: `garbage`, `slow` or `normal` in the body sets what `/metrics` answers.
async fn set_page(State(pod): State<Arc<PodState>>, body: Bytes) -> Response {
    let page = match body.as_ref() {
        b"normal" => PAGE_NORMAL,
        b"garbage" => PAGE_GARBAGE,
        b"slow" => PAGE_SLOW,
        _ => return error(StatusCode::BAD_REQUEST, "expected normal, garbage or slow"),
    };
    pod.page.store(page, Ordering::Relaxed);
    StatusCode::NO_CONTENT.into_response()
}

async fn models(State(pod): State<Arc<PodState>>) -> Response {
    let mut data = vec![json!({"id": pod.config.profile.model, "object": "model"})];
    data.extend(
        pod.config
            .adapters
            .iter()
            .map(|a| json!({"id": a, "object": "model", "parent": pod.config.profile.model})),
    );
    let mut r = axum::Json(json!({"object": "list", "data": data})).into_response();
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

/// The prompt's text as the engine sees it: the raw JSON of `messages` or `prompt`.
fn prompt_text(body: &Value) -> String {
    body.get("messages")
        .or_else(|| body.get("prompt"))
        .map(Value::to_string)
        .unwrap_or_default()
}

/// Chained hashes of the prompt's full blocks of `block_tokens` tokens.
fn block_hashes(text: &str, block_tokens: u32) -> Arc<[u64]> {
    let mut prev = 0u64;
    text.as_bytes()
        .chunks_exact(block_tokens as usize * BYTES_PER_TOKEN)
        .map(|c| {
            prev = xxhash_rust::xxh64::xxh64(c, prev);
            prev
        })
        .collect()
}

struct Shape {
    chat: bool,
    model: String,
    include_usage: bool,
    id: String,
    prompt_tokens: u32,
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, false) => "chat.completion",
            (true, true) => "chat.completion.chunk",
            (false, _) => "text_completion",
        }
    }

    fn usage(&self, output: u32, cached: u32) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": output,
            "total_tokens": self.prompt_tokens + output,
            "prompt_tokens_details": {"cached_tokens": cached},
        })
    }

    fn chunk(&self, text: &str, finish: Option<&str>) -> Bytes {
        let choice = if self.chat {
            json!({"index": 0, "delta": {"content": text}, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish})
        };
        let mut event =
            json!({"id": self.id, "object": self.object(true), "model": self.model, "choices": [choice]});
        if self.include_usage {
            event["usage"] = Value::Null;
        }
        Bytes::from(format!("data: {event}\n\n"))
    }
}

async fn generate(State(pod): State<Arc<PodState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let mut r = generate_answer(pod, uri, &headers, body).await;
    // The trace context the gateway passed on (tests check the EPP's propagation).
    if let Some(v) = headers.get("traceparent") {
        r.headers_mut().insert("x-received-traceparent", v.clone());
    }
    r
}

async fn generate_answer(pod: Arc<PodState>, uri: Uri, headers: &HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let Some(model) = req.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return error(StatusCode::BAD_REQUEST, "model is required");
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let max_tokens = req
        .get("max_tokens")
        .or_else(|| req.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map_or(pod.config.default_output_tokens, |v| v.clamp(1, 1 << 20) as u32);
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
    let text = prompt_text(&req);
    let profile = &pod.config.profile;
    let prompt_tokens = u32::try_from((text.len() / BYTES_PER_TOKEN).max(1)).unwrap_or(u32::MAX);
    if let Err(refusal) = profile.admissible(prompt_tokens, max_tokens) {
        return error(StatusCode::BAD_REQUEST, &refusal.to_string());
    }
    let id = pod.next_id.fetch_add(1, Ordering::Relaxed);
    let adapter = pod
        .config
        .adapters
        .contains(&model)
        .then(|| Arc::<str>::from(model.as_str()));
    let engine_request = EngineRequest {
        id,
        prompt_tokens,
        output_tokens: max_tokens,
        block_hashes: block_hashes(&text, profile.block_size),
        adapter,
    };
    let (tx, mut progress) = mpsc::unbounded_channel();
    if pod.commands.send(Command::Submit(engine_request, tx)).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    pod.served.fetch_add(1, Ordering::Relaxed);
    let mut guard = AbortOnDrop {
        id,
        commands: pod.commands.clone(),
        armed: true,
    };
    let shape = Shape {
        chat: uri.path().ends_with("/chat/completions"),
        model: model.clone(),
        include_usage: req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        id: format!("cmpl-{}-{id}", pod.name),
        prompt_tokens,
    };

    if !stream {
        let mut cached = 0;
        let output = loop {
            match progress.recv().await {
                Some(Progress::First { cached: c }) => cached = c,
                Some(Progress::Token) => {}
                Some(Progress::Finished { output }) => break output,
                None => return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
            }
        };
        guard.disarm();
        let text = echo.clone().unwrap_or_else(|| "tok ".repeat(output as usize));
        let choice = if shape.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        let mut r = axum::Json(json!({
            "id": shape.id, "object": shape.object(false), "model": model,
            "choices": [choice], "usage": shape.usage(output, cached),
        }))
        .into_response();
        tag(&mut r, &pod, Some(&model));
        if let Some(v) = echo.as_deref().and_then(|e| HeaderValue::from_str(e).ok()) {
            r.headers_mut().insert("x-received-prompt", v);
        }
        return r;
    }

    let (out, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let pod2 = pod.clone();
    pod.tasks.spawn(async move {
        let mut cached = 0;
        let mut sent_first = false;
        while let Some(p) = progress.recv().await {
            let (bytes, done) = match p {
                Progress::First { cached: c } => {
                    cached = c;
                    (shape.chunk("tok ", None), None)
                }
                Progress::Token => (shape.chunk("tok ", None), None),
                Progress::Finished { output } => {
                    let last = if output > 1 { "tok " } else { "" };
                    (shape.chunk(last, Some("length")), Some(output))
                }
            };
            if out.send(Ok(bytes)).await.is_err() {
                return; // client gone; the guard aborts the request
            }
            if !sent_first && hold {
                pod2.release.notified().await;
            }
            sent_first = true;
            if let Some(output) = done {
                guard.disarm();
                if shape.include_usage {
                    let event = json!({"id": shape.id, "object": shape.object(true), "model": shape.model,
                        "choices": [], "usage": shape.usage(output, cached)});
                    let _ = out.send(Ok(Bytes::from(format!("data: {event}\n\n")))).await;
                }
                let _ = out.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
                return;
            }
        }
    });
    let mut r = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/event-stream"));
    tag(&mut r, &pod, Some(&model));
    r
}

/// `epp-sim emulate`: emulated vLLM pods on 127.0.0.1 until Ctrl-C.
#[derive(Debug, Clone, clap::Args)]
pub struct EmulateArgs {
    /// Number of pods.
    #[arg(long, default_value_t = 3)]
    pub pods: usize,
    /// First port; pods take consecutive ports.
    #[arg(long, default_value_t = 8000)]
    pub base_port: u16,
    /// Engine profile: `h100`, `a100`, or a YAML/JSON file overriding a preset.
    #[arg(long, default_value = "h100")]
    pub profile: String,
    /// Simulated seconds per wall second (10 = ten times faster than the modelled GPU).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Model names to serve as LoRA adapters (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub adapters: Vec<String>,
}

/// Run `epp-sim emulate`: start the pods, print how to point an EPP at them, serve until Ctrl-C.
///
/// # Errors
/// A bad time scale or profile, or a port that cannot be bound.
pub async fn run_cli(args: EmulateArgs) -> anyhow::Result<()> {
    if args.time_scale.is_nan() || args.time_scale <= 0.0 {
        anyhow::bail!("--time-scale must be positive, got {}", args.time_scale);
    }
    let config = PodConfig {
        profile: crate::engine::EngineProfile::load(&args.profile).map_err(anyhow::Error::msg)?,
        time_scale: args.time_scale,
        adapters: args.adapters,
        ..PodConfig::default()
    };
    let emulator = Emulator::start(vec![config; args.pods], args.base_port).await?;
    let list: Vec<String> = emulator.addrs.iter().map(ToString::to_string).collect();
    println!("emulated vLLM pods: {}", list.join(","));
    println!(
        "run the EPP with: epp --endpoints {} --secure-serving=false",
        list.join(",")
    );
    tokio::signal::ctrl_c().await?;
    emulator.shutdown().await;
    Ok(())
}
