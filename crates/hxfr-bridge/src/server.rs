//! One HTTP port: the page at `/`, the stream at `/stream` (WebSocket), and
//! the same stream in Helix's protocol at `/ws/stream` (`helix_ws.rs`).
//!
//! Control channel, JSON text messages on the stream's socket:
//! - bridge → viewer `{"type":"hello","encoder","reason","width","height","fps","input","interactive"}`
//!   once (`input`: the desktop that takes input, "gnome" or "x11", or null; `interactive`:
//!   whether this viewer's input reaches it), `{"type":"stats","viewers","fps","bitrate_bps",
//!   "frames","skipped"}` every second, `{"type":"pong","t","server_ms"}` for each ping, and
//!   `{"type":"clipboard","text"}` when the desktop's clipboard changes (interactive viewers).
//! - viewer → bridge `{"type":"keyframe"}` (after a decoder error), `{"type":"ping","t"}`
//!   (the viewer's clock, for the clock-offset estimate behind glass-to-glass latency), and
//!   the input messages of `hxfr_desktop::input` (key, pointer, button, wheel, scroll,
//!   release, clipboard), which go through [`crate::input::InputGate`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use serde_json::json;

use crate::hub::Hub;

/// The page, embedded in the binary.
const PAGE: &str = include_str!("../page/index.html");

pub struct AppState {
    pub hub: Arc<Hub>,
    pub token: Option<String>,
    /// A viewer that has not taken a message within this is closed.
    pub write_timeout: Duration,
    pub hello: serde_json::Value,
    pub helix: crate::helix_ws::Endpoint,
    pub input: Arc<crate::input::InputGate>,
}

/// The largest text message a viewer may send: clipboard text at its limit,
/// every byte escaped in JSON (`\u00XX`), and room for the rest.
const TEXT_MESSAGE_LIMIT: usize = hxfr_desktop::input::CLIPBOARD_MAX * 6 + 1024;

pub(crate) type Params = Query<HashMap<String, String>>;

pub(crate) fn authorised(st: &AppState, q: &HashMap<String, String>) -> bool {
    match &st.token {
        None => true,
        Some(t) => q.get("token").is_some_and(|given| constant_time_eq(given.as_bytes(), t.as_bytes())),
    }
}

/// Compares in time that depends on the lengths only: every byte pair is
/// XORed and OR-folded, with no early exit, so how long a guess takes to fail
/// says nothing about how much of it was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Sends `m`, or gives up when the viewer has not taken it within `within`
/// (it stopped reading; the page reconnects by itself).
pub(crate) async fn send_within<S>(tx: &mut S, m: Message, within: Duration) -> bool
where
    S: futures::Sink<Message> + Unpin,
{
    match tokio::time::timeout(within, tx.send(m)).await {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            tracing::warn!("closing a viewer that took nothing for {within:?} (write timeout)");
            false
        }
    }
}

pub(crate) fn refused() -> Response {
    (StatusCode::UNAUTHORIZED, "This bridge needs ?token=… in the URL (see the bridge's log line).\n").into_response()
}

pub fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/stream", get(stream))
        .route("/ws/stream", get(crate::helix_ws::stream))
        .with_state(state)
}

async fn page(State(st): State<Arc<AppState>>, Query(q): Params) -> Response {
    if !authorised(&st, &q) {
        return refused();
    }
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], PAGE).into_response()
}

async fn stream(ws: WebSocketUpgrade, State(st): State<Arc<AppState>>, Query(q): Params) -> Response {
    if !authorised(&st, &q) {
        return refused();
    }
    ws.max_message_size(TEXT_MESSAGE_LIMIT)
        .max_frame_size(TEXT_MESSAGE_LIMIT)
        .on_upgrade(move |socket| viewer(socket, st))
}

async fn viewer(socket: WebSocket, st: Arc<AppState>) {
    let (mut tx, mut rx) = socket.split();
    let v = st.hub.subscribe();
    let me = st.input.viewer();
    tracing::info!(viewers = st.hub.viewers(), "viewer connected");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut last_frames, mut last_bytes, mut last_t) =
        (st.hub.frames.load(Ordering::Relaxed), st.hub.bytes.load(Ordering::Relaxed), Instant::now());
    let mut hello = st.hello.clone();
    if let Some((w, h)) = st.hub.size() {
        (hello["width"], hello["height"]) = (w.into(), h.into());
    }
    (hello["input"], hello["interactive"]) = (st.input.desktop().into(), st.input.interactive().into());
    let mut clipboard = st.input.clipboard();
    if let Some(c) = clipboard.as_mut() {
        // What was copied before this viewer came is not news to it.
        c.mark_unchanged();
    }
    if !send_within(&mut tx, Message::Text(hello.to_string().into()), st.write_timeout).await {
        st.hub.unsubscribe(&v);
        return;
    }
    'run: loop {
        tokio::select! {
            _ = v.notify.notified() => {
                let Some(units) = v.take() else { break };
                for u in units {
                    // A viewer that does not read blocks only here, for at most the
                    // write timeout; the hub keeps its queue bounded meanwhile.
                    if !send_within(&mut tx, Message::Binary(u.message.clone()), st.write_timeout).await {
                        break 'run;
                    }
                }
            }
            m = rx.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let Ok(msg) = serde_json::from_str::<serde_json::Value>(&t) else {
                        st.input.invalid("not JSON");
                        continue;
                    };
                    match msg["type"].as_str() {
                        Some(ty) if hxfr_desktop::input::TYPES.contains(&ty) => st.input.handle(me, &t),
                        Some("keyframe") => st.hub.request_keyframe(),
                        Some("ping") => {
                            let pong = json!({"type": "pong", "t": msg["t"], "server_ms": crate::wire::unix_us() as f64 / 1000.0});
                            if !send_within(&mut tx, Message::Text(pong.to_string().into()), st.write_timeout).await {
                                break;
                            }
                        }
                        _ => st.input.invalid("unknown message type"),
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            Some(text) = changed(&mut clipboard) => {
                let m = json!({"type": "clipboard", "text": &*text});
                if !send_within(&mut tx, Message::Text(m.to_string().into()), st.write_timeout).await {
                    break;
                }
            }
            _ = tick.tick() => {
                let (f, b, now) = (st.hub.frames.load(Ordering::Relaxed), st.hub.bytes.load(Ordering::Relaxed), Instant::now());
                let secs = now.duration_since(last_t).as_secs_f64().max(1e-3);
                let stats = json!({
                    "type": "stats",
                    "viewers": st.hub.viewers(),
                    "fps": (f - last_frames) as f64 / secs,
                    "bitrate_bps": (b - last_bytes) as f64 * 8.0 / secs,
                    "frames": f,
                    "skipped": v.skipped.load(Ordering::Relaxed),
                });
                (last_frames, last_bytes, last_t) = (f, b, now);
                if !send_within(&mut tx, Message::Text(stats.to_string().into()), st.write_timeout).await {
                    break;
                }
            }
        }
    }
    st.hub.unsubscribe(&v);
    // Whatever this viewer held down, the desktop should not keep pressed.
    st.input.release(me);
    tracing::info!(viewers = st.hub.viewers(), "viewer left");
}

/// The desktop's clipboard text when it changes; never, without a clipboard.
async fn changed(c: &mut Option<hxfr_desktop::control::ClipboardRx>) -> Option<Arc<str>> {
    let Some(rx) = c.as_mut() else { return std::future::pending().await };
    if rx.changed().await.is_err() {
        *c = None;
        return None;
    }
    rx.borrow_and_update().clone()
}
