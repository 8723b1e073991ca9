//! A closed-loop load generator for OpenAI-style endpoints (through Envoy or straight to a pod).
//!
//! Prompts come in groups that share a long prefix (a system prompt), like agents or chat
//! sessions do; each request appends a unique question. The report shows latency percentiles,
//! status codes, which pod served how much (from the emulator's `x-emulated-pod` header), and
//! group affinity: the share of each group's requests that landed on that group's most used pod.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use epp_sim::stats::quantiles;
use serde::Serialize;
use tokio::sync::Mutex;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Base URL, e.g. `http://127.0.0.1:8081`.
    pub url: String,
    /// Total requests.
    pub requests: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Prefix groups.
    pub groups: usize,
    /// Shared prefix length per group, in bytes.
    pub prefix_bytes: usize,
    /// Output tokens per request.
    pub max_tokens: u32,
    /// Stream responses (SSE).
    pub stream: bool,
    /// Model name sent.
    pub model: String,
}

/// What happened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Requests sent.
    pub requests: usize,
    /// Count per HTTP status (0 = transport error).
    pub status: BTreeMap<u16, usize>,
    /// Requests per serving pod.
    pub per_pod: BTreeMap<String, usize>,
    /// Latency percentiles in milliseconds (p50, p90, p99).
    pub latency_ms: [f64; 3],
    /// Wall time in seconds.
    pub elapsed_s: f64,
    /// Completed requests per second.
    pub throughput_rps: f64,
    /// Mean share of each prefix group's requests served by its most used pod (1.0 = perfect).
    pub group_affinity: f64,
}

fn prompt(group: usize, i: usize, prefix_bytes: usize) -> String {
    let sentence = format!("System prompt of tenant {group}: you are a careful assistant for team {group}. ");
    let mut p = sentence.repeat(prefix_bytes / sentence.len() + 1);
    p.truncate(prefix_bytes);
    p.push_str(&format!(" Question {i}: what is {i} times {group}?"));
    p
}

struct Sample {
    status: u16,
    pod: Option<String>,
    group: usize,
    latency: Duration,
}

/// Run the load and report.
pub async fn run_load(cfg: LoadConfig) -> LoadReport {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.concurrency)
        .build()
        .unwrap_or_default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(cfg.requests)));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..cfg.concurrency.max(1) {
        let (client, next, samples, cfg) = (client.clone(), next.clone(), samples.clone(), cfg.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= cfg.requests {
                    return;
                }
                let group = i % cfg.groups.max(1);
                let body = serde_json::json!({
                    "model": cfg.model,
                    "messages": [{"role": "system", "content": prompt(group, i, cfg.prefix_bytes)}],
                    "max_tokens": cfg.max_tokens,
                    "stream": cfg.stream,
                });
                let t0 = Instant::now();
                let result = client
                    .post(format!("{}/v1/chat/completions", cfg.url))
                    .json(&body)
                    .send()
                    .await;
                let sample = match result {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let pod = resp
                            .headers()
                            .get("x-emulated-pod")
                            .and_then(|v| v.to_str().ok())
                            .map(String::from);
                        let _ = resp.bytes().await;
                        Sample {
                            status,
                            pod,
                            group,
                            latency: t0.elapsed(),
                        }
                    }
                    Err(_) => Sample {
                        status: 0,
                        pod: None,
                        group,
                        latency: t0.elapsed(),
                    },
                };
                samples.lock().await.push(sample);
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let samples = samples.lock().await;

    let mut report = LoadReport {
        requests: samples.len(),
        elapsed_s: elapsed.as_secs_f64(),
        ..Default::default()
    };
    let mut latencies: Vec<f64> = samples.iter().map(|s| s.latency.as_secs_f64() * 1e3).collect();
    report.latency_ms = quantiles(&mut latencies, [0.50, 0.90, 0.99]);
    report.throughput_rps = samples.len() as f64 / elapsed.as_secs_f64().max(1e-9);
    let mut by_group: BTreeMap<usize, BTreeMap<&str, usize>> = BTreeMap::new();
    for s in samples.iter() {
        *report.status.entry(s.status).or_default() += 1;
        if let Some(pod) = &s.pod {
            *report.per_pod.entry(pod.clone()).or_default() += 1;
            *by_group.entry(s.group).or_default().entry(pod).or_default() += 1;
        }
    }
    let shares: Vec<f64> = by_group
        .values()
        .map(|pods| {
            let total: usize = pods.values().sum();
            *pods.values().max().unwrap_or(&0) as f64 / total.max(1) as f64
        })
        .collect();
    report.group_affinity = shares.iter().sum::<f64>() / shares.len().max(1) as f64;
    report
}

impl LoadReport {
    /// A human-readable summary.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "requests: {}  elapsed: {:.2}s  throughput: {:.1} req/s\nlatency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}\nstatus:",
            self.requests,
            self.elapsed_s,
            self.throughput_rps,
            self.latency_ms[0],
            self.latency_ms[1],
            self.latency_ms[2]
        );
        for (code, n) in &self.status {
            out.push_str(&format!(" {code}×{n}"));
        }
        out.push_str("\nper pod:");
        for (pod, n) in &self.per_pod {
            out.push_str(&format!("\n  {pod:<22} {n:>6}"));
        }
        out.push_str(&format!(
            "\nprefix-group affinity: {:.0}% of each group's requests on its main pod\n",
            self.group_affinity * 100.0
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_share_the_group_prefix() {
        let a = prompt(1, 1, 500);
        let b = prompt(1, 2, 500);
        assert_eq!(a[..500], b[..500]);
        assert_ne!(prompt(2, 1, 500)[..500], a[..500]);
    }
}
