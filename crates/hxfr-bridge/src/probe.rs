//! `hxfr stream`: watch a bridge like a viewer does and report what arrives,
//! over hxfr's own `/stream` or Helix's `/ws/stream` (`probe/helix.rs`).

mod helix;

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use h264_reader::nal::sps::SeqParameterSet;
use h264_reader::rbsp::{BitReader, decode_nal};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::wire::{self, Header};

/// What a viewer got.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub url: String,
    /// `hxfr` or `helix`.
    pub protocol: String,
    pub seconds: f64,
    pub frames: u64,
    pub keyframes: u64,
    pub bytes: u64,
    pub fps_avg: f64,
    /// The worst one-second window.
    pub fps_worst_1s: f64,
    pub bitrate_bps: f64,
    /// Capture → received, when bridge and viewer share a clock (same machine).
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p95: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    pub width: u32,
    pub height: u32,
    pub profile: String,
    pub level: String,
    pub encoder: String,
    pub encoder_reason: String,
    pub starts_with_idr: bool,
    /// Everything that was wrong with the stream (empty when it is sound).
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.frames > 0 && self.starts_with_idr && self.problems.is_empty()
    }
}

/// Progress once a second.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub elapsed: Duration,
    pub frames: u64,
    pub fps: f64,
    pub bitrate_bps: f64,
}

/// Which stream a viewer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// hxfr's own `/stream`.
    Hxfr,
    /// Helix's desktop stream protocol, `/ws/stream`.
    Helix,
}

impl Protocol {
    /// Helix's when the URL's path ends in `/ws/stream`, else hxfr's.
    pub fn detect(url: &str) -> Protocol {
        let path = url.split_once('?').map_or(url, |(p, _)| p);
        if path.trim_end_matches('/').ends_with("/ws/stream") { Protocol::Helix } else { Protocol::Hxfr }
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hxfr" => Ok(Protocol::Hxfr),
            "helix" => Ok(Protocol::Helix),
            _ => Err(format!("{s:?}: expected hxfr or helix")),
        }
    }
}

/// The WebSocket URL for `url`: hxfr's `/stream` on the same host; for
/// Helix, the URL's own path when it ends in `/ws/stream` (behind Helix's
/// API it is longer), else `/ws/stream`.
fn ws_url(url: &str, protocol: Protocol) -> Result<String> {
    let (scheme, rest) = url.split_once("://").context("URL needs a scheme, e.g. http://127.0.0.1:8080/")?;
    let scheme = match scheme {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        s => bail!("unsupported scheme {s:?}"),
    };
    let (before_query, query) = rest.split_once('?').map_or((rest, None), |(h, q)| (h, Some(q)));
    let (host, path) = before_query.split_once('/').map_or((before_query, ""), |(h, p)| (h, p));
    let path = match protocol {
        Protocol::Hxfr => "/stream".to_string(),
        Protocol::Helix if Protocol::detect(url) == Protocol::Helix => format!("/{}", path.trim_end_matches('/')),
        Protocol::Helix => "/ws/stream".to_string(),
    };
    Ok(match query {
        Some(q) => format!("{scheme}://{host}{path}?{q}"),
        None => format!("{scheme}://{host}{path}"),
    })
}

async fn connect(
    url: &str,
    protocol: Protocol,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    let ws = ws_url(url, protocol)?;
    let (socket, _) = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(ws.as_str()))
        .await
        .with_context(|| format!("no answer from {ws} within 10 s"))?
        .with_context(|| format!("cannot connect to {ws}"))?;
    Ok(socket)
}

/// Checks one access unit; returns its SPS when it has one.
fn check_au(au: &[u8], n: u64, problems: &mut Vec<String>) -> Option<SeqParameterSet> {
    let nals = wire::nal_units(au);
    if nals.is_empty() {
        problems.push(format!("access unit {n}: no NAL units"));
        return None;
    }
    let mut sps = None;
    for nal in nals {
        if nal.is_empty() || nal[0] & 0x80 != 0 {
            problems.push(format!("access unit {n}: malformed NAL header"));
            continue;
        }
        if nal[0] & 0x1f == 7 {
            match decode_nal(nal)
                .map_err(|e| e.to_string())
                .and_then(|rbsp| SeqParameterSet::from_bits(BitReader::new(&rbsp[..])).map_err(|e| format!("{e:?}")))
            {
                Ok(s) => sps = Some(s),
                Err(e) => problems.push(format!("access unit {n}: SPS does not parse: {e}")),
            }
        }
    }
    sps
}

/// Counts what arrives the same way whatever the protocol.
struct Tally {
    r: Report,
    start: Instant,
    per_second: Vec<u64>,
    latencies: Vec<f64>,
    last_progress: Instant,
    frames_at: u64,
    bytes_at: u64,
}

impl Tally {
    fn new(url: &str, protocol: &str) -> Tally {
        Tally {
            r: Report { url: url.to_string(), protocol: protocol.to_string(), ..Default::default() },
            start: Instant::now(),
            per_second: Vec::new(),
            latencies: Vec::new(),
            last_progress: Instant::now(),
            frames_at: 0,
            bytes_at: 0,
        }
    }

    /// One access unit, `message_len` bytes on the wire with its header.
    fn frame(&mut self, keyframe: bool, au: &[u8], message_len: usize) {
        let r = &mut self.r;
        if r.frames == 0 {
            r.starts_with_idr = keyframe && wire::nal_units(au).iter().any(|n| !n.is_empty() && n[0] & 0x1f == 5);
        }
        if let Some(sps) = check_au(au, r.frames, &mut r.problems) {
            match sps.pixel_dimensions() {
                Ok((w, h)) => (r.width, r.height) = (w, h),
                Err(e) => r.problems.push(format!("SPS dimensions: {e:?}")),
            }
            r.profile = format!("{:?}", sps.profile());
            r.level = format!("{:?}", sps.level());
        }
        r.frames += 1;
        r.keyframes += keyframe as u64;
        r.bytes += message_len as u64;
        let sec = self.start.elapsed().as_secs() as usize;
        if self.per_second.len() <= sec {
            self.per_second.resize(sec + 1, 0);
        }
        self.per_second[sec] += 1;
    }

    fn progress(&mut self, progress: &mut impl FnMut(Progress)) {
        if self.last_progress.elapsed() >= Duration::from_secs(1) {
            let secs = self.last_progress.elapsed().as_secs_f64();
            progress(Progress {
                elapsed: self.start.elapsed(),
                frames: self.r.frames,
                fps: (self.r.frames - self.frames_at) as f64 / secs,
                bitrate_bps: (self.r.bytes - self.bytes_at) as f64 * 8.0 / secs,
            });
            (self.frames_at, self.bytes_at, self.last_progress) = (self.r.frames, self.r.bytes, Instant::now());
        }
    }

    fn finish(self) -> Report {
        let Tally { mut r, start, per_second, mut latencies, .. } = self;
        r.seconds = start.elapsed().as_secs_f64();
        r.fps_avg = r.frames as f64 / r.seconds.max(1e-3);
        r.bitrate_bps = r.bytes as f64 * 8.0 / r.seconds.max(1e-3);
        // Whole seconds only: the first (connecting) and the cut-off last one would lie.
        let full: Vec<u64> = per_second.iter().copied().skip(1).take((r.seconds as usize).saturating_sub(2)).collect();
        r.fps_worst_1s = full.iter().copied().min().unwrap_or(0) as f64;
        // Latency is only meaningful when the clocks are shared: plausible values only.
        if latencies.iter().all(|l| (0.0..60_000.0).contains(l)) {
            r.latency_ms_p50 = hxfr_metrics::percentile(&mut latencies, 0.50);
            r.latency_ms_p95 = hxfr_metrics::percentile(&mut latencies, 0.95);
            r.latency_ms_p99 = hxfr_metrics::percentile(&mut latencies, 0.99);
        }
        if r.frames == 0 {
            r.problems.push("no frames arrived".into());
        } else if !r.starts_with_idr {
            r.problems.push("the stream does not start with an IDR frame".into());
        }
        r.problems.truncate(20);
        r
    }
}

/// Watches `url` for `duration`, calling `progress` about once a second; the
/// protocol follows from the URL ([`Protocol::detect`]).
pub async fn watch(url: &str, duration: Duration, progress: impl FnMut(Progress)) -> Result<Report> {
    watch_as(url, Protocol::detect(url), duration, progress).await
}

/// Watches `url` in `protocol` for `duration`.
pub async fn watch_as(
    url: &str,
    protocol: Protocol,
    duration: Duration,
    mut progress: impl FnMut(Progress),
) -> Result<Report> {
    let mut socket = connect(url, protocol).await?;
    if protocol == Protocol::Helix {
        return helix::read(socket, url, duration, progress).await;
    }
    let mut t = Tally::new(url, "hxfr");
    let deadline = tokio::time::Instant::now() + duration;
    loop {
        let msg = match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => break, // time is up
            Ok(None) => {
                t.r.problems.push("the bridge closed the stream".into());
                break;
            }
            Ok(Some(Err(e))) => {
                t.r.problems.push(format!("stream error: {e}"));
                break;
            }
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Binary(data) => {
                let (h, au): (Header, &[u8]) = match Header::decode(&data) {
                    Ok(x) => x,
                    Err(e) => {
                        t.r.problems.push(format!("message {}: {e}", t.r.frames));
                        continue;
                    }
                };
                t.frame(h.keyframe, au, data.len());
                t.latencies.push((wire::unix_us() as f64 - h.capture_us as f64) / 1000.0);
            }
            Message::Text(text) => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                    && v["type"] == "hello"
                {
                    t.r.encoder = v["encoder"].as_str().unwrap_or_default().to_string();
                    t.r.encoder_reason = v["reason"].as_str().unwrap_or_default().to_string();
                }
            }
            Message::Ping(p) => {
                let _ = socket.send(Message::Pong(p)).await;
            }
            _ => {}
        }
        t.progress(&mut progress);
    }
    let _ = socket.close(None).await;
    Ok(t.finish())
}

#[cfg(test)]
mod tests {
    use super::{Protocol, ws_url};

    #[test]
    fn urls_become_the_stream_socket() {
        let hxfr = |u| ws_url(u, Protocol::Hxfr);
        assert_eq!(hxfr("http://127.0.0.1:8080/").unwrap(), "ws://127.0.0.1:8080/stream");
        assert_eq!(hxfr("http://h:1/?token=abc").unwrap(), "ws://h:1/stream?token=abc");
        assert_eq!(hxfr("https://h/").unwrap(), "wss://h/stream");
        assert!(hxfr("ftp://h/").is_err());
    }

    #[test]
    fn helix_urls_keep_their_path_or_get_ws_stream() {
        let helix = |u| ws_url(u, Protocol::Helix);
        assert_eq!(helix("http://127.0.0.1:8080/").unwrap(), "ws://127.0.0.1:8080/ws/stream");
        assert_eq!(helix("http://h:1/?token=abc").unwrap(), "ws://h:1/ws/stream?token=abc");
        assert_eq!(helix("ws://h:1/ws/stream?token=t").unwrap(), "ws://h:1/ws/stream?token=t");
        assert_eq!(
            helix("https://helix.example/api/v1/external-agents/a1/ws/stream").unwrap(),
            "wss://helix.example/api/v1/external-agents/a1/ws/stream"
        );
        assert_eq!(Protocol::detect("ws://h:1/ws/stream?token=t"), Protocol::Helix);
        assert_eq!(Protocol::detect("http://h:1/"), Protocol::Hxfr);
        assert_eq!("helix".parse::<Protocol>(), Ok(Protocol::Helix));
        assert!("webrtc".parse::<Protocol>().is_err());
    }
}
