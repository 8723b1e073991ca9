//! Load on the EPP's ext_proc service straight over gRPC (no Envoy): many concurrent streams,
//! each a full exchange (request headers, the body in 64 KiB chunks, the response), against a
//! real `epp` process routing to N endpoints with live metrics. Reports requests per second,
//! decision latency (last body byte sent → headers answer received), and the EPP process's CPU
//! per request and peak RSS, read from `/proc/<pid>`.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use envoy_types::pb::envoy::{
    config::core::v3::{HeaderMap, HeaderValue},
    extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
    service::ext_proc::v3::{
        HttpBody, HttpHeaders, ProcessingRequest, ProtocolConfiguration,
        external_processor_client::ExternalProcessorClient, processing_request::Request,
        processing_response::Response,
    },
};
use epp_sim::stats::quantiles;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::{
    epp_process::{EppProcess, decision_buckets, histogram_delta, histogram_quantile},
    scrape_cost::PageServer,
};

/// What to run.
#[derive(Debug, Clone)]
pub struct GrpcLoad {
    /// Prompt size in tokens (about four bytes each).
    pub prompt_tokens: usize,
    /// Concurrent streams.
    pub concurrency: usize,
    /// Measurement time.
    pub duration: Duration,
    /// Endpoints in the pool.
    pub endpoints: usize,
    /// CPUs the EPP is pinned to (`taskset -c` list), so that its CPU is not shared with the
    /// load generator (run `epp-bench` itself under `taskset` on the other CPUs).
    pub epp_cpus: Option<String>,
    /// The EPP's metrics refresh interval (Go duration), `50ms` by default.
    pub refresh_interval: String,
    /// Body bytes per request-body message; 0: the whole body in one message, then an empty
    /// end-of-stream message (what Envoy 1.40 sends when the body arrives at once).
    pub chunk_bytes: usize,
    /// Open loop at this many exchanges per second (each on a new stream) instead of
    /// `concurrency` busy streams.
    pub rate: Option<f64>,
}

/// What was measured.
#[derive(Debug, Clone)]
pub struct GrpcLoadReport {
    /// Completed exchanges per second.
    pub rps: f64,
    /// Decision latency percentiles in milliseconds (p50, p99).
    pub decision_ms: [f64; 2],
    /// EPP CPU seconds per request.
    pub cpu_per_request: f64,
    /// EPP cores used.
    pub cores: f64,
    /// Peak RSS of the EPP, MiB.
    pub peak_rss_mib: f64,
    /// Failed exchanges.
    pub errors: u64,
    /// The EPP's own decision time (last body message in → routing answer out), from its
    /// `inference_extension_request_decision_duration_seconds` histogram over the run:
    /// p50 and p99 in milliseconds (interpolated within buckets).
    pub epp_decision_ms: [f64; 2],
    /// Share of the run's decisions that took at most 2 ms (exact: 2 ms is a bucket bound).
    pub epp_decision_within_2ms: f64,
}

fn proc_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok((f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?) / 100.0)
}

fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmHWM")?
        .parse()?;
    Ok(kb / 1024.0)
}

fn body(tokens: usize, i: usize) -> Vec<u8> {
    let words = "the quick brown fox jumps over a lazy dog while ";
    let mut content = format!("request {i}: ") + &words.repeat(tokens * 4 / words.len() + 1);
    content.truncate(tokens * 4);
    serde_json::to_vec(&serde_json::json!({
        "model": "llama-3-8b",
        "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": content}],
        "max_tokens": 128, "stream": true
    }))
    .unwrap_or_default()
}

fn headers_msg() -> ProcessingRequest {
    let h = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    };
    ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    h(":path", "/v1/chat/completions"),
                    h(":method", "POST"),
                    h("x-request-id", "load"),
                ],
            }),
            end_of_stream: false,
            ..Default::default()
        })),
        protocol_config: Some(ProtocolConfiguration {
            request_body_mode: BodySendMode::FullDuplexStreamed as i32,
            response_body_mode: BodySendMode::FullDuplexStreamed as i32,
            send_body_without_waiting_for_header_response: false,
        }),
        ..Default::default()
    }
}

/// The request-body messages of one exchange: `chunk_bytes` each, or (0) the whole body and
/// then an empty end-of-stream message.
fn body_messages(body: &[u8], chunk_bytes: usize) -> Vec<(Vec<u8>, bool)> {
    if chunk_bytes == 0 {
        return vec![(body.to_vec(), false), (Vec::new(), true)];
    }
    let chunks: Vec<&[u8]> = body.chunks(chunk_bytes).collect();
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_vec(), i + 1 == chunks.len()))
        .collect()
}

async fn one_exchange(
    client: &mut ExternalProcessorClient<Channel>,
    body: &[u8],
    chunk_bytes: usize,
) -> anyhow::Result<Duration> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut inbound = client
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tx.send(headers_msg()).await?;
    for (piece, end_of_stream) in body_messages(body, chunk_bytes) {
        tx.send(ProcessingRequest {
            request: Some(Request::RequestBody(HttpBody {
                body: piece,
                end_of_stream,
                ..Default::default()
            })),
            ..Default::default()
        })
        .await?;
    }
    let sent = Instant::now();
    let first = inbound
        .message()
        .await?
        .context("stream ended before the headers answer")?;
    let decision = sent.elapsed();
    if !matches!(first.response, Some(Response::RequestHeaders(_))) {
        bail!("unexpected first answer");
    }
    // Drain the body echo.
    let mut got = 0;
    while got < body.len() {
        match inbound
            .message()
            .await?
            .context("stream ended during the body echo")?
            .response
        {
            Some(Response::RequestBody(b)) => {
                got += b.response.and_then(|c| c.body_mutation).and_then(|m| m.mutation).map_or(0, |m| match m {
                    envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation::StreamedResponse(s) => s.body.len(),
                    _ => 0,
                });
            }
            _ => bail!("unexpected answer during the body echo"),
        }
    }
    // A short streamed response closes the exchange.
    tx.send(ProcessingRequest {
        request: Some(Request::ResponseHeaders(HttpHeaders {
            end_of_stream: false,
            ..Default::default()
        })),
        ..Default::default()
    })
    .await?;
    tx.send(ProcessingRequest {
        request: Some(Request::ResponseBody(HttpBody {
            body: b"data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\ndata: [DONE]\n\n".to_vec(),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    })
    .await?;
    drop(tx);
    while inbound.message().await?.is_some() {}
    Ok(decision)
}

/// One exchange, its decision latency (ms) recorded in `latencies` or its failure counted.
async fn timed_exchange(
    client: &mut ExternalProcessorClient<Channel>,
    body: &[u8],
    chunk_bytes: usize,
    latencies: &Mutex<Vec<f64>>,
    errors: &std::sync::atomic::AtomicU64,
) {
    match one_exchange(client, body, chunk_bytes).await {
        Ok(d) => latencies.lock().await.push(d.as_secs_f64() * 1e3),
        Err(_) => {
            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Start `epp` (next to this binary) on a static pool and drive it.
///
/// # Errors
/// When a process cannot start or the EPP does not answer.
pub async fn run(cfg: GrpcLoad) -> anyhow::Result<GrpcLoadReport> {
    // Pages for the endpoints' metrics, from a separate process.
    let pages = PageServer::start(cfg.endpoints, None, None)?;
    let endpoints: Vec<String> = pages.addrs.iter().map(ToString::to_string).collect();
    let grpc = crate::envoy::free_port()?;
    let metrics_port = crate::envoy::free_port()?;
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let epp = EppProcess::start(
        &[
            format!("--endpoints={}", endpoints.join(",")),
            format!("--grpc-port={grpc}"),
            format!("--grpc-health-port={}", crate::envoy::free_port()?),
            format!("--metrics-port={metrics_port}"),
            "--secure-serving=false".to_owned(),
            format!("--refresh-metrics-interval={}", cfg.refresh_interval),
            // The request path alone, as the published figures measured it (tracing's cost is
            // the extproc bench's, benches/README.md).
            "--tracing=false".to_owned(),
        ],
        cfg.epp_cpus.as_deref(),
    )?;
    let pid = epp.pid();
    let addr = SocketAddr::from(([127, 0, 0, 1], grpc));
    let mut channel = None;
    for _ in 0..100 {
        if let Ok(c) = Channel::from_shared(format!("http://{addr}"))?.connect().await {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = channel.context("epp did not listen within 5 s")?;
    tokio::time::sleep(Duration::from_millis(500)).await; // first scrapes
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..64).map(|i| body(cfg.prompt_tokens, i)).collect());
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let buckets0 = decision_buckets(&metrics_url).await?;
    let (cpu0, t0) = (proc_cpu_seconds(pid)?, Instant::now());
    let deadline = t0 + cfg.duration;
    let mut workers = tokio::task::JoinSet::new();
    let client = ExternalProcessorClient::new(channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let chunk_bytes = cfg.chunk_bytes;
    match cfg.rate {
        Some(rate) => {
            // Open loop: arrivals on a fixed schedule, whether or not earlier ones finished.
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1e-3)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut i = 0;
            while Instant::now() < deadline {
                ticks.tick().await;
                let (bodies, latencies, errors) = (bodies.clone(), latencies.clone(), errors.clone());
                let mut client = client.clone();
                workers.spawn(async move {
                    let body = &bodies[i % bodies.len()];
                    timed_exchange(&mut client, body, chunk_bytes, &latencies, &errors).await;
                });
                i += 1;
            }
        }
        None => {
            for w in 0..cfg.concurrency {
                let (bodies, latencies, errors) = (bodies.clone(), latencies.clone(), errors.clone());
                let mut client = client.clone();
                workers.spawn(async move {
                    let mut i = w;
                    while Instant::now() < deadline {
                        let body = &bodies[i % bodies.len()];
                        timed_exchange(&mut client, body, chunk_bytes, &latencies, &errors).await;
                        i += cfg.concurrency;
                    }
                });
            }
        }
    }
    while workers.join_next().await.is_some() {}
    let wall = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu_seconds(pid)? - cpu0;
    let rss = peak_rss_mib(pid)?;
    let buckets1 = decision_buckets(&metrics_url).await?;
    let run = histogram_delta(&buckets0, &buckets1);
    let total = run.last().map_or(0.0, |b| b.1);
    let within_2ms = run.iter().find(|b| b.0 == 0.002).map_or(0.0, |b| b.1) / total.max(1.0);
    drop(epp);
    drop(pages);
    let mut l = latencies.lock().await.clone();
    let n = l.len() as f64;
    Ok(GrpcLoadReport {
        rps: n / wall,
        decision_ms: quantiles(&mut l, [0.50, 0.99]),
        cpu_per_request: cpu / n.max(1.0),
        cores: cpu / wall,
        peak_rss_mib: rss,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        epp_decision_ms: [
            histogram_quantile(&run, 0.5) * 1e3,
            histogram_quantile(&run, 0.99) * 1e3,
        ],
        epp_decision_within_2ms: within_2ms,
    })
}

/// `epp-bench grpc-load` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct GrpcLoadArgs {
    /// Prompt size in tokens.
    #[arg(long, default_value_t = 100_000)]
    pub prompt_tokens: usize,
    /// Concurrent streams.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Endpoints in the pool (each serves a full vLLM metrics page).
    #[arg(long, default_value_t = 100)]
    pub endpoints: usize,
    /// Pin the EPP to these CPUs (`taskset -c` list, e.g. `0`); run epp-bench itself on the
    /// others (`taskset -c 1 epp-bench grpc-load --epp-cpus 0`).
    #[arg(long)]
    pub epp_cpus: Option<String>,
    /// The EPP's metrics refresh interval (a long one leaves only the request path).
    #[arg(long, default_value = "50ms")]
    pub refresh: String,
    /// Body bytes per request-body message; 0 sends the whole body in one message followed
    /// by an empty end-of-stream one, as Envoy 1.40 does for a body that arrives at once.
    #[arg(long, default_value_t = 0)]
    pub chunk_bytes: usize,
    /// Open loop: start this many exchanges per second, each on its own stream, instead of
    /// keeping `--concurrency` streams busy. Latency at a load below saturation.
    #[arg(long)]
    pub rate: Option<f64>,
}

/// Run `epp-bench grpc-load` and print its one-line summary.
///
/// # Errors
/// The EPP or the page servers could not start, or the EPP's figures could not be read.
pub async fn run_cli(args: GrpcLoadArgs) -> anyhow::Result<()> {
    let GrpcLoadArgs {
        prompt_tokens,
        concurrency,
        seconds,
        endpoints,
        epp_cpus,
        refresh,
        chunk_bytes,
        rate,
    } = args;
    let r = run(GrpcLoad {
        prompt_tokens,
        concurrency,
        duration: Duration::from_secs(seconds),
        endpoints,
        epp_cpus,
        refresh_interval: refresh,
        chunk_bytes,
        rate,
    })
    .await?;
    let load = match rate {
        Some(rate) => format!("open loop at {rate} req/s"),
        None => format!("{concurrency} streams"),
    };
    println!(
        "{prompt_tokens}-token chat prompts, {load}, {endpoints} endpoints: {:.0} req/s, {:.2} EPP cores ({:.0} req/s per core), \
         {:.3} ms CPU/request, decision p50 {:.3} ms p99 {:.3} ms (client), EPP-side decision p50 {:.3} ms p99 {:.3} ms ({:.1} % within 2 ms), \
         peak RSS {:.1} MiB, {} errors",
        r.rps,
        r.cores,
        r.rps / r.cores.max(1e-9),
        r.cpu_per_request * 1e3,
        r.decision_ms[0],
        r.decision_ms[1],
        r.epp_decision_ms[0],
        r.epp_decision_ms[1],
        r.epp_decision_within_2ms * 100.0,
        r.peak_rss_mib,
        r.errors
    );
    Ok(())
}
