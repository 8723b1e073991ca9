//! The data-layer plugins of an upstream `EndpointPickerConfig`: where metrics are scraped
//! (`metrics-data-source`) and which names are read per engine (`core-metrics-extractor`).
//!
//! Parameter names, defaults and rules are upstream's so a config file carries over unchanged:
//! a user `engineConfigs` entry replaces the built-in engine of the same name entirely (a field
//! left out is an empty spec, which disables that metric), `default` is a reserved name, and an
//! unknown `defaultEngine` is an error. Unknown fields are errors here (upstream's successor is
//! strict too).

use std::sync::Arc;

use serde::Deserialize;

use super::engines::{CacheInfoSource, EngineSpec, MetricSelector, builtin_engines};
use crate::config::{ConfigIssue, EndpointPickerConfig, PluginSpec, decode_plugin_params};

/// Pod label naming the engine (llm-d-router's default `engineLabelKey`).
pub const ENGINE_LABEL: &str = "llm-d.ai/engine-type";

/// GIE's engine label, read when the configured one is absent or empty, as llm-d-router does
/// (`extractor/metrics/mapping_registry.go`): pods labelled for GIE keep their engine.
pub const LEGACY_ENGINE_LABEL: &str = "inference.networking.k8s.io/engine-type";

/// `metrics-data-source` parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DataSourceParams {
    /// `http` or `https`.
    pub scheme: String,
    /// Metrics path.
    pub path: String,
    /// Skip TLS verification for https.
    pub insecure_skip_verify: bool,
    /// Scrape this port instead of the serving port (successor's field).
    pub port: Option<u16>,
}

impl Default for DataSourceParams {
    fn default() -> Self {
        Self {
            scheme: "http".into(),
            path: "/metrics".into(),
            insecure_skip_verify: true,
            port: None,
        }
    }
}

/// One `engineConfigs` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct EngineConfigParams {
    /// Engine name (the pod label value).
    pub name: String,
    /// Waiting-queue spec.
    pub queued_requests_spec: String,
    /// Running-requests spec.
    pub running_requests_spec: String,
    /// KV-utilization spec.
    pub kv_usage_spec: String,
    /// LoRA info spec.
    pub lora_spec: String,
    /// Info gauge whose labels carry the block size and count.
    pub cache_info_spec: String,
    /// Label of `cacheInfoSpec` holding the block size (default `block_size`).
    pub cache_block_size_label_name: String,
    /// Label of `cacheInfoSpec` holding the block count (default `num_gpu_blocks`).
    pub cache_num_blocks_label_name: String,
    /// Gauge holding the block size.
    pub cache_block_size_spec: String,
    /// Gauge holding the block count.
    pub cache_num_blocks_spec: String,
}

/// `core-metrics-extractor` parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ExtractorParams {
    /// Pod label naming the engine.
    pub engine_label_key: String,
    /// Engine for pods without (or with an unknown) label.
    pub default_engine: String,
    /// Overrides and additions.
    pub engine_configs: Vec<EngineConfigParams>,
}

impl Default for ExtractorParams {
    fn default() -> Self {
        Self {
            engine_label_key: ENGINE_LABEL.into(),
            default_engine: "vllm".into(),
            engine_configs: Vec::new(),
        }
    }
}

/// What the collector needs from the config.
#[derive(Debug, Clone)]
pub struct DataLayer {
    /// Scrape location.
    pub source: DataSourceParams,
    /// Engines by name (user entries first, then the built-ins they do not replace).
    pub engines: Vec<EngineSpec>,
    /// Engine used when a pod names none or an unknown one.
    pub default_engine: Arc<str>,
    /// Pod label naming the engine.
    pub engine_label_key: String,
    /// Whether collection is on (off only with `injectDefaults: false` and no source).
    pub enabled: bool,
}

impl DataLayer {
    /// The engine name a pod's `labels` give: the configured label, else GIE's legacy one,
    /// else `""` (the default engine).
    pub fn engine_name<'a>(&self, labels: &'a std::collections::BTreeMap<String, String>) -> &'a str {
        [self.engine_label_key.as_str(), LEGACY_ENGINE_LABEL]
            .into_iter()
            .find_map(|key| labels.get(key).filter(|v| !v.is_empty()))
            .map_or("", String::as_str)
    }
}

fn selectors(spec: &str, path: &str) -> Result<Vec<MetricSelector>, ConfigIssue> {
    if spec.trim().is_empty() {
        return Ok(Vec::new());
    }
    MetricSelector::parse(spec)
        .map(|s| vec![s])
        .map_err(|reason| ConfigIssue {
            path: path.into(),
            reason,
        })
}

fn engine_from_params(p: &EngineConfigParams, path: &str) -> Result<EngineSpec, ConfigIssue> {
    let field = |f: &str| format!("{path}.{f}");
    let cache_info = if !p.cache_info_spec.trim().is_empty() {
        let metric = MetricSelector::parse(&p.cache_info_spec).map_err(|reason| ConfigIssue {
            path: field("cacheInfoSpec"),
            reason,
        })?;
        let or = |v: &str, d: &str| if v.is_empty() { d.to_owned() } else { v.to_owned() };
        CacheInfoSource::InfoLabels {
            metric: metric.name,
            block_size_label: or(&p.cache_block_size_label_name, "block_size"),
            num_blocks_label: or(&p.cache_num_blocks_label_name, "num_gpu_blocks"),
        }
    } else if !p.cache_block_size_spec.trim().is_empty() || !p.cache_num_blocks_spec.trim().is_empty() {
        let one = |spec: &str, f: &str| -> Result<MetricSelector, ConfigIssue> {
            Ok(selectors(spec, &field(f))?.pop().unwrap_or(MetricSelector {
                name: String::new(),
                labels: Vec::new(),
            }))
        };
        CacheInfoSource::Gauges {
            block_size: one(&p.cache_block_size_spec, "cacheBlockSizeSpec")?,
            num_blocks: one(&p.cache_num_blocks_spec, "cacheNumBlocksSpec")?,
        }
    } else {
        CacheInfoSource::None
    };
    let lora = selectors(&p.lora_spec, &field("loraSpec"))?.pop().map(|s| s.name);
    Ok(EngineSpec {
        name: p.name.as_str().into(),
        waiting: selectors(&p.queued_requests_spec, &field("queuedRequestsSpec"))?,
        running: selectors(&p.running_requests_spec, &field("runningRequestsSpec"))?,
        kv_usage: selectors(&p.kv_usage_spec, &field("kvUsageSpec"))?,
        lora_info: lora,
        cache_info,
    })
}

fn find<'a>(config: &'a EndpointPickerConfig, plugin_type: &str) -> Option<&'a PluginSpec> {
    config.plugins.iter().find(|p| p.plugin_type == plugin_type)
}

/// Build the data layer from `config`, starting from `source` (the defaults, possibly changed by
/// the deprecated `--model-server-metrics-*` flags).
///
/// # Errors
/// Every rule violation, with its config path.
pub fn data_layer(
    config: &EndpointPickerConfig,
    source: DataSourceParams,
) -> Result<DataLayer, Vec<ConfigIssue>> {
    let mut issues = Vec::new();
    let source = match find(config, "metrics-data-source") {
        Some(spec) if !spec.parameters.is_null() => {
            let mut merged = source.clone();
            match decode_plugin_params::<serde_yaml_ng::Mapping>(spec) {
                Ok(map) => {
                    // Only the fields the document sets override the flags.
                    match decode_plugin_params::<DataSourceParams>(spec) {
                        Ok(p) => {
                            let has = |k: &str| map.contains_key(serde_yaml_ng::Value::String(k.into()));
                            if has("scheme") {
                                merged.scheme = p.scheme;
                            }
                            if has("path") {
                                merged.path = p.path;
                            }
                            if has("insecureSkipVerify") {
                                merged.insecure_skip_verify = p.insecure_skip_verify;
                            }
                            if has("port") {
                                merged.port = p.port;
                            }
                        }
                        Err(e) => issues.push(e),
                    }
                }
                Err(e) => issues.push(e),
            }
            if !matches!(merged.scheme.as_str(), "http" | "https") {
                issues.push(ConfigIssue {
                    path: format!("{}.parameters.scheme", spec.path),
                    reason: format!("unsupported scheme: {}", merged.scheme),
                });
            }
            merged
        }
        _ => source,
    };

    let extractor_spec = find(config, "core-metrics-extractor");
    let params: ExtractorParams = match extractor_spec {
        Some(spec) => decode_plugin_params(spec).unwrap_or_else(|e| {
            issues.push(e);
            ExtractorParams::default()
        }),
        None => ExtractorParams::default(),
    };
    let base = extractor_spec.map_or("plugins[core-metrics-extractor]".to_owned(), |s| s.path.clone());
    let mut engines = Vec::new();
    for (i, e) in params.engine_configs.iter().enumerate() {
        let path = format!("{base}.parameters.engineConfigs[{i}]");
        if e.name.is_empty() {
            issues.push(ConfigIssue {
                path: format!("{path}.name"),
                reason: "engine config name cannot be empty".into(),
            });
            continue;
        }
        // `default` names the fallback mapping upstream; a user engine must not shadow it.
        if e.name == "default" {
            issues.push(ConfigIssue {
                path: format!("{path}.name"),
                reason: "engine config name cannot be \"default\" (reserved)".into(),
            });
            continue;
        }
        if engines.iter().any(|x: &EngineSpec| *x.name == *e.name) {
            issues.push(ConfigIssue {
                path: format!("{path}.name"),
                reason: format!("mapping for engine type {:?} already exists", e.name),
            });
            continue;
        }
        match engine_from_params(e, &path) {
            Ok(spec) => engines.push(spec),
            Err(issue) => issues.push(issue),
        }
    }
    for builtin in builtin_engines() {
        if !engines.iter().any(|e| e.name == builtin.name) {
            engines.push(builtin);
        }
    }
    let default_engine = if params.default_engine.is_empty() {
        "vllm".to_owned()
    } else {
        params.default_engine
    };
    if !engines.iter().any(|e| *e.name == *default_engine) {
        issues.push(ConfigIssue {
            path: format!("{base}.parameters.defaultEngine"),
            reason: format!("defaultEngine {default_engine:?} not found in engineConfigs"),
        });
    }
    let enabled = config.metrics_collection;
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(DataLayer {
        source,
        engines,
        default_engine: default_engine.into(),
        engine_label_key: if params.engine_label_key.is_empty() {
            ENGINE_LABEL.into()
        } else {
            params.engine_label_key
        },
        enabled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(plugins: &str) -> EndpointPickerConfig {
        EndpointPickerConfig::from_yaml(&format!(
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n{plugins}"
        ))
        .unwrap()
    }

    #[test]
    fn upstream_custom_engine_example_loads() {
        let c = config(
            "\
- name: core-metrics-extractor
  type: core-metrics-extractor
  parameters:
    engineLabelKey: \"inference.networking.k8s.io/engine-type\"
    defaultEngine: \"vllm\"
    engineConfigs:
    - name: vllm
      queuedRequestsSpec: \"vllm:num_requests_waiting\"
      runningRequestsSpec: \"vllm:num_requests_running\"
      kvUsageSpec: \"vllm:kv_cache_usage_perc\"
      loraSpec: \"\"
      cacheInfoSpec: \"vllm:cache_config_info\"
    - name: triton
      queuedRequestsSpec: \"nv_trt_llm_request_metrics{request_type=waiting}\"
      kvUsageSpec: \"nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}\"
",
        );
        let dl = data_layer(&c, DataSourceParams::default()).unwrap();
        let names: Vec<&str> = dl.engines.iter().map(|e| &*e.name).collect();
        assert_eq!(
            names,
            vec![
                "vllm",
                "triton",
                "sglang",
                "triton-tensorrt-llm",
                "trtllm-serve",
                "llamacpp"
            ]
        );
        let vllm = &dl.engines[0];
        assert_eq!(vllm.lora_info, None, "empty loraSpec disables LoRA");
        assert_eq!(
            vllm.kv_usage.len(),
            1,
            "a user entry replaces the built-in entirely"
        );
        let triton = &dl.engines[1];
        assert!(triton.running.is_empty());
        assert_eq!(
            triton.waiting[0].labels,
            vec![("request_type".to_owned(), "waiting".to_owned())]
        );
    }

    #[test]
    fn rules_are_enforced_with_paths() {
        let c = config(
            "\
- type: core-metrics-extractor
  parameters:
    defaultEngine: nope
    engineConfigs:
    - {name: default}
    - {name: a}
    - {name: a}
    - {name: b, queuedRequestsSpec: \"x{y\"}
- type: metrics-data-source
  parameters: {scheme: ftp}
",
        );
        let issues = data_layer(&c, DataSourceParams::default()).unwrap_err();
        let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            vec![
                "plugins[2].parameters.scheme: unsupported scheme: ftp",
                "plugins[1].parameters.engineConfigs[0].name: engine config name cannot be \"default\" (reserved)",
                "plugins[1].parameters.engineConfigs[2].name: mapping for engine type \"a\" already exists",
                "plugins[1].parameters.engineConfigs[3].queuedRequestsSpec: metric spec \"x{y\": missing closing brace",
                "plugins[1].parameters.defaultEngine: defaultEngine \"nope\" not found in engineConfigs",
            ]
        );
    }

    #[test]
    fn data_source_params_override_flags_field_by_field() {
        let c = config("- type: metrics-data-source\n  parameters: {path: /prometheus/metrics}\n");
        let flags = DataSourceParams {
            scheme: "https".into(),
            ..Default::default()
        };
        let dl = data_layer(&c, flags).unwrap();
        assert_eq!(dl.source.scheme, "https");
        assert_eq!(dl.source.path, "/prometheus/metrics");
        assert!(dl.enabled);
    }

    /// llm-d-router's label first, GIE's when it is absent or empty, else the default engine.
    #[test]
    fn the_engine_comes_from_the_llm_d_label_then_gies() {
        let dl = data_layer(&config(""), DataSourceParams::default()).unwrap();
        assert_eq!(dl.engine_label_key, "llm-d.ai/engine-type");
        let labels = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let both = labels(&[("llm-d.ai/engine-type", "sglang"), (LEGACY_ENGINE_LABEL, "vllm")]);
        assert_eq!(dl.engine_name(&both), "sglang");
        let legacy = labels(&[
            ("llm-d.ai/engine-type", ""),
            (LEGACY_ENGINE_LABEL, "triton-tensorrt-llm"),
        ]);
        assert_eq!(dl.engine_name(&legacy), "triton-tensorrt-llm");
        assert_eq!(dl.engine_name(&labels(&[("app", "x")])), "");
        let custom = data_layer(
            &config("- type: core-metrics-extractor\n  parameters: {engineLabelKey: example.com/engine}\n"),
            DataSourceParams::default(),
        )
        .unwrap();
        let labelled = labels(&[("example.com/engine", "sglang"), (LEGACY_ENGINE_LABEL, "vllm")]);
        assert_eq!(custom.engine_name(&labelled), "sglang");
        assert_eq!(custom.engine_name(&legacy), "triton-tensorrt-llm");
    }
}
