//! The process-wide budget for request-body bytes the EPP holds while it reads them.
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
