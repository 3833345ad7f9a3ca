//! Guest RAM and virtio-gpu resources made in the bench, for the resource
//! path (`hxfr host --vhost-user-gpu`: frames named by resource id) and for
//! scanout push.
//!
//! The guest's RAM is a shared file (as QEMU's `memory-backend-memfd,
//! share=on`) mapped twice: once as the host's device maps it (a
//! `vm_memory::GuestMemoryMmap`, behind the host's [`GpuResolver`]) and once
//! as the guest's own view, where the guest "draws" its frames. Resources
//! are made through the device's resource table exactly as the device makes
//! them for RESOURCE_CREATE_2D and RESOURCE_ATTACH_BACKING: one 2D
//! B8G8R8X8 resource per frame slot, its backing a list of guest-physical
//! extents. A real Linux guest's dumb buffers are scattered 4 KiB pages, so
//! the *scattered* backing takes pages in a shuffled order from across a
//! region (the host gathers them into one buffer per frame); the
//! *contiguous* one is one extent (the host reads it in place).

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result, bail};
use hxfr_host::gpu::GpuResolver;
use hxfr_host::{Flip, ResolveError, Resolved, ResourceResolver, ScanoutSource, monotonic_ns};
use hxfr_virtio_gpu::protocol::MemEntry;
use hxfr_virtio_gpu::resources::ResourceTable;
use hxfr_virtio_gpu::{Limits, Resources, SharedMemory};
use tokio::sync::watch;
use vm_memory::{FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// `VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM`.
const B8G8R8X8: u32 = 2;
const PAGE: u64 = 4096;

/// How a resource's backing lies in guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backing {
    /// 4 KiB pages in a shuffled order across a region, as a Linux guest's
    /// dumb buffers: the host copies them into one buffer per frame.
    Scattered,
    /// One extent: the host reads the frame in place (zero copy).
    Contiguous,
}

/// The resources of one run: one per frame slot, each with its extents.
pub(crate) struct Slots {
    pub ids: Vec<u32>,
    extents: Vec<Vec<MemEntry>>,
}

/// A guest's RAM, its device's resource table, and the resolver the host reads them by.
pub(crate) struct GuestRam {
    _file: tempfile::NamedTempFile,
    /// The guest's view of its RAM (where it draws).
    guest: memmap2::MmapMut,
    /// The device's view (what vm_memory maps for the host).
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    table: Arc<Mutex<ResourceTable>>,
    resources: Resources,
    /// Guest-physical addresses of the scattered area's pages, shuffled.
    pages: Vec<u64>,
    /// Where the contiguous area starts, and each of its slots' size.
    contiguous_at: u64,
    slot_bytes: u64,
    slots: usize,
    next_id: u32,
}

impl GuestRam {
    /// RAM for `slots` frames of up to `slot_bytes` each, scattered and
    /// contiguous, in a file under `dir`.
    pub fn new(dir: &Path, slots: usize, slot_bytes: usize) -> Result<GuestRam> {
        let slot_bytes = (slot_bytes as u64).next_multiple_of(PAGE);
        let area = slot_bytes * slots as u64;
        let size = 2 * area;
        let file = tempfile::NamedTempFile::new_in(dir)?;
        file.as_file().set_len(size)?;
        let dev_file: File = file.reopen()?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(dev_file, 0)),
        )])
        .map_err(|e| anyhow::anyhow!("mapping guest memory: {e}"))?;
        // SAFETY: our own temporary file, sized above, mapped while we hold it.
        let guest = unsafe { memmap2::MmapMut::map_mut(file.as_file())? };
        let mem = GuestMemoryAtomic::new(mem);
        let table = Arc::new(Mutex::new(ResourceTable::new(Limits::default())));
        let shared: SharedMemory = Arc::new(RwLock::new(Some(mem.clone())));
        let resources = Resources::new(table.clone(), shared);
        let mut pages: Vec<u64> = (0..area / PAGE).map(|p| p * PAGE).collect();
        shuffle(&mut pages, 0x9e37_79b9_7f4a_7c15);
        Ok(GuestRam {
            _file: file,
            guest,
            mem,
            table,
            resources,
            pages,
            contiguous_at: area,
            slot_bytes,
            slots,
            next_id: 1,
        })
    }

    /// The host's resolver over this guest's resources.
    pub fn resolver(&self) -> GpuResolver {
        GpuResolver::new(self.resources.clone())
    }

    /// `n` B8G8R8X8 resources of `w`×`h`, created and backed as the device
    /// does for RESOURCE_CREATE_2D and RESOURCE_ATTACH_BACKING.
    pub fn create(&mut self, w: u32, h: u32, n: usize, backing: Backing) -> Result<Slots> {
        let bytes = w as u64 * h as u64 * 4;
        if n > self.slots || bytes > self.slot_bytes {
            bail!("{n} resources of {w}x{h} do not fit the bench's guest RAM");
        }
        let mem = self.mem.memory();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut slots = Slots { ids: Vec::new(), extents: Vec::new() };
        for s in 0..n {
            let extents = match backing {
                Backing::Scattered => {
                    let per = bytes.div_ceil(PAGE) as usize;
                    let mut left = bytes;
                    self.pages[s * per..(s + 1) * per]
                        .iter()
                        .map(|&addr| {
                            let length = left.min(PAGE);
                            left -= length;
                            MemEntry { addr, length: length as u32 }
                        })
                        .collect()
                }
                Backing::Contiguous => {
                    vec![MemEntry { addr: self.contiguous_at + s as u64 * self.slot_bytes, length: bytes as u32 }]
                }
            };
            let id = self.next_id;
            self.next_id += 1;
            table.create_2d(id, B8G8R8X8, w, h).map_err(|e| anyhow::anyhow!("RESOURCE_CREATE_2D: {e}"))?;
            table.attach_backing(id, &extents, &mem).map_err(|e| anyhow::anyhow!("RESOURCE_ATTACH_BACKING: {e}"))?;
            slots.ids.push(id);
            slots.extents.push(extents);
        }
        Ok(slots)
    }

    /// RESOURCE_UNREF of every slot.
    pub fn free(&mut self, slots: &Slots) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for &id in &slots.ids {
            let _ = table.unref(id);
        }
    }

    /// The guest draws `pixels` (packed rows) into slot `slot`'s backing.
    pub fn draw(&mut self, slots: &Slots, slot: usize, pixels: &[u8]) -> Result<()> {
        let mut at = 0usize;
        for e in &slots.extents[slot] {
            let (addr, len) = (e.addr as usize, e.length as usize);
            let Some(src) = pixels.get(at..at + len) else { bail!("frame smaller than its resource") };
            self.guest[addr..addr + len].copy_from_slice(src);
            at += len;
        }
        Ok(())
    }
}

/// Fisher–Yates with a fixed xorshift: the same scatter every run.
fn shuffle(v: &mut [u64], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

/// Scanout 0 of the bench's guest, for the push engine: what `GpuScanouts`
/// does without a VMM in front of it. The guest flips a resource onto the
/// scanout (a page flip: SET_SCANOUT, or RESOURCE_FLUSH of the buffer
/// shown); the host reads the picture from the resource's backing when the
/// encoder gets to it, through the same [`GpuResolver`].
pub(crate) struct FlipSource {
    resolver: GpuResolver,
    shown: Mutex<Option<u32>>,
    flips: watch::Sender<Flip>,
}

impl FlipSource {
    pub fn new(resolver: GpuResolver) -> FlipSource {
        FlipSource { resolver, shown: Mutex::new(None), flips: watch::channel(Flip::default()).0 }
    }

    /// Scanout 0 shows `resource_id` now: the flip, with its time.
    pub fn flip(&self, resource_id: u32) -> Flip {
        *self.shown.lock().unwrap_or_else(|e| e.into_inner()) = Some(resource_id);
        let flip = Flip { seq: self.flips.borrow().seq + 1, at_ns: monotonic_ns() };
        self.flips.send_replace(flip);
        flip
    }

    /// Scanout 0 shows nothing (its resources are about to go).
    pub fn blank(&self) {
        *self.shown.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl ScanoutSource for FlipSource {
    fn watch(&self, scanout_id: u32) -> Option<watch::Receiver<Flip>> {
        (scanout_id == 0).then(|| self.flips.subscribe())
    }

    fn picture(&self, scanout_id: u32) -> Result<Resolved, ResolveError> {
        let shown = *self.shown.lock().unwrap_or_else(|e| e.into_inner());
        let id = shown.filter(|_| scanout_id == 0).ok_or(ResolveError::NotFound(scanout_id))?;
        self.resolver.resolve(id)
    }
}

/// The host's and the guest's halves, ready for [`crate::paths::Env`].
pub(crate) fn start(dir: &Path, slots: usize, slot_bytes: usize) -> Result<(GuestRam, Arc<FlipSource>)> {
    let ram = GuestRam::new(dir, slots, slot_bytes).context("the bench's guest RAM")?;
    let flips = Arc::new(FlipSource::new(ram.resolver()));
    Ok((ram, flips))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hxfr_proto::PixelFormat;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
    }

    #[test]
    fn scattered_slots_are_shuffled_distinct_pages() {
        let dir = tempfile::tempdir().unwrap();
        let mut ram = GuestRam::new(dir.path(), 2, 64 * 64 * 4).unwrap();
        let slots = ram.create(64, 64, 2, Backing::Scattered).unwrap();
        let all: Vec<u64> = slots.extents.iter().flatten().map(|e| e.addr).collect();
        assert_eq!(all.len(), 8, "4 pages a slot");
        let mut sorted = all.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 8, "no page in two slots: {all:?}");
        assert!(all.iter().all(|a| a % PAGE == 0 && *a < ram.contiguous_at));
        // Shuffled: not one run of adjacent pages in order.
        let adjacent = all.windows(2).filter(|w| w[1] == w[0] + PAGE).count();
        assert!(adjacent < 4, "{all:?}");
        // The same scatter every run.
        let mut again = GuestRam::new(dir.path(), 2, 64 * 64 * 4).unwrap();
        let s2 = again.create(64, 64, 2, Backing::Scattered).unwrap();
        assert_eq!(s2.extents, slots.extents);
    }

    #[test]
    fn what_the_guest_draws_the_host_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h) = (96, 80); // 30720 bytes: 7.5 pages, a short last extent
        let mut ram = GuestRam::new(dir.path(), 2, (w * h * 4) as usize).unwrap();
        let resolver = ram.resolver();
        for backing in [Backing::Scattered, Backing::Contiguous] {
            let slots = ram.create(w, h, 2, backing).unwrap();
            for slot in 0..2 {
                let px = pattern((w * h * 4) as usize, slot as u8 * 7 + 1);
                ram.draw(&slots, slot, &px).unwrap();
                let r = resolver.resolve(slots.ids[slot]).unwrap();
                assert_eq!((r.layout.format, r.layout.width, r.layout.height), (PixelFormat::Bgrx, w, h));
                assert_eq!(r.layout.strides[0], (w * 4) as u64);
                assert!(r.data[..] == px[..], "{backing:?} slot {slot}");
            }
            ram.free(&slots);
            assert!(resolver.resolve(slots.ids[0]).is_err(), "unref'd");
        }
    }

    #[test]
    fn flips_show_the_resource_and_carry_the_time() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ram, src) = start(dir.path(), 1, 16 * 16 * 4).unwrap();
        let slots = ram.create(16, 16, 1, Backing::Contiguous).unwrap();
        let rx = src.watch(0).unwrap();
        assert!(src.watch(1).is_none());
        assert!(src.picture(0).is_err(), "nothing shown yet");
        let before = monotonic_ns();
        let f = src.flip(slots.ids[0]);
        assert_eq!(f.seq, 1);
        assert!(f.at_ns >= before && f.at_ns <= monotonic_ns());
        assert_eq!(*rx.borrow(), f);
        assert_eq!(src.picture(0).unwrap().layout.width, 16);
        src.blank();
        assert!(src.picture(0).is_err());
    }
}

/// What the host's read of one resource costs alone, against a memcpy of
/// the frame: `cargo nextest run --release -p hxfr-bench --run-ignored
/// ignored-only --no-capture gather_cost` (a measurement, not a check).
#[cfg(test)]
mod timing {
    use super::*;

    #[test]
    #[ignore = "a measurement: run by hand, in release"]
    fn gather_cost() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        for (w, h) in [(1280u32, 720u32), (1920, 1080), (3840, 2160)] {
            let bytes = (w * h * 4) as usize;
            let mut ram = GuestRam::new(dir.path(), 2, bytes).unwrap();
            let r = ram.resolver();
            let px = vec![7u8; bytes];
            for b in [Backing::Scattered, Backing::Contiguous] {
                let s = ram.create(w, h, 1, b).unwrap();
                ram.draw(&s, 0, &px).unwrap();
                let mut t = Vec::new();
                for _ in 0..40 {
                    let t0 = std::time::Instant::now();
                    let d = r.resolve(s.ids[0]).unwrap();
                    std::hint::black_box(d.data[bytes - 1]);
                    t.push(t0.elapsed().as_secs_f64() * 1e3);
                    drop(d);
                }
                t.sort_by(f64::total_cmp);
                let mut dst = vec![0u8; bytes];
                let mut m = Vec::new();
                for _ in 0..40 {
                    let t0 = std::time::Instant::now();
                    dst.copy_from_slice(&px);
                    std::hint::black_box(dst[bytes - 1]);
                    m.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                m.sort_by(f64::total_cmp);
                println!(
                    "{w}x{h} {b:?}: resolve min {:.3} p50 {:.3} ms; memcpy min {:.3} p50 {:.3} ms",
                    t[0], t[20], m[0], m[20]
                );
                ram.free(&s);
            }
        }
    }
}
