//! The bridge end to end: a real host, vsockenc, the web server, viewers.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hxfr_bridge::probe::{Protocol, Report, watch, watch_as};
use hxfr_bridge::{Bridge, BridgeConfig};
use hxfr_encode::EncoderKind;
use hxfr_host::{HostConfig, HostHandle, ListenAddr};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::chromium::{poll_page, with_chromium};

struct Setup {
    _host: HostHandle,
    _dir: tempfile::TempDir,
    bridge: Bridge,
}

async fn setup(cfg: BridgeConfig) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("h.sock");
    let host = hxfr_host::spawn(
        HostConfig { encoder: EncoderKind::X264, ..Default::default() },
        vec![ListenAddr::Unix(sock.clone())],
        vec![],
    )
    .unwrap();
    let bridge = Bridge::start(BridgeConfig {
        host_encoder: format!("unix:{}", sock.display()),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..cfg
    })
    .await
    .unwrap();
    Setup { _host: host, _dir: dir, bridge }
}

fn vsockenc(width: u32, height: u32) -> BridgeConfig {
    BridgeConfig { width, height, encoder: "vsockenc".into(), ..Default::default() }
}

fn assert_sound(r: &Report, w: u32, h: u32) {
    assert!(r.ok(), "{r:#?}");
    assert_eq!((r.width, r.height), (w, h), "dimensions from the SPS");
    assert!(r.starts_with_idr);
    assert!(!r.profile.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_through_the_host_reports_frames_fps_and_sps() {
    let s = setup(vsockenc(640, 360)).await;
    let r = watch(&s.bridge.url(), Duration::from_secs(4), |_| {}).await.unwrap();
    assert_sound(&r, 640, 360);
    assert!(r.frames >= 100, "{} frames in 4 s", r.frames);
    assert!(r.fps_avg >= 25.0, "{r:#?}");
    assert_eq!(r.encoder, "vsockenc");
    let lat = r.latency_ms_p50.expect("same machine: latency is measured");
    assert!(lat > 0.0 && lat < 500.0, "{lat}");
    s.bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_gpu_the_guest_falls_back_to_x264() {
    let empty = tempfile::tempdir().unwrap();
    let s = setup(BridgeConfig { width: 320, height: 240, sysfs: empty.path().into(), ..Default::default() }).await;
    assert_eq!(s.bridge.choice.element, "x264enc");
    assert!(s.bridge.choice.reason.contains("no GPU"), "{}", s.bridge.choice.reason);
    let r = watch(&s.bridge.url(), Duration::from_secs(2), |_| {}).await.unwrap();
    assert_sound(&r, 320, 240);
    assert_eq!(r.encoder, "x264enc");
    s.bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_viewer_slows_nobody_and_stays_bounded() {
    // A high bitrate fills the stalled viewer's socket buffers quickly.
    let s = setup(BridgeConfig { bitrate: 30_000_000, ..vsockenc(1280, 720) }).await;
    let ws = s.bridge.url().replace("http://", "ws://") + "stream";
    let (_stalled, _) = tokio_tungstenite::connect_async(ws.as_str()).await.unwrap(); // never read
    let r = watch(&s.bridge.url(), Duration::from_secs(6), |_| {}).await.unwrap();
    assert_sound(&r, 1280, 720);
    assert!(r.fps_avg >= 25.0, "the healthy viewer keeps its rate: {r:#?}");
    assert!(r.fps_worst_1s >= 20.0, "{r:#?}");
    let per_viewer = s.bridge.hub.viewer_stats();
    assert!(per_viewer.iter().all(|&(q, _)| q <= hxfr_bridge::hub::VIEWER_QUEUE), "{per_viewer:?}");
    assert!(per_viewer.iter().any(|&(_, skipped)| skipped > 0), "the stalled viewer skipped ahead: {per_viewer:?}");
    s.bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_viewer_starts_at_a_keyframe() {
    let s = setup(vsockenc(640, 360)).await;
    let url = s.bridge.url();
    // The first viewer keeps watching while the second joins.
    let first = tokio::spawn(async move { watch(&url, Duration::from_secs(4), |_| {}).await });
    // Join once the first viewer is in and its own keyframe request has
    // left the coalescing window, so the late viewer's request is its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(s.bridge.hub.viewers() == 1 && s.bridge.hub.keyframe_request_open()) {
        assert!(std::time::Instant::now() < deadline, "the first viewer never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = s.bridge.hub.keyframe_requests.load(std::sync::atomic::Ordering::Relaxed);
    let late = watch(&s.bridge.url(), Duration::from_secs(2), |_| {}).await.unwrap();
    assert_sound(&late, 640, 360);
    assert!(
        s.bridge.hub.keyframe_requests.load(std::sync::atomic::Ordering::Relaxed) > before,
        "joining asked for a keyframe"
    );
    assert_sound(&first.await.unwrap().unwrap(), 640, 360);
    s.bridge.stop();
}

fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    http_status_as(addr, path, "localhost")
}

fn http_status_as(addr: std::net::SocketAddr, path: &str, host: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_checked_on_the_page_and_the_stream() {
    let s = setup(BridgeConfig { token: Some("s3cret".into()), ..vsockenc(320, 240) }).await;
    let addr = s.bridge.addr;
    let (no, wrong, yes) = tokio::task::spawn_blocking(move || {
        (http_status(addr, "/"), http_status(addr, "/?token=guess"), http_status(addr, "/?token=s3cret"))
    })
    .await
    .unwrap();
    assert_eq!((no, wrong, yes), (401, 401, 200));
    let bare = format!("http://{addr}/");
    assert!(
        watch(&bare, Duration::from_secs(1), |_| {}).await.is_err(),
        "the stream refuses a viewer without the token"
    );
    let r = watch(&s.bridge.url(), Duration::from_secs(2), |_| {}).await.unwrap();
    assert!(s.bridge.url().contains("token=s3cret"));
    assert_sound(&r, 320, 240);
    // The same rule on Helix's endpoint, and `hxfr stream` reads it.
    assert!(
        watch_as(&bare, Protocol::Helix, Duration::from_secs(1), |_| {}).await.is_err(),
        "/ws/stream refuses a viewer without the token"
    );
    let helix = s.bridge.helix_url();
    assert!(helix.ends_with("/ws/stream?token=s3cret"), "{helix}");
    let r = watch(&helix, Duration::from_secs(3), |_| {}).await.unwrap();
    assert_sound(&r, 320, 240);
    assert_eq!(r.protocol, "helix");
    assert!(r.frames >= 60, "{r:#?}");
    let lat = r.latency_ms_p50.expect("estimated from Pongs");
    assert!(lat > 0.0 && lat < 500.0, "{lat}");
    s.bridge.stop();
}

#[tokio::test]
async fn listening_beyond_loopback_needs_a_token_or_an_explicit_opt_out() {
    let e =
        Bridge::start(BridgeConfig { listen: "0.0.0.0:0".parse().unwrap(), ..Default::default() }).await.err().unwrap();
    assert!(e.to_string().contains("--token"), "{e}");
}

/// The page in headless Chromium, driven through chromedriver (Debian's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_decodes_and_paints_in_headless_chromium() {
    let s = setup(vsockenc(1280, 720)).await;
    let url = s.bridge.url();
    let result = with_chromium(|client| drive_page(client, url)).await;
    s.bridge.stop();
    let stats = result.unwrap();
    println!("page stats: {stats}");
}

async fn drive_page(client: fantoccini::Client, url: String) -> Result<serde_json::Value, String> {
    client.goto(&url).await.map_err(|e| e.to_string())?;
    let stats = poll_page(&client, "window.hxfrStats || null", |v| {
        v["decoded"].as_u64().unwrap_or(0) >= 60 && v["latency_p50_ms"].is_number()
    })
    .await?;
    // Not blank: the canvas has many distinct colours.
    let colours = client
        .execute(
            "const c = document.getElementById('screen'); const x = document.createElement('canvas'); \
             x.width = 64; x.height = 36; const g = x.getContext('2d'); g.drawImage(c, 0, 0, 64, 36); \
             const d = g.getImageData(0, 0, 64, 36).data; const s = new Set(); \
             for (let i = 0; i < d.length; i += 4) s.add((d[i] >> 4) * 256 + (d[i+1] >> 4) * 16 + (d[i+2] >> 4)); \
             return s.size;",
            vec![],
        )
        .await
        .map_err(|e| e.to_string())?;
    let png = client.screenshot().await.map_err(|e| e.to_string())?;
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("page.png");
    std::fs::write(&shot, &png).map_err(|e| e.to_string())?;
    if colours.as_u64().unwrap_or(0) < 8 {
        return Err(format!("the canvas looks blank ({colours} colours)"));
    }
    if stats["errors"].as_u64() != Some(0) || stats["encoder"] != "vsockenc" || stats["width"] != 1280 {
        return Err(format!("unexpected page stats: {stats}"));
    }
    if png.len() < 10_000 {
        return Err("screenshot is suspiciously small".into());
    }
    Ok(stats)
}

// ---------------------------------------------------------------------------
// Helix's desktop stream protocol on /ws/stream. The client below is written
// from the protocol's facts (big-endian, one WebSocket message each), not
// from the bridge's own helix module, so that it checks the bytes.
// ---------------------------------------------------------------------------

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const INIT: &str = r#"{"type":"init","host_id":0,"app_id":0,"session_id":"t","width":1920,"height":1080,"fps":60,"bitrate":20000,"packet_size":1024,"play_audio_local":false,"video_supported_formats":1}"#;

/// Next message within 10 s (Helix's client's stale timeout).
async fn next(ws: &mut Ws) -> Message {
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(m))) => m,
        other => panic!("no message within 10 s: {other:?}"),
    }
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}
fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes(b[i..i + 4].try_into().unwrap())
}
fn be64(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i..i + 8].try_into().unwrap())
}

/// Connects, sends init, checks StreamInit (13 bytes) and ConnectionComplete.
async fn helix_connect(url: &str, width: u16, height: u16) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text(INIT.into())).await.unwrap();
    let Message::Binary(init) = next(&mut ws).await else { panic!("StreamInit must come first, as binary") };
    assert_eq!(init.len(), 13, "StreamInit is 13 bytes: {init:02x?}");
    assert_eq!((init[0], init[1]), (0x30, 0x01), "StreamInit, H.264");
    assert_eq!((be16(&init, 2), be16(&init, 4), init[6]), (width, height, 30));
    assert_eq!((init[7], be32(&init, 8), init[12]), (0, 0, 0), "no audio, no touch");
    let Message::Text(cc) = next(&mut ws).await else { panic!("ConnectionComplete must follow, as text") };
    let cc: serde_json::Value = serde_json::from_str(&cc).unwrap();
    assert_eq!(cc["ConnectionComplete"]["capabilities"]["touch"], false);
    assert_eq!(cc["ConnectionComplete"]["width"], width);
    assert_eq!(cc["ConnectionComplete"]["height"], height);
    ws
}

struct Video {
    key: bool,
    pts: u64,
    width: u16,
    height: u16,
    au: bytes::Bytes,
}

fn video(msg: &Message) -> Option<Video> {
    let Message::Binary(b) = msg else { return None };
    if b.first() != Some(&0x01) {
        return None;
    }
    assert!(b.len() > 15, "VideoFrame: 15-byte header and an access unit");
    assert_eq!(b[1], 0x01, "codec H.264");
    assert_eq!(b[2] & !0x03, 0, "flags: bit 0 keyframe, bit 1 replayed");
    Some(Video { key: b[2] & 1 != 0, pts: be64(b, 3), width: be16(b, 11), height: be16(b, 13), au: b.slice(15..) })
}

async fn next_video(ws: &mut Ws) -> Video {
    loop {
        if let Some(v) = video(&next(ws).await) {
            return v;
        }
    }
}

fn ping(seq: u32, t: u64) -> Message {
    let mut m = vec![0x40];
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&t.to_be_bytes());
    Message::Binary(m.into())
}

/// Reads until the Pong for `seq`, checking its 29 bytes; returns the video frames passed on the way.
async fn pong(ws: &mut Ws, seq: u32, t: u64) -> usize {
    let mut frames = 0;
    loop {
        let m = next(ws).await;
        if video(&m).is_some() {
            frames += 1;
            continue;
        }
        if let Message::Binary(b) = &m
            && b[0] == 0x41
        {
            assert_eq!(b.len(), 29, "Pong is 29 bytes: {b:02x?}");
            assert_eq!((be32(b, 1), be64(b, 5)), (seq, t), "seq and client time echoed");
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
            assert!(be64(b, 13).abs_diff(now) < 5_000_000, "server time in µs since the epoch");
            assert!(be16(b, 21) < 5000, "encoder latency {} ms", be16(b, 21));
            return frames;
        }
    }
}

fn sps_triple(au: &[u8]) -> Option<[u8; 3]> {
    hxfr_bridge::wire::nal_units(au).into_iter().find(|n| n.len() > 4 && n[0] & 0x1f == 7).map(|n| [n[1], n[2], n[3]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helix_client_gets_stream_init_and_60_decodable_frames_at_1080p_as_avc1_42d028() {
    let s = setup(vsockenc(1920, 1080)).await;
    let mut ws = helix_connect(&s.bridge.helix_url(), 1920, 1080).await;
    let mut frames = Vec::new();
    while frames.len() < 60 {
        frames.push(next_video(&mut ws).await);
    }
    let first = &frames[0];
    let types = hxfr_testkit::nal_types(&first.au);
    assert!(first.key && types.contains(&7) && types.contains(&8) && types.contains(&5), "first: {types:?}");
    // Decodable as avc1.42d028: Baseline, constraint_set1 (Constrained Baseline), level ≤ 4.0.
    let [profile, flags, level] = sps_triple(&first.au).unwrap();
    assert_eq!(profile, 0x42);
    assert!(flags & 0x40 != 0, "constraint_set1: {flags:#04x}");
    assert!(level <= 40, "level_idc {level}");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!((f.width, f.height), (1920, 1080));
        assert_eq!(f.key, hxfr_testkit::nal_types(&f.au).contains(&5), "frame {i}: keyframe flag = IDR");
        if i > 0 {
            assert!(f.pts > frames[i - 1].pts, "frame {i}: pts in µs, increasing");
        }
    }
    let aus: Vec<bytes::Bytes> = frames.iter().map(|f| f.au.clone()).collect();
    let pictures = tokio::task::spawn_blocking(move || hxfr_testkit::decode_h264(&aus, hxfr_testkit::Output::Bgrx))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pictures.len(), 60);
    assert!(pictures.iter().all(|p| (p.width, p.height) == (1920, 1080)));
    let c = &s.bridge.helix;
    assert_eq!(c.connections.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(c.sps_unfit.load(std::sync::atomic::Ordering::Relaxed), 0);
    s.bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helix_pings_input_and_malformed_messages_leave_the_bridge_serving() {
    use std::sync::atomic::Ordering::Relaxed;
    let s = setup(vsockenc(640, 360)).await;
    let url = s.bridge.helix_url();
    let mut ws = helix_connect(&url, 640, 360).await;
    assert!(next_video(&mut ws).await.key, "the first frame is a keyframe");
    ws.send(ping(7, 123_456_789)).await.unwrap();
    pong(&mut ws, 7, 123_456_789).await;

    let f32s = |a: f32, b: f32| [a.to_le_bytes(), b.to_le_bytes()].concat();
    let good: Vec<Vec<u8>> = vec![
        vec![0x10, 0, 1, 0, 0x00, 0x41],                          // key A down
        vec![0x11, 2, 1, 1],                                      // left button down
        vec![0x11, 4, 0xff, 1],                                   // wheel
        vec![0x11, 3, 0, 0, 0xff, 0x88],                          // high-res wheel, i16
        [&[0x11, 3][..], &f32s(0.5, -1.5)].concat(),              // high-res wheel, f32
        vec![0x12, 1, 0, 100, 0, 50, 0x02, 0x80, 0x01, 0x68],     // absolute (100, 50) in 640x360
        vec![0x13, 0, 0, 5, 0xff, 0xfb],                          // relative (5, -5)
        [&[0x14, 0, 3][..], &f32s(0.5, 0.25)].concat(),           // touch down
        [&[0x20][..], br#"{"set_video_enabled":true}"#].concat(), // control
        vec![0x15, 1, 2, 3],                                      // controller: not served
    ];
    let bad: Vec<Message> = vec![
        Message::Binary(Vec::<u8>::new().into()),
        Message::Binary(vec![0x99].into()),
        Message::Binary(vec![0x10, 0].into()),
        Message::Binary(vec![0x12, 9, 0, 1, 0, 1, 0, 2, 0, 2].into()),
        Message::Binary([&[0x14, 0, 0][..], &f32s(f32::NAN, 0.5)].concat().into()),
        Message::Binary([vec![0x20], vec![b' '; 8 * 1024]].concat().into()),
        Message::Binary(b"\x20{nope".to_vec().into()),
        Message::Binary(vec![0x40, 1, 2].into()),
        Message::Text("hello".into()),
    ];
    for m in good {
        ws.send(Message::Binary(m.into())).await.unwrap();
    }
    for m in bad {
        ws.send(m).await.unwrap();
    }
    ws.send(ping(8, 42)).await.unwrap();
    pong(&mut ws, 8, 42).await;
    let c = &s.bridge.helix;
    assert_eq!(c.inputs(), [1, 4, 1, 1, 1], "keyboard, mouse button/wheel, absolute, relative, touch");
    assert_eq!(c.controls.load(Relaxed), 1);
    assert_eq!(c.unsupported.load(Relaxed), 1);
    assert_eq!(c.rejected.load(Relaxed), 9);
    assert_eq!(c.pings.load(Relaxed), 2);
    // Still streaming.
    next_video(&mut ws).await;

    // A message over the socket's limit ends that connection only.
    let (mut huge, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    huge.send(Message::Text(INIT.into())).await.unwrap();
    let _ = huge.send(Message::Binary(vec![0x20; 1 << 20].into())).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = huge.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the bridge closes a connection that sends 1 MiB");
    for _ in 0..10 {
        next_video(&mut ws).await;
    }
    // Binary before init is ignored: StreamInit is still the first answer.
    let (mut early, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    early.send(ping(1, 1)).await.unwrap();
    early.send(Message::Binary(vec![0x99].into())).await.unwrap();
    early.send(Message::Text(INIT.into())).await.unwrap();
    let Message::Binary(b) = next(&mut early).await else { panic!("StreamInit first") };
    assert_eq!((b[0], b.len()), (0x30, 13));
    assert_eq!(c.rejected.load(Relaxed), 9, "ignored before init, not refused");
    s.bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helix_video_off_keeps_heartbeats_coming_and_video_on_restarts_at_a_keyframe() {
    let s = setup(vsockenc(640, 360)).await;
    let mut ws = helix_connect(&s.bridge.helix_url(), 640, 360).await;
    next_video(&mut ws).await;
    let off = [&[0x20][..], br#"{"set_video_enabled":false}"#].concat();
    ws.send(Message::Binary(off.into())).await.unwrap();
    ws.send(ping(1, 1)).await.unwrap();
    pong(&mut ws, 1, 1).await;
    // Now a still screen as far as this viewer is concerned: something must
    // still come at least every 5 s, and no video.
    let (start, mut last, mut heartbeats) = (Instant::now(), Instant::now(), 0);
    while start.elapsed() < Duration::from_secs(7) {
        let Ok(m) =
            tokio::time::timeout(Duration::from_secs(5) - last.elapsed().min(Duration::from_secs(5)), ws.next()).await
        else {
            panic!("nothing for 5 s after {heartbeats} heartbeats");
        };
        let m = m.unwrap().unwrap();
        assert!(video(&m).is_none(), "no video while it is off");
        if let Message::Text(t) = &m {
            let v: serde_json::Value = serde_json::from_str(t).unwrap();
            assert!(v.get("ConnectionComplete").is_none());
            heartbeats += 1;
        }
        last = Instant::now();
    }
    assert!(heartbeats >= 2, "{heartbeats} heartbeats in 7 s");
    let on = [&[0x20][..], br#"{"set_video_enabled":true}"#].concat();
    ws.send(Message::Binary(on.into())).await.unwrap();
    let v = next_video(&mut ws).await;
    assert!(v.key && hxfr_testkit::nal_types(&v.au).contains(&7), "video comes back at a keyframe with its SPS");
    assert!(s.bridge.helix.heartbeats.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    s.bridge.stop();
}

/// A page written from the protocol's facts, as Helix's browser client does it:
/// WebCodecs with the fixed codec string avc1.42d028, the 15-byte header.
const HELIX_PAGE: &str = r#"<!doctype html><html><body><canvas id="c" width="320" height="180"></canvas><script>
"use strict";
const stats = window.helixStats = { streamInit: null, complete: null, supported: null, received: 0, keyframes: 0,
                                    decoded: 0, errors: [], pong: null, closed: false };
const ctx = document.getElementById("c").getContext("2d");
const ws = new WebSocket(new URLSearchParams(location.search).get("ws"));
ws.binaryType = "arraybuffer";
let decoder = null, gotKey = false;
ws.onopen = () => ws.send(JSON.stringify({ type: "init", host_id: 0, app_id: 0, session_id: "page", width: 1920,
  height: 1080, fps: 30, bitrate: 10000, packet_size: 1024, play_audio_local: false, video_supported_formats: 1 }));
ws.onclose = () => { stats.closed = true; };
ws.onmessage = (e) => {
  if (typeof e.data === "string") {
    const m = JSON.parse(e.data);
    if (m.ConnectionComplete) {
      stats.complete = m.ConnectionComplete;
      const p = new DataView(new ArrayBuffer(13));
      p.setUint8(0, 0x40); p.setUint32(1, 77); p.setBigUint64(5, 123456n);
      ws.send(p.buffer);
    }
    return;
  }
  const d = new Uint8Array(e.data), v = new DataView(e.data);
  if (d[0] === 0x30) {
    stats.streamInit = { length: d.length, codec: d[1], width: v.getUint16(2), height: v.getUint16(4), fps: d[6] };
    const config = { codec: "avc1.42d028", codedWidth: v.getUint16(2), codedHeight: v.getUint16(4), optimizeForLatency: true };
    VideoDecoder.isConfigSupported(config).then((s) => { stats.supported = s.supported; });
    decoder = new VideoDecoder({
      output: (f) => { ctx.drawImage(f, 0, 0, 320, 180); f.close(); stats.decoded++; },
      error: (err) => { stats.errors.push(String(err)); },
    });
    decoder.configure(config);
  } else if (d[0] === 0x01) {
    if (!decoder) { stats.errors.push("VideoFrame before StreamInit"); return; }
    const key = (d[2] & 1) === 1;
    stats.received++;
    if (key) stats.keyframes++;
    if (!gotKey && !key) return;
    gotKey = true;
    try {
      decoder.decode(new EncodedVideoChunk({ type: key ? "key" : "delta", timestamp: Number(v.getBigUint64(3)), data: d.subarray(15) }));
    } catch (err) { stats.errors.push(String(err)); }
  } else if (d[0] === 0x41) {
    stats.pong = { length: d.length, seq: v.getUint32(1), echo: Number(v.getBigUint64(5)) };
  }
};
</script></body></html>"#;

/// Serves `page` to every request on a loopback port (a secure context, as WebCodecs needs).
async fn serve_page(page: &'static str) -> std::net::SocketAddr {
    serve_page_on("127.0.0.1", page).await
}

/// [`serve_page`] on another loopback address: another site, as far as the browser knows.
async fn serve_page_on(ip: &str, page: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(n) if n > 0 && req.len() < 64 * 1024 => req.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    page.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(page.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helix_style_page_decodes_the_ws_stream_as_avc1_42d028_in_headless_chromium() {
    // Helix serves its page from its own origin: the bridge lets it in by name.
    let page = serve_page(HELIX_PAGE).await;
    let s = setup(BridgeConfig { allow_origins: vec![format!("http://{page}")], ..vsockenc(1920, 1080) }).await;
    let url = format!("http://{page}/?ws={}", s.bridge.helix_url());
    let result = with_chromium(|client| async move {
        client.goto(&url).await.map_err(|e| e.to_string())?;
        poll_page(&client, "window.helixStats", |v| {
            v["decoded"].as_u64().unwrap_or(0) >= 60 || !v["errors"].as_array().is_none_or(|e| e.is_empty())
        })
        .await
    })
    .await;
    s.bridge.stop();
    let stats = result.unwrap();
    println!("helix page stats: {stats}");
    assert_eq!(stats["errors"], serde_json::json!([]), "{stats}");
    assert!(stats["decoded"].as_u64().unwrap() >= 60, "{stats}");
    assert_eq!(stats["supported"], true, "Chromium supports avc1.42d028 at 1920x1080");
    assert_eq!(
        stats["streamInit"],
        serde_json::json!({"length": 13, "codec": 1, "width": 1920, "height": 1080, "fps": 30})
    );
    assert_eq!(stats["complete"]["width"], 1920);
    assert_eq!(stats["pong"], serde_json::json!({"length": 29, "seq": 77, "echo": 123456}));
    assert!(stats["keyframes"].as_u64().unwrap() >= 1);
}

// ---------------------------------------------------------------------------
// Who gets in, and how much a client may hold (issue 18, rows 8 and 9).
// ---------------------------------------------------------------------------

/// Polls `f` every 50 ms until it holds; panics with `what` after `within`.
async fn until(what: &str, within: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A WebSocket upgrade of `url` with these `Origin` and `Host` (none: the
/// client's own, no `Origin` as non-browser clients send); its HTTP status.
async fn upgrade_status(url: &str, origin: Option<&str>, host: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    if let Some(h) = host {
        req.headers_mut().insert("host", h.parse().unwrap());
    }
    match tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(req)).await {
        Ok(Ok((mut ws, resp))) => {
            let _ = ws.close(None).await;
            resp.status().as_u16()
        }
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => resp.status().as_u16(),
        Ok(Err(e)) => panic!("{url}: {e}"),
        Err(_) => panic!("{url}: no answer within 5 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_sites_and_rebound_hosts_are_refused_on_every_endpoint() {
    let s = setup(BridgeConfig {
        allow_origins: vec!["http://127.0.0.4:3000".into()],
        allow_hosts: vec!["bridge.test".into()],
        ..vsockenc(320, 240)
    })
    .await;
    let addr = s.bridge.addr;
    let port = addr.port();
    let own = format!("http://{addr}");
    let evil = format!("evil.example:{port}");
    for path in ["/stream", "/ws/stream", "/elsewhere"] {
        let url = format!("ws://{addr}{path}");
        assert_eq!(upgrade_status(&url, Some("http://127.0.0.3:18090"), None).await, 403, "{path}: another site");
        assert_eq!(upgrade_status(&url, Some("null"), None).await, 403, "{path}: an opaque origin");
        assert_eq!(upgrade_status(&url, Some(&format!("https://127.0.0.1:{}", port + 1)), None).await, 403, "{path}");
        assert_eq!(upgrade_status(&url, None, Some(&evil)).await, 403, "{path}: DNS rebinding");
        assert_eq!(upgrade_status(&url, Some(&format!("http://{evil}")), Some(&evil)).await, 403, "{path}");
    }
    for path in ["/stream", "/ws/stream"] {
        let url = format!("ws://{addr}{path}");
        assert_eq!(upgrade_status(&url, None, None).await, 101, "{path}: a client that is not a browser");
        assert_eq!(upgrade_status(&url, Some(&own), None).await, 101, "{path}: the bridge's own page");
        let local = format!("localhost:{port}");
        assert_eq!(upgrade_status(&url, Some(&format!("http://{local}")), Some(&local)).await, 101, "{path}");
        assert_eq!(upgrade_status(&url, Some("http://127.0.0.4:3000"), None).await, 101, "{path}: --allow-origin");
        let named = format!("bridge.test:{port}");
        assert_eq!(
            upgrade_status(&url, Some(&format!("http://{named}")), Some(&named)).await,
            101,
            "{path}: --allow-host"
        );
    }
    let statuses = tokio::task::spawn_blocking(move || {
        [evil.as_str(), "localhost", "127.0.0.1", "127.0.0.1:8080", "[::1]:1", "bridge.test"]
            .map(|h| http_status_as(addr, "/", h))
    })
    .await
    .unwrap();
    assert_eq!(statuses, [403, 200, 200, 200, 200, 200], "the page, by Host");
    assert!(s.bridge.access.refused.load(std::sync::atomic::Ordering::Relaxed) >= 16);
    assert_sound(&watch(&s.bridge.url(), Duration::from_secs(1), |_| {}).await.unwrap(), 320, 240);
    s.bridge.stop();
}

/// Another site's page trying both streams of a bridge, as row 8's attacker did.
const FOREIGN_PAGE: &str = r#"<!doctype html><html><body><script>
"use strict";
const probe = window.probe = {};
for (const path of ["/stream", "/ws/stream"]) {
  const p = probe[path] = { open: false, messages: 0, error: false, closed: null };
  const ws = new WebSocket(new URLSearchParams(location.search).get("bridge") + path);
  ws.onopen = () => { p.open = true; };
  ws.onmessage = () => { p.messages++; };
  ws.onerror = () => { p.error = true; };
  ws.onclose = (e) => { p.closed = e.code; };
}
</script></body></html>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sites_page_in_headless_chromium_cannot_open_the_stream() {
    let s = setup(vsockenc(320, 240)).await;
    let page = serve_page_on("127.0.0.3", FOREIGN_PAGE).await;
    let url = format!("http://{page}/?bridge=ws://{}", s.bridge.addr);
    let result = with_chromium(|client| async move {
        client.goto(&url).await.map_err(|e| e.to_string())?;
        poll_page(&client, "window.probe", |v| {
            v["/stream"]["closed"].is_number() && v["/ws/stream"]["closed"].is_number()
        })
        .await
    })
    .await;
    let refused = s.bridge.access.refused.load(std::sync::atomic::Ordering::Relaxed);
    let helix = s.bridge.helix.connections.load(std::sync::atomic::Ordering::Relaxed);
    s.bridge.stop();
    let probe = result.unwrap();
    println!("the foreign page saw: {probe}");
    for path in ["/stream", "/ws/stream"] {
        let p = &probe[path];
        assert_eq!((&p["open"], &p["messages"], &p["error"]), (&false.into(), &0.into(), &true.into()), "{path}: {p}");
    }
    assert!(refused >= 2, "the bridge refused both upgrades ({refused})");
    assert_eq!(helix, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_at_the_header_timeout_and_oversized_heads_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = Duration::from_secs(1);
    let limits = hxfr_bridge::access::Limits { header_timeout: timeout, ..Default::default() };
    let s = setup(BridgeConfig { limits, ..vsockenc(320, 240) }).await;
    let addr = s.bridge.addr;
    let start = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..20 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Half: ").await.unwrap();
        conns.push(c);
    }
    // One more trickles a byte every 200 ms: the timeout is for the whole head, not for silence.
    let trickle = tokio::spawn(async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t = Instant::now();
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
        while c.write_all(b"a").await.is_ok() && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        t.elapsed()
    });
    // The bridge closes each: its reads end (EOF or reset), after the timeout and well before 5 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut closed = 0;
    for c in &mut conns {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => {
                    closed += 1;
                    break;
                }
                Ok(Ok(_)) => {}
                Err(_) => break,
            }
        }
    }
    let took = start.elapsed();
    println!("20 half-sent requests closed by the bridge after {took:?}");
    assert_eq!(closed, 20, "closed by the bridge within 5 s");
    assert!(took >= timeout - Duration::from_millis(100), "not before the timeout: {took:?}");
    let trickled = trickle.await.unwrap();
    assert!(trickled < Duration::from_secs(5), "a trickle is cut too: {trickled:?}");
    // A head over the size limit is refused with 431; the bridge goes on serving.
    let (big, after) = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let head = format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n", "a".repeat(80 * 1024));
        let _ = c.write_all(head.as_bytes());
        let mut answer = [0u8; 12];
        let big = c.read_exact(&mut answer).map(|_| String::from_utf8_lossy(&answer[9..12]).into_owned());
        (big, http_status(addr, "/"))
    })
    .await
    .unwrap();
    assert_eq!(big.ok().as_deref(), Some("431"));
    assert_eq!(after, 200);
    s.bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_does_not_read_is_closed_at_the_write_timeout_and_others_keep_their_frames() {
    let limits = hxfr_bridge::access::Limits { write_timeout: Duration::from_secs(2), ..Default::default() };
    // A high bitrate fills the stalled viewer's socket buffers quickly.
    let s = setup(BridgeConfig { bitrate: 30_000_000, limits, ..vsockenc(1280, 720) }).await;
    let hub = s.bridge.hub.clone();
    let ws = format!("ws://{}/stream", s.bridge.addr);
    let (_stalled, _) = tokio_tungstenite::connect_async(ws.as_str()).await.unwrap(); // never read
    let t0 = Instant::now();
    until("the stalled viewer is subscribed", Duration::from_secs(5), || hub.viewers() == 1).await;
    let url = s.bridge.url();
    let good = tokio::spawn(async move { watch(&url, Duration::from_secs(12), |_| {}).await });
    until("the healthy viewer joins", Duration::from_secs(5), || hub.viewers() == 2).await;
    until("the stalled viewer is closed", Duration::from_secs(30), || hub.viewers() == 1).await;
    let closed_after = t0.elapsed();
    assert!(!good.is_finished(), "the one left is the healthy viewer");
    let r = good.await.unwrap().unwrap();
    println!("stalled viewer closed after {closed_after:?}; healthy viewer: {:.1} fps", r.fps_avg);
    assert_sound(&r, 1280, 720);
    assert!(r.fps_avg >= 25.0, "the healthy viewer keeps its rate: {r:#?}");
    assert!(r.fps_worst_1s >= 20.0, "{r:#?}");
    s.bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_the_next_client_gets_503_until_one_leaves() {
    let limits = hxfr_bridge::access::Limits { max_connections: 3, ..Default::default() };
    let s = setup(BridgeConfig { limits, ..vsockenc(320, 240) }).await;
    let addr = s.bridge.addr;
    let ws = format!("ws://{addr}/stream");
    let (mut viewer, _) = tokio_tungstenite::connect_async(ws.as_str()).await.unwrap();
    let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Connections are accepted in order: these come after the three above.
    assert_eq!(tokio::task::spawn_blocking(move || http_status(addr, "/")).await.unwrap(), 503);
    assert_eq!(upgrade_status(&ws, None, None).await, 503);
    assert_eq!(s.bridge.access.busy.load(std::sync::atomic::Ordering::Relaxed), 2);
    // The viewer inside the cap is unaffected.
    assert!(matches!(next(&mut viewer).await, Message::Text(_) | Message::Binary(_)));
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::task::spawn_blocking(move || http_status(addr, "/")).await.unwrap() != 200 {
        assert!(Instant::now() < deadline, "a slot frees when a connection leaves");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.bridge.stop();
}
