//! The decide step: the one place a routing decision is made.
//!
//! The ext_proc adapter and the simulator's replay both call [`Scheduler::decide`] with the
//! parsed request, the plain [`RequestMeta`] the gateway's headers and metadata carried, the
//! snapshot loaded once for this request, and a [`DecideEnv`] holding time, a seeded RNG, the
//! optional plugin timer and reusable scratch. In order:
//! 1. candidates: the pool, or the gateway's subset hint ([`subset_candidates`]);
//! 2. the objective's priority, from the snapshot (where the config's `inference-objectives`
//!    and the cluster's `InferenceObjective`s meet; unknown or absent → 0);
//! 3. admission, stage by stage ([`super::admission`]: prompt guards, token budget, saturation
//!    gate);
//! 4. scheduling: producers, the profile (filters → weighted scorers → picker);
//! 5. the outcome: endpoints (primary first, then fallbacks), the target model, the body edits
//!    (the model rewrite and the usage request, applied in one pass by the caller), the response
//!    plan, the reservation, the explanation and the decision the pre-request hooks learn from.
//!
//! Steps 1–3 are [`Scheduler::admit`], 4–5 [`Scheduler::place`]. Without flow control
//! [`Scheduler::decide`] runs both on one snapshot. With it, the caller puts the
//! [`AdmittedRequest`] in the flow-control queue ([`super::flow`]) and places it on the snapshot
//! of its dispatch (late binding: candidates are looked up again there).
//!
//! Pure: no clock, no global RNG, no I/O besides the budget store behind its trait. The snapshot
//! and `now` are those of the body's arrival: a budget store's round trip (at most its timeout,
//! 100 ms by default) does not refresh them.
//! Invariant: a [`Verdict`] carries either an outcome or one refusal; a refusal made after a
//! reservation hands the reservation back so the caller returns its tokens.

use std::{borrow::Cow, net::SocketAddr, sync::Arc};

use rand::{RngCore, seq::IndexedRandom};

use super::{
    Decision, Scheduler, SchedulingError,
    admission::{Admission, AdmissionEvent, BudgetReservation, PromptGuard, Refusal},
    flow::{DEFAULT_FLOW, Fairness},
    plugin::{CachePrediction, ExtensionPoint, PluginTimer, SchedulingContext},
    profile::Scratch,
};
use crate::{
    clock::Timestamp,
    datastore::{EndpointId, Snapshot},
    parser::{BodyEdit, LlmRequest, apply_edits, model_edit, model_patterns, usage_edit},
};

/// What the gateway said about a request besides its body: headers and metadata, already read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestMeta {
    /// The tenant (the budget's tenant header), when present and non-empty.
    pub tenant: Option<String>,
    /// The objective (`x-gateway-inference-objective`), when present.
    pub objective: Option<String>,
    /// The flow-control fairness id (`x-gateway-inference-fairness-id`), when present.
    pub fairness_id: Option<String>,
    /// The model to serve instead of the requested one (`x-gateway-model-name-rewrite`).
    pub model_rewrite: Option<String>,
    /// The gateway's subset hint: `ip:port` or bare IPs the request may go to.
    pub subset: Option<Vec<String>>,
    /// The conformance suite's endpoint selection (`--conformance-hooks` only): `ip` (any
    /// port of that pod) or `ip:port` items the request may go to, within the subset.
    pub endpoint_selection: Option<Vec<String>>,
    /// Whether the decision should be explained (`x-epp-debug` with `--explain-decisions`).
    pub explain: bool,
}

/// What the decision may use besides the request and the pool: time and randomness come in, so
/// the simulator drives logical time and seeded randomness through the same code.
pub struct DecideEnv<'a> {
    /// Scheduling time (metrics age, windows of plugins).
    pub now: Timestamp,
    /// Wall-clock milliseconds since the Unix epoch, for budget windows.
    pub unix_ms: u64,
    /// Randomness for probabilistic filters and pickers.
    pub rng: &'a mut (dyn RngCore + Send),
    /// Observer of plugin run times (the server's histogram), or none.
    pub timer: Option<&'a (dyn PluginTimer + Sync)>,
    /// Buffers reused across decisions.
    pub scratch: &'a mut Scratch,
}

/// How the response must be treated, decided with the request.
#[derive(Debug, Default)]
pub struct ResponsePlan {
    /// `(from, to)` byte patterns to replace in the response: masked prompt values restored
    /// from their placeholders, then the client-facing model name after a rewrite.
    pub restore: Vec<(Vec<u8>, Vec<u8>)>,
    /// Drop the usage-only SSE event the EPP asked for on the client's behalf.
    pub hide_injected_usage: bool,
    /// Guards whose response patterns mask the model's output.
    pub output_guards: Vec<Arc<PromptGuard>>,
}

/// A routed request.
#[derive(Debug)]
pub struct Outcome {
    /// The request as it will be served (parsed from the masked body when a guard masked it).
    pub request: LlmRequest,
    /// The model the request is served as (after rewrite and budget fallback).
    pub target_model: String,
    /// The objective's priority.
    pub priority: i32,
    /// The body a guard masked, when it did (the edits apply to it, not to the client's body).
    pub masked_body: Option<Vec<u8>>,
    /// Span replacements of the (masked) body: the model rewrite and the usage request.
    pub edits: Vec<BodyEdit>,
    /// How the response is treated.
    pub response: ResponsePlan,
    /// The budget reservation, settled when the response ends.
    pub reservation: Option<BudgetReservation>,
    /// The rendered explanation, when asked for.
    pub explanation: Option<String>,
    /// The cycle: the chosen endpoints (primary first, then fallbacks) and the data the
    /// pre-request hooks and metrics read (prefix match, score repairs).
    pub cycle: Decision,
    /// How many endpoints the profile chose among (the pool or the gateway's subset).
    pub candidates: usize,
    /// Tokens the request is expected to occupy on its endpoint (in-flight accounting).
    pub load_tokens: u64,
    /// Prompt tokens the primary endpoint is expected to compute: the estimated prompt less the
    /// prefix the cycle's prefix match says it holds (the whole prompt without a match). Counted
    /// as prefill work on the endpoint until the first response byte.
    pub prefill_tokens: u64,
    /// What the prefix index predicted for the primary endpoint, when a prefix match was made:
    /// checked against the cached tokens the model server reports ([`Scheduler::cache_report`]).
    pub cache_prediction: Option<CachePrediction>,
}

impl Outcome {
    /// The chosen endpoints, primary first.
    pub fn endpoints(&self) -> &[EndpointId] {
        &self.cycle.endpoints
    }

    /// The body to send upstream when it differs from `client_body` (the body this outcome was
    /// decided on), with every edit applied in one pass; `None` when it is the client's own.
    pub fn take_body(&mut self, client_body: &[u8]) -> Option<Vec<u8>> {
        let base = self.masked_body.take();
        if self.edits.is_empty() {
            return base;
        }
        let base_ref = base.as_deref().unwrap_or(client_body);
        Some(apply_edits(base_ref, &mut self.edits))
    }
}

/// A request the EPP answers itself.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub refusal: Refusal,
    /// A reservation made before the refusal: its tokens go back.
    pub reservation: Option<BudgetReservation>,
    /// The model the client asked for.
    pub model: String,
    /// The model it would have been served as.
    pub target_model: String,
}

/// The result of [`Scheduler::decide`].
#[derive(Debug)]
pub struct Verdict {
    /// What the admission stages did, in order (metrics, logs, reports).
    pub events: Vec<AdmissionEvent>,
    /// Routed, or refused.
    pub result: Result<Outcome, Refused>,
}

/// A request that passed admission, waiting to be placed: at once without flow control, when
/// its flow's turn comes with it.
#[derive(Debug)]
pub struct AdmittedRequest<'a> {
    /// The request as it will be served (parsed again after a guard masked it).
    pub request: Cow<'a, LlmRequest>,
    /// The body `request` was parsed from.
    pub body: Cow<'a, [u8]>,
    /// Whether `body` is a guard's masked copy rather than the client's.
    body_masked: bool,
    /// The model the client asked for.
    pub client_model: String,
    /// The model it will be served as.
    pub target_model: String,
    /// The objective's priority.
    pub priority: i32,
    /// Candidates on the snapshot of admission, and that snapshot's generation: placing on the
    /// same snapshot reuses them, a later one (after a wait in the queue) looks them up again.
    candidates: (Vec<EndpointId>, u64),
    restore: Vec<(Vec<u8>, Vec<u8>)>,
    /// The budget reservation, once made.
    pub reservation: Option<BudgetReservation>,
    /// What the admission stages did.
    pub events: Vec<AdmissionEvent>,
}

impl AdmittedRequest<'_> {
    /// The same request, owning its parts (to wait in a queue that outlives the caller's
    /// buffers: the simulator's).
    pub fn into_owned(self) -> AdmittedRequest<'static> {
        AdmittedRequest {
            request: Cow::Owned(self.request.into_owned()),
            body: Cow::Owned(self.body.into_owned()),
            body_masked: self.body_masked,
            client_model: self.client_model,
            target_model: self.target_model,
            priority: self.priority,
            candidates: self.candidates,
            restore: self.restore,
            reservation: self.reservation,
            events: self.events,
        }
    }

    /// Refuse the admitted request (its reservation goes back with the refusal).
    pub fn refuse(self, refusal: Refusal) -> Verdict {
        Verdict {
            result: Err(Refused {
                target_model: refused_target(&refusal, &self.client_model, &self.target_model),
                refusal,
                reservation: self.reservation,
                model: self.client_model,
            }),
            events: self.events,
        }
    }
}

/// A guard refuses before the target model counts: its refusals are labelled with the requested
/// model on both labels.
fn refused_target(refusal: &Refusal, client_model: &str, target_model: &str) -> String {
    match refusal {
        Refusal::Guard { .. } | Refusal::Unscannable { .. } => client_model.to_owned(),
        _ => target_model.to_owned(),
    }
}

impl Scheduler {
    /// The flow a request of `priority` queues in: its fairness id ([`DEFAULT_FLOW`] without
    /// one). In a band whose fairness is token-weighted, the token budget's tenant comes first
    /// when the gateway named one: the same identity pays and shares.
    pub fn flow_id<'m>(&self, meta: &'m RequestMeta, priority: i32) -> &'m str {
        let token_weighted = self
            .flow
            .as_ref()
            .is_some_and(|f| f.band(priority).fairness == Fairness::TokenWeighted);
        let tenant = meta.tenant.as_deref().filter(|_| token_weighted);
        tenant
            .or(meta.fairness_id.as_deref())
            .filter(|id| !id.is_empty())
            .unwrap_or(DEFAULT_FLOW)
    }

    /// Decide where `request` (parsed from `body`) goes, or why it does not: [`Self::admit`]
    /// then [`Self::place`] on the same snapshot. With flow control the caller goes through
    /// [`Self::admit`], the queue ([`super::flow::FlowQueues`]) and [`Self::place`] itself,
    /// since only it knows how to wait.
    pub async fn decide(
        &self,
        request: &LlmRequest,
        body: &[u8],
        meta: &RequestMeta,
        snapshot: &Snapshot,
        env: &mut DecideEnv<'_>,
    ) -> Verdict {
        match self.admit(request, body, meta, snapshot, env).await {
            Ok(admitted) => self.place(admitted, meta, snapshot, env),
            Err(refused) => refused,
        }
    }

    /// Run the admission stages (guards, budget, and without flow control the saturation gate).
    ///
    /// # Errors
    /// The refusing [`Verdict`].
    pub async fn admit<'a>(
        &self,
        request: &'a LlmRequest,
        body: &'a [u8],
        meta: &'a RequestMeta,
        snapshot: &'a Snapshot,
        env: &mut DecideEnv<'_>,
    ) -> Result<AdmittedRequest<'a>, Verdict> {
        let candidates = candidates(snapshot, meta);
        let priority = meta
            .objective
            .as_deref()
            .and_then(|o| snapshot.objectives.get(o))
            .copied()
            .unwrap_or(0);
        let mut cx = Admission {
            snapshot,
            candidates,
            tenant: meta.tenant.as_deref(),
            now: env.now,
            unix_ms: env.unix_ms,
            request: Cow::Borrowed(request),
            body: Cow::Borrowed(body),
            target_model: meta
                .model_rewrite
                .clone()
                .unwrap_or_else(|| request.model.clone()),
            priority,
            restore: Vec::new(),
            reservation: None,
            events: Vec::new(),
        };
        let mut verdict = Ok(());
        for stage in &self.admission {
            let started = env.timer.filter(|t| t.times_admission()).map(|t| t.start());
            verdict = stage.admit(&mut cx).await;
            if let (Some(t), Some(s)) = (env.timer, started) {
                t.record(ExtensionPoint::Admission, stage.name(), s);
            }
            if verdict.is_err() {
                break;
            }
        }
        let Admission {
            candidates,
            request: served,
            body: served_body,
            target_model,
            restore,
            reservation,
            events,
            ..
        } = cx;
        let admitted = AdmittedRequest {
            body_masked: matches!(served_body, Cow::Owned(_)),
            request: served,
            body: served_body,
            client_model: request.model.clone(),
            target_model,
            priority,
            candidates: (candidates, snapshot.generation),
            restore,
            reservation,
            events,
        };
        match verdict {
            Ok(()) => Ok(admitted),
            Err(refusal) => Err(admitted.refuse(refusal)),
        }
    }

    /// Schedule an admitted request on `snapshot` (the one it was admitted on, or a fresh one
    /// after it waited: late binding) and build the outcome.
    pub fn place(
        &self,
        admitted: AdmittedRequest<'_>,
        meta: &RequestMeta,
        snapshot: &Snapshot,
        env: &mut DecideEnv<'_>,
    ) -> Verdict {
        let AdmittedRequest {
            request: served,
            body: served_body,
            body_masked,
            client_model,
            target_model,
            priority,
            candidates: (candidates, generation),
            restore,
            reservation,
            events,
        } = admitted;
        let candidates = if generation == snapshot.generation {
            candidates
        } else {
            self::candidates(snapshot, meta)
        };
        let refuse = |refusal: Refusal, reservation, events| Verdict {
            events,
            result: Err(Refused {
                target_model: refused_target(&refusal, &client_model, &target_model),
                refusal,
                reservation,
                model: client_model.clone(),
            }),
        };
        // After a wait, the subset hint or the pool may have nothing left to offer.
        if candidates.is_empty() {
            return refuse(Refusal::NoCandidates, reservation, events);
        }
        let ctx = SchedulingContext {
            snapshot,
            request: &served,
            body: &served_body,
            target_model: &target_model,
            now: env.now,
            priority,
        };
        env.scratch.explain = meta.explain.then(Default::default);
        let started = env.timer.map(|t| t.start());
        let timer = env.timer.map(|t| t as &dyn PluginTimer);
        let candidate_count = candidates.len();
        let scheduled = self.schedule(&ctx, candidates, env.scratch, &mut *env.rng, timer);
        if let (Some(t), Some(s), true) = (env.timer, started, scheduled.is_ok()) {
            t.record_cycle(s);
        }
        let cycle = match scheduled {
            Ok(cycle) if cycle.endpoints.is_empty() => {
                return refuse(
                    Refusal::Internal("scheduler returned no endpoint"),
                    reservation,
                    events,
                );
            }
            Ok(cycle) => cycle,
            Err(e) => {
                let refusal = match e {
                    SchedulingError::NoCandidates => Refusal::NoCandidates,
                    other => Refusal::Scheduling(other),
                };
                return refuse(refusal, reservation, events);
            }
        };
        let served = served.into_owned();
        let cache_prediction = predict_cache(&served, &cycle, snapshot);
        let prefill_tokens = cache_prediction.map_or(served.estimated_prompt_tokens(), |p| {
            p.prompt_tokens.saturating_sub(p.held_tokens)
        });
        let fallback = reservation.as_ref().and_then(|r| r.admitted.fallback.as_deref());
        let mut edits = Vec::new();
        // Budgets settle from usage: a streaming client that did not ask for it (no
        // `stream_options`, or one without `include_usage: true`) gets it asked for on its
        // behalf, and the extra usage-only event is removed from what it sees.
        let holds_tokens = reservation.as_ref().is_some_and(BudgetReservation::holds_tokens);
        let usage = (holds_tokens && served.stream && !served.include_usage)
            .then(|| usage_edit(&served_body, served.stream_options_span.clone()))
            .flatten();
        let hide_injected_usage = usage.is_some();
        edits.extend(usage);
        let mut restore = restore;
        // A body no parser read (passthrough) has no model to rewrite: upstream forwards it as
        // it came, and so does this.
        if target_model != served.model && !served.model_span.is_empty() {
            edits.push(model_edit(served.model_span.clone(), &target_model));
            // A fallback is reported (x-gateway-model-fallback), not hidden: only rewrites are
            // restored.
            if fallback.is_none() {
                restore.extend(model_patterns(&target_model, &served.model));
            }
        }
        let explanation = env.scratch.explain.take().map(|e| {
            e.render(|id| {
                snapshot
                    .get(id)
                    .map_or_else(String::new, |e| e.address_text.to_string())
            })
        });
        let masked_body = body_masked.then(|| served_body.into_owned());
        Verdict {
            events,
            result: Ok(Outcome {
                load_tokens: served.estimated_load_tokens(),
                prefill_tokens,
                cache_prediction,
                request: served,
                target_model,
                priority,
                masked_body,
                edits,
                response: ResponsePlan {
                    restore,
                    hide_injected_usage,
                    output_guards: self.output_guards.clone(),
                },
                reservation,
                explanation,
                cycle,
                candidates: candidate_count,
            }),
        }
    }
}

/// What the cycle's prefix match says `cycle`'s primary endpoint holds of `request`'s prompt
/// (`None` without a match).
fn predict_cache(request: &LlmRequest, cycle: &Decision, snapshot: &Snapshot) -> Option<CachePrediction> {
    let m = cycle.state.prefix.as_ref()?;
    let e = snapshot.get(*cycle.endpoints.first()?)?;
    let prompt_tokens = request.estimated_prompt_tokens();
    Some(CachePrediction {
        endpoint: e.uid,
        prompt_tokens,
        held_tokens: m.held_tokens(e.uid).min(prompt_tokens),
        block_size_tokens: m.block_size_tokens,
    })
}

impl Scheduler {
    /// Decide where a request without a body goes (e.g. `GET /v1/models`): any candidate
    /// serves, chosen at random; no admission, no scheduling cycle.
    ///
    /// # Errors
    /// [`Refusal::NoPods`] for an empty pool (upstream's 500), [`Refusal::NoCandidates`] for a
    /// subset hint matching none.
    pub fn decide_without_body(
        &self,
        meta: &RequestMeta,
        snapshot: &Snapshot,
        rng: &mut dyn RngCore,
    ) -> Result<EndpointId, Refusal> {
        if snapshot.endpoints.is_empty() {
            return Err(Refusal::NoPods);
        }
        candidates(snapshot, meta)
            .choose(rng)
            .copied()
            .ok_or(Refusal::NoCandidates)
    }
}

/// The candidates of a request: the gateway's subset when it sent one, else the whole pool;
/// then only those of the conformance suite's endpoint selection, when it names any.
fn candidates(snapshot: &Snapshot, meta: &RequestMeta) -> Vec<EndpointId> {
    let mut ids: Vec<EndpointId> = match &meta.subset {
        Some(hint) => subset_candidates(snapshot, hint),
        None => snapshot.all_ids().collect(),
    };
    if let Some(selection) = &meta.endpoint_selection {
        ids.retain(|id| {
            snapshot
                .get(*id)
                .is_some_and(|e| selected(selection, e.spec.address))
        });
    }
    ids
}

/// Whether the conformance suite's `selection` names `address`: an `ip:port` item that
/// address, an `ip` item any port of it (as upstream's test EPP matches them).
fn selected(selection: &[String], address: SocketAddr) -> bool {
    selection.iter().any(|item| {
        let item = item.trim();
        match item.parse::<SocketAddr>() {
            Ok(exact) => exact == address,
            Err(_) => item
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip == address.ip()),
        }
    })
}

/// Candidates allowed by a subset hint: every endpoint on the IP of each entry, as upstream
/// (`requestcontrol/candidates.go` matches by IP only: an entry's port is ignored, so every rank
/// of a named pod is a candidate). Entries that are not `ip:port` or a bare IP select nothing.
pub fn subset_candidates(snapshot: &Snapshot, hint: &[String]) -> Vec<EndpointId> {
    let mut out = Vec::new();
    for entry in hint {
        let ip = match entry.parse::<SocketAddr>() {
            Ok(addr) => Some(addr.ip()),
            Err(_) => entry.trim_matches(|c| c == '[' || c == ']').parse().ok(),
        };
        if let Some(ip) = ip {
            out.extend_from_slice(snapshot.on_ip(ip));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::testing::SnapshotBuilder;

    /// Upstream's rules (reference/protocol.md §5.1): by IP only, the port ignored.
    #[test]
    fn subset_matching_rules() {
        let snap = SnapshotBuilder::new()
            .endpoint("10.0.0.1:8000", |_| {})
            .endpoint("10.0.0.1:8001", |_| {})
            .endpoint("10.0.0.2:8000", |_| {})
            .build();
        let s = |v: &[&str]| subset_candidates(&snap, &v.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(s(&["10.0.0.1:8001"]), vec![EndpointId(0), EndpointId(1)]);
        assert_eq!(s(&["10.0.0.1:9999"]), vec![EndpointId(0), EndpointId(1)]);
        assert_eq!(
            s(&["10.0.0.1:8000", "10.0.0.2:8000"]),
            vec![EndpointId(0), EndpointId(1), EndpointId(2)]
        );
        assert_eq!(s(&["10.0.0.2:8000", "not an address"]), vec![EndpointId(2)]);
        assert_eq!(s(&["10.0.0.2"]), vec![EndpointId(2)]);
        assert!(s(&["192.168.1.1:8080"]).is_empty());
        assert!(s(&[]).is_empty());
    }
}
