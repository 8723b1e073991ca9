//! Open-loop load from a workload (a trace or a generator) against an OpenAI-style HTTP
//! endpoint such as Envoy: each request is sent at its arrival time whatever happens to the
//! others, streamed, and timed from the client's side.
//!
//! TTFT is the time from sending to the first SSE event that carries output; E2E to the end of
//! the stream. Prompts are the workload's synthesized text (the same bytes the replay hashes), so
//! prefix sharing in the trace is prefix sharing on the wire. The served pod is read from the
//! `x-emulated-pod` header when the pods are emulated, and cached prompt tokens from the usage
//! the servers report.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::Serialize;
use tokio::{sync::Mutex, time::Instant};
use tokio_util::task::TaskTracker;

use crate::{stats::Latency, workload::Workload};

/// How to send.
#[derive(Debug, Clone)]
pub struct TraceLoadConfig {
    /// Base URL, e.g. `http://127.0.0.1:8081`.
    pub url: String,
    /// `model` for requests without an adapter.
    pub model: String,
    /// Header carrying the workload's tenant, when it has one.
    pub tenant_header: String,
    /// Give up on a request after this long.
    pub timeout: Duration,
}

/// What the client saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TraceLoadReport {
    /// Requests sent.
    pub requests: usize,
    /// Count per HTTP status (0 = transport error or timeout).
    pub status: BTreeMap<u16, usize>,
    /// Requests per serving pod (`x-emulated-pod`).
    pub per_pod: BTreeMap<String, usize>,
    /// Time to first token of successful requests.
    pub ttft: Latency,
    /// End-to-end latency of successful requests.
    pub e2e: Latency,
    /// Output events received per second of wall time.
    pub output_events_per_s: f64,
    /// Prompt tokens the servers reported as cached / prompt tokens they reported.
    pub cached_share: f64,
    /// Wall time, s.
    pub elapsed_s: f64,
    /// Latest send behind its scheduled time, ms (a loaded client shows here).
    pub max_send_lag_ms: f64,
}

#[derive(Default)]
struct Sample {
    status: u16,
    pod: Option<String>,
    ttft: Option<f64>,
    e2e: f64,
    events: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
}

/// Send `workload` open loop and report.
pub async fn run(workload: &Workload, cfg: &TraceLoadConfig) -> TraceLoadReport {
    let client = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .build()
        .unwrap_or_default();
    let samples = Arc::new(Mutex::new(Vec::with_capacity(workload.requests.len())));
    let tasks = TaskTracker::new();
    let started = Instant::now();
    let mut max_lag = Duration::ZERO;
    for req in &workload.requests {
        let due = started + Duration::from_nanos(req.arrival_ns);
        tokio::time::sleep_until(due).await;
        max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
        let mut text = String::new();
        workload.prompt_text(req, &mut text);
        let body = serde_json::json!({
            "model": req.adapter.as_deref().unwrap_or(&cfg.model),
            "messages": [{"role": "user", "content": text}],
            "max_tokens": req.output_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let mut post = client
            .post(format!("{}/v1/chat/completions", cfg.url))
            .json(&body);
        if let Some(t) = &req.tenant {
            post = post.header(cfg.tenant_header.as_str(), t.as_ref());
        }
        let samples = samples.clone();
        tasks.spawn(async move {
            let sample = send(post).await;
            samples.lock().await.push(sample);
        });
    }
    tasks.close();
    tasks.wait().await;
    let elapsed = started.elapsed().as_secs_f64();
    let samples = samples.lock().await;
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.status == 200).collect();
    let mut report = TraceLoadReport {
        requests: samples.len(),
        ttft: Latency::of(ok.iter().filter_map(|s| s.ttft).collect()),
        e2e: Latency::of(ok.iter().map(|s| s.e2e).collect()),
        output_events_per_s: ok.iter().map(|s| s.events).sum::<u64>() as f64 / elapsed.max(1e-9),
        elapsed_s: elapsed,
        max_send_lag_ms: max_lag.as_secs_f64() * 1e3,
        ..Default::default()
    };
    let (prompt, cached) = ok
        .iter()
        .fold((0, 0), |(p, c), s| (p + s.prompt_tokens, c + s.cached_tokens));
    report.cached_share = if prompt == 0 {
        0.0
    } else {
        cached as f64 / prompt as f64
    };
    for s in samples.iter() {
        *report.status.entry(s.status).or_default() += 1;
        if let Some(pod) = &s.pod {
            *report.per_pod.entry(pod.clone()).or_default() += 1;
        }
    }
    report
}

async fn send(post: reqwest::RequestBuilder) -> Sample {
    let t0 = Instant::now();
    let mut sample = Sample::default();
    let Ok(mut resp) = post.send().await else {
        sample.e2e = t0.elapsed().as_secs_f64();
        return sample;
    };
    sample.status = resp.status().as_u16();
    sample.pod = resp
        .headers()
        .get("x-emulated-pod")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    // The core's splitter: events end at a blank line after `\n` or `\r\n` line endings.
    let mut events = epp::parser::EventSplitter::default();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => events.feed_with(&chunk, false, |event| sample.note_event(event, t0)),
            Ok(None) => {
                events.feed_with(b"", true, |event| sample.note_event(event, t0));
                break;
            }
            Err(_) => {
                sample.status = 0;
                break;
            }
        }
    }
    sample.e2e = t0.elapsed().as_secs_f64();
    sample
}

impl Sample {
    fn note_event(&mut self, event: &[u8], t0: Instant) {
        let Some(data) = event.strip_prefix(b"data: ") else {
            return;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        let has_output = v["choices"].as_array().is_some_and(|c| !c.is_empty());
        if has_output {
            self.events += 1;
            if self.ttft.is_none() {
                self.ttft = Some(t0.elapsed().as_secs_f64());
            }
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
            self.cached_tokens = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
        }
    }
}

impl TraceLoadReport {
    /// A human-readable summary.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "requests: {}  elapsed: {:.2}s  output events: {:.0}/s  cached prompt share: {:.1}%  max send lag: {:.1} ms\n\
             TTFT: mean {:.1} ms  p50 {:.1}  p90 {:.1}  p99 {:.1}\n\
             E2E:  mean {:.1} ms  p50 {:.1}  p90 {:.1}  p99 {:.1}\nstatus:",
            self.requests,
            self.elapsed_s,
            self.output_events_per_s,
            self.cached_share * 100.0,
            self.max_send_lag_ms,
            self.ttft.mean_s * 1e3,
            self.ttft.p50_s * 1e3,
            self.ttft.p90_s * 1e3,
            self.ttft.p99_s * 1e3,
            self.e2e.mean_s * 1e3,
            self.e2e.p50_s * 1e3,
            self.e2e.p90_s * 1e3,
            self.e2e.p99_s * 1e3,
        );
        for (code, n) in &self.status {
            out.push_str(&format!(" {code}×{n}"));
        }
        for (pod, n) in &self.per_pod {
            out.push_str(&format!("\n  {pod:<22} {n:>6}"));
        }
        out.push('\n');
        out
    }
}

/// `epp-sim load`: a workload sent open loop to an OpenAI-style endpoint.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceLoadArgs {
    #[command(flatten)]
    pub workload: crate::replay::command::WorkloadArgs,
    /// Base URL (Envoy's listener).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub url: String,
    /// `model` of requests that do not name an adapter.
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    pub model: String,
    /// Header that carries the workload's tenant (multi-tenant generator).
    #[arg(long, default_value = "x-gateway-inference-fairness-id")]
    pub tenant_header: String,
    /// Per-request timeout (Go duration).
    #[arg(long, default_value = "300s", value_parser = epp::config::parse_duration)]
    pub timeout: Duration,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Run `epp-sim load`: send the workload, print the summary, write the JSON report if asked.
///
/// # Errors
/// A workload that cannot be loaded, or a report that cannot be written.
pub async fn run_cli(args: TraceLoadArgs) -> anyhow::Result<()> {
    let workload = args.workload.load().map_err(anyhow::Error::msg)?;
    eprintln!(
        "{}: {} requests open loop against {}",
        workload.name,
        workload.requests.len(),
        args.url
    );
    let cfg = TraceLoadConfig {
        url: args.url.trim_end_matches('/').to_owned(),
        model: args.model,
        tenant_header: args.tenant_header,
        timeout: args.timeout,
    };
    let report = run(&workload, &cfg).await;
    println!("{}", report.summary());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(())
}
