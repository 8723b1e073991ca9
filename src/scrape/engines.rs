//! Per-engine metric names as data, and extraction of [`EngineMetrics`] from exposition text.
//!
//! Each engine maps our fields to one or more metric selectors (`name` or `name{label="v"}`),
//! tried in order: the first selector with any matching series wins (that is how vLLM's legacy
//! `vllm:gpu_cache_usage_perc` serves as a fallback). When several series match one selector —
//! one per data-parallel rank or engine of the same pod — counts (waiting, running) are **summed**
//! and ratios (KV utilization) are **averaged**; upstream takes the first series, which
//! undercounts a multi-rank pod. `_created` samples are never used.

use std::sync::Arc;

use super::exposition::{Sample, SampleReader, for_each_sample_named};
use crate::datastore::{EngineMetrics, LoraState};

/// A metric name with optional exact label matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSelector {
    /// Metric name.
    pub name: String,
    /// Labels that must match exactly.
    pub labels: Vec<(String, String)>,
}

impl MetricSelector {
    /// Parse `name` or `name{label=value,label2="value"}`.
    ///
    /// # Errors
    /// A message when the spec is malformed.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
        let (name, labels) = match spec.split_once('{') {
            None => (spec, Vec::new()),
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .ok_or_else(|| format!("metric spec {spec:?}: missing closing brace"))?;
                let labels = inner
                    .split(',')
                    .filter(|p| !p.trim().is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').ok_or_else(|| {
                            format!("metric spec {spec:?}: label {pair:?} is not key=value")
                        })?;
                        Ok((k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                (name.trim(), labels)
            }
        };
        if name.is_empty() {
            return Err(format!("metric spec {spec:?}: empty metric name"));
        }
        Ok(Self {
            name: name.to_owned(),
            labels,
        })
    }

    /// A sample matches when its name is the spec's (or the spec's plus `_total`, how Python
    /// clients expose counters) and it carries every spec label with the same value.
    fn matches(&self, s: &Sample<'_>) -> bool {
        (s.name == self.name || s.name.strip_suffix("_total") == Some(self.name.as_str()))
            && self.labels.iter().all(|(k, v)| s.label(k) == Some(v.as_str()))
    }
}

/// Where the KV block size and block count come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheInfoSource {
    /// Labels of an info gauge (`vllm:cache_config_info{block_size, num_gpu_blocks}`).
    InfoLabels {
        /// The info metric.
        metric: String,
        /// Label holding tokens per block.
        block_size_label: String,
        /// Label holding the number of blocks.
        num_blocks_label: String,
    },
    /// Values of two gauges.
    Gauges {
        /// Tokens per block.
        block_size: MetricSelector,
        /// Number of blocks.
        num_blocks: MetricSelector,
    },
    /// Not reported.
    None,
}

/// The metric names of one engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSpec {
    /// Engine name (`vllm`, `sglang`, ...).
    pub name: Arc<str>,
    /// Waiting-queue selectors, in priority order.
    pub waiting: Vec<MetricSelector>,
    /// Running-requests selectors.
    pub running: Vec<MetricSelector>,
    /// KV-utilization selectors (fraction 0..1).
    pub kv_usage: Vec<MetricSelector>,
    /// LoRA info gauge (value = update time; labels carry adapters).
    pub lora_info: Option<String>,
    /// KV cache geometry.
    pub cache_info: CacheInfoSource,
}

fn sel(spec: &str) -> MetricSelector {
    MetricSelector::parse(spec).unwrap_or(MetricSelector {
        name: spec.to_owned(),
        labels: Vec::new(),
    })
}

/// The built-in engines, with upstream's default names.
pub fn builtin_engines() -> Vec<EngineSpec> {
    vec![
        EngineSpec {
            name: "vllm".into(),
            waiting: vec![sel("vllm:num_requests_waiting")],
            running: vec![sel("vllm:num_requests_running")],
            kv_usage: vec![sel("vllm:kv_cache_usage_perc"), sel("vllm:gpu_cache_usage_perc")],
            lora_info: Some("vllm:lora_requests_info".into()),
            cache_info: CacheInfoSource::InfoLabels {
                metric: "vllm:cache_config_info".into(),
                block_size_label: "block_size".into(),
                num_blocks_label: "num_gpu_blocks".into(),
            },
        },
        EngineSpec {
            name: "sglang".into(),
            waiting: vec![sel("sglang:num_queue_reqs")],
            running: vec![sel("sglang:num_running_reqs")],
            kv_usage: vec![sel("sglang:token_usage")],
            lora_info: None,
            cache_info: CacheInfoSource::InfoLabels {
                metric: "sglang:cache_config_info".into(),
                block_size_label: "page_size".into(),
                num_blocks_label: "num_pages".into(),
            },
        },
        EngineSpec {
            name: "triton-tensorrt-llm".into(),
            waiting: vec![sel("nv_trt_llm_request_metrics{request_type=waiting}")],
            running: vec![sel("nv_trt_llm_request_metrics{request_type=scheduled}")],
            kv_usage: vec![sel(
                "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
            )],
            lora_info: None,
            cache_info: CacheInfoSource::Gauges {
                block_size: sel("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}"),
                num_blocks: sel("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"),
            },
        },
        EngineSpec {
            name: "trtllm-serve".into(),
            waiting: vec![sel("trtllm_num_requests_waiting")],
            running: vec![sel("trtllm_num_requests_running")],
            kv_usage: vec![sel("trtllm_kv_cache_utilization")],
            lora_info: None,
            cache_info: CacheInfoSource::Gauges {
                block_size: sel("trtllm_kv_cache_tokens_per_block"),
                num_blocks: sel("trtllm_kv_cache_max_blocks"),
            },
        },
        // llama.cpp's `llama-server --metrics`: slots busy and requests deferred for a free
        // slot. It exports no KV-utilization gauge (only token counters), so KV stays unknown
        // and the KV-based plugins treat these endpoints as neutral.
        EngineSpec {
            name: "llamacpp".into(),
            waiting: vec![sel("llamacpp:requests_deferred")],
            running: vec![sel("llamacpp:requests_processing")],
            kv_usage: Vec::new(),
            lora_info: None,
            cache_info: CacheInfoSource::None,
        },
    ]
}

/// Running aggregate of the series matching one field's selectors.
#[derive(Debug, Default, Clone, Copy)]
struct Agg {
    /// Index of the best (lowest) selector seen so far, and its sum and count.
    best: Option<usize>,
    sum: f64,
    count: u32,
}

impl Agg {
    fn add(&mut self, selectors: &[MetricSelector], s: &Sample<'_>) {
        let Some(idx) = selectors.iter().position(|m| m.matches(s)) else {
            return;
        };
        if !s.value.is_finite() {
            return;
        }
        match self.best {
            Some(b) if idx > b => {}
            Some(b) if idx == b => {
                self.sum += s.value;
                self.count += 1;
            }
            _ => {
                *self = Agg {
                    best: Some(idx),
                    sum: s.value,
                    count: 1,
                }
            }
        }
    }

    fn sum(&self) -> Option<f64> {
        self.best.map(|_| self.sum)
    }

    fn mean(&self) -> Option<f64> {
        self.best.map(|_| self.sum / f64::from(self.count.max(1)))
    }
}

fn count(v: Option<f64>) -> u32 {
    v.map_or(0, |x| x.clamp(0.0, f64::from(u32::MAX)).round() as u32)
}

/// Adapters read from one list of a LoRA info series at most: a server holds a few adapters at a
/// time (vLLM's `max_loras`), and a list of 100,000 names costs 100,000 allocations per scrape.
pub const MAX_ADAPTERS_PER_LIST: usize = 256;

/// Longest adapter name kept; longer ones are skipped (no request names such a model).
pub const MAX_ADAPTER_NAME_BYTES: usize = 256;

fn split_adapters(list: &str) -> Arc<[Arc<str>]> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty() && a.len() <= MAX_ADAPTER_NAME_BYTES)
        .take(MAX_ADAPTERS_PER_LIST)
        .map(Arc::from)
        .collect()
}

/// The outcome of extracting one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    /// The values (with `scraped_at`/`last_error` left for the caller).
    pub metrics: EngineMetrics,
    /// Whether any required signal (waiting or running) was found.
    pub found_required: bool,
    /// Malformed lines skipped.
    pub bad_lines: usize,
}

/// Extract `spec`'s signals from exposition `text` in one pass.
pub fn extract(spec: &EngineSpec, text: &str) -> Extracted {
    let names = sample_names(spec);
    let mut found = Found::default();
    let bad_lines = for_each_sample_named(text.as_bytes(), &names, |s| found.add(spec, &s));
    found.finish(bad_lines)
}

/// [`extract`] for a page that arrives in pieces (a scrape's HTTP body): lines are read as
/// their piece arrives, so the page is never held whole.
#[derive(Debug)]
pub struct PageExtractor<'s> {
    spec: &'s EngineSpec,
    names: &'s [String],
    reader: SampleReader,
    found: Found,
}

impl<'s> PageExtractor<'s> {
    /// An extractor for `spec`'s signals; `names` are [`sample_names`] of `spec` (computed once
    /// per endpoint, not per scrape).
    pub fn new(spec: &'s EngineSpec, names: &'s [String]) -> Self {
        Self {
            spec,
            names,
            reader: SampleReader::default(),
            found: Found::default(),
        }
    }

    /// Read the next piece of the page.
    pub fn feed(&mut self, piece: &[u8]) {
        let Self {
            spec,
            names,
            reader,
            found,
        } = self;
        reader.feed(piece, names, |s| found.add(spec, &s));
    }

    /// The signals of the whole page.
    pub fn finish(self) -> Extracted {
        let Self {
            spec,
            names,
            reader,
            mut found,
        } = self;
        let bad_lines = reader.finish(names, |s| found.add(spec, &s));
        found.finish(bad_lines)
    }
}

/// Every sample name `spec` can read, with the `_total` form of counters.
pub fn sample_names(spec: &EngineSpec) -> Vec<String> {
    let mut names = Vec::new();
    let mut add = |n: &str| {
        names.push(n.to_owned());
        names.push(format!("{n}_total"));
    };
    for m in spec.waiting.iter().chain(&spec.running).chain(&spec.kv_usage) {
        add(&m.name);
    }
    if let Some(l) = &spec.lora_info {
        add(l);
    }
    match &spec.cache_info {
        CacheInfoSource::InfoLabels { metric, .. } => add(metric),
        CacheInfoSource::Gauges {
            block_size,
            num_blocks,
        } => {
            add(&block_size.name);
            add(&num_blocks.name);
        }
        CacheInfoSource::None => {}
    }
    names
}

/// What the samples read so far say.
#[derive(Debug, Default)]
struct Found {
    waiting: Agg,
    running: Agg,
    kv: Agg,
    block_size: Agg,
    num_blocks: Agg,
    lora: Option<(f64, LoraState)>,
    cache_labels: Option<(Option<u32>, Option<u64>)>,
}

impl Found {
    fn add(&mut self, spec: &EngineSpec, s: &Sample<'_>) {
        self.waiting.add(&spec.waiting, s);
        self.running.add(&spec.running, s);
        self.kv.add(&spec.kv_usage, s);
        match &spec.cache_info {
            CacheInfoSource::InfoLabels {
                metric,
                block_size_label,
                num_blocks_label,
            } if s.name == metric => {
                let bs = s.label(block_size_label).and_then(|v| v.parse().ok());
                let nb = s.label(num_blocks_label).and_then(|v| v.parse().ok());
                self.cache_labels.get_or_insert((bs, nb));
            }
            CacheInfoSource::Gauges {
                block_size: b,
                num_blocks: n,
            } => {
                self.block_size.add(std::slice::from_ref(b), s);
                self.num_blocks.add(std::slice::from_ref(n), s);
            }
            _ => {}
        }
        // The newest series (largest value: a timestamp) of the LoRA info gauge wins.
        if spec.lora_info.as_deref() == Some(s.name) && self.lora.as_ref().is_none_or(|(t, _)| s.value > *t) {
            let state = LoraState {
                running: split_adapters(s.label("running_lora_adapters").unwrap_or("")),
                waiting: split_adapters(s.label("waiting_lora_adapters").unwrap_or("")),
                max_active: s.label("max_lora").and_then(|v| v.parse().ok()).unwrap_or(0),
            };
            self.lora = Some((s.value, state));
        }
    }

    fn finish(self, bad_lines: usize) -> Extracted {
        let (bs, nb) = match self.cache_labels {
            Some(v) => v,
            None => (
                self.block_size.mean().map(|v| v.max(0.0) as u32),
                self.num_blocks.mean().map(|v| v.max(0.0) as u64),
            ),
        };
        Extracted {
            found_required: self.waiting.best.is_some() || self.running.best.is_some(),
            metrics: EngineMetrics {
                waiting: count(self.waiting.sum()),
                running: count(self.running.sum()),
                kv_usage: self.kv.mean().map(|v| v.clamp(0.0, 1.0)),
                lora: self.lora.map(|(_, l)| l),
                block_size: bs.filter(|b| *b > 0),
                num_gpu_blocks: nb.filter(|n| *n > 0),
                scraped_at: None,
                last_error: None,
                slots: Default::default(),
                head: Default::default(),
            },
            bad_lines,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vllm() -> EngineSpec {
        builtin_engines().remove(0)
    }

    /// Hostile but valid pages cost bounded work and yield bounded state: a LoRA info series of
    /// 2,000 adapters keeps the first 256 (names past 256 bytes skipped), one naming 100,000 (a
    /// line past 64 KiB) is not parsed, and 100,000 series of the waiting gauge are summed over
    /// the first 64 only.
    #[test]
    fn hostile_pages_are_read_within_bounds() {
        let lora_page = |n: usize| {
            let names: Vec<String> = (0..n).map(|i| format!("lora{i}")).collect();
            format!(
                "vllm:num_requests_waiting{{model_name=\"m\"}} 1\nvllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"\"}} 1.7e9\n",
                names.join(",")
            )
        };
        let e = extract(&vllm(), &lora_page(100_000));
        assert!(e.metrics.lora.is_none());
        assert_eq!((e.bad_lines, e.metrics.waiting), (1, 1));
        let mut names: Vec<String> = (0..2_000).map(|i| format!("lora{i}")).collect();
        names.insert(1, "x".repeat(300));
        let page = format!(
            "vllm:num_requests_waiting{{model_name=\"m\"}} 1\nvllm:lora_requests_info{{max_lora=\"4\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"\"}} 1.7e9\n",
            names.join(",")
        );
        let e = extract(&vllm(), &page);
        let lora = e.metrics.lora.unwrap();
        assert_eq!(lora.running.len(), MAX_ADAPTERS_PER_LIST);
        assert_eq!(&*lora.running[1], "lora1", "the 300-byte name is skipped");
        assert_eq!(&*lora.running[255], "lora255");

        let mut page = String::new();
        for i in 0..100_000 {
            page.push_str(&format!("vllm:num_requests_waiting{{model_name=\"m{i}\"}} 1\n"));
        }
        let e = extract(&vllm(), &page);
        assert_eq!(
            e.metrics.waiting,
            u32::from(crate::scrape::exposition::MAX_SERIES_PER_NAME)
        );
        assert_eq!(e.bad_lines, 0);
    }

    #[test]
    fn selector_specs_parse() {
        let s = MetricSelector::parse("nv_trt_llm_request_metrics{request_type=\"waiting\"}").unwrap();
        assert_eq!(s.name, "nv_trt_llm_request_metrics");
        assert_eq!(s.labels, vec![("request_type".into(), "waiting".into())]);
        assert!(MetricSelector::parse("x{a=b").is_err());
        assert!(MetricSelector::parse("{a=b}").is_err());
    }

    #[test]
    fn data_parallel_ranks_are_summed_and_kv_averaged() {
        let text = "vllm:num_requests_waiting{engine=\"0\"} 2\nvllm:num_requests_waiting{engine=\"1\"} 3\n\
            vllm:num_requests_running{engine=\"0\"} 1\nvllm:kv_cache_usage_perc{engine=\"0\"} 0.2\n\
            vllm:kv_cache_usage_perc{engine=\"1\"} 0.4\n";
        let e = extract(&vllm(), text);
        assert_eq!(e.metrics.waiting, 5);
        assert_eq!(e.metrics.running, 1);
        assert!((e.metrics.kv_usage.unwrap() - 0.3).abs() < 1e-12);
        assert!(e.found_required);
    }

    #[test]
    fn legacy_kv_name_is_a_fallback_and_lora_latest_series_wins() {
        let text = "vllm:gpu_cache_usage_perc 0.5\n\
            vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"lora4,lora2\",waiting_lora_adapters=\"lora3\"} 1.257894567e+09\n\
            vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"lora4,lora3\",waiting_lora_adapters=\"\"} 1.257894569e+09\n\
            vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"27000\"} 1\n";
        let e = extract(&vllm(), text);
        assert_eq!(e.metrics.kv_usage, Some(0.5));
        let lora = e.metrics.lora.unwrap();
        assert_eq!(&*lora.running, &[Arc::from("lora4"), Arc::from("lora3")]);
        assert!(lora.waiting.is_empty());
        assert_eq!(lora.max_active, 1);
        assert_eq!(e.metrics.block_size, Some(16));
        assert_eq!(e.metrics.num_gpu_blocks, Some(27000));
        assert!(!e.found_required);
    }

    #[test]
    fn llamacpp_reads_slots_and_deferred_and_has_no_kv() {
        let spec = builtin_engines()
            .into_iter()
            .find(|e| &*e.name == "llamacpp")
            .unwrap();
        let text = "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n\
            # TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 3\n\
            llamacpp:kv_cache_usage_ratio 0.5\n";
        let e = extract(&spec, text);
        assert_eq!((e.metrics.running, e.metrics.waiting), (2, 3));
        assert_eq!(
            e.metrics.kv_usage, None,
            "no KV selector: unknown even if a lookalike exists"
        );
        assert!(e.found_required);
    }

    #[test]
    fn missing_kv_is_unknown_not_zero() {
        let e = extract(&vllm(), "vllm:num_requests_waiting 1\n");
        assert_eq!(e.metrics.kv_usage, None);
    }

    proptest::proptest! {
        #[test]
        fn a_page_read_in_pieces_gives_what_the_whole_page_gives(
            cuts in proptest::collection::vec(0usize..100_000, 0..40),
        ) {
            for page in [
                include_str!("../../tests/fixtures/vllm-v1-full.prom"),
                include_str!("../../tests/fixtures/vllm-v1.prom"),
            ] {
                let spec = vllm();
                let whole = extract(&spec, page);
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (page.len() + 1)).collect();
                cuts.sort_unstable();
                let names = sample_names(&spec);
                let mut x = PageExtractor::new(&spec, &names);
                let mut from = 0;
                for cut in cuts.into_iter().chain([page.len()]) {
                    x.feed(&page.as_bytes()[from..cut]);
                    from = cut;
                }
                proptest::prop_assert_eq!(x.finish(), whole);
            }
        }
    }

    #[test]
    fn full_vllm_page_values() {
        let e = extract(&vllm(), include_str!("../../tests/fixtures/vllm-v1-full.prom"));
        assert!(e.found_required);
        assert_eq!(e.bad_lines, 0);
    }
}
