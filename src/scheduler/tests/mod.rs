//! Scheduler behaviour on the upstream worked examples and config errors.

use rand::{SeedableRng, rngs::SmallRng};

use super::*;
use crate::{
    clock::Timestamp,
    config::{ConfigError, EndpointPickerConfig},
    datastore::{
        EndpointId, Snapshot,
        testing::{SnapshotBuilder, hermetic_pods},
    },
    parser::parse_request,
};

fn config(profile: &str, plugins: &str) -> EndpointPickerConfig {
    let doc = format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n{plugins}schedulingProfiles:\n- name: default\n  plugins:\n{profile}"
    );
    EndpointPickerConfig::from_yaml(&doc).unwrap()
}

fn run(s: &Scheduler, snap: &Snapshot, body: &[u8], rng: &mut SmallRng) -> Result<Decision, SchedulingError> {
    let req = parse_request("/v1/completions", body).unwrap();
    let ctx = SchedulingContext {
        snapshot: snap,
        request: &req,
        body,
        target_model: &req.model,
        now: Timestamp(0),
        priority: 0,
    };
    let d = s.schedule(&ctx, snap.all_ids().collect(), &mut Scratch::default(), rng, None)?;
    s.pre_request(snap, &d, None);
    Ok(d)
}

#[test]
fn queue_plus_kv_picks_the_upstream_winner() {
    let cfg = config(
        "  - pluginRef: queue-scorer\n  - pluginRef: kv-cache-utilization-scorer\n",
        "- type: queue-scorer\n- type: kv-cache-utilization-scorer\n",
    );
    let s = build_scheduler(&cfg).unwrap();
    let snap = hermetic_pods();
    let mut rng = SmallRng::seed_from_u64(7);
    for _ in 0..20 {
        let d = run(&s, &snap, br#"{"model":"m","prompt":"test1"}"#, &mut rng).unwrap();
        assert_eq!(d.endpoints, vec![EndpointId(1)]);
    }
}

#[test]
fn weights_are_not_normalised() {
    // queue: P0 .7, P1 1, P2 0; kv: .8 .9 .8. Weight queue 0, kv 1 → P1 (0.9) still wins, and
    // with queue 1, kv 10 → P0 8.7 < P1 10, P2 8.0.
    let cfg = config(
        "  - pluginRef: queue-scorer\n    weight: 1\n  - pluginRef: kv-cache-utilization-scorer\n    weight: 10\n  - pluginRef: picker\n",
        "- type: queue-scorer\n- type: kv-cache-utilization-scorer\n- type: max-score-picker\n  name: picker\n  parameters:\n    maxNumOfEndpoints: 3\n",
    );
    let s = build_scheduler(&cfg).unwrap();
    let d = run(
        &s,
        &hermetic_pods(),
        br#"{"model":"m","prompt":"x"}"#,
        &mut SmallRng::seed_from_u64(1),
    )
    .unwrap();
    assert_eq!(d.endpoints, vec![EndpointId(1), EndpointId(0), EndpointId(2)]);
}

#[test]
fn prefix_affinity_follows_the_first_pick() {
    let s = build_scheduler(&EndpointPickerConfig::default_config()).unwrap();
    let snap = SnapshotBuilder::new()
        .endpoint("10.0.0.1:8000", |_| {})
        .endpoint("10.0.0.2:8000", |_| {})
        .endpoint("10.0.0.3:8000", |_| {})
        .build();
    let prompt = "You are a helpful assistant. ".repeat(40);
    let body = format!(r#"{{"model":"m","prompt":"{prompt}"}}"#);
    let mut rng = SmallRng::seed_from_u64(3);
    let first = run(&s, &snap, body.as_bytes(), &mut rng).unwrap();
    let m = first.state.prefix.as_ref().unwrap();
    assert!(m.hashes.len() > 10);
    assert!(m.matched.is_empty());
    for _ in 0..10 {
        let d = run(&s, &snap, body.as_bytes(), &mut rng).unwrap();
        assert_eq!(d.endpoints, first.endpoints);
        let m = d.state.prefix.unwrap();
        assert_eq!(m.matched.len(), 1);
        assert_eq!(m.matched[0].1 as usize, m.hashes.len());
    }
}

#[test]
fn empty_candidates_are_an_error() {
    let s = build_scheduler(&EndpointPickerConfig::default_config()).unwrap();
    let snap = SnapshotBuilder::new().build();
    let err = run(
        &s,
        &snap,
        br#"{"model":"m","prompt":"x"}"#,
        &mut SmallRng::seed_from_u64(0),
    )
    .unwrap_err();
    assert_eq!(err, SchedulingError::NoCandidates);
}

#[test]
fn endpoints_refusing_connections_get_no_traffic_while_another_answers() {
    use crate::datastore::ScrapeFailure;
    let s = build_scheduler(&EndpointPickerConfig::default_config()).unwrap();
    // Pod 0 crashed after its last good scrape showed it idle; the others are busier but alive.
    // A timeout says nothing about serving: pod 2 stays a candidate.
    let snap = SnapshotBuilder::new()
        .endpoint("10.0.0.1:8000", |m| m.last_error = Some(ScrapeFailure::Connect))
        .endpoint("10.0.0.2:8000", |m| m.waiting = 4)
        .endpoint("10.0.0.3:8000", |m| {
            m.waiting = 2;
            m.last_error = Some(ScrapeFailure::Timeout);
        })
        .build();
    let mut rng = SmallRng::seed_from_u64(0);
    for _ in 0..10 {
        let d = run(&s, &snap, br#"{"model":"m","prompt":"x"}"#, &mut rng).unwrap();
        assert_eq!(d.endpoints, vec![EndpointId(2)]);
    }
    // Every endpoint unreachable: still routed (fail open), by the last known load.
    let all_down = SnapshotBuilder::new()
        .endpoint("10.0.0.1:8000", |m| {
            m.waiting = 3;
            m.last_error = Some(ScrapeFailure::Connect);
        })
        .endpoint("10.0.0.2:8000", |m| m.last_error = Some(ScrapeFailure::Connect))
        .build();
    let d = run(&s, &all_down, br#"{"model":"m","prompt":"x"}"#, &mut rng).unwrap();
    assert_eq!(d.endpoints, vec![EndpointId(1)]);
}

/// A pod whose page has never been read (it never parses) shows no load at all; its zero queue
/// must not win: it gets no traffic while a scraped pod answers. Once scraped, a failing page
/// keeps the pod routable on its last metrics.
#[test]
fn endpoints_never_scraped_get_no_traffic_while_a_scraped_one_answers() {
    use crate::datastore::ScrapeFailure;
    let s = build_scheduler(&EndpointPickerConfig::default_config()).unwrap();
    let snap = SnapshotBuilder::new()
        .endpoint("10.0.0.1:8000", |m| {
            m.scraped_at = None;
            m.last_error = Some(ScrapeFailure::Parse);
        })
        .endpoint("10.0.0.2:8000", |m| m.waiting = 4)
        .endpoint("10.0.0.3:8000", |m| {
            m.waiting = 9;
            m.last_error = Some(ScrapeFailure::Parse);
        })
        .build();
    let mut rng = SmallRng::seed_from_u64(0);
    for _ in 0..10 {
        let d = run(&s, &snap, br#"{"model":"m","prompt":"x"}"#, &mut rng).unwrap();
        assert_eq!(d.endpoints, vec![EndpointId(1)]);
    }
    // Not yet attempted (a pod just discovered): a candidate like any other.
    let fresh = SnapshotBuilder::new()
        .endpoint("10.0.0.1:8000", |m| m.scraped_at = None)
        .endpoint("10.0.0.2:8000", |m| m.waiting = 4)
        .build();
    let d = run(&s, &fresh, br#"{"model":"m","prompt":"x"}"#, &mut rng).unwrap();
    assert_eq!(d.endpoints, vec![EndpointId(0)]);
}

#[test]
fn unknown_types_and_bad_parameters_name_their_path() {
    let cfg = config(
        "  - pluginRef: nope\n  - pluginRef: picker\n",
        "- type: nope\n- type: max-score-picker\n  name: picker\n  parameters:\n    maxNumOfEndpoints: 1\n    extra: 2\n",
    );
    let Err(ConfigError::Invalid { issues }) = build_scheduler(&cfg) else {
        panic!("expected errors");
    };
    let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 2, "{text:?}");
    assert_eq!(text[0], "plugins[0].type: unknown plugin type \"nope\"");
    assert!(
        text[1].starts_with("plugins[1].parameters.extra: unknown field `extra`"),
        "{}",
        text[1]
    );

    let cfg = config(
        "  - pluginRef: queue-scorer\n",
        "- type: queue-scorer\n  parameters: {x: 1}\n",
    );
    let Err(ConfigError::Invalid { issues }) = build_scheduler(&cfg) else {
        panic!("expected errors");
    };
    assert_eq!(issues[0].path, "plugins[0].parameters");
}

#[test]
fn scores_out_of_range_are_clamped_and_nan_is_zero() {
    use std::sync::Arc;

    use super::plugin::{CycleState, Scorer};
    use super::profile::{Profile, WeightedScorer};

    struct Wild(PluginName);
    impl Scorer for Wild {
        fn name(&self) -> &PluginName {
            &self.0
        }
        fn score(&self, _: &SchedulingContext<'_>, _: &CycleState, _: &[EndpointId], out: &mut [f64]) {
            out.copy_from_slice(&[-0.5, 1.5, f64::NAN]);
        }
    }
    let name = PluginName {
        kind: "wild",
        name: "wild".into(),
    };
    let picker = pickers::MaxScorePicker::new(
        name.clone(),
        &pickers::PickerParams {
            max_num_of_endpoints: 3,
        },
    );
    let profile = Profile {
        name: "p".into(),
        filters: vec![],
        scorers: vec![WeightedScorer {
            scorer: Arc::new(Wild(name)),
            weight: 2.0,
        }],
        picker: Arc::new(picker),
    };
    let snap = hermetic_pods();
    let body = br#"{"model":"m","prompt":"x"}"#;
    let req = parse_request("/v1/completions", body).unwrap();
    let ctx = SchedulingContext {
        snapshot: &snap,
        request: &req,
        body,
        target_model: "m",
        now: Timestamp(0),
        priority: 0,
    };
    let mut picked = Vec::new();
    let repairs = profile
        .run(
            &ctx,
            &CycleState::default(),
            &mut snap.all_ids().collect(),
            &mut Scratch::default(),
            &mut SmallRng::seed_from_u64(0),
            None,
            &mut picked,
        )
        .unwrap();
    assert_eq!(picked[0], EndpointId(1));
    assert_eq!((repairs.clamped, repairs.non_finite), (2, 1));
}

mod prefill_backlog;
mod properties;
mod unknown_kv;
mod upstream_vectors;

/// Regression (decision-pipeline issue): the prefix index drops an endpoint that left the pool
/// when the pool changes, not while a request is being scheduled.
#[test]
fn departed_endpoints_leave_the_prefix_index_on_pool_change_not_on_the_request_path() {
    let s = build_scheduler(&EndpointPickerConfig::default_config()).unwrap();
    let snap = hermetic_pods();
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(40);
    let body = format!(r#"{{"model":"m","prompt":"{prompt}"}}"#);
    let d = run(&s, &snap, body.as_bytes(), &mut SmallRng::seed_from_u64(1)).unwrap();
    let picked = snap.get(d.endpoints[0]).unwrap().uid;
    let entries = || s.prefix_index_footprint().unwrap().0;
    let before = entries();
    assert!(before > 0);
    let rest: Vec<_> = snap
        .endpoints
        .iter()
        .filter(|e| e.uid != picked)
        .cloned()
        .collect();
    let mut smaller = Snapshot::new(rest, 1, Timestamp(0), true);
    smaller.membership = 1;
    let req = parse_request("/v1/completions", body.as_bytes()).unwrap();
    let ctx = SchedulingContext {
        snapshot: &smaller,
        request: &req,
        body: body.as_bytes(),
        target_model: "m",
        now: Timestamp(0),
        priority: 0,
    };
    let mut rng = SmallRng::seed_from_u64(1);
    s.schedule(
        &ctx,
        smaller.all_ids().collect(),
        &mut Scratch::default(),
        &mut rng,
        None,
    )
    .unwrap();
    assert_eq!(entries(), before, "scheduling does no pool chores");
    s.on_pool_change(&smaller);
    assert_eq!(entries(), 0, "the departed endpoint held every entry");
}

/// Regression (security issue, input clamps): one request asking for 2^63 − 1 output tokens made
/// the tokens-mode concurrency detector call the pool saturated (and refuse every sheddable
/// request) while it ran. The in-flight estimate is now upstream's, from the body's size.
#[test]
fn a_huge_max_tokens_does_not_saturate_the_token_concurrency_detector() {
    let cfg = config(
        "  - pluginRef: queue-scorer\n",
        "- type: queue-scorer\n- type: concurrency-detector\n  parameters: {concurrencyMode: tokens}\n",
    );
    let s = build_scheduler(&cfg).unwrap();
    let snap = hermetic_pods();
    let body = br#"{"model":"m","prompt":"hi","max_tokens":9223372036854775807}"#;
    let req = parse_request("/v1/completions", body).unwrap();
    assert_eq!(
        req.max_output_tokens,
        Some(crate::parser::request::MAX_ACCOUNTED_OUTPUT_TOKENS)
    );
    let _running = crate::datastore::InFlight::start(&snap.endpoints[0].live, req.estimated_load_tokens(), 0);
    let ctx = SchedulingContext {
        snapshot: &snap,
        request: &req,
        body,
        target_model: "m",
        now: Timestamp(0),
        priority: -1,
    };
    // Upstream's estimate reads the body's size, not its limit: 38 tokens in flight against
    // 3 × 1,000,000 of capacity.
    let ids: Vec<_> = snap.all_ids().collect();
    assert_eq!(s.shed_check(&ctx, &ids), Ok(()));
    assert!((s.saturation(&ctx, &ids) - 38.0 / 3_000_000.0).abs() < 1e-12);
}

/// The admission stages run in their documented order, whatever the order of `plugins:`.
#[test]
fn admission_stages_run_guards_then_the_budget_then_the_saturation_gate() {
    let cfg = config(
        "  - pluginRef: queue-scorer\n",
        "- type: token-budget\n- type: queue-scorer\n- type: prompt-guard\n  name: a\n- type: prompt-guard\n  name: b\n",
    );
    let s = build_scheduler(&cfg).unwrap();
    let stages: Vec<&str> = s.admission_stages().map(|n| n.kind).collect();
    assert_eq!(stages, ["prompt-guard", "token-budget", "saturation-gate"]);
    let plain = build_scheduler(&EndpointPickerConfig::default_config()).unwrap();
    assert_eq!(
        plain.admission_stages().map(|n| n.kind).collect::<Vec<_>>(),
        ["saturation-gate"]
    );
}

/// Every registered type name is listed once; the list is the registry table's.
#[test]
fn the_registry_lists_each_plugin_type_once() {
    let types: Vec<&str> = registry::plugin_types().collect();
    let unique: std::collections::BTreeSet<&str> = types.iter().copied().collect();
    assert_eq!(unique.len(), types.len());
    assert_eq!(types.len(), 36);
    for t in [
        plugin_types::QUEUE_SCORER,
        plugin_types::PREFILL_BACKLOG_SCORER,
        plugin_types::TOKEN_BUDGET,
        plugin_types::STATIC_USAGE_LIMIT_POLICY,
    ] {
        assert!(types.contains(&t), "{t}");
    }
}

/// `parser.pluginRef` selects how bodies are read: the passthrough parser reads nothing (any
/// body is accepted, no model, in-flight estimate from the size); a reference to a plugin that
/// is not a parser, or a prompt guard with nothing to scan, is refused at load with its path.
#[test]
fn the_parser_reference_selects_the_passthrough_parser_or_is_refused() {
    let doc = |plugins: &str, parser: &str| {
        EndpointPickerConfig::from_yaml(&format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n{plugins}schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\nparser:\n  pluginRef: {parser}\n"
        ))
        .unwrap()
    };
    let s = build_scheduler(&doc("- type: passthrough-parser\n", "passthrough-parser")).unwrap();
    let req = s.parse_request("/v1/completions", b"not json at all").unwrap();
    assert_eq!(req.api, crate::parser::ApiKind::Passthrough);
    assert_eq!((req.model.as_str(), req.estimated_load_tokens()), ("", 3 + 5));
    let openai = build_scheduler(&doc("- type: openai-parser\n", "openai-parser")).unwrap();
    assert!(
        openai
            .parse_request("/v1/completions", b"not json at all")
            .is_err()
    );

    let issues = |cfg: &EndpointPickerConfig| match build_scheduler(cfg) {
        Err(crate::config::ConfigError::Invalid { issues }) => {
            issues.iter().map(ToString::to_string).collect::<Vec<_>>()
        }
        other => panic!("expected a refusal with issues, got {:?}", other.err()),
    };
    assert_eq!(
        issues(&doc("", "queue-scorer")),
        ["parser.pluginRef: plugin \"queue-scorer\" is not a parser"]
    );
    assert_eq!(
        issues(&doc(
            "- type: passthrough-parser\n- type: prompt-guard\n  parameters: {request: {regex: {builtins: [SSN]}}}\n",
            "passthrough-parser"
        )),
        ["plugins[2]: a prompt-guard needs a parser that reads the prompt; passthrough-parser reads none"]
    );
}

fn flow_config(extra: &str) -> Result<Scheduler, String> {
    let doc = format!(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nplugins:\n- type: queue-scorer\n{extra}"
    );
    let config = EndpointPickerConfig::from_yaml(&doc).map_err(|e| e.to_string())?;
    build_scheduler(&config).map_err(|e| e.to_string())
}

/// The section's references resolve by instance name; the three default policies resolve by
/// type name undeclared, as upstream creates them; the queue replaces the saturation gate.
#[test]
fn flow_control_policies_resolve_by_name() {
    let s = flow_config(
        "- {name: rr, type: round-robin-fairness-policy}
- {name: tw, type: token-weighted-fairness-policy}
- {name: edf, type: edf-ordering-policy}
- {name: limit, type: static-usage-limit-policy, parameters: {threshold: 0.8}}
- {name: cd, type: concurrency-detector}
flowControl:
  maxRequests: 10
  defaultRequestTTL: 2s
  defaultPriorityBand: {fairnessPolicyRef: tw}
  priorityBands:
  - {priority: 5, fairnessPolicyRef: rr, orderingPolicyRef: edf}
  - {priority: -1, fairnessPolicyRef: global-strict-fairness-policy, orderingPolicyRef: fcfs-ordering-policy}
  usageLimitPolicyPluginRef: limit
  saturationDetector: {pluginRef: cd}
",
    )
    .unwrap();
    let f = s.flow_control().expect("on");
    assert_eq!(f.max_requests, 10);
    assert_eq!(f.ttl_ns, 2_000_000_000);
    assert_eq!(f.ceiling, 0.8);
    assert_eq!(f.detector.name().name.as_ref(), "cd");
    assert_eq!(f.band(5).fairness, flow::Fairness::RoundRobin);
    assert_eq!(f.band(5).ordering, flow::Ordering::Edf);
    assert_eq!(f.band(-1).fairness, flow::Fairness::GlobalStrict);
    assert_eq!(f.band(0).fairness, flow::Fairness::TokenWeighted, "the template");
    assert_eq!(f.band(7).fairness, flow::Fairness::TokenWeighted, "the template");
    assert_eq!(
        f.band(-3).fairness,
        flow::Fairness::TokenWeighted,
        "no negative template: the default one"
    );
    assert_eq!(
        s.admission_stages().count(),
        0,
        "no saturation gate: the queue takes its place"
    );

    // Token-weighted bands key flows by the budget's tenant first; others by the fairness id.
    let meta = RequestMeta {
        tenant: Some("team-a".into()),
        fairness_id: Some("f1".into()),
        ..RequestMeta::default()
    };
    assert_eq!(s.flow_id(&meta, 0), "team-a");
    assert_eq!(s.flow_id(&meta, 5), "f1");
    assert_eq!(s.flow_id(&RequestMeta::default(), 5), "default-flow");
}

#[test]
fn bad_flow_control_references_are_named() {
    let e = flow_config(
        "- {name: q2, type: queue-scorer}
- {name: edf, type: edf-ordering-policy}
- {name: zero, type: static-usage-limit-policy, parameters: {threshold: 0}}
flowControl:
  priorityBands:
  - {priority: 1, fairnessPolicyRef: missing, orderingPolicyRef: q2}
  - {priority: 2, fairnessPolicyRef: edf, orderingPolicyRef: round-robin-fairness-policy}
  usageLimitPolicyPluginRef: edf
  saturationDetector: {pluginRef: q2}
",
    )
    .err()
    .unwrap();
    for expected in [
        "plugins[3].parameters.threshold: must be a number > 0, got 0",
        "flowControl.priorityBands[0].fairnessPolicyRef: plugin \"missing\" not found",
        "flowControl.priorityBands[0].orderingPolicyRef: plugin \"q2\" is not an ordering policy",
        "flowControl.priorityBands[1].fairnessPolicyRef: plugin \"edf\" is not a fairness policy",
        "flowControl.priorityBands[1].orderingPolicyRef: plugin \"round-robin-fairness-policy\" not found",
        "flowControl.usageLimitPolicyPluginRef: plugin \"edf\" is not a usage-limit policy",
        "flowControl.saturationDetector.pluginRef: plugin \"q2\" is not a saturation detector",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in {e}");
    }
}

/// `flowControl.saturationDetector` is the one detector, for admission too, and upstream reads it
/// without the gate; in `v1` it is the only place.
#[test]
fn the_flow_control_detector_serves_admission_without_the_gate() {
    let doc = "apiVersion: llm-d.ai/v1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- {name: cd, type: concurrency-detector}\nflowControl:\n  saturationDetector: {pluginRef: cd}\n";
    let config = EndpointPickerConfig::from_yaml(doc).unwrap();
    assert!(!config.flow_control_ignored, "a detector alone is not ignored");
    let s = build_scheduler(&config).unwrap();
    assert!(s.flow_control().is_none());
    assert_eq!(s.saturation_detector().name.as_ref(), "cd");
    let stages: Vec<&str> = s.admission_stages().map(|n| n.kind).collect();
    assert_eq!(stages, vec!["saturation-gate"]);

    let not_a_detector = "apiVersion: llm-d.ai/v1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\nflowControl:\n  saturationDetector: {pluginRef: queue-scorer}\n";
    let e = build_scheduler(&EndpointPickerConfig::from_yaml(not_a_detector).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(
            "flowControl.saturationDetector.pluginRef: plugin \"queue-scorer\" is not a saturation detector"
        ),
        "{e}"
    );
}
