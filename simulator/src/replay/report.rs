//! Reports of replay runs: latency percentiles, throughput, cache hits, balance; as JSON (stable
//! field names, scripts read them) and as a Markdown table.
//!
//! Definitions: TTFT = first token − arrival; TPOT = (last − first token) / (output − 1), over
//! requests with at least two output tokens; E2E = last token − arrival. Throughput counts output
//! tokens over the span from the first arrival to the last completion. The prefix hit rate is
//! the engine model's own: prompt tokens found in the serving pod's KV cache at admission over
//! all prompt tokens of completed requests. Percentiles are nearest-rank ([`crate::stats`]). A run of a workload
//! with tenants also carries a per-tenant breakdown ([`tenants`](super::tenants)).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Outcome, RequestRecord, RunOutcome, tenants::TenantBreakdown};
use crate::stats::Latency;

/// One pod's share of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodReport {
    /// Pod index.
    pub pod: usize,
    /// Requests routed to it.
    pub requests: u64,
    /// Prompt tokens routed to it.
    pub prompt_tokens: u64,
    /// Its prefix hit rate.
    pub prefix_hit_rate: f64,
    /// Fraction of the run it spent in engine steps.
    pub busy_fraction: f64,
    /// Preemptions.
    pub preemptions: u64,
    /// LoRA adapter loads.
    pub lora_loads: u64,
}

/// The TTFT a request must meet to count in the goodput, seconds (an interactive chat's
/// patience).
pub const GOODPUT_TTFT_S: f64 = 2.0;

/// The time per output token a request must meet to count in the two-level goodput, seconds
/// (a reading pace).
pub const GOODPUT_TPOT_S: f64 = 0.1;

/// The report of one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Configuration name.
    pub name: String,
    /// Requests in the workload.
    pub requests: usize,
    /// Requests served to the end.
    pub completed: usize,
    /// Requests refused (EPP or engine).
    pub rejected: usize,
    /// Of those, refused by the EPP.
    pub rejected_by_epp: usize,
    /// Of those, refused by the engine (too long).
    pub rejected_by_engine: usize,
    /// Refusals by the EPP, by reason (`guard`, `budget`, `saturated`, `no-candidates`, …).
    pub refused: BTreeMap<&'static str, usize>,
    /// Time to first token.
    pub ttft: Latency,
    /// Time per output token after the first.
    pub tpot: Latency,
    /// End-to-end latency.
    pub e2e: Latency,
    /// Output tokens per second over the run.
    pub throughput_tokens_per_s: f64,
    /// Goodput: requests per second over the run served with a first token within
    /// [`GOODPUT_TTFT_S`] of arrival.
    pub goodput_rps: f64,
    /// Goodput under both service levels: first token within [`GOODPUT_TTFT_S`] and time per
    /// output token within [`GOODPUT_TPOT_S`] (requests per second).
    pub goodput_slo_rps: f64,
    /// Prompt tokens per second over the run.
    pub input_tokens_per_s: f64,
    /// Prompt tokens served from the prefix cache / all prompt tokens.
    pub prefix_hit_rate: f64,
    /// Prompt tokens the EPP's prefix index predicted cached / all prompt tokens, over the
    /// completed requests it made a prediction for (0 without any).
    pub index_predicted_hit_rate: f64,
    /// Of the tokens the index predicted cached, the share the engine found cached (1 when it
    /// predicted none).
    pub index_precision: f64,
    /// Preemptions over all pods.
    pub preemptions: u64,
    /// LoRA adapter loads over all pods.
    pub lora_loads: u64,
    /// Most requests on one pod over the mean (1.0 = perfectly even).
    pub max_over_mean_requests: f64,
    /// Simulated seconds from the first arrival to the last event.
    pub simulated_s: f64,
    /// Per-pod breakdown.
    pub pods: Vec<PodReport>,
    /// Per-tenant breakdown, when the workload has tenants; [`Report::from_run`] leaves it
    /// empty (the run does not know the tenants), [`super::tenants::breakdown`] fills it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenants: Option<TenantBreakdown>,
}

impl Report {
    /// Summarise a run.
    pub fn from_run(run: &RunOutcome) -> Self {
        let done: Vec<_> = run
            .records
            .iter()
            .filter(|r| r.outcome == Outcome::Completed)
            .collect();
        let secs = |ns: u64| ns as f64 / 1e9;
        let ttft = done
            .iter()
            .filter_map(|r| Some(secs(r.first_token_ns?.saturating_sub(r.arrival_ns))))
            .collect();
        let e2e = done
            .iter()
            .filter_map(|r| Some(secs(r.finish_ns?.saturating_sub(r.arrival_ns))))
            .collect();
        let tpot = done
            .iter()
            .filter(|r| r.output_tokens >= 2)
            .filter_map(|r| {
                let span = r.finish_ns?.saturating_sub(r.first_token_ns?);
                Some(secs(span) / f64::from(r.output_tokens - 1))
            })
            .collect();
        // Within the TTFT level, and (`tpot`) within the TPOT level too (a request with one
        // output token has no TPOT to miss).
        let meets = |r: &RequestRecord, tpot: bool| {
            let Some(first) = r.first_token_ns else {
                return false;
            };
            let ttft_ok = secs(first.saturating_sub(r.arrival_ns)) <= GOODPUT_TTFT_S;
            let tpot_ok = !tpot
                || r.output_tokens < 2
                || r.finish_ns.is_some_and(|f| {
                    secs(f.saturating_sub(first)) / f64::from(r.output_tokens - 1) <= GOODPUT_TPOT_S
                });
            ttft_ok && tpot_ok
        };
        let start = run.records.iter().map(|r| r.arrival_ns).min().unwrap_or(0);
        let span_s = secs(run.end_ns.saturating_sub(start)).max(1e-9);
        let output: u64 = done.iter().map(|r| u64::from(r.output_tokens)).sum();
        let prompt: u64 = done.iter().map(|r| u64::from(r.prompt_tokens)).sum();
        let cached: u64 = done.iter().map(|r| u64::from(r.cached_tokens)).sum();
        let (mut predicted_prompt, mut predicted, mut confirmed) = (0u64, 0u64, 0u64);
        for r in &done {
            if let Some(p) = r.predicted_cached_tokens {
                predicted_prompt += u64::from(r.prompt_tokens);
                predicted += u64::from(p);
                confirmed += u64::from(p.min(r.cached_tokens));
            }
        }
        let count = |o: Outcome| run.records.iter().filter(|r| r.outcome == o).count();
        // Prompt and cached tokens per pod, in one pass over the completed requests.
        let mut per_pod = vec![(0u64, 0u64); run.pods.len()];
        for r in &done {
            if let Some(t) = r.pod.and_then(|i| per_pod.get_mut(i as usize)) {
                t.0 += u64::from(r.prompt_tokens);
                t.1 += u64::from(r.cached_tokens);
            }
        }
        let pods: Vec<PodReport> = run
            .pods
            .iter()
            .zip(per_pod)
            .enumerate()
            .map(|(i, (p, (prompt, cached)))| PodReport {
                pod: i,
                requests: p.requests,
                prompt_tokens: prompt,
                prefix_hit_rate: ratio(cached, prompt),
                busy_fraction: secs(p.busy_ns) / span_s,
                preemptions: p.preemptions,
                lora_loads: p.lora_loads,
            })
            .collect();
        let mean_requests = pods.iter().map(|p| p.requests as f64).sum::<f64>() / pods.len().max(1) as f64;
        let max_requests = pods.iter().map(|p| p.requests).max().unwrap_or(0) as f64;
        let (by_epp, by_engine) = (count(Outcome::RejectedByEpp), count(Outcome::RejectedByEngine));
        let mut refused = BTreeMap::new();
        for r in run.records.iter().filter(|r| r.outcome == Outcome::RejectedByEpp) {
            *refused.entry(r.refusal.unwrap_or("unknown")).or_insert(0) += 1;
        }
        Self {
            name: run.name.clone(),
            requests: run.records.len(),
            completed: done.len(),
            rejected: by_epp + by_engine,
            rejected_by_epp: by_epp,
            rejected_by_engine: by_engine,
            refused,
            ttft: Latency::of(ttft),
            tpot: Latency::of(tpot),
            e2e: Latency::of(e2e),
            throughput_tokens_per_s: output as f64 / span_s,
            goodput_rps: done.iter().filter(|r| meets(r, false)).count() as f64 / span_s,
            goodput_slo_rps: done.iter().filter(|r| meets(r, true)).count() as f64 / span_s,
            input_tokens_per_s: prompt as f64 / span_s,
            prefix_hit_rate: ratio(cached, prompt),
            index_predicted_hit_rate: ratio(predicted, predicted_prompt),
            index_precision: if predicted == 0 {
                1.0
            } else {
                ratio(confirmed, predicted)
            },
            preemptions: run.pods.iter().map(|p| p.preemptions).sum(),
            lora_loads: run.pods.iter().map(|p| p.lora_loads).sum(),
            max_over_mean_requests: if mean_requests > 0.0 {
                max_requests / mean_requests
            } else {
                0.0
            },
            simulated_s: span_s,
            pods,
            tenants: None,
        }
    }

    /// The flat summary `epp-sim compare --json` writes (field names are a stable contract).
    pub fn summary(&self) -> Summary {
        Summary {
            name: self.name.clone(),
            requests: self.requests,
            completed: self.completed,
            ttft_mean_s: self.ttft.mean_s,
            ttft_p50_s: self.ttft.p50_s,
            ttft_p90_s: self.ttft.p90_s,
            ttft_p99_s: self.ttft.p99_s,
            tpot_p50_s: self.tpot.p50_s,
            tpot_p90_s: self.tpot.p90_s,
            e2e_p50_s: self.e2e.p50_s,
            e2e_p90_s: self.e2e.p90_s,
            e2e_p99_s: self.e2e.p99_s,
            throughput_tokens_per_s: self.throughput_tokens_per_s,
            goodput_rps: self.goodput_rps,
            goodput_slo_rps: self.goodput_slo_rps,
            prefix_hit_rate: self.prefix_hit_rate,
            rejected: self.rejected,
            refused: self.refused.clone(),
            preemptions: self.preemptions,
            lora_loads: self.lora_loads,
            max_over_mean_requests: self.max_over_mean_requests,
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// One row of `compare` output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Configuration name.
    pub name: String,
    /// Requests in the workload.
    pub requests: usize,
    /// Requests served.
    pub completed: usize,
    /// TTFT mean, s.
    pub ttft_mean_s: f64,
    /// TTFT median, s.
    pub ttft_p50_s: f64,
    /// TTFT p90, s.
    pub ttft_p90_s: f64,
    /// TTFT p99, s.
    pub ttft_p99_s: f64,
    /// TPOT median, s.
    pub tpot_p50_s: f64,
    /// TPOT p90, s.
    pub tpot_p90_s: f64,
    /// E2E median, s.
    pub e2e_p50_s: f64,
    /// E2E p90, s.
    pub e2e_p90_s: f64,
    /// E2E p99, s.
    pub e2e_p99_s: f64,
    /// Output tokens per second.
    pub throughput_tokens_per_s: f64,
    /// Requests per second served within [`GOODPUT_TTFT_S`] of TTFT.
    pub goodput_rps: f64,
    /// Requests per second served within [`GOODPUT_TTFT_S`] and [`GOODPUT_TPOT_S`].
    pub goodput_slo_rps: f64,
    /// Engine prefix-cache hit rate.
    pub prefix_hit_rate: f64,
    /// Requests refused.
    pub rejected: usize,
    /// Refusals by the EPP, by reason.
    pub refused: BTreeMap<&'static str, usize>,
    /// Preemptions.
    pub preemptions: u64,
    /// LoRA adapter loads.
    pub lora_loads: u64,
    /// Busiest pod's requests over the mean.
    pub max_over_mean_requests: f64,
}

/// A Markdown table with one row per report, then a per-tenant table for each report that has
/// a tenant breakdown.
pub fn markdown(reports: &[Report]) -> String {
    let mut out = String::from(
        "| config | done | rejected | TTFT mean | TTFT p50 | TTFT p90 | TTFT p99 | TPOT p50 | E2E p90 | out tok/s | prefix hits | max/mean reqs |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in reports {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} % | {:.2} |\n",
            r.name,
            r.completed,
            r.rejected,
            seconds(r.ttft.mean_s),
            seconds(r.ttft.p50_s),
            seconds(r.ttft.p90_s),
            seconds(r.ttft.p99_s),
            seconds(r.tpot.p50_s),
            seconds(r.e2e.p90_s),
            r.throughput_tokens_per_s,
            r.prefix_hit_rate * 100.0,
            r.max_over_mean_requests,
        ));
    }
    let refusals: Vec<String> = reports
        .iter()
        .filter(|r| !r.refused.is_empty())
        .map(|r| {
            let reasons: Vec<String> = r.refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
            format!("{}: {}", r.name, reasons.join(", "))
        })
        .collect();
    if !refusals.is_empty() {
        out.push_str(&format!("\nRefused by the EPP: {}.\n", refusals.join("; ")));
    }
    for r in reports {
        if let Some(t) = &r.tenants {
            out.push('\n');
            out.push_str(&super::tenants::markdown(&r.name, t));
        }
    }
    out
}

/// `0.0123` → `12.3 ms`, `4.5` → `4.50 s`.
pub(super) fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_read_in_the_unit_that_fits() {
        assert_eq!(seconds(0.0123), "12.3 ms");
        assert_eq!(seconds(4.5), "4.50 s");
    }
}
