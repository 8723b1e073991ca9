//! `epp-sim`: the simulator of the `epp` Endpoint Picker. It depends on `epp`'s pure decision
//! library only (no gRPC server, Kubernetes, TLS or Redis); the harness that starts real
//! processes (Envoy, `epp`, `llama-server`) is the `epp-bench` crate.
//!
//! - [`engine`]: the vLLM V1 engine model (batching, chunked prefill, prefix-cached KV, LoRA, timing).
//! - [`workload`]: traces (Mooncake, Azure) and generators, with synthesized prompt text.
//! - [`replay`]: deterministic replay through the production scheduler; reports, plots, baselines.
//! - [`stats`]: the one latency summary and percentile rule every report uses.
//! - [`runaway`]: `epp-sim runaway`, a retry loop over a simulated weekend with and without a daily money budget.
//! - [`emulator`]: `epp-sim emulate`, emulated vLLM pods (OpenAI API + `/metrics`) driven by the engine model in real time.
//! - [`trace_load`]: `epp-sim load`, open-loop replay of a workload against an HTTP endpoint.

pub mod emulator;
pub mod engine;
pub mod replay;
pub mod runaway;
pub mod stats;
pub mod trace_load;
pub mod workload;

/// Log to stderr at `RUST_LOG`'s levels (`warn` when unset), as the `epp-sim` and `epp-bench`
/// commands do: stdout stays for their reports.
pub fn init_cli_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
