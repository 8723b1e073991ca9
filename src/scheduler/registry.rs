//! Plugin registry: `type` string → constructor, and assembly of a [`Scheduler`] from a validated
//! [`EndpointPickerConfig`].
//!
//! Every plugin type this EPP knows has one row in the registry table (type name → builder,
//! names from [`plugin_types`](super::plugin_types)); anything else fails at load time with the
//! config path. Types that belong to other stages (data layer, parser, profile
//! handler) are accepted here and consumed by their owners. Decision trees are built last, since
//! they refer to other filters by name.

use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;

use serde::Deserialize;

use super::{
    admission::{
        AdmissionStage, PromptGuard, PromptGuards, SaturationGate, TokenBudget, token_budget::BudgetStage,
    },
    filters::{
        DecisionTreeFilter, LeastKvCacheFilter, LeastQueueFilter, LoraAffinityFilter, LowQueueFilter,
        PrefixAffinityFilter,
    },
    flow::{BandPolicy, Fairness, FlowControlPolicy, Ordering},
    params::{decode_params, no_params},
    pickers::{MaxScorePicker, PickerParams, RandomPicker, RoundRobinPicker, WeightedRandomPicker},
    pipeline::{ActiveProfile, RequestParser, Scheduler},
    plugin::{
        DataProducer, Filter, Needs, Picker, PluginName, PoolChange, PreRequest, SaturationDetector, Scorer,
    },
    plugin_types::*,
    producers::ApproxPrefixProducer,
    profile::{Profile, WeightedScorer},
    saturation::{ConcurrencyDetector, UtilizationDetector},
    scorers::{
        KvCacheScorer, LoraAffinityScorer, PrefillBacklogScorer, PrefixCacheScorer, QueueScorer, QueueSignal,
        TokenLoadScorer,
    },
};
use crate::config::{
    ConfigError, ConfigIssue, EndpointPickerConfig, PluginSpec,
    flow_control::{BandSpec, FlowControlSpec},
};

/// The roles one configured plugin instance plays.
#[derive(Default, Clone)]
struct Roles {
    filter: Option<Arc<dyn Filter>>,
    scorer: Option<Arc<dyn Scorer>>,
    picker: Option<Arc<dyn Picker>>,
    producer: Option<Arc<dyn DataProducer>>,
    pre_request: Option<Arc<dyn PreRequest>>,
    pool_change: Option<Arc<dyn PoolChange>>,
    detector: Option<Arc<dyn SaturationDetector>>,
    objectives: Vec<(String, i32)>,
    guard: Option<Arc<PromptGuard>>,
    budget: Option<Arc<TokenBudget>>,
    flow_policy: Option<FlowPolicyRole>,
}

/// A flow-control policy plugin.
#[derive(Debug, Clone, Copy)]
enum FlowPolicyRole {
    Fairness(Fairness),
    Ordering(Ordering),
    /// `static-usage-limit-policy`'s threshold.
    UsageLimit(f64),
}

/// `static-usage-limit-policy` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct UsageLimitParams {
    threshold: f64,
}

impl Default for UsageLimitParams {
    fn default() -> Self {
        Self { threshold: 1.0 }
    }
}

fn flow_policy(role: FlowPolicyRole) -> Roles {
    Roles {
        flow_policy: Some(role),
        ..Roles::default()
    }
}

/// Builds the roles of one configured instance from its name and spec.
type Builder = fn(PluginName, &PluginSpec) -> Result<Roles, ConfigIssue>;

/// Every plugin type this EPP accepts, with its builder: the one place a type is known.
const REGISTRY: &[(&str, Builder)] = &[
    (QUEUE_SCORER, |name, spec| {
        no_params(spec)?;
        Ok(scorer(QueueScorer::new(name, QueueSignal::Waiting)))
    }),
    (RUNNING_REQUESTS_SIZE_SCORER, |name, spec| {
        no_params(spec)?;
        Ok(scorer(QueueScorer::new(name, QueueSignal::Running)))
    }),
    (KV_CACHE_UTILIZATION_SCORER, kv_cache_scorer),
    (KV_CACHE_SCORER, kv_cache_scorer),
    (LORA_AFFINITY_SCORER, |name, spec| {
        no_params(spec)?;
        Ok(scorer(LoraAffinityScorer::new(name)))
    }),
    // Upstream's factory ignores this scorer's parameters, and its docs still show a
    // `blockSize` here: accept and ignore them so those configs keep loading.
    (PREFIX_CACHE_SCORER, |name, _| {
        Ok(scorer(PrefixCacheScorer::new(name)))
    }),
    (TOKEN_LOAD_SCORER, |name, spec| {
        Ok(scorer(TokenLoadScorer::new(name, &decode_params(spec)?)))
    }),
    (PREFILL_BACKLOG_SCORER, |name, spec| {
        Ok(scorer(PrefillBacklogScorer::new(name, &decode_params(spec)?)))
    }),
    (APPROX_PREFIX_CACHE_PRODUCER, |name, spec| {
        let p = Arc::new(ApproxPrefixProducer::from_config(name, spec)?);
        Ok(Roles {
            producer: Some(p.clone()),
            pre_request: Some(p.clone()),
            pool_change: Some(p),
            ..Roles::default()
        })
    }),
    // Upstream registers this producer as a default one: it is created whenever a plugin that
    // reads in-flight load is configured (`token-load-scorer`, `concurrency-detector`,
    // `prefix-cache-affinity-filter`). Here in-flight requests and tokens are always counted
    // (two atomics per dispatch, given back when the request finishes, errs or is abandoned:
    // `datastore::InFlight`), which is the same thing; the type is accepted for upstream configs.
    (INFLIGHT_LOAD_PRODUCER, consumed_elsewhere),
    (MAX_SCORE_PICKER, |name, spec| {
        Ok(picker(MaxScorePicker::new(
            name,
            &decode_params::<PickerParams>(spec)?,
        )))
    }),
    (RANDOM_PICKER, |name, spec| {
        Ok(picker(RandomPicker::new(
            name,
            &decode_params::<PickerParams>(spec)?,
        )))
    }),
    (ROUND_ROBIN_PICKER, |name, spec| {
        Ok(picker(RoundRobinPicker::new(
            name,
            &decode_params::<PickerParams>(spec)?,
        )))
    }),
    (WEIGHTED_RANDOM_PICKER, |name, spec| {
        Ok(picker(WeightedRandomPicker::new(
            name,
            &decode_params::<PickerParams>(spec)?,
        )))
    }),
    (SINGLE_PROFILE_HANDLER, consumed_elsewhere),
    (UTILIZATION_DETECTOR, |name, spec| {
        Ok(detector(UtilizationDetector::from_params(
            name,
            &decode_params(spec)?,
            spec,
        )?))
    }),
    (CONCURRENCY_DETECTOR, |name, spec| {
        Ok(detector(ConcurrencyDetector::from_params(
            name,
            &decode_params(spec)?,
            spec,
        )?))
    }),
    (LOW_QUEUE_FILTER, |name, spec| {
        Ok(filter(LowQueueFilter::new(name, &decode_params(spec)?)))
    }),
    (LORA_AFFINITY_FILTER, |name, spec| {
        Ok(filter(LoraAffinityFilter::new(name, &decode_params(spec)?)))
    }),
    (LEAST_QUEUE_FILTER, |name, spec| {
        no_params(spec)?;
        Ok(filter(LeastQueueFilter::new(name)))
    }),
    (LEAST_KV_CACHE_FILTER, |name, spec| {
        no_params(spec)?;
        Ok(filter(LeastKvCacheFilter::new(name)))
    }),
    // Built in phase two: trees refer to other filters by name.
    (DECISION_TREE_FILTER, |_, _| Ok(Roles::default())),
    (PREFIX_CACHE_AFFINITY_FILTER, |name, spec| {
        Ok(filter(PrefixAffinityFilter::new(name, decode_params(spec)?)))
    }),
    (INFERENCE_OBJECTIVES, |_, spec| {
        let p: ObjectivesParams = decode_params(spec)?;
        Ok(Roles {
            objectives: p.objectives.into_iter().map(|o| (o.name, o.priority)).collect(),
            ..Roles::default()
        })
    }),
    (PROMPT_GUARD, |name, spec| {
        Ok(Roles {
            guard: Some(Arc::new(PromptGuard::from_config(name, spec)?)),
            ..Roles::default()
        })
    }),
    (TOKEN_BUDGET, |name, spec| {
        Ok(Roles {
            budget: Some(Arc::new(TokenBudget::from_config(name, spec)?)),
            ..Roles::default()
        })
    }),
    (OPENAI_PARSER, consumed_elsewhere),
    (PASSTHROUGH_PARSER, consumed_elsewhere),
    // Read by the metrics collector's data layer.
    (METRICS_DATA_SOURCE, |_, _| Ok(Roles::default())),
    (CORE_METRICS_EXTRACTOR, |_, _| Ok(Roles::default())),
    // Flow-control policies, referenced by name from the `flowControl` section.
    (FCFS_ORDERING_POLICY, |_, spec| {
        no_params(spec)?;
        Ok(flow_policy(FlowPolicyRole::Ordering(Ordering::Fcfs)))
    }),
    (EDF_ORDERING_POLICY, |_, spec| {
        no_params(spec)?;
        Ok(flow_policy(FlowPolicyRole::Ordering(Ordering::Edf)))
    }),
    (GLOBAL_STRICT_FAIRNESS_POLICY, |_, spec| {
        no_params(spec)?;
        Ok(flow_policy(FlowPolicyRole::Fairness(Fairness::GlobalStrict)))
    }),
    (ROUND_ROBIN_FAIRNESS_POLICY, |_, spec| {
        no_params(spec)?;
        Ok(flow_policy(FlowPolicyRole::Fairness(Fairness::RoundRobin)))
    }),
    (TOKEN_WEIGHTED_FAIRNESS_POLICY, |_, spec| {
        no_params(spec)?;
        Ok(flow_policy(FlowPolicyRole::Fairness(Fairness::TokenWeighted)))
    }),
    (STATIC_USAGE_LIMIT_POLICY, |_, spec| {
        let p: UsageLimitParams = decode_params(spec)?;
        // Zero or less would hold every request until its TTL: a typo, not a policy.
        if !(p.threshold.is_finite() && p.threshold > 0.0) {
            return Err(ConfigIssue {
                path: format!("{}.parameters.threshold", spec.path),
                reason: format!("must be a number > 0, got {}", p.threshold),
            });
        }
        Ok(flow_policy(FlowPolicyRole::UsageLimit(p.threshold)))
    }),
];

/// Every plugin type accepted in `plugins[].type`, in registry order.
pub fn plugin_types() -> impl Iterator<Item = &'static str> {
    REGISTRY.iter().map(|(kind, _)| *kind)
}

fn scorer(s: impl Scorer + 'static) -> Roles {
    Roles {
        scorer: Some(Arc::new(s)),
        ..Roles::default()
    }
}

fn picker(p: impl Picker + 'static) -> Roles {
    Roles {
        picker: Some(Arc::new(p)),
        ..Roles::default()
    }
}

fn filter(f: impl Filter + 'static) -> Roles {
    Roles {
        filter: Some(Arc::new(f)),
        ..Roles::default()
    }
}

fn detector<D: Filter + SaturationDetector + 'static>(d: D) -> Roles {
    let d = Arc::new(d);
    Roles {
        filter: Some(d.clone()),
        detector: Some(d),
        ..Roles::default()
    }
}

fn kv_cache_scorer(name: PluginName, spec: &PluginSpec) -> Result<Roles, ConfigIssue> {
    no_params(spec)?;
    Ok(scorer(KvCacheScorer::new(name)))
}

/// The parser `parser.pluginRef` names (`openai-parser` when absent). A prompt guard next to the
/// passthrough parser is refused: it would have no prompt to scan, and a guard that lets
/// everything through unscanned is worse than none.
fn request_parser(
    config: &EndpointPickerConfig,
    roles: &[Roles],
    issues: &mut Vec<ConfigIssue>,
) -> RequestParser {
    let parser = match config.parser.map(|r| (&config.plugins[r.plugin], r.path)) {
        None => RequestParser::OpenAi,
        Some((spec, _)) if spec.plugin_type == OPENAI_PARSER => RequestParser::OpenAi,
        Some((spec, _)) if spec.plugin_type == PASSTHROUGH_PARSER => RequestParser::Passthrough,
        Some((spec, path)) => {
            issues.push(ConfigIssue {
                path: path.into(),
                reason: format!("plugin {:?} is not a parser", spec.name),
            });
            RequestParser::OpenAi
        }
    };
    if parser == RequestParser::Passthrough {
        for (spec, _) in config
            .plugins
            .iter()
            .zip(roles)
            .filter(|(_, r)| r.guard.is_some())
        {
            issues.push(ConfigIssue {
                path: spec.path.clone(),
                reason: "a prompt-guard needs a parser that reads the prompt; passthrough-parser reads none"
                    .into(),
            });
        }
    }
    parser
}

/// Types whose work is done elsewhere (built in, or always on): parameters must be absent.
fn consumed_elsewhere(_: PluginName, spec: &PluginSpec) -> Result<Roles, ConfigIssue> {
    no_params(spec)?;
    Ok(Roles::default())
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
    let Some((kind, build)) = REGISTRY.iter().find(|(kind, _)| *kind == spec.plugin_type) else {
        return Err(ConfigIssue {
            path: format!("{}.type", spec.path),
            reason: format!("unknown plugin type {:?}", spec.plugin_type),
        });
    };
    let name = PluginName {
        kind,
        name: spec.name.as_str().into(),
    };
    build(name, spec)
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
        if spec.plugin_type != DECISION_TREE_FILTER || self.roles[i].filter.is_some() {
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
            kind: DECISION_TREE_FILTER,
            name: spec.name.as_str().into(),
        };
        let node = self.node(&params, &name, &format!("{}.parameters", spec.path));
        self.building.pop();
        self.roles[i].filter = Some(node?);
        Ok(())
    }
}

/// The flow-control policy of `spec`: references resolved by instance name, the three default
/// policies taken by their type name when not declared (upstream creates them on demand), and
/// the scheduler's detector (upstream's one `flowControl.saturationDetector` serves both).
fn flow_control_policy(
    spec: &FlowControlSpec,
    config: &EndpointPickerConfig,
    roles: &[Roles],
    detector: &Arc<dyn SaturationDetector>,
    issues: &mut Vec<ConfigIssue>,
) -> FlowControlPolicy {
    // `want` names the kind for the message; `pick` extracts it from a role.
    let mut resolve = |name: &str, path: String, want: &str, pick: &dyn Fn(FlowPolicyRole) -> bool| {
        let role = match config.plugins.iter().position(|p| p.name == name) {
            Some(i) => roles[i].flow_policy,
            None if name == FCFS_ORDERING_POLICY => Some(FlowPolicyRole::Ordering(Ordering::Fcfs)),
            None if name == GLOBAL_STRICT_FAIRNESS_POLICY => {
                Some(FlowPolicyRole::Fairness(Fairness::GlobalStrict))
            }
            None if name == STATIC_USAGE_LIMIT_POLICY => Some(FlowPolicyRole::UsageLimit(1.0)),
            None => {
                issues.push(ConfigIssue {
                    path,
                    reason: format!("plugin {name:?} not found"),
                });
                return None;
            }
        };
        match role {
            Some(r) if pick(r) => Some(r),
            _ => {
                issues.push(ConfigIssue {
                    path,
                    reason: format!("plugin {name:?} is not {want}"),
                });
                None
            }
        }
    };
    let mut band = |b: &BandSpec| -> BandPolicy {
        let fairness = b
            .fairness_policy_ref
            .as_deref()
            .and_then(|name| {
                resolve(
                    name,
                    format!("{}.fairnessPolicyRef", b.path),
                    "a fairness policy",
                    &|r| matches!(r, FlowPolicyRole::Fairness(_)),
                )
            })
            .map_or(Fairness::GlobalStrict, |r| match r {
                FlowPolicyRole::Fairness(f) => f,
                _ => Fairness::GlobalStrict,
            });
        let ordering = b
            .ordering_policy_ref
            .as_deref()
            .and_then(|name| {
                resolve(
                    name,
                    format!("{}.orderingPolicyRef", b.path),
                    "an ordering policy",
                    &|r| matches!(r, FlowPolicyRole::Ordering(_)),
                )
            })
            .map_or(Ordering::Fcfs, |r| match r {
                FlowPolicyRole::Ordering(o) => o,
                _ => Ordering::Fcfs,
            });
        BandPolicy {
            max_bytes: b.max_bytes,
            max_requests: b.max_requests,
            fairness,
            ordering,
        }
    };
    let default_band = band(&spec.default_band);
    let default_negative_band = band(&spec.default_negative_band);
    let bands = spec.bands.iter().map(|b| (b.priority, band(b))).collect();
    let ceiling = spec
        .usage_limit_policy_ref
        .as_deref()
        .and_then(|name| {
            resolve(
                name,
                "flowControl.usageLimitPolicyPluginRef".into(),
                "a usage-limit policy",
                &|r| matches!(r, FlowPolicyRole::UsageLimit(_)),
            )
        })
        .map_or(1.0, |r| match r {
            FlowPolicyRole::UsageLimit(t) => t,
            _ => 1.0,
        });
    // Upstream's `flowControl.saturationDetector` serves admission and dispatch alike.
    let detector = detector.clone();
    let nanos = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    FlowControlPolicy {
        max_bytes: spec.max_bytes,
        max_requests: spec.max_requests,
        ttl_ns: nanos(spec.default_request_ttl),
        no_endpoint_ttl_ns: nanos(spec.no_endpoint_request_ttl),
        bands,
        default_band,
        default_negative_band,
        ceiling,
        detector,
    }
}

/// The admission stages in their documented order: every prompt guard (config order, one
/// stage), then the token budget, then the saturation gate (replaced by the queue when flow
/// control is on: upstream sheds nothing by saturation then). Guards go first so that a
/// rejected prompt costs no budget, and the budget sees the prompt as masked.
fn admission_stages(
    roles: &[Roles],
    detector: &Arc<dyn SaturationDetector>,
    flow_control: bool,
) -> Vec<Arc<dyn AdmissionStage>> {
    let mut stages: Vec<Arc<dyn AdmissionStage>> = Vec::new();
    if let Some(guards) = PromptGuards::new(roles.iter().filter_map(|r| r.guard.clone()).collect()) {
        stages.push(Arc::new(guards));
    }
    if let Some(budget) = roles.iter().find_map(|r| r.budget.clone()) {
        stages.push(Arc::new(BudgetStage(budget)));
    }
    if !flow_control {
        stages.push(Arc::new(SaturationGate::new(detector.clone())));
    }
    stages
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
                default_name(MAX_SCORE_PICKER),
                &PickerParams::default(),
            ))
        });

    let detector: Arc<dyn SaturationDetector> = match config.saturation_detector {
        Some(r) => match roles[r.plugin].detector.clone() {
            Some(d) => d,
            None => {
                issues.push(ConfigIssue {
                    path: r.path.into(),
                    reason: format!(
                        "plugin {:?} is not a saturation detector",
                        config.plugins[r.plugin].name
                    ),
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
    let mut pool_change: Vec<Arc<dyn PoolChange>> =
        roles.iter().filter_map(|r| r.pool_change.clone()).collect();
    // Upstream auto-adds the producer when the prefix scorer is used without one.
    if needs.prefix_match && !producers.iter().any(|p| p.produces().prefix_match) {
        let spec = PluginSpec {
            name: APPROX_PREFIX_CACHE_PRODUCER.into(),
            plugin_type: APPROX_PREFIX_CACHE_PRODUCER.into(),
            parameters: serde_yaml_ng::Value::Null,
            path: "plugins[auto]".into(),
        };
        match ApproxPrefixProducer::from_config(default_name(APPROX_PREFIX_CACHE_PRODUCER), &spec) {
            Ok(p) => {
                let p = Arc::new(p);
                producers.push(p.clone());
                pre_request.push(p.clone());
                pool_change.push(p);
            }
            Err(e) => issues.push(e),
        }
    }
    let objectives: HashMap<String, i32> = roles.iter().flat_map(|r| r.objectives.iter().cloned()).collect();

    let budget = roles.iter().find_map(|r| r.budget.as_ref());
    let parser = request_parser(config, &roles, &mut issues);
    let flow = config
        .flow_control
        .as_ref()
        .map(|spec| Arc::new(flow_control_policy(spec, config, &roles, &detector, &mut issues)));

    if !issues.is_empty() {
        return Err(ConfigError::Invalid { issues });
    }
    Ok(Scheduler {
        producers,
        active: ArcSwap::from_pointee(ActiveProfile {
            profile: Profile {
                name: spec.name.as_str().into(),
                filters,
                scorers,
                picker,
            },
            needs,
        }),
        pre_request,
        pool_change,
        admission: admission_stages(&roles, &detector, flow.is_some()),
        flow,
        output_guards: roles
            .iter()
            .filter_map(|r| r.guard.clone())
            .filter(|g| g.response_patterns().is_some())
            .collect(),
        tenant_source: budget.map(|b| b.tenant_source.clone()),
        budget: budget.cloned(),
        parser,
        detector,
        objectives,
    })
}
