//! Built-in scorers.

pub mod kv_cache;
pub mod prefix;
pub mod queue;

pub use kv_cache::KvCacheScorer;
pub use prefix::PrefixCacheScorer;
pub use queue::{QueueScorer, QueueSignal};
