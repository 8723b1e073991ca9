//! Masking with per-request placeholders, and the walk over the strings of a prompt.
//!
//! Only message text is scanned and masked: `messages[].content` strings and `text` parts,
//! `prompt` strings, `input` strings and item contents, never JSON keys, roles or escapes (the
//! values are decoded first, so `\u0040` cannot hide an `@`). The same value gets the same
//! placeholder within a request; placeholders are restored on the response path.

use std::collections::HashMap;

use serde_json::Value;

use super::patterns::PatternSet;
use crate::parser::ApiKind;

/// The placeholders of one request: `[RULE_n]` → original value.
///
/// A placeholder is never one the request already contains as text ([`Self::reserve_literals`]):
/// the restore replaces every occurrence in the answer, so a client's own `[SSN_1]` echoed back
/// would otherwise turn into the masked number (found by the `mask_restore` fuzz target).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Placeholders {
    entries: Vec<(String, String)>,
    counts: HashMap<String, usize>,
    /// Placeholder-shaped text (`[NAME_n]`) present in the request, never handed out.
    taken: std::collections::HashSet<String>,
}

/// The longest bracketed text considered placeholder-shaped (a rule name and a number).
const MAX_PLACEHOLDER_BYTES: usize = 128;

impl Placeholders {
    /// Masked values so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was masked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Record the placeholder-shaped pieces of `text` (`[` + name + `_` + digits + `]`), a
    /// string of the request, so that no masked value is given one of them. Call it on every
    /// prompt string before masking any.
    pub fn reserve_literals(&mut self, text: &str) {
        let bytes = text.as_bytes();
        for open in memchr::memchr_iter(b'[', bytes) {
            let rest = &bytes[open + 1..bytes.len().min(open + MAX_PLACEHOLDER_BYTES)];
            let Some(close) = rest.iter().position(|b| matches!(b, b']' | b'[')) else {
                continue;
            };
            let inner = &rest[..close];
            if rest[close] != b']' {
                continue;
            }
            let digits = inner.iter().rev().take_while(|b| b.is_ascii_digit()).count();
            if digits > 0 && inner.len() > digits + 1 && inner[inner.len() - digits - 1] == b'_' {
                // `[` and `]` are ASCII, so the slice is on character boundaries.
                self.taken.insert(text[open..open + close + 2].to_owned());
            }
        }
    }

    fn placeholder_for(&mut self, rule: &str, original: &str) -> String {
        if let Some((p, _)) = self.entries.iter().find(|(_, o)| o == original) {
            return p.clone();
        }
        let n = self.counts.entry(rule.to_owned()).or_insert(0);
        let p = loop {
            *n += 1;
            let p = format!("[{rule}_{n}]");
            if !self.taken.contains(&p) {
                break p;
            }
        };
        self.entries.push((p.clone(), original.to_owned()));
        p
    }

    /// `text` with every hit of `set` replaced by its placeholder; `None` if nothing matched.
    pub fn mask(&mut self, set: &PatternSet, text: &str) -> Option<String> {
        let hits = set.hits(text);
        if hits.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(text.len());
        let mut pos = 0;
        for h in hits {
            out.push_str(&text[pos..h.start]);
            let p = self.placeholder_for(set.rule_name(h.rule), &text[h.start..h.end]);
            out.push_str(&p);
            pos = h.end;
        }
        out.push_str(&text[pos..]);
        Some(out)
    }

    /// Byte patterns restoring the originals inside JSON strings (originals JSON-escaped).
    pub fn restore_patterns(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.entries
            .iter()
            .map(|(p, o)| {
                let quoted = Value::String(o.clone()).to_string();
                let escaped = quoted.as_bytes()[1..quoted.len() - 1].to_vec();
                (p.as_bytes().to_vec(), escaped)
            })
            .collect()
    }
}

fn visit_content(v: &mut Value, f: &mut dyn FnMut(&mut String)) {
    match v {
        Value::String(s) => f(s),
        Value::Array(parts) => {
            for part in parts {
                match part {
                    Value::String(s) => f(s),
                    Value::Object(o) => {
                        for key in ["text", "content"] {
                            if let Some(inner) = o.get_mut(key) {
                                visit_content(inner, f);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Call `f` on every text string of the prompt field `prompt` of an `api` request.
pub fn visit_prompt_strings(api: ApiKind, prompt: &mut Value, f: &mut dyn FnMut(&mut String)) {
    match api {
        ApiKind::ChatCompletions | ApiKind::Conversations => {
            if let Value::Array(messages) = prompt {
                for m in messages {
                    if let Some(content) = m.get_mut("content") {
                        visit_content(content, f);
                    }
                }
            }
        }
        ApiKind::Completions | ApiKind::Responses | ApiKind::Embeddings => visit_content(prompt, f),
        // Nothing was read; the registry refuses guards next to the passthrough parser.
        ApiKind::Passthrough => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::patterns::Builtin;

    #[test]
    fn same_value_same_placeholder_and_json_safe_restore() {
        let set = PatternSet::new(&[Builtin::Email], &[]).unwrap();
        let mut p = Placeholders::default();
        let masked = p.mask(&set, "mail a@b.io or a@b.io, then c@d.io").unwrap();
        assert_eq!(masked, "mail [EMAIL_1] or [EMAIL_1], then [EMAIL_2]");
        assert_eq!(p.len(), 2);
        let pats = p.restore_patterns();
        assert_eq!(pats[0], (b"[EMAIL_1]".to_vec(), b"a@b.io".to_vec()));
        let mut q = Placeholders::default();
        let set = PatternSet::new(&[], &[("Q".into(), "x\"y".into())]).unwrap();
        q.mask(&set, "x\"y").unwrap();
        assert_eq!(
            q.restore_patterns()[0].1,
            b"x\\\"y".to_vec(),
            "quotes escaped for JSON"
        );
    }

    #[test]
    fn a_placeholder_the_request_already_holds_is_never_handed_out() {
        let set = PatternSet::new(&[Builtin::Ssn], &[]).unwrap();
        let text = "my [SSN_1] note, [SSN_x] and [ SSN_2] are not ones; ssn 123-44-6789 [SSN_3]";
        let mut p = Placeholders::default();
        p.reserve_literals(text);
        let masked = p.mask(&set, text).unwrap();
        assert_eq!(
            masked,
            "my [SSN_1] note, [SSN_x] and [ SSN_2] are not ones; ssn [SSN_2] [SSN_3]"
        );
        assert_eq!(
            p.restore_patterns(),
            vec![(b"[SSN_2]".to_vec(), b"123-44-6789".to_vec())]
        );
    }

    #[test]
    fn only_message_text_is_visited() {
        let mut chat = serde_json::json!([
            {"role": "system", "content": "sys a@b.io"},
            {"role": "user", "name": "a@b.io", "content": [{"type": "text", "text": "part c@d.io"}, {"type": "image_url", "image_url": {"url": "x"}}]}
        ]);
        let mut seen = Vec::new();
        visit_prompt_strings(ApiKind::ChatCompletions, &mut chat, &mut |s| seen.push(s.clone()));
        assert_eq!(seen, vec!["sys a@b.io", "part c@d.io"]);
    }
}
