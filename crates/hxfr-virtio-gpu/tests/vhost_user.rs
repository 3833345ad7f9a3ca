//! The device over a real vhost-user socket, with this test as the VMM:
//! guest memory is a shared file both sides map, the control queue is set up
//! as QEMU does, requests are kicked and their responses read back, and the
//! host reads a resource by id from another thread while the device runs.

#![cfg(target_os = "linux")]

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use hxfr_virtio_gpu::protocol::{self as p, Rect, encode};
use hxfr_virtio_gpu::{Config, GpuDevice, ScanoutEvent};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const MEM_SIZE: usize = 8 << 20;
const QUEUE: u64 = 0x1000; // where the control queue's rings lie
const REQS: u64 = 0x10_0000; // request buffers, 64 KiB apart
const RESPS: u64 = 0x40_0000; // response buffers, 4 KiB apart
const PIXELS: u64 = 0x60_0000;

struct Vmm {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    call: EventFd,
    kick: EventFd,
    queue: MockSplitQueue<'static, GuestMemoryMmap>,
    sent: u16,
}

impl Vmm {
    fn connect(path: &Path) -> Vmm {
        let file = tempfile::tempfile().unwrap();
        file.set_len(MEM_SIZE as u64).unwrap();
        let fd = file.as_raw_fd();
        let mem =
            GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), MEM_SIZE, Some(FileOffset::new(file, 0)))])
                .unwrap();
        let host = mem.find_region(GuestAddress(0)).unwrap().as_ptr() as u64;

        let mut frontend = Frontend::connect(path, 2).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        frontend.set_features(features).unwrap();
        let proto = frontend.get_protocol_features().unwrap();
        assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
        frontend.set_protocol_features(proto).unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: fd,
        };
        frontend.set_mem_table(&[region]).unwrap();

        // Lives as long as the test process: the mock borrows the memory.
        let leaked: &'static GuestMemoryMmap = Box::leak(Box::new(mem.clone()));
        let queue = MockSplitQueue::create(leaked, GuestAddress(QUEUE), 16);
        let (call, kick) = (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
        frontend.set_vring_num(0, 16).unwrap();
        let cfg = VringConfigData {
            queue_max_size: 16,
            queue_size: 16,
            flags: 0,
            desc_table_addr: host + queue.desc_table_addr().0,
            used_ring_addr: host + queue.used_addr().0,
            avail_ring_addr: host + queue.avail_addr().0,
            log_addr: None,
        };
        frontend.set_vring_addr(0, &cfg).unwrap();
        frontend.set_vring_base(0, 0).unwrap();
        frontend.set_vring_call(0, &call).unwrap();
        frontend.set_vring_kick(0, &kick).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
        Vmm { frontend, mem, call, kick, queue, sent: 0 }
    }

    /// Sends one request and returns its response.
    fn request(&mut self, req: &[u8]) -> Vec<u8> {
        let i = self.sent;
        let (rd, wr) = (REQS + i as u64 * 0x1_0000, RESPS + i as u64 * 0x1000);
        self.mem.write_slice(req, GuestAddress(rd)).unwrap();
        let n = (2 * i) % 16;
        let descs = [
            RawDescriptor::from(Descriptor::new(rd, req.len() as u32, VRING_DESC_F_NEXT as u16, n + 1)),
            RawDescriptor::from(Descriptor::new(wr, 1056, VRING_DESC_F_WRITE as u16, 0)),
        ];
        self.queue.add_desc_chains(&descs, n).unwrap();
        self.sent += 1;
        self.kick.write(1).unwrap();
        // Wait for the device to use the chain.
        let deadline = Instant::now() + Duration::from_secs(10);
        let used_idx = GuestAddress(self.queue.used_addr().0 + 2);
        while self.mem.read_obj::<u16>(used_idx).unwrap() != self.sent {
            assert!(Instant::now() < deadline, "no response to request {i}");
            let _ = self.call.read();
            thread::sleep(Duration::from_millis(1));
        }
        let slot = (i % 16) as u64;
        let len: u32 = self.mem.read_obj(GuestAddress(self.queue.used_addr().0 + 4 + 8 * slot + 4)).unwrap();
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(wr)).unwrap();
        out
    }
}

fn resp_type(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[0..4].try_into().unwrap())
}

#[test]
fn a_vmm_drives_the_device_and_the_host_reads_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpu.sock");
    let device = GpuDevice::new(Config::default());
    let (events_tx, events) = mpsc::sync_channel(16);
    device.set_observer(Some(std::sync::Arc::new(move |e| {
        let _ = events_tx.try_send(e);
    })));
    let (ready_tx, ready) = mpsc::channel();
    let server = {
        let (d, p) = (device.clone(), path.clone());
        thread::spawn(move || d.serve(&p, move || ready_tx.send(()).unwrap()))
    };
    ready.recv().unwrap();
    let mut vmm = Vmm::connect(&path);

    let info = vmm.request(&encode::get_display_info());
    assert_eq!(resp_type(&info), p::RESP_OK_DISPLAY_INFO);
    assert_eq!(info.len(), 408);

    // A 64×32 dumb buffer the guest draws into, backed by two adjacent extents.
    let (w, h) = (64u32, 32u32);
    let pattern: Vec<u8> = (0..w * h * 4).map(|i| (i * 7) as u8).collect();
    vmm.mem.write_slice(&pattern, GuestAddress(PIXELS)).unwrap();
    let mut fenced = encode::create_2d(1, 2, w, h);
    fenced[4..8].copy_from_slice(&p::FLAG_FENCE.to_le_bytes());
    fenced[8..16].copy_from_slice(&7u64.to_le_bytes());
    let r = vmm.request(&fenced);
    assert_eq!(resp_type(&r), p::RESP_OK_NODATA);
    assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 7, "fence echoed");
    let half = w * h * 2;
    let r = vmm.request(&encode::attach_backing(1, &[(PIXELS, half), (PIXELS + half as u64, half)]));
    assert_eq!(resp_type(&r), p::RESP_OK_NODATA);
    let full = Rect { x: 0, y: 0, width: w, height: h };
    assert_eq!(resp_type(&vmm.request(&encode::set_scanout(0, 1, full))), p::RESP_OK_NODATA);
    assert_eq!(resp_type(&vmm.request(&encode::flush(1, full))), p::RESP_OK_NODATA);
    assert_eq!(events.try_recv().unwrap(), ScanoutEvent::Set { scanout_id: 0, resource_id: 1, rect: full });
    assert_eq!(events.try_recv().unwrap(), ScanoutEvent::Flush { scanout_id: 0, resource_id: 1, rect: full });

    // The host, on another thread, reads the pixels where the guest wrote them.
    let reader = device.resources();
    let px = thread::spawn(move || reader.snapshot(1).unwrap()).join().unwrap();
    assert!(px.is_zero_copy(), "adjacent extents in one region are one host range");
    assert_eq!((px.width(), px.height(), px.stride()), (w, h, w * 4));
    assert_eq!(&px[..], &pattern[..]);
    // Bad commands are answered and the device goes on.
    assert_eq!(resp_type(&vmm.request(&[0; 8])), p::RESP_ERR_UNSPEC);
    assert_eq!(resp_type(&vmm.request(&encode::create_2d(2, 2, 20000, 1))), p::RESP_ERR_INVALID_PARAMETER);
    assert_eq!(resp_type(&vmm.request(&encode::unref(1))), p::RESP_OK_NODATA);
    assert!(device.snapshot(1).is_err());
    // The snapshot taken before the unref still reads guest memory.
    assert_eq!(&px[..16], &pattern[..16]);

    // The VMM goes away: serve returns, and the device forgets the guest.
    drop(vmm.frontend);
    server.join().unwrap().unwrap();
    assert!(device.snapshot(1).is_err());
}
