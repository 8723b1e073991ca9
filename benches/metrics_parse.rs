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
    // Hostile but valid pages (issue "Robustness at scale"): one LoRA info series naming 100,000
    // adapters, and 7 MB of one wanted gauge's series.
    let vllm = builtin_engines()
        .into_iter()
        .find(|e| &*e.name == "vllm")
        .unwrap();
    let adapters: Vec<String> = (0..100_000).map(|i| format!("adapter-{i}")).collect();
    let lora_page = format!(
        "vllm:num_requests_waiting{{model_name=\"m\"}} 1\nvllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"\"}} 1.7e9\n",
        adapters.join(",")
    );
    let mut series_page = String::new();
    let mut i = 0;
    while series_page.len() < 7 << 20 {
        series_page.push_str(&format!(
            "vllm:num_requests_waiting{{model_name=\"model-{i}\"}} 1\n"
        ));
        i += 1;
    }
    for (name, text) in [
        ("hostile-100k-adapters", &lora_page),
        ("hostile-7MB-wanted-series", &series_page),
    ] {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(name, |b| b.iter(|| black_box(extract(&vllm, black_box(text)))));
    }
    group.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
