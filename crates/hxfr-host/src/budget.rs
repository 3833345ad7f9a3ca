//! The host-wide budget for buffered pixels (`--max-buffered-mib`).
//!
//! Every inline frame takes its size from the budget before the host takes
//! it on, and gives it back once encoded. A connection that finds no room
//! waits, and while it waits it reads nothing more from its guest.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget, counted in KiB permits.
pub(crate) struct Budget {
    sem: Arc<Semaphore>,
    total_kib: u32,
    /// KiB held by shares (the semaphore also counts permits it has set
    /// aside for a waiter that is not served yet).
    granted: Arc<AtomicU64>,
    waiting: AtomicUsize,
}

/// How much of the budget is taken, for tests and the stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferGauge {
    /// Bytes taken from the budget (rounded up to KiB per message).
    pub in_use: u64,
    /// The budget, in bytes.
    pub limit: u64,
    /// Connections waiting for room (each has stopped reading its guest).
    pub waiting: usize,
}

/// Room in the budget; given back when dropped.
pub(crate) struct Share {
    _permit: OwnedSemaphorePermit,
    kib: u64,
    granted: Arc<AtomicU64>,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.granted.fetch_sub(self.kib, Ordering::Relaxed);
    }
}

impl Budget {
    pub fn new(bytes: u64) -> Budget {
        let total_kib = (bytes / 1024).clamp(1, Semaphore::MAX_PERMITS as u64).min(u32::MAX as u64) as u32;
        Budget {
            sem: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            granted: Arc::new(AtomicU64::new(0)),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Takes room for `bytes`, waiting while there is none. A request larger
    /// than the whole budget takes all of it and so runs alone. `None` only
    /// when the budget is closed (never, while the host runs).
    pub async fn take(&self, bytes: u64) -> Option<Share> {
        let kib = (bytes.div_ceil(1024).max(1)).min(self.total_kib as u64) as u32;
        let permit = match self.sem.clone().try_acquire_many_owned(kib) {
            Ok(p) => p,
            Err(_) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                // Counted down however the wait ends (also when the reader is dropped).
                let _waiting = scopeguard(&self.waiting);
                self.sem.clone().acquire_many_owned(kib).await.ok()?
            }
        };
        self.granted.fetch_add(kib as u64, Ordering::Relaxed);
        Some(Share { _permit: permit, kib: kib as u64, granted: self.granted.clone() })
    }

    pub fn gauge(&self) -> BufferGauge {
        BufferGauge {
            in_use: self.granted.load(Ordering::Relaxed) * 1024,
            limit: self.total_kib as u64 * 1024,
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }
}

/// Decrements the counter when dropped.
fn scopeguard(c: &AtomicUsize) -> impl Drop + '_ {
    struct Down<'a>(&'a AtomicUsize);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    Down(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_budget_makes_the_next_taker_wait() {
        let b = Arc::new(Budget::new(1 << 20));
        let first = b.take(900 << 10).await.unwrap();
        assert_eq!(b.gauge().in_use, 900 << 10);
        let b2 = b.clone();
        let second = tokio::spawn(async move { b2.take(900 << 10).await.map(drop) });
        while b.gauge().waiting == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!second.is_finished());
        drop(first);
        second.await.unwrap().unwrap();
        assert_eq!(b.gauge(), BufferGauge { in_use: 0, limit: 1 << 20, waiting: 0 });
        // Larger than the whole budget: takes all of it.
        let all = b.take(5 << 20).await.unwrap();
        assert_eq!(b.gauge().in_use, 1 << 20);
        drop(all);
    }
}
