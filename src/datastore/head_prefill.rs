//! How far a one-slot server is through the prompt it is computing, followed from scrape to
//! scrape.
//!
//! A one-slot server (llama.cpp's `llama-server -np 1`, [`SlotEvidence::one_slot`]) computes the
//! oldest request this EPP sent it that has no first byte yet, alone, once nothing is answering
//! ahead of it; every other request waits. The prefill backlog counts that request's prompt
//! whole until its first byte, which on a slow server is a minute of work counted as not begun
//! even when most of it is done. [`HeadPrefill`] keeps what the scrapes show of it: which
//! request is at the head, since when it has been computing alone, and the endpoint's own
//! prefill rate (the tokens of the head prompts it finished over the time they took), so the
//! scorer can count the head by what is left of it ([`HeadPrefill::progress_tokens`]).
//!
//! Times come from the scrapes (the scrape that first saw the head computing alone, the scrape
//! that first saw it answered), so each is off by at most one scrape interval, in both
//! directions. Invariants: the timed sums only grow while the endpoint stays (the datastore
//! starts afresh when an endpoint is replaced); progress is never more than the head's tokens,
//! and is zero whenever anything is unknown (no rate yet, something answering, the head changed
//! since the scrape).

use super::endpoint::{LiveSlots, QueuedPrefill};
use crate::clock::Timestamp;
#[cfg(doc)]
use crate::datastore::SlotEvidence;

/// The head of one endpoint's prefill queue as the scrapes so far show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeadPrefill {
    /// The oldest request waiting for its first byte at the last scrape.
    head: Option<QueuedPrefill>,
    /// Since when the head has been computing alone: the first scrape that saw it at the head
    /// with the engine running and nothing answering, and no request finished since. `None`
    /// while something answers ahead of it (a one-slot server decodes before it computes the
    /// next prompt).
    since: Option<Timestamp>,
    /// The live counters at the last scrape, to tell an unchanged head from a new one.
    answered_total: u64,
    finished_total: u64,
    /// Prompt tokens of the head prompts timed so far, and the nanoseconds they took.
    timed_tokens: u64,
    timed_nanos: u64,
}

impl HeadPrefill {
    /// The head after a scrape at `at` that showed `running` requests running, with `live` the
    /// endpoint's counters at that moment.
    #[must_use]
    pub fn with_scrape(self, at: Timestamp, running: u32, live: &LiveSlots) -> Self {
        let mut next = self;
        // The head timed since the last scrape got its first byte: time its prompt.
        if let (Some(head), Some(since)) = (self.head, self.since) {
            let left = live.oldest.is_none_or(|o| o.seq != head.seq);
            if left && live.answered_total > self.answered_total {
                let nanos = u64::try_from(at.since(since).as_nanos()).unwrap_or(u64::MAX);
                next.timed_tokens = next.timed_tokens.saturating_add(head.tokens);
                next.timed_nanos = next.timed_nanos.saturating_add(nanos);
            }
        }
        next.since = match live.oldest {
            Some(oldest) if live.answering == 0 && running > 0 => {
                let same_turn = self.head.is_some_and(|h| h.seq == oldest.seq)
                    && live.finished_total == self.finished_total;
                if same_turn {
                    self.since.or(Some(at))
                } else {
                    Some(at)
                }
            }
            _ => None,
        };
        next.head = live.oldest;
        next.answered_total = live.answered_total;
        next.finished_total = live.finished_total;
        next
    }

    /// The endpoint's prefill rate learned so far, in tokens per second; `None` before its first
    /// timed prompt.
    pub fn tokens_per_second(&self) -> Option<f64> {
        (self.timed_tokens > 0 && self.timed_nanos > 0)
            .then(|| self.timed_tokens as f64 * 1e9 / self.timed_nanos as f64)
    }

    /// Tokens of the head's prompt computed by `now`, at the learned rate since it began
    /// computing alone, at most its whole prompt; 0 when any of it is unknown or when `oldest`
    /// (the endpoint's oldest waiting request now) is no longer the head the scrape saw.
    pub fn progress_tokens(&self, now: Timestamp, oldest: Option<QueuedPrefill>) -> u64 {
        let (Some(head), Some(since), Some(rate)) = (self.head, self.since, self.tokens_per_second()) else {
            return 0;
        };
        if oldest != Some(head) {
            return 0;
        }
        let done = rate * now.since(since).as_secs_f64();
        // `as` saturates, and `done` is finite and non-negative.
        (done as u64).min(head.tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::{HeadPrefill, LiveSlots, QueuedPrefill, Timestamp};

    const SECOND: u64 = 1_000_000_000;

    fn at(seconds: f64) -> Timestamp {
        Timestamp((seconds * SECOND as f64) as u64)
    }

    fn queued(seq: u64, tokens: u64) -> Option<QueuedPrefill> {
        Some(QueuedPrefill { seq, tokens })
    }

    fn live(answering: u32, answered: u64, finished: u64, oldest: Option<QueuedPrefill>) -> LiveSlots {
        LiveSlots {
            answering,
            answered_total: answered,
            finished_total: finished,
            oldest,
        }
    }

    /// A one-slot server's life: a 1,000-token prompt computed alone from t = 1 s to its first
    /// byte seen at t = 11 s teaches 100 tokens/s; the next prompt (2,000 tokens) waits while the
    /// first one answers, then computes alone from t = 12 s, and at t = 17 s is counted 500
    /// tokens along. Anything unknown counts no progress.
    #[test]
    fn a_head_prompt_is_timed_and_the_next_counted_by_what_is_left() {
        let first = queued(0, 1_000);
        let second = queued(1, 2_000);
        let h = HeadPrefill::default().with_scrape(at(1.0), 1, &live(0, 0, 0, first));
        assert_eq!(h.tokens_per_second(), None);
        assert_eq!(h.progress_tokens(at(5.0), first), 0, "no rate yet");
        let h =
            h.with_scrape(at(6.0), 1, &live(0, 0, 0, first))
                .with_scrape(at(11.0), 1, &live(1, 1, 0, second));
        assert_eq!(h.tokens_per_second(), Some(100.0));
        assert_eq!(h.progress_tokens(at(11.5), second), 0, "waits behind the answer");
        let h = h.with_scrape(at(12.0), 1, &live(0, 1, 1, second));
        assert_eq!(h.progress_tokens(at(17.0), second), 500);
        assert_eq!(
            h.progress_tokens(at(60.0), second),
            2_000,
            "never more than the prompt"
        );
        assert_eq!(
            h.progress_tokens(at(17.0), queued(2, 40)),
            0,
            "answered since the scrape"
        );
        let again = h.with_scrape(at(13.0), 1, &live(0, 1, 1, second));
        assert_eq!(
            again.progress_tokens(at(17.0), second),
            500,
            "the same turn keeps its start"
        );
        let restarted = h.with_scrape(at(13.0), 1, &live(0, 1, 2, second));
        assert_eq!(
            restarted.progress_tokens(at(17.0), second),
            400,
            "a request finished between the scrapes: the slot was busy until then"
        );
        let idle_engine = h.with_scrape(at(13.0), 0, &live(0, 1, 1, second));
        assert_eq!(
            idle_engine.progress_tokens(at(17.0), second),
            0,
            "not running yet"
        );
    }

    /// A request that leaves without a first byte (the client went away) teaches nothing: its
    /// endpoint counts it finished, not answered.
    #[test]
    fn a_head_that_left_unanswered_is_not_timed() {
        let endpoint = std::sync::Arc::new(crate::datastore::EndpointLive::default());
        let request = crate::datastore::InFlight::start(&endpoint, 1_100, 1_000);
        let h = HeadPrefill::default().with_scrape(at(1.0), 1, &endpoint.slots());
        drop(request);
        let h = h.with_scrape(at(2.0), 0, &endpoint.slots());
        assert_eq!(h.tokens_per_second(), None);
    }
}
