//! The soak's verdicts from what the clients saw, the faults and the EPP's samples, and the RSS
//! plot.

use std::collections::BTreeMap;

use super::{Fault, Outcome, Sample, SoakArgs, SoakReport};

/// Seconds after a pod is back before a request failing on it is no longer excused: the EPP
/// must scrape it again (every 50 ms) and Envoy's connection to it be re-made.
pub(super) const POD_BACK_GRACE: f64 = 3.0;

/// Seconds around a Redis outage within which a request's charge is uncertain.
pub(super) const REDIS_GRACE: f64 = 1.0;

/// What a soak run recorded, for [`judge`].
pub(super) struct Observed {
    /// Every request's outcome.
    pub(super) outcomes: Vec<Outcome>,
    /// Every fault and when it held.
    pub(super) fault_log: Vec<Fault>,
    /// The EPP process sampled every 5 s.
    pub(super) samples: Vec<Sample>,
    /// The EPP idle before the traffic, and settled after it.
    pub(super) idle: Sample,
    pub(super) after: Sample,
    /// Requests the EPP still counted as running after the run.
    pub(super) running_after: f64,
    /// The `ledger` tenant's tokens in Redis.
    pub(super) ledger: u64,
    /// When the warm-up and the traffic ended (s since the traffic started).
    pub(super) warmup: f64,
    pub(super) traffic_end: f64,
}

pub(super) fn judge(args: &SoakArgs, observed: Observed) -> SoakReport {
    let Observed {
        outcomes,
        fault_log,
        samples,
        idle,
        after,
        running_after,
        ledger,
        warmup,
        traffic_end,
    } = observed;
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
pub(super) fn plot_rss(path: &std::path::Path, samples: &[Sample], warmup: f64) -> Result<(), String> {
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
