//! The shared-docs trace in the simulator, for checking the engine model against real servers.
//!
//! `epp-bench shared-docs --simulate PROFILE` replays the very trace the real servers answered
//! (same arrivals, same prompts) through [`epp_sim::replay`] with the same configurations, on as
//! many simulated pods as there are servers, and reports both side by side.
//!
//! The prompts are the real ones as token ids: llama-server's own chat template and tokenizer
//! (`tokenize`, on a server of its own) turn each request into the tokens it computes. They become a workload of 16-token trace
//! blocks whose ids chain the block's tokens onto the previous id, so two prompts share block
//! ids exactly as far as they share tokens, rounded down to a block: the engine model's prefix
//! cache sees the sharing the servers' prompt caches see, and the EPP's prefix index sees text
//! that is equal exactly where the prompts are.

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde_json::{Value, json};
use xxhash_rust::xxh64::xxh64;

use super::{
    ConfigRun, SharedDocsArgs, server_config,
    trace::{Arrival, messages},
};
use epp_sim::{
    engine::EngineProfile,
    replay::{self, ReplaySetup, baselines, report::Report},
    workload::{TraceRequest, Workload},
};

use crate::{envoy::free_port, llama_server::LlamaServer};

/// Tokens per trace block of [`token_workload`] (the engine model's block size too).
pub const TRACE_BLOCK_TOKENS: u32 = 16;

/// One prompt of the trace as the server tokenizes it.
#[derive(Debug, Clone)]
pub struct TokenPrompt {
    /// Arrival, ns from the start.
    pub arrival_ns: u64,
    /// The prompt's tokens after the chat template.
    pub tokens: Vec<u32>,
    /// The document it asks about (for `--verbose`).
    pub doc: usize,
}

/// The workload of `prompts`: 16-token blocks, each id the hash of the block's tokens chained
/// onto the previous block's id (the last block may be partial), `output_tokens` each.
pub fn token_workload(name: &str, prompts: &[TokenPrompt], output_tokens: u32) -> Workload {
    let requests = prompts
        .iter()
        .map(|p| {
            let mut chain = 0u64;
            let blocks = p
                .tokens
                .chunks(TRACE_BLOCK_TOKENS as usize)
                .map(|chunk| {
                    let mut bytes = Vec::with_capacity(8 + 4 * chunk.len());
                    bytes.extend_from_slice(&chain.to_le_bytes());
                    for t in chunk {
                        bytes.extend_from_slice(&t.to_le_bytes());
                    }
                    chain = xxh64(&bytes, 0);
                    chain
                })
                .collect();
            TraceRequest {
                arrival_ns: p.arrival_ns,
                input_tokens: u32::try_from(p.tokens.len()).unwrap_or(u32::MAX),
                output_tokens,
                blocks,
                adapter: None,
                tenant: None,
            }
        })
        .collect();
    Workload::by_arrival(name, TRACE_BLOCK_TOKENS, requests)
}

/// POST `body` to a llama-server endpoint and read the JSON answer.
async fn post_json(client: &reqwest::Client, url: String, body: &Value) -> anyhow::Result<Value> {
    let resp = client
        .post(&url)
        .json(body)
        .send()
        .await
        .with_context(|| url.clone())?;
    let status = resp.status();
    let text = resp.text().await.with_context(|| url.clone())?;
    if !status.is_success() {
        bail!("{url}: {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{url}: not JSON"))
}

/// Every prompt of the trace as llama-server tokenizes it: its chat template
/// (`/apply-template`), then its tokenizer (`/tokenize` with the BOS token added and special
/// tokens parsed, as the chat endpoint does: the counts equal its `usage.prompt_tokens`), on a
/// server of its own.
pub(super) async fn tokenize(
    args: &SharedDocsArgs,
    bin: &std::path::Path,
    model: &std::path::Path,
    docs: &[String],
    arrivals: &[Arrival],
) -> anyhow::Result<Vec<TokenPrompt>> {
    let server = LlamaServer::start(bin, model, free_port()?, &server_config(args)).await?;
    let client = reqwest::Client::new();
    let mut prompts = Vec::with_capacity(arrivals.len());
    for a in arrivals {
        let templated = post_json(
            &client,
            format!("{}/apply-template", server.url()),
            &json!({"messages": messages(docs, a)}),
        )
        .await?;
        let prompt = templated["prompt"]
            .as_str()
            .ok_or_else(|| anyhow!("/apply-template answered without a prompt: {templated}"))?;
        let tokenized = post_json(
            &client,
            format!("{}/tokenize", server.url()),
            &json!({"content": prompt, "add_special": true, "parse_special": true}),
        )
        .await?;
        let tokens = tokenized["tokens"]
            .as_array()
            .ok_or_else(|| anyhow!("/tokenize answered without tokens"))?
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| anyhow!("/tokenize answered a token that is not a u32"))?;
        prompts.push(TokenPrompt {
            arrival_ns: u64::try_from(a.at.as_nanos()).unwrap_or(u64::MAX),
            tokens,
            doc: a.doc,
        });
    }
    Ok(prompts)
}

/// What the simulator made of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct SimRun {
    /// Config name as given.
    pub config: String,
    /// The replay's report (TTFT, prefix-hit rate, per-pod split).
    pub report: Report,
}

/// Replay `workload` once per configuration (`(name, spec)` as given to `--configs`) on `pods`
/// engines of `profile`. With `verbose_docs` (each request's document, in the workload's order)
/// every request is printed as the real runs print theirs.
///
/// # Errors
/// An unknown configuration or a replay that cannot run.
pub fn simulate(
    workload: &Workload,
    specs: &[String],
    profile: &EngineProfile,
    pods: usize,
    scrape_interval_ns: u64,
    seed: u64,
    verbose_docs: Option<&[usize]>,
) -> Result<Vec<SimRun>, String> {
    specs
        .iter()
        .map(|spec| {
            let (name, config) = baselines::resolve(spec)?;
            let setup = ReplaySetup {
                name: name.clone(),
                config,
                placement: baselines::placement(spec),
                pods,
                profile: profile.clone(),
                scrape_interval_ns,
                seed,
                start_unix_ms: 0,
            };
            let run = replay::replay(workload, &setup, |_| {}).map_err(|e| e.to_string())?;
            if let Some(docs) = verbose_docs {
                eprintln!("shared-docs: {name} (simulated)");
                for (r, doc) in run.records.iter().zip(docs) {
                    let ttft = r
                        .first_token_ns
                        .map_or(f64::NAN, |t| t.saturating_sub(r.arrival_ns) as f64 / 1e9);
                    eprintln!(
                        "  t={:7.1}s doc {doc} → pod {} ttft {ttft:6.2}s cached {}/{}",
                        r.arrival_ns as f64 / 1e9,
                        r.pod.map_or_else(|| "?".to_owned(), |p| p.to_string()),
                        r.cached_tokens,
                        r.prompt_tokens,
                    );
                }
            }
            Ok(SimRun {
                config: name,
                report: Report::from_run(&run),
            })
        })
        .collect()
}

/// 1-based ranks by mean TTFT (lowest first; ties keep the earlier config ahead).
fn ranks(means: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..means.len()).collect();
    order.sort_by(|&a, &b| means[a].total_cmp(&means[b]));
    let mut rank = vec![0; means.len()];
    for (r, i) in order.into_iter().enumerate() {
        rank[i] = r + 1;
    }
    rank
}

/// The fidelity verdict of a side-by-side comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fidelity {
    /// Whether the configurations rank in the same order by mean TTFT, real and simulated.
    pub same_ranking: bool,
    /// Simulated mean TTFT over the real one, per configuration in order.
    pub mean_ratio: Vec<f64>,
    /// How many of them are within 25 % of the real mean.
    pub within_25_percent: usize,
}

/// Compare the real runs with the simulated ones (matched by config name, in the real order).
pub fn fidelity(real: &[ConfigRun], sim: &[SimRun]) -> Option<Fidelity> {
    let pairs: Vec<(&ConfigRun, &SimRun)> = real
        .iter()
        .filter_map(|r| sim.iter().find(|s| s.config == r.config).map(|s| (r, s)))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let real_means: Vec<f64> = pairs.iter().map(|(r, _)| r.ttft.mean_s).collect();
    let sim_means: Vec<f64> = pairs.iter().map(|(_, s)| s.report.ttft.mean_s).collect();
    let mean_ratio: Vec<f64> = real_means
        .iter()
        .zip(&sim_means)
        .map(|(r, s)| if *r > 0.0 { s / r } else { f64::NAN })
        .collect();
    Some(Fidelity {
        same_ranking: ranks(&real_means) == ranks(&sim_means),
        within_25_percent: mean_ratio.iter().filter(|x| (0.75..=1.25).contains(*x)).count(),
        mean_ratio,
    })
}

/// A Markdown table: each configuration's real and simulated TTFT and cached share, the
/// simulated mean over the real one, and the rank of each by mean TTFT. Configurations without a
/// real run (`--sim-only`) show only the simulated columns.
pub fn side_by_side(real: &[ConfigRun], sim: &[SimRun]) -> String {
    let real_rank = ranks(&real.iter().map(|r| r.ttft.mean_s).collect::<Vec<_>>());
    let sim_rank = ranks(&sim.iter().map(|s| s.report.ttft.mean_s).collect::<Vec<_>>());
    let mut out = String::from(
        "| Config | TTFT mean real | sim | sim ÷ real | TTFT p50 real | sim | TTFT p90 real | sim | Cached real | sim | Rank real | sim |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let dash = || "–".to_owned();
    for (si, s) in sim.iter().enumerate() {
        let t = &s.report.ttft;
        let real_run = real.iter().position(|r| r.config == s.config);
        let (mean, ratio, p50, p90, cached, rank) = match real_run {
            Some(ri) => {
                let r = &real[ri];
                (
                    format!("{:.2} s", r.ttft.mean_s),
                    format!("{:.2}", t.mean_s / r.ttft.mean_s.max(1e-9)),
                    format!("{:.2} s", r.ttft.p50_s),
                    format!("{:.2} s", r.ttft.p90_s),
                    format!("{:.1} %", r.cached_share() * 100.0),
                    real_rank[ri].to_string(),
                )
            }
            None => (dash(), dash(), dash(), dash(), dash(), dash()),
        };
        out.push_str(&format!(
            "| {} | {mean} | {:.2} s | {ratio} | {p50} | {:.2} s | {p90} | {:.2} s | {cached} | {:.1} % | {rank} | {} |\n",
            s.config,
            t.mean_s,
            t.p50_s,
            t.p90_s,
            s.report.prefix_hit_rate * 100.0,
            sim_rank[si],
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use epp_sim::stats::Latency;

    fn prompt(at: u64, tokens: &[u32]) -> TokenPrompt {
        TokenPrompt {
            arrival_ns: at,
            tokens: tokens.to_vec(),
            doc: 0,
        }
    }

    #[test]
    fn prompts_share_block_ids_exactly_as_far_as_their_full_blocks_agree() {
        let doc: Vec<u32> = (0..40).collect();
        let mut a = doc.clone();
        a.extend([1000, 1001, 1002]);
        let mut b = doc.clone();
        b.extend([2000, 2001]);
        let mut c: Vec<u32> = doc.clone();
        c[20] = 9999; // differs inside the second block
        let w = token_workload("t", &[prompt(5, &a), prompt(1, &b), prompt(9, &c)], 8);
        assert_eq!(w.block_tokens, 16);
        // Sorted by arrival: b, a, c.
        let [b, a, c] = [&w.requests[0], &w.requests[1], &w.requests[2]];
        assert_eq!((a.input_tokens, b.input_tokens, c.input_tokens), (43, 42, 40));
        assert_eq!((a.blocks.len(), b.blocks.len(), c.blocks.len()), (3, 3, 3));
        assert_eq!(a.blocks[..2], b.blocks[..2]);
        assert_ne!(a.blocks[2], b.blocks[2]);
        assert_eq!(a.blocks[0], c.blocks[0]);
        assert_ne!(a.blocks[1], c.blocks[1]);
        // The engine model caches the 32 shared tokens (two full blocks) and no more.
        let (ha, hb) = (w.engine_hashes(a, 16), w.engine_hashes(b, 16));
        assert_eq!(ha.len(), 2);
        assert_eq!(ha, hb);
        assert_eq!(a.output_tokens, 8);
    }

    fn real(config: &str, mean: f64) -> ConfigRun {
        let ttft = Latency {
            mean_s: mean,
            p50_s: mean / 2.0,
            p90_s: mean * 2.0,
            ..Latency::default()
        };
        ConfigRun::example(config, ttft, &[(200, 1)], 50)
    }

    fn sim(config: &str, mean: f64) -> SimRun {
        SimRun {
            config: config.into(),
            report: Report {
                name: config.into(),
                ttft: Latency {
                    mean_s: mean,
                    p50_s: mean,
                    p90_s: mean,
                    ..Latency::default()
                },
                prefix_hit_rate: 0.25,
                ..Report::default()
            },
        }
    }

    #[test]
    fn fidelity_compares_rankings_and_counts_means_within_a_quarter() {
        let real_runs = [
            real("round-robin", 80.0),
            real("upstream-default", 2.0),
            real("recommended", 2.2),
        ];
        let same = [
            sim("round-robin", 50.0),
            sim("upstream-default", 1.9),
            sim("recommended", 2.2),
        ];
        let f = fidelity(&real_runs, &same).unwrap();
        assert!(f.same_ranking);
        // 50 / 80 is off by more than a quarter; 1.9 / 2 and 2.2 / 2.2 are within.
        assert_eq!(f.within_25_percent, 2);
        assert_eq!(f.mean_ratio, vec![0.625, 0.95, 1.0]);
        assert_eq!(f.mean_ratio.len(), 3);
        let swapped = [
            sim("round-robin", 60.0),
            sim("upstream-default", 2.3),
            sim("recommended", 2.1),
        ];
        let f = fidelity(&real_runs, &swapped).unwrap();
        assert!(!f.same_ranking);
        assert!(fidelity(&[], &same).is_none());
    }

    #[test]
    fn the_table_puts_real_and_simulated_side_by_side() {
        let table = side_by_side(
            &[real("round-robin", 80.0), real("recommended", 2.0)],
            &[
                sim("round-robin", 60.0),
                sim("recommended", 2.5),
                sim("oracle", 1.0),
            ],
        );
        assert!(
            table.contains("| round-robin | 80.00 s | 60.00 s | 0.75 | 40.00 s | 60.00 s | 160.00 s | 60.00 s | 50.0 % | 25.0 % | 2 | 3 |"),
            "{table}"
        );
        assert!(
            table.contains("| recommended | 2.00 s | 2.50 s | 1.25 |"),
            "{table}"
        );
        assert!(
            table.contains("| oracle | – | 1.00 s | – | – | 1.00 s |"),
            "{table}"
        );
    }
}
