//! `epp-sim`: the simulator of the epp Endpoint Picker. Each subcommand's arguments and body live
//! in its module; this file only dispatches.

use clap::{Parser, Subcommand};
use epp_sim::{emulator, replay, runaway, trace_load};

/// The epp Endpoint Picker's simulator: replay traces through its scheduler against simulated
/// vLLM pods, compare configurations, emulate pods in real time, and send open-loop load.
/// (Benchmarks on real processes, Envoy and llama-server are `epp-bench`.)
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
    Emulate(emulator::EmulateArgs),
    /// Open-loop load from a trace or generator against an OpenAI-style endpoint (e.g. Envoy):
    /// every request leaves at its arrival time; TTFT and latency are measured at the client.
    Load(trace_load::TraceLoadArgs),
    /// Replay a trace (or a generated workload) through the EPP's scheduler against simulated
    /// vLLM pods, in simulated time, and report TTFT, TPOT, throughput and cache hits.
    Replay(replay::command::SimArgs),
    /// Run several configurations on one workload and print them side by side.
    ///
    /// Example: epp-sim compare --trace mooncake_conversation_trace.jsonl --format mooncake
    /// --pods 8 --rate-scale 2 --config round-robin --config upstream-default --config
    /// recommended --json out.json
    Compare(replay::command::SimArgs),
    /// The runaway retry loop: one tenant resends a long request every second over a simulated
    /// weekend next to well-behaved tenants, replayed without a limit and with a daily money
    /// budget; prints each tenant's spend and refusals and when the 429s start, and plots the
    /// spend (`--plot runaway.svg`).
    Runaway(runaway::RunawayArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    epp_sim::init_cli_logging();
    match Cli::parse().command {
        Command::Emulate(args) => emulator::run_cli(args).await,
        Command::Load(args) => trace_load::run_cli(args).await,
        Command::Runaway(args) => tokio::task::spawn_blocking(move || runaway::run(&args))
            .await?
            .map_err(anyhow::Error::msg),
        // Pure CPU work: run it off the async runtime's workers.
        Command::Replay(args) | Command::Compare(args) => {
            tokio::task::spawn_blocking(move || replay::command::run(&args).map(drop))
                .await?
                .map_err(anyhow::Error::msg)
        }
    }
}
