//! `--source scanout:N` end to end: an in-process host whose scanouts are
//! flipped by hand (`MemoryScanouts`, standing in for the VM's GPU), the
//! bridge subscribed to scanout 0, and viewers on `/stream` and `/ws/stream`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hxfr_bridge::probe::{Protocol, watch, watch_as};
use hxfr_bridge::wire::Header;
use hxfr_bridge::{Bridge, BridgeConfig, SCANOUT_ENCODER, Source};
use hxfr_encode::EncoderKind;
use hxfr_host::{HostConfig, HostHandle, ListenAddr, MemoryScanouts, Resolved};
use hxfr_proto::{Layout, PixelFormat};
use hxfr_testkit::{Content, Output, decode_h264, nal_types, pattern_bgrx};
use tokio_tungstenite::tungstenite::Message;

const W: u32 = 320;
const H: u32 = 192;
/// How long "nothing comes" is watched for.
const QUIET: Duration = Duration::from_millis(1500);
const TIMEOUT: Duration = Duration::from_secs(20);

fn host(sock: &std::path::Path, scanouts: &Arc<MemoryScanouts>) -> HostHandle {
    hxfr_host::spawn(
        HostConfig { encoder: EncoderKind::X264, scanouts: Some(scanouts.clone()), ..Default::default() },
        vec![ListenAddr::Unix(sock.to_path_buf())],
        vec![],
    )
    .unwrap()
}

async fn bridge(sock: &std::path::Path) -> Bridge {
    bridge_with(sock, false).await
}

async fn bridge_with(sock: &std::path::Path, enable_scanout: bool) -> Bridge {
    bridge_sized(sock, enable_scanout, W, H).await
}

async fn bridge_sized(sock: &std::path::Path, enable_scanout: bool, width: u32, height: u32) -> Bridge {
    Bridge::start(BridgeConfig {
        source: Source::Scanout(0),
        enable_scanout,
        width,
        height,
        host_encoder: format!("unix:{}", sock.display()),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap()
}

struct Setup {
    scanouts: Arc<MemoryScanouts>,
    _host: HostHandle,
    _dir: tempfile::TempDir,
    bridge: Bridge,
}

/// A host with scanout 0 enabled (showing nothing yet) and a bridge on it.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("h.sock");
    let scanouts = Arc::new(MemoryScanouts::default());
    scanouts.add(0);
    let host = host(&sock, &scanouts);
    let bridge = bridge(&sock).await;
    Setup { scanouts, _host: host, _dir: dir, bridge }
}

fn flip(s: &MemoryScanouts, i: u32) {
    let px = pattern_bgrx(Content::Motion, W, H, W as usize * 4, i);
    s.flip(0, Resolved { data: Bytes::from(px), layout: Layout::inline(PixelFormat::Bgrx, W, H, W * 4) });
}

/// Flips scanout 0 about 30 times a second until dropped.
struct Flipper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl Flipper {
    fn start(s: &Arc<MemoryScanouts>) -> Flipper {
        let (s, stop) = (s.clone(), Arc::new(AtomicBool::new(false)));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut i = 0;
            while !halt.load(Ordering::Relaxed) {
                flip(&s, i);
                i += 1;
                std::thread::sleep(Duration::from_millis(33));
            }
            i
        });
        Flipper { stop, thread: Some(thread) }
    }

    /// Stops flipping; returns how many flips there were.
    fn stop(mut self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Flipper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A `/stream` viewer.
async fn viewer(b: &Bridge) -> Ws {
    let url = b.url().replace("http://", "ws://") + "stream";
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    ws
}

/// The next access unit within `within` (control messages skipped), or `None`.
async fn next_au(ws: &mut Ws, within: Duration) -> Option<(Header, Bytes)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Binary(m)))) => {
                let (h, au) = Header::decode(&m).unwrap();
                return Some((h, Bytes::copy_from_slice(au)));
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "hello" {
                    assert_eq!(v["encoder"], SCANOUT_ENCODER, "{v}");
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("the stream ended: {other:?}"),
        }
    }
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn idr(au: &[u8]) -> bool {
    let t = nal_types(au);
    t.contains(&5) && t.contains(&7) && t.contains(&8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_frames_reach_both_endpoints_decodable_from_a_keyframe() {
    let s = setup().await;
    assert_eq!(s.bridge.choice.element, SCANOUT_ENCODER);
    let flipper = Flipper::start(&s.scanouts);
    let mut ws = viewer(&s.bridge).await;
    let mut aus = Vec::new();
    while aus.len() < 30 {
        let (h, au) = next_au(&mut ws, TIMEOUT).await.expect("frames while the scanout flips");
        if aus.is_empty() {
            assert!(h.keyframe && idr(&au), "the first unit is an IDR with SPS/PPS: {:?}", nal_types(&au));
        }
        assert_eq!((h.width, h.height), (W, H), "the scanout's size from the SPS");
        assert!(h.codec.starts_with("avc1.42"), "{}", h.codec);
        aus.push(au);
    }
    let pictures = decode_h264(&aus, Output::Nv12).unwrap();
    assert_eq!(pictures.len(), aus.len(), "every unit decodes");
    // The probe helpers, over hxfr's and Helix's endpoints, see a sound stream too.
    let r = watch(&s.bridge.url(), Duration::from_secs(2), |_| {}).await.unwrap();
    assert!(r.ok(), "{r:#?}");
    assert_eq!((r.width, r.height, r.encoder.as_str()), (W, H, SCANOUT_ENCODER));
    assert!(r.frames >= 30, "{r:#?}");
    let r = watch_as(&s.bridge.helix_url(), Protocol::Helix, Duration::from_secs(2), |_| {}).await.unwrap();
    assert!(r.ok(), "{r:#?}");
    assert!(r.frames >= 30, "{r:#?}");
    flipper.stop();
    let c = s.bridge.scanout().unwrap();
    assert_eq!(c.subscribed.load(Ordering::Relaxed), 1);
    assert_eq!(c.refused.load(Ordering::Relaxed), 0);
    s.bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_still_scanout_sends_nothing_and_a_viewers_keyframe_request_gets_an_idr() {
    let s = setup().await;
    let mut ws = viewer(&s.bridge).await;
    until("the viewer to join", || s.bridge.hub.viewers() == 1).await;
    assert!(next_au(&mut ws, QUIET).await.is_none(), "nothing shown, nothing flipped: no frames");
    // Flips: frames, starting at an IDR.
    for i in 0..5 {
        flip(&s.scanouts, i);
        let (h, au) = next_au(&mut ws, TIMEOUT).await.expect("a frame per flip");
        assert_eq!(h.keyframe, i == 0, "frame {i}: only the first is a keyframe");
        assert_eq!(idr(&au), i == 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still: nothing more.
    assert!(next_au(&mut ws, QUIET).await.is_none(), "a still scanout sends nothing");
    // The viewer asks for a keyframe: the host makes an IDR of what is shown.
    until("the keyframe request window", || s.bridge.hub.keyframe_request_open()).await;
    let asked = s.bridge.scanout().unwrap().keyframe_requests.load(Ordering::Relaxed);
    ws.send(Message::Text(r#"{"type":"keyframe"}"#.into())).await.unwrap();
    let (h, au) = next_au(&mut ws, TIMEOUT).await.expect("an IDR for the keyframe request");
    assert!(h.keyframe && idr(&au), "{:?}", nal_types(&au));
    assert_eq!(s.bridge.scanout().unwrap().keyframe_requests.load(Ordering::Relaxed), asked + 1, "one KEYFRAME_REQ");
    assert!(next_au(&mut ws, QUIET).await.is_none(), "and then nothing again");
    s.bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_waits_for_the_host_and_the_scanout_and_comes_back_after_a_host_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("h.sock");
    let scanouts = Arc::new(MemoryScanouts::default());
    // No host yet: the bridge keeps trying.
    let b = bridge(&sock).await;
    let mut ws = viewer(&b).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let c = b.scanout().unwrap();
    assert_eq!(c.connections.load(Ordering::Relaxed), 0);
    // A host without scanout 0: refused, asked again.
    let first = host(&sock, &scanouts);
    until("a refused SUBSCRIBE", || c.refused.load(Ordering::Relaxed) >= 1).await;
    assert_eq!(c.subscribed.load(Ordering::Relaxed), 0);
    scanouts.add(0);
    until("the subscription", || c.subscribed.load(Ordering::Relaxed) == 1).await;
    let flipper = Flipper::start(&scanouts);
    let (h, _) = next_au(&mut ws, TIMEOUT).await.expect("frames once subscribed");
    assert!(h.keyframe);
    // The host goes away and comes back: the bridge subscribes again and
    // the same viewer gets frames again, from an IDR.
    first.stop();
    let _second = host(&sock, &scanouts);
    until("the second subscription", || c.subscribed.load(Ordering::Relaxed) == 2).await;
    let mut aus = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    // Skip what was in flight from the first host; from the next keyframe on, all decodes.
    while aus.len() < 10 {
        assert!(Instant::now() < deadline, "no frames after the restart");
        let (h, au) = next_au(&mut ws, TIMEOUT).await.expect("frames from the second host");
        if h.keyframe || !aus.is_empty() {
            aus.push(au);
        }
    }
    assert_eq!(decode_h264(&aus, Output::Nv12).unwrap().len(), aus.len());
    flipper.stop();
    assert!(c.connections.load(Ordering::Relaxed) >= 2);
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanout_the_host_cannot_enable_is_subscribed_to_anyway() {
    // This host has no D-Bus display to hot-plug with: ENABLE_SCANOUT gets success=0.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("h.sock");
    let scanouts = Arc::new(MemoryScanouts::default());
    scanouts.add(0);
    let _host = host(&sock, &scanouts);
    let b = bridge_with(&sock, true).await;
    let c = b.scanout().unwrap();
    until("the subscription", || c.subscribed.load(Ordering::Relaxed) == 1).await;
    assert_eq!((c.enabled.load(Ordering::Relaxed), c.enable_failed.load(Ordering::Relaxed)), (0, 1));
    let mut ws = viewer(&b).await;
    flip(&scanouts, 0);
    let (h, au) = next_au(&mut ws, TIMEOUT).await.expect("a frame for the flip");
    assert!(h.keyframe && idr(&au));
    b.stop();
}

/// Hello and Helix's StreamInit announce the scanout's real size once it is
/// known, whatever `--size` said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_viewers_are_told_the_scanouts_size_not_the_configured_one() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("h.sock");
    let scanouts = Arc::new(MemoryScanouts::default());
    scanouts.add(0);
    let _host = host(&sock, &scanouts);
    let b = bridge_sized(&sock, false, 640, 480).await;
    let mut first = viewer(&b).await;
    flip(&scanouts, 0);
    let (h, _) = next_au(&mut first, TIMEOUT).await.expect("a frame for the flip");
    assert_eq!((h.width, h.height), (W, H));
    assert_eq!(b.hub.size(), Some((W, H)));
    let (mut ws, _) = tokio_tungstenite::connect_async(b.url().replace("http://", "ws://") + "stream").await.unwrap();
    let Some(Ok(Message::Text(hello))) = ws.next().await else { panic!("hello first") };
    let hello: serde_json::Value = serde_json::from_str(&hello).unwrap();
    assert_eq!((hello["width"].as_u64(), hello["height"].as_u64()), (Some(W as u64), Some(H as u64)), "{hello}");
    let (mut helix, _) = tokio_tungstenite::connect_async(b.helix_url()).await.unwrap();
    let init = r#"{"type":"init","host_id":0,"app_id":0,"session_id":"t","width":1920,"height":1080,"fps":60,"bitrate":20000,"packet_size":1024,"play_audio_local":false,"video_supported_formats":1}"#;
    helix.send(Message::Text(init.into())).await.unwrap();
    let Some(Ok(Message::Binary(si))) = helix.next().await else { panic!("StreamInit first") };
    let be16 = |i: usize| u16::from_be_bytes([si[i], si[i + 1]]) as u32;
    assert_eq!((si[0], be16(2), be16(4)), (0x30, W, H), "StreamInit: {si:02x?}");
    b.stop();
}

/// A still desktop sends nothing for long stretches: the bridge's PINGs
/// (answered with PONG) keep the subscription, so nothing is reconnected
/// and the next flip is a P frame, not the IDR of a new subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_still_stretch_keeps_the_subscription() {
    let s = setup().await;
    let mut ws = viewer(&s.bridge).await;
    flip(&s.scanouts, 0);
    let (h, _) = next_au(&mut ws, TIMEOUT).await.expect("a frame for the flip");
    assert!(h.keyframe);
    // Nothing while still, but for the IDR the viewer's joining asked for: its
    // KEYFRAME_REQ may reach the host after the flip (then the host re-encodes
    // the picture once, as an IDR).
    let still_until = Instant::now() + hxfr_bridge::scanout::DEAD_AFTER + Duration::from_secs(2);
    let mut repeats = 0;
    while let Some((h, _)) = next_au(&mut ws, still_until.saturating_duration_since(Instant::now())).await {
        assert!(h.keyframe && repeats == 0, "a frame while still that no request asked for");
        repeats += 1;
    }
    flip(&s.scanouts, 1);
    let (h, _) = next_au(&mut ws, TIMEOUT).await.expect("a frame for the next flip");
    assert!(!h.keyframe, "the same subscription goes on: a P frame");
    let c = s.bridge.scanout().unwrap();
    assert_eq!((c.connections.load(Ordering::Relaxed), c.subscribed.load(Ordering::Relaxed)), (1, 1));
    s.bridge.stop();
}
