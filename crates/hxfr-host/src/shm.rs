//! The shared-memory region (ivshmem's BAR 2 on the guest side; a file on the host).

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

/// A read-only mapping of the file the guest also maps. The host never writes
/// to it: the guest owns the contents, the protocol only hands areas back.
pub struct ShmRegion {
    map: MmapRaw,
    path: PathBuf,
}

impl ShmRegion {
    pub fn open(path: &Path) -> std::io::Result<ShmRegion> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "shared-memory file is empty"));
        }
        let map = MmapOptions::new().map_raw_read_only(&file)?;
        Ok(ShmRegion { map, path: path.to_owned() })
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole region as bytes.
    ///
    /// The guest may write to the region at any time (it is another process or
    /// a VM); the protocol says it must not touch an area until its answer
    /// arrives. A guest that breaks that rule only garbles its own picture:
    /// every offset we read at is checked against the region's length first.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is valid for its whole length while self lives,
        // and it is only ever read through this slice.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }
}
