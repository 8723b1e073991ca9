//! Scheduling decision time under the default config (queue 2 + KV 2 + prefix 3): prefix
//! hashing, index lookup, scorers, picker and the index insert of the pre-request hook. Parsing is
//! excluded (the request is parsed outside the timed loop). Sweeps 8 / 64 / 512 / 4,096 endpoints
//! and 1k / 8k / 100k-token chat prompts.
//!
//! `decide` measures the whole decide step (admission and the outcome around the same cycle) at
//! 64 endpoints and 8k tokens. `decision_recommended` is one decision under the recommended
//! config (`simulator/configs/recommended.yaml`: six scorers, prefix match up to 4,096 blocks) at
//! 64 endpoints.
//!
//! `in_flight` is the per-request accounting around a decision (`InFlight::start`, `first_byte`,
//! the drop): alone on its endpoint, and answered ahead of 64 older requests still waiting there
//! (the longest walk of the endpoint's prefill order).
//!
//! Run: `cargo bench --bench scheduler`. Results and machine: benches/README.md.

#![allow(
    clippy::unwrap_used,
    reason = "bench setup: a failed unwrap is a broken bench"
)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use epp::{
    clock::Timestamp,
    config::EndpointPickerConfig,
    datastore::{EndpointLive, InFlight, testing::SnapshotBuilder},
    parser::parse_request,
    scheduler::{DecideEnv, RequestMeta, SchedulingContext, Scratch, build_scheduler},
};
use futures_util::FutureExt;
use rand::{SeedableRng, rngs::SmallRng};

fn chat_body(tokens: usize) -> Vec<u8> {
    let words = "the quick brown fox jumps over a lazy dog while ";
    let mut content = words.repeat(tokens * 4 / words.len() + 1);
    content.truncate(tokens * 4);
    serde_json::to_vec(&serde_json::json!({
        "model": "llama-3-8b",
        "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": content}],
    }))
    .unwrap()
}

fn bench_decision(c: &mut Criterion) {
    sweep(
        c,
        "decision",
        &EndpointPickerConfig::default_config(),
        &[8, 64, 512, 4096],
    );
    let recommended =
        EndpointPickerConfig::from_yaml(include_str!("../simulator/configs/recommended.yaml")).unwrap();
    sweep(c, "decision_recommended", &recommended, &[64]);
}

/// One scheduling decision under `config` for each endpoint count and prompt length.
fn sweep(c: &mut Criterion, name: &str, config: &EndpointPickerConfig, endpoint_counts: &[u32]) {
    let scheduler = build_scheduler(config).unwrap();
    let mut group = c.benchmark_group(name);
    for &endpoints in endpoint_counts {
        let mut b = SnapshotBuilder::new();
        for i in 0..endpoints {
            b = b.endpoint(
                &format!("10.{}.{}.{}:8000", i / 65536, (i / 256) % 256, i % 256),
                |m| {
                    m.waiting = i % 7;
                    m.kv_usage = Some(f64::from(i % 10) / 10.0);
                },
            );
        }
        let snap = b.build();
        for tokens in [1_000usize, 8_000, 100_000] {
            let body = chat_body(tokens);
            let req = parse_request("/v1/chat/completions", &body).unwrap();
            group.throughput(Throughput::Elements(1));
            group.bench_with_input(
                BenchmarkId::new(
                    format!("{endpoints}_endpoints"),
                    format!("{}k_tokens", tokens / 1000),
                ),
                &(),
                |bench, ()| {
                    let mut rng = SmallRng::seed_from_u64(1);
                    let mut scratch = Scratch::default();
                    let all: Vec<_> = snap.all_ids().collect();
                    bench.iter(|| {
                        let ctx = SchedulingContext {
                            snapshot: &snap,
                            request: &req,
                            body: &body,
                            target_model: "llama-3-8b",
                            now: Timestamp(0),
                            priority: 0,
                        };
                        black_box(
                            scheduler
                                .schedule(&ctx, all.clone(), &mut scratch, &mut rng, None)
                                .unwrap(),
                        );
                    });
                },
            );
        }
    }
    group.finish();
}

/// The whole decide step at 64 endpoints and an 8k-token prompt: candidates, the objective's
/// priority, the admission stages of the default config (the saturation gate), the cycle above,
/// and the outcome (no body edit, no response transform). The difference from
/// `decision/64_endpoints/8k_tokens` is what the seam costs.
fn bench_decide(c: &mut Criterion) {
    let scheduler = build_scheduler(&EndpointPickerConfig::default_config()).unwrap();
    let mut b = SnapshotBuilder::new();
    for i in 0..64u32 {
        b = b.endpoint(&format!("10.0.0.{i}:8000"), |m| {
            m.waiting = i % 7;
            m.kv_usage = Some(f64::from(i % 10) / 10.0);
        });
    }
    let snap = b.build();
    let body = chat_body(8_000);
    let req = parse_request("/v1/chat/completions", &body).unwrap();
    let meta = RequestMeta::default();
    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(1));
    group.bench_function("64_endpoints/8k_tokens", |bench| {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut scratch = Scratch::default();
        bench.iter(|| {
            let mut env = DecideEnv {
                now: Timestamp(0),
                unix_ms: 0,
                rng: &mut rng,
                timer: None,
                scratch: &mut scratch,
            };
            let verdict = scheduler
                .decide(&req, &body, &meta, &snap, &mut env)
                .now_or_never()
                .unwrap();
            black_box(verdict.result.unwrap());
        });
    });
    group.finish();
}

/// One request counted on an endpoint from dispatch to its end: alone, and behind 64 older
/// requests that have not answered (it answers first, so its first byte walks past all of them).
fn bench_in_flight(c: &mut Criterion) {
    let mut group = c.benchmark_group("in_flight");
    group.throughput(Throughput::Elements(1));
    for older in [0usize, 64] {
        let live = std::sync::Arc::new(EndpointLive::default());
        let _waiting: Vec<_> = (0..older).map(|_| InFlight::start(&live, 2_000, 1_800)).collect();
        group.bench_function(
            BenchmarkId::new("start_first_byte_drop", format!("{older}_older")),
            |bench| {
                bench.iter(|| {
                    let mut request = InFlight::start(&live, black_box(1_000), black_box(900));
                    request.first_byte();
                    drop(black_box(request));
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_decision, bench_decide, bench_in_flight);
criterion_main!(benches);
