//! One scrape loop per endpoint, started and stopped as endpoints come and go.
//!
//! Each loop owns its schedule: a jittered first tick (so 100 pods are not scraped in lockstep),
//! a per-scrape timeout below the interval, a capped body size, and exponential backoff while an
//! endpoint fails. It also owns its [`PageSource`]: a kept-alive connection for plain `http`
//! (the pods' case), and the page is parsed as its body arrives. Loops never wait on each other, so a slow pod delays only itself. Results go to
//! the datastore writer as events; a failure keeps the last good values (their `scraped_at` shows
//! their age) and records the reason.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use rand::Rng;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::debug;

use super::{
    data_layer::DataLayer,
    engines::{EngineSpec, PageExtractor, sample_names},
    page_connection::PageConnection,
};
use crate::{
    clock::Clock,
    datastore::{DatastoreEvent, EndpointSpec, EndpointUid, EngineMetrics, ScrapeFailure, SnapshotReader},
    metrics::exported::EppMetrics,
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

    /// The engine of `endpoint`: its engine-type label (GIE's legacy one as a fallback), else
    /// (or when unknown) the default.
    pub fn engine_for(&self, endpoint: &EndpointSpec) -> Option<EngineSpec> {
        let dl = &self.data_layer;
        let named = dl.engine_name(&endpoint.labels);
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

/// Where one endpoint's page comes from: for plain `http` to an IP address (the pods' case), a
/// [`PageConnection`] kept alive between scrapes; otherwise (`https`, host names) `reqwest`.
#[derive(Debug)]
pub enum PageSource {
    /// Our own HTTP/1.1 connection.
    Plain(PageConnection),
    /// A general client, for TLS.
    Client {
        /// The shared client.
        client: reqwest::Client,
        /// The page.
        url: reqwest::Url,
    },
}

impl PageSource {
    /// The source for `url`.
    ///
    /// # Errors
    /// When `url` does not parse.
    pub fn new(client: &reqwest::Client, url: &str) -> Result<Self, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
        let ip = parsed.host_str().and_then(|h| {
            h.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .ok()
        });
        match (parsed.scheme(), ip, parsed.port_or_known_default()) {
            ("http", Some(ip), Some(port)) => {
                let path = match parsed.query() {
                    Some(q) => format!("{}?{q}", parsed.path()),
                    None => parsed.path().to_owned(),
                };
                Ok(Self::Plain(PageConnection::new(SocketAddr::new(ip, port), &path)))
            }
            _ => Ok(Self::Client {
                client: client.clone(),
                url: parsed,
            }),
        }
    }

    /// Fetch the page and extract `engine`'s signals (`names`: its [`sample_names`]), within
    /// `timeout`.
    ///
    /// # Errors
    /// The [`ScrapeFailure`] that ended the attempt.
    pub async fn scrape(
        &mut self,
        engine: &EngineSpec,
        names: &[String],
        timeout: Duration,
    ) -> Result<EngineMetrics, ScrapeFailure> {
        // The page is read as it arrives: no copy of it is kept, only an unfinished line.
        let mut page = PageExtractor::new(engine, names);
        let fetch = async {
            match self {
                Self::Plain(connection) => connection.get(MAX_BODY_BYTES, |piece| page.feed(piece)).await,
                Self::Client { client, url } => fetch_with_client(client, url.clone(), &mut page).await,
            }
        };
        tokio::time::timeout(timeout, fetch)
            .await
            .map_err(|_| ScrapeFailure::Timeout)??;
        let extracted = page.finish();
        if !extracted.found_required {
            return Err(ScrapeFailure::Parse);
        }
        Ok(extracted.metrics)
    }
}

async fn fetch_with_client(
    client: &reqwest::Client,
    url: reqwest::Url,
    page: &mut PageExtractor<'_>,
) -> Result<(), ScrapeFailure> {
    let mut resp = client.get(url).send().await.map_err(|_| ScrapeFailure::Connect)?;
    if !resp.status().is_success() {
        return Err(ScrapeFailure::HttpStatus(resp.status().as_u16()));
    }
    if resp.content_length().is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ScrapeFailure::TooLarge);
    }
    let mut received = 0;
    while let Some(piece) = resp.chunk().await.map_err(|_| ScrapeFailure::Connect)? {
        received += piece.len();
        if received > MAX_BODY_BYTES {
            return Err(ScrapeFailure::TooLarge);
        }
        page.feed(&piece);
    }
    Ok(())
}

/// Fetch and extract one scrape of `url` (a fresh [`PageSource`]; the scrape loops keep theirs).
///
/// # Errors
/// The [`ScrapeFailure`] that ended the attempt; [`ScrapeFailure::Connect`] for a bad URL.
pub async fn scrape_once(
    client: &reqwest::Client,
    url: &str,
    engine: &EngineSpec,
    timeout: Duration,
) -> Result<EngineMetrics, ScrapeFailure> {
    let mut source = PageSource::new(client, url).map_err(|_| ScrapeFailure::Connect)?;
    source.scrape(engine, &sample_names(engine), timeout).await
}

struct Loop {
    uid: EndpointUid,
    url: String,
    source: PageSource,
    engine: EngineSpec,
    /// The engine's [`sample_names`].
    names: Vec<String>,
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
                source: match PageSource::new(&client, &url) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "cannot scrape: bad metrics URL");
                        continue;
                    }
                },
                url,
                names: sample_names(&engine),
                engine,
            };
            tracker.spawn(scrape_loop(
                l,
                config.clone(),
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
    mut l: Loop,
    config: CollectorConfig,
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
        match l.source.scrape(&l.engine, &l.names, timeout).await {
            Ok(mut m) => {
                m.scraped_at = Some(clock.now());
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
