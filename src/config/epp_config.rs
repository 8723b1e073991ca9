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

/// API groups accepted in `apiVersion` (the upstream one and its successor's).
pub const API_VERSIONS: [&str; 2] = ["inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1"];

/// Feature gates known upstream. `dataLayer` is obsolete but still accepted.
pub const FEATURE_GATES: [&str; 3] = ["dataLayer", "enableLegacyMetrics", "flowControl"];

/// The built-in configuration used when neither `--config-file` nor `--config-text` is given:
/// the upstream default since v1.4 (queue 2, KV 2, prefix 3, max-score picker).
pub const DEFAULT_CONFIG_YAML: &str = "\
apiVersion: inference.networking.x-k8s.io/v1alpha1
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
    /// `inference.networking.x-k8s.io/v1alpha1` or `llm-d.ai/v1alpha1`.
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
    /// Saturation detector reference.
    #[serde(default)]
    pub saturation_detector: Option<RawPluginRef>,
    /// Metric sources and extractors.
    #[serde(default)]
    pub data_layer: Option<RawDataLayer>,
    /// Flow control: decoded strictly always, used only with the `flowControl` gate (a section
    /// without the gate is ignored with a warning, as upstream does).
    #[serde(default)]
    pub flow_control: Option<RawFlowControl>,
    /// Request parser reference.
    #[serde(default)]
    pub parser: Option<RawPluginRef>,
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

/// `dataLayer`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDataLayer {
    /// Metric sources.
    #[serde(default)]
    pub sources: Vec<RawDataSource>,
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

/// `flowControl`, as written (llm-d-router's schema, a superset of GIE's).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawFlowControl {
    /// Global cap on queued bytes (Kubernetes quantity; 0 or absent = none).
    #[serde(default)]
    pub max_bytes: Option<Quantity>,
    /// Global cap on queued requests (0 or absent = none).
    #[serde(default)]
    pub max_requests: Option<Quantity>,
    /// How long a request may wait while the pool has endpoints (Go duration; absent = 60s,
    /// `0s` = no limit).
    #[serde(default, rename = "defaultRequestTTL")]
    pub default_request_ttl: Option<String>,
    /// How long a request may wait while the pool is empty (absent = `defaultRequestTTL`).
    #[serde(default, rename = "noEndpointRequestTTL")]
    pub no_endpoint_request_ttl: Option<String>,
    /// Template of bands not listed in `priorityBands`.
    #[serde(default)]
    pub default_priority_band: Option<RawPriorityBand>,
    /// Template of unlisted bands below priority 0 (absent = `defaultPriorityBand`).
    #[serde(default)]
    pub default_negative_priority_band: Option<RawPriorityBand>,
    /// Explicit bands.
    #[serde(default)]
    pub priority_bands: Vec<RawPriorityBand>,
    /// The usage-limit policy (absent = `static-usage-limit-policy`, threshold 1.0).
    #[serde(default)]
    pub usage_limit_policy_plugin_ref: Option<String>,
    /// The detector gating dispatch (absent = the top-level `saturationDetector`, else
    /// `utilization-detector`).
    #[serde(default)]
    pub saturation_detector: Option<RawPluginRef>,
    /// In-flight eviction of sheddable requests (llm-d-router); not implemented here.
    #[serde(default)]
    pub enable_eviction: Option<bool>,
}

/// One priority band (or a band template), as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPriorityBand {
    /// The band's priority (required in `priorityBands`; ignored in templates).
    #[serde(default)]
    pub priority: Option<i32>,
    /// Cap on the band's queued bytes (0 or absent = 1 GB).
    #[serde(default)]
    pub max_bytes: Option<Quantity>,
    /// Cap on the band's queued requests (0 or absent = 5000).
    #[serde(default)]
    pub max_requests: Option<Quantity>,
    /// Fairness policy between the band's flows (absent = `global-strict-fairness-policy`).
    #[serde(default)]
    pub fairness_policy_ref: Option<String>,
    /// Ordering policy inside each flow (absent = `fcfs-ordering-policy`).
    #[serde(default)]
    pub ordering_policy_ref: Option<String>,
}

/// A Kubernetes resource quantity: a YAML integer, or a string such as `"1Gi"`, `"500M"`, `"2k"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Quantity {
    /// A bare number.
    Int(i64),
    /// A number with an optional suffix.
    Text(String),
}

impl Quantity {
    /// The value as an integer, fractions rounded up (as `resource.Quantity.Value()`).
    ///
    /// # Errors
    /// Not a quantity.
    pub fn value(&self) -> Result<i64, String> {
        let text = match self {
            Quantity::Int(v) => return Ok(*v),
            Quantity::Text(t) => t.trim(),
        };
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        let multiplier: f64 = match suffix {
            "" => 1.0,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024.0,
            "Mi" => 1024.0 * 1024.0,
            "Gi" => 1024.0 * 1024.0 * 1024.0,
            "Ti" => 1024.0f64.powi(4),
            "Pi" => 1024.0f64.powi(5),
            "Ei" => 1024.0f64.powi(6),
            _ => return Err(format!("invalid quantity {text:?}: unknown suffix {suffix:?}")),
        };
        let n: f64 = number.parse().map_err(|_| format!("invalid quantity {text:?}"))?;
        let v = (n * multiplier).ceil();
        if !v.is_finite() || v.abs() > 9.2e18 {
            return Err(format!("invalid quantity {text:?}: out of range"));
        }
        Ok(v as i64)
    }
}

/// The default per-band byte cap (llm-d-router's, 1 GB).
pub const DEFAULT_BAND_MAX_BYTES: u64 = 1_000_000_000;
/// The default per-band request cap (llm-d-router's).
pub const DEFAULT_BAND_MAX_REQUESTS: u64 = 5_000;
/// The default queue TTL (llm-d-router's).
pub const DEFAULT_REQUEST_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// A validated band (or template): limits resolved, policy references still names (the
/// registry resolves them against `plugins`).
#[derive(Debug, Clone, PartialEq)]
pub struct BandSpec {
    /// Priority (0 for templates).
    pub priority: i32,
    /// Byte cap.
    pub max_bytes: u64,
    /// Request cap.
    pub max_requests: u64,
    /// Fairness policy instance name, if given.
    pub fairness_policy_ref: Option<String>,
    /// Ordering policy instance name, if given.
    pub ordering_policy_ref: Option<String>,
    /// Where it was written (`flowControl.priorityBands[2]`), for the registry's messages.
    pub path: String,
}

/// The validated `flowControl` section (present when the gate is on, with every default
/// applied when the section is absent).
#[derive(Debug, Clone, PartialEq)]
pub struct FlowControlSpec {
    /// Global byte cap (0 = none).
    pub max_bytes: u64,
    /// Global request cap (0 = none).
    pub max_requests: u64,
    /// Queue TTL while the pool has endpoints (zero = none).
    pub default_request_ttl: std::time::Duration,
    /// Queue TTL while the pool is empty (zero = none).
    pub no_endpoint_request_ttl: std::time::Duration,
    /// Template of unlisted bands.
    pub default_band: BandSpec,
    /// Template of unlisted negative bands.
    pub default_negative_band: BandSpec,
    /// Listed bands.
    pub bands: Vec<BandSpec>,
    /// Usage-limit policy instance name, if given.
    pub usage_limit_policy_ref: Option<String>,
    /// Detector instance name, if given here.
    pub saturation_detector_ref: Option<String>,
}

impl FlowControlSpec {
    fn from_raw(raw: &RawFlowControl, issue: &mut impl FnMut(String, String)) -> Self {
        let mut limit = |q: &Option<Quantity>, path: String, default: u64| -> u64 {
            match q.as_ref().map(Quantity::value) {
                None | Some(Ok(0)) => default,
                Some(Ok(v)) if v < 0 => {
                    issue(path, format!("must be non-negative, got {v}"));
                    default
                }
                Some(Ok(v)) => v as u64,
                Some(Err(e)) => {
                    issue(path, e);
                    default
                }
            }
        };
        let max_bytes = limit(&raw.max_bytes, "flowControl.maxBytes".into(), 0);
        let max_requests = limit(&raw.max_requests, "flowControl.maxRequests".into(), 0);
        let band =
            |b: &RawPriorityBand,
             path: String,
             limit: &mut dyn FnMut(&Option<Quantity>, String, u64) -> u64| BandSpec {
                priority: b.priority.unwrap_or(0),
                max_bytes: limit(&b.max_bytes, format!("{path}.maxBytes"), DEFAULT_BAND_MAX_BYTES),
                max_requests: limit(
                    &b.max_requests,
                    format!("{path}.maxRequests"),
                    DEFAULT_BAND_MAX_REQUESTS,
                ),
                fairness_policy_ref: b.fairness_policy_ref.clone(),
                ordering_policy_ref: b.ordering_policy_ref.clone(),
                path,
            };
        let default_band = band(
            raw.default_priority_band
                .as_ref()
                .unwrap_or(&RawPriorityBand::default()),
            "flowControl.defaultPriorityBand".into(),
            &mut limit,
        );
        let default_negative_band = match &raw.default_negative_priority_band {
            Some(b) => band(b, "flowControl.defaultNegativePriorityBand".into(), &mut limit),
            None => default_band.clone(),
        };
        let mut bands: Vec<BandSpec> = Vec::new();
        let mut missing_priority = Vec::new();
        for (i, b) in raw.priority_bands.iter().enumerate() {
            let path = format!("flowControl.priorityBands[{i}]");
            if b.priority.is_none() {
                missing_priority.push(format!("{path}.priority"));
            }
            bands.push(band(b, path, &mut limit));
        }
        for path in missing_priority {
            issue(path, "required".into());
        }
        for (i, b) in bands.iter().enumerate() {
            if bands[..i].iter().any(|o| o.priority == b.priority) {
                issue(
                    format!("{}.priority", b.path),
                    format!("duplicate priority level {}", b.priority),
                );
            }
        }
        let mut ttl = |text: &Option<String>, path: &str| -> Option<std::time::Duration> {
            let text = text.as_ref()?;
            match crate::config::parse_duration(text.trim_start_matches('-')) {
                Ok(_) if text.trim().starts_with('-') => {
                    issue(path.into(), format!("cannot be negative, but got {text}"));
                    None
                }
                Ok(d) => Some(d),
                Err(e) => {
                    issue(path.into(), e);
                    None
                }
            }
        };
        let default_ttl = ttl(&raw.default_request_ttl, "flowControl.defaultRequestTTL");
        let no_endpoint_ttl = ttl(&raw.no_endpoint_request_ttl, "flowControl.noEndpointRequestTTL");
        if raw.enable_eviction == Some(true) {
            issue(
                "flowControl.enableEviction".into(),
                "in-flight eviction is not implemented: remove it or set it to false (queued requests are still shed by TTL and capacity)".into(),
            );
        }
        let default_request_ttl = default_ttl.unwrap_or(DEFAULT_REQUEST_TTL);
        Self {
            max_bytes,
            max_requests,
            default_request_ttl,
            no_endpoint_request_ttl: no_endpoint_ttl.unwrap_or(default_request_ttl),
            default_band,
            default_negative_band,
            bands,
            usage_limit_policy_ref: raw.usage_limit_policy_plugin_ref.clone(),
            saturation_detector_ref: raw.saturation_detector.as_ref().map(|r| r.plugin_ref.clone()),
        }
    }
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
    /// Saturation detector instance (index into `plugins`), if named.
    pub saturation_detector: Option<usize>,
    /// Request parser instance (index into `plugins`), if named; `openai-parser` otherwise.
    pub parser: Option<usize>,
    /// Data sources: `(source plugin, extractor plugins)` indices into `plugins`. `None` = the
    /// document omitted `dataLayer` (collection on with defaults); `Some(empty)` disables it.
    pub data_sources: Option<Vec<(usize, Vec<usize>)>>,
    /// Flow control, when the `flowControl` gate is on (defaults applied to an absent section).
    pub flow_control: Option<FlowControlSpec>,
    /// A `flowControl` section was written without the gate: it is ignored (a warning at start).
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
                data_sources: None,
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
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let raw: RawEndpointPickerConfig =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Decode {
                path: e.path().to_string(),
                reason: e.inner().to_string(),
            })?;
        Self::try_from(raw)
    }
}

impl TryFrom<RawEndpointPickerConfig> for EndpointPickerConfig {
    type Error = ConfigError;

    fn try_from(raw: RawEndpointPickerConfig) -> Result<Self, ConfigError> {
        let mut issues = Vec::new();
        let mut issue = |path: String, reason: String| issues.push(ConfigIssue { path, reason });

        // Both API groups are in use: upstream GIE and its successor llm-d-router.
        if !API_VERSIONS.contains(&raw.api_version.as_str()) {
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
        // are `name`, `name=true` or `name=false` (llm-d-router's form).
        let mut feature_gates = BTreeSet::new();
        for (i, entry) in raw.feature_gates.iter().enumerate() {
            let (gate, on) = match entry.split_once('=') {
                None => (entry.as_str(), Some(true)),
                Some((g, "true")) => (g, Some(true)),
                Some((g, "false")) => (g, Some(false)),
                Some((g, _)) => (g, None),
            };
            if !FEATURE_GATES.contains(&gate) {
                issue(
                    format!("featureGates[{i}]"),
                    format!("feature gate {gate:?} is unknown or unregistered"),
                );
            } else if on.is_none() {
                issue(
                    format!("featureGates[{i}]"),
                    format!("invalid feature gate entry {entry:?}: expected NAME, NAME=true or NAME=false"),
                );
            } else if on == Some(true) {
                feature_gates.insert(gate.to_owned());
            } else {
                feature_gates.remove(gate);
            }
        }
        let flow_control_on = feature_gates.contains("flowControl");
        let flow_control = flow_control_on.then(|| {
            FlowControlSpec::from_raw(
                raw.flow_control.as_ref().unwrap_or(&RawFlowControl::default()),
                &mut issue,
            )
        });
        let flow_control_ignored = !flow_control_on && raw.flow_control.is_some();

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

        let mut lookup_ref = |path: String, name: &str| -> Option<usize> {
            let found = find(name);
            if found.is_none() {
                issue(path, format!("no plugin named {name:?}"));
            }
            found
        };
        let saturation_detector = raw
            .saturation_detector
            .as_ref()
            .and_then(|r| lookup_ref("saturationDetector.pluginRef".into(), &r.plugin_ref));
        let parser = raw
            .parser
            .as_ref()
            .and_then(|p| lookup_ref("parser.pluginRef".into(), &p.plugin_ref));
        let data_sources = raw.data_layer.as_ref().map(|dl| {
            dl.sources
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let src = lookup_ref(format!("dataLayer.sources[{i}].pluginRef"), &s.plugin_ref)?;
                    let extractors = s
                        .extractors
                        .iter()
                        .enumerate()
                        .filter_map(|(j, e)| {
                            lookup_ref(
                                format!("dataLayer.sources[{i}].extractors[{j}].pluginRef"),
                                &e.plugin_ref,
                            )
                        })
                        .collect();
                    Some((src, extractors))
                })
                .collect()
        });

        if !issues.is_empty() {
            return Err(ConfigError::Invalid { issues });
        }
        Ok(Self {
            feature_gates,
            plugins,
            profiles,
            saturation_detector,
            parser,
            data_sources,
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

    fn flow_config(extra: &str) -> Result<EndpointPickerConfig, ConfigError> {
        EndpointPickerConfig::from_yaml(&format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n{extra}"
        ))
    }

    fn issues(err: ConfigError) -> Vec<String> {
        match err {
            ConfigError::Invalid { issues } => issues.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }

    /// The gate alone turns flow control on with llm-d-router's defaults.
    #[test]
    fn the_gate_alone_gives_the_upstream_defaults() {
        let c = flow_config("featureGates: [dataLayer, flowControl]\n").unwrap();
        let fc = c.flow_control.expect("flow control on");
        assert_eq!((fc.max_bytes, fc.max_requests), (0, 0));
        assert_eq!(fc.default_request_ttl, std::time::Duration::from_secs(60));
        assert_eq!(fc.no_endpoint_request_ttl, std::time::Duration::from_secs(60));
        assert_eq!(fc.default_band.max_bytes, 1_000_000_000);
        assert_eq!(fc.default_band.max_requests, 5_000);
        assert_eq!(fc.default_negative_band, fc.default_band);
        assert!(fc.bands.is_empty());
        assert!(!c.flow_control_ignored);
        let off = flow_config("featureGates: [flowControl=false]\nflowControl: {maxRequests: 3}\n").unwrap();
        assert!(off.flow_control.is_none());
        assert!(
            off.flow_control_ignored,
            "a section without the gate is ignored with a warning"
        );
    }

    #[test]
    fn the_section_decodes_quantities_durations_and_bands() {
        let c = flow_config(
            "featureGates: [flowControl]
flowControl:
  maxBytes: 1Gi
  maxRequests: \"2k\"
  defaultRequestTTL: 30s
  defaultPriorityBand: {maxRequests: 100}
  priorityBands:
  - priority: 10
    maxBytes: 500M
    fairnessPolicyRef: rr
    orderingPolicyRef: edf-ordering-policy
  - priority: -1
    maxRequests: 0
  usageLimitPolicyPluginRef: limit
  saturationDetector: {pluginRef: sd}
",
        )
        .unwrap();
        let fc = c.flow_control.unwrap();
        assert_eq!(fc.max_bytes, 1 << 30);
        assert_eq!(fc.max_requests, 2_000);
        assert_eq!(fc.default_request_ttl, std::time::Duration::from_secs(30));
        assert_eq!(
            fc.no_endpoint_request_ttl, fc.default_request_ttl,
            "follows defaultRequestTTL"
        );
        assert_eq!(fc.default_band.max_requests, 100);
        assert_eq!(fc.bands[0].priority, 10);
        assert_eq!(fc.bands[0].max_bytes, 500_000_000);
        assert_eq!(fc.bands[0].max_requests, 5_000);
        assert_eq!(fc.bands[0].fairness_policy_ref.as_deref(), Some("rr"));
        assert_eq!(
            fc.bands[1].max_requests, 5_000,
            "0 means the default, never unlimited"
        );
        assert_eq!(fc.usage_limit_policy_ref.as_deref(), Some("limit"));
        assert_eq!(fc.saturation_detector_ref.as_deref(), Some("sd"));
    }

    #[test]
    fn a_bad_section_is_refused_with_every_path() {
        let e = flow_config(
            "featureGates: [flowControl]
flowControl:
  maxBytes: -1
  maxRequests: 3x
  defaultRequestTTL: -5s
  enableEviction: true
  priorityBands:
  - {priority: 1}
  - {priority: 1}
  - {maxBytes: 1}
",
        )
        .unwrap_err();
        assert_eq!(
            issues(e),
            vec![
                "flowControl.maxBytes: must be non-negative, got -1",
                "flowControl.maxRequests: invalid quantity \"3x\": unknown suffix \"x\"",
                "flowControl.priorityBands[2].priority: required",
                "flowControl.priorityBands[1].priority: duplicate priority level 1",
                "flowControl.defaultRequestTTL: cannot be negative, but got -5s",
                "flowControl.enableEviction: in-flight eviction is not implemented: remove it or set it to false (queued requests are still shed by TTL and capacity)",
            ]
        );
        let e = flow_config("flowControl: {maxByte: 1}\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `maxByte`"), "{e}");
        let e = flow_config("featureGates: [flowControl=yes, nope]\n").unwrap_err();
        assert_eq!(
            issues(e),
            vec![
                "featureGates[0]: invalid feature gate entry \"flowControl=yes\": expected NAME, NAME=true or NAME=false",
                "featureGates[1]: feature gate \"nope\" is unknown or unregistered",
            ]
        );
    }
}
