//! What the EPP adds to a request's latency behind Envoy: the same open-loop load (a fixed rate
//! of requests with a prompt of a given size) once through Envoy with the EPP (the shipped
//! `manifests/envoy/envoy.yaml`) and once through an Envoy that routes straight to one pod.
//! Emulated pods answer at once, so the difference is the EPP's share.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{sync::Mutex, time::Instant};

use crate::{
    emulator::{Emulator, PodConfig},
    envoy::{Envoy, EnvoyPorts, free_port},
    epp_process::{EppProcess, decision_buckets, histogram_delta, histogram_quantile},
};

/// Until something listens on 127.0.0.1:`port` (at most 5 s).
async fn wait_for_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("nothing listens on port {port}")
}

/// Envoy routing every request to one static endpoint, no ext_proc.
fn direct_config(listener: u16, admin: u16, pod: u16) -> String {
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: direct
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listener}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: direct
          route_config:
            virtual_hosts:
            - name: direct
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: pod, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: pod
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: pod
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {pod}}}}}}}
"#
    )
}

/// Latency percentiles (ms) of one run, and failures.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// p50 in milliseconds.
    pub p50: f64,
    /// p99 in milliseconds.
    pub p99: f64,
    /// Requests that failed.
    pub errors: u64,
    /// Requests completed.
    pub completed: usize,
}

async fn open_loop(url: &str, rate: u32, seconds: u64, prompt_tokens: usize) -> Run {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap_or_default();
    let words = "the quick brown fox jumps over a lazy dog while ";
    let mut content = words.repeat(prompt_tokens * 4 / words.len() + 1);
    content.truncate(prompt_tokens * 4);
    let body = Arc::new(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 1}).to_string());
    let samples = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let total = u64::from(rate) * seconds;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + period * u32::try_from(i).unwrap_or(u32::MAX)).await;
        let (client, body, samples, errors, url) = (
            client.clone(),
            body.clone(),
            samples.clone(),
            errors.clone(),
            url.to_owned(),
        );
        tasks.spawn(async move {
            let t0 = Instant::now();
            let r = client
                .post(format!("{url}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => {
                    let _ = r.bytes().await;
                    samples.lock().await.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                _ => {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut s = samples.lock().await.clone();
    s.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        s.get(((p / 100.0) * (s.len().max(1) - 1) as f64).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Run {
        p50: pct(50.0),
        p99: pct(99.0),
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        completed: s.len(),
    }
}

/// Both paths measured, and the EPP's own share.
#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    /// Through Envoy with the EPP.
    pub with_epp: Run,
    /// Through Envoy straight to a pod.
    pub direct: Run,
    /// The EPP's own decision time during the EPP run (last body message in → routing answer
    /// out), p50 and p99 in milliseconds, from its histogram.
    pub epp_decision_ms: [f64; 2],
}

/// Measure both paths.
///
/// # Errors
/// When Envoy, the EPP or the pods cannot start.
pub async fn measure(rate: u32, seconds: u64, prompt_tokens: usize) -> anyhow::Result<Latencies> {
    let instant = PodConfig::instant();
    let emulator = Emulator::start(vec![instant; 3], 0).await?;
    let endpoints: Vec<String> = emulator.addrs.iter().map(ToString::to_string).collect();
    let grpc = free_port()?;
    let metrics_port = free_port()?;
    // Its own process, as deployed: the EPP does not share this process's runtime with the
    // load generator and the pods.
    let epp = EppProcess::start(
        &[
            format!("--endpoints={}", endpoints.join(",")),
            format!("--grpc-port={grpc}"),
            format!("--grpc-health-port={}", free_port()?),
            format!("--metrics-port={metrics_port}"),
        ],
        None,
    )?;
    wait_for_port(grpc)
        .await
        .context("the EPP did not listen within 5 s")?;
    let with_epp = Envoy::start(EnvoyPorts {
        listener: free_port()?,
        admin: free_port()?,
        epp: grpc,
    })
    .await?;
    let direct_ports = EnvoyPorts {
        listener: free_port()?,
        admin: free_port()?,
        epp: 0,
    };
    let direct = Envoy::start_with_config(
        direct_ports,
        direct_config(
            direct_ports.listener,
            direct_ports.admin,
            emulator.addrs[0].port(),
        ),
    )
    .await?;
    // Warm both paths (connections, ORIGINAL_DST hosts), then measure each in turn.
    let _ = open_loop(&with_epp.url(), 50, 1, prompt_tokens).await;
    let _ = open_loop(&direct.url(), 50, 1, prompt_tokens).await;
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let before = decision_buckets(&metrics_url).await?;
    let epp_run = open_loop(&with_epp.url(), rate, seconds, prompt_tokens).await;
    let decisions = histogram_delta(&before, &decision_buckets(&metrics_url).await?);
    let direct_run = open_loop(&direct.url(), rate, seconds, prompt_tokens).await;
    drop(with_epp);
    drop(direct);
    drop(epp);
    emulator.shutdown().await;
    Ok(Latencies {
        with_epp: epp_run,
        direct: direct_run,
        epp_decision_ms: [
            histogram_quantile(&decisions, 0.5) * 1e3,
            histogram_quantile(&decisions, 0.99) * 1e3,
        ],
    })
}
