//! The configurations shipped for comparisons, by name. Each is an ordinary
//! `EndpointPickerConfig` document (see `simulator/configs/`), so what wins here can be deployed
//! as it is, except `oracle`, whose placement the replay itself makes ([`Placement::Oracle`]).

use epp::config::{DEFAULT_CONFIG_YAML, EndpointPickerConfig};

use super::Placement;

/// The name of the exact-cache oracle baseline.
pub const ORACLE: &str = "oracle";

/// Shipped baselines: name and YAML.
pub const BASELINES: [(&str, &str); 10] = [
    ("round-robin", include_str!("../../configs/round-robin.yaml")),
    ("random", include_str!("../../configs/random.yaml")),
    ("least-queue", include_str!("../../configs/least-queue.yaml")),
    ("upstream-default", DEFAULT_CONFIG_YAML),
    ("sticky", include_str!("../../configs/sticky.yaml")),
    ("recommended", include_str!("../../configs/recommended.yaml")),
    ("flow-control", include_str!("../../configs/flow-control.yaml")),
    (
        "flow-control-rr",
        include_str!("../../configs/flow-control-rr.yaml"),
    ),
    (
        "flow-control-fair",
        include_str!("../../configs/flow-control-fair.yaml"),
    ),
    (ORACLE, include_str!("../../configs/oracle.yaml")),
];

/// Who places the requests of configuration `spec`: the exact-cache oracle for the shipped
/// `oracle`, the scheduler for everything else (a file named `oracle=FILE` included).
pub fn placement(spec: &str) -> Placement {
    if spec == ORACLE {
        Placement::Oracle
    } else {
        Placement::Scheduler
    }
}

/// Resolve `NAME` (a shipped baseline) or `NAME=FILE` into a name and the configuration's YAML,
/// not yet parsed (the benchmarks that start a real EPP hand it the text).
///
/// # Errors
/// Unknown baseline or unreadable file, with the name.
pub fn resolve_text(spec: &str) -> Result<(String, String), String> {
    if let Some((name, file)) = spec.split_once('=') {
        let text = std::fs::read_to_string(file).map_err(|e| format!("config {name}: {file}: {e}"))?;
        return Ok((name.to_owned(), text));
    }
    let Some((_, yaml)) = BASELINES.iter().find(|(n, _)| *n == spec) else {
        let known: Vec<&str> = BASELINES.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "unknown baseline {spec:?}: use one of {} or NAME=FILE",
            known.join(", ")
        ));
    };
    Ok((spec.to_owned(), (*yaml).to_owned()))
}

/// Resolve `NAME` (a shipped baseline) or `NAME=FILE` into a name and a validated configuration.
///
/// # Errors
/// Unknown baseline, unreadable file or invalid configuration, with the name.
pub fn resolve(spec: &str) -> Result<(String, EndpointPickerConfig), String> {
    let (name, text) = resolve_text(spec)?;
    let config = EndpointPickerConfig::from_yaml(&text).map_err(|e| format!("config {name}: {e}"))?;
    Ok((name, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_baseline_builds_a_scheduler() {
        for (name, _) in BASELINES {
            let (n, config) = resolve(name).unwrap();
            assert_eq!(n, name);
            epp::scheduler::build_scheduler(&config).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert_eq!(placement(ORACLE), Placement::Oracle);
        assert_eq!(placement("oracle=my-file.yaml"), Placement::Scheduler);
        assert_eq!(placement("recommended"), Placement::Scheduler);
        let e = resolve("fastest").unwrap_err();
        assert!(
            e.starts_with("unknown baseline \"fastest\": use one of round-robin, random"),
            "{e}"
        );
        assert!(
            resolve("x=/nonexistent/file.yaml")
                .unwrap_err()
                .starts_with("config x: /nonexistent/file.yaml:")
        );
    }
}
