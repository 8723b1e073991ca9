//! `epp-bench soak`: a long run of mixed traffic through a real Envoy and a real `epp` process
//! while pods die and come back, Redis restarts and metrics pages turn to garbage or hang, with
//! the checks a production operator would make afterwards.
//!
//! Everything is a separate process on 127.0.0.1: emulated vLLM pods (`epp-sim emulate`, one
//! process per pod so one can be killed), `redis-server` (append-only, fsync always, so a kill
//! loses nothing it acknowledged), the `epp` binary and Envoy with the shipped config. Traffic is
//! open-loop at `--rate`, seeded: chat and completions, SSE and JSON, prompts of 1k–100k tokens
//! (log-uniform), four tenants:
//! - `ledger`: budgeted on Redis with room to spare; never disconnects; always asks for usage,
//!   so the client knows what the budget must have been charged;
//! - `small`: a tight per-model budget with a fallback model, then a tenant total: deliberate 429s;
//! - `guarded`: a prompt with an e-mail address (masked on the way in, restored on the way out)
//!   echoed by the pod with a card number the response guard must mask;
//! - `others`: streams, 40 % of whose clients vanish after the first event.
//!
//! Faults, one at a time, cycling: a pod killed (SIGKILL) and restarted, Redis killed and
//! restarted, a pod's page turned to garbage, a pod's page hanging past the scrape timeout.
//!
//! Checks (each reported, the run fails on any): no 5xx, transport error or broken stream
//! except for requests overlapping a pod's death (until it is back and scraped); the guard never
//! leaks a card number and always restores the address; the EPP's RSS over the last minute is at
//! most 5 % above the minute after warm-up; open files, threads and runtime tasks return to
//! their idle values once traffic stops; no request is left counted as running; the `ledger`
//! tenant's counters in Redis hold at least the usage of every completed request that no Redis
//! outage touched and at most that plus an upper bound for the ones it touched (fail-open: a
//! request admitted while Redis is down is not charged, a settlement that cannot reach it leaves
//! the reservation).
//!
//! Here: the arguments, the run loop and the report's types; `chaos` starts, reads, breaks and
//! mends the processes; `traffic` draws and sends the requests; `report` judges and plots.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use clap::Args;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde::Serialize;
use tokio::{sync::Mutex, time::Instant};

use crate::{
    envoy::{free_port, trusting_envoy_in_front},
    epp_process::EppProcess,
};

mod chaos;
mod report;
mod traffic;

use chaos::{
    Chaos, FAULTS, Proc, ledger_tokens, page_value, proc_sample, spawn_pod, spawn_redis, wait_for,
    wait_for_redis,
};
use report::{Observed, judge, plot_rss};
use traffic::{CONFIG, draw, draw_warm_up, one};

/// `epp-bench soak` arguments.
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Minutes of traffic (the first fifth, at most five minutes, is warm-up).
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// Emulated pods.
    #[arg(long, default_value_t = 4)]
    pub pods: usize,
    /// Requests per second (Poisson arrivals).
    #[arg(long, default_value_t = 6.0)]
    pub rate: f64,
    /// Seconds between the starts of two faults (a fault lasts 4-20 s; the next one waits for
    /// it to end).
    #[arg(long, default_value_t = 40)]
    pub fault_every: u64,
    /// Simulated seconds per wall second in the emulated pods.
    #[arg(long, default_value_t = 20.0)]
    pub time_scale: f64,
    /// Seed of the traffic and the fault targets.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Folder for the report (`soak.json`) and the RSS plot (`soak-rss.svg`).
    #[arg(long, default_value = "soak-out")]
    pub out: PathBuf,
}

/// What one request came to.
#[derive(Debug, Clone, Serialize)]
struct Outcome {
    tenant: &'static str,
    /// Seconds since the traffic started.
    start: f64,
    end: f64,
    /// HTTP status; `None` when the connection failed.
    status: Option<u16>,
    /// The client left on purpose after the first event.
    vanished: bool,
    /// The body broke off (a stream that never ended, a body that did not read).
    broken: bool,
    /// `prompt_tokens + completion_tokens` the server reported to the client.
    usage: Option<u64>,
    /// What the budget may have reserved for it: the prompt's bytes / 4 plus `max_tokens`.
    estimate: u64,
    /// A guarded answer that leaked the card number or lost the address.
    guard_violation: bool,
}

/// A fault and when it held (seconds since the traffic started).
#[derive(Debug, Clone, Serialize)]
struct Fault {
    kind: &'static str,
    target: String,
    start: f64,
    end: f64,
}

/// One sample of the EPP process.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    at: f64,
    rss_mib: f64,
    fds: usize,
    threads: usize,
    tasks: Option<f64>,
}

/// The soak's figures and verdicts.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    requests: usize,
    by_status: BTreeMap<String, usize>,
    faults: BTreeMap<&'static str, usize>,
    excused_errors: usize,
    unexcused_errors: Vec<String>,
    guard_violations: usize,
    rss_after_warmup_mib: f64,
    rss_final_mib: f64,
    rss_growth: f64,
    idle: (usize, usize, Option<f64>),
    after: (usize, usize, Option<f64>),
    running_after: f64,
    ledger_tokens: u64,
    ledger_clean_usage: u64,
    ledger_touched_bound: u64,
    samples: Vec<Sample>,
    fault_log: Vec<Fault>,
    /// Every check that failed, in words (empty: the soak passed).
    pub failures: Vec<String>,
}

impl SoakReport {
    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "requests {} by status {:?}\nfaults {:?}\nerrors excused by a pod's death {}, unexcused {}\nguard violations {}\nRSS {:.1} MiB after warm-up, {:.1} MiB at the end ({:+.1} %)\nidle (fds, threads, tasks) {:?}, after {:?}; running after {}\nledger: Redis {} tokens, clean usage {}, outage-touched bound {}\n",
            self.requests,
            self.by_status,
            self.faults,
            self.excused_errors,
            self.unexcused_errors.len(),
            self.guard_violations,
            self.rss_after_warmup_mib,
            self.rss_final_mib,
            self.rss_growth * 100.0,
            self.idle,
            self.after,
            self.running_after,
            self.ledger_tokens,
            self.ledger_clean_usage,
            self.ledger_touched_bound,
        );
        for e in self.unexcused_errors.iter().take(10) {
            s.push_str(&format!("  unexcused: {e}\n"));
        }
        if self.failures.is_empty() {
            s.push_str("PASS\n");
        } else {
            for f in &self.failures {
                s.push_str(&format!("FAIL: {f}\n"));
            }
        }
        s
    }
}

/// Run the soak.
///
/// # Errors
/// When a process cannot start.
pub async fn run(args: SoakArgs) -> anyhow::Result<SoakReport> {
    if !(args.minutes > 0.0 && args.rate > 0.0 && args.time_scale > 0.0)
        || args.pods == 0
        || args.fault_every == 0
    {
        bail!("--minutes, --rate, --time-scale, --pods and --fault-every must be positive");
    }
    std::fs::create_dir_all(&args.out)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(180))
        .pool_max_idle_per_host(64)
        .build()?;
    let pod_ports: Vec<u16> = (0..args.pods).map(|_| free_port()).collect::<Result<_, _>>()?;
    let mut pods: Vec<Option<Proc>> = Vec::new();
    for port in &pod_ports {
        pods.push(Some(spawn_pod(*port, args.time_scale)?));
    }
    for port in &pod_ports {
        wait_for(&client, &format!("http://127.0.0.1:{port}/health")).await?;
    }
    let redis_port = free_port()?;
    let redis_dir = std::env::temp_dir().join(format!("epp-soak-redis-{}", std::process::id()));
    std::fs::create_dir_all(&redis_dir)?;
    let redis = Some(spawn_redis(redis_port, &redis_dir)?);
    wait_for_redis(redis_port).await?;
    let mut chaos = Chaos {
        client: client.clone(),
        pods,
        pod_ports: pod_ports.clone(),
        time_scale: args.time_scale,
        redis,
        redis_port,
        redis_dir: redis_dir.clone(),
    };

    let (grpc, health, metrics) = (free_port()?, free_port()?, free_port()?);
    let endpoints: Vec<String> = pod_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let epp = EppProcess::start(
        &[
            format!("--endpoints={}", endpoints.join(",")),
            format!("--grpc-port={grpc}"),
            format!("--grpc-health-port={health}"),
            format!("--metrics-port={metrics}"),
            format!(
                "--config-text={}",
                CONFIG.replace("REDIS_PORT", &redis_port.to_string())
            ),
        ],
        None,
    )?;
    let metrics_url = format!("http://127.0.0.1:{metrics}/metrics");
    wait_for(&client, &metrics_url).await?;
    let envoy = trusting_envoy_in_front(grpc, |c| c).await?;
    let url = envoy.url();
    let t0 = Instant::now();

    // Warm-up requests, then the idle baseline (connection pools in place). They are judged
    // with the rest: the budget charged their usage too.
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let mut warm_up = Vec::new();
    for serial in 0..20 {
        warm_up.push(one(client.clone(), url.clone(), draw_warm_up(&mut rng), serial, t0).await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_tasks = page_value(&client, &metrics_url, epp::metrics::names::RUNTIME_ALIVE_TASKS).await;
    let idle = proc_sample(epp.pid(), 0.0, idle_tasks).context("reading the EPP's /proc")?;

    let duration = args.minutes * 60.0;
    let warmup = (duration / 5.0).min(300.0);
    let outcomes = Arc::new(Mutex::new(warm_up));
    let mut fault_log: Vec<Fault> = Vec::new();
    let mut samples = Vec::new();
    let progress = indicatif::ProgressBar::new(duration as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} s {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let mut next_arrival = 0.0;
    let mut next_sample = 0.0;
    let mut next_fault = 30.0f64.min(duration / 4.0);
    let mut fault_serial = 0usize;
    // (ends at, what to undo)
    let mut pending_undo: Option<(f64, usize, usize)> = None;
    let mut serial = 100u64;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let now = start.elapsed().as_secs_f64();
        if now >= duration {
            break;
        }
        while now >= next_arrival {
            let shape = draw(&mut rng);
            serial += 1;
            let (client, url, outcomes) = (client.clone(), url.clone(), outcomes.clone());
            tasks.spawn(async move {
                let o = one(client, url, shape, serial, t0).await;
                outcomes.lock().await.push(o);
            });
            next_arrival += -(1.0 - rng.random::<f64>()).ln() / args.rate;
        }
        if now >= next_sample {
            let tasks_now = page_value(&client, &metrics_url, epp::metrics::names::RUNTIME_ALIVE_TASKS).await;
            if let Some(s) = proc_sample(epp.pid(), now, tasks_now) {
                progress.set_message(format!("RSS {:.1} MiB, {} fds", s.rss_mib, s.fds));
                samples.push(s);
            }
            progress.set_position(now as u64);
            next_sample += 5.0;
        }
        if let Some((until, kind, target)) = pending_undo
            && now >= until
        {
            chaos.mend(kind, target, true).await?;
            if let Some(f) = fault_log.last_mut() {
                f.end = t0.elapsed().as_secs_f64();
            }
            pending_undo = None;
        }
        if pending_undo.is_none() && now >= next_fault && now < duration - 30.0 {
            let kind = fault_serial % FAULTS.len();
            let target = rng.random_range(0..args.pods);
            fault_serial += 1;
            let (name, lasts) = chaos.inject(kind, target).await?;
            let at = t0.elapsed().as_secs_f64();
            fault_log.push(Fault {
                kind: FAULTS[kind],
                target: name,
                start: at,
                end: at,
            });
            pending_undo = Some((now + lasts, kind, target));
            next_fault += args.fault_every as f64;
        }
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    progress.finish_and_clear();
    let traffic_end = t0.elapsed().as_secs_f64();
    // The last fault's undo comes first (so the settle is measured on a healthy pool).
    if let Some((_, kind, target)) = pending_undo {
        chaos.mend(kind, target, false).await?;
        if let Some(f) = fault_log.last_mut() {
            f.end = t0.elapsed().as_secs_f64();
        }
    }
    // Every request ends (the client timeout bounds it), then the EPP settles.
    while tasks.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after_tasks = page_value(&client, &metrics_url, epp::metrics::names::RUNTIME_ALIVE_TASKS).await;
    let after =
        proc_sample(epp.pid(), t0.elapsed().as_secs_f64(), after_tasks).context("reading the EPP's /proc")?;
    let running_after = page_value(&client, &metrics_url, epp::metrics::names::RUNNING_REQUESTS)
        .await
        .unwrap_or(0.0);
    let ledger = ledger_tokens(redis_port)?;
    drop(envoy);
    drop(epp);
    drop(chaos);
    let _ = std::fs::remove_dir_all(&redis_dir);

    let outcomes = std::mem::take(&mut *outcomes.lock().await);
    let report = judge(
        &args,
        Observed {
            outcomes,
            fault_log,
            samples,
            idle,
            after,
            running_after,
            ledger,
            warmup,
            traffic_end,
        },
    );
    std::fs::write(args.out.join("soak.json"), serde_json::to_vec_pretty(&report)?)?;
    plot_rss(&args.out.join("soak-rss.svg"), &report.samples, warmup).map_err(anyhow::Error::msg)?;
    Ok(report)
}

/// Run `epp-bench soak`: print the summary; fail when a check failed.
///
/// # Errors
/// As [`run`], or the failed checks.
pub async fn run_cli(args: SoakArgs) -> anyhow::Result<()> {
    let report = run(args).await?;
    print!("{}", report.summary());
    if !report.failures.is_empty() {
        bail!("the soak failed {} check(s)", report.failures.len());
    }
    Ok(())
}
