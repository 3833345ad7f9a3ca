//! The streaming decoder: bytes in (split anywhere), packets out.

use bytes::{Buf, BytesMut};

use crate::{DecodeError, HEADER_LEN, Header, MAGIC, Packet};

/// Default bound on one message's payload: enough for an inline 4K BGRx
/// frame (33 MiB) with room to spare.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 << 20;

/// Turns a byte stream into [`Packet`]s.
///
/// Feed it a `BytesMut` that the caller appends to; each call to
/// [`FrameDecoder::decode`] removes at most one message from its front.
/// Nothing the peer claims is allocated before it is checked: a payload size
/// over the limit is refused before any buffer grows, and
/// [`FrameDecoder::reserve_hint`] tells the reader how much to make room for.
///
/// In *resynchronising* mode (byte streams that can restart mid-message, such
/// as a virtio-serial port after a guest reboot) bad magic or an oversize
/// payload does not end the stream: the decoder skips to the next `"HXFR"`
/// and reports [`DecodeError::Resynced`] once, then carries on.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_payload: u32,
    resync: bool,
    /// Header of the message whose payload is still arriving.
    pending: Option<Header>,
    /// Header of the last message taken off the stream, good or malformed.
    last: Option<Header>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_PAYLOAD)
    }
}

const MAGIC_BYTES: [u8; 4] = MAGIC.to_le_bytes();

impl FrameDecoder {
    pub fn new(max_payload: u32) -> FrameDecoder {
        FrameDecoder { max_payload, resync: false, pending: None, last: None }
    }

    /// Hunt for the next magic instead of failing when framing is lost.
    pub fn resynchronising(mut self, on: bool) -> FrameDecoder {
        self.resync = on;
        self
    }

    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// How many more bytes the message at the front of `buf` needs (0 when
    /// unknown or complete). Bounded by the payload limit.
    pub fn reserve_hint(&self, buf: &BytesMut) -> usize {
        match self.pending {
            Some(h) => (h.payload_size as usize).saturating_sub(buf.len()),
            None => HEADER_LEN.saturating_sub(buf.len()),
        }
    }

    /// The header of the last message consumed (also when it was malformed):
    /// lets a server answer a bad request in its own session, in order.
    pub fn last_header(&self) -> Option<Header> {
        self.last
    }

    /// True while a message's header has been read but not all its payload.
    pub fn is_mid_message(&self) -> bool {
        self.pending.is_some()
    }

    /// Forgets any partly read message (after the caller discards its buffer).
    pub fn reset(&mut self) {
        self.pending = None;
    }

    /// Gives up on the message at the front of `buf` (its sender died half-way
    /// through it): drops what arrived of it, up to the next possible magic,
    /// and returns how many bytes went. For resynchronising streams, where
    /// the restarted sender's next message follows the cut-off one.
    pub fn abandon(&mut self, buf: &mut BytesMut) -> usize {
        // With a header taken, `buf` holds only payload: a magic at its very
        // front may already be the next message.
        let from = if self.pending.take().is_some() { 0 } else { 1 };
        skip_to_magic_from(buf, from)
    }

    /// Takes one message off the front of `buf`.
    ///
    /// `Ok(None)`: more bytes are needed. `Err(e)` with `!e.is_fatal()`: one
    /// message was malformed and has been consumed; call again. A fatal error
    /// leaves `buf` as it was: the stream cannot go on.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                if buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                match self.check_header(buf) {
                    Ok(h) => {
                        buf.advance(HEADER_LEN);
                        self.pending = Some(h);
                        h
                    }
                    // Lost framing: report once, with how much was skipped.
                    Err(_) if self.resync => return Err(DecodeError::Resynced(skip_to_magic(buf))),
                    Err(e) => return Err(e),
                }
            }
        };
        let size = header.payload_size as usize;
        if buf.len() < size {
            // Room for the rest of this message, bounded by the checked size.
            buf.reserve(size - buf.len());
            return Ok(None);
        }
        self.pending = None;
        self.last = Some(header);
        let payload = buf.split_to(size).freeze();
        Packet::parse(&header, payload).map(Some)
    }

    fn check_header(&self, buf: &[u8]) -> Result<Header, DecodeError> {
        let header = Header::parse(buf[..HEADER_LEN].try_into().unwrap())?;
        if header.payload_size > self.max_payload {
            return Err(DecodeError::PayloadTooLarge { size: header.payload_size, max: self.max_payload });
        }
        Ok(header)
    }
}

/// Drops bytes from the front of `buf` up to the next possible magic (at
/// least one byte, so a bad header at offset 0 is always left behind); keeps a
/// partial magic at the end. Returns how many bytes were dropped.
fn skip_to_magic(buf: &mut BytesMut) -> usize {
    skip_to_magic_from(buf, 1)
}

fn skip_to_magic_from(buf: &mut BytesMut, from: usize) -> usize {
    if buf.len() <= from {
        let n = buf.len();
        buf.clear();
        return n;
    }
    let found = buf[from..].windows(MAGIC_BYTES.len()).position(|w| w == MAGIC_BYTES).map(|p| p + from);
    let cut = match found {
        Some(p) => p,
        None => {
            // Keep the longest tail that could be the start of a magic.
            let keep = (1..MAGIC_BYTES.len())
                .rev()
                .find(|&k| buf.len() > k && buf[buf.len() - k..] == MAGIC_BYTES[..k])
                .unwrap_or(0);
            buf.len() - keep
        }
    };
    buf.advance(cut);
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    #[test]
    fn skip_keeps_partial_magic() {
        let mut b = BytesMut::from(&b"xxxxHX"[..]);
        assert_eq!(skip_to_magic(&mut b), 4);
        assert_eq!(&b[..], b"HX");
    }

    #[test]
    fn resync_finds_next_message() {
        let mut good = BytesMut::new();
        Packet::new(3, Message::Ping).encode(&mut good);
        let mut b = BytesMut::from(&b"garbage-bytes!!"[..]);
        b.extend_from_slice(&good);
        let mut d = FrameDecoder::default().resynchronising(true);
        assert_eq!(d.decode(&mut b), Err(DecodeError::Resynced(15)));
        assert_eq!(d.decode(&mut b).unwrap(), Some(Packet::new(3, Message::Ping)));
    }

    /// A sender that died mid-payload and came back: the cut-off message is
    /// dropped and the restarted sender's first message decodes.
    #[test]
    fn abandon_drops_a_cut_off_message() {
        let mut big = BytesMut::new();
        Packet::new(1, Message::Error { code: -1, message: "x".repeat(200) }).encode(&mut big);
        let mut ping = BytesMut::new();
        Packet::new(2, Message::Ping).encode(&mut ping);
        let mut d = FrameDecoder::default().resynchronising(true);
        let mut b = BytesMut::from(&big[..HEADER_LEN + 50]);
        assert_eq!(d.decode(&mut b), Ok(None));
        assert!(d.is_mid_message());
        assert_eq!(d.abandon(&mut b), 50);
        assert!(!d.is_mid_message());
        b.extend_from_slice(&ping);
        assert_eq!(d.decode(&mut b).unwrap(), Some(Packet::new(2, Message::Ping)));
        // A half header is dropped too.
        let mut b = BytesMut::from(&big[..10]);
        assert_eq!(d.decode(&mut b), Ok(None));
        assert_eq!(d.abandon(&mut b), 10);
        assert!(b.is_empty());
    }
}
