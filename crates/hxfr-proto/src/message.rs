//! Typed messages, their encoding, and parsing of one complete payload.

use bytes::{BufMut, Bytes, BytesMut};

use crate::annexb::has_start_code;
use crate::{DecodeError, FLAG_PIXEL_DATA, Fourcc, HEADER_LEN, Header, Layout, PixelFormat, msg_type as t};

pub const FRAME_REQUEST_BODY: usize = 44;
pub const FRAME_RESPONSE_BODY: usize = 24;
pub const CONFIG_REQ_BODY: usize = 28;
pub const CONFIG_RESP_BODY: usize = 48;
pub const ENABLE_SCANOUT_BODY: usize = 16;
pub const DISABLE_SCANOUT_BODY: usize = 4;
pub const SCANOUT_RESP_BODY: usize = 72;
pub const SUBSCRIBE_BODY: usize = 4;
pub const SUBSCRIBE_RESP_BODY: usize = 8;
pub const ERROR_BODY: usize = 260;
pub const SHM_FRAME_REQUEST_BODY: usize = 72;
pub const HELLO_BODY: usize = 16;
pub const HELLO_RESP_BODY: usize = 24;

const ERROR_TEXT: usize = 256;
const CONNECTOR_NAME: usize = 64;
const ENCODER_NAME: usize = 32;

/// A frame handed over inline (pixels on the socket) or by virtio-gpu resource id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRequest {
    /// virtio-gpu resource id; 0 when the pixels are inline.
    pub resource_id: u32,
    pub width: u32,
    pub height: u32,
    pub format: Fourcc,
    /// Bytes per row of plane 0.
    pub stride: u32,
    pub pts: i64,
    pub duration: i64,
    pub force_keyframe: bool,
    /// Inline pixels (sets the PIXEL_DATA flag). Handed out without copying.
    pub pixels: Option<Bytes>,
}

impl FrameRequest {
    /// Pixels on the socket, laid out as [`Layout::inline`] says for `stride`.
    pub fn inline(format: PixelFormat, width: u32, height: u32, stride: u32, pixels: Bytes) -> FrameRequest {
        FrameRequest {
            resource_id: 0,
            width,
            height,
            format: format.fourcc(),
            stride,
            pts: 0,
            duration: 0,
            force_keyframe: false,
            pixels: Some(pixels),
        }
    }

    /// A frame named by its virtio-gpu resource id (no pixels travel).
    pub fn resource(resource_id: u32, format: PixelFormat, width: u32, height: u32, stride: u32) -> FrameRequest {
        FrameRequest { resource_id, pixels: None, ..FrameRequest::inline(format, width, height, stride, Bytes::new()) }
    }

    /// Presentation time and duration, in ns; the answer echoes `pts`.
    pub fn timed(self, pts: i64, duration: i64) -> FrameRequest {
        FrameRequest { pts, duration, ..self }
    }

    pub fn keyframe(self, force_keyframe: bool) -> FrameRequest {
        FrameRequest { force_keyframe, ..self }
    }
}

/// One plane of a shared-memory frame: where it starts in the region, bytes per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShmPlane {
    pub offset: u64,
    pub stride: u32,
}

/// hxfr extension (0x40): a frame the guest wrote into the shared-memory region.
/// The answer to it (FRAME_RESPONSE or ERROR) hands the area back to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmFrameRequest {
    pub width: u32,
    pub height: u32,
    pub format: Fourcc,
    /// Plane 0 is packed RGB or NV12's Y; plane 1 is NV12's UV (unused otherwise).
    pub planes: [ShmPlane; 2],
    pub num_planes: u32,
    pub pts: i64,
    pub duration: i64,
    pub force_keyframe: bool,
}

impl ShmFrameRequest {
    /// A frame laid out as `layout` says, starting at byte `base` of the region.
    pub fn new(layout: &Layout, base: u64) -> ShmFrameRequest {
        let plane = |p: usize| ShmPlane { offset: base + layout.offsets[p], stride: layout.strides[p] as u32 };
        let n = layout.format.num_planes();
        ShmFrameRequest {
            width: layout.width,
            height: layout.height,
            format: layout.format.fourcc(),
            planes: [plane(0), if n > 1 { plane(1) } else { ShmPlane::default() }],
            num_planes: n as u32,
            pts: 0,
            duration: 0,
            force_keyframe: false,
        }
    }

    /// Presentation time and duration, in ns; the answer echoes `pts`.
    pub fn timed(self, pts: i64, duration: i64) -> ShmFrameRequest {
        ShmFrameRequest { pts, duration, ..self }
    }

    pub fn keyframe(self, force_keyframe: bool) -> ShmFrameRequest {
        ShmFrameRequest { force_keyframe, ..self }
    }
}

/// The host's answer to a frame: one encoded access unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameResponse {
    pub pts: i64,
    pub dts: i64,
    pub is_keyframe: bool,
    /// NAL entries. Our host sends one entry holding the whole Annex-B access
    /// unit (as Helix's QEMU does); a reader must also take one entry per NAL.
    pub nals: Vec<Bytes>,
}

impl FrameResponse {
    /// The access unit in Annex B, whichever way the sender split it. Entries
    /// that already start with a start code are kept; others get `00 00 00 01`.
    pub fn to_annex_b(&self) -> Bytes {
        if self.nals.len() == 1 && has_start_code(&self.nals[0]) {
            return self.nals[0].clone();
        }
        let len: usize = self.nals.iter().map(|n| n.len() + 4).sum();
        let mut out = BytesMut::with_capacity(len);
        for n in &self.nals {
            if !has_start_code(n) {
                out.put_slice(&[0, 0, 0, 1]);
            }
            out.put_slice(n);
        }
        out.freeze()
    }
}

/// Encoder configuration from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigReq {
    pub width: u32,
    pub height: u32,
    /// bits per second
    pub bitrate: u32,
    pub fps_num: u32,
    pub fps_den: u32,
    /// H.264 profile_idc: 66 baseline, 77 main, 100 high; 0 = host's choice.
    pub profile: u8,
    /// level × 10 (e.g. 31 for 3.1); 0 = host's choice.
    pub level_x10: u8,
    pub realtime: bool,
}

/// hxfr's definition of CONFIG_RESP (Helix leaves it open): the outcome of a
/// CONFIG_REQ, the profile/level the encoder will produce and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigResp {
    /// 0 ok, else an [`crate::ErrorCode`] value.
    pub status: i32,
    pub width: u32,
    pub height: u32,
    pub profile: u8,
    pub level_x10: u8,
    /// e.g. "x264", "gst:vtenc_h264"; at most 31 bytes on the wire.
    pub encoder: String,
}

/// hxfr extension (0x41): opens a conversation. The host drops every session
/// of the connection (so a restarted guest starts clean) and answers with
/// HELLO_RESP carrying the same nonce; everything the guest reads before that
/// answer is stale and skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub nonce: u32,
    pub version: u16,
    /// Feature bits the guest would like to use (see [`features`]).
    pub features: u32,
}

/// hxfr extension (0x42): answer to HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloResp {
    pub nonce: u32,
    pub version: u16,
    /// Feature bits the host offers on this connection.
    pub features: u32,
    /// Size of the host's shared-memory region, 0 when it has none.
    pub shm_size: u64,
    /// Frames per session the host will accept before it stops reading.
    pub max_in_flight: u32,
}

/// Feature bits of HELLO / HELLO_RESP.
pub mod features {
    /// SHM_FRAME_REQUEST is served.
    pub const SHM: u32 = 1 << 0;
    /// FRAME_REQUEST by virtio-gpu resource id is served.
    pub const RESOURCE: u32 = 1 << 1;
}

/// Our protocol version carried in HELLO.
pub const PROTOCOL_VERSION: u16 = 1;

/// Every message the format knows, plus the ones it does not (kept by size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    FrameRequest(FrameRequest),
    FrameResponse(FrameResponse),
    KeyframeReq,
    ConfigReq(ConfigReq),
    ConfigResp(ConfigResp),
    Ping,
    Pong,
    EnableScanout {
        scanout_id: u32,
        width: u32,
        height: u32,
    },
    DisableScanout {
        scanout_id: u32,
    },
    ScanoutResp {
        scanout_id: u32,
        success: bool,
        connector: String,
    },
    Subscribe {
        scanout_id: u32,
    },
    SubscribeResp {
        scanout_id: u32,
        success: bool,
    },
    Error {
        code: i32,
        message: String,
    },
    ShmFrameRequest(ShmFrameRequest),
    Hello(Hello),
    HelloResp(HelloResp),
    /// A type this version does not know. Legal: skipped by its size.
    Unknown {
        msg_type: u8,
        flags: u8,
        payload: Bytes,
    },
}

impl Message {
    pub fn msg_type(&self) -> u8 {
        match self {
            Message::FrameRequest(_) => t::FRAME_REQUEST,
            Message::FrameResponse(_) => t::FRAME_RESPONSE,
            Message::KeyframeReq => t::KEYFRAME_REQ,
            Message::ConfigReq(_) => t::CONFIG_REQ,
            Message::ConfigResp(_) => t::CONFIG_RESP,
            Message::Ping => t::PING,
            Message::Pong => t::PONG,
            Message::EnableScanout { .. } => t::ENABLE_SCANOUT,
            Message::DisableScanout { .. } => t::DISABLE_SCANOUT,
            Message::ScanoutResp { .. } => t::SCANOUT_RESP,
            Message::Subscribe { .. } => t::SUBSCRIBE,
            Message::SubscribeResp { .. } => t::SUBSCRIBE_RESP,
            Message::Error { .. } => t::ERROR,
            Message::ShmFrameRequest(_) => t::SHM_FRAME_REQUEST,
            Message::Hello(_) => t::HELLO,
            Message::HelloResp(_) => t::HELLO_RESP,
            Message::Unknown { msg_type, .. } => *msg_type,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::FrameRequest(_) => "FRAME_REQUEST",
            Message::FrameResponse(_) => "FRAME_RESPONSE",
            Message::KeyframeReq => "KEYFRAME_REQ",
            Message::ConfigReq(_) => "CONFIG_REQ",
            Message::ConfigResp(_) => "CONFIG_RESP",
            Message::Ping => "PING",
            Message::Pong => "PONG",
            Message::EnableScanout { .. } => "ENABLE_SCANOUT",
            Message::DisableScanout { .. } => "DISABLE_SCANOUT",
            Message::ScanoutResp { .. } => "SCANOUT_RESP",
            Message::Subscribe { .. } => "SUBSCRIBE",
            Message::SubscribeResp { .. } => "SUBSCRIBE_RESP",
            Message::Error { .. } => "ERROR",
            Message::ShmFrameRequest(_) => "SHM_FRAME_REQUEST",
            Message::Hello(_) => "HELLO",
            Message::HelloResp(_) => "HELLO_RESP",
            Message::Unknown { .. } => "UNKNOWN",
        }
    }
}

/// One message on the wire: its session and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub session_id: u16,
    pub message: Message,
}

impl Packet {
    pub fn new(session_id: u16, message: Message) -> Packet {
        Packet { session_id, message }
    }

    /// An ERROR message; the text is cut to fit its 256-byte NUL-padded field.
    pub fn error(session_id: u16, code: i32, message: impl Into<String>) -> Packet {
        Packet::new(session_id, Message::Error { code, message: message.into() })
    }

    /// Bytes this packet takes on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body_len() + self.tail().map_or(0, |t| t.len())
    }

    /// The part of the payload that is handed over by reference rather than
    /// written into the head: inline pixels, or a single-entry access unit.
    /// Writers can send [`Packet::encode_head`] and this with a vectored write.
    pub fn tail(&self) -> Option<&Bytes> {
        match &self.message {
            Message::FrameRequest(r) => r.pixels.as_ref(),
            Message::Unknown { payload, .. } => Some(payload),
            Message::FrameResponse(r) if r.nals.len() == 1 => Some(&r.nals[0]),
            _ => None,
        }
    }

    fn flags(&self) -> u8 {
        match &self.message {
            Message::FrameRequest(r) if r.pixels.is_some() => FLAG_PIXEL_DATA,
            Message::Unknown { flags, .. } => *flags,
            _ => 0,
        }
    }

    /// Length of what [`Packet::encode_head`] writes after the header.
    fn body_len(&self) -> usize {
        match &self.message {
            Message::FrameRequest(_) => FRAME_REQUEST_BODY,
            Message::FrameResponse(r) => {
                let nal_bytes: usize = r.nals.iter().map(|n| 4 + n.len()).sum();
                // A single entry's bytes are the tail, not part of the head.
                if r.nals.len() == 1 { FRAME_RESPONSE_BODY + 4 } else { FRAME_RESPONSE_BODY + nal_bytes }
            }
            Message::KeyframeReq | Message::Ping | Message::Pong => 0,
            Message::ConfigReq(_) => CONFIG_REQ_BODY,
            Message::ConfigResp(_) => CONFIG_RESP_BODY,
            Message::EnableScanout { .. } => ENABLE_SCANOUT_BODY,
            Message::DisableScanout { .. } => DISABLE_SCANOUT_BODY,
            Message::ScanoutResp { .. } => SCANOUT_RESP_BODY,
            Message::Subscribe { .. } => SUBSCRIBE_BODY,
            Message::SubscribeResp { .. } => SUBSCRIBE_RESP_BODY,
            Message::Error { .. } => ERROR_BODY,
            Message::ShmFrameRequest(_) => SHM_FRAME_REQUEST_BODY,
            Message::Hello(_) => HELLO_BODY,
            Message::HelloResp(_) => HELLO_RESP_BODY,
            Message::Unknown { .. } => 0,
        }
    }

    /// Writes the whole packet.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(self.encoded_len());
        self.encode_head(dst);
        if let Some(tail) = self.tail() {
            dst.put_slice(tail);
        }
    }

    /// Writes header and body, everything but [`Packet::tail`].
    pub fn encode_head(&self, dst: &mut BytesMut) {
        let payload = self.encoded_len() - HEADER_LEN;
        let header = Header {
            msg_type: self.message.msg_type(),
            flags: self.flags(),
            session_id: self.session_id,
            payload_size: u32::try_from(payload).expect("payload over 4 GiB"),
        };
        dst.put_slice(&header.to_bytes());
        match &self.message {
            Message::FrameRequest(r) => {
                dst.put_u32_le(r.resource_id);
                dst.put_u32_le(r.width);
                dst.put_u32_le(r.height);
                dst.put_u32_le(r.format.0);
                dst.put_u32_le(r.stride);
                dst.put_i64_le(r.pts);
                dst.put_i64_le(r.duration);
                dst.put_u8(r.force_keyframe as u8);
                dst.put_bytes(0, 7);
            }
            Message::FrameResponse(r) => {
                dst.put_i64_le(r.pts);
                dst.put_i64_le(r.dts);
                dst.put_u8(r.is_keyframe as u8);
                dst.put_bytes(0, 3);
                dst.put_u32_le(r.nals.len() as u32);
                if r.nals.len() == 1 {
                    dst.put_u32_le(r.nals[0].len() as u32);
                } else {
                    for n in &r.nals {
                        dst.put_u32_le(n.len() as u32);
                        dst.put_slice(n);
                    }
                }
            }
            Message::KeyframeReq | Message::Ping | Message::Pong | Message::Unknown { .. } => {}
            Message::ConfigReq(c) => {
                dst.put_u32_le(c.width);
                dst.put_u32_le(c.height);
                dst.put_u32_le(c.bitrate);
                dst.put_u32_le(c.fps_num);
                dst.put_u32_le(c.fps_den);
                dst.put_u8(c.profile);
                dst.put_u8(c.level_x10);
                dst.put_u8(c.realtime as u8);
                dst.put_bytes(0, 5);
            }
            Message::ConfigResp(c) => {
                dst.put_i32_le(c.status);
                dst.put_u32_le(c.width);
                dst.put_u32_le(c.height);
                dst.put_u8(c.profile);
                dst.put_u8(c.level_x10);
                dst.put_bytes(0, 2);
                put_padded_str(dst, &c.encoder, ENCODER_NAME);
            }
            Message::EnableScanout { scanout_id, width, height } => {
                dst.put_u32_le(*scanout_id);
                dst.put_u32_le(*width);
                dst.put_u32_le(*height);
                dst.put_u32_le(0);
            }
            Message::DisableScanout { scanout_id } | Message::Subscribe { scanout_id } => {
                dst.put_u32_le(*scanout_id);
            }
            Message::ScanoutResp { scanout_id, success, connector } => {
                dst.put_u32_le(*scanout_id);
                dst.put_u32_le(*success as u32);
                put_padded_str(dst, connector, CONNECTOR_NAME);
            }
            Message::SubscribeResp { scanout_id, success } => {
                dst.put_u32_le(*scanout_id);
                dst.put_u32_le(*success as u32);
            }
            Message::Error { code, message } => {
                dst.put_i32_le(*code);
                put_padded_str(dst, message, ERROR_TEXT);
            }
            Message::ShmFrameRequest(r) => {
                dst.put_u32_le(r.width);
                dst.put_u32_le(r.height);
                dst.put_u32_le(r.format.0);
                dst.put_u32_le(r.num_planes);
                for p in &r.planes {
                    dst.put_u64_le(p.offset);
                    dst.put_u32_le(p.stride);
                    dst.put_u32_le(0);
                }
                dst.put_i64_le(r.pts);
                dst.put_i64_le(r.duration);
                dst.put_u8(r.force_keyframe as u8);
                dst.put_bytes(0, 7);
            }
            Message::Hello(h) => {
                dst.put_u32_le(h.nonce);
                dst.put_u16_le(h.version);
                dst.put_u16_le(0);
                dst.put_u32_le(h.features);
                dst.put_u32_le(0);
            }
            Message::HelloResp(h) => {
                dst.put_u32_le(h.nonce);
                dst.put_u16_le(h.version);
                dst.put_u16_le(0);
                dst.put_u32_le(h.features);
                dst.put_u32_le(h.max_in_flight);
                dst.put_u64_le(h.shm_size);
            }
        }
    }

    /// Parses one complete message. `payload` is exactly `header.payload_size`
    /// bytes; inline pixels and NAL entries become slices of it, not copies.
    /// Bodies longer than a fixed size are accepted (room for additive fields);
    /// shorter ones are an error.
    pub fn parse(header: &Header, payload: Bytes) -> Result<Packet, DecodeError> {
        let need = |n: usize| -> Result<(), DecodeError> {
            if payload.len() < n {
                Err(DecodeError::BodyTooShort { msg_type: header.msg_type, need: n, got: payload.len() })
            } else {
                Ok(())
            }
        };
        let mut r = Reader(&payload[..]);
        let message = match header.msg_type {
            t::FRAME_REQUEST => {
                need(FRAME_REQUEST_BODY)?;
                let resource_id = r.u32();
                let width = r.u32();
                let height = r.u32();
                let format = Fourcc(r.u32());
                let stride = r.u32();
                let pts = r.i64();
                let duration = r.i64();
                let force_keyframe = r.u8() != 0;
                let pixels = (header.flags & FLAG_PIXEL_DATA != 0).then(|| payload.slice(FRAME_REQUEST_BODY..));
                Message::FrameRequest(FrameRequest {
                    resource_id,
                    width,
                    height,
                    format,
                    stride,
                    pts,
                    duration,
                    force_keyframe,
                    pixels,
                })
            }
            t::FRAME_RESPONSE => {
                need(FRAME_RESPONSE_BODY)?;
                let pts = r.i64();
                let dts = r.i64();
                let is_keyframe = r.u8() != 0;
                r.skip(3);
                let count = r.u32();
                let mut pos = FRAME_RESPONSE_BODY;
                let avail = payload.len() - pos;
                // Each entry needs at least its 4-byte size: bounds the Vec.
                if count as usize > avail / 4 {
                    return Err(DecodeError::NalCount { count, avail });
                }
                let mut nals = Vec::with_capacity(count as usize);
                for index in 0..count {
                    let size = u32::from_le_bytes(payload[pos..pos + 4].try_into().unwrap());
                    pos += 4;
                    let left = payload.len() - pos;
                    if size as usize > left {
                        return Err(DecodeError::NalOverrun { index, size, avail: left });
                    }
                    nals.push(payload.slice(pos..pos + size as usize));
                    pos += size as usize;
                    if index + 1 < count && payload.len() - pos < 4 {
                        return Err(DecodeError::NalOverrun { index: index + 1, size: 4, avail: payload.len() - pos });
                    }
                }
                if pos != payload.len() {
                    return Err(DecodeError::TrailingBytes(payload.len() - pos));
                }
                Message::FrameResponse(FrameResponse { pts, dts, is_keyframe, nals })
            }
            t::KEYFRAME_REQ => Message::KeyframeReq,
            t::CONFIG_REQ => {
                need(CONFIG_REQ_BODY)?;
                Message::ConfigReq(ConfigReq {
                    width: r.u32(),
                    height: r.u32(),
                    bitrate: r.u32(),
                    fps_num: r.u32(),
                    fps_den: r.u32(),
                    profile: r.u8(),
                    level_x10: r.u8(),
                    realtime: r.u8() != 0,
                })
            }
            t::CONFIG_RESP => {
                need(CONFIG_RESP_BODY)?;
                let status = r.i32();
                let width = r.u32();
                let height = r.u32();
                let profile = r.u8();
                let level_x10 = r.u8();
                r.skip(2);
                Message::ConfigResp(ConfigResp {
                    status,
                    width,
                    height,
                    profile,
                    level_x10,
                    encoder: r.padded_str(ENCODER_NAME),
                })
            }
            t::PING => Message::Ping,
            t::PONG => Message::Pong,
            t::ENABLE_SCANOUT => {
                need(ENABLE_SCANOUT_BODY)?;
                Message::EnableScanout { scanout_id: r.u32(), width: r.u32(), height: r.u32() }
            }
            t::DISABLE_SCANOUT => {
                need(DISABLE_SCANOUT_BODY)?;
                Message::DisableScanout { scanout_id: r.u32() }
            }
            t::SCANOUT_RESP => {
                need(SCANOUT_RESP_BODY)?;
                Message::ScanoutResp {
                    scanout_id: r.u32(),
                    success: r.u32() != 0,
                    connector: r.padded_str(CONNECTOR_NAME),
                }
            }
            t::SUBSCRIBE => {
                need(SUBSCRIBE_BODY)?;
                Message::Subscribe { scanout_id: r.u32() }
            }
            t::SUBSCRIBE_RESP => {
                need(SUBSCRIBE_RESP_BODY)?;
                Message::SubscribeResp { scanout_id: r.u32(), success: r.u32() != 0 }
            }
            t::ERROR => {
                need(ERROR_BODY)?;
                Message::Error { code: r.i32(), message: r.padded_str(ERROR_TEXT) }
            }
            t::SHM_FRAME_REQUEST => {
                need(SHM_FRAME_REQUEST_BODY)?;
                let width = r.u32();
                let height = r.u32();
                let format = Fourcc(r.u32());
                let num_planes = r.u32();
                let mut planes = [ShmPlane::default(); 2];
                for p in &mut planes {
                    p.offset = r.u64();
                    p.stride = r.u32();
                    r.skip(4);
                }
                Message::ShmFrameRequest(ShmFrameRequest {
                    width,
                    height,
                    format,
                    planes,
                    num_planes,
                    pts: r.i64(),
                    duration: r.i64(),
                    force_keyframe: r.u8() != 0,
                })
            }
            t::HELLO => {
                need(HELLO_BODY)?;
                let nonce = r.u32();
                let version = r.u16();
                r.skip(2);
                Message::Hello(Hello { nonce, version, features: r.u32() })
            }
            t::HELLO_RESP => {
                need(HELLO_RESP_BODY)?;
                let nonce = r.u32();
                let version = r.u16();
                r.skip(2);
                let features = r.u32();
                let max_in_flight = r.u32();
                Message::HelloResp(HelloResp { nonce, version, features, max_in_flight, shm_size: r.u64() })
            }
            other => Message::Unknown { msg_type: other, flags: header.flags, payload },
        };
        Ok(Packet { session_id: header.session_id, message })
    }
}

/// Writes `s` into a NUL-padded field of `len` bytes, keeping at least one NUL
/// (C readers treat it as a string) and never splitting a UTF-8 character.
fn put_padded_str(dst: &mut BytesMut, s: &str, len: usize) {
    let mut end = s.len().min(len - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    dst.put_slice(&s.as_bytes()[..end]);
    dst.put_bytes(0, len - end);
}

/// Little-endian reads from a slice whose length was checked beforehand.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().unwrap()
    }
    fn skip(&mut self, n: usize) {
        self.0 = &self.0[n..];
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take())
    }
    fn padded_str(&mut self, len: usize) -> String {
        let (field, rest) = self.0.split_at(len);
        self.0 = rest;
        let end = field.iter().position(|&b| b == 0).unwrap_or(len);
        let mut s = String::from_utf8_lossy(&field[..end]).into_owned();
        // Invalid bytes widen to U+FFFD and a field may lack its NUL: cut to
        // what the field can hold back, so decode → encode is stable.
        let mut max = s.len().min(len - 1);
        while !s.is_char_boundary(max) {
            max -= 1;
        }
        s.truncate(max);
        s
    }
}
