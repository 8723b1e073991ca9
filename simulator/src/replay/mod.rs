//! Deterministic discrete-event replay of a workload through the production scheduler against
//! engine models.
//!
//! Time is integer nanoseconds. Events are ordered by (time, insertion sequence), and arrivals
//! due at the same instant as another event go first, so a run is a pure function of the
//! workload, the setup and the seed. What the EPP sees is what it would see in a cluster:
//! - each pod is scraped every `scrape_interval` (pods staggered across the interval); the
//!   scheduler reads only the last scrape, so its view is as stale as in production;
//! - every request is parsed from real bytes (synthesized text) by the production parser and
//!   decided by the production decide step ([`Scheduler::admit`], then [`Scheduler::place`])
//!   built from an `EndpointPickerConfig`: admission included (prompt guards, token budgets in
//!   memory with windows in logical time, the saturation gate), so a refused request is
//!   reported with its reason;
//! - with flow control, an admitted request waits in the production queue ([`FlowQueues`]):
//!   dispatch cycles run at its arrival, at each scrape and finished request (what saturation
//!   reads changed), one tick after a dispatch and at the next expiry, and the request is placed
//!   on the snapshot of its dispatch; its TTFT counts the wait;
//! - the in-flight hooks are the server's: the pick counts on the endpoint's live counters
//!   (which load scorers add to the scraped queue) until the response ends, and as prefill work
//!   until its first token; the pre-request hooks (prefix index insert) run after each decision;
//!   the engine's cached-token count goes back to the scheduler as a model server's usage does
//!   ([`Scheduler::cache_report`]), at the first token where a server's usage comes with the
//!   response's end (a correction lands a little sooner here); and a budget reservation is
//!   settled with the served usage when the request finishes (cached prompt tokens at the
//!   cached price).

pub mod baselines;
pub mod command;
mod outcome;
pub mod plot;
pub mod report;
pub mod tenants;

pub use outcome::{Outcome, PodTotals, RequestRecord, RunOutcome};

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use epp::{
    clock::Timestamp,
    config::EndpointPickerConfig,
    datastore::{
        Endpoint, EndpointId, EndpointKey, EndpointLive, EndpointSpec, EndpointUid, EngineMetrics,
        HeadPrefill, InFlight, LoraState, SlotEvidence, Snapshot, format_address, merge_objectives,
    },
    parser::usage::Usage,
    scheduler::{
        AdmittedRequest, DecideEnv, Refused, RequestMeta, Scheduler, Scratch, Verdict,
        admission::{BudgetReservation, Refusal},
        build_scheduler,
        flow::{DISPATCH_TICK_NS, FlowQueues, FlowRefusal, NewItem},
        plugin::{CachePrediction, CacheReport},
        plugin_types::TOKEN_BUDGET,
    },
};
use futures_util::FutureExt;
use rand::{SeedableRng, rngs::SmallRng};

use crate::{
    engine::{Engine, EngineEvent, EngineProfile, EngineRequest, MetricsDialect},
    workload::Workload,
};

/// Everything a run needs besides the workload.
#[derive(Debug, Clone)]
pub struct ReplaySetup {
    /// Name of the configuration (reports).
    pub name: String,
    /// The EPP configuration.
    pub config: EndpointPickerConfig,
    /// Identical pods.
    pub pods: usize,
    /// Their engine.
    pub profile: EngineProfile,
    /// Metrics refresh interval, ns (the EPP's `--refresh-metrics-interval`, 50 ms by default).
    pub scrape_interval_ns: u64,
    /// Seed of the scheduler's RNG.
    pub seed: u64,
    /// Wall-clock time of simulated time zero, ms since the Unix epoch: budget windows (a
    /// calendar day in a time zone) read it. 0 starts the run at 1970-01-01T00:00Z.
    pub start_unix_ms: u64,
    /// Who chooses the pod.
    pub placement: Placement,
}

/// Who chooses the pod of an admitted request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Placement {
    /// The scheduler built from the configuration (every policy an EPP can run).
    #[default]
    Scheduler,
    /// The exact-cache oracle: the pod whose engine, in its true state, predicts the lowest
    /// TTFT ([`Engine::predict_ttft_ns`]); ties go to the pod with the fewest requests so far,
    /// then the lowest index. The configuration's admission still runs, and its placement is
    /// computed and then overridden, so hooks and in-flight counts follow the oracle's pod.
    Oracle,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The EPP configuration does not build.
    #[error("configuration {name:?}: {reason}")]
    Config {
        /// Configuration name.
        name: String,
        /// The builder's message.
        reason: String,
    },
    /// Zero pods, or a bad profile.
    #[error("{0}")]
    Setup(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    StepEnd(u32),
    Scrape(u32),
    /// A flow-control dispatch cycle.
    FlowCycle,
}

/// A request waiting in the flow-control queue: what placing it needs.
struct Queued {
    admitted: AdmittedRequest<'static>,
    meta: RequestMeta,
}

struct Pod {
    engine: Engine,
    endpoint: Endpoint,
    pending: Vec<EngineEvent>,
    busy: bool,
    totals: PodTotals,
    load_sum: Vec<(f64, u32)>,
}

struct Sim<'a> {
    setup: &'a ReplaySetup,
    workload: &'a Workload,
    scheduler: Scheduler,
    pods: Vec<Pod>,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    now: u64,
    snapshot: Arc<Snapshot>,
    snapshot_dirty: bool,
    generation: u64,
    /// The config's objective priorities, as the datastore writer publishes them.
    objectives: Arc<HashMap<String, i32>>,
    records: Vec<RequestRecord>,
    /// Per request: its count on the serving pod's live counters, until it finishes.
    in_flight: Vec<Option<InFlight>>,
    /// Per request: its budget reservation, settled when it finishes.
    reservations: Vec<Option<BudgetReservation>>,
    /// Per request: the prefix index's prediction, checked at its first token.
    predictions: Vec<Option<CachePrediction>>,
    outstanding: usize,
    rng: SmallRng,
    scratch: Scratch,
    /// Flow control's queue (the production one), when the config turns it on; payloads are
    /// request indexes.
    flow: Option<FlowQueues<usize>>,
    /// Per queued request index, its admitted state.
    queued: HashMap<usize, Queued>,
    /// The earliest flow cycle already scheduled, if any.
    flow_cycle_at: Option<u64>,
    /// Endpoint ids of the whole pool (flow control's saturation is the pool's).
    pool_ids: Vec<EndpointId>,
}

/// Replay `workload` under `setup`. `on_arrival` is called after each arrival (progress bars).
///
/// # Errors
/// [`ReplayError`] when the configuration or the setup is unusable.
pub fn replay(
    workload: &Workload,
    setup: &ReplaySetup,
    mut on_arrival: impl FnMut(usize),
) -> Result<RunOutcome, ReplayError> {
    if setup.pods == 0 || setup.pods > 65_000 {
        return Err(ReplayError::Setup(format!(
            "pods must be 1..=65000, got {}",
            setup.pods
        )));
    }
    setup.profile.validate().map_err(ReplayError::Setup)?;
    if let Some(path) = remote_budget_store(&setup.config) {
        return Err(ReplayError::Config {
            name: setup.name.clone(),
            reason: format!(
                "{path}.parameters.store.redis: a replay keeps budgets in memory; remove `store` (or set `store: {{memory: {{}}}}`)"
            ),
        });
    }
    let scheduler = build_scheduler(&setup.config).map_err(|e| ReplayError::Config {
        name: setup.name.clone(),
        reason: e.to_string(),
    })?;
    let pods: Vec<Pod> = (0..setup.pods).map(|i| new_pod(i, &setup.profile)).collect();
    let objectives = Arc::new(merge_objectives(scheduler.config_objectives(), &HashMap::new()));
    let mut sim = Sim {
        setup,
        workload,
        scheduler,
        snapshot: Arc::new(Snapshot::new(Vec::new(), 0, Timestamp(0), true)),
        snapshot_dirty: true,
        generation: 0,
        objectives,
        pods,
        queue: BinaryHeap::new(),
        seq: 0,
        now: 0,
        records: Vec::with_capacity(workload.requests.len()),
        in_flight: Vec::with_capacity(workload.requests.len()),
        reservations: Vec::with_capacity(workload.requests.len()),
        predictions: Vec::with_capacity(workload.requests.len()),
        outstanding: 0,
        rng: SmallRng::seed_from_u64(setup.seed),
        scratch: Scratch::default(),
        flow: None,
        queued: HashMap::new(),
        flow_cycle_at: None,
        pool_ids: (0..setup.pods).map(|i| EndpointId(i as u32)).collect(),
    };
    sim.flow = sim.scheduler.flow_control().map(|p| FlowQueues::new(p.clone()));
    let interval = setup.scrape_interval_ns.max(1);
    for p in 0..setup.pods {
        // Staggered phases, as independent per-pod scrape loops would be.
        let phase = interval * p as u64 / setup.pods as u64;
        sim.scrape(p as u32);
        sim.push(phase.max(1), Event::Scrape(p as u32));
    }
    let mut text = String::new();
    let mut body = Vec::new();
    let mut next = 0;
    loop {
        let next_arrival = workload.requests.get(next).map(|r| r.arrival_ns);
        let next_event = sim.queue.peek().map(|Reverse((t, _, _))| *t);
        match (next_arrival, next_event) {
            (Some(a), Some(e)) if a <= e => {
                sim.arrive(next, &mut text, &mut body);
                next += 1;
                on_arrival(next);
            }
            (Some(_), None) => {
                sim.arrive(next, &mut text, &mut body);
                next += 1;
                on_arrival(next);
            }
            (_, Some(_)) => {
                if next_arrival.is_none() && sim.outstanding == 0 && sim.queued.is_empty() {
                    break;
                }
                let Some(Reverse((t, _, event))) = sim.queue.pop() else {
                    break;
                };
                sim.now = t;
                match event {
                    Event::StepEnd(p) => sim.step_end(p),
                    Event::Scrape(p) => {
                        sim.scrape(p);
                        sim.push(t + interval, Event::Scrape(p));
                        // What the queue waits for may have changed.
                        sim.flow_cycle_now();
                    }
                    Event::FlowCycle => {
                        if sim.flow_cycle_at == Some(t) {
                            sim.flow_cycle_at = None;
                        }
                        sim.flow_cycle();
                    }
                }
            }
            (None, None) => break,
        }
    }
    let end_ns = sim.now;
    let pods = sim
        .pods
        .into_iter()
        .map(|mut p| {
            let g = p.engine.gauges();
            p.totals.preemptions = g.preemptions;
            p.totals.lora_loads = g.lora_loads;
            p.totals.load_per_second = p
                .load_sum
                .iter()
                .map(|(sum, n)| if *n == 0 { 0.0 } else { sum / f64::from(*n) })
                .collect();
            p.totals
        })
        .collect();
    Ok(RunOutcome {
        name: setup.name.clone(),
        records: sim.records,
        pods,
        end_ns,
    })
}

/// The config path of a token budget whose store is Redis, if any: a replay runs in logical
/// time with every budget in memory.
fn remote_budget_store(config: &EndpointPickerConfig) -> Option<&str> {
    config
        .plugins
        .iter()
        .find(|p| {
            p.plugin_type == TOKEN_BUDGET && p.parameters.get("store").and_then(|s| s.get("redis")).is_some()
        })
        .map(|p| p.path.as_str())
}

/// What a decision at logical time `now` (ns) may use: the budget windows read the same clock,
/// from the wall-clock time `start_unix_ms` of time zero.
fn logical_env<'a>(
    now: u64,
    start_unix_ms: u64,
    rng: &'a mut SmallRng,
    scratch: &'a mut Scratch,
) -> DecideEnv<'a> {
    DecideEnv {
        now: Timestamp(now),
        unix_ms: start_unix_ms.saturating_add(now / 1_000_000),
        rng,
        timer: None,
        scratch,
    }
}

/// Settle `reservation` with what was served (the in-memory store answers at once); `None`
/// when nothing was.
fn settle(reservation: &BudgetReservation, served: Option<&Usage>) {
    let actual = served.map(|u| reservation.actual(u)).unwrap_or_default();
    let _ = reservation.settle(actual).now_or_never();
}

fn new_pod(i: usize, profile: &EngineProfile) -> Pod {
    let octets = u32::try_from(i).unwrap_or(0) + 1;
    let ip = Ipv4Addr::new(10, 0, (octets >> 8) as u8, (octets & 0xff) as u8);
    let address = SocketAddr::new(IpAddr::V4(ip), 8000);
    Pod {
        engine: Engine::new(profile.clone()),
        endpoint: Endpoint {
            uid: EndpointUid(i as u32),
            spec: Arc::new(EndpointSpec {
                key: EndpointKey {
                    namespace: "sim".into(),
                    name: format!("pod-{i:05}").into(),
                },
                address,
                labels: Arc::default(),
            }),
            address_text: format_address(address).into(),
            metrics: Arc::new(EngineMetrics::default()),
            live: Arc::new(EndpointLive::default()),
        },
        pending: Vec::new(),
        busy: false,
        totals: PodTotals::default(),
        load_sum: Vec::new(),
    }
}

impl Sim<'_> {
    fn push(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, event)));
    }

    /// What a `/metrics` scrape of pod `p` shows now, handed to the EPP's view.
    fn scrape(&mut self, p: u32) {
        let now = self.now;
        let pod = &mut self.pods[p as usize];
        let g = pod.engine.gauges();
        let profile = pod.engine.profile();
        // What the pod's `/metrics` page would show; the EPP's scraper maps llama.cpp's page to
        // queue counts only.
        let vllm = profile.metrics == MetricsDialect::Vllm;
        let mut metrics = EngineMetrics {
            waiting: g.waiting,
            running: g.running,
            kv_usage: vllm.then_some(g.kv_usage),
            lora: vllm.then(|| LoraState {
                running: g.running_adapters.into(),
                waiting: g.waiting_adapters.into(),
                max_active: profile.max_loras,
            }),
            block_size: vllm.then_some(profile.block_size),
            num_gpu_blocks: vllm.then_some(u64::from(profile.num_gpu_blocks)),
            scraped_at: Some(Timestamp(now)),
            last_error: None,
            slots: SlotEvidence::default(),
            head: HeadPrefill::default(),
        };
        let live = &pod.endpoint.live;
        metrics.slots = (pod.endpoint.metrics.slots).with_scrape(&metrics, live.answering_requests());
        metrics.head =
            (pod.endpoint.metrics.head).with_scrape(Timestamp(now), metrics.running, &live.slots());
        pod.endpoint.metrics = Arc::new(metrics);
        let second = (now / 1_000_000_000) as usize;
        if pod.load_sum.len() <= second {
            pod.load_sum.resize(second + 1, (0.0, 0));
        }
        pod.load_sum[second].0 += f64::from(g.running + g.waiting);
        pod.load_sum[second].1 += 1;
        self.snapshot_dirty = true;
    }

    fn current_snapshot(&mut self) -> Arc<Snapshot> {
        if self.snapshot_dirty {
            self.generation += 1;
            let endpoints = self.pods.iter().map(|p| p.endpoint.clone()).collect();
            let mut snapshot = Snapshot::new(endpoints, self.generation, Timestamp(self.now), true);
            snapshot.objectives = self.objectives.clone();
            self.snapshot = Arc::new(snapshot);
            self.snapshot_dirty = false;
        }
        self.snapshot.clone()
    }

    fn arrive(&mut self, index: usize, text: &mut String, body: &mut Vec<u8>) {
        let workload = self.workload;
        let req = &workload.requests[index];
        self.now = self.now.max(req.arrival_ns);
        self.records.push(RequestRecord {
            arrival_ns: req.arrival_ns,
            pod: None,
            first_token_ns: None,
            finish_ns: None,
            prompt_tokens: req.input_tokens,
            output_tokens: 0,
            cached_tokens: 0,
            predicted_cached_tokens: None,
            outcome: Outcome::RejectedByEpp,
            refusal: None,
            dispatched_ns: None,
        });
        self.in_flight.push(None);
        self.reservations.push(None);
        self.predictions.push(None);
        let model = req.adapter.as_deref().unwrap_or(&self.setup.profile.model);
        crate::workload::chat_body(workload, req, model, text, body);
        let Ok(parsed) = self.scheduler.parse_request("/v1/chat/completions", body) else {
            self.records[index].refusal = Some("bad-request");
            return;
        };
        let snapshot = self.current_snapshot();
        // The trace's tenant is the budget's tenant, the fairness id and the objective's name,
        // as a gateway that authenticates tenants would send them: an objective of that name
        // in the config (`inference-objectives`) gives the tenant's priority; none, priority 0.
        let tenant = req.tenant.as_deref().map(str::to_owned);
        let meta = RequestMeta {
            tenant: tenant.clone(),
            fairness_id: tenant.clone(),
            objective: tenant,
            ..RequestMeta::default()
        };
        let mut env = logical_env(
            self.now,
            self.setup.start_unix_ms,
            &mut self.rng,
            &mut self.scratch,
        );
        // The in-memory budget store never waits (a Redis store is refused at setup), so
        // admission completes on its first poll.
        let admitted = self
            .scheduler
            .admit(&parsed, body, &meta, &snapshot, &mut env)
            .now_or_never();
        let admitted = match admitted {
            None => {
                self.records[index].refusal = Some("budget-store");
                return;
            }
            Some(Err(refused)) => return self.finish_refused(index, refused.result.err()),
            Some(Ok(a)) => a,
        };
        let Some(flow) = self.flow.as_mut() else {
            let verdict = self.scheduler.place(admitted, &meta, &snapshot, &mut env);
            return self.start(index, verdict, &snapshot);
        };
        let item = NewItem {
            payload: index,
            fairness_id: self.scheduler.flow_id(&meta, admitted.priority).into(),
            priority: admitted.priority,
            bytes: body.len() as u64,
            tokens: admitted.request.estimated_load_tokens(),
        };
        match flow.enqueue(item, self.now) {
            Ok(_) => {
                let admitted = admitted.into_owned();
                self.queued.insert(index, Queued { admitted, meta });
                self.flow_cycle();
            }
            Err((_, rejection)) => {
                let refusal = Refusal::Flow(FlowRefusal::QueueFull {
                    pool_empty: rejection.pool_empty,
                    retry_after_ms: rejection.retry_after_ms,
                });
                self.finish_refused(index, admitted.refuse(refusal).result.err());
            }
        }
    }

    /// Carry out a decision: the request starts on its pod (counted in flight, the pre-request
    /// hooks run, the engine takes it), or its refusal is recorded.
    fn start(&mut self, index: usize, verdict: Verdict, snapshot: &Snapshot) {
        let mut outcome = match verdict.result {
            Ok(outcome) => outcome,
            Err(refused) => return self.finish_refused(index, Some(refused)),
        };
        if self.setup.placement == Placement::Oracle {
            outcome.cycle.endpoints = vec![self.oracle_pick(index)];
            // The index predicted for the scheduler's pick, not the oracle's.
            outcome.cache_prediction = None;
        }
        self.records[index].dispatched_ns = Some(self.now);
        let Some(primary) = outcome.endpoints().first().and_then(|id| snapshot.get(*id)) else {
            if let Some(r) = &outcome.reservation {
                settle(r, None);
            }
            self.records[index].refusal = Some("internal");
            return;
        };
        let p = primary.uid.0;
        let in_flight = InFlight::start(&primary.live, outcome.load_tokens, outcome.prefill_tokens);
        self.scheduler.pre_request(snapshot, &outcome.cycle, None);
        self.records[index].pod = Some(p);
        let engine_request = self.engine_request(index, p as usize);
        let pod = &mut self.pods[p as usize];
        pod.totals.requests += 1;
        let submitted = pod.engine.submit(engine_request);
        match submitted {
            Ok(()) => {
                self.records[index].outcome = Outcome::Unfinished;
                self.outstanding += 1;
                self.in_flight[index] = Some(in_flight);
                self.reservations[index] = outcome.reservation;
                self.predictions[index] = outcome.cache_prediction;
                self.kick(p);
            }
            Err(_) => {
                // Nothing was served: the count and the reservation go back.
                drop(in_flight);
                if let Some(r) = &outcome.reservation {
                    settle(r, None);
                }
                self.records[index].outcome = Outcome::RejectedByEngine;
            }
        }
    }

    /// The engine request of workload request `index` on pod `p`.
    fn engine_request(&self, index: usize, p: usize) -> EngineRequest {
        let req = &self.workload.requests[index];
        EngineRequest {
            id: index as u64,
            prompt_tokens: req.input_tokens,
            output_tokens: req.output_tokens,
            block_hashes: self
                .workload
                .engine_hashes(req, self.pods[p].engine.profile().block_size),
            adapter: req.adapter.clone(),
        }
    }

    /// The exact-cache oracle's pod for request `index` ([`Placement::Oracle`]).
    fn oracle_pick(&self, index: usize) -> EndpointId {
        // Pods are identical: one block hashing serves them all.
        let request = self.engine_request(index, 0);
        let best = (0..self.pods.len())
            .min_by_key(|&p| {
                let predicted = self.pods[p].engine.predict_ttft_ns(&request);
                (predicted, self.pods[p].totals.requests, p)
            })
            .unwrap_or(0);
        EndpointId(best as u32)
    }

    /// Record a refusal (its reservation's tokens go back).
    fn finish_refused(&mut self, index: usize, refused: Option<Refused>) {
        let Some(refused) = refused else { return };
        if let Some(r) = refused.reservation {
            settle(&r, None);
        }
        self.records[index].refusal = Some(refused.refusal.reason());
    }

    /// A cycle as soon as possible (the current instant), if something is queued.
    fn flow_cycle_now(&mut self) {
        if !self.queued.is_empty() {
            self.flow_cycle();
        }
    }

    /// Schedule a flow cycle at `at` unless one is due no later.
    fn schedule_flow_cycle(&mut self, at: u64) {
        if self.flow_cycle_at.is_some_and(|t| t <= at && t >= self.now) {
            return;
        }
        self.flow_cycle_at = Some(at);
        self.push(at, Event::FlowCycle);
    }

    /// One dispatch cycle, as the server's dispatcher runs it: expire, then release at most one
    /// request if the pool's saturation allows, placed on this instant's snapshot. The next
    /// cycle is due a tick later while requests remain (the server's pace), or at the next
    /// expiry; scrapes and finished requests also run one (what saturation reads changed).
    fn flow_cycle(&mut self) {
        if self.flow.is_none() {
            return;
        }
        let snapshot = self.current_snapshot();
        let Some(flow) = self.flow.as_mut() else { return };
        flow.observe_pool(snapshot.endpoints.is_empty(), self.now);
        let expired = flow.expire(self.now);
        let dispatched = if flow.is_empty() {
            None
        } else {
            let saturation =
                flow.policy()
                    .detector
                    .saturation(&snapshot, Timestamp(self.now), &self.pool_ids);
            flow.dispatch(saturation, self.now)
        };
        let (remaining, next_expiry) = (flow.len(), flow.next_expiry());
        for e in expired {
            let refusal = Refusal::Flow(FlowRefusal::Expired {
                pool_empty: e.pool_empty,
                retry_after_ms: e.retry_after_ms,
            });
            if let Some(q) = self.queued.remove(&e.item.payload) {
                self.finish_refused(e.item.payload, q.admitted.refuse(refusal).result.err());
            }
        }
        if let Some(d) = dispatched
            && let Some(q) = self.queued.remove(&d.payload)
        {
            let mut env = logical_env(
                self.now,
                self.setup.start_unix_ms,
                &mut self.rng,
                &mut self.scratch,
            );
            let verdict = self.scheduler.place(q.admitted, &q.meta, &snapshot, &mut env);
            self.start(d.payload, verdict, &snapshot);
            if remaining > 0 {
                self.schedule_flow_cycle(self.now + DISPATCH_TICK_NS);
            }
        }
        if remaining > 0
            && let Some(at) = next_expiry
        {
            self.schedule_flow_cycle(at.max(self.now + 1));
        }
    }

    /// Start a step on an idle pod that has work.
    fn kick(&mut self, p: u32) {
        let pod = &mut self.pods[p as usize];
        if pod.busy {
            return;
        }
        if let Some(d) = pod.engine.step(&mut pod.pending) {
            pod.busy = true;
            pod.totals.busy_ns += d;
            let at = self.now + d.max(1);
            self.push(at, Event::StepEnd(p));
        }
    }

    fn step_end(&mut self, p: u32) {
        let now = self.now;
        let overhead = (self.setup.profile.arrival_overhead_us * 1_000.0) as u64;
        let pod = &mut self.pods[p as usize];
        pod.busy = false;
        let mut finished = false;
        for event in pod.pending.drain(..) {
            match event {
                EngineEvent::FirstToken { id, cached_tokens } => {
                    let predicted = self.predictions.get_mut(id as usize).and_then(Option::take);
                    if let Some(r) = self.records.get_mut(id as usize) {
                        r.first_token_ns = Some(now + overhead);
                        r.cached_tokens = cached_tokens;
                        // The usage a model server reports, checked against the prediction.
                        if let Some(predicted) = predicted {
                            let report = CacheReport {
                                predicted,
                                prompt_tokens: u64::from(r.prompt_tokens),
                                cached_tokens: u64::from(cached_tokens),
                            };
                            r.predicted_cached_tokens = Some(report.predicted_tokens() as u32);
                            self.scheduler.cache_report(&report);
                        }
                    }
                    // The first answer bytes leave the pod: no longer prefill work there.
                    if let Some(f) = self.in_flight.get_mut(id as usize).and_then(Option::as_mut) {
                        f.first_byte();
                    }
                }
                EngineEvent::Token { .. } => {}
                EngineEvent::Finished { id, output_tokens } => {
                    let mut usage = None;
                    if let Some(r) = self.records.get_mut(id as usize) {
                        r.finish_ns = Some(now + overhead);
                        r.output_tokens = output_tokens;
                        r.outcome = Outcome::Completed;
                        usage = Some(r.usage());
                    }
                    // The response's usage settles the budget (cached prompt tokens at the
                    // cached price), as the server does at its end.
                    if let Some(r) = self.reservations.get_mut(id as usize).and_then(Option::take) {
                        settle(&r, usage.as_ref());
                    }
                    if let Some(slot) = self.in_flight.get_mut(id as usize) {
                        *slot = None;
                    }
                    self.outstanding = self.outstanding.saturating_sub(1);
                    finished = true;
                }
            }
        }
        self.kick(p);
        // A finished request frees what an in-flight detector counts.
        if finished {
            self.flow_cycle_now();
        }
    }
}
