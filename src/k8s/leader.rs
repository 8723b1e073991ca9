//! Leader election on a `coordination.k8s.io/v1` Lease, for `--ha-enable-leader-election`.
//!
//! Only the leader reports ready (upstream behaviour, so the gateway sends traffic to one
//! replica), but followers keep discovering and scraping: their datastore and metrics are warm,
//! so a failover serves from the first request instead of starting cold. The lease is renewed
//! every [`RENEW_EVERY`]; a lease not renewed for [`LEASE_DURATION`] can be taken over; the
//! leader releases it on shutdown so a successor does not wait out the duration.

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

/// How long a lease stays valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and a candidate retries).
pub const RENEW_EVERY: Duration = Duration::from_secs(2);

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
    let secs = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX);
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
    /// Renewal period.
    pub renew_every: Duration,
    /// Lease duration.
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
        renew_every,
        duration,
    } = c;
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    loop {
        let is_leader = match try_acquire(&api, &name, &identity, duration).await {
            Ok(held) => held,
            Err(e) => {
                warn!(error = %e, "lease update failed");
                // Without a successful renewal within the duration we must assume we lost it.
                false
            }
        };
        if *leader.borrow() != is_leader {
            info!(lease = %name, identity = %identity, leader = is_leader, "leadership changed");
        }
        leader.send_replace(is_leader);
        tokio::select! {
            () = tokio::time::sleep(renew_every) => {}
            () = cancel.cancelled() => break,
        }
    }
    if *leader.borrow() {
        if let Err(e) = release(&api, &name, &identity).await {
            warn!(error = %e, "could not release the lease");
        }
        leader.send_replace(false);
    }
}
