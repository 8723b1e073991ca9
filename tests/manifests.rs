//! The shipped example resources and config parse into the EPP's own types (the Kubernetes
//! schemas used by scripts/validate-manifests.sh do not know these custom resources).

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use epp::{
    config::EndpointPickerConfig,
    k8s::types::{InferenceObjective, InferencePool, PoolShape},
    scheduler::build_scheduler,
};
use serde::Deserialize;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/manifests/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn example_pool_parses_into_the_v1_type() {
    let pool: InferencePool = serde_yaml_ng::from_str(&read("examples/inferencepool.yaml")).unwrap();
    assert_eq!(pool.metadata.name.as_deref(), Some("vllm-llama3-8b-instruct"));
    let shape = PoolShape::from(&pool.spec);
    assert_eq!(shape.target_ports, vec![8000]);
    assert_eq!(
        shape.selector.get("app").map(String::as_str),
        Some("vllm-llama3-8b-instruct")
    );
}

#[test]
fn example_objectives_parse_and_point_at_the_pool() {
    let text = read("examples/inferenceobjective.yaml");
    let objectives: Vec<InferenceObjective> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| InferenceObjective::deserialize(doc).unwrap())
        .collect();
    let got: Vec<(String, Option<i32>, String)> = objectives
        .iter()
        .map(|o| {
            (
                o.metadata.name.clone().unwrap(),
                o.spec.priority,
                o.spec.pool_ref.name.clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("batch".to_owned(), Some(-1), "vllm-llama3-8b-instruct".to_owned()),
            (
                "interactive".to_owned(),
                Some(10),
                "vllm-llama3-8b-instruct".to_owned()
            )
        ]
    );
}

#[test]
fn shipped_scheduling_config_loads() {
    let config = EndpointPickerConfig::from_yaml(&read("base/default-plugins.yaml")).unwrap();
    build_scheduler(&config).unwrap();
}

#[test]
fn the_pool_selects_the_example_model_servers() {
    let pool: InferencePool = serde_yaml_ng::from_str(&read("examples/inferencepool.yaml")).unwrap();
    let deployment: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("examples/vllm-deployment.yaml")).unwrap();
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in &pool.spec.selector.match_labels {
        assert_eq!(labels[k.as_str()].as_str(), Some(v.as_str()), "label {k}");
    }
    assert_eq!(labels["llm-d.ai/engine-type"].as_str(), Some("vllm"));
}
