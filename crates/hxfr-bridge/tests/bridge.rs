//! The bridge end to end: a real host, vsockenc, the web server, viewers.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hxfr_bridge::viewer::{Report, watch};
use hxfr_bridge::{Bridge, BridgeConfig};
use hxfr_encode::EncoderKind;
use hxfr_host::{HostConfig, HostHandle, ListenAddr};

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
    tokio::time::sleep(Duration::from_millis(1500)).await;
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
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
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
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut driver = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromedriver (Debian package chromium-driver) must be installed");
    let result = drive_chromium(port, &s.bridge.url()).await;
    let _ = driver.kill(); // the process we started, by its handle
    let _ = driver.wait();
    s.bridge.stop();
    let stats = result.unwrap();
    println!("page stats: {stats}");
}

async fn drive_chromium(port: u16, url: &str) -> Result<serde_json::Value, String> {
    let profile = tempfile::tempdir().unwrap();
    let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--disable-quic", "--window-size=1280,760",
                     format!("--user-data-dir={}", profile.path().display())]
        }
    }))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let client = loop {
        match fantoccini::ClientBuilder::native()
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(format!("chromedriver: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    client.goto(url).await.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(40);
    let stats = loop {
        let v = client.execute("return window.hxfrStats || null", vec![]).await.map_err(|e| e.to_string())?;
        if v["decoded"].as_u64().unwrap_or(0) >= 60 && v["latency_p50_ms"].is_number() {
            break v;
        }
        if Instant::now() > deadline {
            let text = client.execute("return document.body.innerText", vec![]).await.ok();
            return Err(format!("page did not reach 60 decoded frames: {v} / {text:?}"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
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
    let _ = client.close().await;
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
