//! The per-stream state machine: one ext_proc stream is one HTTP exchange, adapted to the
//! decide step and back.
//!
//! Request side: headers are read into the decision's metadata ([`hints`](super::hints)) and
//! the headers answer is held until the body is complete (full-duplex), then the decide step
//! runs once ([`Scheduler::admit`](crate::scheduler::Scheduler::admit), with flow control a wait
//! in [`FlowDispatcher`](crate::flow_dispatch::FlowDispatcher) that ends when the proxy stops
//! reading, then [`Scheduler::place`](crate::scheduler::Scheduler::place)) and its outcome goes out
//! as the headers answer followed by the body: re-emitted piece by piece as received unless the
//! outcome edits it. Body pieces are charged to the process-wide
//! [`BodyMemory`](super::body_memory::BodyMemory) until the request is routed; a request body in
//! `STREAMED` mode (where the route must be chosen before any of it arrives) is refused. Response side: the [`ResponseChain`] built from the outcome's response plan
//! answers every chunk as it arrives (SSE stays incremental); in full-duplex mode end of stream
//! and trailers flush it alike (in the other modes a body answer cannot follow the trailers).
//!
//! Invariants: exactly one decision per exchange; the in-flight count taken at decision time is
//! an [`InFlight`] owned by the exchange, released exactly once whatever ends it; a budget
//! reservation is settled once (with the usage read, or zero when the EPP answered itself).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use envoy_types::pb::envoy::service::ext_proc::v3::{
    CommonResponse, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, processing_request::Request,
};
use opentelemetry::KeyValue;
use rand::{SeedableRng, rngs::SmallRng};
use tracing::{debug, trace};

use super::{
    body_memory::BodyPieces,
    budget_headers,
    encode::{
        Direction, body_replace_answer, common_with_headers, destination_metadata, push_streamed_body,
        push_streamed_pieces, request_headers_answer, response_headers_answer, set_header, streamed_chunk,
        trailers_answer,
    },
    error::EppError,
    hints::{RequestHeaders, conformance_served, is_event_stream, served_endpoint, subset_hint},
    observe,
    processor::Processor,
    response::ResponseChain,
    spans::{self, ExchangeSpans, decision_attributes},
    wire::*,
};
use crate::{
    datastore::{InFlight, Snapshot},
    flow_dispatch::QueueRequest,
    scheduler::{
        DecideEnv, Decision, ResponsePlan, Scratch,
        admission::{BudgetReservation, Refusal, TenantSource},
        plugin::{CachePrediction, CacheReport},
    },
};

/// What Envoy does with bodies in one direction (from `protocol_config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// No body is sent to the EPP.
    None,
    /// Chunks are sent one at a time and each waits for its answer.
    Streamed,
    /// The whole body in one message, after the headers answer.
    Buffered,
    /// Chunks flow without waiting; answers are `streamed_response`s.
    FullDuplex,
}

impl BodyMode {
    fn from_wire(v: i32) -> Self {
        match v {
            0 => BodyMode::None,
            1 => BodyMode::Streamed,
            2 | 3 => BodyMode::Buffered,
            _ => BodyMode::FullDuplex,
        }
    }
}

/// Warn about a proxy configured with `STREAMED` request bodies, once per process: every such
/// request is refused, and the fix is in the proxy's config.
fn warn_streamed_body_mode() {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "the proxy sends request bodies in STREAMED mode, which is refused (500): set the ext_proc filter's request_body_mode to FULL_DUPLEX_STREAMED"
        );
    }
}

/// Whether the service loop keeps reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep going.
    Continue,
    /// An immediate response was sent: the exchange is over.
    Close,
}

/// A routed request's bookkeeping: the label values it is counted under and its in-flight
/// count, released once on drop (the running-requests gauge and the label's use with it).
struct Routed {
    p: Arc<Processor>,
    model_label: String,
    target_label: String,
    primary: SocketAddr,
    in_flight: InFlight,
    /// What the prefix index predicted on the primary, checked against the server's usage.
    cache_prediction: Option<CachePrediction>,
}

impl Drop for Routed {
    fn drop(&mut self) {
        let m = &self.p.metrics;
        m.running_requests.with_label_values(&[&self.model_label]).dec();
        m.labels
            .release(&self.model_label, &self.target_label, Instant::now());
    }
}

/// A decided request's answer: where it goes and, when it differs from the client's, the body.
struct Routing {
    destination: String,
    body: Option<Vec<u8>>,
}

/// State of one exchange.
pub struct Exchange {
    p: Arc<Processor>,
    request_mode: BodyMode,
    response_mode: BodyMode,
    headers: RequestHeaders,
    generated_request_id: Option<String>,
    body: BodyPieces,
    decided: bool,
    /// When the body's last message was taken up, once it got its routing answer: the decision
    /// time is observed in [`Exchange::after_send`], when the answers have been handed on.
    routed_from: Option<Instant>,
    started: Instant,
    routed: Option<Routed>,
    reservation: Option<BudgetReservation>,
    /// `--conformance-hooks`: what `x-conformance-test-served-endpoint` says, read from the
    /// response headers' metadata.
    conformance_served: Option<String>,
    /// `--tracing`: the exchange's spans, and the response's once it started.
    spans: Option<ExchangeSpans>,
    response_span: Option<opentelemetry_sdk::trace::Span>,
    explanation: Option<String>,
    /// Decision whose pre-request hooks run once its answers are sent.
    pending_hooks: Option<(Arc<Snapshot>, Decision)>,
    request_stream: bool,
    /// The response plan until the response starts; then the chain built from it.
    plan: Option<ResponsePlan>,
    response: Option<ResponseChain>,
    response_finished: bool,
    /// The stream's answer channel: closed when the proxy stops reading (its client went
    /// away), which takes a queued request out of the flow-control queue.
    answers: Option<Answers>,
}

/// The sending side of a stream's answers.
pub type Answers = tokio::sync::mpsc::Sender<Result<ProcessingResponse, tonic::Status>>;

impl Exchange {
    /// A new exchange served by `p`.
    pub fn new(p: Arc<Processor>) -> Self {
        let charge = p.body_memory.charge();
        Self {
            p,
            request_mode: BodyMode::FullDuplex,
            response_mode: BodyMode::FullDuplex,
            headers: RequestHeaders::default(),
            generated_request_id: None,
            body: BodyPieces::new(charge),
            decided: false,
            routed_from: None,
            started: Instant::now(),
            routed: None,
            reservation: None,
            conformance_served: None,
            spans: None,
            response_span: None,
            explanation: None,
            pending_hooks: None,
            request_stream: false,
            plan: None,
            response: None,
            response_finished: false,
            answers: None,
        }
    }

    /// Watch `answers` for the proxy going away while a request waits in the flow-control queue.
    pub fn watching(mut self, answers: Answers) -> Self {
        self.answers = Some(answers);
        self
    }

    /// Work deferred until the answers of the last message are sent: the pre-request hooks
    /// (prefix-index insert), which must not delay the decision.
    pub fn after_send(&mut self) {
        if let Some(from) = self.routed_from.take() {
            self.p
                .metrics
                .request_decision
                .observe(from.elapsed().as_secs_f64());
        }
        if let Some((snapshot, decision)) = self.pending_hooks.take() {
            let timer = self.p.plugin_timer();
            self.p.scheduler.pre_request(&snapshot, &decision, Some(&timer));
        }
    }

    /// Handle one inbound message, pushing the answers to `out`.
    pub async fn on_message(&mut self, msg: ProcessingRequest, out: &mut Vec<ProcessingResponse>) -> Flow {
        if let Some(pc) = &msg.protocol_config {
            self.request_mode = BodyMode::from_wire(pc.request_body_mode);
            self.response_mode = BodyMode::from_wire(pc.response_body_mode);
        }
        // Keep the first non-empty hint seen on the stream, whichever message carried it.
        if self.headers.meta.subset.is_none()
            && !self.p.disable_subset_filter
            && let Some(md) = &msg.metadata_context
        {
            self.headers.meta.subset = subset_hint(md);
        }
        if let Some(source @ TenantSource::Spiffe { .. }) = self.p.scheduler.tenant_source()
            && matches!(msg.request, Some(Request::RequestHeaders(_)))
        {
            self.headers.read_spiffe_tenant(&msg.attributes, source);
        }
        match msg.request {
            Some(Request::RequestHeaders(h)) => self.on_request_headers(h, out),
            Some(Request::RequestBody(b)) => self.on_request_body(b, out).await,
            Some(Request::RequestTrailers(_)) => {
                let flow = if self.decided {
                    Flow::Continue
                } else {
                    self.decide_with_body(false, out).await
                };
                if flow == Flow::Continue {
                    out.push(trailers_answer(Direction::Request));
                }
                flow
            }
            Some(Request::ResponseHeaders(h)) => {
                if let Some(served) = msg.metadata_context.as_ref().and_then(served_endpoint) {
                    self.record_served(&served);
                }
                if self.p.conformance_hooks {
                    self.conformance_served = Some(conformance_served(msg.metadata_context.as_ref()));
                }
                self.on_response_headers(h, out);
                Flow::Continue
            }
            Some(Request::ResponseBody(b)) => {
                self.on_response_body(b, out);
                Flow::Continue
            }
            Some(Request::ResponseTrailers(_)) => {
                // Trailers end the body: whatever a stage still holds goes out first.
                if self.response_mode == BodyMode::FullDuplex
                    && let Some(rest) = self.response_chain(false).feed(&[], true)
                    && !rest.is_empty()
                {
                    out.push(streamed_chunk(Direction::Response, &rest, false));
                }
                out.push(trailers_answer(Direction::Response));
                self.finish_response();
                Flow::Continue
            }
            None => Flow::Continue,
        }
    }

    fn on_request_headers(&mut self, h: HttpHeaders, out: &mut Vec<ProcessingResponse>) -> Flow {
        if let Some(tracer) = &self.p.tracer {
            self.spans = Some(ExchangeSpans::start(tracer, h.headers.as_ref()));
        }
        self.headers.read(
            h.headers.as_ref(),
            self.p.scheduler.tenant_header(),
            self.p.explain_decisions,
            self.p.conformance_hooks,
        );
        if self.headers.request_id.is_none() {
            self.generated_request_id = Some(uuid::Uuid::new_v4().to_string());
        }
        match self.request_mode {
            _ if h.end_of_stream => self.decide_without_body(out),
            BodyMode::None => self.decide_without_body(out),
            BodyMode::Streamed => {
                warn_streamed_body_mode();
                self.fail(EppError::StreamedBodyMode, None, out)
            }
            BodyMode::Buffered => {
                // Envoy waits for this answer before it sends the buffered body.
                out.push(request_headers_answer(CommonResponse::default(), None));
                Flow::Continue
            }
            BodyMode::FullDuplex => Flow::Continue,
        }
    }

    async fn on_request_body(&mut self, b: HttpBody, out: &mut Vec<ProcessingResponse>) -> Flow {
        if self.decided {
            return Flow::Continue;
        }
        if self.body.len() + b.body.len() > MAX_REQUEST_BODY_BYTES {
            return self.fail(
                EppError::BodyTooLarge {
                    limit: MAX_REQUEST_BODY_BYTES,
                },
                None,
                out,
            );
        }
        trace!(
            bytes = b.body.len(),
            end_of_stream = b.end_of_stream,
            "request body piece"
        );
        if let Err(e) = self.body.push(b.body) {
            return self.fail(EppError::BodyMemoryExhausted { limit: e.limit }, None, out);
        }
        if b.end_of_stream {
            self.decide_with_body(true, out).await
        } else {
            Flow::Continue
        }
    }

    fn generated_id_header(&self) -> Option<envoy_types::pb::envoy::config::core::v3::HeaderValueOption> {
        self.generated_request_id
            .as_ref()
            .map(|id| set_header(REQUEST_ID, id.as_bytes()))
    }

    /// Header-only requests (e.g. `GET /v1/models`): any candidate serves; no scheduling.
    fn decide_without_body(&mut self, out: &mut Vec<ProcessingResponse>) -> Flow {
        self.decided = true;
        let snapshot = self.p.reader.load();
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let picked = self
            .p
            .scheduler
            .decide_without_body(&self.headers.meta, &snapshot, &mut rng);
        let endpoint = match picked.map(|id| snapshot.get(id)) {
            Ok(Some(endpoint)) => endpoint,
            Ok(None) => return self.fail(EppError::Internal("picked endpoint left the snapshot"), None, out),
            Err(refusal) => return self.fail(EppError::from(refusal), None, out),
        };
        let destination = endpoint.address_text.to_string();
        let mut headers = vec![set_header(DESTINATION_ENDPOINT, destination.as_bytes())];
        headers.extend(self.generated_id_header());
        headers.extend(self.trace_headers(&destination));
        out.push(request_headers_answer(
            common_with_headers(headers, true),
            Some(destination_metadata(&destination)),
        ));
        Flow::Continue
    }

    async fn decide_with_body(&mut self, body_ends_stream: bool, out: &mut Vec<ProcessingResponse>) -> Flow {
        let taken_up = Instant::now();
        self.decided = true;
        let (body, pieces) = match self.body.join() {
            Ok(joined) => joined,
            Err(e) => return self.fail(EppError::BodyMemoryExhausted { limit: e.limit }, None, out),
        };
        let routing = match self.route(&body).await {
            Ok(routing) => routing,
            Err((e, labels)) => return self.fail(e, labels, out),
        };
        let changed = routing.body.is_some();
        let body = routing.body.unwrap_or(body);
        let mut headers = vec![set_header(DESTINATION_ENDPOINT, routing.destination.as_bytes())];
        if !body.is_empty() {
            headers.push(set_header("Content-Length", body.len().to_string().as_bytes()));
        }
        headers.extend(self.generated_id_header());
        headers.extend(self.trace_headers(&routing.destination));
        let metadata = destination_metadata(&routing.destination);
        self.routed_from = Some(taken_up);
        match self.request_mode {
            BodyMode::Buffered => {
                // Buffered: the headers answer already went out; routing rides on the body answer.
                let replacement = changed.then_some(body);
                let mut answer = body_replace_answer(
                    Direction::Request,
                    common_with_headers(headers, true),
                    replacement,
                );
                answer.dynamic_metadata = Some(metadata);
                out.push(answer);
            }
            _ => {
                out.push(request_headers_answer(
                    common_with_headers(headers, true),
                    Some(metadata),
                ));
                // Unchanged and received in pieces: send the pieces back as they came.
                let pieces = if changed || pieces.is_empty() {
                    vec![body]
                } else {
                    pieces
                };
                push_streamed_pieces(out, Direction::Request, pieces, body_ends_stream);
            }
        }
        // The body is handed on: what the stream held against the budget is free for others.
        self.body.release();
        Flow::Continue
    }

    /// Parse the body, run the decide step, and keep what the response side needs. An error
    /// carries the request's metric labels, already bounded.
    async fn route(&mut self, body: &[u8]) -> Result<Routing, (EppError, Option<(String, String)>)> {
        let request = self
            .p
            .scheduler
            .parse_request(self.headers.api_path(), body)
            .map_err(|e| (EppError::from(e), None))?;
        let mut snapshot = self.p.reader.load();
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        // With tracing, the decision span, and every plugin's run a child span of it.
        let orchestration = self.spans.as_ref().map(ExchangeSpans::decision);
        let timer = match (&self.p.tracer, &orchestration) {
            (Some(tracer), Some(parent)) => self.p.plugin_timer().with_spans(tracer, parent),
            _ => self.p.plugin_timer(),
        };
        let mut scratch = Scratch::default();
        let mut env = DecideEnv {
            now: self.p.clock.now(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            rng: &mut rng,
            timer: Some(&timer),
            scratch: &mut scratch,
        };
        let scheduler = &self.p.scheduler;
        let meta = &self.headers.meta;
        // A queued request's hold on the next dispatch, dropped once it is counted below.
        let mut counting = None;
        let verdict = match (
            scheduler.admit(&request, body, meta, &snapshot, &mut env).await,
            &self.p.flow,
        ) {
            (Err(refused), _) => refused,
            (Ok(admitted), None) => scheduler.place(admitted, meta, &snapshot, &mut env),
            // Flow control: wait for the request's turn, then place it on the snapshot that let
            // it go (late binding), at the time it left.
            (Ok(admitted), Some(flow)) => {
                let pair = self.p.metrics.labels.pair(
                    &admitted.client_model,
                    &admitted.target_model,
                    Instant::now(),
                    false,
                );
                let queued = QueueRequest {
                    fairness_id: scheduler.flow_id(meta, admitted.priority),
                    priority: admitted.priority,
                    bytes: body.len() as u64,
                    tokens: admitted.request.estimated_load_tokens(),
                    model_label: &pair.model,
                    target_label: &pair.target,
                };
                let answers = self.answers.clone();
                let gone = async move {
                    match answers {
                        Some(tx) => tx.closed().await,
                        None => std::future::pending().await,
                    }
                };
                let queue_span = self.spans.as_ref().map(|s| s.child("flow_control.queue"));
                let waited = flow.wait(queued, gone).await;
                if let Some(span) = queue_span {
                    let outcome = match &waited {
                        Ok(_) => "dispatched",
                        Err(refusal) => Refusal::Flow(refusal.clone()).reason(),
                    };
                    spans::finish(
                        span,
                        vec![KeyValue::new("llm_d.epp.flow_control.outcome", outcome)],
                    );
                }
                match waited {
                    Ok(turn) => {
                        env.now = self.p.clock.now();
                        let verdict = scheduler.place(admitted, meta, &turn.snapshot, &mut env);
                        snapshot = turn.snapshot;
                        counting = Some(turn.counting);
                        verdict
                    }
                    Err(refusal) => admitted.refuse(Refusal::Flow(refusal)),
                }
            }
        };
        // The request's model pair takes its label place once, first, so that the budget's
        // series below name the same models; a routed request holds it while it runs.
        let (model, target) = match &verdict.result {
            Ok(o) => (&o.request.model, &o.target_model),
            Err(r) => (&r.model, &r.target_model),
        };
        let pair = self
            .p
            .metrics
            .labels
            .pair(model, target, Instant::now(), verdict.result.is_ok());
        let (model_label, target_label) = (pair.model.into_owned(), pair.target.into_owned());
        observe::admission_events(&self.p.metrics, &verdict.events);
        if let Some(cx) = &orchestration {
            spans::finish_context(cx, decision_attributes(&verdict, &model_label, &target_label));
        }
        let mut outcome = match verdict.result {
            Ok(outcome) => outcome,
            Err(refused) => {
                // Nothing will be served: the reservation's tokens go back.
                self.reservation = refused.reservation;
                let labels = Some((model_label, target_label));
                return Err((EppError::from(refused.refusal), labels));
            }
        };
        let Some(primary) = outcome.endpoints().first().and_then(|id| snapshot.get(*id)) else {
            self.p
                .metrics
                .labels
                .release(&model_label, &target_label, Instant::now());
            self.reservation = outcome.reservation.take();
            let labels = Some((model_label, target_label));
            return Err((EppError::Internal("scheduler returned no endpoint"), labels));
        };
        observe::routed(&self.p.metrics, &outcome, primary, [&model_label, &target_label]);
        let destination = observe::destination(&snapshot, &outcome);
        let in_flight = InFlight::start(&primary.live, outcome.load_tokens, outcome.prefill_tokens);
        drop(counting);
        let primary_address = primary.spec.address;
        let body = outcome.take_body(body);
        self.request_stream = outcome.request.stream;
        if let Some(r) = &outcome.reservation {
            observe::budget_usage(&self.p.metrics, r);
        }
        self.reservation = outcome.reservation;
        if let Some(text) = outcome.explanation {
            debug!(explanation = %text, "decision explained");
            self.explanation = Some(text);
        }
        self.plan = Some(outcome.response);
        self.routed = Some(Routed {
            p: self.p.clone(),
            model_label,
            target_label,
            primary: primary_address,
            in_flight,
            cache_prediction: outcome.cache_prediction,
        });
        debug!(destination = %destination, "picked");
        self.pending_hooks = Some((snapshot, outcome.cycle));
        Ok(Routing { destination, body })
    }

    fn fail(
        &mut self,
        e: EppError,
        labels: Option<(String, String)>,
        out: &mut Vec<ProcessingResponse>,
    ) -> Flow {
        let (model, target) = labels.unwrap_or_default();
        observe::refused(&self.p.metrics, [&model, &target], e.code());
        debug!(error = %e, status = e.http_status(), "request answered by the EPP");
        if let Some(reservation) = self.reservation.take() {
            self.p.tasks.spawn(async move {
                let _ = reservation.settle(Default::default()).await; // nothing was served: give it back
            });
        }
        if let Some(spans) = self.spans.take() {
            spans.fail(e.http_status(), e.code());
            spans.end();
        }
        out.push(e.to_response());
        Flow::Close
    }

    /// With `--tracing`: the routed endpoint on the request span, and the headers that carry
    /// its context to the model server.
    fn trace_headers(
        &self,
        destination: &str,
    ) -> Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption> {
        let Some(spans) = &self.spans else {
            return Vec::new();
        };
        spans.annotate(vec![KeyValue::new("llm_d.epp.endpoint", destination.to_owned())]);
        spans.propagation_headers()
    }

    /// The proxy reports which endpoint served (it may differ after a retry): move the in-flight
    /// count there.
    fn record_served(&mut self, served: &str) {
        let Some(routed) = self.routed.as_mut() else {
            return;
        };
        let Ok(addr) = served.parse::<SocketAddr>() else {
            return;
        };
        if routed.primary == addr {
            return;
        }
        let snapshot = self.p.reader.load();
        if let Some(e) = snapshot.by_address(addr).and_then(|id| snapshot.get(id)) {
            // The old count is released as the new one replaces it.
            routed.in_flight = routed.in_flight.moved_to(&e.live);
            // The prediction was for the endpoint that did not serve.
            routed.cache_prediction = None;
            routed.primary = addr;
        }
    }

    /// The response chain, built from the plan on first use: at the response headers, which
    /// say whether the answer streams, or at a body or trailers that came without them (then
    /// it is read as a JSON body, as before headers nothing says otherwise).
    fn response_chain(&mut self, streaming: bool) -> &mut ResponseChain {
        let plan = &mut self.plan;
        self.response
            .get_or_insert_with(|| ResponseChain::new(plan.take().unwrap_or_default(), streaming))
    }

    fn on_response_headers(&mut self, h: HttpHeaders, out: &mut Vec<ProcessingResponse>) {
        if let Some(spans) = &self.spans {
            self.response_span = Some(spans.child("gateway.response"));
        }
        let streaming = is_event_stream(h.headers.as_ref()) || self.request_stream;
        self.response_chain(streaming);
        let mut headers = vec![set_header(WENT_INTO_RESP_HEADERS, b"true")];
        if let Some(text) = self.explanation.take() {
            headers.push(set_header(DECISION_EXPLANATION, text.as_bytes()));
        }
        if let Some(r) = &self.reservation {
            headers.extend(budget_headers::admitted(&r.admitted, &r.budget.policy));
        }
        if let Some(served) = self.conformance_served.take() {
            headers.push(set_header(CONFORMANCE_SERVED_ENDPOINT, served.as_bytes()));
        }
        out.push(response_headers_answer(common_with_headers(headers, false)));
        if h.end_of_stream {
            self.finish_response();
        }
    }

    fn on_response_body(&mut self, b: HttpBody, out: &mut Vec<ProcessingResponse>) {
        let eos = b.end_of_stream;
        // The first answer bytes: the model server has computed the prompt (a streamed answer's
        // first token; a buffered one's whole body).
        if (!b.body.is_empty() || eos)
            && let Some(routed) = self.routed.as_mut()
        {
            routed.in_flight.first_byte();
        }
        let transformed = self.response_chain(false).feed(&b.body, eos);
        match self.response_mode {
            BodyMode::FullDuplex => {
                let data = transformed.as_deref().unwrap_or(&b.body);
                if eos {
                    push_streamed_body(out, Direction::Response, data, true);
                } else if !data.is_empty() {
                    out.push(streamed_chunk(Direction::Response, data, false));
                }
            }
            _ => {
                let replacement = transformed.filter(|x| *x != b.body);
                out.push(body_replace_answer(
                    Direction::Response,
                    CommonResponse::default(),
                    replacement,
                ));
            }
        }
        if eos {
            self.finish_response();
        }
    }

    fn finish_response(&mut self) {
        if self.response_finished {
            return;
        }
        self.response_finished = true;
        let chain = self.response_chain(false);
        let usage = chain.usage();
        let bytes = chain.bytes();
        chain.release_buffers();
        if let Some(reservation) = self.reservation.take() {
            // Settle with the actual usage; without usage (a stream cut short, a client that did
            // not ask for it) the reservation stands.
            if let Some(u) = &usage {
                let actual = reservation.actual(u);
                observe::budget_settled(&self.p.metrics, &reservation, actual);
                self.p.tasks.spawn(async move {
                    if let Err(e) = reservation.settle(actual).await {
                        tracing::warn!(error = %e, "budget settlement failed");
                    }
                });
            }
        }
        if let (Some(routed), Some(u)) = (self.routed.as_ref(), usage.as_ref())
            && let (Some(predicted), Some(cached_tokens)) = (routed.cache_prediction, u.cached_tokens)
            && u.prompt_tokens > 0
        {
            let report = CacheReport {
                predicted,
                prompt_tokens: u.prompt_tokens,
                cached_tokens,
            };
            let forgotten = self.p.scheduler.cache_report(&report);
            observe::cache_report(&self.p.metrics, &report, forgotten);
        }
        if let Some(span) = self.response_span.take() {
            let usage_read = usage.is_some();
            spans::finish(span, vec![KeyValue::new("llm_d.epp.usage_read", usage_read)]);
        }
        if let Some(spans) = self.spans.take() {
            spans.end();
        }
        if let Some(routed) = self.routed.take() {
            let labels = [routed.model_label.as_str(), routed.target_label.as_str()];
            let seconds = self.started.elapsed().as_secs_f64();
            observe::answered(&self.p.metrics, labels, seconds, bytes, usage.as_ref());
        }
    }
}
