//! `shared-docs --simulate --sim-only` end to end: a real llama-server applies its chat template
//! and tokenizer to the trace, and the simulator replays the tokens with the configurations.
//!
//! Needs `llama-server` and the Gemma 3 270M model as `e2e_llamacpp.rs` does (`scripts/test.sh`
//! installs both); without them the test fails with the install command, it never skips.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use clap::Parser;
use epp_bench::shared_docs::{SharedDocsArgs, run};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SharedDocsArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tokenized_trace_replays_with_every_config() {
    let model_dir = env!("CARGO_TARGET_TMPDIR");
    let args = Cli::parse_from([
        "shared-docs",
        "--sim-only",
        "--simulate",
        "a100",
        "--servers",
        "2",
        "--docs",
        "2",
        "--doc-tokens",
        "300",
        "--requests",
        "12",
        "--configs",
        "round-robin,recommended,oracle",
        "--model-dir",
        model_dir,
    ])
    .args;
    let report = run(args).await.unwrap();
    assert!(report.runs.is_empty(), "--sim-only runs no real config");
    assert_eq!(report.profile.as_deref(), Some("llama3-8b-a100"));
    let names: Vec<&str> = report.simulated.iter().map(|s| s.config.as_str()).collect();
    assert_eq!(names, ["round-robin", "recommended", "oracle"]);
    for s in &report.simulated {
        assert_eq!(s.report.completed, 12, "{}", s.config);
    }
    // A ~300-token document, the preamble, the question and Gemma's chat template.
    assert!(
        (300..450).contains(&report.mean_prompt_tokens),
        "{}",
        report.mean_prompt_tokens
    );
    // The tokens of questions about one document share its prefix: once a document has been
    // prefilled on a pod, later questions routed there by prefix affinity are mostly cached.
    let hit = |name: &str| {
        report
            .simulated
            .iter()
            .find(|s| s.config == name)
            .unwrap()
            .report
            .prefix_hit_rate
    };
    assert!(hit("recommended") > 0.5, "{}", hit("recommended"));
    assert!(hit("oracle") > 0.5, "{}", hit("oracle"));
    assert!(report.fidelity.is_none(), "nothing real to compare with");
    let table = report.simulated_table().unwrap();
    assert!(
        table.starts_with("Simulated on 2 pods of engine profile llama3-8b-a100:"),
        "{table}"
    );
    assert!(table.contains("| oracle | – |"), "{table}");
}
