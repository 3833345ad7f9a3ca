//! The vhost-user backend: QEMU's `vhost-user-gpu-pci` connects to a UNIX
//! socket and hands this process the device's virtqueues and the guest's
//! RAM; the display goes back to QEMU over the vhost-user-gpu socket QEMU
//! passes with `VHOST_USER_GPU_SET_SOCKET`.
//!
//! [`GpuDevice`] is the handle a host keeps: [`GpuDevice::serve`] runs one
//! connection, [`GpuDevice::snapshot`] reads a resource from any thread.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;
use tracing::{debug, info, warn};
use vhost::vhost_user::gpu_message::{
    VhostUserGpuCursorPos, VhostUserGpuCursorUpdate, VhostUserGpuEdidRequest, VhostUserGpuScanout, VhostUserGpuUpdate,
};
use vhost::vhost_user::message::VhostUserU64;
use vhost::vhost_user::{GpuBackend, Listener, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_gpu::VIRTIO_GPU_F_EDID;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::device::{CURSOR_BYTES, Config, Device, Display, Observer, lock};
use crate::pixels::{ResourcePixels, Resources, SharedMemory, SnapshotError};
use crate::protocol::{CursorPos, DisplayOne, HDR_SIZE, MAX_SCANOUTS, MEM_ENTRY_SIZE, Rect};
use crate::resources::ResourceTable;

pub const CONTROL_QUEUE: u16 = 0;
pub const CURSOR_QUEUE: u16 = 1;
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: usize = 1024;
/// `VHOST_USER_GPU_PROTOCOL_F_EDID`: QEMU answers GET_EDID on the display socket.
const GPU_PROTOCOL_F_EDID: u64 = 1 << 0;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {path}: {err}")]
    Listen { path: String, err: String },
    #[error("vhost-user: {0}")]
    Daemon(String),
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
}

/// A virtio-gpu device for one VM: its resources outlive connections so a
/// host can hold this handle, serve QEMU in a loop and read resources from
/// other threads. Cloning shares the device.
#[derive(Clone)]
pub struct GpuDevice {
    config: Config,
    table: Arc<Mutex<ResourceTable>>,
    mem: SharedMemory,
    observer: Arc<RwLock<Option<Observer>>>,
}

impl GpuDevice {
    pub fn new(config: Config) -> GpuDevice {
        GpuDevice {
            config,
            table: Arc::new(Mutex::new(ResourceTable::new(config.limits))),
            mem: Arc::new(RwLock::new(None)),
            observer: Arc::new(RwLock::new(None)),
        }
    }

    /// A handle for readers (cheap to clone, usable from any thread).
    pub fn resources(&self) -> Resources {
        Resources::new(self.table.clone(), self.mem.clone())
    }

    /// The pixels of resource `id` now; see [`Resources::snapshot`].
    pub fn snapshot(&self, id: u32) -> Result<ResourcePixels, SnapshotError> {
        self.resources().snapshot(id)
    }

    /// Sets (or clears) the function told of every SET_SCANOUT and
    /// RESOURCE_FLUSH; it runs on the device's thread and must not block
    /// (hand events to a bounded channel with `try_send`).
    pub fn set_observer(&self, observer: Option<Observer>) {
        *self.observer.write().unwrap_or_else(|e| e.into_inner()) = observer;
    }

    /// Listens on `socket_path` (replacing a stale socket file), calls
    /// `on_ready` once it listens, serves the one VMM that connects and
    /// returns when it disconnects (`Ok` for an ordinary disconnect). Call
    /// it again to accept the next connection: the device starts each
    /// connection empty, as a freshly reset device. One `serve` at a time
    /// per device. Display messages to QEMU are sent from the queue thread:
    /// while QEMU does not read its display socket (a blocked GL console),
    /// the device waits with it.
    pub fn serve(&self, socket_path: impl AsRef<Path>, on_ready: impl FnOnce()) -> Result<(), ServeError> {
        let path = socket_path.as_ref();
        self.reset();
        let backend = Arc::new(Backend::new(self)?);
        let mut daemon =
            VhostUserDaemon::new("hxfr-virtio-gpu".into(), backend, GuestMemoryAtomic::new(GuestMemoryMmap::new()))
                .map_err(|e| ServeError::Daemon(e.to_string()))?;
        let listener = Listener::new(path, true)
            .map_err(|e| ServeError::Listen { path: path.display().to_string(), err: e.to_string() })?;
        on_ready();
        let result = daemon.start(listener).and_then(|()| daemon.wait());
        // The worker threads run until told to stop.
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        self.reset();
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => {
                info!("vhost-user-gpu {}: the VMM disconnected", path.display());
                Ok(())
            }
            Err(e) => Err(ServeError::Daemon(e.to_string())),
        }
    }

    /// Forgets every resource and the guest memory: the VMM is gone or the
    /// driver starts over. Readers holding snapshots keep their mappings.
    fn reset(&self) {
        lock(&self.table).clear();
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The link to QEMU's display socket, replaced at each SET_SOCKET.
#[derive(Default)]
struct QemuLink {
    gpu: Option<GpuBackend>,
    generation: u64,
}

/// [`Display`] on QEMU's vhost-user-gpu socket.
struct QemuDisplay {
    link: Arc<Mutex<QemuLink>>,
    generation: u64,
    edid: bool,
    modes: Option<[DisplayOne; MAX_SCANOUTS]>,
}

impl QemuDisplay {
    /// The current socket, negotiated if it is new. The link's lock is not
    /// held across a round trip, so SET_SOCKET never waits on QEMU.
    fn gpu(&mut self) -> Option<GpuBackend> {
        let (gpu, generation) = {
            let l = self.link.lock().unwrap_or_else(|e| e.into_inner());
            (l.gpu.clone()?, l.generation)
        };
        if generation != self.generation {
            self.generation = generation;
            self.modes = None;
            self.edid = match gpu.get_protocol_features() {
                Ok(f) => {
                    let ours = f.value & GPU_PROTOCOL_F_EDID;
                    if let Err(e) = gpu.set_protocol_features(&VhostUserU64::new(ours)) {
                        warn!("vhost-user-gpu: SET_PROTOCOL_FEATURES: {e}");
                    }
                    ours != 0
                }
                Err(e) => {
                    warn!("vhost-user-gpu: GET_PROTOCOL_FEATURES: {e}");
                    false
                }
            };
        }
        Some(gpu)
    }
}

impl Display for QemuDisplay {
    fn display_info(&mut self) -> Option<[DisplayOne; MAX_SCANOUTS]> {
        let gpu = self.gpu()?;
        let info = gpu.get_display_info().map_err(|e| warn!("vhost-user-gpu: GET_DISPLAY_INFO: {e}")).ok()?;
        let mut modes = [DisplayOne::default(); MAX_SCANOUTS];
        for (m, p) in modes.iter_mut().zip(info.pmodes.iter()) {
            let r = p.r;
            *m = DisplayOne {
                rect: Rect { x: r.x, y: r.y, width: r.width, height: r.height },
                enabled: p.enabled != 0,
                flags: p.flags,
            };
        }
        self.modes = Some(modes);
        Some(modes)
    }

    fn edid(&mut self, scanout_id: u32) -> Option<Vec<u8>> {
        self.gpu()?;
        if self.modes.is_none() {
            self.display_info();
        }
        // QEMU does not answer GET_EDID for a scanout it does not have, and
        // the display info only tells us which ones are enabled: ask only
        // about those, or we would wait for a reply forever.
        let known = self.modes.is_some_and(|m| m.get(scanout_id as usize).is_some_and(|m| m.enabled));
        if !self.edid || !known {
            return None;
        }
        let gpu = self.gpu()?;
        let resp = gpu
            .get_edid(&VhostUserGpuEdidRequest { scanout_id })
            .map_err(|e| warn!("vhost-user-gpu: GET_EDID: {e}"))
            .ok()?;
        let edid = resp.edid;
        let n = (resp.size as usize).min(edid.len());
        Some(edid[..n].to_vec())
    }

    fn shows_pixels(&self) -> bool {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).gpu.is_some()
    }

    fn scanout(&mut self, scanout_id: u32, width: u32, height: u32) {
        if let Some(gpu) = self.gpu()
            && let Err(e) = gpu.set_scanout(&VhostUserGpuScanout { scanout_id, width, height })
        {
            debug!("vhost-user-gpu: SCANOUT: {e}");
        }
    }

    fn update(&mut self, scanout_id: u32, r: Rect, bgrx: &[u8]) {
        let msg = VhostUserGpuUpdate { scanout_id, x: r.x, y: r.y, width: r.width, height: r.height };
        if let Some(gpu) = self.gpu()
            && let Err(e) = gpu.update_scanout(&msg, bgrx)
        {
            debug!("vhost-user-gpu: UPDATE: {e}");
        }
    }

    fn cursor_update(&mut self, pos: CursorPos, hot_x: u32, hot_y: u32, image: &[u8; CURSOR_BYTES]) {
        let pos = VhostUserGpuCursorPos { scanout_id: pos.scanout_id, x: pos.x, y: pos.y };
        if let Some(gpu) = self.gpu()
            && let Err(e) = gpu.cursor_update(&VhostUserGpuCursorUpdate { pos, hot_x, hot_y }, image)
        {
            debug!("vhost-user-gpu: CURSOR_UPDATE: {e}");
        }
    }

    fn cursor_move(&mut self, pos: CursorPos, visible: bool) {
        let pos = VhostUserGpuCursorPos { scanout_id: pos.scanout_id, x: pos.x, y: pos.y };
        if let Some(gpu) = self.gpu() {
            let r = if visible { gpu.cursor_pos(&pos) } else { gpu.cursor_pos_hide(&pos) };
            if let Err(e) = r {
                debug!("vhost-user-gpu: CURSOR_POS: {e}");
            }
        }
    }
}

/// One connection's backend.
struct Backend {
    device: Mutex<Device>,
    table: Arc<Mutex<ResourceTable>>,
    /// This connection's guest memory, for its queues.
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// The device's, for readers; cleared when the connection ends (a
    /// worker of an old connection still winding down keeps using `mem`).
    shared_mem: SharedMemory,
    link: Arc<Mutex<QemuLink>>,
    event_idx: AtomicBool,
    /// The device was (re)started (SET_FEATURES) and its control queue has
    /// not been looked at since.
    started: AtomicBool,
    exit: EventFd,
    num_scanouts: u32,
    /// Longest request read from a descriptor chain: an ATTACH_BACKING
    /// with the most entries allowed. Longer chains are read only this far.
    max_request: usize,
}

impl Backend {
    fn new(dev: &GpuDevice) -> Result<Backend, ServeError> {
        let link = Arc::new(Mutex::new(QemuLink::default()));
        let mut device = Device::with_table(dev.config, dev.table.clone());
        device.set_display(Box::new(QemuDisplay { link: link.clone(), generation: 0, edid: false, modes: None }));
        let slot = dev.observer.clone();
        device.set_observer(Some(Arc::new(move |e| {
            if let Some(o) = slot.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
                o(e)
            }
        })));
        Ok(Backend {
            device: Mutex::new(device),
            table: dev.table.clone(),
            mem: RwLock::new(None),
            shared_mem: dev.mem.clone(),
            link,
            event_idx: AtomicBool::new(false),
            started: AtomicBool::new(false),
            exit: EventFd::new(EFD_NONBLOCK).map_err(ServeError::EventFd)?,
            num_scanouts: lock(&dev.table).limits().num_scanouts,
            max_request: HDR_SIZE + 8 + dev.config.limits.max_entries as usize * MEM_ENTRY_SIZE,
        })
    }

    /// Whether the first control-queue work after a (re)start comes from a
    /// new driver: QEMU restores a resumed device's ring position with
    /// SET_VRING_BASE, and a reset device's position is 0. (A resumed device
    /// whose u16 position wrapped to exactly 0 would be taken for a new
    /// driver: a 1-in-65536 chance per resume, costing the guest its display.)
    fn driver_restarted(&self, next_avail: u16) -> bool {
        self.started.swap(false, Ordering::Relaxed) && next_avail == 0
    }

    /// Answers every request waiting on `vring`. Problems the guest causes
    /// are answered or skipped, never returned: an error here would stop
    /// the worker thread and with it the device.
    fn process_queue(&self, vring: &VringRwLock) {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let mem = atomic.memory();
        let chains: Vec<_> = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
            Ok(it) => it.collect(),
            Err(e) => {
                warn!("virtio-gpu: cannot read the queue: {e}");
                return;
            }
        };
        let mut device = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let mut used_any = false;
        for chain in chains {
            let head = chain.head_index();
            let resp = match chain.clone().reader(&mem) {
                Ok(mut reader) => {
                    let mut req = vec![0u8; reader.available_bytes().min(self.max_request)];
                    match reader.read_exact(&mut req) {
                        Ok(()) => Some(device.handle_command(&mem, &req)),
                        Err(e) => {
                            debug!("virtio-gpu: unreadable request: {e}");
                            None
                        }
                    }
                }
                Err(e) => {
                    debug!("virtio-gpu: bad descriptor chain: {e}");
                    None
                }
            };
            // The cursor queue and broken chains have no room for a
            // response; a response is written whole or not at all.
            let mut len = 0;
            if let (Some(resp), Ok(mut writer)) = (resp, chain.writer(&mem))
                && writer.available_bytes() >= resp.len()
                && writer.write_all(&resp).is_ok()
            {
                len = resp.len() as u32;
            }
            if let Err(e) = vring.add_used(head, len) {
                warn!("virtio-gpu: add_used: {e}");
            }
            used_any = true;
        }
        if used_any && let Err(e) = vring.signal_used_queue() {
            debug!("virtio-gpu: signal: {e}");
        }
    }
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    /// 2D only: no VIRGL, RESOURCE_BLOB or CONTEXT_INIT (see the crate doc).
    /// RING_RESET: QEMU 10 acks it on the device's behalf whatever we
    /// offer, and SET_FEATURES with a bit we did not offer is refused (QEMU
    /// then cannot start the device). The Linux driver never resets a queue.
    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_RING_RESET
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_GPU_F_EDID
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// SET_FEATURES comes each time QEMU starts the device: for a new
    /// driver (boot, reboot, reload) but also when a paused VM resumes.
    /// Which one it was shows on the control queue (see `driver_restarted`).
    fn acked_features(&self, features: u64) {
        debug!("virtio-gpu: features {features:#x} acked");
        self.started.store(true, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    /// `struct virtio_gpu_config`: no events, our scanouts, no capsets.
    /// (QEMU overrides the scanout count and events with its own.)
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut cfg = [0u8; 16];
        cfg[8..12].copy_from_slice(&self.num_scanouts.to_le_bytes());
        let (off, size) = (offset as usize, size as usize);
        cfg.get(off..off.saturating_add(size)).map(<[u8]>::to_vec).unwrap_or_default()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.shared_mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem.clone());
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn set_gpu_socket(&self, gpu: GpuBackend) -> io::Result<()> {
        let mut l = self.link.lock().unwrap_or_else(|e| e.into_inner());
        l.gpu = Some(gpu);
        l.generation += 1;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<EventFd> {
        self.exit.try_clone().ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        let Some(vring) = vrings.get(device_event as usize) else {
            return Err(io::Error::other(format!("virtio-gpu: unknown event {device_event}")));
        };
        if device_event == CONTROL_QUEUE && self.driver_restarted(vring.queue_next_avail()) {
            info!("virtio-gpu: the guest's driver started over; forgetting its resources");
            lock(&self.table).clear();
        }
        if self.event_idx.load(Ordering::Relaxed) {
            // With EVENT_IDX the driver is not notified again for requests
            // that arrive while we work: keep going until the queue is
            // empty with notifications back on.
            loop {
                let _ = vring.disable_notification();
                self.process_queue(vring);
                if !vring.enable_notification().unwrap_or(false) {
                    break;
                }
            }
        } else {
            self.process_queue(vring);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{self as p, encode};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::thread;
    use vhost::VhostBackend;
    use vhost::vhost_user::Frontend;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// Puts `reqs` on a queue as (readable request, writable 1056-byte
    /// response) chains, runs the backend over it and returns each
    /// response as written, cut to the length in the used ring.
    fn run_queue(backend: &Backend, mem: &GuestMemoryAtomic<GuestMemoryMmap>, reqs: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let m = mem.memory();
        let q = MockSplitQueue::new(&*m, 16);
        let mut descs = Vec::new();
        for (i, req) in reqs.iter().enumerate() {
            let (rd, wr) = (0x10_0000 + i as u64 * 0x1_0000, 0x20_0000 + i as u64 * 0x1000);
            m.write_slice(req, GuestAddress(rd)).unwrap();
            let n = 2 * i as u16;
            descs.push(RawDescriptor::from(Descriptor::new(rd, req.len() as u32, VRING_DESC_F_NEXT as u16, n + 1)));
            descs.push(RawDescriptor::from(Descriptor::new(wr, 1056, VRING_DESC_F_WRITE as u16, 0)));
        }
        q.add_desc_chains(&descs, 0).unwrap();
        let vring = VringRwLock::new(mem.clone(), 16).unwrap();
        vring.set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_ready(true);
        backend.process_queue(&vring);
        assert_eq!(vring.queue_used_idx().unwrap(), reqs.len() as u16);
        (0..reqs.len())
            .map(|i| {
                // used ring: flags u16, idx u16, then (id u32, len u32) entries.
                let len: u32 = m.read_obj(GuestAddress(q.used_addr().0 + 4 + 8 * i as u64 + 4)).unwrap();
                let mut out = vec![0u8; len as usize];
                m.read_slice(&mut out, GuestAddress(0x20_0000 + i as u64 * 0x1000)).unwrap();
                out
            })
            .collect()
    }

    #[test]
    fn requests_on_the_queue_are_answered() {
        let dev = GpuDevice::new(Config::default());
        let backend = Backend::new(&dev).unwrap();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
        backend.update_memory(mem.clone()).unwrap();
        let mut fenced = encode::create_2d(1, 2, 64, 64);
        fenced[4..8].copy_from_slice(&p::FLAG_FENCE.to_le_bytes());
        fenced[8..16].copy_from_slice(&99u64.to_le_bytes());
        let reqs = [
            encode::get_display_info(),
            fenced,
            encode::attach_backing(1, &[(0x30_0000, 64 * 64 * 4)]),
            encode::create_2d(1, 2, 64, 64),
            vec![0xff; 3],
        ];
        let resps = run_queue(&backend, &mem, &reqs);
        assert_eq!(resps[0].len(), 408);
        assert_eq!(u32_at(&resps[0], 0), p::RESP_OK_DISPLAY_INFO);
        assert_eq!((u32_at(&resps[1], 0), u32_at(&resps[1], 4), u32_at(&resps[1], 8)), (p::RESP_OK_NODATA, 1, 99));
        assert_eq!(u32_at(&resps[2], 0), p::RESP_OK_NODATA);
        assert_eq!(u32_at(&resps[3], 0), p::RESP_ERR_INVALID_RESOURCE_ID);
        assert_eq!(u32_at(&resps[4], 0), p::RESP_ERR_UNSPEC);
        // The host reads the resource through its handle.
        mem.memory().write_slice(&[9; 4], GuestAddress(0x30_0000)).unwrap();
        let px = dev.snapshot(1).unwrap();
        assert!(px.is_zero_copy());
        assert_eq!(&px[..4], &[9; 4]);
        // A resumed VM keeps its resources, a new driver starts with none.
        backend.acked_features(backend.features());
        assert!(!backend.driver_restarted(17));
        assert!(!backend.driver_restarted(0), "asked once per start");
        backend.acked_features(backend.features());
        let vrings = [VringRwLock::new(mem.clone(), 16).unwrap(), VringRwLock::new(mem.clone(), 16).unwrap()];
        backend.handle_event(CURSOR_QUEUE, EventSet::IN, &vrings, 0).unwrap();
        assert!(dev.snapshot(1).is_ok(), "the cursor queue says nothing about the driver");
        backend.handle_event(CONTROL_QUEUE, EventSet::IN, &vrings, 0).unwrap();
        assert_eq!(dev.snapshot(1).unwrap_err(), SnapshotError::NotFound(1));
    }

    #[test]
    fn features_say_2d_only() {
        let backend = Backend::new(&GpuDevice::new(Config::default())).unwrap();
        let f = backend.features();
        assert_ne!(f & (1 << VIRTIO_GPU_F_EDID), 0);
        for bit in [0, 3, 4] {
            // VIRGL, RESOURCE_BLOB, CONTEXT_INIT
            assert_eq!(f & (1 << bit), 0, "feature bit {bit}");
        }
        let cfg = backend.get_config(0, 16);
        assert_eq!(u32_at(&cfg, 8), 16, "num_scanouts");
        assert_eq!(u32_at(&cfg, 12), 0, "num_capsets");
        assert!(backend.get_config(12, 8).is_empty(), "out of range");
        assert!(backend.get_config(u32::MAX, u32::MAX).is_empty());
    }

    /// QEMU's side of the display socket, as hw/display/vhost-user-gpu.c
    /// answers it; records what it is told.
    fn fake_qemu(mut s: UnixStream) -> thread::JoinHandle<Vec<String>> {
        thread::spawn(move || {
            let mut log = Vec::new();
            let mut hdr = [0u8; 12];
            while s.read_exact(&mut hdr).is_ok() {
                let (req, size) = (u32_at(&hdr, 0), u32_at(&hdr, 8) as usize);
                let mut body = vec![0u8; size];
                s.read_exact(&mut body).unwrap();
                let reply = |s: &mut UnixStream, payload: &[u8]| {
                    let mut m = Vec::new();
                    for v in [req, 4, payload.len() as u32] {
                        m.extend_from_slice(&v.to_le_bytes());
                    }
                    m.extend_from_slice(payload);
                    s.write_all(&m).unwrap();
                };
                match req {
                    1 => reply(&mut s, &3u64.to_le_bytes()),
                    2 => log.push(format!("features {}", u64::from_le_bytes(body[..8].try_into().unwrap()))),
                    3 => {
                        let mut info = vec![0u8; 408];
                        info[0..4].copy_from_slice(&p::RESP_OK_DISPLAY_INFO.to_le_bytes());
                        info[32..36].copy_from_slice(&1024u32.to_le_bytes());
                        info[36..40].copy_from_slice(&768u32.to_le_bytes());
                        info[40..44].copy_from_slice(&1u32.to_le_bytes());
                        reply(&mut s, &info);
                    }
                    11 => {
                        log.push(format!("edid {}", u32_at(&body, 0)));
                        let mut e = vec![0u8; 1056];
                        e[0..4].copy_from_slice(&p::RESP_OK_EDID.to_le_bytes());
                        e[24..28].copy_from_slice(&128u32.to_le_bytes());
                        e[32..160].fill(0xab);
                        reply(&mut s, &e);
                    }
                    7 => log.push(format!("scanout {} {}x{}", u32_at(&body, 0), u32_at(&body, 4), u32_at(&body, 8))),
                    8 => log.push(format!(
                        "update {} {},{} {}x{} {} bytes {:?}",
                        u32_at(&body, 0),
                        u32_at(&body, 4),
                        u32_at(&body, 8),
                        u32_at(&body, 12),
                        u32_at(&body, 16),
                        size - 20,
                        &body[20..24]
                    )),
                    4 | 5 => log.push(format!("cursor pos {} {}", req == 4, u32_at(&body, 4))),
                    6 => log.push(format!("cursor update {} bytes", size - 20)),
                    r => log.push(format!("unexpected {r}")),
                }
            }
            log
        })
    }

    #[test]
    fn the_display_goes_to_qemu() {
        let dev = GpuDevice::new(Config::default());
        let backend = Backend::new(&dev).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let qemu = fake_qemu(theirs);
        backend.set_gpu_socket(GpuBackend::from_stream(ours)).unwrap();
        let mut d = backend.device.lock().unwrap();
        let mut run = |req: Vec<u8>| d.handle_command(&mem, &req);
        // EDID of an enabled scanout comes from QEMU; of another, from us
        // (QEMU would never answer for a scanout it does not have).
        let e = run(encode::get_edid(0));
        assert_eq!(&e[32..34], &[0xab, 0xab]);
        let e = run(encode::get_edid(1));
        assert_eq!(&e[32..40], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        let info = run(encode::get_display_info());
        assert_eq!((u32_at(&info, 32), u32_at(&info, 36)), (1024, 768));
        // A 4×2 resource shown and flushed: QEMU gets the rect's pixels.
        mem.write_slice(&[1, 2, 3, 4].repeat(8), GuestAddress(0x1000)).unwrap();
        run(encode::create_2d(1, 2, 4, 2));
        run(encode::attach_backing(1, &[(0x1000, 32)]));
        run(encode::set_scanout(0, 1, Rect { x: 0, y: 0, width: 4, height: 2 }));
        run(encode::flush(1, Rect { x: 1, y: 0, width: 3, height: 2 }));
        run(encode::update_cursor(0, 5, 6, 1, 0, 0));
        run(encode::move_cursor(0, 7, 8));
        drop(d);
        drop(backend); // closes our end of the socket
        let log = qemu.join().unwrap();
        assert_eq!(
            log,
            [
                "features 1",
                "edid 0",
                "scanout 0 4x2",
                "update 0 1,0 3x2 24 bytes [1, 2, 3, 4]",
                "cursor update 16384 bytes",
                "cursor pos true 7"
            ]
        );
    }

    #[test]
    fn serve_returns_on_disconnect_and_serves_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpu.sock");
        let dev = GpuDevice::new(Config::default());
        let (tx, rx) = mpsc::channel();
        let (d, p) = (dev.clone(), path.clone());
        let server = thread::spawn(move || {
            for _ in 0..2 {
                let tx = tx.clone();
                d.serve(&p, move || tx.send(()).unwrap()).unwrap();
            }
        });
        for _ in 0..2 {
            rx.recv().unwrap();
            let f = Frontend::connect(&path, 2).unwrap();
            f.set_owner().unwrap();
            let features = f.get_features().unwrap();
            assert_ne!(features & (1 << VIRTIO_GPU_F_EDID), 0);
            assert_eq!(features & 1, 0, "no VIRGL");
            drop(f);
        }
        server.join().unwrap();
        assert_eq!(dev.snapshot(1).unwrap_err(), SnapshotError::NotFound(1));
    }
}
