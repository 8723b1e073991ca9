//! Kubernetes: InferencePool discovery, InferenceObjective priorities, leader election and the
//! metrics endpoint's authorization.
//!
//! - [`types`]: the custom resources (v1 pool, legacy v1alpha2 pool, objectives).
//! - [`endpoints`]: pods → endpoints (pure rules).
//! - [`discovery`]: the pool and pod watchers feeding the datastore.
//! - [`objectives`]: objective priorities feeding the datastore.
//! - [`leader`]: Lease-based leader election for HA.
//! - [`metrics_auth`]: TokenReview + SubjectAccessReview for `/metrics` (`--metrics-endpoint-auth`).

pub mod discovery;
pub mod endpoints;
pub mod leader;
pub mod metrics_auth;
pub mod objectives;
pub mod types;
