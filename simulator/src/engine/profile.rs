//! Engine profiles: the capacity limits and timing constants of one simulated vLLM V1 server.
//!
//! Two presets describe a Llama-3-8B-class model (bf16, one GPU) on an H100 and on an A100-80GB.
//! Their values come from vLLM's defaults and a roofline timing model; where a number is an
//! estimate the field says so. A YAML or JSON profile file starts from a preset (`preset: a100`,
//! default `h100`) and overrides any field; unknown fields are errors.

use serde::{Deserialize, Serialize};

/// Capacity and timing of one simulated engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineProfile {
    /// Label used in reports.
    pub name: String,
    /// Model name served (what `/v1/models` lists and the metrics label).
    pub model: String,
    /// Token budget of one engine step (`max_num_batched_tokens`).
    pub max_num_batched_tokens: u32,
    /// Sequences in one step at most (`max_num_seqs`).
    pub max_num_seqs: u32,
    /// Tokens per KV block (`block_size`).
    pub block_size: u32,
    /// KV blocks on the GPU. Estimate for 80 GB at `gpu_memory_utilization` 0.9: 26k–28k.
    pub num_gpu_blocks: u32,
    /// Longest prompt + output accepted; longer requests are refused with 400.
    pub max_model_len: u32,
    /// Cap on one request's prefill chunk per step (`long_prefill_token_threshold`; 0 = none).
    pub long_prefill_token_threshold: u32,
    /// Whether full prompt blocks are cached and reused (`enable_prefix_caching`).
    pub enable_prefix_caching: bool,
    /// Distinct LoRA adapters per step and resident on the GPU (`max_loras`).
    pub max_loras: u32,
    /// Rank of the adapters (sizes the load cost).
    pub lora_rank: u32,
    /// Fixed cost of loading an adapter onto the GPU, µs.
    pub lora_load_fixed_us: f64,
    /// Extra load cost per unit of rank, µs.
    pub lora_load_per_rank_us: f64,
    /// Relative step slowdown per distinct adapter in the batch (0.035 at rank 16).
    pub lora_step_overhead: f64,
    /// Fixed cost of every step (launches, sampling, scheduler), µs.
    pub step_fixed_us: f64,
    /// Bytes of weights read by every step.
    pub weight_bytes: f64,
    /// KV bytes per token of context (128 KiB for Llama-3-8B).
    pub kv_bytes_per_token: f64,
    /// GPU memory bandwidth, bytes per second.
    pub memory_bandwidth: f64,
    /// Fraction of the bandwidth a decode step achieves.
    pub bandwidth_efficiency: f64,
    /// CPU/GPU cost per sequence in the batch, µs.
    pub per_sequence_us: f64,
    /// Prefill cost per new token from the linear layers, µs (estimate).
    pub prefill_per_token_us: f64,
    /// Attention cost per query–key pair during prefill, ns (estimate).
    pub attention_per_pair_ns: f64,
    /// Added to each request's time to first token (API server, tokenisation), µs.
    pub arrival_overhead_us: f64,
    /// Which model server's `/metrics` page the EPP scrapes from these engines.
    pub metrics: MetricsDialect,
}

/// The gauges a model server exports, as the EPP's scraper maps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsDialect {
    /// vLLM: waiting and running requests, KV-cache utilization, LoRA adapters, cache geometry.
    #[default]
    Vllm,
    /// llama.cpp's `llama-server --metrics`: deferred and processing requests only; KV
    /// utilization, adapters and cache geometry stay unknown to the EPP.
    Llamacpp,
}

impl EngineProfile {
    /// Llama-3-8B on one H100 (80 GB, 3.35 TB/s): vLLM's API-server defaults for that GPU.
    pub fn h100() -> Self {
        Self {
            name: "llama3-8b-h100".into(),
            model: "meta-llama/Llama-3.1-8B-Instruct".into(),
            max_num_batched_tokens: 8192,
            max_num_seqs: 1024,
            block_size: 16,
            num_gpu_blocks: 27_000,
            max_model_len: 131_072,
            long_prefill_token_threshold: 0,
            enable_prefix_caching: true,
            max_loras: 1,
            lora_rank: 16,
            lora_load_fixed_us: 1_500.0,
            lora_load_per_rank_us: 1.0,
            lora_step_overhead: 0.035,
            step_fixed_us: 1_150.0,
            weight_bytes: 15.0e9,
            kv_bytes_per_token: 131_072.0,
            memory_bandwidth: 3.35e12,
            bandwidth_efficiency: 0.8,
            per_sequence_us: 4.4,
            prefill_per_token_us: 33.0,
            attention_per_pair_ns: 1.2,
            arrival_overhead_us: 0.0,
            metrics: MetricsDialect::Vllm,
        }
    }

    /// Llama-3-8B on one A100-80GB (2.039 TB/s): vLLM's defaults for GPUs other than H100-class.
    pub fn a100() -> Self {
        Self {
            name: "llama3-8b-a100".into(),
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            num_gpu_blocks: 26_000,
            memory_bandwidth: 2.039e12,
            bandwidth_efficiency: 0.75,
            prefill_per_token_us: 83.0,
            attention_per_pair_ns: 4.4,
            ..Self::h100()
        }
    }

    /// A preset by name (`h100`, `a100`).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "h100" => Some(Self::h100()),
            "a100" => Some(Self::a100()),
            _ => None,
        }
    }

    /// A preset name or a profile file (YAML or JSON, fields overriding `preset:`).
    ///
    /// # Errors
    /// Unreadable file, unknown preset, unknown field or a value of the wrong type.
    pub fn load(spec: &str) -> Result<Self, String> {
        if let Some(p) = Self::preset(spec) {
            return Ok(p);
        }
        let text = std::fs::read_to_string(spec)
            .map_err(|e| format!("profile {spec:?}: not a preset (h100, a100) and not readable: {e}"))?;
        Self::from_text(&text).map_err(|e| format!("profile {spec:?}: {e}"))
    }

    /// Parse a profile document: `preset` picks the base, other fields override it.
    ///
    /// # Errors
    /// Unknown preset or field, wrong types, or values that make no engine.
    pub fn from_text(text: &str) -> Result<Self, String> {
        let doc: serde_json::Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let serde_json::Value::Object(mut overrides) = doc else {
            return Err("a profile is a mapping of fields".into());
        };
        let base = match overrides.remove("preset") {
            None => Self::h100(),
            Some(serde_json::Value::String(p)) => {
                Self::preset(&p).ok_or_else(|| format!("unknown preset {p:?} (h100, a100)"))?
            }
            Some(other) => return Err(format!("preset must be a string, got {other}")),
        };
        let serde_json::Value::Object(mut merged) = serde_json::to_value(&base).map_err(|e| e.to_string())?
        else {
            return Err("profile did not serialise to a mapping".into());
        };
        merged.extend(overrides);
        let profile: Self =
            serde_json::from_value(serde_json::Value::Object(merged)).map_err(|e| e.to_string())?;
        profile.validate()?;
        Ok(profile)
    }

    /// Reject values that make no engine.
    ///
    /// # Errors
    /// The first offending field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_num_seqs", self.max_num_seqs),
            ("block_size", self.block_size),
            ("num_gpu_blocks", self.num_gpu_blocks),
            ("max_model_len", self.max_model_len),
            ("max_loras", self.max_loras),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{field} must be at least 1"));
        }
        if !(self.memory_bandwidth > 0.0 && self.bandwidth_efficiency > 0.0) {
            return Err("memory_bandwidth and bandwidth_efficiency must be positive".into());
        }
        let costs = [
            self.step_fixed_us,
            self.weight_bytes,
            self.kv_bytes_per_token,
            self.per_sequence_us,
            self.prefill_per_token_us,
            self.attention_per_pair_ns,
            self.arrival_overhead_us,
            self.lora_load_fixed_us,
            self.lora_load_per_rank_us,
            self.lora_step_overhead,
        ];
        if costs.iter().any(|c| !c.is_finite() || *c < 0.0) {
            return Err("timing constants must be finite and non-negative".into());
        }
        Ok(())
    }

    /// Whether a request of `prompt` + `output` tokens can ever be served (vLLM answers 400
    /// otherwise).
    ///
    /// # Errors
    /// [`Refusal`](super::Refusal) with the reason.
    pub fn admissible(&self, prompt: u32, output: u32) -> Result<(), super::Refusal> {
        let requested = u64::from(prompt) + u64::from(output);
        if requested > u64::from(self.max_model_len) {
            return Err(super::Refusal::TooLong {
                max: self.max_model_len,
                requested,
            });
        }
        let needed = requested.div_ceil(u64::from(self.block_size.max(1)));
        if needed > u64::from(self.num_gpu_blocks) {
            return Err(super::Refusal::ExceedsCache {
                needed,
                capacity: self.num_gpu_blocks,
            });
        }
        Ok(())
    }

    /// Nanoseconds to load one adapter.
    pub fn lora_load_ns(&self) -> u64 {
        us_to_ns(self.lora_load_fixed_us + self.lora_load_per_rank_us * f64::from(self.lora_rank))
    }

    /// Duration of one step, ns: a memory-bound part (weights plus the decoding sequences' KV),
    /// per-sequence overhead, and the prefill chunks' compute (linear + attention against the
    /// cached and earlier chunk tokens), scaled by the LoRA overhead.
    pub fn step_ns(&self, work: &StepWork) -> u64 {
        let bytes = self.weight_bytes + self.kv_bytes_per_token * work.decode_context_tokens as f64;
        let memory_us = bytes / (self.memory_bandwidth * self.bandwidth_efficiency) * 1e6;
        let mut us = self.step_fixed_us + memory_us + self.per_sequence_us * f64::from(work.sequences);
        us += self.prefill_per_token_us * work.prefill_tokens as f64;
        us += self.attention_per_pair_ns * work.prefill_attention_pairs / 1_000.0;
        us *= 1.0 + self.lora_step_overhead * f64::from(work.distinct_adapters);
        us_to_ns(us)
    }
}

/// What one step computes, the input of [`EngineProfile::step_ns`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepWork {
    /// Sequences in the batch.
    pub sequences: u32,
    /// Context tokens of the decoding sequences (their KV is read once).
    pub decode_context_tokens: u64,
    /// New prompt tokens computed in prefill chunks.
    pub prefill_tokens: u64,
    /// Query–key pairs of those chunks: Σ n_new × (n_cached + n_new / 2).
    pub prefill_attention_pairs: f64,
    /// Distinct LoRA adapters in the batch.
    pub distinct_adapters: u32,
}

fn us_to_ns(us: f64) -> u64 {
    // Saturating float → integer conversion; the inputs are validated finite and non-negative.
    (us * 1_000.0).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_step_ms(p: &EngineProfile, batch: u32, context: u64) -> f64 {
        let work = StepWork {
            sequences: batch,
            decode_context_tokens: u64::from(batch) * context,
            ..Default::default()
        };
        p.step_ns(&work) as f64 / 1e6
    }

    #[test]
    fn h100_decode_steps_match_the_roofline_table() {
        // Reference: 6.8 ms at B = 1, 8.5 ms at B = 32, 13.6 ms at B = 128 (1,024-token contexts).
        let p = EngineProfile::h100();
        assert!((decode_step_ms(&p, 1, 1024) - 6.8).abs() < 0.1);
        assert!((decode_step_ms(&p, 32, 1024) - 8.5).abs() < 0.15);
        assert!((decode_step_ms(&p, 128, 1024) - 13.6).abs() < 0.3);
    }

    #[test]
    fn prefill_throughput_is_about_thirty_thousand_tokens_per_second_on_h100() {
        let p = EngineProfile::h100();
        let n = 8192u64;
        let work = StepWork {
            sequences: 1,
            prefill_tokens: n,
            prefill_attention_pairs: n as f64 * (n as f64 / 2.0),
            ..Default::default()
        };
        let tokens_per_s = n as f64 / (p.step_ns(&work) as f64 / 1e9);
        assert!((25_000.0..32_000.0).contains(&tokens_per_s), "{tokens_per_s}");
    }

    #[test]
    fn files_override_a_preset_and_reject_unknown_fields() {
        let p = EngineProfile::from_text("preset: a100\nmax_num_seqs: 64\n").unwrap();
        assert_eq!(p.max_num_seqs, 64);
        assert_eq!(p.max_num_batched_tokens, 2048);
        let e = EngineProfile::from_text("max_num_seq: 64\n").unwrap_err();
        assert!(e.contains("unknown field `max_num_seq`"), "{e}");
        let e = EngineProfile::from_text("preset: tpu\n").unwrap_err();
        assert_eq!(e, "unknown preset \"tpu\" (h100, a100)");
        let e = EngineProfile::from_text("block_size: 0\n").unwrap_err();
        assert_eq!(e, "block_size must be at least 1");
    }
}
