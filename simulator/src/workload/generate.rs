//! Synthetic workloads and their knobs ([`GeneratorParams`]): shared-prefix groups (many users
//! behind few system prompts, the shape of llm-d's prefix-cache benchmark), multi-LoRA traffic
//! with Zipf-distributed adapter popularity, multi-tenant traffic, and a noisy neighbour (steady
//! tenants, one of which floods for a while). The routing suite's other kinds (document QA,
//! sessions, mixed lengths) are in [`super::suite`].
//!
//! All are seeded and use Poisson arrivals. Every prompt is whole blocks, so any shared prefix is
//! block-aligned.

use rand::{Rng, SeedableRng, rngs::SmallRng};
use xxhash_rust::xxh64::xxh64;

use super::{TraceRequest, Workload, exponential_gap_ns};

/// Trace block size of generated prompts (one engine block).
pub const BLOCK_TOKENS: u32 = 16;

/// Which generator, and its knobs.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct GeneratorParams {
    /// Requests to generate (noisy-neighbour: the steady traffic, about this many over
    /// `requests / rate` seconds; the flood comes on top).
    #[arg(long, default_value_t = 2_000)]
    pub requests: usize,
    /// Mean arrival rate, requests per second (Poisson; noisy-neighbour: of the steady traffic).
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
    /// multi-tenant / noisy-neighbour: tenants (`team-0` sends the most, or floods).
    #[arg(long, default_value_t = 4)]
    pub tenants: u32,
    /// noisy-neighbour: `team-0`'s rate during the flood, as a multiple of its steady share
    /// (1 = no flood). The flood only adds requests; the other tenants' are unchanged.
    #[arg(long, default_value_t = 10.0)]
    pub flood_factor: f64,
    /// noisy-neighbour: when the flood starts, as a fraction of the run (0..=1).
    #[arg(long, default_value_t = 0.25)]
    pub flood_start: f64,
    /// noisy-neighbour: when the flood ends, as a fraction of the run (0..=1).
    #[arg(long, default_value_t = 0.75)]
    pub flood_end: f64,
    /// noisy-neighbour: question tokens of the flood's requests (default: --question-tokens),
    /// for a flood of long prompts rather than many requests.
    #[arg(long)]
    pub flood_question_tokens: Option<u32>,
    /// doc-qa: documents in the corpus (popularity Zipf with --zipf).
    #[arg(long, default_value_t = 200)]
    pub documents: u32,
    /// doc-qa: tokens of each document.
    #[arg(long, default_value_t = 8_192)]
    pub document_tokens: u32,
    /// sessions: mean turns per session (uniform in 1..=2×turns−1).
    #[arg(long, default_value_t = 6)]
    pub turns: u32,
    /// sessions: mean seconds between a session's turns (exponential).
    #[arg(long, default_value_t = 10.0)]
    pub think_time: f64,
    /// mixed: share of long prompts (0..=1).
    #[arg(long, default_value_t = 0.2)]
    pub long_fraction: f64,
    /// mixed: tokens of a long prompt (short ones have --question-tokens).
    #[arg(long, default_value_t = 8_192)]
    pub long_tokens: u32,
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
            flood_factor: 10.0,
            flood_start: 0.25,
            flood_end: 0.75,
            flood_question_tokens: None,
            documents: 200,
            document_tokens: 8_192,
            turns: 6,
            think_time: 10.0,
            long_fraction: 0.2,
            long_tokens: 8_192,
        }
    }
}

impl GeneratorParams {
    /// Check the noisy-neighbour knobs: those of [`Self::check`] (the run lasts
    /// `requests / rate`), a flood factor of at least 1 (a flood never removes requests), and a window inside the run.
    ///
    /// # Errors
    /// A message naming the offending flag.
    pub fn check_noisy_neighbour(&self) -> Result<(), String> {
        self.check()?;
        if !(self.flood_factor >= 1.0 && self.flood_factor.is_finite()) {
            return Err(format!(
                "--flood-factor must be a number of at least 1, got {}",
                self.flood_factor
            ));
        }
        let fraction = |x: f64| (0.0..=1.0).contains(&x);
        if !(fraction(self.flood_start) && fraction(self.flood_end) && self.flood_start <= self.flood_end) {
            return Err(format!(
                "--flood-start and --flood-end must satisfy 0 <= start <= end <= 1, got {} and {}",
                self.flood_start, self.flood_end
            ));
        }
        Ok(())
    }

    /// Check the knobs every generator reads: a positive rate, and for `sessions` a finite
    /// think time, for `mixed` a share in 0..=1.
    ///
    /// # Errors
    /// A message naming the offending flag.
    pub fn check(&self) -> Result<(), String> {
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            return Err(format!("--rate must be a positive number, got {}", self.rate));
        }
        if !(self.think_time >= 0.0 && self.think_time.is_finite()) {
            return Err(format!(
                "--think-time must be a non-negative number of seconds, got {}",
                self.think_time
            ));
        }
        if !(0.0..=1.0).contains(&self.long_fraction) {
            return Err(format!(
                "--long-fraction must be between 0 and 1, got {}",
                self.long_fraction
            ));
        }
        if !(self.zipf >= 0.0 && self.zipf.is_finite()) {
            return Err(format!("--zipf must be a non-negative number, got {}", self.zipf));
        }
        Ok(())
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

pub(super) fn zipf_table(n: u32, s: f64) -> Vec<f64> {
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

pub(super) fn zipf_pick(cdf: &[f64], rng: &mut SmallRng) -> u32 {
    let u: f64 = rng.random();
    cdf.iter().position(|c| u < *c).unwrap_or(cdf.len() - 1) as u32
}

/// Arrival times of a Poisson process of `rate` per second in `[from_ns, to_ns)`.
fn poisson(rng: &mut SmallRng, rate: f64, from_ns: u64, to_ns: u64) -> Vec<u64> {
    let mut times = Vec::new();
    let mut t = from_ns;
    loop {
        t = t.saturating_add(exponential_gap_ns(rng, rate));
        if t >= to_ns {
            return times;
        }
        times.push(t);
    }
}

/// Stream of the noisy neighbour's flood RNG; tenant streams are tenant indices (`u32`).
const FLOOD_STREAM: u64 = u64::MAX;

/// An RNG of its own for each `stream` of a generator, so streams never shift each other.
fn stream_rng(seed: u64, stream: u64) -> SmallRng {
    SmallRng::seed_from_u64(xxh64(&stream.to_le_bytes(), seed))
}

/// `p.requests` Poisson arrivals at `p.rate`, ns.
pub(super) fn arrivals(p: &GeneratorParams, rng: &mut SmallRng) -> Vec<u64> {
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

impl Owner {
    /// First prefix key of this owner's system prompts. Distinct ranges, so an adapter's and a
    /// tenant's system prompts never coincide.
    fn prefix_base(self) -> u64 {
        match self {
            Self::Adapter => 1_000,
            Self::Tenant => 2_000,
        }
    }

    /// Request `question` (a key unique in the workload) of key `k` at `arrival_ns`: the key's
    /// own system prompt, then the question.
    fn request(self, p: &GeneratorParams, k: u32, question: u64, arrival_ns: u64) -> TraceRequest {
        let (input, blocks) = prompt(
            u64::from(k) + self.prefix_base(),
            p.prefix_tokens,
            question,
            p.question_tokens,
        );
        let (adapter, tenant) = match self {
            Self::Adapter => (Some(format!("lora-{k}").into()), None),
            Self::Tenant => (None, Some(format!("team-{k}").into())),
        };
        TraceRequest {
            arrival_ns,
            input_tokens: input,
            output_tokens: p.output_tokens.max(1),
            blocks,
            adapter,
            tenant,
        }
    }
}

/// Requests keyed by a Zipf-distributed `k`: the key's own system prompt, then a unique question.
fn zipf_keyed(p: &GeneratorParams, seed: u64, owner: Owner) -> Workload {
    let (keys, name) = match owner {
        Owner::Adapter => (p.adapters, "multi-lora"),
        Owner::Tenant => (p.tenants, "multi-tenant"),
    };
    let mut rng = SmallRng::seed_from_u64(seed);
    let cdf = zipf_table(keys, p.zipf);
    let times = arrivals(p, &mut rng);
    let requests = times
        .into_iter()
        .enumerate()
        .map(|(i, t)| owner.request(p, zipf_pick(&cdf, &mut rng), i as u64, t))
        .collect();
    Workload {
        name: name.into(),
        block_tokens: BLOCK_TOKENS,
        requests,
    }
}

/// Noisy neighbour: `tenants` tenants (`team-0`, …) each send their own system prompt plus a
/// unique question at a steady Poisson rate of `rate / tenants` for `requests / rate` seconds
/// (so about `requests` steady requests in all); from `flood_start` to `flood_end` of that run,
/// `team-0` sends `flood_factor` times its share.
///
/// Each tenant's steady arrivals come from its own RNG, seeded from (`seed`, tenant), and the
/// flood's extra `team-0` requests from another, and the steady requests are numbered before the
/// flood's. So the flood only adds requests: with `flood_factor` 1 the workload is exactly the
/// steady traffic of any other flood factor, and a report can compare the quiet tenants' fate
/// request for request. Parameters are not checked here (see
/// [`GeneratorParams::check_noisy_neighbour`]): a rate that is not positive gives no requests,
/// a flood factor below 1 no flood.
pub fn noisy_neighbour(p: &GeneratorParams, seed: u64) -> Workload {
    let tenants = p.tenants.max(1);
    let duration_ns = if p.rate > 0.0 && p.rate.is_finite() {
        (p.requests as f64 / p.rate * 1e9) as u64
    } else {
        0
    };
    let share = p.rate / f64::from(tenants);
    // Questions are numbered in generation order, steady traffic first, so a steady request's
    // prompt does not depend on the flood either.
    let mut requests = Vec::new();
    for k in 0..tenants {
        let mut rng = stream_rng(seed, u64::from(k));
        for t in poisson(&mut rng, share, 0, duration_ns) {
            requests.push(Owner::Tenant.request(p, k, requests.len() as u64, t));
        }
    }
    let extra = share * (p.flood_factor - 1.0);
    if extra > 0.0 && extra.is_finite() {
        let at = |fraction: f64| (duration_ns as f64 * fraction.clamp(0.0, 1.0)) as u64;
        let mut rng = stream_rng(seed, FLOOD_STREAM);
        let flood = GeneratorParams {
            question_tokens: p.flood_question_tokens.unwrap_or(p.question_tokens),
            ..p.clone()
        };
        for t in poisson(&mut rng, extra, at(p.flood_start), at(p.flood_end)) {
            requests.push(Owner::Tenant.request(&flood, 0, requests.len() as u64, t));
        }
    }
    Workload::by_arrival("noisy-neighbour", BLOCK_TOKENS, requests)
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

    /// `--flood-question-tokens` lengthens the flood's requests only.
    #[test]
    fn a_flood_of_long_prompts_changes_only_the_flood() {
        let p = GeneratorParams {
            requests: 400,
            rate: 40.0,
            flood_factor: 3.0,
            flood_question_tokens: Some(4_096),
            ..GeneratorParams::default()
        };
        let w = noisy_neighbour(&p, 3);
        let calm = noisy_neighbour(
            &GeneratorParams {
                flood_factor: 1.0,
                ..p.clone()
            },
            3,
        );
        let long = 2_048 + 4_096;
        let flood: Vec<_> = w.requests.iter().filter(|r| r.input_tokens == long).collect();
        assert!(!flood.is_empty());
        assert!(flood.iter().all(|r| tenant(r) == "team-0"));
        assert_eq!(w.requests.len(), calm.requests.len() + flood.len());
        assert!(calm.requests.iter().all(|r| r.input_tokens == 2_048 + 128));
    }

    fn tenant(r: &TraceRequest) -> &str {
        r.tenant.as_deref().unwrap_or("-")
    }

    #[test]
    fn the_flood_only_adds_team_0_requests() {
        let p = |flood_factor| GeneratorParams {
            requests: 400,
            flood_factor,
            ..Default::default()
        };
        let quiet = noisy_neighbour(&p(1.0), 7);
        let loud = noisy_neighbour(&p(10.0), 7);
        assert_eq!(quiet, noisy_neighbour(&p(1.0), 7));
        assert!(
            loud.requests
                .windows(2)
                .all(|w| w[0].arrival_ns <= w[1].arrival_ns)
        );
        // The quiet tenants' requests are identical, prompts included.
        let others = |w: &Workload| -> Vec<TraceRequest> {
            w.requests
                .iter()
                .filter(|r| tenant(r) != "team-0")
                .cloned()
                .collect()
        };
        assert_eq!(others(&quiet), others(&loud));
        // Everything of the unflooded run is in the flooded one, in order; the rest is team-0's
        // and inside the window (25 % .. 75 % of 400 / 20 = 20 s).
        let mut loud_iter = loud.requests.iter();
        let mut added = Vec::new();
        for r in &quiet.requests {
            loop {
                let next = loud_iter
                    .next()
                    .expect("every unflooded request is in the flooded run");
                if next == r {
                    break;
                }
                added.push(next);
            }
        }
        added.extend(loud_iter);
        assert!(!added.is_empty());
        assert!(added.iter().all(|r| tenant(r) == "team-0"));
        assert!(
            added
                .iter()
                .all(|r| (5_000_000_000..15_000_000_000).contains(&r.arrival_ns))
        );
        // Every prompt is a tenant's system prompt plus a question of its own.
        let tails: std::collections::BTreeSet<u64> = loud.requests.iter().map(|r| r.blocks[128]).collect();
        assert_eq!(tails.len(), loud.requests.len());
        let prefixes: std::collections::BTreeSet<(&str, u64)> =
            loud.requests.iter().map(|r| (tenant(r), r.blocks[0])).collect();
        assert_eq!(prefixes.len(), 4);
    }

    #[test]
    fn noisy_neighbour_rates_follow_the_flood_window() {
        // 100 s at 20/s over 4 tenants: 5/s each; team-0 at 50/s from 25 s to 75 s.
        let w = noisy_neighbour(&GeneratorParams::default(), 3);
        let count = |name: &str, from_s: u64, to_s: u64| {
            w.requests
                .iter()
                .filter(|r| {
                    tenant(r) == name
                        && (from_s * 1_000_000_000..to_s * 1_000_000_000).contains(&r.arrival_ns)
                })
                .count() as f64
        };
        // Poisson counts: within four standard deviations.
        let within = |x: f64, expected: f64| (x - expected).abs() < 4.0 * expected.sqrt();
        for k in 1..4 {
            let n = count(&format!("team-{k}"), 0, 100);
            assert!(within(n, 500.0), "team-{k}: {n}");
        }
        let (before, during, after) = (
            count("team-0", 0, 25),
            count("team-0", 25, 75),
            count("team-0", 75, 100),
        );
        assert!(within(before, 125.0), "{before}");
        assert!(within(during, 2_500.0), "{during}");
        assert!(within(after, 125.0), "{after}");
        assert!(w.requests.last().is_some_and(|r| r.arrival_ns < 100_000_000_000));
    }

    #[test]
    fn noisy_neighbour_flags_are_checked() {
        let ok = GeneratorParams::default();
        assert_eq!(ok.check_noisy_neighbour(), Ok(()));
        for bad in [
            GeneratorParams {
                flood_factor: 0.5,
                ..ok.clone()
            },
            GeneratorParams {
                flood_factor: f64::NAN,
                ..ok.clone()
            },
            GeneratorParams {
                rate: 0.0,
                ..ok.clone()
            },
            GeneratorParams {
                flood_start: 0.8,
                ..ok.clone()
            },
            GeneratorParams {
                flood_end: 1.5,
                ..ok.clone()
            },
        ] {
            assert!(bad.check_noisy_neighbour().is_err(), "{bad:?}");
        }
    }
}
