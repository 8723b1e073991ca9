//! One complete ext_proc request exchange, in process: request headers, the body in 64 KiB
//! chunks (as Envoy streams it), parse, schedule over 100 endpoints with the default config
//! (queue + KV + prefix), and the re-emitted body chunks. No gRPC transport: this is the EPP's
//! own cost per request.
//!
//! Run: `cargo bench --bench extproc`. Results and machine: benches/README.md.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{hint::black_box, sync::Arc};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use envoy_types::pb::envoy::{
    config::core::v3::{HeaderMap, HeaderValue},
    service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest, processing_request::Request},
};
use epp::{
    clock::MonotonicClock,
    config::EndpointPickerConfig,
    datastore::{SnapshotReader, testing::SnapshotBuilder},
    extproc::{Processor, stream::Exchange},
    metrics::exported::EppMetrics,
    scheduler::build_scheduler,
};

fn chat_body(tokens: usize) -> Vec<u8> {
    // About four bytes per token of English-like text.
    let words = "the quick brown fox jumps over a lazy dog while ";
    let mut content = words.repeat(tokens * 4 / words.len() + 1);
    content.truncate(tokens * 4);
    serde_json::to_vec(&serde_json::json!({
        "model": "llama-3-8b",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content}
        ],
        "max_tokens": 256,
        "stream": true
    }))
    .unwrap_or_default()
}

fn messages(body: &[u8]) -> Vec<ProcessingRequest> {
    let header = |k: &str, v: &str| HeaderValue {
        key: k.into(),
        value: String::new(),
        raw_value: v.as_bytes().to_vec(),
    };
    let mut out = vec![ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![
                    header(":path", "/v1/chat/completions"),
                    header(":method", "POST"),
                    header("x-request-id", "bench"),
                    header("content-type", "application/json"),
                ],
            }),
            end_of_stream: false,
            ..Default::default()
        })),
        ..Default::default()
    }];
    let chunks: Vec<&[u8]> = body.chunks(65_536).collect();
    for (i, c) in chunks.iter().enumerate() {
        out.push(ProcessingRequest {
            request: Some(Request::RequestBody(HttpBody {
                body: c.to_vec(),
                end_of_stream: i + 1 == chunks.len(),
                ..Default::default()
            })),
            ..Default::default()
        });
    }
    out
}

fn bench_exchange(c: &mut Criterion) {
    let mut builder = SnapshotBuilder::new();
    for i in 0..100u32 {
        builder = builder.endpoint(&format!("10.0.{}.{}:8000", i / 250, i % 250 + 1), |m| {
            m.waiting = i % 7;
            m.running = i % 5;
            m.kv_usage = Some(f64::from(i % 10) / 10.0);
        });
    }
    let scheduler =
        build_scheduler(&EndpointPickerConfig::default_config()).unwrap_or_else(|e| panic!("{e}"));
    let processor = Arc::new(Processor {
        reader: SnapshotReader::fixed(builder.build()),
        scheduler: Arc::new(scheduler),
        metrics: Arc::new(EppMetrics::new().unwrap_or_else(|e| panic!("{e}"))),
        clock: Arc::new(MonotonicClock::new()),
        disable_subset_filter: false,
        explain_decisions: false,
        conformance_hooks: false,
        tracer: None,
        tasks: tokio_util::task::TaskTracker::new(),
        body_memory: epp::extproc::body_memory::BodyMemory::new(1 << 30),
        flow: None,
    });

    // The same exchange with `--tracing` on and every trace sampled: the request and decision
    // spans made, ended and queued to a batch exporter that discards them (export itself runs
    // on the exporter's thread, off the request path).
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
        .with_batch_exporter(Discard)
        .build();
    let traced = Arc::new(Processor {
        reader: processor.reader.clone(),
        scheduler: processor.scheduler.clone(),
        metrics: processor.metrics.clone(),
        clock: Arc::new(MonotonicClock::new()),
        disable_subset_filter: false,
        explain_decisions: false,
        conformance_hooks: false,
        tracer: Some(opentelemetry::trace::TracerProvider::tracer(&provider, "bench")),
        tasks: tokio_util::task::TaskTracker::new(),
        body_memory: epp::extproc::body_memory::BodyMemory::new(1 << 30),
        flow: None,
    });

    let mut group = c.benchmark_group("extproc_exchange");
    for tokens in [1_000usize, 10_000, 100_000] {
        let body = chat_body(tokens);
        let msgs = messages(&body);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("chat_tokens", tokens), &msgs, |b, msgs| {
            let mut out = Vec::with_capacity(16);
            b.iter_batched(
                || msgs.clone(),
                |msgs| {
                    let mut ex = Exchange::new(processor.clone());
                    out.clear();
                    for m in msgs {
                        // Only a budget store would make the exchange wait; this config has none, so
                        // every message completes on its first poll.
                        let _ = futures_util::FutureExt::now_or_never(ex.on_message(m, &mut out));
                    }
                    black_box(&out);
                },
                criterion::BatchSize::LargeInput,
            );
        });
    }
    let body = chat_body(1_000);
    let msgs = messages(&body);
    group.bench_with_input(BenchmarkId::new("chat_tokens_traced", 1_000), &msgs, |b, msgs| {
        let mut out = Vec::with_capacity(16);
        b.iter_batched(
            || msgs.clone(),
            |msgs| {
                let mut ex = Exchange::new(traced.clone());
                out.clear();
                for m in msgs {
                    let _ = futures_util::FutureExt::now_or_never(ex.on_message(m, &mut out));
                }
                black_box(&out);
            },
            criterion::BatchSize::LargeInput,
        );
    });
    group.finish();
    let _ = provider.shutdown();
}

/// An exporter that drops what it is given.
#[derive(Debug)]
struct Discard;

impl opentelemetry_sdk::trace::SpanExporter for Discard {
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        black_box(batch);
        Ok(())
    }
}

criterion_group!(benches, bench_exchange);
criterion_main!(benches);
