//! The resource table: 2D resources, their backing in guest memory, and the
//! scanouts showing them. Every number comes from the guest and is checked
//! here, with fixed bounds on sizes, counts and totals (see [`Limits`]).
//!
//! The device never copies a resource to the host: a resource's pixels are
//! its backing pages in guest RAM, read when someone needs them (a flush to
//! QEMU's display, a frame by id). So creating resources costs the host only
//! this table's bookkeeping, and the byte limits bound what readers may be
//! asked to read, not what the device allocates.

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::protocol::{MAX_SCANOUTS, MemEntry, Rect, Response};

/// Bytes per pixel of every format a 2D resource can have.
pub const BYTES_PER_PIXEL: u32 = 4;

/// The 2D formats of `enum virtio_gpu_formats`, all four bytes a pixel.
/// Names give the byte order in memory, first byte first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    B8G8R8A8 = 1,
    B8G8R8X8 = 2,
    A8R8G8B8 = 3,
    X8R8G8B8 = 4,
    R8G8B8A8 = 67,
    X8B8G8R8 = 68,
    A8B8G8R8 = 121,
    R8G8B8X8 = 134,
}

impl Format {
    pub fn from_virtio(v: u32) -> Option<Format> {
        Some(match v {
            1 => Format::B8G8R8A8,
            2 => Format::B8G8R8X8,
            3 => Format::A8R8G8B8,
            4 => Format::X8R8G8B8,
            67 => Format::R8G8B8A8,
            68 => Format::X8B8G8R8,
            121 => Format::A8B8G8R8,
            134 => Format::R8G8B8X8,
            _ => return None,
        })
    }

    pub fn virtio(self) -> u32 {
        self as u32
    }

    /// The DRM fourcc with the same memory layout (little-endian chars, as
    /// `drm_fourcc.h` and `hxfr_proto::Fourcc` encode them). B8G8R8X8, the
    /// format Linux uses for dumb buffers, is `XR24`.
    pub fn drm_fourcc(self) -> u32 {
        let c = match self {
            Format::B8G8R8A8 => b"AR24",
            Format::B8G8R8X8 => b"XR24",
            Format::A8R8G8B8 => b"BA24",
            Format::X8R8G8B8 => b"BX24",
            Format::R8G8B8A8 => b"AB24",
            Format::X8B8G8R8 => b"RX24",
            Format::A8B8G8R8 => b"RA24",
            Format::R8G8B8X8 => b"XB24",
        };
        u32::from_le_bytes(*c)
    }

    /// Where blue, green and red lie in a pixel's four bytes.
    pub fn bgr_offsets(self) -> [usize; 3] {
        match self {
            Format::B8G8R8A8 | Format::B8G8R8X8 => [0, 1, 2],
            Format::A8R8G8B8 | Format::X8R8G8B8 => [3, 2, 1],
            Format::R8G8B8A8 | Format::R8G8B8X8 => [2, 1, 0],
            Format::X8B8G8R8 | Format::A8B8G8R8 => [1, 2, 3],
        }
    }
}

/// Bounds on what a guest can make the device hold. The defaults fit any
/// desktop up to 16K × 16K and keep a hostile guest's bookkeeping small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest width or height of a resource.
    pub max_dim: u32,
    /// Largest `width × height × 4` of one resource.
    pub max_resource_bytes: u64,
    /// Largest sum of all resources' bytes.
    pub max_total_bytes: u64,
    /// Most resources alive at once.
    pub max_resources: usize,
    /// Most backing extents in one RESOURCE_ATTACH_BACKING.
    pub max_entries: u32,
    /// Most backing extents held over all resources (16 bytes each).
    pub max_total_entries: usize,
    /// Scanouts the device offers (1..=16).
    pub num_scanouts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_dim: 16384,
            max_resource_bytes: 256 << 20,
            max_total_bytes: 4 << 30,
            max_resources: 4096,
            max_entries: 16384,
            max_total_entries: 1 << 20,
            num_scanouts: MAX_SCANOUTS as u32,
        }
    }
}

/// Why a command failed; each maps to the virtio-gpu error response.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GpuError {
    #[error("no resource {0}")]
    NoResource(u32),
    #[error("resource id {0} is in use or reserved")]
    ResourceIdTaken(u32),
    #[error("scanout {0} does not exist")]
    NoScanout(u32),
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    #[error("limit reached: {0}")]
    OutOfMemory(String),
    #[error("{0}")]
    Unspec(String),
}

impl GpuError {
    pub fn response(&self) -> Response {
        match self {
            GpuError::NoResource(_) | GpuError::ResourceIdTaken(_) => Response::ErrInvalidResourceId,
            GpuError::NoScanout(_) => Response::ErrInvalidScanoutId,
            GpuError::InvalidParameter(_) => Response::ErrInvalidParameter,
            GpuError::OutOfMemory(_) => Response::ErrOutOfMemory,
            GpuError::Unspec(_) => Response::ErrUnspec,
        }
    }
}

/// A resource's backing: guest-physical extents, each checked inside guest
/// memory when attached, together at least as long as the resource.
#[derive(Debug)]
pub struct Backing {
    extents: Box<[MemEntry]>,
    /// `starts[i]`: the byte of the resource where extent `i` begins.
    starts: Box<[u64]>,
    len: u64,
}

impl Backing {
    pub fn extents(&self) -> &[MemEntry] {
        &self.extents
    }

    /// Total bytes of all extents.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `buf.len()` bytes starting at byte `offset` of the resource,
    /// through the extents, from `mem`. Fails if the range passes the
    /// backing's end or guest memory no longer holds an extent (the VMM
    /// may replace the memory map).
    pub fn read_at(&self, mem: &GuestMemoryMmap, offset: u64, buf: &mut [u8]) -> Result<(), GpuError> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(GpuError::InvalidParameter(format!(
                "read of {} bytes at {offset} past the backing's {} bytes",
                buf.len(),
                self.len
            )));
        }
        // The extent holding `offset`: the last one starting at or before it.
        let mut i = self.starts.partition_point(|&s| s <= offset).saturating_sub(1);
        let (mut off, mut done) = (offset, 0usize);
        while done < buf.len() {
            let (Some(e), Some(&start)) = (self.extents.get(i), self.starts.get(i)) else {
                return Err(GpuError::Unspec("backing ended early".into()));
            };
            let within = off - start;
            let n = ((e.length as u64 - within) as usize).min(buf.len() - done);
            let addr = GuestAddress(e.addr + within);
            mem.read_slice(&mut buf[done..done + n], addr)
                .map_err(|err| GpuError::Unspec(format!("backing at {addr:?} is not in guest memory: {err}")))?;
            done += n;
            off += n as u64;
            i += 1;
        }
        Ok(())
    }
}

/// One 2D resource.
#[derive(Debug, Clone)]
pub struct Resource {
    pub format: Format,
    pub width: u32,
    pub height: u32,
    /// The pixels, once attached. Shared so a reader keeps the extent list
    /// it resolved even if the guest detaches or unrefs meanwhile.
    pub backing: Option<Arc<Backing>>,
}

impl Resource {
    /// Bytes from one row to the next: 2D resources are packed.
    pub fn stride(&self) -> u32 {
        self.width * BYTES_PER_PIXEL
    }

    pub fn size(&self) -> u64 {
        self.stride() as u64 * self.height as u64
    }
}

/// What a scanout shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanout {
    pub resource_id: u32,
    /// The part of the resource shown, inside it.
    pub rect: Rect,
}

/// All resources and scanouts of one device.
#[derive(Debug)]
pub struct ResourceTable {
    limits: Limits,
    resources: HashMap<u32, Resource>,
    total_bytes: u64,
    total_entries: usize,
    scanouts: [Option<Scanout>; MAX_SCANOUTS],
}

impl ResourceTable {
    pub fn new(limits: Limits) -> Self {
        let limits = Limits { num_scanouts: limits.num_scanouts.clamp(1, MAX_SCANOUTS as u32), ..limits };
        ResourceTable {
            limits,
            resources: HashMap::new(),
            total_bytes: 0,
            total_entries: 0,
            scanouts: [None; MAX_SCANOUTS],
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Forgets every resource and scanout (the driver reset the device).
    pub fn clear(&mut self) {
        *self = ResourceTable::new(self.limits);
    }

    pub fn get(&self, id: u32) -> Option<&Resource> {
        self.resources.get(&id)
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    pub fn scanout(&self, scanout_id: u32) -> Option<Scanout> {
        self.scanouts.get(scanout_id as usize).copied().flatten()
    }

    fn resource(&self, id: u32) -> Result<&Resource, GpuError> {
        self.resources.get(&id).ok_or(GpuError::NoResource(id))
    }

    pub fn create_2d(&mut self, id: u32, format: u32, width: u32, height: u32) -> Result<(), GpuError> {
        if id == 0 || self.resources.contains_key(&id) {
            return Err(GpuError::ResourceIdTaken(id));
        }
        let format = Format::from_virtio(format)
            .ok_or_else(|| GpuError::InvalidParameter(format!("resource {id}: unknown format {format}")))?;
        let max = self.limits.max_dim;
        if width == 0 || height == 0 || width > max || height > max {
            return Err(GpuError::InvalidParameter(format!(
                "resource {id}: {width}x{height} outside 1x1..{max}x{max}"
            )));
        }
        // Both ≤ max_dim (a u32), so the product fits in u64.
        let bytes = width as u64 * height as u64 * BYTES_PER_PIXEL as u64;
        if bytes > self.limits.max_resource_bytes {
            return Err(GpuError::OutOfMemory(format!("resource {id}: {bytes} bytes")));
        }
        if self.resources.len() >= self.limits.max_resources {
            return Err(GpuError::OutOfMemory(format!("{} resources", self.resources.len())));
        }
        let total = self.total_bytes + bytes;
        if total > self.limits.max_total_bytes {
            return Err(GpuError::OutOfMemory(format!("{total} bytes of resources")));
        }
        self.total_bytes = total;
        self.resources.insert(id, Resource { format, width, height, backing: None });
        Ok(())
    }

    /// Frees a resource; scanouts showing it go blank. Readers holding its
    /// backing keep reading guest memory, which stays mapped.
    pub fn unref(&mut self, id: u32) -> Result<(), GpuError> {
        let res = self.resources.remove(&id).ok_or(GpuError::NoResource(id))?;
        self.total_bytes -= res.size();
        if let Some(b) = &res.backing {
            self.total_entries -= b.extents.len();
        }
        for s in self.scanouts.iter_mut() {
            if s.is_some_and(|s| s.resource_id == id) {
                *s = None;
            }
        }
        Ok(())
    }

    /// Attaches backing extents, each inside `mem`, together covering the resource.
    pub fn attach_backing(&mut self, id: u32, entries: &[MemEntry], mem: &GuestMemoryMmap) -> Result<(), GpuError> {
        let res = self.resource(id)?;
        if res.backing.is_some() {
            return Err(GpuError::Unspec(format!("resource {id} already has backing")));
        }
        if entries.is_empty() || entries.len() > self.limits.max_entries as usize {
            return Err(GpuError::InvalidParameter(format!("resource {id}: {} backing entries", entries.len())));
        }
        if self.total_entries + entries.len() > self.limits.max_total_entries {
            return Err(GpuError::OutOfMemory(format!("{} backing entries held", self.total_entries)));
        }
        let mut starts = Vec::with_capacity(entries.len());
        let mut len = 0u64;
        for e in entries {
            if e.length == 0 {
                return Err(GpuError::InvalidParameter(format!("resource {id}: empty backing extent")));
            }
            // check_range walks the regions: false for any byte outside guest
            // memory, including an end that wraps past u64::MAX.
            if e.addr.checked_add(e.length as u64).is_none()
                || !mem.check_range(GuestAddress(e.addr), e.length as usize)
            {
                return Err(GpuError::Unspec(format!(
                    "resource {id}: extent {:#x}+{} is outside guest memory",
                    e.addr, e.length
                )));
            }
            starts.push(len);
            // At most 2^32 entries of < 2^32 bytes each: no u64 overflow.
            len += e.length as u64;
        }
        if len < res.size() {
            return Err(GpuError::InvalidParameter(format!(
                "resource {id}: backing of {len} bytes is smaller than the resource's {}",
                res.size()
            )));
        }
        let backing = Backing { extents: entries.into(), starts: starts.into(), len };
        self.total_entries += entries.len();
        if let Some(r) = self.resources.get_mut(&id) {
            r.backing = Some(Arc::new(backing));
        }
        Ok(())
    }

    pub fn detach_backing(&mut self, id: u32) -> Result<(), GpuError> {
        let res = self.resources.get_mut(&id).ok_or(GpuError::NoResource(id))?;
        let b = res.backing.take().ok_or_else(|| GpuError::Unspec(format!("resource {id} has no backing")))?;
        self.total_entries -= b.extents.len();
        Ok(())
    }

    /// Points a scanout at a rect of a resource, or disables it (resource 0).
    pub fn set_scanout(&mut self, scanout_id: u32, resource_id: u32, rect: Rect) -> Result<Option<Scanout>, GpuError> {
        if scanout_id >= self.limits.num_scanouts {
            return Err(GpuError::NoScanout(scanout_id));
        }
        let slot = scanout_id as usize;
        if resource_id == 0 {
            self.scanouts[slot] = None;
            return Ok(None);
        }
        let res = self.resource(resource_id)?;
        if rect.is_empty() || !rect.inside(res.width, res.height) {
            return Err(GpuError::InvalidParameter(format!(
                "scanout {scanout_id}: {rect:?} is not inside resource {resource_id}'s {}x{}",
                res.width, res.height
            )));
        }
        let s = Scanout { resource_id, rect };
        self.scanouts[slot] = Some(s);
        Ok(Some(s))
    }

    /// Checks a flush and returns, for each scanout showing the resource,
    /// the part of the flushed rect it shows.
    pub fn flush(&self, resource_id: u32, rect: Rect) -> Result<Vec<(u32, Scanout)>, GpuError> {
        let res = self.resource(resource_id)?;
        if !rect.inside(res.width, res.height) {
            return Err(GpuError::InvalidParameter(format!(
                "flush {rect:?} is not inside resource {resource_id}'s {}x{}",
                res.width, res.height
            )));
        }
        Ok(self
            .scanouts
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = (*s)?;
                (s.resource_id == resource_id)
                    .then(|| (i as u32, Scanout { resource_id, rect: s.rect.intersect(&rect) }))
            })
            .filter(|(_, s)| !s.rect.is_empty())
            .collect())
    }

    /// Checks a TRANSFER_TO_HOST_2D. The device keeps no host copy (readers
    /// read the backing), so there is nothing to copy; the command is
    /// checked as QEMU would and answered.
    pub fn transfer_to_host_2d(&self, resource_id: u32, rect: Rect, offset: u64) -> Result<(), GpuError> {
        let res = self.resource(resource_id)?;
        if !rect.inside(res.width, res.height) {
            return Err(GpuError::InvalidParameter(format!("transfer {rect:?} outside resource {resource_id}")));
        }
        let Some(backing) = &res.backing else {
            return Err(GpuError::Unspec(format!("transfer to resource {resource_id} without backing")));
        };
        // The last byte the transfer would read: offset + (h-1)·stride + w·4.
        let last = (rect.height as u64).saturating_sub(1) * res.stride() as u64 + rect.width as u64 * 4;
        if offset.checked_add(last).is_none_or(|end| end > backing.len()) {
            return Err(GpuError::InvalidParameter(format!("transfer at offset {offset} past the backing")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(0x10_0000_0000), 1 << 20)]).unwrap()
    }

    fn table() -> ResourceTable {
        ResourceTable::new(Limits {
            max_resources: 4,
            max_total_bytes: 8 << 20,
            max_total_entries: 8,
            ..Limits::default()
        })
    }

    #[test]
    fn create_checks_ids_formats_and_sizes() {
        let mut t = table();
        assert_eq!(t.create_2d(0, 2, 64, 64), Err(GpuError::ResourceIdTaken(0)));
        t.create_2d(1, 2, 64, 64).unwrap();
        assert_eq!(t.create_2d(1, 2, 64, 64), Err(GpuError::ResourceIdTaken(1)));
        assert!(matches!(t.create_2d(2, 5, 64, 64), Err(GpuError::InvalidParameter(_))));
        assert!(matches!(t.create_2d(2, 2, 0, 64), Err(GpuError::InvalidParameter(_))));
        assert!(matches!(t.create_2d(2, 2, 16385, 1), Err(GpuError::InvalidParameter(_))));
        // 16384² × 4 is 1 GiB, over the 256 MiB per-resource bound.
        assert!(matches!(t.create_2d(2, 2, 16384, 16384), Err(GpuError::OutOfMemory(_))));
        // 8 MiB total: a second 1024×1024 (4 MiB) fits, a third does not.
        t.create_2d(2, 2, 1024, 1024).unwrap();
        assert!(matches!(t.create_2d(3, 2, 1024, 1024), Err(GpuError::OutOfMemory(_))));
        t.create_2d(3, 1, 8, 8).unwrap();
        t.create_2d(4, 134, 8, 8).unwrap();
        assert!(matches!(t.create_2d(5, 2, 8, 8), Err(GpuError::OutOfMemory(_))), "at most 4 resources");
        t.unref(2).unwrap();
        t.create_2d(5, 2, 1024, 1024).unwrap();
        assert_eq!(t.unref(2), Err(GpuError::NoResource(2)));
    }

    #[test]
    fn backing_is_checked_against_guest_memory() {
        let (mut t, m) = (table(), mem());
        t.create_2d(1, 2, 16, 16).unwrap(); // 1024 bytes
        let e = |addr, length| MemEntry { addr, length };
        assert_eq!(t.attach_backing(9, &[e(0, 1024)], &m), Err(GpuError::NoResource(9)));
        assert!(matches!(t.attach_backing(1, &[], &m), Err(GpuError::InvalidParameter(_))));
        assert!(matches!(t.attach_backing(1, &[e(0, 0), e(0, 1024)], &m), Err(GpuError::InvalidParameter(_))));
        // Past the end of the first region, in the hole, wrapping around.
        assert!(matches!(t.attach_backing(1, &[e((1 << 20) - 512, 1024)], &m), Err(GpuError::Unspec(_))));
        assert!(matches!(t.attach_backing(1, &[e(0x8000_0000, 1024)], &m), Err(GpuError::Unspec(_))));
        assert!(matches!(t.attach_backing(1, &[e(u64::MAX - 10, 1024)], &m), Err(GpuError::Unspec(_))));
        // Too short in total.
        assert!(matches!(t.attach_backing(1, &[e(0, 512), e(4096, 511)], &m), Err(GpuError::InvalidParameter(_))));
        // Two extents, one in each region.
        t.attach_backing(1, &[e(0x1000, 512), e(0x10_0000_0000, 512)], &m).unwrap();
        assert!(matches!(t.attach_backing(1, &[e(0, 1024)], &m), Err(GpuError::Unspec(_))), "already attached");
        t.detach_backing(1).unwrap();
        assert!(matches!(t.detach_backing(1), Err(GpuError::Unspec(_))));
        // More extents than the device holds in total (8).
        let many: Vec<_> = (0..9).map(|i| e(i * 128, 128)).collect();
        assert!(matches!(t.attach_backing(1, &many, &m), Err(GpuError::OutOfMemory(_))));
        t.attach_backing(1, &many[..8], &m).unwrap();
        t.create_2d(2, 2, 1, 1).unwrap();
        assert!(matches!(t.attach_backing(2, &[e(0, 4)], &m), Err(GpuError::OutOfMemory(_))));
        t.unref(1).unwrap();
        t.attach_backing(2, &[e(0, 4)], &m).unwrap();
    }

    #[test]
    fn reads_go_through_the_extents() {
        let (mut t, m) = (table(), mem());
        t.create_2d(1, 2, 2, 2).unwrap(); // 16 bytes
        m.write_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], GuestAddress(0x100)).unwrap();
        m.write_slice(&[11, 12, 13, 14, 15, 16], GuestAddress(0x10_0000_0000)).unwrap();
        let entries = [MemEntry { addr: 0x100, length: 10 }, MemEntry { addr: 0x10_0000_0000, length: 6 }];
        t.attach_backing(1, &entries, &m).unwrap();
        let b = t.get(1).unwrap().backing.clone().unwrap();
        let mut buf = [0u8; 16];
        b.read_at(&m, 0, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        let mut buf = [0u8; 4];
        b.read_at(&m, 8, &mut buf).unwrap();
        assert_eq!(buf, [9, 10, 11, 12]);
        assert!(b.read_at(&m, 13, &mut buf).is_err());
        assert!(b.read_at(&m, u64::MAX, &mut buf).is_err());
        // After unref the reader's backing still reads guest memory.
        t.unref(1).unwrap();
        b.read_at(&m, 12, &mut buf).unwrap();
        assert_eq!(buf, [13, 14, 15, 16]);
    }

    #[test]
    fn scanouts_and_flushes() {
        let mut t = ResourceTable::new(Limits { num_scanouts: 2, ..Limits::default() });
        t.create_2d(1, 2, 100, 50).unwrap();
        let r = |x, y, width, height| Rect { x, y, width, height };
        assert_eq!(t.set_scanout(2, 1, r(0, 0, 100, 50)), Err(GpuError::NoScanout(2)));
        assert_eq!(t.set_scanout(0, 7, r(0, 0, 100, 50)), Err(GpuError::NoResource(7)));
        assert!(matches!(t.set_scanout(0, 1, r(1, 0, 100, 50)), Err(GpuError::InvalidParameter(_))));
        assert!(matches!(t.set_scanout(0, 1, r(0, 0, 0, 50)), Err(GpuError::InvalidParameter(_))));
        t.set_scanout(0, 1, r(0, 0, 100, 50)).unwrap();
        t.set_scanout(1, 1, r(50, 0, 50, 50)).unwrap();
        assert!(matches!(t.flush(1, r(0, 0, 101, 1)), Err(GpuError::InvalidParameter(_))));
        assert_eq!(t.flush(2, r(0, 0, 1, 1)), Err(GpuError::NoResource(2)));
        let f = t.flush(1, r(40, 10, 20, 5)).unwrap();
        assert_eq!(
            f,
            vec![
                (0, Scanout { resource_id: 1, rect: r(40, 10, 20, 5) }),
                (1, Scanout { resource_id: 1, rect: r(50, 10, 10, 5) })
            ]
        );
        assert_eq!(t.flush(1, r(0, 0, 10, 10)).unwrap().len(), 1);
        // Disabling with resource 0 ignores the rect; unref blanks the rest.
        t.set_scanout(0, 0, r(9, 9, 9999, 0)).unwrap();
        assert_eq!(t.scanout(0), None);
        t.unref(1).unwrap();
        assert_eq!(t.scanout(1), None);
    }

    #[test]
    fn transfers_are_checked() {
        let (mut t, m) = (table(), mem());
        t.create_2d(1, 2, 16, 16).unwrap();
        let full = Rect { x: 0, y: 0, width: 16, height: 16 };
        assert!(matches!(t.transfer_to_host_2d(1, full, 0), Err(GpuError::Unspec(_))));
        t.attach_backing(1, &[MemEntry { addr: 0, length: 1024 }], &m).unwrap();
        t.transfer_to_host_2d(1, full, 0).unwrap();
        assert!(t.transfer_to_host_2d(1, full, 4).is_err());
        assert!(t.transfer_to_host_2d(1, Rect { x: 8, y: 8, width: 8, height: 8 }, u64::MAX).is_err());
        assert!(t.transfer_to_host_2d(1, Rect { x: 8, y: 8, width: 9, height: 8 }, 0).is_err());
    }

    #[test]
    fn formats() {
        for v in [1, 2, 3, 4, 67, 68, 121, 134] {
            assert_eq!(Format::from_virtio(v).unwrap().virtio(), v);
        }
        assert_eq!(Format::B8G8R8X8.drm_fourcc(), u32::from_le_bytes(*b"XR24"));
        assert_eq!(Format::from_virtio(0), None);
    }
}
