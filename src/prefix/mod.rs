//! Prefix-cache awareness: prompts are cut into blocks and hashed as a chain ([`hash`]); an
//! approximate index remembers which endpoint was sent which blocks ([`index`]).
//!
//! Pure: no clock, no I/O; the index is a plain in-memory structure behind a short lock.

pub mod hash;
pub mod index;

pub use hash::{BlockHash, BlockingParams, block_hashes};
pub use index::PrefixIndex;
