//! The upstream worked examples (reference/scheduling.md §7) as unit tests, plus admission,
//! legacy filters, decision trees and burst behaviour.

use rand::{SeedableRng, rngs::SmallRng};

use crate::{
    clock::Timestamp,
    config::{EndpointPickerConfig, PluginSpec},
    datastore::{EndpointId, Snapshot, testing::SnapshotBuilder},
    datastore::{EngineMetrics, LoraState},
    parser::{LlmRequest, parse_request},
    scheduler::{
        CycleState, Decision, PluginName, SchedulingContext, SchedulingError, Scratch, build_scheduler,
        filters::LeastQueueFilter,
        plugin::{Filter, SaturationDetector},
        saturation::{UtilizationDetector, UtilizationParams},
    },
};

fn doc(plugins: &str, profile: &str) -> EndpointPickerConfig {
    let text = format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n{plugins}schedulingProfiles:\n- name: default\n  plugins:\n{profile}"
    );
    EndpointPickerConfig::from_yaml(&text).unwrap()
}

const FOUR_SCORERS: &str = "- type: queue-scorer\n- type: kv-cache-utilization-scorer\n- type: prefix-cache-scorer\n- type: lora-affinity-scorer\n";
const FOUR_REFS: &str = "  - pluginRef: queue-scorer\n  - pluginRef: kv-cache-utilization-scorer\n  - pluginRef: prefix-cache-scorer\n  - pluginRef: lora-affinity-scorer\n";

fn lora(active: &[&str], max: u32) -> Option<LoraState> {
    Some(LoraState {
        running: active.iter().map(|s| (*s).into()).collect(),
        waiting: Vec::<std::sync::Arc<str>>::new().into(),
        max_active: max,
    })
}

/// Pod `i` at 192.168.1.(i+1):8000.
fn pods(spec: &[(u32, f64, &[&str])], max_lora: u32) -> Snapshot {
    let mut b = SnapshotBuilder::new();
    for (i, (q, kv, active)) in spec.iter().enumerate() {
        let active = active.to_vec();
        b = b.endpoint(
            &format!("192.168.1.{}:8000", i + 1),
            move |m: &mut EngineMetrics| {
                m.waiting = *q;
                m.kv_usage = Some(*kv);
                m.lora = lora(&active, max_lora);
            },
        );
    }
    b.build()
}

fn request(model: &str) -> (Vec<u8>, LlmRequest) {
    let body = format!(r#"{{"model":"{model}","prompt":"test1"}}"#).into_bytes();
    let req = parse_request("/v1/completions", &body).unwrap();
    (body, req)
}

fn decide(
    cfg: &EndpointPickerConfig,
    snap: &Snapshot,
    target: &str,
    seed: u64,
) -> Result<Decision, SchedulingError> {
    let s = build_scheduler(cfg).unwrap();
    let (body, req) = request("m");
    let ctx = SchedulingContext {
        snapshot: snap,
        request: &req,
        body: &body,
        target_model: target,
        now: Timestamp(0),
        priority: 0,
    };
    s.schedule(
        &ctx,
        snap.all_ids().collect(),
        &mut Scratch::default(),
        &mut SmallRng::seed_from_u64(seed),
        None,
    )
}

#[test]
fn hermetic_cases_pick_the_documented_winner() {
    let cfg = doc(FOUR_SCORERS, FOUR_REFS);
    let cases: [(&str, Snapshot, u32); 5] = [
        (
            "my-model-12345",
            pods(&[(3, 0.2, &[]), (0, 0.1, &[]), (10, 0.2, &[])], 0),
            1,
        ),
        (
            "sql-lora-1fdg2",
            pods(
                &[
                    (0, 0.2, &["foo", "bar"]),
                    (0, 0.1, &["foo", "sql-lora-1fdg2"]),
                    (10, 0.2, &["foo", "bar"]),
                ],
                0,
            ),
            1,
        ),
        (
            "sql-lora-1fdg2",
            pods(
                &[
                    (10, 0.2, &["foo", "bar"]),
                    (10, 0.4, &["foo", "sql-lora-1fdg2"]),
                    (10, 0.3, &["foo"]),
                ],
                0,
            ),
            1,
        ),
        (
            "sql-lora-1fdg2",
            pods(
                &[
                    (6, 0.2, &["foo", "bar", "sql-lora-1fdg2"]),
                    (0, 0.85, &["foo"]),
                    (10, 0.9, &["foo"]),
                ],
                0,
            ),
            0,
        ),
        (
            "sql-lora-1fdg3",
            pods(
                &[
                    (4, 0.2, &["foo", "bar", "sql-lora-1fdg3"]),
                    (4, 0.85, &["foo", "sql-lora-1fdg3"]),
                ],
                0,
            ),
            0,
        ),
    ];
    for (target, snap, winner) in cases {
        for seed in 0..5 {
            let d = decide(&cfg, &snap, target, seed).unwrap();
            assert_eq!(d.endpoints, vec![EndpointId(winner)], "{target}");
        }
    }
}

#[test]
fn scheduler_unit_case_with_free_lora_slots() {
    // kv + queue + prefix + lora, maxActive 2: pod2 (active critical) wins with 2.8.
    let cfg = doc(FOUR_SCORERS, FOUR_REFS);
    let snap = pods(
        &[
            (0, 0.2, &["foo", "bar"]),
            (0, 0.2, &["foo", "critical"]),
            (10, 0.8, &["foo"]),
        ],
        2,
    );
    assert_eq!(
        decide(&cfg, &snap, "critical", 1).unwrap().endpoints,
        vec![EndpointId(1)]
    );
}

#[test]
fn queue_and_kv_score_vectors() {
    use crate::scheduler::{
        plugin::Scorer,
        scorers::{KvCacheScorer, QueueScorer, QueueSignal},
    };
    let name = PluginName {
        kind: "t",
        name: "t".into(),
    };
    let score = |scorer: &dyn Scorer, snap: &Snapshot| {
        let (body, req) = request("m");
        let ctx = SchedulingContext {
            snapshot: snap,
            request: &req,
            body: &body,
            target_model: "m",
            now: Timestamp(0),
            priority: 0,
        };
        let ids: Vec<EndpointId> = snap.all_ids().collect();
        let mut out = vec![0.0; ids.len()];
        scorer.score(&ctx, &CycleState::default(), &ids, &mut out);
        out
    };
    let q = QueueScorer::new(name.clone(), QueueSignal::Waiting);
    let snap = |v: &[(u32, f64)]| pods(&v.iter().map(|(q, kv)| (*q, *kv, &[][..])).collect::<Vec<_>>(), 0);
    assert_eq!(
        score(&q, &snap(&[(10, 0.0), (5, 0.0), (0, 0.0)])),
        vec![0.0, 0.5, 1.0]
    );
    assert_eq!(score(&q, &snap(&[(5, 0.0), (5, 0.0)])), vec![1.0, 1.0]);
    assert_eq!(score(&q, &snap(&[(0, 0.0), (0, 0.0)])), vec![1.0, 1.0]);
    let kv = KvCacheScorer::new(name);
    let got = score(&kv, &snap(&[(0, 0.8), (0, 0.5), (0, 0.0)]));
    assert!(
        (got[0] - 0.2).abs() < 1e-12 && got[1] == 0.5 && got[2] == 1.0,
        "{got:?}"
    );
    assert_eq!(score(&kv, &snap(&[(0, 1.0), (0, 0.5)])), vec![0.0, 0.5]);
}

fn detector(queue: f64, kv: f64, staleness: &str, headroom: f64) -> UtilizationDetector {
    let spec = PluginSpec {
        name: "d".into(),
        plugin_type: "utilization-detector".into(),
        parameters: serde_yaml_ng::Value::Null,
        path: "plugins[0]".into(),
    };
    let params = UtilizationParams {
        queue_depth_threshold: queue,
        kv_cache_util_threshold: kv,
        metrics_staleness_threshold: staleness.into(),
        headroom,
    };
    UtilizationDetector::from_params(
        PluginName {
            kind: "utilization-detector",
            name: "d".into(),
        },
        &params,
        &spec,
    )
    .unwrap()
}

/// Endpoints `(q, kv, age_ms)`; `None` age = never scraped. "Now" is 1 s.
fn aged(spec: &[(u32, f64, Option<u64>)]) -> Snapshot {
    let mut b = SnapshotBuilder::new();
    for (i, (q, kv, age)) in spec.iter().enumerate() {
        let (q, kv, age) = (*q, *kv, *age);
        b = b.endpoint(&format!("10.0.0.{}:8000", i + 1), move |m| {
            m.waiting = q;
            m.kv_usage = Some(kv);
            m.scraped_at = age.map(|a| Timestamp(1_000_000_000 - a * 1_000_000));
        });
    }
    b.build()
}

fn saturation(d: &UtilizationDetector, snap: &Snapshot) -> f64 {
    let (body, req) = request("m");
    let ctx = SchedulingContext {
        snapshot: snap,
        request: &req,
        body: &body,
        target_model: "m",
        now: Timestamp(1_000_000_000),
        priority: 0,
    };
    d.saturation(ctx.snapshot, ctx.now, &snap.all_ids().collect::<Vec<_>>())
}

#[test]
fn utilization_saturation_vectors() {
    let d = detector(5.0, 0.9, "100ms", 0.0);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-3;
    assert_eq!(saturation(&d, &aged(&[])), 1.0);
    assert!(close(saturation(&d, &aged(&[(2, 0.5, Some(0))])), 0.5556));
    assert_eq!(saturation(&d, &aged(&[(2, 0.5, Some(200))])), 1.0);
    assert!(close(saturation(&d, &aged(&[(10, 0.1, Some(0))])), 2.0));
    assert!(close(saturation(&d, &aged(&[(1, 0.95, Some(0))])), 1.0556));
    assert_eq!(saturation(&d, &aged(&[(0, 0.0, None)])), 1.0);
    assert!(close(
        saturation(&d, &aged(&[(1, 0.1, Some(0)), (0, 0.2, Some(0))])),
        0.2111
    ));
    assert!(close(
        saturation(&d, &aged(&[(1, 0.18, Some(0)), (0, 0.0, Some(200))])),
        0.6
    ));
    assert!(close(
        saturation(&d, &aged(&[(1, 0.1, Some(0)), (15, 0.2, Some(0))])),
        1.6
    ));
    assert!(close(
        saturation(
            &d,
            &aged(&[(0, 0.0, Some(200)), (20, 0.2, Some(0)), (1, 0.99, Some(0))])
        ),
        2.0333
    ));
    assert_eq!(saturation(&d, &aged(&[(5, 0.1, Some(0))])), 1.0);
    assert_eq!(saturation(&d, &aged(&[(0, 0.1, Some(101))])), 1.0);
}

fn filtered(f: &dyn Filter, snap: &Snapshot) -> usize {
    let (body, req) = request("m");
    let ctx = SchedulingContext {
        snapshot: snap,
        request: &req,
        body: &body,
        target_model: "m",
        now: Timestamp(1_000_000_000),
        priority: 0,
    };
    let mut c: Vec<EndpointId> = snap.all_ids().collect();
    f.filter(
        &ctx,
        &CycleState::default(),
        &mut c,
        &mut SmallRng::seed_from_u64(0),
    );
    c.len()
}

#[test]
fn utilization_filter_vectors() {
    let d = detector(5.0, 0.8, "200ms", 0.2);
    assert_eq!(filtered(&d, &aged(&[(1, 0.1, Some(0)), (4, 0.7, Some(0))])), 2);
    assert_eq!(filtered(&d, &aged(&[(5, 0.8, Some(0))])), 1);
    assert_eq!(filtered(&d, &aged(&[(5, 0.9, Some(0))])), 1);
    assert_eq!(filtered(&d, &aged(&[(7, 0.1, Some(0)), (1, 0.1, Some(0))])), 1);
    assert_eq!(filtered(&d, &aged(&[(1, 0.97, Some(0)), (1, 0.5, Some(0))])), 1);
    assert_eq!(
        filtered(&d, &aged(&[(1, 0.1, Some(500)), (1, 0.1, Some(500))])),
        2,
        "all stale: fail open"
    );
    assert_eq!(
        filtered(&d, &aged(&[(9, 0.99, Some(0)), (9, 0.99, Some(0))])),
        2,
        "all over: fail open"
    );
}

#[test]
fn least_queue_filter_uses_integer_division() {
    let f = LeastQueueFilter::new(PluginName {
        kind: "least-queue-filter",
        name: "f".into(),
    });
    // min 0, max 10, n 3 → keep q ≤ 3.
    assert_eq!(
        filtered(
            &f,
            &aged(&[(0, 0.0, Some(0)), (3, 0.0, Some(0)), (10, 0.0, Some(0))])
        ),
        2
    );
}

#[test]
fn sheddable_requests_are_refused_only_when_saturated() {
    let s = build_scheduler(&EndpointPickerConfig::default_config()).unwrap();
    let (body, req) = request("m");
    let check = |snap: &Snapshot, priority: i32| {
        let ctx = SchedulingContext {
            snapshot: snap,
            request: &req,
            body: &body,
            target_model: "m",
            now: Timestamp(1_000_000_000),
            priority,
        };
        s.shed_check(&ctx, &snap.all_ids().collect::<Vec<_>>())
    };
    let saturated = aged(&[(10, 0.9, Some(0))]);
    let idle = aged(&[(0, 0.1, Some(0))]);
    assert_eq!(check(&saturated, 0), Ok(()));
    assert_eq!(check(&idle, -1), Ok(()));
    assert_eq!(check(&saturated, -1), Err(SchedulingError::Saturated));
    assert_eq!(
        check(&aged(&[]), -1),
        Err(SchedulingError::Saturated),
        "no candidates count as saturated"
    );
    assert_eq!(
        SchedulingError::Saturated.to_string(),
        "system saturated, sheddable request dropped"
    );
}

#[test]
fn objectives_from_config_set_priorities() {
    let cfg = doc(
        "- type: queue-scorer\n- type: inference-objectives\n  parameters:\n    objectives:\n    - {name: batch, priority: -1}\n    - {name: chat, priority: 2}\n",
        "  - pluginRef: queue-scorer\n",
    );
    let s = build_scheduler(&cfg).unwrap();
    assert_eq!(s.priority_of(Some("batch")), -1);
    assert_eq!(s.priority_of(Some("chat")), 2);
    assert_eq!(s.priority_of(Some("unknown")), 0);
    assert_eq!(s.priority_of(None), 0);
}

#[test]
fn v051_decision_tree_config_loads_and_routes() {
    let cfg = doc(
        "\
- type: low-queue-filter
  parameters: {threshold: 128}
- type: lora-affinity-filter
  parameters: {threshold: 0.999}
- type: least-queue-filter
- type: least-kv-cache-filter
- type: decision-tree-filter
  name: tree
  parameters:
    current: {pluginRef: low-queue-filter}
    nextOnSuccess:
      decisionTree:
        current: {pluginRef: lora-affinity-filter}
        nextOnSuccessOrFailure:
          decisionTree:
            current: {pluginRef: least-queue-filter}
            nextOnSuccessOrFailure:
              decisionTree:
                current: {pluginRef: least-kv-cache-filter}
    nextOnFailure:
      decisionTree:
        current: {pluginRef: least-queue-filter}
        nextOnSuccessOrFailure:
          decisionTree:
            current: {pluginRef: lora-affinity-filter}
            nextOnSuccessOrFailure:
              decisionTree:
                current: {pluginRef: least-kv-cache-filter}
- type: random-picker
",
        "  - pluginRef: tree\n  - pluginRef: random-picker\n",
    );
    // Only pod 1 has the adapter loaded; queues equal; the tree keeps pod 1.
    let snap = pods(&[(1, 0.5, &["a"]), (1, 0.5, &["lora-x"]), (1, 0.5, &["a"])], 1);
    for seed in 0..20 {
        assert_eq!(
            decide(&cfg, &snap, "lora-x", seed).unwrap().endpoints,
            vec![EndpointId(1)]
        );
    }
}

#[test]
fn decision_tree_cycles_and_bad_refs_fail_at_load() {
    let cfg = doc(
        "- type: decision-tree-filter\n  name: a\n  parameters: {current: {pluginRef: b}}\n- type: decision-tree-filter\n  name: b\n  parameters: {current: {pluginRef: a}}\n- type: queue-scorer\n  name: q\n- type: decision-tree-filter\n  name: c\n  parameters: {current: {pluginRef: q}}\n",
        "  - pluginRef: a\n",
    );
    let Err(crate::config::ConfigError::Invalid { issues }) = build_scheduler(&cfg) else {
        panic!("expected errors")
    };
    let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
    assert!(text.iter().any(|t| t.contains("cycle")), "{text:?}");
    assert!(
        text.iter()
            .any(|t| t == "plugins[3].parameters.current.pluginRef: plugin \"q\" is not a filter"),
        "{text:?}"
    );
}

/// Picks a run of 100 requests from `cfg` over `snap`, each counted in flight on its endpoint
/// (10 estimated tokens) as the ext_proc service does, none finished: how many went where.
fn burst_counts(cfg: &EndpointPickerConfig, snap: &Snapshot) -> [u32; 3] {
    let s = build_scheduler(cfg).unwrap();
    let (body, req) = request("m");
    let mut rng = SmallRng::seed_from_u64(9);
    let mut counts = [0u32; 3];
    let mut running = Vec::new();
    for _ in 0..100 {
        let ctx = SchedulingContext {
            snapshot: snap,
            request: &req,
            body: &body,
            target_model: "m",
            now: Timestamp(0),
            priority: 0,
        };
        let d = s
            .schedule(
                &ctx,
                snap.all_ids().collect(),
                &mut Scratch::default(),
                &mut rng,
                None,
            )
            .unwrap();
        let e = snap.get(d.endpoints[0]).unwrap();
        running.push(crate::datastore::InFlight::start(&e.live, 10, 0));
        counts[d.endpoints[0].index()] += 1;
    }
    counts
}

/// Upstream scorers read the scraped gauges only: requests this EPP has sent since the scrape do
/// not move the decision (the Go EPP's behaviour, which the ported live cases pin through Envoy).
#[test]
fn upstream_scorers_ignore_the_requests_sent_since_the_scrape() {
    let cfg = doc(
        "- type: queue-scorer\n- type: kv-cache-utilization-scorer\n",
        "  - pluginRef: queue-scorer\n  - pluginRef: kv-cache-utilization-scorer\n",
    );
    let snap = pods(&[(0, 0.3, &[]), (1, 0.3, &[]), (1, 0.3, &[])], 0);
    assert_eq!(burst_counts(&cfg, &snap), [100, 0, 0]);
}

/// The in-flight signal is what spreads a burst between two scrapes: `token-load-scorer` reads
/// the tokens dispatched and not yet finished, so each pick makes its endpoint less attractive.
#[test]
fn token_load_spreads_a_burst_between_scrapes() {
    let cfg = doc(
        "- type: queue-scorer\n- type: token-load-scorer\n  parameters: {queueThresholdTokens: 1000}\n- type: inflight-load-producer\n",
        "  - pluginRef: queue-scorer\n  - pluginRef: token-load-scorer\n",
    );
    // Same scraped queues: each pick lowers its endpoint's token-load score by 0.01, so the
    // picks go round the least-loaded endpoints.
    let snap = pods(&[(1, 0.3, &[]), (1, 0.3, &[]), (1, 0.3, &[])], 0);
    let mut counts = burst_counts(&cfg, &snap);
    counts.sort_unstable();
    assert_eq!(counts, [33, 33, 34]);
}

#[test]
fn prefix_affinity_sticks_until_the_sticky_pod_is_too_slow() {
    let cfg = doc(
        "- type: prefix-cache-affinity-filter\n  parameters: {maxTTFTPenaltyMs: 1000, peakPrefillThroughput: 10000}\n- type: queue-scorer\n",
        "  - pluginRef: prefix-cache-affinity-filter\n  - pluginRef: queue-scorer\n",
    );
    let s = build_scheduler(&cfg).unwrap();
    let snap = pods(&[(0, 0.1, &[]), (0, 0.1, &[]), (0, 0.1, &[])], 0);
    let body = format!(
        r#"{{"model":"m","prompt":"{}"}}"#,
        "shared system prompt ".repeat(50)
    )
    .into_bytes();
    let req = parse_request("/v1/completions", &body).unwrap();
    let mut rng = SmallRng::seed_from_u64(4);
    let run = |rng: &mut SmallRng| {
        let ctx = SchedulingContext {
            snapshot: &snap,
            request: &req,
            body: &body,
            target_model: "m",
            now: Timestamp(0),
            priority: 0,
        };
        let d = s
            .schedule(&ctx, snap.all_ids().collect(), &mut Scratch::default(), rng, None)
            .unwrap();
        s.pre_request(&snap, &d, None);
        d.endpoints[0]
    };
    let first = run(&mut rng);
    for _ in 0..5 {
        assert_eq!(run(&mut rng), first, "sticky while cheap");
    }
    // 20,000 in-flight tokens at 10,000 tok/s = 2 s estimated TTFT > 1 s penalty: released.
    snap.get(first).unwrap().live.start(20_000);
    let mut others = 0;
    for _ in 0..20 {
        if run(&mut rng) != first {
            others += 1;
        }
    }
    assert!(others > 0, "stickiness released once the sticky pod is saturated");
}
