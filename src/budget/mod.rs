//! Budgets in tokens and money: per tenant and per model, over fixed and calendar windows,
//! reserved on arrival and settled with the actual usage.
//!
//! - [`policy`]: the budget as data, windows and estimates (pure).
//! - [`store`]: the [`BudgetStore`] trait and the in-memory store.
//! - [`redis`]: the Redis store shared by replicas (the only I/O in this module).

pub mod policy;
#[cfg(feature = "server")]
pub mod redis;
pub mod store;

pub use policy::{
    BudgetPolicy, Charge, Counter, CounterKey, LayerKey, Limit, ModelBudget, NANOS_PER_UNIT, Period, Prices,
    TenantBudget, Unit, Window, money_text, reset_text,
};
#[cfg(feature = "server")]
pub use redis::RedisStore;
pub use store::{BudgetStore, MemoryStore, Reservation, StoreError};
