//! The WebSocket stream: one binary message per access unit, with a small
//! header a viewer needs to decode it and to measure latency.
//!
//! ```text
//! offset size field
//!  0     1    version (1)
//!  1     1    flags: bit 0 keyframe
//!  2     2    header length in bytes (u16 LE), codec string included
//!  4     4    width  (u32 LE)
//!  8     4    height (u32 LE)
//! 12     8    pts, µs (i64 LE)
//! 20     8    capture time, µs since the UNIX epoch on the bridge's clock (u64 LE)
//! 28     1    codec string length N
//! 29     N    codec string, e.g. "avc1.42c01f" (ASCII)
//! 29+N   …    the access unit, Annex B
//! ```
//! Text messages on the same socket are the JSON control channel (see `server.rs`).

use bytes::{BufMut, Bytes, BytesMut};

pub const VERSION: u8 = 1;
pub const FLAG_KEYFRAME: u8 = 1;
const FIXED: usize = 29;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub keyframe: bool,
    pub width: u32,
    pub height: u32,
    pub pts_us: i64,
    pub capture_us: u64,
    pub codec: String,
}

impl Header {
    pub fn encode(&self, au: &[u8]) -> Bytes {
        let codec = &self.codec.as_bytes()[..self.codec.len().min(255)];
        let len = FIXED + codec.len();
        let mut b = BytesMut::with_capacity(len + au.len());
        b.put_u8(VERSION);
        b.put_u8(if self.keyframe { FLAG_KEYFRAME } else { 0 });
        b.put_u16_le(len as u16);
        b.put_u32_le(self.width);
        b.put_u32_le(self.height);
        b.put_i64_le(self.pts_us);
        b.put_u64_le(self.capture_us);
        b.put_u8(codec.len() as u8);
        b.put_slice(codec);
        b.put_slice(au);
        b.freeze()
    }

    /// Splits a message into its header and access unit.
    pub fn decode(msg: &[u8]) -> Result<(Header, &[u8]), String> {
        if msg.len() < FIXED {
            return Err(format!("message of {} bytes is shorter than the header", msg.len()));
        }
        if msg[0] != VERSION {
            return Err(format!("unknown stream version {}", msg[0]));
        }
        let len = u16::from_le_bytes([msg[2], msg[3]]) as usize;
        let n = msg[28] as usize;
        if len != FIXED + n || msg.len() < len {
            return Err(format!("bad header length {len}"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(msg[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(msg[i..i + 8].try_into().unwrap());
        Ok((
            Header {
                keyframe: msg[1] & FLAG_KEYFRAME != 0,
                width: u32_at(4),
                height: u32_at(8),
                pts_us: u64_at(12) as i64,
                capture_us: u64_at(20),
                codec: String::from_utf8_lossy(&msg[FIXED..len]).into_owned(),
            },
            &msg[len..],
        ))
    }
}

/// The NAL units of an Annex-B access unit (without start codes).
pub fn nal_units(au: &[u8]) -> Vec<&[u8]> {
    hxfr_proto::annexb::nal_units(au).into_iter().map(|n| n.data).collect()
}

/// The WebCodecs codec string ("avc1.PPCCLL") from an access unit's SPS.
pub fn codec_string(au: &[u8]) -> Option<String> {
    nal_units(au)
        .into_iter()
        .find(|n| n.len() >= 4 && n[0] & 0x1f == 7)
        .map(|sps| format!("avc1.{:02x}{:02x}{:02x}", sps[1], sps[2], sps[3]))
}

/// Microseconds since the UNIX epoch, now.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            keyframe: true,
            width: 1280,
            height: 720,
            pts_us: 33_333,
            capture_us: 42,
            codec: "avc1.42c01f".into(),
        };
        let msg = h.encode(&[0, 0, 0, 1, 0x65, 1]);
        let (back, au) = Header::decode(&msg).unwrap();
        assert_eq!(back, h);
        assert_eq!(au, &[0, 0, 0, 1, 0x65, 1]);
        assert!(Header::decode(&msg[..10]).is_err());
    }

    #[test]
    fn nals_and_codec_string() {
        let au = [0, 0, 0, 1, 0x67, 0x42, 0xc0, 0x1f, 0xaa, 0, 0, 0, 1, 0x68, 0xce, 0, 0, 1, 0x65, 0x88];
        let nals = nal_units(&au);
        assert_eq!(nals, vec![&[0x67, 0x42, 0xc0, 0x1f, 0xaa][..], &[0x68, 0xce][..], &[0x65, 0x88][..]]);
        assert_eq!(codec_string(&au).unwrap(), "avc1.42c01f");
    }
}
