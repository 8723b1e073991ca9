//! The `flowControl` section of `EndpointPickerConfig` (llm-d-router's schema, a superset of
//! GIE's): decoded strictly with the rest of the document, validated into a [`FlowControlSpec`]
//! with every default applied and every problem named by its path. Plugin references stay names
//! here; the scheduler's registry resolves them.

use serde::Deserialize;

use super::epp_config::RawPluginRef;

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
    /// The detector for admission and dispatch, honoured with or without the gate (absent = the
    /// deprecated top-level `saturationDetector`, else `utilization-detector`).
    #[serde(default)]
    pub saturation_detector: Option<RawPluginRef>,
    /// In-flight eviction of sheddable requests (llm-d-router); not implemented here.
    #[serde(default)]
    pub enable_eviction: Option<bool>,
}

impl RawFlowControl {
    /// Whether the section sets anything besides the saturation detector (which upstream reads
    /// without the gate): without the gate, such settings are ignored with a warning.
    pub fn has_settings(&self) -> bool {
        self.max_bytes.is_some()
            || self.max_requests.is_some()
            || self.default_request_ttl.is_some()
            || self.no_endpoint_request_ttl.is_some()
            || self.default_priority_band.is_some()
            || self.default_negative_priority_band.is_some()
            || !self.priority_bands.is_empty()
            || self.usage_limit_policy_plugin_ref.is_some()
            || self.enable_eviction == Some(true)
    }
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
}

impl FlowControlSpec {
    pub(super) fn from_raw(raw: &RawFlowControl, issue: &mut impl FnMut(String, String)) -> Self {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{ConfigError, EndpointPickerConfig};

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
            "- name: sd
  type: utilization-detector
featureGates: [flowControl]
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
        assert_eq!(
            c.saturation_detector
                .map(|r| (c.plugins[r.plugin].name.as_str(), r.path)),
            Some(("sd", "flowControl.saturationDetector.pluginRef"))
        );
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
