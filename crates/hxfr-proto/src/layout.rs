//! Where the planes of a frame lie, for the formats the wire carries.
//!
//! Helix's C element sends the GStreamer buffer verbatim: packed RGB is
//! `stride × height` bytes; NV12 is the Y plane (`stride` bytes a row) then the
//! interleaved UV plane at `stride × round_up(height, 2)`, same stride,
//! `round_up(height, 2) / 2` rows. All arithmetic is checked: the numbers come
//! from an untrusted peer.

use thiserror::Error;

use crate::Fourcc;

/// Pixel formats the host accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// B,G,R,x bytes (fourcc AR24/XR24; BGRA's alpha is ignored).
    Bgrx,
    /// R,G,B,x bytes (fourcc AB24/XB24; RGBA's alpha is ignored).
    Rgbx,
    /// Y plane, then interleaved U,V at half resolution.
    Nv12,
}

impl PixelFormat {
    pub fn from_fourcc(f: Fourcc) -> Option<PixelFormat> {
        match f {
            Fourcc::ARGB8888 | Fourcc::XRGB8888 => Some(PixelFormat::Bgrx),
            Fourcc::ABGR8888 | Fourcc::XBGR8888 => Some(PixelFormat::Rgbx),
            Fourcc::NV12 => Some(PixelFormat::Nv12),
            _ => None,
        }
    }

    pub fn fourcc(self) -> Fourcc {
        match self {
            PixelFormat::Bgrx => Fourcc::ARGB8888,
            PixelFormat::Rgbx => Fourcc::ABGR8888,
            PixelFormat::Nv12 => Fourcc::NV12,
        }
    }

    pub fn num_planes(self) -> usize {
        if self == PixelFormat::Nv12 { 2 } else { 1 }
    }

    /// Bytes of real pixels in one row of `plane` (excluding padding).
    pub fn row_bytes(self, plane: usize, width: u32) -> u64 {
        match (self, plane) {
            (PixelFormat::Nv12, 0) => width as u64,
            (PixelFormat::Nv12, _) => width.div_ceil(2) as u64 * 2,
            _ => width as u64 * 4,
        }
    }

    /// Rows in `plane`.
    pub fn rows(self, plane: usize, height: u32) -> u64 {
        match (self, plane) {
            (PixelFormat::Nv12, 1) => height.div_ceil(2) as u64,
            _ => height as u64,
        }
    }
}

/// Offsets and strides of each plane inside one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    pub offsets: [u64; 2],
    pub strides: [u64; 2],
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    #[error("unsupported pixel format {0}")]
    Format(Fourcc),
    #[error("size {width}x{height} is outside 2x2..{max}x{max} or not even (H.264 4:2:0 needs even sizes)")]
    Size { width: u32, height: u32, max: u32 },
    #[error("plane {plane}: stride {stride} is smaller than a row ({row} bytes)")]
    Stride { plane: usize, stride: u64, row: u64 },
    #[error("plane {plane} ends at byte {end}, past the {len} bytes available")]
    OutOfBounds { plane: usize, end: u64, len: u64 },
    #[error("{0} planes given, format needs {1}")]
    Planes(u32, usize),
}

impl Layout {
    /// Helix's inline layout for a `width × height` frame with plane-0 stride `stride`.
    pub fn inline(format: PixelFormat, width: u32, height: u32, stride: u32) -> Layout {
        let stride = stride as u64;
        let uv_offset = stride * height.next_multiple_of(2) as u64;
        let (offsets, strides) = match format {
            PixelFormat::Nv12 => ([0, uv_offset], [stride, stride]),
            _ => ([0, 0], [stride, 0]),
        };
        Layout { format, width, height, offsets, strides }
    }

    /// The first byte past plane `plane`'s last pixel.
    pub fn plane_end(&self, plane: usize) -> u64 {
        let rows = self.format.rows(plane, self.height);
        self.offsets[plane] + self.strides[plane] * (rows - 1) + self.format.row_bytes(plane, self.width)
    }

    /// Checks size, strides and that every plane lies within `len` bytes.
    pub fn check(&self, len: u64, max_dim: u32) -> Result<(), LayoutError> {
        let (w, h) = (self.width, self.height);
        if w < 2 || h < 2 || w > max_dim || h > max_dim || w % 2 != 0 || h % 2 != 0 {
            return Err(LayoutError::Size { width: w, height: h, max: max_dim });
        }
        for plane in 0..self.format.num_planes() {
            let row = self.format.row_bytes(plane, w);
            let stride = self.strides[plane];
            if stride < row {
                return Err(LayoutError::Stride { plane, stride, row });
            }
            // Sizes are ≤ max_dim and strides < 2^32: no u64 overflow possible
            // except through a huge offset, which checked_add catches.
            let rows = self.format.rows(plane, h);
            let end = self.offsets[plane].checked_add(stride * (rows - 1) + row).ok_or(LayoutError::OutOfBounds {
                plane,
                end: u64::MAX,
                len,
            })?;
            if end > len {
                return Err(LayoutError::OutOfBounds { plane, end, len });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helix_nv12_layout() {
        // 642x362 NV12 with a stride of 644: UV at 644*362.
        let l = Layout::inline(PixelFormat::Nv12, 642, 362, 644);
        assert_eq!(l.offsets, [0, 644 * 362]);
        assert_eq!(l.plane_end(1), 644 * 362 + 644 * 180 + 642);
        assert!(l.check(644 * 362 * 3 / 2, 8192).is_ok());
        assert!(matches!(l.check(644 * 362 * 3 / 2 - 3, 8192), Err(LayoutError::OutOfBounds { plane: 1, .. })));
    }

    #[test]
    fn bad_numbers_are_refused() {
        let l = Layout::inline(PixelFormat::Bgrx, 640, 360, 2000);
        assert!(matches!(l.check(u64::MAX, 8192), Err(LayoutError::Stride { .. })));
        let l = Layout::inline(PixelFormat::Bgrx, 641, 360, 4000);
        assert!(matches!(l.check(u64::MAX, 8192), Err(LayoutError::Size { .. })));
        let mut l = Layout::inline(PixelFormat::Bgrx, 640, 360, 2560);
        l.offsets[0] = u64::MAX - 10;
        assert!(matches!(l.check(u64::MAX, 8192), Err(LayoutError::OutOfBounds { .. })));
    }
}
