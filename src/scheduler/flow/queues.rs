//! The queues and the dispatch cycle: every flow-control decision, from time and saturation
//! handed in.
//!
//! Layout: items by sequence number in one map; per band, its flows by fairness id, each an
//! ordered set of `(ordering key, sequence)`; one set of every item by age for expiry. Removing
//! an item (dispatch, expiry, a client gone) is exact and O(log n), so nothing stale lingers and
//! an empty flow is dropped at once.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    ops::Bound,
    sync::Arc,
};

use super::policy::{BandPolicy, Fairness, FlowControlPolicy, Ordering};

/// Names a queued request (to take it out when its client goes away).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(pub u64);

/// A request entering the queue.
#[derive(Debug)]
pub struct NewItem<T> {
    /// What the driver gets back when the request leaves (its waiter, its index).
    pub payload: T,
    /// Fairness id (the flow).
    pub fairness_id: Arc<str>,
    /// Priority (the band).
    pub priority: i32,
    /// Body bytes (capacity).
    pub bytes: u64,
    /// Estimated tokens, prompt + expected output (token-weighted fairness).
    pub tokens: u64,
}

/// Why a request was not queued: a cap would be passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityRejection {
    /// `global` or `band`.
    pub scope: &'static str,
    /// Requests queued in that scope.
    pub queued: u64,
    /// The pool had no endpoint when the queue was last looked at (upstream answers 503).
    pub pool_empty: bool,
    /// Estimated wait before a retry can be queued, ms.
    pub retry_after_ms: u64,
}

/// A request released by a dispatch cycle.
#[derive(Debug)]
pub struct Dispatched<T> {
    /// The driver's payload.
    pub payload: T,
    /// Its flow.
    pub fairness_id: Arc<str>,
    /// Its band.
    pub priority: i32,
    /// Its body bytes.
    pub bytes: u64,
    /// Time it waited, ns.
    pub waited_ns: u64,
}

/// A request that waited past its TTL.
#[derive(Debug)]
pub struct Expired<T> {
    /// The request.
    pub item: Dispatched<T>,
    /// The pool had no endpoint (upstream's "no endpoints are available" variant).
    pub pool_empty: bool,
    /// Estimated wait before a retry is worth it, ms.
    pub retry_after_ms: u64,
}

struct Item<T> {
    payload: T,
    fairness_id: Arc<str>,
    priority: i32,
    bytes: u64,
    tokens: u64,
    enqueued_at: u64,
    key: u64,
}

#[derive(Default)]
struct Flow {
    /// `(ordering key, sequence)`, first = next out.
    queue: BTreeSet<(u64, u64)>,
}

struct Band {
    policy: BandPolicy,
    flows: BTreeMap<Arc<str>, Flow>,
    requests: u64,
    bytes: u64,
    /// Round robin: the flow served last.
    cursor: Option<Arc<str>>,
    /// Token-weighted: the virtual time (start tag of the last dispatch).
    vtime: u64,
    /// Token-weighted: per flow, the virtual time at which its service so far ends.
    service: HashMap<Arc<str>, u64>,
}

/// Token-weighted service records kept beyond the active flows (older ones are forgotten first;
/// a forgotten flow restarts at the band's virtual time, which only costs it its lead).
const MAX_SERVICE_RECORDS: usize = 4_096;

/// Dispatch times kept for the drain-rate estimate.
const DRAIN_WINDOW: usize = 64;

/// Bounds of the `retry-after` estimate, ms.
const RETRY_AFTER_MS: (u64, u64) = (100, 60_000);

/// The queued requests of one pool and the decisions about them.
pub struct FlowQueues<T> {
    policy: Arc<FlowControlPolicy>,
    bands: BTreeMap<i32, Band>,
    items: HashMap<u64, Item<T>>,
    by_age: BTreeSet<(u64, u64)>,
    next_seq: u64,
    bytes: u64,
    pool_empty: bool,
    regime_since: u64,
    drained: VecDeque<u64>,
}

impl<T> FlowQueues<T> {
    /// Empty queues under `policy`.
    pub fn new(policy: Arc<FlowControlPolicy>) -> Self {
        Self {
            policy,
            bands: BTreeMap::new(),
            items: HashMap::new(),
            by_age: BTreeSet::new(),
            next_seq: 0,
            bytes: 0,
            pool_empty: false,
            regime_since: 0,
            drained: VecDeque::with_capacity(DRAIN_WINDOW),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &FlowControlPolicy {
        &self.policy
    }

    /// Queued requests.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Queued bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Queued requests of `priority`'s band.
    pub fn band_len(&self, priority: i32) -> u64 {
        self.bands.get(&priority).map_or(0, |b| b.requests)
    }

    /// Tell the queues whether the pool has endpoints: the TTL in force, and the moment it
    /// started counting, follow the regime.
    pub fn observe_pool(&mut self, pool_empty: bool, now: u64) {
        if pool_empty != self.pool_empty {
            self.pool_empty = pool_empty;
            self.regime_since = now;
        }
    }

    /// Queue a request, or refuse it when a cap would be passed (the payload comes back).
    ///
    /// # Errors
    /// The payload and a [`CapacityRejection`] when the global or the band's cap is reached.
    pub fn enqueue(&mut self, item: NewItem<T>, now: u64) -> Result<Ticket, (T, CapacityRejection)> {
        let p = &self.policy;
        let requests = self.items.len() as u64;
        let over_global = (p.max_requests > 0 && requests + 1 > p.max_requests)
            || (p.max_bytes > 0 && self.bytes.saturating_add(item.bytes) > p.max_bytes);
        if over_global {
            let rejection = self.rejection("global", requests, now);
            return Err((item.payload, rejection));
        }
        let band_policy = p.band(item.priority);
        let band = self.bands.entry(item.priority).or_insert_with(|| Band {
            policy: band_policy,
            flows: BTreeMap::new(),
            requests: 0,
            bytes: 0,
            cursor: None,
            vtime: 0,
            service: HashMap::new(),
        });
        if band.requests + 1 > band.policy.max_requests
            || band.bytes.saturating_add(item.bytes) > band.policy.max_bytes
        {
            let queued = band.requests;
            let rejection = self.rejection("band", queued, now);
            return Err((item.payload, rejection));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let key = match band.policy.ordering {
            Ordering::Fcfs => now,
            Ordering::Edf => match self.policy.ttl_ns {
                0 => u64::MAX,
                ttl => now.saturating_add(ttl),
            },
        };
        band.flows
            .entry(item.fairness_id.clone())
            .or_default()
            .queue
            .insert((key, seq));
        band.requests += 1;
        band.bytes += item.bytes;
        self.bytes += item.bytes;
        self.by_age.insert((now, seq));
        self.items.insert(
            seq,
            Item {
                payload: item.payload,
                fairness_id: item.fairness_id,
                priority: item.priority,
                bytes: item.bytes,
                tokens: item.tokens,
                enqueued_at: now,
                key,
            },
        );
        Ok(Ticket(seq))
    }

    fn rejection(&self, scope: &'static str, queued: u64, now: u64) -> CapacityRejection {
        CapacityRejection {
            scope,
            queued,
            pool_empty: self.pool_empty,
            retry_after_ms: self.retry_after_ms(queued, now),
        }
    }

    /// Take a request out (its client went away); `None` if it already left.
    pub fn remove(&mut self, ticket: Ticket, now: u64) -> Option<Dispatched<T>> {
        self.take(ticket.0, now)
    }

    /// Remove item `seq` from every index.
    fn take(&mut self, seq: u64, now: u64) -> Option<Dispatched<T>> {
        let item = self.items.remove(&seq)?;
        self.by_age.remove(&(item.enqueued_at, seq));
        self.bytes -= item.bytes;
        if let Some(band) = self.bands.get_mut(&item.priority) {
            band.requests -= 1;
            band.bytes -= item.bytes;
            if let Some(flow) = band.flows.get_mut(&item.fairness_id) {
                flow.queue.remove(&(item.key, seq));
                if flow.queue.is_empty() {
                    band.flows.remove(&item.fairness_id);
                }
            }
        }
        Some(Dispatched {
            payload: item.payload,
            fairness_id: item.fairness_id,
            priority: item.priority,
            bytes: item.bytes,
            waited_ns: now.saturating_sub(item.enqueued_at),
        })
    }

    /// One dispatch cycle at `saturation` of the whole pool: at most one request leaves, from
    /// the highest non-empty band, unless that band's ceiling is reached, which stops the cycle.
    pub fn dispatch(&mut self, saturation: f64, now: u64) -> Option<Dispatched<T>> {
        let (priority, band) = self.bands.iter_mut().rev().find(|(_, b)| b.requests > 0)?;
        // Strict priority: a blocked band blocks every band below it.
        if saturation >= self.policy.ceiling(*priority) {
            return None;
        }
        let seq = match band.policy.fairness {
            Fairness::GlobalStrict => band.flows.values().filter_map(|f| f.queue.first()).min()?.1,
            Fairness::RoundRobin => {
                let next = match &band.cursor {
                    Some(last) => band
                        .flows
                        .range::<Arc<str>, _>((Bound::Excluded(last), Bound::Unbounded))
                        .next()
                        .or_else(|| band.flows.iter().next()),
                    None => band.flows.iter().next(),
                };
                let (id, flow) = next?;
                let seq = flow.queue.first()?.1;
                band.cursor = Some(id.clone());
                seq
            }
            Fairness::TokenWeighted => {
                let vtime = band.vtime;
                let (start, head, id) = band
                    .flows
                    .iter()
                    .filter_map(|(id, f)| {
                        let start = band.service.get(id).copied().unwrap_or(0).max(vtime);
                        Some((start, *f.queue.first()?, id))
                    })
                    .min()?;
                let tokens = self.items.get(&head.1).map_or(0, |i| i.tokens);
                band.vtime = start;
                band.service.insert(id.clone(), start.saturating_add(tokens));
                if band.service.len() > band.flows.len() + MAX_SERVICE_RECORDS {
                    let flows = &band.flows;
                    band.service
                        .retain(|id, end| *end > start || flows.contains_key(id));
                    if band.service.len() > flows.len() + MAX_SERVICE_RECORDS {
                        band.service.retain(|id, _| flows.contains_key(id));
                    }
                }
                head.1
            }
        };
        let out = self.take(seq, now)?;
        if self.drained.len() == DRAIN_WINDOW {
            self.drained.pop_front();
        }
        self.drained.push_back(now);
        Some(out)
    }

    /// When the oldest request expires, ns; `None` with nothing queued or no TTL.
    pub fn next_expiry(&self) -> Option<u64> {
        let ttl = self.policy.ttl_ns(self.pool_empty);
        if ttl == 0 {
            return None;
        }
        let (enqueued, _) = self.by_age.first()?;
        Some((*enqueued).max(self.regime_since).saturating_add(ttl))
    }

    /// Take out every request whose TTL has passed at `now`, oldest first.
    pub fn expire(&mut self, now: u64) -> Vec<Expired<T>> {
        let mut out = Vec::new();
        while let Some(at) = self.next_expiry() {
            if at > now {
                break;
            }
            let Some(&(_, seq)) = self.by_age.first() else {
                break;
            };
            let Some(item) = self.take(seq, now) else { break };
            let left = self.band_len(item.priority);
            out.push(Expired {
                retry_after_ms: self.retry_after_ms(left, now),
                pool_empty: self.pool_empty,
                item,
            });
        }
        out
    }

    /// Take out everything (the driver is stopping), oldest first.
    pub fn drain(&mut self, now: u64) -> Vec<Dispatched<T>> {
        let all: Vec<u64> = self.by_age.iter().map(|(_, seq)| *seq).collect();
        all.into_iter().filter_map(|seq| self.take(seq, now)).collect()
    }

    /// How long until `ahead` requests have drained at the rate requests left recently, ms
    /// (bounded to 0.1–60 s); with nothing drained yet, the TTL (or the upper bound).
    pub fn retry_after_ms(&self, ahead: u64, now: u64) -> u64 {
        let (low, high) = RETRY_AFTER_MS;
        let Some(&oldest) = self.drained.front() else {
            let ttl_ms = self.policy.ttl_ns(self.pool_empty) / 1_000_000;
            return if ttl_ms == 0 {
                high
            } else {
                ttl_ms.clamp(low, high)
            };
        };
        // Rate over the window up to now, so a queue that stopped draining reads as slow.
        let span_ms = (now.saturating_sub(oldest) / 1_000_000).max(1);
        let drained = self.drained.len() as u64;
        (ahead.max(1).saturating_mul(span_ms) / drained).clamp(low, high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::saturation::UtilizationDetector;

    const MS: u64 = 1_000_000;

    fn policy(fairness: Fairness, ordering: Ordering) -> FlowControlPolicy {
        let band = BandPolicy {
            max_bytes: 1_000_000_000,
            max_requests: 5_000,
            fairness,
            ordering,
        };
        FlowControlPolicy {
            max_bytes: 0,
            max_requests: 0,
            ttl_ns: 60_000 * MS,
            no_endpoint_ttl_ns: 60_000 * MS,
            bands: BTreeMap::new(),
            default_band: band,
            default_negative_band: band,
            ceiling: 1.0,
            detector: Arc::new(UtilizationDetector::default_detector()),
        }
    }

    fn queues(p: FlowControlPolicy) -> FlowQueues<&'static str> {
        FlowQueues::new(Arc::new(p))
    }

    fn push(
        q: &mut FlowQueues<&'static str>,
        name: &'static str,
        flow: &str,
        priority: i32,
        tokens: u64,
        now: u64,
    ) {
        q.enqueue(
            NewItem {
                payload: name,
                fairness_id: flow.into(),
                priority,
                bytes: 10,
                tokens,
            },
            now,
        )
        .map_err(|(_, r)| r)
        .unwrap();
    }

    fn drain(q: &mut FlowQueues<&'static str>, now: u64) -> Vec<&'static str> {
        std::iter::from_fn(|| q.dispatch(0.0, now).map(|d| d.payload)).collect()
    }

    #[test]
    fn global_strict_fcfs_releases_the_oldest_of_the_band_first() {
        let mut q = queues(policy(Fairness::GlobalStrict, Ordering::Fcfs));
        push(&mut q, "a1", "a", 0, 1, 1);
        push(&mut q, "b1", "b", 0, 1, 2);
        push(&mut q, "a2", "a", 0, 1, 3);
        push(&mut q, "b2", "b", 0, 1, 4);
        assert_eq!(drain(&mut q, 10), ["a1", "b1", "a2", "b2"]);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn round_robin_takes_one_per_flow_in_id_order() {
        let mut q = queues(policy(Fairness::RoundRobin, Ordering::Fcfs));
        for (i, name) in ["a1", "a2", "a3"].into_iter().enumerate() {
            push(&mut q, name, "a", 0, 1, i as u64);
        }
        push(&mut q, "c1", "c", 0, 1, 10);
        push(&mut q, "b1", "b", 0, 1, 11);
        push(&mut q, "b2", "b", 0, 1, 12);
        assert_eq!(drain(&mut q, 20), ["a1", "b1", "c1", "a2", "b2", "a3"]);
    }

    #[test]
    fn higher_bands_go_first_and_saturation_blocks_every_band() {
        let mut q = queues(policy(Fairness::GlobalStrict, Ordering::Fcfs));
        push(&mut q, "low", "x", -1, 1, 1);
        push(&mut q, "mid", "x", 0, 1, 2);
        push(&mut q, "high", "y", 5, 1, 3);
        assert!(q.dispatch(1.0, 4).is_none(), "saturated: nothing leaves");
        assert_eq!(q.len(), 3);
        assert_eq!(drain(&mut q, 5), ["high", "mid", "low"]);
    }

    /// One flow sends long prompts, another short ones: token-weighted fairness gives each the
    /// same tokens, where request fairness would give each the same requests.
    #[test]
    fn token_weighted_shares_tokens_not_requests() {
        let mut q = queues(policy(Fairness::TokenWeighted, Ordering::Fcfs));
        for i in 0..4 {
            push(&mut q, "big", "big", 0, 1_000, i);
        }
        for i in 0..40 {
            push(&mut q, "small", "small", 0, 100, 10 + i);
        }
        let first: Vec<_> = (0..22)
            .filter_map(|_| q.dispatch(0.0, 100).map(|d| d.payload))
            .collect();
        let big = first.iter().filter(|p| **p == "big").count();
        assert_eq!((big, first.len() - big), (2, 20), "{first:?}");
        // A flow that arrives late starts at the current virtual time: no banked credit, no debt.
        push(&mut q, "late", "late", 0, 100, 200);
        let next: Vec<_> = (0..3)
            .filter_map(|_| q.dispatch(0.0, 300).map(|d| d.payload))
            .collect();
        assert!(next.contains(&"late"), "{next:?}");
    }

    #[test]
    fn caps_refuse_with_scope_and_leave_the_queue_unchanged() {
        let mut p = policy(Fairness::GlobalStrict, Ordering::Fcfs);
        p.max_requests = 3;
        p.default_band.max_requests = 2;
        let mut q = queues(p);
        push(&mut q, "a", "x", 0, 1, 0);
        push(&mut q, "b", "x", 0, 1, 0);
        let item = |payload| NewItem {
            payload,
            fairness_id: "x".into(),
            priority: 0,
            bytes: 10,
            tokens: 1,
        };
        let (back, r) = q.enqueue(item("c"), 1).unwrap_err();
        assert_eq!((back, r.scope, r.queued), ("c", "band", 2));
        let mut higher = item("d");
        higher.priority = 1;
        q.enqueue(higher, 1).unwrap();
        let (_, r) = q.enqueue(item("e"), 1).unwrap_err();
        assert_eq!((r.scope, r.queued), ("global", 3));
        assert_eq!((q.len(), q.bytes()), (3, 30));
    }

    #[test]
    fn removal_expiry_and_the_empty_pool_regime() {
        let mut p = policy(Fairness::GlobalStrict, Ordering::Fcfs);
        p.ttl_ns = 100 * MS;
        p.no_endpoint_ttl_ns = 10 * MS;
        let mut q = queues(p);
        push(&mut q, "a", "x", 0, 1, 0);
        let t = q
            .enqueue(
                NewItem {
                    payload: "b",
                    fairness_id: "y".into(),
                    priority: 0,
                    bytes: 5,
                    tokens: 1,
                },
                MS,
            )
            .unwrap();
        assert_eq!(
            q.remove(t, 2 * MS).map(|d| (d.payload, d.waited_ns)),
            Some(("b", MS))
        );
        assert!(q.remove(t, 2 * MS).is_none(), "removed once");
        push(&mut q, "c", "x", 0, 1, 50 * MS);
        assert_eq!(q.next_expiry(), Some(100 * MS));
        assert!(q.expire(99 * MS).is_empty());
        let gone = q.expire(100 * MS);
        assert_eq!(gone.iter().map(|e| e.item.payload).collect::<Vec<_>>(), ["a"]);
        assert!(!gone[0].pool_empty);
        // The pool empties at 120 ms: the no-endpoint TTL counts from then.
        q.observe_pool(true, 120 * MS);
        assert_eq!(q.next_expiry(), Some(130 * MS));
        let gone = q.expire(130 * MS);
        assert_eq!(gone.len(), 1);
        assert!(gone[0].pool_empty);
        assert!(q.is_empty());
    }

    #[test]
    fn retry_after_follows_the_drain_rate() {
        let mut q = queues(policy(Fairness::GlobalStrict, Ordering::Fcfs));
        assert_eq!(q.retry_after_ms(10, 0), 60_000, "nothing drained yet: the TTL");
        for i in 0..10 {
            push(&mut q, "x", "f", 0, 1, 0);
            q.dispatch(0.0, i * 10 * MS);
        }
        // 10 left over the 100 ms up to now: one per 10 ms, so 50 ahead wait 500 ms.
        assert_eq!(q.retry_after_ms(50, 100 * MS), 500);
        assert_eq!(q.retry_after_ms(1, 100 * MS), 100, "bounded below");
    }

    #[test]
    fn edf_with_one_ttl_orders_as_fcfs() {
        let mut q = queues(policy(Fairness::GlobalStrict, Ordering::Edf));
        push(&mut q, "a", "x", 0, 1, 5);
        push(&mut q, "b", "y", 0, 1, 6);
        push(&mut q, "c", "x", 0, 1, 7);
        assert_eq!(drain(&mut q, 10), ["a", "b", "c"]);
    }
}
