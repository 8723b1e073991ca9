//! Envoy ext_proc: the Endpoint Picker Protocol on the wire.
//!
//! - [`service`]: the tonic service, one task per stream.
//! - [`stream`]: the per-exchange state machine (full-duplex and buffered modes).
//! - [`encode`]: answer builders; [`error`]: failures → immediate responses (the one boundary).
//! - [`wire`]: header names, metadata keys and limits.

pub mod encode;
pub mod error;
pub mod processor;
pub mod service;
pub mod stream;
pub mod wire;

pub use processor::Processor;
pub use service::ExtProcService;
