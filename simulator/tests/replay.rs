//! Replay end to end: determinism of the `compare` command on the real Mooncake trace, and
//! sanity checks that pin known behaviour of routing policies against the engine model.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::process::Command;

use epp::config::EndpointPickerConfig;
use epp_sim::{
    engine::EngineProfile,
    replay::{Outcome, Placement, ReplaySetup, RunOutcome, baselines, replay, report::Report},
    workload::{
        Workload,
        generate::{self, GeneratorParams},
        suite,
    },
};

const TRACE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/traces/mooncake_conversation_trace.jsonl"
);

fn setup(name: &str, config: EndpointPickerConfig, pods: usize, profile: EngineProfile) -> ReplaySetup {
    ReplaySetup {
        name: name.into(),
        config,
        pods,
        profile,
        scrape_interval_ns: 50_000_000,
        seed: 7,
        start_unix_ms: 0,
        placement: if name == baselines::ORACLE {
            Placement::Oracle
        } else {
            Placement::Scheduler
        },
    }
}

fn baseline(name: &str) -> EndpointPickerConfig {
    baselines::resolve(name).unwrap().1
}

fn run(workload: &Workload, setup: &ReplaySetup) -> (RunOutcome, Report) {
    let outcome = replay(workload, setup, |_| {}).unwrap();
    let report = Report::from_run(&outcome);
    assert_eq!(
        report.completed + report.rejected,
        workload.requests.len(),
        "every request accounted for"
    );
    (outcome, report)
}

#[test]
fn compare_on_the_mooncake_trace_is_byte_identical_across_runs() {
    let dir = tempfile_dir("determinism");
    let out = |n: &str| dir.join(format!("{n}.json"));
    for name in ["a", "b"] {
        let status = Command::new(env!("CARGO_BIN_EXE_epp-sim"))
            .args([
                "compare", "--trace", TRACE, "--format", "mooncake", "--pods", "4", "--limit", "300",
            ])
            .args(["--rate-scale", "2", "--seed", "3"])
            .args([
                "--config",
                "round-robin",
                "--config",
                "random",
                "--config",
                "recommended",
            ])
            .arg("--json")
            .arg(out(name))
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
    }
    let a = std::fs::read(out("a")).unwrap();
    assert_eq!(
        a,
        std::fs::read(out("b")).unwrap(),
        "same trace, configs and seed → same bytes"
    );
    let json: serde_json::Value = serde_json::from_slice(&a).unwrap();
    let results = json["results"].as_array().unwrap();
    let names: Vec<&str> = results.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["round-robin", "random", "recommended"]);
    for r in results {
        for field in [
            "requests",
            "ttft_mean_s",
            "ttft_p50_s",
            "ttft_p90_s",
            "ttft_p99_s",
            "e2e_p90_s",
            "throughput_tokens_per_s",
            "prefix_hit_rate",
            "rejected",
        ] {
            assert!(r[field].is_number(), "{field} in {r}");
        }
        assert_eq!(r["requests"], 300);
        assert!(r["ttft_p50_s"].as_f64().unwrap() <= r["ttft_p99_s"].as_f64().unwrap());
    }
    // A different seed changes the random baseline only.
    let status = Command::new(env!("CARGO_BIN_EXE_epp-sim"))
        .args([
            "compare", "--trace", TRACE, "--format", "mooncake", "--pods", "4", "--limit", "300",
        ])
        .args(["--rate-scale", "2", "--seed", "4", "--config", "random", "--json"])
        .arg(out("c"))
        .output()
        .unwrap();
    assert!(status.status.success());
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(out("c")).unwrap()).unwrap();
    assert_ne!(c["results"][0], results[1]);
}

#[test]
fn compare_names_a_bad_config_and_a_missing_trace() {
    let out = Command::new(env!("CARGO_BIN_EXE_epp-sim"))
        .args(["compare", "--format", "mooncake", "--config", "round-robin"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--format Mooncake needs --trace FILE"));
    let out = Command::new(env!("CARGO_BIN_EXE_epp-sim"))
        .args(["compare", "--trace", TRACE, "--config", "fastest"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown baseline \"fastest\""));
}

#[test]
fn prefix_aware_routing_beats_round_robin_on_shared_prefixes() {
    // 32 system prompts of 2k tokens; each pod's cache holds about 11 of them. Round robin sends
    // every group everywhere and thrashes; prefix-aware routing partitions the groups.
    let params = GeneratorParams {
        requests: 1_500,
        rate: 40.0,
        groups: 32,
        prefix_tokens: 2_048,
        users: 16,
        question_tokens: 64,
        output_tokens: 32,
        ..Default::default()
    };
    let workload = generate::shared_prefix(&params, 11);
    let profile = EngineProfile {
        num_gpu_blocks: 1_500,
        ..EngineProfile::a100()
    };
    let (_, rr) = run(
        &workload,
        &setup("rr", baseline("round-robin"), 4, profile.clone()),
    );
    let (_, prefix) = run(
        &workload,
        &setup("prefix", baseline("upstream-default"), 4, profile),
    );
    assert!(
        prefix.prefix_hit_rate > rr.prefix_hit_rate + 0.3,
        "hit rate {} vs {}",
        prefix.prefix_hit_rate,
        rr.prefix_hit_rate
    );
    assert!(prefix.prefix_hit_rate > 0.7, "{}", prefix.prefix_hit_rate);
    assert!(
        prefix.ttft.mean_s * 2.0 < rr.ttft.mean_s,
        "TTFT {} vs {}",
        prefix.ttft.mean_s,
        rr.ttft.mean_s
    );
}

/// The exact-cache oracle reads the engines' true state and uses no randomness: below
/// capacity, round robin and the upstream default (scraped gauges, an approximate index) are
/// slower and find less in the cache. (Policies that protect the cache for later requests can
/// beat it: it is greedy, one request at a time; BENCHMARKS.md shows where.)
#[test]
fn the_oracle_bounds_round_robin_and_the_upstream_default_on_document_qa() {
    let params = GeneratorParams {
        requests: 600,
        rate: 8.0,
        documents: 60,
        document_tokens: 4_096,
        prefix_tokens: 256,
        question_tokens: 64,
        output_tokens: 64,
        ..Default::default()
    };
    let workload = suite::doc_qa(&params, 3);
    let profile = EngineProfile {
        num_gpu_blocks: 6_000,
        ..EngineProfile::h100()
    };
    let oracle = |seed| {
        let mut s = setup(baselines::ORACLE, baseline(baselines::ORACLE), 4, profile.clone());
        s.seed = seed;
        run(&workload, &s)
    };
    let (first, oracle_report) = oracle(7);
    let (again, _) = oracle(8);
    let pods = |o: &RunOutcome| o.records.iter().map(|r| r.pod).collect::<Vec<_>>();
    assert_eq!(pods(&first), pods(&again), "the oracle uses no randomness");
    assert_eq!(oracle_report.completed, 600);
    // The oracle's pod is not the one the index predicted for: no prediction is checked.
    assert_eq!(oracle_report.index_predicted_hit_rate, 0.0);
    for name in ["round-robin", "upstream-default"] {
        let (_, r) = run(&workload, &setup(name, baseline(name), 4, profile.clone()));
        assert!(
            oracle_report.ttft.mean_s < r.ttft.mean_s,
            "{name}: TTFT {} below the oracle's {}",
            r.ttft.mean_s,
            oracle_report.ttft.mean_s
        );
        assert!(
            oracle_report.prefix_hit_rate > r.prefix_hit_rate,
            "{name}: hits {} above the oracle's {}",
            r.prefix_hit_rate,
            oracle_report.prefix_hit_rate
        );
        // The engine's cached tokens are checked against the index as a server's usage is: the
        // upstream index matches the first 4k tokens of 4.4k-token prompts, so it predicts less
        // than the engine finds, and what it predicts is there.
        if name == "upstream-default" {
            assert!(
                (0.5..r.prefix_hit_rate).contains(&r.index_predicted_hit_rate),
                "{} vs {}",
                r.index_predicted_hit_rate,
                r.prefix_hit_rate
            );
            assert!(r.index_precision > 0.95, "{}", r.index_precision);
        }
    }
}

/// Agent loops share 6k tokens of tool definitions, and each step re-sends the loop's history:
/// past upstream's 256-block (4k-token) match every loop of a group looks the same to the
/// upstream default, which scatters the loops near capacity; the recommended default (whole
/// prompts matched, prefill backlog and in-flight tokens) keeps each loop where its history is
/// without piling loops up.
#[test]
fn the_recommended_default_keeps_agent_loops_fast_near_capacity() {
    let params = GeneratorParams {
        requests: 600,
        rate: 20.0,
        groups: 2,
        prefix_tokens: 6_144,
        question_tokens: 1_024,
        output_tokens: 64,
        turns: 8,
        think_time: 1.0,
        ..Default::default()
    };
    let workload = suite::sessions(&params, 4);
    let profile = EngineProfile::h100();
    let (_, upstream) = run(
        &workload,
        &setup(
            "upstream-default",
            baseline("upstream-default"),
            4,
            profile.clone(),
        ),
    );
    let (_, recommended) = run(
        &workload,
        &setup("recommended", baseline("recommended"), 4, profile),
    );
    assert!(
        recommended.ttft.mean_s * 2.0 < upstream.ttft.mean_s,
        "TTFT mean {} vs {}",
        recommended.ttft.mean_s,
        upstream.ttft.mean_s
    );
    assert!(
        recommended.ttft.p90_s * 2.0 < upstream.ttft.p90_s,
        "TTFT p90 {} vs {}",
        recommended.ttft.p90_s,
        upstream.ttft.p90_s
    );
}

fn mean_ttft(records: &[epp_sim::replay::RequestRecord]) -> f64 {
    let v: Vec<f64> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Completed)
        .map(|r| (r.first_token_ns.unwrap() - r.arrival_ns) as f64 / 1e9)
        .collect();
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn a_saturated_pool_builds_a_queue_and_an_unsaturated_one_does_not() {
    let profile = EngineProfile {
        max_num_seqs: 8,
        ..EngineProfile::a100()
    };
    let params = |rate: f64| GeneratorParams {
        requests: 800,
        rate,
        groups: 4,
        prefix_tokens: 256,
        users: 1_000,
        question_tokens: 256,
        output_tokens: 128,
        ..Default::default()
    };
    // Two pods of 8 sequences at ~128 output tokens of ~15 ms steps: about 8 requests/s in all.
    let growth = |rate: f64| {
        let w = generate::shared_prefix(&params(rate), 5);
        let (outcome, report) = run(&w, &setup("lq", baseline("least-queue"), 2, profile.clone()));
        let n = outcome.records.len();
        let first = mean_ttft(&outcome.records[..n / 4]);
        let last = mean_ttft(&outcome.records[n - n / 4..]);
        let peak = outcome
            .pods
            .iter()
            .flat_map(|p| p.load_per_second.iter().copied())
            .fold(0.0, f64::max);
        (last / first, peak, report)
    };
    let (calm, calm_peak, _) = growth(3.0);
    let (busy, busy_peak, busy_report) = growth(30.0);
    assert!(calm < 2.0, "unsaturated TTFT drifted {calm}x");
    assert!(busy > 4.0, "saturated TTFT grew only {busy}x");
    assert!(
        busy_peak > 10.0 * calm_peak.max(1.0),
        "queue {busy_peak} vs {calm_peak}"
    );
    assert_eq!(
        busy_report.rejected, 0,
        "no EPP-side shedding for priority-0 traffic"
    );
}

#[test]
fn lora_affinity_reduces_adapter_loads() {
    let profile = EngineProfile {
        max_loras: 2,
        ..EngineProfile::h100()
    };
    let params = GeneratorParams {
        requests: 1_000,
        rate: 30.0,
        adapters: 8,
        prefix_tokens: 128,
        question_tokens: 128,
        output_tokens: 64,
        ..Default::default()
    };
    let workload = generate::multi_lora(&params, 9);
    let affinity = EndpointPickerConfig::from_yaml(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\n\
         kind: EndpointPickerConfig\n\
         plugins:\n- type: lora-affinity-scorer\n- type: queue-scorer\n\
         schedulingProfiles:\n- name: default\n  plugins:\n\
         \x20 - pluginRef: lora-affinity-scorer\n    weight: 3\n\
         \x20 - pluginRef: queue-scorer\n    weight: 1\n",
    )
    .unwrap();
    let (_, rr) = run(
        &workload,
        &setup("rr", baseline("round-robin"), 4, profile.clone()),
    );
    let (_, lora) = run(&workload, &setup("lora", affinity, 4, profile));
    assert!(rr.lora_loads > 0);
    assert!(
        lora.lora_loads * 2 < rr.lora_loads,
        "adapter loads {} with affinity vs {} round robin",
        lora.lora_loads,
        rr.lora_loads
    );
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A multi-tenant workload whose requests all arrive before any of them finishes: 300 requests
/// at 1,000/s, each decoding 256 tokens (seconds on the engine model).
fn tenants_workload() -> Workload {
    let params = GeneratorParams {
        requests: 300,
        rate: 1_000.0,
        prefix_tokens: 256,
        question_tokens: 64,
        output_tokens: 256,
        tenants: 3,
        ..Default::default()
    };
    generate::multi_tenant(&params, 21)
}

fn config(plugins: &str) -> EndpointPickerConfig {
    EndpointPickerConfig::from_yaml(&format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n{plugins}schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n"
    ))
    .unwrap()
}

fn of_tenant<'a>(
    w: &'a Workload,
    tenant: &'a str,
) -> impl Iterator<Item = &'a epp_sim::workload::TraceRequest> {
    w.requests
        .iter()
        .filter(move |r| r.tenant.as_deref() == Some(tenant))
}

#[test]
fn a_budget_config_refuses_the_requests_past_its_limit() {
    let workload = tenants_workload();
    let profile = EngineProfile::h100();
    // What one team-0 request reserves: the parser's prompt estimate of the body the replay
    // sends, plus the default output estimate (no max_tokens).
    let (mut text, mut body) = (String::new(), Vec::new());
    let estimates: Vec<u64> = of_tenant(&workload, "team-0")
        .map(|r| {
            epp_sim::workload::chat_body(&workload, r, &profile.model, &mut text, &mut body);
            let parsed = epp::parser::parse_request("/v1/chat/completions", &body).unwrap();
            parsed.estimated_prompt_tokens() + 256
        })
        .collect();
    let per_request = estimates[0];
    assert!(estimates.iter().all(|e| *e == per_request), "same-sized prompts");
    let team0 = estimates.len();
    assert!(team0 > 10, "team-0 sends the most: {team0}");
    // Room for three requests and a half: the fourth and every later one is refused, since no
    // team-0 request finishes (and settles) before the last one arrives.
    let limit = 3 * per_request + per_request / 2;
    let budget = format!(
        "- type: token-budget\n  parameters:\n    window: 3600s\n    tenants:\n      team-0: {{tokens: {limit}}}\n      team-1: {{tokens: 100000000}}\n"
    );
    let (outcome, report) = run(&workload, &setup("budget", config(&budget), 4, profile));
    let last_arrival = of_tenant(&workload, "team-0")
        .map(|r| r.arrival_ns)
        .max()
        .unwrap();
    let first_finish = outcome.records.iter().filter_map(|r| r.finish_ns).min().unwrap();
    assert!(
        last_arrival < first_finish,
        "every arrival precedes every settlement"
    );
    assert_eq!(report.refused, [("budget", team0 - 3)].into());
    assert_eq!(report.rejected_by_epp, team0 - 3);
    assert_eq!(report.completed, workload.requests.len() - (team0 - 3));
    let table = epp_sim::replay::report::markdown(&[report]);
    assert!(
        table.ends_with(&format!("\nRefused by the EPP: budget: budget {}.\n", team0 - 3)),
        "{table}"
    );
}

#[test]
fn a_guard_config_rejects_matching_prompts_before_the_budget_charges_them() {
    let workload = tenants_workload();
    let profile = EngineProfile::h100();
    let prompt = |r: &epp_sim::workload::TraceRequest| {
        let mut text = String::new();
        workload.prompt_text(r, &mut text);
        text
    };
    // team-0's system prompt opens every team-0 request and no other tenant's.
    let first = of_tenant(&workload, "team-0").next().unwrap();
    let phrase: String = prompt(first).chars().take(40).collect();
    assert!(
        phrase.chars().all(|c| c.is_ascii_lowercase() || c == ' '),
        "{phrase:?}"
    );
    let matching = workload
        .requests
        .iter()
        .filter(|r| prompt(r).contains(&phrase))
        .count();
    let team0 = of_tenant(&workload, "team-0").count();
    assert_eq!(matching, team0);
    let guard = format!(
        "- type: prompt-guard\n  parameters:\n    request:\n      regex:\n        action: REJECT\n        matches: [{{pattern: \"{phrase}\", name: TeamZeroPrompt}}]\n"
    );
    let (_, report) = run(&workload, &setup("guard", config(&guard), 4, profile.clone()));
    assert_eq!(report.refused, [("guard", team0)].into());
    // With a budget that would refuse all of team-0 as well, the guard still decides: it runs
    // first, so a rejected prompt costs no budget.
    let both = format!(
        "{guard}- type: token-budget\n  parameters:\n    window: 3600s\n    tenants:\n      team-0: {{tokens: 1}}\n"
    );
    let (_, report) = run(&workload, &setup("both", config(&both), 4, profile));
    assert_eq!(report.refused, [("guard", team0)].into());
}

/// The worst TTFT p90 of the quiet tenants and the flooder's, from a noisy-neighbour run.
fn quiet_and_flooder_p90(workload: &Workload, name: &str) -> (f64, f64) {
    let (outcome, _) = run(workload, &setup(name, baseline(name), 4, EngineProfile::h100()));
    let rows = epp_sim::replay::tenants::tenant_report(&outcome, workload);
    let quiet = rows
        .iter()
        .filter(|r| r.tenant != "team-0")
        .map(|r| r.ttft.p90_s)
        .fold(0.0, f64::max);
    let flooder = rows.iter().find(|r| r.tenant == "team-0").unwrap().ttft.p90_s;
    (quiet, flooder)
}

/// One tenant floods the pool to about twice its capacity. Upstream's flow control (one FCFS
/// queue) makes everyone wait behind the flood; `flow-control-fair` (a gate on in-flight
/// tokens, token-weighted fairness between tenants) keeps the quiet tenants' TTFT low and
/// leaves the wait to the flooder.
#[test]
fn fair_flow_control_leaves_the_flood_to_the_flooder() {
    let params = GeneratorParams {
        requests: 1_500,
        rate: 120.0,
        tenants: 4,
        flood_factor: 10.0,
        ..GeneratorParams::default()
    };
    let workload = generate::noisy_neighbour(&params, 1);
    let (fcfs_quiet, _) = quiet_and_flooder_p90(&workload, "flow-control");
    let (fair_quiet, fair_flooder) = quiet_and_flooder_p90(&workload, "flow-control-fair");
    assert!(
        fair_quiet * 5.0 < fcfs_quiet,
        "quiet p90: fair {fair_quiet} s, fcfs {fcfs_quiet} s"
    );
    assert!(
        fair_flooder > fair_quiet * 5.0,
        "fair: flooder {fair_flooder} s, quiet {fair_quiet} s"
    );
}

/// With a 1 s TTL at three times the pool's capacity, no admitted request waits in the EPP past
/// its TTL, and those that would are refused as `queue-timeout`; without flow control every
/// request is decided on arrival.
#[test]
fn the_queue_ttl_bounds_every_wait() {
    let params = GeneratorParams {
        requests: 3_000,
        rate: 600.0,
        tenants: 4,
        flood_factor: 1.0,
        ..GeneratorParams::default()
    };
    let workload = generate::noisy_neighbour(&params, 2);
    let text = baselines::BASELINES
        .iter()
        .find(|(n, _)| *n == "flow-control")
        .unwrap()
        .1
        .replace(
            "featureGates: [flowControl]\n",
            "featureGates: [flowControl]\nflowControl:\n  defaultRequestTTL: 1s\n",
        );
    let config = EndpointPickerConfig::from_yaml(&text).unwrap();
    let (outcome, report) = run(&workload, &setup("ttl", config, 4, EngineProfile::h100()));
    let timed_out = report.refused.get("queue-timeout").copied().unwrap_or(0);
    assert!(timed_out > 0, "{:?}", report.refused);
    assert_eq!(report.refused.len(), 1, "{:?}", report.refused);
    for r in outcome.records.iter().filter(|r| r.outcome == Outcome::Completed) {
        let waited = r.dispatched_ns.unwrap() - r.arrival_ns;
        assert!(waited <= 1_000_000_000, "waited {waited} ns");
    }
    let (outcome, _) = run(
        &workload,
        &setup("none", baseline("upstream-default"), 4, EngineProfile::h100()),
    );
    assert!(
        outcome
            .records
            .iter()
            .filter(|r| r.outcome == Outcome::Completed)
            .all(|r| r.dispatched_ns == Some(r.arrival_ns))
    );
}
