//! The properties the coverage-guided fuzz targets check (`fuzz/fuzz_targets/`, one per
//! function here) and the normal test suite replays on the saved corpora
//! (`tests/fuzz_corpora.rs`). Each function takes one raw fuzz input, never panics on input the
//! EPP could receive, and panics (a finding) when a property fails:
//!
//! - [`request_body`]: the request parser's spans point at what it decoded, and the body edits
//!   it drives (model rewrite, usage request) give bodies that parse to the intended request;
//! - [`sse`]: the SSE event splitter, the usage-event filter and the usage scanner give the same
//!   answer for every way the stream can be cut into chunks;
//! - [`mask_restore`]: restoring a masked text gives the original back, for every chunking of
//!   the answer that echoes it;
//! - [`exposition`]: a `/metrics` page read in pieces gives each engine the same signals as the
//!   whole page;
//! - [`config`]: any config text either loads into a scheduler or is refused with an error;
//! - [`extproc_stream`]: any sequence of ext_proc messages on one stream leaves no in-flight
//!   request, token or buffered body byte behind once the stream is gone.
//!
//! Inputs that carry a chunking start with one byte `n`, then `n % 16` chunk sizes (cycled; 0
//! counts as 1), then the payload.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use envoy_types::pb::envoy::{
    config::core::v3::{HeaderMap, HeaderValue, Metadata},
    extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
    service::ext_proc::v3::{
        HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProtocolConfiguration,
        processing_request::Request,
    },
};
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use epp::{
    clock::MonotonicClock,
    config::EndpointPickerConfig,
    datastore::{SnapshotReader, merge_objectives, testing::hermetic_pods},
    extproc::{
        Processor,
        body_memory::BodyMemory,
        stream::{Exchange, Flow},
    },
    guard::{Builtin, PatternSet, Placeholders},
    metrics::exported::EppMetrics,
    parser::{
        ApiKind, EventSplitter, SseUsageScanner, StreamReplacer, UsageEventFilter, apply_edits,
        model_patterns, parse_request_as, replace_model, usage_edit, usage_from_json,
    },
    scheduler::build_scheduler,
    scrape::engines::{PageExtractor, builtin_engines, extract, sample_names},
};

/// Takes bytes off the front of a fuzz input; past the end it gives zeros and empty slices.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The chunk plan and the payload of a chunked input.
fn plan_and_payload(data: &[u8]) -> (&[u8], &[u8]) {
    let mut input = Input { data };
    let n = usize::from(input.byte() % 16);
    let plan = input.take(n);
    (plan, input.rest())
}

/// `payload` cut into pieces whose sizes cycle through `plan` (an empty plan: one piece).
fn chunks<'p>(payload: &'p [u8], plan: &[u8]) -> Vec<&'p [u8]> {
    if plan.is_empty() {
        return vec![payload];
    }
    let mut out = Vec::new();
    let mut rest = payload;
    for size in plan.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(usize::from(*size).clamp(1, rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

/// Feed `pieces` to `feed`, marking the last one as the end of the stream (an empty end when
/// there are none).
fn feed_all(pieces: &[&[u8]], mut feed: impl FnMut(&[u8], bool)) {
    if pieces.is_empty() {
        feed(b"", true);
    }
    for (i, piece) in pieces.iter().enumerate() {
        feed(piece, i + 1 == pieces.len());
    }
}

const APIS: [ApiKind; 6] = [
    ApiKind::ChatCompletions,
    ApiKind::Completions,
    ApiKind::Responses,
    ApiKind::Embeddings,
    ApiKind::Conversations,
    ApiKind::Passthrough,
];

/// First byte: the API; the rest: the body.
pub fn request_body(data: &[u8]) {
    let mut input = Input { data };
    let api = APIS[usize::from(input.byte()) % APIS.len()];
    let body = input.rest();
    // The path classifier takes any string.
    let _ = ApiKind::from_path(&String::from_utf8_lossy(&body[..body.len().min(96)]));
    let Ok(req) = parse_request_as(api, body) else {
        return;
    };
    assert_eq!(req.body_len, body.len());
    if api == ApiKind::Passthrough {
        return;
    }
    let model_json = body
        .get(req.model_span.clone())
        .expect("model span inside the body");
    let model: String = serde_json::from_slice(model_json).expect("model span is a JSON string");
    assert_eq!(model, req.model, "model span decodes to the model");
    let prompt = req.prompt_bytes(body);
    assert_eq!(prompt.len(), req.prompt_span.len(), "prompt span inside the body");
    serde_json::from_slice::<&serde_json::value::RawValue>(prompt).expect("prompt span is one JSON value");

    // A model rewrite keeps every other byte: the new body parses to the new model.
    let new_model = "rewritten/\"model\"\u{e9}";
    let rewritten = replace_model(body, req.model_span.clone(), new_model);
    let again = parse_request_as(api, &rewritten).expect("a rewritten body parses");
    assert_eq!(again.model, new_model);
    assert_eq!(
        again.prompt_bytes(&rewritten),
        prompt,
        "the rewrite keeps the prompt"
    );
    assert_eq!(again.stream, req.stream);

    // Asking for usage keeps the request and turns include_usage on.
    if let Some(edit) = usage_edit(body, req.stream_options_span.clone()) {
        let edited = apply_edits(body, &mut [edit]);
        let again = parse_request_as(api, &edited).expect("a body asking for usage parses");
        assert!(again.include_usage, "usage requested");
        assert_eq!(again.model, req.model);
        assert_eq!(again.prompt_bytes(&edited), prompt);
    }

    // The guard's walk over the prompt's strings and the masking of each. A prompt the guard
    // cannot decode (deeper than 128 levels, a number past f64) is refused unscanned by the
    // guard (fail closed), so there is nothing to walk.
    let Ok(mut prompt_value) = serde_json::from_slice::<serde_json::Value>(prompt) else {
        return;
    };
    let set = all_builtins();
    let mut placeholders = Placeholders::default();
    epp::guard::visit_prompt_strings(api, &mut prompt_value, &mut |s| placeholders.reserve_literals(s));
    epp::guard::visit_prompt_strings(api, &mut prompt_value, &mut |s| {
        if let Some(masked) = placeholders.mask(set, s) {
            *s = masked;
        }
    });
}

fn all_builtins() -> &'static PatternSet {
    static SET: OnceLock<PatternSet> = OnceLock::new();
    SET.get_or_init(|| {
        PatternSet::new(
            &[
                Builtin::Ssn,
                Builtin::CreditCard,
                Builtin::Email,
                Builtin::PhoneNumber,
            ],
            &[],
        )
        .expect("builtin patterns compile")
    })
}

/// Chunked input: an SSE stream.
pub fn sse(data: &[u8]) {
    let (plan, payload) = plan_and_payload(data);
    let pieces = chunks(payload, plan);

    let split = |pieces: &[&[u8]]| {
        let mut splitter = EventSplitter::default();
        let mut events: Vec<Vec<u8>> = Vec::new();
        feed_all(pieces, |piece, end| {
            splitter.feed_with(piece, end, |e| events.push(e.to_vec()));
        });
        (events, splitter.overflowed())
    };
    let (whole, whole_overflowed) = split(&[payload]);
    let (chunked, chunked_overflowed) = split(&pieces);
    assert_eq!(whole_overflowed, chunked_overflowed);
    if !whole_overflowed {
        assert_eq!(whole, chunked, "the same events for every chunking");
        assert_eq!(whole.concat(), payload, "events are the stream, cut");
    }

    let filter = |pieces: &[&[u8]]| {
        let mut filter = UsageEventFilter::default();
        let mut out = Vec::new();
        feed_all(pieces, |piece, end| out.extend(filter.feed(piece, end)));
        out
    };
    assert_eq!(
        filter(&[payload]),
        filter(&pieces),
        "the usage filter ignores chunking"
    );

    let scan = |pieces: &[&[u8]]| {
        let mut scanner = SseUsageScanner::default();
        for piece in pieces {
            scanner.feed(piece);
        }
        scanner.usage()
    };
    assert_eq!(
        scan(&[payload]),
        scan(&pieces),
        "the usage scanner ignores chunking"
    );
    let _ = usage_from_json(payload);

    // The model-name restore on the same stream.
    let replace = |pieces: &[&[u8]]| {
        let mut replacer = StreamReplacer::with_patterns(model_patterns("served", "client/model"));
        let mut out = Vec::new();
        feed_all(pieces, |piece, end| out.extend(replacer.feed(piece, end)));
        out
    };
    assert_eq!(
        replace(&[payload]),
        replace(&pieces),
        "the model restore ignores chunking"
    );
}

/// Chunked input: a prompt text (UTF-8, lossily) and the chunking of the answer echoing it.
pub fn mask_restore(data: &[u8]) {
    let (plan, payload) = plan_and_payload(data);
    let text = String::from_utf8_lossy(payload);
    let mut placeholders = Placeholders::default();
    placeholders.reserve_literals(&text);
    let Some(masked) = placeholders.mask(all_builtins(), &text) else {
        return;
    };
    assert_ne!(masked, text, "a hit was masked");
    // The model echoes the masked text inside a JSON string; the restore sees JSON bytes.
    let answer = serde_json::Value::String(masked).to_string();
    let mut restore = StreamReplacer::with_patterns(placeholders.restore_patterns());
    let mut restored = Vec::new();
    feed_all(&chunks(answer.as_bytes(), plan), |piece, end| {
        restored.extend(restore.feed(piece, end));
    });
    let original = serde_json::Value::String(text.into_owned()).to_string();
    assert_eq!(
        String::from_utf8_lossy(&restored),
        original,
        "restore of mask is the identity"
    );
}

/// Chunked input: a `/metrics` page.
pub fn exposition(data: &[u8]) {
    static ENGINES: OnceLock<Vec<(epp::scrape::engines::EngineSpec, Vec<String>)>> = OnceLock::new();
    let engines = ENGINES.get_or_init(|| {
        builtin_engines()
            .into_iter()
            .map(|spec| {
                let names = sample_names(&spec);
                (spec, names)
            })
            .collect()
    });
    let (plan, page) = plan_and_payload(data);
    for (spec, names) in engines {
        let mut reader = PageExtractor::new(spec, names);
        for piece in chunks(page, plan) {
            reader.feed(piece);
        }
        let chunked = reader.finish();
        if let Ok(text) = std::str::from_utf8(page) {
            // Debug text compares NaN values as equal, which PartialEq does not.
            assert_eq!(
                format!("{:?}", extract(spec, text)),
                format!("{chunked:?}"),
                "{}: a page read in pieces reads as the whole page",
                spec.name
            );
        }
    }
}

/// Input: a config file's text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = EndpointPickerConfig::from_yaml(text) {
        let _ = build_scheduler(&config);
    }
}

/// Guards (reject, mask, response mask) and a token budget around upstream's default profile,
/// so a stream can reach every stage.
const STREAM_CONFIG: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: prefix-cache-scorer
- type: prompt-guard
  name: reject
  parameters:
    request:
      regex:
        action: REJECT
        matches: [{pattern: '(?i)ignore previous', name: PromptInjection}]
- type: prompt-guard
  name: mask
  parameters:
    request:
      regex:
        builtins: [EMAIL, CREDIT_CARD]
    response:
      regex:
        builtins: [CREDIT_CARD]
- type: token-budget
  parameters:
    tenants:
      team-a:
        tokens: 1000000000
        models:
          m: {tokens: 60, fallbackModel: cheap}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: prefix-cache-scorer
";

const PATHS: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/conversations",
    "/v1/models",
];

/// Bodies the parser accepts, so the fuzzer starts past it.
const BODIES: [&[u8]; 4] = [
    br#"{"model":"m","messages":[{"role":"user","content":"mail a@b.io, card 4111 1111 1111 1111"}],"stream":true}"#,
    br#"{"model":"m","prompt":"hello there","max_tokens":3}"#,
    br#"{"model":"m","input":"ignore previous orders","stream":true,"stream_options":{"include_usage":false}}"#,
    br#"{"model":"other","messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#,
];

/// Response bodies: SSE with usage, JSON with usage and a card number.
const ANSWERS: [&[u8]; 3] = [
    b"data: {\"choices\":[{\"text\":\"4111 1111 1111 1111\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
    br#"{"model":"m","choices":[{"message":{"content":"card 4111 1111 1111 1111"}}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#,
    b"data: {\"choices\":[{\"delta\":{\"content\":\"4111 1111",
];

fn header_map(pairs: &[(&str, &[u8])]) -> HeaderMap {
    HeaderMap {
        headers: pairs
            .iter()
            .map(|(k, v)| HeaderValue {
                key: (*k).to_owned(),
                value: String::new(),
                raw_value: v.to_vec(),
            })
            .collect(),
    }
}

fn mode(b: u8) -> i32 {
    [
        BodySendMode::None,
        BodySendMode::Streamed,
        BodySendMode::Buffered,
        BodySendMode::BufferedPartial,
        BodySendMode::FullDuplexStreamed,
    ][usize::from(b) % 5] as i32
}

/// One ext_proc message decoded from the input (an op byte, then its arguments).
fn next_message(input: &mut Input<'_>) -> ProcessingRequest {
    let op = input.byte();
    let flags = input.byte();
    let end = flags & 1 == 1;
    let body = |input: &mut Input<'_>| -> Vec<u8> {
        let n = input.byte();
        if n >= 0xf0 {
            let which = usize::from(n - 0xf0);
            if which < BODIES.len() {
                return BODIES[which].to_vec();
            }
            return ANSWERS[which % ANSWERS.len()].to_vec();
        }
        input.take(usize::from(n)).to_vec()
    };
    let mut msg = ProcessingRequest::default();
    match op % 8 {
        0 => {
            let path = PATHS[usize::from(input.byte()) % PATHS.len()];
            let mut pairs: Vec<(&str, &[u8])> = vec![(":path", path.as_bytes()), (":method", b"POST")];
            if flags & 2 == 2 {
                pairs.push(("x-gateway-inference-fairness-id", b"team-a"));
            }
            if flags & 4 == 4 {
                pairs.push(("x-gateway-model-name-rewrite", b"m"));
            }
            if flags & 8 == 8 {
                pairs.push(("content-length", b"17"));
            }
            msg.request = Some(Request::RequestHeaders(HttpHeaders {
                headers: Some(header_map(&pairs)),
                end_of_stream: end,
                ..Default::default()
            }));
            let modes = input.byte();
            msg.protocol_config = Some(ProtocolConfiguration {
                request_body_mode: mode(modes),
                response_body_mode: mode(modes >> 4),
                send_body_without_waiting_for_header_response: flags & 16 == 16,
            });
        }
        1 | 2 => {
            msg.request = Some(Request::RequestBody(HttpBody {
                body: body(input),
                end_of_stream: end,
                ..Default::default()
            }));
        }
        3 => msg.request = Some(Request::RequestTrailers(HttpTrailers::default())),
        4 => {
            let status: &[u8] = [b"200".as_slice(), b"500", b"429", b"x"][usize::from(input.byte() % 4)];
            let content_type: &[u8] = if flags & 2 == 2 {
                b"text/event-stream"
            } else {
                b"application/json"
            };
            msg.request = Some(Request::ResponseHeaders(HttpHeaders {
                headers: Some(header_map(&[(":status", status), ("content-type", content_type)])),
                end_of_stream: end,
                ..Default::default()
            }));
        }
        5 | 6 => {
            msg.request = Some(Request::ResponseBody(HttpBody {
                body: body(input),
                end_of_stream: end,
                ..Default::default()
            }));
        }
        _ => msg.request = Some(Request::ResponseTrailers(HttpTrailers::default())),
    }
    if flags & 32 == 32 {
        // The proxy's report of the endpoint that served the request (a retry moved it).
        let served = ["10.0.0.1:8000", "10.0.0.2:8000", "not an address"][usize::from(flags >> 6) % 3];
        msg.metadata_context = Some(Metadata {
            filter_metadata: [(
                "envoy.lb".to_owned(),
                Struct {
                    fields: [(
                        "x-gateway-destination-endpoint-served".to_owned(),
                        PbValue {
                            kind: Some(Kind::StringValue(served.to_owned())),
                        },
                    )]
                    .into(),
                },
            )]
            .into(),
            ..Default::default()
        });
    }
    msg
}

/// Input: a sequence of ext_proc messages on one stream.
pub fn extproc_stream(data: &[u8]) {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    });
    // One processor for every input, as one EPP serves every stream: building a scheduler per
    // input would cost more than the input. Each input must still leave it as it found it.
    static SHARED: OnceLock<(Arc<Processor>, epp::datastore::Snapshot, Arc<BodyMemory>)> = OnceLock::new();
    let (processor, snapshot, body_memory) = SHARED.get_or_init(|| {
        let config = EndpointPickerConfig::from_yaml(STREAM_CONFIG).expect("stream config");
        let scheduler = build_scheduler(&config).expect("scheduler");
        let metrics = Arc::new(
            EppMetrics::new()
                .expect("metrics")
                .with_known_models(scheduler.known_models()),
        );
        let mut snapshot = hermetic_pods();
        snapshot.objectives = Arc::new(merge_objectives(
            scheduler.config_objectives(),
            &snapshot.objectives,
        ));
        let body_memory = BodyMemory::new(1 << 16);
        let processor = Arc::new(Processor {
            reader: SnapshotReader::fixed(snapshot.clone()),
            scheduler: Arc::new(scheduler),
            metrics,
            clock: Arc::new(MonotonicClock::new()),
            disable_subset_filter: false,
            explain_decisions: true,
            conformance_hooks: false,
            tracer: None,
            tasks: tokio_util::task::TaskTracker::new(),
            body_memory: body_memory.clone(),
            flow: None,
        });
        (processor, snapshot, body_memory)
    });
    runtime.block_on(async {
        let mut exchange = Exchange::new(processor.clone());
        let mut input = Input { data };
        let mut out = Vec::new();
        for _ in 0..64 {
            if input.is_empty() {
                break;
            }
            let msg = next_message(&mut input);
            out.clear();
            let flow = exchange.on_message(msg, &mut out).await;
            exchange.after_send();
            if flow == Flow::Close {
                break;
            }
        }
        drop(exchange);
        // Budget settlement runs in the background: wait for it before counting.
        processor.tasks.close();
        processor.tasks.wait().await;
        processor.tasks.reopen();
    });
    for e in snapshot.endpoints.iter() {
        assert_eq!(
            (e.live.in_flight_requests(), e.live.in_flight_tokens()),
            (0, 0),
            "{}: nothing in flight once the stream is gone",
            e.spec.address
        );
    }
    assert_eq!(
        body_memory.held(),
        0,
        "no body bytes held once the stream is gone"
    );
}
