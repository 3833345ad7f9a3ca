//! A desktop you can use, end to end: a real headless Mutter (its own D-Bus,
//! runtime dir and PipeWire, started here and stopped at the end) captured
//! with `--source gnome` through vsockenc and a real host; the page in
//! headless Chromium clicks into its terminal and types; X11 through Xvfb
//! and XTest; view-only and wrong-token viewers; clipboard both ways; and
//! malformed input that leaves the bridge serving.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hxfr_bridge::desktop::DesktopConfig;
use hxfr_bridge::wire::Header;
use hxfr_bridge::{Bridge, BridgeConfig, Source};
use hxfr_desktop::headless::{HeadlessConfig, HeadlessDesktop};
use hxfr_encode::EncoderKind;
use hxfr_host::{HostConfig, HostHandle, ListenAddr};
use hxfr_testkit::{Output, Picture, decode_h264};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::chromium::{poll_page, with_chromium};

const W: u32 = 1280;
const H: u32 = 720;

struct Setup {
    bridge: Bridge,
    _host: HostHandle,
    _dir: tempfile::TempDir,
}

fn host(dir: &Path) -> (HostHandle, PathBuf) {
    let sock = dir.join("h.sock");
    let host = hxfr_host::spawn(
        HostConfig { encoder: EncoderKind::X264, ..Default::default() },
        vec![ListenAddr::Unix(sock.clone())],
        vec![],
    )
    .unwrap();
    (host, sock)
}

async fn bridge(source: Source, desktop: DesktopConfig, tweak: impl FnOnce(&mut BridgeConfig)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (host, sock) = host(dir.path());
    let mut cfg = BridgeConfig {
        source,
        width: W,
        height: H,
        encoder: "vsockenc".into(),
        host_encoder: format!("unix:{}", sock.display()),
        listen: "127.0.0.1:0".parse().unwrap(),
        desktop,
        ..Default::default()
    };
    tweak(&mut cfg);
    let bridge = Bridge::start(cfg).await.unwrap();
    Setup { bridge, _host: host, _dir: dir }
}

/// A private headless GNOME desktop with a terminal in it.
async fn gnome() -> HeadlessDesktop {
    HeadlessDesktop::start(HeadlessConfig { width: W, height: H, apps: vec![vec!["foot".into()]] })
        .await
        .expect("a headless Mutter session (scripts/install-deps.sh installs mutter, pipewire, wireplumber, foot)")
}

fn gnome_config(d: &HeadlessDesktop) -> DesktopConfig {
    DesktopConfig { dbus_address: Some(d.dbus_address().to_string()), pipewire_socket: Some(d.pipewire_socket()) }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn viewer(b: &Bridge) -> (Ws, serde_json::Value) {
    let url = format!("ws://{}/stream", b.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("hello in time") {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "hello" {
                    return (ws, v);
                }
            }
            Some(Ok(_)) => {}
            other => panic!("no hello: {other:?}"),
        }
    }
}

/// Access units from the next keyframe on, for `span`.
async fn grab(ws: &mut Ws, span: Duration) -> Vec<Bytes> {
    let mut aus = Vec::new();
    let end = Instant::now() + span + Duration::from_secs(10);
    let mut started = None;
    while Instant::now() < end && started.is_none_or(|t: Instant| t.elapsed() < span) {
        let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await else { break };
        let Message::Binary(b) = m else { continue };
        let (h, au) = Header::decode(&b).unwrap();
        if aus.is_empty() && !h.keyframe {
            continue;
        }
        started.get_or_insert_with(Instant::now);
        aus.push(Bytes::copy_from_slice(au));
    }
    assert!(!aus.is_empty(), "no frames from the bridge");
    aus
}

/// The last picture of what the bridge streams now.
async fn picture(ws: &mut Ws) -> Picture {
    // A keyframe for this grab: the hub forces one when asked.
    ws.send(Message::Text(r#"{"type":"keyframe"}"#.into())).await.unwrap();
    let aus = grab(ws, Duration::from_millis(500)).await;
    decode_h264(&aus, Output::Bgrx).unwrap().pop().expect("a decoded picture")
}

/// Distinct colours (4 bits a channel) in a picture: a blank one has a few.
fn colours(p: &Picture) -> usize {
    let mut seen = std::collections::HashSet::new();
    for px in p.data.chunks_exact(4).step_by(7) {
        seen.insert((px[0] >> 4, px[1] >> 4, px[2] >> 4));
    }
    seen.len()
}

/// Mean absolute difference per byte between two pictures of one size.
fn difference(a: &Picture, b: &Picture) -> f64 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let sum: u64 = a.data.iter().zip(&b.data).map(|(x, y)| x.abs_diff(*y) as u64).sum();
    sum as f64 / a.data.len() as f64
}

async fn send_json(ws: &mut Ws, v: serde_json::Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The input messages the page sends to type `text`.
fn key_messages(text: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for c in text.chars() {
        let (code, shift) = dom_code(c);
        if shift {
            out.push(serde_json::json!({"type":"key","code":"ShiftLeft","down":true}));
        }
        for down in [true, false] {
            out.push(serde_json::json!({"type":"key","code":code,"key":c.to_string(),"down":down}));
        }
        if shift {
            out.push(serde_json::json!({"type":"key","code":"ShiftLeft","down":false}));
        }
    }
    out
}

/// Types `text` through the bridge's input messages, as the page would.
async fn type_text(ws: &mut Ws, text: &str) {
    for m in key_messages(text) {
        send_json(ws, m).await;
    }
}

/// The US-layout `KeyboardEvent.code` for a character, and whether Shift is needed.
fn dom_code(c: char) -> (String, bool) {
    match c {
        'a'..='z' => (format!("Key{}", c.to_ascii_uppercase()), false),
        'A'..='Z' => (format!("Key{c}"), true),
        '0'..='9' => (format!("Digit{c}"), false),
        ' ' => ("Space".into(), false),
        '\n' => ("Enter".into(), false),
        '/' => ("Slash".into(), false),
        '.' => ("Period".into(), false),
        '-' => ("Minus".into(), false),
        '_' => ("Minus".into(), true),
        '>' => ("Period".into(), true),
        other => panic!("no key for {other:?} in this test"),
    }
}

/// Letters only: typed with Shift held, digits would come out as symbols.
fn token() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut v = t ^ (std::process::id() as u64).rotate_left(32);
    (0..12)
        .map(|_| {
            let c = (b'a' + (v % 26) as u8) as char;
            v /= 26;
            c
        })
        .collect()
}

/// Waits until `path` holds `want` (a line the terminal wrote).
async fn file_says(path: &Path, want: &str, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.trim() == want
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} never said {want:?} (it says {:?})",
                path.display(),
                std::fs::read_to_string(path).ok()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the terminal is on screen: the picture is no longer the bare desktop.
async fn until_not_blank(ws: &mut Ws) -> Picture {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = picture(ws).await;
        if colours(&p) >= 4 || Instant::now() > deadline {
            return p;
        }
    }
}

/// `--source gnome`: the bridge opens Mutter's ScreenCast itself; with the
/// keepalive a still desktop streams at the full rate; the picture is the
/// desktop (not blank), and it changes when the terminal does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gnome_desktop_streams_at_full_rate_and_shows_what_changes() {
    let desk = gnome().await;
    let s = bridge(Source::Gnome, gnome_config(&desk), |_| {}).await;
    assert_eq!(s.bridge.input.desktop(), Some("gnome"));
    let (mut ws, hello) = viewer(&s.bridge).await;
    assert_eq!((hello["input"].as_str(), hello["interactive"].as_bool()), (Some("gnome"), Some(true)), "{hello}");
    let before = until_not_blank(&mut ws).await;
    assert_eq!((before.width, before.height), (W, H));
    assert!(colours(&before) >= 4, "the desktop looks blank ({} colours)", colours(&before));
    let r = hxfr_bridge::probe::watch(&s.bridge.url(), Duration::from_secs(4), |_| {}).await.unwrap();
    assert!(r.fps_avg >= 25.0, "a still desktop with the keepalive: {r:#?}");
    // Click into the terminal and type: the picture changes.
    send_json(&mut ws, serde_json::json!({"type":"pointer","x":0.5,"y":0.5})).await;
    for down in [true, false] {
        send_json(&mut ws, serde_json::json!({"type":"button","button":0,"down":down})).await;
    }
    type_text(&mut ws, "echo the quick brown fox jumps over the lazy dog").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut after = picture(&mut ws).await;
    while difference(&before, &after) < 0.05 && Instant::now() < deadline {
        after = picture(&mut ws).await;
    }
    assert!(difference(&before, &after) >= 0.05, "typing changed nothing on screen");
    println!(
        "gnome: {:.1} fps, {} colours, typing changed the picture by {:.2}",
        r.fps_avg,
        colours(&after),
        difference(&before, &after)
    );
    s.bridge.shutdown().await;
}

/// The page in headless Chromium clicks into the GNOME terminal and types a
/// command (through a modifier: Shift makes the token upper case); the file
/// the command writes proves every key arrived, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_types_into_a_gnome_terminal() {
    let desk = gnome().await;
    let s = bridge(Source::Gnome, gnome_config(&desk), |_| {}).await;
    let out = tempfile::tempdir().unwrap();
    let (lower, file) = (token(), out.path().join("typed"));
    let url = s.bridge.url();
    let (f, l) = (file.clone(), lower.clone());
    let stats = with_chromium(|client| async move {
        // WebDriver's Shift (U+E008) stays down until NULL (U+E000); Enter is U+E007.
        let keys = format!("echo \u{E008}{l}\u{E000} > {} && cat {}\u{E007}", f.display(), f.display());
        click_and_type(&client, &url, &keys).await?;
        file_says(&f, &l.to_uppercase(), Duration::from_secs(20)).await?;
        // What a person sees: the terminal with the command and its output, a
        // second of frames after the command ran.
        let now = client.execute("return window.hxfrStats.decoded", vec![]).await.map_err(|e| e.to_string())?;
        let then = now.as_u64().unwrap_or(0) + 30;
        let stats = poll_page(&client, "window.hxfrStats", |v| {
            v["latency_p50_ms"].is_number() && v["decoded"].as_u64() >= Some(then)
        })
        .await?;
        let png = client.screenshot().await.map_err(|e| e.to_string())?;
        std::fs::write(Path::new(env!("CARGO_TARGET_TMPDIR")).join("desktop-page.png"), png)
            .map_err(|e| e.to_string())?;
        Ok(stats)
    })
    .await
    .unwrap();
    println!("gnome page: glass-to-glass p50 {} ms, {} fps", stats["latency_p50_ms"], stats["fps"]);
    let c = &s.bridge.input.counters;
    assert_eq!(c.invalid.load(std::sync::atomic::Ordering::Relaxed), 0, "the page sent nothing the bridge refused");
    s.bridge.shutdown().await;
}

/// Nothing a refused viewer types reaches the desktop. A view-only bridge
/// tells its page so (the page sends nothing) and refuses the input messages
/// a client sends anyway; a viewer with the wrong token does not get a socket
/// at all. Then the test's own RemoteDesktop session types a marker command:
/// once its file appears, anything typed before it would have, too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_only_and_wrong_token_viewers_type_and_nothing_arrives() {
    use std::sync::atomic::Ordering::Relaxed;
    let desk = gnome().await;
    let out = tempfile::tempdir().unwrap();
    let (refused_file, marker) = (out.path().join("refused"), out.path().join("marker"));
    let cmd = format!("echo nope > {}\n", refused_file.display());
    {
        let s = bridge(Source::Gnome, gnome_config(&desk), |c| c.view_only = true).await;
        let (mut ws, hello) = viewer(&s.bridge).await;
        assert_eq!(hello["interactive"], false, "{hello}");
        send_json(&mut ws, serde_json::json!({"type":"pointer","x":0.5,"y":0.5})).await;
        send_json(&mut ws, serde_json::json!({"type":"button","button":0,"down":true})).await;
        send_json(&mut ws, serde_json::json!({"type":"button","button":0,"down":false})).await;
        type_text(&mut ws, &cmd).await;
        let sent = 3 + key_messages(&cmd).len() as u64;
        let c = &s.bridge.input.counters;
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.refused.load(Relaxed) < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!((c.refused.load(Relaxed), c.accepted.load(Relaxed)), (sent, 0));
        s.bridge.shutdown().await;
    }
    {
        let s = bridge(Source::Gnome, gnome_config(&desk), |c| c.token = Some("right-token".into())).await;
        let wrong = format!("ws://{}/stream?token=wrong-token", s.bridge.addr);
        match tokio_tungstenite::connect_async(wrong.as_str()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
            other => panic!("a wrong token got {other:?}"),
        }
        let page = reqwest_status(&s.bridge, "/?token=wrong-token").await;
        assert_eq!(page, 401);
        assert_eq!(s.bridge.input.counters.accepted.load(Relaxed), 0);
        s.bridge.shutdown().await;
    }
    // The marker, typed by a session of the test's own into the same terminal.
    let (tx, rx) = hxfr_desktop::control::clipboard_channel();
    let (_session, input) = hxfr_desktop::gnome::GnomeDesktop::start(
        hxfr_desktop::gnome::GnomeConfig { dbus_address: Some(desk.dbus_address().to_string()) },
        tx,
    )
    .await
    .unwrap();
    let control = hxfr_desktop::Control::spawn(input, rx);
    for m in [
        r#"{"type":"pointer","x":0.5,"y":0.5}"#,
        r#"{"type":"button","button":0,"down":true}"#,
        r#"{"type":"button","button":0,"down":false}"#,
    ] {
        control.send(0, hxfr_desktop::ViewerMessage::parse(m).unwrap());
    }
    for m in key_messages(&format!("echo done > {}\n", marker.display())) {
        control.send(0, hxfr_desktop::ViewerMessage::parse(&m.to_string()).unwrap());
    }
    file_says(&marker, "done", Duration::from_secs(20)).await.unwrap();
    assert!(!refused_file.exists(), "a refused viewer's command ran");
}

/// Opens the page, waits until it is interactive and decoding, clicks the
/// picture and types `keys` (WebDriver key codes allowed).
async fn click_and_type(client: &fantoccini::Client, url: &str, keys: &str) -> Result<(), String> {
    client.goto(url).await.map_err(|e| e.to_string())?;
    poll_page(client, "window.hxfrStats || null", |v| v["interactive"] == true && v["decoded"].as_u64() >= Some(10))
        .await?;
    let canvas = client.find(fantoccini::Locator::Id("screen")).await.map_err(|e| e.to_string())?;
    canvas.click().await.map_err(|e| e.to_string())?;
    canvas.send_keys(keys).await.map_err(|e| e.to_string())
}

/// The HTTP status of a GET on the bridge.
async fn reqwest_status(b: &Bridge, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n", b.addr.port());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 64];
    let n = s.read(&mut head).await.unwrap();
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Malformed input (fuzzed values, unknown types and codes, fields that do
/// not belong, an oversize message) and a flood of 10 000 events: the bridge
/// counts and drops them, and keeps streaming to another viewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_and_floods_leave_the_bridge_serving() {
    use std::sync::atomic::Ordering::Relaxed;
    let desk = gnome().await;
    let s = bridge(Source::Gnome, gnome_config(&desk), |_| {}).await;
    let (mut ws, _) = viewer(&s.bridge).await;
    // Streaming first: what follows must not stop it.
    until_not_blank(&mut ws).await;
    let bad = [
        "not json",
        "[1,2,3]",
        r#"{"type":"key","code":"NoSuchKey","down":true}"#,
        r#"{"type":"key","code":"KeyA","down":"yes"}"#,
        r#"{"type":"pointer","x":1e308,"y":-5}"#,
        r#"{"type":"pointer","x":null,"y":0}"#,
        r#"{"type":"button","button":99,"down":true}"#,
        r#"{"type":"wheel","dx":1000000,"dy":0}"#,
        r#"{"type":"scroll","dx":"NaN","dy":0}"#,
        r#"{"type":"pointer","x":0.1,"y":0.1,"evil":true}"#,
        r#"{"type":"warp-drive"}"#,
        r#"{"type":7}"#,
    ];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut fuzzed = Vec::new();
    for _ in 0..200 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let ty = ["key", "pointer", "button", "wheel", "scroll", "release", "clipboard"][(rng % 7) as usize];
        let v = f64::from_bits(rng.rotate_left(11)); // any double: NaN, infinities, huge, tiny
        let v = if v.is_finite() { serde_json::json!(v) } else { serde_json::json!(rng as i64) };
        fuzzed.push(
            serde_json::json!({"type":ty,"x":v,"y":v,"dx":v,"dy":v,"button":v,"code":v,"down":v,"text":v}).to_string(),
        );
    }
    for m in bad.iter().map(|s| s.to_string()).chain(fuzzed) {
        ws.send(Message::Text(m.into())).await.unwrap();
    }
    // 10 000 pointer moves as fast as they go.
    for i in 0..10_000u32 {
        let m = format!(r#"{{"type":"pointer","x":{},"y":0.5}}"#, (i % 1000) as f64 / 1000.0);
        ws.send(Message::Text(m.into())).await.unwrap();
    }
    let c = &s.bridge.input.counters;
    let control = s.bridge.input.control().unwrap();
    // Every event is either taken or dropped at the full queue, and counted.
    let handled = || c.accepted.load(Relaxed) + control.stats.dropped.load(Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while handled() < 10_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.invalid.load(Relaxed) >= bad.len() as u64, "{c:?}");
    assert!(handled() >= 10_000, "{c:?} {:?}", control.stats);
    println!(
        "flood: {} accepted, {} invalid, {} injected, {} dropped",
        c.accepted.load(Relaxed),
        c.invalid.load(Relaxed),
        control.stats.injected.load(Relaxed),
        control.stats.dropped.load(Relaxed)
    );
    // An oversize message closes that viewer's socket, and nobody else's.
    let huge = "x".repeat(2 << 20);
    let _ = ws.send(Message::Text(format!(r#"{{"type":"clipboard","text":"{huge}"}}"#).into())).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an oversize message did not close its socket");
    let r = hxfr_bridge::probe::watch(&s.bridge.url(), Duration::from_secs(3), |_| {}).await.unwrap();
    assert!(r.ok() && r.fps_avg >= 20.0, "the bridge stopped serving: {r:#?}");
    s.bridge.shutdown().await;
}

/// `--source x11`: the page in headless Chromium types into an xterm under
/// Xvfb through XTest, a modifier included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_types_into_an_x11_terminal() {
    let x = common::x11::Xvfb::start(W, H);
    let s = bridge(Source::X11(Some(x.display.clone())), DesktopConfig::default(), |_| {}).await;
    assert_eq!(s.bridge.input.desktop(), Some("x11"));
    let (mut ws, _) = viewer(&s.bridge).await;
    until_not_blank(&mut ws).await;
    let out = tempfile::tempdir().unwrap();
    let (lower, file) = (token(), out.path().join("typed"));
    let url = s.bridge.url();
    let (f, l) = (file.clone(), lower.clone());
    with_chromium(|client| async move {
        let keys = format!("echo \u{E008}{l}\u{E000} > {}\u{E007}", f.display());
        click_and_type(&client, &url, &keys).await
    })
    .await
    .unwrap();
    file_says(&file, &lower.to_uppercase(), Duration::from_secs(20)).await.unwrap();
    s.bridge.shutdown().await;
}

/// Clipboard, text both ways, on X11: text copied on the desktop (xclip owns
/// CLIPBOARD) reaches the page; text pasted on the page becomes the
/// desktop's CLIPBOARD, which xclip reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clipboard_goes_both_ways_between_the_page_and_an_x11_desktop() {
    let mut x = common::x11::Xvfb::start(W, H);
    let s = bridge(Source::X11(Some(x.display.clone())), DesktopConfig::default(), |_| {}).await;
    let display = x.display.clone();
    // xclip -quiet stays in the foreground (so it is ours to stop) owning CLIPBOARD.
    let copier = x.spawn(
        std::process::Command::new("xclip")
            .args(["-quiet", "-selection", "clipboard"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let mut stdin = copier.stdin.take().unwrap();
    let copy = move |text: &str| {
        use std::io::Write;
        stdin.write_all(text.as_bytes()).map_err(|e| e.to_string())
    };
    let read = || {
        command_output(
            std::process::Command::new("xclip").args(["-o", "-selection", "clipboard"]).env("DISPLAY", &display),
        )
    };
    clipboard_both_ways(&s.bridge, copy, read).await;
    s.bridge.shutdown().await;
}

/// Clipboard, text both ways, on GNOME: `wl-copy` (a Wayland client of the
/// desktop) copies and the page receives it; text pasted on the page becomes
/// the desktop's selection, which `wl-paste` reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clipboard_goes_both_ways_between_the_page_and_a_gnome_desktop() {
    let mut desk = gnome().await;
    let s = bridge(Source::Gnome, gnome_config(&desk), |_| {}).await;
    let env = desk.env();
    let copy = |text: &str| {
        desk.spawn(&["wl-copy".into(), "--foreground".into(), text.into()]).map(drop).map_err(|e| e.to_string())
    };
    let read = || {
        command_output(
            std::process::Command::new("wl-paste")
                .arg("--no-newline")
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_os_str()))),
        )
    };
    clipboard_both_ways(&s.bridge, copy, read).await;
    s.bridge.shutdown().await;
}

fn command_output(cmd: &mut std::process::Command) -> String {
    cmd.output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// The page's half of the clipboard tests: once the page is interactive the
/// desktop copies (`copy`), and the page must receive the text; then text
/// pasted on the page (as from the browser's menu) must become the desktop's
/// clipboard (`read`).
async fn clipboard_both_ways(b: &Bridge, copy: impl FnOnce(&str) -> Result<(), String>, read: impl Fn() -> String) {
    let (from_desktop, from_page) =
        (format!("copied on the desktop {}", token()), format!("pasted on the page {}", token()));
    let url = b.url();
    let (text, page_text) = (from_desktop.clone(), from_page.clone());
    with_chromium(|client| async move {
        client.goto(&url).await.map_err(|e| e.to_string())?;
        poll_page(&client, "window.hxfrStats || null", |v| v["interactive"] == true).await?;
        // The desktop copies only now: the page must hear of the change.
        copy(&text)?;
        poll_page(&client, "window.hxfrStats.clipboard", |v| v.as_str() == Some(text.as_str())).await?;
        let js = format!(
            "const dt = new DataTransfer(); dt.setData('text/plain', {}); \
             document.dispatchEvent(new ClipboardEvent('paste', {{clipboardData: dt, bubbles: true}})); return true;",
            serde_json::json!(page_text)
        );
        client.execute(&js, vec![]).await.map_err(|e| e.to_string())?;
        Ok(())
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = read();
    while got != from_page && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = read();
    }
    assert_eq!(got, from_page, "the desktop's clipboard after a paste on the page");
}

/// Mutter dies and comes back: the bridge makes a new session, the running
/// pipeline follows its PipeWire node (whatever its id), frames keep coming
/// and input reaches the new session (a new terminal runs a typed command).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_follows_mutter_through_a_restart() {
    let mut desk = gnome().await;
    let s = bridge(Source::Gnome, gnome_config(&desk), |_| {}).await;
    let (mut ws, _) = viewer(&s.bridge).await;
    let with_terminal = until_not_blank(&mut ws).await;
    desk.restart_compositor().await.unwrap();
    // The terminal died with Mutter: a picture without it proves the frames
    // come from the new session (a capture left on the old node would repeat
    // its last frame for ever).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut now = picture(&mut ws).await;
    while difference(&with_terminal, &now) < 1.0 && Instant::now() < deadline {
        now = picture(&mut ws).await;
    }
    assert!(difference(&with_terminal, &now) >= 1.0, "the picture still shows the old session's terminal");
    desk.spawn(&["foot".to_string()]).unwrap();
    let r = hxfr_bridge::probe::watch(&s.bridge.url(), Duration::from_secs(2), |_| {}).await.unwrap();
    assert!(r.ok() && r.fps_avg >= 20.0, "after the restart: {r:#?}");
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("after-restart");
    let deadline = Instant::now() + Duration::from_secs(30);
    // The new terminal takes a moment to map: click and type until the file says it.
    loop {
        send_json(&mut ws, serde_json::json!({"type":"pointer","x":0.5,"y":0.5})).await;
        for down in [true, false] {
            send_json(&mut ws, serde_json::json!({"type":"button","button":0,"down":down})).await;
        }
        type_text(&mut ws, &format!("echo restarted > {}\n", file.display())).await;
        if file_says(&file, "restarted", Duration::from_secs(5)).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "input never reached the new session");
    }
    s.bridge.shutdown().await;
}
