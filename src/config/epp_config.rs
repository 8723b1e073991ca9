//! `EndpointPickerConfig`: the upstream YAML, decoded strictly, validated with every error named
//! by its path.
//!
//! Two layers: [`RawEndpointPickerConfig`] mirrors the YAML (`deny_unknown_fields`), and
//! [`EndpointPickerConfig`] is what the rest of the EPP uses, produced by
//! [`EndpointPickerConfig::from_yaml`] after all structural checks. Plugin parameters stay raw here:
//! each plugin decodes its own in the scheduler registry.

use std::collections::BTreeSet;

use serde::Deserialize;
use thiserror::Error;

pub use super::api_version::API_VERSIONS;
use super::{
    api_version::{
        ApiVersion, NO_CROSS_REPLICA, NO_DISCOVERY, NO_PEER_DISCOVERY, RawRequestHandler, moved_ref,
    },
    flow_control::{FlowControlSpec, RawFlowControl},
};

/// Feature gates known upstream. `dataLayer` is obsolete but still accepted.
pub const FEATURE_GATES: [&str; 3] = ["dataLayer", "enableLegacyMetrics", "flowControl"];

/// The built-in configuration used when neither `--config-file` nor `--config-text` is given:
/// the upstream default since v1.4 (queue 2, KV 2, prefix 3, max-score picker).
pub const DEFAULT_CONFIG_YAML: &str = "\
apiVersion: llm-d.ai/v1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors:
    - pluginRef: core-metrics-extractor
";

/// One problem in a configuration, located by a dotted path such as `plugins[2].type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Where.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The YAML did not decode into the schema.
    #[error("invalid EndpointPickerConfig at {path}: {reason}")]
    Decode {
        /// Path of the offending field (`.` for the document).
        path: String,
        /// The decoder's message.
        reason: String,
    },
    /// Structurally valid YAML that breaks one or more rules.
    #[error("invalid EndpointPickerConfig: {}", .issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        /// Every problem found.
        issues: Vec<ConfigIssue>,
    },
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The YAML document as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawEndpointPickerConfig {
    /// One of [`API_VERSIONS`].
    pub api_version: String,
    /// `EndpointPickerConfig`.
    pub kind: String,
    /// Feature gates.
    #[serde(default)]
    pub feature_gates: Vec<String>,
    /// Plugin instances.
    #[serde(default)]
    pub plugins: Vec<RawPluginSpec>,
    /// Scheduling profiles.
    #[serde(default)]
    pub scheduling_profiles: Vec<RawProfileSpec>,
    /// Saturation detector reference (`v1alpha1` only; `flowControl.saturationDetector` wins).
    #[serde(default)]
    pub saturation_detector: Option<RawPluginRef>,
    /// Metric sources and extractors.
    #[serde(default)]
    pub data_layer: Option<RawDataLayer>,
    /// Flow control: decoded strictly always, used only with the `flowControl` gate except its
    /// `saturationDetector` (the rest of a section without the gate is ignored with a warning,
    /// as upstream does).
    #[serde(default)]
    pub flow_control: Option<RawFlowControl>,
    /// Request parser reference (`v1alpha1` only; `requestHandler.parsers` wins).
    #[serde(default)]
    pub parser: Option<RawPluginRef>,
    /// Request handling: the parser.
    #[serde(default)]
    pub request_handler: Option<RawRequestHandler>,
    /// Gates from `--feature-gates`, applied after `featureGates` (not part of the document).
    #[serde(skip)]
    pub flag_gates: Vec<String>,
}

/// A gate's value as Go's `strconv.ParseBool` reads it (after upstream lowercases and trims it).
fn parse_go_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => Some(true),
        "0" | "f" | "false" => Some(false),
        _ => None,
    }
}

/// One plugin instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPluginSpec {
    /// Instance name; defaults to the type.
    #[serde(default)]
    pub name: Option<String>,
    /// Registered plugin type.
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Plugin-specific parameters.
    #[serde(default)]
    pub parameters: Option<serde_yaml_ng::Value>,
}

/// A scheduling profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfileSpec {
    /// Profile name.
    pub name: String,
    /// Plugins in the profile.
    #[serde(default)]
    pub plugins: Vec<RawProfilePlugin>,
}

/// A plugin reference inside a profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawProfilePlugin {
    /// Name of a plugin instance.
    pub plugin_ref: String,
    /// Scorer weight (default 1).
    #[serde(default)]
    pub weight: Option<f64>,
}

/// A bare plugin reference.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPluginRef {
    /// Name of a plugin instance.
    pub plugin_ref: String,
}

/// `dataLayer` (both versions' fields; the ones this EPP does not have are refused by name).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawDataLayer {
    /// Metric sources.
    #[serde(default)]
    pub sources: Vec<RawDataSource>,
    /// Scrape with the default source when none is listed (absent = true).
    #[serde(default)]
    pub inject_defaults: Option<bool>,
    /// Endpoint and peer discovery plugins (refused).
    #[serde(default)]
    pub discovery: Option<serde_yaml_ng::Value>,
    /// `v1` cross-replica syncer (refused).
    #[serde(default)]
    pub cross_replica: Option<serde_yaml_ng::Value>,
    /// `v1alpha1` peer discovery (refused).
    #[serde(default)]
    pub peer_discovery: Option<serde_yaml_ng::Value>,
    /// `v1alpha1` cross-replica syncer (refused).
    #[serde(default)]
    pub cross_replica_syncer_plugin_ref: Option<serde_yaml_ng::Value>,
    /// `v1alpha1` cross-replica sync interval (refused).
    #[serde(default)]
    pub cross_replica_sync_interval: Option<serde_yaml_ng::Value>,
    /// `v1alpha1` cross-replica publish timeout (refused).
    #[serde(default)]
    pub cross_replica_publish_timeout: Option<serde_yaml_ng::Value>,
}

impl RawDataLayer {
    /// The refused fields that are written: (YAML name, why), in document-schema order.
    fn unsupported_fields(&self) -> impl Iterator<Item = (&'static str, &'static str)> {
        [
            ("discovery", self.discovery.is_some(), NO_DISCOVERY),
            ("crossReplica", self.cross_replica.is_some(), NO_CROSS_REPLICA),
            ("peerDiscovery", self.peer_discovery.is_some(), NO_PEER_DISCOVERY),
            (
                "crossReplicaSyncerPluginRef",
                self.cross_replica_syncer_plugin_ref.is_some(),
                NO_CROSS_REPLICA,
            ),
            (
                "crossReplicaSyncInterval",
                self.cross_replica_sync_interval.is_some(),
                NO_CROSS_REPLICA,
            ),
            (
                "crossReplicaPublishTimeout",
                self.cross_replica_publish_timeout.is_some(),
                NO_CROSS_REPLICA,
            ),
        ]
        .into_iter()
        .filter_map(|(name, written, why)| written.then_some((name, why)))
    }
}

/// One metric source with its extractors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawDataSource {
    /// Source plugin.
    pub plugin_ref: String,
    /// Extractor plugins.
    #[serde(default)]
    pub extractors: Vec<RawPluginRef>,
}

/// A validated plugin instance.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// Unique instance name.
    pub name: String,
    /// Registered type.
    pub plugin_type: String,
    /// Raw parameters (`Null` when absent).
    pub parameters: serde_yaml_ng::Value,
    /// Path of this plugin in the document, for error messages (`plugins[3]`).
    pub path: String,
}

/// A plugin reference resolved to an instance, with the path it was written at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginRefAt {
    /// Index into [`EndpointPickerConfig::plugins`].
    pub plugin: usize,
    /// Where the reference was written (`flowControl.saturationDetector.pluginRef`).
    pub path: &'static str,
}

/// A validated profile entry.
#[derive(Debug, Clone)]
pub struct ProfilePlugin {
    /// Index into [`EndpointPickerConfig::plugins`].
    pub plugin: usize,
    /// Scorer weight.
    pub weight: f64,
}

/// A validated profile.
#[derive(Debug, Clone)]
pub struct ProfileSpec {
    /// Profile name.
    pub name: String,
    /// Its plugins in order.
    pub plugins: Vec<ProfilePlugin>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct EndpointPickerConfig {
    /// Enabled feature gates.
    pub feature_gates: BTreeSet<String>,
    /// Plugin instances, in document order.
    pub plugins: Vec<PluginSpec>,
    /// Profiles; when the document has none, one `default` profile with every plugin.
    pub profiles: Vec<ProfileSpec>,
    /// Saturation detector instance, if named (`flowControl.saturationDetector`, or the
    /// deprecated top-level field); used by admission and by flow control, gate or not.
    pub saturation_detector: Option<PluginRefAt>,
    /// Request parser instance, if named (`requestHandler.parsers`, or the deprecated top-level
    /// `parser`); `openai-parser` otherwise.
    pub parser: Option<PluginRefAt>,
    /// Model-server metrics are scraped: a source is listed, or the default one is injected
    /// (upstream injects it unless `dataLayer.injectDefaults: false`).
    pub metrics_collection: bool,
    /// Deprecated places used in the document, one sentence each, for a warning at start.
    pub deprecations: Vec<String>,
    /// Flow control, when the `flowControl` gate is on (defaults applied to an absent section).
    pub flow_control: Option<FlowControlSpec>,
    /// A `flowControl` section with settings besides the detector was written without the gate:
    /// they are ignored (a warning at start).
    pub flow_control_ignored: bool,
}

impl EndpointPickerConfig {
    /// The built-in default configuration.
    pub fn default_config() -> Self {
        match Self::from_yaml(DEFAULT_CONFIG_YAML) {
            Ok(c) => c,
            // The constant is covered by a unit test; fall back to an empty profile rather than
            // panicking if it is ever edited badly.
            Err(_) => Self {
                feature_gates: BTreeSet::new(),
                plugins: Vec::new(),
                profiles: Vec::new(),
                saturation_detector: None,
                parser: None,
                metrics_collection: true,
                deprecations: Vec::new(),
                flow_control: None,
                flow_control_ignored: false,
            },
        }
    }

    /// Decode and validate a YAML (or JSON) document.
    ///
    /// # Errors
    /// [`ConfigError::Decode`] for schema errors (unknown fields included) with the field path;
    /// [`ConfigError::Invalid`] with every rule violation found.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::from_yaml_with_gates(text, &[])
    }

    /// [`from_yaml`](Self::from_yaml), with `--feature-gates` entries applied after the
    /// document's `featureGates` (so they win, as upstream's flag does).
    ///
    /// # Errors
    /// As [`from_yaml`](Self::from_yaml); a bad flag entry is named `--feature-gates[i]`.
    pub fn from_yaml_with_gates(text: &str, flag_gates: &[String]) -> Result<Self, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut raw: RawEndpointPickerConfig =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Decode {
                path: e.path().to_string(),
                reason: e.inner().to_string(),
            })?;
        raw.flag_gates = flag_gates.to_vec();
        Self::try_from(raw)
    }
}

impl TryFrom<RawEndpointPickerConfig> for EndpointPickerConfig {
    type Error = ConfigError;

    fn try_from(raw: RawEndpointPickerConfig) -> Result<Self, ConfigError> {
        let mut issues = Vec::new();
        let mut issue = |path: String, reason: String| issues.push(ConfigIssue { path, reason });

        // llm-d-router's v1 and the v1alpha1 groups it converts (GIE's and its own).
        let version = ApiVersion::parse(&raw.api_version);
        let mut deprecations = Vec::new();
        if version == Some(ApiVersion::V1Alpha1) {
            deprecations.push(format!(
                "apiVersion {} is deprecated upstream: llm-d.ai/v1 reads the same document with the moves described in docs/deploy.md",
                raw.api_version
            ));
        }
        if version.is_none() {
            issue(
                "apiVersion".into(),
                format!(
                    "unsupported apiVersion {:?}; expected one of {API_VERSIONS:?}",
                    raw.api_version
                ),
            );
        }
        if raw.kind != "EndpointPickerConfig" {
            issue(
                "kind".into(),
                format!("expected EndpointPickerConfig, got {:?}", raw.kind),
            );
        }
        // An unknown gate is almost always a typo that would silently change behaviour. Entries
        // are `name`, `name=true` or `name=false` (llm-d-router's form, the value read as Go's
        // strconv.ParseBool does); `--feature-gates` entries come after the file's and win.
        let mut feature_gates = BTreeSet::new();
        let entries = raw
            .feature_gates
            .iter()
            .enumerate()
            .map(|(i, e)| (format!("featureGates[{i}]"), e))
            .chain(
                raw.flag_gates
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (format!("--feature-gates[{i}]"), e)),
            );
        for (path, entry) in entries {
            let (gate, on) = match entry.split_once('=') {
                None => (entry.as_str(), Some(true)),
                Some((g, value)) => (g, parse_go_bool(value)),
            };
            if !FEATURE_GATES.contains(&gate) {
                issue(path, format!("feature gate {gate:?} is unknown or unregistered"));
            } else if let Some(on) = on {
                if on {
                    feature_gates.insert(gate.to_owned());
                } else {
                    feature_gates.remove(gate);
                }
            } else {
                issue(
                    path,
                    format!("invalid feature gate entry {entry:?}: expected NAME, NAME=true or NAME=false"),
                );
            }
        }
        let flow_control_on = feature_gates.contains("flowControl");
        let flow_control = flow_control_on.then(|| {
            FlowControlSpec::from_raw(
                raw.flow_control.as_ref().unwrap_or(&RawFlowControl::default()),
                &mut issue,
            )
        });
        // Upstream honours the section's saturation detector without the gate.
        let flow_control_ignored = !flow_control_on
            && raw
                .flow_control
                .as_ref()
                .is_some_and(RawFlowControl::has_settings);

        let mut plugins: Vec<PluginSpec> = Vec::with_capacity(raw.plugins.len());
        for (i, p) in raw.plugins.iter().enumerate() {
            let name = p.name.clone().unwrap_or_else(|| p.plugin_type.clone());
            // Profiles refer to plugins by name: duplicates would be ambiguous.
            if plugins.iter().any(|q| q.name == name) {
                issue(
                    format!("plugins[{i}].name"),
                    format!("duplicate plugin name {name:?}"),
                );
            }
            if p.plugin_type.is_empty() {
                issue(
                    format!("plugins[{i}].type"),
                    "plugin type must not be empty".into(),
                );
            }
            plugins.push(PluginSpec {
                name,
                plugin_type: p.plugin_type.clone(),
                parameters: p.parameters.clone().unwrap_or(serde_yaml_ng::Value::Null),
                path: format!("plugins[{i}]"),
            });
        }
        let find = |name: &str| plugins.iter().position(|p| p.name == name);

        let mut profiles = Vec::new();
        for (i, prof) in raw.scheduling_profiles.iter().enumerate() {
            if prof.name.is_empty() {
                issue(
                    format!("schedulingProfiles[{i}].name"),
                    "profile name must not be empty".into(),
                );
            }
            if profiles.iter().any(|p: &ProfileSpec| p.name == prof.name) {
                issue(
                    format!("schedulingProfiles[{i}].name"),
                    format!("duplicate profile name {:?}", prof.name),
                );
            }
            let mut entries = Vec::new();
            for (j, r) in prof.plugins.iter().enumerate() {
                let path = format!("schedulingProfiles[{i}].plugins[{j}]");
                match find(&r.plugin_ref) {
                    Some(plugin) => {
                        let weight = r.weight.unwrap_or(1.0);
                        // A negative or non-finite weight would invert or poison every total.
                        if !weight.is_finite() || weight < 0.0 {
                            issue(
                                format!("{path}.weight"),
                                format!("weight must be a finite number >= 0, got {weight}"),
                            );
                        }
                        entries.push(ProfilePlugin { plugin, weight });
                    }
                    None => issue(
                        format!("{path}.pluginRef"),
                        format!("no plugin named {:?}", r.plugin_ref),
                    ),
                }
            }
            profiles.push(ProfileSpec {
                name: prof.name.clone(),
                plugins: entries,
            });
        }
        if profiles.is_empty() {
            // Upstream: no profiles → one `default` profile holding every plugin (the registry
            // keeps the scheduling ones).
            profiles.push(ProfileSpec {
                name: "default".into(),
                plugins: (0..plugins.len())
                    .map(|plugin| ProfilePlugin { plugin, weight: 1.0 })
                    .collect(),
            });
        }

        let detector = moved_ref(
            version,
            raw.flow_control
                .as_ref()
                .and_then(|f| f.saturation_detector.as_ref())
                .map(|r| (r.plugin_ref.as_str(), "flowControl.saturationDetector.pluginRef")),
            raw.saturation_detector
                .as_ref()
                .map(|r| (r.plugin_ref.as_str(), "saturationDetector.pluginRef")),
            "flowControl.saturationDetector.pluginRef",
            &mut issue,
            &mut deprecations,
        );
        let no_handler = RawRequestHandler::default();
        let handler = raw.request_handler.as_ref().unwrap_or(&no_handler);
        if handler.parsers.len() > 1 {
            issue(
                "requestHandler.parsers".into(),
                format!(
                    "{} parsers listed; choosing a parser by request path is not supported: list one",
                    handler.parsers.len()
                ),
            );
        }
        if handler.propagate_priority == Some(true) {
            issue(
                "requestHandler.propagatePriority".into(),
                "writing the priority into the request body is not supported: remove it or set it to false"
                    .into(),
            );
        }
        let parser = moved_ref(
            version,
            handler
                .parsers
                .first()
                .map(|r| (r.plugin_ref.as_str(), "requestHandler.parsers[0].pluginRef")),
            raw.parser
                .as_ref()
                .map(|r| (r.plugin_ref.as_str(), "parser.pluginRef")),
            "requestHandler.parsers[0].pluginRef",
            &mut issue,
            &mut deprecations,
        );
        for (name, why) in raw.data_layer.iter().flat_map(RawDataLayer::unsupported_fields) {
            issue(format!("dataLayer.{name}"), why.into());
        }
        let mut lookup_ref = |path: String, name: &str| -> Option<usize> {
            let found = find(name);
            if found.is_none() {
                issue(path, format!("no plugin named {name:?}"));
            }
            found
        };
        let mut resolve = |(name, path): (&str, &'static str)| {
            lookup_ref(path.into(), name).map(|plugin| PluginRefAt { plugin, path })
        };
        let saturation_detector = detector.and_then(&mut resolve);
        let parser = parser.and_then(&mut resolve);
        let metrics_collection = raw
            .data_layer
            .as_ref()
            .is_none_or(|dl| !dl.sources.is_empty() || dl.inject_defaults != Some(false));
        // Sources and extractors are found by type where they are used; here only their
        // references are checked.
        for (i, source) in raw.data_layer.iter().flat_map(|dl| dl.sources.iter()).enumerate() {
            lookup_ref(format!("dataLayer.sources[{i}].pluginRef"), &source.plugin_ref);
            for (j, e) in source.extractors.iter().enumerate() {
                lookup_ref(
                    format!("dataLayer.sources[{i}].extractors[{j}].pluginRef"),
                    &e.plugin_ref,
                );
            }
        }

        if !issues.is_empty() {
            return Err(ConfigError::Invalid { issues });
        }
        Ok(Self {
            feature_gates,
            plugins,
            profiles,
            saturation_detector,
            parser,
            metrics_collection,
            deprecations,
            flow_control,
            flow_control_ignored,
        })
    }
}

/// Decode a plugin's `parameters` into `T` (`T::default()` when absent), strictly when `T` denies
/// unknown fields.
///
/// # Errors
/// A [`ConfigIssue`] whose path points into `plugins[i].parameters`.
pub fn decode_plugin_params<T: serde::de::DeserializeOwned + Default>(
    spec: &PluginSpec,
) -> Result<T, ConfigIssue> {
    if spec.parameters.is_null() {
        return Ok(T::default());
    }
    serde_path_to_error::deserialize(spec.parameters.clone()).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." {
            format!("{}.parameters", spec.path)
        } else {
            format!("{}.parameters.{inner}", spec.path)
        };
        ConfigIssue {
            path,
            reason: e.into_inner().to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_the_upstream_default() {
        let c = EndpointPickerConfig::from_yaml(DEFAULT_CONFIG_YAML).unwrap();
        assert_eq!(c.profiles.len(), 1);
        let weights: Vec<(&str, f64)> = c.profiles[0]
            .plugins
            .iter()
            .map(|p| (c.plugins[p.plugin].plugin_type.as_str(), p.weight))
            .collect();
        assert_eq!(
            weights,
            vec![
                ("queue-scorer", 2.0),
                ("kv-cache-utilization-scorer", 2.0),
                ("prefix-cache-scorer", 3.0)
            ]
        );
    }

    #[test]
    fn both_api_groups_are_accepted() {
        let doc =
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n";
        let c = EndpointPickerConfig::from_yaml(doc).unwrap();
        assert_eq!(c.profiles[0].name, "default");
        assert_eq!(c.profiles[0].plugins.len(), 1);
    }

    #[test]
    fn unknown_fields_name_their_path() {
        let doc = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n  weight: 3\n";
        let err = EndpointPickerConfig::from_yaml(doc).unwrap_err();
        match err {
            ConfigError::Decode { path, reason } => {
                assert_eq!(path, "plugins[0].weight");
                assert!(reason.contains("unknown field `weight`"), "{reason}");
            }
            other => panic!("unexpected {other}"),
        }
        let doc = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\ndata: {}\n";
        let err = EndpointPickerConfig::from_yaml(doc).unwrap_err();
        assert!(err.to_string().contains("unknown field `data`"), "{err}");
    }

    #[test]
    fn every_rule_violation_is_reported_with_its_path() {
        let doc = "\
apiVersion: v1
kind: Other
featureGates: [nope]
plugins:
- type: queue-scorer
- type: queue-scorer
schedulingProfiles:
- name: a
  plugins:
  - pluginRef: missing
  - pluginRef: queue-scorer
    weight: -1
";
        let err = EndpointPickerConfig::from_yaml(doc).unwrap_err();
        let ConfigError::Invalid { issues } = err else {
            panic!("expected Invalid")
        };
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "apiVersion",
                "kind",
                "featureGates[0]",
                "plugins[1].name",
                "schedulingProfiles[0].plugins[0].pluginRef",
                "schedulingProfiles[0].plugins[1].weight"
            ]
        );
    }

    /// `--feature-gates` entries come after the file's and win; a bad one is named by its flag.
    #[test]
    fn flag_gates_win_over_the_file_and_are_named_by_the_flag() {
        let doc = "apiVersion: llm-d.ai/v1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\n";
        let gates = |flag: &[&str]| {
            let flag: Vec<String> = flag.iter().map(ToString::to_string).collect();
            EndpointPickerConfig::from_yaml_with_gates(doc, &flag)
                .map(|c| c.feature_gates.into_iter().collect::<Vec<_>>())
        };
        assert_eq!(gates(&[]).unwrap(), vec!["flowControl"]);
        assert_eq!(gates(&["flowControl=false"]).unwrap(), Vec::<String>::new());
        assert_eq!(
            gates(&["flowControl=F", "dataLayer=1"]).unwrap(),
            vec!["dataLayer"]
        );
        assert_eq!(
            gates(&["flowControl=TRUE", "dataLayer=True"]).unwrap(),
            vec!["dataLayer", "flowControl"],
            "Go's ParseBool, lowercased as upstream"
        );
        let Err(ConfigError::Invalid { issues }) = gates(&["flowcontrol", "dataLayer=yes"]) else {
            panic!("expected Invalid")
        };
        let issues: Vec<String> = issues.iter().map(ToString::to_string).collect();
        assert_eq!(
            issues,
            vec![
                "--feature-gates[0]: feature gate \"flowcontrol\" is unknown or unregistered",
                "--feature-gates[1]: invalid feature gate entry \"dataLayer=yes\": expected NAME, NAME=true or NAME=false",
            ]
        );
    }
}
