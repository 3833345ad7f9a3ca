//! Drives the virtio-gpu device with arbitrary command sequences against a
//! small guest memory: well-formed commands with fuzzer-chosen fields (small
//! ids, extents near region edges) mixed with raw request bytes. The device
//! must never panic, answer every request with a response of a valid size,
//! and every snapshot it gives must have exactly the resource's bytes.
#![no_main]

use std::sync::{Arc, OnceLock, RwLock};

use hxfr_virtio_gpu::protocol::{self, Rect, encode};
use hxfr_virtio_gpu::{Config, Device, Display, Limits, Resources};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// Two 64 KiB regions with a hole between them.
fn memory() -> &'static GuestMemoryAtomic<GuestMemoryMmap> {
    static MEM: OnceLock<GuestMemoryAtomic<GuestMemoryMmap>> = OnceLock::new();
    MEM.get_or_init(|| {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000), (GuestAddress(0x2_0000), 0x1_0000)]);
        GuestMemoryAtomic::new(m.expect("guest memory"))
    })
}

/// A display that wants every pixel and checks what it gets.
struct Checker;
impl Display for Checker {
    fn shows_pixels(&self) -> bool {
        true
    }
    fn update(&mut self, _: u32, r: Rect, bgrx: &[u8]) {
        assert_eq!(bgrx.len(), r.width as usize * r.height as usize * 4);
    }
}

struct Input<'a>(&'a [u8]);
impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u32 {
        u32::from(self.u8()) | u32::from(self.u8()) << 8
    }
    fn u32(&mut self) -> u32 {
        self.u16() | self.u16() << 16
    }
    /// Mostly small numbers, sometimes anything.
    fn num(&mut self) -> u32 {
        match self.u8() {
            0..=200 => u32::from(self.u8() % 80),
            201..=250 => self.u16(),
            _ => self.u32(),
        }
    }
    fn id(&mut self) -> u32 {
        u32::from(self.u8() % 6)
    }
    fn rect(&mut self) -> Rect {
        Rect { x: self.num(), y: self.num(), width: self.num(), height: self.num() }
    }
    /// Addresses near the interesting places: region starts and ends, the hole, the top.
    fn addr(&mut self) -> u64 {
        let base = [0u64, 0x1_0000, 0x2_0000, 0x3_0000, u64::MAX - 0xffff][usize::from(self.u8() % 5)];
        base.wrapping_add(u64::from(self.u16())).wrapping_sub(0x100)
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = memory();
    let limits = Limits { max_resources: 8, max_total_bytes: 1 << 20, max_entries: 64, max_total_entries: 128, ..Limits::default() };
    let mut dev = Device::new(Config { limits, preferred_size: (640, 480) });
    dev.set_display(Box::new(Checker));
    let resources = Resources::new(dev.table().clone(), Arc::new(RwLock::new(Some(mem.clone()))));
    let table = dev.table().clone();
    let mut input = Input(data);
    let guest = mem.memory();
    while !input.0.is_empty() {
        let req = match input.u8() % 14 {
            0 => encode::get_display_info(),
            1 => encode::get_edid(input.num() % 20),
            2 => {
                let format = [1, 2, 3, 4, 67, 68, 121, 134, 0, 5][usize::from(input.u8() % 10)];
                let (id, w, h) = (input.id(), input.num(), input.num());
                encode::create_2d(id, format, w, h)
            }
            3 => encode::unref(input.id()),
            4 => {
                let id = input.id();
                let n = usize::from(input.u8() % 6);
                let entries: Vec<_> = (0..n).map(|_| (input.addr(), input.u16() + 1)).collect();
                encode::attach_backing(id, &entries)
            }
            5 => encode::detach_backing(input.id()),
            6 => {
                let (s, id, r) = (input.num() % 18, input.id(), input.rect());
                encode::set_scanout(s, id, r)
            }
            7 => {
                let (id, r) = (input.id(), input.rect());
                encode::flush(id, r)
            }
            8 => {
                let (id, r, off) = (input.id(), input.rect(), u64::from(input.num()));
                encode::transfer_2d(id, r, off)
            }
            9 => {
                let (s, x, y, id) = (input.num() % 18, input.num(), input.num(), input.id());
                encode::update_cursor(s, x, y, id, input.num(), input.num())
            }
            10 => encode::move_cursor(input.num() % 18, input.num(), input.num()),
            11 => {
                // A snapshot from "another thread": exactly the resource's bytes.
                let id = input.id();
                if let Ok(px) = resources.snapshot(id) {
                    assert_eq!(px.len(), px.stride() as usize * px.height() as usize);
                    let _ = px.first().copied().zip(px.last().copied());
                }
                continue;
            }
            12 => {
                // Raw bytes, a length then the request.
                let n = usize::from(input.u8()).min(input.0.len());
                let (req, rest) = input.0.split_at(n);
                input.0 = rest;
                req.to_vec()
            }
            _ => {
                // A well-formed command cut short or with a fence.
                let mut req = encode::attach_backing(input.id(), &[(input.addr(), input.u16())]);
                req[4..8].copy_from_slice(&protocol::FLAG_FENCE.to_le_bytes());
                let cut = usize::from(input.u8()) % (req.len() + 1);
                req.truncate(cut);
                req
            }
        };
        let resp = dev.handle_command(&guest, &req);
        assert!(matches!(resp.len(), 24 | 408 | 1056), "response of {} bytes", resp.len());
    }
    // The table's bookkeeping stays within its bounds.
    let t = table.lock().unwrap();
    assert!(t.len() <= 8);
});
