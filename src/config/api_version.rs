//! The `apiVersion`s of `EndpointPickerConfig` and what differs between them, so that every
//! version decodes into the one [`EndpointPickerConfig`](super::EndpointPickerConfig).
//!
//! llm-d-router reads `llm-d.ai/v1` and converts `v1alpha1` (both its own group and GIE's
//! `inference.networking.x-k8s.io`) into it (`apix/config/v1` and
//! `pkg/epp/config/loader/conversion.go` there). What this module owns:
//! - `v1` has no top-level `saturationDetector` or `parser`: they live at
//!   `flowControl.saturationDetector` and `requestHandler.parsers`. A `v1` document using the
//!   old places is refused with the new path in the message.
//! - `v1alpha1` accepts both places; when both are written the new one wins (upstream's rule),
//!   and the old one is reported as deprecated.
//! - The `dataLayer` fields that differ between the versions (`discovery`, `crossReplica*`,
//!   `peerDiscovery`) configure discovery plugins and cross-replica state this EPP does not
//!   have: any of them is refused by name, never ignored.
//!
//! Invariant: the same settings written in either version give the same config (a test loads
//! each pair).

use serde::Deserialize;

use super::epp_config::RawPluginRef;

/// `apiVersion`s accepted: llm-d-router's current one first, then the two it converts.
pub const API_VERSIONS: [&str; 3] = [
    "llm-d.ai/v1",
    "llm-d.ai/v1alpha1",
    "inference.networking.x-k8s.io/v1alpha1",
];

/// The version a document declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiVersion {
    /// `llm-d.ai/v1`.
    V1,
    /// Either `v1alpha1` group (deprecated upstream, converted to `v1`).
    V1Alpha1,
}

impl ApiVersion {
    /// The version of an `apiVersion` string, if accepted.
    pub fn parse(api_version: &str) -> Option<Self> {
        match api_version {
            "llm-d.ai/v1" => Some(Self::V1),
            "llm-d.ai/v1alpha1" | "inference.networking.x-k8s.io/v1alpha1" => Some(Self::V1Alpha1),
            _ => None,
        }
    }
}

/// `requestHandler` (both versions).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRequestHandler {
    /// Parser plugins; upstream picks one per request path. One is supported here.
    #[serde(default)]
    pub parsers: Vec<RawPluginRef>,
    /// Write the request's priority into the body for the engine's scheduler; not implemented.
    #[serde(default)]
    pub propagate_priority: Option<bool>,
}

/// Why `dataLayer.discovery` is refused.
pub const NO_DISCOVERY: &str = "discovery plugins are not supported: endpoints come from the InferencePool (--pool-name), a label selector (--endpoint-selector) or --endpoints, and replicas do not discover each other";
/// Why `dataLayer.peerDiscovery` is refused.
pub const NO_PEER_DISCOVERY: &str = "peer discovery is not supported: replicas do not discover each other";
/// Why `dataLayer.crossReplica` and `v1alpha1`'s `crossReplica*` fields are refused.
pub const NO_CROSS_REPLICA: &str =
    "cross-replica state is not supported: each replica keeps its own view of in-flight load and prefixes";

/// Pick between a field's `current` place and its `legacy` (`v1alpha1`-only) one, each given as
/// (reference, path written), and return the one in force the same way: in `v1` the legacy
/// place is an error naming `current_place`; in `v1alpha1` it is deprecated and loses to the
/// current one when both are written (upstream's rule). Problems go to `issue`, deprecations to
/// `deprecations`.
pub fn moved_ref<'a>(
    version: Option<ApiVersion>,
    current: Option<(&'a str, &'static str)>,
    legacy: Option<(&'a str, &'static str)>,
    current_place: &'static str,
    issue: &mut impl FnMut(String, String),
    deprecations: &mut Vec<String>,
) -> Option<(&'a str, &'static str)> {
    if let Some((name, path)) = legacy {
        match version {
            Some(ApiVersion::V1) => issue(
                path.into(),
                format!("not part of llm-d.ai/v1: write it as {current_place}"),
            ),
            _ if current.is_some() => deprecations.push(format!(
                "{path} is deprecated and overridden by {current_place}: {name:?} is not used"
            )),
            _ => deprecations.push(format!(
                "{path} is deprecated: write it as {current_place} (its only place in llm-d.ai/v1)"
            )),
        }
    }
    match (current, version) {
        (Some(current), _) => Some(current),
        (None, Some(ApiVersion::V1Alpha1)) => legacy,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{ConfigError, EndpointPickerConfig};

    fn issues(doc: &str) -> Vec<String> {
        match EndpointPickerConfig::from_yaml(doc) {
            Err(ConfigError::Invalid { issues }) => issues.iter().map(ToString::to_string).collect(),
            Err(other) => vec![other.to_string()],
            Ok(_) => vec![],
        }
    }

    const PLUGINS: &str = "\
plugins:
- {name: sd, type: utilization-detector}
- {name: parse, type: passthrough-parser}
- type: queue-scorer
- {name: src, type: metrics-data-source}
- {name: ex, type: core-metrics-extractor}
";

    const REST: &str = "\
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
dataLayer:
  sources:
  - pluginRef: src
    extractors: [{pluginRef: ex}]
";

    /// What a config resolves to, in names, for comparing two documents: detector, parser,
    /// whether metrics are scraped.
    type Resolved<'a> = (Option<&'a str>, Option<&'a str>, bool);

    fn resolved(c: &EndpointPickerConfig) -> Resolved<'_> {
        (
            c.saturation_detector.map(|r| c.plugins[r.plugin].name.as_str()),
            c.parser.map(|r| c.plugins[r.plugin].name.as_str()),
            c.metrics_collection,
        )
    }

    /// The same settings in v1's places and in v1alpha1's old ones load alike; the old places
    /// are reported as deprecated, v1 reports nothing.
    #[test]
    fn a_v1_document_and_its_v1alpha1_equivalent_give_the_same_config() {
        let v1 = EndpointPickerConfig::from_yaml(&format!(
            "apiVersion: llm-d.ai/v1\nkind: EndpointPickerConfig\n{PLUGINS}{REST}flowControl:\n  saturationDetector: {{pluginRef: sd}}\nrequestHandler:\n  parsers: [{{pluginRef: parse}}]\n  propagatePriority: false\n"
        ))
        .unwrap();
        let v1alpha1 = EndpointPickerConfig::from_yaml(&format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n{PLUGINS}{REST}saturationDetector: {{pluginRef: sd}}\nparser: {{pluginRef: parse}}\n"
        ))
        .unwrap();
        let expected = (Some("sd"), Some("parse"), true);
        assert_eq!(resolved(&v1), expected);
        assert_eq!(resolved(&v1alpha1), expected);
        assert_eq!(
            v1.saturation_detector.unwrap().path,
            "flowControl.saturationDetector.pluginRef"
        );
        assert_eq!(
            v1alpha1.saturation_detector.unwrap().path,
            "saturationDetector.pluginRef"
        );
        assert_eq!(
            v1.profiles[0].plugins[0].weight,
            v1alpha1.profiles[0].plugins[0].weight
        );
        assert!(v1.deprecations.is_empty(), "{:?}", v1.deprecations);
        assert_eq!(
            v1alpha1.deprecations,
            vec![
                "apiVersion inference.networking.x-k8s.io/v1alpha1 is deprecated upstream: llm-d.ai/v1 reads the same document with the moves described in docs/deploy.md",
                "saturationDetector.pluginRef is deprecated: write it as flowControl.saturationDetector.pluginRef (its only place in llm-d.ai/v1)",
                "parser.pluginRef is deprecated: write it as requestHandler.parsers[0].pluginRef (its only place in llm-d.ai/v1)",
            ]
        );
    }

    /// In v1alpha1 both places may be written; the new one wins, as upstream's conversion does.
    #[test]
    fn in_v1alpha1_the_new_place_wins() {
        let c = EndpointPickerConfig::from_yaml(&format!(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n{PLUGINS}- {{name: other, type: concurrency-detector}}\n- {{name: openai, type: openai-parser}}\n{REST}saturationDetector: {{pluginRef: other}}\nflowControl:\n  saturationDetector: {{pluginRef: sd}}\nparser: {{pluginRef: openai}}\nrequestHandler:\n  parsers: [{{pluginRef: parse}}]\n"
        ))
        .unwrap();
        assert_eq!(resolved(&c).0, Some("sd"));
        assert_eq!(resolved(&c).1, Some("parse"));
        assert_eq!(
            &c.deprecations[1..],
            [
                "saturationDetector.pluginRef is deprecated and overridden by flowControl.saturationDetector.pluginRef: \"other\" is not used",
                "parser.pluginRef is deprecated and overridden by requestHandler.parsers[0].pluginRef: \"openai\" is not used",
            ]
        );
    }

    /// v1 has no top-level saturationDetector or parser: strict decoding names the new place.
    #[test]
    fn v1_refuses_the_v1alpha1_places_and_names_the_new_one() {
        assert_eq!(
            issues(&format!(
                "apiVersion: llm-d.ai/v1\nkind: EndpointPickerConfig\n{PLUGINS}{REST}saturationDetector: {{pluginRef: sd}}\nparser: {{pluginRef: parse}}\n"
            )),
            vec![
                "saturationDetector.pluginRef: not part of llm-d.ai/v1: write it as flowControl.saturationDetector.pluginRef",
                "parser.pluginRef: not part of llm-d.ai/v1: write it as requestHandler.parsers[0].pluginRef",
            ]
        );
        // A field of neither version is still an unknown field, with its path.
        let e = EndpointPickerConfig::from_yaml(
            "apiVersion: llm-d.ai/v1\nkind: EndpointPickerConfig\nrequestHandler:\n  parser: {pluginRef: x}\n",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid EndpointPickerConfig at requestHandler.parser: requestHandler: unknown field `parser`, expected `parsers` or `propagatePriority`"),
            "{e}"
        );
        assert_eq!(
            issues("apiVersion: llm-d.ai/v2\nkind: EndpointPickerConfig\n"),
            vec![
                "apiVersion: unsupported apiVersion \"llm-d.ai/v2\"; expected one of [\"llm-d.ai/v1\", \"llm-d.ai/v1alpha1\", \"inference.networking.x-k8s.io/v1alpha1\"]"
            ]
        );
    }

    /// What this EPP does not have is refused by name in either version, never ignored.
    #[test]
    fn sections_without_an_implementation_are_refused_by_name() {
        assert_eq!(
            issues(
                "apiVersion: llm-d.ai/v1
kind: EndpointPickerConfig
plugins:
- {type: openai-parser}
- {type: passthrough-parser}
dataLayer:
  discovery: {endpoints: {pluginRef: file}}
  crossReplica: {syncerPluginRef: syncer, syncInterval: 500ms}
requestHandler:
  parsers: [{pluginRef: openai-parser}, {pluginRef: passthrough-parser}]
  propagatePriority: true
"
            ),
            vec![
                "requestHandler.parsers: 2 parsers listed; choosing a parser by request path is not supported: list one",
                "requestHandler.propagatePriority: writing the priority into the request body is not supported: remove it or set it to false",
                "dataLayer.discovery: discovery plugins are not supported: endpoints come from the InferencePool (--pool-name), a label selector (--endpoint-selector) or --endpoints, and replicas do not discover each other",
                "dataLayer.crossReplica: cross-replica state is not supported: each replica keeps its own view of in-flight load and prefixes",
            ]
        );
        assert_eq!(
            issues(
                "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
dataLayer:
  discovery: {pluginRef: file}
  peerDiscovery: {pluginRef: peers}
  crossReplicaSyncerPluginRef: syncer
  crossReplicaSyncInterval: 500ms
  crossReplicaPublishTimeout: 2s
"
            )
            .iter()
            .map(|i| i.split(':').next().unwrap_or_default())
            .collect::<Vec<_>>(),
            vec![
                "dataLayer.discovery",
                "dataLayer.peerDiscovery",
                "dataLayer.crossReplicaSyncerPluginRef",
                "dataLayer.crossReplicaSyncInterval",
                "dataLayer.crossReplicaPublishTimeout",
            ]
        );
    }

    /// Upstream injects the default metrics source unless told not to: only `injectDefaults:
    /// false` with no source turns scraping off.
    #[test]
    fn metrics_are_scraped_unless_defaults_are_refused_and_no_source_is_listed() {
        let collection = |data_layer: &str| {
            EndpointPickerConfig::from_yaml(&format!(
                "apiVersion: llm-d.ai/v1\nkind: EndpointPickerConfig\nplugins:\n- type: metrics-data-source\n{data_layer}"
            ))
            .map(|c| c.metrics_collection)
            .map_err(|e| e.to_string())
        };
        assert_eq!(collection(""), Ok(true));
        assert_eq!(collection("dataLayer: {}\n"), Ok(true));
        assert_eq!(collection("dataLayer: {injectDefaults: true}\n"), Ok(true));
        assert_eq!(collection("dataLayer: {injectDefaults: false}\n"), Ok(false));
        assert_eq!(
            collection(
                "dataLayer:\n  injectDefaults: false\n  sources: [{pluginRef: metrics-data-source}]\n"
            ),
            Ok(true)
        );
        // References are still checked, each by its path.
        assert_eq!(
            issues(
                "apiVersion: llm-d.ai/v1\nkind: EndpointPickerConfig\ndataLayer:\n  sources: [{pluginRef: src, extractors: [{pluginRef: ex}]}]\n"
            ),
            vec![
                "dataLayer.sources[0].pluginRef: no plugin named \"src\"",
                "dataLayer.sources[0].extractors[0].pluginRef: no plugin named \"ex\"",
            ]
        );
    }
}
