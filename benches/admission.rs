//! Admission costs: a prompt guard with the four builtins and ten custom patterns over a
//! 100k-token chat prompt (clean, so every pattern scans all of it), in-memory budget reserve +
//! settle (two per-minute counters; and four windows with calendar and money limits), and a response guard masking a streamed answer across its SSE events.
//!
//! Run: `cargo bench --bench admission`. Results and machine: benches/README.md.

#![allow(clippy::unwrap_used, reason = "bench setup")]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use epp::{
    budget::{
        BudgetPolicy, Charge, Counter, CounterKey, LayerKey, Limit, MemoryStore, ModelBudget, Period, Prices,
        TenantBudget, Unit, Window,
    },
    config::PluginSpec,
    guard::{Builtin, PatternSet, Placeholders, response::StreamMask},
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
    // A streamed answer as vLLM sends it: 1,000 chunks of a few characters each, one email
    // address and one card number among them, then the finish chunk and [DONE].
    let answer = "Sure. Write to jane.doe@example.com or pay with 4111 1111 1111 1111 today. ".repeat(54);
    let mut events: Vec<Vec<u8>> = answer
        .as_bytes()
        .chunks(4)
        .take(1000)
        .map(|piece| {
            let piece = String::from_utf8_lossy(piece);
            let chunk = serde_json::json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]});
            format!("data: {chunk}\n\n").into_bytes()
        })
        .collect();
    events.push(
        br#"data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}

"#
        .to_vec(),
    );
    events.push(b"data: [DONE]\n\n".to_vec());
    let builtins = PatternSet::new(
        &[
            Builtin::Ssn,
            Builtin::CreditCard,
            Builtin::Email,
            Builtin::PhoneNumber,
        ],
        &[],
    )
    .unwrap();
    let sets = [&builtins];
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("response_guard_stream_1000_events_4_builtins", |b| {
        b.iter(|| {
            let mut mask = StreamMask::default();
            let mut bytes = 0;
            for event in &events {
                bytes += mask.event(&sets, black_box(event)).len();
            }
            black_box(bytes + mask.finish(&sets).len())
        })
    });
    group.throughput(Throughput::Elements(1));
    // Two token counters in a fixed window: the shape of the earlier per-minute budget.
    let store = MemoryStore::new();
    let window = Window {
        id: 1,
        ends_ms: 60_000,
        remaining_ms: 1000,
    };
    let counter = |layer: LayerKey| Counter {
        key: CounterKey {
            layer,
            period: Period::Fixed { ms: 60_000 },
            unit: Unit::Tokens,
        },
        limit: u64::MAX,
        window,
    };
    let counters = vec![
        counter(LayerKey::tenant("team-a")),
        counter(LayerKey::model("team-a", "llama")),
    ];
    let (reserved, actual) = (
        Charge {
            tokens: 1000,
            nanos: 0,
        },
        Charge {
            tokens: 900,
            nanos: 0,
        },
    );
    group.bench_function("budget_reserve_and_settle_memory", |b| {
        b.iter(|| {
            black_box(store.reserve_now(&counters, reserved));
            store.settle_now(&counters, reserved, actual);
        })
    });
    // A platform team's budget: per-minute tokens, a daily token total and a monthly money
    // limit on the tenant, a per-model TPM; the windows are computed per request (calendar ones
    // in the policy's time zone), then reserved and settled.
    let limit = |period, unit, amount| Limit { period, unit, amount };
    let policy = BudgetPolicy {
        time_zone: jiff::tz::TimeZone::get("Europe/Berlin").unwrap(),
        prices: [(
            "llama".to_owned(),
            Prices {
                input: 200_000_000,
                cached_input: 20_000_000,
                output: 800_000_000,
            },
        )]
        .into(),
        tenants: [(
            "team-a".to_owned(),
            TenantBudget {
                limits: vec![
                    limit(Period::Fixed { ms: 60_000 }, Unit::Tokens, u64::MAX),
                    limit(Period::Day, Unit::Tokens, u64::MAX),
                    limit(Period::Month, Unit::Spend, u64::MAX),
                ],
                models: [(
                    "llama".to_owned(),
                    ModelBudget {
                        limits: vec![limit(Period::Fixed { ms: 60_000 }, Unit::Tokens, u64::MAX)],
                        fallback_model: None,
                    },
                )]
                .into(),
            },
        )]
        .into(),
        ..BudgetPolicy::default()
    };
    let store = MemoryStore::new();
    let now_ms = 1_796_000_000_000;
    group.bench_function("budget_four_windows_reserve_and_settle_memory", |b| {
        b.iter(|| {
            let counters = policy.counters("team-a", "llama", black_box(now_ms));
            let charge = policy.estimate("llama", 1000, Some(200));
            black_box(store.reserve_now(&counters, charge));
            store.settle_now(&counters, charge, policy.actual("llama", 1000, 800, 150, 1150));
        })
    });
    group.finish();
}

criterion_group!(benches, bench_admission);
criterion_main!(benches);
