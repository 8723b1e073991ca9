//! The per-stream state machine: one ext_proc stream is one HTTP exchange.
//!
//! Request side: headers are stored and the headers answer is held until the body is complete
//! (full-duplex), then the decision goes out as the headers answer followed by the body. The body
//! is parsed once; it is re-emitted byte-for-byte unless the model is rewritten, in which case
//! only the `model` value is spliced. Response side: every chunk is answered as it arrives (SSE
//! stays incremental) after usage is read and the client-facing model name restored.
//!
//! Invariants: exactly one decision per exchange; the in-flight counters taken at decision time
//! are released exactly once, when the exchange ends or the stream drops (client cancel).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use envoy_types::pb::{
    envoy::{
        config::core::v3::{HeaderMap, Metadata},
        service::ext_proc::v3::{
            CommonResponse, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
            processing_request::Request,
        },
    },
    google::protobuf::value::Kind,
};
use rand::{SeedableRng, rngs::SmallRng, seq::IndexedRandom};
use tracing::{debug, trace};

use super::{
    encode::{
        Direction, body_replace_answer, common_with_headers, destination_metadata, push_streamed_body,
        push_streamed_pieces, request_headers_answer, response_headers_answer, set_header, streamed_chunk,
        trailers_answer,
    },
    error::EppError,
    processor::Processor,
    wire::*,
};
use crate::{
    datastore::{EndpointId, EndpointLive, Snapshot},
    guard::{
        Placeholders,
        response::{StreamMask, mask_json_body},
    },
    parser::{
        EventSplitter, LlmRequest, SseUsageScanner, StreamReplacer, Usage, UsageEventFilter, ask_for_usage,
        model_patterns, parse_request, replace_model, usage_from_json,
    },
    scheduler::admission::{Admitted, BudgetDecision, GuardOutcome, TokenBudget},
    scheduler::{Decision, SchedulingContext, SchedulingError, Scratch},
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

/// Whether the service loop keeps reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep going.
    Continue,
    /// An immediate response was sent: the exchange is over.
    Close,
}

/// Bookkeeping for a routed request, released once.
struct Routed {
    model: String,
    target_model: String,
    live: Option<Arc<EndpointLive>>,
    primary: Option<SocketAddr>,
    tokens: u64,
}

#[derive(Default)]
struct ResponseState {
    streaming: bool,
    restorer: Option<StreamReplacer>,
    sse: SseUsageScanner,
    json: Vec<u8>,
    json_overflow: bool,
    bytes: u64,
    finished: bool,
    /// Drop the usage-only SSE event the EPP asked for on the client's behalf.
    strip_usage: Option<UsageEventFilter>,
    /// Mask model output for response guards.
    mask: Option<ResponseMask>,
}

/// Response guards at work: SSE events are split out as they complete and masked across events
/// ([`StreamMask`]); a non-streaming body is held to its end (a JSON body can only be masked
/// whole).
struct ResponseMask {
    guards: Vec<Arc<crate::scheduler::admission::PromptGuard>>,
    events: EventSplitter,
    stream: StreamMask,
    held: Vec<u8>,
}

impl std::fmt::Debug for ResponseMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseMask")
            .field("guards", &self.guards.len())
            .finish()
    }
}

impl ResponseMask {
    fn feed(&mut self, data: &[u8], streaming: bool, eos: bool) -> Vec<u8> {
        let sets: Vec<&crate::guard::PatternSet> =
            self.guards.iter().filter_map(|g| g.response_patterns()).collect();
        if streaming {
            let mut out = Vec::with_capacity(data.len());
            let stream = &mut self.stream;
            self.events
                .feed_with(data, eos, |ev| out.extend_from_slice(&stream.event(&sets, ev)));
            if eos {
                out.extend_from_slice(&self.stream.finish(&sets));
            }
            return out;
        }
        self.held.extend_from_slice(data);
        if !eos {
            return Vec::new();
        }
        let body = std::mem::take(&mut self.held);
        mask_json_body(&sets, &body).unwrap_or(body)
    }
}

/// State of one exchange.
pub struct Exchange {
    p: Arc<Processor>,
    request_mode: BodyMode,
    response_mode: BodyMode,
    path: Option<String>,
    fallback_path: Option<String>,
    request_id: Option<String>,
    generated_request_id: Option<String>,
    model_rewrite: Option<String>,
    objective: Option<String>,
    tenant: Option<String>,
    budget: Option<(Arc<TokenBudget>, Admitted)>,
    explain: bool,
    explanation: Option<String>,
    subset: Option<Vec<String>>,
    /// The request body as received, one piece per message: kept as sent so that an unchanged
    /// body is re-emitted without copying, and joined once (exactly sized) for parsing.
    body_pieces: Vec<Vec<u8>>,
    body_len: usize,
    decided: bool,
    /// When the body's last message was taken up, once it got its routing answer: the decision
    /// time is observed in [`Exchange::after_send`], when the answers have been handed on.
    routed_from: Option<Instant>,
    request_stream: bool,
    started: Instant,
    routed: Option<Routed>,
    /// Decision whose pre-request hooks run once its answers are sent.
    pending_hooks: Option<(Arc<Snapshot>, Decision)>,
    response: ResponseState,
}

fn header_value(h: &envoy_types::pb::envoy::config::core::v3::HeaderValue) -> &[u8] {
    if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        &h.raw_value
    }
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// The subset hint in `md`, if the namespace and key are present. A list is read as strings
/// (other kinds skipped); a comma-separated string is accepted too.
pub fn subset_hint(md: &Metadata) -> Option<Vec<String>> {
    let value = md
        .filter_metadata
        .get(SUBSET_HINT_NAMESPACE)?
        .fields
        .get(SUBSET_HINT_KEY)?;
    match value.kind.as_ref()? {
        Kind::ListValue(list) => Some(
            list.values
                .iter()
                .filter_map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.trim().to_owned()),
                    _ => None,
                })
                .collect(),
        ),
        Kind::StringValue(s) => Some(
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        ),
        _ => None,
    }
}

fn served_endpoint(md: &Metadata) -> Option<String> {
    match md
        .filter_metadata
        .get(LB_NAMESPACE)?
        .fields
        .get(SERVED_ENDPOINT_KEY)?
        .kind
        .as_ref()?
    {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// Candidates allowed by a subset hint: an exact `ip:port` selects that endpoint; an entry whose
/// port matches nothing on its IP (or a bare IP) selects every endpoint on that IP.
pub fn subset_candidates(snapshot: &Snapshot, hint: &[String]) -> Vec<EndpointId> {
    let mut out = Vec::new();
    for entry in hint {
        if let Ok(addr) = entry.parse::<SocketAddr>() {
            match snapshot.by_address(addr) {
                Some(id) => out.push(id),
                None => out.extend_from_slice(snapshot.on_ip(addr.ip())),
            }
        } else if let Ok(ip) = entry.trim_matches(|c| c == '[' || c == ']').parse() {
            out.extend_from_slice(snapshot.on_ip(ip));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

struct Plan {
    destination: String,
    body: Vec<u8>,
    /// Whether `body` differs from what the client sent (rewrite or masking).
    changed: bool,
}

impl Exchange {
    /// A new exchange served by `p`.
    pub fn new(p: Arc<Processor>) -> Self {
        Self {
            p,
            request_mode: BodyMode::FullDuplex,
            response_mode: BodyMode::FullDuplex,
            path: None,
            fallback_path: None,
            request_id: None,
            generated_request_id: None,
            model_rewrite: None,
            objective: None,
            tenant: None,
            budget: None,
            explain: false,
            explanation: None,
            subset: None,
            body_pieces: Vec::new(),
            body_len: 0,
            decided: false,
            routed_from: None,
            request_stream: false,
            started: Instant::now(),
            routed: None,
            pending_hooks: None,
            response: ResponseState::default(),
        }
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
        if self.subset.is_none()
            && !self.p.disable_subset_filter
            && let Some(md) = &msg.metadata_context
        {
            self.subset = subset_hint(md);
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
                self.on_response_headers(h, out);
                Flow::Continue
            }
            Some(Request::ResponseBody(b)) => {
                self.on_response_body(b, out);
                Flow::Continue
            }
            Some(Request::ResponseTrailers(_)) => {
                if self.response_mode == BodyMode::FullDuplex
                    && let Some(r) = self.response.restorer.as_mut()
                {
                    let rest = r.feed(&[], true);
                    if !rest.is_empty() {
                        out.push(streamed_chunk(Direction::Response, &rest, false));
                    }
                }
                out.push(trailers_answer(Direction::Response));
                self.finish_response();
                Flow::Continue
            }
            None => Flow::Continue,
        }
    }

    fn on_request_headers(&mut self, h: HttpHeaders, out: &mut Vec<ProcessingResponse>) -> Flow {
        for hv in h
            .headers
            .as_ref()
            .map(|m: &HeaderMap| m.headers.as_slice())
            .unwrap_or_default()
        {
            let key = hv.key.to_ascii_lowercase();
            let value = header_value(hv);
            match key.as_str() {
                ":path" => self.path = Some(text(value)),
                "x-original-path" | "x-forwarded-path" if self.fallback_path.is_none() => {
                    self.fallback_path = Some(text(value));
                }
                REQUEST_ID => self.request_id = Some(text(value)),
                DEBUG_REQUEST => self.explain = self.p.explain_decisions,
                k if self
                    .p
                    .scheduler
                    .budget()
                    .is_some_and(|b| b.policy.tenant_header == k)
                    && !value.is_empty() =>
                {
                    self.tenant = Some(text(value));
                }
                k if MODEL_REWRITE_HEADERS.contains(&k) && !value.is_empty() => {
                    self.model_rewrite = Some(text(value))
                }
                k if OBJECTIVE_HEADERS.contains(&k) && !value.is_empty() => {
                    self.objective = Some(text(value))
                }
                _ => {}
            }
        }
        if self.request_id.is_none() {
            self.generated_request_id = Some(uuid::Uuid::new_v4().to_string());
        }
        match self.request_mode {
            _ if h.end_of_stream => self.decide_without_body(out),
            BodyMode::None | BodyMode::Streamed => self.decide_without_body(out),
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
        if self.body_len + b.body.len() > MAX_REQUEST_BODY_BYTES {
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
        self.body_len += b.body.len();
        if !b.body.is_empty() {
            self.body_pieces.push(b.body);
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
        let candidates = self.candidates(&snapshot);
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let Some(endpoint) = candidates.choose(&mut rng).and_then(|id| snapshot.get(*id)) else {
            return self.fail(EppError::NoCandidates, None, out);
        };
        let destination = endpoint.address_text.to_string();
        let mut headers = vec![set_header(DESTINATION_ENDPOINT, destination.as_bytes())];
        headers.extend(self.generated_id_header());
        out.push(request_headers_answer(
            common_with_headers(headers, true),
            Some(destination_metadata(&destination)),
        ));
        Flow::Continue
    }

    fn candidates(&self, snapshot: &Snapshot) -> Vec<EndpointId> {
        match &self.subset {
            Some(hint) => subset_candidates(snapshot, hint),
            None => snapshot.all_ids().collect(),
        }
    }

    async fn decide_with_body(&mut self, body_ends_stream: bool, out: &mut Vec<ProcessingResponse>) -> Flow {
        let taken_up = Instant::now();
        self.decided = true;
        let mut pieces = std::mem::take(&mut self.body_pieces);
        let body = if pieces.len() == 1 {
            pieces.pop().unwrap_or_default()
        } else {
            let mut joined = Vec::with_capacity(self.body_len);
            for piece in &pieces {
                joined.extend_from_slice(piece);
            }
            joined
        };
        let plan = match self.schedule(body).await {
            Ok(plan) => plan,
            Err((e, model)) => return self.fail(e, model, out),
        };
        let mut headers = vec![set_header(DESTINATION_ENDPOINT, plan.destination.as_bytes())];
        if !plan.body.is_empty() {
            headers.push(set_header(
                "Content-Length",
                plan.body.len().to_string().as_bytes(),
            ));
        }
        headers.extend(self.generated_id_header());
        let metadata = destination_metadata(&plan.destination);
        self.routed_from = Some(taken_up);
        match self.request_mode {
            BodyMode::Buffered => {
                // Buffered: the headers answer already went out; routing rides on the body answer.
                let replacement = plan.changed.then_some(plan.body);
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
                let pieces = if plan.changed || pieces.is_empty() {
                    vec![plan.body]
                } else {
                    pieces
                };
                push_streamed_pieces(out, Direction::Request, pieces, body_ends_stream);
            }
        }
        Flow::Continue
    }

    /// Run the prompt guards over the parsed request. Returns the masked body when a guard masked
    /// something (placeholders are then restored on the response path).
    fn apply_guards(&mut self, req: &LlmRequest, body: &[u8]) -> Result<Option<Vec<u8>>, EppError> {
        let guards = self.p.scheduler.guards();
        if guards.is_empty() {
            return Ok(None);
        }
        let Ok(mut prompt) = serde_json::from_slice::<serde_json::Value>(req.prompt_bytes(body)) else {
            return Ok(None); // the parser validated it; unreachable in practice
        };
        let mut placeholders = Placeholders::default();
        for g in guards {
            match g.check(req.api, &mut prompt, &mut placeholders) {
                GuardOutcome::Pass => {}
                GuardOutcome::Masked => {
                    self.p
                        .metrics
                        .guard_hits
                        .with_label_values(&[&*g.name.name, "any", "mask"])
                        .inc();
                }
                GuardOutcome::Reject {
                    status,
                    message,
                    rule,
                } => {
                    self.p
                        .metrics
                        .guard_hits
                        .with_label_values(&[&*g.name.name, rule.as_str(), "reject"])
                        .inc();
                    debug!(guard = %g.name.name, rule = %rule, "prompt rejected");
                    return Err(EppError::Guard { status, message });
                }
            }
        }
        if placeholders.is_empty() {
            return Ok(None);
        }
        debug!(masked = placeholders.len(), "prompt values masked");
        let encoded = serde_json::to_vec(&prompt)
            .map_err(|_| EppError::Internal("cannot re-encode a masked prompt"))?;
        let mut out = Vec::with_capacity(body.len() + encoded.len());
        out.extend_from_slice(&body[..req.prompt_span.start]);
        out.extend_from_slice(&encoded);
        out.extend_from_slice(&body[req.prompt_span.end..]);
        let restore = placeholders.restore_patterns();
        match self.response.restorer.as_mut() {
            Some(r) => r.extend(restore),
            None => self.response.restorer = Some(StreamReplacer::with_patterns(restore)),
        }
        Ok(Some(out))
    }

    async fn schedule(&mut self, body: Vec<u8>) -> Result<Plan, (EppError, Option<(String, String)>)> {
        let path = self
            .path
            .as_deref()
            .or(self.fallback_path.as_deref())
            .unwrap_or("/v1/completions")
            .to_owned();
        let mut body = body;
        let mut changed = false;
        let mut req = parse_request(&path, &body).map_err(|e| (EppError::from(e), None))?;
        if let Some(masked) = self
            .apply_guards(&req, &body)
            .map_err(|e| (e, Some((req.model.clone(), req.model.clone()))))?
        {
            body = masked;
            changed = true;
            req = parse_request(&path, &body).map_err(|e| (EppError::from(e), None))?;
        }
        let mut target = self.model_rewrite.clone().unwrap_or_else(|| req.model.clone());
        if let Some(budget) = self.p.scheduler.budget().cloned() {
            // Guards ran first: a rejected prompt costs nothing.
            let tenant = self.tenant.clone().unwrap_or_else(|| "default".into());
            let amount = budget
                .policy
                .estimate(req.estimated_prompt_tokens(), req.max_output_tokens);
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            match budget.admit(&tenant, &req.model, amount, now_ms).await {
                Ok(BudgetDecision::Unlimited) => {
                    if budget.note_store_health(true) {
                        tracing::info!("budget store reachable again");
                    }
                }
                Ok(BudgetDecision::Admitted(a)) => {
                    if budget.note_store_health(true) {
                        tracing::info!("budget store reachable again");
                    }
                    let m = &self.p.metrics;
                    let model = a.fallback.as_deref().unwrap_or(&req.model);
                    m.budget_reserved
                        .with_label_values(&[&tenant, model])
                        .inc_by(a.reserved);
                    if let Some(f) = &a.fallback {
                        m.budget_fallbacks
                            .with_label_values(&[&tenant, &req.model, f])
                            .inc();
                        debug!(tenant = %tenant, model = %req.model, fallback = %f, "budget fallback");
                        target = f.clone();
                    }
                    self.budget = Some((budget, a));
                }
                Ok(BudgetDecision::Rejected(r)) => {
                    if budget.note_store_health(true) {
                        tracing::info!("budget store reachable again");
                    }
                    self.p
                        .metrics
                        .budget_rejections
                        .with_label_values(&[&tenant, &req.model])
                        .inc();
                    let labels = Some((req.model.clone(), target.clone()));
                    return Err((EppError::OverBudget(r), labels));
                }
                Err(e) => {
                    self.p.metrics.budget_store_errors.inc();
                    if budget.note_store_health(false) {
                        tracing::warn!(error = %e, fail_open = budget.fail_open(), "budget store unavailable");
                    }
                    if !budget.fail_open() {
                        let labels = Some((req.model.clone(), target.clone()));
                        return Err((EppError::BudgetStoreUnavailable, labels));
                    }
                }
            }
        }
        let output_guards: Vec<_> = self
            .p
            .scheduler
            .guards()
            .iter()
            .filter(|g| g.response_patterns().is_some())
            .cloned()
            .collect();
        if !output_guards.is_empty() {
            self.response.mask = Some(ResponseMask {
                guards: output_guards,
                events: EventSplitter::default(),
                stream: StreamMask::default(),
                held: Vec::new(),
            });
        }
        let body_ref: &[u8] = &body;
        let labels = Some((req.model.clone(), target.clone()));
        let snapshot = self.p.reader.load();
        let candidates = self.candidates(&snapshot);
        if candidates.is_empty() {
            return Err((EppError::NoCandidates, labels));
        }
        // Cluster objectives first, then those declared in the config.
        let priority = match self.objective.as_deref().and_then(|o| snapshot.objectives.get(o)) {
            Some(p) => *p,
            None => self.p.scheduler.priority_of(self.objective.as_deref()),
        };
        let ctx = SchedulingContext {
            snapshot: &snapshot,
            request: &req,
            body: body_ref,
            target_model: &target,
            now: self.p.clock.now(),
            priority,
        };
        self.p
            .scheduler
            .admit(&ctx, &candidates)
            .map_err(|e| (EppError::Scheduling(e), labels.clone()))?;
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let started = Instant::now();
        let timer = self.p.plugin_timer();
        let mut scratch = Scratch::default();
        if self.explain {
            scratch.explain = Some(Default::default());
        }
        let decision = self
            .p
            .scheduler
            .schedule(&ctx, candidates, &mut scratch, &mut rng, Some(&timer))
            .map_err(|e| match e {
                SchedulingError::NoCandidates => (EppError::NoCandidates, labels.clone()),
                other => (EppError::Scheduling(other), labels.clone()),
            })?;
        let m = &self.p.metrics;
        m.scheduler_e2e.observe(started.elapsed().as_secs_f64());
        if decision.repairs.non_finite > 0 {
            m.score_repairs
                .with_label_values(&["non_finite"])
                .inc_by(u64::from(decision.repairs.non_finite));
        }
        if decision.repairs.clamped > 0 {
            m.score_repairs
                .with_label_values(&["clamped"])
                .inc_by(u64::from(decision.repairs.clamped));
        }
        let picked: Vec<_> = decision
            .endpoints
            .iter()
            .filter_map(|id| snapshot.get(*id))
            .collect();
        let Some(primary) = picked.first() else {
            return Err((EppError::Internal("scheduler returned no endpoint"), labels));
        };
        if let Some(pm) = decision.state.prefix.as_ref().filter(|pm| !pm.hashes.is_empty()) {
            let matched = pm.matched_blocks(primary.uid);
            m.prefix_hit_ratio
                .observe(f64::from(matched) / pm.hashes.len() as f64);
            m.prefix_hit_bytes
                .observe(f64::from(matched) * f64::from(pm.block_size_tokens) * 4.0);
        }
        let destination = picked
            .iter()
            .map(|e| &*e.address_text)
            .collect::<Vec<_>>()
            .join(",");
        let tokens = req.estimated_load_tokens();
        primary.live.start(tokens);
        m.scheduler_attempts
            .with_label_values(&[
                "success",
                &target,
                &primary.spec.key.name,
                &primary.spec.key.namespace,
                &primary.spec.address.port().to_string(),
            ])
            .inc();
        m.request_total
            .with_label_values(&[&req.model, &target, &priority.to_string()])
            .inc();
        m.request_sizes
            .with_label_values(&[&req.model, &target])
            .observe(body_ref.len() as f64);
        m.running_requests.with_label_values(&[&req.model]).inc();

        self.request_stream = req.stream;
        let fallback = self.budget.as_ref().and_then(|(_, a)| a.fallback.clone());
        // Budgets settle from usage: a streaming client that did not ask for it (no
        // `stream_options`, or one without `include_usage: true`) gets it asked for on its
        // behalf, and the extra usage-only event is removed from what it sees.
        let reserved = self.budget.as_ref().is_some_and(|(_, a)| !a.layers.is_empty());
        let ask_usage = reserved && req.stream && !req.include_usage;
        // Both edits work at spans of the parsed body: the one further into the body goes
        // first, so that the other's span still holds.
        let usage_first = req
            .stream_options_span
            .as_ref()
            .is_some_and(|s| s.start > req.model_span.start);
        let mut asked = ask_usage && usage_first && ask_for_usage(&mut body, req.stream_options_span.clone());
        if target != req.model {
            body = replace_model(&body, req.model_span.clone(), &target);
            changed = true;
        }
        asked |= ask_usage && !usage_first && ask_for_usage(&mut body, req.stream_options_span.clone());
        if asked {
            changed = true;
            self.response.strip_usage = Some(UsageEventFilter::default());
        }
        // A fallback is reported (x-gateway-model-fallback), not hidden: only rewrites are restored.
        if target != req.model && fallback.is_none() {
            let patterns = model_patterns(&target, &req.model);
            match self.response.restorer.as_mut() {
                Some(r) => r.extend(patterns),
                None => self.response.restorer = Some(StreamReplacer::with_patterns(patterns)),
            }
        }
        self.routed = Some(Routed {
            model: req.model,
            target_model: target,
            live: Some(primary.live.clone()),
            primary: Some(primary.spec.address),
            tokens,
        });
        if let Some(e) = scratch.explain.take() {
            let text = e.render(|id| {
                snapshot
                    .get(id)
                    .map_or_else(String::new, |e| e.address_text.to_string())
            });
            debug!(explanation = %text, "decision explained");
            self.explanation = Some(text);
        }
        debug!(destination = %destination, "picked");
        self.pending_hooks = Some((snapshot.clone(), decision));
        Ok(Plan {
            destination,
            body,
            changed,
        })
    }

    fn fail(
        &mut self,
        e: EppError,
        labels: Option<(String, String)>,
        out: &mut Vec<ProcessingResponse>,
    ) -> Flow {
        let (model, target) = labels.unwrap_or_default();
        self.p
            .metrics
            .request_error_total
            .with_label_values(&[&model, &target, e.code()])
            .inc();
        debug!(error = %e, status = e.http_status(), "request answered by the EPP");
        if let Some((budget, a)) = self.budget.take() {
            self.p.tasks.spawn(async move {
                let _ = budget.settle(&a, 0).await; // nothing was served: give the tokens back
            });
        }
        out.push(e.to_response());
        Flow::Close
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
        if routed.primary == Some(addr) {
            return;
        }
        let snapshot = self.p.reader.load();
        if let Some(e) = snapshot.by_address(addr).and_then(|id| snapshot.get(id)) {
            if let Some(old) = routed.live.take() {
                old.finish(routed.tokens);
            }
            e.live.start(routed.tokens);
            routed.live = Some(e.live.clone());
            routed.primary = Some(addr);
        }
    }

    fn on_response_headers(&mut self, h: HttpHeaders, out: &mut Vec<ProcessingResponse>) {
        let is_sse = h
            .headers
            .as_ref()
            .map(|m| m.headers.as_slice())
            .unwrap_or_default()
            .iter()
            .any(|hv| {
                hv.key.eq_ignore_ascii_case("content-type")
                    && text(header_value(hv))
                        .to_ascii_lowercase()
                        .contains("text/event-stream")
            });
        self.response.streaming = is_sse || self.request_stream;
        let mut headers = vec![set_header(WENT_INTO_RESP_HEADERS, b"true")];
        if let Some(text) = self.explanation.take() {
            headers.push(set_header(DECISION_EXPLANATION, text.as_bytes()));
        }
        if let Some((_, a)) = &self.budget {
            headers.extend(ratelimit_headers(a.limit, a.remaining, a.window.remaining_ms));
            if let Some(f) = &a.fallback {
                headers.push(set_header(MODEL_FALLBACK, f.as_bytes()));
            }
        }
        out.push(response_headers_answer(common_with_headers(headers, false)));
        if h.end_of_stream {
            self.finish_response();
        }
    }

    fn on_response_body(&mut self, b: HttpBody, out: &mut Vec<ProcessingResponse>) {
        let eos = b.end_of_stream;
        let r = &mut self.response;
        r.bytes += b.body.len() as u64;
        if r.streaming {
            r.sse.feed(&b.body);
        } else if !r.json_overflow {
            if r.json.len() + b.body.len() > MAX_RESPONSE_USAGE_BYTES {
                r.json_overflow = true;
                r.json = Vec::new();
            } else {
                r.json.extend_from_slice(&b.body);
            }
        }
        let filtered = r.strip_usage.as_mut().map(|f| f.feed(&b.body, eos));
        let visible: &[u8] = filtered.as_deref().unwrap_or(&b.body);
        let restored = match r.restorer.as_mut() {
            Some(x) => Some(x.feed(visible, eos)),
            None => filtered,
        };
        let restored = match r.mask.as_mut() {
            Some(mask) => Some(mask.feed(restored.as_deref().unwrap_or(&b.body), r.streaming, eos)),
            None => restored,
        };
        match self.response_mode {
            BodyMode::FullDuplex => {
                let data = restored.as_deref().unwrap_or(&b.body);
                if eos {
                    push_streamed_body(out, Direction::Response, data, true);
                } else if !data.is_empty() {
                    out.push(streamed_chunk(Direction::Response, data, false));
                }
            }
            _ => {
                let replacement = restored.filter(|x| *x != b.body);
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
        if self.response.finished {
            return;
        }
        self.response.finished = true;
        let usage: Option<Usage> = if self.response.streaming {
            self.response.sse.usage()
        } else {
            usage_from_json(&self.response.json)
        };
        self.response.json = Vec::new();
        if let Some((budget, a)) = self.budget.take() {
            // Settle with the actual usage; without usage (a stream cut short, a client that did
            // not ask for it) the reservation stands.
            if let Some(u) = usage {
                let actual = u.total_tokens.max(u.prompt_tokens + u.completion_tokens);
                let tenant = self.tenant.as_deref().unwrap_or("default");
                let model = a
                    .fallback
                    .clone()
                    .or_else(|| self.routed.as_ref().map(|r| r.model.clone()))
                    .unwrap_or_default();
                self.p
                    .metrics
                    .budget_settled
                    .with_label_values(&[tenant, &model])
                    .inc_by(actual);
                self.p.tasks.spawn(async move {
                    if let Err(e) = budget.settle(&a, actual).await {
                        tracing::warn!(error = %e, "budget settlement failed");
                    }
                });
            }
        }
        let Some(routed) = self.routed.as_ref() else {
            return;
        };
        let labels = [routed.model.as_str(), routed.target_model.as_str()];
        let m = &self.p.metrics;
        let seconds = self.started.elapsed().as_secs_f64();
        m.request_duration.with_label_values(&labels).observe(seconds);
        m.response_sizes
            .with_label_values(&labels)
            .observe(self.response.bytes as f64);
        if let Some(u) = usage {
            if u.prompt_tokens > 0 {
                m.input_tokens
                    .with_label_values(&labels)
                    .observe(u.prompt_tokens as f64);
            }
            if u.completion_tokens > 0 {
                m.output_tokens
                    .with_label_values(&labels)
                    .observe(u.completion_tokens as f64);
                m.normalized_tpot
                    .with_label_values(&labels)
                    .observe(seconds / u.completion_tokens as f64);
            }
            if let Some(c) = u.cached_tokens {
                m.prompt_cached_tokens
                    .with_label_values(&labels)
                    .observe(c as f64);
            }
        }
        self.release();
    }

    /// Release in-flight accounting; safe to call more than once.
    fn release(&mut self) {
        if let Some(mut routed) = self.routed.take() {
            if let Some(live) = routed.live.take() {
                live.finish(routed.tokens);
            }
            self.p
                .metrics
                .running_requests
                .with_label_values(&[&routed.model])
                .dec();
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        // Client cancel, Envoy reset or an unfinished response: the cleanup still runs, once.
        self.release();
    }
}

/// OpenAI-style rate-limit headers for the tightest budget layer.
fn ratelimit_headers(
    limit: u64,
    remaining: u64,
    reset_ms: u64,
) -> [envoy_types::pb::envoy::config::core::v3::HeaderValueOption; 3] {
    [
        set_header(RATELIMIT_LIMIT_TOKENS, limit.to_string().as_bytes()),
        set_header(RATELIMIT_REMAINING_TOKENS, remaining.to_string().as_bytes()),
        set_header(
            RATELIMIT_RESET_TOKENS,
            crate::budget::reset_text(reset_ms).as_bytes(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::testing::SnapshotBuilder;

    #[test]
    fn subset_matching_rules() {
        let snap = SnapshotBuilder::new()
            .endpoint("10.0.0.1:8000", |_| {})
            .endpoint("10.0.0.1:8001", |_| {})
            .endpoint("10.0.0.2:8000", |_| {})
            .build();
        let s = |v: &[&str]| subset_candidates(&snap, &v.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(s(&["10.0.0.1:8001"]), vec![EndpointId(1)]);
        assert_eq!(s(&["10.0.0.1:9999"]), vec![EndpointId(0), EndpointId(1)]);
        assert_eq!(
            s(&["10.0.0.1:8000", "10.0.0.2:8000"]),
            vec![EndpointId(0), EndpointId(2)]
        );
        assert_eq!(s(&["10.0.0.2"]), vec![EndpointId(2)]);
        assert!(s(&["192.168.1.1:8080"]).is_empty());
        assert!(s(&[]).is_empty());
    }
}
