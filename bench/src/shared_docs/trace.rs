//! The shared-docs trace: seeded documents of plain sentences, and questions about them arriving
//! as a Poisson process. The same seed gives the same documents, questions and arrival times, so
//! every configuration, real or simulated, answers the same trace.

use std::time::Duration;

use serde_json::{Value, json};

use super::SharedDocsArgs;

/// SplitMix64: a small, well-mixed seeded generator, enough for workloads.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
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
    let mut rng = Rng(seed ^ (0xD0C0_0000 + d as u64).wrapping_mul(0x9E37_79B9));
    let mut text = format!(
        "Document {d}: the {} {} report.\n",
        WORDS[rng.below(WORDS.len())],
        WORDS[rng.below(WORDS.len())]
    );
    let sentences = tokens / 14;
    for s in 0..sentences {
        if s % 8 == 0 {
            text.push_str(&format!("\nSection {}.\n", s / 8 + 1));
        }
        text.push_str(&format!(
            "The {} {} the {} near the {} {}. ",
            WORDS[rng.below(WORDS.len())],
            VERBS[rng.below(VERBS.len())],
            WORDS[rng.below(WORDS.len())],
            WORDS[rng.below(WORDS.len())],
            rng.below(1000)
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
    let mut rng = Rng(args.seed);
    let mut t = 0.0;
    (0..args.requests)
        .map(|i| {
            t += -rng.unit().ln() / args.rate.max(1e-6);
            let doc = rng.below(args.docs);
            let section = rng.below((args.doc_tokens / 96).max(1)) + 1;
            let word = WORDS[rng.below(WORDS.len())];
            Arrival {
                at: Duration::from_secs_f64(t),
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
