//! `epp-bench`: the epp Endpoint Picker's benchmark harness on real processes. Each
//! subcommand's arguments and body live in its module; this file only dispatches.

use clap::{Parser, Subcommand};
use epp_bench::{demo, envoy_latency, grpc_load, scrape_cost, shared_docs, soak};

/// Benchmarks of the epp Endpoint Picker on real processes: Envoy 1.40, `epp`, llama.cpp's
/// llama-server. (Replay, comparison and emulated pods without them are `epp-sim`.)
#[derive(Parser)]
#[command(name = "epp-bench", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole picture on one machine: emulated pods, the EPP, a real Envoy, traffic, summary.
    Demo(demo::DemoArgs),
    /// Real-hardware benchmark: llama-server processes (Gemma 3 270M, CPU) behind Envoy and the
    /// EPP, questions about shared long documents; TTFT, throughput and cached share per config.
    SharedDocs(shared_docs::SharedDocsArgs),
    /// Chaos soak (benchmark tooling, not CI): mixed traffic through a real Envoy and `epp` while
    /// pods are killed, Redis restarts and metrics pages turn to garbage or hang; checks for
    /// errors, leaks (RSS, files, threads, tasks, running counts) and the budget ledger.
    Soak(soak::SoakArgs),
    /// Measure the CPU the EPP's collector spends scraping N pods serving a realistic vLLM page.
    ScrapeCost(scrape_cost::ScrapeCostArgs),
    /// Drive a real `epp` process's ext_proc service over gRPC and report rps, decision latency,
    /// CPU per request and peak RSS.
    GrpcLoad(grpc_load::GrpcLoadArgs),
    /// Latency through Envoy with the EPP versus Envoy routing straight to a pod, at a fixed rate.
    EnvoyLatency(envoy_latency::EnvoyLatencyArgs),
    /// Serve a metrics page on N ports (used by scrape-cost as its separate server process).
    #[command(hide = true)]
    ServePages(scrape_cost::ServePagesArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    epp_sim::init_cli_logging();
    match Cli::parse().command {
        Command::Demo(args) => demo::run_cli(args).await,
        Command::SharedDocs(args) => shared_docs::run_cli(args).await,
        Command::Soak(args) => soak::run_cli(args).await,
        Command::ScrapeCost(args) => scrape_cost::run_cli(args).await,
        Command::GrpcLoad(args) => grpc_load::run_cli(args).await,
        Command::EnvoyLatency(args) => envoy_latency::run_cli(args).await,
        Command::ServePages(args) => scrape_cost::serve_pages_cli(args).await,
    }
}
