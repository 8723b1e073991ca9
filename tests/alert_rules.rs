//! The shipped alert rules (`manifests/overlays/monitoring/`) checked by Prometheus's own `promtool`
//! (Debian's `prometheus` package, which `.ci/run` installs): the rules parse, and
//! `promtool test rules` shows each alert firing when it should and not before.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::process::Command;

const BUDGET_ALERTS: &str = include_str!("../manifests/overlays/monitoring/budget-alerts.yaml");

/// A scratch directory removed on drop.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The PrometheusRule's `spec`: a plain rules file.
fn rules_file() -> String {
    let rule: serde_yaml_ng::Value = serde_yaml_ng::from_str(BUDGET_ALERTS).unwrap();
    assert_eq!(rule["kind"], "PrometheusRule");
    serde_yaml_ng::to_string(&rule["spec"]).unwrap()
}

fn promtool(args: &[&str], dir: &std::path::Path) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool must be installed (apt-get install prometheus; .ci/run does it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const TESTS: &str = r#"rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
- interval: 1m
  input_series:
  - series: 'inference_extension_budget_usage_ratio{job="epp",instance="a",tenant="team-a",layer="tenant",window="month",unit="spend"}'
    values: '0.5 0.7 0.85 0.85 0.85 0.85'
  - series: 'inference_extension_budget_usage_ratio{job="epp",instance="a",tenant="team-b",layer="gpt-4o",window="60s",unit="tokens"}'
    values: '0.1 0.2 0.3 0.3 0.3 0.3'
  - series: 'inference_extension_budget_soft_threshold_ratio{job="epp",instance="a"}'
    values: '0.8x5'
  - series: 'inference_extension_budget_rejections_total{job="epp",instance="a",tenant="team-a",model_name="gpt-4o"}'
    values: '0 0 0 0 3 7'
  alert_rule_test:
  # 0.85 from minute 2: pending for its minute, firing from minute 3.
  - eval_time: 2m
    alertname: TenantBudgetPastSoftThreshold
    exp_alerts: []
  - eval_time: 4m
    alertname: TenantBudgetPastSoftThreshold
    exp_alerts:
    - exp_labels: {severity: warning, job: epp, instance: a, tenant: team-a, layer: tenant, window: month, unit: spend}
      exp_annotations:
        summary: "Tenant team-a has used 85% of its spend budget per month (tenant layer)."
        description: "Past the soft threshold; requests will be refused (429) when the limit is reached, until the window ends."
  - eval_time: 3m
    alertname: TenantBudgetExhausted
    exp_alerts: []
  - eval_time: 5m
    alertname: TenantBudgetExhausted
    exp_alerts:
    - exp_labels: {severity: warning, tenant: team-a, model_name: gpt-4o}
      exp_annotations:
        summary: "Tenant team-a is being refused by its budget on gpt-4o."
        description: "Requests were refused in the last 5 minutes (429 with the window's reset in retry-after)."
"#;

#[test]
fn budget_alerts_parse_and_fire_when_they_should() {
    let dir = Scratch(std::env::temp_dir().join(format!("epp-alerts-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::write(dir.0.join("rules.yaml"), rules_file()).unwrap();
    std::fs::write(dir.0.join("tests.yaml"), TESTS).unwrap();
    let (ok, text) = promtool(&["check", "rules", "rules.yaml"], &dir.0);
    assert!(ok && text.contains("SUCCESS: 2 rules found"), "{text}");
    let (ok, text) = promtool(&["test", "rules", "tests.yaml"], &dir.0);
    assert!(ok, "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}
