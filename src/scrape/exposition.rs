//! A tolerant parser for the Prometheus text exposition format.
//!
//! Written here because the common crate drops every sample whose name contains `:` (all of
//! vLLM's and SGLang's). Pure, zero-copy for names and unescaped label values, and line-oriented:
//! a bad line is counted and skipped, never fatal, so one odd series cannot blind the EPP to a pod.
//!
//! Bounded work for hostile pages: a named read parses at most [`MAX_SERIES_PER_NAME`] samples of
//! each wanted name per page (later ones are skipped after their name, as unwanted lines are), so
//! a page of megabytes of one wanted gauge costs a name comparison per line, not a parse; a wanted
//! line longer than [`MAX_SAMPLE_LINE_BYTES`] is malformed, not parsed; the page itself is capped
//! by the collector (8 MiB).

use std::borrow::Cow;

use smallvec::SmallVec;

/// Samples of one wanted name parsed per page at most. An engine exports its gauges once per
/// model (or adapter set): a handful of series. Past this, the page is not an engine's.
pub const MAX_SERIES_PER_NAME: u16 = 64;

/// Longest wanted sample line parsed; a longer one counts as malformed. The longest a real
/// engine writes is a LoRA info series listing its loaded adapters (a few hundred bytes); 64 KiB
/// holds thousands of names, and bounds the label parsing a single line can cost.
pub const MAX_SAMPLE_LINE_BYTES: usize = 64 << 10;

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
pub fn for_each_sample<'a>(text: &'a str, mut f: impl FnMut(Sample<'a>)) -> usize {
    let mut bad = 0;
    for line in text.lines() {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = memchr::memchr3(b'{', b' ', b'\t', line.as_bytes()).unwrap_or(line.len());
        match parse_line(line, name_end) {
            Some(s) => f(s),
            None => bad += 1,
        }
    }
    bad
}

/// Like [`for_each_sample`], but only for samples named in `wanted` (exact names): other lines
/// are skipped after reading their name, and the lines of a family that cannot hold a wanted
/// name (declared by a `# TYPE` or `# HELP` line) after comparing their first bytes with the
/// family's name. A `/metrics` page is mostly histogram buckets the EPP does not read, so this
/// is where the time goes. Only wanted lines are checked for UTF-8.
pub fn for_each_sample_named<'a, N: AsRef<str>>(
    text: &'a [u8],
    wanted: &[N],
    mut f: impl FnMut(Sample<'a>),
) -> usize {
    let mut filter = LineFilter::default();
    for_each_line(text, |line| filter.line(line, wanted, &mut f));
    filter.bad
}

/// Call `f` with each `\n`-separated line of `bytes` (without the `\n`; a last line without
/// one included).
fn for_each_line<'a>(bytes: &'a [u8], mut f: impl FnMut(&'a [u8])) {
    let mut start = 0;
    while start < bytes.len() {
        let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |i| start + i);
        f(&bytes[start..end]);
        start = end + 1;
    }
}

/// [`for_each_sample_named`] over a page that arrives in pieces: complete lines are read as
/// soon as their piece arrives and only an unfinished last line is kept, so no page is ever
/// held whole.
#[derive(Debug, Default)]
pub struct SampleReader {
    filter: LineFilter,
    /// The unfinished line at the end of the last piece.
    carry: Vec<u8>,
}

impl SampleReader {
    /// Read the complete lines of `piece` (with the unfinished line before it).
    pub fn feed<N: AsRef<str>>(&mut self, mut piece: &[u8], wanted: &[N], mut f: impl FnMut(Sample<'_>)) {
        if !self.carry.is_empty() {
            let Some(nl) = memchr::memchr(b'\n', piece) else {
                self.carry.extend_from_slice(piece);
                return;
            };
            self.carry.extend_from_slice(&piece[..nl]);
            self.filter.line(&self.carry, wanted, &mut f);
            self.carry.clear();
            piece = &piece[nl + 1..];
        }
        let complete = match memchr::memrchr(b'\n', piece) {
            Some(last) => last,
            None => {
                self.carry.extend_from_slice(piece);
                return;
            }
        };
        for_each_line(&piece[..complete], |line| self.filter.line(line, wanted, &mut f));
        self.carry.extend_from_slice(&piece[complete + 1..]);
    }

    /// Read the last line (a page need not end with a newline); returns the malformed lines.
    pub fn finish<N: AsRef<str>>(mut self, wanted: &[N], mut f: impl FnMut(Sample<'_>)) -> usize {
        if !self.carry.is_empty() {
            self.filter.line(&self.carry, wanted, &mut f);
        }
        self.filter.bad
    }
}

/// Per-line state of a named read: the family being skipped and the malformed-line count.
#[derive(Debug, Default)]
struct LineFilter {
    /// Name of the current family when it cannot hold a wanted sample (empty: none).
    skipped_family: Vec<u8>,
    bad: usize,
    /// Samples parsed so far per wanted name (by its position in `wanted`).
    parsed: SmallVec<[u16; 16]>,
}

impl LineFilter {
    fn line<'a, N: AsRef<str>>(&mut self, raw: &'a [u8], wanted: &[N], f: &mut impl FnMut(Sample<'a>)) {
        // Fast path: a sample of the skipped family (`family`, `family_bucket{...`, ...).
        if !self.skipped_family.is_empty()
            && raw.starts_with(&self.skipped_family)
            && raw
                .get(self.skipped_family.len())
                .is_some_and(|c| matches!(c, b'_' | b'{' | b' ' | b'\t'))
        {
            return;
        }
        let line = raw.trim_ascii();
        if line.is_empty() {
            return;
        }
        if line[0] == b'#' {
            self.comment(line, wanted);
            return;
        }
        let name_end = memchr::memchr3(b'{', b' ', b'\t', line).unwrap_or(line.len());
        let name = &line[..name_end];
        let Some(i) = wanted.iter().position(|w| w.as_ref().as_bytes() == name) else {
            return;
        };
        if self.parsed.len() < wanted.len() {
            self.parsed.resize(wanted.len(), 0);
        }
        if self.parsed[i] >= MAX_SERIES_PER_NAME {
            return;
        }
        self.parsed[i] += 1;
        if line.len() > MAX_SAMPLE_LINE_BYTES {
            self.bad += 1;
            return;
        }
        match std::str::from_utf8(line)
            .ok()
            .and_then(|l| parse_line(l, name_end))
        {
            Some(s) => f(s),
            None => self.bad += 1,
        }
    }

    /// `# TYPE name ...` and `# HELP name ...` start a family: skip its samples when no wanted
    /// name begins with its name.
    fn comment<N: AsRef<str>>(&mut self, line: &[u8], wanted: &[N]) {
        let rest = line[1..].trim_ascii_start();
        let Some(rest) = rest.strip_prefix(b"TYPE").or_else(|| rest.strip_prefix(b"HELP")) else {
            self.skipped_family.clear();
            return;
        };
        let rest = rest.trim_ascii_start();
        let family = &rest[..memchr::memchr2(b' ', b'\t', rest).unwrap_or(rest.len())];
        if family.is_empty() {
            self.skipped_family.clear();
            return;
        }
        if family == self.skipped_family.as_slice() {
            return; // the TYPE line after the HELP line of the same skipped family
        }
        self.skipped_family.clear();
        if !wanted.iter().any(|w| w.as_ref().as_bytes().starts_with(family)) {
            self.skipped_family.extend_from_slice(family);
        }
    }
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
                // The escaped character may be any UTF-8 character (an unknown escape is kept
                // as written): step over all of its bytes, never into the middle of one.
                let escaped = s[i + 1..].chars().next()?;
                match escaped {
                    'n' => buf.push('\n'),
                    '\\' => buf.push('\\'),
                    '"' => buf.push('"'),
                    other => {
                        buf.push('\\');
                        buf.push(other);
                    }
                }
                i += 1 + escaped.len_utf8();
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

    /// Regression (fuzzing, `exposition`): a backslash before a multi-byte character in a
    /// label value stepped into the middle of that character and panicked the scrape.
    #[test]
    fn an_escaped_multibyte_character_is_kept_whole() {
        let text = "vllm:cache_config_info{cache_dtype=\"a\\\u{5fc}b\",block_size=\"16\"} 1\n";
        let mut got = Vec::new();
        assert_eq!(for_each_sample(text, |s| got.push(s)), 0);
        assert_eq!(got[0].label("cache_dtype"), Some("a\\\u{5fc}b"));
        assert_eq!(got[0].label("block_size"), Some("16"));
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

    fn named(text: &[u8], wanted: &[&str]) -> (Vec<(String, f64)>, usize) {
        let mut got = Vec::new();
        let bad = for_each_sample_named(text, wanted, |s| got.push((s.name.to_owned(), s.value)));
        (got, bad)
    }

    #[test]
    fn skipped_families_never_hide_a_wanted_sample() {
        let text = b"# TYPE lat histogram\n\
            lat_bucket{le=\"1\"} 1\n\
            lat_count 1\n\
            want 7\n\
            # HELP want_more some help\n\
            want_more_total 2\n\
            # TYPE w gauge\n\
            w_x 1\n\
            want 8\n";
        let (got, bad) = named(text, &["want", "want_more_total"]);
        assert_eq!(bad, 0);
        assert_eq!(
            got,
            vec![
                ("want".to_owned(), 7.0),
                ("want_more_total".to_owned(), 2.0),
                ("want".to_owned(), 8.0)
            ]
        );
    }

    #[test]
    fn invalid_utf8_counts_only_on_wanted_lines() {
        let text = b"skipped{a=\"\xff\"} 1\nwant{a=\"\xff\"} 2\nwant 3";
        let (got, bad) = named(text, &["want"]);
        assert_eq!(bad, 1);
        assert_eq!(got, vec![("want".to_owned(), 3.0)]);
    }

    #[test]
    fn reader_joins_lines_split_across_pieces() {
        let mut r = SampleReader::default();
        let mut got = Vec::new();
        for piece in [&b"wa"[..], b"nt{a=\"x", b"\"} 1\n", b"want 2\nwa", b"nt 3"] {
            r.feed(piece, &["want"], |s| got.push(s.value));
        }
        let bad = r.finish(&["want"], |s| got.push(s.value));
        assert_eq!((got, bad), (vec![1.0, 2.0, 3.0], 0));
    }
}
