//! The simulator's hot paths: one engine step with a busy batch, and a whole replay (parse,
//! prefix hashing, scheduling and engine steps) of a generated shared-prefix workload.

use criterion::{Criterion, criterion_group, criterion_main};
use epp_sim::{
    engine::{Engine, EngineProfile, EngineRequest},
    replay::{Placement, ReplaySetup, baselines, replay},
    workload::generate::{GeneratorParams, shared_prefix},
};

fn engine_step(c: &mut Criterion) {
    // 64 sequences decoding with 2k-token contexts: the steady state of a loaded pod.
    c.bench_function("engine_step_64_decoding", |b| {
        b.iter_batched(
            || {
                let mut e = Engine::new(EngineProfile::h100());
                for id in 0..64u64 {
                    let _ = e.submit(EngineRequest {
                        id,
                        prompt_tokens: 2_048,
                        output_tokens: 100_000,
                        block_hashes: (0..128).map(|b| id << 32 | b).collect(),
                        adapter: None,
                    });
                }
                let mut events = Vec::new();
                // Bounded: admission takes a few steps (four 2k prompts per 8k-token step).
                for _ in 0..64 {
                    if e.gauges().running == 64 && e.gauges().waiting == 0 {
                        break;
                    }
                    e.step(&mut events);
                }
                assert_eq!(e.gauges().running, 64, "all sequences admitted");
                e
            },
            |mut e| {
                let mut events = Vec::new();
                for _ in 0..100 {
                    e.step(&mut events);
                }
                e
            },
            criterion::BatchSize::LargeInput,
        );
    });
}

fn whole_replay(c: &mut Criterion) {
    let params = GeneratorParams {
        requests: 500,
        rate: 40.0,
        ..Default::default()
    };
    let workload = shared_prefix(&params, 1);
    let (name, config) = baselines::resolve("recommended").unwrap_or_else(|e| panic!("{e}"));
    let setup = ReplaySetup {
        name,
        config,
        pods: 4,
        profile: EngineProfile::h100(),
        scrape_interval_ns: 50_000_000,
        seed: 1,
        start_unix_ms: 0,
        placement: Placement::Scheduler,
    };
    let mut group = c.benchmark_group("replay");
    group.sample_size(10);
    group.bench_function("shared_prefix_500_requests_4_pods", |b| {
        b.iter(|| replay(&workload, &setup, |_| {}).unwrap_or_else(|e| panic!("{e}")));
    });
    group.finish();
}

criterion_group!(benches, engine_step, whole_replay);
criterion_main!(benches);
