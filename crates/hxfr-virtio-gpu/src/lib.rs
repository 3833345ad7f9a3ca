//! A virtio-gpu 2D device, served to QEMU over vhost-user, whose resources
//! the host reads by id.
//!
//! QEMU's `vhost-user-gpu-pci` hands the whole virtio-gpu device to an
//! outside process. Being that process means owning every resource the
//! guest's driver creates and the guest pages behind it, so a frame named by
//! its virtio-gpu resource id can be read straight from guest RAM: no pixel
//! crosses the guest's CPU or a socket.
//!
//! # What the device offers, and why
//! A **2D device only**: `VIRTIO_F_VERSION_1`, `VIRTIO_RING_F_EVENT_IDX` and
//! `VIRTIO_GPU_F_EDID`. Not `VIRGL` (the guest would create 3D contexts and
//! render where we cannot read), not `RESOURCE_BLOB` (dumb buffers would
//! become blob resources), not `CONTEXT_INIT`. Commands: GET_DISPLAY_INFO,
//! GET_EDID, RESOURCE_CREATE_2D, RESOURCE_UNREF, SET_SCANOUT,
//! RESOURCE_FLUSH, TRANSFER_TO_HOST_2D, RESOURCE_ATTACH_BACKING,
//! RESOURCE_DETACH_BACKING, UPDATE_CURSOR, MOVE_CURSOR; anything else gets
//! `ERR_UNSPEC`. Up to 16 scanouts. Fenced commands are answered with their
//! fence: 2D commands complete before their response is written.
//!
//! The device keeps **no host copy** of a resource. TRANSFER_TO_HOST_2D is
//! checked and answered; readers (a flush to QEMU's window, a frame by id)
//! read the backing pages, which are always current for a buffer a
//! compositor hands to capture (such a buffer is never transferred).
//!
//! # Bounds (a hostile guest)
//! Every value from the virtqueues is checked before use, with the defaults
//! of [`resources::Limits`]: width and height ≤ 16384, one resource ≤ 256
//! MiB, all resources ≤ 4 GiB (bookkeeping: nothing is allocated per
//! resource), ≤ 4096 resources, ≤ 16384 backing extents per attach and
//! ≤ 2^20 held, each extent inside guest memory (checked arithmetic), the
//! backing covering the resource, scanout rects inside their resource. A
//! request is read up to a fixed size; an UPDATE to QEMU goes in bands of
//! ≤ 4 MiB. A bad command gets an error response and the device goes on.
//!
//! # Serving QEMU
//! ```no_run
//! use hxfr_virtio_gpu::{Config, GpuDevice};
//! let gpu = GpuDevice::new(Config::default());
//! let reader = gpu.resources(); // for the encode path, any thread
//! std::thread::spawn(move || loop {
//!     // Returns when QEMU disconnects; loop to accept the next QEMU.
//!     if let Err(e) = gpu.serve("/run/vm1-gpu.sock", || {}) {
//!         eprintln!("vhost-user-gpu: {e}");
//!         std::thread::sleep(std::time::Duration::from_secs(1));
//!     }
//! });
//! # let _ = reader.snapshot(1);
//! ```
//! QEMU: `-chardev socket,id=gpu,path=/run/vm1-gpu.sock -device
//! vhost-user-gpu-pci,chardev=gpu` with guest RAM shared
//! (`-object memory-backend-memfd,id=mem,size=…,share=on -machine memory-backend=mem`).
//!
//! # Lifecycle
//! Resources live in the device handle, not the connection, but every
//! connection starts empty, and so does every new driver: when QEMU starts
//! the device again (SET_FEATURES) and the guest's first control request
//! comes at ring position 0, the guest reset or rebooted and will reuse ids,
//! so the table is cleared. A paused and resumed VM keeps its resources
//! (QEMU restores the ring position). When QEMU goes away
//! the table and guest memory are dropped: later snapshots fail with
//! `NotFound`/`NoMemory`, snapshots already taken keep their mapping.
//! A restarted host that QEMU reconnects to (`reconnect=` on the chardev)
//! starts empty while the guest's driver still believes its resources exist:
//! its commands get `ERR_INVALID_RESOURCE_ID` until it recreates them, which
//! a running Linux driver does not do; the guest needs a reboot or driver
//! reload to display again.
//!
//! # Modules
//! [`backend`] is the vhost-user backend and [`GpuDevice`], the handle a
//! host keeps; [`protocol`] decodes requests and encodes responses;
//! [`resources`] is the resource table; [`device`] carries out commands; [`pixels`] reads a
//! resource's pixels by id from other threads; [`edid`] makes an EDID
//! when QEMU is not there to.

#![cfg(target_os = "linux")]
#![cfg_attr(not(test), deny(unused_crate_dependencies))]

pub mod backend;
pub mod device;
pub mod edid;
pub mod pixels;
pub mod protocol;
pub mod resources;

pub use backend::{GpuDevice, ServeError};
pub use device::{Config, Device, Display, NoDisplay, Observer, ScanoutEvent};
pub use pixels::{ResourcePixels, Resources, SharedMemory, SnapshotError};
pub use resources::{Format, GpuError, Limits};
