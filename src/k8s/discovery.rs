//! Watches the pool and its pods and keeps the datastore's endpoint set equal to
//! [`pool_endpoints`] of what it sees.
//!
//! kube-rs watchers list, then watch, resume after disconnects and relist on `410 Gone`. Every
//! change recomputes the whole endpoint set and sends it as one `ReplaceAll` (the writer diffs it
//! and keeps each surviving endpoint's metrics and counters). A selector or port change of the
//! pool restarts the pod watch with the new selector (full resync). Pool deleted → no endpoints
//! and not synced (not ready). Discovery never touches the request path: it only sends events.

use std::{collections::BTreeMap, pin::Pin};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    endpoints::pool_endpoints,
    types::{InferencePool, LEGACY_POOL_GROUP, LegacyInferencePool, PoolShape},
};
use crate::datastore::DatastoreEvent;

/// Which pool to follow.
#[derive(Debug, Clone)]
pub enum PoolSource {
    /// An `InferencePool` (group `inference.networking.k8s.io` → v1, `...x-k8s.io` → v1alpha2).
    Pool {
        /// Pool name.
        name: String,
        /// API group.
        group: String,
    },
    /// Standalone: a label selector and ports instead of the CRD.
    Selector(PoolShape),
}

type PoolStream =
    Pin<Box<dyn Stream<Item = Result<watcher::Event<Option<PoolShape>>, watcher::Error>> + Send>>;
type PodStream = Pin<Box<dyn Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send>>;

fn shape_event<K>(
    e: watcher::Event<K>,
    shape: impl Fn(&K) -> PoolShape,
) -> watcher::Event<Option<PoolShape>> {
    match e {
        watcher::Event::Apply(k) => watcher::Event::Apply(Some(shape(&k))),
        watcher::Event::Delete(k) => watcher::Event::Delete(Some(shape(&k))),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(k) => watcher::Event::InitApply(Some(shape(&k))),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

fn pool_stream(client: &Client, namespace: &str, name: &str, group: &str) -> PoolStream {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    if group == LEGACY_POOL_GROUP {
        let api: Api<LegacyInferencePool> = Api::namespaced(client.clone(), namespace);
        Box::pin(
            watcher(api, config)
                .default_backoff()
                .map(|r| r.map(|e| shape_event(e, |p: &LegacyInferencePool| PoolShape::from(&p.spec)))),
        )
    } else {
        let api: Api<InferencePool> = Api::namespaced(client.clone(), namespace);
        Box::pin(
            watcher(api, config)
                .default_backoff()
                .map(|r| r.map(|e| shape_event(e, |p: &InferencePool| PoolShape::from(&p.spec)))),
        )
    }
}

fn pod_stream(client: &Client, namespace: &str, shape: &PoolShape) -> PodStream {
    let selector = shape
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Box::pin(watcher(api, watcher::Config::default().labels(&selector)).default_backoff())
}

/// State of one discovery loop.
struct Discovery {
    namespace: String,
    shape: Option<PoolShape>,
    pods: BTreeMap<String, Pod>,
    pods_listed: bool,
    events: mpsc::Sender<DatastoreEvent>,
}

impl Discovery {
    async fn publish(&self) -> bool {
        let (specs, synced) = match &self.shape {
            Some(shape) => (
                pool_endpoints(&self.namespace, shape, self.pods.values()),
                self.pods_listed,
            ),
            None => (Vec::new(), false),
        };
        self.events.send(DatastoreEvent::ReplaceAll(specs)).await.is_ok()
            && self.events.send(DatastoreEvent::Synced(synced)).await.is_ok()
    }

    fn on_pod_event(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => {
                self.pods_listed = false;
                self.pods.clear();
            }
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                self.pods.insert(p.name_any(), p);
            }
            watcher::Event::InitDone => self.pods_listed = true,
            watcher::Event::Delete(p) => {
                self.pods.remove(&p.name_any());
            }
        }
    }
}

/// Follow `source` in `namespace` until `cancel`, sending endpoint sets to the datastore.
pub async fn run_discovery(
    client: Client,
    namespace: String,
    source: PoolSource,
    events: mpsc::Sender<DatastoreEvent>,
    cancel: CancellationToken,
) {
    let mut d = Discovery {
        namespace: namespace.clone(),
        shape: None,
        pods: BTreeMap::new(),
        pods_listed: false,
        events,
    };
    let mut pools: PoolStream = match &source {
        PoolSource::Pool { name, group } => pool_stream(&client, &namespace, name, group),
        PoolSource::Selector(shape) => Box::pin(
            futures_util::stream::iter([
                Ok(watcher::Event::Init),
                Ok(watcher::Event::InitApply(Some(shape.clone()))),
                Ok(watcher::Event::InitDone),
            ])
            .chain(futures_util::stream::pending()),
        ),
    };
    let mut pods: Option<PodStream> = None;
    let mut pool_seen_in_list = false;
    loop {
        let pod_next = async {
            match pods.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            ev = pools.next() => {
                let Some(ev) = ev else { return };
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        warn!(error = %e, "InferencePool watch failed; retrying with backoff");
                        continue;
                    }
                };
                let new_shape = match ev {
                    watcher::Event::Init => { pool_seen_in_list = false; continue; }
                    watcher::Event::InitApply(s) | watcher::Event::Apply(s) => { pool_seen_in_list = true; s }
                    watcher::Event::InitDone => if pool_seen_in_list { continue } else { None },
                    watcher::Event::Delete(_) => None,
                };
                if new_shape != d.shape {
                    info!(pool = ?new_shape, "pool changed: resyncing pods");
                    d.pods.clear();
                    d.pods_listed = false;
                    pods = new_shape.as_ref().map(|s| pod_stream(&client, &namespace, s));
                    d.shape = new_shape;
                    if !d.publish().await { return }
                }
            }
            ev = pod_next => {
                match ev {
                    Some(Ok(ev)) => {
                        let batch_end = !matches!(ev, watcher::Event::Init | watcher::Event::InitApply(_));
                        d.on_pod_event(ev);
                        if batch_end && !d.publish().await { return }
                    }
                    Some(Err(e)) => warn!(error = %e, "pod watch failed; retrying"),
                    None => pods = None,
                }
            }
        }
    }
}
