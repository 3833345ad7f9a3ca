//! Where a frame's pixels are: one seam for the three buffer kinds.
//!
//! A guest names a frame's pixels in one of three ways: inline on the
//! socket, as planes in the shared-memory region, or by virtio-gpu resource
//! id. The reader turns each request into a [`FrameJob`] carrying one handle
//! type per kind ([`FrameSource`]); the session maps that handle with
//! [`FrameSources::map`] just before encoding, into [`Mapped`] pixels: bytes
//! that stay valid while the value lives, and the [`Layout`] of their planes.
//! All three reach `Frame::new` (which bounds every plane by those bytes) the
//! same way. Model: crosvm's virtio-video `resource.rs`.

use std::sync::Arc;

use bytes::Bytes;
use hxfr_proto::{ErrorCode, Fourcc, FrameRequest, Layout, PixelFormat, ShmFrameRequest, ShmPlane};

use crate::budget::Share;
use crate::resolver::{Peer, ResourceResolver};
use crate::shm::ShmRegion;

/// The parts of a frame request every source has.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameMeta {
    pub format: Fourcc,
    pub width: u32,
    pub height: u32,
    pub pts: i64,
    pub duration: i64,
    pub force_keyframe: bool,
}

/// Where the pixels of one frame are: a handle per buffer kind.
pub(crate) enum FrameSource {
    /// Pixels that came on the socket, where they were read (no copy), held
    /// against the host's buffer budget until encoded: by `budget` for a
    /// small frame from the read-ahead, by the buffer behind `pixels` for a
    /// large one.
    Inline { pixels: Bytes, stride: u32, budget: Option<Share> },
    /// Plane descriptors into the shared-memory region, checked against it
    /// when mapped.
    Shm { num_planes: u32, planes: [ShmPlane; 2] },
    /// A guest GPU resource, resolved when mapped.
    Resource(u32),
}

/// The fields FRAME_REQUEST and SHM_FRAME_REQUEST share, by name.
macro_rules! meta_of {
    ($r:expr) => {
        FrameMeta {
            format: $r.format,
            width: $r.width,
            height: $r.height,
            pts: $r.pts,
            duration: $r.duration,
            force_keyframe: $r.force_keyframe,
        }
    };
}

/// A frame request, whatever its source.
pub(crate) struct FrameJob {
    pub meta: FrameMeta,
    pub source: FrameSource,
}

impl FrameJob {
    /// A FRAME_REQUEST: inline when it carries pixels, else by resource id.
    /// `None` when it names neither.
    pub fn from_request(r: FrameRequest, budget: Option<Share>) -> Option<FrameJob> {
        let meta = meta_of!(r);
        let source = match r.pixels {
            Some(pixels) => FrameSource::Inline { pixels, stride: r.stride, budget },
            None if r.resource_id != 0 => FrameSource::Resource(r.resource_id),
            None => return None,
        };
        Some(FrameJob { meta, source })
    }

    pub fn from_shm(r: ShmFrameRequest) -> FrameJob {
        FrameJob { meta: meta_of!(r), source: FrameSource::Shm { num_planes: r.num_planes, planes: r.planes } }
    }
}

/// A frame's pixels, ready for `Frame::new`.
pub(crate) struct Mapped {
    /// Valid while this lives: inline bytes, the region, or a resolved
    /// resource (whose guard rides in the `Bytes`).
    pub data: Bytes,
    pub layout: Layout,
    _budget: Option<Share>,
}

impl Mapped {
    /// The frame's own bytes (planes may sit at offsets in a larger buffer).
    pub fn frame_bytes(&self) -> usize {
        let l = &self.layout;
        (0..l.format.num_planes()).map(|p| (l.plane_end(p) - l.offsets[p]) as usize).sum()
    }
}

/// Why a frame could not be mapped: the answer's code and message.
#[derive(Debug)]
pub(crate) struct SourceError {
    pub code: ErrorCode,
    pub message: String,
}

impl SourceError {
    fn invalid(message: String) -> SourceError {
        SourceError { code: ErrorCode::InvalidMessage, message }
    }
}

/// What a connection's frames can be mapped from.
pub(crate) struct FrameSources {
    shm: Option<Bytes>,
    resolver: Option<Arc<dyn ResourceResolver>>,
}

/// The region as `Bytes`, so every source hands out the same type.
struct RegionBytes(Arc<ShmRegion>);

impl AsRef<[u8]> for RegionBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

impl FrameSources {
    /// The sources for one connection: the host's region, and its resolver
    /// scoped to that connection's guest.
    pub fn new(shm: Option<Arc<ShmRegion>>, resolver: Option<&Arc<dyn ResourceResolver>>, peer: Peer<'_>) -> Self {
        FrameSources {
            shm: shm.map(|r| Bytes::from_owner(RegionBytes(r))),
            resolver: resolver.map(|r| r.scope(peer).unwrap_or_else(|| r.clone())),
        }
    }

    pub fn map(&self, meta: &FrameMeta, source: FrameSource) -> Result<Mapped, SourceError> {
        let format = PixelFormat::from_fourcc(meta.format)
            .ok_or_else(|| SourceError::invalid(format!("unsupported pixel format {}", meta.format)))?;
        let (data, layout, budget) = match source {
            FrameSource::Inline { pixels, stride, budget } => {
                (pixels, Layout::inline(format, meta.width, meta.height, stride), budget)
            }
            FrameSource::Shm { num_planes, planes } => {
                let region = self
                    .shm
                    .clone()
                    .ok_or_else(|| SourceError::invalid("this host has no shared-memory region (--shm)".into()))?;
                if num_planes as usize != format.num_planes() {
                    let n = format.num_planes();
                    return Err(SourceError::invalid(format!("{num_planes} planes given, {format:?} has {n}")));
                }
                let layout = Layout {
                    format,
                    width: meta.width,
                    height: meta.height,
                    offsets: [planes[0].offset, planes[1].offset],
                    strides: [planes[0].stride as u64, planes[1].stride as u64],
                };
                (region, layout, None)
            }
            FrameSource::Resource(id) => {
                let not_found = |message| SourceError { code: ErrorCode::ResourceNotFound, message };
                let Some(resolver) = &self.resolver else {
                    return Err(not_found(format!(
                        "resource {id} not found: this host cannot map guest GPU resources"
                    )));
                };
                let r = resolver.resolve(id).map_err(|e| not_found(e.to_string()))?;
                let l = r.layout;
                if (l.format, l.width, l.height) != (format, meta.width, meta.height) {
                    return Err(SourceError::invalid(format!(
                        "resource {id} is {}x{} {:?}, the request says {}x{} {:?}",
                        l.width, l.height, l.format, meta.width, meta.height, format
                    )));
                }
                (r.data, l, None)
            }
        };
        // Every plane is bounded by `data` in Frame::new (Layout::check).
        Ok(Mapped { data, layout, _budget: budget })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolver::{MemoryResolver, Resolved};

    fn meta(format: PixelFormat, width: u32, height: u32) -> FrameMeta {
        FrameMeta { format: format.fourcc(), width, height, pts: 0, duration: 0, force_keyframe: false }
    }

    fn sources(resolver: Arc<MemoryResolver>) -> FrameSources {
        let r: Arc<dyn ResourceResolver> = resolver;
        FrameSources::new(None, Some(&r), Peer { conn_id: 1, addr: "test", via: "test" })
    }

    #[test]
    fn a_resolved_frame_keeps_its_pixels_after_the_resource_is_freed() {
        let res = Arc::new(MemoryResolver::default());
        let layout = Layout::inline(PixelFormat::Bgrx, 64, 32, 256);
        res.insert(7, Resolved { data: Bytes::from(vec![9u8; 256 * 32]), layout });
        let s = sources(res.clone());
        let m = s.map(&meta(PixelFormat::Bgrx, 64, 32), FrameSource::Resource(7)).unwrap();
        res.remove(7);
        assert_eq!((m.layout, m.data.len(), m.data[100]), (layout, 256 * 32, 9));
        assert_eq!(m.frame_bytes(), 256 * 32);
        let e = s.map(&meta(PixelFormat::Bgrx, 64, 32), FrameSource::Resource(7)).err().unwrap();
        assert_eq!(e.code, ErrorCode::ResourceNotFound);
    }

    #[test]
    fn every_kind_maps_to_bytes_and_a_layout() {
        let s = sources(Arc::new(MemoryResolver::default()));
        let m = meta(PixelFormat::Nv12, 64, 32);
        let inline = FrameSource::Inline { pixels: Bytes::from(vec![0u8; 64 * 48]), stride: 64, budget: None };
        let got = s.map(&m, inline).unwrap();
        assert_eq!(got.layout, Layout::inline(PixelFormat::Nv12, 64, 32, 64));
        assert_eq!(got.frame_bytes(), 64 * 48);
        let shm = FrameSource::Shm { num_planes: 2, planes: [ShmPlane::default(); 2] };
        assert_eq!(s.map(&m, shm).err().unwrap().code, ErrorCode::InvalidMessage, "no region here");
        let bad = FrameMeta { format: Fourcc::from_chars(*b"YUYV"), ..m };
        assert!(s.map(&bad, FrameSource::Resource(1)).err().unwrap().message.contains("unsupported"));
    }
}
