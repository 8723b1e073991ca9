//! `epp-sim`: tools around the `epp` Endpoint Picker.
//!
//! - [`emulator`]: stand-in vLLM pods (OpenAI API + `/metrics`) for demos and end-to-end tests.
//! - [`load`]: a closed-loop load generator that reports latency, status codes and per-pod balance.
//! - [`envoy`]: runs a real Envoy in front of an EPP from the config in `manifests/envoy/`.
//! - [`envoy_latency`]: the latency Envoy + EPP adds compared with Envoy routing straight to a pod.
//! - [`grpc_load`]: load on a real `epp` process's ext_proc service over gRPC, with its CPU and RSS.
//! - [`scrape_cost`]: measures the CPU the metrics collector spends scraping N pods.

pub mod emulator;
pub mod engine;
pub mod envoy;
pub mod envoy_latency;
pub mod grpc_load;
pub mod load;
pub mod replay;
pub mod scrape_cost;
pub mod trace_load;
pub mod workload;
