//! `/ws/stream`: the bridge's stream in Helix's protocol ([`crate::helix`]),
//! fed by the same hub as `/stream` (same fan-out, slow-viewer and
//! late-joiner rules) and behind the same token.
//!
//! A viewer sends its init (within 30 s; binary messages before it are
//! ignored), gets StreamInit and ConnectionComplete, then one VideoFrame per
//! access unit, starting at a keyframe. Keyframes have their SPS fitted to
//! the codec string Helix's client decodes with ([`crate::h264_level`]).
//! When nothing has been sent for [`HEARTBEAT_IDLE`] (a still desktop, or
//! video switched off) a heartbeat text message keeps the viewer from
//! declaring the connection stale. Pings are answered with Pongs; input is
//! validated and counted, not injected (the page's `/stream` input is);
//! `set_video_enabled` stops and restarts the video. Every message that
//! fails validation is counted and logged, and the connection goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use bytes::Bytes;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use tracing::{debug, info, warn};

use crate::h264_level::{self, Fit, Limits};
use crate::helix::{self, ClientMessage, HelixError, Init, Pong, StreamInit, VideoFrame};
use crate::hub::{Unit, Viewer};
use crate::server::{AppState, Params, authorised, refused, send_within};
use crate::wire::{self, Header};

/// How long a viewer has to send its init.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Silence after which a heartbeat goes out (Helix's client gives up after 10 s).
pub const HEARTBEAT_IDLE: Duration = Duration::from_secs(2);
/// The socket refuses (and closes on) any message larger than this; smaller
/// ones that are still too large for their kind are refused one by one.
pub const SOCKET_MESSAGE_LIMIT: usize = 64 * 1024;
/// Bad messages logged per connection before the log goes quiet (they stay counted).
const LOGGED_PER_CONNECTION: u64 = 10;

/// What `/ws/stream` serves, and its counters.
pub struct Endpoint {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub limits: Limits,
    pub counters: Arc<Counters>,
}

/// Running totals over every `/ws/stream` connection.
#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicU64,
    /// Valid input messages by type, 0x10 (keyboard) to 0x14 (touch).
    pub inputs: [AtomicU64; 5],
    pub pings: AtomicU64,
    pub controls: AtomicU64,
    /// Types Helix defines that the bridge does not serve (controllers, microphone).
    pub unsupported: AtomicU64,
    /// Messages refused: malformed, oversized, unknown, or out of place.
    pub rejected: AtomicU64,
    pub heartbeats: AtomicU64,
    pub video_frames: AtomicU64,
    /// Keyframes whose SPS was rewritten to fit `avc1.42d028`, and those that could not be.
    pub sps_rewritten: AtomicU64,
    pub sps_unfit: AtomicU64,
}

impl Counters {
    pub fn inputs(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.inputs[i].load(Ordering::Relaxed))
    }
}

pub(crate) async fn stream(ws: WebSocketUpgrade, State(st): State<Arc<AppState>>, Query(q): Params) -> Response {
    if !authorised(&st, &q) {
        return refused();
    }
    ws.max_message_size(SOCKET_MESSAGE_LIMIT).max_frame_size(SOCKET_MESSAGE_LIMIT).on_upgrade(move |s| viewer(s, st))
}

type Tx = SplitSink<WebSocket, Message>;

/// One connection's state.
struct Conn<'a> {
    st: &'a AppState,
    ep: &'a Endpoint,
    tx: Tx,
    /// Subscribed to the hub while video is enabled.
    video: Option<Arc<Viewer>>,
    last_sent: Instant,
    /// Capture → leaving the bridge, for the last access unit sent (ms).
    encoder_latency_ms: u16,
    bad: u64,
    sps_reported: bool,
}

impl Conn<'_> {
    async fn send(&mut self, m: Message) -> bool {
        self.last_sent = Instant::now();
        send_within(&mut self.tx, m, self.st.write_timeout).await
    }

    async fn send_error(&mut self, text: &str) {
        if self.send(Message::Binary(helix::stream_error(text))).await {
            let _ = tokio::time::timeout(self.st.write_timeout, self.tx.close()).await;
        }
    }

    fn reject(&mut self, e: &HelixError) {
        let total = self.ep.counters.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        self.bad += 1;
        if self.bad <= LOGGED_PER_CONNECTION {
            warn!(rejected_total = total, "helix viewer: refused a message: {e}");
        } else {
            debug!(rejected_total = total, "helix viewer: refused a message: {e}");
        }
    }

    fn set_video(&mut self, on: bool) {
        match (on, &self.video) {
            (true, None) => self.video = Some(self.st.hub.subscribe()),
            (false, Some(v)) => {
                self.st.hub.unsubscribe(v);
                self.video = None;
            }
            _ => {}
        }
    }

    /// One access unit as a VideoFrame, its SPS fitted for Helix's client.
    fn video_message(&mut self, unit: &Unit) -> Option<Bytes> {
        let (h, au): (Header, &[u8]) = Header::decode(&unit.message).ok()?;
        let frame = VideoFrame {
            keyframe: h.keyframe,
            replayed: false,
            pts_us: h.pts_us.max(0) as u64,
            width: h.width.min(u16::MAX as u32) as u16,
            height: h.height.min(u16::MAX as u32) as u16,
        };
        let mut msg = frame.encode(au);
        if h.keyframe {
            let ep = self.ep;
            let c = &ep.counters;
            match h264_level::fit_constrained_baseline(&mut msg[helix::VIDEO_HEADER_LEN..], &ep.limits) {
                Ok(Fit::Rewritten { before, after }) => {
                    c.sps_rewritten.fetch_add(1, Ordering::Relaxed);
                    if !std::mem::replace(&mut self.sps_reported, true) {
                        info!(
                            "helix viewer: SPS {} announced as {} for {}",
                            hex(before),
                            hex(after),
                            helix::CLIENT_CODEC
                        );
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    c.sps_unfit.fetch_add(1, Ordering::Relaxed);
                    if !std::mem::replace(&mut self.sps_reported, true) {
                        warn!("helix viewer: the stream may not decode as {}: {e}", helix::CLIENT_CODEC);
                    }
                }
            }
        }
        let age_us = wire::unix_us().saturating_sub(h.capture_us);
        self.encoder_latency_ms = (age_us / 1000).min(u16::MAX as u64) as u16;
        Some(msg.freeze())
    }

    /// Handles one binary message from the viewer; false when the socket is gone.
    async fn client_message(&mut self, data: &[u8]) -> bool {
        let ep = self.ep;
        let c = &ep.counters;
        match helix::parse_client(data) {
            Ok(ClientMessage::Ping(p)) => {
                c.pings.fetch_add(1, Ordering::Relaxed);
                let pong = Pong {
                    seq: p.seq,
                    client_time_us: p.client_time_us,
                    server_time_us: wire::unix_us(),
                    encoder_latency_ms: self.encoder_latency_ms,
                    // The bridge has no scheduler canary: not measured.
                    ..Pong::default()
                };
                return self.send(Message::Binary(pong.encode())).await;
            }
            Ok(ClientMessage::Input(i)) => {
                // Validated and counted; not injected: which key codes Helix's
                // client sends is not settled (the page's `/stream` input is).
                c.inputs[(i.message_type() - helix::MSG_KEYBOARD) as usize].fetch_add(1, Ordering::Relaxed);
                debug!(?i, "helix viewer: input");
            }
            Ok(ClientMessage::Control { set_video_enabled }) => {
                c.controls.fetch_add(1, Ordering::Relaxed);
                if let Some(on) = set_video_enabled {
                    info!(video = on, "helix viewer: set_video_enabled");
                    self.set_video(on);
                }
            }
            Ok(ClientMessage::Unsupported(kind)) => {
                c.unsupported.fetch_add(1, Ordering::Relaxed);
                debug!("helix viewer: message type {kind:#04x} is not served by this bridge");
            }
            Err(e) => self.reject(&e),
        }
        true
    }
}

fn hex([p, c, l]: h264_level::Triple) -> String {
    format!("avc1.{p:02x}{c:02x}{l:02x}")
}

/// Waits for the viewer's init; `None` when it went away (or never sent one, after telling it so).
async fn wait_init(conn: &mut Conn<'_>, rx: &mut futures::stream::SplitStream<WebSocket>) -> Option<Init> {
    let deadline = tokio::time::Instant::now() + INIT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, rx.next()).await {
            Err(_) => {
                conn.send_error("no init message within 30 s").await;
                return None;
            }
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return None,
            Ok(Some(Ok(Message::Text(t)))) => match Init::parse(&t) {
                Ok(init) => return Some(init),
                Err(e) => conn.reject(&e),
            },
            Ok(Some(Ok(_))) => {} // binary before init: ignored, as Helix does
        }
    }
}

async fn viewer(socket: WebSocket, st: Arc<AppState>) {
    let ep = &st.helix;
    ep.counters.connections.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = socket.split();
    let mut conn = Conn {
        st: &st,
        ep,
        tx,
        video: None,
        last_sent: Instant::now(),
        encoder_latency_ms: 0,
        bad: 0,
        sps_reported: false,
    };
    let Some(init) = wait_init(&mut conn, &mut rx).await else { return };
    // The stream's own size when the source knows it (scanout push), else the configured one.
    let (w, h) = st.hub.size().unwrap_or((ep.width, ep.height));
    let (Ok(width), Ok(height), Ok(fps)) = (u16::try_from(w), u16::try_from(h), u8::try_from(ep.fps)) else {
        conn.send_error(&format!("{w}x{h} at {} fps does not fit Helix's StreamInit", ep.fps)).await;
        return;
    };
    info!(
        viewers = st.hub.viewers() + 1,
        "helix viewer connected (asked for {:?}x{:?} at {:?} fps, {:?} kbit/s; streaming {width}x{height} at {fps})",
        init.width,
        init.height,
        init.fps,
        init.bitrate_kbps
    );
    let hello = [
        Message::Binary(StreamInit { width, height, fps, touch: false }.encode()),
        Message::Text(helix::connection_complete(width, height).into()),
    ];
    for m in hello {
        if !conn.send(m).await {
            return;
        }
    }
    conn.set_video(true);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    'run: loop {
        let video = conn.video.clone();
        let notified = async {
            match &video {
                Some(v) => v.notify.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = notified => {
                let Some(units) = video.as_ref().and_then(|v| v.take()) else {
                    conn.send_error("the stream ended").await;
                    break;
                };
                for u in units {
                    let Some(msg) = conn.video_message(&u) else { continue };
                    ep.counters.video_frames.fetch_add(1, Ordering::Relaxed);
                    if !conn.send(Message::Binary(msg)).await {
                        break 'run;
                    }
                }
            }
            m = rx.next() => match m {
                Some(Ok(Message::Binary(data))) => {
                    if !conn.client_message(&data).await {
                        break;
                    }
                }
                Some(Ok(Message::Text(_))) => conn.reject(&HelixError::Invalid {
                    what: "text message",
                    detail: "only the init is text".into(),
                }),
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    // Over the socket's limit, or the connection broke.
                    info!("helix viewer: {e}; closing");
                    break;
                }
                Some(Ok(_)) => {}
            },
            _ = tick.tick() => {
                if conn.last_sent.elapsed() >= HEARTBEAT_IDLE {
                    ep.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                    if !conn.send(Message::Text(helix::heartbeat(wire::unix_us()).into())).await {
                        break;
                    }
                }
            }
        }
    }
    conn.set_video(false);
    info!(viewers = st.hub.viewers(), "helix viewer left");
}
