//! Helpers shared by the integration tests: message builders and an in-process ext_proc server.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]
#![allow(dead_code)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use envoy_types::pb::{
    envoy::{
        config::core::v3::{HeaderMap, HeaderValue, Metadata},
        extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
        service::ext_proc::v3::{
            HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse,
            ProtocolConfiguration, body_mutation::Mutation,
            external_processor_client::ExternalProcessorClient,
            external_processor_server::ExternalProcessorServer, processing_request::Request,
            processing_response::Response,
        },
    },
    google::protobuf::{ListValue, Struct, Value, value::Kind},
};
use epp::{
    clock::MonotonicClock,
    config::EndpointPickerConfig,
    datastore::{Snapshot, SnapshotReader, merge_objectives},
    extproc::{ExtProcService, Processor, body_memory::BodyMemory},
    metrics::exported::EppMetrics,
    scheduler::build_scheduler,
};
use tokio::sync::mpsc;
use tokio_stream::{
    StreamExt,
    wrappers::{ReceiverStream, TcpListenerStream},
};
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Server};

pub fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> HttpHeaders {
    HttpHeaders {
        headers: Some(HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: (*k).to_owned(),
                    value: String::new(),
                    raw_value: v.as_bytes().to_vec(),
                })
                .collect(),
        }),
        end_of_stream,
        ..Default::default()
    }
}

fn fd_config() -> ProtocolConfiguration {
    ProtocolConfiguration {
        request_body_mode: BodySendMode::FullDuplexStreamed as i32,
        response_body_mode: BodySendMode::FullDuplexStreamed as i32,
        send_body_without_waiting_for_header_response: false,
    }
}

pub fn req_headers(pairs: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestHeaders(headers(pairs, end_of_stream))),
        protocol_config: Some(fd_config()),
        ..Default::default()
    }
}

pub fn req_headers_mode(pairs: &[(&str, &str)], mode: BodySendMode) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestHeaders(headers(pairs, false))),
        protocol_config: Some(ProtocolConfiguration {
            request_body_mode: mode as i32,
            response_body_mode: mode as i32,
            send_body_without_waiting_for_header_response: false,
        }),
        ..Default::default()
    }
}

pub fn req_body(body: &[u8], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestBody(HttpBody {
            body: body.to_vec(),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn req_trailers() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestTrailers(HttpTrailers::default())),
        ..Default::default()
    }
}

pub fn resp_headers(pairs: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::ResponseHeaders(headers(pairs, end_of_stream))),
        ..Default::default()
    }
}

pub fn resp_body(body: &[u8], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::ResponseBody(HttpBody {
            body: body.to_vec(),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub fn resp_trailers() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::ResponseTrailers(HttpTrailers::default())),
        ..Default::default()
    }
}

/// Attach a subset hint (list of values) to a message.
pub fn with_subset(mut msg: ProcessingRequest, entries: Vec<Value>) -> ProcessingRequest {
    let inner = Struct {
        fields: [(
            "x-gateway-destination-endpoint-subset".to_owned(),
            Value {
                kind: Some(Kind::ListValue(ListValue { values: entries })),
            },
        )]
        .into(),
    };
    msg.metadata_context = Some(Metadata {
        filter_metadata: [("envoy.lb.subset_hint".to_owned(), inner)].into(),
        ..Default::default()
    });
    msg
}

/// Attach the proxy's served-endpoint report (`envoy.lb` metadata) to a message.
pub fn with_served(mut msg: ProcessingRequest, endpoint: &str) -> ProcessingRequest {
    let inner = Struct {
        fields: [("x-gateway-destination-endpoint-served".to_owned(), s(endpoint))].into(),
    };
    msg.metadata_context = Some(Metadata {
        filter_metadata: [("envoy.lb".to_owned(), inner)].into(),
        ..Default::default()
    });
    msg
}

pub fn s(v: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    }
}

/// A decoded answer, for exact assertions.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Request headers answer: set headers (sorted), clear_route_cache, destination metadata.
    RequestHeaders {
        set: Vec<(String, String)>,
        clear_route_cache: bool,
        destination: Option<String>,
    },
    /// Streamed request body chunk.
    RequestChunk { body: Vec<u8>, eos: bool },
    /// Buffered-mode request body answer.
    RequestBodyReplace {
        set: Vec<(String, String)>,
        body: Option<Vec<u8>>,
        destination: Option<String>,
    },
    /// Request trailers answer.
    RequestTrailers,
    /// Response headers answer.
    ResponseHeaders { set: Vec<(String, String)> },
    /// Streamed response body chunk.
    ResponseChunk { body: Vec<u8>, eos: bool },
    /// Non-streamed response body answer.
    ResponseBodyReplace { body: Option<Vec<u8>> },
    /// Response trailers answer.
    ResponseTrailers,
    /// Immediate response.
    Immediate {
        status: i32,
        headers: Vec<(String, String)>,
        body: String,
    },
}

fn set_headers(c: &envoy_types::pb::envoy::service::ext_proc::v3::CommonResponse) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = c
        .header_mutation
        .as_ref()
        .map(|m| {
            m.set_headers
                .iter()
                .map(|h| {
                    let h = h.header.as_ref().expect("header");
                    assert!(h.value.is_empty(), "EPP must use raw_value only");
                    (
                        h.key.clone(),
                        String::from_utf8(h.raw_value.clone()).expect("utf8"),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn destination(r: &ProcessingResponse) -> Option<String> {
    let lb = r.dynamic_metadata.as_ref()?.fields.get("envoy.lb")?;
    let Some(Kind::StructValue(st)) = &lb.kind else {
        return None;
    };
    match &st.fields.get("x-gateway-destination-endpoint")?.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

pub fn decode(r: &ProcessingResponse) -> Answer {
    match r.response.as_ref().expect("response set") {
        Response::RequestHeaders(h) => {
            let c = h.response.clone().unwrap_or_default();
            Answer::RequestHeaders {
                set: set_headers(&c),
                clear_route_cache: c.clear_route_cache,
                destination: destination(r),
            }
        }
        Response::RequestBody(b) => {
            let c = b.response.clone().unwrap_or_default();
            match c.body_mutation.as_ref().and_then(|m| m.mutation.clone()) {
                Some(Mutation::StreamedResponse(s)) => Answer::RequestChunk {
                    body: s.body,
                    eos: s.end_of_stream,
                },
                Some(Mutation::Body(body)) => Answer::RequestBodyReplace {
                    set: set_headers(&c),
                    body: Some(body),
                    destination: destination(r),
                },
                _ => Answer::RequestBodyReplace {
                    set: set_headers(&c),
                    body: None,
                    destination: destination(r),
                },
            }
        }
        Response::RequestTrailers(_) => Answer::RequestTrailers,
        Response::ResponseHeaders(h) => Answer::ResponseHeaders {
            set: set_headers(&h.response.clone().unwrap_or_default()),
        },
        Response::ResponseBody(b) => {
            let c = b.response.clone().unwrap_or_default();
            match c.body_mutation.as_ref().and_then(|m| m.mutation.clone()) {
                Some(Mutation::StreamedResponse(s)) => Answer::ResponseChunk {
                    body: s.body,
                    eos: s.end_of_stream,
                },
                Some(Mutation::Body(body)) => Answer::ResponseBodyReplace { body: Some(body) },
                _ => Answer::ResponseBodyReplace { body: None },
            }
        }
        Response::ResponseTrailers(_) => Answer::ResponseTrailers,
        Response::ImmediateResponse(i) => {
            let mut hs: Vec<(String, String)> = i
                .headers
                .as_ref()
                .map(|m| {
                    m.set_headers
                        .iter()
                        .map(|h| {
                            let h = h.header.as_ref().expect("header");
                            (
                                h.key.clone(),
                                String::from_utf8(h.raw_value.clone()).expect("utf8"),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            hs.sort();
            Answer::Immediate {
                status: i.status.map(|s| s.code).unwrap_or_default(),
                headers: hs,
                body: String::from_utf8(i.body.clone()).expect("utf8"),
            }
        }
        other => panic!("unexpected answer {other:?}"),
    }
}

/// An ext_proc server on 127.0.0.1 over a fixed snapshot.
pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics: Arc<EppMetrics>,
    pub snapshot: Snapshot,
    /// The process-wide request-body budget the server charges.
    pub body_memory: Arc<BodyMemory>,
}

impl TestServer {
    pub async fn start(snapshot: Snapshot, config_yaml: Option<&str>) -> TestServer {
        Self::start_with_body_memory(snapshot, config_yaml, 1 << 30).await
    }

    /// [`start`](Self::start) with a request-body budget of `body_memory_limit` bytes.
    pub async fn start_with_body_memory(
        snapshot: Snapshot,
        config_yaml: Option<&str>,
        body_memory_limit: usize,
    ) -> TestServer {
        let body_memory = BodyMemory::new(body_memory_limit);
        let config = match config_yaml {
            Some(y) => EndpointPickerConfig::from_yaml(y).expect("config"),
            None => EndpointPickerConfig::default_config(),
        };
        let scheduler = build_scheduler(&config).expect("scheduler");
        let metrics = Arc::new(
            EppMetrics::new()
                .expect("metrics")
                .with_known_models(scheduler.known_models()),
        );
        // A fixed snapshot is published as the writer would: the config's objectives in it.
        let mut snapshot = snapshot;
        snapshot.objectives = Arc::new(merge_objectives(
            scheduler.config_objectives(),
            &snapshot.objectives,
        ));
        let processor = Arc::new(Processor {
            reader: SnapshotReader::fixed(snapshot.clone()),
            scheduler: Arc::new(scheduler),
            metrics: metrics.clone(),
            clock: Arc::new(MonotonicClock::new()),
            disable_subset_filter: false,
            explain_decisions: true,
            conformance_hooks: false,
            tracer: None,
            tasks: TaskTracker::new(),
            body_memory: body_memory.clone(),
            flow: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let svc = ExternalProcessorServer::new(ExtProcService::new(processor, TaskTracker::new()))
            .max_decoding_message_size(64 << 20);
        tokio::spawn(
            Server::builder()
                .add_service(svc)
                // Nagle off, as the app serves: streams reusing one connection would otherwise
                // wait for delayed ACKs (~40 ms each).
                .serve_with_incoming(TcpListenerStream::new(listener).map(|accepted| {
                    accepted.inspect(|stream| {
                        let _ = stream.set_nodelay(true);
                    })
                })),
        );
        TestServer {
            addr,
            metrics,
            snapshot,
            body_memory,
        }
    }

    pub async fn client(&self) -> ExternalProcessorClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        ExternalProcessorClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Send `msgs`, half-close, and collect every answer until the server ends the stream.
    pub async fn exchange(&self, msgs: Vec<ProcessingRequest>) -> Vec<Answer> {
        run_exchange(&mut self.client().await, msgs).await
    }
}

/// One ext_proc stream over `client`: send `msgs`, close, collect the answers.
pub async fn run_exchange(
    client: &mut ExternalProcessorClient<Channel>,
    msgs: Vec<ProcessingRequest>,
) -> Vec<Answer> {
    let (tx, rx) = mpsc::channel(msgs.len().max(1));
    for m in msgs {
        tx.send(m).await.expect("send");
    }
    drop(tx);
    let mut inbound = client
        .process(ReceiverStream::new(rx))
        .await
        .expect("process")
        .into_inner();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("answer within 10s")
        {
            Ok(Some(r)) => out.push(decode(&r)),
            Ok(None) => break,
            Err(status) => panic!("stream error {status:?}"),
        }
    }
    out
}
