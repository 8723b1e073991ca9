//! `prefill-backlog-scorer`: exact scores from the prefix match and the in-flight prefill work,
//! the prefill count the decide step books on the chosen endpoint, and the prefix index's
//! correction from the cached tokens a model server reports.

use rand::{SeedableRng, rngs::SmallRng};

use futures_util::FutureExt;

use crate::{
    clock::Timestamp,
    datastore::{EndpointId, EngineMetrics, InFlight, SlotEvidence, Snapshot, testing::SnapshotBuilder},
    parser::{LlmRequest, parse_request},
    prefix::hash::BlockHash,
    scheduler::{
        DecideEnv, Outcome, RequestMeta, Scheduler, Scratch,
        plugin::{CacheReport, CycleState, PluginName, PrefixMatch, SchedulingContext, Scorer},
        scorers::{PrefillBacklogParams, PrefillBacklogScorer, RecomputeQueue},
    },
};

/// Scores of the three endpoints: endpoint 0 holds the whole prefix with two requests (300
/// tokens) still prefilling, endpoint 1 half of it and nothing in flight, endpoint 2 none of it
/// with one request (100 tokens) prefilling. The prompt estimates at 100 tokens. No endpoint
/// has queued anything in its scrapes.
fn scores(params: PrefillBacklogParams) -> Vec<f64> {
    scores_with_slots(params, [SlotEvidence::default(); 3])
}

/// [`scores`] with each endpoint's scraped slot evidence.
fn scores_with_slots(params: PrefillBacklogParams, slots: [SlotEvidence; 3]) -> Vec<f64> {
    let snap = SnapshotBuilder::new()
        .endpoint("10.0.0.1:8000", |m| m.slots = slots[0])
        .endpoint("10.0.0.2:8000", |m| m.slots = slots[1])
        .endpoint("10.0.0.3:8000", |m| m.slots = slots[2])
        .build();
    let live = |i: usize| &snap.endpoints[i].live;
    let _in_flight = [
        InFlight::start(live(0), 1_000, 200),
        InFlight::start(live(0), 1_000, 100),
        InFlight::start(live(2), 1_000, 100),
    ];
    // 400 bytes of prompt text, 402 with its quotes: 100 tokens.
    let body = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(400));
    let req = parse_request("/v1/completions", body.as_bytes()).unwrap();
    assert_eq!(req.estimated_prompt_tokens(), 100);
    let state = CycleState {
        prefix: Some(PrefixMatch {
            // Blocks of 25 tokens: endpoint 0 holds all 100, endpoint 1 the first 50.
            hashes: (0..4).map(BlockHash).collect(),
            matched: vec![(snap.endpoints[0].uid, 4), (snap.endpoints[1].uid, 2)],
            block_size_tokens: 25,
        }),
    };
    let ctx = SchedulingContext {
        snapshot: &snap,
        request: &req,
        body: body.as_bytes(),
        target_model: "m",
        now: Timestamp(0),
        priority: 0,
    };
    let name = PluginName {
        kind: crate::scheduler::plugin_types::PREFILL_BACKLOG_SCORER,
        name: "b".into(),
    };
    let scorer = PrefillBacklogScorer::new(name, &params);
    let ids: Vec<_> = snap.all_ids().collect();
    let mut out = vec![f64::NAN; 3];
    scorer.score(&ctx, &state, &ids, &mut out);
    out
}

/// Decide `req` (parsed from `body`) on `snap`, run the pre-request hooks (the prefix index
/// records the pick) and return the outcome.
fn decide_and_record(s: &Scheduler, snap: &Snapshot, req: &LlmRequest, body: &[u8]) -> Outcome {
    let mut rng = SmallRng::seed_from_u64(1);
    let mut scratch = Scratch::default();
    let mut env = DecideEnv {
        now: Timestamp(0),
        unix_ms: 0,
        rng: &mut rng,
        timer: None,
        scratch: &mut scratch,
    };
    let verdict = s
        .decide(req, body, &RequestMeta::default(), snap, &mut env)
        .now_or_never()
        .unwrap();
    let outcome = verdict.result.unwrap();
    s.pre_request(snap, &outcome.cycle, None);
    outcome
}

fn assert_close(got: &[f64], want: &[f64]) {
    assert!(
        got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12),
        "{got:?} vs {want:?}"
    );
}

/// Costs: ahead + (1 + b) × own, b = 3 prefilling requests / 3 endpoints = 1:
/// 300 + 0, 0 + 2 × 50, 100 + 2 × 100 → scores 1 − cost / 300.
#[test]
fn recomputed_tokens_weigh_more_when_queues_form() {
    assert_close(&scores(PrefillBacklogParams::default()), &[0.0, 2.0 / 3.0, 0.0]);
}

/// Each endpoint's own queue as `b`: endpoint 0 (two waiting) 300 + 3 × 0, endpoint 1 (none)
/// 0 + 1 × 50, endpoint 2 (one) 100 + 2 × 100 → 1 − cost / 300: the idle endpoint pays its
/// recompute once.
#[test]
fn with_the_endpoint_queue_a_recompute_weighs_by_whom_it_delays() {
    assert_close(
        &scores(PrefillBacklogParams {
            recompute_queue: RecomputeQueue::Endpoint,
            ..PrefillBacklogParams::default()
        }),
        &[0.0, 5.0 / 6.0, 0.0],
    );
    assert_close(
        &scores(PrefillBacklogParams {
            recompute_aware: false,
            recompute_queue: RecomputeQueue::Endpoint,
            ..PrefillBacklogParams::default()
        }),
        &[0.0, 5.0 / 6.0, 1.0 / 3.0],
    );
}

/// `auto`: the endpoint's own queue where its scrapes showed a one-slot server, the pool's mean
/// elsewhere. With only endpoint 1 one-slot: 300 + 2 × 0, 0 + 1 × 50, 100 + 2 × 100 → the
/// `endpoint` scores; with no evidence, or with a server that queued once but has run two
/// requests at once (batching), the `poolMean` scores.
#[test]
fn auto_counts_the_own_queue_only_on_one_slot_servers() {
    let auto = PrefillBacklogParams {
        recompute_queue: RecomputeQueue::Auto,
        ..PrefillBacklogParams::default()
    };
    let scrape = |waiting, running| EngineMetrics {
        waiting,
        running,
        ..EngineMetrics::default()
    };
    let one_slot = SlotEvidence::default()
        .with_scrape(&scrape(3, 1), 1)
        .with_scrape(&scrape(2, 1), 1);
    let batching = one_slot.with_scrape(&scrape(0, 2), 2);
    assert!(one_slot.one_slot() && !batching.one_slot());
    let unknown = SlotEvidence::default();
    assert_close(
        &scores_with_slots(auto.clone(), [batching, one_slot, unknown]),
        &[0.0, 5.0 / 6.0, 0.0],
    );
    assert_close(&scores(auto.clone()), &[0.0, 2.0 / 3.0, 0.0]);
    assert_close(
        &scores_with_slots(auto, [batching, batching, batching]),
        &[0.0, 2.0 / 3.0, 0.0],
    );
}

/// `countPrefillProgress`: a one-slot server (endpoint 0, holding the whole 100-token prompt)
/// computing a 1,000-token prompt alone since t = 10 s, at the 100 tokens/s it showed on the
/// 500-token prompt before it, counts that prompt by what is left of it. At t = 19 s: 100 left,
/// cost 100 + (1 + 1) × 0 against endpoint 1's recompute, 0 + (1 + ½) × 100 (not one-slot: the
/// pool's mean queue); endpoint 0 wins, which counting the prompt whole (1,000) turns around.
/// Past the prompt's whole length it counts 0 left, never less.
#[test]
fn a_one_slot_servers_prompt_in_progress_counts_by_what_is_left() {
    let snap = SnapshotBuilder::new()
        .endpoint("10.0.0.1:8000", |_| {})
        .endpoint("10.0.0.2:8000", |_| {})
        .build();
    let live = &snap.endpoints[0].live;
    let second = |s: u64| Timestamp(s * 1_000_000_000);
    let running = |waiting| EngineMetrics {
        waiting,
        running: 1,
        ..EngineMetrics::default()
    };
    let mut timed = InFlight::start(live, 600, 500);
    let in_progress = InFlight::start(live, 1_100, 1_000);
    let head = crate::datastore::HeadPrefill::default().with_scrape(second(0), 1, &live.slots());
    timed.first_byte();
    let head = head.with_scrape(second(5), 1, &live.slots());
    let slots = SlotEvidence::default()
        .with_scrape(&running(1), live.answering_requests())
        .with_scrape(&running(1), live.answering_requests());
    drop(timed);
    let head = head.with_scrape(second(10), 1, &live.slots());
    assert_eq!(head.tokens_per_second(), Some(100.0));
    let mut endpoints = snap.endpoints.to_vec();
    endpoints[0].metrics = std::sync::Arc::new(EngineMetrics {
        slots,
        head,
        ..EngineMetrics::default()
    });
    assert!(slots.one_slot());
    let snap = Snapshot::new(endpoints, 0, Timestamp(0), true);
    let body = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(400));
    let req = parse_request("/v1/completions", body.as_bytes()).unwrap();
    let state = CycleState {
        prefix: Some(PrefixMatch {
            hashes: (0..4).map(BlockHash).collect(),
            matched: vec![(snap.endpoints[0].uid, 4)],
            block_size_tokens: 25,
        }),
    };
    let score = |count_prefill_progress: bool, at: u64| {
        let scorer = PrefillBacklogScorer::new(
            PluginName {
                kind: crate::scheduler::plugin_types::PREFILL_BACKLOG_SCORER,
                name: "b".into(),
            },
            &PrefillBacklogParams {
                recompute_queue: RecomputeQueue::Auto,
                count_prefill_progress,
                ..PrefillBacklogParams::default()
            },
        );
        let ctx = SchedulingContext {
            snapshot: &snap,
            request: &req,
            body: body.as_bytes(),
            target_model: "m",
            now: second(at),
            priority: 0,
        };
        let mut out = vec![0.0; 2];
        scorer.score(&ctx, &state, &[EndpointId(0), EndpointId(1)], &mut out);
        out
    };
    assert_close(&score(true, 19), &[1.0 / 3.0, 0.0]);
    assert_close(&score(false, 19), &[0.0, 0.85]);
    assert_close(&score(true, 25), &[1.0, 0.0]);
    drop(in_progress);
}

/// Without the recompute weight: 300, 50, 200 → 1 − cost / 300.
#[test]
fn without_recompute_awareness_the_shortest_wait_wins() {
    assert_close(
        &scores(PrefillBacklogParams {
            recompute_aware: false,
            ..PrefillBacklogParams::default()
        }),
        &[0.0, 5.0 / 6.0, 1.0 / 3.0],
    );
}

/// The decide step books the prompt less the prefix the chosen endpoint holds as prefill work on
/// it; the first response byte releases it.
#[test]
fn a_routed_request_counts_its_uncached_prompt_as_prefill_until_its_first_byte() {
    let cfg = crate::config::EndpointPickerConfig::from_yaml(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: prefill-backlog-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: prefill-backlog-scorer\n",
    )
    .unwrap();
    let s = crate::scheduler::build_scheduler(&cfg).unwrap();
    let snap = SnapshotBuilder::new()
        .endpoint("10.0.0.1:8000", |_| {})
        .endpoint("10.0.0.2:8000", |_| {})
        .build();
    let prompt = "You are a helpful assistant. ".repeat(40);
    let body = format!(r#"{{"model":"m","prompt":"{prompt}"}}"#);
    let req = parse_request("/v1/completions", body.as_bytes()).unwrap();
    let decide = || decide_and_record(&s, &snap, &req, body.as_bytes());
    // Nothing cached anywhere: the whole prompt is prefill work.
    let first = decide();
    assert_eq!(first.prefill_tokens, req.estimated_prompt_tokens());
    let primary = first.endpoints()[0];
    let live = &snap.get(primary).unwrap().live;
    let mut counted = InFlight::start(live, first.load_tokens, first.prefill_tokens);
    // The same prompt again: the first endpoint holds all of it, so its cost is its backlog,
    // P, against 1.5 P elsewhere (the whole prompt, weighed by 1 + 1/2 prefilling request per
    // endpoint); nothing of it is prefill work there.
    let again = decide();
    assert_eq!(again.endpoints(), first.endpoints());
    assert_eq!(again.prefill_tokens, 0);
    assert_eq!(
        (live.prefilling_requests(), live.prefill_tokens()),
        (1, first.prefill_tokens)
    );
    counted.first_byte();
    assert_eq!((live.prefilling_requests(), live.prefill_tokens()), (0, 0));
    assert_eq!(live.in_flight_requests(), 1);
}

/// A report of fewer cached tokens than predicted makes the index forget that many of the
/// endpoint's oldest blocks, with `forgetOnCacheMiss` only; a full hit forgets nothing.
#[test]
fn a_cache_miss_report_makes_the_index_forget_only_when_asked() {
    let build = |forget: bool| {
        let cfg = crate::config::EndpointPickerConfig::from_yaml(&format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: approx-prefix-cache-producer\n  parameters: {{forgetOnCacheMiss: {forget}}}\n- type: prefix-cache-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: prefix-cache-scorer\n"
        ))
        .unwrap();
        crate::scheduler::build_scheduler(&cfg).unwrap()
    };
    let snap = SnapshotBuilder::new().endpoint("10.0.0.1:8000", |_| {}).build();
    // 64 bytes per 16-token block: 40 blocks of prompt.
    let body = format!(r#"{{"model":"m","prompt":"{}"}}"#, "y".repeat(40 * 64));
    let req = parse_request("/v1/completions", body.as_bytes()).unwrap();
    for forget in [false, true] {
        let s = build(forget);
        let decide = || decide_and_record(&s, &snap, &req, body.as_bytes());
        let first = decide();
        assert_eq!(first.cache_prediction.unwrap().held_tokens, 0);
        let second = decide();
        let predicted = second.cache_prediction.unwrap();
        assert_eq!((predicted.prompt_tokens, predicted.held_tokens), (640, 640));
        let report = |cached_tokens| CacheReport {
            predicted,
            prompt_tokens: 600,
            cached_tokens,
        };
        // The server's count differs from the estimate: shares are compared.
        assert_eq!(report(600).predicted_tokens(), 600);
        assert_eq!(report(600).missed_tokens(), 0);
        assert_eq!(s.cache_report(&report(600)), 0);
        // 597 of 600: the token an engine always recomputes, no miss.
        assert_eq!(s.cache_report(&report(597)), 0);
        // Half found: 320 estimated tokens missed, 20 blocks forgotten (of 40).
        assert_eq!(report(300).missed_tokens(), 320);
        assert_eq!(s.cache_report(&report(300)), if forget { 20 } else { 0 });
        let third = decide();
        let held = third.cache_prediction.unwrap().held_tokens;
        assert_eq!(
            held,
            if forget { 0 } else { 640 },
            "the oldest blocks are the prompt's first"
        );
    }
}
