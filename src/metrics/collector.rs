//! One scrape loop per endpoint, started and stopped as endpoints come and go.
//!
//! Each loop owns its schedule: a jittered first tick (so 100 pods are not scraped in lockstep),
//! a per-scrape timeout below the interval, a capped body size, and exponential backoff while an
//! endpoint fails. Loops never wait on each other, so a slow pod delays only itself. Results go to
//! the datastore writer as events; a failure keeps the last good values (their `scraped_at` shows
//! their age) and records the reason.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use rand::Rng;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::debug;

use super::{
    data_layer::DataLayer,
    engines::{EngineSpec, extract},
    exported::EppMetrics,
    model::{EngineMetrics, ScrapeFailure},
};
use crate::{
    clock::Clock,
    datastore::{DatastoreEvent, EndpointLive, EndpointSpec, EndpointUid, SnapshotReader},
};

/// Largest `/metrics` body accepted; a larger (or endless) body is a [`ScrapeFailure::TooLarge`].
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Longest wait between attempts while an endpoint keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Collector settings.
#[derive(Clone)]
pub struct CollectorConfig {
    /// Scrape period.
    pub interval: Duration,
    /// Where to scrape and which names to read per engine.
    pub data_layer: Arc<DataLayer>,
}

impl CollectorConfig {
    /// Per-scrape timeout: 90 % of the interval, at least 10 ms.
    pub fn timeout(&self) -> Duration {
        self.interval.mul_f64(0.9).max(Duration::from_millis(10))
    }

    /// The engine of `endpoint`: its engine-type label, else (or when unknown) the default.
    pub fn engine_for(&self, endpoint: &EndpointSpec) -> Option<EngineSpec> {
        let dl = &self.data_layer;
        let named = endpoint
            .labels
            .get(&dl.engine_label_key)
            .map(String::as_str)
            .unwrap_or("");
        dl.engines
            .iter()
            .find(|e| &*e.name == named)
            .or_else(|| dl.engines.iter().find(|e| *e.name == *dl.default_engine))
            .cloned()
    }

    /// The metrics URL of `endpoint`: scheme, the pod IP, the serving port (or the configured
    /// metrics port) and the path.
    pub fn url_for(&self, endpoint: &EndpointSpec) -> String {
        let s = &self.data_layer.source;
        let addr = SocketAddr::new(endpoint.address.ip(), s.port.unwrap_or(endpoint.address.port()));
        format!("{}://{}{}", s.scheme, addr, s.path)
    }
}

/// Delay before the next attempt after `failures` consecutive failures.
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return interval;
    }
    interval
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF.max(interval))
}

/// Fetch and extract one scrape.
///
/// # Errors
/// The [`ScrapeFailure`] that ended the attempt.
pub async fn scrape_once(
    client: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    engine: &EngineSpec,
    timeout: Duration,
) -> Result<EngineMetrics, ScrapeFailure> {
    let fetch = async {
        let mut resp = client.get(url).send().await.map_err(|_| ScrapeFailure::Connect)?;

        if !resp.status().is_success() {
            return Err(ScrapeFailure::HttpStatus(resp.status().as_u16()));
        }
        if resp.content_length().is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(ScrapeFailure::TooLarge);
        }
        // Sized once when the server says how much is coming: no doubling, no slack kept.
        let expected = resp.content_length().map_or(0, |n| n as usize);
        let mut body = Vec::with_capacity(expected);
        while let Some(chunk) = resp.chunk().await.map_err(|_| ScrapeFailure::Connect)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(ScrapeFailure::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    let body = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ScrapeFailure::Timeout)??;
    // Valid UTF-8 is the norm: validate fast, repair only when needed.
    let text = match std::str::from_utf8(&body) {
        Ok(t) => std::borrow::Cow::Borrowed(t),
        Err(_) => String::from_utf8_lossy(&body),
    };
    let extracted = extract(engine, &text);
    if !extracted.found_required {
        return Err(ScrapeFailure::Parse);
    }
    Ok(extracted.metrics)
}

struct Loop {
    uid: EndpointUid,
    url: reqwest::Url,
    engine: EngineSpec,
    live: Arc<EndpointLive>,
}

/// Keep one scrape loop per endpoint of the current snapshot until `cancel`.
pub async fn run_collector(
    config: CollectorConfig,
    reader: SnapshotReader,
    events: mpsc::Sender<DatastoreEvent>,
    metrics: Arc<EppMetrics>,
    clock: Arc<dyn Clock>,
    cancel: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .pool_max_idle_per_host(2)
        .pool_idle_timeout(Duration::from_secs(90))
        .danger_accept_invalid_certs(config.data_layer.source.insecure_skip_verify)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the metrics HTTP client; metrics collection is off");
            return;
        }
    };
    if !config.data_layer.enabled {
        tracing::info!("dataLayer has no sources: model-server metrics are not collected");
        return;
    }
    let tracker = TaskTracker::new();
    let mut running: HashMap<EndpointUid, (String, CancellationToken)> = HashMap::new();
    let mut changed = reader.subscribe();
    let mut seen_membership = None;
    loop {
        let snapshot = reader.load();
        if seen_membership == Some(snapshot.membership) {
            tokio::select! {
                r = changed.changed() => if r.is_err() { break },
                () = cancel.cancelled() => break,
            }
            continue;
        }
        seen_membership = Some(snapshot.membership);
        running.retain(|uid, (url, token)| {
            let keep = snapshot
                .endpoints
                .iter()
                .any(|e| e.uid == *uid && config.url_for(&e.spec) == *url);
            if !keep {
                token.cancel();
            }
            keep
        });
        for e in snapshot.endpoints.iter() {
            if running.contains_key(&e.uid) {
                continue;
            }
            let Some(engine) = config.engine_for(&e.spec) else {
                continue;
            };
            let url = config.url_for(&e.spec);
            let token = cancel.child_token();
            running.insert(e.uid, (url.clone(), token.clone()));
            let l = Loop {
                uid: e.uid,
                url: match reqwest::Url::parse(&url) {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "cannot scrape: bad metrics URL");
                        continue;
                    }
                },
                engine,
                live: e.live.clone(),
            };
            tracker.spawn(scrape_loop(
                l,
                config.clone(),
                client.clone(),
                events.clone(),
                metrics.clone(),
                clock.clone(),
                token,
            ));
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { break },
            () = cancel.cancelled() => break,
        }
    }
    for (_, token) in running.values() {
        token.cancel();
    }
    tracker.close();
    tracker.wait().await;
}

async fn scrape_loop(
    l: Loop,
    config: CollectorConfig,
    client: reqwest::Client,
    events: mpsc::Sender<DatastoreEvent>,
    metrics: Arc<EppMetrics>,
    clock: Arc<dyn Clock>,
    cancel: CancellationToken,
) {
    let jitter = rand::rng().random_range(0.0..1.0);
    let mut next = Instant::now() + config.interval.mul_f64(jitter);
    let mut last = EngineMetrics::default();
    let mut failures = 0u32;
    let timeout = config.timeout();
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = cancel.cancelled() => return,
        }
        let started = Instant::now();
        let picks_at_scrape = l.live.started_total();
        match scrape_once(&client, l.url.clone(), &l.engine, timeout).await {
            Ok(mut m) => {
                m.scraped_at = Some(clock.now());
                m.picks_at_scrape = picks_at_scrape;
                last = m;
                failures = 0;
            }
            Err(failure) => {
                failures = failures.saturating_add(1);
                last.last_error = Some(failure);
                metrics.scrape_errors.with_label_values(&[failure.reason()]).inc();
                debug!(url = %l.url, reason = failure.reason(), failures, "scrape failed");
            }
        }
        metrics.scrape_duration.observe(started.elapsed().as_secs_f64());
        let event = DatastoreEvent::Metrics {
            uid: l.uid,
            metrics: last.clone(),
        };
        tokio::select! {
            r = events.send(event) => if r.is_err() { return },
            () = cancel.cancelled() => return,
        }
        next = started + backoff(config.interval, failures);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let i = Duration::from_millis(50);
        assert_eq!(backoff(i, 0), i);
        assert_eq!(backoff(i, 1), Duration::from_millis(100));
        assert_eq!(backoff(i, 3), Duration::from_millis(400));
        assert_eq!(backoff(i, 30), MAX_BACKOFF);
        assert_eq!(backoff(Duration::from_secs(60), 2), Duration::from_secs(60));
    }
}
