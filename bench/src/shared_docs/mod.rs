//! `epp-bench shared-docs`: a real-hardware benchmark with real model servers.
//!
//! Several `llama-server` processes (llama.cpp serving Gemma 3 270M on the CPU) sit behind a real
//! Envoy and the EPP. The workload is document question answering: a handful of long documents
//! (about 3k tokens each), many short questions about them, arriving as a seeded Poisson process.
//! A question about a document whose KV cache a server already holds costs that server a few
//! dozen prompt tokens; anywhere else it costs the whole document. The same trace runs once per
//! EPP config, each time on freshly started servers (cold caches), and the report gives time to
//! first token, throughput and the share of prompt tokens the servers themselves report as cached
//! (`usage.prompt_tokens_details.cached_tokens`).
//!
//! Each server's cache is deliberately small, as a GPU server keeps only part of a large working
//! set: one slot (`-np 1`, so a question about a document that is still being prefilled waits for
//! it instead of prefilling it a second time) and a small host-memory prompt cache
//! (`--cache-ram`, 64 MiB by default). The slot's prompt is saved there before the next request
//! is looked up, evicting the oldest entries past the limit, so the number of documents a server
//! keeps is the number of entries that fit: a 3k-token document is a 16.5 MiB entry, a 1k-token
//! one 10.5 MiB at `--ctx 2048` (`--cache-ram-mib 24` keeps two of those; measure with
//! `scripts/calibrate-llamacpp.py`). Sized so that a server keeps fewer documents than there
//! are, the pool keeps them all only if each document stays on one server.
//! `--swa-full` keeps Gemma's sliding-window layers whole, so a cached document is its plain KV
//! state rather than a set of checkpoints.
//! With llama.cpp's defaults (8 GiB prompt cache, several slots) every server would soon hold
//! every document of this small workload, and routing would only matter during the warm-up.
//!
//! With `--simulate PROFILE` the same trace, tokenized by llama-server itself, is also replayed
//! in the simulator with the same configurations ([`simulated`]), and both are reported side by
//! side: the check of the engine model against real servers. `--sim-only` skips the real runs.

pub mod simulated;
mod trace;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use epp::{
    config::{EndpointPickerConfig, Flags, normalize_go_args},
    scheduler::build_scheduler,
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use epp_sim::{engine::EngineProfile, replay::baselines, stats::Latency};

use crate::{
    envoy::{Envoy, EnvoyPorts, free_port, render_config, wait_until_scraped},
    llama_server::{LlamaServer, LlamaServerConfig, gemma_model, llama_server_binary},
};
use simulated::{Fidelity, SimRun};
use trace::{Arrival, document, messages, trace};

/// Options of `epp-bench shared-docs`.
#[derive(clap::Args, Debug, Clone)]
pub struct SharedDocsArgs {
    /// llama-server processes behind Envoy.
    #[arg(long, default_value_t = 3)]
    pub servers: usize,
    /// Documents questions are asked about.
    #[arg(long, default_value_t = 4)]
    pub docs: usize,
    /// Approximate length of each document in tokens.
    #[arg(long, default_value_t = 3000)]
    pub doc_tokens: usize,
    /// Questions sent per config.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Mean arrival rate in requests per second (Poisson arrivals).
    #[arg(long, default_value_t = 0.5)]
    pub rate: f64,
    /// Output tokens per answer.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: u32,
    /// Seed of the documents, the questions and the arrival times.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// EPP configs to compare, in order: shipped configs by name (`round-robin`,
    /// `upstream-default`, `recommended`, `sticky`, ...; see `simulator/configs/`) or
    /// `NAME=FILE` for an `EndpointPickerConfig` file. The first is the baseline of "Gain".
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "round-robin,upstream-default,recommended"
    )]
    pub configs: Vec<String>,
    /// Parallel slots per server (`-np`).
    #[arg(long, default_value_t = 1)]
    pub parallel: u32,
    /// CPU threads per server (`-t`).
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// Context per server (`-c`), shared by its slots.
    #[arg(long, default_value_t = 8192)]
    pub ctx: u32,
    /// Host-memory prompt cache per server in MiB (`--cache-ram`; 0 = only what the slots hold).
    /// The documents it keeps are as many as their entries fit (see the module doc).
    #[arg(long, default_value_t = 64)]
    pub cache_ram_mib: u32,
    /// Directory the Gemma GGUF is assembled into when `$GEMMA_GGUF` is not set.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// The EPP's scrape period (Go duration).
    #[arg(long, default_value = "50ms")]
    pub refresh_metrics_interval: String,
    /// Give up on a request after this many seconds (counted as an error).
    #[arg(long, default_value_t = 3600)]
    pub request_timeout: u64,
    /// Envoy's stream and route idle timeouts in seconds (the shipped config has 300), so that
    /// the long waits of an overloaded config are measured rather than cut.
    #[arg(long, default_value_t = 3600)]
    pub envoy_idle_timeout: u64,
    /// Print every request as it completes: arrival, document, picked server, TTFT, cached.
    #[arg(long)]
    pub verbose: bool,
    /// Also replay the trace in the simulator on this engine profile (a preset or a profile
    /// file, e.g. `simulator/profiles/llamacpp-gemma3-270m-cpu.yaml`), one simulated pod per
    /// server, and report real and simulated side by side.
    #[arg(long, value_name = "PROFILE")]
    pub simulate: Option<String>,
    /// With `--simulate`: skip the real runs (llama-server still tokenizes the prompts).
    #[arg(long, requires = "simulate")]
    pub sim_only: bool,
}

/// Results of one config.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigRun {
    /// Config name as given.
    pub config: String,
    /// Requests answered with 200 and a complete stream.
    pub completed: usize,
    /// Requests that failed (status, transport, timeout).
    pub errors: usize,
    /// Requests per HTTP status (0: transport error or client timeout).
    pub status: BTreeMap<u16, usize>,
    /// Time to first token of completed requests (client side, through Envoy).
    pub ttft: Latency,
    /// End-to-end latency of completed requests.
    pub e2e: Latency,
    /// First arrival to last completion, seconds.
    pub makespan_s: f64,
    /// Completed requests per second over the makespan.
    pub throughput_rps: f64,
    /// Generated tokens per second over the makespan.
    pub output_tokens_per_s: f64,
    /// Prompt tokens the servers reported in the answers (sum of `usage.prompt_tokens`).
    pub prompt_tokens: u64,
    /// Of which cached (sum of `usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: u64,
    /// Prompt tokens each server had to compute (its `llamacpp:prompt_tokens_total`), thousands.
    pub prefill_ktokens_per_server: Vec<f64>,
}

impl ConfigRun {
    /// A run for tests of the reports: 100 prompt tokens of which `cached`, two servers.
    #[cfg(test)]
    fn example(config: &str, ttft: Latency, status: &[(u16, usize)], cached: u64) -> Self {
        Self {
            config: config.into(),
            completed: status.iter().filter(|(c, _)| *c == 200).map(|(_, n)| n).sum(),
            errors: status.iter().filter(|(c, _)| *c != 200).map(|(_, n)| n).sum(),
            status: status.iter().copied().collect(),
            ttft,
            e2e: Latency::default(),
            makespan_s: 1.0,
            throughput_rps: 1.0,
            output_tokens_per_s: 8.0,
            prompt_tokens: 100,
            cached_tokens: cached,
            prefill_ktokens_per_server: vec![3.0, 3.0],
        }
    }

    /// Cached share of prompt tokens.
    pub fn cached_share(&self) -> f64 {
        self.cached_tokens as f64 / self.prompt_tokens.max(1) as f64
    }
}

/// The benchmark's report.
#[derive(Debug, Clone, Serialize)]
pub struct SharedDocsReport {
    /// What ran.
    pub servers: usize,
    /// Documents.
    pub docs: usize,
    /// Mean prompt tokens per request, as the servers counted them.
    pub mean_prompt_tokens: usize,
    /// Requests per config.
    pub requests: usize,
    /// Arrival rate.
    pub rate: f64,
    /// Output tokens per answer.
    pub max_tokens: u32,
    /// Seed.
    pub seed: u64,
    /// One entry per config, in the order run (empty with `--sim-only`).
    pub runs: Vec<ConfigRun>,
    /// The engine profile of the simulated runs (`--simulate`).
    pub profile: Option<String>,
    /// The same trace in the simulator, one entry per config (`--simulate`).
    pub simulated: Vec<SimRun>,
    /// How the simulated runs compare with the real ones.
    pub fidelity: Option<Fidelity>,
    /// Prompts whose token count (llama-server's template and tokenizer, the simulator's input)
    /// differs from the `usage.prompt_tokens` a server reported for them in a real run.
    pub token_count_mismatches: Option<usize>,
}

impl SharedDocsReport {
    /// A Markdown table of the runs. "Gain" is the first config's mean TTFT divided by this one's.
    pub fn table(&self) -> String {
        let base = self.runs.first().map_or(0.0, |r| r.ttft.mean_s);
        let mut out = String::from(
            "| Config | OK | Errors | TTFT p50 | TTFT p90 | TTFT mean | Gain | E2E mean | Throughput | Output tok/s | Cached share | Prefill per server (k tokens) |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.runs {
            let ratio = if r.ttft.mean_s > 0.0 {
                base / r.ttft.mean_s
            } else {
                0.0
            };
            let failures: Vec<String> = r
                .status
                .iter()
                .filter(|(code, _)| **code != 200)
                .map(|(code, n)| format!("{code}×{n}"))
                .collect();
            let errors = if failures.is_empty() {
                r.errors.to_string()
            } else {
                format!("{} ({})", r.errors, failures.join(", "))
            };
            let split: Vec<String> = r
                .prefill_ktokens_per_server
                .iter()
                .map(|k| format!("{k:.0}"))
                .collect();
            out.push_str(&format!(
                "| {} | {} | {} | {:.2} s | {:.2} s | {:.2} s | {:.1}× | {:.2} s | {:.2} req/s | {:.1} | {:.1} % | {} |\n",
                r.config,
                r.completed,
                errors,
                r.ttft.p50_s,
                r.ttft.p90_s,
                r.ttft.mean_s,
                ratio,
                r.e2e.mean_s,
                r.throughput_rps,
                r.output_tokens_per_s,
                r.cached_share() * 100.0,
                split.join(" / ")
            ));
        }
        out
    }
}

impl SharedDocsReport {
    /// The real and simulated runs side by side with the fidelity verdict (`--simulate`), or
    /// nothing.
    pub fn simulated_table(&self) -> Option<String> {
        let profile = self.profile.as_deref()?;
        let mut out = format!(
            "Simulated on {} pods of engine profile {profile}:\n\n",
            self.servers
        );
        out.push_str(&simulated::side_by_side(&self.runs, &self.simulated));
        if let Some(f) = &self.fidelity {
            out.push_str(&format!(
                "\nSame ranking by mean TTFT: {}. Simulated mean TTFT within 25 % of the real one: {} of {}.\n",
                if f.same_ranking { "yes" } else { "no" },
                f.within_25_percent,
                f.mean_ratio.len()
            ));
        }
        if let Some(n) = self.token_count_mismatches {
            out.push_str(&format!(
                "Prompts whose tokenized length differs from the servers' usage.prompt_tokens: {n}.\n"
            ));
        }
        Some(out)
    }
}

/// What one request saw.
#[derive(Debug, Clone, Default)]
struct Outcome {
    /// Position of the request in the trace.
    index: usize,
    ok: bool,
    /// HTTP status (0: transport error or client timeout).
    status: u16,
    /// The endpoint the EPP picked (from its `x-epp-decision` explanation).
    server: Option<String>,
    ttft: Option<Duration>,
    done_at: Duration,
    latency: Duration,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
}

/// Send one streaming chat request and time its first content token.
async fn ask(client: &reqwest::Client, url: &str, body: String, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let mut out = Outcome::default();
    let attempt = async {
        let mut resp = client
            .post(url)
            .header("content-type", "application/json")
            .header("x-epp-debug", "1")
            .body(body)
            .send()
            .await
            .ok()?;
        out.status = resp.status().as_u16();
        if !resp.status().is_success() {
            return None;
        }
        out.server = resp
            .headers()
            .get("x-epp-decision")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split("winner ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .map(str::to_owned);
        let mut done = false;
        let mut on_event = |event: &[u8]| {
            let text = String::from_utf8_lossy(event);
            let Some(data) = text.trim().strip_prefix("data:") else {
                return;
            };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                return;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                return;
            };
            let has_text = v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty());
            if has_text && out.ttft.is_none() {
                out.ttft = Some(started.elapsed());
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                out.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                out.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
                out.cached_tokens = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
            }
        };
        // The core's splitter: events end at a blank line after `\n` or `\r\n` line endings.
        let mut events = epp::parser::EventSplitter::default();
        while let Some(chunk) = resp.chunk().await.ok()? {
            events.feed_with(&chunk, false, &mut on_event);
        }
        events.feed_with(b"", true, &mut on_event);
        Some(done)
    };
    let finished = tokio::time::timeout(timeout, attempt).await;
    out.latency = started.elapsed();
    out.ok = matches!(finished, Ok(Some(true))) && out.ttft.is_some();
    out
}

/// The YAML of `spec` for a real run: a shipped baseline by name (`simulator/configs/`, or
/// `upstream-default`), or `NAME=FILE`. The oracle exists only in the simulator.
fn config_text(spec: &str) -> anyhow::Result<(String, String)> {
    if spec == baselines::ORACLE {
        bail!(
            "config oracle reads each simulated engine's true state and exists only in the simulator: use it with --simulate PROFILE --sim-only"
        );
    }
    baselines::resolve_text(spec).map_err(|e| anyhow!(e))
}

/// Sum of one counter family on a llama-server's `/metrics` page.
async fn server_counter(client: &reqwest::Client, server: &LlamaServer, name: &str) -> f64 {
    let Ok(resp) = client.get(format!("{}/metrics", server.url())).send().await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    let mut sum = 0.0;
    epp::scrape::exposition::for_each_sample(&text, |s| {
        if s.name == name {
            sum += s.value;
        }
    });
    sum
}

struct Fleet {
    servers: Vec<LlamaServer>,
}

pub(super) fn server_config(args: &SharedDocsArgs) -> LlamaServerConfig {
    LlamaServerConfig {
        ctx: args.ctx,
        parallel: args.parallel,
        threads: args.threads,
        alias: Some("gemma-3-270m".into()),
        cache_ram_mib: Some(args.cache_ram_mib),
        swa_full: true,
    }
}

async fn start_fleet(
    args: &SharedDocsArgs,
    bin: &std::path::Path,
    model: &std::path::Path,
) -> anyhow::Result<Fleet> {
    let config = server_config(args);
    let mut servers = Vec::with_capacity(args.servers);
    for _ in 0..args.servers {
        servers.push(LlamaServer::start(bin, model, free_port()?, &config).await?);
    }
    Ok(Fleet { servers })
}

async fn run_config(
    args: &SharedDocsArgs,
    (name, text): &(String, String),
    bin: &std::path::Path,
    model: &std::path::Path,
    docs: &Arc<Vec<String>>,
    arrivals: &[Arrival],
) -> anyhow::Result<(ConfigRun, Vec<(usize, u64)>)> {
    let fleet = start_fleet(args, bin, model).await?;
    let endpoints: Vec<String> = fleet
        .servers
        .iter()
        .map(|s| format!("{}@llamacpp", s.endpoint()))
        .collect();
    let grpc = free_port()?;
    let mut flags = vec![
        "epp".to_owned(),
        format!("--endpoints={}", endpoints.join(",")),
        format!("--grpc-port={grpc}"),
        format!("--grpc-health-port={}", free_port()?),
        format!("--metrics-port={}", free_port()?),
        // Measured as the other load figures are: without exporting traces to stdout.
        "--tracing=false".to_owned(),
        format!("--refresh-metrics-interval={}", args.refresh_metrics_interval),
        "--explain-decisions".to_owned(),
    ];
    flags.push(format!("--config-text={text}"));
    let flags = <Flags as clap::Parser>::try_parse_from(normalize_go_args(flags))?;
    let app = epp::app::start(flags)
        .await
        .with_context(|| format!("starting the EPP with config {name}"))?;
    if !wait_until_scraped(&app.reader, args.servers, Duration::from_secs(10)).await {
        bail!("the EPP did not scrape every llama-server within 10 s");
    }
    let ports = EnvoyPorts {
        listener: free_port()?,
        admin: free_port()?,
        epp: grpc,
    };
    // The shipped config's 300 s idle timeouts would cut the longest waits short and hide them;
    // everything else is as shipped.
    let idle = format!(": {}s", args.envoy_idle_timeout);
    let envoy = Envoy::start_with_config(ports, render_config(ports).replace(": 300s", &idle)).await?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let url = format!("{}/v1/chat/completions", envoy.url());
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(arrivals.len())));
    let timeout = Duration::from_secs(args.request_timeout);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, a) in arrivals.iter().enumerate() {
        tokio::time::sleep_until((started + a.at).into()).await;
        let body = json!({
            "model": "gemma-3-270m",
            "messages": messages(docs, a),
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
        .to_string();
        let (client, url, outcomes) = (client.clone(), url.clone(), outcomes.clone());
        let (doc, at, verbose) = (a.doc, a.at, args.verbose);
        tasks.spawn(async move {
            let mut o = ask(&client, &url, body, timeout).await;
            o.index = index;
            o.done_at = started.elapsed();
            if verbose {
                eprintln!(
                    "  t={:7.1}s doc {doc} → {} ttft {:6.2}s cached {}/{}",
                    at.as_secs_f64(),
                    o.server.as_deref().unwrap_or("?"),
                    o.ttft.map_or(f64::NAN, |d| d.as_secs_f64()),
                    o.cached_tokens,
                    o.prompt_tokens
                );
            }
            outcomes.lock().await.push(o);
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut prefill = Vec::with_capacity(fleet.servers.len());
    for s in &fleet.servers {
        prefill.push(server_counter(&client, s, "llamacpp:prompt_tokens_total").await / 1000.0);
    }
    drop(envoy);
    app.shutdown().await;
    drop(fleet);

    let outcomes = outcomes.lock().await.clone();
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let first = arrivals.first().map_or(Duration::ZERO, |a| a.at);
    let last = ok.iter().map(|o| o.done_at).max().unwrap_or(first);
    let makespan = (last.saturating_sub(first)).as_secs_f64().max(1e-9);
    let prompt_tokens_by_request = ok.iter().map(|o| (o.index, o.prompt_tokens)).collect();
    let run = ConfigRun {
        config: name.clone(),
        completed: ok.len(),
        errors: outcomes.len() - ok.len(),
        status: outcomes.iter().fold(BTreeMap::new(), |mut m, o| {
            *m.entry(o.status).or_default() += 1;
            m
        }),
        ttft: Latency::of(
            ok.iter()
                .filter_map(|o| o.ttft)
                .map(|d| d.as_secs_f64())
                .collect(),
        ),
        e2e: Latency::of(ok.iter().map(|o| o.latency.as_secs_f64()).collect()),
        makespan_s: makespan,
        throughput_rps: ok.len() as f64 / makespan,
        output_tokens_per_s: ok.iter().map(|o| o.completion_tokens).sum::<u64>() as f64 / makespan,
        prompt_tokens: ok.iter().map(|o| o.prompt_tokens).sum(),
        cached_tokens: ok.iter().map(|o| o.cached_tokens).sum(),
        prefill_ktokens_per_server: prefill,
    };
    Ok((run, prompt_tokens_by_request))
}

/// Run the benchmark: the same seeded trace once per config, each on fresh servers.
///
/// # Errors
/// A missing `llama-server`, model or Envoy, or a component that does not start.
pub async fn run(args: SharedDocsArgs) -> anyhow::Result<SharedDocsReport> {
    if args.servers == 0 || args.docs == 0 || args.requests == 0 || args.rate <= 0.0 {
        bail!("--servers, --docs, --requests and --rate must be positive");
    }
    let bin = llama_server_binary()?;
    let model_dir = args
        .model_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("epp-sim-models"));
    let model = gemma_model(&model_dir)?;
    let docs: Arc<Vec<String>> = Arc::new(
        (0..args.docs)
            .map(|d| document(args.seed, d, args.doc_tokens))
            .collect(),
    );
    let arrivals = trace(&args);
    // Every config and the profile are checked before any server starts.
    let mut configs = Vec::with_capacity(args.configs.len());
    for spec in &args.configs {
        let (name, text) = if args.sim_only {
            baselines::resolve_text(spec).map_err(|e| anyhow!(e))?
        } else {
            config_text(spec)?
        };
        let parsed = EndpointPickerConfig::from_yaml(&text).with_context(|| format!("config {name}"))?;
        build_scheduler(&parsed).map_err(|e| anyhow!("config {name}: {e}"))?;
        configs.push((name, text));
    }
    let profile = args
        .simulate
        .as_deref()
        .map(EngineProfile::load)
        .transpose()
        .map_err(|e| anyhow!(e))?;
    let prompts = match &profile {
        Some(_) => Some(simulated::tokenize(&args, &bin, &model, &docs, &arrivals).await?),
        None => None,
    };
    let mut runs = Vec::new();
    let mut mean_prompt_tokens = 0;
    let mut token_count_mismatches = None;
    for config in configs.iter().filter(|_| !args.sim_only) {
        let name = &config.0;
        eprintln!(
            "shared-docs: config {name}: {} requests at {} req/s over {} servers...",
            args.requests, args.rate, args.servers
        );
        let (run, prompt_tokens) = run_config(&args, config, &bin, &model, &docs, &arrivals).await?;
        eprintln!(
            "shared-docs: config {name}: TTFT mean {:.2} s, {} ok, {} errors, cached {:.1} %",
            run.ttft.mean_s,
            run.completed,
            run.errors,
            run.cached_share() * 100.0
        );
        if run.completed > 0 {
            mean_prompt_tokens = (run.prompt_tokens / run.completed as u64) as usize;
        }
        if let Some(prompts) = &prompts {
            let differ = prompt_tokens
                .iter()
                .filter(|(i, n)| prompts.get(*i).is_none_or(|p| p.tokens.len() as u64 != *n))
                .count();
            *token_count_mismatches.get_or_insert(0) += differ;
        }
        runs.push(run);
    }
    let mut simulated = Vec::new();
    if let (Some(profile), Some(prompts)) = (&profile, &prompts) {
        eprintln!(
            "shared-docs: replaying the trace in the simulator on {} pods ({})...",
            args.servers, profile.name
        );
        let workload = simulated::token_workload("shared-docs", prompts, args.max_tokens);
        // The workload is sorted by arrival (stable), and so are these.
        let mut docs_by_arrival: Vec<(u64, usize)> = prompts.iter().map(|p| (p.arrival_ns, p.doc)).collect();
        docs_by_arrival.sort_by_key(|(at, _)| *at);
        let docs_by_arrival: Vec<usize> = docs_by_arrival.into_iter().map(|(_, d)| d).collect();
        let scrape = epp::config::parse_duration(&args.refresh_metrics_interval).map_err(|e| anyhow!(e))?;
        simulated = simulated::simulate(
            &workload,
            &args.configs,
            profile,
            args.servers,
            u64::try_from(scrape.as_nanos()).unwrap_or(u64::MAX),
            args.seed,
            args.verbose.then_some(&docs_by_arrival[..]),
        )
        .map_err(|e| anyhow!(e))?;
        if mean_prompt_tokens == 0 && !prompts.is_empty() {
            mean_prompt_tokens = prompts.iter().map(|p| p.tokens.len()).sum::<usize>() / prompts.len();
        }
    }
    Ok(SharedDocsReport {
        servers: args.servers,
        docs: args.docs,
        mean_prompt_tokens,
        requests: args.requests,
        rate: args.rate,
        max_tokens: args.max_tokens,
        seed: args.seed,
        fidelity: simulated::fidelity(&runs, &simulated),
        runs,
        profile: profile.map(|p| p.name),
        simulated,
        token_count_mismatches,
    })
}

/// Run `epp-bench shared-docs`: print the real and simulated tables, then the report as JSON.
///
/// # Errors
/// As [`run`].
pub async fn run_cli(args: SharedDocsArgs) -> anyhow::Result<()> {
    let report = run(args).await?;
    if !report.runs.is_empty() {
        println!("{}", report.table());
    }
    if let Some(table) = report.simulated_table() {
        println!("{table}");
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SharedDocsArgs,
    }

    fn args(extra: &[&str]) -> SharedDocsArgs {
        Cli::parse_from(std::iter::once("shared-docs").chain(extra.iter().copied())).args
    }

    #[test]
    fn the_trace_is_a_function_of_the_seed() {
        let a = trace(&args(&[]));
        let b = trace(&args(&[]));
        assert_eq!(a.len(), 200);
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| x.at == y.at && x.doc == y.doc && x.question == y.question)
        );
        let c = trace(&args(&["--seed", "8"]));
        assert!(a.iter().zip(&c).any(|(x, y)| x.at != y.at));
        // Poisson at 0.5/s: 200 arrivals take about 400 s; every document is asked about.
        let span = a.last().unwrap().at.as_secs_f64();
        assert!((300.0..500.0).contains(&span), "{span}");
        assert!((0..4).all(|d| a.iter().any(|x| x.doc == d)));
    }

    #[test]
    fn documents_are_distinct_from_their_first_words_and_about_the_asked_length() {
        let docs: Vec<String> = (0..4).map(|d| document(7, d, 3000)).collect();
        for (i, a) in docs.iter().enumerate() {
            assert!(a.starts_with(&format!("Document {i}: ")));
            // About four bytes per token.
            assert!((9_000..15_000).contains(&a.len()), "{}", a.len());
            for b in &docs[i + 1..] {
                assert_ne!(a[..40], b[..40]);
            }
        }
        assert_eq!(document(7, 1, 3000), docs[1]);
    }

    #[test]
    fn default_configs_resolve_and_unknown_names_are_refused() {
        for spec in args(&[]).configs {
            let (name, text) = config_text(&spec).unwrap();
            assert_eq!(name, spec);
            build_scheduler(&EndpointPickerConfig::from_yaml(&text).unwrap()).unwrap();
        }
        let err = config_text("fastest").unwrap_err().to_string();
        assert!(
            err.starts_with("unknown baseline \"fastest\": use one of round-robin"),
            "{err}"
        );
        let err = config_text("oracle").unwrap_err().to_string();
        assert!(
            err.ends_with("use it with --simulate PROFILE --sim-only"),
            "{err}"
        );
    }

    #[test]
    fn the_table_reports_gain_over_the_first_config_and_failures_by_status() {
        let run = |config: &str, mean: f64, status: &[(u16, usize)]| {
            let ttft = Latency {
                mean_s: mean,
                ..Latency::default()
            };
            ConfigRun::example(config, ttft, status, 90)
        };
        let report = SharedDocsReport {
            servers: 2,
            docs: 4,
            mean_prompt_tokens: 3000,
            requests: 4,
            rate: 0.5,
            max_tokens: 8,
            seed: 7,
            runs: vec![
                run("round-robin", 40.0, &[(200, 3), (504, 1)]),
                run("recommended", 2.0, &[(200, 4)]),
            ],
            profile: None,
            simulated: Vec::new(),
            fidelity: None,
            token_count_mismatches: None,
        };
        let table = report.table();
        assert!(table.contains("| round-robin | 3 | 1 (504×1) |"), "{table}");
        assert!(table.contains("| 2.00 s | 20.0× |"), "{table}");
        assert!(table.contains("| 90.0 % | 3 / 3 |"), "{table}");
    }
}
