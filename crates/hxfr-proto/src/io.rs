//! Blocking helpers for `std::io` streams (the GStreamer element, guest tools).

use std::io::{self, IoSlice, Read, Write};

use bytes::BytesMut;

use crate::{DecodeError, FrameDecoder, Packet};

/// Reads from `r` until one packet is decoded. Malformed-but-framed messages
/// come back as non-fatal errors, exactly as [`FrameDecoder::decode`] returns
/// them. End of stream before a whole message is an `UnexpectedEof` error.
pub fn read_packet<R: Read>(r: &mut R, dec: &mut FrameDecoder, buf: &mut BytesMut) -> Result<Packet, DecodeError> {
    loop {
        if let Some(p) = dec.decode(buf)? {
            return Ok(p);
        }
        // Read straight into the buffer's spare room; grow by what the current
        // message still needs (bounded by the decoder), at least 64 KiB.
        let want = dec.reserve_hint(buf).max(64 * 1024);
        buf.reserve(want);
        let len = buf.len();
        // Zero-fill then truncate to what was read: no unsafe, and the
        // blocking readers here only take small answers.
        buf.resize(len + want, 0);
        let n = match r.read(&mut buf[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                buf.truncate(len);
                continue;
            }
            Err(e) => {
                buf.truncate(len);
                return Err(e.into());
            }
        };
        buf.truncate(len + n);
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed").into());
        }
    }
}

/// Writes one packet; inline pixels go out by a vectored write, not copied
/// into a staging buffer first.
pub fn write_packet<W: Write>(w: &mut W, p: &Packet, scratch: &mut BytesMut) -> io::Result<()> {
    scratch.clear();
    p.encode_head(scratch);
    let tail: &[u8] = p.tail().map_or(&[], |t| &t[..]);
    write_all_vectored(w, &scratch[..], tail)
}

/// `write_all` over two slices (std's `write_all_vectored` is unstable).
pub fn write_all_vectored<W: Write>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = match w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}
