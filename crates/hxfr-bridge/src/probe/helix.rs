//! `hxfr stream` over Helix's desktop stream protocol (`/ws/stream`): does
//! what Helix's browser client does (init, StreamInit, ConnectionComplete,
//! VideoFrames, a Ping a second) and checks that it could: the order of the
//! handshake, the codec the frames are sent as, that every SPS decodes as
//! [`CLIENT_CODEC`], and that no silence lasts as long as the client's 10 s
//! stale timeout. Latency is estimated from the Pongs: the bridge's encoder
//! latency (capture → sent) plus half the round trip.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{Progress, Report, Tally};
use crate::helix::{CLIENT_CODEC, CODEC_H264, Init, Ping, ServerMessage, StreamInit, parse_server};
use crate::wire;

/// Helix's client declares a connection stale after this long without a message.
const STALE: Duration = Duration::from_secs(10);

/// Whether an SPS's codec string ("avc1.PPCCLL") decodes as [`CLIENT_CODEC`]:
/// Baseline with constraint_set1 (Constrained Baseline), level ≤ 4.0.
fn decodes_as_client_codec(codec: &str) -> bool {
    let Some(hex) = codec.strip_prefix("avc1.") else { return false };
    let Ok(v) = u32::from_str_radix(hex, 16) else { return false };
    let (profile, flags, level) = (v >> 16, (v >> 8) & 0xff, v & 0xff);
    hex.len() == 6 && profile == 0x42 && flags & 0x40 != 0 && level <= 40
}

pub(super) async fn read(
    mut socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    url: &str,
    duration: Duration,
    mut progress: impl FnMut(Progress),
) -> Result<Report> {
    let mut t = Tally::new(url, "helix");
    let problem = |t: &mut Tally, p: String| {
        if !t.r.problems.contains(&p) {
            t.r.problems.push(p);
        }
    };
    // As Helix's client: the size of its screen, its frame rate and bitrate (kbit/s).
    socket.send(Message::Text(Init::to_json(1920, 1080, 60, 20_000).into())).await?;
    let mut stream_init: Option<StreamInit> = None;
    let mut complete = false;
    let mut pings: HashMap<u32, Instant> = HashMap::new();
    let mut seq = 0u32;
    let mut last_message = Instant::now();
    let mut longest_gap = Duration::ZERO;
    let mut ping_tick = tokio::time::interval(Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + duration;
    loop {
        let msg = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = ping_tick.tick() => {
                if complete {
                    seq += 1;
                    pings.insert(seq, Instant::now());
                    pings.retain(|_, sent| sent.elapsed() < STALE);
                    let ping = Ping { seq, client_time_us: wire::unix_us() };
                    if let Err(e) = socket.send(Message::Binary(ping.encode())).await {
                        problem(&mut t, format!("stream error: {e}"));
                        break;
                    }
                }
                continue;
            }
            m = socket.next() => match m {
                None => {
                    problem(&mut t, "the bridge closed the stream".into());
                    break;
                }
                Some(Err(e)) => {
                    problem(&mut t, format!("stream error: {e}"));
                    break;
                }
                Some(Ok(m)) => m,
            },
        };
        longest_gap = longest_gap.max(last_message.elapsed());
        last_message = Instant::now();
        match msg {
            Message::Binary(data) => match parse_server(&data) {
                Ok(ServerMessage::StreamInit { codec, init, .. }) => {
                    if stream_init.is_some() || complete || t.r.frames > 0 {
                        problem(&mut t, "StreamInit came again mid-stream".into());
                    }
                    if codec != CODEC_H264 {
                        problem(&mut t, format!("StreamInit names codec {codec:#04x}, not H.264"));
                    }
                    stream_init = Some(init);
                }
                Ok(ServerMessage::Video { codec, frame, au }) => {
                    if !complete {
                        problem(&mut t, "a VideoFrame came before StreamInit and ConnectionComplete".into());
                    }
                    if codec != CODEC_H264 {
                        problem(&mut t, format!("VideoFrame codec {codec:#04x}, not H.264"));
                    }
                    if let Some(i) = stream_init
                        && (frame.width, frame.height) != (i.width, i.height)
                    {
                        problem(
                            &mut t,
                            format!(
                                "VideoFrame is {}x{}, StreamInit said {}x{}",
                                frame.width, frame.height, i.width, i.height
                            ),
                        );
                    }
                    if let Some(c) = wire::codec_string(au)
                        && !decodes_as_client_codec(&c)
                    {
                        problem(&mut t, format!("the SPS announces {c}: Helix's client decodes as {CLIENT_CODEC}"));
                    }
                    t.frame(frame.keyframe, au, data.len());
                }
                Ok(ServerMessage::Pong(p)) => match pings.remove(&p.seq) {
                    Some(sent) => {
                        let rtt_ms = sent.elapsed().as_secs_f64() * 1000.0;
                        t.latencies.push(p.encoder_latency_ms as f64 + rtt_ms / 2.0);
                    }
                    None => problem(&mut t, format!("a Pong for a Ping never sent (seq {})", p.seq)),
                },
                Ok(ServerMessage::Error(text)) => problem(&mut t, format!("StreamError: {text}")),
                Ok(ServerMessage::Other(_)) => {}
                Err(e) => {
                    let p = format!("message after {} frames: {e}", t.r.frames);
                    problem(&mut t, p);
                }
            },
            Message::Text(text) => {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if v.get("ConnectionComplete").is_some() {
                    if stream_init.is_none() {
                        problem(&mut t, "ConnectionComplete came before StreamInit".into());
                    }
                    complete = true;
                }
            }
            Message::Ping(p) => {
                let _ = socket.send(Message::Pong(p)).await;
            }
            _ => {}
        }
        t.progress(&mut progress);
    }
    longest_gap = longest_gap.max(last_message.elapsed());
    if longest_gap >= STALE {
        problem(
            &mut t,
            format!("{:.1} s without a message: Helix's client gives up after 10 s", longest_gap.as_secs_f64()),
        );
    }
    if stream_init.is_none() || !complete {
        problem(&mut t, "no StreamInit and ConnectionComplete".into());
    }
    let _ = socket.close(None).await;
    Ok(t.finish())
}

#[cfg(test)]
mod tests {
    #[test]
    fn codec_strings_that_helix_s_client_decodes() {
        for ok in ["avc1.42c028", "avc1.42e01f", "avc1.42c00b", "avc1.42d028"] {
            assert!(super::decodes_as_client_codec(ok), "{ok}");
        }
        for bad in ["avc1.42c029", "avc1.428028", "avc1.4d4028", "avc1.640028", "hvc1.1", "avc1.42c0", "avc1.zzzzzz"] {
            assert!(!super::decodes_as_client_codec(bad), "{bad}");
        }
    }
}
