//! The scheduler: producers → profile → picked endpoints → pre-request hooks.
//!
//! Pure and synchronous. [`decide`](super::decide) calls [`Scheduler::schedule`] once admission
//! has let a request in, with the snapshot-backed context, the candidate list (the pool,
//! possibly narrowed by the gateway's subset hint), an RNG and optionally a timer.

use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;

use rand::RngCore;

use super::{
    admission::{AdmissionStage, PromptGuard, TokenBudget, saturation_gate::shed_when_saturated},
    flow::FlowControlPolicy,
    plugin::{
        CacheReport, CycleState, DataProducer, ExtensionPoint, Needs, PluginName, PluginTimer, PoolChange,
        PreRequest, SaturationDetector, SchedulingContext,
    },
    profile::{Profile, ProfileError, ScoreRepairs, Scratch},
};
use crate::{
    datastore::ScrapeFailure,
    datastore::{EndpointId, Snapshot},
};

/// Why scheduling failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulingError {
    /// No candidate to start from (empty pool or subset).
    #[error("failed to find endpoint candidates for serving the request")]
    NoCandidates,
    /// A sheddable request (negative priority) met a saturated pool.
    #[error("system saturated, sheddable request dropped")]
    Saturated,
    /// The profile failed (filters removed everything).
    #[error("failed to find target endpoint: failed to run scheduler profile '{profile}': {source}")]
    Profile {
        /// The profile's name.
        profile: Arc<str>,
        /// What went wrong.
        #[source]
        source: ProfileError,
    },
}

/// The outcome of one scheduling cycle.
#[derive(Debug, Default)]
pub struct Decision {
    /// Chosen endpoints, primary first.
    pub endpoints: Vec<EndpointId>,
    /// Data produced during the cycle (e.g. the prefix match), for hooks and metrics.
    pub state: CycleState,
    /// Scores the framework had to repair.
    pub repairs: ScoreRepairs,
}

/// Drop the candidates whose last scrape could not connect, and those never scraped whose
/// scrapes fail, unless none would be left.
///
/// A model server that refuses connections has crashed or is restarting; in a static pool (no
/// readiness probe to take it out) it would otherwise keep its last scraped load and keep winning
/// picks that Envoy can only answer with 503. An endpoint whose page has never been read (it
/// never parses, is too large, times out) has no load at all to show, and its zero queue would
/// otherwise win every pick: it is not scraped, for routing as for admission. Once scraped, a
/// slow or failing scrape (timeout, HTTP status) says nothing about serving, so it keeps its last
/// metrics (aging out for admission). Failing open keeps a pool whose every scrape fails
/// (metrics on another port, a network policy) routable. The endpoint is back as soon as a
/// scrape succeeds.
fn drop_unreachable(snapshot: &Snapshot, candidates: &mut Vec<EndpointId>) {
    let reachable = |id: &EndpointId| {
        snapshot.get(*id).is_none_or(|e| match e.metrics.last_error {
            Some(ScrapeFailure::Connect) => false,
            Some(_) => e.metrics.scraped_at.is_some(),
            None => true,
        })
    };
    if !candidates.iter().all(reachable) && candidates.iter().any(reachable) {
        candidates.retain(reachable);
    }
}

/// The scheduling profile in use and what its plugins need. A config reload swaps it whole
/// ([`Scheduler::reload_profile`]); a decision loads it once, so it runs one profile throughout.
pub(crate) struct ActiveProfile {
    pub(crate) profile: Profile,
    pub(crate) needs: Needs,
}

/// A built scheduler. Cheap to share (`Arc`), used concurrently by every request.
pub struct Scheduler {
    pub(crate) producers: Vec<Arc<dyn DataProducer>>,
    pub(crate) active: ArcSwap<ActiveProfile>,
    pub(crate) pre_request: Vec<Arc<dyn PreRequest>>,
    pub(crate) pool_change: Vec<Arc<dyn PoolChange>>,
    pub(crate) detector: Arc<dyn SaturationDetector>,
    pub(crate) objectives: HashMap<String, i32>,
    /// Admission stages in their documented order (guards, budget, saturation gate).
    pub(crate) admission: Vec<Arc<dyn AdmissionStage>>,
    /// Guards that mask model output.
    pub(crate) output_guards: Vec<Arc<PromptGuard>>,
    /// Where the tenant comes from, when a token budget is configured.
    pub(crate) tenant_source: Option<super::admission::TenantSource>,
    /// The configured token budget (it is also an admission stage).
    pub(crate) budget: Option<Arc<TokenBudget>>,
    /// How request bodies are read.
    pub(crate) parser: RequestParser,
    /// Flow control, when the `flowControl` gate is on.
    pub(crate) flow: Option<Arc<FlowControlPolicy>>,
}

/// The configured request parser (`parser.pluginRef`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestParser {
    /// `openai-parser` (the default): OpenAI-style JSON bodies, the API from the path.
    OpenAi,
    /// `passthrough-parser`: the body is not read (see [`crate::parser::passthrough_request`]).
    Passthrough,
}

impl Scheduler {
    /// Flow control, when the `flowControl` gate is on: requests go through [`Self::admit`],
    /// its queue and [`Self::place`].
    pub fn flow_control(&self) -> Option<&Arc<FlowControlPolicy>> {
        self.flow.as_ref()
    }

    /// Read a request body at `path` with the configured parser.
    ///
    /// # Errors
    /// The OpenAI parser's [`RequestError`](crate::parser::RequestError); the passthrough
    /// parser accepts any body.
    pub fn parse_request(
        &self,
        path: &str,
        body: &[u8],
    ) -> Result<crate::parser::LlmRequest, crate::parser::RequestError> {
        match self.parser {
            RequestParser::OpenAi => crate::parser::parse_request(path, body),
            RequestParser::Passthrough => Ok(crate::parser::passthrough_request(body)),
        }
    }

    /// The profile's name.
    pub fn profile_name(&self) -> Arc<str> {
        self.active.load().profile.name.clone()
    }

    /// Run `next`'s scheduling profile from now on (a config reload whose only change is its
    /// `schedulingProfiles`). Everything else stays this scheduler's: the data producers and
    /// their state (the prefix index), admission (guards, budgets and their counters), flow
    /// control, the parser. Decisions already running finish with the profile they loaded.
    ///
    /// # Errors
    /// The new profile needs an input this scheduler does not produce (a prefix-cache plugin
    /// when the running config built no prefix index): only a restart can add it.
    pub fn reload_profile(&self, next: &Scheduler) -> Result<(), String> {
        let incoming = next.active.load_full();
        if incoming.needs.prefix_match && !self.producers.iter().any(|p| p.produces().prefix_match) {
            return Err(
                "the new profile matches prompt prefixes, but the running config builds no prefix index"
                    .into(),
            );
        }
        self.active.store(incoming);
        Ok(())
    }

    /// The priorities the config declares (`inference-objectives`), which snapshot publishers
    /// merge with the cluster's ([`merge_objectives`](crate::datastore::merge_objectives)).
    pub fn config_objectives(&self) -> &HashMap<String, i32> {
        &self.objectives
    }

    /// Priority of the objective named `objective` (unknown or absent → 0), from the
    /// `inference-objectives` plugin alone.
    pub fn priority_of(&self, objective: Option<&str>) -> i32 {
        objective
            .and_then(|o| self.objectives.get(o))
            .copied()
            .unwrap_or(0)
    }

    /// The header that names the tenant a token budget charges (lower case), if one is
    /// configured: the adapter reads it into [`RequestMeta::tenant`](super::RequestMeta).
    pub fn tenant_header(&self) -> Option<&str> {
        self.tenant_source.as_ref()?.header()
    }

    /// Where the tenant a token budget charges comes from, if one is configured.
    pub fn tenant_source(&self) -> Option<&super::admission::TenantSource> {
        self.tenant_source.as_ref()
    }

    /// Model names the configuration knows (a token budget's per-model layers and fallbacks):
    /// metrics label them as they are, whatever the traffic.
    pub fn known_models(&self) -> Vec<String> {
        self.budget
            .iter()
            .flat_map(|b| b.model_names())
            .map(str::to_owned)
            .collect()
    }

    /// The admission stages, in the order they run.
    pub fn admission_stages(&self) -> impl Iterator<Item = &PluginName> {
        self.admission.iter().map(|s| s.name())
    }

    /// The saturation detector serving admission (and flow control, when on).
    pub fn saturation_detector(&self) -> &PluginName {
        self.detector.name()
    }

    /// Entries and heap bytes of the prefix index, when one is configured.
    pub fn prefix_index_footprint(&self) -> Option<(usize, usize)> {
        self.producers.iter().find_map(|p| p.footprint())
    }

    /// Saturation of `candidates` by the configured detector.
    pub fn saturation(&self, ctx: &SchedulingContext<'_>, candidates: &[EndpointId]) -> f64 {
        self.detector.saturation(ctx.snapshot, ctx.now, candidates)
    }

    /// The saturation gate's check alone: a sheddable request (priority < 0) is refused when
    /// its candidates are saturated; everything else is admitted (no EPP-side queue).
    ///
    /// # Errors
    /// [`SchedulingError::Saturated`].
    pub fn shed_check(
        &self,
        ctx: &SchedulingContext<'_>,
        candidates: &[EndpointId],
    ) -> Result<(), SchedulingError> {
        shed_when_saturated(&*self.detector, ctx, candidates)
    }

    /// Run one cycle over `candidates` (consumed as scratch).
    ///
    /// # Errors
    /// [`SchedulingError`] when there is no candidate or the profile fails.
    pub fn schedule(
        &self,
        ctx: &SchedulingContext<'_>,
        mut candidates: Vec<EndpointId>,
        scratch: &mut Scratch,
        rng: &mut dyn RngCore,
        timer: Option<&dyn PluginTimer>,
    ) -> Result<Decision, SchedulingError> {
        if candidates.is_empty() {
            return Err(SchedulingError::NoCandidates);
        }
        drop_unreachable(ctx.snapshot, &mut candidates);
        let active = self.active.load();
        let mut decision = Decision::default();
        for producer in &self.producers {
            if producer.produces().prefix_match && !active.needs.prefix_match {
                continue;
            }
            let started = timer.map(|t| t.start());
            producer.produce(ctx, &mut decision.state);
            if let (Some(t), Some(s)) = (timer, started) {
                t.record(ExtensionPoint::PrepareData, producer.name(), s);
            }
        }
        decision.repairs = active
            .profile
            .run(
                ctx,
                &decision.state,
                &mut candidates,
                scratch,
                rng,
                timer,
                &mut decision.endpoints,
            )
            .map_err(|source| SchedulingError::Profile {
                profile: active.profile.name.clone(),
                source,
            })?;
        Ok(decision)
    }

    /// Tell the plugins that keep per-endpoint state (the prefix index) that the endpoint set
    /// changed: called off the request path, once per change of `snapshot.membership`.
    pub fn on_pool_change(&self, snapshot: &Snapshot) {
        for plugin in &self.pool_change {
            plugin.on_pool_change(snapshot);
        }
    }

    /// Hand a model server's report of a routed request's cached prompt tokens to the hooks that
    /// recorded the request (the prefix index); returns the index entries they forgot.
    pub fn cache_report(&self, report: &CacheReport) -> usize {
        self.pre_request.iter().map(|h| h.on_cache_report(report)).sum()
    }

    /// Tell the pre-request hooks (e.g. the prefix index insert) where a decided request went.
    /// Kept apart from [`schedule`](Self::schedule) so the server can run it after the answer is
    /// on its way: the decision's latency does not include bookkeeping.
    pub fn pre_request(&self, snapshot: &Snapshot, decision: &Decision, timer: Option<&dyn PluginTimer>) {
        for hook in &self.pre_request {
            let started = timer.map(|t| t.start());
            hook.pre_request(snapshot, &decision.state, &decision.endpoints);
            if let (Some(t), Some(s)) = (timer, started) {
                t.record(ExtensionPoint::PreRequest, hook.name(), s);
            }
        }
    }
}
