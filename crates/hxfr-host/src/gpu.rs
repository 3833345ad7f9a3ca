//! Frames by resource id from the host's own virtio-gpu device.
//!
//! With `hxfr host --vhost-user-gpu`, the host is the VM's GPU
//! ([`hxfr_virtio_gpu`]): it owns every resource and the guest pages behind
//! it. This resolver reads a resource's current pixels from those pages when
//! its frame is about to be encoded, in place when the backing is contiguous
//! in the host's mapping (zero copy), otherwise row by row into one buffer.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hxfr_proto::{Fourcc, Layout, PixelFormat};
use hxfr_virtio_gpu::protocol::{MAX_SCANOUTS, Rect};
pub use hxfr_virtio_gpu::{Config, GpuDevice};
use hxfr_virtio_gpu::{Resources, ScanoutEvent, SnapshotError};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::qemu_display::QemuDisplay;
use crate::resolver::{ResolveError, Resolved, ResourceResolver};
use crate::scanout::{Enabling, Flip, ScanoutSource, monotonic_ns};

/// One VM's GPU device, as a [`ResourceResolver`].
#[derive(Clone)]
pub struct GpuResolver {
    resources: Resources,
}

impl GpuResolver {
    pub fn new(resources: Resources) -> GpuResolver {
        GpuResolver { resources }
    }
}

impl ResourceResolver for GpuResolver {
    fn resolve(&self, resource_id: u32) -> Result<Resolved, ResolveError> {
        let px = self.resources.snapshot(resource_id).map_err(|e| match e {
            SnapshotError::NotFound(id) => ResolveError::NotFound(id),
            other => ResolveError::Unusable { id: resource_id, why: other.to_string() },
        })?;
        let format = PixelFormat::from_fourcc(Fourcc(px.drm_fourcc())).ok_or_else(|| ResolveError::Unusable {
            id: resource_id,
            why: format!("its format {:?} is not one the encoder takes (B8G8R8X8/A8 or R8G8B8X8/A8)", px.format()),
        })?;
        let layout = Layout::inline(format, px.width(), px.height(), px.stride());
        // The pixels (and the guest mapping they may point into) live as long
        // as the encoder holds the Bytes.
        Ok(Resolved { data: Bytes::from_owner(px), layout })
    }
}

/// Serves QEMU's `vhost-user-gpu-pci` on `socket` from a thread of its own,
/// for as long as the process lives: one VMM connection at a time, and when
/// it goes (VM stopped, reset or QEMU restarted) the device starts empty
/// for the next. Returns once the socket listens, so QEMU can be started,
/// or the error if it cannot listen.
pub fn spawn_device(name: &str, socket: &Path, config: Config) -> Result<GpuDevice, String> {
    // The listener replaces a stale socket file; a live one is another
    // device's (a second `hxfr host`), which QEMU is talking to: leave it.
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(format!("vhost-user-gpu {name}: {} is served by another process", socket.display()));
    }
    let device = GpuDevice::new(config);
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    let (dev, path, label) = (device.clone(), socket.to_owned(), name.to_owned());
    let spawned = std::thread::Builder::new().name(format!("vhost-user-gpu-{name}")).spawn(move || {
        let listening = Arc::new(AtomicBool::new(false));
        let mut backoff = Duration::from_millis(100);
        loop {
            let (ready, flag) = (ready_tx.clone(), listening.clone());
            let started = Instant::now();
            let served = dev.serve(&path, move || {
                if !flag.swap(true, Ordering::Relaxed) {
                    let _ = ready.try_send(Ok(()));
                }
            });
            match served {
                Ok(()) => info!(vm = %label, "vhost-user-gpu: the VMM left; waiting for it on {}", path.display()),
                // Never listened: the caller hears why, and nothing keeps running.
                Err(e) if !listening.load(Ordering::Relaxed) => {
                    let _ = ready_tx.try_send(Err(e.to_string()));
                    return;
                }
                Err(e) => warn!(vm = %label, "vhost-user-gpu on {}: {e}", path.display()),
            }
            // A connection that fails at once must not spin.
            backoff = if started.elapsed() > Duration::from_secs(5) {
                Duration::from_millis(100)
            } else {
                (backoff * 2).min(Duration::from_secs(5))
            };
            std::thread::sleep(backoff);
        }
    });
    spawned.map_err(|e| format!("vhost-user-gpu {name}: cannot start its thread: {e}"))?;
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(device),
        Ok(Err(e)) => Err(format!("vhost-user-gpu {name}: {e}")),
        Err(_) => Err(format!("vhost-user-gpu {name}: {} did not start listening within 10 s", socket.display())),
    }
}

/// What one scanout shows, as the device's events told it.
#[derive(Clone, Copy, Default)]
struct Head {
    /// (resource id, rect); `None` while disabled.
    shows: Option<(u32, Rect)>,
    /// The last event was a SET to a new buffer: the flush that follows it
    /// (a page flip is both) brings no new picture.
    just_set: bool,
}

/// One VM's displays for the push engine (SUBSCRIBE): every SET_SCANOUT to
/// a new buffer and every fresh RESOURCE_FLUSH of a scanout is a flip; the
/// picture is the scanout's rect of its resource, read from the backing
/// pages when the encoder is about to read it (in place: the rect is a
/// window into the resource's rows).
pub struct GpuScanouts {
    resolver: GpuResolver,
    heads: Arc<Mutex<[Head; MAX_SCANOUTS]>>,
    /// Replaced when a scanout is unplugged: dropping the old sender ends
    /// its subscribers' streams.
    flips: Arc<Mutex<[watch::Sender<Flip>; MAX_SCANOUTS]>>,
    /// Where ENABLE_SCANOUT/DISABLE_SCANOUT plug heads in and out.
    display: QemuDisplay,
}

impl GpuScanouts {
    /// Watches `device`'s scanouts (it becomes the device's observer).
    /// `display`: QEMU's D-Bus display, for ENABLE_SCANOUT.
    pub fn attach(device: &GpuDevice, display: QemuDisplay) -> Arc<GpuScanouts> {
        let s = Arc::new(GpuScanouts {
            resolver: GpuResolver::new(device.resources()),
            heads: Arc::new(Mutex::new([Head::default(); MAX_SCANOUTS])),
            flips: Arc::new(Mutex::new(std::array::from_fn(|_| watch::channel(Flip::default()).0))),
            display,
        });
        let (heads, flips) = (s.heads.clone(), s.flips.clone());
        // A page flip is SET_SCANOUT to the new buffer and at once a flush of
        // all of it; the buffer was complete at the SET (its pixels live in
        // the pages the encoder reads), so that flush is no new picture.
        device.set_observer(Some(Arc::new(move |e: ScanoutEvent| {
            // On the device's thread: short locks, and a watch send (never
            // blocks; the newest flip wins).
            let id = match e {
                ScanoutEvent::Set { scanout_id, .. } | ScanoutEvent::Flush { scanout_id, .. } => scanout_id as usize,
            };
            if id >= MAX_SCANOUTS {
                return;
            }
            let head = &mut heads.lock().unwrap_or_else(|p| p.into_inner())[id];
            let flipped = match e {
                ScanoutEvent::Set { resource_id, rect, .. } => {
                    let changed = head.shows != Some((resource_id, rect)) && resource_id != 0;
                    head.shows = (resource_id != 0).then_some((resource_id, rect));
                    head.just_set = changed;
                    changed
                }
                ScanoutEvent::Flush { rect, .. } => {
                    let whole = head.shows.is_some_and(|(_, r)| r.intersect(&rect) == r);
                    !(std::mem::take(&mut head.just_set) && whole)
                }
            };
            if flipped {
                let at_ns = monotonic_ns();
                flips.lock().unwrap_or_else(|p| p.into_inner())[id]
                    .send_modify(|f| *f = Flip { seq: f.seq + 1, at_ns });
            }
        })));
        s
    }
}

impl ScanoutSource for GpuScanouts {
    /// Every head the device has can be subscribed to, shown or not yet
    /// (Helix subscribes right after ENABLE_SCANOUT, before the guest has
    /// set a mode there): frames come once the guest shows something.
    fn watch(&self, scanout_id: u32) -> Option<watch::Receiver<Flip>> {
        let flips = self.flips.lock().unwrap_or_else(|p| p.into_inner());
        Some(flips.get(scanout_id as usize)?.subscribe())
    }

    fn enable(&self, scanout_id: u32, width: u32, height: u32) -> Enabling<'_> {
        Box::pin(async move {
            if scanout_id as usize >= MAX_SCANOUTS || width == 0 || height == 0 || width > 16384 || height > 16384 {
                return Err(format!("scanout {scanout_id} at {width}x{height}: out of range"));
            }
            self.display.set_output(scanout_id, width, height).await.map_err(|e| e.to_string())?;
            // The Linux driver's name for a virtio-gpu head (as Helix's QEMU says it).
            Ok(format!("Virtual-{}", scanout_id + 1))
        })
    }

    fn disable(&self, scanout_id: u32) -> Enabling<'_> {
        Box::pin(async move {
            if scanout_id as usize >= MAX_SCANOUTS {
                return Err(format!("no scanout {scanout_id}"));
            }
            let unplugged = self.display.set_output(scanout_id, 0, 0).await.map_err(|e| e.to_string());
            // Its subscribers' streams end either way: a fresh channel for the head.
            let old = std::mem::replace(
                &mut self.flips.lock().unwrap_or_else(|p| p.into_inner())[scanout_id as usize],
                watch::channel(Flip::default()).0,
            );
            drop(old);
            unplugged.map(|()| format!("Virtual-{}", scanout_id + 1))
        })
    }

    fn picture(&self, scanout_id: u32) -> Result<Resolved, ResolveError> {
        let head = *self
            .heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(scanout_id as usize)
            .ok_or(ResolveError::NotFound(scanout_id))?;
        let (resource_id, rect) = head.shows.ok_or(ResolveError::NotFound(scanout_id))?;
        let full = self.resolver.resolve(resource_id)?;
        let mut layout = full.layout;
        // H.264 4:2:0 wants even sizes: an odd last row or column is left out.
        let (w, h) = (rect.width & !1, rect.height & !1);
        if rect.x.saturating_add(w) > layout.width || rect.y.saturating_add(h) > layout.height || w == 0 || h == 0 {
            return Err(ResolveError::Unusable {
                id: resource_id,
                why: format!("scanout rect {rect:?} is not inside it"),
            });
        }
        layout.offsets[0] += rect.y as u64 * layout.strides[0] + rect.x as u64 * 4;
        (layout.width, layout.height) = (w, h);
        Ok(Resolved { data: full.data, layout })
    }
}
