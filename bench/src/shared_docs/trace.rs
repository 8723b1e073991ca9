//! The shared-docs trace: seeded documents of plain sentences, and questions about them arriving
//! as a Poisson process, drawn with the seeded `SmallRng` and the Poisson gaps the simulator's
//! generators use. The same seed gives the same documents, questions and arrival times, so
//! every configuration, real or simulated, answers the same trace.

use std::time::Duration;

use epp_sim::workload::exponential_gap_ns;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde_json::{Value, json};

use super::SharedDocsArgs;

/// A uniform index below `n` (0 when `n` is 0).
fn below(rng: &mut SmallRng, n: usize) -> usize {
    rng.random_range(0..n.max(1))
}

const WORDS: &[&str] = &[
    "river", "market", "engine", "harvest", "council", "winter", "bridge", "ledger", "garden", "signal",
    "copper", "harbor", "lantern", "meadow", "orchard", "pilot", "quarry", "rail", "summit", "timber",
    "valley", "whistle", "anchor", "barley", "canal", "dynamo", "ember", "falcon", "glacier", "hammer",
    "island", "juniper", "kettle", "lumber", "marble", "needle", "oyster", "pepper", "quilt", "ribbon",
    "saddle", "tunnel", "umbrella", "velvet", "wagon", "yarn", "zephyr", "archive", "beacon", "cellar",
    "delta", "estate", "fabric", "granite", "horizon", "inlet", "jasmine", "kiln", "lagoon", "mill",
];

const VERBS: &[&str] = &[
    "supplies", "measures", "protects", "records", "connects", "replaces", "inspects", "carries", "repairs",
    "divides", "follows", "surveys", "stores", "lights", "feeds", "guards",
];

/// Document `d`: a title, then numbered sections of plain sentences, about `tokens` long (one
/// sentence is about 14 tokens for Gemma's tokenizer). Documents differ from their first words.
pub(super) fn document(seed: u64, d: usize, tokens: usize) -> String {
    let mut rng = SmallRng::seed_from_u64(seed ^ (0xD0C0_0000 + d as u64).wrapping_mul(0x9E37_79B9));
    let mut text = format!(
        "Document {d}: the {} {} report.\n",
        WORDS[below(&mut rng, WORDS.len())],
        WORDS[below(&mut rng, WORDS.len())]
    );
    let sentences = tokens / 14;
    for s in 0..sentences {
        if s % 8 == 0 {
            text.push_str(&format!("\nSection {}.\n", s / 8 + 1));
        }
        text.push_str(&format!(
            "The {} {} the {} near the {} {}. ",
            WORDS[below(&mut rng, WORDS.len())],
            VERBS[below(&mut rng, VERBS.len())],
            WORDS[below(&mut rng, WORDS.len())],
            WORDS[below(&mut rng, WORDS.len())],
            below(&mut rng, 1000)
        ));
    }
    text
}

/// One request of the trace.
#[derive(Debug, Clone)]
pub(super) struct Arrival {
    /// When it is sent, from the start.
    pub(super) at: Duration,
    /// The document asked about.
    pub(super) doc: usize,
    /// The question.
    pub(super) question: String,
}

/// The seeded trace of `args`: Poisson arrivals, a uniformly chosen document and a question
/// about one of its sections each.
pub(super) fn trace(args: &SharedDocsArgs) -> Vec<Arrival> {
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let mut t_ns = 0u64;
    (0..args.requests)
        .map(|i| {
            t_ns = t_ns.saturating_add(exponential_gap_ns(&mut rng, args.rate.max(1e-6)));
            let doc = below(&mut rng, args.docs);
            let section = below(&mut rng, (args.doc_tokens / 96).max(1)) + 1;
            let word = WORDS[below(&mut rng, WORDS.len())];
            Arrival {
                at: Duration::from_nanos(t_ns),
                doc,
                question: format!(
                    "Question {i}: in one short sentence, what does section {section} say about the {word}?"
                ),
            }
        })
        .collect()
}

/// The chat messages of one request.
pub(super) fn messages(docs: &[String], a: &Arrival) -> Value {
    json!([
        {"role": "system", "content": format!("Answer from this document only.\n\n{}", docs[a.doc])},
        {"role": "user", "content": a.question},
    ])
}
