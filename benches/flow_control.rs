//! Flow control's cost per request: one enqueue plus one dispatch cycle (the queue keeps its
//! size), with 10, 1,000 and 10,000 requests queued across 100 flows, for each fairness policy.
//! The pure queue only ([`FlowQueues`]): the server adds one lock and one task wake-up around it.
//! Target (the flow-control issue): at most 20 µs at 1,000 queued.
//!
//! Run: `cargo bench --bench flow_control`. Results and machine: benches/README.md.

use std::{collections::BTreeMap, hint::black_box, sync::Arc};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use epp::scheduler::{
    flow::{BandPolicy, Fairness, FlowControlPolicy, FlowQueues, NewItem, Ordering},
    saturation::UtilizationDetector,
};

const FLOWS: usize = 100;

fn policy(fairness: Fairness) -> Arc<FlowControlPolicy> {
    let band = BandPolicy {
        max_bytes: u64::MAX,
        max_requests: u64::MAX,
        fairness,
        ordering: Ordering::Fcfs,
    };
    Arc::new(FlowControlPolicy {
        max_bytes: 0,
        max_requests: 0,
        ttl_ns: 60_000_000_000,
        no_endpoint_ttl_ns: 60_000_000_000,
        bands: BTreeMap::new(),
        default_band: band,
        default_negative_band: band,
        ceiling: 1.0,
        detector: Arc::new(UtilizationDetector::default_detector()),
    })
}

fn bench_enqueue_dispatch(c: &mut Criterion) {
    let flows: Vec<Arc<str>> = (0..FLOWS).map(|i| format!("tenant-{i}").into()).collect();
    let mut group = c.benchmark_group("flow_control_enqueue_dispatch");
    for (name, fairness) in [
        ("global-strict", Fairness::GlobalStrict),
        ("round-robin", Fairness::RoundRobin),
        ("token-weighted", Fairness::TokenWeighted),
    ] {
        for queued in [10usize, 1_000, 10_000] {
            let mut q = FlowQueues::new(policy(fairness));
            let mut now = 0u64;
            let mut next = 0usize;
            let item = |n: usize| NewItem {
                payload: n,
                fairness_id: flows[n % FLOWS].clone(),
                // Two bands, as with one objective above the default.
                priority: i32::from(n.is_multiple_of(10)),
                bytes: 4_096,
                tokens: 1_000 + (n % 7) as u64 * 500,
            };
            for _ in 0..queued {
                now += 1_000;
                let _ = q.enqueue(item(next), now);
                next += 1;
            }
            group.bench_with_input(BenchmarkId::new(name, queued), &queued, |b, _| {
                b.iter(|| {
                    now += 1_000;
                    let _ = q.enqueue(item(next), now);
                    next += 1;
                    black_box(q.dispatch(0.5, now))
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_enqueue_dispatch);
criterion_main!(benches);
