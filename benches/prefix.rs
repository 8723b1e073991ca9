//! The approximate prefix index: match and insert of a 256-block prompt, and memory per
//! (block, endpoint) entry with 100 endpoints filled to the default capacity (31,250 blocks each).
//!
//! Run: `cargo bench --bench prefix`. The memory figures are printed before the timings.
//! Results and machine: benches/README.md.

#![allow(clippy::unwrap_used, reason = "bench setup")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use epp::{
    datastore::EndpointUid,
    prefix::{BlockHash, PrefixIndex},
};

const CAPACITY: usize = 31_250;
const ENDPOINTS: u32 = 100;

fn blocks(seed: u64, n: usize) -> Vec<BlockHash> {
    (0..n as u64)
        .map(|i| BlockHash((seed * 1_000_003 + i).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .collect()
}

fn filled() -> PrefixIndex {
    let idx = PrefixIndex::new();
    let mut seed = 0;
    for uid in 0..ENDPOINTS {
        for _ in 0..CAPACITY / 256 + 1 {
            seed += 1;
            idx.insert(EndpointUid(uid), &blocks(seed, 256), CAPACITY);
        }
    }
    idx
}

fn bench_prefix(c: &mut Criterion) {
    let idx = filled();
    let entries = idx.entries();
    let bytes = idx.allocated_bytes();
    eprintln!(
        "prefix index: {ENDPOINTS} endpoints x {CAPACITY} blocks: {entries} entries, {:.1} MiB, {:.1} bytes per entry",
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / entries as f64
    );
    // A prompt whose first 128 blocks endpoint 7 holds.
    let mut prompt = Vec::new();
    idx.insert(EndpointUid(7), &blocks(9_999_999, 128), CAPACITY);
    prompt.extend(blocks(9_999_999, 128));
    prompt.extend(blocks(8_888_888, 128));
    let mut out = Vec::new();
    c.bench_function("prefix_match_256_blocks", |b| {
        b.iter(|| {
            idx.match_blocks(black_box(&prompt), &mut out);
            black_box(&out);
        })
    });
    let mut seed = 50_000_000u64;
    c.bench_function("prefix_insert_256_blocks_full_endpoint", |b| {
        b.iter(|| {
            seed += 1;
            idx.insert(
                EndpointUid((seed % u64::from(ENDPOINTS)) as u32),
                &blocks(seed, 256),
                CAPACITY,
            );
        })
    });
}

criterion_group!(benches, bench_prefix);
criterion_main!(benches);
