//! Built-in scorers.

pub mod kv_cache;
pub mod lora;
pub mod prefill_backlog;
pub mod prefix;
pub mod queue;
pub mod token_load;

pub use kv_cache::{KvCacheScorer, neutral_mean};
pub use lora::LoraAffinityScorer;
pub use prefill_backlog::{PrefillBacklogParams, PrefillBacklogScorer, RecomputeQueue};
pub use prefix::PrefixCacheScorer;
pub use queue::{QueueScorer, QueueSignal};
pub use token_load::{TokenLoadParams, TokenLoadScorer};
