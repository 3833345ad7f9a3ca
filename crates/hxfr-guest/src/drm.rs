//! Resource mode: the virtio-gpu resource id behind a DMA-BUF (zero copy).
//!
//! DMA-BUF fd → DRM_IOCTL_PRIME_FD_TO_HANDLE (a GEM handle on our render
//! node) → DRM_IOCTL_VIRTGPU_RESOURCE_INFO (the device-wide `res_handle`,
//! which is what the host knows) → DRM_IOCTL_GEM_CLOSE. The GEM handle itself
//! is not the resource id. The render node is chosen by PCI vendor (virtio,
//! 0x1af4), not by a fixed path, because a VM may also have other GPUs.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

const VIRTIO_VENDOR: &str = "0x1af4";

#[repr(C)]
#[derive(Default)]
struct DrmPrimeHandle {
    handle: u32,
    flags: u32,
    fd: i32,
}

#[repr(C)]
#[derive(Default)]
struct DrmVirtgpuResourceInfo {
    bo_handle: u32,
    res_handle: u32,
    size: u32,
    blob_mem: u32,
}

#[repr(C)]
#[derive(Default)]
struct DrmGemClose {
    handle: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct DrmModeCreateDumb {
    height: u32,
    width: u32,
    bpp: u32,
    flags: u32,
    handle: u32,
    pitch: u32,
    size: u64,
}

#[repr(C)]
#[derive(Default)]
struct DrmModeMapDumb {
    handle: u32,
    pad: u32,
    offset: u64,
}

#[repr(C)]
#[derive(Default)]
struct DrmModeDestroyDumb {
    handle: u32,
}

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((b'd' as u64) << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READWRITE: u64 = 3;
const DRM_COMMAND_BASE: u64 = 0x40;

pub const DRM_IOCTL_PRIME_HANDLE_TO_FD: u64 = ioc(IOC_READWRITE, 0x2d, size_of::<DrmPrimeHandle>());
pub const DRM_IOCTL_MODE_CREATE_DUMB: u64 = ioc(IOC_READWRITE, 0xb2, size_of::<DrmModeCreateDumb>());
pub const DRM_IOCTL_MODE_MAP_DUMB: u64 = ioc(IOC_READWRITE, 0xb3, size_of::<DrmModeMapDumb>());
pub const DRM_IOCTL_MODE_DESTROY_DUMB: u64 = ioc(IOC_READWRITE, 0xb4, size_of::<DrmModeDestroyDumb>());
pub const DRM_IOCTL_PRIME_FD_TO_HANDLE: u64 = ioc(IOC_READWRITE, 0x2e, size_of::<DrmPrimeHandle>());
pub const DRM_IOCTL_GEM_CLOSE: u64 = ioc(IOC_WRITE, 0x09, size_of::<DrmGemClose>());
pub const DRM_IOCTL_VIRTGPU_RESOURCE_INFO: u64 =
    ioc(IOC_READWRITE, DRM_COMMAND_BASE + 0x05, size_of::<DrmVirtgpuResourceInfo>());

#[derive(Debug)]
pub enum DrmError {
    NoVirtioGpu(String),
    Open(PathBuf, std::io::Error),
    Ioctl(&'static str, std::io::Error),
}

impl std::fmt::Display for DrmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrmError::NoVirtioGpu(why) => write!(f, "no virtio-gpu render node: {why}"),
            DrmError::Open(p, e) => write!(f, "cannot open {}: {e}", p.display()),
            DrmError::Ioctl(which, e) => write!(f, "{which} failed: {e}"),
        }
    }
}

impl std::error::Error for DrmError {}

/// Finds the render node of the virtio-gpu device: the `renderD*` entry in
/// `class_drm` (normally /sys/class/drm) whose `device/vendor` is 0x1af4,
/// as a path under `dev_dri` (normally /dev/dri).
pub fn find_render_node(class_drm: &Path, dev_dri: &Path) -> Result<PathBuf, DrmError> {
    find_node(class_drm, dev_dri, "renderD*", &|n| n.starts_with("renderD"))
}

/// Finds the primary node of the virtio-gpu device (`cardN`, which can make
/// dumb buffers and set modes), as [`find_render_node`] finds its render node.
pub fn find_card(class_drm: &Path, dev_dri: &Path) -> Result<PathBuf, DrmError> {
    // `card0-Virtual-1` and the like are its connectors, not nodes.
    find_node(class_drm, dev_dri, "card*", &|n| n.starts_with("card") && !n.contains('-'))
}

/// The first node (in name order) that `is_kind` takes whose device is virtio's.
fn find_node(
    class_drm: &Path,
    dev_dri: &Path,
    kind: &str,
    is_kind: &dyn Fn(&str) -> bool,
) -> Result<PathBuf, DrmError> {
    let entries =
        std::fs::read_dir(class_drm).map_err(|e| DrmError::NoVirtioGpu(format!("{}: {e}", class_drm.display())))?;
    let mut nodes: Vec<String> =
        entries.flatten().filter_map(|e| e.file_name().into_string().ok()).filter(|n| is_kind(n)).collect();
    nodes.sort();
    nodes
        .into_iter()
        .find(|n| {
            std::fs::read_to_string(class_drm.join(n).join("device/vendor"))
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case(VIRTIO_VENDOR))
        })
        .map(|n| dev_dri.join(n))
        .ok_or_else(|| {
            DrmError::NoVirtioGpu(format!("no {kind} in {} has vendor {VIRTIO_VENDOR}", class_drm.display()))
        })
}

/// An open virtio-gpu render node, opened once per element.
pub struct VirtioGpu {
    file: File,
    pub path: PathBuf,
}

impl VirtioGpu {
    pub fn open(path: &Path) -> Result<VirtioGpu, DrmError> {
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| DrmError::Open(path.into(), e))?;
        Ok(VirtioGpu { file, path: path.into() })
    }

    /// The virtio-gpu resource id of a DMA-BUF.
    pub fn resource_id(&self, dmabuf: RawFd) -> Result<u32, DrmError> {
        let fd = self.file.as_raw_fd();
        let mut prime = DrmPrimeHandle { fd: dmabuf, ..Default::default() };
        {
            // SAFETY: DrmPrimeHandle is the argument struct of this request.
            unsafe { ioctl(fd, DRM_IOCTL_PRIME_FD_TO_HANDLE, &mut prime) }
        }
        .map_err(|e| DrmError::Ioctl("DRM_IOCTL_PRIME_FD_TO_HANDLE", e))?;
        let mut info = DrmVirtgpuResourceInfo { bo_handle: prime.handle, ..Default::default() };
        let res = {
            // SAFETY: DrmVirtgpuResourceInfo is the argument struct of this request.
            unsafe { ioctl(fd, DRM_IOCTL_VIRTGPU_RESOURCE_INFO, &mut info) }
        };
        // Close the GEM handle whatever happened: it holds a reference.
        let mut close = DrmGemClose { handle: prime.handle, pad: 0 };
        let _ = {
            // SAFETY: DrmGemClose is the argument struct of this request.
            unsafe { ioctl(fd, DRM_IOCTL_GEM_CLOSE, &mut close) }
        };
        res.map_err(|e| DrmError::Ioctl("DRM_IOCTL_VIRTGPU_RESOURCE_INFO", e))?;
        Ok(info.res_handle)
    }
}

/// A dumb buffer on a DRM primary node (`/dev/dri/cardN`): what a
/// compositor's scanout buffer looks like to a capture pipeline. For tests
/// of resource mode in a VM: the guest draws into [`DumbBuffer::map`] and
/// names the buffer by its DMA-BUF's resource id. Dropping it destroys the
/// buffer, once no DMA-BUF exported from it is left open (the kernel then
/// sends RESOURCE_UNREF to the device).
pub struct DumbBuffer {
    card: File,
    handle: u32,
    pub width: u32,
    pub height: u32,
    /// Bytes per row.
    pub pitch: u32,
    pub size: u64,
}

impl DumbBuffer {
    /// A `width`x`height` buffer of 32-bit pixels (the virtio-gpu driver
    /// makes it a B8G8R8X8 resource).
    pub fn create(card: &Path, width: u32, height: u32) -> Result<DumbBuffer, DrmError> {
        let card_file =
            OpenOptions::new().read(true).write(true).open(card).map_err(|e| DrmError::Open(card.into(), e))?;
        let mut dumb = DrmModeCreateDumb { width, height, bpp: 32, ..Default::default() };
        {
            // SAFETY: DrmModeCreateDumb is the argument struct of this request.
            unsafe { ioctl(card_file.as_raw_fd(), DRM_IOCTL_MODE_CREATE_DUMB, &mut dumb) }
        }
        .map_err(|e| DrmError::Ioctl("DRM_IOCTL_MODE_CREATE_DUMB", e))?;
        Ok(DumbBuffer { card: card_file, handle: dumb.handle, width, height, pitch: dumb.pitch, size: dumb.size })
    }

    /// A DMA-BUF of this buffer; it keeps the buffer alive after `self` goes.
    pub fn export(&self) -> Result<std::os::fd::OwnedFd, DrmError> {
        let mut prime = DrmPrimeHandle { handle: self.handle, flags: (libc::O_CLOEXEC | libc::O_RDWR) as u32, fd: -1 };
        {
            // SAFETY: DrmPrimeHandle is the argument struct of this request.
            unsafe { ioctl(self.card.as_raw_fd(), DRM_IOCTL_PRIME_HANDLE_TO_FD, &mut prime) }
        }
        .map_err(|e| DrmError::Ioctl("DRM_IOCTL_PRIME_HANDLE_TO_FD", e))?;
        // SAFETY: the kernel just gave us this fd; nothing else owns it.
        Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(prime.fd) })
    }

    /// The buffer's pages, writable: what the guest draws lands in the
    /// resource's backing, which the host device reads.
    pub fn map(&self) -> Result<memmap2::MmapMut, DrmError> {
        let mut map = DrmModeMapDumb { handle: self.handle, ..Default::default() };
        {
            // SAFETY: DrmModeMapDumb is the argument struct of this request.
            unsafe { ioctl(self.card.as_raw_fd(), DRM_IOCTL_MODE_MAP_DUMB, &mut map) }
        }
        .map_err(|e| DrmError::Ioctl("DRM_IOCTL_MODE_MAP_DUMB", e))?;
        // SAFETY: the fake offset the kernel gave names this buffer on this
        // card fd; the mapping holds its own reference to the object, and
        // only this process writes it (the host reads).
        unsafe { memmap2::MmapOptions::new().offset(map.offset).len(self.size as usize).map_mut(&self.card) }
            .map_err(|e| DrmError::Ioctl("mmap of a dumb buffer", e))
    }
}

impl Drop for DumbBuffer {
    fn drop(&mut self) {
        let mut d = DrmModeDestroyDumb { handle: self.handle };
        // SAFETY: DrmModeDestroyDumb is the argument struct of this request.
        let _ = unsafe { ioctl(self.card.as_raw_fd(), DRM_IOCTL_MODE_DESTROY_DUMB, &mut d) };
    }
}

/// A dumb buffer exported as a DMA-BUF (see [`DumbBuffer`]).
pub fn create_dumb_dmabuf(card: &Path, width: u32, height: u32) -> Result<std::os::fd::OwnedFd, DrmError> {
    DumbBuffer::create(card, width, height)?.export()
}

/// # Safety
/// `T` must be the repr(C) argument struct that `request` expects.
unsafe fn ioctl<T>(fd: RawFd, request: u64, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: the caller vouches for the type; `arg` is alive for the call.
    let r = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <drm/drm.h> and <drm/virtgpu_drm.h> on x86_64.
        assert_eq!(DRM_IOCTL_PRIME_FD_TO_HANDLE, 0xc00c_642e);
        assert_eq!(DRM_IOCTL_GEM_CLOSE, 0x4008_6409);
        assert_eq!(DRM_IOCTL_VIRTGPU_RESOURCE_INFO, 0xc010_6445);
        assert_eq!(DRM_IOCTL_PRIME_HANDLE_TO_FD, 0xc00c_642d);
        assert_eq!(DRM_IOCTL_MODE_CREATE_DUMB, 0xc020_64b2);
        assert_eq!(DRM_IOCTL_MODE_MAP_DUMB, 0xc010_64b3);
        assert_eq!(DRM_IOCTL_MODE_DESTROY_DUMB, 0xc004_64b4);
    }

    #[test]
    fn render_node_is_chosen_by_vendor() {
        let root = tempfile::tempdir().unwrap();
        let node = |name: &str, vendor: &str| {
            let d = root.path().join(name).join("device");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
        };
        node("card0", "0x1af4");
        node("renderD128", "0x8086");
        let dev = Path::new("/dev/dri");
        assert!(matches!(find_render_node(root.path(), dev), Err(DrmError::NoVirtioGpu(_))));
        node("renderD129", "0x1af4");
        assert_eq!(find_render_node(root.path(), dev).unwrap(), dev.join("renderD129"));
        node("card0-Virtual-1", "0x1af4");
        assert_eq!(find_card(root.path(), dev).unwrap(), dev.join("card0"), "a node, not its connector");
    }

    #[test]
    fn a_device_that_is_not_drm_gives_a_clear_error() {
        let gpu = VirtioGpu::open(Path::new("/dev/null")).unwrap();
        let f = tempfile::tempfile().unwrap();
        let e = gpu.resource_id(f.as_raw_fd()).unwrap_err();
        assert!(e.to_string().starts_with("DRM_IOCTL_PRIME_FD_TO_HANDLE failed"), "{e}");
        assert!(VirtioGpu::open(Path::new("/dev/dri/none")).is_err());
    }
}
