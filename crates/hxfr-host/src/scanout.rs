//! The VM's displays, for scanout push mode (SUBSCRIBE).
//!
//! The seam the host's GPU device plugs in behind, as [`ResourceResolver`]
//! is for frames by resource id: a [`ScanoutSource`] says when a scanout
//! flipped (a [`watch`] channel of [`Flip`]s: newest wins, so a burst of
//! flips while the encoder is busy costs one encode) and hands out the
//! scanout's current pixels when the encoder gets to them. `push.rs` does
//! the rest: one encoder per scanout, its access units fanned out to every
//! subscriber.
//!
//! [`ResourceResolver`]: crate::ResourceResolver

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::resolver::{Peer, ResolveError, Resolved};

/// A scanout changed: the guest flushed it (RESOURCE_FLUSH) or pointed it at
/// another resource (SET_SCANOUT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flip {
    /// Counts the scanout's flips, from 0 for "none yet". Only its changes
    /// matter to the host.
    pub seq: u64,
    /// When it happened: `CLOCK_MONOTONIC` in nanoseconds on the host
    /// ([`monotonic_ns`]). Pushed frames carry it as their pts.
    pub at_ns: u64,
}

/// A VM's scanouts (its GPU device's displays), for subscribers.
///
/// Implemented by the host's virtio-gpu device; [`MemoryScanouts`] is the
/// test double. Without one (`HostConfig::scanouts` is `None`), SUBSCRIBE
/// is answered with `success = 0`.
pub trait ScanoutSource: Send + Sync {
    /// The flips of `scanout_id`, or `None` when this VM has no such
    /// scanout. The receiver's current value is the latest flip; the host
    /// waits for it to change. Receivers of one scanout must come from one
    /// sender (`watch::Sender::subscribe`): that is how the host knows two
    /// subscribers want the same pictures and gives them one encoder. The
    /// sender dropped means the scanout is gone: its subscribers' streams
    /// end.
    fn watch(&self, scanout_id: u32) -> Option<watch::Receiver<Flip>>;

    /// The pixels `scanout_id` shows now, as the encoder is about to read
    /// them (on the encoder's thread; the `Bytes` keeps them valid while the
    /// encoder reads). An error (nothing shown yet, an unsupported format)
    /// skips this encode; the next flip tries again.
    fn picture(&self, scanout_id: u32) -> Result<Resolved, ResolveError>;

    /// The scanouts one connection may subscribe to: a host serving several
    /// VMs gives each connection its own VM's. Called once when the
    /// connection starts; `None` (the default) means this source serves
    /// every connection as it is.
    fn scope(&self, _peer: Peer<'_>) -> Option<Arc<dyn ScanoutSource>> {
        None
    }

    /// ENABLE_SCANOUT: makes `scanout_id` a connected display of
    /// `width`x`height` in the guest (which then sets a mode on it), and
    /// names its connector; or says why it cannot. The default: this source
    /// cannot hot-plug.
    fn enable(&self, _scanout_id: u32, _width: u32, _height: u32) -> Enabling<'_> {
        Box::pin(async { Err("this host cannot hot-plug displays".to_string()) })
    }

    /// DISABLE_SCANOUT: unplugs it (the guest stops showing anything there,
    /// and its subscribers' streams end). Nothing is answered.
    fn disable(&self, _scanout_id: u32) -> Enabling<'_> {
        Box::pin(async { Err("this host cannot hot-plug displays".to_string()) })
    }
}

/// What [`ScanoutSource::enable`] promises: the connector's name, or why not.
pub type Enabling<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + 'a>>;

/// The host's `CLOCK_MONOTONIC` in nanoseconds: the clock of [`Flip::at_ns`]
/// and so of every pushed frame's pts.
pub fn monotonic_ns() -> u64 {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
    #[cfg(not(unix))]
    {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        EPOCH.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
    }
}

/// Scanouts held in memory, flipped by the caller: the test double for the
/// seam (and a reference for real sources).
#[derive(Default)]
pub struct MemoryScanouts {
    scanouts: Mutex<HashMap<u32, Shown>>,
}

struct Shown {
    flips: watch::Sender<Flip>,
    picture: Option<Resolved>,
}

impl MemoryScanouts {
    /// Enables `scanout_id`, showing nothing yet (it can be subscribed to;
    /// frames come with its first flip).
    pub fn add(&self, scanout_id: u32) {
        let (flips, _) = watch::channel(Flip::default());
        self.scanouts.lock().unwrap().insert(scanout_id, Shown { flips, picture: None });
    }

    /// The guest shows `picture` on `scanout_id` now (adding the scanout if
    /// need be). Returns the flip, with the time it happened.
    pub fn flip(&self, scanout_id: u32, picture: Resolved) -> Flip {
        let mut all = self.scanouts.lock().unwrap();
        let shown =
            all.entry(scanout_id).or_insert_with(|| Shown { flips: watch::channel(Flip::default()).0, picture: None });
        shown.picture = Some(picture);
        let flip = Flip { seq: shown.flips.borrow().seq + 1, at_ns: monotonic_ns() };
        shown.flips.send_replace(flip);
        flip
    }

    /// Disables `scanout_id`: its subscribers' streams end.
    pub fn remove(&self, scanout_id: u32) {
        self.scanouts.lock().unwrap().remove(&scanout_id);
    }
}

impl ScanoutSource for MemoryScanouts {
    fn watch(&self, scanout_id: u32) -> Option<watch::Receiver<Flip>> {
        self.scanouts.lock().unwrap().get(&scanout_id).map(|s| s.flips.subscribe())
    }

    fn picture(&self, scanout_id: u32) -> Result<Resolved, ResolveError> {
        let all = self.scanouts.lock().unwrap();
        match all.get(&scanout_id) {
            Some(Shown { picture: Some(p), .. }) => Ok(p.clone()),
            Some(_) => Err(ResolveError::Unusable { id: scanout_id, why: "scanout shows nothing yet".into() }),
            None => Err(ResolveError::NotFound(scanout_id)),
        }
    }
}

/// Each connection watches its own VM's scanouts only ([`crate::Vms`]); a
/// connection bound to no VM sees none (SUBSCRIBE answered success = 0).
pub struct VmScanouts(pub crate::Vms<dyn ScanoutSource>);

/// What a connection bound to no VM may watch: nothing.
struct NoScanouts;

impl ScanoutSource for NoScanouts {
    fn watch(&self, _scanout_id: u32) -> Option<watch::Receiver<Flip>> {
        None
    }
    fn picture(&self, scanout_id: u32) -> Result<Resolved, ResolveError> {
        Err(ResolveError::NotFound(scanout_id))
    }
}

impl ScanoutSource for VmScanouts {
    fn watch(&self, _scanout_id: u32) -> Option<watch::Receiver<Flip>> {
        None // only reached unscoped, which `scope` never leaves a connection
    }
    fn picture(&self, scanout_id: u32) -> Result<Resolved, ResolveError> {
        Err(ResolveError::NotFound(scanout_id))
    }
    fn scope(&self, peer: Peer<'_>) -> Option<Arc<dyn ScanoutSource>> {
        Some(match self.0.of(peer) {
            Ok(vm) => vm.clone(),
            Err(_) => Arc::new(NoScanouts),
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use hxfr_proto::{Layout, PixelFormat};

    use super::*;

    fn pic(v: u8) -> Resolved {
        Resolved { data: Bytes::from(vec![v; 16]), layout: Layout::inline(PixelFormat::Bgrx, 2, 2, 8) }
    }

    #[test]
    fn flips_count_and_the_newest_picture_wins() {
        let s = MemoryScanouts::default();
        assert!(s.watch(3).is_none());
        s.add(3);
        let mut rx = s.watch(3).unwrap();
        assert!(s.picture(3).is_err(), "nothing shown yet");
        let a = s.flip(3, pic(1));
        let b = s.flip(3, pic(2));
        assert!(rx.has_changed().unwrap());
        assert_eq!((a.seq, b.seq), (1, 2));
        assert!(b.at_ns >= a.at_ns && a.at_ns > 0);
        assert_eq!(*rx.borrow_and_update(), b, "newest wins");
        assert_eq!(s.picture(3).unwrap().data[0], 2);
        assert!(rx.same_channel(&s.watch(3).unwrap()));
        s.remove(3);
        assert!(rx.has_changed().is_err(), "a removed scanout closes its channel");
    }
}
