//! Plugin registry: `type` string → constructor, and assembly of a [`Scheduler`] from a validated
//! [`EndpointPickerConfig`].
//!
//! Every plugin type this EPP knows is listed in [`PLUGIN_TYPES`]; anything else fails at load
//! time with the config path. Types that belong to other stages (data layer, parser, profile
//! handler) are accepted here and consumed by their owners.

use std::sync::Arc;

use super::{
    params::{decode_params, no_params},
    pickers::{MaxScorePicker, PickerParams, RandomPicker},
    pipeline::Scheduler,
    plugin::{DataProducer, Filter, Needs, Picker, PluginName, PreRequest, Scorer},
    producers::ApproxPrefixProducer,
    profile::{Profile, WeightedScorer},
    scorers::{KvCacheScorer, PrefixCacheScorer, QueueScorer, QueueSignal},
};
use crate::config::{ConfigError, ConfigIssue, EndpointPickerConfig, PluginSpec};

/// Plugin types accepted in `plugins[].type`.
pub const PLUGIN_TYPES: [&str; 13] = [
    "queue-scorer",
    "running-requests-size-scorer",
    "kv-cache-utilization-scorer",
    "kv-cache-scorer",
    "prefix-cache-scorer",
    "approx-prefix-cache-producer",
    "max-score-picker",
    "random-picker",
    "single-profile-handler",
    "openai-parser",
    "metrics-data-source",
    "core-metrics-extractor",
    "utilization-detector",
];

/// The roles one configured plugin instance plays.
#[derive(Default)]
struct Roles {
    filter: Option<Arc<dyn Filter>>,
    scorer: Option<Arc<dyn Scorer>>,
    picker: Option<Arc<dyn Picker>>,
    producer: Option<Arc<dyn DataProducer>>,
    pre_request: Option<Arc<dyn PreRequest>>,
}

fn kind_of(plugin_type: &str) -> Option<&'static str> {
    PLUGIN_TYPES.iter().copied().find(|t| *t == plugin_type)
}

fn build_plugin(spec: &PluginSpec) -> Result<Roles, ConfigIssue> {
    let Some(kind) = kind_of(&spec.plugin_type) else {
        return Err(ConfigIssue {
            path: format!("{}.type", spec.path),
            reason: format!("unknown plugin type {:?}", spec.plugin_type),
        });
    };
    let name = PluginName {
        kind,
        name: spec.name.as_str().into(),
    };
    let mut roles = Roles::default();
    match kind {
        "queue-scorer" => {
            no_params(spec)?;
            roles.scorer = Some(Arc::new(QueueScorer::new(name, QueueSignal::Waiting)));
        }
        "running-requests-size-scorer" => {
            no_params(spec)?;
            roles.scorer = Some(Arc::new(QueueScorer::new(name, QueueSignal::Running)));
        }
        "kv-cache-utilization-scorer" | "kv-cache-scorer" => {
            no_params(spec)?;
            roles.scorer = Some(Arc::new(KvCacheScorer::new(name)));
        }
        // Upstream's factory ignores this scorer's parameters, and its docs still show a
        // `blockSize` here: accept and ignore them so those configs keep loading.
        "prefix-cache-scorer" => roles.scorer = Some(Arc::new(PrefixCacheScorer::new(name))),
        "approx-prefix-cache-producer" => {
            let p = Arc::new(ApproxPrefixProducer::from_config(name, spec)?);
            roles.producer = Some(p.clone());
            roles.pre_request = Some(p);
        }
        "max-score-picker" => {
            let params: PickerParams = decode_params(spec)?;
            roles.picker = Some(Arc::new(MaxScorePicker::new(name, &params)));
        }
        "random-picker" => {
            let params: PickerParams = decode_params(spec)?;
            roles.picker = Some(Arc::new(RandomPicker::new(name, &params)));
        }
        "single-profile-handler" | "openai-parser" => no_params(spec)?,
        // Consumed by the metrics collector (data layer) and the admission stage.
        "metrics-data-source" | "core-metrics-extractor" | "utilization-detector" => {}
        _ => {}
    }
    Ok(roles)
}

fn default_name(kind: &'static str) -> PluginName {
    PluginName {
        kind,
        name: kind.into(),
    }
}

/// Build the scheduler described by `config`.
///
/// # Errors
/// [`ConfigError::Invalid`] listing every unknown type, bad parameter and unsupported layout.
pub fn build_scheduler(config: &EndpointPickerConfig) -> Result<Scheduler, ConfigError> {
    let mut issues = Vec::new();
    let roles: Vec<Roles> = config
        .plugins
        .iter()
        .map(|spec| {
            build_plugin(spec).unwrap_or_else(|e| {
                issues.push(e);
                Roles::default()
            })
        })
        .collect();

    // Only the single-profile handler exists (as upstream's default); several profiles would need
    // a handler that chooses between them.
    if config.profiles.len() > 1 {
        issues.push(ConfigIssue {
            path: "schedulingProfiles".into(),
            reason: format!(
                "{} profiles configured, but single-profile-handler runs exactly one",
                config.profiles.len()
            ),
        });
    }
    let Some(spec) = config.profiles.first() else {
        return Err(ConfigError::Invalid {
            issues: vec![ConfigIssue {
                path: "schedulingProfiles".into(),
                reason: "no scheduling profile".into(),
            }],
        });
    };

    let mut filters = Vec::new();
    let mut scorers = Vec::new();
    let mut picker: Option<Arc<dyn Picker>> = None;
    for (j, entry) in spec.plugins.iter().enumerate() {
        let r = &roles[entry.plugin];
        if let Some(f) = &r.filter {
            filters.push(f.clone());
        }
        if let Some(s) = &r.scorer {
            scorers.push(WeightedScorer {
                scorer: s.clone(),
                weight: entry.weight,
            });
        }
        if let Some(p) = &r.picker {
            if picker.is_some() {
                issues.push(ConfigIssue {
                    path: format!("schedulingProfiles[0].plugins[{j}]"),
                    reason: "a profile has exactly one picker".into(),
                });
            }
            picker = Some(p.clone());
        }
    }
    // Upstream: a profile without a picker takes a configured one, else a default max-score.
    let picker = picker
        .or_else(|| roles.iter().find_map(|r| r.picker.clone()))
        .unwrap_or_else(|| {
            Arc::new(MaxScorePicker::new(
                default_name("max-score-picker"),
                &PickerParams::default(),
            ))
        });

    let needs = Needs {
        prefix_match: filters.iter().any(|f| f.needs().prefix_match)
            || scorers.iter().any(|s| s.scorer.needs().prefix_match),
    };
    let mut producers: Vec<Arc<dyn DataProducer>> = roles.iter().filter_map(|r| r.producer.clone()).collect();
    let mut pre_request: Vec<Arc<dyn PreRequest>> =
        roles.iter().filter_map(|r| r.pre_request.clone()).collect();
    // Upstream auto-adds the producer when the prefix scorer is used without one.
    if needs.prefix_match && !producers.iter().any(|p| p.produces().prefix_match) {
        let spec = PluginSpec {
            name: "approx-prefix-cache-producer".into(),
            plugin_type: "approx-prefix-cache-producer".into(),
            parameters: serde_yaml_ng::Value::Null,
            path: "plugins[auto]".into(),
        };
        match ApproxPrefixProducer::from_config(default_name("approx-prefix-cache-producer"), &spec) {
            Ok(p) => {
                let p = Arc::new(p);
                producers.push(p.clone());
                pre_request.push(p);
            }
            Err(e) => issues.push(e),
        }
    }

    if !issues.is_empty() {
        return Err(ConfigError::Invalid { issues });
    }
    Ok(Scheduler {
        producers,
        profile: Profile {
            name: spec.name.as_str().into(),
            filters,
            scorers,
            picker,
        },
        pre_request,
        needs,
    })
}
