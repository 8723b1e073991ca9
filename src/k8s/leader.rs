//! Leader election on a `coordination.k8s.io/v1` Lease, for `--ha-enable-leader-election`.
//!
//! Only the leader reports ready (upstream behaviour, so the gateway sends traffic to one
//! replica), but followers keep discovering and scraping: their datastore and metrics are warm,
//! so a failover serves from the first request instead of starting cold (the prefix index and
//! in-flight counts do start empty: they come from the traffic a replica routed).
//!
//! Timing follows client-go's three parameters, with shorter defaults: the leader renews every
//! retry period (500 ms) and keeps leading while its renewals fail for up to the renew deadline
//! (3 s), then steps down; a lease not renewed for its duration (4 s) can be taken over; the
//! leader releases it on shutdown, so a successor takes over within one retry period. Every API
//! call is bounded by the renew deadline, so a hung call cannot keep a cut-off leader ready.
//! Why shorter than controller-runtime's 15 s / 10 s / 2 s: for an EPP, two replicas briefly both
//! ready route as independent replicas do (prefix affinity splits for a moment), while no replica
//! ready is an outage for every request; a crashed leader is now replaced in about 4 s instead
//! of 15–17 s. The price is one Lease write every 500 ms. Expiry is judged against the lease's
//! `renewTime` and `leaseDurationSeconds` as written by its holder, so the nodes' clocks must
//! agree to well within the lease duration (NTP does).

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Upstream's lease name for a pool.
pub fn lease_name(namespace: &str, pool: &str) -> String {
    format!("epp-{namespace}-{pool}.gateway-api-inference-extension.sigs.k8s.io")
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn expired(spec: &LeaseSpec, at: Timestamp, duration: Duration) -> bool {
    let Some(renew) = spec.renew_time.as_ref() else {
        return true;
    };
    let dur = spec
        .lease_duration_seconds
        .map_or(duration, |s| Duration::from_secs(u64::try_from(s).unwrap_or(0)));
    let elapsed = at.duration_since(renew.0);
    elapsed.as_secs_f64() > dur.as_secs_f64()
}

/// One attempt to acquire or renew; returns whether `identity` holds the lease afterwards.
///
/// # Errors
/// API errors other than conflicts (a conflict means someone else won the race: not leader).
pub async fn try_acquire(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    duration: Duration,
) -> Result<bool, kube::Error> {
    // Whole seconds on the wire: a fractional duration is rounded up, never shortened.
    let secs = i32::try_from(duration.as_secs() + u64::from(duration.subsec_nanos() > 0)).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.into()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        spec.renew_time = Some(now());
    } else if holder.is_empty() || expired(spec, Timestamp::now(), duration) {
        spec.holder_identity = Some(identity.into());
        spec.acquire_time = Some(now());
        spec.renew_time = Some(now());
        spec.lease_duration_seconds = Some(secs);
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    } else {
        return Ok(false);
    }
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Give the lease up if `identity` holds it.
///
/// # Errors
/// API errors.
pub async fn release(api: &Api<Lease>, name: &str, identity: &str) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    api.replace(name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

/// One replica's candidacy.
#[derive(Debug, Clone)]
pub struct Candidacy {
    /// Namespace of the lease.
    pub namespace: String,
    /// Lease name ([`lease_name`]).
    pub lease: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How often the leader renews and a follower retries (`--ha-retry-period`).
    pub retry_period: Duration,
    /// How long the leader keeps leading while renewals fail (`--ha-renew-deadline`).
    pub renew_deadline: Duration,
    /// Lease duration (`--ha-lease-duration`).
    pub duration: Duration,
}

/// Campaign until `cancel`, publishing leadership on `leader`.
pub async fn run_leader_election(
    client: Client,
    c: Candidacy,
    leader: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let Candidacy {
        namespace,
        lease: name,
        identity,
        retry_period,
        renew_deadline,
        duration,
    } = c;
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    // When this replica last renewed its lease successfully (while it leads).
    let mut renewed_at: Option<tokio::time::Instant> = None;
    loop {
        let attempt =
            tokio::time::timeout(renew_deadline, try_acquire(&api, &name, &identity, duration)).await;
        let now = tokio::time::Instant::now();
        let is_leader = match attempt {
            Ok(Ok(held)) => {
                renewed_at = held.then_some(now);
                held
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {renew_deadline:?}"),
                };
                // A leader keeps leading through failed renewals until the renew deadline: a
                // blip of the API server must not leave the pool without a ready replica. Past
                // it, the lease may be someone else's soon: step down.
                let still = renewed_at.is_some_and(|at| now.duration_since(at) < renew_deadline);
                warn!(error = %error, leading = still, "lease update failed");
                if !still {
                    renewed_at = None;
                }
                still
            }
        };
        if *leader.borrow() != is_leader {
            info!(lease = %name, identity = %identity, leader = is_leader, "leadership changed");
        }
        leader.send_replace(is_leader);
        tokio::select! {
            () = tokio::time::sleep(retry_period) => {}
            () = cancel.cancelled() => break,
        }
    }
    if *leader.borrow() {
        match tokio::time::timeout(renew_deadline, release(&api, &name, &identity)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "could not release the lease"),
            Err(_) => warn!("could not release the lease within the renew deadline"),
        }
        leader.send_replace(false);
    }
}
