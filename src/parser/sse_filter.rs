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

/// The most an [`EventSplitter`] holds of one unfinished event. A model's SSE event is one JSON
/// chunk of a few kilobytes; a stream that goes on this long without a blank line is not one the
/// stages that need whole events can read, and holding it would let one response grow the EPP
/// without bound.
pub const MAX_HELD_EVENT_BYTES: usize = 1 << 20;

/// Splits an SSE byte stream into complete events (each ending in a blank line, after `\n` or
/// `\r\n` line endings), holding an unfinished event until the chunk that completes it, up to
/// [`MAX_HELD_EVENT_BYTES`]: past that it is [`overflowed`](Self::overflowed) and its caller
/// decides (pass the rest through, or fail closed). Each byte is searched for a boundary once.
#[derive(Debug, Default)]
pub struct EventSplitter {
    partial: Vec<u8>,
    /// Bytes of `partial` already searched without finding a boundary (less the two a boundary
    /// split across chunks may still start in).
    searched: usize,
    overflowed: bool,
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
    /// stream). Once the unfinished event passes [`MAX_HELD_EVENT_BYTES`] the splitter is
    /// overflowed: it keeps what it held for [`Self::take_held`] and reads nothing more.
    pub fn feed_with(&mut self, chunk: &[u8], end_of_stream: bool, mut f: impl FnMut(&[u8])) {
        if self.overflowed {
            return;
        }
        self.partial.extend_from_slice(chunk);
        let mut start = 0;
        let mut from = self.searched;
        while let Some(len) = event_end(&self.partial[from..]) {
            let end = from + len;
            f(&self.partial[start..end]);
            start = end;
            from = end;
        }
        self.partial.drain(..start);
        // A boundary (`\n\n` or `\n\r\n`) may begin in the last two bytes searched.
        self.searched = self.partial.len().saturating_sub(2);
        if end_of_stream && !self.partial.is_empty() {
            f(&self.partial);
            self.partial.clear();
            self.searched = 0;
        } else if self.partial.len() > MAX_HELD_EVENT_BYTES {
            self.overflowed = true;
        }
    }

    /// Whether an event passed [`MAX_HELD_EVENT_BYTES`] unfinished.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// The bytes held (the unfinished event), emptying the splitter.
    pub fn take_held(&mut self) -> Vec<u8> {
        self.searched = 0;
        std::mem::take(&mut self.partial)
    }
}

/// The filter state of one response stream. A stream whose event outgrows the splitter is
/// passed through unfiltered from there on: the usage-only event is small, so what overflows is
/// not it, and the budget then settles from what the usage tap read (or the reservation).
#[derive(Debug, Default)]
pub struct UsageEventFilter {
    events: EventSplitter,
    passing: bool,
}

impl UsageEventFilter {
    /// Feed the next chunk; returns what the client may see now. With `end_of_stream` the held
    /// tail is released.
    pub fn feed(&mut self, chunk: &[u8], end_of_stream: bool) -> Vec<u8> {
        if self.passing {
            return chunk.to_vec();
        }
        let mut out = Vec::with_capacity(chunk.len());
        self.events.feed_with(chunk, end_of_stream, |event| {
            if !is_usage_only(event) {
                out.extend_from_slice(event);
            }
        });
        if self.events.overflowed() {
            self.passing = true;
            out.extend_from_slice(&self.events.take_held());
        }
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

    /// A stream without event boundaries is held up to the limit, then passed through whole and
    /// in order; the usage-only event is still dropped before the overflow.
    #[test]
    fn an_endless_event_is_passed_through_past_the_limit() {
        let mut f = UsageEventFilter::default();
        let usage = b"data: {\"choices\":[],\"usage\":{\"total_tokens\":3}}\n\n";
        let mut out = f.feed(usage, false);
        assert!(out.is_empty());
        let piece = vec![b'x'; 62_000];
        let mut sent = 0;
        while sent <= MAX_HELD_EVENT_BYTES + 62_000 {
            out.extend(f.feed(&piece, false));
            sent += piece.len();
        }
        assert!(out.len() > MAX_HELD_EVENT_BYTES, "released once past the limit");
        out.extend(f.feed(b"tail", true));
        assert_eq!(out.len(), sent + 4);
        assert!(out.iter().take(sent).all(|b| *b == b'x'));
        assert!(out.ends_with(b"tail"));
    }

    #[test]
    fn crlf_events_are_split_too() {
        assert_splits_into(
            b"data: a\r\n\r\ndata: b\n\ndata: c\r\n\r\ntail",
            &[b"data: a\r\n\r\n", b"data: b\n\n", b"data: c\r\n\r\n", b"tail"],
        );
    }
}
