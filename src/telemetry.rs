//! OpenTelemetry traces (`--tracing`, on by default as upstream), set up as upstream's EPP sets
//! them up:
//! - exporter from `OTEL_TRACES_EXPORTER`: `console` (the default: spans printed on stdout) or
//!   `otlp` (gRPC to `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`,
//!   else a plaintext collector on `localhost:4317`; the other `OTEL_EXPORTER_OTLP_*`
//!   variables as the OTLP exporter reads them);
//! - sampler from `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`: by default
//!   `parentbased_traceidratio` at 0.1 (a caller's sampled trace is always continued);
//!   `always_on`, `always_off`, `traceidratio`, `parentbased_always_on` and
//!   `parentbased_always_off` too; anything else falls back to the default with a warning;
//! - resource from `OTEL_SERVICE_NAME` (default `epp`) and `OTEL_RESOURCE_ATTRIBUTES`;
//! - W3C trace context and baggage propagated (see [`crate::extproc::spans`]).
//!
//! With `--tracing=false` nothing is set up and the request path creates no span.

use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use tracing::{info, warn};

/// The tracer spans are made with, and the provider that exports them.
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// The exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("--tracing: {0}")]
pub struct TelemetryError(String);

/// The sampler `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` name (their values here).
pub fn sampler(kind: Option<&str>, arg: Option<&str>) -> Sampler {
    let ratio = || {
        arg.and_then(|a| a.trim().parse::<f64>().ok())
            .filter(|r| (0.0..=1.0).contains(r))
    };
    let default_ratio = || ratio().unwrap_or(0.1);
    match kind.unwrap_or("parentbased_traceidratio") {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(default_ratio()),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(default_ratio())))
        }
        other => {
            warn!(
                sampler = other,
                "unsupported OTEL_TRACES_SAMPLER: parentbased_traceidratio at 0.1 instead"
            );
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.1)))
        }
    }
}

impl Telemetry {
    /// Set up tracing when `enabled`, from the environment (inside the Tokio runtime: the OTLP
    /// exporter's gRPC client needs it).
    ///
    /// # Errors
    /// The OTLP exporter cannot be built (a malformed endpoint).
    pub fn from_env(enabled: bool) -> Result<Option<Self>, TelemetryError> {
        if !enabled {
            return Ok(None);
        }
        let env = |k: &str| std::env::var(k).ok();
        let exporter_kind = env("OTEL_TRACES_EXPORTER").unwrap_or_else(|| "console".into());
        let mut resource = opentelemetry_sdk::Resource::builder();
        if env("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("epp");
        }
        let builder = SdkTracerProvider::builder()
            .with_sampler(sampler(
                env("OTEL_TRACES_SAMPLER").as_deref(),
                env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
            ))
            .with_resource(resource.build());
        let provider = match exporter_kind.as_str() {
            "otlp" => {
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()
                    .map_err(|e| TelemetryError(e.to_string()))?;
                builder.with_batch_exporter(exporter).build()
            }
            other => {
                if other != "console" {
                    warn!(
                        exporter = other,
                        "unsupported OTEL_TRACES_EXPORTER: spans go to the console"
                    );
                }
                builder
                    .with_batch_exporter(opentelemetry_stdout::SpanExporter::default())
                    .build()
            }
        };
        info!(exporter = %exporter_kind, "OpenTelemetry tracing on");
        let tracer = opentelemetry::trace::TracerProvider::tracer_with_scope(
            &provider,
            opentelemetry::InstrumentationScope::builder("epp")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Ok(Some(Self { provider, tracer }))
    }

    /// The tracer.
    pub fn tracer(&self) -> &SdkTracer {
        &self.tracer
    }

    /// Export what is buffered and stop.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            warn!(error = %e, "tracing shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_follow_the_otel_variables_with_upstreams_default() {
        let name = |s: Sampler| format!("{s:?}");
        assert_eq!(
            name(sampler(None, None)),
            name(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.1))))
        );
        assert_eq!(
            name(sampler(Some("parentbased_traceidratio"), Some("0.5"))),
            name(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.5))))
        );
        assert_eq!(name(sampler(Some("always_on"), None)), name(Sampler::AlwaysOn));
        assert_eq!(
            name(sampler(Some("traceidratio"), Some("7"))),
            name(Sampler::TraceIdRatioBased(0.1)),
            "a ratio outside [0, 1] takes the default"
        );
        assert_eq!(
            name(sampler(Some("jaeger_remote"), None)),
            name(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.1))))
        );
    }
}
