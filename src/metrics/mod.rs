//! Model-server metrics in, the EPP's own metrics out.
//!
//! - [`model`]: typed load signals of one endpoint (pure data).
//! - [`exposition`]: a tolerant Prometheus text parser (pure).
//! - [`engines`]: per-engine metric name tables as data, and extraction into [`EngineMetrics`].
//! - [`data_layer`]: the config's `metrics-data-source` and `core-metrics-extractor` parameters.
//! - [`page_connection`]: a kept-alive HTTP/1.1 connection that streams a page to the parser.
//! - [`collector`]: one scrape loop per endpoint, feeding the datastore.
//! - [`names`] and [`exported`]: the metrics this EPP exports, under the upstream names.

pub mod collector;
pub mod data_layer;
pub mod engines;
pub mod exported;
pub mod exposition;
pub mod model;
pub mod names;
pub mod page_connection;

pub use model::{EngineMetrics, LoraState, ScrapeFailure};
