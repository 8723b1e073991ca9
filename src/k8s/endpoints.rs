//! Pods of a pool → endpoints, with upstream's rules (pure; unit-tested without a cluster).
//!
//! - Only Ready pods without a deletion timestamp and with an IP count.
//! - One endpoint per target port, named `<pod>-rank-<i>` (`i` = the port's index in
//!   `targetPorts`), address `podIP:port`, labels copied from the pod.
//! - The `inference.networking.k8s.io/active-ports` annotation narrows the ports: absent → all;
//!   present but empty → none; entries trimmed; invalid, negative or unknown ports dropped.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use k8s_openapi::api::core::v1::Pod;

use super::types::PoolShape;
use crate::datastore::{EndpointKey, EndpointSpec};

/// Annotation restricting which target ports are active on a pod.
pub const ACTIVE_PORTS_ANNOTATION: &str = "inference.networking.k8s.io/active-ports";

/// Whether `pod` may receive traffic.
pub fn pod_is_ready(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(status) = &pod.status else { return false };
    status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
        && status
            .conditions
            .as_ref()
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether `labels` carry every `selector` entry.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn active_ports(pod: &Pod, target_ports: &[u16]) -> Vec<(usize, u16)> {
    let all = target_ports.iter().copied().enumerate();
    let Some(annotation) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ACTIVE_PORTS_ANNOTATION))
    else {
        return all.collect();
    };
    let listed: Vec<u16> = annotation
        .split(',')
        .filter_map(|p| p.trim().parse::<u16>().ok())
        .collect();
    all.filter(|(_, p)| listed.contains(p)).collect()
}

/// The endpoints of `pods` for a pool of `shape` in `namespace`.
pub fn pool_endpoints<'a>(
    namespace: &str,
    shape: &PoolShape,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Vec<EndpointSpec> {
    let ns: Arc<str> = namespace.into();
    let mut out = Vec::new();
    for pod in pods {
        if !pod_is_ready(pod) || !selector_matches(&shape.selector, pod.metadata.labels.as_ref()) {
            continue;
        }
        let (Some(name), Some(ip)) = (
            pod.metadata.name.as_deref(),
            pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()),
        ) else {
            continue;
        };
        let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
            continue;
        };
        let labels = Arc::new(pod.metadata.labels.clone().unwrap_or_default());
        let mut seen = Vec::new();
        for (rank, port) in active_ports(pod, &shape.target_ports) {
            if seen.contains(&port) {
                continue;
            }
            seen.push(port);
            out.push(EndpointSpec {
                key: EndpointKey {
                    namespace: ns.clone(),
                    name: format!("{name}-rank-{rank}").into(),
                },
                address: SocketAddr::new(ip, port),
                labels: labels.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{PodCondition, PodStatus},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, labels: &[(&str, &str)], annotation: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()),
                annotations: annotation.map(|a| [(ACTIVE_PORTS_ANNOTATION.to_owned(), a.to_owned())].into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn shape(ports: &[u16]) -> PoolShape {
        PoolShape {
            selector: [("app".to_owned(), "vllm".to_owned())].into(),
            target_ports: ports.to_vec(),
        }
    }

    fn names(eps: &[EndpointSpec]) -> Vec<String> {
        eps.iter()
            .map(|e| format!("{} {}", e.key.name, e.address))
            .collect()
    }

    #[test]
    fn ready_matching_pods_give_one_endpoint_per_port() {
        let pods = [
            pod("a", "10.0.0.1", true, &[("app", "vllm")], None),
            pod("b", "10.0.0.2", false, &[("app", "vllm")], None),
            pod("c", "10.0.0.3", true, &[("app", "other")], None),
        ];
        let eps = pool_endpoints("ns", &shape(&[8000, 8001]), &pods);
        assert_eq!(
            names(&eps),
            vec!["a-rank-0 10.0.0.1:8000", "a-rank-1 10.0.0.1:8001"]
        );
        assert_eq!(&*eps[0].key.namespace, "ns");
        assert_eq!(eps[0].labels.get("app").map(String::as_str), Some("vllm"));
    }

    #[test]
    fn deleting_pods_are_out() {
        let mut p = pod("a", "10.0.0.1", true, &[("app", "vllm")], None);
        p.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(pool_endpoints("ns", &shape(&[8000]), &[p]).is_empty());
    }

    #[test]
    fn active_ports_annotation_rules() {
        let s = shape(&[8000, 8002, 8004]);
        let ep = |a: Option<&str>| {
            names(&pool_endpoints(
                "ns",
                &s,
                &[pod("a", "10.0.0.1", true, &[("app", "vllm")], a)],
            ))
        };
        assert_eq!(ep(None).len(), 3);
        assert_eq!(
            ep(Some("8000, 8004")),
            vec!["a-rank-0 10.0.0.1:8000", "a-rank-2 10.0.0.1:8004"]
        );
        assert!(ep(Some("")).is_empty());
        assert_eq!(ep(Some("x,-1,9999,8002,8002")), vec!["a-rank-1 10.0.0.1:8002"]);
    }
}
