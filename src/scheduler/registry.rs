//! Plugin registry: `type` string → constructor, and assembly of a [`Scheduler`] from a validated
//! [`EndpointPickerConfig`].
//!
//! Every plugin type this EPP knows is listed in [`PLUGIN_TYPES`]; anything else fails at load
//! time with the config path. Types that belong to other stages (data layer, parser, profile
//! handler) are accepted here and consumed by their owners. Decision trees are built last, since
//! they refer to other filters by name.

use std::{collections::HashMap, sync::Arc};

use serde::Deserialize;

use super::{
    admission::{PromptGuard, TokenBudget},
    filters::{
        DecisionTreeFilter, LeastKvCacheFilter, LeastQueueFilter, LoraAffinityFilter, LowQueueFilter,
        PrefixAffinityFilter,
    },
    params::{decode_params, no_params},
    pickers::{MaxScorePicker, PickerParams, RandomPicker, RoundRobinPicker, WeightedRandomPicker},
    pipeline::Scheduler,
    plugin::{DataProducer, Filter, Needs, Picker, PluginName, PreRequest, SaturationDetector, Scorer},
    producers::ApproxPrefixProducer,
    profile::{Profile, WeightedScorer},
    saturation::{ConcurrencyDetector, UtilizationDetector},
    scorers::{
        KvCacheScorer, LoraAffinityScorer, PrefixCacheScorer, QueueScorer, QueueSignal, TokenLoadScorer,
    },
};
use crate::config::{ConfigError, ConfigIssue, EndpointPickerConfig, PluginSpec};

/// Plugin types accepted in `plugins[].type`.
pub const PLUGIN_TYPES: [&str; 31] = [
    "queue-scorer",
    "running-requests-size-scorer",
    "kv-cache-utilization-scorer",
    "kv-cache-scorer",
    "lora-affinity-scorer",
    "prefix-cache-scorer",
    "token-load-scorer",
    "approx-prefix-cache-producer",
    "inflight-load-producer",
    "max-score-picker",
    "random-picker",
    "round-robin-picker",
    "weighted-random-picker",
    "single-profile-handler",
    "utilization-detector",
    "concurrency-detector",
    "low-queue-filter",
    "lora-affinity-filter",
    "least-queue-filter",
    "least-kv-cache-filter",
    "decision-tree-filter",
    "prefix-cache-affinity-filter",
    "inference-objectives",
    "prompt-guard",
    "token-budget",
    "openai-parser",
    "metrics-data-source",
    "core-metrics-extractor",
    // Accepted so upstream flow-control configs load; flow control itself is not implemented and
    // the `flowControl` gate is refused by the app.
    "fcfs-ordering-policy",
    "global-strict-fairness-policy",
    "static-usage-limit-policy",
];

/// The roles one configured plugin instance plays.
#[derive(Default, Clone)]
struct Roles {
    filter: Option<Arc<dyn Filter>>,
    scorer: Option<Arc<dyn Scorer>>,
    picker: Option<Arc<dyn Picker>>,
    producer: Option<Arc<dyn DataProducer>>,
    pre_request: Option<Arc<dyn PreRequest>>,
    detector: Option<Arc<dyn SaturationDetector>>,
    objectives: Vec<(String, i32)>,
    guard: Option<Arc<PromptGuard>>,
    budget: Option<Arc<TokenBudget>>,
}

fn kind_of(plugin_type: &str) -> Option<&'static str> {
    PLUGIN_TYPES.iter().copied().find(|t| *t == plugin_type)
}

/// `inference-objectives` parameters: objective priorities for pools without the CRD.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectivesParams {
    objectives: Vec<ObjectiveParam>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectiveParam {
    name: String,
    #[serde(default)]
    priority: i32,
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
    let mut r = Roles::default();
    match kind {
        "queue-scorer" => {
            no_params(spec)?;
            r.scorer = Some(Arc::new(QueueScorer::new(name, QueueSignal::Waiting)));
        }
        "running-requests-size-scorer" => {
            no_params(spec)?;
            r.scorer = Some(Arc::new(QueueScorer::new(name, QueueSignal::Running)));
        }
        "kv-cache-utilization-scorer" | "kv-cache-scorer" => {
            no_params(spec)?;
            r.scorer = Some(Arc::new(KvCacheScorer::new(name)));
        }
        "lora-affinity-scorer" => {
            no_params(spec)?;
            r.scorer = Some(Arc::new(LoraAffinityScorer::new(name)));
        }
        // Upstream's factory ignores this scorer's parameters, and its docs still show a
        // `blockSize` here: accept and ignore them so those configs keep loading.
        "prefix-cache-scorer" => r.scorer = Some(Arc::new(PrefixCacheScorer::new(name))),
        "token-load-scorer" => r.scorer = Some(Arc::new(TokenLoadScorer::new(name, &decode_params(spec)?))),
        "approx-prefix-cache-producer" => {
            let p = Arc::new(ApproxPrefixProducer::from_config(name, spec)?);
            r.producer = Some(p.clone());
            r.pre_request = Some(p);
        }
        // In-flight requests and tokens are always counted (two atomics per pick), so the
        // producer has nothing left to do; it is accepted for upstream configs.
        "inflight-load-producer" => no_params(spec)?,
        "max-score-picker" => {
            r.picker = Some(Arc::new(MaxScorePicker::new(
                name,
                &decode_params::<PickerParams>(spec)?,
            )))
        }
        "random-picker" => {
            r.picker = Some(Arc::new(RandomPicker::new(
                name,
                &decode_params::<PickerParams>(spec)?,
            )))
        }
        "round-robin-picker" => {
            r.picker = Some(Arc::new(RoundRobinPicker::new(
                name,
                &decode_params::<PickerParams>(spec)?,
            )))
        }
        "weighted-random-picker" => {
            r.picker = Some(Arc::new(WeightedRandomPicker::new(
                name,
                &decode_params::<PickerParams>(spec)?,
            )));
        }
        "utilization-detector" => {
            let d = Arc::new(UtilizationDetector::from_params(
                name,
                &decode_params(spec)?,
                spec,
            )?);
            r.filter = Some(d.clone());
            r.detector = Some(d);
        }
        "concurrency-detector" => {
            let d = Arc::new(ConcurrencyDetector::from_params(
                name,
                &decode_params(spec)?,
                spec,
            )?);
            r.filter = Some(d.clone());
            r.detector = Some(d);
        }
        "low-queue-filter" => r.filter = Some(Arc::new(LowQueueFilter::new(name, &decode_params(spec)?))),
        "lora-affinity-filter" => {
            r.filter = Some(Arc::new(LoraAffinityFilter::new(name, &decode_params(spec)?)))
        }
        "least-queue-filter" => {
            no_params(spec)?;
            r.filter = Some(Arc::new(LeastQueueFilter::new(name)));
        }
        "least-kv-cache-filter" => {
            no_params(spec)?;
            r.filter = Some(Arc::new(LeastKvCacheFilter::new(name)));
        }
        "prefix-cache-affinity-filter" => {
            r.filter = Some(Arc::new(PrefixAffinityFilter::new(name, decode_params(spec)?)));
        }
        "inference-objectives" => {
            let p: ObjectivesParams = decode_params(spec)?;
            r.objectives = p.objectives.into_iter().map(|o| (o.name, o.priority)).collect();
        }
        "token-budget" => r.budget = Some(Arc::new(TokenBudget::from_config(name, spec)?)),
        "prompt-guard" => r.guard = Some(Arc::new(PromptGuard::from_config(name, spec)?)),
        "single-profile-handler" | "openai-parser" => no_params(spec)?,
        // Built in phase two (they refer to other filters), or consumed by other stages.
        _ => {}
    }
    Ok(r)
}

/// `decision-tree-filter` parameters (one node).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TreeParams {
    current: Option<TreeEntry>,
    next_on_success: Option<TreeEntry>,
    next_on_failure: Option<TreeEntry>,
    next_on_success_or_failure: Option<TreeEntry>,
}

/// A node entry: a named filter or an inline subtree.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TreeEntry {
    plugin_ref: Option<String>,
    decision_tree: Option<Box<TreeParams>>,
}

struct TreeBuilder<'a> {
    config: &'a EndpointPickerConfig,
    roles: &'a mut [Roles],
    building: Vec<usize>,
}

impl TreeBuilder<'_> {
    /// The filter named `plugin`, building it first if it is a decision tree.
    fn filter_by_name(&mut self, name: &str, path: &str) -> Result<Arc<dyn Filter>, ConfigIssue> {
        let Some(i) = self.config.plugins.iter().position(|p| p.name == name) else {
            return Err(ConfigIssue {
                path: path.into(),
                reason: format!("no plugin named {name:?}"),
            });
        };
        self.build_tree(i)?;
        self.roles[i].filter.clone().ok_or_else(|| ConfigIssue {
            path: path.into(),
            reason: format!("plugin {name:?} is not a filter"),
        })
    }

    fn entry(
        &mut self,
        e: &Option<TreeEntry>,
        name: &PluginName,
        path: &str,
    ) -> Result<Option<Arc<dyn Filter>>, ConfigIssue> {
        let Some(e) = e else { return Ok(None) };
        match (&e.plugin_ref, &e.decision_tree) {
            (Some(r), None) => self.filter_by_name(r, &format!("{path}.pluginRef")).map(Some),
            (None, Some(t)) => self
                .node(t, name, &format!("{path}.decisionTree"))
                .map(|f| Some(f as Arc<dyn Filter>)),
            _ => Err(ConfigIssue {
                path: path.into(),
                reason: "exactly one of pluginRef and decisionTree is required".into(),
            }),
        }
    }

    fn node(
        &mut self,
        p: &TreeParams,
        name: &PluginName,
        path: &str,
    ) -> Result<Arc<DecisionTreeFilter>, ConfigIssue> {
        let current = self
            .entry(&p.current, name, &format!("{path}.current"))?
            .ok_or_else(|| ConfigIssue {
                path: format!("{path}.current"),
                reason: "a decision tree node needs a current filter".into(),
            })?;
        Ok(Arc::new(DecisionTreeFilter {
            name: name.clone(),
            current,
            next_on_success: self.entry(&p.next_on_success, name, &format!("{path}.nextOnSuccess"))?,
            next_on_failure: self.entry(&p.next_on_failure, name, &format!("{path}.nextOnFailure"))?,
            next_on_success_or_failure: self.entry(
                &p.next_on_success_or_failure,
                name,
                &format!("{path}.nextOnSuccessOrFailure"),
            )?,
        }))
    }

    fn build_tree(&mut self, i: usize) -> Result<(), ConfigIssue> {
        let spec = &self.config.plugins[i];
        if spec.plugin_type != "decision-tree-filter" || self.roles[i].filter.is_some() {
            return Ok(());
        }
        if self.building.contains(&i) {
            return Err(ConfigIssue {
                path: spec.path.clone(),
                reason: "decision trees refer to each other in a cycle".into(),
            });
        }
        self.building.push(i);
        let params: TreeParams = decode_params(spec)?;
        let name = PluginName {
            kind: "decision-tree-filter",
            name: spec.name.as_str().into(),
        };
        let node = self.node(&params, &name, &format!("{}.parameters", spec.path));
        self.building.pop();
        self.roles[i].filter = Some(node?);
        Ok(())
    }
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
    let mut roles: Vec<Roles> = config
        .plugins
        .iter()
        .map(|spec| {
            build_plugin(spec).unwrap_or_else(|e| {
                issues.push(e);
                Roles::default()
            })
        })
        .collect();
    let mut trees = TreeBuilder {
        config,
        roles: &mut roles,
        building: Vec::new(),
    };
    for i in 0..config.plugins.len() {
        if let Err(e) = trees.build_tree(i) {
            issues.push(e);
        }
    }

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

    let detector: Arc<dyn SaturationDetector> = match config.saturation_detector {
        Some(i) => match roles[i].detector.clone() {
            Some(d) => d,
            None => {
                issues.push(ConfigIssue {
                    path: "saturationDetector.pluginRef".into(),
                    reason: format!("plugin {:?} is not a saturation detector", config.plugins[i].name),
                });
                Arc::new(UtilizationDetector::default_detector())
            }
        },
        None => roles
            .iter()
            .find_map(|r| r.detector.clone())
            .unwrap_or_else(|| Arc::new(UtilizationDetector::default_detector())),
    };

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
    let objectives: HashMap<String, i32> = roles.iter().flat_map(|r| r.objectives.iter().cloned()).collect();

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
        detector,
        objectives,
        guards: roles.iter().filter_map(|r| r.guard.clone()).collect(),
        budget: roles.iter().find_map(|r| r.budget.clone()),
    })
}
