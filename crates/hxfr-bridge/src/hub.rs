//! Access units fan out to viewers. Nobody waits for anybody: each viewer has
//! a bounded queue; one that falls behind has its queue emptied and skips to
//! the next keyframe, so a slow viewer costs neither latency for the others
//! nor memory. A new viewer starts at a keyframe, forced upstream and
//! coalesced when several viewers ask at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

/// Access units a viewer may have waiting (about a second at 30 fps).
pub const VIEWER_QUEUE: usize = 30;
/// Keyframe requests closer together than this are one request.
const KEYFRAME_COALESCE: Duration = Duration::from_millis(500);

/// One encoded access unit, ready to send.
#[derive(Debug)]
pub struct Unit {
    pub keyframe: bool,
    /// The whole WebSocket message (header + access unit).
    pub message: Bytes,
}

#[derive(Default)]
struct Queue {
    units: VecDeque<Arc<Unit>>,
    /// Dropping everything until the next keyframe.
    waiting_key: bool,
    closed: bool,
}

pub struct Viewer {
    queue: Mutex<Queue>,
    pub notify: Notify,
    pub skipped: AtomicU64,
}

impl Viewer {
    /// The units waiting, oldest first; `None` once the hub is gone.
    pub fn take(&self) -> Option<Vec<Arc<Unit>>> {
        let mut q = self.queue.lock().unwrap();
        if q.closed && q.units.is_empty() {
            return None;
        }
        Some(q.units.drain(..).collect())
    }
}

/// Asks the encoder for a keyframe.
pub type KeyframeFn = Box<dyn Fn() + Send + Sync>;

pub struct Hub {
    viewers: Mutex<Vec<Arc<Viewer>>>,
    last_key_request: Mutex<Option<Instant>>,
    request_keyframe: Mutex<Option<KeyframeFn>>,
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub keyframes: AtomicU64,
    pub keyframe_requests: AtomicU64,
    /// The stream's picture size when the source learns it from the stream
    /// itself (scanout push: the scanout's mode), `width << 32 | height`; 0
    /// while unknown, and for sources whose size is the configured one.
    size: AtomicU64,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            viewers: Mutex::new(Vec::new()),
            last_key_request: Mutex::new(None),
            request_keyframe: Mutex::new(None),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            keyframes: AtomicU64::new(0),
            keyframe_requests: AtomicU64::new(0),
            size: AtomicU64::new(0),
        }
    }
}

impl Hub {
    pub fn set_keyframe_fn(&self, f: KeyframeFn) {
        *self.request_keyframe.lock().unwrap() = Some(f);
    }

    /// Whether a keyframe request would go upstream now (none was asked for
    /// within the coalescing window).
    pub fn keyframe_request_open(&self) -> bool {
        !self.last_key_request.lock().unwrap().is_some_and(|t| t.elapsed() < KEYFRAME_COALESCE)
    }

    /// Asks upstream for a keyframe unless one was asked for just now.
    pub fn request_keyframe(&self) {
        let mut last = self.last_key_request.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < KEYFRAME_COALESCE) {
            return;
        }
        *last = Some(Instant::now());
        drop(last);
        self.keyframe_requests.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = &*self.request_keyframe.lock().unwrap() {
            f();
        }
    }

    /// Records the stream's picture size (see [`Hub::size`]).
    pub fn set_size(&self, width: u32, height: u32) {
        self.size.store((width as u64) << 32 | height as u64, Ordering::Relaxed);
    }

    /// The stream's picture size as last recorded, if any: what new viewers
    /// are told instead of the configured size.
    pub fn size(&self) -> Option<(u32, u32)> {
        let s = self.size.load(Ordering::Relaxed);
        (s != 0).then_some(((s >> 32) as u32, s as u32))
    }

    pub fn subscribe(&self) -> Arc<Viewer> {
        let v = Arc::new(Viewer {
            queue: Mutex::new(Queue { waiting_key: true, ..Default::default() }),
            notify: Notify::new(),
            skipped: AtomicU64::new(0),
        });
        self.viewers.lock().unwrap().push(v.clone());
        self.request_keyframe();
        v
    }

    pub fn unsubscribe(&self, v: &Arc<Viewer>) {
        self.viewers.lock().unwrap().retain(|x| !Arc::ptr_eq(x, v));
    }

    pub fn viewers(&self) -> usize {
        self.viewers.lock().unwrap().len()
    }

    /// (units queued, units skipped) for each viewer.
    pub fn viewer_stats(&self) -> Vec<(usize, u64)> {
        self.viewers
            .lock()
            .unwrap()
            .iter()
            .map(|v| (v.queue.lock().unwrap().units.len(), v.skipped.load(Ordering::Relaxed)))
            .collect()
    }

    /// Hands a unit to every viewer without waiting for any of them.
    pub fn publish(&self, unit: Unit) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(unit.message.len() as u64, Ordering::Relaxed);
        self.keyframes.fetch_add(unit.keyframe as u64, Ordering::Relaxed);
        let unit = Arc::new(unit);
        for v in self.viewers.lock().unwrap().iter() {
            let mut q = v.queue.lock().unwrap();
            if q.units.len() >= VIEWER_QUEUE {
                // Too far behind: start again from the next keyframe.
                v.skipped.fetch_add(q.units.len() as u64, Ordering::Relaxed);
                q.units.clear();
                q.waiting_key = true;
            }
            if q.waiting_key && !unit.keyframe {
                v.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            q.waiting_key = false;
            q.units.push_back(unit.clone());
            drop(q);
            v.notify.notify_one();
        }
    }

    /// Wakes every viewer for the end of the stream.
    pub fn close(&self) {
        for v in self.viewers.lock().unwrap().iter() {
            v.queue.lock().unwrap().closed = true;
            v.notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(keyframe: bool) -> Unit {
        Unit { keyframe, message: Bytes::from_static(b"x") }
    }

    #[test]
    fn a_new_viewer_starts_at_a_keyframe_and_asks_for_one_once() {
        let hub = Hub::default();
        let asked = Arc::new(AtomicU64::new(0));
        let a = asked.clone();
        hub.set_keyframe_fn(Box::new(move || {
            a.fetch_add(1, Ordering::Relaxed);
        }));
        let v1 = hub.subscribe();
        let _v2 = hub.subscribe();
        assert_eq!(asked.load(Ordering::Relaxed), 1, "two viewers joining at once: one request");
        hub.publish(unit(false));
        hub.publish(unit(true));
        hub.publish(unit(false));
        let got = v1.take().unwrap();
        assert_eq!(got.iter().map(|u| u.keyframe).collect::<Vec<_>>(), vec![true, false]);
    }

    #[test]
    fn a_stalled_viewer_is_bounded_and_skips_to_the_next_keyframe() {
        let hub = Hub::default();
        let slow = hub.subscribe();
        let fast = hub.subscribe();
        hub.publish(unit(true));
        for i in 0..200 {
            hub.publish(unit(i % 50 == 49));
            assert!(fast.take().is_some());
            assert!(slow.queue.lock().unwrap().units.len() <= VIEWER_QUEUE);
        }
        let got = slow.take().unwrap();
        assert!(got[0].keyframe, "after falling behind, a viewer resumes at a keyframe");
        assert!(slow.skipped.load(Ordering::Relaxed) > 0);
        assert_eq!(fast.skipped.load(Ordering::Relaxed), 0);
    }
}
