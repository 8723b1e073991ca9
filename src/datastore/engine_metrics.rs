//! What the EPP knows about one model server's load: the typed result of a scrape.
//!
//! Pure data shared by the collector (which fills it), the datastore (which stores it per
//! endpoint) and the scheduler (which reads it). Unknown values are `None`, never zero: a missing
//! KV gauge must not make a pod look empty.

use std::sync::Arc;

use crate::clock::Timestamp;

/// LoRA adapter state reported by the engine (`vllm:lora_requests_info`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraState {
    /// Adapters currently loaded and serving requests.
    pub running: Arc<[Arc<str>]>,
    /// Adapters requested by queued requests.
    pub waiting: Arc<[Arc<str>]>,
    /// Maximum adapters per batch (`max_lora`).
    pub max_active: u32,
}

impl LoraState {
    /// Whether `adapter` is loaded.
    pub fn is_running(&self, adapter: &str) -> bool {
        self.running.iter().any(|a| a.as_ref() == adapter)
    }

    /// Whether `adapter` is waiting to be loaded.
    pub fn is_waiting(&self, adapter: &str) -> bool {
        self.waiting.iter().any(|a| a.as_ref() == adapter)
    }
}

/// Why the last scrape of an endpoint failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScrapeFailure {
    /// No answer within the per-scrape timeout.
    Timeout,
    /// Connection refused, reset or similar.
    Connect,
    /// Non-2xx HTTP status.
    HttpStatus(u16),
    /// The body exceeded the size cap.
    TooLarge,
    /// The body was not usable exposition text.
    Parse,
}

impl ScrapeFailure {
    /// Stable label value for the scrape-error counter.
    pub fn reason(self) -> &'static str {
        match self {
            ScrapeFailure::Timeout => "timeout",
            ScrapeFailure::Connect => "connect",
            ScrapeFailure::HttpStatus(_) => "http_status",
            ScrapeFailure::TooLarge => "too_large",
            ScrapeFailure::Parse => "parse",
        }
    }
}

/// Load signals of one endpoint at one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineMetrics {
    /// Requests waiting in the engine's queue.
    pub waiting: u32,
    /// Requests being processed.
    pub running: u32,
    /// KV-cache utilization as a fraction in [0, 1]; `None` when the engine does not report it.
    pub kv_usage: Option<f64>,
    /// LoRA adapter state, when reported.
    pub lora: Option<LoraState>,
    /// KV block size in tokens, when reported.
    pub block_size: Option<u32>,
    /// Number of KV blocks on the GPU, when reported.
    pub num_gpu_blocks: Option<u64>,
    /// When the values above were scraped; `None` = never scraped successfully.
    pub scraped_at: Option<Timestamp>,
    /// The last scrape failure, cleared by the next success.
    pub last_error: Option<ScrapeFailure>,
}
