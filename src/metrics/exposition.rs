//! A tolerant parser for the Prometheus text exposition format.
//!
//! Written here because the common crate drops every sample whose name contains `:` (all of
//! vLLM's and SGLang's). Pure, zero-copy for names and unescaped label values, and line-oriented:
//! a bad line is counted and skipped, never fatal, so one odd series cannot blind the EPP to a pod.

use std::borrow::Cow;

use smallvec::SmallVec;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// Metric name (with any `_total`/`_bucket` suffix as written).
    pub name: &'a str,
    /// Label pairs in the order written.
    pub labels: SmallVec<[(&'a str, Cow<'a, str>); 6]>,
    /// The value (`NaN`, `+Inf` and `-Inf` included).
    pub value: f64,
}

impl Sample<'_> {
    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_ref())
    }
}

/// Call `f` for every well-formed sample in `text`; returns the number of malformed lines.
pub fn for_each_sample<'a>(text: &'a str, f: impl FnMut(Sample<'a>)) -> usize {
    for_each_sample_named(text, |_| true, f)
}

/// Like [`for_each_sample`], but lines whose metric name `wanted` rejects are skipped after
/// reading the name only: their labels and values are never parsed. A `/metrics` page is mostly
/// histogram buckets the EPP does not read, so this is where the time goes.
pub fn for_each_sample_named<'a>(
    text: &'a str,
    mut wanted: impl FnMut(&str) -> bool,
    mut f: impl FnMut(Sample<'a>),
) -> usize {
    let mut bad = 0;
    let bytes = text.as_bytes();
    let mut start = 0;
    while start < bytes.len() {
        let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |i| start + i);
        let line = text[start..end].trim_ascii();
        start = end + 1;
        if line.is_empty() || line.as_bytes()[0] == b'#' {
            continue;
        }
        let name_end = memchr::memchr3(b'{', b' ', b'\t', line.as_bytes()).unwrap_or(line.len());
        if !wanted(&line[..name_end]) {
            continue;
        }
        match parse_line(line, name_end) {
            Some(s) => f(s),
            None => bad += 1,
        }
    }
    bad
}

fn parse_line(line: &str, name_end: usize) -> Option<Sample<'_>> {
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
    {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = SmallVec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after_brace)?;
        labels = parsed;
        rest = remaining;
    }
    let value_text = rest.split_ascii_whitespace().next()?;
    Some(Sample {
        name,
        labels,
        value: parse_value(value_text)?,
    })
}

type Labels<'a> = SmallVec<[(&'a str, Cow<'a, str>); 6]>;

fn parse_labels(mut s: &str) -> Option<(Labels<'_>, &str)> {
    let mut labels = SmallVec::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let (value, rest) = parse_quoted(s)?;
        labels.push((key, value));
        s = rest.trim_start();
        s = s.strip_prefix(',').unwrap_or(s);
    }
}

/// Parse a label value up to its closing quote, unescaping `\\`, `\"` and `\n`.
fn parse_quoted(s: &str) -> Option<(Cow<'_, str>, &str)> {
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut owned: Option<String> = None;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let value = match owned {
                    Some(o) => Cow::Owned(o),
                    None => Cow::Borrowed(&s[..i]),
                };
                return Some((value, &s[i + 1..]));
            }
            b'\\' => {
                let buf = owned.get_or_insert_with(|| s[..i].to_owned());
                match bytes.get(i + 1)? {
                    b'n' => buf.push('\n'),
                    b'\\' => buf.push('\\'),
                    b'"' => buf.push('"'),
                    other => {
                        buf.push('\\');
                        buf.push(char::from(*other));
                    }
                }
                i += 2;
            }
            _ => {
                let ch = s[i..].chars().next()?;
                if let Some(buf) = owned.as_mut() {
                    buf.push(ch);
                }
                i += ch.len_utf8();
            }
        }
    }
    None
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_names_labels_and_escapes() {
        let text = "# HELP vllm:num_requests_waiting x\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0\n\
            vllm:cache_config_info{block_size=\"16\",quote=\"a\\\"b\\\\c\"} 1.0 1700000000\n\
            plain 2\n\
            bad{unterminated=\"x} 1\n\
            nan_metric NaN\n";
        let mut got = Vec::new();
        let bad = for_each_sample(text, |s| got.push(s));
        assert_eq!(bad, 1);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].name, "vllm:num_requests_waiting");
        assert_eq!(got[0].label("engine"), Some("0"));
        assert_eq!(got[0].value, 3.0);
        assert_eq!(got[1].label("quote"), Some("a\"b\\c"));
        assert_eq!(got[2].value, 2.0);
        assert!(got[3].value.is_nan());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            for_each_sample(&text, |_| {});
        }

        #[test]
        fn written_samples_parse_back(
            name in "[a-zA-Z_:][a-zA-Z0-9_:]{0,30}",
            labels in proptest::collection::vec(("[a-z_]{1,10}", "[ -~]{0,20}"), 0..5),
            value in proptest::num::f64::NORMAL | proptest::num::f64::ZERO,
        ) {
            let escaped: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            let line = if labels.is_empty() { format!("{name} {value:e}") } else { format!("{name}{{{}}} {value:e} 1700000000000", escaped.join(",")) };
            let mut got = Vec::new();
            let bad = for_each_sample(&line, |s| got.push((s.name.to_owned(), s.labels.iter().map(|(k, v)| ((*k).to_owned(), v.to_string())).collect::<Vec<_>>(), s.value)));
            proptest::prop_assert_eq!(bad, 0, "{}", line);
            proptest::prop_assert_eq!(got.len(), 1);
            proptest::prop_assert_eq!(&got[0].0, &name);
            let want: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            proptest::prop_assert_eq!(&got[0].1, &want);
            proptest::prop_assert_eq!(got[0].2, value);
        }
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            "{",
            "}",
            "a{",
            "a{b",
            "a{b=",
            "a{b=\"",
            "a{b=\"\\",
            "a 1e999999",
            "ä 1",
            "a{=\"x\"} 1",
        ] {
            for_each_sample(text, |_| {});
        }
    }
}
