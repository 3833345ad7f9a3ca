//! The pipelined guest client: frames out, answers in, in order, over a
//! connection that is re-made when it dies.
//!
//! Whoever sends frames (the `vsockenc` element, the VM test program, the
//! benchmark) uses this one type. The caller's thread sends; a reader thread
//! takes answers off the connection and hands each, with the request it
//! answers, to a [`Handler`] as a typed [`Event`] the moment it arrives.
//! Answers are matched to requests strictly in order; messages that answer
//! no frame (CONFIG_RESP, PONG, …) never shift that matching.
//!
//! Nothing blocks past the configured timeouts: connecting is bounded by
//! `connect_timeout`, every write by `reply_timeout` (a host that stops
//! reading is as dead as one that stops answering), and waits for room in
//! the window by the caller's timeout.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hxfr_proto::{DecodeError, FrameResponse, HelloResp, Message, Packet};

use crate::{Connection, GuestError, HostAddr, Receiver, Sender};

/// How to reach the host and what to expect of it.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: HostAddr,
    /// The stream's id on the connection; answers for other ids are not ours.
    pub session_id: u16,
    pub connect_timeout: Duration,
    /// No answer, or no progress writing, for this long: the host is gone.
    pub reply_timeout: Duration,
    /// Frames sent and not yet answered (the host's HELLO_RESP may lower it).
    pub max_in_flight: usize,
    /// Open every conversation with HELLO; `None` speaks Helix's messages only.
    pub hello: Option<HelloConfig>,
    /// Reconnect attempts start this far apart and double up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Config {
    pub fn new(addr: HostAddr) -> Config {
        Config {
            addr,
            session_id: 1,
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(5),
            max_in_flight: 2,
            hello: Some(HelloConfig { features: 0, timeout: Duration::from_secs(1) }),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct HelloConfig {
    /// Extensions we would use (`hxfr_proto::features`).
    pub features: u32,
    /// A host that has never answered HELLO and does not within this is
    /// taken for one that predates it (Helix's QEMU).
    pub timeout: Duration,
}

/// A request sent and not yet answered, with the caller's `tag` for it.
#[derive(Debug, Clone)]
pub struct Pending<T> {
    pub tag: T,
    /// The pts the request carried, which the host's answer echoes.
    pub pts: Option<i64>,
    pub sent: Instant,
    /// Shared-memory area the frame occupies until answered.
    pub area: Option<usize>,
    /// Flushed by the caller: the answer is still read (to keep the order).
    pub flushed: bool,
}

/// What the host answered to one frame.
#[derive(Debug)]
pub enum Answer {
    Frame(FrameResponse),
    Error { code: i32, message: String },
}

/// Why frames will never be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// The connection died (closed, failed, timed out): the reason.
    Disconnected(String),
    /// The host answered a later frame: these were dropped on its side (a
    /// host restarted behind a virtio-serial port closes nothing on ours).
    Skipped,
    /// We closed the connection ourselves.
    Closed,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Disconnected(why) => f.write_str(why),
            Lost::Skipped => f.write_str("the host answered a later frame (restarted?)"),
            Lost::Closed => f.write_str("closed"),
        }
    }
}

/// What the reader thread reports.
#[derive(Debug)]
pub enum Event<T> {
    /// An answer and the request it answers.
    Answered { pending: Pending<T>, answer: Answer },
    /// Requests that will never be answered. A dead connection reports
    /// `Disconnected` exactly once (possibly with no requests).
    Lost { pending: Vec<Pending<T>>, why: Lost },
    /// A message that answers no frame: CONFIG_RESP, PONG, another session's.
    Message(Packet),
    /// A malformed message that kept the framing: it answers nothing.
    Unreadable(DecodeError),
    /// An answer with no request waiting for it.
    Unexpected(Answer),
}

/// Where events go. Called on the reader thread, never with a client lock held.
pub trait Handler<T>: Send + Sync + 'static {
    fn handle(&self, event: Event<T>);
}

/// A channel is a handler: the events arrive on the receiving end in order.
impl<T: Send + 'static> Handler<T> for std::sync::mpsc::Sender<Event<T>> {
    fn handle(&self, event: Event<T>) {
        let _ = self.send(event);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitError {
    /// No room within the timeout.
    Timeout,
    /// The connection is dead (or there is none): why.
    Dead(String),
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitError::Timeout => f.write_str("timed out"),
            WaitError::Dead(why) => f.write_str(why),
        }
    }
}

/// The client is up, or has just come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Up,
    /// A new connection replaced a dead one: configuration must be sent
    /// again and the stream should restart at a keyframe.
    Reconnected,
}

struct Queue<T> {
    /// Sent, answer not yet read, oldest first.
    pending: VecDeque<Pending<T>>,
    /// Sent and not yet handed to the handler (pending + the one in hand).
    outstanding: usize,
    free_areas: Vec<usize>,
    dead: Option<String>,
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    changed: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Queue<T>> {
        // A handler that panicked cannot leave the queue half-updated: every
        // update is a few plain assignments. Keep serving.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_below(&self, max: usize, timeout: Duration) -> Result<(), WaitError> {
        let deadline = Instant::now() + timeout;
        let mut q = self.lock();
        loop {
            // A dead connection: once the reader has handed over what is
            // lost (so nobody overtakes those frames), or at the timeout.
            if let Some(why) = &q.dead
                && q.outstanding == 0
            {
                return Err(WaitError::Dead(why.clone()));
            }
            if q.dead.is_none() && q.outstanding < max {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(q.dead.clone().map_or(WaitError::Timeout, WaitError::Dead));
            }
            q = self.changed.wait_timeout(q, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn mark_dead(&self, why: &str) {
        let mut q = self.lock();
        if q.dead.is_none() {
            q.dead = Some(why.to_string());
        }
        self.changed.notify_all();
    }

    /// `n` frames have left (answered or given up): counted down only now,
    /// so a caller draining at end of stream never overtakes them; their
    /// shared-memory areas are free again.
    fn settle(&self, n: usize, areas: impl IntoIterator<Item = usize>) {
        let mut q = self.lock();
        q.outstanding = q.outstanding.saturating_sub(n);
        q.free_areas.extend(areas);
        self.changed.notify_all();
    }
}

/// A handle for waiting on the window without borrowing the client (so a
/// caller can let go of its own locks while it waits).
pub struct Waiter<T>(Arc<Shared<T>>);

impl<T> Waiter<T> {
    /// Waits until fewer than `max` frames are outstanding.
    pub fn wait_below(&self, max: usize, timeout: Duration) -> Result<(), WaitError> {
        self.0.wait_below(max, timeout)
    }
}

/// One live connection and its reader thread.
struct Conn<T> {
    tx: Sender,
    shared: Arc<Shared<T>>,
    _reader: JoinHandle<()>,
}

impl<T> Conn<T> {
    fn kill(&self, why: &str) {
        self.shared.mark_dead(why);
        self.tx.transport().shutdown();
    }
}

impl<T> Drop for Conn<T> {
    fn drop(&mut self) {
        // Not joined: the reader may be inside the handler, waiting on the
        // caller's locks. With the socket shut it ends by itself.
        self.kill("closed");
    }
}

pub struct Client<T: Send + 'static> {
    cfg: Config,
    handler: Arc<dyn Handler<T>>,
    conn: Option<Conn<T>>,
    hello: Option<HelloResp>,
    /// The host has answered HELLO once: it is never again taken for a
    /// legacy host, however slow it is to answer after a stall.
    spoke_hello: bool,
    areas: usize,
    next_attempt: Instant,
    backoff: Duration,
    reconnects: u64,
}

impl<T: Send + 'static> Client<T> {
    /// Connects (and says HELLO when configured). Fails, naming the address,
    /// when the host is not there.
    pub fn connect(cfg: Config, handler: Arc<dyn Handler<T>>) -> Result<Client<T>, GuestError> {
        let mut c = Client {
            backoff: cfg.backoff_min,
            cfg,
            handler,
            conn: None,
            hello: None,
            spoke_hello: false,
            areas: 0,
            next_attempt: Instant::now(),
            reconnects: 0,
        };
        c.open()?;
        Ok(c)
    }

    fn open(&mut self) -> Result<(), GuestError> {
        let mut conn = Connection::connect(&self.cfg.addr, self.cfg.connect_timeout)?;
        let hello = match self.cfg.hello {
            None => None,
            Some(h) => match conn.hello(h.features, h.timeout) {
                Ok(r) => Some(r),
                // Never answered: a host from before HELLO. Once answered, a
                // silent host is a slow one, and this attempt failed.
                Err(GuestError::HelloTimeout(_)) if !self.spoke_hello => None,
                Err(e) => return Err(e),
            },
        };
        self.spoke_hello |= hello.is_some();
        self.hello = hello;
        let (mut tx, rx) = conn.split();
        // A host that stops reading must not hold the sender for ever.
        tx.t.set_write_timeout(Some(self.cfg.reply_timeout))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                pending: VecDeque::new(),
                outstanding: 0,
                free_areas: (0..self.areas).rev().collect(),
                dead: None,
            }),
            changed: Condvar::new(),
        });
        let reader = {
            let (shared, handler, session) = (shared.clone(), self.handler.clone(), self.cfg.session_id);
            std::thread::Builder::new()
                .name("hxfr-guest-rx".into())
                .spawn(move || read_loop(rx, &shared, &*handler, session))?
        };
        self.conn = Some(Conn { tx, shared, _reader: reader });
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The host's HELLO_RESP on the current connection; `None` for a host
    /// that does not speak our extensions.
    pub fn hello(&self) -> Option<&HelloResp> {
        self.hello.as_ref()
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Why the connection is dead, if it is (or there is none).
    pub fn dead(&self) -> Option<String> {
        match &self.conn {
            Some(c) => c.shared.lock().dead.clone(),
            None => Some("not connected".into()),
        }
    }

    /// A live connection: the current one, or a new one when it died and the
    /// backoff allows another attempt. `Err` while the host is unreachable.
    pub fn ensure(&mut self) -> Result<Link, GuestError> {
        if self.conn.as_ref().is_some_and(|c| c.shared.lock().dead.is_none()) {
            return Ok(Link::Up);
        }
        if self.conn.take().is_some() {
            // First look at a dead connection: try again at once.
            self.backoff = self.cfg.backoff_min;
            self.next_attempt = Instant::now();
        }
        if Instant::now() < self.next_attempt {
            return Err(GuestError::Backoff(self.next_attempt - Instant::now()));
        }
        match self.open() {
            Ok(()) => {
                self.reconnects += 1;
                self.backoff = self.cfg.backoff_min;
                Ok(Link::Reconnected)
            }
            Err(e) => {
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
                Err(e)
            }
        }
    }

    /// Frames that may be outstanding: ours, the host's and the areas' limit.
    pub fn window(&self) -> usize {
        let mut n = self.cfg.max_in_flight.max(1);
        if let Some(h) = &self.hello {
            n = n.min(h.max_in_flight.max(1) as usize);
        }
        if self.areas > 0 {
            n = n.min(self.areas);
        }
        n
    }

    /// Shared-memory areas frames may use, all free (kept across reconnects).
    pub fn set_areas(&mut self, n: usize) {
        self.areas = n;
        if let Some(c) = &self.conn {
            c.shared.lock().free_areas = (0..n).rev().collect();
        }
    }

    pub fn take_area(&self) -> Option<usize> {
        self.conn.as_ref()?.shared.lock().free_areas.pop()
    }

    pub fn outstanding(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.shared.lock().outstanding)
    }

    /// Sends a frame request, `tag` being what the caller wants back with its
    /// answer. The request is queued before it is written, so the answer
    /// always finds it; a failed write kills the connection and the reader
    /// reports the request lost.
    pub fn send(&mut self, tag: T, area: Option<usize>, packet: &Packet) -> Result<(), WaitError> {
        let conn = self.conn.as_ref().ok_or_else(|| WaitError::Dead("not connected".into()))?;
        {
            let mut q = conn.shared.lock();
            if let Some(why) = &q.dead {
                return Err(WaitError::Dead(why.clone()));
            }
            let pts = match &packet.message {
                Message::FrameRequest(r) => Some(r.pts),
                Message::ShmFrameRequest(r) => Some(r.pts),
                _ => None,
            };
            q.pending.push_back(Pending { tag, pts, sent: Instant::now(), area, flushed: false });
            q.outstanding += 1;
        }
        self.send_control(packet)
    }

    /// Sends a message that expects no answer in the frame order
    /// (KEYFRAME_REQ, CONFIG_REQ, PING); a failed write kills the connection.
    pub fn send_control(&mut self, packet: &Packet) -> Result<(), WaitError> {
        let conn = self.conn.as_mut().ok_or_else(|| WaitError::Dead("not connected".into()))?;
        conn.tx.send(packet).map_err(|e| {
            let why = if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                format!("the host at {} stopped reading for {} ms", self.cfg.addr, self.cfg.reply_timeout.as_millis())
            } else {
                format!("sending to {}: {e}", self.cfg.addr)
            };
            conn.kill(&why);
            WaitError::Dead(why)
        })
    }

    /// Writes bytes as they are, framing or not: for tests that cut a
    /// message short, as a guest that crashes mid-send does.
    pub fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self.conn.as_mut() {
            Some(c) => c.tx.write_raw(bytes),
            None => Err(std::io::Error::new(std::io::ErrorKind::NotConnected, "not connected")),
        }
    }

    /// A handle to wait on the window with (see [`Waiter`]).
    pub fn waiter(&self) -> Option<Waiter<T>> {
        self.conn.as_ref().map(|c| Waiter(c.shared.clone()))
    }

    /// Waits until fewer than `max` frames are outstanding.
    pub fn wait_below(&self, max: usize, timeout: Duration) -> Result<(), WaitError> {
        match &self.conn {
            Some(c) => c.shared.wait_below(max, timeout),
            None => Err(WaitError::Dead("not connected".into())),
        }
    }

    /// Kills the connection when its oldest request is older than the reply
    /// timeout; says whether it did.
    pub fn expire(&self) -> bool {
        let Some(c) = &self.conn else { return false };
        let overdue = c.shared.lock().pending.front().is_some_and(|p| p.sent.elapsed() > self.cfg.reply_timeout);
        if overdue {
            c.kill(&format!("no answer within {} ms", self.cfg.reply_timeout.as_millis()));
        }
        overdue
    }

    /// Marks every outstanding request as flushed: their answers are read
    /// and handed over with `flushed` set.
    pub fn flush(&self) {
        if let Some(c) = &self.conn {
            for p in &mut c.shared.lock().pending {
                p.flushed = true;
            }
        }
    }

    /// Declares the connection dead and wakes every waiter; the reader then
    /// reports what is lost.
    pub fn kill(&self, why: &str) {
        if let Some(c) = &self.conn {
            c.kill(why);
        }
    }
}

fn read_loop<T: Send + 'static>(mut rx: Receiver, shared: &Shared<T>, handler: &dyn Handler<T>, session: u16) {
    let why = loop {
        let packet = match rx.recv() {
            Ok(p) => p,
            Err(e) if !e.is_fatal() => {
                handler.handle(Event::Unreadable(e));
                continue;
            }
            Err(DecodeError::Io { message, .. }) => break format!("connection to host lost: {message}"),
            Err(e) => break format!("host sent a broken stream: {e}"),
        };
        let answer = match packet.message {
            Message::FrameResponse(r) if packet.session_id == session => Answer::Frame(r),
            Message::Error { code, message } if packet.session_id == session => Answer::Error { code, message },
            _ => {
                handler.handle(Event::Message(packet));
                continue;
            }
        };
        let (skipped, pending) = {
            let mut q = shared.lock();
            // An answer for a later frame means the ones before it are lost.
            // No match at all: match in order, as hosts that do not echo pts need.
            let skip = match &answer {
                Answer::Frame(r) => q.pending.iter().position(|p| p.pts == Some(r.pts)).unwrap_or(0),
                Answer::Error { .. } => 0,
            };
            (q.pending.drain(..skip).collect::<Vec<_>>(), q.pending.pop_front())
        };
        if !skipped.is_empty() {
            let areas: Vec<usize> = skipped.iter().filter_map(|p| p.area).collect();
            let n = skipped.len();
            handler.handle(Event::Lost { pending: skipped, why: Lost::Skipped });
            shared.settle(n, areas);
        }
        match pending {
            Some(p) => {
                let area = p.area;
                handler.handle(Event::Answered { pending: p, answer });
                shared.settle(1, area);
            }
            None => handler.handle(Event::Unexpected(answer)),
        }
    };
    let (lost, why) = {
        let mut q = shared.lock();
        let why = q.dead.get_or_insert(why).clone();
        shared.changed.notify_all();
        (q.pending.drain(..).collect::<Vec<_>>(), why)
    };
    let areas: Vec<usize> = lost.iter().filter_map(|p| p.area).collect();
    let why = if why == "closed" { Lost::Closed } else { Lost::Disconnected(why) };
    handler.handle(Event::Lost { pending: lost, why });
    // Counted down only now, as answered frames are: waiters see the loss
    // reported before they go on.
    let mut q = shared.lock();
    q.outstanding = 0;
    q.free_areas.extend(areas);
    shared.changed.notify_all();
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;

    use bytes::Bytes;
    use hxfr_proto::{ConfigResp, FrameRequest, HelloResp, PROTOCOL_VERSION, PixelFormat};

    use super::*;
    use crate::Transport;

    /// A host scripted by the test, on a UNIX socket.
    struct Script {
        _dir: tempfile::TempDir,
        listener: UnixListener,
        addr: HostAddr,
    }

    impl Script {
        fn new() -> Script {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("host.sock");
            let listener = UnixListener::bind(&path).unwrap();
            Script { _dir: dir, listener, addr: HostAddr::Unix(path) }
        }

        /// Accepts one guest; answers HELLO when `hello` (and returns the rest).
        fn accept(&self, hello: bool) -> Connection {
            let (s, _) = self.listener.accept().unwrap();
            let mut c = Connection::from_transport(Transport::Unix(s)).unwrap();
            if hello {
                match c.recv().unwrap() {
                    Packet { message: Message::Hello(h), session_id } => c
                        .send(&Packet::new(
                            session_id,
                            Message::HelloResp(HelloResp {
                                nonce: h.nonce,
                                version: PROTOCOL_VERSION,
                                features: 0,
                                shm_size: 0,
                                max_in_flight: 4,
                            }),
                        ))
                        .unwrap(),
                    other => panic!("expected HELLO, got {other:?}"),
                }
            }
            c
        }
    }

    fn config(addr: &HostAddr) -> Config {
        Config {
            reply_timeout: Duration::from_millis(500),
            hello: Some(HelloConfig { features: 0, timeout: Duration::from_millis(300) }),
            backoff_min: Duration::from_millis(1),
            ..Config::new(addr.clone())
        }
    }

    fn frame(pts: i64) -> Packet {
        let px = Bytes::from(vec![0u8; 16 * 4 * 2]);
        Packet::new(1, Message::FrameRequest(FrameRequest::inline(PixelFormat::Bgrx, 16, 2, 64, px).timed(pts, 1)))
    }

    fn answer(session: u16, pts: i64) -> Packet {
        Packet::new(
            session,
            Message::FrameResponse(FrameResponse {
                pts,
                dts: pts,
                is_keyframe: false,
                nals: vec![Bytes::from_static(&[0, 0, 0, 1, 9])],
            }),
        )
    }

    fn next<T>(rx: &mpsc::Receiver<Event<T>>) -> Event<T> {
        rx.recv_timeout(Duration::from_secs(5)).expect("an event within 5 s")
    }

    fn client(s: &Script) -> (Client<u32>, mpsc::Receiver<Event<u32>>, Connection) {
        let (tx, rx) = mpsc::channel();
        let addr = s.addr.clone();
        let t = std::thread::spawn(move || Client::connect(config(&addr), Arc::new(tx)).unwrap());
        let host = s.accept(true);
        (t.join().unwrap(), rx, host)
    }

    #[test]
    fn answers_come_back_in_order_and_asides_do_not_shift_them() {
        let s = Script::new();
        let (mut c, rx, mut host) = client(&s);
        assert_eq!(c.hello().map(|h| h.max_in_flight), Some(4));
        assert_eq!(c.window(), 2);
        for i in 0..2 {
            c.send(i, None, &frame(i as i64)).unwrap();
        }
        assert_eq!(c.outstanding(), 2);
        assert_eq!(c.wait_below(2, Duration::from_millis(50)), Err(WaitError::Timeout));
        for _ in 0..2 {
            assert!(matches!(host.recv().unwrap().message, Message::FrameRequest(_)));
        }
        let aside = ConfigResp { status: 0, width: 1, height: 1, profile: 66, level_x10: 31, encoder: "x".into() };
        host.send(&Packet::new(1, Message::ConfigResp(aside))).unwrap();
        host.send(&Packet::new(7, Message::Pong)).unwrap();
        host.send(&answer(1, 0)).unwrap();
        host.send(&answer(1, 1)).unwrap();
        assert!(matches!(next(&rx), Event::Message(Packet { message: Message::ConfigResp(_), .. })));
        assert!(matches!(next(&rx), Event::Message(Packet { session_id: 7, .. })));
        for want in 0..2 {
            match next(&rx) {
                Event::Answered { pending, answer: Answer::Frame(r) } => {
                    assert_eq!((pending.tag, r.pts), (want, want as i64));
                }
                other => panic!("{other:?}"),
            }
        }
        c.wait_below(1, Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn an_answer_for_a_later_frame_gives_up_the_earlier_ones() {
        let s = Script::new();
        let (mut c, rx, mut host) = client(&s);
        for i in 0..3 {
            c.send(i, None, &frame(i as i64)).unwrap();
        }
        host.send(&answer(1, 2)).unwrap();
        match next(&rx) {
            Event::Lost { pending, why: Lost::Skipped } => {
                assert_eq!(pending.iter().map(|p| p.tag).collect::<Vec<_>>(), [0, 1]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(next(&rx), Event::Answered { pending: Pending { tag: 2, .. }, .. }));
        host.send(&answer(1, 99)).unwrap();
        assert!(matches!(next(&rx), Event::Unexpected(Answer::Frame(_))));
        assert_eq!(c.outstanding(), 0);
    }

    #[test]
    fn a_dead_host_loses_what_is_in_flight_and_the_client_comes_back() {
        let s = Script::new();
        let (mut c, rx, host) = client(&s);
        c.send(5, None, &frame(5)).unwrap();
        drop(host);
        match next(&rx) {
            Event::Lost { pending, why: Lost::Disconnected(_) } => assert_eq!(pending[0].tag, 5),
            other => panic!("{other:?}"),
        }
        assert!(c.dead().is_some());
        let addr = s.addr.clone();
        let back = std::thread::spawn(move || {
            let _ = addr;
            s.accept(true)
        });
        assert_eq!(c.ensure().unwrap(), Link::Reconnected);
        assert_eq!(c.reconnects(), 1);
        let _host = back.join().unwrap();
        assert_eq!(c.ensure().unwrap(), Link::Up);
    }

    #[test]
    fn a_host_that_stops_reading_does_not_hold_the_sender() {
        let s = Script::new();
        let (mut c, rx, _host) = client(&s);
        // A 4K frame: more than the socket's send buffer (we ask for 4 MiB,
        // the kernel holds at most twice that) can take.
        let big = Packet::new(
            1,
            Message::FrameRequest(
                FrameRequest::inline(PixelFormat::Bgrx, 3840, 2160, 15360, Bytes::from(vec![0u8; 3840 * 2160 * 4]))
                    .timed(0, 1),
            ),
        );
        let start = Instant::now();
        let r = c.send(0, None, &big);
        assert!(matches!(&r, Err(WaitError::Dead(why)) if why.contains("stopped reading")), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
        assert!(matches!(next(&rx), Event::Lost { why: Lost::Disconnected(_), .. }));
    }

    #[test]
    fn a_host_that_answered_hello_once_is_never_taken_for_a_legacy_one() {
        let s = Script::new();
        let (mut c, rx, host) = client(&s);
        drop(host);
        assert!(matches!(next(&rx), Event::Lost { .. }));
        // The host is back but too busy to answer HELLO in time.
        let t = std::thread::spawn(move || {
            let (quiet, _) = s.listener.accept().unwrap();
            (s, quiet)
        });
        let e = c.ensure().unwrap_err();
        assert!(matches!(e, GuestError::HelloTimeout(_)), "{e}");
        let (s, _quiet) = t.join().unwrap();
        // Backing off: no new attempt before its time.
        assert!(matches!(c.ensure(), Err(GuestError::Backoff(_))));
        let t = std::thread::spawn(move || s.accept(true));
        let deadline = Instant::now() + Duration::from_secs(5);
        let up = loop {
            match c.ensure() {
                Ok(l) => break l,
                Err(GuestError::Backoff(d)) if Instant::now() < deadline => std::thread::sleep(d),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(up, Link::Reconnected);
        assert!(c.hello().is_some());
        let _ = t.join().unwrap();
    }

    #[test]
    fn a_host_that_never_answers_hello_is_spoken_to_in_helix_messages() {
        let s = Script::new();
        let (tx, _rx) = mpsc::channel::<Event<u32>>();
        let addr = s.addr.clone();
        let t = std::thread::spawn(move || Client::connect(config(&addr), Arc::new(tx)).unwrap());
        let _host = s.accept(false);
        let c = t.join().unwrap();
        assert!(c.hello().is_none());
    }
}
