//! Drops the usage-only event of an SSE stream (`"choices": []` with a `usage` object), which
//! the EPP asked for on the client's behalf (`stream_options.include_usage`) to settle token
//! budgets. Works on whole events: an event split across chunks is held until its blank line,
//! everything else passes as it arrives.

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

/// Splits an SSE byte stream into complete events (each ending in a blank line), holding an
/// unfinished event until the chunk that completes it.
#[derive(Debug, Default)]
pub struct EventSplitter {
    partial: Vec<u8>,
}

impl EventSplitter {
    /// Feed a chunk and call `f` on every event it completes (on the held tail too at end of
    /// stream).
    pub fn feed_with(&mut self, chunk: &[u8], end_of_stream: bool, mut f: impl FnMut(&[u8])) {
        self.partial.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(i) = memchr::memmem::find(&self.partial[start..], b"\n\n") {
            let end = start + i + 2;
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

/// `body` with `"stream_options":{"include_usage":true}` added as the first member of the
/// top-level object; `None` if the body does not start with an object.
pub fn inject_include_usage(body: &[u8]) -> Option<Vec<u8>> {
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

    #[test]
    fn splitter_yields_whole_events_at_any_split() {
        let stream = b"data: a\n\ndata: b\n\ntail";
        for split in 0..=stream.len() {
            let mut s = EventSplitter::default();
            let mut evs = Vec::new();
            s.feed_with(&stream[..split], false, |e| evs.push(e.to_vec()));
            s.feed_with(&stream[split..], true, |e| evs.push(e.to_vec()));
            assert_eq!(
                evs,
                vec![b"data: a\n\n".to_vec(), b"data: b\n\n".to_vec(), b"tail".to_vec()],
                "split {split}"
            );
        }
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
