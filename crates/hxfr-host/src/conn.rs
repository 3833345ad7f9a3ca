//! One connection: a reader that dispatches, a writer that answers.
//!
//! The reader (`reader.rs`: bounded memory, a deadline per message) takes
//! requests off the stream and hands each to its session's bounded queue;
//! when a queue is full the reader waits, so a guest that sends faster than
//! the host encodes is slowed by its own socket. Answers come back from the
//! session threads through one bounded channel to the writer.
//!
//! A subscriber (SUBSCRIBE) gets a queue of its own from the scanout's feed
//! (`push.rs`); the writer takes from it whenever no answer is waiting.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hxfr_proto::{
    DecodeError, ErrorCode, FrameDecoder, HelloResp, Message, PROTOCOL_VERSION, Packet, features, msg_type,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::budget::Budget;
use crate::encoder::EncoderFactory;
use crate::push::{Feeds, Subscription};
use crate::reader::{Budgeted, Event, MessageDeadline, Reader};
use crate::resolver::{Peer, ResourceResolver};
use crate::scanout::ScanoutSource;
use crate::session::{self, Job, Outgoing, SessionHandle, SessionParts};
use crate::shm::ShmRegion;
use crate::source::{FrameJob, FrameSources};
use crate::stats::StatsRegistry;

/// A guest that does not read its answers for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Answers waiting for the writer, across all sessions of a connection.
const OUT_QUEUE: usize = 64;

/// How a connection's byte stream behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A socket: each connection is one conversation, lost framing ends it.
    Socket,
    /// A virtio-serial port: the guest can restart while the host's end stays
    /// open, so lost framing means "hunt for the next magic".
    Serial,
}

/// What every connection of a host works with.
pub(crate) struct Shared {
    pub max_sessions: usize,
    pub max_payload: u32,
    pub message_deadline: MessageDeadline,
    /// Jobs queued per session before the reader waits.
    pub max_in_flight: usize,
    /// A session's encoder is closed after this long without a frame.
    pub encoder_idle: Duration,
    pub budget: Arc<Budget>,
    pub encoders: Arc<EncoderFactory>,
    pub shm: Option<Arc<ShmRegion>>,
    pub resolver: Option<Arc<dyn ResourceResolver>>,
    /// The VMs' displays, for SUBSCRIBE.
    pub scanouts: Option<Arc<dyn ScanoutSource>>,
    pub feeds: Arc<Feeds>,
    pub stats: StatsRegistry,
}

/// A subscriber's frames, handed to the writer.
struct Push {
    /// The conversation it belongs to (a HELLO ends it).
    epoch: u64,
    frames: mpsc::Receiver<Packet>,
}

/// Serves one connection until it ends, inside a span naming it.
/// `peer` is who connected, `via` the listener or `--connect` socket it came through.
pub(crate) async fn serve<S>(shared: Arc<Shared>, id: u64, stream: S, peer: String, via: String, kind: StreamKind)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let span = info_span!("conn", id, %peer);
    run(shared, id, stream, peer, via, kind).instrument(span).await
}

async fn run<S>(shared: Arc<Shared>, conn_id: u64, stream: S, peer: String, via: String, kind: StreamKind)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    info!("guest connected");
    let (rd, wr) = tokio::io::split(stream);
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(OUT_QUEUE);
    // Bounded by the subscriptions a connection may have (max_sessions).
    let (push_tx, push_rx) = mpsc::unbounded_channel::<Push>();
    let epoch = Arc::new(AtomicU64::new(0));
    let cancel = CancellationToken::new();
    let writer = tokio::spawn(write_loop(wr, out_rx, push_rx, epoch.clone(), cancel.clone()).in_current_span());
    let decoder = FrameDecoder::new(shared.max_payload).resynchronising(kind == StreamKind::Serial);
    let serial = kind == StreamKind::Serial;
    let mut reader = Reader::new(rd, decoder, serial, shared.budget.clone(), shared.message_deadline);
    let who = Peer { conn_id, addr: &peer, via: &via };
    let sources = Arc::new(FrameSources::new(shared.shm.clone(), shared.resolver.as_ref(), who));
    let scanouts = shared.scanouts.as_ref().map(|s| s.scope(who).unwrap_or_else(|| s.clone()));
    let mut conn = Conn {
        shared,
        conn_id,
        peer,
        sources,
        sessions: HashMap::new(),
        out: out_tx,
        epoch,
        scanouts,
        subs: HashMap::new(),
        pushes: push_tx,
    };

    let mut clean_eof = false;
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            e = reader.next() => e,
        };
        match event {
            Event::Packet(packet, budgeted) => {
                if !conn.handle(packet, budgeted).await {
                    break;
                }
            }
            Event::Malformed(e, header) => conn.malformed(e, header).await,
            Event::Eof { clean } => {
                clean_eof = clean;
                break;
            }
            Event::Closed => break,
        }
    }
    // On a clean end of stream the sessions finish what the guest sent (it
    // may have only shut its sending side); otherwise queued frames are
    // skipped. The writer sends what is answered, then ends.
    if !clean_eof {
        conn.abort_sessions();
    }
    drop(conn);
    let _ = writer.await;
    info!("guest disconnected");
}

struct Conn {
    shared: Arc<Shared>,
    conn_id: u64,
    peer: String,
    /// Shared by the connection's sessions.
    sources: Arc<FrameSources>,
    sessions: HashMap<u16, SessionHandle>,
    out: mpsc::Sender<Outgoing>,
    epoch: Arc<AtomicU64>,
    /// This guest's VM's scanouts.
    scanouts: Option<Arc<dyn ScanoutSource>>,
    /// Subscriptions, by the session id their frames carry.
    subs: HashMap<u16, Subscription>,
    pushes: mpsc::UnboundedSender<Push>,
}

impl Conn {
    fn abort_sessions(&mut self) {
        for (_, s) in self.sessions.drain() {
            s.abort();
        }
    }

    /// SUBSCRIBE: answers SUBSCRIBE_RESP (session_id = scanout_id), then,
    /// when it said yes, the scanout's frames follow on this connection.
    async fn subscribe(&mut self, scanout_id: u32) -> bool {
        let sid = scanout_id as u16;
        let feed = match &self.scanouts {
            _ if u16::try_from(scanout_id).is_err() => None,
            // Subscribing again to the same scanout replaces the subscription.
            _ if self.subs.len() >= self.shared.max_sessions && !self.subs.contains_key(&sid) => {
                warn!(
                    scanout = scanout_id,
                    "refused: more than {} subscriptions on one connection", self.shared.max_sessions
                );
                None
            }
            Some(s) => self.shared.feeds.feed(s, scanout_id, self.conn_id),
            None => None,
        };
        let success = feed.is_some();
        match &feed {
            Some(_) => info!(scanout = scanout_id, "subscribed"),
            None if self.scanouts.is_none() => {
                info!(scanout = scanout_id, "SUBSCRIBE refused: this host has no scanouts")
            }
            None => info!(scanout = scanout_id, "SUBSCRIBE refused: no such scanout in this guest's VM"),
        }
        // The answer goes first: the writer takes answers before pushed frames.
        if !self.reply(Packet::new(sid, Message::SubscribeResp { scanout_id, success })).await {
            return false;
        }
        if let Some(feed) = feed {
            let (sub, frames) = feed.join(sid);
            if self.pushes.send(Push { epoch: self.epoch.load(Ordering::Relaxed), frames }).is_err() {
                return false;
            }
            self.subs.insert(sid, sub);
        }
        true
    }

    /// The subscriptions a CONFIG_REQ or KEYFRAME_REQ of session `sid` is
    /// for: its own, or, when no subscription has that id, all of them.
    fn subscriptions_for(&self, sid: u16) -> impl Iterator<Item = &Subscription> {
        let own = self.subs.get(&sid);
        let all = own.is_none().then(|| self.subs.values()).into_iter().flatten();
        own.into_iter().chain(all)
    }

    /// Sends an answer that is not part of any session's order.
    async fn reply(&self, packet: Packet) -> bool {
        self.out.send(Outgoing { epoch: self.epoch.load(Ordering::Relaxed), packet }).await.is_ok()
    }

    /// The session's queue, creating the session on first use. `None` when
    /// the connection already has as many sessions as it may.
    fn session(&mut self, id: u16) -> Option<&SessionHandle> {
        if !self.sessions.contains_key(&id) {
            if self.sessions.len() >= self.shared.max_sessions {
                return None;
            }
            let parts = SessionParts {
                id,
                epoch: self.epoch.load(Ordering::Relaxed),
                encoders: self.shared.encoders.clone(),
                sources: self.sources.clone(),
                stats: self.shared.stats.register(self.conn_id, id, self.peer.clone()),
                out: self.out.clone(),
                queue: self.shared.max_in_flight,
                idle: self.shared.encoder_idle,
                thread_name: format!("hxfr-c{}-s{id}", self.conn_id),
                span: info_span!("session", id),
            };
            match session::spawn(parts) {
                Ok(h) => {
                    self.sessions.insert(id, h);
                }
                Err(e) => {
                    warn!(session = id, "cannot start a session thread: {e}");
                    return None;
                }
            }
        }
        self.sessions.get(&id)
    }

    /// Queues a job in its session, or answers ERROR right away when the
    /// session cannot exist (`answer` says whether the request expects one).
    async fn dispatch(&mut self, id: u16, job: Job, answer: bool) -> bool {
        let limit = self.shared.max_sessions;
        match self.session(id) {
            // Waits while the session has max_in_flight frames queued: backpressure.
            Some(s) => s.send(job).await,
            None if answer => {
                warn!(session = id, "refused: more than {limit} sessions on one connection");
                self.reply(Packet::error(
                    id,
                    ErrorCode::InvalidMessage as i32,
                    format!("too many sessions on this connection (limit {limit})"),
                ))
                .await
            }
            None => true,
        }
    }

    /// Handles one request; `budgeted` says whether its bytes hold room in
    /// the budget already. Returns false when the connection should end.
    async fn handle(&mut self, p: Packet, budgeted: Budgeted) -> bool {
        let sid = p.session_id;
        match p.message {
            Message::FrameRequest(r) => {
                // Inline pixels hold room in the host-wide budget until
                // encoded: large ones lie in a buffer that took it before
                // they were read (and holds it while they live); small ones
                // (from the read-ahead) wait for it here.
                let budget = match (&r.pixels, budgeted) {
                    (Some(px), Budgeted::No) => match self.shared.budget.take(px.len() as u64).await {
                        Some(share) => Some(share),
                        None => return false,
                    },
                    _ => None,
                };
                let job = match FrameJob::from_request(r, budget) {
                    Some(f) => Job::Frame(f),
                    None => {
                        let e = "frame request with neither pixels (PIXEL_DATA flag) nor a resource id";
                        Job::Reply(Packet::error(sid, ErrorCode::InvalidMessage as i32, e))
                    }
                };
                self.dispatch(sid, job, true).await
            }
            Message::ShmFrameRequest(r) => self.dispatch(sid, Job::Frame(FrameJob::from_shm(r)), true).await,
            // On a subscribed connection both are for the subscription, and
            // never answered: Helix's subscriber takes any message but
            // FRAME_RESPONSE as the end of its stream.
            Message::KeyframeReq if !self.subs.is_empty() => {
                self.subscriptions_for(sid).for_each(Subscription::keyframe);
                true
            }
            Message::ConfigReq(c) if !self.subs.is_empty() => {
                self.subscriptions_for(sid).for_each(|s| s.configure(c));
                true
            }
            Message::KeyframeReq => self.dispatch(sid, Job::Keyframe, false).await,
            Message::ConfigReq(c) => self.dispatch(sid, Job::Config(c), true).await,
            Message::Ping => self.reply(Packet::new(sid, Message::Pong)).await,
            Message::Hello(h) => {
                // A (re)started guest: forget every session and every answer
                // not yet written, then confirm with its nonce.
                if !self.sessions.is_empty() {
                    info!("HELLO: resetting {} session(s)", self.sessions.len());
                }
                self.abort_sessions();
                self.subs.clear();
                self.epoch.fetch_add(1, Ordering::Relaxed);
                let shm_size = self.shared.shm.as_ref().map_or(0, |s| s.len());
                let mut feats = 0;
                if shm_size > 0 {
                    feats |= features::SHM;
                }
                if self.shared.resolver.is_some() {
                    feats |= features::RESOURCE;
                }
                let resp = HelloResp {
                    nonce: h.nonce,
                    version: PROTOCOL_VERSION,
                    features: feats,
                    shm_size,
                    max_in_flight: self.shared.max_in_flight as u32,
                };
                self.reply(Packet::new(sid, Message::HelloResp(resp))).await
            }
            // Hot-plugging displays is not ours (yet): they asked, so they get a "no".
            Message::EnableScanout { scanout_id, width, height } => {
                let answer = match &self.scanouts {
                    Some(s) => s.enable(scanout_id, width, height).await,
                    None => Err("this host has no scanouts (start it with --vhost-user-gpu)".to_string()),
                };
                let (success, connector) = match answer {
                    Ok(name) => {
                        info!(scanout = scanout_id, width, height, "ENABLE_SCANOUT: {name} plugged in");
                        (true, name)
                    }
                    Err(why) => {
                        warn!(scanout = scanout_id, "ENABLE_SCANOUT refused: {why}");
                        (false, String::new())
                    }
                };
                self.reply(Packet::new(sid, Message::ScanoutResp { scanout_id, success, connector })).await
            }
            Message::DisableScanout { scanout_id } => {
                if let Some(s) = &self.scanouts
                    && let Err(why) = s.disable(scanout_id).await
                {
                    warn!(scanout = scanout_id, "DISABLE_SCANOUT: {why}");
                }
                true
            }
            Message::Subscribe { scanout_id } => self.subscribe(scanout_id).await,
            Message::Pong => true,
            other => {
                // Unknown types are legal (skipped by size); host-bound answers
                // from a guest are not, but neither is worth an unasked reply.
                debug!("ignoring {} (type {:#04x})", other.name(), other.msg_type());
                true
            }
        }
    }

    /// A message whose framing was intact but whose body was not.
    async fn malformed(&mut self, e: DecodeError, header: Option<hxfr_proto::Header>) {
        if let DecodeError::Resynced(n) = e {
            warn!("stream resynchronised: skipped {n} bytes of garbage");
            return;
        }
        warn!("malformed message: {e}");
        let Some(h) = header else { return };
        // Requests that expect an answer get an ERROR, in their session's
        // order; a subscriber gets nothing it could take for the end.
        if h.msg_type == msg_type::CONFIG_REQ && !self.subs.is_empty() {
            return;
        }
        if matches!(h.msg_type, msg_type::FRAME_REQUEST | msg_type::SHM_FRAME_REQUEST | msg_type::CONFIG_REQ) {
            let p = Packet::error(h.session_id, ErrorCode::InvalidMessage as i32, format!("malformed request: {e}"));
            self.dispatch(h.session_id, Job::Reply(p), true).await;
        }
    }
}

async fn write_loop<W: AsyncWrite>(
    wr: W,
    mut rx: mpsc::Receiver<Outgoing>,
    mut push_rx: mpsc::UnboundedReceiver<Push>,
    epoch: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let mut wr = std::pin::pin!(wr);
    let mut head = BytesMut::with_capacity(512);
    let mut pushes: Vec<Push> = Vec::new();
    let mut turn = 0usize;
    loop {
        // Answers first (a SUBSCRIBE_RESP before the frames it starts),
        // then the subscribers' frames, taking turns.
        let next = std::future::poll_fn(|cx| {
            use std::task::Poll;
            if let Poll::Ready(o) = rx.poll_recv(cx) {
                return Poll::Ready(o.map(|o| (o.epoch, o.packet)));
            }
            while let Poll::Ready(Some(p)) = push_rx.poll_recv(cx) {
                pushes.push(p);
            }
            let now = epoch.load(Ordering::Relaxed);
            pushes.retain(|p| p.epoch == now); // a HELLO ended them
            let n = pushes.len();
            let mut ended = Vec::new();
            for k in 0..n {
                let i = (turn + k) % n;
                match pushes[i].frames.poll_recv(cx) {
                    Poll::Ready(Some(packet)) => {
                        turn = i + 1;
                        return Poll::Ready(Some((now, packet)));
                    }
                    Poll::Ready(None) => ended.push(i),
                    Poll::Pending => {}
                }
            }
            if !ended.is_empty() {
                ended.sort_unstable();
                for i in ended.into_iter().rev() {
                    pushes.swap_remove(i);
                }
                if pushes.is_empty() {
                    // Its scanout went away and it subscribed to nothing else.
                    return Poll::Ready(None);
                }
            }
            Poll::Pending
        })
        .await;
        let Some((o_epoch, packet)) = next else { break };
        if o_epoch != epoch.load(Ordering::Relaxed) {
            continue; // an answer for a conversation a HELLO has ended
        }
        let o = Outgoing { epoch: o_epoch, packet };
        head.clear();
        o.packet.encode_head(&mut head);
        let tail = o.packet.tail().map_or(&[][..], |t| &t[..]);
        // Header and access unit in one vectored write, no staging copy.
        let mut buf = (&head[..]).chain(tail);
        match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all_buf(&mut buf)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!("write failed: {e}");
                break;
            }
            Err(_) => {
                warn!("closing: the guest has not read its answers for {}s", WRITE_TIMEOUT.as_secs());
                break;
            }
        }
    }
    cancel.cancel();
    let _ = wr.shutdown().await;
}
