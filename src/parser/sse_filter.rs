//! Token-budget settlement for streaming clients that did not ask for usage: [`usage_edit`](super::usage_edit)
//! sets `stream_options.include_usage` in the request body, and [`UsageEventFilter`] drops the
//! usage-only event (`"choices": []` with a `usage` object) that this adds to the stream. Works
//! on whole events ([`EventSplitter`], blank lines after `\n` or `\r\n` endings): an event split
//! across chunks is held until its blank line, everything else passes as it arrives.

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
}
