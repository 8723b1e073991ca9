//! `epp-sim soak`: a long run of mixed traffic through a real Envoy and a real `epp` process
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

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Args;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde::Serialize;
use tokio::{sync::Mutex, time::Instant};

use crate::{
    envoy::{free_port, trusting_envoy_in_front},
    epp_process::EppProcess,
};

/// `epp-sim soak` arguments.
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

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_pod(port: u16, time_scale: f64) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(["emulate", "--pods", "1", "--base-port", &port.to_string()])
        .args(["--time-scale", &time_scale.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting an emulated pod")?;
    Ok(Proc(child))
}

fn spawn_redis(port: u16, dir: &std::path::Path) -> anyhow::Result<Proc> {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("redis-server must be installed (Debian package redis-server)")?;
    Ok(Proc(child))
}

/// Wait (at most 10 s) until `url` answers.
async fn wait_for(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if client
            .get(url)
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} did not answer within 10 s")
}

async fn wait_for_redis(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if redis_cli(port, &["ping"]).is_ok_and(|o| o.trim() == "PONG") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("redis-server on port {port} did not answer within 10 s")
}

fn redis_cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .context("redis-cli")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `ledger` tenant's tokens in Redis, summed over every window key.
fn ledger_tokens(port: u16) -> anyhow::Result<u64> {
    let keys = redis_cli(port, &["--scan", "--pattern", "epp:budget:t:ledger:*"])?;
    let mut total = 0;
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let v = redis_cli(port, &["get", key])?;
        total += v.trim().parse::<i64>().unwrap_or(0).max(0) as u64;
    }
    Ok(total)
}

fn proc_sample(pid: u32, at: f64, tasks: Option<f64>) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(Sample {
        at,
        rss_mib: field("VmRSS:")? / 1024.0,
        fds,
        threads: field("Threads:")? as usize,
        tasks,
    })
}

/// A value of an unlabelled (or summed) series on the EPP's page.
async fn page_value(client: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = client.get(url).send().await.ok()?.text().await.ok()?;
    let mut sum = None;
    epp::scrape::exposition::for_each_sample(&text, |s| {
        if s.name == name {
            *sum.get_or_insert(0.0) += s.value;
        }
    });
    sum
}

const CONFIG: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: prompt-guard
  name: pii
  parameters:
    request:
      regex:
        builtins: [EMAIL]
    response:
      regex:
        builtins: [CREDIT_CARD]
- type: token-budget
  parameters:
    window: 24h
    tenants:
      ledger: {tokens: 1000000000000}
      small:
        tokens: 3000000
        models:
          big: {tokens: 400000, fallbackModel: cheap}
    store:
      redis: {url: 'redis://127.0.0.1:REDIS_PORT', timeout: 100ms}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: prefix-cache-scorer
";

const EMAIL: &str = "jane.doe@example.org";
const CARD: &str = "4111 1111 1111 1111";

/// One request's shape, drawn from the seeded generator.
struct Shape {
    tenant: &'static str,
    chat: bool,
    stream: bool,
    prompt_tokens: usize,
    max_tokens: u64,
    vanish: bool,
    group: u32,
}

fn draw(rng: &mut SmallRng) -> Shape {
    let tenant = match rng.random_range(0..100) {
        0..45 => "ledger",
        45..60 => "small",
        60..75 => "guarded",
        _ => "others",
    };
    // Log-uniform 1k..100k tokens; guarded prompts stay short (the pod echoes them).
    let prompt_tokens = if tenant == "guarded" {
        1000
    } else {
        (1000.0 * 100f64.powf(rng.random::<f64>())) as usize
    };
    Shape {
        tenant,
        chat: rng.random_bool(0.5),
        stream: tenant == "others" || (tenant != "guarded" && rng.random_bool(0.5)),
        prompt_tokens,
        max_tokens: rng.random_range(8..64),
        vanish: tenant == "others" && rng.random_bool(0.4),
        group: rng.random_range(0..8),
    }
}

fn prompt(shape: &Shape, serial: u64) -> String {
    let mut text = String::with_capacity(shape.prompt_tokens * 4 + 64);
    if shape.tenant == "guarded" {
        text.push_str(&format!("Repeat: mail {EMAIL}, card {CARD}. "));
    }
    // A shared prefix per group (prefix-cache hits), then a unique tail.
    let shared = shape.prompt_tokens * 3 / 4;
    while text.len() < shared * 4 {
        text.push_str(&format!("group {} shared context line. ", shape.group));
    }
    while text.len() < shape.prompt_tokens * 4 {
        text.push_str(&format!("request {serial} own words. "));
    }
    text
}

/// Send one request and read its answer as its client would.
async fn one(client: reqwest::Client, url: String, shape: Shape, serial: u64, t0: Instant) -> Outcome {
    let text = prompt(&shape, serial);
    let model = if shape.tenant == "small" { "big" } else { "m" };
    let mut body = if shape.chat {
        serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]})
    } else {
        serde_json::json!({"model": model, "prompt": text})
    };
    body["max_tokens"] = shape.max_tokens.into();
    if shape.stream {
        body["stream"] = true.into();
        if shape.tenant == "ledger" {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut outcome = Outcome {
        tenant: shape.tenant,
        start: t0.elapsed().as_secs_f64(),
        end: 0.0,
        status: None,
        vanished: false,
        broken: false,
        usage: None,
        estimate: (text.len() / 4) as u64 + shape.max_tokens,
        guard_violation: false,
    };
    let path = if shape.chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let mut request = client
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .header("x-gateway-inference-fairness-id", shape.tenant)
        .body(bytes);
    if shape.tenant == "guarded" {
        request = request.header("x-emulator-echo", "1");
    }
    match request.send().await {
        Err(_) => {}
        Ok(mut response) => {
            outcome.status = Some(response.status().as_u16());
            let mut body = Vec::new();
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        body.extend_from_slice(&chunk);
                        if shape.vanish {
                            outcome.vanished = true;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        outcome.broken = true;
                        break;
                    }
                }
            }
            if outcome.status == Some(200) && !outcome.vanished && !outcome.broken {
                read_answer(&mut outcome, &shape, &body);
            }
        }
    }
    outcome.end = t0.elapsed().as_secs_f64();
    outcome
}

/// Usage, guard and completeness checks on a whole 200 answer.
fn read_answer(outcome: &mut Outcome, shape: &Shape, body: &[u8]) {
    let total = |v: &serde_json::Value| {
        let u = v.get("usage")?;
        Some(u.get("prompt_tokens")?.as_u64()? + u.get("completion_tokens")?.as_u64()?)
    };
    if shape.stream {
        let text = String::from_utf8_lossy(body);
        if !text.trim_end().ends_with("data: [DONE]") {
            outcome.broken = true;
        }
        let mut events = Vec::new();
        epp::parser::EventSplitter::default().feed_with(body, true, |e| events.push(e.to_vec()));
        outcome.usage = events
            .iter()
            .filter_map(|e| e.trim_ascii().strip_prefix(b"data: "))
            .filter_map(|d| serde_json::from_slice::<serde_json::Value>(d).ok())
            .find_map(|v| total(&v));
    } else {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => outcome.usage = total(&v),
            Err(_) => outcome.broken = true,
        }
    }
    if shape.tenant == "guarded" {
        let text = String::from_utf8_lossy(body);
        outcome.guard_violation = text.contains(CARD) || !text.contains(EMAIL);
    }
}

/// The faults' kinds, in the order they cycle.
const FAULTS: [&str; 4] = ["pod-killed", "redis-restarted", "page-garbage", "page-slow"];

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
    let mut redis = Some(spawn_redis(redis_port, &redis_dir)?);
    wait_for_redis(redis_port).await?;

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

    // Warm-up requests, then the idle baseline (connection pools in place).
    let mut rng = SmallRng::seed_from_u64(args.seed);
    for serial in 0..20 {
        let mut shape = draw(&mut rng);
        shape.prompt_tokens = 1000;
        shape.vanish = false;
        one(client.clone(), url.clone(), shape, serial, t0).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_tasks = page_value(&client, &metrics_url, epp::metrics::names::RUNTIME_ALIVE_TASKS).await;
    let idle = proc_sample(epp.pid(), 0.0, idle_tasks).context("reading the EPP's /proc")?;

    let duration = args.minutes * 60.0;
    let warmup = (duration / 5.0).min(300.0);
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
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
            match FAULTS[kind] {
                "pod-killed" => {
                    pods[target] = Some(spawn_pod(pod_ports[target], args.time_scale)?);
                    wait_for(&client, &format!("http://127.0.0.1:{}/health", pod_ports[target])).await?;
                }
                "redis-restarted" => {
                    redis = Some(spawn_redis(redis_port, &redis_dir)?);
                    wait_for_redis(redis_port).await?;
                }
                _ => {
                    client
                        .post(format!("http://127.0.0.1:{}/emulator/page", pod_ports[target]))
                        .body("normal")
                        .send()
                        .await?;
                }
            }
            if let Some(f) = fault_log.last_mut() {
                f.end = t0.elapsed().as_secs_f64();
            }
            pending_undo = None;
        }
        if pending_undo.is_none() && now >= next_fault && now < duration - 30.0 {
            let kind = fault_serial % FAULTS.len();
            let target = rng.random_range(0..args.pods);
            fault_serial += 1;
            let (name, lasts) = match FAULTS[kind] {
                "pod-killed" => {
                    pods[target] = None;
                    (format!("127.0.0.1:{}", pod_ports[target]), 8.0)
                }
                "redis-restarted" => {
                    redis = None;
                    ("redis".to_owned(), 4.0)
                }
                page => {
                    let mode = if page == "page-garbage" { "garbage" } else { "slow" };
                    client
                        .post(format!("http://127.0.0.1:{}/emulator/page", pod_ports[target]))
                        .body(mode)
                        .send()
                        .await?;
                    (format!("127.0.0.1:{}", pod_ports[target]), 20.0)
                }
            };
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
        match FAULTS[kind] {
            "pod-killed" => pods[target] = Some(spawn_pod(pod_ports[target], args.time_scale)?),
            "redis-restarted" => redis = Some(spawn_redis(redis_port, &redis_dir)?),
            _ => {
                client
                    .post(format!("http://127.0.0.1:{}/emulator/page", pod_ports[target]))
                    .body("normal")
                    .send()
                    .await?;
            }
        }
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
    drop(redis);
    drop(pods);
    let _ = std::fs::remove_dir_all(&redis_dir);

    let outcomes = std::mem::take(&mut *outcomes.lock().await);
    let report = judge(
        &args,
        outcomes,
        fault_log,
        samples,
        (idle, after),
        running_after,
        ledger,
        (warmup, traffic_end),
    );
    std::fs::write(args.out.join("soak.json"), serde_json::to_vec_pretty(&report)?)?;
    plot_rss(&args.out.join("soak-rss.svg"), &report.samples, warmup).map_err(anyhow::Error::msg)?;
    Ok(report)
}

/// Seconds after a pod is back before a request failing on it is no longer excused: the EPP
/// must scrape it again (every 50 ms) and Envoy's connection to it be re-made.
const POD_BACK_GRACE: f64 = 3.0;

/// Seconds around a Redis outage within which a request's charge is uncertain.
const REDIS_GRACE: f64 = 1.0;

#[allow(clippy::too_many_arguments)]
fn judge(
    args: &SoakArgs,
    outcomes: Vec<Outcome>,
    fault_log: Vec<Fault>,
    samples: Vec<Sample>,
    (idle, after): (Sample, Sample),
    running_after: f64,
    ledger: u64,
    (warmup, traffic_end): (f64, f64),
) -> SoakReport {
    let overlaps = |o: &Outcome, kind: &str, grace: f64| {
        fault_log
            .iter()
            .filter(|f| f.kind == kind)
            .any(|f| o.start <= f.end + grace && o.end >= f.start - grace)
    };
    let mut by_status = BTreeMap::new();
    let mut excused = 0;
    let mut unexcused = Vec::new();
    let mut clean_usage = 0;
    let mut touched_bound = 0;
    let mut guard_violations = 0;
    for o in &outcomes {
        let key = match (o.status, o.vanished, o.broken) {
            (_, true, _) => "vanished".to_owned(),
            (None, _, _) => "connection-error".to_owned(),
            (Some(s), _, true) => format!("{s}-broken"),
            (Some(s), _, false) => s.to_string(),
        };
        *by_status.entry(key.clone()).or_insert(0) += 1;
        let failed = !o.vanished && (o.status.is_none_or(|s| s >= 500) || o.broken);
        if failed {
            if overlaps(o, "pod-killed", POD_BACK_GRACE) {
                excused += 1;
            } else {
                unexcused.push(format!("{} {key} at {:.1}-{:.1} s", o.tenant, o.start, o.end));
            }
        }
        if o.guard_violation {
            guard_violations += 1;
        }
        if o.tenant == "ledger" && o.status == Some(200) {
            let touched = overlaps(o, "redis-restarted", REDIS_GRACE) || o.broken;
            match (touched, o.usage) {
                (false, Some(u)) => clean_usage += u,
                (_, u) => touched_bound += u.unwrap_or(0).max(o.estimate),
            }
        } else if o.tenant == "ledger" && o.status.is_none_or(|s| s >= 500) {
            touched_bound += o.estimate;
        }
    }
    let mean_rss = |from: f64, to: f64| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .map(|s| s.rss_mib)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let rss_after_warmup = mean_rss(warmup, warmup + 60.0);
    let rss_final = mean_rss(traffic_end - 60.0, traffic_end + 1.0);
    let rss_growth = rss_final / rss_after_warmup.max(1e-9) - 1.0;
    let mut faults = BTreeMap::new();
    for f in &fault_log {
        *faults.entry(f.kind).or_insert(0) += 1;
    }

    let mut failures = Vec::new();
    if !unexcused.is_empty() {
        failures.push(format!("{} errors while no pod was down", unexcused.len()));
    }
    if guard_violations > 0 {
        failures.push(format!("{guard_violations} guarded answers leaked or lost data"));
    }
    if rss_growth > 0.05 {
        failures.push(format!(
            "RSS grew {:.1} % after warm-up (at most 5 %)",
            rss_growth * 100.0
        ));
    }
    // Connections the proxy and the pods re-open may sit in different pools; a handful of
    // descriptors either way is not a leak, thousands of requests' worth would be.
    if after.fds > idle.fds + 8 {
        failures.push(format!("open files {} after, {} idle", after.fds, idle.fds));
    }
    if after.threads > idle.threads {
        failures.push(format!("threads {} after, {} idle", after.threads, idle.threads));
    }
    if let (Some(a), Some(i)) = (after.tasks, idle.tasks)
        && a > i + 8.0
    {
        failures.push(format!("runtime tasks {a} after, {i} idle"));
    }
    if running_after != 0.0 {
        failures.push(format!("{running_after} requests still counted as running"));
    }
    if ledger < clean_usage || ledger > clean_usage + touched_bound {
        failures.push(format!(
            "ledger {ledger} outside [{clean_usage}, {}]",
            clean_usage + touched_bound
        ));
    }
    if args.minutes >= 1.0 && outcomes.len() < 10 {
        failures.push("almost no traffic was sent".into());
    }
    SoakReport {
        requests: outcomes.len(),
        by_status,
        faults,
        excused_errors: excused,
        unexcused_errors: unexcused,
        guard_violations,
        rss_after_warmup_mib: rss_after_warmup,
        rss_final_mib: rss_final,
        rss_growth,
        idle: (idle.fds, idle.threads, idle.tasks),
        after: (after.fds, after.threads, after.tasks),
        running_after,
        ledger_tokens: ledger,
        ledger_clean_usage: clean_usage,
        ledger_touched_bound: touched_bound,
        samples,
        fault_log,
        failures,
    }
}

/// The EPP's RSS over the run, with the warm-up's end marked.
fn plot_rss(path: &std::path::Path, samples: &[Sample], warmup: f64) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let t_max = samples.last().map_or(1.0, |s| s.at).max(1.0);
    let rss_max = samples.iter().map(|s| s.rss_mib).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption("EPP resident memory during the soak", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..t_max / 60.0, 0.0..rss_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("minutes")
        .y_desc("RSS (MiB)")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (s.at / 60.0, s.rss_mib)),
            &BLUE,
        ))
        .map_err(|e| err(&e))?
        .label("RSS")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            [(warmup / 60.0, 0.0), (warmup / 60.0, rss_max)],
            &RED,
        ))
        .map_err(|e| err(&e))?
        .label("end of warm-up")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
