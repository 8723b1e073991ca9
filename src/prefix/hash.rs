//! Prompt → chained block hashes.
//!
//! The algorithm is the upstream approximate prefix cache's: xxHash64 with seed 0,
//! `h0 = xxh64(model ‖ cache_salt)`, then for each block `h_i = xxh64(block ‖ le_u64(h_{i-1}))`,
//! a trailing partial block included. Chaining makes each hash stand for the whole prefix up to its
//! block, so equal hashes mean equal prefixes (up to collisions), and the model and salt keep
//! tenants and models apart.

use xxhash_rust::xxh64::{Xxh64, xxh64};

/// Hash of a prompt prefix ending at one block boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// How prompts are cut into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockingParams {
    /// Bytes per block (tokens per block × 4).
    pub block_bytes: usize,
    /// At most this many blocks are hashed (the rest of a long prompt is ignored).
    pub max_blocks: usize,
}

/// Append the chained block hashes of `prompt` to `out` (cleared first). A prompt shorter than one
/// block yields no hashes, as upstream: there is nothing worth matching.
pub fn block_hashes(
    model: &str,
    cache_salt: Option<&str>,
    prompt: &[u8],
    params: BlockingParams,
    out: &mut Vec<BlockHash>,
) {
    out.clear();
    let block = params.block_bytes.max(1);
    if prompt.len() < block || params.max_blocks == 0 {
        return;
    }
    let limit = prompt.len().min(block.saturating_mul(params.max_blocks));
    let prompt = &prompt[..limit];

    let mut seed = Xxh64::new(0);
    seed.update(model.as_bytes());
    if let Some(salt) = cache_salt {
        seed.update(salt.as_bytes());
    }
    let mut prev = seed.digest();
    out.reserve(prompt.len().div_ceil(block));
    for chunk in prompt.chunks(block) {
        let mut h = Xxh64::new(0);
        h.update(chunk);
        h.update(&prev.to_le_bytes());
        prev = h.digest();
        out.push(BlockHash(prev));
    }
}

/// xxHash64 of a byte string with seed 0 (exposed for tests and tools).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    xxh64(bytes, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_TOKEN: BlockingParams = BlockingParams {
        block_bytes: 4,
        max_blocks: 256,
    };

    #[test]
    fn upstream_vectors() {
        let mut out = Vec::new();
        block_hashes("m", None, b"aaaabbbb", ONE_TOKEN, &mut out);
        assert_eq!(out.len(), 2);
        block_hashes("m", None, b"aaaaaa", ONE_TOKEN, &mut out);
        assert_eq!(out.len(), 2, "one full block plus a partial one");
        block_hashes("m", None, b"aaa", ONE_TOKEN, &mut out);
        assert!(out.is_empty(), "shorter than a block: no hashes");
        let three = BlockingParams {
            block_bytes: 4,
            max_blocks: 3,
        };
        block_hashes("m", None, b"aaaabbbbccccdddd", three, &mut out);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn chain_matches_the_definition() {
        let mut out = Vec::new();
        block_hashes("model", Some("salt"), b"abcdefgh", ONE_TOKEN, &mut out);
        let h0 = hash_bytes(b"modelsalt");
        let mut b1 = b"abcd".to_vec();
        b1.extend_from_slice(&h0.to_le_bytes());
        let h1 = hash_bytes(&b1);
        let mut b2 = b"efgh".to_vec();
        b2.extend_from_slice(&h1.to_le_bytes());
        assert_eq!(out, vec![BlockHash(h1), BlockHash(hash_bytes(&b2))]);
    }

    #[test]
    fn shared_prefix_shares_hashes_and_salt_separates() {
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        block_hashes("m", None, b"aaaabbbbcccc", ONE_TOKEN, &mut a);
        block_hashes("m", None, b"aaaabbbbdddd", ONE_TOKEN, &mut b);
        block_hashes("m", Some("t2"), b"aaaabbbbcccc", ONE_TOKEN, &mut c);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        assert_ne!(a[0], c[0]);
    }
}
