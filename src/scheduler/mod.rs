//! Scheduling: which endpoint serves a request.
//!
//! Pure and synchronous: no I/O, no clock, no global RNG (time, randomness and an optional timer
//! are passed in), so the simulator replays this exact code. Built once from the config through
//! [`registry::build_scheduler`], then shared by every request.
//!
//! - [`decide`]: the decide step, the one place a routing decision is made (admission, then
//!   scheduling, then the outcome); the server and the simulator both call it.
//! - [`admission`]: the stages before scheduling (prompt guards, token budget, saturation gate).
//! - [`flow`]: flow control's queues and dispatch cycle (the `flowControl` gate).
//! - [`plugin`]: the contracts (Filter, Scorer, Picker, DataProducer, PreRequest).
//! - [`profile`]: filters → weighted scorers → picker, with score checks done by the framework.
//! - [`pipeline`]: producers, the profile, pre-request hooks.
//! - [`scorers`], [`pickers`], [`producers`]: built-in plugins under their upstream names;
//!   [`plugin_types`] names every type once, [`registry`] maps each to its builder.

pub mod admission;
pub mod decide;
pub mod filters;
pub mod flow;
pub mod params;
pub mod pickers;
pub mod pipeline;
pub mod plugin;
pub mod plugin_types;
pub mod producers;
pub mod profile;
pub mod registry;
pub mod saturation;
pub mod scorers;

#[cfg(test)]
mod tests;

pub use decide::{
    AdmittedRequest, DecideEnv, Outcome, Refused, RequestMeta, ResponsePlan, Verdict, subset_candidates,
};
pub use pipeline::{Decision, Scheduler, SchedulingError};
pub use plugin::{CycleState, PluginName, SchedulingContext};
pub use profile::{Explanation, Scratch};
pub use registry::build_scheduler;
