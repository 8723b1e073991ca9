//! Admission costs: a prompt guard with the four builtins and ten custom patterns over a
//! 100k-token chat prompt (clean, so every pattern scans all of it), and one in-memory budget
//! reserve + settle.
//!
//! Run: `cargo bench --bench admission`. Results and machine: benches/README.md.

#![allow(clippy::unwrap_used, reason = "bench setup")]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use epp::{
    budget::{Layer, MemoryStore, Window},
    config::PluginSpec,
    guard::Placeholders,
    parser::ApiKind,
    scheduler::{PluginName, admission::PromptGuard},
};

fn guard() -> PromptGuard {
    let mut matches = String::new();
    for (i, p) in [
        "(?i)ignore (all )?previous instructions",
        "(?i)disregard (all )?prior (instructions|rules)",
        "(?i)you are now (DAN|in developer mode)",
        "(?i)reveal (your )?system prompt",
        "(?i)print (your )?hidden instructions",
        "AKIA[0-9A-Z]{16}",
        "-----BEGIN (RSA |EC )?PRIVATE KEY-----",
        "(?i)password\\s*[:=]\\s*\\S+",
        "(?i)api[_-]?key\\s*[:=]\\s*\\S+",
        "ghp_[A-Za-z0-9]{36}",
    ]
    .iter()
    .enumerate()
    {
        matches.push_str(&format!("      - {{pattern: '{p}', name: rule{i}}}\n"));
    }
    let yaml = format!(
        "request:\n  regex:\n    action: REJECT\n    builtins: [SSN, CREDIT_CARD, EMAIL, PHONE_NUMBER]\n    matches:\n{matches}"
    );
    let spec = PluginSpec {
        name: "g".into(),
        plugin_type: "prompt-guard".into(),
        parameters: serde_yaml_ng::from_str(&yaml).unwrap(),
        path: "plugins[0]".into(),
    };
    PromptGuard::from_config(
        PluginName {
            kind: "prompt-guard",
            name: "g".into(),
        },
        &spec,
    )
    .unwrap()
}

fn bench_admission(c: &mut Criterion) {
    let g = guard();
    let words = "the quick brown fox jumps over a lazy dog while 42 cats watch ";
    let mut content = words.repeat(400_000 / words.len() + 1);
    content.truncate(400_000);
    let prompt = serde_json::json!([{"role": "system", "content": "You are helpful."}, {"role": "user", "content": content}]);
    let mut group = c.benchmark_group("admission");
    group.throughput(Throughput::Bytes(400_000));
    group.bench_function("prompt_guard_100k_tokens_4_builtins_10_patterns", |b| {
        b.iter_batched(
            || prompt.clone(),
            |mut p| black_box(g.check(ApiKind::ChatCompletions, &mut p, &mut Placeholders::default())),
            criterion::BatchSize::LargeInput,
        )
    });
    // What the server pays: decode the prompt's JSON, then scan (the parser kept its raw bytes).
    let raw = serde_json::to_vec(&prompt).unwrap();
    group.bench_function("prompt_guard_100k_tokens_with_json_decode", |b| {
        b.iter(|| {
            let mut p: serde_json::Value = serde_json::from_slice(black_box(&raw)).unwrap();
            black_box(g.check(ApiKind::ChatCompletions, &mut p, &mut Placeholders::default()))
        })
    });
    group.throughput(Throughput::Elements(1));
    let store = MemoryStore::new();
    let layers = vec![
        Layer {
            key: "t:team-a".into(),
            limit: u64::MAX,
        },
        Layer {
            key: "m:team-a:llama".into(),
            limit: u64::MAX,
        },
    ];
    let w = Window {
        id: 1,
        remaining_ms: 1000,
    };
    group.bench_function("budget_reserve_and_settle_memory", |b| {
        b.iter(|| {
            black_box(store.reserve_now(&layers, 1000, w));
            store.settle_now(&layers, w, 1000, 900);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_admission);
criterion_main!(benches);
