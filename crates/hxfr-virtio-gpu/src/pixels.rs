//! Reading a resource's pixels by id from any thread: the zero-copy seam.
//!
//! [`Resources::snapshot`] resolves an id to [`ResourcePixels`]: the pixels
//! in the resource's backing pages in guest RAM, read where they lie when
//! the backing maps to one contiguous host range (zero copy), else copied
//! once into one buffer. The value owns what keeps its bytes valid — the
//! guest memory map it resolved against (so a region the VMM unmaps
//! meanwhile stays mapped until the value drops) and the resource's extent
//! list — so it can be handed to an encoder on another thread, e.g. as
//! `bytes::Bytes::from_owner(pixels)`.
//!
//! A resource the guest unrefs while a snapshot lives is gone from the
//! table (later snapshots fail) but the snapshot still reads guest RAM,
//! never freed host memory: the host holds no copy to free. The guest may
//! reuse those pages, so a late reader can see newer bytes; never another
//! process's memory.
//!
//! Adapting to `hxfr_host`'s resolver is a few lines:
//!
//! ```ignore
//! let px = resources.snapshot(id)?;
//! let format = PixelFormat::from_fourcc(Fourcc(px.drm_fourcc())).ok_or(..)?;
//! let layout = Layout { format, width: px.width(), height: px.height(),
//!                       offsets: [0, 0], strides: [px.stride() as u64, 0] };
//! Resolved { data: Bytes::from_owner(px), layout }
//! ```

use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion};

use crate::device::lock;
use crate::resources::{Backing, Format, GpuError, ResourceTable};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("resource {0} not found")]
    NotFound(u32),
    #[error("resource {0} has no backing attached")]
    NoBacking(u32),
    #[error("no guest memory (the VMM is not connected)")]
    NoMemory,
    #[error("resource {id}: {err}")]
    Read { id: u32, err: GpuError },
}

/// The guest memory the device works on, replaced when the VMM sends a new
/// memory map or reconnects.
pub type SharedMemory = Arc<RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>>;

/// A handle on a device's resources for readers on other threads. Clones
/// share one pool of copy buffers.
#[derive(Clone)]
pub struct Resources {
    table: Arc<Mutex<ResourceTable>>,
    mem: SharedMemory,
    pool: Arc<BufferPool>,
}

impl Resources {
    pub fn new(table: Arc<Mutex<ResourceTable>>, mem: SharedMemory) -> Resources {
        Resources { table, mem, pool: Arc::default() }
    }

    /// The pixels of resource `id` now (see the module doc). Holds the
    /// table's lock only to look the resource up.
    pub fn snapshot(&self, id: u32) -> Result<ResourcePixels, SnapshotError> {
        let res = lock(&self.table).get(id).cloned().ok_or(SnapshotError::NotFound(id))?;
        let backing = res.backing.clone().ok_or(SnapshotError::NoBacking(id))?;
        let mem = {
            let m = self.mem.read().unwrap_or_else(|e| e.into_inner());
            m.as_ref().ok_or(SnapshotError::NoMemory)?.memory().into_inner()
        };
        let size = res.size();
        let data = match contiguous(&mem, &backing, size) {
            Some(ptr) => Data::Mapped(ptr),
            None => {
                // size ≤ the 256 MiB per-resource bound, checked at creation.
                let mut buf = self.pool.take(size as usize);
                if let Err(err) = backing.read_at(&mem, 0, &mut buf) {
                    self.pool.give(buf);
                    return Err(SnapshotError::Read { id, err });
                }
                Data::Copied(buf, self.pool.clone())
            }
        };
        Ok(ResourcePixels {
            id,
            format: res.format,
            width: res.width,
            height: res.height,
            stride: res.stride(),
            len: size as usize,
            data,
            _backing: backing,
            _mem: mem,
        })
    }
}

/// The host address of the backing's first `size` bytes if they lie in one
/// contiguous host range.
fn contiguous(mem: &GuestMemoryMmap, backing: &Backing, size: u64) -> Option<*const u8> {
    let mut start: Option<*const u8> = None;
    let mut next: usize = 0; // host address just past what is covered so far
    let mut left = size;
    for e in backing.extents() {
        if left == 0 {
            break;
        }
        let want = (e.length as u64).min(left) as usize;
        let mut contiguous = true;
        let done = mem.try_access(want, GuestAddress(e.addr), |_, count, at, region| {
            let host = region.get_host_address(at)?;
            match start {
                None => start = Some(host),
                Some(_) if host as usize != next => contiguous = false,
                Some(_) => {}
            }
            next = host as usize + count;
            // Stop walking as soon as the range is known to be scattered.
            Ok(if contiguous { count } else { 0 })
        });
        if !contiguous || done.ok() != Some(want) {
            return None;
        }
        left -= want as u64;
    }
    if left == 0 { start } else { None }
}

enum Data {
    /// Points into a mapping of `_mem`.
    Mapped(*const u8),
    /// A copy, its buffer going back to the pool when done.
    Copied(Vec<u8>, Arc<BufferPool>),
}

/// Most bytes of copy buffers kept for reuse: a few 4K frames. Reusing a
/// buffer saves allocating and zeroing (page-faulting) one per frame, about
/// 40% of a scattered snapshot's cost.
const POOL_BYTES: usize = 128 << 20;

/// Copy buffers of dropped snapshots, reused by later ones.
#[derive(Default)]
struct BufferPool {
    bufs: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A buffer of `size` bytes (contents unspecified: the caller overwrites all).
    fn take(&self, size: usize) -> Vec<u8> {
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        match bufs.iter().position(|b| b.capacity() >= size) {
            Some(i) => {
                let mut b = bufs.swap_remove(i);
                b.resize(size, 0); // zeroes only growth within capacity
                b
            }
            None => vec![0; size],
        }
    }

    fn give(&self, buf: Vec<u8>) {
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = bufs.iter().map(Vec::capacity).sum();
        if held + buf.capacity() <= POOL_BYTES {
            bufs.push(buf);
        }
    }
}

/// A resource's pixels, packed rows of `stride` bytes (`width × 4` for a 2D
/// resource), `height` rows, in [`Format`]. Derefs to the bytes.
pub struct ResourcePixels {
    id: u32,
    format: Format,
    width: u32,
    height: u32,
    stride: u32,
    len: usize,
    data: Data,
    // Keep the extents and the guest mappings `data` may point into.
    _backing: Arc<Backing>,
    _mem: Arc<GuestMemoryMmap>,
}

// SAFETY: the only non-Send/Sync field is `Data::Mapped`'s pointer, which
// points into a guest-memory mapping owned (through `_mem`) by this value
// and is only ever read; reading it from another thread is what the
// mapping is for.
unsafe impl Send for ResourcePixels {}
// SAFETY: as for Send: shared access only reads the mapping.
unsafe impl Sync for ResourcePixels {}

impl ResourcePixels {
    pub fn resource_id(&self) -> u32 {
        self.id
    }
    pub fn format(&self) -> Format {
        self.format
    }
    /// The DRM fourcc of [`ResourcePixels::format`] (`XR24` for B8G8R8X8).
    pub fn drm_fourcc(&self) -> u32 {
        self.format.drm_fourcc()
    }
    pub fn width(&self) -> u32 {
        self.width
    }
    pub fn height(&self) -> u32 {
        self.height
    }
    pub fn stride(&self) -> u32 {
        self.stride
    }
    /// Whether the bytes are read in place from guest RAM (no copy made).
    pub fn is_zero_copy(&self) -> bool {
        matches!(self.data, Data::Mapped(_))
    }
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            // SAFETY: `contiguous` found `len` bytes at `p` inside regions of
            // `_mem`, which this value owns, so the mapping outlives the
            // borrow. u8 has no invalid values. The guest may write these
            // pages while we read (as with any shared-memory frame): a reader
            // may see a torn frame, never memory outside the mapping.
            Data::Mapped(p) => unsafe { std::slice::from_raw_parts(*p, self.len) },
            Data::Copied(v, _) => v,
        }
    }
}

impl Drop for ResourcePixels {
    fn drop(&mut self) {
        if let Data::Copied(buf, pool) = &mut self.data {
            pool.give(std::mem::take(buf));
        }
    }
}

impl AsRef<[u8]> for ResourcePixels {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::ops::Deref for ResourcePixels {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::fmt::Debug for ResourcePixels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourcePixels")
            .field("id", &self.id)
            .field("format", &self.format)
            .field("size", &(self.width, self.height))
            .field("stride", &self.stride)
            .field("zero_copy", &self.is_zero_copy())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MemEntry;
    use crate::resources::Limits;
    use vm_memory::Bytes;

    fn setup() -> (Resources, GuestMemoryAtomic<GuestMemoryMmap>) {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 20), 1 << 20)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem);
        let table = Arc::new(Mutex::new(ResourceTable::new(Limits::default())));
        (Resources::new(table, Arc::new(RwLock::new(Some(atomic.clone())))), atomic)
    }

    fn attach(r: &Resources, mem: &GuestMemoryMmap, id: u32, w: u32, h: u32, extents: &[(u64, u32)]) {
        let mut t = lock(&r.table);
        t.create_2d(id, 2, w, h).unwrap();
        let e: Vec<_> = extents.iter().map(|&(addr, length)| MemEntry { addr, length }).collect();
        t.attach_backing(id, &e, mem).unwrap();
    }

    #[test]
    fn contiguous_backing_is_read_in_place() {
        let (r, atomic) = setup();
        let mem = atomic.memory();
        let pattern: Vec<u8> = (0..64u32 * 32 * 4).map(|i| i as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x4000)).unwrap();
        // Adjacent extents, page by page, as a driver with contiguous pages sends them.
        let extents: Vec<_> = (0..2).map(|i| (0x4000 + i * 4096, 4096)).collect();
        attach(&r, &mem, 1, 64, 32, &extents);
        let px = r.snapshot(1).unwrap();
        assert!(px.is_zero_copy());
        assert_eq!((px.width(), px.height(), px.stride()), (64, 32, 256));
        assert_eq!(px.drm_fourcc(), u32::from_le_bytes(*b"XR24"));
        assert_eq!(&px[..], &pattern[..]);
        // The guest draws: the snapshot sees it (it is the backing itself).
        mem.write_slice(&[0xaa; 4], GuestAddress(0x4000)).unwrap();
        assert_eq!(&px[..4], &[0xaa; 4]);
    }

    #[test]
    fn scattered_backing_is_copied_in_order() {
        let (r, atomic) = setup();
        let mem = atomic.memory();
        mem.write_slice(&[1; 4096], GuestAddress(0x8000)).unwrap();
        mem.write_slice(&[2; 4096], GuestAddress(0x2000)).unwrap();
        // Crossing into the second region is also two host ranges.
        mem.write_slice(&[3; 4096], GuestAddress((1 << 20) - 2048)).unwrap();
        attach(&r, &mem, 1, 32, 96, &[(0x8000, 4096), (0x2000, 4096), ((1 << 20) - 2048, 4096)]);
        let px = r.snapshot(1).unwrap();
        assert!(!px.is_zero_copy());
        assert_eq!(px.len(), 32 * 96 * 4);
        assert!(px[..4096].iter().all(|&b| b == 1));
        assert!(px[4096..8192].iter().all(|&b| b == 2));
        assert!(px[8192..].iter().all(|&b| b == 3));
    }

    #[test]
    fn copy_buffers_are_reused() {
        let (r, atomic) = setup();
        let mem = atomic.memory();
        mem.write_slice(&[5; 8192], GuestAddress(0x9000)).unwrap();
        attach(&r, &mem, 1, 32, 64, &[(0x9000, 4096), (0x2000, 4096)]);
        let first = r.snapshot(1).unwrap();
        let ptr = first.as_ptr();
        drop(first);
        let again = r.snapshot(1).unwrap();
        assert_eq!(again.as_ptr(), ptr, "the dropped snapshot's buffer is reused");
        assert!(again[..4096].iter().all(|&b| b == 5));
        // Both live at once: two buffers.
        let other = r.clone().snapshot(1).unwrap();
        assert_ne!(other.as_ptr(), again.as_ptr());
        assert_eq!(&other[..], &again[..]);
    }

    #[test]
    fn a_snapshot_outlives_unref_and_a_new_memory_map() {
        let (r, atomic) = setup();
        let mem = atomic.memory();
        mem.write_slice(&[7; 1024], GuestAddress(0)).unwrap();
        attach(&r, &mem, 1, 16, 16, &[(0, 4096)]);
        let px = r.snapshot(1).unwrap();
        // What the host's resolver does with it.
        let bytes = bytes::Bytes::from_owner(px);
        lock(&r.table).unref(1).unwrap();
        assert_eq!(r.snapshot(1).unwrap_err(), SnapshotError::NotFound(1));
        // The VMM replaces the memory map: the old regions stay mapped
        // while the snapshot holds them.
        drop(mem);
        atomic.lock().unwrap().replace(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap());
        let t = std::thread::spawn(move || bytes.iter().all(|&b| b == 7));
        assert!(t.join().unwrap());
    }

    #[test]
    fn errors() {
        let (r, atomic) = setup();
        lock(&r.table).create_2d(1, 2, 4, 4).unwrap();
        assert_eq!(r.snapshot(1).unwrap_err(), SnapshotError::NoBacking(1));
        assert_eq!(r.snapshot(2).unwrap_err(), SnapshotError::NotFound(2));
        attach(&r, &atomic.memory(), 2, 4, 4, &[(0, 64)]);
        *r.mem.write().unwrap() = None;
        assert_eq!(r.snapshot(2).unwrap_err(), SnapshotError::NoMemory);
    }
}
