//! The process-wide budget for request-body bytes the EPP holds while it reads them, and the
//! body as it is held (`BodyPieces`).
//!
//! A body is held from its first piece until the request is routed (it is parsed whole, then
//! sent back to the proxy). The per-stream cap (`MAX_REQUEST_BODY_BYTES`) bounds one stream, not
//! the process: many concurrent large bodies, or one body sent as tiny frames (each kept piece
//! costs its bookkeeping as well as its bytes), could otherwise take gigabytes. Every held byte is
//! charged here as it arrives, with a fixed overhead per kept piece, and given back when the
//! request has been routed or the stream ends; a piece that would pass the limit is refused, and
//! its request is answered 503 with `retry-after` (the memory frees as soon as other requests are
//! routed, usually within milliseconds).
//!
//! Invariant: `held` is the sum of the live [`BodyCharge`]s; each charge returns exactly what it
//! took, once (on [`BodyCharge::release`] or drop).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use super::wire::BODY_CHUNK_BYTES;

/// Bytes charged per kept piece on top of its capacity: the `Vec` header (24 bytes) in the list
/// of pieces, and the allocator's bookkeeping and rounding of a small allocation (~24 bytes).
pub const PIECE_OVERHEAD_BYTES: usize = 48;

/// The default budget (`--max-buffered-body-bytes`): 1 GiB, sixteen maximum-size bodies at once.
pub const DEFAULT_BODY_MEMORY_BYTES: u64 = 1 << 30;

/// The process-wide budget.
#[derive(Debug)]
pub struct BodyMemory {
    limit: usize,
    held: AtomicUsize,
}

impl BodyMemory {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: AtomicUsize::new(0),
        })
    }

    /// Bytes held now, by every stream.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// A charge holding nothing yet.
    pub fn charge(self: &Arc<Self>) -> BodyCharge {
        BodyCharge {
            memory: self.clone(),
            bytes: 0,
        }
    }
}

/// The bytes one stream holds against the budget, given back when dropped.
#[derive(Debug)]
pub struct BodyCharge {
    memory: Arc<BodyMemory>,
    bytes: usize,
}

/// The budget has no room for the bytes asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyMemoryExhausted {
    /// The budget's limit.
    pub limit: usize,
}

impl BodyCharge {
    /// Take `more` bytes, if the budget has room for them.
    ///
    /// # Errors
    /// [`BodyMemoryExhausted`] when holding them would pass the limit (nothing is taken).
    pub fn grow(&mut self, more: usize) -> Result<(), BodyMemoryExhausted> {
        let memory = &self.memory;
        memory
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(more).filter(|&total| total <= memory.limit)
            })
            .map_err(|_| BodyMemoryExhausted { limit: memory.limit })?;
        self.bytes += more;
        Ok(())
    }

    /// Bytes this charge holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Give back everything this charge holds (the body was routed and dropped).
    pub fn release(&mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        if bytes > 0 {
            self.memory.held.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

impl Drop for BodyCharge {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_refused_past_the_limit_and_given_back_once() {
        let memory = BodyMemory::new(100);
        let mut a = memory.charge();
        let mut b = memory.charge();
        assert_eq!(a.grow(60), Ok(()));
        assert_eq!(b.grow(41), Err(BodyMemoryExhausted { limit: 100 }));
        assert_eq!(
            (memory.held(), b.bytes()),
            (60, 0),
            "a refused charge takes nothing"
        );
        assert_eq!(b.grow(40), Ok(()));
        assert_eq!(memory.held(), 100);
        a.release();
        a.release();
        assert_eq!(memory.held(), 40);
        drop(b);
        assert_eq!(memory.held(), 0);
        drop(a);
        assert_eq!(memory.held(), 0);
    }

    #[test]
    fn a_charge_past_usize_is_refused_not_wrapped() {
        let memory = BodyMemory::new(usize::MAX);
        let mut a = memory.charge();
        assert_eq!(a.grow(usize::MAX), Ok(()));
        assert!(memory.charge().grow(1).is_err());
    }
}

/// The request body as received: kept in the pieces it came in, so that an unchanged body is
/// re-emitted without copying, and joined once (exactly sized) for parsing. Every byte held is
/// charged to the process-wide [`BodyMemory`].
pub(crate) struct BodyPieces {
    pieces: Vec<Vec<u8>>,
    len: usize,
    charge: BodyCharge,
}

/// A piece below this size is copied onto the end of the previous one (while that stays within
/// one re-emitted chunk) instead of being kept alone: a body sent as one-byte frames would
/// otherwise cost about fifty bytes of bookkeeping per byte.
const COALESCE_BELOW_BYTES: usize = 16 << 10;

impl BodyPieces {
    pub(crate) fn new(charge: BodyCharge) -> Self {
        Self {
            pieces: Vec::new(),
            len: 0,
            charge,
        }
    }

    /// Keep `piece`, charged to the budget.
    pub(crate) fn push(&mut self, piece: Vec<u8>) -> Result<(), BodyMemoryExhausted> {
        if piece.is_empty() {
            return Ok(());
        }
        let n = piece.len();
        match self.pieces.last_mut() {
            Some(last) if n < COALESCE_BELOW_BYTES && last.len() + n <= BODY_CHUNK_BYTES => {
                let needed = last.len() + n;
                if needed > last.capacity() {
                    // Doubling (as `Vec` would), charged before it happens, capped at one chunk.
                    let grown = (last.capacity() * 2).clamp(needed, BODY_CHUNK_BYTES);
                    self.charge.grow(grown - last.capacity())?;
                    last.reserve_exact(grown - last.len());
                }
                last.extend_from_slice(&piece);
            }
            _ => {
                self.charge.grow(piece.capacity() + PIECE_OVERHEAD_BYTES)?;
                self.pieces.push(piece);
            }
        }
        self.len += n;
        Ok(())
    }

    /// Bytes held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Give the bytes back to the budget (the body has been routed).
    pub(crate) fn release(&mut self) {
        self.charge.release();
    }

    /// The whole body, and the pieces it came in when there were several (the joined copy is
    /// charged as well).
    pub(crate) fn join(&mut self) -> Result<(Vec<u8>, Vec<Vec<u8>>), BodyMemoryExhausted> {
        let mut pieces = std::mem::take(&mut self.pieces);
        if pieces.len() <= 1 {
            return Ok((pieces.pop().unwrap_or_default(), pieces));
        }
        self.charge.grow(self.len)?;
        let mut joined = Vec::with_capacity(self.len);
        for piece in &pieces {
            joined.extend_from_slice(piece);
        }
        Ok((joined, pieces))
    }
}

#[cfg(test)]
mod pieces_tests {
    use super::*;

    /// Regression (robustness issue, item 2): a body sent as one-byte frames cost 43–61 bytes of
    /// memory per body byte, one kept piece each; tiny pieces now join the previous one.
    #[test]
    fn one_byte_pieces_are_coalesced_and_charged_near_their_size() {
        let memory = BodyMemory::new(1 << 30);
        let mut body = BodyPieces::new(memory.charge());
        for i in 0..100_000u32 {
            body.push(vec![b'a' + (i % 26) as u8]).unwrap();
        }
        assert_eq!(body.len, 100_000);
        assert_eq!(body.pieces.len(), 2, "62,000 + 38,000 bytes");
        assert!(body.pieces.iter().all(|p| p.len() <= BODY_CHUNK_BYTES));
        // Capacity grows by doubling, at most one chunk per piece, plus one overhead per piece.
        assert!(
            memory.held() <= 2 * BODY_CHUNK_BYTES + 2 * PIECE_OVERHEAD_BYTES,
            "{}",
            memory.held()
        );
        let (joined, pieces) = body.join().unwrap();
        assert_eq!(joined.len(), 100_000);
        assert!(
            joined
                .iter()
                .enumerate()
                .all(|(i, b)| *b == b'a' + (i % 26) as u8)
        );
        assert_eq!(pieces.iter().map(Vec::len).sum::<usize>(), 100_000);
        drop(body);
        assert_eq!(memory.held(), 0, "every byte given back");
    }

    #[test]
    fn large_pieces_are_kept_as_they_came_and_the_join_is_charged() {
        let memory = BodyMemory::new(1 << 30);
        let mut body = BodyPieces::new(memory.charge());
        body.push(vec![1; 65_536]).unwrap();
        body.push(vec![2; 20_000]).unwrap();
        body.push(vec![3; 100]).unwrap(); // joins the 20,000-byte piece
        assert_eq!(
            body.pieces.iter().map(Vec::len).collect::<Vec<_>>(),
            [65_536, 20_100]
        );
        let before = memory.held();
        let (joined, _) = body.join().unwrap();
        assert_eq!(memory.held(), before + joined.len());
        body.charge.release();
        assert_eq!(memory.held(), 0);
    }

    #[test]
    fn a_piece_past_the_budget_is_refused_and_nothing_is_kept() {
        let memory = BodyMemory::new(50_000);
        let mut body = BodyPieces::new(memory.charge());
        assert_eq!(
            body.push(vec![0; 60_000]),
            Err(BodyMemoryExhausted { limit: 50_000 })
        );
        assert_eq!((body.len, body.pieces.len(), memory.held()), (0, 0, 0));
    }
}
