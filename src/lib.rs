//! `epp`: an Endpoint Picker for LLM inference, wire- and config-compatible with the Gateway API
//! Inference Extension's reference EPP.
//!
//! Data flows from discovery and model-server metrics into the [`datastore`] (one published
//! snapshot), and from Envoy's ext_proc stream through the [`parser`] and the pure [`scheduler`]
//! back to Envoy (`extproc`). See ARCHITECTURE.md for the module map.
//!
//! The default `server` feature adds everything only a running server needs: the ext_proc
//! service (`extproc`), app wiring (`app`), Kubernetes discovery (`k8s`), TLS and listeners,
//! the metrics collector and exporter, tracing export, flow control's dispatcher task and the
//! Redis budget store. Without it the crate is the pure decision library the simulator uses.

#[cfg(feature = "server")]
pub mod app;
pub mod budget;
pub mod clock;
pub mod config;
pub mod datastore;
#[cfg(feature = "server")]
pub mod extproc;
#[cfg(feature = "server")]
pub mod flow_dispatch;
pub mod guard;
#[cfg(feature = "server")]
pub mod k8s;
#[cfg(feature = "server")]
pub mod listen;
#[cfg(feature = "server")]
pub mod metrics;
pub mod parser;
pub mod prefix;
pub mod prehashed;
pub mod scheduler;
pub mod scrape;
#[cfg(feature = "server")]
pub mod telemetry;
#[cfg(feature = "server")]
pub mod tls;
