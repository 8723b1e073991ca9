//! Streaming byte replacement in response bodies, chunk by chunk: the client-facing model name
//! restored after a rewrite, and masked values restored from their placeholders.
//!
//! A match split across chunks is still found, and only the few trailing bytes that could start a
//! match are held back (SSE events end in a blank line, which never starts a match, so events are
//! not delayed).

/// Streaming replacement of byte patterns.
#[derive(Debug, Default)]
pub struct StreamReplacer {
    patterns: Vec<(Vec<u8>, Vec<u8>)>,
    held: Vec<u8>,
}

/// The model-name restore is a [`StreamReplacer`] with two patterns.
pub type ModelRestorer = StreamReplacer;

/// `(from, to)` pairs replacing `"model":"<served>"` (also with one space after the colon) by the
/// client-facing name; both are raw model names (JSON-encoded here).
pub fn model_patterns(served: &str, client_facing: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let s = serde_json::Value::String(served.to_owned()).to_string();
    let c = serde_json::Value::String(client_facing.to_owned()).to_string();
    let pat = |sep: &str, name: &str| format!("\"model\"{sep}{name}").into_bytes();
    vec![(pat(":", &s), pat(":", &c)), (pat(": ", &s), pat(": ", &c))]
}

impl StreamReplacer {
    /// Replace `served` with `client_facing` in `"model"` fields.
    pub fn new(served: &str, client_facing: &str) -> Self {
        Self::with_patterns(model_patterns(served, client_facing))
    }

    /// Replace each `from` with its `to` (empty `from`s are ignored).
    pub fn with_patterns(patterns: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        Self {
            patterns: patterns.into_iter().filter(|(f, _)| !f.is_empty()).collect(),
            held: Vec::new(),
        }
    }

    /// Add more patterns.
    pub fn extend(&mut self, patterns: Vec<(Vec<u8>, Vec<u8>)>) {
        self.patterns
            .extend(patterns.into_iter().filter(|(f, _)| !f.is_empty()));
    }

    /// Whether there is nothing to replace.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Process the next chunk; returns the bytes that can go to the client now. With
    /// `end_of_stream` everything held is released.
    pub fn feed(&mut self, chunk: &[u8], end_of_stream: bool) -> Vec<u8> {
        let joined;
        let input: &[u8] = if self.held.is_empty() {
            chunk
        } else {
            let mut j = std::mem::take(&mut self.held);
            j.extend_from_slice(chunk);
            joined = j;
            &joined
        };
        let mut out = Vec::with_capacity(input.len());
        let mut pos = 0;
        while pos < input.len() {
            let next = self
                .patterns
                .iter()
                .filter_map(|(from, to)| {
                    memchr::memmem::find(&input[pos..], from).map(|at| (pos + at, from.len(), to))
                })
                .min_by_key(|(at, _, _)| *at);
            match next {
                Some((at, len, to)) => {
                    out.extend_from_slice(&input[pos..at]);
                    out.extend_from_slice(to);
                    pos = at + len;
                }
                None => break,
            }
        }
        let rest = &input[pos..];
        let hold = if end_of_stream {
            0
        } else {
            self.partial_match_len(rest)
        };
        out.extend_from_slice(&rest[..rest.len() - hold]);
        self.held = rest[rest.len() - hold..].to_vec();
        out
    }

    /// Length of the longest suffix of `data` that is a proper prefix of some pattern.
    fn partial_match_len(&self, data: &[u8]) -> usize {
        let longest = self.patterns.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
        let max = longest.saturating_sub(1).min(data.len());
        (1..=max)
            .rev()
            .find(|&n| {
                let suffix = &data[data.len() - n..];
                self.patterns.iter().any(|(p, _)| p.starts_with(suffix))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_unit_vector() {
        let mut r = ModelRestorer::new("vllm-backend-01", "gpt-4-proxy");
        let out = r.feed(
            br#"{"id":"cmpl-123","model":"vllm-backend-01","choices":[]}"#,
            true,
        );
        assert_eq!(out, br#"{"id":"cmpl-123","model":"gpt-4-proxy","choices":[]}"#);
        let out = ModelRestorer::new("a", "b").feed(b"data: [DONE]\n", true);
        assert_eq!(out, b"data: [DONE]\n");
    }

    #[test]
    fn every_split_point_gives_the_same_output() {
        let body = b"data: {\"model\": \"served-x\",\"c\":1}\n\ndata: {\"model\":\"served-x\"}\n\n";
        let expected = b"data: {\"model\": \"client\",\"c\":1}\n\ndata: {\"model\":\"client\"}\n\n";
        for split in 0..=body.len() {
            let mut r = ModelRestorer::new("served-x", "client");
            let mut out = r.feed(&body[..split], false);
            out.extend(r.feed(&body[split..], true));
            assert_eq!(out, expected.to_vec(), "split at {split}");
        }
    }

    #[test]
    fn complete_sse_events_are_not_held_back() {
        let mut r = ModelRestorer::new("served-x", "client");
        let event = b"data: {\"model\":\"served-x\"}\n\n";
        assert_eq!(r.feed(event, false), b"data: {\"model\":\"client\"}\n\n".to_vec());
    }
}
