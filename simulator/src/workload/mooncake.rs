//! Reader for the Mooncake (FAST'25) JSONL traces: one request per line with `timestamp` (ms),
//! `input_length`, `output_length` and `hash_ids` (512-token blocks).

use serde::Deserialize;

use super::{TraceRequest, Workload};

/// Tokens per `hash_ids` block in the published traces.
pub const BLOCK_TOKENS: u32 = 512;

#[derive(Deserialize)]
struct Line {
    timestamp: u64,
    input_length: u32,
    output_length: u32,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

/// Parse a Mooncake trace.
///
/// # Errors
/// The first malformed line, with its number.
pub fn parse(name: &str, text: &str) -> Result<Workload, String> {
    let mut requests = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line).map_err(|e| format!("{name}:{}: {e}", i + 1))?;
        requests.push(TraceRequest {
            arrival_ns: l.timestamp.saturating_mul(1_000_000),
            input_tokens: l.input_length,
            output_tokens: l.output_length.max(1),
            blocks: l.hash_ids,
            adapter: None,
            tenant: None,
        });
    }
    // Stable: equal timestamps keep file order.
    Ok(Workload::by_arrival(name, BLOCK_TOKENS, requests))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lines_and_reports_the_bad_one() {
        let w = parse(
            "t.jsonl",
            "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [0, 1]}\n\
             {\"timestamp\": 27, \"input_length\": 10, \"output_length\": 0, \"hash_ids\": [0]}\n",
        )
        .unwrap();
        assert_eq!(w.requests.len(), 2);
        assert_eq!(w.requests[1].arrival_ns, 27_000_000);
        assert_eq!(
            w.requests[1].output_tokens, 1,
            "zero-length outputs generate one token"
        );
        let e = parse("t.jsonl", "{\"timestamp\": 0}\n{}\n").unwrap_err();
        assert!(e.starts_with("t.jsonl:1: missing field `input_length`"), "{e}");
    }
}
