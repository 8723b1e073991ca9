//! Wiring: flags and config in, running servers out.
//!
//! [`start`] binds every port (port 0 picks a free one, which tests use), spawns the datastore
//! writer, the metrics collector, the pool-gauge refresher and the three servers (ext_proc,
//! health, metrics), and returns a [`RunningApp`] whose [`shutdown`](RunningApp::shutdown) drains
//! them. Every background task is owned by one tracker and one cancellation token.

use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use axum::{Router, routing::get};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

use crate::{
    clock::{Clock, MonotonicClock},
    config::{
        ConfigError, DEFAULT_CONFIG_YAML, EndpointPickerConfig, Flags, PoolSetting, Settings, SettingsError,
        StaticEndpoint,
    },
    datastore::{
        DatastoreEvent, DatastoreWriter, EVENT_CHANNEL_CAPACITY, EndpointKey, EndpointSpec, SnapshotReader,
        format_address,
    },
    extproc::{ExtProcService, Processor, body_memory::BodyMemory},
    flow_dispatch::FlowDispatcher,
    k8s::{
        discovery::{PoolSource, run_discovery},
        leader::{Candidacy, lease_name, run_leader_election},
        metrics_auth::MetricsAuth,
        objectives::run_objectives,
        types::PoolShape,
    },
    listen::{FIRST_BYTES_TIMEOUT, SpeakingListener, speaking_within},
    metrics::exported::EppMetrics,
    scheduler::build_scheduler,
    scrape::{
        collector::{CollectorConfig, run_collector},
        data_layer::{DataSourceParams, ENGINE_LABEL, data_layer},
    },
    telemetry::Telemetry,
    tls::{self, ServingCert},
};

/// How often `--enable-cert-reload` reads `tls.crt` and `tls.key` again. Two small files a
/// second cost nothing, and a rotated Secret (whose volume Kubernetes updates within a minute
/// or so anyway) is served a second after it lands.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Largest gRPC message accepted: buffered-mode bodies arrive whole.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 64 << 20;

/// Why the EPP could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad flags (every problem found).
    #[error(transparent)]
    Flags(#[from] SettingsError),
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS material could not be produced or loaded.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// No Kubernetes client could be built (no in-cluster config, no kubeconfig).
    #[error("cannot reach the Kubernetes API (needed for --pool-name / --endpoint-selector): {0}")]
    Kube(#[source] kube::Error),
    /// Leader election needs Kubernetes.
    #[error("--ha-enable-leader-election needs --pool-name or --endpoint-selector (a Kubernetes pool)")]
    HaWithoutKubernetes,
    /// Internal metric registration failed.
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The trace exporter could not be built.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
}

/// Load the EndpointPickerConfig named by the flags (file, inline text, or the built-in default).
///
/// # Errors
/// [`ConfigError`] when the file cannot be read or the document is invalid.
pub fn load_config(flags: &Flags) -> Result<EndpointPickerConfig, ConfigError> {
    read_config(flags).map(|(config, _)| config)
}

/// [`load_config`], with the file's text when the config came from `--config-file` (the
/// baseline `--watch-config-file` compares later texts with).
fn read_config(flags: &Flags) -> Result<(EndpointPickerConfig, Option<String>), ConfigError> {
    if !flags.config_file.is_empty() {
        let text = std::fs::read_to_string(&flags.config_file).map_err(|source| ConfigError::Read {
            path: flags.config_file.clone(),
            source,
        })?;
        let config = EndpointPickerConfig::from_yaml_with_gates(&text, &flags.feature_gates)?;
        Ok((config, Some(text)))
    } else if !flags.config_text.is_empty() {
        let config = EndpointPickerConfig::from_yaml_with_gates(&flags.config_text, &flags.feature_gates)?;
        Ok((config, None))
    } else {
        let config = EndpointPickerConfig::from_yaml_with_gates(DEFAULT_CONFIG_YAML, &flags.feature_gates)?;
        Ok((config, None))
    }
}

/// Concurrent ext_proc streams one HTTP/2 connection may hold (the SETTINGS the server
/// announces): a bound on the stream state one connection can hold, set to what the shipped
/// gateway sends at most (its circuit breaker, 40,000 requests). It cannot be lower: Envoy 1.40's
/// ext_proc client does not open more connections to stay under a peer's limit, and the requests
/// past it fail (measured: 688 of 1,200 concurrent requests answered 500 at 256 per connection).
pub const MAX_EXT_PROC_STREAMS_PER_CONNECTION: u32 = 40_000;

/// Concurrent streams per connection on the health port (probes send one at a time).
pub const MAX_HEALTH_STREAMS_PER_CONNECTION: u32 = 16;

/// The EPP, running.
pub struct RunningApp {
    /// Where the ext_proc listener is reached on this host (loopback when it binds every
    /// interface; the health and metrics addresses likewise).
    pub grpc_addr: SocketAddr,
    /// Bound health address.
    pub health_addr: SocketAddr,
    /// Bound metrics address.
    pub metrics_addr: SocketAddr,
    /// The snapshot reader (for tests and tools).
    pub reader: SnapshotReader,
    /// Exported metrics.
    pub metrics: Arc<EppMetrics>,
    /// Whether this replica leads (always true without HA).
    pub leader: watch::Receiver<bool>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    telemetry: Option<Arc<Telemetry>>,
}

impl RunningApp {
    /// Stop every server and background task and wait for them, then export the spans still
    /// buffered.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(t) = self.telemetry {
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
    }

    /// A token that, once cancelled, stops the app.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// Bind `port` on `ip`, or, without one, on every interface as Go's `:port` does: IPv6 and
/// IPv4 (`[::]`, dual-stack on Linux), falling back to IPv4 alone on a host without IPv6.
async fn bind(ip: Option<IpAddr>, port: u16) -> Result<TcpListener, AppError> {
    let addr = match ip {
        Some(ip) => SocketAddr::new(ip, port),
        None => match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).await {
            Ok(l) => return Ok(l),
            Err(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        },
    };
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { addr, source })
}

fn static_specs(flags: &Flags, endpoints: &[StaticEndpoint]) -> Vec<EndpointSpec> {
    let namespace: Arc<str> = flags.effective_namespace().into();
    endpoints
        .iter()
        .map(|ep| {
            let mut labels = BTreeMap::new();
            if let Some(engine) = &ep.engine {
                labels.insert(ENGINE_LABEL.to_owned(), engine.clone());
            }
            EndpointSpec {
                key: EndpointKey {
                    namespace: namespace.clone(),
                    name: format_address(ep.address).into(),
                },
                address: ep.address,
                labels: Arc::new(labels),
            }
        })
        .collect()
}

/// What Kubernetes discovery watches for a pool source (nothing for a static pool).
fn discovery_source(pool: &PoolSetting) -> Option<PoolSource> {
    match pool {
        PoolSetting::Static(_) => None,
        PoolSetting::InferencePool { name, group } => Some(PoolSource::Pool {
            name: name.clone(),
            group: group.clone(),
        }),
        PoolSetting::Selector { labels, target_ports } => Some(PoolSource::Selector(PoolShape {
            selector: labels.clone(),
            target_ports: target_ports.clone(),
        })),
    }
}

async fn set_readiness(reporter: &HealthReporter, ready: bool) {
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for name in ["readiness", "", "inference-extension"] {
        reporter.set_service_status(name, status).await;
    }
    if ready {
        reporter
            .set_serving::<ExternalProcessorServer<ExtProcService>>()
            .await;
    } else {
        reporter
            .set_not_serving::<ExternalProcessorServer<ExtProcService>>()
            .await;
    }
}

/// Start the EPP.
///
/// # Errors
/// [`AppError`] for invalid flags or config, unbindable ports, or TLS failures.
pub async fn start(flags: Flags) -> Result<RunningApp, AppError> {
    start_with_client(flags, None).await
}

/// The pool name used for gauges and the lease: the InferencePool's name, `static` for
/// `--endpoints`, else (standalone mode) the Deployment name derived from `$POD_NAME` by
/// stripping the ReplicaSet and pod hashes.
pub fn pool_display_name(pool: &PoolSetting) -> String {
    match pool {
        PoolSetting::InferencePool { name, .. } => return name.clone(),
        PoolSetting::Static(_) => return "static".into(),
        PoolSetting::Selector { .. } => {}
    }
    let pod = std::env::var("POD_NAME").unwrap_or_default();
    let parts: Vec<&str> = pod.rsplitn(3, '-').collect();
    match parts.as_slice() {
        [hash2, hash1, base]
            if !base.is_empty()
                && [hash1, hash2]
                    .iter()
                    .all(|h| h.chars().all(|c| c.is_ascii_alphanumeric())) =>
        {
            (*base).to_owned()
        }
        _ => "epp".into(),
    }
}

/// Start the EPP with an explicit Kubernetes client (tests point one at a local API server);
/// `None` builds one from the environment when the pool comes from Kubernetes.
///
/// # Errors
/// [`AppError`] for invalid flags or config, unbindable ports, TLS failures, or no Kubernetes API.
pub async fn start_with_client(flags: Flags, client: Option<kube::Client>) -> Result<RunningApp, AppError> {
    let Settings {
        flags,
        pool: pool_setting,
    } = Settings::from_flags(flags)?;
    let kube_mode = pool_setting.needs_kubernetes();
    if flags.ha_enable_leader_election && !kube_mode {
        return Err(AppError::HaWithoutKubernetes);
    }
    let client = match (kube_mode, client) {
        (false, _) => None,
        (true, Some(c)) => Some(c),
        (true, None) => Some(kube::Client::try_default().await.map_err(AppError::Kube)?),
    };
    let (config, config_text) = read_config(&flags)?;
    let telemetry = Telemetry::from_env(flags.tracing)?.map(Arc::new);
    // GIE's deprecated switch: llm-d-router no longer reads it and neither does this EPP, so an
    // operator who sets it is told where the switch is now.
    if std::env::var("ENABLE_EXPERIMENTAL_FLOW_CONTROL_LAYER").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        && !config.feature_gates.contains("flowControl")
    {
        warn!(
            "ENABLE_EXPERIMENTAL_FLOW_CONTROL_LAYER is deprecated and not read: flow control stays off; add `featureGates: [flowControl]` to the EndpointPickerConfig"
        );
    }
    if config.flow_control_ignored {
        warn!(
            "the flowControl config section is set but the flowControl feature gate is disabled; its settings (other than saturationDetector) are ignored"
        );
    }
    for deprecation in &config.deprecations {
        warn!("EndpointPickerConfig: {deprecation}");
    }
    let scheduler = Arc::new(build_scheduler(&config)?);
    let metrics = Arc::new(EppMetrics::new()?.with_known_models(scheduler.known_models()));
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    if let (true, Some(text)) = (flags.watch_config_file, config_text) {
        tasks.spawn(crate::config::reload::watch(
            flags.config_file.clone().into(),
            text,
            flags.feature_gates.clone(),
            scheduler.clone(),
            metrics.clone(),
            cancel.clone(),
        ));
    }

    let grpc_listener = bind(flags.grpc_bind_address, flags.grpc_port).await?;
    let health_listener = bind(
        flags.grpc_health_bind_address.or(flags.grpc_bind_address),
        flags.grpc_health_port,
    )
    .await?;
    let metrics_listener = bind(
        flags.metrics_bind_address.or(flags.grpc_bind_address),
        flags.metrics_port,
    )
    .await?;
    // Where each listener is reached from this host: its bound address, or loopback when it
    // listens on every interface (what tests and tools on the host connect to).
    let local = |l: &TcpListener| {
        let bound = l.local_addr().map_err(|source| AppError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        info!(listener = %bound, "bound");
        Ok::<_, AppError>(if bound.ip().is_unspecified() {
            SocketAddr::from((Ipv4Addr::LOCALHOST, bound.port()))
        } else {
            bound
        })
    };
    let (grpc_addr, health_addr, metrics_addr) = (
        local(&grpc_listener)?,
        local(&health_listener)?,
        local(&metrics_listener)?,
    );

    // Datastore: the single writer, fed by static discovery and the collector.
    let (writer, reader) = DatastoreWriter::new(clock.clone());
    let writer = writer.with_config_objectives(scheduler.config_objectives().clone());
    let (events_tx, events_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    tasks.spawn(writer.run(events_rx));
    let namespace = flags.effective_namespace();
    let pool = pool_display_name(&pool_setting);
    if let PoolSetting::Static(endpoints) = &pool_setting {
        let specs = static_specs(&flags, endpoints);
        let _ = events_tx.send(DatastoreEvent::ReplaceAll(specs)).await;
        let _ = events_tx.send(DatastoreEvent::Synced(true)).await;
    }
    if let (Some(client), Some(source)) = (&client, discovery_source(&pool_setting)) {
        tasks.spawn(run_discovery(
            client.clone(),
            namespace.clone(),
            source,
            events_tx.clone(),
            cancel.clone(),
        ));
    }
    if let (Some(client), PoolSetting::InferencePool { name, group }) = (&client, &pool_setting) {
        tasks.spawn(run_objectives(
            client.clone(),
            namespace.clone(),
            name.clone(),
            group.clone(),
            events_tx.clone(),
            cancel.clone(),
        ));
    }
    // Leadership: always "leader" without HA; with HA, the lease decides.
    let (leader_tx, leader_rx) = watch::channel(!flags.ha_enable_leader_election);
    if let (true, Some(client)) = (flags.ha_enable_leader_election, &client) {
        let identity = std::env::var("POD_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("epp-{}", uuid::Uuid::new_v4()));
        let candidacy = Candidacy {
            namespace: namespace.clone(),
            lease: lease_name(&namespace, &pool),
            identity,
            retry_period: flags.ha_retry_period,
            renew_deadline: flags.ha_renew_deadline,
            duration: flags.ha_lease_duration,
        };
        tasks.spawn(run_leader_election(
            client.clone(),
            candidacy,
            leader_tx,
            cancel.clone(),
        ));
    }

    let source = DataSourceParams {
        scheme: flags.model_server_metrics_scheme.clone(),
        path: flags.model_server_metrics_path.clone(),
        insecure_skip_verify: flags.model_server_metrics_https_insecure_skip_verify,
        port: (flags.model_server_metrics_port != 0).then_some(flags.model_server_metrics_port),
    };
    let data_layer = data_layer(&config, source).map_err(|issues| ConfigError::Invalid { issues })?;
    let collector = CollectorConfig {
        interval: flags.refresh_metrics_interval,
        data_layer: Arc::new(data_layer),
    };
    tasks.spawn(run_collector(
        collector,
        reader.clone(),
        events_tx,
        metrics.clone(),
        clock.clone(),
        cancel.clone(),
    ));

    // Pool gauges, refreshed on their own period like upstream.
    {
        let (reader, metrics, clock, cancel) =
            (reader.clone(), metrics.clone(), clock.clone(), cancel.clone());
        let scheduler = scheduler.clone();
        let pool = pool.clone();
        let (period, staleness) = (
            flags
                .refresh_prometheus_metrics_interval
                .max(Duration::from_millis(100)),
            flags.metrics_staleness_threshold,
        );
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        metrics.refresh_pool_gauges(&pool, &reader.load(), clock.now(), staleness);
                        metrics.drop_idle_labels(std::time::Instant::now());
                        if let Some((entries, bytes)) = scheduler.prefix_index_footprint() {
                            metrics.prefix_indexer_size.set(entries as i64);
                            metrics.prefix_indexer_bytes.set(bytes as i64);
                        }
                    }
                    () = cancel.cancelled() => return,
                }
            }
        });
    }

    // Pool chores, off the request path: plugins that keep per-endpoint state (the prefix
    // index) learn each change of the endpoint set, not each metrics publish.
    {
        let (reader, cancel, scheduler) = (reader.clone(), cancel.clone(), scheduler.clone());
        tasks.spawn(async move {
            let mut changed = reader.subscribe();
            let mut seen = reader.load().membership;
            loop {
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    () = cancel.cancelled() => return,
                }
                let snapshot = reader.load();
                if snapshot.membership != seen {
                    seen = snapshot.membership;
                    scheduler.on_pool_change(&snapshot);
                }
            }
        });
    }

    // Health: liveness always; readiness follows the datastore's synced flag.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    set_readiness(&reporter, false).await;
    {
        // Ready = pool synced and (without HA) always, (with HA) only on the leader.
        let (reader, cancel) = (reader.clone(), cancel.clone());
        let reporter = reporter.clone();
        let mut leader = leader_rx.clone();
        tasks.spawn(async move {
            let mut changed = reader.subscribe();
            let mut ready = false;
            // Without HA nothing sends leadership changes: its sender is gone once `start`
            // returns. A closed channel means "no more changes", not "stop": readiness must
            // still follow the pool (returning here left a pool synced after `start` returned
            // not ready forever).
            let mut leadership_changes = true;
            loop {
                let now_ready = reader.load().synced && *leader.borrow_and_update();
                if now_ready != ready {
                    ready = now_ready;
                    set_readiness(&reporter, ready).await;
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    r = leader.changed(), if leadership_changes => leadership_changes = r.is_ok(),
                    () = cancel.cancelled() => return,
                }
            }
        });
    }
    {
        let cancel = cancel.clone();
        let health_service = health_service.clone();
        let health_tasks = tasks.clone();
        tasks.spawn(async move {
            let r = Server::builder()
                .max_concurrent_streams(Some(MAX_HEALTH_STREAMS_PER_CONNECTION))
                .add_service(health_service)
                .serve_with_incoming_shutdown(
                    speaking_within(no_delay(health_listener), FIRST_BYTES_TIMEOUT, &health_tasks),
                    cancel.cancelled(),
                )
                .await;
            if let Err(e) = r {
                warn!(error = %e, "health server stopped");
            }
        });
    }

    // Flow control: one dispatcher for the pool.
    let flow = scheduler.flow_control().map(|policy| {
        info!(
            ttl_ms = policy.ttl_ns / 1_000_000,
            max_requests = policy.max_requests,
            max_bytes = policy.max_bytes,
            "flow control on: requests queue in the EPP while the pool is saturated"
        );
        FlowDispatcher::start(
            policy.clone(),
            reader.clone(),
            clock.clone(),
            metrics.clone(),
            pool.clone(),
            cancel.clone(),
        )
    });

    // ext_proc.
    let processor = Arc::new(Processor {
        flow,
        reader: reader.clone(),
        scheduler,
        metrics: metrics.clone(),
        clock: clock.clone(),
        disable_subset_filter: flags.disable_endpoint_subset_filter,
        explain_decisions: flags.explain_decisions,
        conformance_hooks: flags.conformance_hooks,
        tracer: telemetry.as_ref().map(|t| t.tracer().clone()),
        tasks: tasks.clone(),
        body_memory: BodyMemory::new(usize::try_from(flags.max_buffered_body_bytes).unwrap_or(usize::MAX)),
    });
    let service = ExternalProcessorServer::new(ExtProcService::new(processor, tasks.clone()))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    // Prompts travel in full: with 100k-token bodies (400 KB each way per request), bigger frames
    // and flow-control windows than HTTP/2's defaults (16 KB frames, 64 KB windows) save frames,
    // WINDOW_UPDATEs and syscalls (measured in BENCHMARKS.md).
    let mut builder = Server::builder()
        .max_concurrent_streams(Some(MAX_EXT_PROC_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_frame_size(Some(256 * 1024))
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024));
    let mut router = builder.add_service(service);
    if flags.health_checking {
        router = router.add_service(health_service);
    }
    let serving_cert = if flags.secure_serving {
        let cert = match flags.cert_dir() {
            Some(dir) => ServingCert::from_dir(&dir),
            None => ServingCert::self_signed(),
        }
        .map_err(|e| AppError::Tls(e.to_string()))?;
        Some(Arc::new(cert))
    } else {
        None
    };
    {
        let stop = cancel.clone().cancelled_owned();
        let serve: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
            match &serving_cert {
                Some(cert) => {
                    let incoming = tls::accept(no_delay(grpc_listener), cert, &tasks)
                        .map_err(|e| AppError::Tls(e.to_string()))?;
                    Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
                }
                None => Box::pin(router.serve_with_incoming_shutdown(
                    speaking_within(no_delay(grpc_listener), FIRST_BYTES_TIMEOUT, &tasks),
                    stop,
                )),
            };
        tasks.spawn(async move {
            if let Err(e) = serve.await {
                warn!(error = %e, "ext_proc server stopped");
            }
        });
    }
    if let Some(cert) = serving_cert.filter(|_| flags.enable_cert_reload && flags.cert_dir().is_some()) {
        tasks.spawn(cert.watch(CERT_CHECK_INTERVAL, cancel.clone()));
    }

    // Prometheus metrics, behind the cluster's authorization when asked (upstream's default).
    let auth = match (&client, flags.metrics_endpoint_auth) {
        (Some(client), true) => Some(Arc::new(MetricsAuth::new(client.clone()))),
        (None, true) => {
            warn!(
                "--metrics-endpoint-auth needs the Kubernetes API, which a static pool does not use: /metrics is served without authentication (pass --metrics-endpoint-auth=false to say so)"
            );
            None
        }
        (_, false) => None,
    };
    {
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        let metrics_listener = SpeakingListener::new(
            TcpListenerStream::new(metrics_listener),
            metrics_addr,
            FIRST_BYTES_TIMEOUT,
            &tasks,
        );
        let app = Router::new().route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let (metrics, auth) = (metrics.clone(), auth.clone());
                async move { serve_metrics(&metrics, auth.as_deref(), &headers).await }
            }),
        );
        tasks.spawn(async move {
            let r = axum::serve(metrics_listener, app)
                .with_graceful_shutdown(async move { cancel.cancelled().await })
                .await;
            if let Err(e) = r {
                warn!(error = %e, "metrics server stopped");
            }
        });
    }

    info!(%grpc_addr, %health_addr, %metrics_addr, tls = flags.secure_serving, endpoints = flags.endpoints.len(), "epp started");
    Ok(RunningApp {
        grpc_addr,
        health_addr,
        metrics_addr,
        reader,
        metrics,
        leader: leader_rx,
        cancel,
        tasks,
        telemetry,
    })
}

/// The `/metrics` answer: the page, or the refusal of an unauthorized caller.
async fn serve_metrics(
    metrics: &EppMetrics,
    auth: Option<&MetricsAuth>,
    headers: &axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::{http::StatusCode, response::IntoResponse};
    if let Some(auth) = auth {
        let authorization = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match auth.check(authorization).await {
            Ok(verdict) => {
                if let Some(status) = verdict.refusal_status() {
                    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
                    let reason = status.canonical_reason().unwrap_or("Forbidden");
                    return (status, format!("{reason}\n")).into_response();
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot review a /metrics request");
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot review the request with the Kubernetes API\n",
                )
                    .into_response();
            }
        }
    }
    ([("content-type", "text/plain; version=0.0.4")], metrics.render()).into_response()
}

/// Accepted connections with Nagle's algorithm off. tonic's own `tcp_nodelay` applies only when
/// it binds the listener itself; without this, a small answer written after a large body can wait
/// for the peer's delayed ACK (~40 ms on Linux), which showed as a 40 ms p99.
fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(e) = stream.set_nodelay(true) {
                warn!(error = %e, "cannot disable Nagle on an accepted connection");
            }
        })
    })
}
