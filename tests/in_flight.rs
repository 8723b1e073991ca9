//! In-flight load is exact: after any interleaving of dispatches, finished responses, upstream
//! errors, client disconnects, refused requests and proxy reports of another serving endpoint,
//! every endpoint's in-flight requests and tokens equal what is really outstanding there, and
//! return to zero once every stream has ended. Driven through the real tonic ext_proc service.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

mod support;

use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use epp::datastore::testing::hermetic_pods;
use proptest::prelude::*;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// Random picks, so dispatches land on every endpoint.
const RANDOM: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
";

const BODY: &[u8] = br#"{"model":"m","prompt":"an in-flight request","max_tokens":7}"#;

/// The in-flight estimate of [`BODY`]: upstream's, a quarter of its 60 bytes plus 1.5 × that.
const BODY_TOKENS: u64 = 15 + 23;

/// One step of an interleaving. Stream indexes are taken modulo the open streams.
#[derive(Debug, Clone)]
enum Op {
    /// A request is routed (headers and body), and stays open.
    Dispatch,
    /// A request the EPP refuses (invalid JSON): nothing may be counted.
    Refused,
    /// The response of an open request ends normally (headers, then the body's end).
    Finish(usize),
    /// The upstream fails: response headers with a 5xx and nothing after.
    UpstreamError(usize),
    /// The client goes away: the stream is dropped mid-exchange.
    Disconnect(usize),
    /// The proxy reports that endpoint `.1` served the request (a retry moved it).
    ServedBy(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Dispatch),
        1 => Just(Op::Refused),
        2 => any::<usize>().prop_map(Op::Finish),
        1 => any::<usize>().prop_map(Op::UpstreamError),
        2 => any::<usize>().prop_map(Op::Disconnect),
        1 => (any::<usize>(), 0..3usize).prop_map(|(s, e)| Op::ServedBy(s, e)),
    ]
}

/// One open ext_proc stream and where the EPP counts it.
struct Open {
    tx: mpsc::Sender<ProcessingRequest>,
    inbound: Streaming<ProcessingResponse>,
    endpoint: usize,
    response_started: bool,
}

async fn next(inbound: &mut Streaming<ProcessingResponse>) -> Answer {
    let msg = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("answer within 10 s")
        .expect("stream healthy")
        .expect("an answer");
    decode(&msg)
}

async fn open(
    server: &TestServer,
    body: &[u8],
) -> (mpsc::Sender<ProcessingRequest>, Streaming<ProcessingResponse>) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(req_headers(&[(":path", "/v1/completions")], false))
        .await
        .unwrap();
    tx.send(req_body(body, true)).await.unwrap();
    let inbound = server
        .client()
        .await
        .process(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

/// What the live counters say, per endpoint: (requests, tokens).
fn counted(server: &TestServer) -> Vec<(u32, u64)> {
    server
        .snapshot
        .endpoints
        .iter()
        .map(|e| (e.live.in_flight_requests(), e.live.in_flight_tokens()))
        .collect()
}

/// What really is outstanding, per endpoint.
fn outstanding(streams: &[Open], endpoints: usize) -> Vec<(u32, u64)> {
    let mut out = vec![(0u32, 0u64); endpoints];
    for s in streams {
        out[s.endpoint].0 += 1;
        out[s.endpoint].1 += BODY_TOKENS;
    }
    out
}

/// The counters reach `expected`; a disconnect is noticed by the server asynchronously, so this
/// waits for it (bounded: 2 s in 5 ms steps).
async fn settles_at(server: &TestServer, expected: &[(u32, u64)]) -> Result<(), String> {
    for _ in 0..400 {
        if counted(server) == expected {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(format!("counted {:?}, outstanding {expected:?}", counted(server)))
}

async fn run(ops: Vec<Op>) -> Result<(), String> {
    let snapshot = hermetic_pods();
    let addresses: Vec<String> = snapshot
        .endpoints
        .iter()
        .map(|e| e.address_text.to_string())
        .collect();
    let server = TestServer::start(snapshot, Some(RANDOM)).await;
    let mut streams: Vec<Open> = Vec::new();
    for op in ops {
        let pick = |i: usize, n: usize| i % n;
        match op {
            Op::Dispatch => {
                let (tx, mut inbound) = open(&server, BODY).await;
                let Answer::RequestHeaders {
                    destination: Some(d), ..
                } = next(&mut inbound).await
                else {
                    return Err("no destination".into());
                };
                next(&mut inbound).await; // the body, re-emitted
                let endpoint = addresses.iter().position(|a| *a == d).ok_or(d)?;
                streams.push(Open {
                    tx,
                    inbound,
                    endpoint,
                    response_started: false,
                });
            }
            Op::Refused => {
                let (_tx, mut inbound) = open(&server, b"{not json").await;
                match next(&mut inbound).await {
                    Answer::Immediate { status: 400, .. } => {}
                    other => return Err(format!("expected a 400, got {other:?}")),
                }
            }
            Op::Finish(i) if !streams.is_empty() => {
                let mut s = streams.swap_remove(pick(i, streams.len()));
                if !s.response_started {
                    s.tx.send(resp_headers(&[(":status", "200")], false))
                        .await
                        .unwrap();
                    next(&mut s.inbound).await;
                }
                s.tx.send(resp_body(b"{}", true)).await.unwrap();
                next(&mut s.inbound).await;
            }
            Op::UpstreamError(i) if !streams.is_empty() => {
                let at = pick(i, streams.len());
                if streams[at].response_started {
                    continue; // headers already passed: the response can only end or be cut
                }
                let mut s = streams.swap_remove(at);
                s.tx.send(resp_headers(&[(":status", "503")], true))
                    .await
                    .unwrap();
                next(&mut s.inbound).await;
            }
            Op::Disconnect(i) if !streams.is_empty() => {
                drop(streams.swap_remove(pick(i, streams.len())));
            }
            Op::ServedBy(i, endpoint) if !streams.is_empty() => {
                let at = pick(i, streams.len());
                let s = &mut streams[at];
                if s.response_started {
                    continue;
                }
                let report = with_served(resp_headers(&[(":status", "200")], false), &addresses[endpoint]);
                s.tx.send(report).await.unwrap();
                next(&mut s.inbound).await;
                s.endpoint = endpoint;
                s.response_started = true;
            }
            _ => continue, // an op on a stream when none is open
        }
        settles_at(&server, &outstanding(&streams, addresses.len())).await?;
    }
    streams.clear();
    settles_at(&server, &vec![(0, 0); addresses.len()]).await
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn in_flight_counts_are_exact_under_any_interleaving(ops in prop::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let result = rt.block_on(run(ops));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

/// The estimate the test expects is the one the EPP computes.
#[test]
fn the_body_estimate_is_upstreams() {
    assert_eq!(BODY.len(), 60);
    let req = epp::parser::parse_request("/v1/completions", BODY).unwrap();
    assert_eq!(req.estimated_load_tokens(), BODY_TOKENS);
}
