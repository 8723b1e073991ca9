//! `epp-sim runaway`: the weekend a retry loop ran up the bill, replayed.
//!
//! One tenant's client (`chatbot`) sends the same long request every second from Friday evening
//! to Monday morning, next to well-behaved tenants (`team-1`, …) with their own occasional
//! traffic. Every request goes through the EPP's own decision code in the replay
//! ([`crate::replay`]): the token-budget admission stage with the configured prices, the upstream
//! default scheduler, simulated vLLM pods whose prefix cache makes the repeated prompt cheap to
//! compute (and priced as cached input). It runs twice: without a limit, and with a daily money
//! budget per tenant. The report gives each tenant's spend over time, when the 429s start each
//! local day, and what the well-behaved tenants got in both runs; `--plot` draws the spend.
//!
//! Spend is priced from each served request's usage (prompt, cached prompt and output tokens)
//! by the same code that settles budgets ([`epp::budget::BudgetPolicy::actual`]), in both runs.

mod plot;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use clap::Args;
use epp::{
    budget::{BudgetPolicy, NANOS_PER_UNIT},
    config::{DEFAULT_CONFIG_YAML, EndpointPickerConfig, PluginSpec},
    scheduler::{PluginName, admission::TokenBudget, plugin_types::TOKEN_BUDGET},
};
use jiff::{Timestamp, tz::TimeZone};
use rand::{Rng, SeedableRng, rngs::SmallRng};

use crate::{
    engine::EngineProfile,
    replay::{Outcome, Placement, ReplaySetup, RunOutcome, command::run_all},
    stats::Latency,
    workload::{TraceRequest, Workload},
};

/// The runaway tenant's name.
pub const RUNAWAY: &str = "chatbot";

/// Tokens per trace block of the generated workload.
const BLOCK_TOKENS: u32 = 512;

/// `epp-sim runaway` arguments.
#[derive(Debug, Clone, Args)]
pub struct RunawayArgs {
    /// When the loop starts (RFC 3339); the default is a Friday, 18:00 in Berlin.
    #[arg(long, default_value = "2026-12-04T17:00:00Z")]
    pub start: Timestamp,
    /// Simulated hours (62: Friday 18:00 to Monday 08:00).
    #[arg(long, default_value_t = 62.0)]
    pub hours: f64,
    /// Time zone of the daily budget (and of the report's clock times).
    #[arg(long, default_value = "Europe/Berlin")]
    pub time_zone: String,
    /// Daily money budget of every tenant in the budgeted run, in USD.
    #[arg(long, default_value_t = 25.0)]
    pub daily_spend: f64,
    /// Seconds between the runaway client's retries.
    #[arg(long, default_value_t = 1.0)]
    pub retry_every: f64,
    /// Prompt tokens of the runaway request (the same every time).
    #[arg(long, default_value_t = 6000)]
    pub prompt_tokens: u32,
    /// Output tokens of the runaway request.
    #[arg(long, default_value_t = 400)]
    pub output_tokens: u32,
    /// Well-behaved tenants.
    #[arg(long, default_value_t = 3)]
    pub tenants: usize,
    /// Mean seconds between a well-behaved tenant's requests (Poisson arrivals).
    #[arg(long, default_value_t = 120.0)]
    pub tenant_every: f64,
    /// Input, cached-input and output price per million tokens, USD.
    #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [3.0, 0.30, 15.0])]
    pub prices: Vec<f64>,
    /// Simulated pods.
    #[arg(long, default_value_t = 4)]
    pub pods: usize,
    /// Engine profile: `h100`, `a100`, or a YAML/JSON file overriding a preset.
    #[arg(long, default_value = "h100")]
    pub profile: String,
    /// Metrics refresh interval of the simulated EPP (Go duration).
    #[arg(long, default_value = "200ms", value_parser = epp::config::parse_duration)]
    pub scrape_interval: std::time::Duration,
    /// Write the spend-over-time plot here (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Seed of the well-behaved tenants' arrivals and prompts.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The two runs' configurations: the upstream default scheduler with a token budget that
/// prices the model, limiting nothing or every tenant's daily spend.
fn configs(
    args: &RunawayArgs,
    model: &str,
    tenants: &[String],
) -> Result<[(String, EndpointPickerConfig); 2], String> {
    let [input, cached, output] = args.prices[..] else {
        return Err("--prices takes input,cached,output".into());
    };
    let prices = format!("{{{model}: {{input: {input}, cachedInput: {cached}, output: {output}}}}}");
    let tz = &args.time_zone;
    let unlimited = format!("timeZone: {tz}\nprices: {prices}\n");
    let limited = format!(
        "{unlimited}tenants:\n{}",
        tenants
            .iter()
            .map(|t| format!(
                "  {t}: {{limits: [{{window: day, spend: {}}}]}}\n",
                args.daily_spend
            ))
            .collect::<String>()
    );
    let with_budget = |params: &str| -> Result<EndpointPickerConfig, String> {
        let mut config = EndpointPickerConfig::from_yaml(DEFAULT_CONFIG_YAML).map_err(|e| e.to_string())?;
        config.plugins.push(PluginSpec {
            name: TOKEN_BUDGET.into(),
            plugin_type: TOKEN_BUDGET.into(),
            parameters: serde_yaml_ng::from_str(params).map_err(|e| e.to_string())?,
            path: format!("plugins[{}]", config.plugins.len()),
        });
        Ok(config)
    };
    Ok([
        ("no budget".into(), with_budget(&unlimited)?),
        (format!("${}/day", args.daily_spend), with_budget(&limited)?),
    ])
}

/// The weekend's requests: the runaway loop and the well-behaved tenants.
fn workload(args: &RunawayArgs, tenants: &[String]) -> Workload {
    let end_ns = (args.hours * 3600e9) as u64;
    let blocks =
        |first: u64, tokens: u32| (first..first + u64::from(tokens.div_ceil(BLOCK_TOKENS))).collect();
    let mut requests = Vec::new();
    let step = ((args.retry_every * 1e9) as u64).max(1);
    let runaway: Arc<str> = RUNAWAY.into();
    for arrival_ns in (0..end_ns).step_by(usize::try_from(step).unwrap_or(usize::MAX)) {
        requests.push(TraceRequest {
            arrival_ns,
            input_tokens: args.prompt_tokens,
            output_tokens: args.output_tokens,
            // The same request every time: the same blocks.
            blocks: blocks(1, args.prompt_tokens),
            adapter: None,
            tenant: Some(runaway.clone()),
        });
    }
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let mut next_block = 1_000_000u64;
    for (i, name) in tenants.iter().enumerate().skip(1) {
        let tenant: Arc<str> = name.as_str().into();
        // Each tenant's requests open with its own two-block system prompt.
        let system = [10 + 2 * i as u64, 11 + 2 * i as u64];
        let mut t = 0.0;
        loop {
            t += -args.tenant_every * (1.0 - rng.random::<f64>()).ln();
            let arrival_ns = (t * 1e9) as u64;
            if arrival_ns >= end_ns {
                break;
            }
            let input_tokens = rng.random_range(1_500..4_000u32);
            let mut ids: Vec<u64> = system.to_vec();
            let own = input_tokens.div_ceil(BLOCK_TOKENS).saturating_sub(2);
            ids.extend(next_block..next_block + u64::from(own));
            next_block += u64::from(own);
            requests.push(TraceRequest {
                arrival_ns,
                input_tokens,
                output_tokens: rng.random_range(100..500),
                blocks: ids,
                adapter: None,
                tenant: Some(tenant.clone()),
            });
        }
    }
    Workload::by_arrival(format!("runaway-weekend-{}h", args.hours), BLOCK_TOKENS, requests)
}

/// One tenant in one run.
#[derive(Debug, Clone, Default)]
pub struct TenantRun {
    /// Its requests.
    pub requests: usize,
    /// Served to the end.
    pub served: usize,
    /// Refused by the EPP (the budget's 429).
    pub refused: usize,
    /// Spend of its served requests, nano USD, cumulative at the end of each hour.
    pub hourly_nanos: Vec<u64>,
    /// Requests served per local day (of their arrival).
    pub served_by_day: BTreeMap<jiff::civil::Date, usize>,
    /// The first refusal of each local day: when (simulated ns), and how many requests of
    /// that day had been served before it.
    pub first_refusals: BTreeMap<jiff::civil::Date, (u64, usize)>,
    /// TTFTs of its served requests, seconds.
    pub ttfts: Vec<f64>,
}

impl TenantRun {
    /// Its whole spend, nano USD.
    pub fn spend_nanos(&self) -> u64 {
        self.hourly_nanos.last().copied().unwrap_or(0)
    }
}

/// Each run's name and its tenants.
pub type Tallies = Vec<(String, BTreeMap<String, TenantRun>)>;

/// Each tenant's outcome in `run`.
fn tally(
    args: &RunawayArgs,
    workload: &Workload,
    run: &RunOutcome,
    policy: &BudgetPolicy,
    model: &str,
    tz: &TimeZone,
) -> BTreeMap<String, TenantRun> {
    let hours = args.hours.ceil() as usize;
    let mut out: BTreeMap<String, TenantRun> = BTreeMap::new();
    for (req, rec) in workload.requests.iter().zip(&run.records) {
        let t = out
            .entry(req.tenant.as_deref().unwrap_or("-").to_owned())
            .or_default();
        t.hourly_nanos.resize(hours, 0);
        t.requests += 1;
        let hour = usize::try_from(rec.arrival_ns / 3_600_000_000_000)
            .unwrap_or(0)
            .min(hours - 1);
        match rec.outcome {
            Outcome::Completed => {
                t.served += 1;
                *t.served_by_day
                    .entry(local(args, rec.arrival_ns, tz).date())
                    .or_default() += 1;
                let (prompt, output) = (u64::from(rec.prompt_tokens), u64::from(rec.output_tokens));
                let cost = policy.actual(
                    model,
                    prompt,
                    u64::from(rec.cached_tokens),
                    output,
                    prompt + output,
                );
                t.hourly_nanos[hour] += cost.nanos;
                if let Some(first) = rec.first_token_ns {
                    t.ttfts.push(first.saturating_sub(rec.arrival_ns) as f64 / 1e9);
                }
            }
            Outcome::RejectedByEpp => {
                t.refused += 1;
                let day = local(args, rec.arrival_ns, tz).date();
                let served = t.served_by_day.get(&day).copied().unwrap_or(0);
                t.first_refusals.entry(day).or_insert((rec.arrival_ns, served));
            }
            Outcome::RejectedByEngine | Outcome::Unfinished => {}
        }
    }
    for t in out.values_mut() {
        let mut sum = 0;
        for h in &mut t.hourly_nanos {
            sum += *h;
            *h = sum;
        }
    }
    out
}

/// The local time of simulated instant `ns`.
fn local(args: &RunawayArgs, ns: u64, tz: &TimeZone) -> jiff::Zoned {
    let ms = args
        .start
        .as_millisecond()
        .saturating_add(i64::try_from(ns / 1_000_000).unwrap_or(i64::MAX));
    Timestamp::from_millisecond(ms)
        .unwrap_or(args.start)
        .to_zoned(tz.clone())
}

fn usd(nanos: u64) -> String {
    format!("${:.2}", nanos as f64 / NANOS_PER_UNIT as f64)
}

/// Run the story and print its report (Markdown on stdout); `--plot` writes the plot.
///
/// # Errors
/// Bad arguments, an unusable configuration, or a plot that cannot be written.
pub fn run(args: &RunawayArgs) -> Result<(), String> {
    let tz = TimeZone::get(&args.time_zone).map_err(|e| format!("--time-zone {}: {e}", args.time_zone))?;
    let tallies = simulate(args)?;
    print!("{}", markdown(args, &tz, &tallies));
    if let Some(path) = &args.plot {
        plot::spend(path, args, &tallies)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Run the story: both runs' tenants.
///
/// # Errors
/// Bad arguments or an unusable configuration.
pub fn simulate(args: &RunawayArgs) -> Result<Tallies, String> {
    if !(args.hours > 0.0 && args.retry_every > 0.0 && args.tenant_every > 0.0 && args.daily_spend >= 0.0) {
        return Err("--hours, --retry-every and --tenant-every must be > 0, --daily-spend ≥ 0".into());
    }
    let tz = TimeZone::get(&args.time_zone).map_err(|e| format!("--time-zone {}: {e}", args.time_zone))?;
    let profile = EngineProfile::load(&args.profile)?;
    let tenants: Vec<String> = std::iter::once(RUNAWAY.to_owned())
        .chain((1..=args.tenants).map(|i| format!("team-{i}")))
        .collect();
    let configs = configs(args, &profile.model, &tenants)?;
    let workload = workload(args, &tenants);
    let start_unix_ms = u64::try_from(args.start.as_millisecond()).map_err(|_| "--start before 1970")?;
    let setups: Vec<ReplaySetup> = configs
        .iter()
        .map(|(name, config)| ReplaySetup {
            name: name.clone(),
            config: config.clone(),
            pods: args.pods,
            profile: profile.clone(),
            scrape_interval_ns: u64::try_from(args.scrape_interval.as_nanos()).unwrap_or(u64::MAX),
            seed: args.seed,
            start_unix_ms,
            placement: Placement::Scheduler,
        })
        .collect();
    eprintln!(
        "{}: {} requests ({} from {RUNAWAY}), {} pods ({}), from {} local time",
        workload.name,
        workload.requests.len(),
        workload
            .requests
            .iter()
            .filter(|r| r.tenant.as_deref() == Some(RUNAWAY))
            .count(),
        args.pods,
        profile.name,
        local(args, 0, &tz).strftime("%a %Y-%m-%d %H:%M %Z"),
    );
    let runs = run_all(&workload, &setups)?;
    // The priced policy of the configuration (both runs price alike).
    let spec = configs[0]
        .1
        .plugins
        .iter()
        .find(|p| p.plugin_type == TOKEN_BUDGET)
        .ok_or("no token budget in the configuration")?;
    let budget = TokenBudget::from_config(
        PluginName {
            kind: TOKEN_BUDGET,
            name: spec.name.as_str().into(),
        },
        spec,
    )
    .map_err(|e| e.to_string())?;
    Ok(runs
        .iter()
        .map(|run| {
            (
                run.name.clone(),
                tally(args, &workload, run, &budget.policy, &profile.model, &tz),
            )
        })
        .collect())
}

/// The report: spend and refusals per tenant and run, then the runaway's day-by-day refusals.
fn markdown(args: &RunawayArgs, tz: &TimeZone, tallies: &Tallies) -> String {
    let mut out = format!(
        "## The runaway retry loop: {} h from {}\n\n| run | tenant | requests | served | refused (429) | spend | TTFT p50 | TTFT p90 |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
        args.hours,
        local(args, 0, tz).strftime("%a %Y-%m-%d %H:%M %Z")
    );
    for (run, tenants) in tallies {
        for (name, t) in tenants {
            let ttft = Latency::of(t.ttfts.clone());
            out += &format!(
                "| {run} | {name} | {} | {} | {} | {} | {:.3} s | {:.3} s |\n",
                t.requests,
                t.served,
                t.refused,
                usd(t.spend_nanos()),
                ttft.p50_s,
                ttft.p90_s
            );
        }
    }
    for (run, tenants) in tallies {
        let Some(t) = tenants.get(RUNAWAY) else { continue };
        if t.first_refusals.is_empty() {
            continue;
        }
        out += &format!("\n{run}: {RUNAWAY}'s first 429 of each local day\n\n");
        for (ns, served) in t.first_refusals.values() {
            out += &format!(
                "- {}, after {served} requests served that day\n",
                local(args, *ns, tz).strftime("%a %H:%M:%S"),
            );
        }
    }
    out
}
