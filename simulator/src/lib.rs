//! `epp-sim`: tools around the `epp` Endpoint Picker.
//!
//! - [`engine`]: the vLLM V1 engine model (batching, chunked prefill, prefix-cached KV, LoRA, timing).
//! - [`workload`]: traces (Mooncake, Azure) and generators, with synthesized prompt text.
//! - [`replay`]: deterministic replay through the production scheduler; reports, plots, baselines.
//! - [`runaway`]: `epp-sim runaway`, a retry loop over a simulated weekend with and without a daily money budget.
//! - [`emulator`]: emulated vLLM pods (OpenAI API + `/metrics`) driven by the engine model in real time.
//! - [`trace_load`]: open-loop replay of a workload against an HTTP endpoint (`epp-sim load`).
//! - [`load`]: the demo's closed-loop load generator (latency, status codes, per-pod balance).
//! - [`envoy`]: runs a real Envoy in front of an EPP from the config in `manifests/envoy/`.
//! - [`envoy_latency`]: the latency Envoy + EPP adds compared with Envoy routing straight to a pod.
//! - [`grpc_load`]: load on a real `epp` process's ext_proc service over gRPC, with its CPU and RSS.
//! - [`epp_process`]: a real `epp` process for the load harnesses, and reading its decision histogram.
//! - [`llama_server`]: real llama.cpp `llama-server` processes (Gemma 3 270M on the CPU) for end-to-end tests and benchmarks.
//! - [`shared_docs`]: `epp-sim shared-docs`, the real-hardware benchmark: llama-server behind Envoy and the EPP.
//! - [`scrape_cost`]: measures the CPU the metrics collector spends scraping N pods.
//! - [`soak`]: `epp-sim soak`, a long chaos run (pods, Redis and pages failing) through Envoy with leak and ledger checks.
//! - [`stand_in`]: model-server stand-ins whose `/metrics` report fixed values (upstream's hermetic fixtures, live).

pub mod emulator;
pub mod engine;
pub mod envoy;
pub mod envoy_latency;
pub mod epp_process;
pub mod grpc_load;
pub mod llama_server;
pub mod load;
pub mod replay;
pub mod runaway;
pub mod scrape_cost;
pub mod shared_docs;
pub mod soak;
pub mod stand_in;
pub mod trace_load;
pub mod workload;
