//! `epp-bench demo`: the whole picture on one machine. Emulated vLLM pods, the EPP (in this
//! process), a real Envoy 1.40 in front, closed-loop chat traffic from [`crate::load`], and a
//! summary with an excerpt of the EPP's metrics. Fails when a request fails.

use std::time::Duration;

use anyhow::{Context, bail};
use epp::config::{Flags, normalize_go_args};
use epp_sim::emulator::{Emulator, PodConfig};

use crate::{
    envoy::{Envoy, EnvoyPorts, free_port, wait_until_scraped},
    load::{LoadConfig, run_load},
};

/// `epp-bench demo` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Number of emulated pods.
    #[arg(long, default_value_t = 3)]
    pub pods: usize,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// The closed-loop load of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Total requests.
    #[arg(long, default_value_t = 400)]
    pub requests: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Prefix groups (tenants or sessions sharing a system prompt).
    #[arg(long, default_value_t = 6)]
    pub groups: usize,
    /// Shared prefix length in bytes.
    #[arg(long, default_value_t = 4000)]
    pub prefix_bytes: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Stream responses over SSE.
    #[arg(long)]
    pub stream: bool,
    /// Model name.
    #[arg(long, default_value = "emulated")]
    pub model: String,
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

/// Run the demo.
///
/// # Errors
/// A part that could not start, pods not scraped within 5 s, or failed requests.
pub async fn run_cli(args: DemoArgs) -> anyhow::Result<()> {
    let DemoArgs { pods, load } = args;
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
        // The summary is the output: traces printed to stdout would bury it.
        "--tracing=false".to_owned(),
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
