//! The shipped alert rules (`manifests/overlays/monitoring/`: EPP and budget alerts) checked by
//! Prometheus's own `promtool` (Debian's `prometheus` package, which `.ci/run` installs): the
//! rules parse, and `promtool test rules` shows each alert firing when it should and not before.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::process::Command;

const BUDGET_ALERTS: &str = include_str!("../manifests/overlays/monitoring/budget-alerts.yaml");
const EPP_ALERTS: &str = include_str!("../manifests/overlays/monitoring/epp-alerts.yaml");

/// A scratch directory removed on drop.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A PrometheusRule's `spec`: a plain rules file.
fn rules_file(prometheus_rule: &str) -> String {
    let rule: serde_yaml_ng::Value = serde_yaml_ng::from_str(prometheus_rule).unwrap();
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

/// `promtool check rules` and `promtool test rules` on the PrometheusRule `alerts` with the
/// unit tests `tests`; `rules` is how many rules it must hold.
fn check_and_test(name: &str, alerts: &str, tests: &str, rules: usize) {
    let dir = Scratch(std::env::temp_dir().join(format!("epp-alerts-{name}-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::write(dir.0.join("rules.yaml"), rules_file(alerts)).unwrap();
    std::fs::write(dir.0.join("tests.yaml"), tests).unwrap();
    let (ok, text) = promtool(&["check", "rules", "rules.yaml"], &dir.0);
    assert!(
        ok && text.contains(&format!("SUCCESS: {rules} rules found")),
        "{text}"
    );
    let (ok, text) = promtool(&["test", "rules", "tests.yaml"], &dir.0);
    assert!(ok, "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn budget_alerts_parse_and_fire_when_they_should() {
    check_and_test("budget", BUDGET_ALERTS, TESTS, 2);
}

const EPP_TESTS: &str = r#"rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
- interval: 1m
  input_series:
  # Scrapes failing from minute 2 on.
  - series: 'inference_extension_model_server_scrape_errors_total{job="epp",instance="a",reason="connect"}'
    values: '0 0 0 10 20 30 40 50 60 70 80 90 100'
  # 100 routed per minute; server-side errors 10 per minute from minute 2 (9 %), and refusals
  # the clients caused (budget), which do not count.
  - series: 'inference_objective_request_total{job="epp",instance="a",model_name="m",target_model_name="m",priority="0"}'
    values: '0+100x12'
  - series: 'inference_objective_request_error_total{job="epp",instance="a",model_name="m",target_model_name="m",error_code="ServiceUnavailable"}'
    values: '0 0 0 10 20 30 40 50 60 70 80 90 100'
  - series: 'inference_objective_request_error_total{job="epp",instance="a",model_name="m",target_model_name="m",error_code="ResourceExhausted"}'
    values: '0+500x12'
  # The pool loses its last fresh endpoint at minute 4.
  - series: 'inference_pool_ready_pods{job="epp",instance="a",name="pool"}'
    values: '2 2 2 2 0 0 0 0 0 0 0 0 0'
  alert_rule_test:
  - eval_time: 4m
    alertname: EppModelServerScrapesFailing
    exp_alerts: []
  - eval_time: 10m
    alertname: EppModelServerScrapesFailing
    exp_alerts:
    - exp_labels: {severity: warning, job: epp, instance: a}
      exp_annotations:
        summary: "EPP a fails to scrape model-server metrics: it routes on stale load."
  - eval_time: 10m
    alertname: EppServerErrors
    exp_alerts: []
  - eval_time: 4m
    alertname: EppNoReadyEndpoints
    exp_alerts: []
  - eval_time: 6m
    alertname: EppNoReadyEndpoints
    exp_alerts:
    - exp_labels: {severity: critical, name: pool}
      exp_annotations:
        summary: "Pool pool has no endpoint with fresh metrics: requests fail with 503."
- interval: 1m
  input_series:
  # Without the clients' refusals, the same server-side errors are 10 % of requests.
  - series: 'inference_objective_request_total{job="epp",instance="a",model_name="m",target_model_name="m",priority="0"}'
    values: '0+90x12'
  - series: 'inference_objective_request_error_total{job="epp",instance="a",model_name="m",target_model_name="m",error_code="ServiceUnavailable"}'
    values: '0+10x12'
  alert_rule_test:
  - eval_time: 3m
    alertname: EppServerErrors
    exp_alerts: []
  - eval_time: 10m
    alertname: EppServerErrors
    exp_alerts:
    - exp_labels: {severity: critical, job: epp, instance: a}
      exp_annotations:
        summary: "EPP a fails 10% of requests on its side."
"#;

#[test]
fn epp_alerts_parse_and_fire_when_they_should() {
    check_and_test("epp", EPP_ALERTS, EPP_TESTS, 3);
}
