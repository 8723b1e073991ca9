//! One model-server endpoint as the request path sees it.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use super::EngineMetrics;

/// Index of an endpoint inside one [`Snapshot`](super::Snapshot). Valid only for that snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId(pub u32);

impl EndpointId {
    /// The index as `usize`.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Identity of an endpoint that is stable across snapshots: assigned once by the datastore writer
/// and never reused, so state kept outside the snapshot (prefix index, in-flight counts) can be
/// keyed by it and purged when it leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointUid(pub u32);

/// Namespaced endpoint name, `<pod>-rank-<i>` for Kubernetes pods.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointKey {
    /// Kubernetes namespace (or `static` for `--endpoints`).
    pub namespace: Arc<str>,
    /// Endpoint name.
    pub name: Arc<str>,
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What discovery knows about an endpoint (no metrics, no live counters).
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    /// Identity.
    pub key: EndpointKey,
    /// Where requests go.
    pub address: SocketAddr,
    /// Pod labels (the engine-type label selects the metric names).
    pub labels: Arc<BTreeMap<String, String>>,
}

/// Per-endpoint in-flight load: the requests this EPP dispatched to the endpoint and has not yet
/// seen finish, and their estimated tokens. These are the `inflight-load-producer`'s signal,
/// exact by construction: each count is taken by an [`InFlight`] and given back exactly once
/// when it drops (response end, error, client disconnect, stream reset), so a request that has
/// finished is never counted. The counters live outside the snapshot so that a request never
/// forces a snapshot rebuild.
#[derive(Debug, Default)]
pub struct EndpointLive {
    in_flight_requests: AtomicU32,
    in_flight_tokens: AtomicU64,
}

impl EndpointLive {
    /// Requests this EPP sent to the endpoint that have not finished.
    pub fn in_flight_requests(&self) -> u32 {
        self.in_flight_requests.load(Ordering::Relaxed)
    }

    /// Estimated tokens of those requests.
    pub fn in_flight_tokens(&self) -> u64 {
        self.in_flight_tokens.load(Ordering::Relaxed)
    }

    /// Count one more request carrying `tokens` estimated tokens.
    pub fn start(&self, tokens: u64) {
        self.in_flight_requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// Release a request counted by [`start`](Self::start). Saturates at zero.
    pub fn finish(&self, tokens: u64) {
        let _ = self
            .in_flight_requests
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
        let _ = self
            .in_flight_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(tokens))
            });
    }
}

/// One request counted on an endpoint's live counters. Released exactly once: when it is
/// dropped (the response ended, the client went away, the stream was reset), or when it is
/// replaced by the count on the endpoint that actually served.
#[derive(Debug)]
pub struct InFlight {
    live: Arc<EndpointLive>,
    tokens: u64,
}

impl InFlight {
    /// Count one request of `tokens` estimated tokens on `live`.
    pub fn start(live: &Arc<EndpointLive>, tokens: u64) -> Self {
        live.start(tokens);
        Self {
            live: live.clone(),
            tokens,
        }
    }

    /// The estimated tokens counted.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.live.finish(self.tokens);
    }
}

/// An endpoint inside a snapshot.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Stable identity across snapshots.
    pub uid: EndpointUid,
    /// Discovery data.
    pub spec: Arc<EndpointSpec>,
    /// `ip:port` (`[v6]:port` for IPv6) as sent in the destination header.
    pub address_text: Arc<str>,
    /// Latest scraped metrics.
    pub metrics: Arc<EngineMetrics>,
    /// Counters changed per request.
    pub live: Arc<EndpointLive>,
}

impl Endpoint {
    /// The endpoint's key.
    pub fn key(&self) -> &EndpointKey {
        &self.spec.key
    }

    /// How old the metrics are at `now`; `None` if never scraped (unknown, not idle).
    pub fn metrics_age(&self, now: crate::clock::Timestamp) -> Option<std::time::Duration> {
        self.metrics.scraped_at.map(|t| now.since(t))
    }

    /// Whether metrics exist and are at most `threshold` old at `now`.
    pub fn is_fresh(&self, now: crate::clock::Timestamp, threshold: std::time::Duration) -> bool {
        self.metrics_age(now).is_some_and(|age| age <= threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_is_released_once_on_drop() {
        let live = Arc::new(EndpointLive::default());
        let a = InFlight::start(&live, 10);
        let b = InFlight::start(&live, 5);
        assert_eq!((live.in_flight_requests(), live.in_flight_tokens()), (2, 15));
        drop(a);
        assert_eq!((live.in_flight_requests(), live.in_flight_tokens()), (1, 5));
        drop(b);
        assert_eq!((live.in_flight_requests(), live.in_flight_tokens()), (0, 0));
    }

    #[test]
    fn live_counters_saturate_at_zero() {
        let live = EndpointLive::default();
        live.start(100);
        live.finish(100);
        live.finish(100);
        assert_eq!(live.in_flight_requests(), 0);
        assert_eq!(live.in_flight_tokens(), 0);
    }
}
