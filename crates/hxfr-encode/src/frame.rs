use hxfr_proto::{Layout, LayoutError, PixelFormat};
use thiserror::Error;

/// Largest width or height any backend is asked to encode (H.264 level 6.2
/// tops out at 8192 wide).
pub const MAX_DIMENSION: u32 = 8192;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// A raw frame to encode, borrowed from wherever it lies (a socket buffer, a
/// shared-memory mapping). Construct with [`Frame::new`], which checks every
/// plane against the bytes given, so encoders can trust it.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    /// Plane 0, and plane 1 for NV12 (empty otherwise); each starts at its first pixel.
    pub planes: [&'a [u8]; 2],
    pub strides: [usize; 2],
    pub force_keyframe: bool,
}

impl<'a> Frame<'a> {
    /// A frame whose planes lie in `data` as `layout` says.
    pub fn new(data: &'a [u8], layout: &Layout, force_keyframe: bool) -> Result<Frame<'a>, FrameError> {
        layout.check(data.len() as u64, MAX_DIMENSION)?;
        let mut planes: [&[u8]; 2] = [&[], &[]];
        for (p, plane) in planes.iter_mut().enumerate().take(layout.format.num_planes()) {
            // In range: checked above.
            *plane = &data[layout.offsets[p] as usize..layout.plane_end(p) as usize];
        }
        Ok(Frame {
            format: layout.format,
            width: layout.width,
            height: layout.height,
            planes,
            strides: [layout.strides[0] as usize, layout.strides[1] as usize],
            force_keyframe,
        })
    }
}
