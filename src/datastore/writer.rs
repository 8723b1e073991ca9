//! The single writer: applies discovery and metric events, publishes snapshots.
//!
//! Nothing else writes the snapshot. Events arrive on a bounded channel; after each wake-up the
//! writer drains every queued event before publishing once, so a burst of scrapes costs one
//! publish. Scrapers wait when the channel is full (back-pressure, never a dropped removal).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use super::EngineMetrics;
use super::{
    endpoint::{Endpoint, EndpointKey, EndpointLive, EndpointSpec, EndpointUid},
    snapshot::Snapshot,
};
use crate::clock::Clock;

/// Shortest time between two snapshot publishes (metrics coalesce within it).
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(10);

/// Capacity of the event channel.
pub const EVENT_CHANNEL_CAPACITY: usize = 4096;

/// A change to the pool.
#[derive(Debug)]
pub enum DatastoreEvent {
    /// An endpoint appeared or changed.
    Upsert(EndpointSpec),
    /// An endpoint left.
    Remove(EndpointKey),
    /// Replace the whole endpoint set (full resync); absent keys are removed.
    ReplaceAll(Vec<EndpointSpec>),
    /// A scrape finished for the endpoint with this uid.
    Metrics {
        /// Which endpoint.
        uid: EndpointUid,
        /// What was scraped (or the failure, in `last_error`).
        metrics: EngineMetrics,
    },
    /// Discovery reached (or lost) its synced state.
    Synced(bool),
    /// Objective priorities by objective name (replaces the previous set).
    Objectives(HashMap<String, i32>),
}

struct EndpointState {
    uid: EndpointUid,
    address_text: Arc<str>,
    spec: Arc<EndpointSpec>,
    metrics: Arc<EngineMetrics>,
    live: Arc<EndpointLive>,
}

/// Handle to the published snapshot, cheap to clone.
#[derive(Clone)]
pub struct SnapshotReader {
    cell: Arc<ArcSwap<Snapshot>>,
    changed: watch::Receiver<u64>,
}

impl SnapshotReader {
    /// The current snapshot (one atomic load).
    pub fn load(&self) -> Arc<Snapshot> {
        self.cell.load_full()
    }

    /// A receiver that changes whenever a snapshot is published (the generation).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// A reader over a fixed snapshot, for tests and benches.
    pub fn fixed(snapshot: Snapshot) -> Self {
        let (_tx, rx) = watch::channel(snapshot.generation);
        Self {
            cell: Arc::new(ArcSwap::from_pointee(snapshot)),
            changed: rx,
        }
    }
}

/// Objective priorities as the request path reads them: the config's `inference-objectives`,
/// overridden by the cluster's `InferenceObjective`s of the same name. Every snapshot publisher
/// (the writer, the simulator, a fixed test snapshot) merges them with this function, so the
/// decision reads one source.
pub fn merge_objectives(
    config: &HashMap<String, i32>,
    cluster: &HashMap<String, i32>,
) -> HashMap<String, i32> {
    let mut merged = config.clone();
    merged.extend(cluster.iter().map(|(k, v)| (k.clone(), *v)));
    merged
}

/// The writer task's state.
pub struct DatastoreWriter {
    endpoints: BTreeMap<EndpointKey, EndpointState>,
    keys_by_uid: HashMap<EndpointUid, EndpointKey>,
    /// Priorities declared in the config (`inference-objectives`).
    config_objectives: HashMap<String, i32>,
    /// Priorities from the cluster (`InferenceObjective`).
    cluster_objectives: HashMap<String, i32>,
    /// The two merged, as published.
    objectives: Arc<HashMap<String, i32>>,
    membership: u64,
    next_uid: u32,
    generation: u64,
    synced: bool,
    cell: Arc<ArcSwap<Snapshot>>,
    changed: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
}

impl DatastoreWriter {
    /// A writer with an empty, unsynced pool, plus the reader side.
    pub fn new(clock: Arc<dyn Clock>) -> (Self, SnapshotReader) {
        let cell = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let (changed, rx) = watch::channel(0);
        let reader = SnapshotReader {
            cell: cell.clone(),
            changed: rx,
        };
        let writer = Self {
            endpoints: BTreeMap::new(),
            keys_by_uid: HashMap::new(),
            config_objectives: HashMap::new(),
            cluster_objectives: HashMap::new(),
            objectives: Arc::default(),
            membership: 0,
            next_uid: 0,
            generation: 0,
            synced: false,
            cell,
            changed,
            clock,
        };
        (writer, reader)
    }

    /// The writer with the config's objective priorities, which every published snapshot
    /// carries merged with the cluster's ([`merge_objectives`]).
    pub fn with_config_objectives(mut self, config: HashMap<String, i32>) -> Self {
        self.config_objectives = config;
        self.objectives = Arc::new(merge_objectives(
            &self.config_objectives,
            &self.cluster_objectives,
        ));
        self
    }

    /// Apply one event without publishing. Returns whether anything changed.
    pub fn apply(&mut self, event: DatastoreEvent) -> bool {
        match event {
            DatastoreEvent::Upsert(spec) => self.upsert(spec),
            DatastoreEvent::Remove(key) => self.remove(&key),
            DatastoreEvent::ReplaceAll(specs) => {
                let keep: std::collections::BTreeSet<EndpointKey> =
                    specs.iter().map(|s| s.key.clone()).collect();
                let gone: Vec<EndpointKey> = self
                    .endpoints
                    .keys()
                    .filter(|k| !keep.contains(*k))
                    .cloned()
                    .collect();
                let mut changed = false;
                for key in gone {
                    changed |= self.remove(&key);
                }
                for spec in specs {
                    changed |= self.upsert(spec);
                }
                changed
            }
            DatastoreEvent::Metrics { uid, metrics } => {
                let Some(key) = self.keys_by_uid.get(&uid) else {
                    return false; // the endpoint left while its scrape was in flight
                };
                match self.endpoints.get_mut(key) {
                    Some(state) => {
                        let mut metrics = metrics;
                        let previous = &state.metrics.slots;
                        // A failed scrape repeats the last values: no new observation.
                        (metrics.slots, metrics.head) = match metrics.scraped_at {
                            Some(at) if metrics.scraped_at != state.metrics.scraped_at => (
                                previous.with_scrape(&metrics, state.live.answering_requests()),
                                (state.metrics.head).with_scrape(at, metrics.running, &state.live.slots()),
                            ),
                            _ => (*previous, state.metrics.head),
                        };
                        // Each at most once per endpoint: the evidence only grows.
                        match (previous.one_slot(), metrics.slots.one_slot()) {
                            (false, true) => tracing::info!(
                                endpoint = %state.address_text,
                                "endpoint reads as a one-slot server: requests queued behind \
                                 its one running request while it answered"
                            ),
                            (true, false) => tracing::info!(
                                endpoint = %state.address_text,
                                "endpoint reads as batching: two requests ran at once"
                            ),
                            _ => {}
                        }
                        state.metrics = Arc::new(metrics);
                        true
                    }
                    None => false,
                }
            }
            DatastoreEvent::Objectives(objectives) => {
                self.cluster_objectives = objectives;
                let merged = merge_objectives(&self.config_objectives, &self.cluster_objectives);
                let changed = *self.objectives != merged;
                self.objectives = Arc::new(merged);
                changed
            }
            DatastoreEvent::Synced(synced) => {
                let changed = self.synced != synced;
                self.synced = synced;
                changed
            }
        }
    }

    fn remove(&mut self, key: &EndpointKey) -> bool {
        match self.endpoints.remove(key) {
            Some(state) => {
                self.keys_by_uid.remove(&state.uid);
                self.membership += 1;
                true
            }
            None => false,
        }
    }

    fn upsert(&mut self, spec: EndpointSpec) -> bool {
        if let Some(state) = self.endpoints.get_mut(&spec.key) {
            if *state.spec == spec {
                return false;
            }
            // An address change is a different server: its metrics and counters do not carry over.
            if state.spec.address != spec.address {
                self.keys_by_uid.remove(&state.uid);
                state.metrics = Arc::new(EngineMetrics::default());
                state.live = Arc::new(EndpointLive::default());
                state.uid = EndpointUid(self.next_uid);
                state.address_text = format_address(spec.address).into();
                self.keys_by_uid.insert(state.uid, spec.key.clone());
                self.next_uid = self.next_uid.wrapping_add(1);
            }
            state.spec = Arc::new(spec);
            self.membership += 1;
            return true;
        }
        let uid = EndpointUid(self.next_uid);
        self.next_uid = self.next_uid.wrapping_add(1);
        self.keys_by_uid.insert(uid, spec.key.clone());
        self.endpoints.insert(
            spec.key.clone(),
            EndpointState {
                uid,
                address_text: format_address(spec.address).into(),
                spec: Arc::new(spec),
                metrics: Arc::new(EngineMetrics::default()),
                live: Arc::new(EndpointLive::default()),
            },
        );
        self.membership += 1;
        true
    }

    /// Build and publish a snapshot of the current state.
    pub fn publish(&mut self) {
        self.generation += 1;
        let endpoints = self
            .endpoints
            .values()
            .map(|s| Endpoint {
                uid: s.uid,
                address_text: s.address_text.clone(),
                spec: s.spec.clone(),
                metrics: s.metrics.clone(),
                live: s.live.clone(),
            })
            .collect();
        let mut snapshot = Snapshot::new(endpoints, self.generation, self.clock.now(), self.synced);
        snapshot.membership = self.membership;
        snapshot.objectives = self.objectives.clone();
        self.cell.store(Arc::new(snapshot));
        self.changed.send_replace(self.generation);
    }

    /// Run until every sender is dropped: apply events as they come, publishing at most once
    /// per `PUBLISH_INTERVAL` (a round of 100 scrapes costs a handful of publishes, not 100).
    pub async fn run(mut self, mut events: mpsc::Receiver<DatastoreEvent>) {
        let mut last_publish: Option<Instant> = None;
        while let Some(event) = events.recv().await {
            let mut changed = self.apply(event);
            if let Some(due) = last_publish.map(|t| t + PUBLISH_INTERVAL)
                && Instant::now() < due
            {
                let sleep = tokio::time::sleep_until(due);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        () = &mut sleep => break,
                        next = events.recv() => match next {
                            Some(e) => changed |= self.apply(e),
                            None => break,
                        },
                    }
                }
            }
            while let Ok(event) = events.try_recv() {
                changed |= self.apply(event);
            }
            if changed {
                self.publish();
                last_publish = Some(Instant::now());
            }
        }
    }
}

/// `ip:port`, with IPv6 addresses in brackets (what Envoy's ORIGINAL_DST parses).
pub fn format_address(addr: SocketAddr) -> String {
    addr.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MonotonicClock;

    fn spec(name: &str, addr: &str) -> EndpointSpec {
        let address: SocketAddr = addr.parse().unwrap();
        EndpointSpec {
            key: EndpointKey {
                namespace: "ns".into(),
                name: name.into(),
            },
            address,
            labels: Default::default(),
        }
    }

    /// Each new scrape adds to the endpoint's slot evidence, with this EPP's answering requests
    /// on it; a failed scrape (the last values again, same `scraped_at`) adds nothing.
    #[test]
    fn slot_evidence_grows_with_new_scrapes_only() {
        let (mut w, reader) = DatastoreWriter::new(Arc::new(MonotonicClock::new()));
        assert!(w.apply(DatastoreEvent::Upsert(spec("a", "10.0.0.1:8000"))));
        w.publish();
        let snap = reader.load();
        let uid = snap.endpoints[0].uid;
        let mut answering = super::super::InFlight::start(&snap.endpoints[0].live, 10, 10);
        answering.first_byte();
        let scrape = |at: u64| EngineMetrics {
            waiting: 2,
            running: 1,
            scraped_at: Some(crate::clock::Timestamp(at)),
            ..Default::default()
        };
        let slots = |w: &mut DatastoreWriter, at: u64| {
            w.apply(DatastoreEvent::Metrics {
                uid,
                metrics: scrape(at),
            });
            w.publish();
            reader.load().endpoints[0].metrics.slots
        };
        assert_eq!(slots(&mut w, 1).queued_behind_answer, 1);
        let failed = slots(&mut w, 1);
        assert_eq!(failed.queued_behind_answer, 1, "{failed:?}");
        assert!(!failed.one_slot());
        assert!(slots(&mut w, 2).one_slot());
    }

    /// Each new scrape follows the head of the endpoint's prefill queue: a 500-token prompt seen
    /// computing alone at t = 1 s and answered by t = 6 s teaches 100 tokens/s; a failed scrape
    /// (same `scraped_at`) neither times nor restarts anything.
    #[test]
    fn the_prefill_head_is_timed_with_new_scrapes_only() {
        let (mut w, reader) = DatastoreWriter::new(Arc::new(MonotonicClock::new()));
        assert!(w.apply(DatastoreEvent::Upsert(spec("a", "10.0.0.1:8000"))));
        w.publish();
        let snap = reader.load();
        let uid = snap.endpoints[0].uid;
        let live = &snap.endpoints[0].live;
        let second = |s: u64| crate::clock::Timestamp(s * 1_000_000_000);
        let mut head = super::super::InFlight::start(live, 600, 500);
        let scrape = |w: &mut DatastoreWriter, s: u64| {
            w.apply(DatastoreEvent::Metrics {
                uid,
                metrics: EngineMetrics {
                    running: 1,
                    scraped_at: Some(second(s)),
                    ..Default::default()
                },
            });
            w.publish();
            reader.load().endpoints[0].metrics.head
        };
        let computing = scrape(&mut w, 1);
        assert_eq!(scrape(&mut w, 1), computing, "a failed scrape");
        head.first_byte();
        assert_eq!(scrape(&mut w, 1).tokens_per_second(), None, "a failed scrape");
        assert_eq!(scrape(&mut w, 6).tokens_per_second(), Some(100.0));
    }

    #[test]
    fn upsert_remove_and_metrics_publish_sorted_snapshots() {
        let (mut w, reader) = DatastoreWriter::new(Arc::new(MonotonicClock::new()));
        assert!(w.apply(DatastoreEvent::Upsert(spec("b", "10.0.0.2:8000"))));
        assert!(w.apply(DatastoreEvent::Upsert(spec("a", "10.0.0.1:8000"))));
        assert!(!w.apply(DatastoreEvent::Upsert(spec("a", "10.0.0.1:8000"))));
        w.publish();
        let snap = reader.load();
        assert_eq!(snap.len(), 2);
        assert_eq!(&*snap.endpoints[0].spec.key.name, "a");
        let uid_b = snap.endpoints[1].uid;
        let m = EngineMetrics {
            waiting: 7,
            ..Default::default()
        };
        assert!(w.apply(DatastoreEvent::Metrics {
            uid: uid_b,
            metrics: m
        }));
        assert!(w.apply(DatastoreEvent::Remove(EndpointKey {
            namespace: "ns".into(),
            name: "a".into()
        })));
        w.publish();
        let snap = reader.load();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap.endpoints[0].metrics.waiting, 7);
        assert_eq!(snap.generation, 2);
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        assert_eq!(
            format_address("[fd00::1]:8000".parse().unwrap()),
            "[fd00::1]:8000"
        );
        assert_eq!(format_address("10.0.0.1:80".parse().unwrap()), "10.0.0.1:80");
    }

    #[test]
    fn replace_all_drops_absent_keys() {
        let (mut w, reader) = DatastoreWriter::new(Arc::new(MonotonicClock::new()));
        w.apply(DatastoreEvent::Upsert(spec("a", "10.0.0.1:8000")));
        w.apply(DatastoreEvent::Upsert(spec("b", "10.0.0.2:8000")));
        assert!(w.apply(DatastoreEvent::ReplaceAll(vec![spec("b", "10.0.0.2:8000")])));
        w.publish();
        assert_eq!(reader.load().len(), 1);
    }

    #[test]
    fn config_and_cluster_objectives_meet_in_the_snapshot() {
        let (w, reader) = DatastoreWriter::new(Arc::new(MonotonicClock::new()));
        let config = [("batch", -1), ("chat", 2)]
            .map(|(k, v)| (k.to_owned(), v))
            .into();
        let mut w = w.with_config_objectives(config);
        w.publish();
        assert_eq!(reader.load().objectives.get("batch"), Some(&-1));
        // The cluster's objective of the same name wins; the config's others stay.
        let cluster = [("chat", 5), ("new", 1)].map(|(k, v)| (k.to_owned(), v)).into();
        assert!(w.apply(DatastoreEvent::Objectives(cluster)));
        w.publish();
        let want: HashMap<String, i32> = [("batch", -1), ("chat", 5), ("new", 1)]
            .map(|(k, v)| (k.to_owned(), v))
            .into();
        assert_eq!(*reader.load().objectives, want);
        // The cluster's set is replaced whole: a deleted objective falls back to the config.
        assert!(w.apply(DatastoreEvent::Objectives(HashMap::new())));
        w.publish();
        assert_eq!(reader.load().objectives.get("chat"), Some(&2));
    }
}
