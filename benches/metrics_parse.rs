//! Extraction of an engine's signals from `/metrics` pages: the published fixtures and a full
//! 90 KB vLLM V1 page (two data-parallel ranks, every histogram). One pass over the text, no
//! allocation per sample.
//!
//! Run: `cargo bench --bench metrics_parse`. Results and machine: benches/README.md.

#![allow(clippy::unwrap_used, reason = "bench setup")]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use epp::scrape::engines::{builtin_engines, extract};

fn bench_parse(c: &mut Criterion) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let mut group = c.benchmark_group("metrics_extract");
    for (file, engine) in [
        ("vllm-v1-full.prom", "vllm"),
        ("vllm-v0.prom", "vllm"),
        ("sglang.prom", "sglang"),
        ("triton-trtllm.prom", "triton-tensorrt-llm"),
    ] {
        let text = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        let spec = builtin_engines()
            .into_iter()
            .find(|e| &*e.name == engine)
            .unwrap();
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(file, |b| b.iter(|| black_box(extract(&spec, black_box(&text)))));
    }
    group.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
