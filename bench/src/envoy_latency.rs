//! What the EPP adds to a request's latency behind Envoy: the same open-loop load (a fixed rate
//! of requests with a prompt of a given size) once through Envoy with the EPP (the shipped
//! `manifests/envoy/envoy.yaml`) and once through an Envoy that routes straight to one pod.
//! Emulated pods answer at once, so the difference is the EPP's share.
//! Envoy's own view is read too: the EPP run's Envoy writes an access log line per request with
//! the ext_proc filter's per-phase call latencies (its `ExtProcLoggingInfo` filter state), so the
//! time Envoy spent waiting on the EPP is known per request, free of the client's queueing.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{sync::Mutex, time::Instant};

use epp_sim::{
    emulator::{Emulator, PodConfig},
    stats::quantiles,
};

use crate::{
    envoy::{Envoy, EnvoyPorts, TempPath, free_port, render_config},
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

/// The ext_proc phases Envoy times, in the order of an exchange: a label, the access-log field
/// its latency is read from (microseconds; the sum when a phase made several calls), and whether
/// it counts in the per-request sum. It does not for the request headers: in full-duplex mode
/// Envoy sends the headers and the body back to back and the EPP answers both once the body is
/// in, so the headers call runs inside the body call. The other three follow one another.
pub const EXT_PROC_PHASES: [(&str, &str, bool); 4] = [
    ("request headers", "request_header_latency_us", false),
    ("request body", "request_body_total_latency_us", true),
    ("response headers", "response_header_latency_us", true),
    ("response body", "response_body_total_latency_us", true),
];

/// `config` (the shipped Envoy config) with a file access log at `path` whose lines are the
/// ext_proc phase latencies of [`EXT_PROC_PHASES`], space-separated (`-` for a phase not run).
pub fn with_ext_proc_log(config: &str, path: &std::path::Path) -> anyhow::Result<String> {
    let fields: Vec<String> = EXT_PROC_PHASES
        .iter()
        .map(|(_, field, _)| format!("%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:{field})%"))
        .collect();
    let anchor = "          stat_prefix: inference\n";
    anyhow::ensure!(
        config.contains(anchor),
        "the Envoy config has no `stat_prefix: inference` line"
    );
    let log = format!(
        "{anchor}          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format:
                text_format_source:
                  inline_string: \"{}\\n\"
",
        path.display(),
        fields.join(" ")
    );
    Ok(config.replacen(anchor, &log, 1))
}

/// Per-request ext_proc time as Envoy saw it, from the access log.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtProcTimes {
    /// p50 and p99 (ms) of each phase of [`EXT_PROC_PHASES`], over the requests that ran it.
    pub phases: [[f64; 2]; 4],
    /// How many requests ran each phase (logged a latency for it).
    pub ran: [usize; 4],
    /// p50 and p99 (ms) of a request's time waiting on the EPP: the sum of its phases that
    /// follow one another (see [`EXT_PROC_PHASES`]).
    pub total: [f64; 2],
    /// Access-log lines read.
    pub requests: usize,
}

/// Percentiles of the access-log lines `text` (see [`with_ext_proc_log`]).
pub fn ext_proc_times(text: &str) -> ExtProcTimes {
    let mut phases: [Vec<f64>; 4] = Default::default();
    let mut totals = Vec::new();
    for line in text.lines() {
        // A request that never reached the EPP (no counted phase logged) is not a 0 ms wait.
        let mut total = None;
        for ((samples, value), (_, _, counted)) in phases.iter_mut().zip(line.split(' ')).zip(EXT_PROC_PHASES)
        {
            if let Ok(us) = value.trim_matches('"').parse::<f64>() {
                samples.push(us / 1e3);
                if counted {
                    *total.get_or_insert(0.0) += us / 1e3;
                }
            }
        }
        totals.extend(total);
    }
    let mut times = ExtProcTimes {
        requests: text.lines().count(),
        total: p50_p99(&mut totals),
        ..ExtProcTimes::default()
    };
    for ((out, ran), samples) in times.phases.iter_mut().zip(&mut times.ran).zip(phases.iter_mut()) {
        *ran = samples.len();
        *out = p50_p99(samples);
    }
    times
}

/// Nearest-rank p50 and p99 of `samples` (sorted in place); zeros when empty.
fn p50_p99(samples: &mut [f64]) -> [f64; 2] {
    quantiles(samples, [0.50, 0.99])
}

/// The access log's text once it holds at least `lines` lines (Envoy flushes it on a timer),
/// waiting at most 15 s; whatever is there by then otherwise.
pub async fn read_access_log(path: &std::path::Path, lines: usize) -> String {
    let mut text = String::new();
    for _ in 0..150 {
        text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    text
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

impl Run {
    /// Requests sent: completed or failed.
    fn requests(&self) -> usize {
        self.completed + usize::try_from(self.errors).unwrap_or(usize::MAX)
    }
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
    let [p50, p99] = p50_p99(&mut s);
    Run {
        p50,
        p99,
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
    /// Envoy's time in ext_proc calls during the EPP run, per phase and per request.
    pub envoy_ext_proc: ExtProcTimes,
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
            // The request path alone, as the published figures measured it (tracing's cost is
            // the extproc bench's, benches/README.md).
            "--tracing=false".to_owned(),
        ],
        None,
    )?;
    wait_for_port(grpc)
        .await
        .context("the EPP did not listen within 5 s")?;
    let epp_ports = EnvoyPorts {
        listener: free_port()?,
        admin: free_port()?,
        epp: grpc,
    };
    let access_log = TempPath(std::env::temp_dir().join(format!(
        "epp-envoy-latency-{}-{}.log",
        std::process::id(),
        epp_ports.listener
    )));
    let with_epp = Envoy::start_with_config(
        epp_ports,
        with_ext_proc_log(&render_config(epp_ports), access_log.path())?,
    )
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
    let warm_up = open_loop(&with_epp.url(), 50, 1, prompt_tokens).await;
    let _ = open_loop(&direct.url(), 50, 1, prompt_tokens).await;
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let before = decision_buckets(&metrics_url).await?;
    // Every request, failed or not, gets a line; the warm-up's come first.
    let warm_up_lines = read_access_log(access_log.path(), warm_up.requests())
        .await
        .lines()
        .count();
    let epp_run = open_loop(&with_epp.url(), rate, seconds, prompt_tokens).await;
    let decisions = histogram_delta(&before, &decision_buckets(&metrics_url).await?);
    let logged = read_access_log(access_log.path(), warm_up_lines + epp_run.requests()).await;
    let measured: Vec<&str> = logged.lines().skip(warm_up_lines).collect();
    let envoy_ext_proc = ext_proc_times(&measured.join("\n"));
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
        envoy_ext_proc,
    })
}

/// `epp-bench envoy-latency` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct EnvoyLatencyArgs {
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Prompt size in tokens.
    #[arg(long, default_value_t = 4000)]
    pub prompt_tokens: usize,
}

/// Run `epp-bench envoy-latency` and print both runs, the difference and Envoy's own ext_proc
/// timings.
///
/// # Errors
/// Envoy, the EPP or the emulated pod could not start.
pub async fn run_cli(args: EnvoyLatencyArgs) -> anyhow::Result<()> {
    let EnvoyLatencyArgs {
        rate,
        seconds,
        prompt_tokens,
    } = args;
    let Latencies {
        with_epp,
        direct,
        epp_decision_ms,
        envoy_ext_proc,
    } = measure(rate, seconds, prompt_tokens).await?;
    println!(
        "{prompt_tokens}-token prompts at {rate} req/s for {seconds}s:\n  Envoy + EPP: p50 {:.2} ms  p99 {:.2} ms  ({} ok, {} errors)\n  Envoy direct: p50 {:.2} ms  p99 {:.2} ms  ({} ok, {} errors)\n  added by the EPP: p50 {:+.2} ms  p99 {:+.2} ms\n  of which the EPP's own decision (its histogram): p50 {:.3} ms  p99 {:.3} ms",
        with_epp.p50,
        with_epp.p99,
        with_epp.completed,
        with_epp.errors,
        direct.p50,
        direct.p99,
        direct.completed,
        direct.errors,
        with_epp.p50 - direct.p50,
        with_epp.p99 - direct.p99,
        epp_decision_ms[0],
        epp_decision_ms[1]
    );
    println!(
        "Envoy's time in ext_proc calls ({} requests, from its access log):",
        envoy_ext_proc.requests
    );
    for ((phase, _, _), [p50, p99]) in EXT_PROC_PHASES.iter().zip(envoy_ext_proc.phases) {
        println!("  {phase:<17} p50 {p50:.3} ms  p99 {p99:.3} ms");
    }
    let [p50, p99] = envoy_ext_proc.total;
    println!("  per request (sum of the last three) p50 {p50:.3} ms  p99 {p99:.3} ms");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_lines_give_per_phase_and_per_request_percentiles() {
        // Request headers overlap the body call and stay out of the per-request sum; `-` is a
        // phase Envoy did not run, quoted numbers are what some formatters write.
        // The last line is a request rejected before the EPP saw it: counted, but no wait.
        let text = "500 600 300 400\n700 900 \"200\" -\n100 300 100 100\n- - - -\n";
        let t = ext_proc_times(text);
        assert_eq!(t.requests, 4);
        assert_eq!(t.ran, [3, 3, 3, 2]);
        assert_eq!(t.phases[0], [0.5, 0.7]);
        assert_eq!(t.phases[1], [0.6, 0.9]);
        assert_eq!(t.phases[2], [0.2, 0.3]);
        // Two samples: the nearest-rank p50 is the first (rank ⌈0.5·2⌉ = 1).
        assert_eq!(t.phases[3], [0.1, 0.4]);
        // Totals 1.3, 1.1, 0.5 ms.
        let [p50, p99] = t.total;
        assert!(
            (p50 - 1.1).abs() < 1e-9 && (p99 - 1.3).abs() < 1e-9,
            "{:?}",
            t.total
        );
    }

    #[test]
    fn no_lines_give_zeros() {
        let t = ext_proc_times("");
        assert_eq!(t.requests, 0);
        assert_eq!(t.ran, [0; 4]);
        assert_eq!(t.total, [0.0, 0.0]);
    }

    #[test]
    fn the_access_log_goes_into_the_shipped_listener() {
        let config = render_config(EnvoyPorts {
            listener: 1,
            admin: 2,
            epp: 3,
        });
        let logged = with_ext_proc_log(&config, std::path::Path::new("/tmp/x.log")).unwrap();
        let format = "inline_string: \"%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_header_latency_us)% \
            %FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_body_total_latency_us)% \
            %FILTER_STATE(envoy.filters.http.ext_proc:FIELD:response_header_latency_us)% \
            %FILTER_STATE(envoy.filters.http.ext_proc:FIELD:response_body_total_latency_us)%\\n\"";
        assert!(logged.contains(format), "{logged}");
        assert!(logged.contains("              path: /tmp/x.log\n"));
        assert_eq!(logged.matches("access_log:").count(), 1);
        let err = with_ext_proc_log("admin: {}", std::path::Path::new("/tmp/x.log")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the Envoy config has no `stat_prefix: inference` line"
        );
    }
}
