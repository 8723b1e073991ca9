//! Workloads for the replay and the load generator: arrivals with prompt and output lengths and
//! the identity of each prompt block.
//!
//! A prompt is a sequence of *trace blocks* of `block_tokens` tokens (512 in the Mooncake
//! trace); equal block ids at the same position mean an identical prefix up to there. From the
//! ids, two views are derived deterministically:
//! - [`Workload::prompt_text`]: text (about four bytes per token, ASCII words, no JSON escapes),
//!   so the real request parser and the EPP's prefix hasher run on real bytes, and the text of a
//!   block depends on that block's id only;
//! - [`Workload::engine_hashes`]: chained hashes of the engine's full KV blocks (16 tokens), so
//!   the engine model's prefix cache sees exactly the sharing the trace describes.

pub mod azure;
pub mod generate;
pub mod mooncake;
pub mod suite;

use std::sync::Arc;

use xxhash_rust::xxh64::xxh64;

/// Bytes of synthesized text per token (the EPP's own estimate).
pub const BYTES_PER_TOKEN: usize = 4;

/// One request of a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRequest {
    /// Arrival time, ns from the start.
    pub arrival_ns: u64,
    /// Prompt length in tokens.
    pub input_tokens: u32,
    /// Output length in tokens.
    pub output_tokens: u32,
    /// Ids of the prompt's trace blocks (the last may cover a partial block).
    pub blocks: Vec<u64>,
    /// LoRA adapter the request asks for (sent as its `model`).
    pub adapter: Option<Arc<str>>,
    /// Tenant, sent in the tenant header.
    pub tenant: Option<Arc<str>>,
}

/// An ordered list of requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Where it came from (file name or generator), for reports.
    pub name: String,
    /// Tokens per trace block.
    pub block_tokens: u32,
    /// Requests, by arrival time.
    pub requests: Vec<TraceRequest>,
}

impl Workload {
    /// A workload of `requests` in any order, sorted by arrival (stable: equal arrival times keep
    /// their order in the file).
    pub fn by_arrival(name: impl Into<String>, block_tokens: u32, mut requests: Vec<TraceRequest>) -> Self {
        requests.sort_by_key(|r| r.arrival_ns);
        Self {
            name: name.into(),
            block_tokens,
            requests,
        }
    }

    /// Divide every arrival time by `scale` (2.0 = twice the rate).
    pub fn scale_rate(&mut self, scale: f64) {
        if scale > 0.0 && scale.is_finite() && scale != 1.0 {
            for r in &mut self.requests {
                r.arrival_ns = (r.arrival_ns as f64 / scale).round() as u64;
            }
        }
    }

    /// Keep the first `n` requests.
    pub fn truncate(&mut self, n: usize) {
        self.requests.truncate(n);
    }

    /// Append the prompt text of `req` to `out`: each block's words, `tokens × 4` bytes long.
    pub fn prompt_text(&self, req: &TraceRequest, out: &mut String) {
        let mut left = req.input_tokens as usize;
        for &id in &req.blocks {
            let tokens = left.min(self.block_tokens as usize);
            block_text(id, tokens * BYTES_PER_TOKEN, out);
            left -= tokens;
        }
        if left > 0 {
            // More tokens than blocks: unique filler, derived from the request's arrival.
            block_text(req.arrival_ns ^ 0x5eed, left * BYTES_PER_TOKEN, out);
        }
    }

    /// Chained hashes of the prompt's full engine blocks of `engine_block` tokens.
    pub fn engine_hashes(&self, req: &TraceRequest, engine_block: u32) -> Arc<[u64]> {
        let engine_block = engine_block.max(1);
        let per_trace = (self.block_tokens / engine_block).max(1);
        let full = req.input_tokens / engine_block;
        let mut out = Vec::with_capacity(full as usize);
        let mut chain = 0u64;
        for &id in &req.blocks {
            chain = xxh64(&[chain.to_le_bytes(), id.to_le_bytes()].concat(), 0);
            for sub in 0..per_trace {
                if out.len() as u32 >= full {
                    return out.into();
                }
                out.push(xxh64(&sub.to_le_bytes(), chain));
            }
        }
        out.into()
    }

    /// Sum of input tokens.
    pub fn input_tokens(&self) -> u64 {
        self.requests.iter().map(|r| u64::from(r.input_tokens)).sum()
    }
}

const WORDS: [&str; 32] = [
    "alpha", "beta", "gamma", "delta", "model", "cache", "token", "prefix", "router", "pod", "queue",
    "kernel", "batch", "score", "value", "index", "data", "graph", "node", "state", "time", "rate", "load",
    "block", "query", "reply", "pool", "gpu", "memory", "layer", "head", "vector",
];

/// Append exactly `len` bytes of words determined by `id` alone.
fn block_text(id: u64, len: usize, out: &mut String) {
    let start = out.len();
    let mut x = xxh64(&id.to_le_bytes(), 0x7e47) | 1;
    while out.len() - start < len {
        // xorshift64: cheap, deterministic, good enough to vary the words.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(WORDS[(x & 31) as usize]);
        out.push(' ');
    }
    out.truncate(start + len);
}

/// Poisson arrivals: the next gap for `rate` per second, ns.
pub fn exponential_gap_ns(rng: &mut impl rand::Rng, rate: f64) -> u64 {
    let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    (-u.ln() / rate.max(1e-9) * 1e9) as u64
}

/// The chat body the replay (and the load generator's replay of it) sends for `req` asking for `model`: the workload's synthesized
/// prompt as one user message, streamed with usage (as the server sees a chat client).
pub fn chat_body(
    workload: &Workload,
    req: &TraceRequest,
    model: &str,
    text: &mut String,
    body: &mut Vec<u8>,
) {
    text.clear();
    workload.prompt_text(req, text);
    body.clear();
    body.extend_from_slice(b"{\"model\":\"");
    body.extend_from_slice(model.as_bytes());
    body.extend_from_slice(b"\",\"messages\":[{\"role\":\"user\",\"content\":\"");
    body.extend_from_slice(text.as_bytes());
    body.extend_from_slice(b"\"}],\"stream\":true,\"stream_options\":{\"include_usage\":true}}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(blocks: Vec<u64>, input: u32) -> TraceRequest {
        TraceRequest {
            arrival_ns: 0,
            input_tokens: input,
            output_tokens: 1,
            blocks,
            adapter: None,
            tenant: None,
        }
    }

    #[test]
    fn shared_block_ids_give_shared_text_and_shared_engine_hashes() {
        let w = Workload {
            name: "t".into(),
            block_tokens: 512,
            requests: vec![],
        };
        let a = req(vec![0, 1, 2], 1100);
        let b = req(vec![0, 1, 9], 1100);
        let (mut ta, mut tb) = (String::new(), String::new());
        w.prompt_text(&a, &mut ta);
        w.prompt_text(&b, &mut tb);
        assert_eq!(ta.len(), 4400);
        assert_eq!(ta[..4096], tb[..4096]);
        assert_ne!(ta[4096..], tb[4096..]);
        assert!(ta.bytes().all(|c| c.is_ascii_lowercase() || c == b' '));
        let (ha, hb) = (w.engine_hashes(&a, 16), w.engine_hashes(&b, 16));
        assert_eq!(ha.len(), 68, "1,100 tokens = 68 full 16-token blocks");
        assert_eq!(ha[..64], hb[..64]);
        assert_ne!(ha[64], hb[64]);
        // The same id at another position is another prefix.
        let c = req(vec![1], 512);
        assert_ne!(w.engine_hashes(&c, 16)[0], ha[32]);
    }
}
