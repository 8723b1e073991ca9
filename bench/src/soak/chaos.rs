//! The soak's processes (emulated pods, Redis), reading the EPP process, and the faults: how
//! each is broken and mended.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

use super::Sample;

/// A child process killed on drop.
pub(super) struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn spawn_pod(port: u16, time_scale: f64) -> anyhow::Result<Proc> {
    let child = Command::new(crate::epp_process::sibling_binary("epp-sim")?)
        .args(["emulate", "--pods", "1", "--base-port", &port.to_string()])
        .args(["--time-scale", &time_scale.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting an emulated pod")?;
    Ok(Proc(child))
}

pub(super) fn spawn_redis(port: u16, dir: &std::path::Path) -> anyhow::Result<Proc> {
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
pub(super) async fn wait_for(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
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

pub(super) async fn wait_for_redis(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if redis_cli(port, &["ping"]).is_ok_and(|o| o.trim() == "PONG") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("redis-server on port {port} did not answer within 10 s")
}

pub(super) fn redis_cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .context("redis-cli")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `ledger` tenant's tokens in Redis, summed over every window key.
pub(super) fn ledger_tokens(port: u16) -> anyhow::Result<u64> {
    let keys = redis_cli(port, &["--scan", "--pattern", "epp:budget:t:ledger:*"])?;
    let mut total = 0;
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let v = redis_cli(port, &["get", key])?;
        total += v.trim().parse::<i64>().unwrap_or(0).max(0) as u64;
    }
    Ok(total)
}

pub(super) fn proc_sample(pid: u32, at: f64, tasks: Option<f64>) -> Option<Sample> {
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
pub(super) async fn page_value(client: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = client.get(url).send().await.ok()?.text().await.ok()?;
    let mut sum = None;
    epp::scrape::exposition::for_each_sample(&text, |s| {
        if s.name == name {
            *sum.get_or_insert(0.0) += s.value;
        }
    });
    sum
}

/// The faults' kinds, in the order they cycle.
pub(super) const FAULTS: [&str; 4] = ["pod-killed", "redis-restarted", "page-garbage", "page-slow"];

/// The processes the soak breaks, and how to break and mend each.
pub(super) struct Chaos {
    pub(super) client: reqwest::Client,
    pub(super) pods: Vec<Option<Proc>>,
    pub(super) pod_ports: Vec<u16>,
    pub(super) time_scale: f64,
    pub(super) redis: Option<Proc>,
    pub(super) redis_port: u16,
    pub(super) redis_dir: PathBuf,
}

impl Chaos {
    async fn set_page(&self, target: usize, mode: &'static str) -> anyhow::Result<()> {
        self.client
            .post(format!(
                "http://127.0.0.1:{}/emulator/page",
                self.pod_ports[target]
            ))
            .body(mode)
            .send()
            .await?;
        Ok(())
    }

    /// Start fault `kind` on `target` (a pod index); what it hit and how long it lasts (s).
    pub(super) async fn inject(&mut self, kind: usize, target: usize) -> anyhow::Result<(String, f64)> {
        let pod = format!("127.0.0.1:{}", self.pod_ports[target]);
        Ok(match FAULTS[kind] {
            "pod-killed" => {
                self.pods[target] = None;
                (pod, 8.0)
            }
            "redis-restarted" => {
                self.redis = None;
                ("redis".to_owned(), 4.0)
            }
            "page-garbage" => {
                self.set_page(target, "garbage").await?;
                (pod, 20.0)
            }
            _ => {
                self.set_page(target, "slow").await?;
                (pod, 20.0)
            }
        })
    }

    /// End fault `kind` on `target`; with `wait`, until the restarted process answers.
    pub(super) async fn mend(&mut self, kind: usize, target: usize, wait: bool) -> anyhow::Result<()> {
        match FAULTS[kind] {
            "pod-killed" => {
                let port = self.pod_ports[target];
                self.pods[target] = Some(spawn_pod(port, self.time_scale)?);
                if wait {
                    wait_for(&self.client, &format!("http://127.0.0.1:{port}/health")).await?;
                }
            }
            "redis-restarted" => {
                self.redis = Some(spawn_redis(self.redis_port, &self.redis_dir)?);
                if wait {
                    wait_for_redis(self.redis_port).await?;
                }
            }
            _ => self.set_page(target, "normal").await?,
        }
        Ok(())
    }
}
