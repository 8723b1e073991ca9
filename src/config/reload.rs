//! `--watch-config-file`: the config file is read again when it changes, and a change limited
//! to `schedulingProfiles` runs for new requests without a restart, as llm-d-router reloads
//! (same flag, `pkg/epp/server/options.go@ce4f4b14`). Any other change is refused: the running
//! config stays and the refusal is logged. Every attempt is counted by result.
//!
//! - [`classify`] (pure) says what a new text is against the running one.
//! - [`watch`] polls the file once a second (no platform file-notification API: a volume from a
//!   ConfigMap swaps a symlink, which a poll sees as well as any editor's rename).

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::EndpointPickerConfig;
use crate::{
    metrics::exported::EppMetrics,
    scheduler::{Scheduler, build_scheduler},
};

/// How often the file is read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What became of a changed config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// The new scheduling profile runs.
    Success,
    /// The text is not a valid config.
    Invalid,
    /// It changes more than `schedulingProfiles`.
    Unsupported,
    /// The file could not be read.
    ReadError,
}

impl ReloadResult {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::Invalid => "invalid",
            ReloadResult::Unsupported => "unsupported",
            ReloadResult::ReadError => "read_error",
        }
    }
}

/// The document without its `schedulingProfiles`, for comparing the rest.
fn without_profiles(text: &str) -> Option<serde_yaml_ng::Value> {
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).ok()?;
    if let Some(map) = doc.as_mapping_mut() {
        map.remove("schedulingProfiles");
    }
    Some(doc)
}

/// What `next` is against the `running` config text, both read with `flag_gates`
/// (`--feature-gates`): `Ok(None)` when nothing that matters changed (the same document,
/// reformatted or recommented), `Ok(Some(config))` when only its scheduling profiles changed,
/// else the refusal and why.
///
/// # Errors
/// [`ReloadResult::Invalid`] or [`ReloadResult::Unsupported`], with the reason.
pub fn classify(
    running: &str,
    next: &str,
    flag_gates: &[String],
) -> Result<Option<EndpointPickerConfig>, (ReloadResult, String)> {
    let config = EndpointPickerConfig::from_yaml_with_gates(next, flag_gates)
        .map_err(|e| (ReloadResult::Invalid, e.to_string()))?;
    let (Some(before), Some(after)) = (without_profiles(running), without_profiles(next)) else {
        return Err((ReloadResult::Invalid, "not a YAML document".into()));
    };
    if before != after {
        return Err((
            ReloadResult::Unsupported,
            "only schedulingProfiles can change without a restart".into(),
        ));
    }
    let same = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(running).ok()
        == serde_yaml_ng::from_str::<serde_yaml_ng::Value>(next).ok();
    Ok((!same).then_some(config))
}

/// Apply `next` (a config text read from the file) to `scheduler`, whose config text is
/// `running`; the result to count, when there is one, and the new running text on success.
fn apply(
    scheduler: &Scheduler,
    running: &str,
    next: &str,
    flag_gates: &[String],
) -> Option<(ReloadResult, Result<(), String>)> {
    let config = match classify(running, next, flag_gates) {
        Ok(None) => return None,
        Ok(Some(config)) => config,
        Err((result, reason)) => return Some((result, Err(reason))),
    };
    let built = match build_scheduler(&config) {
        Ok(built) => built,
        Err(e) => return Some((ReloadResult::Invalid, Err(e.to_string()))),
    };
    Some(match scheduler.reload_profile(&built) {
        Ok(()) => (ReloadResult::Success, Ok(())),
        Err(reason) => (ReloadResult::Unsupported, Err(reason)),
    })
}

/// Watch `path`, whose text at start was `running`, until `cancel`: each new text is applied
/// to `scheduler` (read with `flag_gates`, as at start) or refused, counted in `metrics` and
/// logged. A read failure is counted when it starts, not on every poll.
pub async fn watch(
    path: PathBuf,
    mut running: String,
    flag_gates: Vec<String>,
    scheduler: Arc<Scheduler>,
    metrics: Arc<EppMetrics>,
    cancel: CancellationToken,
) {
    let mut seen = running.clone();
    let mut unreadable = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            () = cancel.cancelled() => return,
        }
        let file = path.clone();
        let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(file)).await;
        let text = match read
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
        {
            Ok(text) => {
                unreadable = false;
                text
            }
            Err(e) => {
                if !unreadable {
                    unreadable = true;
                    metrics.config_reloads.with_label_values(&["read_error"]).inc();
                    warn!(path = %path.display(), error = %e, "config file unreadable; the running config stays");
                }
                continue;
            }
        };
        if text == seen {
            continue;
        }
        seen = text.clone();
        let Some((result, outcome)) = apply(&scheduler, &running, &text, &flag_gates) else {
            continue;
        };
        metrics.config_reloads.with_label_values(&[result.label()]).inc();
        match outcome {
            Ok(()) => {
                running = text;
                metrics.config_generation.inc();
                info!(path = %path.display(), profile = %scheduler.profile_name(), "scheduling profile reloaded");
            }
            Err(reason) => {
                warn!(path = %path.display(), result = result.label(), %reason, "config change refused; the running config stays");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
";

    #[test]
    fn only_profile_changes_are_applied() {
        // Reformatting or comments change nothing.
        let reformatted = format!(
            "# a comment\n{}",
            BASE.replace("- type: queue-scorer", "-   type: queue-scorer")
        );
        assert!(matches!(classify(BASE, &reformatted, &[]), Ok(None)));
        // A new weight or another plugin of the list in the profile: applied.
        let weighted = BASE.replace(
            "  - pluginRef: queue-scorer\n",
            "  - pluginRef: kv-cache-utilization-scorer\n    weight: 3\n",
        );
        assert!(matches!(classify(BASE, &weighted, &[]), Ok(Some(_))));
        // A new plugin, or any other section: refused.
        let added = BASE.replace(
            "- type: kv-cache-utilization-scorer\n",
            "- type: kv-cache-utilization-scorer\n- type: prefix-cache-scorer\n",
        );
        assert_eq!(
            classify(BASE, &added, &[]).unwrap_err(),
            (
                ReloadResult::Unsupported,
                "only schedulingProfiles can change without a restart".to_owned()
            )
        );
        let gated = BASE.replace(
            "kind: EndpointPickerConfig\n",
            "kind: EndpointPickerConfig\nfeatureGates: [flowControl]\n",
        );
        assert_eq!(
            classify(BASE, &gated, &[]).unwrap_err().0,
            ReloadResult::Unsupported
        );
        // Not a config: invalid.
        assert_eq!(
            classify(BASE, "plugins: [", &[]).unwrap_err().0,
            ReloadResult::Invalid
        );
        let unknown = BASE.replace("  - pluginRef: queue-scorer\n", "  - pluginRef: nowhere\n");
        assert_eq!(
            classify(BASE, &unknown, &[]).unwrap_err().0,
            ReloadResult::Invalid
        );
    }

    #[test]
    fn a_profile_that_needs_the_prefix_index_needs_a_restart_when_none_was_built() {
        // The prefix scorer is declared but unused at start: no prefix index was built.
        let running_text = BASE.replace(
            "- type: kv-cache-utilization-scorer\n",
            "- type: kv-cache-utilization-scorer\n- type: prefix-cache-scorer\n",
        );
        let running = build_scheduler(&EndpointPickerConfig::from_yaml(&running_text).unwrap()).unwrap();
        let using_prefix = running_text.replace(
            "  - pluginRef: queue-scorer\n",
            "  - pluginRef: prefix-cache-scorer\n",
        );
        assert_eq!(
            apply(&running, &running_text, &using_prefix, &[]),
            Some((
                ReloadResult::Unsupported,
                Err(
                    "the new profile matches prompt prefixes, but the running config builds no prefix index"
                        .into()
                )
            ))
        );
        // A profile of plugins that need nothing new is applied.
        let kv_only = running_text.replace(
            "  - pluginRef: queue-scorer\n",
            "  - pluginRef: kv-cache-utilization-scorer\n",
        );
        assert_eq!(
            apply(&running, &running_text, &kv_only, &[]),
            Some((ReloadResult::Success, Ok(())))
        );
        assert_eq!(
            apply(&running, &running_text, &running_text, &[]),
            None,
            "nothing changed"
        );
    }

    /// A v1 document reloads the same way; moving it to another apiVersion is not a profile
    /// change.
    #[test]
    fn a_v1_document_reloads_its_profiles() {
        let v1 = BASE.replace("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1");
        let running = build_scheduler(&EndpointPickerConfig::from_yaml(&v1).unwrap()).unwrap();
        let weighted = v1.replace(
            "  - pluginRef: queue-scorer\n",
            "  - pluginRef: queue-scorer\n    weight: 4\n",
        );
        assert_eq!(
            apply(&running, &v1, &weighted, &[]),
            Some((ReloadResult::Success, Ok(())))
        );
        assert_eq!(classify(BASE, &v1, &[]).unwrap_err().0, ReloadResult::Unsupported);
    }

    /// A reload reads the new text with the same `--feature-gates` as at start.
    #[test]
    fn a_reload_keeps_the_flag_gates() {
        let weighted = BASE.replace(
            "  - pluginRef: queue-scorer\n",
            "  - pluginRef: queue-scorer\n    weight: 2\n",
        );
        let gates = ["flowControl".to_owned()];
        let config = classify(BASE, &weighted, &gates).unwrap().unwrap();
        assert!(config.flow_control.is_some());
        let config = classify(BASE, &weighted, &[]).unwrap().unwrap();
        assert!(config.flow_control.is_none());
    }
}
