//! Per-tenant breakdown of a replay run: who was served, who was refused, how long each waited
//! for the first token, and how fairly the served tokens were spread (Jain's index against
//! max-min fair shares).
//!
//! A request's tenant is [`TraceRequest::tenant`](crate::workload::TraceRequest::tenant);
//! requests without one are grouped under `-`. Tokens are prompt + output tokens: a tenant's
//! *demand* counts all its requests as the workload asks for them, what it was *served* counts
//! its completed requests as the run recorded them. TTFT percentiles are those of
//! [`Latency::of`] (nearest rank) over completed requests. `replay`/`compare` call
//! [`breakdown`] for each run and print [`markdown`] after the main table.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Outcome, RunOutcome};
use crate::stats::Latency;
use crate::workload::Workload;

/// Name of the group of requests without a tenant.
pub const NO_TENANT: &str = "-";

/// Tokens a tenant asked for and got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TokenUse {
    /// Prompt + output tokens of all its requests.
    pub demanded: u64,
    /// Prompt + output tokens of its completed requests.
    pub served: u64,
}

/// One tenant's share of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantRow {
    /// Tenant name ([`NO_TENANT`] for requests without one).
    pub tenant: String,
    /// Its requests in the workload.
    pub requests: usize,
    /// Of those, served to the end.
    pub completed: usize,
    /// Of those, refused by the EPP.
    pub rejected_by_epp: usize,
    /// Refusals by the EPP, by reason (`guard`, `budget`, `saturated`, …).
    pub refused: BTreeMap<&'static str, usize>,
    /// Of those, refused by the engine (too long).
    pub rejected_by_engine: usize,
    /// Time to first token of its completed requests.
    pub ttft: Latency,
    /// Tokens demanded and served.
    pub tokens: TokenUse,
    /// Its served tokens over all tenants' served tokens (0 when nothing was served).
    pub served_share: f64,
    /// Its max-min fair share of all served tokens, given every tenant's demand (see
    /// [`jain_index`]).
    pub fair_tokens: f64,
}

impl TenantRow {
    /// Served over fair tokens (the `x` of [`jain_index`]); `None` when its fair share is zero.
    pub fn served_over_fair(&self) -> Option<f64> {
        (self.fair_tokens > 0.0).then(|| self.tokens.served as f64 / self.fair_tokens)
    }
}

/// The per-tenant part of a [`Report`](super::report::Report).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantBreakdown {
    /// [`jain_index`] of the rows' token use.
    pub jain_index: f64,
    /// One row per tenant, in name order (`team-2` before `team-10`; `-` last).
    pub rows: Vec<TenantRow>,
}

/// The per-tenant breakdown of `run`, or `None` when no request of `workload` names a tenant.
pub fn breakdown(run: &RunOutcome, workload: &Workload) -> Option<TenantBreakdown> {
    if workload.requests.iter().all(|r| r.tenant.is_none()) {
        return None;
    }
    let rows = tenant_report(run, workload);
    let tokens: Vec<TokenUse> = rows.iter().map(|r| r.tokens).collect();
    Some(TenantBreakdown {
        jain_index: jain_index(&tokens),
        rows,
    })
}

/// One row per tenant of `workload` (requests without a tenant under [`NO_TENANT`]), in name
/// order. `run.records[i]` must belong to `workload.requests[i]`, as [`replay`](super::replay)
/// records them.
pub fn tenant_report(run: &RunOutcome, workload: &Workload) -> Vec<TenantRow> {
    #[derive(Default)]
    struct Tally {
        requests: usize,
        completed: usize,
        rejected_by_epp: usize,
        refused: BTreeMap<&'static str, usize>,
        rejected_by_engine: usize,
        ttft: Vec<f64>,
        tokens: TokenUse,
    }
    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
    for (req, rec) in workload.requests.iter().zip(&run.records) {
        let t = tallies
            .entry(req.tenant.as_deref().unwrap_or(NO_TENANT))
            .or_default();
        t.requests += 1;
        t.tokens.demanded += u64::from(req.input_tokens) + u64::from(req.output_tokens);
        match rec.outcome {
            Outcome::Completed => {
                t.completed += 1;
                t.tokens.served += u64::from(rec.prompt_tokens) + u64::from(rec.output_tokens);
                if let Some(first) = rec.first_token_ns {
                    t.ttft.push(first.saturating_sub(rec.arrival_ns) as f64 / 1e9);
                }
            }
            Outcome::RejectedByEpp => {
                t.rejected_by_epp += 1;
                *t.refused.entry(rec.refusal.unwrap_or("unknown")).or_insert(0) += 1;
            }
            Outcome::RejectedByEngine => t.rejected_by_engine += 1,
            Outcome::Unfinished => {}
        }
    }
    let mut tallies: Vec<(&str, Tally)> = tallies.into_iter().collect();
    tallies.sort_by(|a, b| name_order(a.0).cmp(&name_order(b.0)));
    let tokens: Vec<TokenUse> = tallies.iter().map(|(_, t)| t.tokens).collect();
    let fair = max_min_fair(&tokens);
    let served: u64 = tokens.iter().map(|t| t.served).sum();
    tallies
        .into_iter()
        .zip(fair)
        .map(|((name, t), fair_tokens)| TenantRow {
            tenant: name.to_owned(),
            requests: t.requests,
            completed: t.completed,
            rejected_by_epp: t.rejected_by_epp,
            refused: t.refused,
            rejected_by_engine: t.rejected_by_engine,
            ttft: Latency::of(t.ttft),
            served_share: if served == 0 {
                0.0
            } else {
                t.tokens.served as f64 / served as f64
            },
            tokens: t.tokens,
            fair_tokens,
        })
        .collect()
}

/// Jain's fairness index of the served tokens, measured against max-min fair shares:
/// `J = (Σx)² / (n·Σx²)` with `x_i = served_i / fair_i`.
///
/// `fair_i` is tenant i's max-min fair share of everything that was served (`S = Σ served_i`)
/// given the demands, computed by water-filling: raise a common level `λ` until
/// `Σ min(demand_i, λ) = S`, and give each tenant `min(demand_i, λ)`. So a tenant that asked for
/// less than an equal split is fair at its whole demand, and the surplus goes to the others
/// equally. The sum runs over the `n` tenants whose fair share is positive (a tenant that
/// demanded nothing is not counted).
///
/// J is 1.0 when every tenant got exactly its fair share, including a flooder that got less than
/// it asked for while everyone else was fully served, and falls towards `1/n` as the tokens go
/// to one tenant at the others' expense. It is 1.0 when nothing was served.
pub fn jain_index(tenants: &[TokenUse]) -> f64 {
    let x: Vec<f64> = tenants
        .iter()
        .zip(max_min_fair(tenants))
        .filter(|(_, fair)| *fair > 0.0)
        .map(|(t, fair)| t.served as f64 / fair)
        .collect();
    let sum: f64 = x.iter().sum();
    let sum_sq: f64 = x.iter().map(|x| x * x).sum();
    if sum_sq > 0.0 {
        sum * sum / (x.len() as f64 * sum_sq)
    } else {
        1.0
    }
}

/// Max-min fair shares (water-filling) of the total served tokens given each tenant's demand,
/// in the order of `tenants`.
fn max_min_fair(tenants: &[TokenUse]) -> Vec<f64> {
    let mut capacity = tenants.iter().map(|t| t.served as f64).sum::<f64>();
    let mut by_demand: Vec<usize> = (0..tenants.len()).collect();
    by_demand.sort_by_key(|&i| tenants[i].demanded);
    let mut fair = vec![0.0; tenants.len()];
    for (filled, &i) in by_demand.iter().enumerate() {
        // The level of an equal split of what is left among the tenants not yet filled; the
        // smallest demand left either fits under it (and is met) or sets every remaining share.
        let level = capacity / (tenants.len() - filled) as f64;
        fair[i] = (tenants[i].demanded as f64).min(level);
        capacity -= fair[i];
    }
    fair
}

/// Sort key of tenant names: `team-2` before `team-10`, and requests without a tenant last.
fn name_order(name: &str) -> (bool, &str, u64, &str) {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let number = name[stem.len()..].parse().unwrap_or(0);
    (name == NO_TENANT, stem, number, name)
}

/// A Markdown table of `tenants`, headed with the configuration's name and its Jain's index.
pub fn markdown(config: &str, tenants: &TenantBreakdown) -> String {
    let mut out = format!(
        "Per tenant, {config} (Jain's index of served / max-min fair tokens: {:.3}):\n\n\
         | tenant | requests | done | refused by EPP | TTFT p50 | TTFT p90 | TTFT p99 | served tokens | served share | served / fair |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        tenants.jain_index
    );
    for r in &tenants.rows {
        let refused = if r.refused.is_empty() {
            r.rejected_by_epp.to_string()
        } else {
            let reasons: Vec<String> = r.refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
            format!("{} ({})", r.rejected_by_epp, reasons.join(", "))
        };
        let (p50, p90, p99) = if r.completed == 0 {
            ("-".to_owned(), "-".to_owned(), "-".to_owned())
        } else {
            (
                super::report::seconds(r.ttft.p50_s),
                super::report::seconds(r.ttft.p90_s),
                super::report::seconds(r.ttft.p99_s),
            )
        };
        out.push_str(&format!(
            "| {} | {} | {} | {refused} | {p50} | {p90} | {p99} | {} | {:.1} % | {} |\n",
            r.tenant,
            r.requests,
            r.completed,
            r.tokens.served,
            r.served_share * 100.0,
            r.served_over_fair()
                .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}")),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        replay::RequestRecord,
        workload::{TraceRequest, Workload},
    };

    fn use_(demanded: u64, served: u64) -> TokenUse {
        TokenUse { demanded, served }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn jain_is_one_for_equal_shares() {
        let j = jain_index(&[use_(100, 100), use_(100, 100), use_(100, 100)]);
        assert!(close(j, 1.0), "{j}");
        // Equal service under equal, unmet demand is also fair.
        let j = jain_index(&[use_(500, 100), use_(500, 100)]);
        assert!(close(j, 1.0), "{j}");
    }

    #[test]
    fn jain_of_a_starved_tenant() {
        // S = 100, fair = (50, 50), x = (2, 0): J = 2² / (2 · 4) = 0.5.
        let j = jain_index(&[use_(100, 100), use_(100, 0)]);
        assert!(close(j, 0.5), "{j}");
        // S = 300, λ = 100, fair = (100, 100, 100), x = (2, 1, 0): J = 9 / (3 · 5) = 0.6.
        let j = jain_index(&[use_(300, 200), use_(300, 100), use_(300, 0)]);
        assert!(close(j, 0.6), "{j}");
    }

    #[test]
    fn jain_is_one_for_a_flooder_held_to_its_fair_share() {
        // S = 500; the quiet tenants' demands (100 each) fit under the level, so λ = 300 and
        // fair = (300, 100, 100) = served: x = (1, 1, 1).
        let tenants = [use_(1_000, 300), use_(100, 100), use_(100, 100)];
        assert_eq!(max_min_fair(&tenants), vec![300.0, 100.0, 100.0]);
        assert!(close(jain_index(&tenants), 1.0));
        // The same service judged against equal splits would have looked unfair.
        let equal = 500.0 / 3.0;
        let x = [300.0 / equal, 100.0 / equal, 100.0 / equal];
        let naive = x.iter().sum::<f64>().powi(2) / (3.0 * x.iter().map(|x| x * x).sum::<f64>());
        assert!(naive < 0.85, "{naive}");
        // If the flooder crowds a quiet tenant out, the index drops: fair = (300, 100, 100),
        // x = (4/3, 0, 1), J = (7/3)² / (3 · 25/9) = 49/75.
        let j = jain_index(&[use_(1_000, 400), use_(100, 0), use_(100, 100)]);
        assert!(close(j, 49.0 / 75.0), "{j}");
    }

    #[test]
    fn jain_ignores_tenants_without_demand_and_empty_runs() {
        assert!(close(jain_index(&[use_(100, 100), use_(0, 0)]), 1.0));
        assert!(close(jain_index(&[use_(100, 0), use_(100, 0)]), 1.0));
        assert!(close(jain_index(&[]), 1.0));
    }

    fn request(tenant: Option<&str>, arrival_ns: u64) -> TraceRequest {
        TraceRequest {
            arrival_ns,
            input_tokens: 90,
            output_tokens: 10,
            blocks: vec![arrival_ns],
            adapter: None,
            tenant: tenant.map(Arc::from),
        }
    }

    fn record(arrival_ns: u64, outcome: Outcome, ttft_ns: u64) -> RequestRecord {
        let done = outcome == Outcome::Completed;
        RequestRecord {
            arrival_ns,
            pod: done.then_some(0),
            first_token_ns: done.then_some(arrival_ns + ttft_ns),
            finish_ns: done.then_some(arrival_ns + 2 * ttft_ns),
            prompt_tokens: 90,
            output_tokens: if done { 10 } else { 0 },
            cached_tokens: 0,
            predicted_cached_tokens: None,
            outcome,
            refusal: (outcome == Outcome::RejectedByEpp).then_some("budget"),
            dispatched_ns: done.then_some(arrival_ns),
        }
    }

    #[test]
    fn rows_per_tenant_in_name_order() {
        let (reqs, recs): (Vec<_>, Vec<_>) = [
            (Some("team-10"), Outcome::Completed, 1),
            (Some("team-2"), Outcome::Completed, 1),
            (Some("team-2"), Outcome::Completed, 3),
            (Some("team-2"), Outcome::RejectedByEpp, 0),
            (None, Outcome::Completed, 2),
            (Some("team-2"), Outcome::Completed, 2),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (tenant, outcome, ttft_s))| {
            let at = i as u64 * 1_000_000_000;
            (request(tenant, at), record(at, outcome, ttft_s * 1_000_000_000))
        })
        .unzip();
        let workload = Workload {
            name: "t".into(),
            block_tokens: 16,
            requests: reqs,
        };
        let run = RunOutcome {
            name: "c".into(),
            records: recs,
            pods: vec![],
            end_ns: 10_000_000_000,
        };
        let b = breakdown(&run, &workload).expect("the workload has tenants");
        let names: Vec<&str> = b.rows.iter().map(|r| r.tenant.as_str()).collect();
        assert_eq!(names, ["team-2", "team-10", "-"]);
        let team2 = &b.rows[0];
        assert_eq!(
            (team2.requests, team2.completed, team2.rejected_by_epp),
            (4, 3, 1)
        );
        assert_eq!(team2.refused, BTreeMap::from([("budget", 1)]));
        assert_eq!((team2.ttft.p50_s, team2.ttft.p99_s), (2.0, 3.0));
        assert_eq!(team2.tokens, use_(400, 300));
        assert!(close(team2.served_share, 0.6));
        // S = 500 over demands (400, 100, 100): λ = 300.
        assert_eq!(team2.fair_tokens, 300.0);
        assert!(close(b.jain_index, 1.0));
        let table = markdown("c", &b);
        assert!(
            table.contains(
                "| team-2 | 4 | 3 | 1 (budget 1) | 2.00 s | 3.00 s | 3.00 s | 300 | 60.0 % | 1.00 |"
            ),
            "{table}"
        );

        let anonymous = Workload {
            requests: workload
                .requests
                .iter()
                .map(|r| TraceRequest {
                    tenant: None,
                    ..r.clone()
                })
                .collect(),
            ..workload
        };
        assert_eq!(breakdown(&run, &anonymous), None);
    }
}
