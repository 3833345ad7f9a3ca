//! Packed RGB to I420 with yuvutils-rs (SIMD: AVX2/SSE4.1 picked at run time).
//!
//! BT.709 limited range, which is what the encoders signal in the stream's
//! VUI, so every decoder turns it back into the same colours.

use yuvutils_rs::{
    BufferStoreMut, YuvConversionMode, YuvPlanarImageMut, YuvRange, YuvStandardMatrix, bgra_to_yuv420, rgba_to_yuv420,
};

use crate::{EncodeError, Frame, PixelFormat};

/// An I420 picture in one reusable buffer: Y, then U, then V, tightly packed.
#[derive(Debug, Default)]
pub struct I420Buffer {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl I420Buffer {
    pub fn y_size(&self) -> usize {
        self.width as usize * self.height as usize
    }
    pub fn chroma_stride(&self) -> usize {
        self.width.div_ceil(2) as usize
    }
    pub fn chroma_size(&self) -> usize {
        self.chroma_stride() * self.height.div_ceil(2) as usize
    }
    /// (Y, U, V) planes.
    pub fn planes(&self) -> (&[u8], &[u8], &[u8]) {
        let (y, rest) = self.data.split_at(self.y_size());
        let (u, v) = rest.split_at(self.chroma_size());
        (y, u, v)
    }
}

/// The YCbCr matrix to convert with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Matrix {
    Bt601,
    #[default]
    Bt709,
}

impl Matrix {
    /// What decoders (GStreamer, browsers) assume for a stream that does not
    /// say: BT.601 below 720 lines, BT.709 from HD up.
    pub fn untagged_default(height: u32) -> Matrix {
        if height >= 720 { Matrix::Bt709 } else { Matrix::Bt601 }
    }

    fn yuvutils(self) -> YuvStandardMatrix {
        match self {
            Matrix::Bt601 => YuvStandardMatrix::Bt601,
            Matrix::Bt709 => YuvStandardMatrix::Bt709,
        }
    }
}

type ConvertFn = fn(
    &mut YuvPlanarImageMut<u8>,
    &[u8],
    u32,
    YuvRange,
    YuvStandardMatrix,
    YuvConversionMode,
) -> Result<(), yuvutils_rs::YuvError>;

/// Converts a packed RGB frame into `out` (resized as needed, reused across calls).
pub fn rgb_to_i420(frame: &Frame<'_>, matrix: Matrix, out: &mut I420Buffer) -> Result<(), EncodeError> {
    let convert: ConvertFn = match frame.format {
        PixelFormat::Bgrx => bgra_to_yuv420,
        PixelFormat::Rgbx => rgba_to_yuv420,
        PixelFormat::Nv12 => return Err(EncodeError::Convert("NV12 is not packed RGB".into())),
    };
    out.width = frame.width;
    out.height = frame.height;
    let (w, h) = (frame.width as usize, frame.height as usize);
    let (ys, cs) = (out.y_size(), out.chroma_size());
    out.data.resize(ys + 2 * cs, 0);
    let cw = out.chroma_stride();
    let (y, rest) = out.data.split_at_mut(ys);
    let (u, v) = rest.split_at_mut(cs);
    let (src, stride) = (frame.planes[0], frame.strides[0]);

    // yuvutils' 4:2:0 path mishandles the last row pair when the source ends
    // at the last pixel rather than at stride × height (legal, and what a
    // padded frame gives us): convert all but the last pair in place, and the
    // last pair from a small tight copy. Heights are even (Layout::check).
    let body_rows = if src.len() >= stride * h { h } else { h - 2 };
    if body_rows > 0 {
        run(
            convert,
            matrix,
            &mut y[..w * body_rows],
            &mut u[..cw * body_rows / 2],
            &mut v[..cw * body_rows / 2],
            w,
            body_rows,
            src,
            stride,
        )?;
    }
    if body_rows < h {
        let mut tail = Vec::with_capacity(w * 4 * 2);
        for r in body_rows..h {
            tail.extend_from_slice(&src[r * stride..r * stride + w * 4]);
        }
        run(
            convert,
            matrix,
            &mut y[w * body_rows..],
            &mut u[cw * body_rows / 2..],
            &mut v[cw * body_rows / 2..],
            w,
            2,
            &tail,
            w * 4,
        )?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    convert: ConvertFn,
    matrix: Matrix,
    y: &mut [u8],
    u: &mut [u8],
    v: &mut [u8],
    width: usize,
    rows: usize,
    src: &[u8],
    stride: usize,
) -> Result<(), EncodeError> {
    let cw = width.div_ceil(2) as u32;
    let mut img = YuvPlanarImageMut {
        y_plane: BufferStoreMut::Borrowed(y),
        y_stride: width as u32,
        u_plane: BufferStoreMut::Borrowed(u),
        u_stride: cw,
        v_plane: BufferStoreMut::Borrowed(v),
        v_stride: cw,
        width: width as u32,
        height: rows as u32,
    };
    // Frame::new guaranteed the sizes; an error here is a bug to report, not a panic.
    convert(&mut img, src, stride as u32, YuvRange::Limited, matrix.yuvutils(), YuvConversionMode::Balanced)
        .map_err(|e| EncodeError::Convert(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hxfr_proto::Layout;

    /// A padded source that ends at its last pixel converts exactly like the
    /// same picture packed tightly.
    #[test]
    fn padded_stride_matches_packed() {
        let (w, h) = (642u32, 362u32);
        let tight = w as usize * 4;
        let padded = tight + 64;
        let packed: Vec<u8> = (0..tight * h as usize).map(|i| (i * 7 % 251) as u8).collect();
        let mut spaced = vec![0u8; padded * (h as usize - 1) + tight];
        for r in 0..h as usize {
            spaced[r * padded..r * padded + tight].copy_from_slice(&packed[r * tight..(r + 1) * tight]);
        }
        let (mut a, mut b) = (I420Buffer::default(), I420Buffer::default());
        let fa = Frame::new(&packed, &Layout::inline(PixelFormat::Bgrx, w, h, tight as u32), false).unwrap();
        let fb = Frame::new(&spaced, &Layout::inline(PixelFormat::Bgrx, w, h, padded as u32), false).unwrap();
        rgb_to_i420(&fa, Matrix::Bt709, &mut a).unwrap();
        rgb_to_i420(&fb, Matrix::Bt709, &mut b).unwrap();
        assert!(a.data == b.data);
    }
}
