//! Token-budget settlement for streaming clients that did not ask for usage: [`ask_for_usage`]
//! sets `stream_options.include_usage` in the request body, and [`UsageEventFilter`] drops the
//! usage-only event (`"choices": []` with a `usage` object) that this adds to the stream. Works
//! on whole events ([`EventSplitter`], blank lines after `\n` or `\r\n` endings): an event split
//! across chunks is held until its blank line, everything else passes as it arrives.

use std::ops::Range;

use serde::Deserialize;

#[derive(Deserialize)]
struct Probe {
    choices: Option<Vec<serde::de::IgnoredAny>>,
    usage: Option<serde::de::IgnoredAny>,
}

fn is_usage_only(event: &[u8]) -> bool {
    event
        .split(|b| *b == b'\n')
        .filter_map(|line| line.strip_prefix(b"data:"))
        .map(|d| d.strip_prefix(b" ").unwrap_or(d))
        .any(|data| {
            serde_json::from_slice::<Probe>(data)
                .is_ok_and(|p| p.usage.is_some() && p.choices.is_some_and(|c| c.is_empty()))
        })
}

/// Splits an SSE byte stream into complete events (each ending in a blank line, after `\n` or
/// `\r\n` line endings), holding an unfinished event until the chunk that completes it.
#[derive(Debug, Default)]
pub struct EventSplitter {
    partial: Vec<u8>,
}

/// The end (exclusive) of the first event in `bytes`: just past its blank line.
fn event_end(bytes: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::find(bytes, b"\n\n").map(|i| i + 2);
    let crlf = memchr::memmem::find(bytes, b"\n\r\n").map(|i| i + 3);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl EventSplitter {
    /// Feed a chunk and call `f` on every event it completes (on the held tail too at end of
    /// stream).
    pub fn feed_with(&mut self, chunk: &[u8], end_of_stream: bool, mut f: impl FnMut(&[u8])) {
        self.partial.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(len) = event_end(&self.partial[start..]) {
            let end = start + len;
            f(&self.partial[start..end]);
            start = end;
        }
        self.partial.drain(..start);
        if end_of_stream && !self.partial.is_empty() {
            f(&self.partial);
            self.partial.clear();
        }
    }
}

/// The filter state of one response stream.
#[derive(Debug, Default)]
pub struct UsageEventFilter {
    events: EventSplitter,
}

impl UsageEventFilter {
    /// Feed the next chunk; returns what the client may see now. With `end_of_stream` the held
    /// tail is released.
    pub fn feed(&mut self, chunk: &[u8], end_of_stream: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len());
        self.events.feed_with(chunk, end_of_stream, |event| {
            if !is_usage_only(event) {
                out.extend_from_slice(event);
            }
        });
        out
    }
}

/// Make `body` ask for a final usage event: `include_usage: true` set in its `stream_options`
/// (whose raw JSON is at `stream_options` in `body`, other members kept), or
/// `"stream_options":{"include_usage":true}` added when the body has none. Returns whether the
/// body changed; it does not when `stream_options` (other than `null`) or the body is not an
/// object.
pub fn ask_for_usage(body: &mut Vec<u8>, stream_options: Option<Range<usize>>) -> bool {
    let Some(span) = stream_options else {
        return match inject_include_usage(body) {
            Some(injected) => {
                *body = injected;
                true
            }
            None => false,
        };
    };
    let Some(raw) = body.get(span.clone()) else {
        return false;
    };
    // `null` means no options: it becomes an object of its own.
    let options = match serde_json::from_slice::<Option<serde_json::Map<String, serde_json::Value>>>(raw) {
        Ok(options) => options,
        Err(_) => return false,
    };
    let mut options = options.unwrap_or_default();
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    let Ok(rewritten) = serde_json::to_vec(&options) else {
        return false;
    };
    body.splice(span, rewritten);
    true
}

/// `body` with `"stream_options":{"include_usage":true}` added as the first member of the
/// top-level object; `None` if the body does not start with an object.
fn inject_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let open = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .filter(|i| body[*i] == b'{')?;
    let rest = &body[open + 1..];
    let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let member: &[u8] = if empty {
        br#""stream_options":{"include_usage":true}"#
    } else {
        br#""stream_options":{"include_usage":true},"#
    };
    let mut out = Vec::with_capacity(body.len() + member.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(member);
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_only_event_is_dropped_at_any_split() {
        let stream = b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\ndata: [DONE]\n\n";
        let want = b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\ndata: [DONE]\n\n".to_vec();
        for split in 0..=stream.len() {
            let mut f = UsageEventFilter::default();
            let mut out = f.feed(&stream[..split], false);
            out.extend(f.feed(&stream[split..], true));
            assert_eq!(out, want, "split at {split}");
        }
    }

    /// Feed `stream` to a splitter cut at every byte; each cut must give exactly `want`.
    fn assert_splits_into(stream: &[u8], want: &[&[u8]]) {
        for split in 0..=stream.len() {
            let mut s = EventSplitter::default();
            let mut evs = Vec::new();
            s.feed_with(&stream[..split], false, |e| evs.push(e.to_vec()));
            s.feed_with(&stream[split..], true, |e| evs.push(e.to_vec()));
            assert_eq!(evs, want, "split {split}");
        }
    }

    #[test]
    fn splitter_yields_whole_events_at_any_split() {
        assert_splits_into(
            b"data: a\n\ndata: b\n\ntail",
            &[b"data: a\n\n", b"data: b\n\n", b"tail"],
        );
    }

    #[test]
    fn crlf_events_are_split_too() {
        assert_splits_into(
            b"data: a\r\n\r\ndata: b\n\ndata: c\r\n\r\ntail",
            &[b"data: a\r\n\r\n", b"data: b\n\n", b"data: c\r\n\r\n", b"tail"],
        );
    }

    #[test]
    fn existing_stream_options_get_include_usage_set() {
        let cases: [(&str, Option<&str>); 4] = [
            (
                r#"{"model":"m","prompt":"p","stream_options":{"include_usage":false,"continuous_usage_stats":true}}"#,
                Some(
                    r#"{"model":"m","prompt":"p","stream_options":{"continuous_usage_stats":true,"include_usage":true}}"#,
                ),
            ),
            (
                r#"{"stream_options": { } ,"model":"m","prompt":"p"}"#,
                Some(r#"{"stream_options": {"include_usage":true} ,"model":"m","prompt":"p"}"#),
            ),
            // Not an object: left for the model server to reject.
            (r#"{"model":"m","prompt":"p","stream_options":5}"#, None),
            (
                r#"{"model":"m","prompt":"p","stream_options":null}"#,
                Some(r#"{"model":"m","prompt":"p","stream_options":{"include_usage":true}}"#),
            ),
        ];
        for (sent, want) in cases {
            let req = crate::parser::parse_request("/v1/completions", sent.as_bytes()).unwrap();
            let mut body = sent.as_bytes().to_vec();
            let changed = ask_for_usage(&mut body, req.stream_options_span);
            assert_eq!(changed, want.is_some(), "{sent}");
            assert_eq!(String::from_utf8(body).unwrap(), want.unwrap_or(sent), "{sent}");
        }
        let mut body = br#"{"model":"m"}"#.to_vec();
        assert!(ask_for_usage(&mut body, None));
        assert_eq!(
            body,
            br#"{"stream_options":{"include_usage":true},"model":"m"}"#.to_vec()
        );
    }

    #[test]
    fn injection_keeps_the_rest_of_the_body() {
        assert_eq!(
            inject_include_usage(br#" {"model":"m","stream":true}"#).unwrap(),
            br#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#.to_vec()
        );
        assert_eq!(
            inject_include_usage(b"{ }").unwrap(),
            br#"{"stream_options":{"include_usage":true} }"#.to_vec()
        );
        assert!(inject_include_usage(b"[1]").is_none());
    }
}
