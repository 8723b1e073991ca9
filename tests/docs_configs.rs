//! The budget and guard configs the documentation shows load as written: every YAML block of
//! README.md and docs/budgets.md that declares a `token-budget` is built into a scheduler, so
//! a renamed field or a changed rule cannot leave the docs showing a config that is refused.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use epp::{config::EndpointPickerConfig, scheduler::build_scheduler};

/// The ```yaml blocks of `text` that declare a token budget.
fn budget_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                if block.contains("type: token-budget") {
                    blocks.push(block.clone());
                }
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// `plugins` (YAML list items) inside a config with one queue-scorer profile.
fn config(plugins: &str) -> String {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
{plugins}schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
"
    )
}

#[test]
fn the_documented_budget_configs_load() {
    let docs = [
        ("README.md", include_str!("../README.md")),
        ("docs/budgets.md", include_str!("../docs/budgets.md")),
    ];
    let mut checked = 0;
    for (file, text) in docs {
        let blocks = budget_blocks(text);
        assert!(!blocks.is_empty(), "{file} shows no token-budget block");
        for block in blocks {
            let text = config(&block);
            let parsed =
                EndpointPickerConfig::from_yaml(&text).unwrap_or_else(|e| panic!("{file}: {e}\n{block}"));
            build_scheduler(&parsed).unwrap_or_else(|e| panic!("{file}: {e}\n{block}"));
            checked += 1;
        }
    }
    assert_eq!(checked, 2, "one block in each file");
}
