//! Scanout push: one encoder per scanout, fed by its flips, fanned out to
//! every subscriber.
//!
//! A [`Feed`] is a scanout being encoded: a thread with the encoder, woken
//! by the scanout's flips (a small task forwards the [`watch`] channel's
//! changes) and by its subscribers (join, CONFIG_REQ, KEYFRAME_REQ). It
//! encodes when the scanout flipped, at most at the configured frame rate:
//! flips that come while it waits or encodes are merged, the picture is
//! read when the encode starts, so the newest wins and nothing queues.
//! Nothing flipped, nothing encoded (unless a keepalive is set).
//!
//! Every access unit goes to every subscriber through a queue of its own of
//! [`PUSH_QUEUE`] frames, with `try_send`: a subscriber that does not read
//! fast enough loses frames (never slows the encoder or anyone else), and
//! then gets nothing until the next IDR, which the feed makes as soon as
//! that subscriber has room again. A new subscriber and KEYFRAME_REQ also
//! get an IDR at once, of the picture shown now.
//!
//! Subscribers hold the feed ([`Subscription`]); when the last one goes,
//! the feed ends and its encoder closes. [`Feeds`] finds the feed of a
//! scanout by its watch channel, so subscribers of one VM's scanout share
//! one encoder whichever connection they came on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use hxfr_encode::Frame;
use hxfr_proto::{ConfigReq, FrameResponse, Message, Packet};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::encoder::{EncoderFactory, LiveEncoder, OpenError};
use crate::scanout::{Flip, ScanoutSource, monotonic_ns};
use crate::stats::{SessionStats, StatsRegistry};

/// Frames queued for one subscriber before its frames are dropped.
pub(crate) const PUSH_QUEUE: usize = 4;
/// The frame rate a feed caps itself at until a subscriber says otherwise.
const DEFAULT_FPS: u32 = 60;
/// How long a new feed waits for its first subscriber's CONFIG_REQ before
/// its first frame (Helix's comes right after SUBSCRIBE_RESP): otherwise the
/// config would rebuild the encoder, and cost an IDR, one frame later.
const CONFIG_GRACE: Duration = Duration::from_millis(50);

/// The feeds of a host, by scanout.
pub(crate) struct Feeds {
    feeds: Mutex<Vec<Weak<Feed>>>,
    encoders: Arc<EncoderFactory>,
    keepalive: Option<Duration>,
    stats: StatsRegistry,
}

impl Feeds {
    pub fn new(encoders: Arc<EncoderFactory>, keepalive: Option<Duration>, stats: StatsRegistry) -> Feeds {
        Feeds { feeds: Mutex::default(), encoders, keepalive, stats }
    }

    /// The feed of `scanout_id` in `source`, started if none runs. `None`
    /// when there is no such scanout (or no thread for it). A new feed's
    /// stats carry `conn_id` (its first subscriber's connection) and
    /// session id = the scanout; `dropped` counts frames subscribers lost.
    pub fn feed(&self, source: &Arc<dyn ScanoutSource>, scanout_id: u32, conn_id: u64) -> Option<Arc<Feed>> {
        let flips = source.watch(scanout_id)?;
        let mut feeds = self.feeds.lock().unwrap();
        feeds.retain(|f| f.strong_count() > 0);
        if let Some(f) = feeds.iter().filter_map(Weak::upgrade).find(|f| f.flips.same_channel(&flips)) {
            return Some(f);
        }
        let stats = self.stats.register(conn_id, scanout_id as u16, format!("scanout {scanout_id} (push)"));
        match Feed::start(source.clone(), scanout_id, flips, self.encoders.clone(), self.keepalive, stats) {
            Ok(f) => {
                feeds.push(Arc::downgrade(&f));
                Some(f)
            }
            Err(e) => {
                warn!(scanout = scanout_id, "cannot start a thread to encode the scanout: {e}");
                None
            }
        }
    }
}

/// What subscribers and flips tell a feed's thread.
#[derive(Default)]
struct Inbox {
    joins: Vec<Sub>,
    config: Option<ConfigReq>,
    keyframe: bool,
    flipped: bool,
    /// The scanout is gone, or every subscriber is.
    ended: bool,
    /// Look at the subscribers again (one left).
    woken: bool,
}

impl Inbox {
    fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.config.is_none() && !self.keyframe && !self.flipped && !self.ended && !self.woken
    }
}

#[derive(Default)]
struct Mailbox {
    inbox: Mutex<Inbox>,
    cv: Condvar,
}

impl Mailbox {
    fn post(&self, f: impl FnOnce(&mut Inbox)) {
        f(&mut self.inbox.lock().unwrap());
        self.cv.notify_one();
    }

    /// Waits until something is posted or `deadline` passes; takes it all.
    fn wait(&self, deadline: Option<Instant>) -> Inbox {
        let mut inbox = self.inbox.lock().unwrap();
        while inbox.is_empty() {
            match deadline {
                None => inbox = self.cv.wait(inbox).unwrap(),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    inbox = self.cv.wait_timeout(inbox, d - now).unwrap().0;
                }
            }
        }
        std::mem::take(&mut *inbox)
    }
}

/// A scanout being encoded for its subscribers.
pub(crate) struct Feed {
    mailbox: Arc<Mailbox>,
    /// Which scanout this is: the source's channel.
    flips: watch::Receiver<Flip>,
    watcher: tokio::task::AbortHandle,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.watcher.abort();
        self.mailbox.post(|i| i.ended = true);
    }
}

/// Marks the feed ended when the flip watcher ends, however it ends.
struct EndOnDrop(Arc<Mailbox>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.post(|i| i.ended = true);
    }
}

impl Feed {
    fn start(
        source: Arc<dyn ScanoutSource>,
        scanout_id: u32,
        flips: watch::Receiver<Flip>,
        encoders: Arc<EncoderFactory>,
        keepalive: Option<Duration>,
        stats: Arc<Mutex<SessionStats>>,
    ) -> std::io::Result<Arc<Feed>> {
        let mailbox = Arc::new(Mailbox::default());
        let span = info_span!("scanout", id = scanout_id);
        let worker = Worker {
            scanout_id,
            session: scanout_id as u16,
            source,
            flips: flips.clone(),
            mailbox: mailbox.clone(),
            encoders,
            encoder: None,
            stats,
            keepalive,
            rate: Rate { bitrate: hxfr_proto::defaults::BITRATE, fps_num: DEFAULT_FPS, fps_den: 1, profile: 0 },
            subs: Vec::new(),
            pending: false,
            hold: None,
            force: true,
            last_encode: None,
            last_seq: None,
            last_pts: i64::MIN,
            failures: 0,
        };
        let thread_span = span.clone();
        std::thread::Builder::new()
            .name(format!("hxfr-scanout{scanout_id}"))
            .spawn(move || thread_span.in_scope(|| worker.run()))?;
        let (mut rx, mb) = (flips.clone(), EndOnDrop(mailbox.clone()));
        let watcher = tokio::spawn(
            async move {
                while rx.changed().await.is_ok() {
                    mb.0.post(|i| i.flipped = true);
                }
                debug!("scanout gone");
            }
            .instrument(span),
        )
        .abort_handle();
        Ok(Arc::new(Feed { mailbox, flips, watcher }))
    }

    /// Adds a subscriber whose frames carry `session` (the scanout id, for
    /// Helix's subscriber); its frames come out of the receiver. Its first
    /// frame is an IDR of the picture shown now.
    pub fn join(self: &Arc<Feed>, session: u16) -> (Subscription, mpsc::Receiver<Packet>) {
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        let gone = Arc::new(AtomicBool::new(false));
        self.mailbox.post(|i| i.joins.push(Sub { tx, gone: gone.clone(), synced: false, session }));
        (Subscription { feed: self.clone(), gone }, rx)
    }
}

/// One subscriber's hold on a feed: dropping it unsubscribes.
pub(crate) struct Subscription {
    feed: Arc<Feed>,
    gone: Arc<AtomicBool>,
}

impl Subscription {
    /// CONFIG_REQ: bitrate, frame rate and profile of the scanout's encoder
    /// (shared: the last subscriber to say wins). Never answered.
    pub fn configure(&self, c: ConfigReq) {
        self.feed.mailbox.post(|i| i.config = Some(c));
    }

    /// KEYFRAME_REQ: an IDR of the picture shown now.
    pub fn keyframe(&self) {
        self.feed.mailbox.post(|i| i.keyframe = true);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Relaxed);
        self.feed.mailbox.post(|i| i.woken = true);
    }
}

/// A subscriber, as the feed's thread sees it.
struct Sub {
    tx: mpsc::Sender<Packet>,
    gone: Arc<AtomicBool>,
    /// Has had every frame since its last IDR: may take the next P frame.
    synced: bool,
    session: u16,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Rate {
    bitrate: u32,
    fps_num: u32,
    fps_den: u32,
    profile: u8,
}

struct Worker {
    scanout_id: u32,
    session: u16,
    source: Arc<dyn ScanoutSource>,
    flips: watch::Receiver<Flip>,
    mailbox: Arc<Mailbox>,
    encoders: Arc<EncoderFactory>,
    encoder: Option<LiveEncoder>,
    stats: Arc<Mutex<SessionStats>>,
    keepalive: Option<Duration>,
    rate: Rate,
    subs: Vec<Sub>,
    /// A picture waits to be encoded (a flip, a join, a keyframe request, the keepalive).
    pending: bool,
    /// No frame before this (a new feed waits for its CONFIG_REQ).
    hold: Option<Instant>,
    /// The next frame must be an IDR.
    force: bool,
    last_encode: Option<Instant>,
    /// The flip the last frame showed.
    last_seq: Option<u64>,
    last_pts: i64,
    /// Encodes in a row that produced nothing, to log once rather than per flip.
    failures: u32,
}

impl Worker {
    fn run(mut self) {
        debug!("feed started");
        loop {
            self.subs.retain(|s| !s.gone.load(Ordering::Relaxed) && !s.tx.is_closed());
            // A subscriber that lost frames and has room again resumes at an IDR.
            if self.subs.iter().any(|s| !s.synced && s.tx.capacity() > 0) {
                self.force = true;
            }
            let now = Instant::now();
            let next = self.last_encode.map_or(now, |t| t + self.interval()).max(self.hold.unwrap_or(now));
            if self.pending && now >= next {
                self.encode();
                continue;
            }
            let deadline = match (self.pending, self.keepalive, self.last_encode) {
                (true, _, _) => Some(next),
                (false, Some(k), Some(t)) => Some(t + k),
                _ => None,
            };
            let inbox = self.mailbox.wait(deadline);
            if inbox.ended {
                break;
            }
            self.pending |= inbox.flipped;
            match inbox.config {
                Some(c) => {
                    self.configure(c);
                    self.hold = None;
                }
                None if self.last_encode.is_none() && !inbox.joins.is_empty() => {
                    self.hold = Some(Instant::now() + CONFIG_GRACE);
                }
                None => {}
            }
            if inbox.keyframe || !inbox.joins.is_empty() {
                self.force = true;
                self.pending = true;
            }
            self.subs.extend(inbox.joins);
            if !self.pending && deadline.is_some_and(|d| Instant::now() >= d) {
                self.pending = true; // keepalive: the picture again
            }
        }
        self.encoder = None;
        self.stats.lock().unwrap().ended = Some(Instant::now());
        debug!("feed ended");
    }

    fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.rate.fps_den as f64 / self.rate.fps_num.max(1) as f64)
    }

    fn configure(&mut self, c: ConfigReq) {
        let rate = Rate {
            bitrate: if c.bitrate == 0 { self.rate.bitrate } else { c.bitrate.clamp(50_000, 500_000_000) },
            fps_num: if c.fps_num == 0 { self.rate.fps_num } else { c.fps_num.min(1000) },
            fps_den: if c.fps_num == 0 { self.rate.fps_den } else { c.fps_den.max(1) },
            profile: c.profile,
        };
        if rate != self.rate {
            info!(bitrate = rate.bitrate, fps = rate.fps_num as f64 / rate.fps_den as f64, "configured");
            self.rate = rate;
            self.encoder = None; // rebuilt at the next frame, an IDR
            self.force = true;
        }
    }

    fn failed(&mut self, why: String) {
        self.failures += 1;
        if self.failures == 1 || self.failures.is_power_of_two() {
            warn!("no frame: {why} ({} in a row)", self.failures);
        }
    }

    /// Encodes the picture shown now and offers it to every subscriber.
    fn encode(&mut self) {
        self.pending = false;
        self.hold = None;
        if self.subs.is_empty() {
            return;
        }
        let flip = *self.flips.borrow();
        let pic = match self.source.picture(self.scanout_id) {
            Ok(p) => p,
            Err(e) => {
                // Nothing shown yet is normal; the next flip tries again.
                debug!("no picture: {e}");
                return;
            }
        };
        let frame = match Frame::new(&pic.data, &pic.layout, self.force) {
            Ok(f) => f,
            Err(e) => return self.failed(e.to_string()),
        };
        if let Err(e) = self.ensure_encoder(&frame) {
            let why = match e {
                OpenError::Busy(why) => why,
                OpenError::Failed(e) => e.to_string(),
            };
            return self.failed(why);
        }
        // The pts is the flip's time; a picture encoded again (a joiner's or
        // a requested IDR, the keepalive) carries the time it was encoded.
        let repeat = self.last_seq == Some(flip.seq);
        let at = if repeat || flip.at_ns == 0 { monotonic_ns() } else { flip.at_ns };
        let pts = (at.min(i64::MAX as u64) as i64).max(self.last_pts.saturating_add(1));
        let started = Instant::now();
        self.last_encode = Some(started);
        let enc = self.encoder.as_mut().expect("ensured above");
        let out = match enc.encode(&frame) {
            Ok(out) => out,
            Err(e) => {
                self.encoder = None;
                self.force = true;
                return self.failed(e.to_string());
            }
        };
        self.failures = 0;
        let l = &pic.layout;
        let bytes_in = (0..l.format.num_planes()).map(|p| (l.plane_end(p) - l.offsets[p]) as usize).sum();
        self.stats.lock().unwrap().record_encode(started.elapsed(), bytes_in, out.data.len(), out.keyframe);
        self.last_seq = Some(flip.seq);
        self.last_pts = pts;
        if out.keyframe {
            self.force = false;
        }
        let response = FrameResponse { pts, dts: pts, is_keyframe: out.keyframe, nals: vec![out.data] };
        let mut packet = Packet::new(self.session, Message::FrameResponse(response));
        let mut dropped = 0;
        for s in &mut self.subs {
            if !s.synced && !out.keyframe {
                continue; // waits for an IDR
            }
            packet.session_id = s.session;
            match s.tx.try_send(packet.clone()) {
                Ok(()) => s.synced |= out.keyframe,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if s.synced {
                        debug!("a subscriber is behind: dropping its frames until the next IDR");
                    }
                    s.synced = false;
                    dropped += 1;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        if dropped > 0 {
            self.stats.lock().unwrap().info.dropped += dropped;
        }
    }

    /// (Re)builds the encoder when there is none or the picture's size changed.
    fn ensure_encoder(&mut self, frame: &Frame<'_>) -> Result<(), OpenError> {
        let r = self.rate;
        self.encoders.ensure(&mut self.encoder, frame, &self.stats, |cfg| {
            (cfg.fps_num, cfg.fps_den, cfg.bitrate, cfg.profile) = (r.fps_num, r.fps_den, r.bitrate, r.profile)
        })
    }
}
