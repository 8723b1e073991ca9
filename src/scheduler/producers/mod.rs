//! Built-in data producers.

pub mod approx_prefix;

pub use approx_prefix::ApproxPrefixProducer;
