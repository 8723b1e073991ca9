//! Model-server metrics, in: one scrape loop per endpoint turns each pod's `/metrics` page into
//! the [`EngineMetrics`](crate::datastore::EngineMetrics) the datastore publishes.
//!
//! - [`exposition`]: a tolerant Prometheus text parser (pure).
//! - [`engines`]: per-engine metric name tables as data, and extraction into `EngineMetrics`.
//! - [`data_layer`]: the config's `metrics-data-source` and `core-metrics-extractor` parameters.
//! - [`page_connection`]: a kept-alive HTTP/1.1 connection that streams a page to the parser.
//! - [`collector`]: one scrape loop per endpoint, feeding the datastore.

#[cfg(feature = "server")]
pub mod collector;
pub mod data_layer;
pub mod engines;
pub mod exposition;
#[cfg(feature = "server")]
pub mod page_connection;
