//! Masking of model output by response guards: every match is replaced by `[RULE]` (response
//! matches are always masked, never restored).
//!
//! A complete JSON body is masked whole (the text of `choices[].message.content` and
//! `choices[].text`). A stream is masked by [`StreamMask`]: a model streams a few characters per
//! SSE event, so an email or a card number spans many events. Each choice's streamed text
//! (`delta.content` or `text`) is therefore held back by [`STREAM_HOLD_BYTES`] and released
//! masked; text is only released once no match can reach into it from what follows, and the rest
//! goes out with the choice's last event (`finish_reason` set), before `data: [DONE]`, or at the
//! end of the stream. Events keep their order and count; only their text shifts later. A whole
//! `message` in a stream event is masked as it is.

use serde_json::{Map, Value};

use super::patterns::{Hit, PatternSet};

/// Bytes of a choice's streamed text held back until the text after them is known. Longer than
/// any builtin value (a card number with separators is 23 bytes, an SSN 11, an email address
/// rarely over 64); a custom pattern that matches more than this at once is caught only where
/// the match already reaches past the held bytes when they would be released.
pub const STREAM_HOLD_BYTES: usize = 128;

/// Held text past this size is released up to the hold window even where a match still grows
/// (that match goes out masked as far as it has come), so that a pattern that keeps matching
/// cannot make the EPP hold a whole answer.
const MAX_HELD_BYTES: usize = 64 * 1024;

/// Replace every match of `sets` in `text` by `[RULE]`; whether anything matched.
fn mask_text(sets: &[&PatternSet], text: &mut String) -> bool {
    let hits = merged_hits(sets, text);
    if hits.is_empty() {
        return false;
    }
    *text = masked_prefix(text, text.len(), &hits);
    true
}

/// Mask the output text fields of one response object (a JSON body or an SSE event's data).
/// Returns whether anything changed.
pub fn mask_output(sets: &[&PatternSet], v: &mut Value) -> bool {
    let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) else {
        return false;
    };
    let mut changed = false;
    for c in choices {
        for pointer in ["/message/content", "/delta/content", "/text"] {
            if let Some(Value::String(s)) = c.pointer_mut(pointer) {
                changed |= mask_text(sets, s);
            }
        }
    }
    changed
}

/// Mask a complete JSON body; `None` when nothing changed (or it is not JSON).
pub fn mask_json_body(sets: &[&PatternSet], body: &[u8]) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    mask_output(sets, &mut v)
        .then(|| serde_json::to_vec(&v).ok())
        .flatten()
}

/// Every set's hits in `text`, merged: in order, non-overlapping (earlier start wins; at equal
/// start the longer match), each with its rule's name.
fn merged_hits<'s>(sets: &[&'s PatternSet], text: &str) -> Vec<(Hit, &'s str)> {
    let mut all: Vec<(Hit, &str)> = sets
        .iter()
        .flat_map(|set| {
            set.hits(text).into_iter().map(|h| {
                let name = set.rule_name(h.rule);
                (h, name)
            })
        })
        .collect();
    all.sort_by(|(a, _), (b, _)| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
    let mut out: Vec<(Hit, &str)> = Vec::with_capacity(all.len());
    for (h, name) in all {
        if out.last().is_none_or(|(last, _)| h.start >= last.end) {
            out.push((h, name));
        }
    }
    out
}

/// `text[..cut]` with each hit that ends by `cut` replaced by `[RULE]`.
fn masked_prefix(text: &str, cut: usize, hits: &[(Hit, &str)]) -> String {
    let mut out = String::with_capacity(cut);
    let mut pos = 0;
    for (h, name) in hits.iter().take_while(|(h, _)| h.end <= cut) {
        out.push_str(&text[pos..h.start]);
        out.push('[');
        out.push_str(name);
        out.push(']');
        pos = h.end;
    }
    out.push_str(&text[pos..cut]);
    out
}

/// Where held `text` can be cut: [`STREAM_HOLD_BYTES`] from its end, moved back to the start of
/// any match that reaches past it (the next text could still extend that match). Past
/// [`MAX_HELD_BYTES`] the cut moves forward to the end of that match instead: it goes out whole
/// and masked, and whatever follows it is matched afresh.
fn release_point(text: &str, hits: &[(Hit, &str)]) -> usize {
    let mut cut = text.len().saturating_sub(STREAM_HOLD_BYTES);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    // Hits are in order and disjoint: at most one straddles the cut, and moving the cut to its
    // start (or end) leaves every other hit whole on one side.
    if let Some((h, _)) = hits.iter().find(|(h, _)| h.start < cut && h.end > cut) {
        cut = if text.len() > MAX_HELD_BYTES {
            h.end
        } else {
            h.start
        };
    }
    cut
}

/// Where a choice's streamed text lives in its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextField {
    /// Chat completions: `delta.content`.
    Delta,
    /// Completions: `text`.
    Text,
}

/// One choice's text not yet released.
#[derive(Debug)]
struct HeldChoice {
    index: u64,
    field: TextField,
    text: String,
}

/// Masks an SSE stream of completions or chat-completion chunks across events (see the module
/// docs). Feed it whole events in order, then call [`finish`](Self::finish) at the end of the
/// stream. Lines other than JSON `data:` lines pass through untouched.
#[derive(Debug, Default)]
pub struct StreamMask {
    held: Vec<HeldChoice>,
    /// The first chunk's top-level members but `choices` and `usage` (id, object, created,
    /// model: the same in every chunk of a stream), for the event that carries text still held
    /// at the end.
    template: Map<String, Value>,
}

impl StreamMask {
    /// One complete SSE event in; what the client may see now out.
    pub fn event(&mut self, sets: &[&PatternSet], event: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(event.len() + 64);
        for line in event.split_inclusive(|b| *b == b'\n') {
            let (content, newline) = match line.strip_suffix(b"\n") {
                Some(c) => (c, true),
                None => (line, false),
            };
            let data = content
                .strip_prefix(b"data:")
                .map(|d| d.strip_prefix(b" ").unwrap_or(d));
            match data {
                Some(d) if d.trim_ascii() == b"[DONE]" => {
                    out.extend_from_slice(&self.finish(sets));
                    out.extend_from_slice(content);
                }
                Some(d) => {
                    let held = serde_json::from_slice::<Value>(d)
                        .ok()
                        .and_then(|mut chunk| self.hold(sets, &mut chunk).then_some(chunk))
                        .and_then(|chunk| serde_json::to_vec(&chunk).ok());
                    match held {
                        Some(json) => {
                            out.extend_from_slice(b"data: ");
                            out.extend_from_slice(&json);
                        }
                        None => out.extend_from_slice(content),
                    }
                }
                None => out.extend_from_slice(content),
            }
            if newline {
                out.push(b'\n');
            }
        }
        out
    }

    /// The text still held, masked, as one closing event (empty when nothing is held).
    pub fn finish(&mut self, sets: &[&PatternSet]) -> Vec<u8> {
        let choices: Vec<Value> = std::mem::take(&mut self.held)
            .into_iter()
            .filter(|c| !c.text.is_empty())
            .map(|mut c| {
                mask_text(sets, &mut c.text);
                let text = c.text;
                match c.field {
                    TextField::Delta => serde_json::json!({"index": c.index, "delta": {"content": text}}),
                    TextField::Text => serde_json::json!({"index": c.index, "text": text}),
                }
            })
            .collect();
        if choices.is_empty() {
            return Vec::new();
        }
        let mut chunk = self.template.clone();
        chunk.insert("choices".into(), Value::Array(choices));
        let mut out = b"data: ".to_vec();
        out.extend_from_slice(&serde_json::to_vec(&Value::Object(chunk)).unwrap_or_default());
        out.extend_from_slice(b"\n\n");
        out
    }

    /// Take the chunk's choice texts into the held text and put back what may be released.
    /// Returns whether the chunk changed.
    fn hold(&mut self, sets: &[&PatternSet], chunk: &mut Value) -> bool {
        let Some(object) = chunk
            .as_object()
            .filter(|o| o.get("choices").is_some_and(Value::is_array))
        else {
            return false;
        };
        if self.template.is_empty() {
            self.template = object
                .iter()
                .filter(|(k, _)| *k != "choices" && *k != "usage")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        let Some(choices) = chunk.get_mut("choices").and_then(Value::as_array_mut) else {
            return false;
        };
        let mut changed = false;
        for (position, choice) in choices.iter_mut().enumerate() {
            let index = choice
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(position as u64);
            // A whole message in one event (some servers stream those) is masked as it is.
            if let Some(Value::String(content)) = choice.pointer_mut("/message/content") {
                changed |= mask_text(sets, content);
            }
            let field = if choice.get("delta").is_some_and(Value::is_object) {
                TextField::Delta
            } else if choice.get("text").is_some() {
                TextField::Text
            } else {
                continue;
            };
            let slot = match field {
                TextField::Delta => choice.pointer_mut("/delta/content"),
                TextField::Text => choice.get_mut("text"),
            };
            let incoming = match slot {
                Some(Value::String(s)) => Some(std::mem::take(s)),
                _ => None,
            };
            let finished = choice.get("finish_reason").is_some_and(|f| !f.is_null());
            if incoming.is_none() && !finished {
                continue;
            }
            let pos = match self.held.iter().position(|c| c.index == index) {
                Some(pos) => pos,
                None => {
                    self.held.push(HeldChoice {
                        index,
                        field,
                        text: String::new(),
                    });
                    self.held.len() - 1
                }
            };
            let held = &mut self.held[pos];
            let had_text = incoming.is_some();
            if let Some(s) = incoming {
                held.text.push_str(&s);
            }
            let hits = merged_hits(sets, &held.text);
            let cut = if finished {
                held.text.len()
            } else {
                release_point(&held.text, &hits)
            };
            let released = masked_prefix(&held.text, cut, &hits);
            held.text.drain(..cut);
            if finished {
                self.held.remove(pos);
            }
            if !had_text && released.is_empty() {
                continue;
            }
            match field {
                TextField::Delta => {
                    if let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) {
                        delta.insert("content".into(), Value::String(released));
                    }
                }
                TextField::Text => {
                    if let Some(c) = choice.as_object_mut() {
                        c.insert("text".into(), Value::String(released));
                    }
                }
            }
            changed = true;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::guard::patterns::Builtin;

    #[test]
    fn json_outputs_are_masked_whole() {
        let set = PatternSet::new(&[Builtin::CreditCard], &[]).unwrap();
        let sets = [&set];
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"card 4111 1111 1111 1111"}}],"model":"m"}"#;
        let out = String::from_utf8(mask_json_body(&sets, body).unwrap()).unwrap();
        assert!(out.contains(r#""content":"card [CREDIT_CARD]""#), "{out}");
        assert_eq!(mask_json_body(&sets, br#"{"choices":[{"text":"clean"}]}"#), None);
    }

    /// A chat stream as vLLM sends it: a role chunk, one chunk per piece of text, a finish
    /// chunk with an empty delta, a usage-only chunk, then `[DONE]`.
    fn chat_stream(pieces: &[&str]) -> Vec<Vec<u8>> {
        let mut events = vec![
            br#"data: {"id":"c1","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#.to_vec(),
        ];
        for p in pieces {
            let chunk = json!({"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": null}]});
            events.push(format!("data: {chunk}").into_bytes());
        }
        events.push(
            br#"data: {"id":"c1","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#
                .to_vec(),
        );
        events.push(br#"data: {"id":"c1","model":"m","choices":[],"usage":{"total_tokens":9}}"#.to_vec());
        events.push(b"data: [DONE]".to_vec());
        events
            .into_iter()
            .map(|mut e| {
                e.extend_from_slice(b"\n\n");
                e
            })
            .collect()
    }

    /// The events the client sees, and the text they carry, in order.
    fn run(sets: &[&PatternSet], events: &[Vec<u8>]) -> (Vec<Vec<u8>>, String) {
        let mut mask = StreamMask::default();
        let mut seen: Vec<Vec<u8>> = events.iter().map(|e| mask.event(sets, e)).collect();
        seen.push(mask.finish(sets));
        let mut text = String::new();
        for event in seen.iter().flat_map(|e| e.split(|b| *b == b'\n')) {
            let Some(data) = event.strip_prefix(b"data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<Value>(data) else {
                continue;
            };
            for c in v["choices"].as_array().into_iter().flatten() {
                for field in ["/delta/content", "/text"] {
                    if let Some(t) = c.pointer(field).and_then(Value::as_str) {
                        text.push_str(t);
                    }
                }
            }
        }
        (seen, text)
    }

    #[test]
    fn a_value_streamed_one_character_per_event_is_masked() {
        let set = PatternSet::new(&[Builtin::CreditCard, Builtin::Email], &[]).unwrap();
        let sets = [&set];
        let answer = "Your card 4111 1111 1111 1111 is on file; write to jane.doe@example.com for help.";
        let pieces: Vec<String> = answer.chars().map(String::from).collect();
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let events = chat_stream(&pieces);
        let (seen, text) = run(&sets, &events);
        assert_eq!(
            text,
            "Your card [CREDIT_CARD] is on file; write to [EMAIL] for help."
        );
        // Every event still goes out, in order, and nothing is added after [DONE].
        assert_eq!(seen.len(), events.len() + 1);
        assert!(seen.last().unwrap().is_empty());
        assert_eq!(seen[seen.len() - 2], b"data: [DONE]\n\n".to_vec());
        for e in &seen {
            let e = String::from_utf8_lossy(e);
            assert!(!e.contains("1111") && !e.contains("example"), "leaked in {e}");
        }
        // The finish chunk carries what was still held, masked.
        let finish: Value =
            serde_json::from_slice(seen[seen.len() - 4].strip_prefix(b"data: ").unwrap()).unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        assert!(
            finish["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .ends_with("[EMAIL] for help.")
        );
    }

    #[test]
    fn crlf_streams_are_masked_too() {
        let set = PatternSet::new(&[Builtin::CreditCard], &[]).unwrap();
        let sets = [&set];
        let events: Vec<Vec<u8>> = chat_stream(&["card 4111 1111", " 1111 1111 ok"])
            .into_iter()
            .map(|e| String::from_utf8(e).unwrap().replace('\n', "\r\n").into_bytes())
            .collect();
        let mut splitter = crate::parser::EventSplitter::default();
        let mut split = Vec::new();
        splitter.feed_with(&events.concat(), true, |e| split.push(e.to_vec()));
        assert_eq!(split, events, "one event per blank line");
        let (seen, text) = run(&sets, &split);
        assert_eq!(text, "card [CREDIT_CARD] ok");
        assert!(seen.iter().all(|e| !String::from_utf8_lossy(e).contains("4111")));
    }

    #[test]
    fn any_split_of_the_text_gives_the_same_masked_text() {
        let set = PatternSet::new(&[Builtin::Ssn, Builtin::PhoneNumber], &[]).unwrap();
        let sets = [&set];
        // Longer than the held window, so that text is released mid-stream and the values
        // straddle the release point for some splits.
        let filler = "lorem ipsum dolor sit amet ".repeat(6);
        let answer = format!("{filler}SSN 123-45-6789, call (555) 234-5678. {filler}");
        let want = format!("{filler}SSN [SSN], call [PHONE_NUMBER]. {filler}");
        for a in 0..=answer.len() {
            for b in (a..=answer.len()).step_by(7) {
                let events = chat_stream(&[&answer[..a], &answer[a..b], &answer[b..]]);
                assert_eq!(run(&sets, &events).1, want, "split at {a}, {b}");
            }
        }
    }

    /// Feed one chat chunk carrying `piece`; the text its masked event releases.
    fn released_by(mask: &mut StreamMask, sets: &[&PatternSet], piece: &str) -> String {
        let ev = format!(
            "data: {}\n\n",
            json!({"choices": [{"index": 0, "delta": {"content": piece}}]})
        );
        let out = mask.event(sets, ev.as_bytes());
        let v: Value = serde_json::from_slice(out.strip_prefix(b"data: ").unwrap().trim_ascii_end()).unwrap();
        v["choices"][0]["delta"]["content"].as_str().unwrap().to_owned()
    }

    #[test]
    fn clean_text_is_held_back_by_a_bounded_window_only() {
        let set = PatternSet::new(&[Builtin::Email], &[]).unwrap();
        let sets = [&set];
        let mut mask = StreamMask::default();
        let word = "abcdefghij".repeat(10);
        let mut released = 0;
        for i in 0..10 {
            released += released_by(&mut mask, &sets, &word).len();
            assert_eq!(
                released,
                ((i + 1) * 100usize).saturating_sub(STREAM_HOLD_BYTES),
                "after event {i}"
            );
        }
    }

    #[test]
    fn a_stream_cut_short_releases_the_held_text_in_a_closing_event() {
        let set = PatternSet::new(&[Builtin::Email], &[]).unwrap();
        let sets = [&set];
        let mut mask = StreamMask::default();
        // Completions stream (`text`), no finish chunk, no [DONE].
        let ev = br#"data: {"id":"x","object":"text_completion","model":"m","choices":[{"index":0,"text":"mail bob@example.org","finish_reason":null}]}

"#;
        let first = mask.event(&sets, ev);
        assert_eq!(
            first,
            br#"data: {"choices":[{"finish_reason":null,"index":0,"text":""}],"id":"x","model":"m","object":"text_completion"}

"#
            .to_vec()
        );
        assert_eq!(
            mask.finish(&sets),
            br#"data: {"choices":[{"index":0,"text":"mail [EMAIL]"}],"id":"x","model":"m","object":"text_completion"}

"#
            .to_vec()
        );
        assert!(mask.finish(&sets).is_empty());
    }

    #[test]
    fn choices_are_held_apart_and_other_lines_pass_through() {
        let set = PatternSet::new(&[Builtin::Ssn], &[]).unwrap();
        let sets = [&set];
        let mut mask = StreamMask::default();
        let a = mask.event(&sets, b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"123-45-\"}},{\"index\":1,\"delta\":{\"content\":\"ok \"}}]}\n\n");
        assert_eq!(a, b"data: {\"choices\":[{\"delta\":{\"content\":\"\"},\"index\":0},{\"delta\":{\"content\":\"\"},\"index\":1}]}\n\n".to_vec());
        let b = mask.event(&sets, b": keep-alive\nevent: x\ndata: not json\n\n");
        assert_eq!(b, b": keep-alive\nevent: x\ndata: not json\n\n".to_vec());
        let c = mask.event(&sets, b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"6789\"},\"finish_reason\":\"stop\"}]}\n\n");
        assert_eq!(c, b"data: {\"choices\":[{\"delta\":{\"content\":\"[SSN]\"},\"finish_reason\":\"stop\",\"index\":0}]}\n\n".to_vec());
        assert_eq!(
            mask.event(&sets, b"data: [DONE]\n\n"),
            b"data: {\"choices\":[{\"delta\":{\"content\":\"ok \"},\"index\":1}]}\n\ndata: [DONE]\n\n"
                .to_vec()
        );
    }

    #[test]
    fn past_the_cap_a_value_near_the_end_is_still_held_whole() {
        let set = PatternSet::new(&[Builtin::CreditCard], &[]).unwrap();
        let sets = [&set];
        let clean = "lorem ipsum ".repeat(6000);
        let events = chat_stream(&[&format!("{clean}card 4111 1111 1111"), " 1111 ok"]);
        let (seen, text) = run(&sets, &events);
        assert_eq!(text, format!("{clean}card [CREDIT_CARD] ok"));
        for e in &seen {
            assert!(!String::from_utf8_lossy(e).contains("4111"));
        }
    }

    #[test]
    fn whole_messages_are_masked_and_error_events_are_no_template() {
        let set = PatternSet::new(&[Builtin::CreditCard], &[]).unwrap();
        let sets = [&set];
        let mut mask = StreamMask::default();
        let out = mask.event(
            &sets,
            b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"message\":{\"content\":\"card 4111 1111 1111 1111\"}}]}\n\n",
        );
        assert_eq!(
            out,
            b"data: {\"choices\":[{\"index\":0,\"message\":{\"content\":\"card [CREDIT_CARD]\"}}],\"id\":\"c1\"}\n\n".to_vec()
        );
        mask.event(
            &sets,
            b"data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"held\"}}]}\n\n",
        );
        let error = b"data: {\"object\":\"error\",\"message\":\"overloaded\"}\n\n";
        assert_eq!(mask.event(&sets, error), error.to_vec());
        assert_eq!(
            mask.finish(&sets),
            b"data: {\"choices\":[{\"delta\":{\"content\":\"held\"},\"index\":0}],\"id\":\"c1\"}\n\n"
                .to_vec()
        );
    }

    #[test]
    fn a_pattern_that_keeps_matching_cannot_hold_more_than_the_cap() {
        let set = PatternSet::new(&[], &[("ANY".into(), "[a-z]+".into())]).unwrap();
        let sets = [&set];
        let mut mask = StreamMask::default();
        let piece = "a".repeat(16 * 1024);
        let mut released = Vec::new();
        for _ in 0..5 {
            released.push(released_by(&mut mask, &sets, &piece));
        }
        // Held until past 64 KiB, then released whole (masked).
        assert_eq!(released, vec!["", "", "", "", "[ANY]"]);
    }
}
