//! One stream: its encoder, its config, its ordered answers.
//!
//! Each session runs on its own thread (encoding is blocking CPU work) and
//! takes jobs from a bounded queue in request order, so its answers leave in
//! request order too. Every job produces exactly the answers the protocol
//! promises: one FRAME_RESPONSE or ERROR per frame request, one CONFIG_RESP
//! per CONFIG_REQ, nothing for KEYFRAME_REQ.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hxfr_encode::{EncodeError, Encoder, EncoderConfig, Frame};
use hxfr_proto::{
    ConfigReq, ConfigResp, ErrorCode, FrameRequest, FrameResponse, Layout, Message, Packet, PixelFormat,
    ShmFrameRequest,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::Ctx;
use crate::conn::Outgoing;
use crate::stats::SessionStats;

/// Work for a session, in the order the guest sent it.
pub(crate) enum Job {
    /// Holds its share of the host's buffer budget until encoded.
    Inline(FrameRequest, Option<tokio::sync::OwnedSemaphorePermit>),
    Shm(ShmFrameRequest),
    Resource(FrameRequest),
    Keyframe,
    Config(ConfigReq),
    /// An answer prepared by the reader (e.g. ERROR for a malformed request)
    /// that must keep its place among this session's answers.
    Reply(Packet),
}

/// The reader's end of a session. Dropping it lets the session finish what
/// is queued; [`SessionHandle::abort`] makes it skip that instead.
pub(crate) struct SessionHandle {
    pub jobs: mpsc::Sender<Job>,
    closed: Arc<AtomicBool>,
}

impl SessionHandle {
    /// Queued jobs will be skipped, not encoded (the guest is gone or restarted).
    pub fn abort(self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// Rate settings a guest may change with CONFIG_REQ; size comes from frames.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rate {
    bitrate: u32,
    fps_num: u32,
    fps_den: u32,
    profile: u8,
    /// Set by CONFIG_REQ: then frame durations no longer guess the rate.
    explicit: bool,
}

struct Worker {
    ctx: Arc<Ctx>,
    session_id: u16,
    epoch: u64,
    out: mpsc::Sender<Outgoing>,
    closed: Arc<AtomicBool>,
    encoder: Option<Box<dyn Encoder>>,
    rate: Rate,
    force_next: bool,
    stats: Arc<Mutex<SessionStats>>,
    /// ERROR answers in a row, to log loudly once rather than per frame.
    errors_in_row: u32,
}

pub(crate) fn spawn(
    ctx: Arc<Ctx>,
    conn_id: u64,
    session_id: u16,
    epoch: u64,
    out: mpsc::Sender<Outgoing>,
    peer: &str,
) -> std::io::Result<SessionHandle> {
    let (tx, rx) = mpsc::channel(ctx.config.limits.max_in_flight.max(1));
    let closed = Arc::new(AtomicBool::new(false));
    let stats = ctx.stats.register(conn_id, session_id, peer.to_string());
    let worker = Worker {
        ctx,
        session_id,
        epoch,
        out,
        closed: closed.clone(),
        encoder: None,
        rate: Rate { bitrate: 4_000_000, fps_num: 30, fps_den: 1, profile: 0, explicit: false },
        force_next: true,
        stats,
        errors_in_row: 0,
    };
    std::thread::Builder::new().name(format!("hxfr-c{conn_id}-s{session_id}")).spawn(move || worker.run(rx))?;
    Ok(SessionHandle { jobs: tx, closed })
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(job) = rx.blocking_recv() {
            if self.closed.load(Ordering::Relaxed) {
                continue; // connection gone: drain without encoding
            }
            let reply = match job {
                Job::Inline(req, _budget) => Some(self.inline(req)),
                Job::Shm(req) => Some(self.shm(req)),
                Job::Resource(req) => Some(self.resource(req)),
                Job::Keyframe => {
                    self.force_next = true;
                    None
                }
                Job::Config(c) => Some(self.configure(c)),
                Job::Reply(p) => {
                    if matches!(p.message, Message::Error { .. }) {
                        self.stats.lock().unwrap().info.dropped += 1;
                    }
                    Some(p)
                }
            };
            if let Some(p) = reply
                && self.out.blocking_send(Outgoing { epoch: self.epoch, packet: p }).is_err()
            {
                break; // writer gone
            }
        }
        self.stats.lock().unwrap().ended = Some(Instant::now());
        debug!(session = self.session_id, "session ended");
    }

    fn error(&mut self, code: ErrorCode, msg: String) -> Packet {
        self.errors_in_row += 1;
        self.stats.lock().unwrap().info.dropped += 1;
        if self.errors_in_row == 1 || self.errors_in_row.is_power_of_two() {
            warn!(session = self.session_id, code = code as i32, "{msg} ({} in a row)", self.errors_in_row);
        }
        Packet::error(self.session_id, code as i32, msg)
    }

    fn inline(&mut self, req: FrameRequest) -> Packet {
        let Some(format) = PixelFormat::from_fourcc(req.format) else {
            return self.error(ErrorCode::InvalidMessage, format!("unsupported pixel format {}", req.format));
        };
        let Some(pixels) = req.pixels.clone() else {
            return self.error(ErrorCode::InvalidMessage, "frame request without pixels or resource".into());
        };
        let layout = Layout::inline(format, req.width, req.height, req.stride);
        self.encode(&pixels, &layout, req.pts, req.duration, req.force_keyframe)
    }

    fn shm(&mut self, req: ShmFrameRequest) -> Packet {
        let Some(region) = self.ctx.shm.clone() else {
            return self.error(ErrorCode::InvalidMessage, "this host has no shared-memory region (--shm)".into());
        };
        let Some(format) = PixelFormat::from_fourcc(req.format) else {
            return self.error(ErrorCode::InvalidMessage, format!("unsupported pixel format {}", req.format));
        };
        if req.num_planes as usize != format.num_planes() {
            return self.error(
                ErrorCode::InvalidMessage,
                format!("{} planes given, {format:?} has {}", req.num_planes, format.num_planes()),
            );
        }
        let layout = Layout {
            format,
            width: req.width,
            height: req.height,
            offsets: [req.planes[0].offset, req.planes[1].offset],
            strides: [req.planes[0].stride as u64, req.planes[1].stride as u64],
        };
        // Layout::check (inside Frame::new) bounds every plane by the region.
        self.encode(region.bytes(), &layout, req.pts, req.duration, req.force_keyframe)
    }

    fn resource(&mut self, req: FrameRequest) -> Packet {
        let Some(resolver) = self.ctx.config.resolver.clone() else {
            return self.error(
                ErrorCode::ResourceNotFound,
                format!("resource {} not found: this host cannot map guest GPU resources", req.resource_id),
            );
        };
        match resolver.resolve(req.resource_id) {
            Ok(r) => self.encode(&r.data, &r.layout, req.pts, req.duration, req.force_keyframe),
            Err(e) => self.error(ErrorCode::ResourceNotFound, e.to_string()),
        }
    }

    fn configure(&mut self, c: ConfigReq) -> Packet {
        let rate = Rate {
            bitrate: if c.bitrate == 0 { self.rate.bitrate } else { c.bitrate.clamp(50_000, 500_000_000) },
            fps_num: if c.fps_num == 0 { self.rate.fps_num } else { c.fps_num },
            fps_den: c.fps_den.max(1),
            profile: c.profile,
            explicit: true,
        };
        if rate != self.rate {
            info!(session = self.session_id, bitrate = rate.bitrate, fps = rate.fps_num / rate.fps_den, "configured");
            self.rate = rate;
            self.encoder = None; // rebuilt at the next frame with the new settings
        }
        let name = self.encoder.as_ref().map_or_else(|| self.ctx.encoder_kind.to_string(), |e| e.name().to_string());
        Packet::new(
            self.session_id,
            Message::ConfigResp(ConfigResp {
                status: 0,
                width: c.width,
                height: c.height,
                profile: c.profile,
                level_x10: c.level_x10,
                encoder: name,
            }),
        )
    }

    /// Guesses the frame rate from the first frame's duration when no
    /// CONFIG_REQ said. Only a new encoder takes the guess: damage-driven
    /// sources (PipeWire) vary their durations, and rebuilding the encoder
    /// for each change would cost an IDR every time.
    fn rate_from_duration(&mut self, duration: i64) {
        if self.rate.explicit || self.encoder.is_some() || duration <= 0 {
            return;
        }
        let fps = (1e9 / duration as f64).round() as u32;
        if (1..=240).contains(&fps) {
            self.rate.fps_num = fps;
            self.rate.fps_den = 1;
        }
    }

    fn encode(&mut self, data: &[u8], layout: &Layout, pts: i64, duration: i64, force: bool) -> Packet {
        let frame = match Frame::new(data, layout, force || self.force_next) {
            Ok(f) => f,
            Err(e) => return self.error(ErrorCode::InvalidMessage, e.to_string()),
        };
        self.rate_from_duration(duration);
        let started = Instant::now();
        if let Err(e) = self.ensure_encoder(&frame) {
            return self.error(ErrorCode::EncodeFailed, e.to_string());
        }
        let enc = self.encoder.as_mut().expect("ensured above");
        match enc.encode(&frame) {
            Ok(out) => {
                self.force_next = false;
                self.errors_in_row = 0;
                // The frame's own bytes: shared-memory planes sit at offsets in the region.
                let bytes_in =
                    (0..layout.format.num_planes()).map(|p| (layout.plane_end(p) - layout.offsets[p]) as usize).sum();
                self.stats.lock().unwrap().record_encode(started.elapsed(), bytes_in, out.data.len(), out.keyframe);
                Packet::new(
                    self.session_id,
                    Message::FrameResponse(FrameResponse {
                        pts,
                        dts: pts,
                        is_keyframe: out.keyframe,
                        nals: vec![out.data],
                    }),
                )
            }
            Err(e) => {
                // Start again from a fresh encoder and an IDR next time.
                self.encoder = None;
                self.force_next = true;
                self.error(ErrorCode::EncodeFailed, e.to_string())
            }
        }
    }

    /// (Re)builds the encoder when there is none or the frame size changed.
    fn ensure_encoder(&mut self, frame: &Frame<'_>) -> Result<(), EncodeError> {
        if let Some(e) = &self.encoder {
            let c = e.config();
            if (c.width, c.height) == (frame.width, frame.height) {
                return Ok(());
            }
            info!(
                session = self.session_id,
                "size {}x{} -> {}x{}: new encoder", c.width, c.height, frame.width, frame.height
            );
        }
        let cfg = EncoderConfig {
            width: frame.width,
            height: frame.height,
            fps_num: self.rate.fps_num,
            fps_den: self.rate.fps_den,
            bitrate: self.rate.bitrate,
            profile: self.rate.profile,
            preset: self.ctx.config.x264_preset.clone(),
            threads: self.ctx.config.encoder_threads,
        };
        let enc = hxfr_encode::open(&self.ctx.encoder_kind, &cfg)?;
        {
            let s = &mut self.stats.lock().unwrap().info;
            s.encoder = enc.name().to_string();
            s.width = frame.width;
            s.height = frame.height;
        }
        debug!(session = self.session_id, encoder = enc.name(), "{}x{} @ {} bit/s", cfg.width, cfg.height, cfg.bitrate);
        self.encoder = Some(enc);
        Ok(())
    }
}
