//! DRM fourcc pixel formats as they appear on the wire.

use std::fmt;

/// A DRM fourcc code (little-endian characters in a u32).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fourcc(pub u32);

impl Fourcc {
    /// 'AR24': B,G,R,A bytes in memory (GStreamer BGRA / BGRx).
    pub const ARGB8888: Fourcc = Fourcc::from_chars(*b"AR24");
    /// 'XR24': B,G,R,x bytes in memory (GStreamer BGRx).
    pub const XRGB8888: Fourcc = Fourcc::from_chars(*b"XR24");
    /// 'AB24': R,G,B,A bytes in memory (GStreamer RGBA / RGBx).
    pub const ABGR8888: Fourcc = Fourcc::from_chars(*b"AB24");
    /// 'XB24': R,G,B,x bytes in memory (GStreamer RGBx).
    pub const XBGR8888: Fourcc = Fourcc::from_chars(*b"XB24");
    /// 'NV12': Y plane then interleaved U,V at half resolution.
    pub const NV12: Fourcc = Fourcc::from_chars(*b"NV12");

    pub const fn from_chars(c: [u8; 4]) -> Fourcc {
        Fourcc(u32::from_le_bytes(c))
    }

    pub fn chars(&self) -> [u8; 4] {
        self.0.to_le_bytes()
    }
}

impl fmt::Debug for Fourcc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.chars();
        if c.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            write!(f, "'{}'", String::from_utf8_lossy(&c))
        } else {
            write!(f, "{:#010x}", self.0)
        }
    }
}

impl fmt::Display for Fourcc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
