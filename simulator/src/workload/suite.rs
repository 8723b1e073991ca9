//! The routing suite's workload kinds beyond [`super::generate`]'s: document QA over a corpus
//! with Zipf-skewed document popularity, multi-turn sessions (chats or agent loops) that re-send
//! their growing history, and mixed short and long prompts. Seeded like the others, with the same
//! knobs ([`GeneratorParams`]); their prompts are runs of blocks (segments) whose ids depend
//! only on (kind, key, index), so two prompts share exactly the segments they are built from.

use rand::{Rng, SeedableRng, rngs::SmallRng};
use xxhash_rust::xxh64::xxh64;

use super::{
    TraceRequest, Workload, exponential_gap_ns,
    generate::{BLOCK_TOKENS, GeneratorParams, arrivals, zipf_pick, zipf_table},
};

/// A request of the base model without a tenant.
fn request(arrival_ns: u64, input_tokens: u32, output_tokens: u32, blocks: Vec<u64>) -> TraceRequest {
    TraceRequest {
        arrival_ns,
        input_tokens,
        output_tokens: output_tokens.max(1),
        blocks,
        adapter: None,
        tenant: None,
    }
}

/// What a run of blocks of a generated prompt is, so that runs of different kinds never share
/// block ids.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Segment {
    /// A shared system prompt (or an agent's tool definitions).
    System = 1,
    /// A corpus document.
    Document = 2,
    /// A user message, a tool result or a question.
    Message = 3,
    /// A model's answer, re-sent in the next turn.
    Answer = 4,
}

/// Append the blocks of `tokens` tokens of segment `kind` number `key` (rounded up to whole
/// blocks) and return the tokens they hold.
fn push_segment(blocks: &mut Vec<u64>, kind: Segment, key: u64, tokens: u32) -> u32 {
    let n = tokens.div_ceil(BLOCK_TOKENS);
    let mut bytes = [0u8; 17];
    bytes[0] = kind as u8;
    bytes[1..9].copy_from_slice(&key.to_le_bytes());
    blocks.extend((0..u64::from(n)).map(|b| {
        bytes[9..].copy_from_slice(&b.to_le_bytes());
        xxh64(&bytes, 0x6e6e)
    }));
    n * BLOCK_TOKENS
}

/// Document QA / RAG: each request is a shared system prompt (`prefix_tokens`), one of
/// `documents` documents of `document_tokens` (Zipf popularity with exponent `zipf`, document 0
/// the most asked), then a question of its own (`question_tokens`).
///
/// With the defaults (200 × 8,192 tokens: 1.6M) the corpus is larger than one h100 pod's KV
/// cache (432k tokens) and smaller than eight pods' (3.5M): which pod holds which document
/// decides the hit rate.
pub fn doc_qa(p: &GeneratorParams, seed: u64) -> Workload {
    let mut rng = SmallRng::seed_from_u64(seed);
    let cdf = zipf_table(p.documents, p.zipf);
    let times = arrivals(p, &mut rng);
    let requests = times
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let doc = zipf_pick(&cdf, &mut rng);
            let mut blocks = Vec::new();
            let mut input = push_segment(&mut blocks, Segment::System, 0, p.prefix_tokens);
            input += push_segment(&mut blocks, Segment::Document, u64::from(doc), p.document_tokens);
            input += push_segment(&mut blocks, Segment::Message, i as u64, p.question_tokens);
            request(t, input, p.output_tokens, blocks)
        })
        .collect();
    Workload {
        name: "doc-qa".into(),
        block_tokens: BLOCK_TOKENS,
        requests,
    }
}

/// Sessions: multi-turn chats, or agent loops, that re-send their whole history each turn.
///
/// Sessions start as a Poisson process of `rate / turns` per second until about `requests`
/// turns are generated; a session has uniformly 1..=2×`turns`−1 turns, `think_time` seconds
/// apart on average (exponential). Session `s` uses system prompt `s mod groups`
/// (`prefix_tokens`: a chat's system prompt, or an agent's tool definitions). Turn `k`'s prompt
/// is that system prompt, then every earlier turn's message (`question_tokens`: a user message or
/// a tool result) and answer (`output_tokens`), then its own message: each turn extends the
/// previous turn's prompt, which a pod that served the session may still hold.
///
/// A chat is short messages and long think times; an agent loop is a long tool prefix, many
/// turns, long tool results, short answers and think times of a tool call's latency. Arrivals
/// are open-loop: a turn comes at its time whether or not the previous answer has ended.
pub fn sessions(p: &GeneratorParams, seed: u64) -> Workload {
    let mut rng = SmallRng::seed_from_u64(seed);
    let turns = p.turns.max(1);
    let session_rate = p.rate / f64::from(turns);
    let groups = p.groups.max(1);
    let output = p.output_tokens.max(1);
    let mut requests = Vec::with_capacity(p.requests);
    let mut start = 0u64;
    let mut session = 0u64;
    while requests.len() < p.requests {
        start += exponential_gap_ns(&mut rng, session_rate);
        let n = rng.random_range(1..=2 * turns - 1);
        let mut blocks = Vec::new();
        let mut input = push_segment(
            &mut blocks,
            Segment::System,
            session % u64::from(groups),
            p.prefix_tokens,
        );
        let mut at = start;
        for k in 0..n {
            if requests.len() >= p.requests {
                break;
            }
            if k > 0 {
                at += think_gap_ns(&mut rng, p.think_time);
                input += push_segment(
                    &mut blocks,
                    Segment::Answer,
                    (session << 16) | u64::from(k - 1),
                    output,
                );
            }
            input += push_segment(
                &mut blocks,
                Segment::Message,
                (session << 16) | u64::from(k),
                p.question_tokens,
            );
            requests.push(request(at, input, output, blocks.clone()));
        }
        session += 1;
    }
    Workload::by_arrival("sessions", BLOCK_TOKENS, requests)
}

/// An exponential think time of mean `mean_s` seconds, ns (0 for a mean of 0).
fn think_gap_ns(rng: &mut SmallRng, mean_s: f64) -> u64 {
    if mean_s > 0.0 {
        exponential_gap_ns(rng, 1.0 / mean_s)
    } else {
        0
    }
}

/// Mixed lengths: unique prompts behind one of `groups` system prompts (`prefix_tokens`), a
/// share `long_fraction` of them `long_tokens` long and the rest `question_tokens`. Little to
/// share: what matters is spreading the prefill work, which request counts do not see.
pub fn mixed(p: &GeneratorParams, seed: u64) -> Workload {
    let mut rng = SmallRng::seed_from_u64(seed);
    let times = arrivals(p, &mut rng);
    let groups = p.groups.max(1);
    let requests = times
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let long = rng.random_bool(p.long_fraction.clamp(0.0, 1.0));
            let g = rng.random_range(0..groups);
            let tokens = if long { p.long_tokens } else { p.question_tokens };
            let mut blocks = Vec::new();
            let mut input = push_segment(&mut blocks, Segment::System, u64::from(g), p.prefix_tokens);
            input += push_segment(&mut blocks, Segment::Message, i as u64, tokens);
            request(t, input, p.output_tokens, blocks)
        })
        .collect();
    Workload {
        name: "mixed".into(),
        block_tokens: BLOCK_TOKENS,
        requests,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Document QA: system prompt, a Zipf-popular document, a question of its own.
    #[test]
    fn doc_qa_asks_popular_documents_more() {
        let p = GeneratorParams {
            requests: 2_000,
            prefix_tokens: 100,
            question_tokens: 40,
            ..Default::default()
        };
        let w = doc_qa(&p, 5);
        assert_eq!(w, doc_qa(&p, 5));
        assert_eq!(w.name, "doc-qa");
        // 100 → 112 (7 blocks), 8,192 (512 blocks), 40 → 48 (3 blocks).
        assert!(
            w.requests
                .iter()
                .all(|r| r.input_tokens == 112 + 8_192 + 48 && r.blocks.len() == 522)
        );
        let system: std::collections::BTreeSet<u64> = w.requests.iter().map(|r| r.blocks[0]).collect();
        assert_eq!(system.len(), 1);
        let mut per_doc = std::collections::HashMap::<u64, usize>::new();
        for r in &w.requests {
            *per_doc.entry(r.blocks[7]).or_default() += 1;
        }
        let mut counts: Vec<usize> = per_doc.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        // Zipf(1) over 200 documents: the top one gets 1/H(200) ≈ 17 % of the questions.
        assert!((250..450).contains(&counts[0]), "{counts:?}");
        assert!(counts.len() > 100, "{}", counts.len());
        let questions: std::collections::BTreeSet<u64> = w.requests.iter().map(|r| r.blocks[519]).collect();
        assert_eq!(questions.len(), 2_000);
    }

    /// Each turn of a session extends the previous turn's prompt by its answer and a message.
    #[test]
    fn a_session_turn_extends_the_previous_prompt() {
        let p = GeneratorParams {
            requests: 600,
            rate: 10.0,
            groups: 2,
            prefix_tokens: 512,
            question_tokens: 64,
            output_tokens: 32,
            turns: 4,
            think_time: 5.0,
            ..Default::default()
        };
        let w = sessions(&p, 9);
        assert_eq!(w, sessions(&p, 9));
        assert_eq!(w.requests.len(), 600);
        assert!(w.requests.windows(2).all(|x| x[0].arrival_ns <= x[1].arrival_ns));
        // First turns: system prompt + message; a later turn is a strict extension of an
        // earlier prompt by an answer (2 blocks) and a message (4 blocks).
        let by_prefix: std::collections::HashSet<&[u64]> =
            w.requests.iter().map(|r| r.blocks.as_slice()).collect();
        let (mut first, mut later) = (0, 0);
        for r in &w.requests {
            if r.blocks.len() == 32 + 4 {
                first += 1;
            } else {
                later += 1;
                assert!(
                    by_prefix.contains(&r.blocks[..r.blocks.len() - 6]),
                    "turn without its previous turn"
                );
                assert_eq!(r.input_tokens, r.blocks.len() as u32 * 16);
            }
        }
        // Sessions of 1..=7 turns, 4 on average.
        assert!((120..180).contains(&first), "{first} sessions");
        assert_eq!(first + later, 600);
        let systems: std::collections::BTreeSet<u64> = w.requests.iter().map(|r| r.blocks[0]).collect();
        assert_eq!(systems.len(), 2);
        // 600 turns at 10/s: about a minute of session starts, then the last turns' think time.
        let end_s = w.requests[599].arrival_ns as f64 / 1e9;
        assert!((45.0..120.0).contains(&end_s), "{end_s}");
    }

    #[test]
    fn mixed_has_the_asked_share_of_long_prompts() {
        let p = GeneratorParams {
            requests: 1_000,
            prefix_tokens: 0,
            question_tokens: 200,
            long_fraction: 0.25,
            long_tokens: 4_000,
            ..Default::default()
        };
        let w = mixed(&p, 2);
        assert_eq!(w, mixed(&p, 2));
        let long = w.requests.iter().filter(|r| r.input_tokens == 4_000).count();
        assert!((200..300).contains(&long), "{long}");
        assert!(
            w.requests
                .iter()
                .all(|r| r.input_tokens == 4_000 || r.input_tokens == 208)
        );
        assert_eq!(
            GeneratorParams {
                long_fraction: 1.5,
                ..p.clone()
            }
            .check()
            .unwrap_err(),
            "--long-fraction must be between 0 and 1, got 1.5"
        );
        assert_eq!(
            GeneratorParams {
                think_time: -1.0,
                ..p.clone()
            }
            .check()
            .unwrap_err(),
            "--think-time must be a non-negative number of seconds, got -1"
        );
        assert_eq!(p.check(), Ok(()));
    }
}
