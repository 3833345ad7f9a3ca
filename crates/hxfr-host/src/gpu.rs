//! Frames by resource id from the host's own virtio-gpu device.
//!
//! With `hxfr host --vhost-user-gpu`, the host is the VM's GPU
//! ([`hxfr_virtio_gpu`]): it owns every resource and the guest pages behind
//! it. This resolver reads a resource's current pixels from those pages when
//! its frame is about to be encoded, in place when the backing is contiguous
//! in the host's mapping (zero copy), otherwise row by row into one buffer.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hxfr_proto::{Fourcc, Layout, PixelFormat};
pub use hxfr_virtio_gpu::{Config, GpuDevice};
use hxfr_virtio_gpu::{Resources, SnapshotError};
use tracing::{info, warn};

use crate::resolver::{ResolveError, Resolved, ResourceResolver};

/// One VM's GPU device, as a [`ResourceResolver`].
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
