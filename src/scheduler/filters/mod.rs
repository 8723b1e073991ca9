//! Built-in filters. The saturation detectors double as filters (see `scheduler::saturation`).

pub mod decision_tree;
pub mod legacy;
pub mod prefix_affinity;

pub use decision_tree::DecisionTreeFilter;
pub use legacy::{LeastKvCacheFilter, LeastQueueFilter, LoraAffinityFilter, LowQueueFilter};
pub use prefix_affinity::PrefixAffinityFilter;
