//! Helix's desktop stream protocol, the one its browser client and
//! `helix spectask stream` speak on `/ws/stream`. One WebSocket message per
//! protocol message; integers are big-endian unless noted.
//!
//! ```text
//! viewer → bridge, text    {"type":"init","width","height","fps","bitrate"(kbit/s),…}  (first)
//! bridge → viewer, binary  StreamInit  0x30 codec(0x01 H.264) width u16 height u16 fps u8
//!                                      audio channels u8 (0) sample rate u32 (0) touch u8   13 bytes
//! bridge → viewer, text    {"ConnectionComplete":{"capabilities":{"touch":false},"width":W,"height":H}}
//! bridge → viewer, binary  VideoFrame  0x01 codec flags(bit0 key, bit1 replayed) pts u64 µs
//!                                      width u16 height u16, then the Annex-B access unit  15 + AU
//! bridge → viewer, binary  StreamError 0x31 length u16, UTF-8 text
//! viewer → bridge, binary  Ping        0x40 seq u32 client time u64 µs                      13 bytes
//! bridge → viewer, binary  Pong        0x41 seq u32 client time u64 (echo) server time u64 µs
//!                                      encoder latency ms u16, scheduler p50/p99/max ms u16    29 bytes
//! viewer → bridge, binary  0x10 keyboard  0 down(0/1) modifiers u8 key u16                   6 bytes
//!                          0x11 mouse     2 down button(1..5)                                4 bytes
//!                                         3 wheel dx dy: i16 BE each (6 bytes) or f32 LE each (10 bytes)
//!                                         4 wheel dx dy: i8 each                             4 bytes
//!                          0x12 absolute  1 x y reference-width reference-height, i16 each  10 bytes
//!                          0x13 relative  0 dx dy, i16 each                                  6 bytes
//!                          0x14 touch     event(0 down, 1 move, 2 up) slot(0..9) x y f32 LE in 0..1  11 bytes
//!                          0x15/0x16 controller, 0x17 microphone: recognised, not supported
//!                          0x20 control   JSON {"set_video_enabled": bool}
//! ```
//!
//! Everything a viewer sends is checked here before anything acts on it:
//! lengths are exact, enumerations and ranges are checked, nothing is
//! allocated from a length the viewer gave.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::json;
use thiserror::Error;

pub const MSG_VIDEO_FRAME: u8 = 0x01;
pub const MSG_KEYBOARD: u8 = 0x10;
pub const MSG_MOUSE_CLICK: u8 = 0x11;
pub const MSG_MOUSE_ABSOLUTE: u8 = 0x12;
pub const MSG_MOUSE_RELATIVE: u8 = 0x13;
pub const MSG_TOUCH: u8 = 0x14;
pub const MSG_CONTROLLER_EVENT: u8 = 0x15;
pub const MSG_CONTROLLER_STATE: u8 = 0x16;
pub const MSG_MIC_AUDIO: u8 = 0x17;
pub const MSG_CONTROL: u8 = 0x20;
pub const MSG_STREAM_INIT: u8 = 0x30;
pub const MSG_STREAM_ERROR: u8 = 0x31;
pub const MSG_PING: u8 = 0x40;
pub const MSG_PONG: u8 = 0x41;

pub const CODEC_H264: u8 = 0x01;
pub const FLAG_KEYFRAME: u8 = 0x01;
pub const FLAG_REPLAYED: u8 = 0x02;

pub const STREAM_INIT_LEN: usize = 13;
pub const VIDEO_HEADER_LEN: usize = 15;
pub const PING_LEN: usize = 13;
pub const PONG_LEN: usize = 29;

/// The codec string Helix's browser client configures its decoder with,
/// whatever the stream says: Constrained Baseline, level 4.0.
pub const CLIENT_CODEC: &str = "avc1.42d028";
/// The largest message a viewer has a reason to send (a control message).
pub const MAX_CLIENT_MESSAGE: usize = 4096;
/// The largest init message accepted.
pub const MAX_INIT: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Error)]
pub enum HelixError {
    #[error("empty message")]
    Empty,
    #[error("{len}-byte message is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("{what}: {len} bytes, expected {expected}")]
    Length { what: &'static str, len: usize, expected: &'static str },
    #[error("{what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

fn invalid(what: &'static str, detail: impl Into<String>) -> HelixError {
    HelixError::Invalid { what, detail: detail.into() }
}

fn exact(what: &'static str, msg: &[u8], len: usize, expected: &'static str) -> Result<(), HelixError> {
    if msg.len() == len { Ok(()) } else { Err(HelixError::Length { what, len: msg.len(), expected }) }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}
fn i16_at(b: &[u8], i: usize) -> i16 {
    i16::from_be_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}
fn f32_le_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The first thing the bridge sends: what the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamInit {
    pub width: u16,
    pub height: u16,
    pub fps: u8,
    pub touch: bool,
}

impl StreamInit {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(STREAM_INIT_LEN);
        b.put_u8(MSG_STREAM_INIT);
        b.put_u8(CODEC_H264);
        b.put_u16(self.width);
        b.put_u16(self.height);
        b.put_u8(self.fps);
        b.put_u8(0); // audio channels: no audio
        b.put_u32(0); // sample rate
        b.put_u8(self.touch as u8);
        b.freeze()
    }
}

/// The header in front of each access unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoFrame {
    pub keyframe: bool,
    pub replayed: bool,
    pub pts_us: u64,
    pub width: u16,
    pub height: u16,
}

impl VideoFrame {
    /// The whole message: header, then the access unit.
    pub fn encode(&self, au: &[u8]) -> BytesMut {
        let mut b = BytesMut::with_capacity(VIDEO_HEADER_LEN + au.len());
        b.put_u8(MSG_VIDEO_FRAME);
        b.put_u8(CODEC_H264);
        b.put_u8(if self.keyframe { FLAG_KEYFRAME } else { 0 } | if self.replayed { FLAG_REPLAYED } else { 0 });
        b.put_u64(self.pts_us);
        b.put_u16(self.width);
        b.put_u16(self.height);
        b.put_slice(au);
        b
    }
}

/// The viewer's clock probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    pub seq: u32,
    pub client_time_us: u64,
}

impl Ping {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(PING_LEN);
        b.put_u8(MSG_PING);
        b.put_u32(self.seq);
        b.put_u64(self.client_time_us);
        b.freeze()
    }
}

/// The answer to a [`Ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pong {
    pub seq: u32,
    pub client_time_us: u64,
    pub server_time_us: u64,
    pub encoder_latency_ms: u16,
    pub scheduler_p50_ms: u16,
    pub scheduler_p99_ms: u16,
    pub scheduler_max_ms: u16,
}

impl Pong {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(PONG_LEN);
        b.put_u8(MSG_PONG);
        b.put_u32(self.seq);
        b.put_u64(self.client_time_us);
        b.put_u64(self.server_time_us);
        b.put_u16(self.encoder_latency_ms);
        b.put_u16(self.scheduler_p50_ms);
        b.put_u16(self.scheduler_p99_ms);
        b.put_u16(self.scheduler_max_ms);
        b.freeze()
    }
}

/// StreamError: the text is cut (at a character boundary) to what a u16 length holds.
pub fn stream_error(text: &str) -> Bytes {
    let mut end = text.len().min(u16::MAX as usize);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut b = BytesMut::with_capacity(3 + end);
    b.put_u8(MSG_STREAM_ERROR);
    b.put_u16(end as u16);
    b.put_slice(&text.as_bytes()[..end]);
    b.freeze()
}

/// The text message after StreamInit; Helix's client starts its input on it.
pub fn connection_complete(width: u16, height: u16) -> String {
    json!({"ConnectionComplete": {"capabilities": {"touch": false}, "width": width, "height": height}}).to_string()
}

/// What the bridge sends when it has sent nothing for a while (a still
/// desktop), so that the viewer does not declare the connection stale. A
/// JSON object with no key Helix's client acts on.
pub fn heartbeat(server_time_us: u64) -> String {
    json!({"heartbeat": {"server_time_us": server_time_us}}).to_string()
}

/// The viewer's first message. Only `type` is required; what the viewer
/// asks for is reported, the bridge streams what its pipeline makes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Init {
    pub width: Option<u64>,
    pub height: Option<u64>,
    pub fps: Option<u64>,
    pub bitrate_kbps: Option<u64>,
    pub session_id: Option<String>,
}

impl Init {
    pub fn parse(text: &str) -> Result<Init, HelixError> {
        const WHAT: &str = "init";
        if text.len() > MAX_INIT {
            return Err(HelixError::TooLarge { len: text.len(), max: MAX_INIT });
        }
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| invalid(WHAT, format!("bad JSON: {e}")))?;
        if !v.is_object() {
            return Err(invalid(WHAT, "not a JSON object"));
        }
        if v["type"] != "init" {
            return Err(invalid(WHAT, format!("type is {}, expected \"init\"", v["type"])));
        }
        let session_id = match &v["session_id"] {
            serde_json::Value::String(s) => Some(s.chars().take(128).collect()),
            serde_json::Value::Null => None,
            other => Some(other.to_string().chars().take(128).collect()),
        };
        Ok(Init {
            width: v["width"].as_u64(),
            height: v["height"].as_u64(),
            fps: v["fps"].as_u64(),
            bitrate_kbps: v["bitrate"].as_u64(),
            session_id,
        })
    }

    /// An init message as Helix's client writes one.
    pub fn to_json(width: u32, height: u32, fps: u32, bitrate_kbps: u32) -> String {
        json!({
            "type": "init", "host_id": 0, "app_id": 0, "session_id": "",
            "width": width, "height": height, "fps": fps, "bitrate": bitrate_kbps,
            "packet_size": 1024, "play_audio_local": false, "video_supported_formats": 1,
        })
        .to_string()
    }
}

/// An input event, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Input {
    Key { down: bool, modifiers: u8, key: u16 },
    MouseButton { down: bool, button: u8 },
    Wheel { dx: i8, dy: i8 },
    WheelHighRes { dx: f32, dy: f32 },
    MouseAbsolute { x: i16, y: i16, ref_width: i16, ref_height: i16 },
    MouseRelative { dx: i16, dy: i16 },
    Touch { event: u8, slot: u8, x: f32, y: f32 },
}

impl Input {
    /// The message type it came in (0x10–0x14).
    pub fn message_type(&self) -> u8 {
        match self {
            Input::Key { .. } => MSG_KEYBOARD,
            Input::MouseButton { .. } | Input::Wheel { .. } | Input::WheelHighRes { .. } => MSG_MOUSE_CLICK,
            Input::MouseAbsolute { .. } => MSG_MOUSE_ABSOLUTE,
            Input::MouseRelative { .. } => MSG_MOUSE_RELATIVE,
            Input::Touch { .. } => MSG_TOUCH,
        }
    }
}

/// What a viewer may send after init, as binary messages.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Ping(Ping),
    Input(Input),
    /// `set_video_enabled`, when the control message has it.
    Control {
        set_video_enabled: Option<bool>,
    },
    /// A type Helix defines that this bridge does not serve (controllers, microphone).
    Unsupported(u8),
}

fn flag(what: &'static str, b: u8) -> Result<bool, HelixError> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(invalid(what, format!("down flag {v}, expected 0 or 1"))),
    }
}

fn subtype(what: &'static str, msg: &[u8], want: u8) -> Result<(), HelixError> {
    match msg.get(1) {
        Some(&s) if s == want => Ok(()),
        Some(&s) => Err(invalid(what, format!("sub-type {s}, expected {want}"))),
        None => Err(HelixError::Length { what, len: msg.len(), expected: "at least 2" }),
    }
}

/// Parses and validates one binary message from a viewer.
pub fn parse_client(msg: &[u8]) -> Result<ClientMessage, HelixError> {
    if msg.len() > MAX_CLIENT_MESSAGE {
        return Err(HelixError::TooLarge { len: msg.len(), max: MAX_CLIENT_MESSAGE });
    }
    let Some(&kind) = msg.first() else { return Err(HelixError::Empty) };
    Ok(match kind {
        MSG_PING => {
            exact("ping", msg, PING_LEN, "13")?;
            ClientMessage::Ping(Ping { seq: u32_at(msg, 1), client_time_us: u64_at(msg, 5) })
        }
        MSG_KEYBOARD => {
            const W: &str = "keyboard";
            exact(W, msg, 6, "6")?;
            subtype(W, msg, 0)?;
            ClientMessage::Input(Input::Key { down: flag(W, msg[2])?, modifiers: msg[3], key: u16_at(msg, 4) })
        }
        MSG_MOUSE_CLICK => ClientMessage::Input(parse_mouse_click(msg)?),
        MSG_MOUSE_ABSOLUTE => {
            const W: &str = "absolute pointer";
            exact(W, msg, 10, "10")?;
            subtype(W, msg, 1)?;
            let (x, y, ref_width, ref_height) = (i16_at(msg, 2), i16_at(msg, 4), i16_at(msg, 6), i16_at(msg, 8));
            if ref_width <= 0 || ref_height <= 0 {
                return Err(invalid(W, format!("reference size {ref_width}x{ref_height}")));
            }
            if !(0..=ref_width).contains(&x) || !(0..=ref_height).contains(&y) {
                return Err(invalid(W, format!("({x}, {y}) outside {ref_width}x{ref_height}")));
            }
            ClientMessage::Input(Input::MouseAbsolute { x, y, ref_width, ref_height })
        }
        MSG_MOUSE_RELATIVE => {
            const W: &str = "relative pointer";
            exact(W, msg, 6, "6")?;
            subtype(W, msg, 0)?;
            ClientMessage::Input(Input::MouseRelative { dx: i16_at(msg, 2), dy: i16_at(msg, 4) })
        }
        MSG_TOUCH => {
            const W: &str = "touch";
            exact(W, msg, 11, "11")?;
            let (event, slot, x, y) = (msg[1], msg[2], f32_le_at(msg, 3), f32_le_at(msg, 7));
            if event > 2 {
                return Err(invalid(W, format!("event {event}, expected 0 (down), 1 (move) or 2 (up)")));
            }
            if slot > 9 {
                return Err(invalid(W, format!("slot {slot}, expected 0..9")));
            }
            if !(0.0..=1.0).contains(&x) || !(0.0..=1.0).contains(&y) {
                return Err(invalid(W, format!("({x}, {y}) outside 0..1")));
            }
            ClientMessage::Input(Input::Touch { event, slot, x, y })
        }
        MSG_CONTROL => {
            const W: &str = "control";
            let text = std::str::from_utf8(&msg[1..]).map_err(|e| invalid(W, format!("not UTF-8: {e}")))?;
            let v: serde_json::Value = serde_json::from_str(text).map_err(|e| invalid(W, format!("bad JSON: {e}")))?;
            let obj = v.as_object().ok_or_else(|| invalid(W, "not a JSON object"))?;
            let set_video_enabled = match obj.get("set_video_enabled") {
                None => None,
                Some(serde_json::Value::Bool(b)) => Some(*b),
                Some(other) => return Err(invalid(W, format!("set_video_enabled is {other}, expected a boolean"))),
            };
            ClientMessage::Control { set_video_enabled }
        }
        MSG_CONTROLLER_EVENT | MSG_CONTROLLER_STATE | MSG_MIC_AUDIO => ClientMessage::Unsupported(kind),
        other => return Err(HelixError::UnknownType(other)),
    })
}

fn parse_mouse_click(msg: &[u8]) -> Result<Input, HelixError> {
    const W: &str = "mouse button/wheel";
    match msg.get(1) {
        Some(2) => {
            exact(W, msg, 4, "4")?;
            let button = msg[3];
            if !(1..=5).contains(&button) {
                return Err(invalid(W, format!("button {button}, expected 1..5")));
            }
            Ok(Input::MouseButton { down: flag(W, msg[2])?, button })
        }
        Some(3) => match msg.len() {
            // Helix's clients have sent both: i16 big-endian, then f32 little-endian.
            6 => Ok(Input::WheelHighRes { dx: i16_at(msg, 2) as f32, dy: i16_at(msg, 4) as f32 }),
            10 => {
                let (dx, dy) = (f32_le_at(msg, 2), f32_le_at(msg, 6));
                if !dx.is_finite() || !dy.is_finite() || dx.abs() > 1e6 || dy.abs() > 1e6 {
                    return Err(invalid(W, format!("wheel delta ({dx}, {dy})")));
                }
                Ok(Input::WheelHighRes { dx, dy })
            }
            len => Err(HelixError::Length { what: W, len, expected: "6 or 10" }),
        },
        Some(4) => {
            exact(W, msg, 4, "4")?;
            Ok(Input::Wheel { dx: msg[2] as i8, dy: msg[3] as i8 })
        }
        Some(s) => Err(invalid(W, format!("sub-type {s}, expected 2 (button), 3 or 4 (wheel)"))),
        None => Err(HelixError::Length { what: W, len: msg.len(), expected: "at least 2" }),
    }
}

/// What a bridge sends, as binary messages (for `hxfr stream`).
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage<'a> {
    StreamInit {
        codec: u8,
        init: StreamInit,
        audio_channels: u8,
        sample_rate: u32,
    },
    Video {
        codec: u8,
        frame: VideoFrame,
        au: &'a [u8],
    },
    Pong(Pong),
    Error(String),
    /// A type this reader does not interpret (audio, cursors, …).
    Other(u8),
}

/// Parses one binary message from a bridge.
pub fn parse_server(msg: &[u8]) -> Result<ServerMessage<'_>, HelixError> {
    let Some(&kind) = msg.first() else { return Err(HelixError::Empty) };
    Ok(match kind {
        MSG_STREAM_INIT => {
            exact("StreamInit", msg, STREAM_INIT_LEN, "13")?;
            ServerMessage::StreamInit {
                codec: msg[1],
                init: StreamInit { width: u16_at(msg, 2), height: u16_at(msg, 4), fps: msg[6], touch: msg[12] != 0 },
                audio_channels: msg[7],
                sample_rate: u32_at(msg, 8),
            }
        }
        MSG_VIDEO_FRAME => {
            if msg.len() < VIDEO_HEADER_LEN {
                return Err(HelixError::Length { what: "VideoFrame", len: msg.len(), expected: "at least 15" });
            }
            ServerMessage::Video {
                codec: msg[1],
                frame: VideoFrame {
                    keyframe: msg[2] & FLAG_KEYFRAME != 0,
                    replayed: msg[2] & FLAG_REPLAYED != 0,
                    pts_us: u64_at(msg, 3),
                    width: u16_at(msg, 11),
                    height: u16_at(msg, 13),
                },
                au: &msg[VIDEO_HEADER_LEN..],
            }
        }
        MSG_PONG => {
            exact("Pong", msg, PONG_LEN, "29")?;
            ServerMessage::Pong(Pong {
                seq: u32_at(msg, 1),
                client_time_us: u64_at(msg, 5),
                server_time_us: u64_at(msg, 13),
                encoder_latency_ms: u16_at(msg, 21),
                scheduler_p50_ms: u16_at(msg, 23),
                scheduler_p99_ms: u16_at(msg, 25),
                scheduler_max_ms: u16_at(msg, 27),
            })
        }
        MSG_STREAM_ERROR => {
            if msg.len() < 3 || msg.len() != 3 + u16_at(msg, 1) as usize {
                return Err(HelixError::Length { what: "StreamError", len: msg.len(), expected: "3 + its length" });
            }
            ServerMessage::Error(String::from_utf8_lossy(&msg[3..]).into_owned())
        }
        other => ServerMessage::Other(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_messages_have_helix_layout_and_round_trip() {
        let init = StreamInit { width: 1920, height: 1080, fps: 30, touch: false };
        let b = init.encode();
        assert_eq!(&b[..], &[0x30, 0x01, 0x07, 0x80, 0x04, 0x38, 30, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            parse_server(&b).unwrap(),
            ServerMessage::StreamInit { codec: 1, init, audio_channels: 0, sample_rate: 0 }
        );

        let f = VideoFrame { keyframe: true, replayed: false, pts_us: 0x0102_0304_0506_0708, width: 640, height: 360 };
        let m = f.encode(&[0, 0, 0, 1, 0x65]);
        assert_eq!(&m[..15], &[0x01, 0x01, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0x02, 0x80, 0x01, 0x68]);
        assert_eq!(parse_server(&m).unwrap(), ServerMessage::Video { codec: 1, frame: f, au: &[0, 0, 0, 1, 0x65] });
        let replayed = VideoFrame { keyframe: false, replayed: true, ..f }.encode(&[]);
        assert_eq!(replayed[2], 0x02);

        let p = Pong {
            seq: 7,
            client_time_us: 42,
            server_time_us: 99,
            encoder_latency_ms: 5,
            scheduler_p50_ms: 1,
            scheduler_p99_ms: 2,
            scheduler_max_ms: 3,
        };
        let b = p.encode();
        assert_eq!(b.len(), PONG_LEN);
        assert_eq!(&b[..5], &[0x41, 0, 0, 0, 7]);
        assert_eq!(parse_server(&b).unwrap(), ServerMessage::Pong(p));

        let e = stream_error("no init");
        assert_eq!(&e[..], b"\x31\x00\x07no init");
        assert_eq!(parse_server(&e).unwrap(), ServerMessage::Error("no init".into()));
        // Cut at a character boundary when it does not fit a u16 length.
        let long = "é".repeat(40_000);
        let e = stream_error(&long);
        assert_eq!(u16::from_be_bytes([e[1], e[2]]) as usize, e.len() - 3);
        assert!(std::str::from_utf8(&e[3..]).is_ok());

        let cc: serde_json::Value = serde_json::from_str(&connection_complete(1280, 720)).unwrap();
        assert_eq!(cc["ConnectionComplete"]["capabilities"]["touch"], false);
        assert_eq!(
            (cc["ConnectionComplete"]["width"].as_u64(), cc["ConnectionComplete"]["height"].as_u64()),
            (Some(1280), Some(720))
        );
        assert!(parse_server(&[0x30, 1]).is_err());
        assert!(parse_server(&[0x01; 14]).is_err());
        assert!(parse_server(&[0x31, 0, 9, b'x']).is_err());
        assert_eq!(parse_server(&[0x50, 1, 2]).unwrap(), ServerMessage::Other(0x50));
    }

    #[test]
    fn init_is_read_leniently_but_must_say_init() {
        let i = Init::parse(&Init::to_json(1920, 1080, 60, 20_000)).unwrap();
        assert_eq!((i.width, i.height, i.fps, i.bitrate_kbps), (Some(1920), Some(1080), Some(60), Some(20_000)));
        assert_eq!(Init::parse(r#"{"type":"init"}"#).unwrap(), Init::default());
        assert_eq!(Init::parse(r#"{"type":"init","session_id":42}"#).unwrap().session_id.as_deref(), Some("42"));
        for bad in ["", "[]", "{", r#"{"type":"hello"}"#, r#"{"width":1}"#, "\"init\""] {
            assert!(Init::parse(bad).is_err(), "{bad:?}");
        }
        let huge = format!(r#"{{"type":"init","pad":"{}"}}"#, "x".repeat(MAX_INIT));
        assert!(matches!(Init::parse(&huge), Err(HelixError::TooLarge { .. })));
    }

    #[test]
    fn client_messages_as_helix_sends_them_are_accepted() {
        let ping = Ping { seq: 3, client_time_us: 123_456 };
        assert_eq!(parse_client(&ping.encode()).unwrap(), ClientMessage::Ping(ping));
        let cases: Vec<(Vec<u8>, Input)> = vec![
            (vec![0x10, 0, 1, 2, 0x00, 0x41], Input::Key { down: true, modifiers: 2, key: 0x41 }),
            (vec![0x11, 2, 0, 3], Input::MouseButton { down: false, button: 3 }),
            (vec![0x11, 4, 0xff, 1], Input::Wheel { dx: -1, dy: 1 }),
            (vec![0x11, 3, 0xff, 0x88, 0, 120], Input::WheelHighRes { dx: -120.0, dy: 120.0 }),
            (
                [&[0x11, 3][..], &1.5f32.to_le_bytes(), &(-2.0f32).to_le_bytes()].concat(),
                Input::WheelHighRes { dx: 1.5, dy: -2.0 },
            ),
            (
                vec![0x12, 1, 0, 10, 0, 20, 0x07, 0x80, 0x04, 0x38],
                Input::MouseAbsolute { x: 10, y: 20, ref_width: 1920, ref_height: 1080 },
            ),
            (vec![0x13, 0, 0xff, 0xfe, 0, 3], Input::MouseRelative { dx: -2, dy: 3 }),
            (
                [&[0x14, 0, 9][..], &0.25f32.to_le_bytes(), &1.0f32.to_le_bytes()].concat(),
                Input::Touch { event: 0, slot: 9, x: 0.25, y: 1.0 },
            ),
        ];
        for (bytes, want) in cases {
            match parse_client(&bytes) {
                Ok(ClientMessage::Input(got)) => {
                    assert_eq!(got, want);
                    assert_eq!(got.message_type(), bytes[0]);
                }
                other => panic!("{bytes:02x?}: {other:?}"),
            }
        }
        let control = [&[0x20][..], br#"{"set_video_enabled":false}"#].concat();
        assert_eq!(parse_client(&control).unwrap(), ClientMessage::Control { set_video_enabled: Some(false) });
        assert_eq!(parse_client(b"\x20{}").unwrap(), ClientMessage::Control { set_video_enabled: None });
        assert_eq!(parse_client(&[0x15, 1, 2]).unwrap(), ClientMessage::Unsupported(0x15));
    }

    #[test]
    fn malformed_client_messages_are_refused_with_a_reason() {
        let nan = [&[0x14, 0, 0][..], &f32::NAN.to_le_bytes(), &0.5f32.to_le_bytes()].concat();
        let inf_wheel = [&[0x11, 3][..], &f32::INFINITY.to_le_bytes(), &0.0f32.to_le_bytes()].concat();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty"),
            (vec![0x99], "unknown message type 0x99"),
            (vec![0x40, 0, 0], "ping: 3 bytes"),
            (vec![0x10, 0, 1], "keyboard: 3 bytes"),
            (vec![0x10, 1, 1, 0, 0, 0x41], "sub-type 1"),
            (vec![0x10, 0, 2, 0, 0, 0x41], "down flag 2"),
            (vec![0x11], "at least 2"),
            (vec![0x11, 9, 0, 0], "sub-type 9"),
            (vec![0x11, 2, 1, 0], "button 0"),
            (vec![0x11, 3, 0, 0], "expected 6 or 10"),
            (inf_wheel, "wheel delta"),
            (vec![0x12, 1, 0, 10, 0, 20, 0, 0, 0x04, 0x38], "reference size"),
            (vec![0x12, 1, 0x7f, 0, 0, 20, 0x07, 0x80, 0x04, 0x38], "outside"),
            (vec![0x12, 1, 0xff, 0xff, 0, 0, 0x07, 0x80, 0x04, 0x38], "outside"),
            (vec![0x13, 0, 0, 0], "relative pointer: 4 bytes"),
            (nan, "outside 0..1"),
            ([&[0x14, 7, 0][..], &[0; 8]].concat(), "event 7"),
            ([&[0x14, 0, 10][..], &[0; 8]].concat(), "slot 10"),
            (b"\x20{not json".to_vec(), "bad JSON"),
            (b"\x20[1]".to_vec(), "not a JSON object"),
            (vec![0x20, 0xff, 0xfe], "not UTF-8"),
            (b"\x20{\"set_video_enabled\":\"yes\"}".to_vec(), "expected a boolean"),
            (vec![0x20; MAX_CLIENT_MESSAGE + 1], "over the 4096-byte limit"),
        ];
        for (bytes, needle) in cases {
            let e = parse_client(&bytes).expect_err(needle);
            assert!(e.to_string().contains(needle), "{bytes:02x?}: {e}");
        }
    }
}
