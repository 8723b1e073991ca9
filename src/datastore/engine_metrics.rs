//! What the EPP knows about one model server's load: the typed result of a scrape.
//!
//! Pure data shared by the collector (which fills it), the datastore (which stores it per
//! endpoint) and the scheduler (which reads it). Unknown values are `None`, never zero: a missing
//! KV gauge must not make a pod look empty.

use std::sync::Arc;

use super::HeadPrefill;
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
    /// What this endpoint's scrapes so far show of how many requests it runs at once; carried
    /// from scrape to scrape by [`SlotEvidence::with_scrape`].
    pub slots: SlotEvidence,
    /// The head of its prefill queue and its learned prefill rate; carried from scrape to
    /// scrape by [`HeadPrefill::with_scrape`].
    pub head: HeadPrefill,
}

/// What the scrapes of one endpoint so far show of how many requests it runs at once: whether
/// it is a one-slot server (llama.cpp's `llama-server -np 1`, which computes one request at a
/// time and queues every other one behind it, through its decode too) or a batching engine
/// (vLLM, SGLang, a llama.cpp server with several slots), where a request sent to an
/// idle-looking pod joins a batch.
///
/// The evidence for one slot is requests queued while the one running request is already
/// answering (this EPP saw its first byte) in [`ONE_SLOT_STREAK`] scrapes in a row: a batching
/// engine admits a waiting request at its next step once the running one decodes, so it queues
/// behind one running request only while that request's long prompt takes the step's whole
/// token budget (vLLM's chunked prefill), and not through its decode. A scrape whose waiting
/// requests wait for a LoRA adapter (vLLM's `max_loras` adapters are in the batch) is not
/// evidence either: they wait for the adapter, not for a slot. Any scrape with two requests
/// running settles "batching" for good.
///
/// Invariant: `peak_running` only grows while the endpoint stays (the datastore starts the
/// evidence afresh when an endpoint is replaced), so an endpoint that has shown two running
/// requests is never taken for a one-slot server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotEvidence {
    /// The most requests any scrape showed running at once.
    pub peak_running: u32,
    /// Scrapes in a row, up to the last, that showed requests queued behind one running request
    /// which was already answering.
    pub queued_behind_answer: u8,
    /// Whether such a streak ever reached [`ONE_SLOT_STREAK`].
    pub queued_through_answer: bool,
}

/// Scrapes in a row that must show requests queued behind one answering request before an
/// endpoint counts as a one-slot server: two, so that a request caught between its arrival and
/// the engine's next step (milliseconds on a batching engine) is not taken for a queue.
pub const ONE_SLOT_STREAK: u8 = 2;

impl SlotEvidence {
    /// The evidence after one more `scrape`, taken while `answering` of this EPP's requests on
    /// the endpoint were past their first byte.
    #[must_use]
    pub fn with_scrape(self, scrape: &EngineMetrics, answering: u32) -> Self {
        let waiting_for_adapter = scrape.lora.as_ref().is_some_and(|l| !l.waiting.is_empty());
        let queued_behind_answer =
            if scrape.running == 1 && scrape.waiting > 0 && answering > 0 && !waiting_for_adapter {
                self.queued_behind_answer.saturating_add(1)
            } else {
                0
            };
        Self {
            peak_running: self.peak_running.max(scrape.running),
            queued_behind_answer,
            queued_through_answer: self.queued_through_answer || queued_behind_answer >= ONE_SLOT_STREAK,
        }
    }

    /// Whether the endpoint has shown itself a one-slot server: requests queued through an
    /// answer, and never two running. Unknown (no such queue yet) counts as batching.
    pub fn one_slot(&self) -> bool {
        self.queued_through_answer && self.peak_running <= 1
    }
}

#[cfg(test)]
mod tests {
    use super::{EngineMetrics, LoraState, SlotEvidence};

    /// A scrape showing `waiting` and `running` requests.
    fn scrape(waiting: u32, running: u32) -> EngineMetrics {
        EngineMetrics {
            waiting,
            running,
            ..EngineMetrics::default()
        }
    }

    /// A one-slot server shows requests queued behind its one running request through that
    /// request's answer, in two scrapes in a row; a batching engine shows two running at once,
    /// which settles it however its scrapes looked before or after.
    #[test]
    fn slot_evidence_tells_one_slot_servers_from_batching_engines() {
        let idle = SlotEvidence::default();
        assert!(!idle.one_slot(), "no evidence is not a one-slot server");
        let once = idle.with_scrape(&scrape(2, 1), 1);
        assert!(
            !once.one_slot(),
            "one scrape can catch a request before the next step"
        );
        assert!(
            !once
                .with_scrape(&scrape(0, 1), 1)
                .with_scrape(&scrape(2, 1), 1)
                .one_slot(),
            "not in a row"
        );
        assert!(
            !idle
                .with_scrape(&scrape(2, 1), 0)
                .with_scrape(&scrape(2, 1), 0)
                .one_slot(),
            "queued behind a prompt still computing: a batching engine's chunked prefill"
        );
        assert!(
            !idle
                .with_scrape(&scrape(2, 0), 1)
                .with_scrape(&scrape(2, 0), 1)
                .one_slot()
        );
        let for_adapter = EngineMetrics {
            lora: Some(LoraState {
                running: vec!["a".into()].into(),
                waiting: vec!["b".into()].into(),
                max_active: 1,
            }),
            ..scrape(2, 1)
        };
        assert!(
            !idle
                .with_scrape(&for_adapter, 1)
                .with_scrape(&for_adapter, 1)
                .one_slot(),
            "waiting for an adapter, not for a slot"
        );
        let one_slot = once.with_scrape(&scrape(3, 1), 1);
        assert_eq!(
            one_slot,
            SlotEvidence {
                peak_running: 1,
                queued_behind_answer: 2,
                queued_through_answer: true
            }
        );
        assert!(one_slot.one_slot());
        assert!(
            one_slot.with_scrape(&scrape(0, 0), 0).one_slot(),
            "an idle scrape keeps it"
        );
        let batching = one_slot.with_scrape(&scrape(0, 2), 2);
        assert!(!batching.one_slot());
        assert!(
            !batching
                .with_scrape(&scrape(5, 1), 1)
                .with_scrape(&scrape(5, 1), 1)
                .one_slot(),
            "for good"
        );
    }
}
