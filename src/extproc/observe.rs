//! What the server records of each decision: the admission stages' events, the routed request
//! and the answered response, as the exported metrics and logs. The decision itself records
//! nothing (it is pure and the simulator runs it); this is its observer on the server side.

use tracing::{debug, info, warn};

use crate::{
    budget::{Charge, LayerKey, NANOS_PER_UNIT},
    datastore::{Endpoint, Snapshot},
    metrics::exported::EppMetrics,
    parser::Usage,
    scheduler::{
        Outcome,
        admission::{AdmissionEvent, BudgetReservation},
        plugin::CacheReport,
    },
};

/// Count what the admission stages did.
pub fn admission_events(m: &EppMetrics, events: &[AdmissionEvent]) {
    for event in events {
        match event {
            AdmissionEvent::GuardMasked { guard } => {
                m.guard_hits.with_label_values(&[&**guard, "any", "mask"]).inc();
            }
            AdmissionEvent::GuardRejected { guard, rule } => {
                m.guard_hits
                    .with_label_values(&[&**guard, rule.as_str(), "reject"])
                    .inc();
                debug!(guard = %guard, rule = %rule, "prompt rejected");
            }
            AdmissionEvent::BudgetReserved {
                tenant,
                model,
                tokens,
            } => {
                m.budget_reserved
                    .with_label_values(&[tenant.as_str(), &m.labels.model(model)])
                    .inc_by(*tokens);
            }
            AdmissionEvent::BudgetFallback {
                tenant,
                requested,
                fallback,
            } => {
                m.budget_fallbacks
                    .with_label_values(&[
                        tenant.as_str(),
                        &m.labels.model(requested),
                        &m.labels.model(fallback),
                    ])
                    .inc();
                debug!(tenant = %tenant, model = %requested, fallback = %fallback, "budget fallback");
            }
            AdmissionEvent::BudgetRejected { tenant, model } => {
                m.budget_rejections
                    .with_label_values(&[tenant.as_str(), &m.labels.model(model)])
                    .inc();
            }
            AdmissionEvent::BudgetStore {
                reachable,
                changed,
                error,
                fail_open,
            } => {
                if !reachable {
                    m.budget_store_errors.inc();
                }
                match (changed, error) {
                    (true, None) => info!("budget store reachable again"),
                    (true, Some(e)) => warn!(error = %e, fail_open = fail_open, "budget store unavailable"),
                    (false, _) => {}
                }
            }
        }
    }
}

/// Record how much of each limit a routed request's reservation left used: the usage gauges
/// (for tenants the config names; unlisted tenants share the `default` label, where one
/// tenant's share would overwrite another's) and the soft-threshold crossings.
pub fn budget_usage(m: &EppMetrics, r: &BudgetReservation) {
    let policy = &r.budget.policy;
    if let Some(permille) = policy.soft_threshold_permille {
        m.budget_soft_threshold
            .with_label_values(&[] as &[&str])
            .set(f64::from(permille) / 1000.0);
    }
    let named = policy.tenants.contains_key(&r.tenant);
    for (c, used) in r.admitted.usage() {
        let layer = match &c.key.layer {
            LayerKey::Tenant { .. } => "tenant".into(),
            LayerKey::Model { model, .. } => m.labels.model(model),
        };
        let labels = [
            r.tenant.as_str(),
            &layer,
            &c.key.period.label(),
            c.key.unit.label(),
        ];
        if named && c.limit > 0 {
            m.budget_usage_ratio
                .with_label_values(&labels)
                .set(used as f64 / c.limit as f64);
        }
        if policy.past_soft_threshold(used, c.limit) {
            m.budget_warnings.with_label_values(&labels).inc();
        }
    }
}

/// Count what a served request actually cost.
pub fn budget_settled(m: &EppMetrics, r: &BudgetReservation, actual: Charge) {
    let model = m.labels.model(&r.model);
    m.budget_settled
        .with_label_values(&[r.tenant.as_str(), &model])
        .inc_by(actual.tokens);
    if actual.nanos > 0 {
        m.budget_spend
            .with_label_values(&[r.tenant.as_str(), &model, &r.budget.policy.currency])
            .inc_by(actual.nanos as f64 / NANOS_PER_UNIT as f64);
    }
}

/// Count a routed request on `primary` under `labels` (`[model, target]`, already bounded by
/// [`crate::metrics::labels`]; its end must use them too).
pub fn routed(m: &EppMetrics, outcome: &Outcome, primary: &Endpoint, labels: [&str; 2]) {
    let repairs = &outcome.cycle.repairs;
    if repairs.non_finite > 0 {
        m.score_repairs
            .with_label_values(&["non_finite"])
            .inc_by(u64::from(repairs.non_finite));
    }
    if repairs.clamped > 0 {
        m.score_repairs
            .with_label_values(&["clamped"])
            .inc_by(u64::from(repairs.clamped));
    }
    if let Some(pm) = outcome
        .cycle
        .state
        .prefix
        .as_ref()
        .filter(|pm| !pm.hashes.is_empty())
    {
        let matched = pm.matched_blocks(primary.uid);
        m.prefix_hit_ratio
            .observe(f64::from(matched) / pm.hashes.len() as f64);
        m.prefix_hit_bytes
            .observe(f64::from(matched) * f64::from(pm.block_size_tokens) * 4.0);
    }
    let [model, target] = labels;
    m.scheduler_attempts
        .with_label_values(&[
            "success",
            target,
            &primary.spec.key.name,
            &primary.spec.key.namespace,
            &primary.spec.address.port().to_string(),
        ])
        .inc();
    m.request_total
        .with_label_values(&[model, target, &outcome.priority.to_string()])
        .inc();
    m.request_sizes
        .with_label_values(&[model, target])
        .observe(outcome.request.body_len as f64);
    m.running_requests.with_label_values(&[model]).inc();
}

/// Count a request the EPP answered itself with `code`, under its bounded labels.
pub fn refused(m: &EppMetrics, labels: [&str; 2], code: &str) {
    let [model, target] = labels;
    m.request_error_total
        .with_label_values(&[model, target, code])
        .inc();
}

/// The destination header value: the chosen endpoints' addresses, primary first.
pub fn destination(snapshot: &Snapshot, outcome: &Outcome) -> String {
    outcome
        .endpoints()
        .iter()
        .filter_map(|id| snapshot.get(*id))
        .map(|e| &*e.address_text)
        .collect::<Vec<_>>()
        .join(",")
}

/// Count a model server's cached-token report against the index's prediction, and the index
/// entries it made the index forget.
pub fn cache_report(m: &EppMetrics, report: &CacheReport, forgotten: usize) {
    let predicted = report.predicted_tokens();
    m.prefix_cache_predicted.inc_by(predicted);
    m.prefix_cache_reported.inc_by(report.cached_tokens);
    m.prefix_cache_overpredicted
        .inc_by(predicted.saturating_sub(report.cached_tokens));
    m.prefix_indexer_forgotten.inc_by(forgotten as u64);
}

/// Count an answered response of `seconds` and `bytes` with its usage, if read.
pub fn answered(m: &EppMetrics, labels: [&str; 2], seconds: f64, bytes: u64, usage: Option<&Usage>) {
    m.request_duration.with_label_values(&labels).observe(seconds);
    m.response_sizes.with_label_values(&labels).observe(bytes as f64);
    let Some(u) = usage else { return };
    if u.prompt_tokens > 0 {
        m.input_tokens
            .with_label_values(&labels)
            .observe(u.prompt_tokens as f64);
    }
    if u.completion_tokens > 0 {
        m.output_tokens
            .with_label_values(&labels)
            .observe(u.completion_tokens as f64);
        m.normalized_tpot
            .with_label_values(&labels)
            .observe(seconds / u.completion_tokens as f64);
    }
    if let Some(c) = u.cached_tokens {
        m.prompt_cached_tokens
            .with_label_values(&labels)
            .observe(c as f64);
    }
}
