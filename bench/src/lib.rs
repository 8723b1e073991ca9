//! `epp-bench`: the benchmark harness of the `epp` Endpoint Picker. Everything here starts or
//! drives real processes (Envoy 1.40, `epp`, llama.cpp's `llama-server`, `redis-server`); the
//! pure simulator it builds on is the `epp-sim` crate.
//!
//! - [`envoy`]: runs a real Envoy in front of an EPP from the config in `manifests/envoy/`.
//! - [`epp_process`]: a real `epp` process for the load harnesses, and reading its decision histogram.
//! - [`llama_server`]: real llama.cpp `llama-server` processes (Gemma 3 270M on the CPU).
//! - [`stand_in`]: model-server stand-ins whose `/metrics` report fixed values (upstream's hermetic fixtures, live).
//! - [`demo`]: `epp-bench demo`, emulated pods, the EPP and Envoy on one machine, with [`load`] as its traffic.
//! - [`grpc_load`]: `epp-bench grpc-load`, load on a real `epp` process's ext_proc service, with its CPU and RSS.
//! - [`envoy_latency`]: `epp-bench envoy-latency`, the latency Envoy + EPP adds over Envoy routing straight to a pod.
//! - [`scrape_cost`]: `epp-bench scrape-cost`, the CPU the metrics collector spends scraping N pods.
//! - [`shared_docs`]: `epp-bench shared-docs`, the real-hardware benchmark: llama-server behind Envoy and the EPP.
//! - [`soak`]: `epp-bench soak`, a long chaos run (pods, Redis and pages failing) through Envoy with leak and ledger checks.
//!
//! The end-to-end tests under `tests/` need the same binaries; they fail, never skip, without them.

pub mod demo;
pub mod envoy;
pub mod envoy_latency;
pub mod epp_process;
pub mod grpc_load;
pub mod llama_server;
pub mod load;
pub mod scrape_cost;
pub mod shared_docs;
pub mod soak;
pub mod stand_in;
