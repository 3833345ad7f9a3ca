//! One stream: its encoder, its config, its ordered answers.
//!
//! Each session runs on its own thread (encoding is blocking CPU work) and
//! takes jobs from a bounded queue in request order, so its answers leave in
//! request order too. Every job produces exactly the answers the protocol
//! promises: one FRAME_RESPONSE or ERROR per frame request, one CONFIG_RESP
//! per CONFIG_REQ, nothing for KEYFRAME_REQ.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hxfr_encode::Frame;
use hxfr_proto::{ConfigReq, ConfigResp, ErrorCode, FrameResponse, Message, Packet};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{Span, debug, info, warn};

use crate::encoder::{EncoderFactory, LiveEncoder, OpenError};
use crate::source::{FrameJob, FrameSources, Mapped};
use crate::stats::SessionStats;

/// An answer, tagged with the conversation it belongs to: after a HELLO the
/// connection's writer drops answers of the sessions that came before it.
pub(crate) struct Outgoing {
    pub epoch: u64,
    pub packet: Packet,
}

/// Work for a session, in the order the guest sent it.
pub(crate) enum Job {
    Frame(FrameJob),
    Keyframe,
    Config(ConfigReq),
    /// An answer prepared by the reader (e.g. ERROR for a malformed request)
    /// that must keep its place among this session's answers.
    Reply(Packet),
}

/// A job in the queue, holding its place there until the session takes it.
struct Queued {
    job: Job,
    _slot: OwnedSemaphorePermit,
}

/// The reader's end of a session. Dropping it lets the session finish what
/// is queued; [`SessionHandle::abort`] makes it skip that instead.
pub(crate) struct SessionHandle {
    jobs: std_mpsc::Sender<Queued>,
    /// Places in the queue: the reader waits for one (backpressure).
    slots: Arc<Semaphore>,
    closed: Arc<AtomicBool>,
}

impl SessionHandle {
    /// Queues a job, waiting while the session's queue is full. False when
    /// the session has ended.
    pub async fn send(&self, job: Job) -> bool {
        let Ok(slot) = self.slots.clone().acquire_owned().await else { return false };
        self.jobs.send(Queued { job, _slot: slot }).is_ok()
    }

    /// Queued jobs will be skipped, not encoded (the guest is gone or restarted).
    pub fn abort(self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// Exactly what a session works with.
pub(crate) struct SessionParts {
    pub id: u16,
    /// The conversation (HELLO count) its answers belong to.
    pub epoch: u64,
    pub encoders: Arc<EncoderFactory>,
    pub sources: Arc<FrameSources>,
    pub stats: Arc<Mutex<SessionStats>>,
    pub out: mpsc::Sender<Outgoing>,
    /// Jobs queued before the reader waits.
    pub queue: usize,
    /// An encoder that has had no frame for this long is closed.
    pub idle: Duration,
    pub thread_name: String,
    /// Entered on the session's thread: every log line names the session.
    pub span: Span,
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
    id: u16,
    epoch: u64,
    encoders: Arc<EncoderFactory>,
    sources: Arc<FrameSources>,
    stats: Arc<Mutex<SessionStats>>,
    out: mpsc::Sender<Outgoing>,
    closed: Arc<AtomicBool>,
    encoder: Option<LiveEncoder>,
    idle: Duration,
    rate: Rate,
    force_next: bool,
    /// ERROR answers in a row, to log loudly once rather than per frame.
    errors_in_row: u32,
}

pub(crate) fn spawn(p: SessionParts) -> std::io::Result<SessionHandle> {
    // Unbounded, but a job needs a slot to get in.
    let (tx, rx) = std_mpsc::channel();
    let slots = Arc::new(Semaphore::new(p.queue.max(1)));
    let closed = Arc::new(AtomicBool::new(false));
    let worker = Worker {
        id: p.id,
        epoch: p.epoch,
        encoders: p.encoders,
        sources: p.sources,
        stats: p.stats,
        out: p.out,
        closed: closed.clone(),
        encoder: None,
        idle: p.idle,
        rate: Rate {
            bitrate: hxfr_proto::defaults::BITRATE,
            fps_num: hxfr_proto::defaults::FPS,
            fps_den: 1,
            profile: 0,
            explicit: false,
        },
        force_next: true,
        errors_in_row: 0,
    };
    let span = p.span;
    std::thread::Builder::new().name(p.thread_name).spawn(move || span.in_scope(|| worker.run(rx)))?;
    Ok(SessionHandle { jobs: tx, slots, closed })
}

impl Worker {
    fn run(mut self, rx: std_mpsc::Receiver<Queued>) {
        debug!("session started");
        loop {
            // While an encoder is open, wait only so long for the next job.
            let next = match self.encoder {
                Some(_) => rx.recv_timeout(self.idle),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let job = match next {
                Ok(q) => q.job, // its slot is free again
                Err(RecvTimeoutError::Timeout) => {
                    self.encoder = None;
                    info!("no frame for {}s: encoder closed", self.idle.as_secs_f32());
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if self.closed.load(Ordering::Relaxed) {
                continue; // connection gone: drain without encoding
            }
            let reply = match job {
                Job::Frame(f) => Some(self.frame(f)),
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
        self.encoder = None; // no longer counted by the host, before the session says it ended
        self.stats.lock().unwrap().ended = Some(Instant::now());
        debug!("session ended");
    }

    fn error(&mut self, code: ErrorCode, msg: String) -> Packet {
        self.errors_in_row += 1;
        self.stats.lock().unwrap().info.dropped += 1;
        if self.errors_in_row == 1 || self.errors_in_row.is_power_of_two() {
            warn!(code = code as i32, "{msg} ({} in a row)", self.errors_in_row);
        }
        Packet::error(self.id, code as i32, msg)
    }

    /// Maps the frame's pixels, whatever their source, and encodes them.
    fn frame(&mut self, job: FrameJob) -> Packet {
        match self.sources.map(&job.meta, job.source) {
            Ok(mapped) => self.encode(&mapped, job.meta.pts, job.meta.duration, job.meta.force_keyframe),
            Err(e) => self.error(e.code, e.message),
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
            info!(bitrate = rate.bitrate, fps = rate.fps_num / rate.fps_den, "configured");
            self.rate = rate;
            self.encoder = None; // rebuilt at the next frame with the new settings
        }
        let name = self.encoder.as_ref().map_or_else(|| self.encoders.kind().to_string(), |e| e.name().to_string());
        Packet::new(
            self.id,
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

    fn encode(&mut self, mapped: &Mapped, pts: i64, duration: i64, force: bool) -> Packet {
        let frame = match Frame::new(&mapped.data, &mapped.layout, force || self.force_next) {
            Ok(f) => f,
            Err(e) => return self.error(ErrorCode::InvalidMessage, e.to_string()),
        };
        self.rate_from_duration(duration);
        let started = Instant::now();
        if let Err(e) = self.ensure_encoder(&frame) {
            let msg = match e {
                OpenError::Busy(why) => why,
                OpenError::Failed(e) => e.to_string(),
            };
            return self.error(ErrorCode::EncodeFailed, msg);
        }
        let enc = self.encoder.as_mut().expect("ensured above");
        match enc.encode(&frame) {
            Ok(out) => {
                self.force_next = false;
                self.errors_in_row = 0;
                let bytes_in = mapped.frame_bytes();
                self.stats.lock().unwrap().record_encode(started.elapsed(), bytes_in, out.data.len(), out.keyframe);
                Packet::new(
                    self.id,
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
    fn ensure_encoder(&mut self, frame: &Frame<'_>) -> Result<(), OpenError> {
        let r = self.rate;
        self.encoders.ensure(&mut self.encoder, frame, &self.stats, |cfg| {
            (cfg.fps_num, cfg.fps_den, cfg.bitrate, cfg.profile) = (r.fps_num, r.fps_den, r.bitrate, r.profile)
        })
    }
}
