//! A real `epp` process for the load harnesses: the binary built next to `epp-bench`, started
//! with the given flags (optionally pinned to CPUs), killed on drop. A separate process keeps
//! the EPP's CPU and memory apart from the load generator's, so both can be read from `/proc`.
//! The process gets the image's malloc settings ([`GLIBC_TUNABLES`]) unless the caller's
//! environment sets its own, so that the numbers are those of the shipped container.
//! Also here, for the harnesses: pinning any child to CPUs ([`pinned_command`]) and reading the
//! EPP's decision-time histogram from its `/metrics` page.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, bail};

/// The `GLIBC_TUNABLES` value of the shipped image (see the Dockerfile).
pub const GLIBC_TUNABLES: &str = "glibc.malloc.trim_threshold=67108864:glibc.malloc.mmap_threshold=4194304";

/// A command running `program`, on `cpus` (a `taskset -c` list) when given. taskset execs the
/// program, so the child's pid is the program's.
pub fn pinned_command(program: &std::path::Path, cpus: Option<&str>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A running `epp`.
pub struct EppProcess {
    child: Child,
}

/// The workspace binary `name` (`epp`, `epp-sim`) built next to this one: the harness starts
/// them as separate processes, as they run in production.
///
/// # Errors
/// When it is not there: build the workspace (`cargo build --release --workspace`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("binary dir")?.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: the harness runs the workspace's binaries (cargo build --release --workspace)",
            path.display()
        );
    }
    Ok(path)
}

impl EppProcess {
    /// Start `epp` with `flags`, pinned to `cpus` (a `taskset -c` list) when given.
    ///
    /// # Errors
    /// When the binary is missing or cannot start.
    pub fn start(flags: &[String], cpus: Option<&str>) -> anyhow::Result<Self> {
        let epp = sibling_binary("epp")?;
        let mut command = pinned_command(&epp, cpus);
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            command.env("GLIBC_TUNABLES", GLIBC_TUNABLES);
        }
        let child = command
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", epp.display()))?;
        Ok(Self { child })
    }

    /// The process id (for `/proc/<pid>`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EppProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Cumulative bucket counts `(upper bound, count)` of the EPP's decision histogram
/// (`inference_extension_request_decision_duration_seconds`) on its `/metrics` page.
///
/// # Errors
/// When the page cannot be fetched.
pub async fn decision_buckets(metrics_url: &str) -> anyhow::Result<Vec<(f64, f64)>> {
    let text = reqwest::get(metrics_url).await?.text().await?;
    let mut buckets = Vec::new();
    epp::scrape::exposition::for_each_sample(&text, |s| {
        if s.name == "inference_extension_request_decision_duration_seconds_bucket"
            && let Some(le) = s.label("le")
        {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            buckets.push((bound, s.value));
        }
    });
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(buckets)
}

/// The counts between two readings of one cumulative histogram (`after` minus `before`).
pub fn histogram_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(bound, count)| {
            let earlier = before.iter().find(|b| b.0 == bound).map_or(0.0, |b| b.1);
            (bound, count - earlier)
        })
        .collect()
}

/// Quantile `q` (0..1) of a cumulative histogram, linear within its bucket; in the bound's unit.
pub fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return lower; // beyond the last finite bound: report that bound
            }
            let share = if count > below {
                (rank - below) / (count - below)
            } else {
                1.0
            };
            return lower + (bound - lower) * share;
        }
        (lower, below) = (bound, count);
    }
    lower
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_harness_uses_the_images_malloc_settings() {
        let dockerfile = include_str!("../../Dockerfile");
        assert!(
            dockerfile
                .lines()
                .any(|l| l.trim() == format!("ENV GLIBC_TUNABLES={}", super::GLIBC_TUNABLES)),
            "Dockerfile and epp_process::GLIBC_TUNABLES differ"
        );
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        // 10 at or below 1, 90 in (1, 2], none above.
        let b = [(1.0, 10.0), (2.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(super::histogram_quantile(&b, 0.1), 1.0);
        assert!((super::histogram_quantile(&b, 0.55) - 1.5).abs() < 1e-12);
        assert_eq!(super::histogram_quantile(&b, 1.0), 2.0);
        assert!(super::histogram_quantile(&[], 0.5).is_nan());
        // Everything beyond the last finite bound reports that bound.
        assert_eq!(
            super::histogram_quantile(&[(1.0, 0.0), (f64::INFINITY, 5.0)], 0.5),
            1.0
        );
    }
}
