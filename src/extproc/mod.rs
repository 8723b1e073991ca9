//! Envoy ext_proc: the Endpoint Picker Protocol on the wire.
//!
//! - [`service`]: the tonic service, one task per stream.
//! - [`stream`]: the per-exchange state machine (full-duplex and buffered modes), a thin adapter
//!   around the scheduler's decide step.
//! - [`hints`]: request headers → the decision's metadata; the `envoy.lb` metadata.
//! - [`response`]: the response chain (usage tap, injected-usage filter, restore, output mask).
//! - [`observe`]: the decision's and the response's metrics.
//! - [`encode`]: answer builders; [`error`]: failures → immediate responses (the one boundary).
//! - [`wire`]: header names, metadata keys and limits.

pub mod body_memory;
pub mod budget_headers;
pub mod encode;
pub mod error;
pub mod hints;
pub mod observe;
pub mod processor;
pub mod response;
pub mod service;
pub mod spans;
pub mod stream;
pub mod wire;

pub use processor::Processor;
pub use service::ExtProcService;
