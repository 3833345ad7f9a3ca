use thiserror::Error;

/// Why bytes could not be decoded.
///
/// [`DecodeError::is_fatal`] tells the two kinds apart: a fatal error means the
/// stream's framing is lost (the connection must close, or a resynchronising
/// decoder must hunt for the next magic); any other error concerns one message
/// whose bytes have already been consumed, so the stream carries on.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("bad magic {0:#010x} (expected 0x52465848 \"HXFR\")")]
    BadMagic(u32),
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { size: u32, max: u32 },
    #[error("message type {msg_type:#04x}: body is {got} bytes, needs at least {need}")]
    BodyTooShort { msg_type: u8, need: usize, got: usize },
    #[error("FRAME_RESPONSE: nal_count {count} cannot fit in {avail} payload bytes")]
    NalCount { count: u32, avail: usize },
    #[error("FRAME_RESPONSE: NAL {index} of {size} bytes runs past the payload ({avail} bytes left)")]
    NalOverrun { index: u32, size: u32, avail: usize },
    #[error("FRAME_RESPONSE: {0} bytes after the last NAL")]
    TrailingBytes(usize),
    #[error("lost framing; skipped {0} bytes to the next magic")]
    Resynced(usize),
    #[error("i/o: {message}")]
    Io { kind: std::io::ErrorKind, message: String },
}

impl DecodeError {
    /// A read timed out (SO_RCVTIMEO gives EAGAIN on Linux, TimedOut elsewhere).
    pub fn is_timeout(&self) -> bool {
        matches!(self, DecodeError::Io { kind: std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, .. })
    }

    /// True when framing is lost and the byte stream cannot be trusted any more.
    pub fn is_fatal(&self) -> bool {
        matches!(self, DecodeError::BadMagic(_) | DecodeError::PayloadTooLarge { .. } | DecodeError::Io { .. })
    }
}

impl From<std::io::Error> for DecodeError {
    fn from(e: std::io::Error) -> Self {
        DecodeError::Io { kind: e.kind(), message: e.to_string() }
    }
}

/// ERROR message codes (Helix's values, plus none of our own yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ErrorCode {
    Ok = 0,
    InvalidMessage = -1,
    ResourceNotFound = -2,
    NotMetalTexture = -3,
    NoIoSurface = -4,
    EncodeFailed = -5,
    NotConfigured = -6,
    Internal = -99,
}

impl ErrorCode {
    pub fn from_i32(v: i32) -> Option<ErrorCode> {
        Some(match v {
            0 => ErrorCode::Ok,
            -1 => ErrorCode::InvalidMessage,
            -2 => ErrorCode::ResourceNotFound,
            -3 => ErrorCode::NotMetalTexture,
            -4 => ErrorCode::NoIoSurface,
            -5 => ErrorCode::EncodeFailed,
            -6 => ErrorCode::NotConfigured,
            -99 => ErrorCode::Internal,
            _ => return None,
        })
    }
}
