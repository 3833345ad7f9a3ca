//! A scanout subscriber that keeps Helix's rules, for tests of the push
//! mode: SUBSCRIBE, SUBSCRIBE_RESP as the very next message, CONFIG_REQ, then
//! nothing but FRAME_RESPONSEs with one entry each (anything else would end
//! Helix's stream, so here it is an error).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use hxfr_proto::io::{read_packet, write_packet};
use hxfr_proto::{ConfigReq, DecodeError, FrameDecoder, FrameResponse, Message, Packet};

pub struct Subscriber {
    s: UnixStream,
    dec: FrameDecoder,
    buf: BytesMut,
    scanout: u32,
}

/// Helix's CONFIG_REQ for a subscription: 60/1, baseline, level 4.0, realtime.
pub fn helix_config(width: u32, height: u32, bitrate: u32) -> ConfigReq {
    ConfigReq { width, height, bitrate, fps_num: 60, fps_den: 1, profile: 66, level_x10: 40, realtime: true }
}

impl Subscriber {
    /// Connects to a host's UNIX listener and subscribes to `scanout`:
    /// `Ok(None)` when the host answers success = 0 (the connection is
    /// dropped), else the subscriber, its CONFIG_REQ sent.
    pub fn subscribe(host: &Path, scanout: u32, config: ConfigReq) -> Result<Option<Subscriber>, String> {
        let mut sub = Subscriber::connect(host, scanout)?;
        sub.send(Message::Subscribe { scanout_id: scanout })?;
        let p = sub.read(Duration::from_secs(10))?.ok_or("no SUBSCRIBE_RESP within 10 s")?;
        if p.session_id != scanout as u16 {
            return Err(format!("SUBSCRIBE_RESP's session_id is {}, not the scanout id {scanout}", p.session_id));
        }
        match p.message {
            Message::SubscribeResp { scanout_id, success } if scanout_id == scanout => {
                if !success {
                    return Ok(None);
                }
            }
            other => return Err(format!("the message after SUBSCRIBE must be SUBSCRIBE_RESP, got {other:?}")),
        }
        sub.send(Message::ConfigReq(config))?;
        Ok(Some(sub))
    }

    /// A connection that will speak for `scanout` (its session id), not yet
    /// subscribed: for tests of what comes before or instead.
    pub fn connect(host: &Path, scanout: u32) -> Result<Subscriber, String> {
        let s = UnixStream::connect(host).map_err(|e| format!("{}: {e}", host.display()))?;
        Ok(Subscriber { s, dec: FrameDecoder::default(), buf: BytesMut::new(), scanout })
    }

    pub fn send(&mut self, m: Message) -> Result<(), String> {
        write_packet(&mut self.s, &Packet::new(self.scanout as u16, m), &mut BytesMut::new()).map_err(|e| e.to_string())
    }

    /// The next message, or `None` when none came within `t`.
    pub fn read(&mut self, t: Duration) -> Result<Option<Packet>, String> {
        match self.read_packet(t) {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.is_timeout() => Ok(None),
            Err(e) => Err(format!("subscriber: {e}")),
        }
    }

    /// The next message as the decoder read it: a timeout, the host closing
    /// the connection and a bad message are told apart.
    pub fn read_packet(&mut self, t: Duration) -> Result<Packet, DecodeError> {
        self.s.set_read_timeout(Some(t.max(Duration::from_millis(1))))?;
        read_packet(&mut self.s, &mut self.dec, &mut self.buf)
    }

    /// The next frame, or `None` when none came within `t`. Anything but a
    /// FRAME_RESPONSE with one entry for this scanout is an error.
    pub fn frame(&mut self, t: Duration) -> Result<Option<FrameResponse>, String> {
        let Some(p) = self.read(t)? else { return Ok(None) };
        if p.session_id != self.scanout as u16 {
            return Err(format!("a frame for session {} on scanout {}'s subscription", p.session_id, self.scanout));
        }
        match p.message {
            Message::FrameResponse(r) if r.nals.len() == 1 => Ok(Some(r)),
            Message::FrameResponse(r) => Err(format!("{} NAL entries: Helix reads only the first", r.nals.len())),
            other => Err(format!("a subscriber takes only FRAME_RESPONSE, got {}", other.name())),
        }
    }
}
