//! Request bodies → [`LlmRequest`], in one pass over the bytes.
//!
//! The body is scanned once by serde_json into borrowed raw values: nothing is copied but the
//! model name, and the byte spans of `model` and the prompt field are kept so that the caller can
//! patch the model in place and the prefix hasher can read the prompt without a second parse.

use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

use super::api::ApiKind;

/// Why a request body was refused. Every variant is a client error (HTTP 400).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// Not a JSON object.
    #[error("error unmarshaling request body: {reason}")]
    InvalidJson {
        /// The decoder's message.
        reason: String,
    },
    /// `model` missing or not a string.
    #[error("model not found in request body")]
    MissingModel,
    /// The API's prompt field is missing or empty.
    #[error("{}", .api.missing_prompt_message())]
    MissingPrompt {
        /// Which API was assumed.
        api: ApiKind,
    },
}

impl RequestError {
    /// The offending body field, for the OpenAI error's `param`.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            RequestError::InvalidJson { .. } => None,
            RequestError::MissingModel => Some("model"),
            RequestError::MissingPrompt { api } => Some(api.prompt_field()),
        }
    }
}

/// The largest output-token limit the EPP accounts for (256 Ki tokens, beyond any served
/// model's output today). A larger `max_tokens` is clamped for in-flight accounting and budget
/// estimates only (the body goes upstream unchanged, and the model server enforces its own
/// limit): one request asking for 2^63 − 1 tokens must not saturate the token-concurrency
/// detector or overflow the sums it adds to.
pub const MAX_ACCOUNTED_OUTPUT_TOKENS: u64 = 1 << 18;

/// What the EPP needs to know about one LLM request.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmRequest {
    /// The API, from the path.
    pub api: ApiKind,
    /// `model` as the client sent it.
    pub model: String,
    /// Byte span of the `model` value (with its quotes) in the body.
    pub model_span: Range<usize>,
    /// Byte span of the raw JSON of the prompt field (`messages`, `prompt`, `input`, `items`).
    pub prompt_span: Range<usize>,
    /// `"stream": true`.
    pub stream: bool,
    /// `stream_options.include_usage` is `true`.
    pub include_usage: bool,
    /// Byte span of the raw JSON of `stream_options`, when the body has that member (even
    /// `null`).
    pub stream_options_span: Option<Range<usize>>,
    /// `max_tokens`, `max_completion_tokens` or `max_output_tokens`, whichever is set first,
    /// at most [`MAX_ACCOUNTED_OUTPUT_TOKENS`].
    pub max_output_tokens: Option<u64>,
    /// `cache_salt`, which isolates prefix-cache sharing between tenants.
    pub cache_salt: Option<String>,
    /// Length of the body in bytes.
    pub body_len: usize,
}

impl LlmRequest {
    /// The raw JSON text of the prompt field inside `body` (the body this was parsed from).
    pub fn prompt_bytes<'b>(&self, body: &'b [u8]) -> &'b [u8] {
        body.get(self.prompt_span.clone()).unwrap_or_default()
    }

    /// A cheap token estimate of the prompt: about four bytes per token, at least one.
    pub fn estimated_prompt_tokens(&self) -> u64 {
        ((self.prompt_span.len() as u64) / 4).max(1)
    }

    /// Tokens the request is expected to occupy on its endpoint, for in-flight accounting, as
    /// upstream's `inflight-load-producer` estimates them (GIE `token_estimator.go`): the input
    /// is a quarter of the request's bytes (at least 1), the output 1.5 × the input rounded half
    /// up, and the load their sum. `max_tokens` plays no part, as upstream: the same requests give
    /// `token-load-scorer` and `concurrency-detector` the same load as in the Go EPP.
    pub fn estimated_load_tokens(&self) -> u64 {
        let input = (self.body_len as u64 / 4).max(1);
        let output = input.saturating_mul(3).saturating_add(1) / 2;
        input.saturating_add(output)
    }
}

/// An output-token limit as accounted: the number, at most [`MAX_ACCOUNTED_OUTPUT_TOKENS`];
/// negative numbers are 0, and anything that is not a number is the ceiling.
fn output_limit(raw: &str) -> u64 {
    let n = match raw.parse::<u64>() {
        Ok(n) => n,
        Err(_) => match raw.parse::<f64>() {
            Ok(f) if f.is_finite() => f.max(0.0).min(MAX_ACCOUNTED_OUTPUT_TOKENS as f64) as u64,
            Ok(_) | Err(_) => MAX_ACCOUNTED_OUTPUT_TOKENS,
        },
    };
    n.min(MAX_ACCOUNTED_OUTPUT_TOKENS)
}

/// A member that is present, whatever its value (`Option` alone reads `null` as absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as Deserialize>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct RawBody<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    items: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    /// `Some` also for an explicit `null`, whose span is needed to replace it.
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    cache_salt: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<serde_json::Value>,
}

/// Parse an OpenAI-style request body for the API at `path`.
///
/// # Errors
/// [`RequestError`] when the body is not a JSON object, has no string `model`, or lacks the
/// API's prompt field.
pub fn parse_request(path: &str, body: &[u8]) -> Result<LlmRequest, RequestError> {
    parse_request_as(ApiKind::from_path(path), body)
}

/// Parse an OpenAI-style request body for `api` (a body parsed again after an edit).
///
/// # Errors
/// As [`parse_request`].
pub fn parse_request_as(api: ApiKind, body: &[u8]) -> Result<LlmRequest, RequestError> {
    if api == ApiKind::Passthrough {
        return Ok(passthrough_request(body));
    }
    let text = std::str::from_utf8(body).map_err(|e| RequestError::InvalidJson {
        reason: e.to_string(),
    })?;
    let raw: RawBody<'_> = serde_json::from_str(text).map_err(|e| RequestError::InvalidJson {
        reason: e.to_string(),
    })?;

    let model_raw = raw.model.ok_or(RequestError::MissingModel)?;
    let model: String = serde_json::from_str(model_raw.get()).map_err(|_| RequestError::MissingModel)?;
    let model_span = span_of(text, model_raw.get());

    let prompt = match api {
        ApiKind::Completions => raw.prompt,
        ApiKind::ChatCompletions => raw.messages,
        ApiKind::Responses | ApiKind::Embeddings => raw.input,
        ApiKind::Conversations => raw.items,
        ApiKind::Passthrough => return Ok(passthrough_request(body)), // handled above
    };
    let prompt = prompt
        .filter(|p| is_non_empty(p.get()))
        .ok_or(RequestError::MissingPrompt { api })?;
    if api == ApiKind::ChatCompletions && !prompt.get().starts_with('[') {
        return Err(RequestError::MissingPrompt { api });
    }

    // The largest limit present counts (engines differ in which one they read); a number
    // written as a float (`1e5`, `100.0`) is read as one, and a value that is present but not
    // a number is accounted at the ceiling rather than ignored.
    let max_output_tokens = [raw.max_tokens, raw.max_completion_tokens, raw.max_output_tokens]
        .into_iter()
        .flatten()
        .filter(|v| v.get() != "null")
        .map(|v| output_limit(v.get()))
        .max();

    Ok(LlmRequest {
        api,
        model,
        model_span,
        prompt_span: span_of(text, prompt.get()),
        stream: raw.stream.is_some_and(|v| v.get() == "true"),
        stream_options_span: raw.stream_options.map(|o| span_of(text, o.get())),
        include_usage: raw
            .stream_options
            .and_then(|o| serde_json::from_str::<StreamOptions>(o.get()).ok())
            .and_then(|o| o.include_usage)
            .is_some_and(|v| v == serde_json::Value::Bool(true)),
        max_output_tokens,
        cache_salt: raw
            .cache_salt
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok()),
        body_len: body.len(),
    })
}

/// What upstream's `passthrough-parser` makes of a body: nothing is read, so there is no model
/// (the target comes from the rewrite header), no prompt (no prefix hashes) and no output limit;
/// only the size counts, for the in-flight estimate. The body goes upstream unchanged.
pub fn passthrough_request(body: &[u8]) -> LlmRequest {
    LlmRequest {
        api: ApiKind::Passthrough,
        model: String::new(),
        model_span: 0..0,
        prompt_span: 0..0,
        stream: false,
        include_usage: false,
        stream_options_span: None,
        max_output_tokens: None,
        cache_salt: None,
        body_len: body.len(),
    }
}

/// The byte span of `part` inside `whole`; `part` must borrow from `whole` (serde's borrowed
/// `RawValue` does).
fn span_of(whole: &str, part: &str) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    start..start + part.len()
}

/// A JSON value counts as present when it is not null, not `""`, not `[]` and not `{}`.
fn is_non_empty(raw: &str) -> bool {
    let compact: String = raw.chars().filter(|c| !c.is_whitespace()).take(3).collect();
    !matches!(compact.as_str(), "null" | "\"\"" | "[]" | "{}")
}

/// `body` with the `model` value at `span` replaced by `new_model`, as a JSON string.
/// Every other byte is kept as sent.
pub fn replace_model(body: &[u8], span: Range<usize>, new_model: &str) -> Vec<u8> {
    super::apply_edits(body, &mut [super::model_edit(span, new_model)])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (security issue, input clamps): the accounted output limit is the largest of
    /// the limits present, floats count, and nothing a client writes escapes the ceiling.
    #[test]
    fn output_limits_are_read_whatever_their_spelling_and_clamped() {
        let limit = |fields: &str| {
            let body = format!(r#"{{"model":"m","prompt":"p"{fields}}}"#);
            parse_request("/v1/completions", body.as_bytes())
                .unwrap()
                .max_output_tokens
        };
        assert_eq!(limit(""), None);
        assert_eq!(limit(r#","max_tokens":null"#), None);
        assert_eq!(limit(r#","max_tokens":12"#), Some(12));
        assert_eq!(limit(r#","max_tokens":1e3"#), Some(1_000));
        assert_eq!(limit(r#","max_tokens":1,"max_completion_tokens":200"#), Some(200));
        assert_eq!(
            limit(r#","max_tokens":9223372036854775807"#),
            Some(MAX_ACCOUNTED_OUTPUT_TOKENS)
        );
        assert_eq!(limit(r#","max_tokens":1e300"#), Some(MAX_ACCOUNTED_OUTPUT_TOKENS));
        assert_eq!(
            limit(r#","max_tokens":"many""#),
            Some(MAX_ACCOUNTED_OUTPUT_TOKENS)
        );
        assert_eq!(limit(r#","max_tokens":-5"#), Some(0));
    }

    /// The in-flight estimate is upstream's: a quarter of the body's bytes as input, 1.5 × that
    /// (half up) as output, whatever `max_tokens` says.
    #[test]
    fn in_flight_estimate_is_upstreams_from_the_body_size() {
        let load = |body: &str| {
            parse_request("/v1/completions", body.as_bytes())
                .unwrap()
                .estimated_load_tokens()
        };
        // 28 bytes: input 7, output round(10.5) = 11.
        assert_eq!(load(r#"{"model":"m","prompt":"abc"}"#), 18);
        // 60 bytes: input 15, output round(22.5) = 23; the huge limit changes nothing.
        let huge = r#"{"model":"m","prompt":"hi","max_tokens":9223372036854775807}"#;
        assert_eq!(huge.len(), 60);
        assert_eq!(load(huge), 38);
        // 32 bytes: input 8, output 12.
        assert_eq!(load(r#"{"model":"m","prompt":"abcdefg"}"#), 20);
    }

    #[test]
    fn chat_request_spans_and_fields() {
        let body = br#"{"model":"m1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":12,"cache_salt":"s"}"#;
        let r = parse_request("/v1/chat/completions", body).unwrap();
        assert_eq!(r.api, ApiKind::ChatCompletions);
        assert_eq!(r.model, "m1");
        assert_eq!(&body[r.model_span.clone()], br#""m1""#);
        assert_eq!(r.prompt_bytes(body), br#"[{"role":"user","content":"hi"}]"#);
        assert!(r.stream);
        assert!(r.include_usage);
        assert_eq!(r.max_output_tokens, Some(12));
        assert_eq!(r.cache_salt.as_deref(), Some("s"));
    }

    #[test]
    fn errors_match_upstream_messages() {
        assert_eq!(
            parse_request("/v1/completions", br#"{"prompt":"x"}"#),
            Err(RequestError::MissingModel)
        );
        assert_eq!(
            parse_request("/v1/completions", br#"{"model":3,"prompt":"x"}"#),
            Err(RequestError::MissingModel)
        );
        let e = parse_request("/v1/chat/completions", br#"{"model":"m","messages":[]}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid chat completions request: must have valid messages field"
        );
        let e = parse_request("/v1/completions", br#"{"model":"m","prompt":""}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid completions request: must have prompt field"
        );
        assert!(matches!(
            parse_request("/v1/completions", b"not json"),
            Err(RequestError::InvalidJson { .. })
        ));
        assert!(matches!(
            parse_request("/v1/completions", b"[1,2]"),
            Err(RequestError::InvalidJson { .. })
        ));
    }

    #[test]
    fn replace_model_patches_only_the_value() {
        let body = br#"{"max_tokens":100,"model":"my-model","prompt":"test1","temperature":0}"#;
        let r = parse_request("/v1/completions", body).unwrap();
        let out = replace_model(body, r.model_span, "my-model-12345");
        assert_eq!(
            out,
            br#"{"max_tokens":100,"model":"my-model-12345","prompt":"test1","temperature":0}"#
        );
        assert_eq!(out.len(), 76);
    }

    #[test]
    fn escaped_model_names_round_trip() {
        let body = br#"{"model":"a\"b","prompt":"x"}"#;
        let r = parse_request("/v1/completions", body).unwrap();
        assert_eq!(r.model, "a\"b");
        let out = replace_model(body, r.model_span, "c\"d");
        assert_eq!(out, br#"{"model":"c\"d","prompt":"x"}"#);
    }
}
