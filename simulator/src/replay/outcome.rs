//! What a replay run records: each request's timeline and outcome, and each pod's totals.

use epp::parser::usage::Usage;

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served to the end.
    Completed,
    /// The EPP refused it (a guard, a budget, no candidate, saturated, filters emptied the
    /// pool); [`RequestRecord::refusal`] says which.
    RejectedByEpp,
    /// The engine refused it (too long for the model or the cache).
    RejectedByEngine,
    /// Still in flight when the run stopped (never happens in a finished run).
    Unfinished,
}

/// The timeline of one request.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord {
    /// Arrival, ns.
    pub arrival_ns: u64,
    /// Pod index it was routed to.
    pub pod: Option<u32>,
    /// First output token, ns.
    pub first_token_ns: Option<u64>,
    /// Last output token, ns.
    pub finish_ns: Option<u64>,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens generated.
    pub output_tokens: u32,
    /// Prompt tokens served from the engine's prefix cache at admission.
    pub cached_tokens: u32,
    /// Prompt tokens the EPP's prefix index predicted cached on the chosen pod (in the engine's
    /// count), when the configuration matches prefixes.
    pub predicted_cached_tokens: Option<u32>,
    /// How it ended.
    pub outcome: Outcome,
    /// Why the EPP refused it ([`Refusal::reason`](epp::scheduler::admission::Refusal::reason):
    /// `guard`, `budget`, `saturated`, `queue-full`, `queue-timeout`, …), when it did.
    pub refusal: Option<&'static str>,
    /// When the EPP decided where it goes, ns: its arrival, or when it left the flow-control
    /// queue (TTFT counts the wait).
    pub dispatched_ns: Option<u64>,
}

impl RequestRecord {
    /// The usage a model server would report for this request.
    pub(super) fn usage(&self) -> Usage {
        let (prompt, output) = (u64::from(self.prompt_tokens), u64::from(self.output_tokens));
        Usage {
            prompt_tokens: prompt,
            completion_tokens: output,
            total_tokens: prompt + output,
            cached_tokens: Some(u64::from(self.cached_tokens)),
        }
    }
}

/// Per-pod totals of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodTotals {
    /// Requests routed here.
    pub requests: u64,
    /// Time spent in engine steps, ns.
    pub busy_ns: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Adapter loads.
    pub lora_loads: u64,
    /// Mean of (running + waiting) per second of simulated time, as scraped.
    pub load_per_second: Vec<f64>,
}

/// The raw result of one run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Configuration name.
    pub name: String,
    /// One record per workload request, in workload order.
    pub records: Vec<RequestRecord>,
    /// One entry per pod.
    pub pods: Vec<PodTotals>,
    /// When the last event happened, ns.
    pub end_ns: u64,
}
