//! One model-server endpoint as the request path sees it.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;

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
    /// Of the in-flight requests, those whose first response byte has not come back yet.
    prefilling_requests: AtomicU32,
    /// Their prompt tokens expected to be computed (not found in the endpoint's cache).
    prefill_tokens: AtomicU64,
    /// The same requests in the order they were sent: which one a one-slot server is computing
    /// (the oldest) and how many tokens it has to compute. Bounded by the in-flight requests.
    prefill_order: Mutex<VecDeque<QueuedPrefill>>,
    /// Sequence numbers handed to this endpoint's requests, in the order they were sent.
    next_seq: AtomicU64,
    /// Requests that got their first response byte so far (only grows).
    answered_total: AtomicU64,
    /// Requests released so far (only grows): a change between two looks means the engine's
    /// slot changed hands.
    finished_total: AtomicU64,
}

/// One request waiting for its first byte on an endpoint, as the endpoint's queue order knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedPrefill {
    /// Its place in the order this EPP sent requests to the endpoint.
    pub seq: u64,
    /// The prompt tokens it was expected to compute there.
    pub tokens: u64,
}

/// The endpoint's live counters at one look, as [`HeadPrefill`](super::HeadPrefill) needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveSlots {
    /// Requests past their first byte, still answering.
    pub answering: u32,
    /// Requests that got their first byte so far.
    pub answered_total: u64,
    /// Requests released so far.
    pub finished_total: u64,
    /// The oldest request still waiting for its first byte.
    pub oldest: Option<QueuedPrefill>,
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
        add(&self.in_flight_requests, &self.in_flight_tokens, tokens);
    }

    /// In-flight requests still waiting for their first response byte: queued or prefilling.
    pub fn prefilling_requests(&self) -> u32 {
        self.prefilling_requests.load(Ordering::Relaxed)
    }

    /// In-flight requests past their first response byte: answering.
    pub fn answering_requests(&self) -> u32 {
        self.in_flight_requests()
            .saturating_sub(self.prefilling_requests())
    }

    /// Prompt tokens those requests were expected to compute on this endpoint: the prefill work
    /// ahead of a request sent now.
    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens.load(Ordering::Relaxed)
    }

    /// The oldest request still waiting for its first byte: the one a one-slot server computes.
    pub fn oldest_prefill(&self) -> Option<QueuedPrefill> {
        self.prefill_order.lock().front().copied()
    }

    /// The counters [`HeadPrefill`](super::HeadPrefill) follows from scrape to scrape.
    pub fn slots(&self) -> LiveSlots {
        LiveSlots {
            answering: self.answering_requests(),
            answered_total: self.answered_total.load(Ordering::Relaxed),
            finished_total: self.finished_total.load(Ordering::Relaxed),
            oldest: self.oldest_prefill(),
        }
    }

    fn start_prefill(&self, tokens: u64) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.prefill_order.lock().push_back(QueuedPrefill { seq, tokens });
        add(&self.prefilling_requests, &self.prefill_tokens, tokens);
        seq
    }

    /// Take a request off the prefilling counts and order; `answered`: its first byte came back
    /// (not: it ended or moved before one).
    fn finish_prefill(&self, seq: u64, tokens: u64, answered: bool) {
        {
            let mut order = self.prefill_order.lock();
            // Usually the front: engines answer in about the order they were sent.
            if let Some(at) = order.iter().position(|q| q.seq == seq) {
                order.remove(at);
            }
        }
        if answered {
            self.answered_total.fetch_add(1, Ordering::Relaxed);
        }
        subtract(&self.prefilling_requests, &self.prefill_tokens, tokens);
    }

    /// Release a request counted by [`start`](Self::start). Saturates at zero.
    pub fn finish(&self, tokens: u64) {
        subtract(&self.in_flight_requests, &self.in_flight_tokens, tokens);
        self.finished_total.fetch_add(1, Ordering::Relaxed);
    }
}

/// Count one request of `tokens` on a (requests, tokens) pair of counters.
fn add(requests: &AtomicU32, counted: &AtomicU64, tokens: u64) {
    requests.fetch_add(1, Ordering::Relaxed);
    counted.fetch_add(tokens, Ordering::Relaxed);
}

/// Take one request of `tokens` off a (requests, tokens) pair of counters, saturating at zero.
fn subtract(requests: &AtomicU32, counted: &AtomicU64, tokens: u64) {
    let _ = requests.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(1))
    });
    let _ = counted.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(tokens))
    });
}

/// One request counted on an endpoint's live counters. Released exactly once: when it is
/// dropped (the response ended, the client went away, the stream was reset), or when it is
/// replaced by the count on the endpoint that actually served.
///
/// Until [`first_byte`](Self::first_byte) it also counts as prefilling, with the prompt tokens
/// it is expected to compute there.
#[derive(Debug)]
pub struct InFlight {
    live: Arc<EndpointLive>,
    tokens: u64,
    /// Prompt tokens counted as prefilling; `None` once the first response byte came back.
    prefill: Option<u64>,
    /// The request's place in its endpoint's prefill order.
    seq: u64,
}

impl InFlight {
    /// Count one request of `tokens` estimated tokens on `live`, prefilling `prefill_tokens`
    /// prompt tokens until its first response byte.
    pub fn start(live: &Arc<EndpointLive>, tokens: u64, prefill_tokens: u64) -> Self {
        live.start(tokens);
        let seq = live.start_prefill(prefill_tokens);
        Self {
            live: live.clone(),
            tokens,
            prefill: Some(prefill_tokens),
            seq,
        }
    }

    /// The same request counted on `live` instead (the endpoint that actually served), in the
    /// same phase.
    pub fn moved_to(&self, live: &Arc<EndpointLive>) -> Self {
        live.start(self.tokens);
        let seq = self.prefill.map_or(0, |p| live.start_prefill(p));
        Self {
            live: live.clone(),
            tokens: self.tokens,
            prefill: self.prefill,
            seq,
        }
    }

    /// The estimated tokens counted.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The first response byte came back: the prompt is computed, the request no longer counts
    /// as prefilling. Idempotent.
    pub fn first_byte(&mut self) {
        self.leave_prefill(true);
    }

    fn leave_prefill(&mut self, answered: bool) {
        if let Some(p) = self.prefill.take() {
            self.live.finish_prefill(self.seq, p, answered);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Ended (or moved) before its first byte, if it still counts as prefilling.
        self.leave_prefill(false);
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
        let mut a = InFlight::start(&live, 10, 4);
        let b = InFlight::start(&live, 5, 3);
        assert_eq!((live.in_flight_requests(), live.in_flight_tokens()), (2, 15));
        assert_eq!((live.prefilling_requests(), live.prefill_tokens()), (2, 7));
        a.first_byte();
        a.first_byte();
        assert_eq!((live.prefilling_requests(), live.prefill_tokens()), (1, 3));
        drop(a);
        assert_eq!((live.in_flight_requests(), live.in_flight_tokens()), (1, 5));
        assert_eq!((live.prefilling_requests(), live.prefill_tokens()), (1, 3));
        assert_eq!((live.slots().answered_total, live.slots().finished_total), (1, 1));
        let other = Arc::new(EndpointLive::default());
        let moved = b.moved_to(&other);
        drop(b);
        assert_eq!((live.in_flight_requests(), live.prefilling_requests()), (0, 0));
        assert_eq!((other.in_flight_tokens(), other.prefill_tokens()), (5, 3));
        drop(moved);
        assert_eq!(
            (live.slots().answered_total, live.slots().finished_total),
            (1, 2),
            "ended before its first byte: released, not answered"
        );
        assert_eq!(other.slots().answered_total, 0);
        assert_eq!(
            (
                other.in_flight_requests(),
                other.in_flight_tokens(),
                other.prefill_tokens()
            ),
            (0, 0, 0)
        );
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
