//! Token budgets: per tenant and per model, reserved on arrival and settled with the actual usage.
//!
//! - [`policy`]: the budget as data, windows and estimates (pure).
//! - [`store`]: the [`BudgetStore`](store::BudgetStore) trait and the in-memory store.
//! - [`redis`]: the Redis store shared by replicas (the only I/O in this module).

pub mod policy;
pub mod redis;
pub mod store;

pub use policy::{BudgetPolicy, Layer, LayerKey, ModelBudget, TenantBudget, Window, reset_text};
pub use redis::RedisStore;
pub use store::{BudgetStore, MemoryStore, Reservation, StoreError};
