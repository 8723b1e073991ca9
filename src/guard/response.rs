//! Masking of model output by response guards: every match is replaced by `[RULE]` (response
//! matches are always masked, never restored).
//!
//! Works on whole units: a complete JSON body, or a complete SSE event (the text of
//! `choices[].message.content`, `choices[].delta.content` and `choices[].text`). A value the model
//! splits across two SSE events is not seen whole, so it is not masked: a windowed scan across
//! events is future work.

use serde_json::Value;

use super::patterns::PatternSet;

fn mask_text(sets: &[&PatternSet], text: &mut String) -> bool {
    let mut changed = false;
    for set in sets {
        let hits = set.hits(text);
        if hits.is_empty() {
            continue;
        }
        let mut out = String::with_capacity(text.len());
        let mut pos = 0;
        for h in hits {
            out.push_str(&text[pos..h.start]);
            out.push('[');
            out.push_str(set.rule_name(h.rule));
            out.push(']');
            pos = h.end;
        }
        out.push_str(&text[pos..]);
        *text = out;
        changed = true;
    }
    changed
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

/// Mask the `data:` lines of one complete SSE event; `None` when nothing changed.
pub fn mask_sse_event(sets: &[&PatternSet], event: &[u8]) -> Option<Vec<u8>> {
    let mut changed = false;
    let mut out = Vec::with_capacity(event.len());
    for line in event.split_inclusive(|b| *b == b'\n') {
        let (content, newline) = match line.strip_suffix(b"\n") {
            Some(c) => (c, true),
            None => (line, false),
        };
        let masked = content.strip_prefix(b"data:").and_then(|d| {
            let d = d.strip_prefix(b" ").unwrap_or(d);
            let mut v: Value = serde_json::from_slice(d).ok()?;
            mask_output(sets, &mut v)
                .then(|| serde_json::to_vec(&v).ok())
                .flatten()
        });
        match masked {
            Some(m) => {
                changed = true;
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&m);
            }
            None => out.extend_from_slice(content),
        }
        if newline {
            out.push(b'\n');
        }
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::patterns::Builtin;

    #[test]
    fn json_and_sse_outputs_are_masked() {
        let set = PatternSet::new(&[Builtin::CreditCard], &[]).unwrap();
        let sets = [&set];
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"card 4111 1111 1111 1111"}}],"model":"m"}"#;
        let out = String::from_utf8(mask_json_body(&sets, body).unwrap()).unwrap();
        assert!(out.contains(r#""content":"card [CREDIT_CARD]""#), "{out}");
        assert_eq!(mask_json_body(&sets, br#"{"choices":[{"text":"clean"}]}"#), None);
        let ev = b"data: {\"choices\":[{\"delta\":{\"content\":\"4111111111111111\"}}]}\n\n";
        let out = mask_sse_event(&sets, ev).unwrap();
        assert_eq!(
            out,
            b"data: {\"choices\":[{\"delta\":{\"content\":\"[CREDIT_CARD]\"}}]}\n\n".to_vec()
        );
        assert_eq!(mask_sse_event(&sets, b"data: [DONE]\n\n"), None);
    }
}
