//! The X11 backend against a real X server: Xvfb, an xterm to type into,
//! xclip on the other end of the clipboard. Every test starts its own Xvfb
//! (`-displayfd` picks a free display) and kills what it started.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hxfr_desktop::control::{self, ClipboardRx, Control};
use hxfr_desktop::input::{InputEvent, ViewerMessage};
use hxfr_desktop::keys;
use hxfr_desktop::x11::X11Input;
use x11rb::connection::Connection;
use x11rb::protocol::Event;
use x11rb::protocol::xproto::{self, ConnectionExt as _, EventMask};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

const WIDTH: u16 = 1280;
const HEIGHT: u16 = 720;

/// Processes this test started; killed by pid when it ends, pass or fail.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Procs {
    fn spawn(&mut self, cmd: &mut Command) -> &mut Child {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        self.0.push(child);
        self.0.last_mut().unwrap()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        // Clients first, the X server last.
        for c in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it gives a value; panics saying `what` after `secs`.
fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts Xvfb on a display it picks; returns ":N".
fn xvfb(procs: &mut Procs) -> String {
    let child = procs.spawn(
        Command::new("Xvfb")
            .args(["-displayfd", "1", "-nolisten", "tcp", "-screen", "0"])
            .arg(format!("{WIDTH}x{HEIGHT}x24"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(10)).expect("Xvfb printed no display number");
    let n: u32 = line.trim().parse().unwrap_or_else(|_| panic!("Xvfb printed {line:?}"));
    format!(":{n}")
}

fn connect(display: &str) -> (RustConnection, xproto::Window) {
    let (conn, screen) = RustConnection::connect(Some(display)).expect("connecting to Xvfb");
    let root = conn.setup().roots[screen].root;
    (conn, root)
}

/// Starts an xterm filling most of the screen and waits until it is mapped.
fn xterm(display: &str, procs: &mut Procs) {
    procs.spawn(
        Command::new("xterm")
            .args(["-u8", "-geometry", "200x50+0+0", "-e", "sh"])
            .env("DISPLAY", display)
            .env("LC_ALL", "C.UTF-8")
            .env("PS1", "$ ")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let (conn, root) = connect(display);
    wait_for("the xterm window to be mapped", 10, || {
        let tree = conn.query_tree(root).ok()?.reply().ok()?;
        tree.children
            .iter()
            .any(|&w| {
                conn.get_window_attributes(w)
                    .ok()
                    .and_then(|c| c.reply().ok())
                    .is_some_and(|a| a.map_state == xproto::MapState::VIEWABLE)
            })
            .then_some(())
    });
}

async fn backend(display: &str) -> (Control, ClipboardRx) {
    let (tx, rx) = control::clipboard_channel();
    let x = X11Input::connect(Some(display), tx).expect("x11 backend");
    let c = Control::spawn(x, rx.clone());
    (c, rx)
}

/// Queues `m`, waiting for room rather than dropping it.
async fn push(c: &Control, m: ViewerMessage) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.send(0, m.clone()) {
        assert!(Instant::now() < deadline, "the control queue stayed full");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn ev(c: &Control, e: InputEvent) {
    push(c, ViewerMessage::Input(e)).await
}

async fn key(c: &Control, code: u32) {
    ev(c, InputEvent::Key { code, down: true }).await;
    ev(c, InputEvent::Key { code, down: false }).await;
}

/// The evdev code of a character on a US keyboard, and whether it is shifted.
fn us_key(ch: char) -> (u32, bool) {
    const ROWS: [(&str, u32); 3] = [("qwertyuiop", 16), ("asdfghjkl", 30), ("zxcvbnm", 44)];
    let lower = ch.to_ascii_lowercase();
    for (row, first) in ROWS {
        if let Some(i) = row.find(lower) {
            return (first + i as u32, ch.is_ascii_uppercase());
        }
    }
    match ch {
        '1'..='9' => (2 + ch as u32 - '1' as u32, false),
        '0' => (11, false),
        ' ' => (57, false),
        '-' => (12, false),
        '_' => (12, true),
        '.' => (52, false),
        '>' => (52, true),
        '/' => (53, false),
        '\n' => (28, false),
        _ => panic!("no US key types {ch:?}"),
    }
}

/// Types `s` as physical keys, with Shift where a US keyboard needs it.
async fn type_keys(c: &Control, s: &str) {
    for ch in s.chars() {
        let (code, shift) = us_key(ch);
        if shift {
            ev(c, InputEvent::Key { code: keys::KEY_LEFTSHIFT, down: true }).await;
        }
        key(c, code).await;
        if shift {
            ev(c, InputEvent::Key { code: keys::KEY_LEFTSHIFT, down: false }).await;
        }
    }
}

/// Waits until the backend has taken `n` events; none may have failed.
async fn settle(c: &Control, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.stats.injected.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "the backend took fewer than {n} events");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(c.stats.failed.load(Ordering::Relaxed), 0);
}

async fn click_into_xterm(c: &Control) {
    ev(c, InputEvent::Pointer { x: 0.3, y: 0.3 }).await;
    ev(c, InputEvent::Button { code: keys::BTN_LEFT, down: true }).await;
    ev(c, InputEvent::Button { code: keys::BTN_LEFT, down: false }).await;
}

fn token() -> String {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ^ (u128::from(std::process::id()) << 64);
    let mut n = n as u64 ^ (n >> 64) as u64;
    (0..12)
        .map(|_| {
            let d = (n % 36) as u32;
            n /= 36;
            char::from_digit(d, 36).unwrap()
        })
        .collect()
}

fn wait_for_file(path: &std::path::Path) -> String {
    wait_for(&format!("{} to be written", path.display()), 10, || {
        std::fs::read_to_string(path).ok().filter(|s| s.ends_with('\n'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_keys_reach_a_terminal() {
    let mut procs = Procs::default();
    let display = xvfb(&mut procs);
    xterm(&display, &mut procs);
    let (c, _) = backend(&display).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typed");
    let token = token();
    click_into_xterm(&c).await;
    type_keys(&c, &format!("echo {token} > {}\n", path.display())).await;
    assert_eq!(wait_for_file(&path), format!("{token}\n"));
    assert_eq!(c.stats.failed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shift_and_keysyms_type_what_no_plain_key_does() {
    let mut procs = Procs::default();
    let display = xvfb(&mut procs);
    xterm(&display, &mut procs);
    let before = keymap(&display);
    let (c, _) = backend(&display).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shifted");
    let token = token();
    click_into_xterm(&c).await;
    type_keys(&c, "echo ").await;
    // Shift held down across the letters, as a person types capitals.
    ev(&c, InputEvent::Key { code: keys::KEY_LEFTSHIFT, down: true }).await;
    type_keys(&c, &token.replace(|ch: char| ch.is_ascii_digit(), "")).await;
    ev(&c, InputEvent::Key { code: keys::KEY_LEFTSHIFT, down: false }).await;
    // 'x' is on the keyboard; 'é' and '€' are not and get bound for the time being.
    for sym in [0x78, 0xe9, 0x0100_20ac] {
        ev(&c, InputEvent::Keysym { sym, down: true }).await;
        ev(&c, InputEvent::Keysym { sym, down: false }).await;
    }
    type_keys(&c, &format!(" > {}\n", path.display())).await;
    let letters: String = token.chars().filter(|ch| !ch.is_ascii_digit()).collect();
    assert_eq!(wait_for_file(&path), format!("{}xé€\n", letters.to_ascii_uppercase()));
    assert_eq!(c.stats.failed.load(Ordering::Relaxed), 0);

    // Dropping the backend gives the bound keycodes back.
    drop(c);
    // (The control task drops the backend once its abort is seen.)
    wait_for("the keyboard mapping to be given back", 5, || (keymap(&display) == before).then_some(()));
}

/// The core keyboard mapping, keysyms per keycode and all.
fn keymap(display: &str) -> (u8, Vec<u32>) {
    let (conn, _) = connect(display);
    let setup = conn.setup();
    let (min, max) = (setup.min_keycode, setup.max_keycode);
    let map = conn.get_keyboard_mapping(min, max - min + 1).unwrap().reply().unwrap();
    (map.keysyms_per_keycode, map.keysyms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointer_buttons_and_wheel() {
    let mut procs = Procs::default();
    let display = xvfb(&mut procs);
    // A window over the whole screen that records the buttons pressed on it.
    let (conn, root) = connect(&display);
    let win = conn.generate_id().unwrap();
    let aux = xproto::CreateWindowAux::new()
        .override_redirect(1)
        .event_mask(EventMask::BUTTON_PRESS | EventMask::STRUCTURE_NOTIFY);
    conn.create_window(0, win, root, 0, 0, WIDTH, HEIGHT, 0, xproto::WindowClass::INPUT_OUTPUT, 0, &aux).unwrap();
    conn.map_window(win).unwrap();
    conn.flush().unwrap();
    wait_for("the window to be mapped", 5, || match conn.poll_for_event().unwrap() {
        Some(Event::MapNotify(_)) => Some(()),
        _ => None,
    });

    let (c, _) = backend(&display).await;
    ev(&c, InputEvent::Pointer { x: 0.25, y: 0.75 }).await;
    settle(&c, 1).await;
    let p = conn.query_pointer(root).unwrap().reply().unwrap();
    assert_eq!((p.root_x, p.root_y), (320, 540));
    ev(&c, InputEvent::Pointer { x: 1.0, y: 1.0 }).await;
    settle(&c, 2).await;
    let p = conn.query_pointer(root).unwrap().reply().unwrap();
    assert_eq!((p.root_x, p.root_y), (WIDTH as i16 - 1, HEIGHT as i16 - 1), "the far edge is the last pixel");

    for e in [
        InputEvent::Button { code: keys::BTN_RIGHT, down: true },
        InputEvent::Button { code: keys::BTN_RIGHT, down: false },
        InputEvent::Wheel { dx: 0, dy: 2 },
        InputEvent::Wheel { dx: -1, dy: 0 },
        // 120 px up: two clicks, 20 px carried over ...
        InputEvent::Scroll { dx: 0.0, dy: -120.0 },
        // ... and 30 more make a third.
        InputEvent::Scroll { dx: 0.0, dy: -30.0 },
        // A turn the other way starts afresh: 40 px is no click yet.
        InputEvent::Scroll { dx: 0.0, dy: 40.0 },
        InputEvent::Scroll { dx: 60.0, dy: 0.0 },
        InputEvent::Button { code: keys::BTN_SIDE, down: true },
        InputEvent::Button { code: keys::BTN_SIDE, down: false },
    ] {
        ev(&c, e).await;
    }
    let want = [3, 5, 5, 6, 4, 4, 4, 7, 8];
    let mut got = Vec::new();
    wait_for("the button presses", 5, || {
        while let Some(e) = conn.poll_for_event().unwrap() {
            if let Event::ButtonPress(b) = e {
                got.push(b.detail);
            }
        }
        (got.len() >= want.len()).then_some(())
    });
    assert_eq!(got, want);
    assert_eq!(c.stats.failed.load(Ordering::Relaxed), 0);

    // What a viewer holds down is let go of when its page loses focus.
    let shift_down = || {
        let keys = conn.query_keymap().unwrap().reply().unwrap().keys;
        let kc = keys::KEY_LEFTSHIFT as usize + 8;
        keys[kc / 8] & (1 << (kc % 8)) != 0
    };
    let left_down = || {
        let mask = conn.query_pointer(root).unwrap().reply().unwrap().mask;
        mask.contains(xproto::KeyButMask::BUTTON1)
    };
    ev(&c, InputEvent::Key { code: keys::KEY_LEFTSHIFT, down: true }).await;
    ev(&c, InputEvent::Button { code: keys::BTN_LEFT, down: true }).await;
    wait_for("Shift and the left button to be down", 5, || (shift_down() && left_down()).then_some(()));
    push(&c, ViewerMessage::Release).await;
    wait_for("Shift and the left button to be let go", 5, || (!shift_down() && !left_down()).then_some(()));

    // A key with no X keycode is refused (counted), not sent.
    ev(&c, InputEvent::Key { code: 300, down: true }).await;
    wait_for("the refusal", 5, || (c.stats.failed.load(Ordering::Relaxed) == 1).then_some(()));

    // And a backend dropped with a key down lets go of it too.
    ev(&c, InputEvent::Key { code: keys::KEY_LEFTSHIFT, down: true }).await;
    wait_for("Shift to be down", 5, || shift_down().then_some(()));
    drop(c);
    wait_for("Shift to be let go", 5, || (!shift_down()).then_some(()));
}

/// Runs a short command with a deadline; its standard output.
fn output(cmd: &mut Command) -> Option<String> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().ok()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                let mut s = String::new();
                child.stdout.take()?.read_to_string(&mut s).ok()?;
                return st.success().then_some(s);
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Makes xclip own the clipboard with `text`, until killed or, with
/// `loops`, until it has served that many requests; its index in `procs`.
fn xclip_copy(display: &str, procs: &mut Procs, text: &str, loops: Option<u32>) -> usize {
    let mut cmd = Command::new("xclip");
    cmd.args(["-quiet", "-selection", "clipboard", "-i"]);
    if let Some(n) = loops {
        cmd.args(["-loops", &n.to_string()]);
    }
    let child =
        procs.spawn(cmd.env("DISPLAY", display).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).unwrap();
    procs.0.len() - 1
}

async fn clipboard_becomes(rx: &mut ClipboardRx, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rx.borrow_and_update().as_deref() != Some(want) {
        let changed = tokio::time::timeout_at(deadline, rx.changed()).await;
        assert!(matches!(changed, Ok(Ok(()))), "the clipboard never became the {} bytes expected", want.len());
    }
}

/// Lengths of every clipboard text the backend publishes, as they come.
fn record_lengths(mut rx: ClipboardRx) -> Arc<Mutex<Vec<usize>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let len = rx.borrow_and_update().as_deref().map_or(0, str::len);
            s.lock().unwrap().push(len);
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clipboard_both_ways() {
    let mut procs = Procs::default();
    let display = xvfb(&mut procs);
    let (c, mut rx) = backend(&display).await;
    let seen = record_lengths(rx.clone());

    // The page pastes: X clients read it.
    let ours = format!("héllo € {}", token());
    push(&c, ViewerMessage::Clipboard(ours.clone())).await;
    wait_for("xclip to read our clipboard", 10, || {
        output(Command::new("xclip").args(["-o", "-selection", "clipboard"]).env("DISPLAY", &display))
            .filter(|s| *s == ours)
    });
    assert!(rx.borrow().is_none(), "our own clipboard was echoed back");

    // A client copies: the page gets it.
    let theirs = format!("from xclip ✓ {}", token());
    xclip_copy(&display, &mut procs, &theirs, None);
    clipboard_becomes(&mut rx, &theirs).await;

    // Large text, well within the limit.
    let big: String = (0..200 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    xclip_copy(&display, &mut procs, &big, None);
    clipboard_becomes(&mut rx, &big).await;

    // Over the limit: xclip hands it over (and exits, having served our one
    // request), the backend refuses it, and the next copy still arrives.
    let huge = "z".repeat(hxfr_desktop::input::CLIPBOARD_MAX + 1);
    let i = xclip_copy(&display, &mut procs, &huge, Some(1));
    wait_for("xclip to hand over the huge text", 10, || procs.0[i].try_wait().unwrap());
    let small = format!("after {}", token());
    xclip_copy(&display, &mut procs, &small, None);
    clipboard_becomes(&mut rx, &small).await;
    // The backend handles X events in order: had it taken the huge text, it
    // would have published it before this.
    assert!(!seen.lock().unwrap().contains(&huge.len()), "text over the limit was taken");

    // And the page can take it back.
    push(&c, ViewerMessage::Clipboard("again".into())).await;
    wait_for("xclip to read our clipboard again", 10, || {
        output(Command::new("xclip").args(["-o", "-selection", "clipboard"]).env("DISPLAY", &display))
            .filter(|s| s == "again")
    });
    assert_eq!(c.stats.clipboard_set.load(Ordering::Relaxed), 2);
}

/// An owner that hands its text over in INCR chunks, as clients do for text
/// larger than one request; serves one request, then returns.
fn incr_owner(display: &str, text: &[u8], chunk: usize, owning: std::sync::mpsc::Sender<()>) {
    let (conn, root) = connect(display);
    let atom = |name: &str| conn.intern_atom(false, name.as_bytes()).unwrap().reply().unwrap().atom;
    let (clipboard, utf8, incr) = (atom("CLIPBOARD"), atom("UTF8_STRING"), atom("INCR"));
    let win = conn.generate_id().unwrap();
    let aux = xproto::CreateWindowAux::new();
    conn.create_window(0, win, root, 0, 0, 1, 1, 0, xproto::WindowClass::INPUT_ONLY, 0, &aux).unwrap();
    conn.set_selection_owner(win, clipboard, x11rb::CURRENT_TIME).unwrap();
    conn.flush().unwrap();
    owning.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let next = |what: &str| loop {
        if let Some(e) = conn.poll_for_event().unwrap() {
            return e;
        }
        assert!(Instant::now() < deadline, "the INCR owner timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    };
    let req = loop {
        if let Event::SelectionRequest(r) = next("the request") {
            break r;
        }
    };
    assert_eq!(req.target, utf8);
    let attrs = xproto::ChangeWindowAttributesAux::new().event_mask(EventMask::PROPERTY_CHANGE);
    conn.change_window_attributes(req.requestor, &attrs).unwrap();
    conn.change_property32(xproto::PropMode::REPLACE, req.requestor, req.property, incr, &[text.len() as u32]).unwrap();
    let notify = xproto::SelectionNotifyEvent {
        response_type: xproto::SELECTION_NOTIFY_EVENT,
        sequence: 0,
        time: req.time,
        requestor: req.requestor,
        selection: req.selection,
        target: req.target,
        property: req.property,
    };
    conn.send_event(false, req.requestor, EventMask::NO_EVENT, notify).unwrap();
    conn.flush().unwrap();
    // Each deletion asks for the next chunk; an empty one ends it.
    for c in text.chunks(chunk).chain(std::iter::once(&[][..])) {
        loop {
            if let Event::PropertyNotify(p) = next("a deletion")
                && p.window == req.requestor
                && p.atom == req.property
                && p.state == xproto::Property::DELETE
            {
                break;
            }
        }
        conn.change_property8(xproto::PropMode::REPLACE, req.requestor, req.property, utf8, c).unwrap();
        conn.flush().unwrap();
    }
    // A round trip before closing: the server drops requests it has not run
    // when the connection closes behind them.
    conn.get_input_focus().unwrap().reply().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clipboard_in_incr_chunks() {
    let mut procs = Procs::default();
    let display = xvfb(&mut procs);
    let (_c, mut rx) = backend(&display).await;
    // Multi-byte characters split across chunks join back whole.
    let text: String = format!("incr ✓ {} ", token()).repeat(3000);
    let (tx, owning) = std::sync::mpsc::channel();
    let owner = {
        let (display, text) = (display.clone(), text.clone());
        std::thread::spawn(move || incr_owner(&display, text.as_bytes(), 4096, tx))
    };
    owning.recv_timeout(Duration::from_secs(10)).expect("the INCR owner did not start");
    clipboard_becomes(&mut rx, &text).await;
    owner.join().expect("the INCR owner failed");
}
