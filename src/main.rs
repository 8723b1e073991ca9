//! `epp` binary: parse flags, start the EPP, run until SIGINT/SIGTERM.

use clap::Parser;
use epp::config::{Flags, normalize_go_args};
use tracing_subscriber::EnvFilter;

fn init_logging(flags: &Flags) {
    // Go EPP levels: 2 default (info), 3 verbose, 4 debug, 5 trace.
    let level = match flags.zap_log_level.as_str() {
        "" => match flags.verbosity {
            0..=2 => "info",
            3 | 4 => "debug",
            _ => "trace",
        },
        "error" => "error",
        "warn" => "warn",
        "info" => "info",
        "debug" => "debug",
        _ => "trace",
    };
    let filter =
        EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(format!("epp={level},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if flags.zap_encoder == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse_from(normalize_go_args(std::env::args()));
    init_logging(&flags);
    let app = epp::app::start(flags).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    app.shutdown().await;
    Ok(())
}
