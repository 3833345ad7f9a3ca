//! `--source scanout:N`: the host encodes, the guest only forwards.
//!
//! With the host acting as the VM's GPU, it encodes scanout N itself on every
//! flip and pushes the access units to a subscriber (SUBSCRIBE, see
//! docs/protocol.md). Here the bridge is that subscriber: one thread holds the
//! subscription (connect, optionally ENABLE_SCANOUT, SUBSCRIBE until the host
//! says yes, CONFIG_REQ, then read), and hands every pushed access unit to the
//! [`Hub`] through [`Hub::publish`], exactly as the GStreamer pipeline's
//! appsink does, so `/stream` and `/ws/stream` serve it unchanged. The hub's
//! keyframe requests (a viewer joining, or asking after a decoder error)
//! become KEYFRAME_REQ on the subscription. The guest spends nothing per frame
//! beyond copying the access unit to its viewers.
//!
//! Everything is bounded: the reader takes messages of at most
//! [`MAX_PAYLOAD`] (hxfr-proto's decoder enforces it), one at a time; the
//! outgoing queue (keyframe requests) holds [`OUTBOX`] messages and drops the
//! rest (one pending request is as good as many). A connection that breaks,
//! or from which nothing (not even the PONG to our PING) arrives for
//! [`DEAD_AFTER`], is dropped and the subscription made again, with backoff.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use h264_reader::nal::sps::SeqParameterSet;
use h264_reader::rbsp::{BitReader, decode_nal};
use hxfr_guest::{HostAddr, Transport};
use hxfr_proto::{ConfigReq, FrameDecoder, FrameResponse, Message, Packet};
use tracing::{debug, info, warn};

use crate::hub::{Hub, Unit};
use crate::wire::{self, Header};

/// Largest message the bridge accepts from the host: one access unit (a 4K
/// IDR at a high bitrate is a few MB).
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Messages waiting to go to the host (keyframe requests); more are dropped.
pub const OUTBOX: usize = 4;
/// A connection that has delivered nothing for this long is given up.
pub const DEAD_AFTER: Duration = Duration::from_secs(15);
/// The bridge pings a quiet host this often (its PONG proves the connection).
pub const PING_EVERY: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the host has to answer SUBSCRIBE or ENABLE_SCANOUT.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reads wake this often to notice a stop (a serial port cannot be shut down).
const POLL: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What to subscribe to, and how.
#[derive(Debug, Clone)]
pub struct ScanoutConfig {
    pub scanout_id: u32,
    pub host: HostAddr,
    /// Send ENABLE_SCANOUT {width, height} first (hot-plug the connector).
    pub enable: Option<(u32, u32)>,
    /// The size asked for in CONFIG_REQ (the host uses the scanout's own), and
    /// reported to viewers until the first SPS says otherwise.
    pub width: u32,
    pub height: u32,
    pub bitrate: u32,
    /// The frame-rate cap asked for in CONFIG_REQ.
    pub fps: u32,
}

/// What the subscription has done so far.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections made to the host.
    pub connections: AtomicU64,
    /// SUBSCRIBEs the host accepted (one per connection that got that far).
    pub subscribed: AtomicU64,
    /// SUBSCRIBEs answered success = 0.
    pub refused: AtomicU64,
    /// ENABLE_SCANOUTs answered success = 1, and those answered success = 0 or not at all.
    pub enabled: AtomicU64,
    pub enable_failed: AtomicU64,
    /// Access units received, and handed to the hub.
    pub frames: AtomicU64,
    pub keyframes: AtomicU64,
    /// KEYFRAME_REQs queued for the host.
    pub keyframe_requests: AtomicU64,
}

/// Stop flag the subscription thread sleeps on.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    fn is_set(&self) -> bool {
        *self.stopped.lock().unwrap()
    }

    /// Sleeps for `d`; true when stopped (at once, or meanwhile).
    fn sleep(&self, d: Duration) -> bool {
        let g = self.stopped.lock().unwrap();
        let (g, _) = self.wake.wait_timeout_while(g, d, |s| !*s).unwrap();
        *g
    }

    fn set(&self) {
        *self.stopped.lock().unwrap() = true;
        self.wake.notify_all();
    }
}

/// What the thread and the hub's keyframe callback share.
#[derive(Default)]
struct Shared {
    stop: Stop,
    /// The live connection's outgoing queue.
    outbox: Mutex<Option<SyncSender<Message>>>,
    /// The live connection, to shut it down on stop (wakes a blocked reader).
    link: Mutex<Option<Transport>>,
    counters: Counters,
    /// The host's first answer to SUBSCRIBE, for [`Subscription::first_answer`].
    answer: Mutex<Option<bool>>,
    answered: Condvar,
}

impl Shared {
    fn answered(&self, success: bool) {
        let mut a = self.answer.lock().unwrap();
        if a.is_none() {
            *a = Some(success);
            self.answered.notify_all();
        }
    }
}

/// A running subscription; it ends with [`Subscription::stop`].
pub struct Subscription {
    shared: Arc<Shared>,
}

impl Subscription {
    /// Starts subscribing in a thread of its own, feeding `hub`, and makes the
    /// hub's keyframe requests KEYFRAME_REQs.
    pub fn start(cfg: ScanoutConfig, hub: Arc<Hub>) -> std::io::Result<Subscription> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        hub.set_keyframe_fn(Box::new(move || {
            if let Some(tx) = &*s.outbox.lock().unwrap() {
                match tx.try_send(Message::KeyframeReq) {
                    Ok(()) => {
                        s.counters.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Full(_)) => debug!("keyframe request: one is already on its way"),
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
        }));
        let s = shared.clone();
        std::thread::Builder::new().name(format!("scanout-{}", cfg.scanout_id)).spawn(move || run(&cfg, &hub, &s))?;
        Ok(Subscription { shared })
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// The host's first answer to SUBSCRIBE (true: accepted), or `None` when
    /// none came within `within` (host unreachable, or silent).
    pub fn first_answer(&self, within: Duration) -> Option<bool> {
        let a = self.shared.answer.lock().unwrap();
        let (a, _) = self.shared.answered.wait_timeout_while(a, within, |a| a.is_none()).unwrap();
        *a
    }

    /// Ends the subscription (the thread leaves within about a second).
    pub fn stop(&self) {
        self.shared.stop.set();
        if let Some(t) = &*self.shared.link.lock().unwrap() {
            t.shutdown();
        }
        self.shared.outbox.lock().unwrap().take();
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a connection ended.
enum Ended {
    Stopped,
    Lost(String),
}

/// Doubling waits between attempts, 0.25 s up to 5 s.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// Logs a repeated complaint at warn the first time and every 12th time
/// after (about once a minute at the longest backoff), at debug otherwise.
#[derive(Default)]
struct Complaints {
    last: String,
    repeats: u64,
}

impl Complaints {
    fn say(&mut self, what: String) {
        if what == self.last {
            self.repeats += 1;
        } else {
            (self.last, self.repeats) = (what, 0);
        }
        if self.repeats.is_multiple_of(12) {
            let again = if self.repeats > 0 { format!(" ({} times)", self.repeats + 1) } else { String::new() };
            warn!("{}{again}", self.last);
        } else {
            debug!("{}", self.last);
        }
    }

    fn clear(&mut self) {
        self.last.clear();
    }
}

fn run(cfg: &ScanoutConfig, hub: &Hub, shared: &Shared) {
    let mut backoff = Backoff(BACKOFF_MIN);
    let mut complaints = Complaints::default();
    let mut forward = Forwarder::new(cfg.width, cfg.height);
    info!("scanout {}: subscribing at the host {}", cfg.scanout_id, cfg.host);
    loop {
        let ended = connection(cfg, hub, shared, &mut forward, &mut backoff, &mut complaints);
        shared.outbox.lock().unwrap().take();
        if let Some(t) = shared.link.lock().unwrap().take() {
            t.shutdown();
        }
        match ended {
            Ended::Stopped => break,
            Ended::Lost(why) => {
                let wait = backoff.next();
                complaints.say(format!("scanout {}: {why}; trying again in {wait:?}", cfg.scanout_id));
                if shared.stop.sleep(wait) {
                    break;
                }
            }
        }
    }
    debug!("scanout {}: subscription stopped", cfg.scanout_id);
}

/// The reading half of a connection.
struct Reader {
    t: Transport,
    dec: FrameDecoder,
    buf: BytesMut,
}

/// What one read gave.
enum Read {
    Packet(Packet),
    /// Nothing within [`POLL`].
    Quiet,
}

impl Reader {
    fn read(&mut self) -> Result<Read, String> {
        loop {
            match hxfr_proto::io::read_packet(&mut self.t, &mut self.dec, &mut self.buf) {
                Ok(p) => return Ok(Read::Packet(p)),
                Err(e) if e.is_timeout() => return Ok(Read::Quiet),
                Err(e) if e.is_fatal() => return Err(format!("the connection broke: {e}")),
                // A malformed message, skipped by its size: the stream goes on.
                Err(e) => debug!("skipped a malformed message from the host: {e}"),
            }
        }
    }

    /// Waits up to `within` for the first message `pick` takes, skipping others.
    fn answer<T>(
        &mut self,
        stop: &Stop,
        within: Duration,
        mut pick: impl FnMut(Packet) -> Option<T>,
    ) -> Result<Option<T>, Ended> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if stop.is_set() {
                return Err(Ended::Stopped);
            }
            match self.read().map_err(Ended::Lost)? {
                Read::Packet(p) => {
                    let name = p.message.name();
                    match pick(p) {
                        Some(t) => return Ok(Some(t)),
                        None => debug!("waiting for an answer: skipped {name}"),
                    }
                }
                Read::Quiet => {}
            }
        }
        Ok(None)
    }
}

fn send(t: &mut Transport, scratch: &mut BytesMut, session: u32, m: Message) -> Result<(), Ended> {
    let name = m.name();
    hxfr_proto::io::write_packet(t, &Packet::new(session as u16, m), scratch)
        .map_err(|e| Ended::Lost(format!("sending {name}: {e}")))
}

/// One connection: handshake, then forward until it ends.
fn connection(
    cfg: &ScanoutConfig,
    hub: &Hub,
    shared: &Shared,
    forward: &mut Forwarder,
    backoff: &mut Backoff,
    complaints: &mut Complaints,
) -> Ended {
    let id = cfg.scanout_id;
    let host = &cfg.host;
    if shared.stop.is_set() {
        return Ended::Stopped;
    }
    let mut tx = match Transport::connect(host, CONNECT_TIMEOUT) {
        Ok(t) => t,
        Err(e) => return Ended::Lost(format!("the host is unreachable: {e}")),
    };
    let setup = (|| -> std::io::Result<Reader> {
        tx.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let mut rx = tx.try_clone()?;
        rx.set_read_timeout(Some(POLL))?;
        let dec = FrameDecoder::new(MAX_PAYLOAD).resynchronising(tx.needs_resync());
        *shared.link.lock().unwrap() = Some(tx.try_clone()?);
        Ok(Reader { t: rx, dec, buf: BytesMut::new() })
    })();
    let mut rx = match setup {
        Ok(r) => r,
        Err(e) => return Ended::Lost(format!("setting up the connection to {host}: {e}")),
    };
    if shared.stop.is_set() {
        return Ended::Stopped;
    }
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    let mut scratch = BytesMut::with_capacity(128);
    if let Err(e) = handshake(cfg, shared, &mut tx, &mut rx, &mut scratch, backoff, complaints) {
        return e;
    }
    backoff.reset();
    complaints.clear();
    shared.counters.subscribed.fetch_add(1, Ordering::Relaxed);
    info!("scanout {id}: subscribed at {host}; the host pushes a frame for each flip");

    // From here on only the writer thread writes: queued keyframe requests,
    // and a PING whenever nothing else went for PING_EVERY.
    let (out, queue) = std::sync::mpsc::sync_channel::<Message>(OUTBOX);
    *shared.outbox.lock().unwrap() = Some(out);
    let writer = std::thread::Builder::new().name(format!("scanout-{id}-tx")).spawn(move || {
        loop {
            let m = match queue.recv_timeout(PING_EVERY) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => Message::Ping,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if let Err(Ended::Lost(why)) = send(&mut tx, &mut scratch, id, m) {
                debug!("scanout {id}: {why}");
                tx.shutdown(); // the reader notices
                break;
            }
        }
    });
    if let Err(e) = writer {
        return Ended::Lost(format!("cannot start the writer thread: {e}"));
    }

    let mut heard = Instant::now();
    loop {
        if shared.stop.is_set() {
            return Ended::Stopped;
        }
        match rx.read() {
            Err(why) => return Ended::Lost(why),
            Ok(Read::Quiet) => {
                if heard.elapsed() >= DEAD_AFTER {
                    return Ended::Lost(format!("nothing from the host for {DEAD_AFTER:?} (not even a PONG)"));
                }
            }
            Ok(Read::Packet(p)) => {
                heard = Instant::now();
                match p.message {
                    Message::FrameResponse(r) if p.session_id == id as u16 => {
                        let key = forward.au(hub, &r);
                        shared.counters.frames.fetch_add(1, Ordering::Relaxed);
                        shared.counters.keyframes.fetch_add(key as u64, Ordering::Relaxed);
                    }
                    Message::Pong => {}
                    Message::Error { code, message } => warn!("scanout {id}: the host says: {message} ({code})"),
                    other => debug!("scanout {id}: ignored {} (session {})", other.name(), p.session_id),
                }
            }
        }
    }
}

/// ENABLE_SCANOUT when asked, SUBSCRIBE until accepted, then CONFIG_REQ.
fn handshake(
    cfg: &ScanoutConfig,
    shared: &Shared,
    tx: &mut Transport,
    rx: &mut Reader,
    scratch: &mut BytesMut,
    backoff: &mut Backoff,
    complaints: &mut Complaints,
) -> Result<(), Ended> {
    let id = cfg.scanout_id;
    let host = &cfg.host;
    if let Some((width, height)) = cfg.enable {
        send(tx, scratch, id, Message::EnableScanout { scanout_id: id, width, height })?;
        let answer = rx.answer(&shared.stop, ANSWER_TIMEOUT, |p| match p.message {
            Message::ScanoutResp { scanout_id, success, connector } if scanout_id == id => Some((success, connector)),
            _ => None,
        })?;
        let c = &shared.counters;
        match answer {
            Some((true, connector)) => {
                c.enabled.fetch_add(1, Ordering::Relaxed);
                info!("scanout {id}: enabled at {width}x{height} as {connector:?}")
            }
            Some((false, _)) => {
                c.enable_failed.fetch_add(1, Ordering::Relaxed);
                warn!("scanout {id}: the host did not enable it at {width}x{height} (success=0); subscribing anyway")
            }
            None => {
                c.enable_failed.fetch_add(1, Ordering::Relaxed);
                warn!("scanout {id}: no SCANOUT_RESP within {ANSWER_TIMEOUT:?}; subscribing anyway")
            }
        }
    }
    loop {
        send(tx, scratch, id, Message::Subscribe { scanout_id: id })?;
        let answer = rx.answer(&shared.stop, ANSWER_TIMEOUT, |p| match p.message {
            Message::SubscribeResp { scanout_id, success } if scanout_id == id => Some(success),
            _ => None,
        })?;
        if let Some(success) = answer {
            shared.answered(success);
        }
        match answer {
            Some(true) => break,
            Some(false) => {
                shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                let wait = backoff.next();
                complaints.say(format!(
                    "scanout {id}: the host at {host} refused the subscription (success=0: no such scanout on this \
                     VM's GPU yet, or the host is not the VM's GPU); asking again in {wait:?}"
                ));
                if shared.stop.sleep(wait) {
                    return Err(Ended::Stopped);
                }
            }
            None => return Err(Ended::Lost(format!("no SUBSCRIBE_RESP within {ANSWER_TIMEOUT:?}"))),
        }
    }
    let config = ConfigReq {
        width: cfg.width,
        height: cfg.height,
        bitrate: cfg.bitrate,
        fps_num: cfg.fps,
        fps_den: 1,
        // Constrained baseline is what every viewer decodes (Helix's client included).
        profile: 66,
        level_x10: 0,
        realtime: true,
    };
    send(tx, scratch, id, Message::ConfigReq(config))
}

/// Turns pushed access units into the hub's units, as the pipeline's appsink does.
struct Forwarder {
    codec: Option<String>,
    width: u32,
    height: u32,
    /// Units dropped before the first SPS (nothing could decode them).
    early: u64,
}

impl Forwarder {
    fn new(width: u32, height: u32) -> Forwarder {
        Forwarder { codec: None, width, height, early: 0 }
    }

    /// Publishes one access unit; returns whether it is a keyframe.
    fn au(&mut self, hub: &Hub, r: &FrameResponse) -> bool {
        let au = r.to_annex_b();
        let nals = wire::nal_units(&au);
        let keyframe = r.is_keyframe || nals.iter().any(|n| !n.is_empty() && n[0] & 0x1f == 5);
        if keyframe {
            if let Some(c) = wire::codec_string(&au) {
                self.codec = Some(c);
            }
            if let Some((w, h)) =
                nals.iter().find(|n| !n.is_empty() && n[0] & 0x1f == 7).and_then(|sps| dimensions(sps))
            {
                if (w, h) != (self.width, self.height) || hub.size().is_none() {
                    hub.set_size(w, h);
                }
                (self.width, self.height) = (w, h);
            }
        }
        let Some(codec) = self.codec.clone() else {
            self.early += 1;
            if self.early.is_power_of_two() {
                debug!("{} access units before the first SPS dropped", self.early);
            }
            return keyframe;
        };
        let header = Header {
            keyframe,
            width: self.width,
            height: self.height,
            // The host's CLOCK_MONOTONIC at the flip: not our clock, so the
            // capture time (for latency) is when the unit reached the bridge.
            pts_us: r.pts / 1000,
            capture_us: wire::unix_us(),
            codec,
        };
        hub.publish(Unit { keyframe, message: header.encode(&au) });
        keyframe
    }
}

/// The picture size an SPS (NAL without start code) gives.
fn dimensions(sps: &[u8]) -> Option<(u32, u32)> {
    let rbsp = decode_nal(sps).ok()?;
    SeqParameterSet::from_bits(BitReader::new(&rbsp[..])).ok()?.pixel_dimensions().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_seconds_and_resets() {
        let mut b = Backoff(BACKOFF_MIN);
        let waits: Vec<_> = (0..7).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 4000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next(), BACKOFF_MIN);
    }

    #[test]
    fn stop_wakes_a_sleeper() {
        let s = Arc::new(Stop::default());
        assert!(!s.sleep(Duration::from_millis(1)));
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.sleep(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(20));
        s.set();
        assert!(t.join().unwrap());
        assert!(s.is_set());
    }
}
