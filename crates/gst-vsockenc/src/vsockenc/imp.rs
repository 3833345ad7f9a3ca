//! The element: GstVideoEncoder glue around [`crate::link::Link`].
//!
//! The streaming thread sends each frame and returns; a reader thread
//! finishes frames as their answers arrive. While `handle_frame` waits for
//! room (more than `max-in-flight` frames outstanding) or `finish` waits for
//! the last answers, the encoder's stream lock is released so that the reader
//! thread can push what the host sent back meanwhile.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_video::prelude::*;
use gst_video::subclass::prelude::*;
use hxfr_guest::HostAddr;
use hxfr_proto::{ConfigReq, FrameRequest, Message, Packet, PixelFormat, ShmFrameRequest, ShmPlane, features};

use super::Mode;
use crate::drm::{self, VirtioGpu};
use crate::link::{Answer, AnswerSink, Link, Pending, WaitError};
use crate::shm::{self, Region};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new("vsockenc", gst::DebugColorFlags::empty(), Some("hxfr host-offload H.264 encoder"))
});

const DEFAULT_CID: u32 = 2;
const DEFAULT_PORT: u32 = 5000;
const DEFAULT_TCP_PORT: u32 = 15937;
const DEFAULT_BITRATE: u32 = 4_000_000;
const DEFAULT_KEYFRAME_INTERVAL: u32 = 60;
const DEFAULT_MAX_IN_FLIGHT: u32 = 2;
const DEFAULT_CONNECT_TIMEOUT_MS: u32 = 5000;
const DEFAULT_REPLY_TIMEOUT_MS: u32 = 5000;
const DEFAULT_SESSION_ID: u32 = 1;
const DEFAULT_MAX_ERRORS: u32 = 10;
/// How long a host gets to answer HELLO before it is taken for one that
/// predates it (Helix's QEMU): then only Helix's messages are sent.
const HELLO_TIMEOUT: Duration = Duration::from_millis(1000);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Round trips kept for the stats percentiles.
const RTT_SAMPLES: usize = 1024;

#[derive(Debug, Clone)]
struct Settings {
    socket_path: Option<String>,
    cid: u32,
    port: u32,
    tcp_host: Option<String>,
    tcp_port: u32,
    bitrate: u32,
    keyframe_interval: u32,
    host: Option<String>,
    mode: Mode,
    shm_path: Option<String>,
    max_in_flight: u32,
    connect_timeout_ms: u32,
    reply_timeout_ms: u32,
    session_id: u32,
    max_errors: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            socket_path: None,
            cid: DEFAULT_CID,
            port: DEFAULT_PORT,
            tcp_host: None,
            tcp_port: DEFAULT_TCP_PORT,
            bitrate: DEFAULT_BITRATE,
            keyframe_interval: DEFAULT_KEYFRAME_INTERVAL,
            host: None,
            mode: Mode::Auto,
            shm_path: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            reply_timeout_ms: DEFAULT_REPLY_TIMEOUT_MS,
            session_id: DEFAULT_SESSION_ID,
            max_errors: DEFAULT_MAX_ERRORS,
        }
    }
}

impl Settings {
    /// `host` wins; then the C element's properties: tcp-host, socket-path,
    /// and vsock cid/port when neither is set.
    fn address(&self) -> Result<HostAddr, String> {
        if let Some(h) = &self.host {
            return h.parse();
        }
        Ok(match (&self.tcp_host, &self.socket_path) {
            (Some(h), _) => HostAddr::Tcp(h.clone(), u16::try_from(self.tcp_port).map_err(|_| "tcp-port over 65535")?),
            (None, Some(p)) => HostAddr::Unix(p.into()),
            (None, None) => HostAddr::Vsock(self.cid, self.port),
        })
    }

    fn reply_timeout(&self) -> Duration {
        Duration::from_millis(self.reply_timeout_ms.max(1) as u64)
    }
}

/// Counters behind the `stats` property.
#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    answered: AtomicU64,
    dropped: AtomicU64,
    reconnects: AtomicU64,
    rtt_ms: Mutex<VecDeque<f32>>,
}

impl Stats {
    fn rtt_percentile(&self, p: f64) -> f64 {
        let mut v: Vec<f32> = self.rtt_ms.lock().unwrap().iter().copied().collect();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f32::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize] as f64
    }
}

/// What the reader thread shares with the streaming thread.
struct Shared {
    /// Bumped at every start: a reader thread left over from an earlier run
    /// (frame numbers start again) must not touch this run's frames.
    generation: AtomicU64,
    stats: Stats,
    /// An ERROR answer asks for a keyframe on the next frame.
    want_keyframe: AtomicBool,
    errors_in_row: AtomicU32,
    max_errors: AtomicU32,
    /// The last downstream flow result, returned by the next handle_frame.
    flow: Mutex<Result<gst::FlowSuccess, gst::FlowError>>,
    /// (profile_idc, level_idc) announced in the output caps.
    profile: Mutex<Option<(u8, u8)>>,
    /// The negotiated input, for renegotiating the output from the reader thread.
    input: Mutex<Option<gst_video::VideoCodecState<'static, gst_video::video_codec_state::Readable>>>,
}

/// How frames are handed over, once decided.
enum Transfer {
    Inline,
    Shm(Region),
    Resource(VirtioGpu),
}

impl Transfer {
    fn name(&self) -> &'static str {
        match self {
            Transfer::Inline => "inline",
            Transfer::Shm(_) => "shm",
            Transfer::Resource(_) => "resource",
        }
    }
}

struct State {
    addr: HostAddr,
    link: Option<Link>,
    info: Option<gst_video::VideoInfo>,
    dmabuf: bool,
    transfer: Transfer,
    /// Frames seen, for keyframe-interval.
    frames: u64,
    force_next: bool,
    next_reconnect: Instant,
    backoff: Duration,
    /// Latency last announced (min), to re-announce when it moves.
    latency: gst::ClockTime,
}

pub struct VsockEnc {
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
    shared: Arc<Shared>,
}

impl Default for VsockEnc {
    fn default() -> Self {
        VsockEnc {
            settings: Mutex::new(Settings::default()),
            state: Mutex::new(None),
            shared: Arc::new(Shared {
                generation: AtomicU64::new(0),
                stats: Stats::default(),
                want_keyframe: AtomicBool::new(false),
                errors_in_row: AtomicU32::new(0),
                max_errors: AtomicU32::new(DEFAULT_MAX_ERRORS),
                flow: Mutex::new(Ok(gst::FlowSuccess::Ok)),
                profile: Mutex::new(None),
                input: Mutex::new(None),
            }),
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for VsockEnc {
    const NAME: &'static str = "GstVsockEnc";
    type Type = super::VsockEnc;
    type ParentType = gst_video::VideoEncoder;
}

impl ObjectImpl for VsockEnc {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("socket-path")
                    .nick("Socket path")
                    .blurb("UNIX socket of the host (used when tcp-host and host are unset)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("cid")
                    .nick("vsock CID")
                    .blurb("vsock context id of the host (used when no other address is set)")
                    .default_value(DEFAULT_CID)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("port")
                    .nick("vsock port")
                    .blurb("vsock port of the host")
                    .default_value(DEFAULT_PORT)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("tcp-host")
                    .nick("TCP host")
                    .blurb("Host to reach over TCP, e.g. 10.0.2.2 under QEMU user networking (wins over socket-path and vsock)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("tcp-port")
                    .nick("TCP port")
                    .blurb("TCP port of the host")
                    .maximum(65535)
                    .default_value(DEFAULT_TCP_PORT)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("bitrate")
                    .nick("Bitrate")
                    .blurb("Target bitrate in bit/s, sent to the host")
                    .minimum(50_000)
                    .default_value(DEFAULT_BITRATE)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("keyframe-interval")
                    .nick("Keyframe interval")
                    .blurb("Force a keyframe every N frames (0: only the first and on request)")
                    .default_value(DEFAULT_KEYFRAME_INTERVAL)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("host")
                    .nick("Host address")
                    .blurb("tcp:HOST:PORT, unix:PATH, vsock:CID:PORT or serial:PATH (a virtio-serial port); wins over the other address properties")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("mode", Mode::Auto)
                    .nick("Transfer mode")
                    .blurb("How frames reach the host")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("shm-path")
                    .nick("Shared memory path")
                    .blurb("File or ivshmem BAR (…/resource2) shared with the host; found in sysfs when unset and mode needs it")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-in-flight")
                    .nick("Frames in flight")
                    .blurb("Frames sent and not yet answered (sending frame N+1 overlaps the host encoding frame N)")
                    .minimum(1)
                    .maximum(16)
                    .default_value(DEFAULT_MAX_IN_FLIGHT)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("connect-timeout")
                    .nick("Connect timeout")
                    .blurb("Milliseconds to wait for the host when connecting")
                    .minimum(1)
                    .default_value(DEFAULT_CONNECT_TIMEOUT_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("reply-timeout")
                    .nick("Reply timeout")
                    .blurb("Milliseconds to wait for an answer before the host is taken for gone (and reconnected)")
                    .minimum(1)
                    .default_value(DEFAULT_REPLY_TIMEOUT_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("session-id")
                    .nick("Session id")
                    .blurb("Stream id on the connection (several streams may share one host)")
                    .maximum(65535)
                    .default_value(DEFAULT_SESSION_ID)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-errors")
                    .nick("Max consecutive errors")
                    .blurb("ERROR answers in a row after which the element fails with the host's message")
                    .minimum(1)
                    .default_value(DEFAULT_MAX_ERRORS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("frames-sent, frames-answered, frames-dropped, reconnects, rtt-p50-ms, rtt-p99-ms, mode, host")
                    .read_only()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap();
        match pspec.name() {
            "socket-path" => s.socket_path = value.get().expect("type checked upstream"),
            "cid" => s.cid = value.get().expect("type checked upstream"),
            "port" => s.port = value.get().expect("type checked upstream"),
            "tcp-host" => s.tcp_host = value.get().expect("type checked upstream"),
            "tcp-port" => s.tcp_port = value.get().expect("type checked upstream"),
            "bitrate" => s.bitrate = value.get().expect("type checked upstream"),
            "keyframe-interval" => s.keyframe_interval = value.get().expect("type checked upstream"),
            "host" => s.host = value.get().expect("type checked upstream"),
            "mode" => s.mode = value.get().expect("type checked upstream"),
            "shm-path" => s.shm_path = value.get().expect("type checked upstream"),
            "max-in-flight" => s.max_in_flight = value.get().expect("type checked upstream"),
            "connect-timeout" => s.connect_timeout_ms = value.get().expect("type checked upstream"),
            "reply-timeout" => s.reply_timeout_ms = value.get().expect("type checked upstream"),
            "session-id" => s.session_id = value.get().expect("type checked upstream"),
            "max-errors" => {
                s.max_errors = value.get().expect("type checked upstream");
                self.shared.max_errors.store(s.max_errors, Ordering::Relaxed);
            }
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings.lock().unwrap();
        match pspec.name() {
            "socket-path" => s.socket_path.to_value(),
            "cid" => s.cid.to_value(),
            "port" => s.port.to_value(),
            "tcp-host" => s.tcp_host.to_value(),
            "tcp-port" => s.tcp_port.to_value(),
            "bitrate" => s.bitrate.to_value(),
            "keyframe-interval" => s.keyframe_interval.to_value(),
            "host" => s.host.to_value(),
            "mode" => s.mode.to_value(),
            "shm-path" => s.shm_path.to_value(),
            "max-in-flight" => s.max_in_flight.to_value(),
            "connect-timeout" => s.connect_timeout_ms.to_value(),
            "reply-timeout" => s.reply_timeout_ms.to_value(),
            "session-id" => s.session_id.to_value(),
            "max-errors" => s.max_errors.to_value(),
            "stats" => {
                drop(s);
                self.stats().to_value()
            }
            other => unreachable!("unknown property {other}"),
        }
    }
}

impl GstObjectImpl for VsockEnc {}

impl ElementImpl for VsockEnc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Host-offload H.264 encoder",
                "Codec/Encoder/Video",
                "Hands raw frames to an hxfr host (vsock, TCP, UNIX, virtio-serial; inline, shared memory or virtio-gpu resource) and outputs the H.264 it sends back",
                "hxfr",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let formats = [
                gst_video::VideoFormat::Bgrx,
                gst_video::VideoFormat::Bgra,
                gst_video::VideoFormat::Rgbx,
                gst_video::VideoFormat::Rgba,
                gst_video::VideoFormat::Nv12,
            ];
            let raw = gst_video::VideoCapsBuilder::new()
                .format_list(formats)
                .width_range(2..=8192)
                .height_range(2..=8192)
                .build();
            let dmabuf = gst_video::VideoCapsBuilder::for_encoding("video/x-raw")
                .features([gst_allocators::CAPS_FEATURE_MEMORY_DMABUF])
                .format_list(formats)
                .width_range(2..=8192)
                .height_range(2..=8192)
                .build();
            let mut sink_caps = raw;
            sink_caps.merge(dmabuf);
            let src_caps = gst::Caps::builder("video/x-h264")
                .field("stream-format", "byte-stream")
                .field("alignment", "au")
                .build();
            vec![
                gst::PadTemplate::new("sink", gst::PadDirection::Sink, gst::PadPresence::Always, &sink_caps).unwrap(),
                gst::PadTemplate::new("src", gst::PadDirection::Src, gst::PadPresence::Always, &src_caps).unwrap(),
            ]
        });
        TEMPLATES.as_ref()
    }
}

/// The fourcc the wire uses for a GStreamer format (alpha is ignored).
fn wire_format(f: gst_video::VideoFormat) -> Option<PixelFormat> {
    use gst_video::VideoFormat as V;
    match f {
        V::Bgrx | V::Bgra => Some(PixelFormat::Bgrx),
        V::Rgbx | V::Rgba => Some(PixelFormat::Rgbx),
        V::Nv12 => Some(PixelFormat::Nv12),
        _ => None,
    }
}

/// (offsets, strides) of a buffer's planes: from its GstVideoMeta when it has
/// one, else from the caps.
fn plane_layout(buffer: &gst::BufferRef, info: &gst_video::VideoInfo) -> ([usize; 2], [usize; 2]) {
    let (offs, strides): (Vec<usize>, Vec<i32>) = match buffer.meta::<gst_video::VideoMeta>() {
        Some(m) => (m.offset().to_vec(), m.stride().to_vec()),
        None => (info.offset().to_vec(), info.stride().to_vec()),
    };
    let get = |v: &[usize], i| v.get(i).copied().unwrap_or(0);
    let gets = |v: &[i32], i| v.get(i).copied().unwrap_or(0).max(0) as usize;
    ([get(&offs, 0), get(&offs, 1)], [gets(&strides, 0), gets(&strides, 1)])
}

/// The frame's pixels in the wire's inline layout. Zero copy when the buffer
/// is already laid out that way (packed RGB always; NV12 with UV right after
/// the Y rows at the same stride); otherwise one repacking copy.
fn inline_pixels(
    buffer: &gst::Buffer,
    info: &gst_video::VideoInfo,
    format: PixelFormat,
) -> Result<(Bytes, u32), String> {
    let (offs, strides) = plane_layout(buffer, info);
    let h = info.height() as usize;
    let mapped = buffer.clone().into_mapped_buffer_readable().map_err(|_| "cannot map the input buffer")?;
    let len = mapped.len();
    let slice = |b: Bytes, start: usize, end: usize| -> Result<Bytes, String> {
        let end = end.min(len);
        if start >= end {
            return Err(format!("plane at {start} lies outside the {len}-byte buffer"));
        }
        Ok(b.slice(start..end))
    };
    match format {
        PixelFormat::Bgrx | PixelFormat::Rgbx => {
            Ok((slice(Bytes::from_owner(mapped), offs[0], offs[0] + strides[0] * h)?, strides[0] as u32))
        }
        PixelFormat::Nv12 => {
            let (s, uv_rows) = (strides[0], h.div_ceil(2));
            let uv_at = s * h.next_multiple_of(2);
            if strides[1] == s && offs[1] == offs[0] + uv_at {
                return Ok((slice(Bytes::from_owner(mapped), offs[0], offs[1] + s * uv_rows)?, s as u32));
            }
            let (w, uv_w) = (info.width() as usize, info.width().div_ceil(2) as usize * 2);
            let mut out = vec![0u8; uv_at + s * uv_rows];
            for r in 0..h {
                let src = offs[0] + r * strides[0];
                out[r * s..r * s + w].copy_from_slice(mapped.get(src..src + w).ok_or("Y plane out of bounds")?);
            }
            for r in 0..uv_rows {
                let src = offs[1] + r * strides[1];
                out[uv_at + r * s..uv_at + r * s + uv_w]
                    .copy_from_slice(mapped.get(src..src + uv_w).ok_or("UV plane out of bounds")?);
            }
            Ok((Bytes::from(out), s as u32))
        }
    }
}

/// Reads profile_idc and level_idc from the first SPS of an access unit.
fn sps_profile(au: &[u8]) -> Option<(u8, u8)> {
    let mut i = 0;
    while i + 3 < au.len() {
        if au[i] == 0 && au[i + 1] == 0 && au[i + 2] == 1 {
            if au[i + 3] & 0x1f == 7 && i + 6 < au.len() {
                return Some((au[i + 4], au[i + 6]));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    None
}

fn profile_name(profile_idc: u8) -> Option<&'static str> {
    Some(match profile_idc {
        66 => "constrained-baseline",
        77 => "main",
        100 => "high",
        110 => "high-10",
        _ => return None,
    })
}

/// Finishes frames on the reader thread as answers arrive.
struct Sink {
    element: glib::WeakRef<super::VsockEnc>,
    shared: Arc<Shared>,
    generation: u64,
}

impl Sink {
    /// The element, unless it is gone or this sink belongs to an earlier run.
    fn element(&self) -> Option<super::VsockEnc> {
        (self.shared.generation.load(Ordering::Acquire) == self.generation).then(|| self.element.upgrade())?
    }

    fn store_flow(&self, r: Result<gst::FlowSuccess, gst::FlowError>) {
        if r.is_err() {
            *self.shared.flow.lock().unwrap() = r;
        }
    }

    /// Announces profile and level in the output caps when the first SPS shows them.
    fn update_caps(&self, enc: &super::VsockEnc, au: &[u8]) {
        let Some((profile, level)) = sps_profile(au) else { return };
        let mut current = self.shared.profile.lock().unwrap();
        if *current == Some((profile, level)) {
            return;
        }
        *current = Some((profile, level));
        let mut caps =
            gst::Caps::builder("video/x-h264").field("stream-format", "byte-stream").field("alignment", "au");
        if let Some(name) = profile_name(profile) {
            caps = caps.field("profile", name);
        }
        let level =
            format!("{}{}", level / 10, if level % 10 != 0 { format!(".{}", level % 10) } else { String::new() });
        let caps = caps.field("level", level).build();
        let input = self.shared.input.lock().unwrap();
        match enc.set_output_state(caps, input.as_ref()) {
            Ok(state) => {
                if let Err(e) = enc.negotiate(state) {
                    gst::warning!(CAT, obj = enc, "renegotiating with profile/level failed: {e}");
                }
            }
            Err(e) => gst::warning!(CAT, obj = enc, "cannot set output caps: {e}"),
        }
    }
}

impl AnswerSink for Sink {
    fn answer(&self, pending: Pending, answer: Answer) {
        let Some(enc) = self.element() else { return };
        let stats = &self.shared.stats;
        {
            let mut rtt = stats.rtt_ms.lock().unwrap();
            if rtt.len() == RTT_SAMPLES {
                rtt.pop_front();
            }
            rtt.push_back(pending.sent.elapsed().as_secs_f32() * 1000.0);
        }
        // Flushed frames are gone from the base class; the answer only kept the order.
        let frame = if pending.discard { None } else { enc.frame(pending.frame as i32) };
        match answer {
            Answer::Frame(r) => {
                stats.answered.fetch_add(1, Ordering::Relaxed);
                self.shared.errors_in_row.store(0, Ordering::Relaxed);
                let Some(mut frame) = frame else { return };
                let au = r.to_annex_b();
                if r.is_keyframe {
                    self.update_caps(&enc, &au);
                    frame.set_flags(gst_video::VideoCodecFrameFlags::SYNC_POINT);
                }
                frame.set_output_buffer(gst::Buffer::from_slice(au));
                self.store_flow(enc.finish_frame(frame));
            }
            Answer::Error { code, message } => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.shared.want_keyframe.store(true, Ordering::Relaxed);
                let n = self.shared.errors_in_row.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= self.shared.max_errors.load(Ordering::Relaxed) {
                    gst::element_error!(
                        enc,
                        gst::StreamError::Encode,
                        ("host refused {n} frames in a row; last: {message} (code {code})")
                    );
                    *self.shared.flow.lock().unwrap() = Err(gst::FlowError::Error);
                } else {
                    gst::warning!(CAT, obj = enc, "host refused frame {}: {message} (code {code})", pending.frame);
                }
                // A frame with no output buffer is dropped by the base class.
                if let Some(frame) = frame {
                    self.store_flow(enc.finish_frame(frame));
                }
            }
        }
    }

    fn lost(&self, pending: Vec<Pending>, why: &str) {
        let Some(enc) = self.element() else { return };
        if !pending.is_empty() {
            gst::warning!(CAT, obj = enc, "{why}: dropping {} frame(s) in flight", pending.len());
        }
        self.shared.stats.dropped.fetch_add(pending.len() as u64, Ordering::Relaxed);
        for p in pending {
            if let Some(frame) = enc.frame(p.frame as i32) {
                let _ = enc.finish_frame(frame);
            }
        }
    }

    fn other(&self, packet: Packet) {
        let Some(enc) = self.element() else { return };
        match packet.message {
            Message::ConfigResp(c) => gst::info!(
                CAT,
                obj = enc,
                "host configured: encoder {}, status {}, profile {}",
                c.encoder,
                c.status,
                c.profile
            ),
            Message::Error { message, .. } => gst::warning!(CAT, obj = enc, "{message}"),
            m => gst::debug!(CAT, obj = enc, "ignoring {} from host (session {})", m.name(), packet.session_id),
        }
    }
}

impl VsockEnc {
    fn stats(&self) -> gst::Structure {
        let st = &self.shared.stats;
        let state = self.state.lock().unwrap();
        let (mode, host, connected) = match state.as_ref() {
            Some(s) => (s.transfer.name(), s.addr.to_string(), s.link.as_ref().is_some_and(|l| l.dead().is_none())),
            None => ("none", String::new(), false),
        };
        gst::Structure::builder("application/x-vsockenc-stats")
            .field("frames-sent", st.sent.load(Ordering::Relaxed))
            .field("frames-answered", st.answered.load(Ordering::Relaxed))
            .field("frames-dropped", st.dropped.load(Ordering::Relaxed))
            .field("reconnects", st.reconnects.load(Ordering::Relaxed))
            .field("rtt-p50-ms", st.rtt_percentile(0.5))
            .field("rtt-p99-ms", st.rtt_percentile(0.99))
            .field("mode", mode)
            .field("host", host)
            .field("connected", connected)
            .build()
    }

    /// Runs `f` with the encoder's stream lock released, so the reader thread
    /// can finish frames meanwhile. The caller must hold it exactly once (as
    /// handle_frame/finish/set_format do once their frame handle is dropped).
    fn unlocked<R>(&self, f: impl FnOnce() -> R) -> R {
        let obj = self.obj();
        let enc: *mut gst_video::ffi::GstVideoEncoder = obj.upcast_ref::<gst_video::VideoEncoder>().as_ptr();
        // SAFETY: the stream lock is a GRecMutex in the instance struct, held
        // by this thread (the base class took it before calling us); we give
        // it back before returning, as GST_VIDEO_ENCODER_STREAM_UNLOCK/LOCK do.
        unsafe { glib::ffi::g_rec_mutex_unlock(&mut (*enc).stream_lock) };
        let r = f();
        unsafe { glib::ffi::g_rec_mutex_lock(&mut (*enc).stream_lock) };
        r
    }

    fn connect(&self, settings: &Settings, addr: &HostAddr) -> Result<Link, String> {
        let timeout = Duration::from_millis(settings.connect_timeout_ms as u64);
        let (mut link, rx) = Link::connect(
            addr,
            timeout,
            true,
            HELLO_TIMEOUT.min(timeout),
            features::SHM | features::RESOURCE,
            settings.session_id as u16,
        )
        .map_err(|e| e.to_string())?;
        match &link.hello {
            Some(h) => gst::info!(
                CAT,
                imp = self,
                "connected to hxfr host at {addr} (shared memory: {} bytes, in flight: {})",
                h.shm_size,
                h.max_in_flight
            ),
            None => gst::info!(
                CAT,
                imp = self,
                "connected to {addr}; host does not answer HELLO, speaking Helix's protocol only"
            ),
        }
        let sink = Arc::new(Sink {
            element: self.obj().downgrade(),
            shared: self.shared.clone(),
            generation: self.shared.generation.load(Ordering::Acquire),
        });
        link.start(rx, sink);
        Ok(link)
    }

    /// Sends CONFIG_REQ for the negotiated format (hosts that speak our
    /// extensions only: Helix's C element never sends it).
    fn send_config(&self, settings: &Settings, state: &mut State) {
        let (Some(info), Some(link)) = (&state.info, &mut state.link) else { return };
        if link.hello.is_none() {
            return;
        }
        let fps = info.fps();
        let cfg = ConfigReq {
            width: info.width(),
            height: info.height(),
            bitrate: settings.bitrate,
            fps_num: fps.numer().max(0) as u32,
            fps_den: fps.denom().max(1) as u32,
            profile: 0,
            level_x10: 0,
            realtime: true,
        };
        let _ = link.send_control(&Packet::new(settings.session_id as u16, Message::ConfigReq(cfg)));
    }

    /// Picks how frames travel, once the caps and the host are known.
    fn choose_transfer(&self, settings: &Settings, state: &State) -> Result<Transfer, String> {
        let info = state.info.as_ref().expect("caps are set");
        let hello = state.link.as_ref().and_then(|l| l.hello);
        let want = settings.mode;
        let dmabuf = state.dmabuf;
        if want == Mode::Resource || (want == Mode::Auto && dmabuf) {
            if !dmabuf {
                return Err("mode=resource needs DMA-BUF input (video/x-raw(memory:DMABuf))".into());
            }
            let node =
                drm::find_render_node(Path::new("/sys/class/drm"), Path::new("/dev/dri")).map_err(|e| e.to_string())?;
            return VirtioGpu::open(&node).map(Transfer::Resource).map_err(|e| e.to_string());
        }
        if dmabuf {
            return Err(format!("DMA-BUF input needs mode=resource or auto, not {want:?}"));
        }
        if want == Mode::Shm || want == Mode::Auto {
            let path = settings.shm_path.as_ref().map(PathBuf::from).or_else(|| shm::find_ivshmem(Path::new("/sys")));
            let attempt = || -> Result<Transfer, String> {
                let path = path.ok_or("no shm-path set and no ivshmem device found")?;
                let region = Region::open(&path, info.size(), settings.max_in_flight as usize)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                match hello {
                    Some(h) if h.features & features::SHM != 0 && h.shm_size == region.len() => {
                        Ok(Transfer::Shm(region))
                    }
                    Some(h) if h.features & features::SHM != 0 => Err(format!(
                        "host's region is {} bytes, ours ({}) is {}: not the same memory",
                        h.shm_size,
                        path.display(),
                        region.len()
                    )),
                    _ => Err("host has no shared-memory region".into()),
                }
            };
            match attempt() {
                Ok(t) => return Ok(t),
                Err(e) if want == Mode::Shm => return Err(format!("mode=shm: {e}")),
                Err(e) => gst::debug!(CAT, imp = self, "shared memory not used: {e}"),
            }
        }
        Ok(Transfer::Inline)
    }

    /// A live link, reconnecting (with backoff) when the old one died.
    /// `false` while the host is unreachable: the frame is dropped.
    fn ensure_link(&self, settings: &Settings, state: &mut State) -> bool {
        if let Some(link) = &state.link {
            match link.dead() {
                None => return true,
                Some(why) => {
                    gst::element_warning!(
                        self.obj(),
                        gst::ResourceError::Read,
                        ("Lost the host at {}: {why}; reconnecting, frames are dropped meanwhile", state.addr)
                    );
                    state.link = None;
                    state.backoff = RECONNECT_MIN;
                    state.next_reconnect = Instant::now();
                }
            }
        }
        if Instant::now() < state.next_reconnect {
            return false;
        }
        match self.connect(settings, &state.addr) {
            Ok(link) => {
                self.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                if let Transfer::Shm(r) = &state.transfer {
                    link.set_areas(r.areas);
                }
                state.link = Some(link);
                state.force_next = true;
                self.send_config(settings, state);
                gst::info!(CAT, imp = self, "reconnected to {}", state.addr);
                true
            }
            Err(e) => {
                gst::debug!(CAT, imp = self, "still no host: {e}");
                state.next_reconnect = Instant::now() + state.backoff;
                state.backoff = (state.backoff * 2).min(RECONNECT_MAX);
                false
            }
        }
    }

    fn max_in_flight(settings: &Settings, state: &State) -> usize {
        let mut n = settings.max_in_flight.max(1) as usize;
        if let Some(h) = state.link.as_ref().and_then(|l| l.hello) {
            n = n.min(h.max_in_flight.max(1) as usize);
        }
        if let Transfer::Shm(r) = &state.transfer {
            n = n.min(r.areas);
        }
        n
    }

    /// Re-announces latency when the measured round trip moved by a quarter.
    fn update_latency(&self, state: &mut State, max_in_flight: usize) {
        let st = &self.shared.stats;
        let answered = st.answered.load(Ordering::Relaxed);
        if answered == 0 || !answered.is_multiple_of(30) {
            return;
        }
        let measured = gst::ClockTime::from_nseconds((st.rtt_percentile(0.5) * 1e6) as u64);
        let old = state.latency.nseconds() as f64;
        if (measured.nseconds() as f64 - old).abs() > old * 0.25 {
            state.latency = measured;
            let per_frame = state.info.as_ref().and_then(frame_duration).unwrap_or(measured);
            let max = measured.max(per_frame * max_in_flight as u64);
            self.obj().set_latency(measured, Some(max));
            let _ = self.obj().post_message(gst::message::Latency::builder().src(&*self.obj()).build());
            gst::debug!(CAT, imp = self, "latency now {measured}");
        }
    }

    /// Builds the request for one frame in the current transfer mode.
    fn request(
        &self,
        state: &mut State,
        buffer: &gst::Buffer,
        force: bool,
        session: u16,
    ) -> Result<(Packet, Option<usize>), String> {
        let info = state.info.as_ref().expect("caps are set");
        let format = wire_format(info.format()).ok_or("unsupported format")?;
        let pts = buffer.pts().map_or(0, |t| t.nseconds() as i64);
        let duration = buffer.duration().map_or(0, |t| t.nseconds() as i64);
        let (w, h) = (info.width(), info.height());
        match &mut state.transfer {
            Transfer::Inline => {
                let (pixels, stride) = inline_pixels(buffer, info, format)?;
                let req = FrameRequest {
                    resource_id: 0,
                    width: w,
                    height: h,
                    format: format.fourcc(),
                    stride,
                    pts,
                    duration,
                    force_keyframe: force,
                    pixels: Some(pixels),
                };
                Ok((Packet::new(session, Message::FrameRequest(req)), None))
            }
            Transfer::Resource(gpu) => {
                let mem = buffer.peek_memory(0);
                let dmabuf = mem
                    .downcast_memory_ref::<gst_allocators::DmaBufMemory>()
                    .ok_or("resource mode: buffer memory is not a DMA-BUF")?;
                let resource_id = gpu.resource_id(dmabuf.fd()).map_err(|e| e.to_string())?;
                let (_, strides) = plane_layout(buffer, info);
                let req = FrameRequest {
                    resource_id,
                    width: w,
                    height: h,
                    format: format.fourcc(),
                    stride: strides[0] as u32,
                    pts,
                    duration,
                    force_keyframe: force,
                    pixels: None,
                };
                Ok((Packet::new(session, Message::FrameRequest(req)), None))
            }
            Transfer::Shm(region) => {
                let link = state.link.as_ref().expect("linked");
                let area = link.take_area().ok_or("no free shared-memory area")?;
                let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer.as_ref(), info)
                    .map_err(|_| "cannot map the input frame")?;
                let (base, dst) = region.area(area);
                let mut planes = [ShmPlane::default(); 2];
                let mut at = 0usize;
                for (p, plane) in planes.iter_mut().enumerate().take(format.num_planes()) {
                    let stride = frame.plane_stride()[p] as usize;
                    let rows = format.rows(p, h) as usize;
                    let src = frame.plane_data(p as u32).map_err(|_| "cannot read a plane")?;
                    let n = (stride * rows).min(src.len());
                    // The one copy of this path.
                    dst.get_mut(at..at + n).ok_or("frame larger than its area")?.copy_from_slice(&src[..n]);
                    *plane = ShmPlane { offset: base + at as u64, stride: stride as u32 };
                    at = (at + n).next_multiple_of(64);
                }
                let req = ShmFrameRequest {
                    width: w,
                    height: h,
                    format: format.fourcc(),
                    num_planes: format.num_planes() as u32,
                    planes,
                    pts,
                    duration,
                    force_keyframe: force,
                };
                Ok((Packet::new(session, Message::ShmFrameRequest(req)), Some(area)))
            }
        }
    }
}

fn frame_duration(info: &gst_video::VideoInfo) -> Option<gst::ClockTime> {
    let fps = info.fps();
    (fps.numer() > 0).then(|| gst::ClockTime::SECOND.mul_div_floor(fps.denom() as u64, fps.numer() as u64))?
}

impl VideoEncoderImpl for VsockEnc {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        let settings = self.settings.lock().unwrap().clone();
        let addr =
            settings.address().map_err(|e| gst::error_msg!(gst::ResourceError::Settings, ("bad host address: {e}")))?;
        // Fail at start, naming the address, when the host is not there.
        let link =
            self.connect(&settings, &addr).map_err(|e| gst::error_msg!(gst::ResourceError::OpenReadWrite, ("{e}")))?;
        *self.shared.flow.lock().unwrap() = Ok(gst::FlowSuccess::Ok);
        *self.shared.profile.lock().unwrap() = None;
        self.shared.errors_in_row.store(0, Ordering::Relaxed);
        self.shared.max_errors.store(settings.max_errors, Ordering::Relaxed);
        *self.state.lock().unwrap() = Some(State {
            addr,
            link: Some(link),
            info: None,
            dmabuf: false,
            transfer: Transfer::Inline,
            frames: 0,
            force_next: true,
            next_reconnect: Instant::now(),
            backoff: RECONNECT_MIN,
            latency: gst::ClockTime::ZERO,
        });
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        // Dropping the link shuts the socket; its reader thread ends by itself.
        *self.state.lock().unwrap() = None;
        Ok(())
    }

    fn set_format(
        &self,
        input: &gst_video::VideoCodecState<'static, gst_video::video_codec_state::Readable>,
    ) -> Result<(), gst::LoggableError> {
        let info = input.info().clone();
        if wire_format(info.format()).is_none() {
            return Err(gst::loggable_error!(CAT, "unsupported format {:?}", info.format()));
        }
        if !info.width().is_multiple_of(2) || !info.height().is_multiple_of(2) {
            return Err(gst::loggable_error!(
                CAT,
                "{}x{}: H.264 4:2:0 needs even sizes (put videoscale or videocrop in front)",
                info.width(),
                info.height()
            ));
        }
        let settings = self.settings.lock().unwrap().clone();
        let mut guard = self.state.lock().unwrap();
        let state = guard.as_mut().ok_or_else(|| gst::loggable_error!(CAT, "not started"))?;
        // A new format: let the frames of the old one come back first.
        if let Some(link) = &state.link {
            let t = settings.reply_timeout();
            let _ = self.unlocked(|| link.wait_below(1, t));
        }
        state.dmabuf = input
            .caps()
            .and_then(|c| c.features(0).map(|f| f.contains(gst_allocators::CAPS_FEATURE_MEMORY_DMABUF)))
            .unwrap_or(false);
        state.info = Some(info.clone());
        state.transfer = self.choose_transfer(&settings, state).map_err(|e| gst::loggable_error!(CAT, "{e}"))?;
        if let (Transfer::Shm(r), Some(link)) = (&state.transfer, &state.link) {
            link.set_areas(r.areas);
        }
        gst::info!(
            CAT,
            imp = self,
            "{}x{} {:?} to {}: transfer {}",
            info.width(),
            info.height(),
            info.format(),
            state.addr,
            state.transfer.name()
        );
        state.force_next = true;
        self.send_config(&settings, state);

        let caps =
            gst::Caps::builder("video/x-h264").field("stream-format", "byte-stream").field("alignment", "au").build();
        *self.shared.profile.lock().unwrap() = None;
        let max_flight = Self::max_in_flight(&settings, state);
        let per_frame = frame_duration(&info).unwrap_or(gst::ClockTime::from_mseconds(33));
        state.latency = per_frame;
        drop(guard);
        let obj = self.obj();
        obj.set_latency(per_frame, Some(per_frame * max_flight as u64));
        *self.shared.input.lock().unwrap() = Some(input.clone());
        let out = obj
            .set_output_state(caps, Some(input))
            .map_err(|_| gst::loggable_error!(CAT, "cannot set output state"))?;
        obj.negotiate(out).map_err(|e| gst::loggable_error!(CAT, "negotiation failed: {e}"))?;
        Ok(())
    }

    fn propose_allocation(&self, query: &mut gst::query::Allocation) -> Result<(), gst::LoggableError> {
        // Upstream may hand us padded strides: we read them from the meta.
        query.add_allocation_meta::<gst_video::VideoMeta>(None);
        self.parent_propose_allocation(query)
    }

    fn handle_frame(&self, frame: gst_video::VideoCodecFrame) -> Result<gst::FlowSuccess, gst::FlowError> {
        (*self.shared.flow.lock().unwrap())?;
        let settings = self.settings.lock().unwrap().clone();
        let mut guard = self.state.lock().unwrap();
        let state = guard.as_mut().ok_or(gst::FlowError::NotNegotiated)?;
        if state.info.is_none() {
            return Err(gst::FlowError::NotNegotiated);
        }
        let stats = &self.shared.stats;

        if !self.ensure_link(&settings, state) {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            drop(guard);
            return self.obj().finish_frame(frame); // no output buffer: dropped
        }
        // An answer overdue while we were not waiting: the host is gone.
        let timeout = settings.reply_timeout();
        if let Some(link) = &state.link
            && link.oldest_age().is_some_and(|a| a > timeout)
        {
            link.kill(&format!("no answer within {} ms", timeout.as_millis()));
        }

        let interval = settings.keyframe_interval as u64;
        let force = frame.flags().contains(gst_video::VideoCodecFrameFlags::FORCE_KEYFRAME)
            || state.force_next
            || self.shared.want_keyframe.swap(false, Ordering::Relaxed)
            || (interval > 0 && state.frames % interval == 0);
        state.frames += 1;
        let buffer = frame.input_buffer_owned().ok_or(gst::FlowError::Error)?;
        let (packet, area) = match self.request(state, &buffer, force, settings.session_id as u16) {
            Ok(r) => r,
            Err(e) => {
                gst::element_error!(self.obj(), gst::StreamError::Encode, ("cannot hand the frame over: {e}"));
                return Err(gst::FlowError::Error);
            }
        };
        let id = frame.system_frame_number();
        // Our frame handle holds the stream lock; let go of it before waiting.
        drop(frame);
        let link = state.link.as_mut().expect("ensure_link gave a link");
        let pts = match &packet.message {
            Message::FrameRequest(r) => Some(r.pts),
            Message::ShmFrameRequest(r) => Some(r.pts),
            _ => None,
        };
        let pending = Pending { frame: id, pts, sent: Instant::now(), area, discard: false };
        match link.send(pending, &packet) {
            Ok(()) => {
                state.force_next = false;
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            // The reader thread reports this frame lost; reconnecting is next frame's job.
            Err(e) => gst::debug!(CAT, imp = self, "send failed: {e:?}"),
        }
        let max = Self::max_in_flight(&settings, state);
        let link = state.link.as_ref().expect("still there");
        match self.unlocked(|| link.wait_below(max, timeout)) {
            Ok(()) | Err(WaitError::Dead(_)) => {}
            Err(WaitError::Timeout) => link.kill(&format!("no answer within {} ms", timeout.as_millis())),
        }
        self.update_latency(state, max);
        drop(guard);
        *self.shared.flow.lock().unwrap()
    }

    fn finish(&self) -> Result<gst::FlowSuccess, gst::FlowError> {
        let settings = self.settings.lock().unwrap().clone();
        let guard = self.state.lock().unwrap();
        if let Some(link) = guard.as_ref().and_then(|s| s.link.as_ref()) {
            // Drain: every frame in flight comes back before EOS goes on.
            let n = link.outstanding();
            let t = settings.reply_timeout() * n.max(1) as u32;
            if let Err(e) = self.unlocked(|| link.wait_below(1, t)) {
                gst::warning!(CAT, imp = self, "draining at EOS: {e:?}");
            }
        }
        drop(guard);
        *self.shared.flow.lock().unwrap()
    }

    fn flush(&self) -> bool {
        if let Some(link) = self.state.lock().unwrap().as_ref().and_then(|s| s.link.as_ref()) {
            link.discard_all();
        }
        self.shared.want_keyframe.store(true, Ordering::Relaxed);
        *self.shared.flow.lock().unwrap() = Ok(gst::FlowSuccess::Ok);
        true
    }
}
