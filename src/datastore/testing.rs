//! Builders for snapshots in tests, benches and the simulator.
//!
//! `SnapshotBuilder::new().endpoint("10.0.0.1:8000", |m| { m.waiting = 3; m.kv_usage = Some(0.2) })`

use std::{net::SocketAddr, sync::Arc};

use super::EngineMetrics;
use super::{
    endpoint::{Endpoint, EndpointKey, EndpointLive, EndpointSpec, EndpointUid},
    snapshot::Snapshot,
    writer::format_address,
};
use crate::clock::Timestamp;

/// Builds a [`Snapshot`] endpoint by endpoint. Endpoints are named `pod-<i>` in namespace
/// `default`, with uid `i`, in insertion order (which is also key order for fewer than ten).
#[derive(Default)]
pub struct SnapshotBuilder {
    endpoints: Vec<Endpoint>,
    generation: u64,
}

impl SnapshotBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an endpoint at `address` whose metrics `edit` fills.
    ///
    /// # Panics
    /// If `address` is not `ip:port` (test input only).
    pub fn endpoint(mut self, address: &str, edit: impl FnOnce(&mut EngineMetrics)) -> Self {
        #[expect(
            clippy::unwrap_used,
            reason = "test builder: a bad literal is a bug in the test"
        )]
        let address: SocketAddr = address.parse().unwrap();
        let i = self.endpoints.len();
        let mut metrics = EngineMetrics {
            scraped_at: Some(Timestamp(0)),
            ..Default::default()
        };
        edit(&mut metrics);
        self.endpoints.push(Endpoint {
            uid: EndpointUid(i as u32),
            spec: Arc::new(EndpointSpec {
                key: EndpointKey {
                    namespace: "default".into(),
                    name: format!("pod-{i:04}").into(),
                },
                address,
                labels: Default::default(),
            }),
            address_text: format_address(address).into(),
            metrics: Arc::new(metrics),
            live: Arc::new(EndpointLive::default()),
        });
        self
    }

    /// Set the generation.
    pub fn generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// The snapshot (marked synced).
    pub fn build(self) -> Snapshot {
        Snapshot::new(self.endpoints, self.generation, Timestamp(0), true)
    }
}

/// The upstream hermetic test pods of "select lower queue and kv cache": at 192.168.1.{1,2,3}:8000
/// with (queue, KV) = (3, 0.2), (0, 0.1), (10, 0.2). Queue + KV scoring picks the second.
pub fn hermetic_pods() -> Snapshot {
    SnapshotBuilder::new()
        .endpoint("192.168.1.1:8000", |m| {
            m.waiting = 3;
            m.kv_usage = Some(0.2);
        })
        .endpoint("192.168.1.2:8000", |m| {
            m.waiting = 0;
            m.kv_usage = Some(0.1);
        })
        .endpoint("192.168.1.3:8000", |m| {
            m.waiting = 10;
            m.kv_usage = Some(0.2);
        })
        .build()
}
