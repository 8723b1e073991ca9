//! Engines that report no KV utilization (llama.cpp's `llama-server`, a vLLM page without the
//! gauge): every KV-reading plugin treats *unknown* as neutral, never as an empty cache.

use rand::{SeedableRng, rngs::SmallRng};

use crate::{
    clock::Timestamp,
    config::{EndpointPickerConfig, PluginSpec},
    datastore::{EndpointId, Snapshot, testing::SnapshotBuilder},
    parser::{LlmRequest, parse_request},
    scheduler::{
        CycleState, PluginName, SchedulingContext, Scratch, build_scheduler,
        filters::LeastKvCacheFilter,
        plugin::{Filter, SaturationDetector, Scorer},
        saturation::{UtilizationDetector, UtilizationParams},
        scorers::KvCacheScorer,
    },
};

/// Endpoints `(waiting, kv)`, freshly scraped at time 0.
fn pods(spec: &[(u32, Option<f64>)]) -> Snapshot {
    let mut b = SnapshotBuilder::new();
    for (i, (q, kv)) in spec.iter().enumerate() {
        let (q, kv) = (*q, *kv);
        b = b.endpoint(&format!("10.0.0.{}:8080", i + 1), move |m| {
            m.waiting = q;
            m.kv_usage = kv;
        });
    }
    b.build()
}

fn request() -> (Vec<u8>, LlmRequest) {
    let body = br#"{"model":"m","prompt":"hello"}"#.to_vec();
    let req = parse_request("/v1/completions", &body).unwrap();
    (body, req)
}

fn name(kind: &'static str) -> PluginName {
    PluginName {
        kind,
        name: kind.into(),
    }
}

/// Run `f` with a context over `snap` at time 0.
fn with_ctx<T>(snap: &Snapshot, f: impl FnOnce(&SchedulingContext<'_>, Vec<EndpointId>) -> T) -> T {
    let (body, req) = request();
    let ctx = SchedulingContext {
        snapshot: snap,
        request: &req,
        body: &body,
        target_model: "m",
        now: Timestamp(0),
        priority: 0,
    };
    f(&ctx, snap.all_ids().collect())
}

fn kv_scores(spec: &[(u32, Option<f64>)]) -> Vec<f64> {
    let snap = pods(spec);
    with_ctx(&snap, |ctx, ids| {
        let mut out = vec![0.0; ids.len()];
        KvCacheScorer::new(name("kv-cache-utilization-scorer")).score(
            ctx,
            &CycleState::default(),
            &ids,
            &mut out,
        );
        out
    })
}

fn least_kv_kept(spec: &[(u32, Option<f64>)]) -> Vec<u32> {
    let snap = pods(spec);
    with_ctx(&snap, |ctx, mut ids| {
        LeastKvCacheFilter::new(name("least-kv-cache-filter")).filter(
            ctx,
            &CycleState::default(),
            &mut ids,
            &mut SmallRng::seed_from_u64(0),
        );
        ids.into_iter().map(|id| id.0).collect()
    })
}

#[test]
fn kv_scorer_gives_unknown_the_mean_of_the_known_scores() {
    assert_eq!(
        kv_scores(&[(0, Some(0.25)), (0, None), (0, Some(0.75))]),
        vec![0.75, 0.5, 0.25]
    );
    // Equal known values: the unknown endpoint ties exactly, rounding cannot tip it.
    assert_eq!(
        kv_scores(&[(0, Some(0.1)), (0, Some(0.1)), (0, Some(0.1)), (0, None)]),
        vec![0.9, 0.9, 0.9, 0.9]
    );
}

#[test]
fn kv_scorer_ties_a_pool_that_reports_no_kv() {
    assert_eq!(kv_scores(&[(0, None), (3, None), (9, None)]), vec![1.0, 1.0, 1.0]);
}

#[test]
fn least_kv_filter_keeps_everyone_when_no_kv_is_known() {
    assert_eq!(least_kv_kept(&[(0, None), (0, None), (0, None)]), vec![0, 1, 2]);
}

#[test]
fn least_kv_filter_judges_unknown_as_an_average_peer() {
    // Known 0.3 and 0.3: the unknown one stands at 0.3 and stays with them.
    assert_eq!(
        least_kv_kept(&[(0, Some(0.3)), (0, None), (0, Some(0.3))]),
        vec![0, 1, 2]
    );
    // Known 0.1 and 0.9: limit 0.1 + 0.8 / 3 ≈ 0.37; the unknown one counts as 0.5 and goes, as
    // a peer reporting 0.5 would. Before this rule it counted as full (1.0).
    assert_eq!(
        least_kv_kept(&[(0, Some(0.1)), (0, None), (0, Some(0.9))]),
        vec![0]
    );
}

fn detector() -> UtilizationDetector {
    let spec = PluginSpec {
        plugin_type: "utilization-detector".into(),
        name: "d".into(),
        parameters: serde_yaml_ng::Value::Null,
        path: "plugins[0]".into(),
    };
    UtilizationDetector::from_params(name("utilization-detector"), &UtilizationParams::default(), &spec)
        .unwrap()
}

#[test]
fn utilization_detector_reads_only_the_queue_when_kv_is_unknown() {
    let d = detector();
    // Default thresholds: queue 5, KV 0.8. Unknown KV adds nothing; the queue decides.
    let sat = |spec: &[(u32, Option<f64>)]| {
        let snap = pods(spec);
        with_ctx(&snap, |ctx, ids| d.saturation(ctx.snapshot, ctx.now, &ids))
    };
    assert_eq!(sat(&[(0, None)]), 0.0);
    assert_eq!(sat(&[(2, None)]), 0.4);
    assert_eq!(sat(&[(5, None)]), 1.0);
    // (1/5 + max(4/5, 0.4/0.8)) / 2
    assert_eq!(sat(&[(1, None), (4, Some(0.4))]), 0.5);

    let kept = |spec: &[(u32, Option<f64>)]| {
        let snap = pods(spec);
        with_ctx(&snap, |ctx, mut ids| {
            d.filter(
                ctx,
                &CycleState::default(),
                &mut ids,
                &mut SmallRng::seed_from_u64(0),
            );
            ids.into_iter().map(|id| id.0).collect::<Vec<_>>()
        })
    };
    // Unknown KV is room on that axis; a full queue still removes the endpoint.
    assert_eq!(kept(&[(0, None), (6, None), (0, Some(0.95))]), vec![0]);
}

#[test]
fn default_config_routes_a_kv_less_pool_by_queue() {
    let s = build_scheduler(&EndpointPickerConfig::default_config()).unwrap();
    let snap = pods(&[(2, None), (0, None), (1, None)]);
    let (body, req) = request();
    let ctx = SchedulingContext {
        snapshot: &snap,
        request: &req,
        body: &body,
        target_model: "m",
        now: Timestamp(0),
        priority: 0,
    };
    let mut rng = SmallRng::seed_from_u64(3);
    let d = s
        .schedule(
            &ctx,
            snap.all_ids().collect(),
            &mut Scratch::default(),
            &mut rng,
            None,
        )
        .unwrap();
    assert_eq!(d.endpoints, vec![EndpointId(1)]);
}
