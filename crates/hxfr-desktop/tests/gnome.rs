//! Against a real headless Mutter (its own bus, runtime dir and PipeWire):
//! capture through the session's PipeWire node, typing and clicking into a
//! terminal, the clipboard both ways, and a compositor restart.
//!
//! The sessions run one at a time: several Mutters on a 2-core machine make
//! every deadline here a coin toss.

use std::hash::{BuildHasher, Hasher};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gst::prelude::*;
use hxfr_desktop::control::{Control, clipboard_channel};
use hxfr_desktop::keys::{BTN_LEFT, KEY_LEFTSHIFT, evdev_code};
use hxfr_desktop::{
    Backend, GnomeConfig, GnomeDesktop, GnomeInput, HeadlessConfig, HeadlessDesktop, InputEvent, ViewerMessage,
};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const W: u32 = 1024;
const H: u32 = 768;

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_test_writer()
        .try_init();
    gst::init().expect("gstreamer");
}

async fn desktop(apps: &[&[&str]]) -> HeadlessDesktop {
    let apps = apps.iter().map(|a| a.iter().map(|s| s.to_string()).collect()).collect();
    HeadlessDesktop::start(HeadlessConfig { width: W, height: H, apps }).await.expect("headless mutter")
}

async fn gnome(d: &HeadlessDesktop) -> (GnomeDesktop, GnomeInput, hxfr_desktop::control::ClipboardRx) {
    let (tx, rx) = clipboard_channel();
    let (g, input) = GnomeDesktop::start(GnomeConfig { dbus_address: Some(d.dbus_address().into()) }, tx)
        .await
        .expect("a Mutter remote desktop session");
    (g, input, rx)
}

/// One test's desktop: a session of its own (one at a time), its capture
/// and the control queue in front of its input.
struct Rig {
    d: HeadlessDesktop,
    g: GnomeDesktop,
    cap: Capture,
    c: Control,
    t0: Instant,
    _one: tokio::sync::MutexGuard<'static, ()>,
}

async fn rig(apps: &[&[&str]]) -> Rig {
    init();
    let one = ONE_AT_A_TIME.lock().await;
    let t0 = Instant::now();
    let d = desktop(apps).await;
    let (g, input, clip) = gnome(&d).await;
    let cap = Capture::new(&d, g.node().borrow().expect("a node"));
    let c = Control::spawn(input, clip);
    Rig { d, g, cap, c, t0, _one: one }
}

impl Rig {
    /// Ends the session before Mutter (which will not exit while it is open).
    async fn done(self, what: &str) {
        drop(self.c);
        self.g.stop().await;
        eprintln!("{what} test: {:?}", self.t0.elapsed());
        drop(self.d);
    }
}

/// Lowercase letters and digits, different every run.
fn token() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    h.write_u128(now.as_nanos());
    format!("{:016x}", h.finish())
}

/// One BGRx frame.
struct Frame {
    w: usize,
    h: usize,
    data: Vec<u8>,
}

impl Frame {
    fn px(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.w + x) * 4;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    /// The box around rows and columns with many grey pixels: a terminal's
    /// window on Mutter's blue gradient (and not the 24-pixel cursor).
    fn window(&self) -> Option<(usize, usize, usize, usize)> {
        let grey = |[b, g, r]: [u8; 3]| b.abs_diff(g) <= 2 && g.abs_diff(r) <= 2;
        let mut rows = vec![0usize; self.h];
        let mut cols = vec![0usize; self.w];
        for (y, row) in rows.iter_mut().enumerate() {
            for (x, col) in cols.iter_mut().enumerate() {
                if grey(self.px(x, y)) {
                    *row += 1;
                    *col += 1;
                }
            }
        }
        let span = |v: &[usize]| {
            let first = v.iter().position(|n| *n > 50)?;
            let last = v.iter().rposition(|n| *n > 50)?;
            Some((first, last))
        };
        let (x0, x1) = span(&cols)?;
        let (y0, y1) = span(&rows)?;
        (x1 - x0 > 100 && y1 - y0 > 100).then_some((x0, y0, x1, y1))
    }
}

impl Frame {
    /// The box around white pixels: the cursor's outline (Mutter's gradient
    /// has none).
    fn cursor(&self) -> Option<(usize, usize, usize, usize)> {
        let mut b: Option<(usize, usize, usize, usize)> = None;
        for y in 0..self.h {
            for x in 0..self.w {
                if self.px(x, y).iter().all(|c| *c >= 250) {
                    let (x0, y0, x1, y1) = b.unwrap_or((x, y, x, y));
                    b = Some((x0.min(x), y0.min(y), x1.max(x), y1.max(y)));
                }
            }
        }
        b
    }
}

/// `pipewiresrc` on the session's own PipeWire, the way the bridge reads it.
struct Capture {
    pipeline: gst::Pipeline,
    sink: gst_app::AppSink,
    _socket: UnixStream,
}

impl Capture {
    fn new(d: &HeadlessDesktop, node: u32) -> Capture {
        let socket = UnixStream::connect(d.pipewire_socket()).expect("pipewire socket");
        // pipewiresrc dups the fd; ours stays open until the capture drops.
        let fd = socket.try_clone().expect("dup").into_raw_fd();
        let desc = format!(
            "pipewiresrc path={node} fd={fd} keepalive-time=33 ! video/x-raw,format=BGRx ! \
             appsink name=sink max-buffers=2 drop=true sync=false"
        );
        let pipeline = gst::parse::launch(&desc).expect("pipeline").downcast::<gst::Pipeline>().expect("a pipeline");
        let sink = pipeline.by_name("sink").expect("sink").downcast::<gst_app::AppSink>().expect("appsink");
        pipeline.set_state(gst::State::Playing).expect("playing");
        Capture { pipeline, sink, _socket: socket }
    }

    /// The next frame, or None by `deadline`.
    fn frame(&self, deadline: Instant) -> Option<Frame> {
        let left = deadline.checked_duration_since(Instant::now())?;
        let sample = self.sink.try_pull_sample(gst::ClockTime::from_nseconds(left.as_nanos() as u64))?;
        let caps = sample.caps()?.structure(0)?.to_owned();
        let w = caps.get::<i32>("width").ok()? as usize;
        let h = caps.get::<i32>("height").ok()? as usize;
        let map = sample.buffer()?.map_readable().ok()?;
        // Rows may be padded: take each row's first w*4 bytes.
        let stride = map.len() / h;
        let mut data = Vec::with_capacity(w * h * 4);
        for y in 0..h {
            data.extend_from_slice(&map[y * stride..y * stride + w * 4]);
        }
        Some(Frame { w, h, data })
    }

    /// Frames until one shows a window; panics with what it saw at `deadline`.
    fn window(&self, deadline: Instant) -> (Frame, (usize, usize, usize, usize)) {
        let mut frames = 0;
        loop {
            let Some(f) = self.frame(deadline) else {
                panic!("no frame with a window by the deadline ({frames} frames seen)");
            };
            frames += 1;
            if let Some(b) = f.window() {
                return (f, b);
            }
        }
    }
}

impl Capture {
    /// A frame once the picture has stopped changing (the same twice, 300 ms
    /// apart).
    fn settled(&self, deadline: Instant) -> Frame {
        let mut last = self.frame(deadline).expect("a frame");
        loop {
            let pause = Instant::now() + Duration::from_millis(300);
            while Instant::now() < pause {
                self.frame(deadline).expect("a frame");
            }
            let f = self.frame(deadline).expect("a frame");
            if f.data == last.data {
                return f;
            }
            last = f;
        }
    }

    /// The first frame for which `ok` holds.
    fn until(&self, deadline: Instant, what: &str, ok: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            let f = self.frame(deadline).unwrap_or_else(|| panic!("{what}: not by the deadline"));
            if ok(&f) {
                return f;
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Polls until `path` holds `want` (trimmed), or panics at `deadline`.
async fn wait_for_file(path: &Path, want: &str, deadline: Instant) {
    loop {
        let got = std::fs::read_to_string(path).unwrap_or_default();
        if got.trim() == want {
            return;
        }
        assert!(Instant::now() < deadline, "{} holds {got:?}, not {want:?}", path.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The key presses that type `text` on a US layout.
fn keystrokes(text: &str) -> Vec<InputEvent> {
    let mut out = Vec::new();
    for c in text.chars() {
        let (name, shift) = match c {
            'a'..='z' => (format!("Key{}", c.to_ascii_uppercase()), false),
            'A'..='Z' => (format!("Key{c}"), true),
            '0'..='9' => (format!("Digit{c}"), false),
            ' ' => ("Space".into(), false),
            '\n' => ("Enter".into(), false),
            '.' => ("Period".into(), false),
            '>' => ("Period".into(), true),
            '/' => ("Slash".into(), false),
            '-' => ("Minus".into(), false),
            '_' => ("Minus".into(), true),
            ';' => ("Semicolon".into(), false),
            _ => panic!("no key for {c:?}"),
        };
        let code = evdev_code(&name).expect("a key");
        if shift {
            out.push(InputEvent::Key { code: KEY_LEFTSHIFT, down: true });
        }
        out.push(InputEvent::Key { code, down: true });
        out.push(InputEvent::Key { code, down: false });
        if shift {
            out.push(InputEvent::Key { code: KEY_LEFTSHIFT, down: false });
        }
    }
    out
}

fn send_all(c: &Control, events: impl IntoIterator<Item = InputEvent>) {
    for ev in events {
        assert!(c.send(0, ViewerMessage::Input(ev)), "the control queue dropped {ev:?}");
    }
}

/// Clicks into the middle of the window the capture shows.
fn click_into_window(c: &Control, cap: &Capture, deadline: Instant) {
    let (f, (x0, y0, x1, y1)) = cap.window(deadline);
    let (x, y) = ((x0 + x1) as f64 / 2.0 / f.w as f64, (y0 + y1) as f64 / 2.0 / f.h as f64);
    send_all(
        c,
        [
            InputEvent::Pointer { x, y },
            InputEvent::Button { code: BTN_LEFT, down: true },
            InputEvent::Button { code: BTN_LEFT, down: false },
        ],
    );
}

/// A file path that types without Shift, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = PathBuf::from(format!("/tmp/hxfr-{tag}-{}", token()));
        let _ = std::fs::remove_file(&p);
        Scratch(p)
    }

    fn as_str(&self) -> &str {
        self.0.to_str().expect("utf-8")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_yields_frames_of_the_desktop_and_everything_stops_after() {
    init();
    let _one = ONE_AT_A_TIME.lock().await;
    let t0 = Instant::now();
    let mut d = desktop(&[&["foot", "sh"]]).await;
    let (g, _input, _clip) = gnome(&d).await;
    let node = g.node().borrow().expect("a node once started");
    assert_eq!(g.size(), (W, H));

    let cap = Capture::new(&d, node);
    let (f, (x0, y0, x1, y1)) = cap.window(Instant::now() + Duration::from_secs(15));
    assert_eq!((f.w, f.h), (W as usize, H as usize));
    // A window on the desktop, not a screen of one colour.
    assert!(x0 > 0 && y0 > 0 && x1 < f.w - 1 && y1 < f.h - 1, "the window is {:?}", (x0, y0, x1, y1));
    // Keepalive: frames keep coming on a still screen (>= 10 in a second).
    let second = Instant::now() + Duration::from_secs(1);
    let mut n = 0;
    while cap.frame(second).is_some() {
        n += 1;
    }
    assert!(n >= 10, "only {n} frames in a second with keepalive-time=33");
    drop(cap);

    let pids = d.pids();
    let names: Vec<&str> = pids.iter().map(|p| p.0.as_str()).collect();
    for want in ["dbus-daemon", "pipewire", "wireplumber", "mutter", "foot"] {
        assert!(names.contains(&want), "{want} is not running: {names:?}");
    }
    let dir = d.runtime_dir().to_owned();
    g.stop().await;
    let t = Instant::now();
    drop(d);
    // Each stops on SIGTERM (not after the wait for SIGKILL).
    assert!(t.elapsed() < Duration::from_secs(1), "stopping the desktop took {:?}", t.elapsed());
    for (name, pid) in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{name} ({pid}) outlived the desktop");
    }
    assert!(!dir.exists(), "{} outlived the desktop", dir.display());
    eprintln!("capture test: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_into_a_terminal_runs_the_command() {
    let r = rig(&[&["foot", "sh"]]).await;
    let (c, cap) = (&r.c, &r.cap);

    let deadline = Instant::now() + Duration::from_secs(20);
    click_into_window(c, cap, deadline);
    let out = Scratch::new("typed");
    let tok = token();
    send_all(c, keystrokes(&format!("echo {tok} > {}\n", out.as_str())));
    wait_for_file(&out.0, &tok, deadline).await;
    r.done("typing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shift_makes_capitals() {
    let r = rig(&[&["foot", "sh"]]).await;
    let (c, cap) = (&r.c, &r.cap);

    let deadline = Instant::now() + Duration::from_secs(20);
    click_into_window(c, cap, deadline);
    let out = Scratch::new("shift");
    // Letters only, typed with Shift held: the file must hold capitals.
    let tok: String = token().chars().map(|c| (b'A' + (c.to_digit(16).unwrap_or(0) as u8)) as char).collect();
    send_all(c, keystrokes(&format!("echo X{tok}_ > {}\n", out.as_str())));
    wait_for_file(&out.0, &format!("X{tok}_"), deadline).await;
    r.done("shift").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pointer_lands_where_the_viewer_points() {
    let r = rig(&[]).await;
    let (c, cap) = (&r.c, &r.cap);
    let deadline = Instant::now() + Duration::from_secs(20);
    for (fx, fy) in [(0.25, 0.75), (0.8, 0.2)] {
        send_all(c, [InputEvent::Pointer { x: fx, y: fy }]);
        let (px, py) = ((fx * W as f64) as usize, (fy * H as f64) as usize);
        // The hotspot is the arrow's tip: the cursor lies below and right of it.
        let near = |(x0, y0, x1, y1): (usize, usize, usize, usize)| {
            x0 + 4 >= px && y0 + 4 >= py && x1 <= px + 48 && y1 <= py + 48
        };
        let mut seen = None;
        loop {
            let f = cap.frame(deadline).unwrap_or_else(|| panic!("no cursor near {px},{py}; last seen at {seen:?}"));
            seen = f.cursor();
            if seen.is_some_and(near) {
                break;
            }
        }
    }
    r.done("pointer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wheel_and_smooth_scrolling_scroll_the_terminal() {
    let r = rig(&[&["foot", "sh"]]).await;
    let (c, cap) = (&r.c, &r.cap);
    let deadline = Instant::now() + Duration::from_secs(25);

    // Enough lines for a scrollback, and a file that says they are out.
    click_into_window(c, cap, deadline);
    let done = Scratch::new("scrolled");
    send_all(c, keystrokes(&format!("seq 1 300 ; echo done > {}\n", done.as_str())));
    wait_for_file(&done.0, "done", deadline).await;
    let bottom = cap.settled(deadline);

    // Three clicks up show older lines; smooth scrolling down (pixels) goes
    // back to the bottom, the very same picture.
    send_all(c, [InputEvent::Wheel { dx: 0, dy: -3 }]);
    cap.until(deadline, "the picture changes after the wheel", |f| f.data != bottom.data);
    cap.settled(deadline);
    for _ in 0..10 {
        send_all(c, [InputEvent::Scroll { dx: 0.0, dy: 100.0 }]);
    }
    cap.until(deadline, "back at the bottom after scrolling down", |f| f.data == bottom.data);
    r.done("scroll").await;
}

#[tokio::test]
async fn a_monitor_of_no_pixels_is_refused_before_anything_starts() {
    let cfg = HeadlessConfig { width: 0, height: 720, apps: vec![] };
    let e = HeadlessDesktop::start(cfg).await.expect_err("a 0x720 monitor");
    assert!(e.to_string().contains("0x720"), "{e}");
}

/// Runs a Wayland client in the session and returns its stdout.
fn run_in(d: &HeadlessDesktop, cmd: &[&str]) -> Option<String> {
    let out = Command::new("timeout").arg("3").args(cmd).envs(d.env()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clipboard_goes_both_ways() {
    init();
    let _one = ONE_AT_A_TIME.lock().await;
    let t0 = Instant::now();
    let mut d = desktop(&[&["foot", "sh"]]).await;
    let (g, input, clip) = gnome(&d).await;
    let c = Control::spawn(input, clip);
    let mut rx = c.clipboard();
    let deadline = Instant::now() + Duration::from_secs(20);

    // The viewer pastes: a Wayland client on the desktop reads it.
    let ours = format!("from the viewer {}", token());
    assert!(c.send(0, ViewerMessage::Clipboard(ours.clone())));
    loop {
        let got = run_in(&d, &["wl-paste", "--no-newline"]);
        if got.as_deref() == Some(ours.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "wl-paste read {got:?}, not {ours:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Our own offer is not echoed back as the desktop's.
    assert_eq!(*rx.borrow_and_update(), None);

    // The desktop copies: the viewer receives it.
    let theirs = format!("from the desktop {}", token());
    d.spawn(&["wl-copy".into(), "--foreground".into(), theirs.clone()]).expect("wl-copy");
    let got = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        rx.wait_for(|t| t.as_deref() == Some(theirs.as_str())),
    )
    .await
    .map(|r| r.is_ok());
    let now = rx.borrow().clone();
    assert!(matches!(got, Ok(true)), "the viewer's clipboard is {now:?}, not {theirs:?}");
    g.stop().await;
    eprintln!("clipboard test: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_compositor_gets_a_new_session() {
    init();
    let _one = ONE_AT_A_TIME.lock().await;
    let t0 = Instant::now();
    let mut d = desktop(&[&["foot", "sh"]]).await;
    let (g, mut input, _clip) = gnome(&d).await;
    let mut node = g.node();
    assert!(node.borrow_and_update().is_some());
    assert_eq!(g.sessions(), 1);

    d.restart_compositor().await.expect("mutter again");
    let deadline = Instant::now() + Duration::from_secs(20);
    let new = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        node.wait_for(|n| n.is_some() && g.sessions() >= 2),
    )
    .await
    .expect("a new session after the restart")
    .expect("the watch is open")
    .expect("a node");
    assert_eq!(g.sessions(), 2);

    // The new node streams, and input goes to the new session.
    let cap = Capture::new(&d, new);
    let f = cap.frame(deadline).expect("a frame from the new session's node");
    assert_eq!((f.w, f.h), (W as usize, H as usize));
    input.inject(InputEvent::Pointer { x: 0.5, y: 0.5 }).await.expect("pointer into the new session");
    input.inject(InputEvent::Key { code: KEY_LEFTSHIFT, down: true }).await.expect("a key");
    input.inject(InputEvent::Key { code: KEY_LEFTSHIFT, down: false }).await.expect("a key");
    g.stop().await;
    eprintln!("restart test: {:?}", t0.elapsed());
}
