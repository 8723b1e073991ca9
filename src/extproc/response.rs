//! The response side of an exchange: a usage tap and one ordered chain of body stages, built
//! once from the decision's [`ResponsePlan`] when the response headers say whether the answer
//! streams (or at the first body message, when no headers came).
//!
//! Order, each stage reading what the previous one let through:
//! 1. the usage tap reads the upstream bytes as they are (SSE usage event or JSON `usage`), for
//!    budget settlement and token metrics; it changes nothing;
//! 2. the injected-usage filter drops the usage-only event the EPP asked for on the client's
//!    behalf (it must see the upstream events whole, before anything is rewritten);
//! 3. the restorer puts back masked prompt values and the client-facing model name;
//! 4. the output mask masks what the response guards match, in the text the client will read.
//!
//! Invariant: end of stream and, in full-duplex mode, response trailers go through the same
//! flush ([`ResponseChain::feed`] with `end_of_stream`), so text a stage holds back (a possible
//! match split across chunks, the mask's look-behind) reaches the client once.

use std::sync::Arc;

use super::wire::MAX_RESPONSE_USAGE_BYTES;
use crate::{
    guard::{
        PatternSet,
        response::{StreamMask, mask_json_body},
    },
    parser::{EventSplitter, SseUsageScanner, StreamReplacer, Usage, UsageEventFilter, usage_from_json},
    scheduler::{ResponsePlan, admission::PromptGuard},
};

/// One transform of response bytes, fed in order; with `end_of_stream` it releases all it holds.
trait BodyStage: Send {
    fn feed(&mut self, data: &[u8], end_of_stream: bool) -> Vec<u8>;
}

impl BodyStage for UsageEventFilter {
    fn feed(&mut self, data: &[u8], end_of_stream: bool) -> Vec<u8> {
        UsageEventFilter::feed(self, data, end_of_stream)
    }
}

impl BodyStage for StreamReplacer {
    fn feed(&mut self, data: &[u8], end_of_stream: bool) -> Vec<u8> {
        StreamReplacer::feed(self, data, end_of_stream)
    }
}

/// Response guards at work: SSE events are split out as they complete and masked across events
/// ([`StreamMask`]); a non-streaming body is held to its end (a JSON body can only be masked
/// whole), up to [`MAX_RESPONSE_USAGE_BYTES`].
///
/// Past its limits the guard fails closed: text it cannot scan is never released. An SSE event
/// longer than [`MAX_HELD_EVENT_BYTES`](crate::parser::MAX_HELD_EVENT_BYTES) ends the stream with an error event; a JSON body longer
/// than the limit is replaced by an error body. Letting it through unscanned would turn a size
/// into a way around the guard.
struct OutputMask {
    guards: Vec<Arc<PromptGuard>>,
    streaming: bool,
    events: EventSplitter,
    stream: StreamMask,
    held: Vec<u8>,
    /// The limit was passed: nothing more is released.
    withheld: bool,
}

/// The SSE event that ends a stream the output guard could not scan.
const WITHHELD_EVENT: &[u8] = b"data: {\"error\":{\"message\":\"the response could not be scanned by the output guard (an event over 1 MiB); the rest of it was withheld\",\"type\":\"server_error\",\"param\":null,\"code\":\"response_too_large\"}}\n\n";

/// The body that replaces a JSON response the output guard could not scan.
const WITHHELD_BODY: &[u8] = b"{\"error\":{\"message\":\"the response could not be scanned by the output guard (a body over 4 MiB); it was withheld\",\"type\":\"server_error\",\"param\":null,\"code\":\"response_too_large\"}}";

impl BodyStage for OutputMask {
    fn feed(&mut self, data: &[u8], end_of_stream: bool) -> Vec<u8> {
        if self.withheld {
            return Vec::new();
        }
        let sets: Vec<&PatternSet> = self.guards.iter().filter_map(|g| g.response_patterns()).collect();
        if self.streaming {
            let mut out = Vec::with_capacity(data.len());
            let stream = &mut self.stream;
            self.events.feed_with(data, end_of_stream, |ev| {
                out.extend_from_slice(&stream.event(&sets, ev))
            });
            if self.events.overflowed() {
                self.withheld = true;
                drop(self.events.take_held());
                out.extend_from_slice(WITHHELD_EVENT);
                return out;
            }
            if end_of_stream {
                out.extend_from_slice(&self.stream.finish(&sets));
            }
            return out;
        }
        if self.held.len() + data.len() > MAX_RESPONSE_USAGE_BYTES {
            self.withheld = true;
            self.held = Vec::new();
            return WITHHELD_BODY.to_vec();
        }
        self.held.extend_from_slice(data);
        if !end_of_stream {
            return Vec::new();
        }
        let body = std::mem::take(&mut self.held);
        mask_json_body(&sets, &body).unwrap_or(body)
    }
}

/// Reads usage from the upstream bytes: the SSE usage event of a stream, or the `usage` of a
/// JSON body kept up to [`MAX_RESPONSE_USAGE_BYTES`] (a larger body is not read).
#[derive(Default)]
struct UsageTap {
    sse: Option<SseUsageScanner>,
    json: Vec<u8>,
    json_overflow: bool,
}

impl UsageTap {
    fn feed(&mut self, data: &[u8]) {
        if let Some(sse) = self.sse.as_mut() {
            sse.feed(data);
        } else if !self.json_overflow {
            if self.json.len() + data.len() > MAX_RESPONSE_USAGE_BYTES {
                self.json_overflow = true;
                self.json = Vec::new();
            } else {
                self.json.extend_from_slice(data);
            }
        }
    }

    fn usage(&self) -> Option<Usage> {
        match &self.sse {
            Some(sse) => sse.usage(),
            None => usage_from_json(&self.json),
        }
    }
}

/// The response side of one exchange.
pub struct ResponseChain {
    tap: UsageTap,
    stages: Vec<Box<dyn BodyStage>>,
    bytes: u64,
    ended: bool,
}

impl ResponseChain {
    /// The chain for `plan`; `streaming` when the answer is an SSE stream (the response's
    /// content type, or a streaming request).
    pub fn new(plan: ResponsePlan, streaming: bool) -> Self {
        let mut stages: Vec<Box<dyn BodyStage>> = Vec::new();
        if plan.hide_injected_usage {
            stages.push(Box::new(UsageEventFilter::default()));
        }
        if !plan.restore.is_empty() {
            stages.push(Box::new(StreamReplacer::with_patterns(plan.restore)));
        }
        if !plan.output_guards.is_empty() {
            stages.push(Box::new(OutputMask {
                guards: plan.output_guards,
                streaming,
                events: EventSplitter::default(),
                stream: StreamMask::default(),
                held: Vec::new(),
                withheld: false,
            }));
        }
        Self {
            tap: UsageTap {
                sse: streaming.then(SseUsageScanner::default),
                ..UsageTap::default()
            },
            stages,
            bytes: 0,
            ended: false,
        }
    }

    /// Feed upstream bytes; `end_of_stream` (the last body chunk, or the trailers with empty
    /// `data`) flushes every stage. Returns what the client gets instead of `data`, or `None`
    /// when no stage changes anything (then `data` goes on as it is). After the end, nothing
    /// more is read.
    pub fn feed(&mut self, data: &[u8], end_of_stream: bool) -> Option<Vec<u8>> {
        if self.ended {
            return None;
        }
        self.ended = end_of_stream;
        self.bytes += data.len() as u64;
        self.tap.feed(data);
        let mut stages = self.stages.iter_mut();
        let mut out = stages.next()?.feed(data, end_of_stream);
        for stage in stages {
            out = stage.feed(&out, end_of_stream);
        }
        Some(out)
    }

    /// Usage read from the upstream bytes so far.
    pub fn usage(&self) -> Option<Usage> {
        self.tap.usage()
    }

    /// Upstream bytes seen.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Drop the JSON kept for usage once it has been read.
    pub fn release_buffers(&mut self) {
        self.tap.json = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::EndpointPickerConfig, scheduler::build_scheduler};

    /// The output guards a config with one card-masking response guard gives a decision.
    fn card_guard() -> Arc<PromptGuard> {
        let config = EndpointPickerConfig::from_yaml(
            "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: prompt-guard
  parameters:
    response:
      regex: {builtins: [CREDIT_CARD]}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
",
        )
        .unwrap();
        build_scheduler(&config).unwrap().output_guards[0].clone()
    }

    /// Feed `pieces` (the last with end of stream) and collect what the client gets.
    fn run(chain: &mut ResponseChain, pieces: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            out.extend(chain.feed(p, last).unwrap_or_else(|| p.clone()));
        }
        out
    }

    /// 3 MB without an event boundary: the output guard cannot scan it, so it releases nothing
    /// of it and ends the stream with an error event (fail closed); the masked event before it
    /// went out masked.
    #[test]
    fn a_guarded_stream_without_boundaries_is_withheld_past_the_limit() {
        let plan = ResponsePlan {
            output_guards: vec![card_guard()],
            ..ResponsePlan::default()
        };
        let mut chain = ResponseChain::new(plan, true);
        let mut pieces =
            vec![b"data: {\"choices\":[{\"delta\":{\"content\":\"4111 1111 1111 1111\"}}]}\n\n".to_vec()];
        pieces.extend(std::iter::repeat_n(vec![b'x'; 62_000], 50));
        let out = run(&mut chain, &pieces);
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("4111 1111 1111 1111"), "{text}");
        assert!(
            !text.contains("xxxx"),
            "nothing of the unscannable event is released"
        );
        assert!(
            text.ends_with(std::str::from_utf8(WITHHELD_EVENT).unwrap()),
            "{text}"
        );
        assert!(out.len() < 4_096);
    }

    /// A JSON body past the limit is replaced by an error body, not held or released unscanned.
    #[test]
    fn a_guarded_json_body_past_the_limit_is_replaced_by_an_error() {
        let plan = ResponsePlan {
            output_guards: vec![card_guard()],
            ..ResponsePlan::default()
        };
        let mut chain = ResponseChain::new(plan, false);
        let pieces: Vec<Vec<u8>> = std::iter::repeat_n(vec![b'y'; 62_000], 80).collect();
        assert_eq!(run(&mut chain, &pieces), WITHHELD_BODY);
    }

    /// The injected-usage filter (budgets) passes an endless event through whole: accounting
    /// never costs the client its answer.
    #[test]
    fn a_budget_stream_without_boundaries_passes_through() {
        let plan = ResponsePlan {
            hide_injected_usage: true,
            ..ResponsePlan::default()
        };
        let mut chain = ResponseChain::new(plan, true);
        let pieces: Vec<Vec<u8>> = std::iter::repeat_n(vec![b'z'; 62_000], 50).collect();
        let out = run(&mut chain, &pieces);
        assert_eq!(out.len(), 62_000 * 50);
        assert!(out.iter().all(|b| *b == b'z'));
    }
}
