//! `epp-sim`: emulated vLLM pods, a load generator, and a one-command demo of the EPP behind a
//! real Envoy.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use epp::config::{Flags, normalize_go_args};
use epp_sim::{
    emulator::{Emulator, PodConfig},
    envoy::{Envoy, EnvoyPorts, free_port, wait_until_scraped},
    load::{LoadConfig, run_load},
    replay::command::SimArgs,
};

/// Tools around the epp Endpoint Picker: emulated vLLM pods, load, and a local demo.
#[derive(Parser)]
#[command(name = "epp-sim", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run emulated vLLM pods (OpenAI API + /metrics, driven by the engine model in real time)
    /// on 127.0.0.1 until Ctrl-C.
    Emulate {
        /// Number of pods.
        #[arg(long, default_value_t = 3)]
        pods: usize,
        /// First port; pods take consecutive ports.
        #[arg(long, default_value_t = 8000)]
        base_port: u16,
        /// Engine profile: `h100`, `a100`, or a YAML/JSON file overriding a preset.
        #[arg(long, default_value = "h100")]
        profile: String,
        /// Simulated seconds per wall second (10 = ten times faster than the modelled GPU).
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// Model names to serve as LoRA adapters (comma-separated).
        #[arg(long, value_delimiter = ',')]
        adapters: Vec<String>,
    },
    /// Open-loop load from a trace or generator against an OpenAI-style endpoint (e.g. Envoy):
    /// every request leaves at its arrival time; TTFT and latency are measured at the client.
    Load(TraceLoadArgs),
    /// Replay a trace (or a generated workload) through the EPP's scheduler against simulated
    /// vLLM pods, in simulated time, and report TTFT, TPOT, throughput and cache hits.
    Replay(SimArgs),
    /// Real-hardware benchmark: llama-server processes (Gemma 3 270M, CPU) behind Envoy and the
    /// EPP, questions about shared long documents; TTFT, throughput and cached share per config.
    SharedDocs(epp_sim::shared_docs::SharedDocsArgs),
    /// Chaos soak (benchmark tooling, not CI): mixed traffic through a real Envoy and `epp` while
    /// pods are killed, Redis restarts and metrics pages turn to garbage or hang; checks for
    /// errors, leaks (RSS, files, threads, tasks, running counts) and the budget ledger.
    Soak(epp_sim::soak::SoakArgs),
    /// Run several configurations on one workload and print them side by side.
    ///
    /// Example: epp-sim compare --trace mooncake_conversation_trace.jsonl --format mooncake
    /// --pods 8 --rate-scale 2 --config round-robin --config upstream-default --config
    /// recommended --json out.json
    Compare(SimArgs),
    /// The runaway retry loop: one tenant resends a long request every second over a simulated
    /// weekend next to well-behaved tenants, replayed without a limit and with a daily money
    /// budget; prints each tenant's spend and refusals and when the 429s start, and plots the
    /// spend (`--plot runaway.svg`).
    Runaway(epp_sim::runaway::RunawayArgs),
    /// Measure the CPU the EPP's collector spends scraping N pods serving a realistic vLLM page.
    ScrapeCost {
        /// Pods to scrape.
        #[arg(long, default_value_t = 100)]
        endpoints: usize,
        /// Scrape interval (Go duration).
        #[arg(long, default_value = "50ms", value_parser = epp::config::parse_duration)]
        interval: Duration,
        /// Measurement time in seconds (after a 1 s warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Page to serve instead of the built-in full vLLM V1 page.
        #[arg(long)]
        page: Option<String>,
        /// Run the page server on these CPUs (`taskset -c` list), apart from the collector's
        /// (`taskset -c 0 epp-sim scrape-cost --pages-cpus 1`), as remote pods would be.
        #[arg(long)]
        pages_cpus: Option<String>,
    },
    /// Drive a real `epp` process's ext_proc service over gRPC and report rps, decision latency,
    /// CPU per request and peak RSS.
    GrpcLoad {
        /// Prompt size in tokens.
        #[arg(long, default_value_t = 100_000)]
        prompt_tokens: usize,
        /// Concurrent streams.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Endpoints in the pool (each serves a full vLLM metrics page).
        #[arg(long, default_value_t = 100)]
        endpoints: usize,
        /// Pin the EPP to these CPUs (`taskset -c` list, e.g. `0`); run epp-sim itself on the
        /// others (`taskset -c 1 epp-sim grpc-load --epp-cpus 0`).
        #[arg(long)]
        epp_cpus: Option<String>,
        /// The EPP's metrics refresh interval (a long one leaves only the request path).
        #[arg(long, default_value = "50ms")]
        refresh: String,
        /// Body bytes per request-body message; 0 sends the whole body in one message followed
        /// by an empty end-of-stream one, as Envoy 1.40 does for a body that arrives at once.
        #[arg(long, default_value_t = 0)]
        chunk_bytes: usize,
        /// Open loop: start this many exchanges per second, each on its own stream, instead of
        /// keeping `--concurrency` streams busy. Latency at a load below saturation.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Latency through Envoy with the EPP versus Envoy routing straight to a pod, at a fixed rate.
    EnvoyLatency {
        /// Requests per second (open loop).
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Seconds per run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Prompt size in tokens.
        #[arg(long, default_value_t = 4000)]
        prompt_tokens: usize,
    },
    /// Serve a metrics page on N ports (used by scrape-cost as its separate server process).
    #[command(hide = true)]
    ServePages {
        /// Ports to serve.
        #[arg(long)]
        count: usize,
        /// Page file.
        #[arg(long)]
        page: Option<String>,
    },
    /// The whole picture on one machine: emulated pods, the EPP, a real Envoy, traffic, summary.
    Demo {
        /// Number of emulated pods.
        #[arg(long, default_value_t = 3)]
        pods: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
}

#[derive(Args, Clone)]
struct TraceLoadArgs {
    #[command(flatten)]
    workload: epp_sim::replay::command::WorkloadArgs,
    /// Base URL (Envoy's listener).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    url: String,
    /// `model` of requests that do not name an adapter.
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    model: String,
    /// Header that carries the workload's tenant (multi-tenant generator).
    #[arg(long, default_value = "x-gateway-inference-fairness-id")]
    tenant_header: String,
    /// Per-request timeout (Go duration).
    #[arg(long, default_value = "300s", value_parser = epp::config::parse_duration)]
    timeout: Duration,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// The closed-loop load of the demo.
#[derive(Args, Clone)]
struct LoadArgs {
    /// Base URL (Envoy's listener).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    url: String,
    /// Total requests.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Prefix groups (tenants or sessions sharing a system prompt).
    #[arg(long, default_value_t = 6)]
    groups: usize,
    /// Shared prefix length in bytes.
    #[arg(long, default_value_t = 4000)]
    prefix_bytes: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Stream responses over SSE.
    #[arg(long)]
    stream: bool,
    /// Model name.
    #[arg(long, default_value = "emulated")]
    model: String,
}

impl LoadArgs {
    fn config(&self, url: String) -> LoadConfig {
        LoadConfig {
            url,
            requests: self.requests,
            concurrency: self.concurrency,
            groups: self.groups,
            prefix_bytes: self.prefix_bytes,
            max_tokens: self.max_tokens,
            stream: self.stream,
            model: self.model.clone(),
        }
    }
}

async fn demo(pods: usize, load: LoadArgs) -> anyhow::Result<()> {
    let emulator = Emulator::start(vec![PodConfig::default(); pods], 0).await?;
    let endpoints: Vec<String> = emulator.addrs.iter().map(ToString::to_string).collect();
    println!("emulated vLLM pods: {}", endpoints.join(", "));

    let (grpc, health, metrics) = (free_port()?, free_port()?, free_port()?);
    let args = [
        "epp".to_owned(),
        format!("--endpoints={}", endpoints.join(",")),
        format!("--grpc-port={grpc}"),
        format!("--grpc-health-port={health}"),
        format!("--metrics-port={metrics}"),
    ];
    let flags = <Flags as clap::Parser>::try_parse_from(normalize_go_args(args))?;
    let app = epp::app::start(flags).await.context("starting the EPP")?;
    println!(
        "EPP: ext_proc {} (TLS, self-signed), health {}, metrics http://{}/metrics",
        app.grpc_addr, app.health_addr, app.metrics_addr
    );

    if !wait_until_scraped(&app.reader, pods, Duration::from_secs(5)).await {
        bail!("the EPP did not scrape every emulated pod within 5 s");
    }

    let ports = EnvoyPorts {
        listener: free_port()?,
        admin: free_port()?,
        epp: grpc,
    };
    let envoy = Envoy::start(ports).await?;
    println!(
        "Envoy 1.40: {} (config: manifests/envoy/envoy.yaml)\n",
        envoy.url()
    );
    println!(
        "sending {} chat requests, {} at a time, {} prefix groups of {} bytes...\n",
        load.requests, load.concurrency, load.groups, load.prefix_bytes
    );
    let report = run_load(load.config(envoy.url())).await;
    println!("{}", report.summary());

    let metrics_text = reqwest::get(format!("http://{}/metrics", app.metrics_addr))
        .await?
        .text()
        .await?;
    println!("EPP metrics (excerpt):");
    for line in metrics_text.lines().filter(|l| {
        l.starts_with("inference_objective_request_total")
            || l.starts_with("inference_extension_scheduler_e2e_duration_seconds_sum")
            || l.starts_with("inference_extension_scheduler_e2e_duration_seconds_count")
    }) {
        println!("  {line}");
    }
    drop(envoy);
    app.shutdown().await;
    emulator.shutdown().await;
    let ok = report.status.get(&200).copied().unwrap_or(0);
    if ok != report.requests {
        bail!("{} of {} requests failed", report.requests - ok, report.requests);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Emulate {
            pods,
            base_port,
            profile,
            time_scale,
            adapters,
        } => {
            if time_scale.is_nan() || time_scale <= 0.0 {
                bail!("--time-scale must be positive, got {time_scale}");
            }
            let config = PodConfig {
                profile: epp_sim::engine::EngineProfile::load(&profile).map_err(anyhow::Error::msg)?,
                time_scale,
                adapters,
                ..PodConfig::default()
            };
            let emulator = Emulator::start(vec![config; pods], base_port).await?;
            let list: Vec<String> = emulator.addrs.iter().map(ToString::to_string).collect();
            println!("emulated vLLM pods: {}", list.join(","));
            println!(
                "run the EPP with: epp --endpoints {} --secure-serving=false",
                list.join(",")
            );
            tokio::signal::ctrl_c().await?;
            emulator.shutdown().await;
        }
        Command::Load(args) => {
            let workload = args.workload.load().map_err(anyhow::Error::msg)?;
            eprintln!(
                "{}: {} requests open loop against {}",
                workload.name,
                workload.requests.len(),
                args.url
            );
            let cfg = epp_sim::trace_load::TraceLoadConfig {
                url: args.url.trim_end_matches('/').to_owned(),
                model: args.model,
                tenant_header: args.tenant_header,
                timeout: args.timeout,
            };
            let report = epp_sim::trace_load::run(&workload, &cfg).await;
            println!("{}", report.summary());
            if let Some(path) = args.json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
                    .with_context(|| path.display().to_string())?;
            }
        }
        Command::Demo { pods, load } => demo(pods, load).await?,
        Command::Soak(args) => {
            let report = epp_sim::soak::run(args).await?;
            print!("{}", report.summary());
            if !report.failures.is_empty() {
                bail!("the soak failed {} check(s)", report.failures.len());
            }
        }
        Command::SharedDocs(args) => {
            let report = epp_sim::shared_docs::run(args).await?;
            if !report.runs.is_empty() {
                println!("{}", report.table());
            }
            if let Some(table) = report.simulated_table() {
                println!("{table}");
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Runaway(args) => {
            tokio::task::spawn_blocking(move || epp_sim::runaway::run(&args))
                .await?
                .map_err(anyhow::Error::msg)?;
        }
        Command::Replay(args) | Command::Compare(args) => {
            // Pure CPU work: run it off the async runtime's workers.
            tokio::task::spawn_blocking(move || epp_sim::replay::command::run(&args))
                .await?
                .map_err(anyhow::Error::msg)?;
        }
        Command::ScrapeCost {
            endpoints,
            interval,
            seconds,
            page,
            pages_cpus,
        } => {
            let cost = epp_sim::scrape_cost::measure(endpoints, interval, seconds, page, pages_cpus).await?;
            println!(
                "{endpoints} endpoints every {interval:?}: {:.0} scrapes/s, {:.3} cores ({:.1} µs CPU per scrape), {} errors",
                cost.scrapes_per_second,
                cost.cores,
                cost.cores / cost.scrapes_per_second.max(1e-9) * 1e6,
                cost.errors
            );
        }
        Command::GrpcLoad {
            prompt_tokens,
            concurrency,
            seconds,
            endpoints,
            epp_cpus,
            refresh,
            chunk_bytes,
            rate,
        } => {
            let cfg = epp_sim::grpc_load::GrpcLoad {
                prompt_tokens,
                concurrency,
                duration: Duration::from_secs(seconds),
                endpoints,
                epp_cpus,
                refresh_interval: refresh,
                chunk_bytes,
                rate,
            };
            let r = epp_sim::grpc_load::run(cfg).await?;
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
        }
        Command::EnvoyLatency {
            rate,
            seconds,
            prompt_tokens,
        } => {
            let epp_sim::envoy_latency::Latencies {
                with_epp,
                direct,
                epp_decision_ms,
                envoy_ext_proc,
            } = epp_sim::envoy_latency::measure(rate, seconds, prompt_tokens).await?;
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
            for ((phase, _, _), [p50, p99]) in epp_sim::envoy_latency::EXT_PROC_PHASES
                .iter()
                .zip(envoy_ext_proc.phases)
            {
                println!("  {phase:<17} p50 {p50:.3} ms  p99 {p99:.3} ms");
            }
            let [p50, p99] = envoy_ext_proc.total;
            println!("  per request (sum of the last three) p50 {p50:.3} ms  p99 {p99:.3} ms");
        }
        Command::ServePages { count, page } => {
            epp_sim::scrape_cost::serve_pages(count, epp_sim::scrape_cost::page(page.as_deref())?).await?;
        }
    }
    Ok(())
}
