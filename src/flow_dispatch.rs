//! The server's flow-control driver: one dispatcher task that runs the dispatch cycles of
//! [`FlowQueues`] against the live pool, and the waiting side each queued request awaits.
//!
//! All decisions are the pure queue's ([`crate::scheduler::flow`]); this module only holds the
//! lock, the clock and the channels. The cycle runs when a request is queued and then every
//! millisecond while anything is queued (upstream's ticker), and sleeps while the queue is
//! empty: no cycle ever spins. Each cycle loads the current snapshot, evicts what expired, and
//! hands at most one request the snapshot it was dispatched on (late binding: it is placed on the
//! metrics that let it go). The next request waits until that one is counted in flight on its
//! endpoint ([`Counting`]), so a detector reading in-flight counts never lets two requests go
//! for one free slot.
//!
//! Invariants: the lock is never held across an await or while a waiter is woken; a queued
//! request leaves exactly once (dispatched, expired, or taken out by its waiter's drop when its
//! client goes away), and its gauges are given back then.

use std::{
    collections::HashSet,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    clock::Clock,
    datastore::{EndpointId, Snapshot, SnapshotReader},
    metrics::{
        exported::EppMetrics,
        labels::{MAX_LABEL_BYTES, OTHER},
    },
    scheduler::flow::{
        DEFAULT_FLOW, DISPATCH_TICK_NS, Dispatched, FlowControlPolicy, FlowQueues, FlowRefusal,
        MAX_FAIRNESS_ID_BYTES, NewItem, Ticket,
    },
};

/// Distinct fairness ids labelled as they are; others are `other` (the ids are client input).
const MAX_FAIRNESS_LABELS: usize = 100;

/// What a waiting request is told.
type Answer = Result<Turn, FlowRefusal>;

/// A queued request's turn: the snapshot that let it go, and the hold that keeps the next
/// request queued until this one is counted.
pub struct Turn {
    /// The snapshot the request was dispatched on.
    pub snapshot: Arc<Snapshot>,
    /// Drop it once the request is counted in flight on its endpoint (or will never be).
    pub counting: Counting,
}

/// Held by a dispatched request until it is counted in flight on its endpoint. While it is
/// held the dispatcher releases nothing else: a saturation detector that reads in-flight counts
/// (`concurrency-detector`) must see each release before it judges the next, or two requests
/// leave for one free slot and reach the pod in either order. Dropped on every path (placed,
/// refused, or its waiter gone before reading it), so the hold never outlives the request.
pub struct Counting {
    _counted: oneshot::Sender<()>,
}

/// The labels a queued request's series carry, fixed at enqueue so that what is added is
/// what is taken away.
#[derive(Clone)]
struct QueueLabels {
    fairness: String,
    priority: String,
    model: String,
    target: String,
}

struct Waiter {
    answer: oneshot::Sender<Answer>,
    labels: QueueLabels,
    bytes: i64,
}

/// A request asking to be queued.
pub struct QueueRequest<'a> {
    /// Its fairness id (from the header; [`DEFAULT_FLOW`] when absent).
    pub fairness_id: &'a str,
    /// Its priority.
    pub priority: i32,
    /// Body bytes.
    pub bytes: u64,
    /// Estimated tokens (prompt + expected output).
    pub tokens: u64,
    /// Model labels (already bounded).
    pub model_label: &'a str,
    /// Target model label (already bounded).
    pub target_label: &'a str,
}

/// The flow controller of one pool.
pub struct FlowDispatcher {
    queues: Mutex<FlowQueues<Waiter>>,
    policy: Arc<FlowControlPolicy>,
    wake: Notify,
    reader: SnapshotReader,
    clock: Arc<dyn Clock>,
    metrics: Arc<EppMetrics>,
    pool: String,
    fairness_labels: Mutex<HashSet<String>>,
    stopped: CancellationToken,
}

impl FlowDispatcher {
    /// A dispatcher for `policy` over the pool `reader` shows; its task runs until `cancel`.
    pub fn start(
        policy: Arc<FlowControlPolicy>,
        reader: SnapshotReader,
        clock: Arc<dyn Clock>,
        metrics: Arc<EppMetrics>,
        pool: String,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let d = Arc::new(Self {
            queues: Mutex::new(FlowQueues::new(policy.clone())),
            policy,
            wake: Notify::new(),
            reader,
            clock,
            metrics,
            pool,
            fairness_labels: Mutex::new(HashSet::new()),
            stopped: cancel.clone(),
        });
        let runner = d.clone();
        tokio::spawn(async move { runner.run(cancel).await });
        d
    }

    /// Queue a request and wait for its turn: the snapshot it was dispatched on, or why it was
    /// not. `client_gone` resolves when nobody will read the answer any more; the request then
    /// leaves the queue at once. Dropping the returned future does the same.
    ///
    /// # Errors
    /// The [`FlowRefusal`].
    pub async fn wait(&self, request: QueueRequest<'_>, client_gone: impl Future<Output = ()>) -> Answer {
        if self.stopped.is_cancelled() {
            return Err(FlowRefusal::ShuttingDown);
        }
        let started = Instant::now();
        let fairness = cut(request.fairness_id);
        let labels = QueueLabels {
            fairness: self.fairness_label(fairness),
            priority: request.priority.to_string(),
            model: request.model_label.to_owned(),
            target: request.target_label.to_owned(),
        };
        let (answer, rx) = oneshot::channel();
        let bytes = i64::try_from(request.bytes).unwrap_or(i64::MAX);
        // Counted before it is queued, so that the dispatcher's decrement never comes first.
        let gauges = labels.clone();
        self.gauges(&gauges, 1, bytes);
        let item = NewItem {
            payload: Waiter {
                answer,
                labels,
                bytes,
            },
            fairness_id: fairness.into(),
            priority: request.priority,
            bytes: request.bytes,
            tokens: request.tokens,
        };
        let now = self.clock.now().0;
        let queued = self.queues.lock().enqueue(item, now);
        let ticket = match queued {
            Ok(ticket) => ticket,
            Err((waiter, rejection)) => {
                self.gauges(&gauges, -1, -bytes);
                let refusal = FlowRefusal::QueueFull {
                    pool_empty: rejection.pool_empty,
                    retry_after_ms: rejection.retry_after_ms,
                };
                self.observe_enqueue(&waiter.labels, refusal.outcome(), started);
                self.observe_left(&waiter.labels, refusal.outcome(), 0);
                return Err(refusal);
            }
        };
        self.observe_enqueue(&gauges, "NotYetFinalized", started);
        self.wake.notify_one();
        let mut leave = Leave {
            dispatcher: self,
            ticket: Some(ticket),
        };
        let answer = tokio::select! {
            answer = rx => answer.unwrap_or(Err(FlowRefusal::ShuttingDown)),
            () = client_gone => Err(FlowRefusal::ClientGone),
        };
        if matches!(answer, Err(FlowRefusal::ClientGone)) {
            leave.now();
        } else {
            // It already left the queue: the dispatcher (or shutdown) answered.
            leave.ticket = None;
        }
        answer
    }

    /// The label of a fairness id, admitting new ones while there is room.
    fn fairness_label(&self, id: &str) -> String {
        let mut known = self.fairness_labels.lock();
        if id.len() > MAX_LABEL_BYTES || id == OTHER {
            return OTHER.into();
        }
        if known.contains(id) {
            return id.to_owned();
        }
        if known.len() < MAX_FAIRNESS_LABELS {
            known.insert(id.to_owned());
            return id.to_owned();
        }
        OTHER.into()
    }

    /// Move the queue gauges of `labels` by `requests` and `bytes`.
    fn gauges(&self, l: &QueueLabels, requests: i64, bytes: i64) {
        let values = [&*l.fairness, &l.priority, &self.pool, &l.model, &l.target];
        self.metrics
            .flow_queue_size
            .with_label_values(&values)
            .add(requests);
        self.metrics
            .flow_queue_bytes
            .with_label_values(&values)
            .add(bytes);
    }

    fn observe_enqueue(&self, labels: &QueueLabels, outcome: &str, started: Instant) {
        self.metrics
            .flow_enqueue_duration
            .with_label_values(&[&labels.fairness, &labels.priority, outcome])
            .observe(started.elapsed().as_secs_f64());
    }

    fn observe_left(&self, labels: &QueueLabels, outcome: &str, waited_ns: u64) {
        self.metrics
            .flow_queue_duration
            .with_label_values(&[
                &labels.fairness,
                &labels.priority,
                outcome,
                &self.pool,
                &labels.model,
                &labels.target,
            ])
            .observe(Duration::from_nanos(waited_ns).as_secs_f64());
    }

    /// A request left the queue: its gauges go down and its wait is recorded.
    fn left(&self, item: &Dispatched<Waiter>, outcome: &str) {
        let l = &item.payload.labels;
        self.gauges(l, -1, -item.payload.bytes);
        self.observe_left(l, outcome, item.waited_ns);
    }

    async fn run(&self, cancel: CancellationToken) {
        let mut ids: Vec<EndpointId> = Vec::new();
        // The last dispatched request's hold, until it is counted (see [`Counting`]).
        let mut uncounted: Option<oneshot::Receiver<()>> = None;
        loop {
            let busy = self.cycle(&mut ids, &mut uncounted);
            let tick = tokio::time::sleep(Duration::from_nanos(DISPATCH_TICK_NS));
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tick, if busy => {}
                () = self.wake.notified() => {}
            }
        }
        // Stopping: everything still queued is told so, once.
        let now = self.clock.now().0;
        let drained = self.queues.lock().drain(now);
        for item in drained {
            self.left(&item, FlowRefusal::ShuttingDown.outcome());
            let _ = item.payload.answer.send(Err(FlowRefusal::ShuttingDown));
        }
    }

    /// One cycle: evict the expired, dispatch at most one (none while the last dispatched
    /// request is not counted yet). Whether anything is still queued.
    fn cycle(&self, ids: &mut Vec<EndpointId>, uncounted: &mut Option<oneshot::Receiver<()>>) -> bool {
        let started = Instant::now();
        let held = uncounted
            .as_mut()
            .is_some_and(|rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        if !held {
            *uncounted = None;
        }
        let snapshot = self.reader.load();
        let now = self.clock.now();
        ids.clear();
        ids.extend(snapshot.all_ids());
        let (expired, dispatched, saturation, busy) = {
            let mut q = self.queues.lock();
            q.observe_pool(snapshot.endpoints.is_empty(), now.0);
            let expired = q.expire(now.0);
            if q.is_empty() {
                (expired, None, None, false)
            } else {
                let saturation = self.policy.detector.saturation(&snapshot, now, ids);
                let dispatched = if held { None } else { q.dispatch(saturation, now.0) };
                (expired, dispatched, Some(saturation), !q.is_empty())
            }
        };
        if let Some(s) = saturation {
            self.metrics
                .flow_pool_saturation
                .with_label_values(&[&self.pool])
                .set(s);
        }
        for e in expired {
            let refusal = FlowRefusal::Expired {
                pool_empty: e.pool_empty,
                retry_after_ms: e.retry_after_ms,
            };
            self.left(&e.item, refusal.outcome());
            let _ = e.item.payload.answer.send(Err(refusal));
        }
        if let Some(d) = dispatched {
            self.left(&d, "Dispatched");
            let (counted, rx) = oneshot::channel();
            *uncounted = Some(rx);
            // A waiter gone between its drop and its removal simply does not read this; the
            // unsent turn drops its hold with it.
            let _ = d.payload.answer.send(Ok(Turn {
                snapshot,
                counting: Counting { _counted: counted },
            }));
        }
        if saturation.is_some() {
            self.metrics
                .flow_dispatch_cycle
                .observe(started.elapsed().as_secs_f64());
        }
        busy
    }
}

/// Takes a request out of the queue when its waiter stops waiting (its client went away, or
/// the wait was dropped).
struct Leave<'a> {
    dispatcher: &'a FlowDispatcher,
    ticket: Option<Ticket>,
}

impl Leave<'_> {
    fn now(&mut self) {
        let Some(ticket) = self.ticket.take() else { return };
        let d = self.dispatcher;
        let removed = d.queues.lock().remove(ticket, d.clock.now().0);
        if let Some(item) = removed {
            d.left(&item, FlowRefusal::ClientGone.outcome());
        }
    }
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.now();
    }
}

/// A fairness id cut to [`MAX_FAIRNESS_ID_BYTES`] at a character boundary; empty → the default.
fn cut(id: &str) -> &str {
    if id.is_empty() {
        return DEFAULT_FLOW;
    }
    let mut end = id.len().min(MAX_FAIRNESS_ID_BYTES);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}
