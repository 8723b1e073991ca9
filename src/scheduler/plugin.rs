//! The plugin contracts: filters, scorers, pickers, data producers and pre-request hooks.
//!
//! Names and score convention follow the upstream EPP so configurations carry over: every scorer
//! writes one value per candidate in [0, 1], 1 best; the profile multiplies by the configured
//! weight. Plugins are `Send + Sync`, take `&self`, and keep any state they own internally.
//! Inputs that are expensive to compute (the prefix match) are produced once per request into
//! [`CycleState`] and only when a configured plugin [`needs`](Scorer::needs) them.

use std::sync::Arc;

use rand::RngCore;

use crate::{
    clock::Timestamp,
    datastore::{EndpointId, EndpointUid, Snapshot},
    parser::LlmRequest,
    prefix::BlockHash,
};

/// Type and instance name of a configured plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginName {
    /// Registered type, e.g. `queue-scorer`.
    pub kind: &'static str,
    /// Instance name from the config (defaults to the type).
    pub name: Arc<str>,
}

/// Inputs a plugin reads beyond the snapshot and request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// The prefix-cache match ([`CycleState::prefix`]).
    pub prefix_match: bool,
}

/// Everything a plugin may read about the request being scheduled.
pub struct SchedulingContext<'a> {
    /// The pool, loaded once for this request.
    pub snapshot: &'a Snapshot,
    /// The parsed request.
    pub request: &'a LlmRequest,
    /// The request body the request was parsed from.
    pub body: &'a [u8],
    /// The model the request will be served as (after rewrites).
    pub target_model: &'a str,
    /// The current time.
    pub now: Timestamp,
    /// Priority of the request's objective (negative = sheddable).
    pub priority: i32,
}

/// Result of the prefix-cache producer for one request.
#[derive(Debug, Clone, Default)]
pub struct PrefixMatch {
    /// The request's chained block hashes.
    pub hashes: Vec<BlockHash>,
    /// Blocks held per endpoint (endpoints holding none are absent).
    pub matched: Vec<(EndpointUid, u32)>,
    /// Block size in tokens used for hashing.
    pub block_size_tokens: u32,
}

impl PrefixMatch {
    /// Blocks of this request `uid` holds.
    pub fn matched_blocks(&self, uid: EndpointUid) -> u32 {
        self.matched
            .iter()
            .find(|(u, _)| *u == uid)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    }

    /// Prompt tokens `uid` holds: its matched blocks times the block size. The match stops at
    /// the producer's `maxPrefixBlocksToMatch`, and what lies past it counts as not held (a
    /// share of the matched blocks would count a long prompt whose first blocks alone were
    /// looked up as entirely cached).
    pub fn held_tokens(&self, uid: EndpointUid) -> u64 {
        u64::from(self.matched_blocks(uid)) * u64::from(self.block_size_tokens)
    }
}

/// Per-request scratch shared between plugins, filled by data producers.
#[derive(Debug, Default)]
pub struct CycleState {
    /// Prefix-cache match, when a configured plugin needs it.
    pub prefix: Option<PrefixMatch>,
}

/// Removes candidates that must not serve the request.
pub trait Filter: Send + Sync {
    /// Identity.
    fn name(&self) -> &PluginName;
    /// Inputs read.
    fn needs(&self) -> Needs {
        Needs::default()
    }
    /// Retain the acceptable candidates in place. `rng` serves probabilistic filters.
    fn filter(
        &self,
        ctx: &SchedulingContext<'_>,
        state: &CycleState,
        candidates: &mut Vec<EndpointId>,
        rng: &mut dyn RngCore,
    );
}

/// Estimates how saturated a set of endpoints is: below 1.0 there is headroom, at or above 1.0
/// the set is saturated (sheddable requests are refused).
pub trait SaturationDetector: Send + Sync {
    /// Identity.
    fn name(&self) -> &PluginName;
    /// Saturation of `candidates` at `now` (1.0 for an empty set). It reads the pool only, not
    /// the request: flow control asks it about the whole pool with no request at hand.
    fn saturation(&self, snapshot: &Snapshot, now: Timestamp, candidates: &[EndpointId]) -> f64;
}

/// Rates candidates.
pub trait Scorer: Send + Sync {
    /// Identity.
    fn name(&self) -> &PluginName;
    /// Inputs read.
    fn needs(&self) -> Needs {
        Needs::default()
    }
    /// Write one score per candidate into `out` (same length, pre-zeroed). Values outside [0, 1]
    /// are clamped and non-finite values count as 0 by the caller.
    fn score(
        &self,
        ctx: &SchedulingContext<'_>,
        state: &CycleState,
        candidates: &[EndpointId],
        out: &mut [f64],
    );
}

/// A candidate with its weighted total score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredEndpoint {
    /// The candidate.
    pub id: EndpointId,
    /// Sum of weighted scores.
    pub score: f64,
}

/// Chooses the endpoint(s) from scored candidates.
pub trait Picker: Send + Sync {
    /// Identity.
    fn name(&self) -> &PluginName;
    /// Push the chosen endpoints, best first, into `out` (empty on entry). `scored` may be
    /// reordered.
    fn pick(&self, scored: &mut [ScoredEndpoint], rng: &mut dyn RngCore, out: &mut Vec<EndpointId>);
}

/// Computes shared per-request inputs before filtering.
pub trait DataProducer: Send + Sync {
    /// Identity.
    fn name(&self) -> &PluginName;
    /// What this producer fills.
    fn produces(&self) -> Needs;
    /// Fill `state` for this request.
    fn produce(&self, ctx: &SchedulingContext<'_>, state: &mut CycleState);
    /// Size of the state this producer keeps, `(entries, heap bytes)`, if it keeps any.
    fn footprint(&self) -> Option<(usize, usize)> {
        None
    }
}

/// Learns the decision once it is made (e.g. the prefix index records where blocks went).
pub trait PreRequest: Send + Sync {
    /// Identity.
    fn name(&self) -> &PluginName;
    /// Called with the chosen endpoints (indices into `snapshot`), primary first.
    fn pre_request(&self, snapshot: &Snapshot, state: &CycleState, picked: &[EndpointId]);
    /// The model server reported how much of a routed request's prompt it found cached; returns
    /// the index entries it forgot as a result. The default ignores the report.
    fn on_cache_report(&self, _report: &CacheReport) -> usize {
        0
    }
}

/// What the prefix index predicted for a routed request's prompt on its endpoint, kept until
/// the model server reports what it found cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePrediction {
    /// The endpoint that served.
    pub endpoint: EndpointUid,
    /// The prompt, in the EPP's estimate (a quarter of its bytes).
    pub prompt_tokens: u64,
    /// Of those, the tokens the index said the endpoint held.
    pub held_tokens: u64,
    /// Tokens per index block.
    pub block_size_tokens: u32,
}

/// A model server's report of a routed request's prompt, next to the prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheReport {
    /// What was predicted at the decision.
    pub predicted: CachePrediction,
    /// Prompt tokens the server counted (`usage.prompt_tokens`).
    pub prompt_tokens: u64,
    /// Of those, the tokens it found cached (`usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: u64,
}

impl CacheReport {
    /// The predicted cached tokens in the server's units: the predicted share of the prompt
    /// times the prompt the server counted.
    pub fn predicted_tokens(&self) -> u64 {
        let p = &self.predicted;
        if p.prompt_tokens == 0 {
            return 0;
        }
        let share = p.held_tokens.min(p.prompt_tokens) as f64 / p.prompt_tokens as f64;
        (share * self.prompt_tokens as f64).round() as u64
    }

    /// Tokens predicted cached that were not, in the EPP's units (0 when the server found at
    /// least what was predicted).
    pub fn missed_tokens(&self) -> u64 {
        if self.prompt_tokens == 0 {
            return 0;
        }
        let found_share = self.cached_tokens.min(self.prompt_tokens) as f64 / self.prompt_tokens as f64;
        let found = (found_share * self.predicted.prompt_tokens as f64) as u64;
        self.predicted
            .held_tokens
            .min(self.predicted.prompt_tokens)
            .saturating_sub(found)
    }
}

/// Learns that the pool's endpoint set changed (a pod joined, left or changed), off the request
/// path: the server calls it from a task that watches the snapshot's `membership`.
pub trait PoolChange: Send + Sync {
    /// Identity.
    fn name(&self) -> &PluginName;
    /// `snapshot` is the first one showing the new endpoint set.
    fn on_pool_change(&self, snapshot: &Snapshot);
}

/// Where in the cycle a plugin ran, for the plugin-duration metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtensionPoint {
    /// Data producer.
    PrepareData,
    /// Filter.
    Filter,
    /// Scorer.
    Scorer,
    /// Picker.
    Picker,
    /// Pre-request hook.
    PreRequest,
    /// Admission stage (guards, budget, saturation gate): traced, not in the upstream
    /// plugin-duration histogram, whose extension points are upstream's.
    Admission,
}

impl ExtensionPoint {
    /// Upstream label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtensionPoint::PrepareData => "PrepareData",
            ExtensionPoint::Filter => "Filter",
            ExtensionPoint::Scorer => "Scorer",
            ExtensionPoint::Picker => "Picker",
            ExtensionPoint::PreRequest => "PreRequest",
            ExtensionPoint::Admission => "Admission",
        }
    }
}

/// Optional observer of plugin run times. The scheduler never reads a clock; the server passes
/// an implementation that does, the simulator passes none.
pub trait PluginTimer {
    /// An opaque start mark.
    fn start(&self) -> u64;
    /// Record the time since `started` for `plugin` at `point`.
    fn record(&self, point: ExtensionPoint, plugin: &PluginName, started: u64);
    /// Record the time since `started` of a whole scheduling cycle (producers, filters,
    /// scorers, picker; admission excluded).
    fn record_cycle(&self, started: u64) {
        let _ = started;
    }
    /// Whether admission stages are timed too (they are only traced: without tracing their
    /// timing would cost each request for nothing).
    fn times_admission(&self) -> bool {
        false
    }
}
