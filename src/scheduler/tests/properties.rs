//! Property tests of scheduler and prefix-index invariants.

use proptest::prelude::*;
use rand::{SeedableRng, rngs::SmallRng};

use crate::{
    clock::Timestamp,
    config::EndpointPickerConfig,
    datastore::{EndpointId, EndpointUid, testing::SnapshotBuilder},
    parser::parse_request,
    prefix::{BlockHash, BlockingParams, PrefixIndex, block_hashes},
    scheduler::{
        CycleState, PluginName, SchedulingContext, Scratch, build_scheduler, plugin::Scorer, scorers::*,
    },
};

fn metrics() -> impl Strategy<Value = (u32, Option<f64>)> {
    (0u32..1000, prop::option::of(0.0f64..=1.0))
}

proptest! {
    #[test]
    fn scores_stay_in_unit_range_and_picks_are_candidates(pods in prop::collection::vec(metrics(), 1..20), subset_mask in any::<u32>(), seed in any::<u64>()) {
        let mut b = SnapshotBuilder::new();
        for (i, (q, kv)) in pods.iter().enumerate() {
            let (q, kv) = (*q, *kv);
            b = b.endpoint(&format!("10.1.{}.{}:8000", i / 200, i % 200 + 1), move |m| { m.waiting = q; m.running = q / 2; m.kv_usage = kv; });
        }
        let snap = b.build();
        let body = br#"{"model":"m","prompt":"hello world, this is a prompt long enough to hash into blocks"}"#;
        let req = parse_request("/v1/completions", body).unwrap();
        let ctx = SchedulingContext { snapshot: &snap, request: &req, body, target_model: "m", now: Timestamp(0), priority: 0 };
        let mut candidates: Vec<EndpointId> = snap.all_ids().filter(|id| subset_mask & (1 << (id.0 % 32)) != 0).collect();
        if candidates.is_empty() { candidates.push(EndpointId(0)); }
        let name = PluginName { kind: "p", name: "p".into() };
        let scorers: Vec<Box<dyn Scorer>> = vec![
            Box::new(QueueScorer::new(name.clone(), QueueSignal::Waiting)),
            Box::new(QueueScorer::new(name.clone(), QueueSignal::Running)),
            Box::new(KvCacheScorer::new(name.clone())),
            Box::new(LoraAffinityScorer::new(name.clone())),
            Box::new(TokenLoadScorer::new(name.clone(), &TokenLoadParams::default())),
            Box::new(PrefixCacheScorer::new(name)),
        ];
        for s in &scorers {
            let mut out = vec![f64::NAN; candidates.len()];
            s.score(&ctx, &CycleState::default(), &candidates, &mut out);
            prop_assert!(out.iter().all(|v| (0.0..=1.0).contains(v)), "{:?}", out);
        }
        let sched = build_scheduler(&EndpointPickerConfig::default_config()).unwrap();
        let d = sched.schedule(&ctx, candidates.clone(), &mut Scratch::default(), &mut SmallRng::seed_from_u64(seed), None).unwrap();
        prop_assert_eq!(d.endpoints.len(), 1);
        prop_assert!(candidates.contains(&d.endpoints[0]));
    }

    #[test]
    fn equal_prompts_give_equal_hashes(prompt in ".{0,400}", model in "[a-z]{1,8}", block in 1usize..64) {
        let params = BlockingParams { block_bytes: block, max_blocks: 256 };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        block_hashes(&model, None, prompt.as_bytes(), params, &mut a);
        block_hashes(&model, None, prompt.as_bytes(), params, &mut b);
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(a.len(), if prompt.len() < block { 0 } else { prompt.len().div_ceil(block).min(256) });
    }

    #[test]
    fn index_respects_capacity_and_purges_removed_endpoints(
        ops in prop::collection::vec((0u32..4, prop::collection::vec(0u64..64, 1..20)), 1..60),
        capacity in 1usize..32,
    ) {
        let idx = PrefixIndex::new();
        for (ep, hashes) in &ops {
            let hs: Vec<BlockHash> = hashes.iter().copied().map(BlockHash).collect();
            idx.insert(EndpointUid(*ep), &hs, capacity);
            prop_assert!(idx.entries() <= 4 * capacity);
            for e in 0..4 {
                prop_assert!(idx.entries_of(EndpointUid(e)) <= capacity);
            }
        }
        idx.retain_endpoints(|u| u != EndpointUid(0));
        prop_assert_eq!(idx.entries_of(EndpointUid(0)), 0);
        let all: Vec<BlockHash> = (0u64..64).map(BlockHash).collect();
        for h in &all {
            let mut out = Vec::new();
            idx.match_blocks(std::slice::from_ref(h), &mut out);
            prop_assert!(out.iter().all(|(u, _)| *u != EndpointUid(0)));
        }
    }
}
