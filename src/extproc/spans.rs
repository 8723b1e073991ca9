//! The spans of one ext_proc exchange, with `--tracing` ([`crate::telemetry`]):
//! - `gateway.request` (server span), from the request headers to the end of the response,
//!   continuing the caller's trace when the request carries `traceparent` / `tracestate`
//!   (and `baggage`);
//! - `gateway.request_orchestration`, the decision: admission, flow-control queueing, scheduling,
//!   with the models, the priority, what admission did, the number of candidates and a
//!   refusal's reason (the winner is on the request span, `llm_d.epp.endpoint`); under it one
//!   span per plugin run, made by the plugin timer ([`super::processor::MetricsTimer`]);
//! - `flow_control.queue`, the time a request waited in the flow-control queue;
//! - `gateway.response`, the response from its headers to its end (usage read, budget
//!   settled).
//!
//! The request sent to the model server carries the request span's `traceparent`, so an engine
//! that traces (vLLM does) joins the same trace. Attributes never hold prompt or answer text,
//! nor the tenant a client can name.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValueOption};
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, TextMapCompositePropagator, TextMapPropagator},
    trace::{Span, SpanKind, Status, TraceContextExt, Tracer},
};
use opentelemetry_sdk::{
    propagation::{BaggagePropagator, TraceContextPropagator},
    trace::SdkTracer,
};

use super::{encode::set_header, hints::header_value};
use crate::scheduler::{Verdict, admission::AdmissionEvent};

/// W3C trace context, then baggage (upstream's composite).
fn propagator() -> TextMapCompositePropagator {
    TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ])
}

/// Envoy's request headers as a propagation carrier.
struct Carrier<'a>(Option<&'a HeaderMap>);

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0?
            .headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .and_then(|h| std::str::from_utf8(header_value(h)).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .map(|m| m.headers.iter().map(|h| h.key.as_str()).collect())
            .unwrap_or_default()
    }
}

/// The spans of one exchange.
pub struct ExchangeSpans {
    tracer: SdkTracer,
    /// The request span, in the caller's trace when it sent one.
    request: Context,
}

impl ExchangeSpans {
    /// Start the request span from the request headers.
    pub fn start(tracer: &SdkTracer, headers: Option<&HeaderMap>) -> Self {
        let parent = propagator().extract(&Carrier(headers));
        let span = tracer
            .span_builder("gateway.request")
            .with_kind(SpanKind::Server)
            .start_with_context(tracer, &parent);
        Self {
            tracer: tracer.clone(),
            request: parent.with_span(span),
        }
    }

    /// A child span of the request span, started now.
    pub fn child(&self, name: &'static str) -> opentelemetry_sdk::trace::Span {
        self.tracer.start_with_context(name, &self.request)
    }

    /// The decision span (`gateway.request_orchestration`), started now, as the parent of the
    /// plugins' spans.
    pub fn decision(&self) -> Context {
        let span = self
            .tracer
            .start_with_context("gateway.request_orchestration", &self.request);
        self.request.with_span(span)
    }

    /// Set attributes on the request span.
    pub fn annotate(&self, attributes: Vec<KeyValue>) {
        self.request.span().set_attributes(attributes);
    }

    /// Mark the request span failed with `reason` (a fixed label, never client text).
    pub fn fail(&self, status: u16, reason: &str) {
        let span = self.request.span();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        span.set_status(Status::error(reason.to_owned()));
    }

    /// End the request span (the response is complete, or the EPP answered itself).
    pub fn end(&self) {
        self.request.span().end();
    }

    /// The headers that carry the request span's context to the model server.
    pub fn propagation_headers(&self) -> Vec<HeaderValueOption> {
        let mut carrier: HashMap<String, String> = HashMap::new();
        propagator().inject_context(&self.request, &mut carrier);
        let mut keys: Vec<_> = carrier.into_iter().collect();
        keys.sort();
        keys.into_iter()
            .map(|(k, v)| set_header(&k, v.as_bytes()))
            .collect()
    }
}

/// What the decision span says: the models (as labelled in metrics: bounded), the priority,
/// what admission did, and the outcome (`routed`, or the refusal's fixed reason).
pub fn decision_attributes(verdict: &Verdict, model: &str, target: &str) -> Vec<KeyValue> {
    let mut out = vec![
        KeyValue::new("gen_ai.request.model", model.to_owned()),
        KeyValue::new("llm_d.epp.target_model", target.to_owned()),
    ];
    let admission: Vec<&str> = verdict.events.iter().map(event_name).collect();
    if !admission.is_empty() {
        out.push(KeyValue::new("llm_d.epp.admission", admission.join(",")));
    }
    match &verdict.result {
        Ok(outcome) => {
            out.push(KeyValue::new("llm_d.epp.result", "routed"));
            out.push(KeyValue::new("llm_d.epp.priority", i64::from(outcome.priority)));
            out.push(KeyValue::new("llm_d.epp.candidates", outcome.candidates as i64));
        }
        Err(refused) => out.push(KeyValue::new("llm_d.epp.result", refused.refusal.reason())),
    }
    out
}

/// A fixed name for what an admission stage did.
fn event_name(event: &AdmissionEvent) -> &'static str {
    match event {
        AdmissionEvent::GuardMasked { .. } => "guard_masked",
        AdmissionEvent::GuardRejected { .. } => "guard_rejected",
        AdmissionEvent::BudgetReserved { .. } => "budget_reserved",
        AdmissionEvent::BudgetFallback { .. } => "budget_fallback",
        AdmissionEvent::BudgetRejected { .. } => "budget_rejected",
        AdmissionEvent::BudgetStore { reachable: true, .. } => "budget_store",
        AdmissionEvent::BudgetStore { reachable: false, .. } => "budget_store_unreachable",
    }
}

/// End the span of `cx` after setting `attributes`.
pub fn finish_context(cx: &Context, attributes: Vec<KeyValue>) {
    let span = cx.span();
    span.set_attributes(attributes);
    span.end();
}

/// End `span` after setting `attributes`.
pub fn finish(mut span: opentelemetry_sdk::trace::Span, attributes: Vec<KeyValue>) {
    span.set_attributes(attributes);
    span.end();
}
