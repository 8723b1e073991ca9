//! The immutable view of the pool that each request reads exactly once.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::endpoint::{Endpoint, EndpointId, EndpointUid};
use crate::clock::Timestamp;

/// Everything the request path reads, published whole by the datastore writer.
///
/// Invariants: `endpoints` is sorted by key; `by_ip` and `uids` index exactly `endpoints`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// All endpoints of the pool, sorted by key.
    pub endpoints: Arc<[Endpoint]>,
    by_ip: HashMap<IpAddr, Vec<EndpointId>>,
    uids: Vec<EndpointUid>,
    /// Bumped on every publish.
    pub generation: u64,
    /// Bumped only when endpoints join, leave or change (not on metrics): watchers of the
    /// endpoint set compare it to skip metrics-only publishes.
    pub membership: u64,
    /// When this snapshot was built.
    pub built_at: Timestamp,
    /// Objective priorities by name: the config's `inference-objectives` overridden by the
    /// cluster's `InferenceObjective`s ([`merge_objectives`](super::merge_objectives)); the one
    /// source the decision reads.
    pub objectives: Arc<HashMap<String, i32>>,
    /// Whether discovery has completed its first sync (readiness).
    pub synced: bool,
}

impl Snapshot {
    /// Build a snapshot over `endpoints` (sorted here).
    pub fn new(mut endpoints: Vec<Endpoint>, generation: u64, built_at: Timestamp, synced: bool) -> Self {
        endpoints.sort_by(|a, b| a.spec.key.cmp(&b.spec.key));
        let mut by_ip: HashMap<IpAddr, Vec<EndpointId>> = HashMap::new();
        for (i, e) in endpoints.iter().enumerate() {
            let id = EndpointId(u32::try_from(i).unwrap_or(u32::MAX));
            by_ip.entry(e.spec.address.ip()).or_default().push(id);
        }
        let mut uids: Vec<EndpointUid> = endpoints.iter().map(|e| e.uid).collect();
        uids.sort_unstable();
        Self {
            endpoints: endpoints.into(),
            by_ip,
            uids,
            generation,
            membership: 0,
            objectives: Arc::default(),
            built_at,
            synced,
        }
    }

    /// The endpoint with index `id`.
    pub fn get(&self, id: EndpointId) -> Option<&Endpoint> {
        self.endpoints.get(id.index())
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Every endpoint id, in key order.
    pub fn all_ids(&self) -> impl Iterator<Item = EndpointId> + '_ {
        (0..self.endpoints.len()).map(|i| EndpointId(i as u32))
    }

    /// Endpoints on `ip` (every port of a pod).
    pub fn on_ip(&self, ip: IpAddr) -> &[EndpointId] {
        self.by_ip.get(&ip).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether an endpoint with this stable uid is in the pool.
    pub fn contains_uid(&self, uid: EndpointUid) -> bool {
        self.uids.binary_search(&uid).is_ok()
    }

    /// The endpoint serving exactly `addr`, if any.
    pub fn by_address(&self, addr: SocketAddr) -> Option<EndpointId> {
        self.on_ip(addr.ip())
            .iter()
            .copied()
            .find(|id| self.endpoints[id.index()].spec.address == addr)
    }
}
