//! What every exchange shares: the snapshot reader, the scheduler, metrics and the clock.

use std::{sync::Arc, time::Instant};

use crate::{
    clock::Clock,
    datastore::SnapshotReader,
    metrics::exported::EppMetrics,
    scheduler::{
        Scheduler,
        plugin::{ExtensionPoint, PluginName, PluginTimer},
    },
};

/// Shared, read-only context of the ext_proc service.
pub struct Processor {
    /// The pool.
    pub reader: SnapshotReader,
    /// The configured scheduler.
    pub scheduler: Arc<Scheduler>,
    /// Exported metrics.
    pub metrics: Arc<EppMetrics>,
    /// Time source for scheduling.
    pub clock: Arc<dyn Clock>,
    /// `--disable-endpoint-subset-filter`.
    pub disable_subset_filter: bool,
    /// `--explain-decisions`.
    pub explain_decisions: bool,
    /// `--conformance-hooks`.
    pub conformance_hooks: bool,
    /// `--tracing`: the tracer of each exchange's spans.
    pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    /// Owner of background work started by exchanges (budget settlement).
    pub tasks: tokio_util::task::TaskTracker,
    /// The process-wide budget for request bodies being read (`--max-buffered-body-bytes`).
    pub body_memory: Arc<super::body_memory::BodyMemory>,
    /// Flow control's dispatcher, when the `flowControl` gate is on.
    pub flow: Option<Arc<crate::flow_dispatch::FlowDispatcher>>,
}

impl Processor {
    /// A timer that records plugin durations into the plugin-duration histogram.
    pub fn plugin_timer(&self) -> MetricsTimer<'_> {
        MetricsTimer {
            origin: Instant::now(),
            metrics: &self.metrics,
        }
    }
}

/// [`PluginTimer`] backed by the exported histogram.
pub struct MetricsTimer<'a> {
    origin: Instant,
    metrics: &'a EppMetrics,
}

impl PluginTimer for MetricsTimer<'_> {
    fn start(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn record(&self, point: ExtensionPoint, plugin: &PluginName, started: u64) {
        let nanos = self.start().saturating_sub(started);
        self.metrics
            .plugin_duration
            .with_label_values(&[point.as_str(), plugin.kind, &plugin.name])
            .observe(nanos as f64 / 1e9);
    }

    fn record_cycle(&self, started: u64) {
        let nanos = self.start().saturating_sub(started);
        self.metrics.scheduler_e2e.observe(nanos as f64 / 1e9);
    }
}
