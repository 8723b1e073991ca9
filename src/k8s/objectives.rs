//! Watches `InferenceObjective`s of the pool and publishes their priorities to the datastore.
//!
//! An objective counts when its `poolRef.name` is the pool (and its group, when set, is the
//! pool's group). Clusters without the CRD answer 404: the EPP logs it once and runs with every
//! priority 0, as upstream does without the CRD.

use std::collections::{BTreeMap, HashMap};

use futures_util::StreamExt;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::types::InferenceObjective;
use crate::datastore::DatastoreEvent;

/// Follow the objectives of `pool` (group `pool_group`) in `namespace` until `cancel`.
pub async fn run_objectives(
    client: Client,
    namespace: String,
    pool: String,
    pool_group: String,
    events: mpsc::Sender<DatastoreEvent>,
    cancel: CancellationToken,
) {
    let api: Api<InferenceObjective> = Api::namespaced(client, &namespace);
    let mut stream = Box::pin(watcher(api, watcher::Config::default()).default_backoff());
    let mut all: BTreeMap<String, InferenceObjective> = BTreeMap::new();
    let mut staged: BTreeMap<String, InferenceObjective> = BTreeMap::new();
    let mut warned = false;
    loop {
        let ev = tokio::select! {
            () = cancel.cancelled() => return,
            ev = stream.next() => match ev { Some(ev) => ev, None => return },
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                if !warned {
                    warn!(error = %e, "InferenceObjective watch failed (is the CRD installed?); priorities stay 0 until it works");
                    warned = true;
                }
                continue;
            }
        };
        warned = false;
        match ev {
            watcher::Event::Init => staged.clear(),
            watcher::Event::InitApply(o) => {
                staged.insert(o.name_any(), o);
                continue;
            }
            watcher::Event::InitDone => all = std::mem::take(&mut staged),
            watcher::Event::Apply(o) => {
                all.insert(o.name_any(), o);
            }
            watcher::Event::Delete(o) => {
                all.remove(&o.name_any());
            }
        }
        let priorities: HashMap<String, i32> = all
            .iter()
            .filter(|(_, o)| {
                o.spec.pool_ref.name == pool
                    && o.spec
                        .pool_ref
                        .group
                        .as_deref()
                        .is_none_or(|g| g.is_empty() || g == pool_group)
            })
            .map(|(name, o)| (name.clone(), o.spec.priority.unwrap_or(0)))
            .collect();
        info!(objectives = priorities.len(), "objectives updated");
        if events.send(DatastoreEvent::Objectives(priorities)).await.is_err() {
            return;
        }
    }
}
