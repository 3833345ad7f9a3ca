//! A connection's reader: bytes in, whole messages out, with bounded memory
//! and a deadline for every message.
//!
//! Bytes are read ahead into a small buffer ([`READ_AHEAD`]). A message
//! that does not fit there takes room for its payload from the host's
//! buffer budget (`--max-buffered-mib`) before one more byte of it is read
//! (or reuses a buffer the connection keeps, which holds its room still:
//! `pool.rs`). Its payload is then read straight into that buffer, in reads
//! as large as the socket gives, and the frame's pixels stay there until
//! encoded: no copy, no growing, no zeroing. The buffer's capacity is only
//! reserved (the payload size was checked against `--max-payload-mib` and
//! paid for in the budget first); its pages cost memory as the bytes arrive,
//! so a guest that sends a 64 MiB header and stops costs the host a share
//! of the budget until its deadline, and no memory.
//!
//! Every message must arrive whole within [`MessageDeadline::allowance`] of its
//! first byte: a floor, or the time its size takes at a minimum rate,
//! whichever is longer. Only the guest's time counts: while the host is not
//! reading (waiting for room in the budget, or for a session to take a
//! request) the clock stops. On a socket a late message closes the
//! connection. On a virtio-serial port, where a restarted guest leaves half
//! a message behind, it is dropped, and so is one that stops arriving for
//! [`SERIAL_STALL`]; the reader then hunts for the next magic at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hxfr_proto::{DecodeError, FrameDecoder, HEADER_LEN, Header, Packet};
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::{debug, warn};

use crate::budget::Budget;
use crate::pool::{Buffer, KEEP_IDLE, Pool};

/// Bytes a connection reads ahead of the message it is on: every control
/// message and small frames fit. Anything larger is budgeted first.
pub(crate) const READ_AHEAD: usize = 16 << 10;
/// On a virtio-serial port a guest that dies mid-message closes nothing:
/// the rest of its message never comes, and its successor's bytes would be
/// taken as that message's payload. So a message that stops arriving for
/// this long is dropped and the reader hunts for the next magic.
pub(crate) const SERIAL_STALL: Duration = Duration::from_secs(2);

/// How long a message may take to arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageDeadline {
    /// Any message, however small.
    pub floor: Duration,
    /// Bytes per second a large message must keep up on average.
    pub min_rate: u64,
}

impl Default for MessageDeadline {
    /// 10 s, or 1 s per MB: 67 s for the largest message the default
    /// `--max-payload-mib` allows.
    fn default() -> Self {
        MessageDeadline { floor: Duration::from_secs(10), min_rate: 1_000_000 }
    }
}

impl MessageDeadline {
    /// How long a message of `bytes` (header included) may take, first byte to last.
    pub fn allowance(&self, bytes: u64) -> Duration {
        self.floor.max(Duration::from_secs_f64(bytes as f64 / self.min_rate.max(1) as f64))
    }
}

/// What the reader found.
pub(crate) enum Event {
    /// A message, and whether its bytes hold their room in the budget
    /// already: one too large for the read-ahead was read into a buffer
    /// that holds its share until the last of its bytes (an inline frame's
    /// pixels) is dropped.
    Packet(Packet, Budgeted),
    /// A message whose framing was intact but whose body was not (or, on a
    /// serial port, garbage that was skipped): the stream goes on.
    Malformed(DecodeError, Option<Header>),
    /// The guest closed its side; `clean` when no message was cut off.
    Eof { clean: bool },
    /// The stream cannot go on (lost framing, a read error, a late message); logged.
    Closed,
}

/// Whether a message's bytes took their room in the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Budgeted {
    /// A small message from the read-ahead: not counted yet.
    No,
    /// Read into a buffer that holds its share.
    Yes,
}

pub(crate) struct Reader<R> {
    rd: R,
    /// Buffers for large payloads, recycled once their frame is encoded.
    pool: Arc<Pool>,
    /// The front of the stream: at most [`READ_AHEAD`] bytes.
    buf: BytesMut,
    decoder: FrameDecoder,
    serial: bool,
    budget: Arc<Budget>,
    rule: MessageDeadline,
    /// When the message at the front began to arrive (guest time: moved
    /// on by the time the host was not reading).
    started: Option<Instant>,
    last_read: Instant,
    /// Since when the host has not been reading.
    paused: Option<Instant>,
}

/// How one wait for bytes ended.
enum Read {
    Some,
    Eof,
    /// The message's deadline (or, on serial, its stall limit) passed.
    Late,
    Failed(std::io::Error),
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(rd: R, decoder: FrameDecoder, serial: bool, budget: Arc<Budget>, rule: MessageDeadline) -> Self {
        Reader {
            rd,
            pool: Pool::new(budget.clone()),
            buf: BytesMut::with_capacity(READ_AHEAD),
            decoder,
            serial,
            budget,
            rule,
            started: None,
            last_read: Instant::now(),
            paused: None,
        }
    }

    /// The next message, or what stopped the stream.
    pub async fn next(&mut self) -> Event {
        self.resume();
        let event = self.next_event().await;
        self.pause();
        if matches!(event, Event::Eof { .. } | Event::Closed) {
            self.pool.clear();
        }
        event
    }

    async fn next_event(&mut self) -> Event {
        loop {
            if self.buf.len() >= HEADER_LEN {
                let header = Header::parse(self.buf[..HEADER_LEN].try_into().expect("a header's bytes"))
                    .ok()
                    .filter(|h| h.payload_size <= self.decoder.max_payload());
                let size = header.map(|h| HEADER_LEN + h.payload_size as usize);
                match (header, size) {
                    // A whole message, or a bad header the decoder reports (or skips).
                    (None, _) => return self.decode_front(),
                    (_, Some(size)) if size <= self.buf.len() => return self.decode_front(),
                    (Some(h), Some(size)) if size > READ_AHEAD => match self.read_large(h).await {
                        Some(e) => return e,
                        None => continue, // dropped (serial): look at what followed at once
                    },
                    _ => {} // a small message, still arriving
                }
            }
            // Whatever is at the front needs more bytes than the read-ahead holds.
            let room = READ_AHEAD.saturating_sub(self.buf.len());
            debug_assert!(room > 0);
            self.buf.reserve(room);
            let deadline = self.stall_deadline(self.deadline(READ_AHEAD as u64));
            // Between messages, kept buffers go back to the budget once the
            // guest has been quiet for a while.
            let idle = (deadline.is_none() && self.pool.holds_any()).then(|| Instant::now() + KEEP_IDLE);
            let read = {
                let mut rd = (&mut self.rd).take(room as u64);
                read_until(rd.read_buf(&mut self.buf), deadline.or(idle)).await
            };
            match self.read_done(read) {
                Read::Some => {}
                Read::Eof => return Event::Eof { clean: self.buf.is_empty() },
                Read::Late if deadline.is_none() => self.pool.clear(),
                Read::Late => {
                    if let Some(e) = self.late() {
                        return e;
                    }
                }
                Read::Failed(e) => {
                    debug!("read failed: {e}");
                    return Event::Closed;
                }
            }
        }
    }

    /// Takes the message at the front of the read-ahead.
    fn decode_front(&mut self) -> Event {
        let event = match self.decoder.decode(&mut self.buf) {
            Ok(Some(p)) => Event::Packet(p, Budgeted::No),
            Ok(None) => unreachable!("decode_front is called with a whole message or a bad header"),
            Err(e) if e.is_fatal() => {
                warn!("closing: {e}");
                return Event::Closed;
            }
            Err(e) => Event::Malformed(e, self.decoder.last_header()),
        };
        self.started = (!self.buf.is_empty()).then_some(self.last_read);
        event
    }

    /// A message too large for the read-ahead: room in the budget first (or
    /// a kept buffer, which holds room already), then its payload, read
    /// straight into that buffer. `None` when it was dropped (serial) and the
    /// read-ahead holds what came after it.
    async fn read_large(&mut self, h: Header) -> Option<Event> {
        // Checked against the payload limit by the caller; the read-ahead
        // holds this message's first bytes and nothing after them.
        let size = h.payload_size as usize;
        debug_assert!(HEADER_LEN + size > READ_AHEAD && self.buf.len() < HEADER_LEN + size);
        let mut buf = match self.pool.take(size) {
            Some(b) => b,
            None => {
                self.pause();
                let share = self.budget.take(size as u64).await?;
                self.resume();
                Buffer::new(size, share)
            }
        };
        let head: [u8; HEADER_LEN] = self.buf[..HEADER_LEN].try_into().expect("a header's bytes");
        buf.bytes.extend_from_slice(&self.buf[HEADER_LEN..]);
        self.buf.clear();
        let deadline = self.deadline((HEADER_LEN + size) as u64);
        while buf.bytes.len() < size {
            // As much as the socket holds, up to the end of this message,
            // into the buffer's reserved room (no zeroing, no growing).
            let want = size - buf.bytes.len();
            let until = self.stall_deadline(deadline);
            let read = {
                let mut rd = (&mut self.rd).take(want as u64);
                read_until(rd.read_buf(&mut buf.bytes), until).await
            };
            match self.read_done(read) {
                Read::Some => {}
                Read::Eof => return Some(Event::Eof { clean: false }),
                Read::Late => {
                    // What came of it, header first, as the read-ahead would
                    // hold it (in place: the buffer has room for the header,
                    // which is smaller than what has not come). Its share
                    // goes back now.
                    let Buffer { bytes: mut got, .. } = buf;
                    got.splice(0..0, head);
                    self.buf = BytesMut::from(bytes::Bytes::from(got)); // no copy: the Vec is unique
                    return self.late();
                }
                Read::Failed(e) => {
                    debug!("read failed: {e}");
                    return Some(Event::Closed);
                }
            }
        }
        self.started = None;
        // Inline pixels become a slice of the buffer, which returns to the
        // pool when they are dropped (once encoded).
        Some(match Packet::parse(&h, self.pool.freeze(buf)) {
            Ok(p) => Event::Packet(p, Budgeted::Yes),
            Err(e) => Event::Malformed(e, Some(h)),
        })
    }

    fn read_done(&mut self, read: Result<std::io::Result<usize>, Late>) -> Read {
        match read {
            Err(Late) => Read::Late,
            Ok(Ok(0)) => Read::Eof,
            Ok(Ok(_)) => {
                self.last_read = Instant::now();
                self.started.get_or_insert(self.last_read);
                Read::Some
            }
            Ok(Err(e)) => Read::Failed(e),
        }
    }

    /// The message at the front is late: close (socket) or drop it (serial).
    fn late(&mut self) -> Option<Event> {
        let took = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        if !self.serial {
            let got = self.buf.len();
            warn!("closing: a message did not arrive whole within {took:.1}s ({got} bytes of it came)");
            return Some(Event::Closed);
        }
        let dropped = self.decoder.abandon(&mut self.buf);
        warn!("dropped a message cut off {took:.1}s after it began (guest restarted?): {dropped} bytes");
        // What follows it (the restarted guest's first bytes) gets clocks of its own.
        self.last_read = Instant::now();
        self.started = (!self.buf.is_empty()).then_some(self.last_read);
        None
    }

    /// When the message at the front, of `size` bytes, must be whole; `None`
    /// between messages (a guest may be idle as long as it likes).
    fn deadline(&self, size: u64) -> Option<Instant> {
        Some(self.started? + self.rule.allowance(size))
    }

    /// On serial, also when the message must have moved again.
    fn stall_deadline(&self, whole: Option<Instant>) -> Option<Instant> {
        let whole = whole?;
        Some(if self.serial { whole.min(self.last_read + SERIAL_STALL) } else { whole })
    }

    /// The host stops reading (to hand a message on, or to wait for room):
    /// the guest's clocks stop.
    fn pause(&mut self) {
        self.paused = Some(Instant::now());
    }

    fn resume(&mut self) {
        if let Some(p) = self.paused.take() {
            let host_time = p.elapsed();
            if let Some(s) = &mut self.started {
                *s += host_time;
            }
            self.last_read += host_time;
        }
    }
}

/// A read that did not finish by its deadline.
struct Late;

async fn read_until<F>(read: F, deadline: Option<Instant>) -> Result<std::io::Result<usize>, Late>
where
    F: Future<Output = std::io::Result<usize>>,
{
    match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), read).await.map_err(|_| Late),
        None => Ok(read.await),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use hxfr_proto::{Fourcc, FrameRequest, Message};
    use tokio::io::AsyncWriteExt;

    use super::*;

    fn frame(len: usize) -> Packet {
        let pixels = Some(Bytes::from((0..len).map(|i| i as u8).collect::<Vec<u8>>()));
        let r = FrameRequest {
            resource_id: 0,
            width: 2,
            height: 2,
            format: Fourcc::ARGB8888,
            stride: 8,
            pts: len as i64,
            duration: 0,
            force_keyframe: false,
            pixels,
        };
        Packet::new(3, Message::FrameRequest(r))
    }

    /// Small and large messages, split anywhere, come out whole and in
    /// order; only large ones take (and bring) a share of the budget, and
    /// their buffers are kept (with it) for the next large one, until the
    /// stream ends.
    #[tokio::test]
    async fn messages_split_anywhere_come_out_whole() {
        let sent = [
            Packet::new(1, Message::Ping),
            frame(3 * READ_AHEAD + 5),
            frame(100),
            frame((2 << 20) + 1),
            frame(3 * READ_AHEAD + 5),
        ];
        let mut bytes = BytesMut::new();
        for p in &sent {
            p.encode(&mut bytes);
        }
        let (mut tx, rx) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move {
            // Chunks of 1, 2, 3 … 997 bytes, then again.
            let (mut at, mut n) = (0, 1);
            while at < bytes.len() {
                let end = (at + n).min(bytes.len());
                tx.write_all(&bytes[at..end]).await.unwrap();
                (at, n) = (end, n % 997 + 1);
            }
        });
        let budget = Arc::new(Budget::new(64 << 20));
        let mut r = Reader::new(rx, FrameDecoder::default(), false, budget.clone(), MessageDeadline::default());
        let mut large_seen = false;
        for want in &sent {
            match r.next().await {
                Event::Packet(p, budgeted) => {
                    assert_eq!(&p, want);
                    let large = want.encoded_len() > READ_AHEAD;
                    large_seen |= large;
                    assert_eq!(budgeted == Budgeted::Yes, large, "a share for large messages only");
                    assert_eq!(budget.gauge().in_use > 0, large_seen, "kept buffers keep their share");
                }
                _ => panic!("expected a packet"),
            }
        }
        writer.await.unwrap();
        assert!(matches!(r.next().await, Event::Eof { clean: true }));
        assert_eq!(budget.gauge().in_use, 0);
    }
}
