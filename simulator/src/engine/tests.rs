use std::sync::Arc;

use super::*;

fn small() -> EngineProfile {
    EngineProfile {
        num_gpu_blocks: 1_000,
        ..EngineProfile::h100()
    }
}

fn request(id: u64, prompt: u32, output: u32, shared: u64) -> EngineRequest {
    let blocks = prompt / 16;
    EngineRequest {
        id,
        prompt_tokens: prompt,
        output_tokens: output,
        block_hashes: (0..u64::from(blocks))
            .map(|b| shared * 1_000_000 + b)
            .collect::<Arc<[u64]>>(),
        adapter: None,
    }
}

/// Run until idle; returns (time of each event, event).
fn run(engine: &mut Engine) -> Vec<(u64, EngineEvent)> {
    let mut now = 0;
    let mut out = Vec::new();
    let mut events = Vec::new();
    for _ in 0..100_000 {
        let Some(d) = engine.step(&mut events) else {
            return out;
        };
        now += d;
        out.extend(events.drain(..).map(|e| (now, e)));
    }
    panic!("engine did not drain");
}

#[test]
fn one_request_prefills_then_decodes_to_its_output_length() {
    let mut e = Engine::new(small());
    e.submit(request(1, 1000, 4, 1)).unwrap();
    let events = run(&mut e);
    let kinds: Vec<_> = events.iter().map(|(_, e)| *e).collect();
    assert_eq!(
        kinds,
        vec![
            EngineEvent::FirstToken {
                id: 1,
                cached_tokens: 0
            },
            EngineEvent::Finished {
                id: 1,
                output_tokens: 4
            }
        ]
    );
    let work = StepWork {
        sequences: 1,
        prefill_tokens: 1000,
        prefill_attention_pairs: 1000.0 * 500.0,
        ..Default::default()
    };
    assert_eq!(
        events[0].0,
        e.profile().step_ns(&work),
        "TTFT is one prefill step"
    );
    let g = e.gauges();
    assert_eq!(
        (
            g.prompt_tokens,
            g.generation_tokens,
            g.prefix_queries,
            g.prefix_hits
        ),
        (1000, 4, 1000, 0)
    );
    assert_eq!(g.kv_usage, 0.0, "blocks are free again (cached, not referenced)");
}

#[test]
fn a_repeated_prompt_hits_every_full_block_but_recomputes_the_last_token() {
    let mut e = Engine::new(small());
    e.submit(request(1, 1024, 1, 7)).unwrap();
    run(&mut e);
    e.submit(request(2, 1024, 1, 7)).unwrap();
    let events = run(&mut e);
    // 1,024 tokens = 64 full blocks, but at least one token is recomputed: 63 blocks hit.
    assert_eq!(
        events[0].1,
        EngineEvent::FirstToken {
            id: 2,
            cached_tokens: 1008
        }
    );
    let g = e.gauges();
    assert_eq!((g.prefix_queries, g.prefix_hits), (2048, 1008));
    // A different prompt shares nothing.
    e.submit(request(3, 1024, 1, 8)).unwrap();
    assert_eq!(
        run(&mut e)[0].1,
        EngineEvent::FirstToken {
            id: 3,
            cached_tokens: 0
        }
    );
}

#[test]
fn long_prompts_are_prefilled_in_chunks_of_the_step_budget() {
    let mut e = Engine::new(EngineProfile {
        num_gpu_blocks: 4_000,
        ..EngineProfile::h100()
    });
    e.submit(request(1, 20_000, 1, 1)).unwrap();
    let mut events = Vec::new();
    let mut steps = 0;
    while e.step(&mut events).is_some() {
        steps += 1;
    }
    assert_eq!(steps, 3, "8,192 + 8,192 + 3,616 tokens");
    assert_eq!(e.gauges().prompt_tokens, 20_000);
}

#[test]
fn requests_beyond_max_num_seqs_wait() {
    let mut e = Engine::new(EngineProfile {
        max_num_seqs: 2,
        ..small()
    });
    for id in 0..5 {
        e.submit(request(id, 32, 10, id)).unwrap();
    }
    let mut events = Vec::new();
    e.step(&mut events);
    let g = e.gauges();
    assert_eq!((g.running, g.waiting), (2, 3));
    let all = run(&mut e);
    assert_eq!(
        all.iter()
            .filter(|(_, e)| matches!(e, EngineEvent::Finished { .. }))
            .count(),
        5
    );
}

#[test]
fn running_out_of_blocks_preempts_the_latest_admitted_request() {
    // 10 blocks of 16 tokens: two 64-token prompts (4 blocks each) fit, their decodes do not.
    let mut e = Engine::new(EngineProfile {
        num_gpu_blocks: 10,
        ..EngineProfile::h100()
    });
    e.submit(request(1, 64, 40, 1)).unwrap();
    e.submit(request(2, 64, 40, 2)).unwrap();
    let events = run(&mut e);
    assert!(e.gauges().preemptions >= 1);
    let finished: Vec<_> = events
        .iter()
        .filter_map(|(_, e)| match e {
            EngineEvent::Finished { id, output_tokens } => Some((*id, *output_tokens)),
            _ => None,
        })
        .collect();
    assert_eq!(
        finished,
        vec![(1, 40), (2, 40)],
        "the first admitted request keeps going first"
    );
}

#[test]
fn max_loras_keeps_a_second_adapter_waiting_and_counts_loads() {
    let mut e = Engine::new(small());
    let lora = |id: u64, name: &str| EngineRequest {
        adapter: Some(name.into()),
        ..request(id, 32, 5, id)
    };
    e.submit(lora(1, "a")).unwrap();
    e.submit(lora(2, "b")).unwrap();
    e.submit(lora(3, "a")).unwrap();
    let mut events = Vec::new();
    e.step(&mut events);
    let g = e.gauges();
    assert_eq!((g.running, g.waiting), (2, 1), "a and a run, b waits");
    assert_eq!(g.running_adapters, vec![Arc::<str>::from("a")]);
    assert_eq!(g.waiting_adapters, vec![Arc::<str>::from("b")]);
    run(&mut e);
    assert_eq!(e.gauges().lora_loads, 2);
}

#[test]
fn impossible_requests_are_refused() {
    let mut e = Engine::new(small());
    assert_eq!(
        e.submit(request(1, 131_000, 100, 1)).unwrap_err(),
        Refusal::TooLong {
            max: 131_072,
            requested: 131_100
        }
    );
    assert_eq!(
        e.submit(request(2, 16_001, 16, 1)).unwrap_err(),
        Refusal::ExceedsCache {
            needed: 1002,
            capacity: 1_000
        }
    );
    assert!(e.is_idle());
}

#[test]
fn an_aborted_request_leaves_and_frees_its_blocks() {
    let mut e = Engine::new(small());
    e.submit(request(1, 320, 50, 1)).unwrap();
    e.submit(request(2, 320, 50, 2)).unwrap();
    let mut events = Vec::new();
    e.step(&mut events);
    assert!(e.gauges().kv_usage > 0.0);
    assert!(e.abort(1));
    assert!(!e.abort(1), "already gone");
    assert!(e.abort(2));
    assert!(e.is_idle());
    assert_eq!(e.gauges().kv_usage, 0.0);
    assert_eq!(e.step(&mut events), None);
}

/// Submit `req`, run to idle and return its first token's time, ns.
fn actual_ttft(engine: &mut Engine, req: EngineRequest) -> u64 {
    let id = req.id;
    engine.submit(req).unwrap();
    run(engine)
        .into_iter()
        .find(|(_, e)| matches!(e, EngineEvent::FirstToken { id: i, .. } if *i == id))
        .map(|(t, _)| t)
        .unwrap()
}

/// The oracle's estimate is the engine's own timing: exact on an idle engine, with or without a
/// cached prefix, and close behind queued prefill work.
#[test]
fn predicted_ttft_follows_the_engine() {
    let mut e = Engine::new(small());
    let cold = request(1, 4_000, 1, 1);
    let predicted = e.predict_ttft_ns(&cold);
    assert_eq!(e.cached_tokens(&cold), 0);
    let actual = actual_ttft(&mut e, cold);
    assert!(predicted.abs_diff(actual) <= 2, "{predicted} vs {actual}");

    // The same prefix again: 3,984 tokens cached (the last token is always computed).
    let warm = request(2, 4_000, 1, 1);
    assert_eq!(e.cached_tokens(&warm), 3_984);
    let predicted_warm = e.predict_ttft_ns(&warm);
    let actual_warm = actual_ttft(&mut e, warm);
    assert!(
        predicted_warm.abs_diff(actual_warm) <= 2,
        "{predicted_warm} vs {actual_warm}"
    );
    assert!(predicted_warm * 3 < predicted, "{predicted_warm} vs {predicted}");

    // Behind three long prompts: four steps of prefill before its first token.
    let mut busy = Engine::new(small());
    for id in 10..13 {
        busy.submit(request(id, 8_000, 2, id)).unwrap();
    }
    let late = request(20, 2_000, 1, 20);
    let predicted_late = busy.predict_ttft_ns(&late);
    let actual_late = actual_ttft(&mut busy, late);
    let error = predicted_late.abs_diff(actual_late) as f64 / actual_late as f64;
    assert!(error < 0.15, "{predicted_late} vs {actual_late}");
    assert!(predicted_late > 3 * predicted, "{predicted_late}");
}

/// An adapter that cannot join a batch full of another adapter waits for it, and pays its load.
#[test]
fn predicted_ttft_waits_for_the_adapter_slot() {
    let lora = |id, adapter: &str, output| EngineRequest {
        adapter: Some(adapter.into()),
        ..request(id, 512, output, id)
    };
    let mut e = Engine::new(small());
    let idle = e.predict_ttft_ns(&lora(1, "a", 1));
    e.submit(lora(2, "b", 200)).unwrap();
    let mut events = Vec::new();
    e.step(&mut events);
    let blocked = e.predict_ttft_ns(&lora(3, "a", 1));
    let same = e.predict_ttft_ns(&lora(4, "b", 1));
    assert!(
        blocked > same + 100 * e.profile().step_ns(&StepWork::default()),
        "{blocked} vs {same}"
    );
    assert!(
        idle > e.predict_ttft_ns(&request(5, 512, 1, 5)),
        "a cold adapter pays its load"
    );
}
