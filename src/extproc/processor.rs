//! What every exchange shares: the snapshot reader, the scheduler, metrics and the clock.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use opentelemetry::{
    Context, KeyValue,
    trace::{Span, Tracer},
};
use opentelemetry_sdk::trace::SdkTracer;

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
            wall_origin: SystemTime::now(),
            metrics: &self.metrics,
            spans: None,
        }
    }
}

/// [`PluginTimer`] backed by the exported histogram; with a parent span (`--tracing`), each
/// plugin's run is also a child span of it (`admission`, `prepare_data`, `filter`, `scorer`,
/// `picker`, `pre_request`, with the plugin in `llm_d.epp.plugin`).
pub struct MetricsTimer<'a> {
    origin: Instant,
    wall_origin: SystemTime,
    metrics: &'a EppMetrics,
    spans: Option<(&'a SdkTracer, &'a Context)>,
}

impl<'a> MetricsTimer<'a> {
    /// This timer, also making child spans of `parent`.
    pub fn with_spans(mut self, tracer: &'a SdkTracer, parent: &'a Context) -> Self {
        self.spans = Some((tracer, parent));
        self
    }

    fn span(&self, point: ExtensionPoint, plugin: &PluginName, started: u64, ended: u64) {
        let Some((tracer, parent)) = self.spans else {
            return;
        };
        let name = match point {
            ExtensionPoint::PrepareData => "prepare_data",
            ExtensionPoint::Filter => "filter",
            ExtensionPoint::Scorer => "scorer",
            ExtensionPoint::Picker => "picker",
            ExtensionPoint::PreRequest => "pre_request",
            ExtensionPoint::Admission => "admission",
        };
        let at = |nanos: u64| self.wall_origin + Duration::from_nanos(nanos);
        let mut span = tracer
            .span_builder(name)
            .with_start_time(at(started))
            .with_attributes([KeyValue::new(
                "llm_d.epp.plugin",
                format!("{}/{}", plugin.kind, plugin.name),
            )])
            .start_with_context(tracer, parent);
        span.end_with_timestamp(at(ended));
    }
}

impl PluginTimer for MetricsTimer<'_> {
    fn start(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn record(&self, point: ExtensionPoint, plugin: &PluginName, started: u64) {
        let ended = self.start();
        self.span(point, plugin, started, ended);
        if point == ExtensionPoint::Admission {
            return;
        }
        self.metrics
            .plugin_duration
            .with_label_values(&[point.as_str(), plugin.kind, &plugin.name])
            .observe(ended.saturating_sub(started) as f64 / 1e9);
    }

    fn times_admission(&self) -> bool {
        self.spans.is_some()
    }

    fn record_cycle(&self, started: u64) {
        let nanos = self.start().saturating_sub(started);
        self.metrics.scheduler_e2e.observe(nanos as f64 / 1e9);
    }
}
