//! The element: GObject and GstVideoEncoder glue around the guest client
//! ([`hxfr_guest::client`]), the transfer modes ([`super::transfer`]) and the
//! answer handling ([`super::answers`]).
//!
//! The streaming thread sends each frame and returns; the client's reader
//! thread finishes frames as their answers arrive. While `handle_frame` waits
//! for room in the window, or `finish`/`set_format` for the last answers, it
//! holds neither the `state` mutex nor the stream lock, so the reader thread
//! can push what the host sent back meanwhile.
//!
//! Lock order, on every thread: the base class's stream lock, then `state`,
//! then the leaf mutexes (`settings`, the [`Shared`] fields, the client's
//! queue). The reader thread takes the stream lock and leaf mutexes only;
//! nobody waits on the network while holding `state`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_video::prelude::*;
use gst_video::subclass::prelude::*;
use hxfr_guest::GuestError;
use hxfr_guest::client::{Client, Link, WaitError};
use hxfr_proto::{ConfigReq, Message, Packet};

use super::answers::{Answers, FrameId, Shared};
use super::lock::StreamUnlocked;
use super::settings::*;
use super::transfer::{self, Stamp, Transfer};
use super::{CAT, Mode};

struct State {
    client: Client<FrameId>,
    info: Option<gst_video::VideoInfo>,
    dmabuf: bool,
    transfer: Transfer,
    /// Frames seen, for keyframe-interval.
    frames: u64,
    force_next: bool,
    /// Latency last announced (min), to re-announce when it moves.
    latency: gst::ClockTime,
    /// Whether upstream is live (asked once per format): a live source must
    /// not be held back by a slow host, its frames are dropped instead.
    live: Option<bool>,
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
            shared: Arc::new(Shared::new(DEFAULT_MAX_ERRORS)),
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

fn frame_duration(info: &gst_video::VideoInfo) -> Option<gst::ClockTime> {
    let fps = info.fps();
    (fps.numer() > 0).then(|| gst::ClockTime::SECOND.mul_div_floor(fps.denom() as u64, fps.numer() as u64))?
}

impl VideoEncoderImpl for VsockEnc {
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let generation = self.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let settings = self.settings.lock().unwrap().clone();
        let addr =
            settings.address().map_err(|e| gst::error_msg!(gst::ResourceError::Settings, ("bad host address: {e}")))?;
        let answers = Arc::new(Answers { element: self.obj().downgrade(), shared: self.shared.clone(), generation });
        // Fail at start, naming the address, when the host is not there.
        let client = Client::connect(settings.client(addr.clone()), answers)
            .map_err(|e| gst::error_msg!(gst::ResourceError::OpenReadWrite, ("{e}")))?;
        match client.hello() {
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
        *self.shared.flow.lock().unwrap() = Ok(gst::FlowSuccess::Ok);
        *self.shared.profile.lock().unwrap() = None;
        self.shared.errors_in_row.store(0, Ordering::Relaxed);
        self.shared.max_errors.store(settings.max_errors, Ordering::Relaxed);
        *self.state.lock().unwrap() = Some(State {
            client,
            info: None,
            dmabuf: false,
            transfer: Transfer::Inline,
            frames: 0,
            force_next: true,
            latency: gst::ClockTime::ZERO,
            live: None,
        });
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        // Dropping the client shuts the socket; its reader thread ends by itself.
        *self.state.lock().unwrap() = None;
        Ok(())
    }

    fn set_format(
        &self,
        input: &gst_video::VideoCodecState<'static, gst_video::video_codec_state::Readable>,
    ) -> Result<(), gst::LoggableError> {
        let info = input.info().clone();
        if transfer::wire_format(info.format()).is_none() {
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
        // A new format: let the frames of the old one come back first.
        self.wait_outstanding(1, settings.reply_timeout());
        let mut guard = self.state.lock().unwrap();
        let state = guard.as_mut().ok_or_else(|| gst::loggable_error!(CAT, "not started"))?;
        state.dmabuf = input
            .caps()
            .and_then(|c| c.features(0).map(|f| f.contains(gst_allocators::CAPS_FEATURE_MEMORY_DMABUF)))
            .unwrap_or(false);
        state.info = Some(info.clone());
        let plan = transfer::plan(settings.mode, state.dmabuf).map_err(|e| gst::loggable_error!(CAT, "{e}"))?;
        let (chosen, passed_over) = transfer::open(
            plan,
            settings.shm_path.as_deref(),
            info.size(),
            settings.max_in_flight as usize,
            state.client.hello(),
        )
        .map_err(|e| gst::loggable_error!(CAT, "{e}"))?;
        if let Some(why) = passed_over {
            gst::debug!(CAT, imp = self, "shared memory not used: {why}");
        }
        state.transfer = chosen;
        state.client.set_areas(state.transfer.areas());
        gst::info!(
            CAT,
            imp = self,
            "{}x{} {:?} to {}: transfer {}",
            info.width(),
            info.height(),
            info.format(),
            state.client.config().addr,
            state.transfer.name()
        );
        state.force_next = true;
        state.live = None;
        Self::send_config(&settings, state);

        let caps =
            gst::Caps::builder("video/x-h264").field("stream-format", "byte-stream").field("alignment", "au").build();
        *self.shared.profile.lock().unwrap() = None;
        let window = state.client.window();
        let per_frame = frame_duration(&info).unwrap_or(gst::ClockTime::from_mseconds(33));
        state.latency = per_frame;
        drop(guard);
        let obj = self.obj();
        obj.set_latency(per_frame, Some(per_frame * window as u64));
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
        // A live source must never wait on a slow host (its frames would
        // pile up and arrive as a late burst): once the host has answered
        // (its encoder is up), give it one frame time to make room, then
        // drop this frame. Others wait as long as the reply timeout allows:
        // they lose nothing.
        let warmed_up = self.shared.stats.answered.load(Ordering::Relaxed) > 0;
        let room = if warmed_up && self.upstream_is_live() { self.frame_time() } else { settings.reply_timeout() };
        // The frame handle holds the stream lock too: let go of it while we wait.
        let id = frame.system_frame_number();
        drop(frame);
        let has_room = self.wait_for_room(room, settings.reply_timeout());
        let obj = self.obj();
        let frame = obj.frame(id as i32).ok_or(gst::FlowError::Error)?;
        if !has_room {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            gst::debug!(CAT, imp = self, "host busy: dropping frame {id} at the input");
            return obj.finish_frame(frame); // no output buffer: dropped
        }
        let mut guard = self.state.lock().unwrap();
        let state = guard.as_mut().ok_or(gst::FlowError::NotNegotiated)?;
        let info = state.info.clone().ok_or(gst::FlowError::NotNegotiated)?;
        let stats = &self.shared.stats;

        if !self.ensure_link(&settings, state) {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            drop(guard);
            return self.obj().finish_frame(frame); // no output buffer: dropped
        }
        // An answer overdue while we were not waiting: the host is gone.
        state.client.expire();

        let interval = settings.keyframe_interval as u64;
        let keyframe = frame.flags().contains(gst_video::VideoCodecFrameFlags::FORCE_KEYFRAME)
            || state.force_next
            || self.shared.want_keyframe.swap(false, Ordering::Relaxed)
            || (interval > 0 && state.frames % interval == 0);
        state.frames += 1;
        let buffer = frame.input_buffer_owned().ok_or(gst::FlowError::Error)?;
        let at = Stamp {
            pts: buffer.pts().map_or(0, |t| t.nseconds() as i64),
            duration: buffer.duration().map_or(0, |t| t.nseconds() as i64),
            keyframe,
        };
        let area = matches!(state.transfer, Transfer::Shm(_)).then(|| state.client.take_area()).flatten();
        let message = match transfer::request(&mut state.transfer, &buffer, &info, area, at) {
            Ok(m) => m,
            Err(e) => {
                gst::element_error!(self.obj(), gst::StreamError::Encode, ("cannot hand the frame over: {e}"));
                return Err(gst::FlowError::Error);
            }
        };
        // Our frame handle holds the stream lock; the reader needs it.
        drop(frame);
        match state.client.send(id, area, &Packet::new(settings.session_id as u16, message)) {
            Ok(()) => {
                state.force_next = false;
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            // The reader thread reports this frame lost; reconnecting is next frame's job.
            Err(e) => gst::debug!(CAT, imp = self, "send failed: {e}"),
        }
        let window = state.client.window();
        self.update_latency(state, window);
        drop(guard);
        *self.shared.flow.lock().unwrap()
    }

    fn finish(&self) -> Result<gst::FlowSuccess, gst::FlowError> {
        let settings = self.settings.lock().unwrap().clone();
        // Drain: every frame in flight comes back before EOS goes on.
        let n = self.state.lock().unwrap().as_ref().map_or(0, |s| s.client.outstanding());
        self.wait_outstanding(1, settings.reply_timeout() * n.max(1) as u32);
        *self.shared.flow.lock().unwrap()
    }

    fn flush(&self) -> bool {
        if let Some(s) = self.state.lock().unwrap().as_ref() {
            s.client.flush();
        }
        self.shared.want_keyframe.store(true, Ordering::Relaxed);
        *self.shared.flow.lock().unwrap() = Ok(gst::FlowSuccess::Ok);
        true
    }
}

impl VsockEnc {
    fn stats(&self) -> gst::Structure {
        let st = &self.shared.stats;
        let state = self.state.lock().unwrap();
        let (mode, host, connected) = match state.as_ref() {
            Some(s) => (s.transfer.name(), s.client.config().addr.to_string(), s.client.dead().is_none()),
            None => ("none", String::new(), false),
        };
        let [p50, p99] = st.rtt();
        gst::Structure::builder("application/x-vsockenc-stats")
            .field("frames-sent", st.sent.load(Ordering::Relaxed))
            .field("frames-answered", st.answered.load(Ordering::Relaxed))
            .field("frames-dropped", st.dropped.load(Ordering::Relaxed))
            .field("reconnects", st.reconnects.load(Ordering::Relaxed))
            .field("rtt-p50-ms", p50)
            .field("rtt-p99-ms", p99)
            .field("mode", mode)
            .field("host", host)
            .field("connected", connected)
            .build()
    }

    /// Waits, holding neither `state` nor the stream lock, until fewer than
    /// `max` frames are outstanding; a host that lets the wait time out is
    /// taken for gone. The caller holds the stream lock once and no frame.
    fn wait_outstanding(&self, max: usize, timeout: Duration) {
        let Some(waiter) = self.state.lock().unwrap().as_ref().and_then(|s| s.client.waiter()) else { return };
        let waited = {
            let obj = self.obj();
            let _unlocked = StreamUnlocked::new(obj.upcast_ref());
            waiter.wait_below(max, timeout)
        };
        match waited {
            Ok(()) | Err(WaitError::Dead(_)) => {}
            Err(WaitError::Timeout) => {
                if let Some(s) = self.state.lock().unwrap().as_ref() {
                    s.client.kill(&format!("no answer within {} ms", timeout.as_millis()));
                }
            }
        }
    }

    /// Waits up to `room` for the window to have room for one more frame
    /// (the caller holds the stream lock once and no frame). `false` when it
    /// has none: the frame is dropped. A window that stays full past the
    /// reply timeout means the host is gone: the connection is killed (and
    /// replaced at the next frame), which makes room.
    fn wait_for_room(&self, room: Duration, reply_timeout: Duration) -> bool {
        let (window, waiter) = match self.state.lock().unwrap().as_ref() {
            Some(s) => {
                s.client.expire();
                (s.client.window(), s.client.waiter())
            }
            None => return true, // handle_frame reports it
        };
        let Some(waiter) = waiter else { return true };
        let waited = {
            let obj = self.obj();
            let _unlocked = StreamUnlocked::new(obj.upcast_ref());
            waiter.wait_below(window, room)
        };
        match waited {
            Ok(()) | Err(WaitError::Dead(_)) => true,
            Err(WaitError::Timeout) if room >= reply_timeout => {
                if let Some(s) = self.state.lock().unwrap().as_ref() {
                    s.client.kill(&format!("no answer within {} ms", reply_timeout.as_millis()));
                }
                true
            }
            Err(WaitError::Timeout) => false,
        }
    }

    /// Whether upstream is live, asked once per format with a latency query.
    fn upstream_is_live(&self) -> bool {
        if let Some(live) = self.state.lock().unwrap().as_ref().and_then(|s| s.live) {
            return live;
        }
        let mut q = gst::query::Latency::new();
        let live = self.obj().sink_pad().peer_query(&mut q) && q.result().0;
        if let Some(s) = self.state.lock().unwrap().as_mut() {
            s.live = Some(live);
        }
        live
    }

    /// One frame's time at the negotiated rate (33 ms when unknown).
    fn frame_time(&self) -> Duration {
        let per_frame = self.state.lock().unwrap().as_ref().and_then(|s| s.info.as_ref().and_then(frame_duration));
        Duration::from_nanos(per_frame.map_or(33_333_333, |t| t.nseconds()))
    }

    /// Sends CONFIG_REQ for the negotiated format (hosts that speak our
    /// extensions only: Helix's C element never sends it).
    fn send_config(settings: &Settings, state: &mut State) {
        let Some(info) = &state.info else { return };
        if state.client.hello().is_none() {
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
        let _ = state.client.send_control(&Packet::new(settings.session_id as u16, Message::ConfigReq(cfg)));
    }

    /// A live connection, reconnecting (with backoff) when the old one died.
    /// `false` while the host is unreachable: the frame is dropped.
    fn ensure_link(&self, settings: &Settings, state: &mut State) -> bool {
        match state.client.ensure() {
            Ok(Link::Up) => true,
            Ok(Link::Reconnected) => {
                self.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                state.force_next = true;
                Self::send_config(settings, state);
                gst::info!(CAT, imp = self, "reconnected to {}", state.client.config().addr);
                true
            }
            Err(GuestError::Backoff(_)) => false,
            Err(e) => {
                gst::debug!(CAT, imp = self, "still no host: {e}");
                false
            }
        }
    }

    /// Re-announces latency when the measured round trip moved by a quarter.
    fn update_latency(&self, state: &mut State, window: usize) {
        let st = &self.shared.stats;
        let answered = st.answered.load(Ordering::Relaxed);
        if answered == 0 || !answered.is_multiple_of(30) {
            return;
        }
        let measured = gst::ClockTime::from_nseconds((st.rtt()[0] * 1e6) as u64);
        let old = state.latency.nseconds() as f64;
        if (measured.nseconds() as f64 - old).abs() > old * 0.25 {
            state.latency = measured;
            let per_frame = state.info.as_ref().and_then(frame_duration).unwrap_or(measured);
            let max = measured.max(per_frame * window as u64);
            self.obj().set_latency(measured, Some(max));
            let _ = self.obj().post_message(gst::message::Latency::builder().src(&*self.obj()).build());
            gst::debug!(CAT, imp = self, "latency now {measured}");
        }
    }
}
