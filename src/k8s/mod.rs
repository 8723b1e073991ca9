//! Kubernetes: InferencePool discovery, InferenceObjective priorities and leader election.
//!
//! - [`types`]: the custom resources (v1 pool, legacy v1alpha2 pool, objectives).
//! - [`endpoints`]: pods → endpoints (pure rules).
//! - [`discovery`]: the pool and pod watchers feeding the datastore.
//! - [`objectives`]: objective priorities feeding the datastore.
//! - [`leader`]: Lease-based leader election for HA.

pub mod discovery;
pub mod endpoints;
pub mod leader;
pub mod objectives;
pub mod types;
