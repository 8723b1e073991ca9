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

type SelfSigned = rcgen::CertifiedKey<rcgen::KeyPair>;

/// A fresh self-signed certificate for `localhost`.
fn localhost_cert() -> SelfSigned {
    rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap()
}

/// `ck` as `tls.key` and `tls.crt` in `dir`. The key goes first: in between, the pair does not
/// match, which a reload must survive.
fn write_cert(dir: &std::path::Path, ck: &SelfSigned) {
    std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("tls.crt"), ck.cert.pem()).unwrap();
}

/// A certificate directory named after `tag` holding a fresh certificate.
fn cert_dir(tag: &str) -> (std::path::PathBuf, SelfSigned) {
    let dir = std::env::temp_dir().join(format!("epp-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = localhost_cert();
    write_cert(&dir, &ck);
    (dir, ck)
}

#[tokio::test]
async fn tls_serves_with_cert_path_and_refuses_plaintext() {
    let (dir, ck) = cert_dir("tls-test");
    let app = start(flags(&[&format!("--cert-path={}", dir.display())]))
        .await
        .expect("start");

    let ch = channel_trusting(app.grpc_addr.port(), &ck.cert.pem())
        .await
        .expect("TLS connect");
    assert!(answers_headers(ch).await);

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
    // The built-in default config is read with --feature-gates too.
    let err = start(flags(&["--feature-gates=flowControl,flowcontrol"]))
        .await
        .err()
        .expect("must fail");
    assert_eq!(
        err.to_string(),
        "invalid EndpointPickerConfig: --feature-gates[1]: feature gate \"flowcontrol\" is unknown or unregistered"
    );
}

/// A TLS channel to `port` that trusts only `ca_pem` for `localhost`.
async fn channel_trusting(
    port: u16,
    ca_pem: &str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    tonic::transport::Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
}

/// One header-only exchange on `channel`: the EPP's first answer is to the request headers.
async fn answers_headers(channel: tonic::transport::Channel) -> bool {
    let headers = ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    };
    let Ok(answers) = ExternalProcessorClient::new(channel)
        .process(tokio_stream::iter(vec![headers]))
        .await
    else {
        return false;
    };
    let first = answers.into_inner().message().await;
    matches!(first, Ok(Some(m)) if matches!(m.response, Some(Response::RequestHeaders(_))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let (dir, old) = cert_dir("tls-rotate");
    let app = start(flags(&[
        &format!("--cert-path={}", dir.display()),
        "--enable-cert-reload",
    ]))
    .await
    .expect("start");
    let port = app.grpc_addr.port();
    let before = channel_trusting(port, &old.cert.pem())
        .await
        .expect("old certificate served");

    let new = localhost_cert();
    assert!(
        channel_trusting(port, &new.cert.pem()).await.is_err(),
        "not served before the rotation"
    );
    write_cert(&dir, &new);
    // The files are checked every second: wait (bounded) for a handshake with the new one.
    let mut after = None;
    for _ in 0..50 {
        if let Ok(ch) = channel_trusting(port, &new.cert.pem()).await {
            after = Some(ch);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = after.expect("the new certificate is served within 10 s");
    assert!(answers_headers(after).await);
    // The connection made before the rotation keeps working; new ones get the new certificate.
    assert!(answers_headers(before).await);
    assert!(channel_trusting(port, &old.cert.pem()).await.is_err());
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn without_reload_a_changed_certificate_is_not_picked_up() {
    let (dir, old) = cert_dir("tls-static");
    let app = start(flags(&[&format!("--cert-path={}", dir.display())]))
        .await
        .expect("start");
    write_cert(&dir, &localhost_cert());
    // Longer than the reload interval: still the certificate the EPP started with.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ch = channel_trusting(app.grpc_addr.port(), &old.cert.pem())
        .await
        .expect("old certificate");
    assert!(answers_headers(ch).await);
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Regression (decision-pipeline issue): `--endpoint-selector=app` (no `=`) became an empty
/// selector matching every ready pod of the namespace. Now the EPP refuses to start, naming the
/// flag, and reports every flag problem at once.
#[tokio::test]
async fn a_malformed_selector_is_refused_at_start_with_its_flag_named() {
    let args = [
        "epp",
        "--endpoint-selector=app",
        "--grpc-port=0",
        "--grpc-health-port=0",
        "--metrics-port=0",
        "--lora-info-metric=x",
    ];
    let flags = <Flags as clap::Parser>::try_parse_from(normalize_go_args(args.map(String::from))).unwrap();
    let err = start(flags).await.err().expect("must fail");
    assert!(matches!(err, AppError::Flags(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "--lora-info-metric is deprecated and cannot be used; configure metrics via engineConfigs; \
         --endpoint-target-ports needs 1 to 8 ports with --endpoint-selector; \
         --endpoint-selector: \"app\": expected key=value"
    );
}

/// Regression (robustness issue, item 4): a client that connected to a plaintext listener and
/// said nothing kept its connection forever (200 silent connections each, still open after
/// 150 s). Each listener now closes a connection that sends nothing within 10 s, while clients
/// that speak are served.
#[tokio::test]
async fn silent_connections_to_the_plaintext_listeners_are_closed() {
    use tokio::io::AsyncReadExt;
    let app = start(flags(&[
        "--secure-serving=false",
        "--metrics-endpoint-auth=false",
    ]))
    .await
    .expect("start");
    let ports = [
        app.grpc_addr.port(),
        app.health_addr.port(),
        app.metrics_addr.port(),
    ];
    let mut silent = Vec::new();
    for port in ports {
        silent.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    // A client that speaks is served meanwhile.
    let page = reqwest::get(format!("http://127.0.0.1:{}/metrics", app.metrics_addr.port()))
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    for (port, mut conn) in ports.into_iter().zip(silent) {
        let mut buf = [0u8; 1];
        // Bounded: the listener's 10 s, and margin.
        let read = tokio::time::timeout(Duration::from_secs(20), conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("port {port}: a silent connection still open after 20 s"));
        assert_eq!(read.unwrap_or(0), 0, "port {port}: closed without a byte");
    }
    app.shutdown().await;
}
