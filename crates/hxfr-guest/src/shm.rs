//! The guest's side of shared-memory frames: the region, its areas, and
//! finding ivshmem's BAR 2 in sysfs.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

/// ivshmem-plain's PCI ids.
const IVSHMEM_VENDOR: &str = "0x1af4";
const IVSHMEM_DEVICE: &str = "0x1110";

/// Finds the shared memory of the first ivshmem-plain device: its BAR 2,
/// exposed as `resource2` under `<sysfs>/bus/pci/devices/*/`.
pub fn find_ivshmem(sysfs: &Path) -> Option<PathBuf> {
    let mut devices: Vec<_> =
        std::fs::read_dir(sysfs.join("bus/pci/devices")).ok()?.flatten().map(|e| e.path()).collect();
    devices.sort();
    devices.into_iter().find_map(|d| {
        let id = |f: &str| std::fs::read_to_string(d.join(f)).map(|s| s.trim().to_ascii_lowercase()).ok();
        (id("vendor")? == IVSHMEM_VENDOR && id("device")? == IVSHMEM_DEVICE && d.join("resource2").exists())
            .then(|| d.join("resource2"))
    })
}

/// The region, mapped read-write and cut into equal areas, one per frame in flight.
pub struct Region {
    map: MmapMut,
    pub path: PathBuf,
    pub area_size: usize,
    pub areas: usize,
}

impl Region {
    /// Maps `path` and cuts it into up to `max_areas` areas of `frame_bytes`
    /// (page-aligned). Fails when not even one frame fits.
    pub fn open(path: &Path, frame_bytes: usize, max_areas: usize) -> std::io::Result<Region> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        // SAFETY: a shared mapping of a file (or PCI BAR) that the host only
        // reads; we write an area only while no request names it.
        let map = unsafe { MmapMut::map_mut(&file)? };
        let area_size = frame_bytes.next_multiple_of(4096);
        let areas = (map.len() / area_size.max(1)).min(max_areas);
        if areas == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} holds {} bytes, less than one {}-byte frame", path.display(), map.len(), frame_bytes),
            ));
        }
        Ok(Region { map, path: path.to_owned(), area_size, areas })
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Area `i` as a writable slice, and its offset in the region.
    pub fn area(&mut self, i: usize) -> (u64, &mut [u8]) {
        let off = i * self.area_size;
        (off as u64, &mut self.map[off..off + self.area_size])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ivshmem_bar2_in_a_sysfs_tree() {
        let root = tempfile::tempdir().unwrap();
        let dev = |name: &str, vendor: &str, device: &str, bar: bool| {
            let d = root.path().join("bus/pci/devices").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(d.join("device"), format!("{device}\n")).unwrap();
            if bar {
                std::fs::write(d.join("resource2"), b"").unwrap();
            }
        };
        dev("0000:00:02.0", "0x1af4", "0x1050", true); // virtio-gpu
        dev("0000:00:03.0", "0x8086", "0x1110", true);
        assert_eq!(find_ivshmem(root.path()), None);
        dev("0000:00:04.0", "0x1af4", "0x1110", true);
        assert_eq!(find_ivshmem(root.path()), Some(root.path().join("bus/pci/devices/0000:00:04.0/resource2")));
        assert_eq!(find_ivshmem(Path::new("/nonexistent")), None);
    }

    #[test]
    fn region_is_cut_into_areas_that_fit() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(10 * 4096).unwrap();
        let r = Region::open(f.path(), 3 * 4096 + 1, 8).unwrap();
        assert_eq!((r.area_size, r.areas), (4 * 4096, 2));
        assert!(Region::open(f.path(), 11 * 4096, 8).is_err());
    }
}
