//! Scheduling: which endpoint serves a request.
//!
//! Pure and synchronous: no I/O, no clock, no global RNG (time, randomness and an optional timer
//! are passed in), so the simulator replays this exact code. Built once from the config through
//! [`registry::build_scheduler`], then shared by every request.
//!
//! - [`plugin`]: the contracts (Filter, Scorer, Picker, DataProducer, PreRequest).
//! - [`profile`]: filters → weighted scorers → picker, with score checks done by the framework.
//! - [`pipeline`]: producers, the profile, pre-request hooks.
//! - [`scorers`], [`pickers`], [`producers`]: built-in plugins under their upstream names.

pub mod admission;
pub mod filters;
pub mod params;
pub mod pickers;
pub mod pipeline;
pub mod plugin;
pub mod producers;
pub mod profile;
pub mod registry;
pub mod saturation;
pub mod scorers;

#[cfg(test)]
mod tests;

pub use pipeline::{Decision, Scheduler, SchedulingError};
pub use plugin::{CycleState, PluginName, SchedulingContext};
pub use profile::{Explanation, Scratch};
pub use registry::build_scheduler;
