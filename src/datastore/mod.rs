//! The pool as the request path sees it: endpoints, their metrics, and one published snapshot.
//!
//! Invariants: the request path reads one [`Snapshot`] per request through [`SnapshotReader`];
//! only [`DatastoreWriter`] publishes; per-request counters live in [`EndpointLive`] outside the
//! snapshot so that requests never rebuild it; an [`InFlight`] count is released exactly once,
//! and its place in the endpoint's prefill order with its first byte; the scraped metrics carry
//! what the scrapes so far show of the endpoint ([`SlotEvidence`], [`HeadPrefill`]).

mod endpoint;
mod engine_metrics;
mod head_prefill;
mod snapshot;
pub mod testing;
mod writer;

pub use endpoint::{
    Endpoint, EndpointId, EndpointKey, EndpointLive, EndpointSpec, EndpointUid, InFlight, LiveSlots,
    QueuedPrefill,
};
pub use engine_metrics::{EngineMetrics, LoraState, ONE_SLOT_STREAK, ScrapeFailure, SlotEvidence};
pub use head_prefill::HeadPrefill;
pub use snapshot::Snapshot;
pub use writer::{
    DatastoreEvent, DatastoreWriter, EVENT_CHANNEL_CAPACITY, SnapshotReader, format_address, merge_objectives,
};
