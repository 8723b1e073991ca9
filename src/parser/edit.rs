//! Body edits: span replacements in a request body, decided against the spans the parser found
//! and applied together in one pass.
//!
//! Every edit names a byte range of the body it was computed from (an empty range inserts), so
//! edits never have to be ordered by hand: [`apply_edits`] sorts them and copies the untouched
//! bytes between them once. Invariant: the edits of one body do not overlap (each touches a
//! different member of the top-level object).

use std::ops::Range;

/// Replace `span` of the body with `replacement`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyEdit {
    /// Bytes replaced (empty: insert at `span.start`).
    pub span: Range<usize>,
    /// What goes there.
    pub replacement: Vec<u8>,
}

/// The edit that sets the `model` value at `model_span` to `new_model` (JSON-encoded).
pub fn model_edit(model_span: Range<usize>, new_model: &str) -> BodyEdit {
    BodyEdit {
        span: model_span,
        replacement: serde_json::Value::String(new_model.to_owned())
            .to_string()
            .into_bytes(),
    }
}

/// The edit that makes `body` ask for a final usage event: `include_usage: true` set in its
/// `stream_options` (whose raw JSON is at `stream_options`, other members kept), or
/// `"stream_options":{"include_usage":true}` added as the first member when the body has none.
/// `None` when `stream_options` (other than `null`) or the body is not an object.
pub fn usage_edit(body: &[u8], stream_options: Option<Range<usize>>) -> Option<BodyEdit> {
    let Some(span) = stream_options else {
        let open = body
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .filter(|i| body[*i] == b'{')?;
        let empty = body[open + 1..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let member: &[u8] = if empty {
            br#""stream_options":{"include_usage":true}"#
        } else {
            br#""stream_options":{"include_usage":true},"#
        };
        return Some(BodyEdit {
            span: open + 1..open + 1,
            replacement: member.to_vec(),
        });
    };
    let raw = body.get(span.clone())?;
    // `null` means no options: it becomes an object of its own.
    let options = serde_json::from_slice::<Option<serde_json::Map<String, serde_json::Value>>>(raw).ok()?;
    let mut options = options.unwrap_or_default();
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    Some(BodyEdit {
        span,
        replacement: serde_json::to_vec(&options).ok()?,
    })
}

/// `body` with every edit applied, in one pass. Edits whose span lies outside `body` are
/// clamped to it.
pub fn apply_edits(body: &[u8], edits: &mut [BodyEdit]) -> Vec<u8> {
    edits.sort_by_key(|e| (e.span.start, e.span.end));
    let added: usize = edits.iter().map(|e| e.replacement.len()).sum();
    let mut out = Vec::with_capacity(body.len() + added);
    let mut at = 0;
    for e in edits.iter() {
        let start = e.span.start.clamp(at, body.len());
        let end = e.span.end.clamp(start, body.len());
        out.extend_from_slice(&body[at..start]);
        out.extend_from_slice(&e.replacement);
        at = end;
    }
    out.extend_from_slice(&body[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse_request;

    #[test]
    fn edits_apply_in_one_pass_whatever_their_order() {
        let body = br#"{"model":"a","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"continuous_usage_stats":false}}"#;
        let r = parse_request("/v1/chat/completions", body).unwrap();
        let usage = usage_edit(body, r.stream_options_span.clone()).unwrap();
        let model = model_edit(r.model_span.clone(), "bb");
        let expected = br#"{"model":"bb","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"continuous_usage_stats":false,"include_usage":true}}"#;
        for mut edits in [vec![usage.clone(), model.clone()], vec![model, usage]] {
            assert_eq!(apply_edits(body, &mut edits), expected.to_vec());
        }
    }

    /// The body after the usage edit, or `None` when there is none.
    fn ask(body: &[u8], stream_options: Option<Range<usize>>) -> Option<Vec<u8>> {
        let edit = usage_edit(body, stream_options)?;
        Some(apply_edits(body, &mut [edit]))
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
            let req = parse_request("/v1/completions", sent.as_bytes()).unwrap();
            let asked = ask(sent.as_bytes(), req.stream_options_span);
            assert_eq!(
                asked.map(|b| String::from_utf8(b).unwrap()).as_deref(),
                want,
                "{sent}"
            );
        }
        assert_eq!(
            ask(br#"{"model":"m"}"#, None).unwrap(),
            br#"{"stream_options":{"include_usage":true},"model":"m"}"#.to_vec()
        );
    }

    #[test]
    fn injection_keeps_the_rest_of_the_body() {
        assert_eq!(
            ask(br#" {"model":"m","stream":true}"#, None).unwrap(),
            br#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#.to_vec()
        );
        assert_eq!(
            ask(b"{ }", None).unwrap(),
            br#"{"stream_options":{"include_usage":true} }"#.to_vec()
        );
        assert!(ask(b"[1]", None).is_none());
    }
}
