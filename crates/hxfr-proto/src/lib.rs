//! The HXFR frame-export wire format, byte-compatible with Helix's C
//! `vsockenc` element and Helix's patched QEMU.
//!
//! Every message is a 12-byte little-endian [`Header`] followed by
//! `payload_size` bytes. [`Packet`] is one typed message with its
//! session id; [`Packet::encode`] writes it and [`FrameDecoder`] turns a
//! byte stream, split any way, back into packets without trusting a single
//! number it reads. Our own additions (shared-memory frames, a hello
//! handshake for resynchronising byte streams, a defined CONFIG_RESP) are
//! new message types: a peer that does not know them never receives them
//! unless it asked. See `docs/protocol.md` for the full reference.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

pub mod addr;
pub mod annexb;
#[cfg(feature = "tokio")]
mod codec;
mod decode;
pub mod defaults;
mod error;
pub mod fourcc;
pub mod io;
pub mod layout;
mod message;
mod size;

pub use addr::{Addr, AddrError};
#[cfg(feature = "tokio")]
pub use codec::HxfrCodec;
pub use decode::{DEFAULT_MAX_PAYLOAD, FrameDecoder};
pub use error::{DecodeError, ErrorCode};
pub use fourcc::Fourcc;
pub use layout::{Layout, LayoutError, PixelFormat};
pub use message::*;
pub use size::Size;

/// `"HXFR"` read as a little-endian u32.
pub const MAGIC: u32 = 0x5246_5848;
/// The header on every message.
pub const HEADER_LEN: usize = 12;

/// FRAME_REQUEST flag: raw pixels follow the 44-byte body.
pub const FLAG_PIXEL_DATA: u8 = 0x01;

/// Message type bytes. Values below 0x40 are Helix's; 0x40.. are ours.
pub mod msg_type {
    pub const FRAME_REQUEST: u8 = 0x01;
    pub const FRAME_RESPONSE: u8 = 0x02;
    pub const KEYFRAME_REQ: u8 = 0x03;
    pub const CONFIG_REQ: u8 = 0x04;
    pub const CONFIG_RESP: u8 = 0x05;
    pub const PING: u8 = 0x10;
    pub const PONG: u8 = 0x11;
    pub const ENABLE_SCANOUT: u8 = 0x20;
    pub const DISABLE_SCANOUT: u8 = 0x21;
    pub const SCANOUT_RESP: u8 = 0x22;
    pub const SUBSCRIBE: u8 = 0x30;
    pub const SUBSCRIBE_RESP: u8 = 0x31;
    /// hxfr extension: a frame that lies in the shared-memory region.
    pub const SHM_FRAME_REQUEST: u8 = 0x40;
    /// hxfr extension: start of a conversation; resets the connection's sessions.
    pub const HELLO: u8 = 0x41;
    /// hxfr extension: answer to HELLO.
    pub const HELLO_RESP: u8 = 0x42;
    pub const ERROR: u8 = 0xFF;
}

/// The fixed 12-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub msg_type: u8,
    pub flags: u8,
    pub session_id: u16,
    pub payload_size: u32,
}

impl Header {
    /// Reads a header from exactly [`HEADER_LEN`] bytes; the magic is returned
    /// as an error if wrong, nothing else is judged here.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, DecodeError> {
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        Ok(Header {
            msg_type: b[4],
            flags: b[5],
            session_id: u16::from_le_bytes([b[6], b[7]]),
            payload_size: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.msg_type;
        b[5] = self.flags;
        b[6..8].copy_from_slice(&self.session_id.to_le_bytes());
        b[8..12].copy_from_slice(&self.payload_size.to_le_bytes());
        b
    }
}
