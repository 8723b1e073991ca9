//! The `replay` and `compare` subcommands: load a workload, run it under one or more
//! configurations (in parallel threads; each run is single-threaded and deterministic), write
//! JSON, Markdown and SVG, and print the table.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::{
    ReplaySetup, RunOutcome, baselines, plot, replay,
    report::{Report, Summary, markdown},
    tenants,
};
use crate::{
    engine::EngineProfile,
    workload::{Workload, azure, generate, mooncake, suite},
};

/// Where requests come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Mooncake JSONL trace (`--trace`).
    Mooncake,
    /// Azure LLM inference CSV trace (`--trace`).
    Azure,
    /// Generated: shared-prefix groups (many users behind few system prompts).
    SharedPrefix,
    /// Generated: questions over a corpus with Zipf document popularity (`--documents`).
    DocQa,
    /// Generated: multi-turn sessions re-sending their history (`--turns`, `--think-time`).
    Sessions,
    /// Generated: unique prompts, a share of them long (`--long-fraction`).
    Mixed,
    /// Generated: LoRA adapters with Zipf popularity.
    MultiLora,
    /// Generated: tenants with their own system prompts.
    MultiTenant,
    /// Generated: tenants at equal steady rates; `team-0` floods for a while (`--flood-*`).
    NoisyNeighbour,
}

/// The workload options shared by `replay`, `compare` and `load`.
#[derive(Debug, Clone, Args)]
pub struct WorkloadArgs {
    /// Trace file (for the mooncake and azure formats).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Trace format or generator.
    #[arg(long, value_enum, default_value = "mooncake")]
    pub format: Format,
    /// Multiply the arrival rate (2 = arrivals twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// Use only the first N requests.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of generators and of the scheduler's RNG.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub generator: generate::GeneratorParams,
}

impl WorkloadArgs {
    /// Read or generate the workload.
    ///
    /// # Errors
    /// Missing or unreadable trace, malformed lines, bad rate scale, bad noisy-neighbour flags.
    pub fn load(&self) -> Result<Workload, String> {
        if !(self.rate_scale > 0.0 && self.rate_scale.is_finite()) {
            return Err(format!(
                "--rate-scale must be a positive number, got {}",
                self.rate_scale
            ));
        }
        let read = || -> Result<(String, String), String> {
            let path = self
                .trace
                .as_ref()
                .ok_or_else(|| format!("--format {:?} needs --trace FILE", self.format))?;
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            Ok((name, text))
        };
        if !matches!(self.format, Format::Mooncake | Format::Azure) {
            self.generator.check()?;
        }
        let mut w = match self.format {
            Format::Mooncake => {
                let (name, text) = read()?;
                mooncake::parse(&name, &text)?
            }
            Format::Azure => {
                let (name, text) = read()?;
                azure::parse(&name, &text)?
            }
            Format::SharedPrefix => generate::shared_prefix(&self.generator, self.seed),
            Format::DocQa => suite::doc_qa(&self.generator, self.seed),
            Format::Sessions => suite::sessions(&self.generator, self.seed),
            Format::Mixed => suite::mixed(&self.generator, self.seed),
            Format::MultiLora => generate::multi_lora(&self.generator, self.seed),
            Format::MultiTenant => generate::multi_tenant(&self.generator, self.seed),
            Format::NoisyNeighbour => {
                self.generator.check_noisy_neighbour()?;
                generate::noisy_neighbour(&self.generator, self.seed)
            }
        };
        if let Some(n) = self.limit {
            w.truncate(n);
        }
        w.scale_rate(self.rate_scale);
        Ok(w)
    }
}

/// Options of `replay` and `compare`.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Simulated pods.
    #[arg(long, default_value_t = 8)]
    pub pods: usize,
    /// Engine profile: `h100`, `a100`, or a YAML/JSON file overriding a preset.
    #[arg(long, default_value = "h100")]
    pub profile: String,
    /// How often the EPP scrapes each pod (Go duration).
    #[arg(long, default_value = "50ms", value_parser = epp::config::parse_duration)]
    pub scrape_interval: Duration,
    /// A configuration: a shipped baseline (round-robin, random, least-queue, upstream-default,
    /// sticky, recommended, flow-control, flow-control-rr, flow-control-fair, oracle) or NAME=FILE. Repeat to compare.
    #[arg(long = "config", value_name = "NAME[=FILE]")]
    pub configs: Vec<String>,
    /// Write the reports as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the Markdown table here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write SVG plots (TTFT CDF, per-pod load) into this directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,
}

/// What `--json` holds.
#[derive(Serialize)]
struct JsonOut<'a> {
    workload: &'a str,
    pods: usize,
    profile: &'a str,
    rate_scale: f64,
    seed: u64,
    results: Vec<Summary>,
    reports: &'a [Report],
}

/// Run every configuration of `args` (default: `recommended`) and write the outputs.
///
/// # Errors
/// Bad options, workload or configuration; unwritable outputs.
pub fn run(args: &SimArgs) -> Result<Vec<Report>, String> {
    let workload = args.workload.load()?;
    let profile = EngineProfile::load(&args.profile)?;
    let specs = if args.configs.is_empty() {
        vec!["recommended".to_owned()]
    } else {
        args.configs.clone()
    };
    let setups = specs
        .iter()
        .map(|s| {
            baselines::resolve(s).map(|(name, config)| ReplaySetup {
                name,
                config,
                placement: baselines::placement(s),
                pods: args.pods,
                profile: profile.clone(),
                scrape_interval_ns: u64::try_from(args.scrape_interval.as_nanos()).unwrap_or(u64::MAX),
                seed: args.workload.seed,
                start_unix_ms: 0,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!(
        "{}: {} requests, {} prompt tokens; {} pods ({}), {} configuration(s)",
        workload.name,
        workload.requests.len(),
        workload.input_tokens(),
        args.pods,
        profile.name,
        setups.len()
    );
    let started = Instant::now();
    let runs = run_all(&workload, &setups)?;
    let wall = started.elapsed().as_secs_f64();
    let simulated = (workload.requests.len() * runs.len()) as f64;
    eprintln!(
        "simulated {} request(s) in {wall:.2} s wall ({:.0} simulated requests/s)",
        simulated,
        simulated / wall.max(1e-9)
    );
    let reports: Vec<Report> = runs
        .iter()
        .map(|run| Report {
            tenants: tenants::breakdown(run, &workload),
            ..Report::from_run(run)
        })
        .collect();
    let table = markdown(&reports);
    println!("{table}");
    if let Some(path) = &args.json {
        let out = JsonOut {
            workload: &workload.name,
            pods: args.pods,
            profile: &profile.name,
            rate_scale: args.workload.rate_scale,
            seed: args.workload.seed,
            results: reports.iter().map(Report::summary).collect(),
            reports: &reports,
        };
        let text = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
        write(path, &(text + "\n"))?;
    }
    if let Some(path) = &args.markdown {
        write(path, &table)?;
    }
    if let Some(dir) = &args.plots {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let refs: Vec<&RunOutcome> = runs.iter().collect();
        plot::ttft_cdf(
            &dir.join("ttft_cdf.svg"),
            &format!("TTFT, {}", workload.name),
            &refs,
        )?;
        for run in &runs {
            plot::pod_load(&dir.join(format!("load_{}.svg", file_safe(&run.name))), run)?;
        }
        eprintln!("plots written to {}", dir.display());
    }
    Ok(reports)
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Run each setup on its own thread (at most one per core), with a progress bar per run when
/// stderr is a terminal.
pub fn run_all(workload: &Workload, setups: &[ReplaySetup]) -> Result<Vec<RunOutcome>, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).max(1);
    let bars = MultiProgress::with_draw_target(if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{prefix:>18} [{bar:40}] {pos}/{len} requests {elapsed}")
        .map_err(|e| e.to_string())?
        .progress_chars("=> ");
    let mut results: Vec<Option<Result<RunOutcome, String>>> = setups.iter().map(|_| None).collect();
    for (chunk_setups, chunk_results) in setups.chunks(threads).zip(results.chunks_mut(threads)) {
        std::thread::scope(|scope| {
            for (setup, slot) in chunk_setups.iter().zip(chunk_results.iter_mut()) {
                let bar = bars.add(ProgressBar::new(workload.requests.len() as u64));
                bar.set_style(style.clone());
                bar.set_prefix(setup.name.clone());
                scope.spawn(move || {
                    let outcome = replay(workload, setup, |n| {
                        if n % 256 == 0 {
                            bar.set_position(n as u64);
                        }
                    });
                    bar.finish();
                    *slot = Some(outcome.map_err(|e| e.to_string()));
                });
            }
        });
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("a replay thread stopped without a result".into())))
        .collect()
}
