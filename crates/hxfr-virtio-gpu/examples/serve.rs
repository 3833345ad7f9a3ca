//! Serves the device on a socket until killed, accepting QEMU again after
//! each disconnect. Logs what the scanouts do and, after each flush, reads
//! the flushed resource by id on another thread as a host encoder would
//! (`RUST_LOG=debug` for every command). A manual test against QEMU:
//!
//! ```text
//! cargo run -p hxfr-virtio-gpu --example serve -- /tmp/gpu.sock
//! qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on \
//!     -machine q35,memory-backend=mem -chardev socket,id=gpu,path=/tmp/gpu.sock \
//!     -device vhost-user-gpu-pci,chardev=gpu ...
//! ```

use std::sync::{Arc, mpsc};

use hxfr_virtio_gpu::{Config, GpuDevice, ScanoutEvent};

fn main() {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let path = std::env::args().nth(1).unwrap_or_else(|| "/tmp/hxfr-gpu.sock".into());
    let gpu = GpuDevice::new(Config::default());
    // The observer runs on the device's thread: hand events over without blocking.
    let (tx, rx) = mpsc::sync_channel(64);
    gpu.set_observer(Some(Arc::new(move |e| {
        tracing::info!("{e:?}");
        let _ = tx.try_send(e);
    })));
    let resources = gpu.resources();
    std::thread::spawn(move || {
        for e in rx {
            let ScanoutEvent::Flush { resource_id, .. } = e else { continue };
            match resources.snapshot(resource_id) {
                Ok(px) => {
                    let sum = px.iter().fold(0u64, |a, &b| a + b as u64);
                    tracing::info!("read {px:?}: {} bytes, byte sum {sum}, first pixel {:?}", px.len(), &px[..4]);
                }
                Err(e) => tracing::info!("read {resource_id}: {e}"),
            }
        }
    });
    loop {
        if let Err(e) = gpu.serve(&path, || tracing::info!("listening on {path}")) {
            tracing::error!("{e}");
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}
