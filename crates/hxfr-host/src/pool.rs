//! Recycled payload buffers: a connection's large messages (inline frames)
//! are read straight into buffers that come back when the frame is encoded.
//!
//! A fresh buffer per frame costs the host a page fault and the kernel's
//! zeroing of every page (8,100 of them for a 4K BGRx frame), and growing
//! one as the bytes arrive copies what came so far. A recycled buffer has
//! its pages mapped already and is never grown or zeroed.
//!
//! Every buffer holds its share of the host's budget (`--max-buffered-mib`)
//! for as long as it exists, in use or kept here, so the budget still bounds
//! all the memory guests make the host hold. Kept buffers go back to the
//! budget when anyone waits for room in it, when the connection has sent
//! nothing for [`KEEP_IDLE`], and when it ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::budget::{Budget, Share};

/// Buffers a connection keeps between frames (frames in flight come back in turn).
const KEEP: usize = 3;
/// A connection that sends nothing for this long gives its kept buffers back.
pub(crate) const KEEP_IDLE: Duration = Duration::from_secs(1);

/// A payload buffer with room for `capacity` bytes, and the share of the
/// budget that pays for them.
pub(crate) struct Buffer {
    pub bytes: Vec<u8>,
    _share: Share,
}

impl Buffer {
    /// A new buffer for `size` bytes, paid for by `share` (taken for `size`).
    /// Its pages are only reserved, not touched: they cost memory as the
    /// bytes arrive.
    pub fn new(size: usize, share: Share) -> Buffer {
        Buffer { bytes: Vec::with_capacity(size), _share: share }
    }
}

/// One connection's kept buffers.
pub(crate) struct Pool {
    budget: Arc<Budget>,
    kept: Mutex<Vec<Buffer>>,
    /// Buffers out of the pool (frames not yet encoded): they come back.
    lent: AtomicUsize,
}

impl Pool {
    pub fn new(budget: Arc<Budget>) -> Arc<Pool> {
        Arc::new(Pool { budget, kept: Mutex::new(Vec::new()), lent: AtomicUsize::new(0) })
    }

    /// A kept buffer with room for `size` bytes (and not more than twice
    /// that), emptied; `None` when there is none, or when others wait for
    /// room in the budget (then every kept buffer goes back to it, and this
    /// connection queues for room like the rest).
    pub fn take(&self, size: usize) -> Option<Buffer> {
        let mut kept = self.kept.lock().unwrap();
        if self.budget.gauge().waiting > 0 {
            kept.clear();
            return None;
        }
        // The most recently returned first: a frame size that stopped being
        // used ages out from the front.
        let i = kept.iter().rposition(|b| b.bytes.capacity() >= size && b.bytes.capacity() / 2 <= size)?;
        let mut b = kept.remove(i);
        b.bytes.clear();
        Some(b)
    }

    /// Gives every kept buffer back to the budget.
    pub fn clear(&self) {
        self.kept.lock().unwrap().clear();
    }

    pub fn is_empty(&self) -> bool {
        self.kept.lock().unwrap().is_empty()
    }

    /// True when a buffer is kept here or will come back here.
    pub fn holds_any(&self) -> bool {
        self.lent.load(Ordering::Relaxed) > 0 || !self.is_empty()
    }

    fn give(&self, b: Buffer) {
        if self.budget.gauge().waiting > 0 {
            return; // dropped: its room goes to whoever waits
        }
        let mut kept = self.kept.lock().unwrap();
        kept.push(b);
        if kept.len() > KEEP {
            kept.remove(0);
        }
    }

    /// `b`'s bytes as `Bytes` that return the buffer here when the last
    /// clone is dropped.
    pub fn freeze(self: &Arc<Pool>, b: Buffer) -> Bytes {
        self.lent.fetch_add(1, Ordering::Relaxed);
        Bytes::from_owner(Lent { buf: Some(b), pool: self.clone() })
    }
}

/// A buffer out of its pool, as the owner behind `Bytes`.
struct Lent {
    buf: Option<Buffer>,
    pool: Arc<Pool>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b.bytes[..])
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give(b);
        }
        self.pool.lent.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_come_back_with_their_share_and_leave_when_others_wait() {
        let budget = Arc::new(Budget::new(4 << 20));
        let pool = Pool::new(budget.clone());
        assert!(pool.take(1 << 20).is_none());
        let mut b = Buffer::new(1 << 20, budget.take(1 << 20).await.unwrap());
        b.bytes.extend_from_slice(&[7u8; 1 << 20]);
        let ptr = b.bytes.as_ptr();
        let bytes = pool.freeze(b);
        let clone = bytes.clone();
        drop(bytes);
        assert!(pool.is_empty() && pool.holds_any(), "still lent while a clone lives");
        assert_eq!(clone[12345], 7);
        drop(clone);
        assert!(!pool.is_empty());
        assert_eq!(budget.gauge().in_use, 1 << 20, "a kept buffer keeps its share");
        assert!(pool.take(3 << 20).is_none(), "too small");
        assert!(pool.take(1 << 18).is_none(), "more than twice too large");
        let again = pool.take(900 << 10).unwrap();
        assert_eq!((again.bytes.as_ptr(), again.bytes.len()), (ptr, 0), "the same memory, emptied");
        pool.give(again);

        // Someone waits for room: kept buffers go back to the budget.
        let b2 = budget.clone();
        let waiter = tokio::spawn(async move { b2.take(4 << 20).await.map(drop) });
        while budget.gauge().waiting == 0 {
            tokio::task::yield_now().await;
        }
        assert!(pool.take(1 << 20).is_none());
        waiter.await.unwrap().unwrap();
        assert_eq!(budget.gauge().in_use, 0);
    }
}
