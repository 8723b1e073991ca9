//! Synthetic workloads: shared-prefix groups (the shape of llm-d's prefix-cache benchmark),
//! multi-LoRA traffic with Zipf-distributed adapter popularity, and multi-tenant traffic. All
//! are seeded and use Poisson arrivals.

use rand::{Rng, SeedableRng, rngs::SmallRng};

use super::{TraceRequest, Workload, exponential_gap_ns};

/// Trace block size of generated prompts (one engine block).
pub const BLOCK_TOKENS: u32 = 16;

/// Which generator, and its knobs.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct GeneratorParams {
    /// Requests to generate.
    #[arg(long, default_value_t = 2_000)]
    pub requests: usize,
    /// Mean arrival rate, requests per second (Poisson).
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// shared-prefix: prompt groups, each with its own system prompt.
    #[arg(long, default_value_t = 8)]
    pub groups: u32,
    /// Tokens of each group's (or tenant's) shared system prompt.
    #[arg(long, default_value_t = 2_048)]
    pub prefix_tokens: u32,
    /// shared-prefix: distinct questions (users) per group.
    #[arg(long, default_value_t = 32)]
    pub users: u32,
    /// Tokens of each question (the unshared tail).
    #[arg(long, default_value_t = 128)]
    pub question_tokens: u32,
    /// Output tokens per request.
    #[arg(long, default_value_t = 128)]
    pub output_tokens: u32,
    /// multi-lora: adapters (`lora-0` is the most popular).
    #[arg(long, default_value_t = 8)]
    pub adapters: u32,
    /// multi-lora / multi-tenant: Zipf exponent of popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// multi-tenant: tenants (`team-0` sends the most).
    #[arg(long, default_value_t = 4)]
    pub tenants: u32,
}

impl Default for GeneratorParams {
    fn default() -> Self {
        Self {
            requests: 2_000,
            rate: 20.0,
            groups: 8,
            prefix_tokens: 2_048,
            users: 32,
            question_tokens: 128,
            output_tokens: 128,
            adapters: 8,
            zipf: 1.0,
            tenants: 4,
        }
    }
}

/// Prompts made of a shared prefix and a tail, in generated block ids.
fn prompt(prefix_key: u64, prefix_tokens: u32, tail_key: u64, tail_tokens: u32) -> (u32, Vec<u64>) {
    let prefix_blocks = prefix_tokens.div_ceil(BLOCK_TOKENS);
    let tail_blocks = tail_tokens.div_ceil(BLOCK_TOKENS).max(1);
    let mut blocks = Vec::with_capacity((prefix_blocks + tail_blocks) as usize);
    blocks.extend((0..u64::from(prefix_blocks)).map(|b| (1 << 61) | (prefix_key << 24) | b));
    blocks.extend((0..u64::from(tail_blocks)).map(|b| (1 << 60) | (tail_key << 24) | b));
    // Whole blocks, so every shared prefix is block-aligned.
    ((prefix_blocks + tail_blocks) * BLOCK_TOKENS, blocks)
}

fn zipf_table(n: u32, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = (1..=n.max(1))
        .map(|k| {
            acc += 1.0 / f64::from(k).powf(s);
            acc
        })
        .collect();
    for c in &mut cdf {
        *c /= acc;
    }
    cdf
}

fn zipf_pick(cdf: &[f64], rng: &mut SmallRng) -> u32 {
    let u: f64 = rng.random();
    cdf.iter().position(|c| u < *c).unwrap_or(cdf.len() - 1) as u32
}

fn arrivals(p: &GeneratorParams, rng: &mut SmallRng) -> Vec<u64> {
    let mut t = 0;
    (0..p.requests)
        .map(|_| {
            t += exponential_gap_ns(rng, p.rate);
            t
        })
        .collect()
}

/// Shared-prefix groups: each request is one of `groups × users` prompts (group system prompt +
/// that user's question), chosen uniformly.
pub fn shared_prefix(p: &GeneratorParams, seed: u64) -> Workload {
    let mut rng = SmallRng::seed_from_u64(seed);
    let times = arrivals(p, &mut rng);
    let requests = times
        .into_iter()
        .map(|t| {
            let g = rng.random_range(0..p.groups.max(1));
            let u = rng.random_range(0..p.users.max(1));
            let (input, blocks) = prompt(
                u64::from(g),
                p.prefix_tokens,
                (u64::from(g) << 20) | u64::from(u),
                p.question_tokens,
            );
            TraceRequest {
                arrival_ns: t,
                input_tokens: input,
                output_tokens: p.output_tokens.max(1),
                blocks,
                adapter: None,
                tenant: None,
            }
        })
        .collect();
    Workload {
        name: "shared-prefix".into(),
        block_tokens: BLOCK_TOKENS,
        requests,
    }
}

/// Multi-LoRA: every request asks for adapter `lora-k`, k Zipf-distributed; prompts share a
/// per-adapter system prompt and end in a unique question.
pub fn multi_lora(p: &GeneratorParams, seed: u64) -> Workload {
    zipf_keyed(p, seed, Owner::Adapter)
}

/// Multi-tenant: tenant `team-k` (Zipf share) sends its own system prompt plus a unique question.
pub fn multi_tenant(p: &GeneratorParams, seed: u64) -> Workload {
    zipf_keyed(p, seed, Owner::Tenant)
}

/// What the Zipf-distributed key of a request names.
#[derive(Debug, Clone, Copy)]
enum Owner {
    /// A LoRA adapter, `lora-k`.
    Adapter,
    /// A tenant, `team-k`.
    Tenant,
}

/// Requests keyed by a Zipf-distributed `k`: the key's own system prompt, then a unique question.
fn zipf_keyed(p: &GeneratorParams, seed: u64, owner: Owner) -> Workload {
    // Distinct prefix-key ranges, so an adapter's and a tenant's system prompts never coincide.
    let (keys, prefix_base, name) = match owner {
        Owner::Adapter => (p.adapters, 1_000, "multi-lora"),
        Owner::Tenant => (p.tenants, 2_000, "multi-tenant"),
    };
    let mut rng = SmallRng::seed_from_u64(seed);
    let cdf = zipf_table(keys, p.zipf);
    let times = arrivals(p, &mut rng);
    let requests = times
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let k = zipf_pick(&cdf, &mut rng);
            let (input, blocks) = prompt(
                u64::from(k) + prefix_base,
                p.prefix_tokens,
                i as u64,
                p.question_tokens,
            );
            let (adapter, tenant) = match owner {
                Owner::Adapter => (Some(format!("lora-{k}").into()), None),
                Owner::Tenant => (None, Some(format!("team-{k}").into())),
            };
            TraceRequest {
                arrival_ns: t,
                input_tokens: input,
                output_tokens: p.output_tokens.max(1),
                blocks,
                adapter,
                tenant,
            }
        })
        .collect();
    Workload {
        name: name.into(),
        block_tokens: BLOCK_TOKENS,
        requests,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_seeded_and_shaped_as_asked() {
        let p = GeneratorParams {
            requests: 500,
            ..Default::default()
        };
        let a = shared_prefix(&p, 1);
        assert_eq!(a, shared_prefix(&p, 1));
        assert_ne!(a, shared_prefix(&p, 2));
        assert_eq!(a.requests.len(), 500);
        assert!(a.requests.windows(2).all(|w| w[0].arrival_ns <= w[1].arrival_ns));
        assert_eq!(a.requests[0].input_tokens, 2_048 + 128);
        let groups: std::collections::BTreeSet<u64> = a.requests.iter().map(|r| r.blocks[0]).collect();
        assert_eq!(groups.len(), 8);
        let mean_gap_s = a.requests[499].arrival_ns as f64 / 500.0 / 1e9;
        assert!((0.04..0.06).contains(&mean_gap_s), "{mean_gap_s}");

        let l = multi_lora(&p, 1);
        let top = l
            .requests
            .iter()
            .filter(|r| r.adapter.as_deref() == Some("lora-0"))
            .count();
        let last = l
            .requests
            .iter()
            .filter(|r| r.adapter.as_deref() == Some("lora-7"))
            .count();
        assert!(top > 3 * last, "Zipf: {top} vs {last}");
        let t = multi_tenant(&p, 1);
        assert!(
            t.requests
                .iter()
                .all(|r| r.tenant.as_deref().is_some_and(|n| n.starts_with("team-")))
        );
    }
}
