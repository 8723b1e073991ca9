//! Command-line flags: the Go EPP's flags with its defaults, plus `--endpoints` for a static pool.
//!
//! Both `--flag=value` and `--flag value` work; booleans take `--flag` or `--flag=false` (as Go's
//! `flag` package). Go also accepts a single dash for long flags (`-grpc-port=9002`);
//! [`normalize_go_args`] rewrites those before clap sees them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Parser};

use super::parse_duration;

/// Deprecated metric-name flags that the Go EPP refuses when set.
pub(super) const REMOVED_METRIC_FLAGS: [&str; 5] = [
    "total-queued-requests-metric",
    "total-running-requests-metric",
    "kv-cache-usage-percentage-metric",
    "lora-info-metric",
    "cache-info-metric",
];

/// Endpoint Picker (EPP) for LLM inference: an Envoy ext_proc service that picks the model-server
/// pod for each request from queue depth, KV-cache use, LoRA adapters and prompt-prefix affinity.
///
/// Point an InferencePool's endpointPickerRef at it (Kubernetes), or run it next to Envoy with a
/// static pool: `epp --endpoints 10.0.0.1:8000,10.0.0.2:8000 --secure-serving=false`.
#[derive(Debug, Clone, Parser)]
#[command(name = "epp", version, about, long_about, max_term_width = 100)]
pub struct Flags {
    /// gRPC port of the ext_proc service.
    #[arg(long, default_value_t = 9002, help_heading = "Serving")]
    pub grpc_port: u16,

    /// Port of the plaintext grpc.health.v1 service (liveness/readiness probes).
    #[arg(long, default_value_t = 9003, help_heading = "Serving")]
    pub grpc_health_port: u16,

    /// Port serving Prometheus metrics at /metrics.
    #[arg(long, default_value_t = 9090, help_heading = "Serving")]
    pub metrics_port: u16,

    /// Address the ext_proc listener binds (ours). Default: every interface, IPv6 and IPv4, as
    /// the Go EPP's `:9002` (IPv4 only where the host has no IPv6).
    #[arg(long, value_name = "IP", help_heading = "Serving")]
    pub grpc_bind_address: Option<std::net::IpAddr>,

    /// Address the health listener binds (ours; default as --grpc-bind-address's).
    #[arg(long, value_name = "IP", help_heading = "Serving")]
    pub grpc_health_bind_address: Option<std::net::IpAddr>,

    /// Address the metrics listener binds (ours; default as --grpc-bind-address's).
    #[arg(long, value_name = "IP", help_heading = "Serving")]
    pub metrics_bind_address: Option<std::net::IpAddr>,

    /// Serve ext_proc over TLS (self-signed unless --cert-path is set).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Serving")]
    pub secure_serving: bool,

    /// Directory holding tls.crt and tls.key for the ext_proc server.
    #[arg(long, default_value = "", help_heading = "Serving")]
    pub cert_path: String,

    /// Serve a changed tls.crt/tls.key from --cert-path to new connections without a restart
    /// (the files are checked every second).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Serving")]
    pub enable_cert_reload: bool,

    /// Also register the health service on the ext_proc port (for Envoy cluster health checks).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Serving")]
    pub health_checking: bool,

    /// Static pool: comma-separated ip:port model servers (no Kubernetes). An endpoint may name
    /// its engine as ip:port@engine (vllm, sglang, triton-tensorrt-llm, trtllm-serve, llamacpp).
    #[arg(long, value_delimiter = ',', help_heading = "Pool")]
    pub endpoints: Vec<String>,

    /// Name of the InferencePool this EPP serves.
    #[arg(long, default_value = "", help_heading = "Pool")]
    pub pool_name: String,

    /// Namespace of the pool (default: $NAMESPACE, else "default").
    #[arg(long, default_value = "", help_heading = "Pool")]
    pub pool_namespace: String,

    /// API group of the InferencePool.
    #[arg(long, default_value = "inference.networking.k8s.io", help_heading = "Pool")]
    pub pool_group: String,

    /// Standalone mode without the CRD: pod label selector k=v[,k=v].
    #[arg(long, default_value = "", help_heading = "Pool")]
    pub endpoint_selector: String,

    /// Standalone mode: target ports of the selected pods.
    #[arg(long, value_delimiter = ',', help_heading = "Pool")]
    pub endpoint_target_ports: Vec<u16>,

    /// Ignore the gateway's subset hint (envoy.lb.subset_hint).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Pool")]
    pub disable_endpoint_subset_filter: bool,

    /// Process-wide limit on request-body bytes held while bodies are read (each stream is also
    /// capped at 64 MiB). A body that would pass it is answered 503 with retry-after.
    #[arg(long, default_value_t = crate::extproc::body_memory::DEFAULT_BODY_MEMORY_BYTES,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Serving")]
    pub max_buffered_body_bytes: u64,

    /// Let requests carrying `x-epp-debug` receive an `x-epp-decision` response header that says
    /// which filters removed which endpoints and each scorer's share for the winner and runner-up.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Scheduling")]
    pub explain_decisions: bool,

    /// Honour the Gateway API Inference Extension conformance suite's hooks, as its test EPP
    /// does: the `test-epp-endpoint-selection` request header restricts the candidates (`ip`
    /// items: any port of that pod; `ip:port` items: that endpoint; none matching: 503), and
    /// answers carry `x-conformance-test-served-endpoint` from the gateway's served-endpoint
    /// metadata. For running that suite only: any client could pick its pod.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Scheduling")]
    pub conformance_hooks: bool,

    /// Read `--config-file` again when it changes (checked every second): a change limited to
    /// `schedulingProfiles` applies to new requests (running ones finish on the old profile);
    /// any other change is refused and logged, and the running config stays. Both are counted
    /// in `inference_extension_config_reload_total`.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Scheduling")]
    pub watch_config_file: bool,

    /// Feature gates applied after the config's `featureGates`, so these win: comma-separated
    /// NAME, NAME=true or NAME=false (dataLayer, enableLegacyMetrics, flowControl).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "GATES",
        help_heading = "Scheduling"
    )]
    pub feature_gates: Vec<String>,

    /// EndpointPickerConfig YAML file.
    #[arg(
        long,
        default_value = "",
        conflicts_with = "config_text",
        help_heading = "Scheduling"
    )]
    pub config_file: String,

    /// EndpointPickerConfig YAML given inline.
    #[arg(long, default_value = "", help_heading = "Scheduling")]
    pub config_text: String,

    /// How often each model server's /metrics is scraped.
    #[arg(long, default_value = "50ms", value_parser = parse_duration, help_heading = "Model-server metrics")]
    pub refresh_metrics_interval: Duration,

    /// How often the pool gauges of the EPP's own metrics are refreshed.
    #[arg(long, default_value = "5s", value_parser = parse_duration, help_heading = "Model-server metrics")]
    pub refresh_prometheus_metrics_interval: Duration,

    /// Metrics older than this are stale for the pool gauges.
    #[arg(long, default_value = "2s", value_parser = parse_duration, help_heading = "Model-server metrics")]
    pub metrics_staleness_threshold: Duration,

    /// Scheme for model-server metrics (deprecated upstream, honoured).
    #[arg(long, default_value = "http", value_parser = ["http", "https"], help_heading = "Model-server metrics")]
    pub model_server_metrics_scheme: String,

    /// Path of model-server metrics (deprecated upstream, honoured).
    #[arg(long, default_value = "/metrics", help_heading = "Model-server metrics")]
    pub model_server_metrics_path: String,

    /// Port of model-server metrics when it differs from the serving port (0 = same port).
    #[arg(long, default_value_t = 0, help_heading = "Model-server metrics")]
    pub model_server_metrics_port: u16,

    /// Skip TLS verification when scraping over https.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Model-server metrics")]
    pub model_server_metrics_https_insecure_skip_verify: bool,

    /// Removed upstream; setting it is an error (configure engineConfigs instead).
    #[arg(long, hide = true)]
    pub total_queued_requests_metric: Option<String>,
    /// Removed upstream; setting it is an error.
    #[arg(long, hide = true)]
    pub total_running_requests_metric: Option<String>,
    /// Removed upstream; setting it is an error.
    #[arg(long, hide = true)]
    pub kv_cache_usage_percentage_metric: Option<String>,
    /// Removed upstream; setting it is an error.
    #[arg(long, hide = true)]
    pub lora_info_metric: Option<String>,
    /// Removed upstream; setting it is an error.
    #[arg(long, hide = true)]
    pub cache_info_metric: Option<String>,

    /// Run leader election so that only one replica reports ready.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Kubernetes")]
    pub ha_enable_leader_election: bool,

    /// How long a lease stays held without renewal; a crashed leader is replaced this long after
    /// its last renewal. Shorter than controller-runtime's 15 s: for an EPP two replicas briefly
    /// both ready route as independent replicas do, while none ready is an outage.
    #[arg(long, default_value = "4s", value_parser = parse_duration, help_heading = "Kubernetes")]
    pub ha_lease_duration: Duration,

    /// How long the leader keeps leading (and ready) while its renewals fail, before it steps
    /// down. Less than --ha-lease-duration, so it steps down before anyone can take over.
    #[arg(long, default_value = "3s", value_parser = parse_duration, help_heading = "Kubernetes")]
    pub ha_renew_deadline: Duration,

    /// How often the leader renews and followers try to acquire the lease.
    #[arg(long, default_value = "500ms", value_parser = parse_duration, help_heading = "Kubernetes")]
    pub ha_retry_period: Duration,

    /// Serve /metrics only to callers whose bearer token passes a TokenReview and a
    /// SubjectAccessReview for `get` on /metrics (needs the Kubernetes API; a static pool serves
    /// it open and says so at start).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Kubernetes")]
    pub metrics_endpoint_auth: bool,

    /// OpenTelemetry tracing, configured by the usual `OTEL_*` variables as upstream:
    /// `OTEL_TRACES_EXPORTER` console (default) or otlp, `OTEL_TRACES_SAMPLER`/`_ARG` (default
    /// parentbased_traceidratio 0.1), `OTEL_SERVICE_NAME`.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Observability")]
    pub tracing: bool,

    /// pprof endpoints (accepted for compatibility; not applicable to this binary).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Observability")]
    pub enable_pprof: bool,

    /// Log verbosity: 2 default, 3 verbose, 4 debug, 5 trace.
    #[arg(short = 'v', long = "v", default_value_t = 2, help_heading = "Observability")]
    pub verbosity: u8,

    /// Log encoding: console or json.
    #[arg(long, default_value = "console", value_parser = ["console", "json"], help_heading = "Observability")]
    pub zap_encoder: String,

    /// Development logging (accepted for compatibility).
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true", help_heading = "Observability")]
    pub zap_devel: bool,

    /// Log level (debug, info, error, or a number); overrides -v.
    #[arg(long, default_value = "", help_heading = "Observability")]
    pub zap_log_level: String,

    /// Stack-trace level (accepted for compatibility).
    #[arg(long, default_value = "", help_heading = "Observability")]
    pub zap_stacktrace_level: String,

    /// Time encoding (accepted for compatibility).
    #[arg(long, default_value = "", help_heading = "Observability")]
    pub zap_time_encoding: String,
}

/// A flag combination that cannot work.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FlagError {
    /// A removed metric flag was set.
    #[error("--{flag} is deprecated and cannot be used; configure metrics via engineConfigs")]
    RemovedMetricFlag {
        /// The flag.
        flag: &'static str,
    },
    /// No pool source, or more than one.
    #[error("exactly one of --endpoints, --pool-name and --endpoint-selector is required")]
    PoolSource,
    /// A static endpoint is not `ip:port[@engine]`.
    #[error("--endpoints: {entry:?} is not ip:port[@engine]")]
    BadEndpoint {
        /// The entry.
        entry: String,
    },
    /// Standalone mode without ports, or with too many.
    #[error("--endpoint-target-ports needs 1 to 8 ports with --endpoint-selector")]
    TargetPorts,
    /// Leader-election timing out of order.
    #[error(
        "leader election needs --ha-retry-period < --ha-renew-deadline < --ha-lease-duration, and a lease of at least 1s"
    )]
    LeaseTiming,
    /// `--watch-config-file` without `--config-file`.
    #[error("--watch-config-file watches the file of --config-file, and none is given")]
    WatchWithoutFile,
    /// An `--endpoint-selector` entry is not a `key=value` label requirement.
    #[error("--endpoint-selector: {entry:?}: {reason}")]
    BadSelector {
        /// The entry.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// One `--endpoints` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticEndpoint {
    /// Serving address.
    pub address: SocketAddr,
    /// Engine name, when given.
    pub engine: Option<String>,
}

impl Flags {
    /// Check combinations clap cannot express.
    ///
    /// # Errors
    /// The first [`FlagError`] found.
    pub fn validate(&self) -> Result<(), FlagError> {
        match super::Settings::from_flags(self.clone()) {
            Ok(_) => Ok(()),
            Err(mut e) => Err(e.errors.swap_remove(0)),
        }
    }

    /// The parsed `--endpoints` list.
    ///
    /// # Errors
    /// [`FlagError::BadEndpoint`] for an entry that is not `ip:port[@engine]`.
    pub fn static_endpoints(&self) -> Result<Vec<StaticEndpoint>, FlagError> {
        self.endpoints
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|entry| {
                let (addr, engine) = match entry.split_once('@') {
                    Some((a, e)) if !e.is_empty() => (a, Some(e.to_owned())),
                    Some(_) => {
                        return Err(FlagError::BadEndpoint {
                            entry: entry.to_owned(),
                        });
                    }
                    None => (entry, None),
                };
                let address = addr.parse().map_err(|_| FlagError::BadEndpoint {
                    entry: entry.to_owned(),
                })?;
                Ok(StaticEndpoint { address, engine })
            })
            .collect()
    }

    /// The pool namespace: the flag, else `$NAMESPACE`, else `default`.
    pub fn effective_namespace(&self) -> String {
        if !self.pool_namespace.is_empty() {
            return self.pool_namespace.clone();
        }
        std::env::var("NAMESPACE")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into())
    }

    /// The certificate directory, if set.
    pub fn cert_dir(&self) -> Option<PathBuf> {
        (!self.cert_path.is_empty()).then(|| PathBuf::from(&self.cert_path))
    }
}

/// Rewrite arguments into the form clap reads as Go's `flag` package does:
/// - a single-dash long flag (`-grpc-port=1`) becomes `--grpc-port=1` (short flags such as `-v`,
///   `-v=3`, `-h`, `-V` are left alone);
/// - a flag that takes a value, given without `=`, takes the next argument as its value whatever
///   it starts with, so `--config-text "---\n..."` or `--pool-name -x` work (clap alone would read
///   the dash as the next flag); the pair is joined as `--flag=value`. Booleans never take the next
///   argument (`--secure-serving false` is a flag and a stray `false`, as in Go).
pub fn normalize_go_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let command = <Flags as clap::CommandFactory>::command();
    let takes_next = |name: &str| {
        command.get_arguments().any(|a| {
            let named = a.get_long() == Some(name)
                || (name.len() == 1 && a.get_short().is_some_and(|c| name.starts_with(c)));
            named && a.get_action().takes_values() && !a.is_require_equals_set()
        })
    };
    let mut out = Vec::new();
    let mut args = args.into_iter().enumerate();
    while let Some((i, a)) = args.next() {
        let is_single_dash_long = i > 0
            && a.starts_with('-')
            && !a.starts_with("--")
            && a.split('=').next().is_some_and(|name| name.len() > 2)
            && a.as_bytes().get(1).is_some_and(u8::is_ascii_alphabetic);
        let a = if is_single_dash_long { format!("-{a}") } else { a };
        let name = a.strip_prefix("--").or_else(|| a.strip_prefix('-'));
        match name {
            Some(name) if i > 0 && !name.is_empty() && !name.contains('=') && takes_next(name) => {
                match args.next() {
                    Some((_, value)) => out.push(format!("{a}={value}")),
                    None => out.push(a), // clap reports the missing value
                }
            }
            _ => out.push(a),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        let args = normalize_go_args(
            std::iter::once("epp")
                .chain(args.iter().copied())
                .map(String::from),
        );
        Flags::try_parse_from(args)
    }

    #[test]
    fn defaults_match_the_go_epp() {
        let f = parse(&["--pool-name", "p"]).unwrap();
        assert_eq!(
            (f.grpc_port, f.grpc_health_port, f.metrics_port),
            (9002, 9003, 9090)
        );
        assert!(f.secure_serving);
        assert_eq!(f.refresh_metrics_interval, Duration::from_millis(50));
        assert_eq!(f.refresh_prometheus_metrics_interval, Duration::from_secs(5));
        assert_eq!(f.metrics_staleness_threshold, Duration::from_secs(2));
        assert_eq!(f.pool_group, "inference.networking.k8s.io");
        assert_eq!(f.verbosity, 2);
        assert!(f.model_server_metrics_https_insecure_skip_verify);
        f.validate().unwrap();
    }

    #[test]
    fn both_value_forms_and_go_booleans() {
        let f = parse(&[
            "--grpc-port=1234",
            "--metrics-port",
            "99",
            "--secure-serving=false",
            "--endpoints",
            "127.0.0.1:8000,127.0.0.1:8001@sglang",
            "-v=4",
        ])
        .unwrap();
        assert_eq!(f.grpc_port, 1234);
        assert_eq!(f.metrics_port, 99);
        assert!(!f.secure_serving);
        assert_eq!(f.verbosity, 4);
        let eps = f.static_endpoints().unwrap();
        assert_eq!(eps[1].engine.as_deref(), Some("sglang"));
        let f = parse(&["--secure-serving", "--pool-name=p", "-grpc-port=77", "--v=3"]).unwrap();
        assert!(f.secure_serving);
        assert_eq!(f.grpc_port, 77);
        assert_eq!(f.verbosity, 3);
        // Upstream's kubelet-style list, comma-separated.
        let f = parse(&["--pool-name=p", "--feature-gates=flowControl,dataLayer=false"]).unwrap();
        assert_eq!(f.feature_gates, vec!["flowControl", "dataLayer=false"]);
    }

    #[test]
    fn bind_addresses_are_ips_and_default_to_every_interface() {
        let f = parse(&["--pool-name=p"]).unwrap();
        assert_eq!(
            (
                f.grpc_bind_address,
                f.grpc_health_bind_address,
                f.metrics_bind_address
            ),
            (None, None, None)
        );
        let f = parse(&[
            "--pool-name=p",
            "--grpc-bind-address=127.0.0.1",
            "--metrics-bind-address",
            "::1",
        ])
        .unwrap();
        assert_eq!(f.grpc_bind_address, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(f.metrics_bind_address, Some("::1".parse().unwrap()));
        let e = parse(&["--pool-name=p", "--grpc-bind-address=localhost"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("invalid value 'localhost' for '--grpc-bind-address <IP>'"),
            "{e}"
        );
    }

    /// Regression (robustness issue, item 8): `--config-text "$CFG"` with a document starting
    /// with `---` was refused (clap read the value as a flag); Go's `flag` package takes the next
    /// argument as the value of a flag that needs one, whatever it starts with.
    #[test]
    fn a_value_starting_with_a_dash_is_taken_as_go_takes_it() {
        let doc = "---\napiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";
        let f = parse(&[
            "--config-text",
            doc,
            "--pool-name",
            "-p",
            "-pool-namespace",
            "-n",
            "-v",
            "5",
        ])
        .unwrap();
        assert_eq!(f.config_text, doc);
        assert_eq!((f.pool_name.as_str(), f.pool_namespace.as_str()), ("-p", "-n"));
        assert_eq!(f.verbosity, 5);
        // Booleans never take the next argument; a flag missing its value is still an error.
        let f = parse(&["--secure-serving", "--pool-name", "--x"]).unwrap();
        assert!(f.secure_serving);
        assert_eq!(f.pool_name, "--x");
        assert!(parse(&["--pool-name"]).is_err());
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let f = parse(&["--pool-name", "p", "--lora-info-metric", "x"]).unwrap();
        assert_eq!(
            f.validate(),
            Err(FlagError::RemovedMetricFlag {
                flag: "lora-info-metric"
            })
        );
        assert_eq!(parse(&[]).unwrap().validate(), Err(FlagError::PoolSource));
        let f = parse(&["--endpoints", "nope"]).unwrap();
        assert!(matches!(f.validate(), Err(FlagError::BadEndpoint { .. })));
        let f = parse(&["--endpoint-selector", "app=x"]).unwrap();
        assert_eq!(f.validate(), Err(FlagError::TargetPorts));
        assert!(parse(&["--config-file", "a", "--config-text", "b"]).is_err());
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
    }
}
