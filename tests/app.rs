//! The assembled EPP: health service names, the metrics endpoint, TLS and startup errors.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpHeaders, ProcessingRequest, external_processor_client::ExternalProcessorClient,
    processing_request::Request, processing_response::Response,
};
use epp::{
    app::{AppError, start},
    config::{ConfigError, Flags, normalize_go_args},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn flags(extra: &[&str]) -> Flags {
    let mut args = vec![
        "epp".to_owned(),
        "--endpoints=127.0.0.1:1".to_owned(),
        "--grpc-port=0".to_owned(),
        "--grpc-health-port=0".to_owned(),
        "--metrics-port=0".to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    <Flags as clap::Parser>::try_parse_from(normalize_go_args(args)).expect("flags")
}

#[tokio::test]
async fn health_names_and_metrics_endpoint() {
    let app = start(flags(&["--secure-serving=false"])).await.expect("start");
    let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", app.health_addr.port()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(ch);
    for service in [
        "liveness",
        "readiness",
        "",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ] {
        // Readiness follows the first published snapshot; poll a bounded number of times.
        let mut status = ServingStatus::Unknown;
        for _ in 0..100 {
            if let Ok(r) = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
            {
                status = r.into_inner().status();
                if status == ServingStatus::Serving {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);

    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", app.metrics_addr.port()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("# TYPE inference_extension_scheduler_e2e_duration_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains(r#"inference_extension_info{build_ref="epp-rs",commit=""#),
        "{text}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn tls_serves_with_cert_path_and_refuses_plaintext() {
    let dir = std::env::temp_dir().join(format!("epp-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("tls.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
    let app = start(flags(&[&format!("--cert-path={}", dir.display())]))
        .await
        .expect("start");

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ck.cert.pem()))
        .domain_name("localhost");
    let ch = tonic::transport::Channel::from_shared(format!("https://127.0.0.1:{}", app.grpc_addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connect");
    let mut client = ExternalProcessorClient::new(ch);
    let headers = ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut answers = client
        .process(tokio_stream::iter(vec![headers]))
        .await
        .expect("call")
        .into_inner();
    let first = answers.message().await.expect("answer").expect("one answer");
    assert!(
        matches!(first.response, Some(Response::RequestHeaders(_))),
        "{first:?}"
    );

    let plaintext = async {
        let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", app.grpc_addr.port()))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut client = ExternalProcessorClient::new(ch);
        let mut s = client
            .process(tokio_stream::iter(vec![]))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        s.message().await.map_err(|e| e.to_string())
    }
    .await;
    assert!(
        plaintext.is_err(),
        "a plaintext client must not get an answer: {plaintext:?}"
    );
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn invalid_config_fails_at_startup_with_its_path() {
    let err = start(flags(&[
        "--config-text=apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: no-such-plugin\n",
    ]))
    .await
    .err()
    .expect("must fail");
    match err {
        AppError::Config(ConfigError::Invalid { issues }) => {
            assert_eq!(
                issues[0].to_string(),
                "plugins[0].type: unknown plugin type \"no-such-plugin\""
            );
        }
        other => panic!("unexpected {other}"),
    }
    let err = start(flags(&["--config-file=/nonexistent/epp.yaml"]))
        .await
        .err()
        .expect("must fail");
    assert!(
        err.to_string()
            .starts_with("cannot read config file /nonexistent/epp.yaml"),
        "{err}"
    );
}
