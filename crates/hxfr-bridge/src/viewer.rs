//! `hxfr stream`: watch a bridge like a viewer does and report what arrives.

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

fn ws_url(url: &str) -> Result<String> {
    let (scheme, rest) = url.split_once("://").context("URL needs a scheme, e.g. http://127.0.0.1:8080/")?;
    let scheme = match scheme {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        s => bail!("unsupported scheme {s:?}"),
    };
    let (host, query) = rest.split_once('?').map_or((rest, None), |(h, q)| (h, Some(q)));
    let host = host.split('/').next().unwrap_or(host);
    Ok(match query {
        Some(q) => format!("{scheme}://{host}/stream?{q}"),
        None => format!("{scheme}://{host}/stream"),
    })
}

fn pct(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[((v.len() - 1) as f64 * p).round() as usize])
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

/// Watches `url` for `duration`, calling `progress` about once a second.
pub async fn watch(url: &str, duration: Duration, mut progress: impl FnMut(Progress)) -> Result<Report> {
    let ws = ws_url(url)?;
    let (mut socket, _) = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(ws.as_str()))
        .await
        .with_context(|| format!("no answer from {ws} within 10 s"))?
        .with_context(|| format!("cannot connect to {ws}"))?;
    let mut r = Report { url: url.to_string(), ..Default::default() };
    let start = Instant::now();
    let mut per_second: Vec<u64> = Vec::new();
    let mut latencies = Vec::new();
    let mut last_progress = Instant::now();
    let (mut frames_at, mut bytes_at) = (0u64, 0u64);
    let deadline = tokio::time::Instant::now() + duration;
    loop {
        let msg = match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => break, // time is up
            Ok(None) => {
                r.problems.push("the bridge closed the stream".into());
                break;
            }
            Ok(Some(Err(e))) => {
                r.problems.push(format!("stream error: {e}"));
                break;
            }
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Binary(data) => {
                let (h, au): (Header, &[u8]) = match Header::decode(&data) {
                    Ok(x) => x,
                    Err(e) => {
                        r.problems.push(format!("message {}: {e}", r.frames));
                        continue;
                    }
                };
                if r.frames == 0 {
                    r.starts_with_idr =
                        h.keyframe && wire::nal_units(au).iter().any(|n| !n.is_empty() && n[0] & 0x1f == 5);
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
                r.keyframes += h.keyframe as u64;
                r.bytes += data.len() as u64;
                let sec = start.elapsed().as_secs() as usize;
                if per_second.len() <= sec {
                    per_second.resize(sec + 1, 0);
                }
                per_second[sec] += 1;
                latencies.push((wire::unix_us() as f64 - h.capture_us as f64) / 1000.0);
            }
            Message::Text(t) => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&t)
                    && v["type"] == "hello"
                {
                    r.encoder = v["encoder"].as_str().unwrap_or_default().to_string();
                    r.encoder_reason = v["reason"].as_str().unwrap_or_default().to_string();
                }
            }
            Message::Ping(p) => {
                let _ = socket.send(Message::Pong(p)).await;
            }
            _ => {}
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            let secs = last_progress.elapsed().as_secs_f64();
            progress(Progress {
                elapsed: start.elapsed(),
                frames: r.frames,
                fps: (r.frames - frames_at) as f64 / secs,
                bitrate_bps: (r.bytes - bytes_at) as f64 * 8.0 / secs,
            });
            (frames_at, bytes_at, last_progress) = (r.frames, r.bytes, Instant::now());
        }
    }
    let _ = socket.close(None).await;
    r.seconds = start.elapsed().as_secs_f64();
    r.fps_avg = r.frames as f64 / r.seconds.max(1e-3);
    r.bitrate_bps = r.bytes as f64 * 8.0 / r.seconds.max(1e-3);
    // Whole seconds only: the first (connecting) and the cut-off last one would lie.
    let full: Vec<u64> = per_second.iter().copied().skip(1).take((r.seconds as usize).saturating_sub(2)).collect();
    r.fps_worst_1s = full.iter().copied().min().unwrap_or(0) as f64;
    // Latency is only meaningful when the clocks are shared: plausible values only.
    if latencies.iter().all(|l| (0.0..60_000.0).contains(l)) {
        r.latency_ms_p50 = pct(&mut latencies, 0.50);
        r.latency_ms_p95 = pct(&mut latencies, 0.95);
        r.latency_ms_p99 = pct(&mut latencies, 0.99);
    }
    if r.frames == 0 {
        r.problems.push("no frames arrived".into());
    } else if !r.starts_with_idr {
        r.problems.push("the stream does not start with an IDR frame".into());
    }
    r.problems.truncate(20);
    Ok(r)
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_become_the_stream_socket() {
        assert_eq!(super::ws_url("http://127.0.0.1:8080/").unwrap(), "ws://127.0.0.1:8080/stream");
        assert_eq!(super::ws_url("http://h:1/?token=abc").unwrap(), "ws://h:1/stream?token=abc");
        assert_eq!(super::ws_url("https://h/").unwrap(), "wss://h/stream");
        assert!(super::ws_url("ftp://h/").is_err());
    }
}
