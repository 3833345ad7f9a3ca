//! How a frame reaches the host: the choice of transfer mode, and each
//! mode's request built from a GStreamer buffer.
//!
//! The decisions and the byte layout are plain functions of plain numbers
//! ([`plan`], [`inline_plan`], [`shm_fit`]) so they are unit-tested without a
//! pipeline; the rest maps buffers and copies.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use gst_video::prelude::*;
use hxfr_guest::drm::{self, VirtioGpu};
use hxfr_guest::shm::{self, Region};
use hxfr_proto::{FrameRequest, HelloResp, Layout, Message, PixelFormat, ShmFrameRequest, features};

use super::Mode;

/// The fourcc the wire uses for a GStreamer format (alpha is ignored).
pub fn wire_format(f: gst_video::VideoFormat) -> Option<PixelFormat> {
    use gst_video::VideoFormat as V;
    match f {
        V::Bgrx | V::Bgra => Some(PixelFormat::Bgrx),
        V::Rgbx | V::Rgba => Some(PixelFormat::Rgbx),
        V::Nv12 => Some(PixelFormat::Nv12),
        _ => None,
    }
}

/// How frames are handed over, once decided.
pub enum Transfer {
    Inline,
    Shm(Region),
    Resource(VirtioGpu),
}

impl Transfer {
    pub fn name(&self) -> &'static str {
        match self {
            Transfer::Inline => "inline",
            Transfer::Shm(_) => "shm",
            Transfer::Resource(_) => "resource",
        }
    }

    /// Shared-memory areas, 0 for the other modes.
    pub fn areas(&self) -> usize {
        match self {
            Transfer::Shm(r) => r.areas,
            _ => 0,
        }
    }
}

/// What the mode property and the caps ask for, before any device is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Resource,
    /// Shared memory; `required` fails the element when it cannot be had.
    Shm {
        required: bool,
    },
    Inline,
}

/// The transfer the `mode` property and DMA-BUF caps call for.
pub fn plan(want: Mode, dmabuf: bool) -> Result<Plan, String> {
    match (want, dmabuf) {
        (Mode::Resource, false) => Err("mode=resource needs DMA-BUF input (video/x-raw(memory:DMABuf))".into()),
        (Mode::Resource | Mode::Auto, true) => Ok(Plan::Resource),
        (_, true) => Err(format!("DMA-BUF input needs mode=resource or auto, not {want:?}")),
        (Mode::Shm, false) => Ok(Plan::Shm { required: true }),
        (Mode::Auto, false) => Ok(Plan::Shm { required: false }),
        (Mode::Inline, false) => Ok(Plan::Inline),
    }
}

/// Whether the host serves the region we mapped: it must offer shared
/// memory and its region must be as large as ours (the same memory).
pub fn shm_fit(hello: Option<&HelloResp>, ours: &Path, our_len: u64) -> Result<(), String> {
    match hello {
        Some(h) if h.features & features::SHM != 0 && h.shm_size == our_len => Ok(()),
        Some(h) if h.features & features::SHM != 0 => Err(format!(
            "host's region is {} bytes, ours ({}) is {our_len}: not the same memory",
            h.shm_size,
            ours.display()
        )),
        _ => Err("host has no shared-memory region".into()),
    }
}

/// Opens what `plan` needs. `Err` only when the plan cannot fall back.
pub fn open(
    plan: Plan,
    shm_path: Option<&str>,
    frame_bytes: usize,
    max_areas: usize,
    hello: Option<&HelloResp>,
) -> Result<(Transfer, Option<String>), String> {
    match plan {
        Plan::Resource => {
            let node =
                drm::find_render_node(Path::new("/sys/class/drm"), Path::new("/dev/dri")).map_err(|e| e.to_string())?;
            Ok((VirtioGpu::open(&node).map(Transfer::Resource).map_err(|e| e.to_string())?, None))
        }
        Plan::Shm { required } => {
            let attempt = || -> Result<Transfer, String> {
                let path = shm_path
                    .map(PathBuf::from)
                    .or_else(|| shm::find_ivshmem(Path::new("/sys")))
                    .ok_or("no shm-path set and no ivshmem device found")?;
                let region =
                    Region::open(&path, frame_bytes, max_areas).map_err(|e| format!("{}: {e}", path.display()))?;
                shm_fit(hello, &path, region.len())?;
                Ok(Transfer::Shm(region))
            };
            match attempt() {
                Ok(t) => Ok((t, None)),
                Err(e) if required => Err(format!("mode=shm: {e}")),
                // Why shared memory was passed over, for the log.
                Err(e) => Ok((Transfer::Inline, Some(e))),
            }
        }
        Plan::Inline => Ok((Transfer::Inline, None)),
    }
}

/// Where a buffer's planes are: (offsets, strides), from its GstVideoMeta
/// when it has one, else from the caps.
pub fn plane_layout(buffer: &gst::BufferRef, info: &gst_video::VideoInfo) -> ([usize; 2], [usize; 2]) {
    let (offs, strides): (Vec<usize>, Vec<i32>) = match buffer.meta::<gst_video::VideoMeta>() {
        Some(m) => (m.offset().to_vec(), m.stride().to_vec()),
        None => (info.offset().to_vec(), info.stride().to_vec()),
    };
    let get = |v: &[usize], i| v.get(i).copied().unwrap_or(0);
    let gets = |v: &[i32], i| v.get(i).copied().unwrap_or(0).max(0) as usize;
    ([get(&offs, 0), get(&offs, 1)], [gets(&strides, 0), gets(&strides, 1)])
}

/// How a buffer becomes the wire's inline layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InlinePlan {
    /// The bytes `start..end` already are the wire layout at `stride`: sent
    /// by reference, no copy.
    Borrow { start: usize, end: usize, stride: usize },
    /// NV12 whose UV plane does not follow Y at the same stride: one
    /// repacking copy into `len` bytes at Y's stride.
    RepackNv12 { len: usize, stride: usize },
}

/// The inline plan for a `width × height` frame whose planes lie at
/// `offs`/`strides` in a buffer of `len` bytes.
pub fn inline_plan(
    format: PixelFormat,
    height: usize,
    offs: [usize; 2],
    strides: [usize; 2],
    len: usize,
) -> Result<InlinePlan, String> {
    let borrow = |start: usize, end: usize, stride: usize| {
        let end = end.min(len);
        if start >= end {
            return Err(format!("plane at {start} lies outside the {len}-byte buffer"));
        }
        Ok(InlinePlan::Borrow { start, end, stride })
    };
    match format {
        PixelFormat::Bgrx | PixelFormat::Rgbx => borrow(offs[0], offs[0] + strides[0] * height, strides[0]),
        PixelFormat::Nv12 => {
            let (s, uv_rows) = (strides[0], height.div_ceil(2));
            let uv_at = s * height.next_multiple_of(2);
            if strides[1] == s && offs[1] == offs[0] + uv_at {
                borrow(offs[0], offs[1] + s * uv_rows, s)
            } else {
                Ok(InlinePlan::RepackNv12 { len: uv_at + s * uv_rows, stride: s })
            }
        }
    }
}

/// Copies NV12 planes from `src` into the wire layout (UV right after the Y
/// rows, both at `stride`).
pub fn repack_nv12(
    src: &[u8],
    width: usize,
    height: usize,
    offs: [usize; 2],
    strides: [usize; 2],
    stride: usize,
    len: usize,
) -> Result<Vec<u8>, String> {
    let uv_at = stride * height.next_multiple_of(2);
    let uv_w = width.div_ceil(2) * 2;
    let mut out = vec![0u8; len];
    for r in 0..height {
        let from = offs[0] + r * strides[0];
        out[r * stride..r * stride + width]
            .copy_from_slice(src.get(from..from + width).ok_or("Y plane out of bounds")?);
    }
    for r in 0..height.div_ceil(2) {
        let from = offs[1] + r * strides[1];
        out[uv_at + r * stride..uv_at + r * stride + uv_w]
            .copy_from_slice(src.get(from..from + uv_w).ok_or("UV plane out of bounds")?);
    }
    Ok(out)
}

/// When a frame is shown and whether it must be a keyframe.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    pub pts: i64,
    pub duration: i64,
    pub keyframe: bool,
}

/// The request for one frame in the current transfer mode; `area` is the
/// shared-memory area it occupies (taken by the caller), if any.
pub fn request(
    transfer: &mut Transfer,
    buffer: &gst::Buffer,
    info: &gst_video::VideoInfo,
    area: Option<usize>,
    at: Stamp,
) -> Result<Message, String> {
    Ok(match untimed_request(transfer, buffer, info, area)? {
        Message::FrameRequest(r) => Message::FrameRequest(r.timed(at.pts, at.duration).keyframe(at.keyframe)),
        Message::ShmFrameRequest(r) => Message::ShmFrameRequest(r.timed(at.pts, at.duration).keyframe(at.keyframe)),
        m => m,
    })
}

fn untimed_request(
    transfer: &mut Transfer,
    buffer: &gst::Buffer,
    info: &gst_video::VideoInfo,
    area: Option<usize>,
) -> Result<Message, String> {
    let format = wire_format(info.format()).ok_or("unsupported format")?;
    let (w, h) = (info.width(), info.height());
    match transfer {
        Transfer::Inline => {
            let (offs, strides) = plane_layout(buffer, info);
            let mapped = buffer.clone().into_mapped_buffer_readable().map_err(|_| "cannot map the input buffer")?;
            let (pixels, stride) = match inline_plan(format, h as usize, offs, strides, mapped.len())? {
                InlinePlan::Borrow { start, end, stride } => (Bytes::from_owner(mapped).slice(start..end), stride),
                InlinePlan::RepackNv12 { len, stride } => {
                    (Bytes::from(repack_nv12(&mapped, w as usize, h as usize, offs, strides, stride, len)?), stride)
                }
            };
            Ok(Message::FrameRequest(FrameRequest::inline(format, w, h, stride as u32, pixels)))
        }
        Transfer::Resource(gpu) => {
            let mem = buffer.peek_memory(0);
            let dmabuf = mem
                .downcast_memory_ref::<gst_allocators::DmaBufMemory>()
                .ok_or("resource mode: buffer memory is not a DMA-BUF")?;
            let id = gpu.resource_id(dmabuf.fd()).map_err(|e| e.to_string())?;
            let (_, strides) = plane_layout(buffer, info);
            Ok(Message::FrameRequest(FrameRequest::resource(id, format, w, h, strides[0] as u32)))
        }
        Transfer::Shm(region) => {
            let area = area.ok_or("no free shared-memory area")?;
            let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer.as_ref(), info)
                .map_err(|_| "cannot map the input frame")?;
            let (base, dst) = region.area(area);
            let mut layout = Layout::inline(format, w, h, 0);
            let mut at = 0usize;
            for p in 0..format.num_planes() {
                let stride = frame.plane_stride()[p] as usize;
                let src = frame.plane_data(p as u32).map_err(|_| "cannot read a plane")?;
                let n = (stride * format.rows(p, h) as usize).min(src.len());
                // The one copy of this path.
                dst.get_mut(at..at + n).ok_or("frame larger than its area")?.copy_from_slice(&src[..n]);
                (layout.offsets[p], layout.strides[p]) = (at as u64, stride as u64);
                at = (at + n).next_multiple_of(64);
            }
            Ok(Message::ShmFrameRequest(ShmFrameRequest::new(&layout, base)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_and_caps_decide_the_plan() {
        assert_eq!(plan(Mode::Auto, true), Ok(Plan::Resource));
        assert_eq!(plan(Mode::Resource, true), Ok(Plan::Resource));
        assert_eq!(plan(Mode::Auto, false), Ok(Plan::Shm { required: false }));
        assert_eq!(plan(Mode::Shm, false), Ok(Plan::Shm { required: true }));
        assert_eq!(plan(Mode::Inline, false), Ok(Plan::Inline));
        assert!(plan(Mode::Resource, false).unwrap_err().contains("DMA-BUF"));
        assert!(plan(Mode::Shm, true).is_err() && plan(Mode::Inline, true).is_err());
    }

    #[test]
    fn shared_memory_needs_the_hosts_region_to_be_ours() {
        let hello = |features, shm_size| HelloResp { nonce: 0, version: 1, features, shm_size, max_in_flight: 4 };
        let p = Path::new("/dev/shm/x");
        assert_eq!(shm_fit(Some(&hello(features::SHM, 4096)), p, 4096), Ok(()));
        assert!(shm_fit(Some(&hello(features::SHM, 8192)), p, 4096).unwrap_err().contains("not the same memory"));
        assert!(shm_fit(Some(&hello(0, 0)), p, 4096).is_err());
        assert!(shm_fit(None, p, 4096).is_err(), "a legacy host has no region");
    }

    #[test]
    fn packed_rgb_is_sent_by_reference() {
        let plan = inline_plan(PixelFormat::Bgrx, 10, [64, 0], [400, 0], 64 + 4000).unwrap();
        assert_eq!(plan, InlinePlan::Borrow { start: 64, end: 4064, stride: 400 });
        assert!(inline_plan(PixelFormat::Bgrx, 10, [5000, 0], [400, 0], 4000).is_err());
    }

    #[test]
    fn nv12_is_borrowed_when_uv_follows_y_and_repacked_otherwise() {
        // 6x3: Y rows padded to 4 (even height), UV right after at the same stride.
        let contiguous = inline_plan(PixelFormat::Nv12, 3, [0, 32], [8, 8], 48).unwrap();
        assert_eq!(contiguous, InlinePlan::Borrow { start: 0, end: 48, stride: 8 });
        let apart = inline_plan(PixelFormat::Nv12, 3, [0, 40], [8, 8], 56).unwrap();
        assert_eq!(apart, InlinePlan::RepackNv12 { len: 48, stride: 8 });
        // Repack: Y rows 1.., UV rows 100.., taken from a buffer with UV at 40.
        let mut src = vec![0u8; 56];
        for r in 0..3 {
            src[r * 8..r * 8 + 6].fill(1 + r as u8);
        }
        for r in 0..2 {
            src[40 + r * 8..40 + r * 8 + 6].fill(100 + r as u8);
        }
        let out = repack_nv12(&src, 6, 3, [0, 40], [8, 8], 8, 48).unwrap();
        assert_eq!(&out[16..22], &[3; 6]);
        assert_eq!(&out[24..32], &[0; 8], "the padding row stays zero");
        assert_eq!(&out[32..38], &[100; 6]);
        assert_eq!(&out[40..46], &[101; 6]);
        assert!(repack_nv12(&src[..45], 6, 3, [0, 40], [8, 8], 8, 48).is_err(), "short source");
    }
}
