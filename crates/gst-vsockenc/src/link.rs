//! The element's connection to the host: frames out, answers in, in order.
//!
//! GStreamer-free so it can be reasoned about (and tested) on its own. The
//! streaming thread sends; a reader thread takes answers off the socket and
//! hands each, with the request it answers, to an [`AnswerSink`] at once, so
//! an encoded frame leaves the element as soon as the host has it. Answers
//! are matched to requests strictly in order; messages that are not answers
//! to frames (CONFIG_RESP, PONG, …) never shift that matching.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hxfr_guest::{Connection, GuestError, HostAddr, Receiver, Sender};
use hxfr_proto::{DecodeError, FrameResponse, HelloResp, Message, Packet};

/// A request sent and not yet answered.
#[derive(Debug, Clone)]
pub struct Pending {
    /// GstVideoCodecFrame system_frame_number.
    pub frame: u32,
    /// The pts the request carried, which the host's answer echoes.
    pub pts: Option<i64>,
    pub sent: Instant,
    /// Shared-memory area the frame occupies until answered.
    pub area: Option<usize>,
    /// Flushed: the answer is read (to keep the order) and thrown away.
    pub discard: bool,
}

#[derive(Debug)]
pub enum Answer {
    Frame(FrameResponse),
    Error { code: i32, message: String },
}

/// Where answers go. Called on the reader thread, never with a link lock held.
pub trait AnswerSink: Send + Sync + 'static {
    fn answer(&self, pending: Pending, answer: Answer);
    /// The connection died; these requests will never be answered.
    fn lost(&self, pending: Vec<Pending>, why: &str);
    /// A message that answers no frame (logged by the element).
    fn other(&self, packet: Packet);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitError {
    /// No answer within the reply timeout: the host is treated as gone.
    Timeout,
    Dead(String),
}

#[derive(Default)]
struct Queue {
    /// Sent, answer not yet read, oldest first.
    pending: VecDeque<Pending>,
    /// Sent and not yet handed to the sink (pending + the one being handed).
    outstanding: usize,
    free_areas: Vec<usize>,
    dead: Option<String>,
}

type Shared = Arc<(Mutex<Queue>, Condvar)>;

pub struct Link {
    tx: Sender,
    shared: Shared,
    reader: Option<JoinHandle<()>>,
    /// The host's HELLO_RESP; `None` for hosts that do not speak our
    /// extensions (Helix's): then only Helix's messages are sent.
    pub hello: Option<HelloResp>,
    pub addr: HostAddr,
    session_id: u16,
}

impl Link {
    /// Connects and, with `handshake`, opens with HELLO. A host that does not
    /// answer HELLO within `hello_timeout` is taken for one that predates it.
    pub fn connect(
        addr: &HostAddr,
        timeout: Duration,
        handshake: bool,
        hello_timeout: Duration,
        features: u32,
        session_id: u16,
    ) -> Result<(Link, Receiver), GuestError> {
        let mut conn = Connection::connect(addr, timeout)?;
        let hello = if handshake {
            match conn.hello(features, hello_timeout) {
                Ok(h) => Some(h),
                Err(GuestError::HelloTimeout(_)) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let (tx, rx) = conn.split();
        let link = Link {
            tx,
            shared: Arc::new((Mutex::new(Queue::default()), Condvar::new())),
            reader: None,
            hello,
            addr: addr.clone(),
            session_id,
        };
        Ok((link, rx))
    }

    /// Sets the shared-memory areas frames may use (all free).
    pub fn set_areas(&self, n: usize) {
        let mut q = self.shared.0.lock().unwrap();
        q.free_areas = (0..n).rev().collect();
    }

    /// Starts the reader thread on the receiving half `connect` returned.
    pub fn start(&mut self, rx: Receiver, sink: Arc<dyn AnswerSink>) {
        let shared = self.shared.clone();
        let session = self.session_id;
        self.reader = Some(
            std::thread::Builder::new()
                .name("vsockenc-reader".into())
                .spawn(move || read_loop(rx, shared, sink, session))
                .expect("spawning a thread"),
        );
    }

    /// Sends a request; `pending` is queued first so the answer always finds it.
    pub fn send(&mut self, pending: Pending, packet: &Packet) -> Result<(), WaitError> {
        {
            let mut q = self.shared.0.lock().unwrap();
            if let Some(why) = &q.dead {
                return Err(WaitError::Dead(why.clone()));
            }
            q.pending.push_back(pending);
            q.outstanding += 1;
        }
        self.send_control(packet)
    }

    /// Sends a message without queuing an expected answer (KEYFRAME_REQ,
    /// CONFIG_REQ); a failed write kills the link.
    pub fn send_control(&mut self, packet: &Packet) -> Result<(), WaitError> {
        self.tx.send(packet).map_err(|e| {
            let why = format!("sending to {}: {e}", self.addr);
            self.kill(&why);
            WaitError::Dead(why)
        })
    }

    pub fn dead(&self) -> Option<String> {
        self.shared.0.lock().unwrap().dead.clone()
    }

    pub fn outstanding(&self) -> usize {
        self.shared.0.lock().unwrap().outstanding
    }

    /// The oldest unanswered request's age.
    pub fn oldest_age(&self) -> Option<Duration> {
        self.shared.0.lock().unwrap().pending.front().map(|p| p.sent.elapsed())
    }

    pub fn take_area(&self) -> Option<usize> {
        self.shared.0.lock().unwrap().free_areas.pop()
    }

    /// Waits until fewer than `max` requests are outstanding.
    pub fn wait_below(&self, max: usize, timeout: Duration) -> Result<(), WaitError> {
        let (lock, cv) = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut q = lock.lock().unwrap();
        loop {
            if let Some(why) = &q.dead {
                return Err(WaitError::Dead(why.clone()));
            }
            if q.outstanding < max {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WaitError::Timeout);
            }
            q = cv.wait_timeout(q, left).unwrap().0;
        }
    }

    /// Marks every outstanding request as flushed.
    pub fn discard_all(&self) {
        let mut q = self.shared.0.lock().unwrap();
        for p in &mut q.pending {
            p.discard = true;
        }
    }

    /// Declares the connection dead and wakes everyone; the reader thread
    /// then reports what is lost.
    pub fn kill(&self, why: &str) {
        let (lock, cv) = &*self.shared;
        let mut q = lock.lock().unwrap();
        if q.dead.is_none() {
            q.dead = Some(why.to_string());
        }
        cv.notify_all();
        drop(q);
        self.tx.transport().shutdown();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Not joined: the reader may be waiting for the encoder's stream lock
        // (to drop lost frames) while the streaming thread drops this link.
        // With the socket shut it ends by itself.
        self.kill("closed");
        drop(self.reader.take());
    }
}

/// `n` frames have left (answered or given up): counted down only now, so
/// that finish(), which waits for this, never lets EOS overtake them; their
/// shared-memory areas are free again.
fn settle(shared: &Shared, n: usize, areas: impl IntoIterator<Item = usize>) {
    let (lock, cv) = &**shared;
    let mut q = lock.lock().unwrap();
    q.outstanding -= n;
    q.free_areas.extend(areas);
    cv.notify_all();
}

fn read_loop(mut rx: Receiver, shared: Shared, sink: Arc<dyn AnswerSink>, session: u16) {
    let (lock, cv) = &*shared;
    let why = loop {
        let packet = match rx.recv() {
            Ok(p) => p,
            Err(e) if !e.is_fatal() => {
                // A malformed message that kept framing: it answers nothing.
                sink.other(Packet::error(0, -1, format!("unreadable message from host: {e}")));
                continue;
            }
            Err(DecodeError::Io { message, .. }) => break format!("connection to host lost: {message}"),
            Err(e) => break format!("host sent a broken stream: {e}"),
        };
        let answer = match packet.message {
            Message::FrameResponse(r) if packet.session_id == session => Answer::Frame(r),
            Message::Error { code, message } if packet.session_id == session => Answer::Error { code, message },
            _ => {
                sink.other(packet);
                continue;
            }
        };
        let (skipped, pending) = {
            let mut q = lock.lock().unwrap();
            // An answer for a later frame means the ones before it are lost:
            // a host restarted behind a virtio-serial port drops what it held
            // and nothing closes on our side. Give those up rather than shift
            // every later picture by one. (No match at all: match in order,
            // as hosts that do not echo pts need.)
            let skip = match &answer {
                Answer::Frame(r) => q.pending.iter().position(|p| p.pts == Some(r.pts)).unwrap_or(0),
                Answer::Error { .. } => 0,
            };
            (q.pending.drain(..skip).collect::<Vec<_>>(), q.pending.pop_front())
        };
        if !skipped.is_empty() {
            let areas: Vec<usize> = skipped.iter().filter_map(|p| p.area).collect();
            let n = skipped.len();
            sink.lost(skipped, "the host answered a later frame (restarted?)");
            settle(&shared, n, areas);
        }
        match pending {
            Some(p) => {
                let area = p.area;
                sink.answer(p, answer);
                settle(&shared, 1, area);
            }
            None => sink.other(Packet::error(session, 0, "host answered a frame that was never sent; ignored")),
        }
    };
    let lost: Vec<Pending> = {
        let mut q = lock.lock().unwrap();
        if q.dead.is_none() {
            q.dead = Some(why.clone());
        }
        q.outstanding = 0;
        cv.notify_all();
        q.pending.drain(..).collect()
    };
    let why = lock.lock().unwrap().dead.clone().unwrap_or(why);
    sink.lost(lost, &why);
}
