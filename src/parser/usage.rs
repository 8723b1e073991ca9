//! Token usage from response bodies: whole JSON bodies and Server-Sent Event streams.
//!
//! Accepts every place OpenAI-compatible servers put usage: `prompt_tokens`/`completion_tokens`
//! (chat, completions), `input_tokens`/`output_tokens` (Responses API), and cached tokens under
//! `prompt_tokens_details`, `prompt_token_details` (the Go EPP's spelling) or
//! `input_tokens_details`. SSE events may be split anywhere across chunks.

use serde::Deserialize;

/// Tokens consumed by one request, as the model server reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Generated (output) tokens.
    pub completion_tokens: u64,
    /// Total, as reported (or the sum when absent).
    pub total_tokens: u64,
    /// Prompt tokens served from the prefix cache, when reported.
    pub cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Envelope {
    usage: Option<RawUsage>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    response: Option<ResponseEnvelope>,
}

#[derive(Deserialize)]
struct ResponseEnvelope {
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    prompt_token_details: Option<Details>,
    input_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

impl RawUsage {
    fn into_usage(self) -> Option<Usage> {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        if prompt.is_none() && completion.is_none() && self.total_tokens.is_none() {
            return None;
        }
        let prompt_tokens = prompt.unwrap_or(0);
        let completion_tokens = completion.unwrap_or(0);
        let cached_tokens = [
            self.prompt_tokens_details,
            self.prompt_token_details,
            self.input_tokens_details,
        ]
        .into_iter()
        .flatten()
        .find_map(|d| d.cached_tokens);
        Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: self
                .total_tokens
                .unwrap_or(prompt_tokens.saturating_add(completion_tokens)),
            cached_tokens,
        })
    }
}

/// Usage from a complete JSON response body (or one SSE event's data); `None` when absent.
pub fn usage_from_json(body: &[u8]) -> Option<Usage> {
    let env: Envelope = serde_json::from_slice(body).ok()?;
    if let Some(u) = env.usage.and_then(RawUsage::into_usage) {
        return Some(u);
    }
    // Responses API streams carry usage on the `response.completed` event only.
    if env.event_type.as_deref() == Some("response.completed") {
        return env.response?.usage?.into_usage();
    }
    None
}

/// Longest SSE line kept while looking for usage; longer lines are skipped, not buffered.
const MAX_SSE_LINE: usize = 1 << 20;

/// Incremental SSE reader that keeps the first usage object it sees.
#[derive(Debug, Default)]
pub struct SseUsageScanner {
    partial_line: Vec<u8>,
    skipping_long_line: bool,
    usage: Option<Usage>,
}

impl SseUsageScanner {
    /// Feed the next chunk of the event stream.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        if self.usage.is_some() {
            return;
        }
        while let Some(nl) = memchr::memchr(b'\n', chunk) {
            let (line, rest) = chunk.split_at(nl);
            chunk = &rest[1..];
            if self.skipping_long_line {
                self.skipping_long_line = false;
                self.partial_line.clear();
                continue;
            }
            if self.partial_line.is_empty() {
                self.scan_line(line);
            } else {
                let mut full = std::mem::take(&mut self.partial_line);
                full.extend_from_slice(line);
                self.scan_line(&full);
            }
            if self.usage.is_some() {
                return;
            }
        }
        if self.skipping_long_line {
            return;
        }
        if self.partial_line.len() + chunk.len() > MAX_SSE_LINE {
            self.partial_line.clear();
            self.skipping_long_line = true;
        } else {
            self.partial_line.extend_from_slice(chunk);
        }
    }

    fn scan_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" || memchr::memmem::find(data, b"usage").is_none() {
            return;
        }
        self.usage = usage_from_json(data);
    }

    /// The usage found so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_json_usage_with_cached_tokens() {
        let body = br#"{"object":"chat.completion","usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        assert_eq!(
            usage_from_json(body),
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                total_tokens: 15,
                cached_tokens: Some(8)
            })
        );
    }

    #[test]
    fn responses_api_usage() {
        let body = br#"{"object":"response","usage":{"input_tokens":3,"output_tokens":4,"input_tokens_details":{"cached_tokens":0}}}"#;
        let u = usage_from_json(body).unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens, u.total_tokens), (3, 4, 7));
        let ev = br#"{"type":"response.completed","response":{"usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}}}"#;
        assert_eq!(usage_from_json(ev).unwrap().total_tokens, 3);
    }

    #[test]
    fn sse_usage_split_across_chunks() {
        let stream = b"data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut s = SseUsageScanner::default();
            s.feed(&stream[..split]);
            s.feed(&stream[split..]);
            assert_eq!(s.usage().map(|u| u.total_tokens), Some(9), "split at {split}");
        }
    }

    #[test]
    fn sse_without_usage_and_garbage() {
        let mut s = SseUsageScanner::default();
        s.feed(b"data: {not json usage}\n\ndata: [DONE]\n\n: comment\n");
        assert_eq!(s.usage(), None);
    }
}
