//! The custom resources the EPP reads: `InferencePool` (`inference.networking.k8s.io/v1` and the
//! legacy `inference.networking.x-k8s.io/v1alpha2`) and `InferenceObjective`
//! (`inference.networking.x-k8s.io/v1alpha2`). Only the fields the EPP uses are typed; unknown
//! fields are ignored so newer CRD versions keep working.

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// `spec.selector` of a v1 pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolSelector {
    /// Labels the pods must carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One `spec.targetPorts` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetPort {
    /// Port number.
    pub number: i32,
}

/// `InferencePool` v1 spec.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "inference.networking.k8s.io",
    version = "v1",
    kind = "InferencePool",
    plural = "inferencepools",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// Pods in the pool's namespace with these labels serve the pool.
    pub selector: PoolSelector,
    /// Each port is a separate endpoint of every pod.
    #[serde(default)]
    pub target_ports: Vec<TargetPort>,
    /// `http` (default) or `kubernetes.io/h2c`.
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// Legacy `InferencePool` v1alpha2 spec.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "inference.networking.x-k8s.io",
    version = "v1alpha2",
    kind = "InferencePool",
    plural = "inferencepools",
    namespaced,
    schema = "disabled"
)]
#[kube(root = "LegacyInferencePool")]
#[serde(rename_all = "camelCase")]
pub struct LegacyInferencePoolSpec {
    /// Plain label map.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The single target port.
    pub target_port_number: i32,
}

/// API group of the legacy pool.
pub const LEGACY_POOL_GROUP: &str = "inference.networking.x-k8s.io";

/// `spec.poolRef` of an objective.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRef {
    /// API group (default `inference.networking.k8s.io`).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind (default `InferencePool`).
    #[serde(default)]
    pub kind: Option<String>,
    /// Pool name.
    pub name: String,
}

/// `InferenceObjective` spec.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "inference.networking.x-k8s.io",
    version = "v1alpha2",
    kind = "InferenceObjective",
    plural = "inferenceobjectives",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceObjectiveSpec {
    /// Higher is more important; negative is sheddable; unset is 0.
    #[serde(default)]
    pub priority: Option<i32>,
    /// The pool this objective belongs to.
    pub pool_ref: PoolRef,
}

/// What discovery needs of a pool, whichever API version it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolShape {
    /// Pod label selector.
    pub selector: BTreeMap<String, String>,
    /// Target ports, in order (rank `i` is port `i`).
    pub target_ports: Vec<u16>,
}

impl From<&InferencePoolSpec> for PoolShape {
    fn from(s: &InferencePoolSpec) -> Self {
        Self {
            selector: s.selector.match_labels.clone(),
            target_ports: s
                .target_ports
                .iter()
                .filter_map(|p| u16::try_from(p.number).ok())
                .collect(),
        }
    }
}

impl From<&LegacyInferencePoolSpec> for PoolShape {
    fn from(s: &LegacyInferencePoolSpec) -> Self {
        Self {
            selector: s.selector.clone(),
            target_ports: u16::try_from(s.target_port_number).ok().into_iter().collect(),
        }
    }
}
