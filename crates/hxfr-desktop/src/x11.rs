//! An X server as the desktop: input through XTest, the clipboard through the
//! CLIPBOARD selection (watched with XFixes).
//!
//! X calls block, so none run on the caller's (tokio) threads: one thread
//! owns an input connection and injects the events it is sent, another owns
//! a clipboard connection with an unmapped window that holds the selection
//! when a viewer pastes, and fetches it when another client copies. Both
//! stop when the [`X11Input`] is dropped.
//!
//! Mapping choices:
//! - keys: X keycode = evdev code + 8 (the `evdev` keycodes every Xorg and
//!   Xvfb use);
//! - keysyms: a keycode whose unshifted keysym it is, else one of the
//!   keycodes nothing is bound to, bound to it for the time being (as
//!   xdotool does) and given back when the backend stops; bindings are used
//!   round robin so a client still reading the previous one reads it right;
//! - pointer: absolute on the root window, fraction × screen size;
//! - wheel: buttons 4/5 (up/down) and 6/7 (left/right), one press and
//!   release per click; smooth scroll: one click per [`SCROLL_PX_PER_CLICK`]
//!   pixels, the rest carried over to the next event in the same direction.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use tokio::sync::oneshot;
use x11rb::connection::{Connection, RequestConnection};
use x11rb::cookie::VoidCookie;
use x11rb::errors::{ConnectionError, ReplyError};
use x11rb::protocol::Event;
use x11rb::protocol::xfixes::{self, ConnectionExt as _};
use x11rb::protocol::xproto::{self, AtomEnum, ConnectionExt as _, EventMask, PropMode, Window};
use x11rb::protocol::xtest::ConnectionExt as _;
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;
use x11rb::{CURRENT_TIME, NONE};

use crate::DesktopError;
use crate::control::{Backend, ClipboardTx};
use crate::input::{CLIPBOARD_MAX, InputEvent, WHEEL_MAX};
use crate::keys;

/// Smooth-scroll pixels per wheel click. Browsers report 50 to 120 px per
/// notch of a mouse wheel; 50 keeps one notch at least one click and makes
/// a touchpad's small deltas add up at a pace that feels like scrolling.
pub const SCROLL_PX_PER_CLICK: f64 = 50.0;
/// How long another client may take to hand over the clipboard (each INCR
/// chunk gets this again).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long dropping the backend waits for its threads.
const STOP_WAIT: Duration = Duration::from_secs(1);

x11rb::atom_manager! {
    Atoms: AtomsCookie {
        CLIPBOARD,
        TARGETS,
        UTF8_STRING,
        TEXT,
        INCR,
        HXFR_SELECTION,
    }
}

fn x11_err(what: &str, e: impl std::fmt::Display) -> DesktopError {
    DesktopError::Unavailable(format!("x11: {what}: {e}"))
}

fn gone() -> DesktopError {
    DesktopError::Unavailable("x11: the backend thread has stopped".into())
}

/// Sends a request whose errors, if any, arrive later as events (logged).
fn send<C: RequestConnection>(what: &str, c: Result<VoidCookie<'_, C>, ConnectionError>) -> Result<(), DesktopError> {
    c.map(drop).map_err(|e| x11_err(what, e))
}

/// How long a backend thread may take over one command: longer means the X
/// server is stuck, and the caller (the bridge's control task) must not be.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

async fn answer(rx: oneshot::Receiver<Result<(), DesktopError>>) -> Result<(), DesktopError> {
    match tokio::time::timeout(ANSWER_WITHIN, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(gone()),
        Err(_) => Err(DesktopError::Unavailable(format!("x11: no answer within {ANSWER_WITHIN:?}"))),
    }
}

struct Inject(InputEvent, oneshot::Sender<Result<(), DesktopError>>);
struct SetClipboard(Arc<str>, oneshot::Sender<Result<(), DesktopError>>);

/// XTest input and the CLIPBOARD selection of one X display.
pub struct X11Input {
    input: Option<mpsc::Sender<Inject>>,
    clip: Option<mpsc::Sender<SetClipboard>>,
    /// Wakes the clipboard thread out of its poll when a command is queued
    /// (non-blocking: a full pipe already wakes it).
    wake: Option<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
}

impl X11Input {
    /// Connects to `display` (`$DISPLAY` when `None`) twice, checks XTest
    /// and XFixes, and starts the input and clipboard threads. Blocks for a
    /// few round trips. The desktop's clipboard, when another client sets
    /// it, is published on `clipboard`.
    pub fn connect(display: Option<&str>, clipboard: ClipboardTx) -> Result<X11Input, DesktopError> {
        let input = InputState::new(display)?;
        let clip = ClipState::new(display, clipboard)?;
        let (wake_rx, wake_tx) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::NONBLOCK | rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| DesktopError::Io { what: "pipe".into(), source: e.into() })?;
        let (input_tx, input_rx) = mpsc::channel();
        let (clip_tx, clip_rx) = mpsc::channel();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| DesktopError::Io { what: "starting an x11 thread".into(), source: e })
        };
        let mut threads = vec![spawn("hxfr-x11-input", Box::new(move || input.run(input_rx)))?];
        threads.push(spawn("hxfr-x11-clipboard", Box::new(move || clip.run(clip_rx, wake_rx)))?);
        Ok(X11Input { input: Some(input_tx), clip: Some(clip_tx), wake: Some(wake_tx), threads })
    }
}

impl Backend for X11Input {
    fn name(&self) -> &'static str {
        "x11"
    }

    async fn inject(&mut self, ev: InputEvent) -> Result<(), DesktopError> {
        let (tx, rx) = oneshot::channel();
        self.input.as_ref().ok_or_else(gone)?.send(Inject(ev, tx)).map_err(|_| gone())?;
        answer(rx).await
    }

    async fn set_clipboard(&mut self, text: String) -> Result<(), DesktopError> {
        if text.len() > CLIPBOARD_MAX {
            return Err(DesktopError::Rejected(format!("clipboard text of {} bytes", text.len())));
        }
        let (tx, rx) = oneshot::channel();
        self.clip.as_ref().ok_or_else(gone)?.send(SetClipboard(text.into(), tx)).map_err(|_| gone())?;
        // One byte says "look at the queue"; a full pipe already says so.
        let _ = rustix::io::write(self.wake.as_ref().ok_or_else(gone)?, &[1]);
        answer(rx).await
    }
}

impl Drop for X11Input {
    fn drop(&mut self) {
        // Closed channels and pipe tell both threads to let go and stop.
        self.input.take();
        self.clip.take();
        self.wake.take();
        let deadline = Instant::now() + STOP_WAIT;
        for t in self.threads.drain(..) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!("x11: a backend thread did not stop within {STOP_WAIT:?}; leaving it");
            }
        }
    }
}

/// The core keyboard mapping, and the keycodes we bound keysyms to.
struct Keymap {
    min: u8,
    per: usize,
    syms: Vec<u32>,
    /// Keycodes with nothing bound at start, highest first.
    spare: Vec<u8>,
    next_spare: usize,
    /// Spare keycodes currently bound, and to what.
    bound: HashMap<u8, u32>,
    stale: bool,
}

impl Keymap {
    fn load(conn: &RustConnection, min: u8, max: u8) -> Result<Keymap, DesktopError> {
        let mut k =
            Keymap { min, per: 0, syms: vec![], spare: vec![], next_spare: 0, bound: HashMap::new(), stale: true };
        k.reload(conn, max)?;
        k.spare = (min..=max).rev().filter(|&kc| k.row(kc).iter().all(|&s| s == 0)).collect();
        Ok(k)
    }

    fn reload(&mut self, conn: &RustConnection, max: u8) -> Result<(), DesktopError> {
        let count = max.saturating_sub(self.min).saturating_add(1);
        let r = conn
            .get_keyboard_mapping(self.min, count)
            .map_err(|e| x11_err("keyboard mapping", e))?
            .reply()
            .map_err(|e| x11_err("keyboard mapping", e))?;
        self.per = r.keysyms_per_keycode.into();
        self.syms = r.keysyms;
        self.stale = false;
        Ok(())
    }

    fn row(&self, kc: u8) -> &[u32] {
        let i = usize::from(kc.saturating_sub(self.min)) * self.per;
        self.syms.get(i..i + self.per).unwrap_or(&[])
    }

    /// A keycode that types `sym` with no modifier.
    fn find(&self, sym: u32) -> Option<u8> {
        if let Some((&kc, _)) = self.bound.iter().find(|(_, s)| **s == sym) {
            return Some(kc);
        }
        if self.per == 0 {
            return None;
        }
        self.syms.chunks(self.per).position(|row| row.first() == Some(&sym)).and_then(|i| {
            let kc = usize::from(self.min) + i;
            u8::try_from(kc).ok()
        })
    }

    /// Binds `sym` to a spare keycode not held down, the least recently
    /// bound first.
    fn bind(&mut self, conn: &RustConnection, sym: u32, down: &BTreeSet<u8>) -> Result<u8, DesktopError> {
        let n = self.spare.len();
        let kc = (0..n)
            .map(|i| self.spare[(self.next_spare + i) % n])
            .find(|kc| !down.contains(kc))
            .ok_or_else(|| DesktopError::Rejected(format!("no spare keycode to type keysym {sym:#x}")))?;
        self.next_spare = (self.spare.iter().position(|&k| k == kc).unwrap_or(0) + 1) % n;
        // Both levels, so Shift held down does not change what it types.
        send("binding a keysym", conn.change_keyboard_mapping(1, kc, 2, &[sym, sym]))?;
        self.bound.insert(kc, sym);
        Ok(kc)
    }

    /// Gives the bound keycodes back their (empty) mapping.
    fn unbind_all(&mut self, conn: &RustConnection) -> Result<(), DesktopError> {
        for (kc, _) in self.bound.drain() {
            send("unbinding a keysym", conn.change_keyboard_mapping(1, kc, 1, &[0]))?;
        }
        Ok(())
    }
}

struct InputState {
    conn: RustConnection,
    root: Window,
    width: u16,
    height: u16,
    min: u8,
    max: u8,
    keymap: Keymap,
    keys_down: BTreeSet<u8>,
    buttons_down: BTreeSet<u8>,
    /// Which keycode each keysym held down was pressed with.
    syms_down: HashMap<u32, u8>,
    scroll: (f64, f64),
}

impl InputState {
    fn new(display: Option<&str>) -> Result<InputState, DesktopError> {
        let (conn, screen) = RustConnection::connect(display).map_err(|e| x11_err("connecting", e))?;
        let setup = conn.setup();
        let (min, max) = (setup.min_keycode, setup.max_keycode);
        let s = setup.roots.get(screen).ok_or_else(|| x11_err("connecting", format!("no screen {screen}")))?;
        let (root, width, height) = (s.root, s.width_in_pixels, s.height_in_pixels);
        conn.xtest_get_version(2, 2).map_err(|e| x11_err("XTest", e))?.reply().map_err(|e| x11_err("XTest", e))?;
        // ConfigureNotify on the root says when the screen changes size.
        let attrs = xproto::ChangeWindowAttributesAux::new().event_mask(EventMask::STRUCTURE_NOTIFY);
        send("watching the root window", conn.change_window_attributes(root, &attrs))?;
        let keymap = Keymap::load(&conn, min, max)?;
        conn.flush().map_err(|e| x11_err("flush", e))?;
        tracing::info!("x11: input on a {width}x{height} screen, {} spare keycodes", keymap.spare.len());
        Ok(InputState {
            conn,
            root,
            width,
            height,
            min,
            max,
            keymap,
            keys_down: BTreeSet::new(),
            buttons_down: BTreeSet::new(),
            syms_down: HashMap::new(),
            scroll: (0.0, 0.0),
        })
    }

    fn run(mut self, rx: mpsc::Receiver<Inject>) {
        while let Ok(Inject(ev, reply)) = rx.recv() {
            let r = self.inject(ev).and_then(|()| self.conn.flush().map_err(|e| x11_err("flush", e)));
            let _ = reply.send(r);
        }
        if let Err(e) = self.stop() {
            tracing::debug!("x11: letting go of input: {e}");
        }
    }

    /// Lets go of everything still held and gives the bound keycodes back.
    fn stop(&mut self) -> Result<(), DesktopError> {
        for b in std::mem::take(&mut self.buttons_down) {
            self.fake(xproto::BUTTON_RELEASE_EVENT, b)?;
        }
        for kc in std::mem::take(&mut self.keys_down) {
            self.fake(xproto::KEY_RELEASE_EVENT, kc)?;
        }
        self.keymap.unbind_all(&self.conn)?;
        // A round trip: the server drops requests it has not run when the
        // connection closes behind them.
        self.conn.get_input_focus().map_err(|e| x11_err("sync", e))?.reply().map_err(|e| x11_err("sync", e))?;
        Ok(())
    }

    /// Reads what the server told us since: mapping and screen size changes,
    /// errors of requests sent earlier.
    fn drain_events(&mut self) -> Result<(), DesktopError> {
        while let Some(ev) = self.conn.poll_for_event().map_err(|e| x11_err("reading events", e))? {
            match ev {
                Event::MappingNotify(m) if m.request == xproto::Mapping::KEYBOARD => self.keymap.stale = true,
                Event::ConfigureNotify(c) if c.window == self.root => (self.width, self.height) = (c.width, c.height),
                Event::Error(e) => tracing::warn!("x11: input request failed: {e:?}"),
                _ => {}
            }
        }
        if self.keymap.stale {
            self.keymap.reload(&self.conn, self.max)?;
        }
        Ok(())
    }

    fn fake(&self, ty: u8, detail: u8) -> Result<(), DesktopError> {
        send("XTest", self.conn.xtest_fake_input(ty, detail, CURRENT_TIME, NONE, 0, 0, 0))
    }

    fn key(&mut self, kc: u8, down: bool) -> Result<(), DesktopError> {
        if down {
            self.keys_down.insert(kc);
            self.fake(xproto::KEY_PRESS_EVENT, kc)
        } else {
            self.keys_down.remove(&kc);
            self.fake(xproto::KEY_RELEASE_EVENT, kc)
        }
    }

    fn button(&mut self, b: u8, down: bool) -> Result<(), DesktopError> {
        if down {
            self.buttons_down.insert(b);
            self.fake(xproto::BUTTON_PRESS_EVENT, b)
        } else {
            self.buttons_down.remove(&b);
            self.fake(xproto::BUTTON_RELEASE_EVENT, b)
        }
    }

    fn clicks(&mut self, less: u8, more: u8, n: i32) -> Result<(), DesktopError> {
        let b = if n < 0 { less } else { more };
        for _ in 0..n.unsigned_abs().min(WHEEL_MAX.unsigned_abs()) {
            self.fake(xproto::BUTTON_PRESS_EVENT, b)?;
            self.fake(xproto::BUTTON_RELEASE_EVENT, b)?;
        }
        Ok(())
    }

    fn inject(&mut self, ev: InputEvent) -> Result<(), DesktopError> {
        self.drain_events()?;
        match ev {
            InputEvent::Key { code, down } => {
                let kc = code
                    .checked_add(8)
                    .and_then(|kc| u8::try_from(kc).ok())
                    .filter(|kc| (self.min..=self.max).contains(kc))
                    .ok_or_else(|| DesktopError::Rejected(format!("evdev key {code} has no X keycode")))?;
                self.key(kc, down)
            }
            InputEvent::Keysym { sym, down } if down => {
                let kc = match self.syms_down.get(&sym).copied().or_else(|| self.keymap.find(sym)) {
                    Some(kc) => kc,
                    None => self.keymap.bind(&self.conn, sym, &self.keys_down)?,
                };
                self.syms_down.insert(sym, kc);
                self.key(kc, true)
            }
            InputEvent::Keysym { sym, .. } => match self.syms_down.remove(&sym) {
                Some(kc) => self.key(kc, false),
                // Never pressed through us: nothing to let go of.
                None => Ok(()),
            },
            InputEvent::Pointer { x, y } => {
                let px = |f: f64, size: u16| {
                    let f = if f.is_finite() { f.clamp(0.0, 1.0) } else { 0.0 };
                    // X coordinates are 16-bit signed, whatever size a server claims.
                    let last = i16::try_from(size.saturating_sub(1)).unwrap_or(i16::MAX);
                    ((f * f64::from(size)).floor() as i16).clamp(0, last)
                };
                let (x, y) = (px(x, self.width), px(y, self.height));
                send(
                    "XTest",
                    self.conn.xtest_fake_input(xproto::MOTION_NOTIFY_EVENT, 0, CURRENT_TIME, self.root, x, y, 0),
                )
            }
            InputEvent::Button { code, down } => {
                let b = match code {
                    keys::BTN_LEFT => 1,
                    keys::BTN_MIDDLE => 2,
                    keys::BTN_RIGHT => 3,
                    keys::BTN_SIDE => 8,
                    keys::BTN_EXTRA => 9,
                    _ => return Err(DesktopError::Rejected(format!("button {code:#x} has no X button"))),
                };
                self.button(b, down)
            }
            InputEvent::Wheel { dx, dy } => {
                self.clicks(4, 5, dy)?;
                self.clicks(6, 7, dx)
            }
            InputEvent::Scroll { dx, dy } => {
                let add = |acc: &mut f64, d: f64| -> i32 {
                    if !d.is_finite() || d == 0.0 {
                        return 0;
                    }
                    // A turn the other way starts afresh.
                    if acc.signum() != d.signum() {
                        *acc = 0.0;
                    }
                    *acc += d;
                    let n = (*acc / SCROLL_PX_PER_CLICK).trunc();
                    *acc -= n * SCROLL_PX_PER_CLICK;
                    n as i32
                };
                let (mut ax, mut ay) = self.scroll;
                let (nx, ny) = (add(&mut ax, dx), add(&mut ay, dy));
                self.scroll = (ax, ay);
                self.clicks(4, 5, ny)?;
                self.clicks(6, 7, nx)
            }
        }
    }
}

/// A conversion of another client's clipboard in progress.
struct Fetch {
    target: xproto::Atom,
    deadline: Instant,
    /// Chunks so far when the owner sends INCR.
    incr: Option<(xproto::Atom, Vec<u8>)>,
}

struct ClipState {
    conn: RustConnection,
    win: Window,
    atoms: Atoms,
    /// What we serve while we own CLIPBOARD.
    owned: Option<Arc<str>>,
    fetch: Option<Fetch>,
    tx: ClipboardTx,
    /// The largest property we can write in one request.
    max_bytes: usize,
}

impl ClipState {
    fn new(display: Option<&str>, tx: ClipboardTx) -> Result<ClipState, DesktopError> {
        let (conn, screen) = RustConnection::connect(display).map_err(|e| x11_err("connecting", e))?;
        let root =
            conn.setup().roots.get(screen).ok_or_else(|| x11_err("connecting", format!("no screen {screen}")))?.root;
        let atoms = Atoms::new(&conn).map_err(|e| x11_err("atoms", e))?.reply().map_err(|e| x11_err("atoms", e))?;
        conn.xfixes_query_version(5, 0).map_err(|e| x11_err("XFixes", e))?.reply().map_err(|e| x11_err("XFixes", e))?;
        let win = conn.generate_id().map_err(|e| x11_err("window id", e))?;
        let aux = xproto::CreateWindowAux::new().event_mask(EventMask::PROPERTY_CHANGE);
        send(
            "creating the clipboard window",
            conn.create_window(0, win, root, -1, -1, 1, 1, 0, xproto::WindowClass::INPUT_ONLY, 0, &aux),
        )?;
        send(
            "watching the clipboard",
            conn.xfixes_select_selection_input(win, atoms.CLIPBOARD, xfixes::SelectionEventMask::SET_SELECTION_OWNER),
        )?;
        let max_bytes = conn.maximum_request_bytes();
        let mut s = ClipState { conn, win, atoms, owned: None, fetch: None, tx, max_bytes };
        // Someone may own it already: start from what it holds.
        let owner = s
            .conn
            .get_selection_owner(s.atoms.CLIPBOARD)
            .map_err(|e| x11_err("clipboard owner", e))?
            .reply()
            .map_err(|e| x11_err("clipboard owner", e))?
            .owner;
        if owner != NONE {
            s.start_fetch(s.atoms.UTF8_STRING, CURRENT_TIME)?;
        }
        s.conn.flush().map_err(|e| x11_err("flush", e))?;
        Ok(s)
    }

    fn run(mut self, rx: mpsc::Receiver<SetClipboard>, wake: OwnedFd) {
        match self.serve(&rx, &wake) {
            Ok(()) => tracing::debug!("x11: clipboard stopped"),
            Err(e) => tracing::warn!("x11: clipboard stopped: {e}"),
        }
        // Our connection closing destroys the window and gives up the
        // selection with it.
    }

    fn serve(&mut self, rx: &mpsc::Receiver<SetClipboard>, wake: &OwnedFd) -> Result<(), DesktopError> {
        loop {
            loop {
                match rx.try_recv() {
                    Ok(SetClipboard(text, reply)) => {
                        let _ = reply.send(self.take(text));
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            while let Some(ev) = self.conn.poll_for_event().map_err(|e| x11_err("reading events", e))? {
                self.handle(ev)?;
            }
            self.conn.flush().map_err(|e| x11_err("flush", e))?;
            let now = Instant::now();
            if let Some(f) = &self.fetch
                && f.deadline <= now
            {
                tracing::info!("x11: the clipboard owner did not hand over its text within {FETCH_TIMEOUT:?}");
                self.fetch = None;
            }
            let timeout = self.fetch.as_ref().map(|f| {
                let d = f.deadline.saturating_duration_since(now);
                Timespec { tv_sec: d.as_secs() as _, tv_nsec: d.subsec_nanos().into() }
            });
            let mut fds = [PollFd::new(self.conn.stream(), PollFlags::IN), PollFd::new(wake, PollFlags::IN)];
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(x11_err("poll", e)),
            }
            if !fds[1].revents().is_empty() {
                // Drained here; the queue is read at the top of the loop. EOF
                // (the backend dropped) shows as a closed queue there too.
                let _ = rustix::io::read(wake, &mut [0; 64]);
            }
        }
    }

    /// Makes our window the CLIPBOARD owner, serving `text`.
    fn take(&mut self, text: Arc<str>) -> Result<(), DesktopError> {
        send("taking the clipboard", self.conn.set_selection_owner(self.win, self.atoms.CLIPBOARD, CURRENT_TIME))?;
        let owner = self
            .conn
            .get_selection_owner(self.atoms.CLIPBOARD)
            .map_err(|e| x11_err("clipboard owner", e))?
            .reply()
            .map_err(|e| x11_err("clipboard owner", e))?
            .owner;
        if owner != self.win {
            return Err(DesktopError::Unavailable("x11: another client kept the clipboard".into()));
        }
        self.owned = Some(text);
        // A fetch of what was there before is moot now.
        self.fetch = None;
        Ok(())
    }

    fn start_fetch(&mut self, target: xproto::Atom, time: u32) -> Result<(), DesktopError> {
        let (sel, prop) = (self.atoms.CLIPBOARD, self.atoms.HXFR_SELECTION);
        send("asking for the clipboard", self.conn.convert_selection(self.win, sel, target, prop, time))?;
        self.fetch = Some(Fetch { target, deadline: Instant::now() + FETCH_TIMEOUT, incr: None });
        Ok(())
    }

    fn handle(&mut self, ev: Event) -> Result<(), DesktopError> {
        let a = &self.atoms;
        match ev {
            // Another client copied: fetch it (our own taking is no news).
            Event::XfixesSelectionNotify(e) if e.selection == a.CLIPBOARD && e.owner != self.win && e.owner != NONE => {
                self.owned = None;
                self.start_fetch(self.atoms.UTF8_STRING, e.selection_timestamp)?;
            }
            Event::SelectionNotify(e) if e.requestor == self.win && e.selection == a.CLIPBOARD => {
                let Some(f) = &self.fetch else { return Ok(()) };
                if e.property == NONE {
                    // Old clients may know only STRING.
                    if f.target == self.atoms.UTF8_STRING {
                        self.start_fetch(AtomEnum::STRING.into(), e.time)?;
                    } else {
                        tracing::info!("x11: the clipboard owner offers no text");
                        self.fetch = None;
                    }
                    return Ok(());
                }
                self.read_property(false)?;
            }
            Event::PropertyNotify(e)
                if e.window == self.win
                    && e.atom == a.HXFR_SELECTION
                    && e.state == xproto::Property::NEW_VALUE
                    && self.fetch.as_ref().is_some_and(|f| f.incr.is_some()) =>
            {
                self.read_property(true)?;
            }
            Event::SelectionRequest(e) => self.answer(e)?,
            Event::SelectionClear(e) if e.selection == a.CLIPBOARD && e.owner == self.win => self.owned = None,
            // Errors of requests that name other clients' windows, which may be gone.
            Event::Error(e) => tracing::debug!("x11: clipboard request failed: {e:?}"),
            _ => {}
        }
        Ok(())
    }

    /// Reads (and deletes) our property: the whole text, the INCR marker or
    /// one INCR chunk.
    fn read_property(&mut self, chunk: bool) -> Result<(), DesktopError> {
        let long_len = u32::try_from(CLIPBOARD_MAX / 4 + 1).unwrap_or(u32::MAX);
        let r = self
            .conn
            .get_property(true, self.win, self.atoms.HXFR_SELECTION, AtomEnum::ANY, 0, long_len)
            .map_err(|e| x11_err("reading the clipboard", e))?
            .reply();
        let r = match r {
            Ok(r) => r,
            Err(ReplyError::X11Error(e)) => {
                tracing::info!("x11: reading the clipboard: {e:?}");
                self.fetch = None;
                return Ok(());
            }
            Err(e) => return Err(x11_err("reading the clipboard", e)),
        };
        let Some(f) = self.fetch.as_mut() else { return Ok(()) };
        if !chunk && r.type_ == self.atoms.INCR {
            // Deleting the property (done) asks the owner for the first chunk.
            f.incr = Some((NONE, Vec::new()));
            f.deadline = Instant::now() + FETCH_TIMEOUT;
            return Ok(());
        }
        if r.format != 8 || r.bytes_after > 0 || r.value.len() > CLIPBOARD_MAX {
            tracing::info!("x11: the clipboard is not text of at most {CLIPBOARD_MAX} bytes; ignored");
            self.fetch = None;
            return Ok(());
        }
        let (ty, bytes) = match f.incr.as_mut() {
            None => (r.type_, r.value),
            Some((ty, buf)) if !r.value.is_empty() => {
                if buf.len() + r.value.len() > CLIPBOARD_MAX {
                    tracing::info!("x11: the clipboard is over {CLIPBOARD_MAX} bytes; ignored");
                    self.fetch = None;
                    return Ok(());
                }
                *ty = r.type_;
                buf.extend_from_slice(&r.value);
                f.deadline = Instant::now() + FETCH_TIMEOUT;
                return Ok(());
            }
            // An empty chunk ends the transfer.
            Some((ty, buf)) => (*ty, std::mem::take(buf)),
        };
        self.fetch = None;
        let text = if ty == self.atoms.UTF8_STRING {
            String::from_utf8_lossy(&bytes).into_owned()
        } else if ty == u32::from(AtomEnum::STRING) {
            bytes.iter().map(|&b| char::from(b)).collect()
        } else {
            tracing::info!("x11: the clipboard holds type {ty}, not text; ignored");
            return Ok(());
        };
        let text: Arc<str> = text.into();
        self.tx.send_if_modified(|cur| {
            if cur.as_deref() == Some(&*text) {
                return false;
            }
            *cur = Some(text);
            true
        });
        Ok(())
    }

    /// Answers another client asking for what we hold.
    fn answer(&mut self, e: xproto::SelectionRequestEvent) -> Result<(), DesktopError> {
        let a = &self.atoms;
        // ICCCM: a requestor naming no property is an obsolete client.
        let prop = if e.property == NONE { e.target } else { e.property };
        let string = u32::from(AtomEnum::STRING);
        let ok = match self.owned.as_deref() {
            Some(text) if e.selection == a.CLIPBOARD => {
                let (ty, bytes): (u32, std::borrow::Cow<[u8]>) = if e.target == a.UTF8_STRING || e.target == a.TEXT {
                    (a.UTF8_STRING, text.as_bytes().into())
                } else if e.target == string {
                    (string, text.chars().map(|c| u8::try_from(c).unwrap_or(b'?')).collect::<Vec<u8>>().into())
                } else {
                    (NONE, [][..].into())
                };
                if e.target == a.TARGETS {
                    let targets = [a.TARGETS, a.UTF8_STRING, string, a.TEXT];
                    send(
                        "answering for the clipboard",
                        self.conn.change_property32(PropMode::REPLACE, e.requestor, prop, AtomEnum::ATOM, &targets),
                    )?;
                    true
                } else if ty == NONE {
                    false
                } else if bytes.len() + 64 > self.max_bytes {
                    // CLIPBOARD_MAX fits any server with BIG-REQUESTS; no INCR.
                    tracing::info!("x11: clipboard text of {} bytes is over this server's request size", bytes.len());
                    false
                } else {
                    send(
                        "answering for the clipboard",
                        self.conn.change_property8(PropMode::REPLACE, e.requestor, prop, ty, &bytes),
                    )?;
                    true
                }
            }
            _ => false,
        };
        let notify = xproto::SelectionNotifyEvent {
            response_type: xproto::SELECTION_NOTIFY_EVENT,
            sequence: 0,
            time: e.time,
            requestor: e.requestor,
            selection: e.selection,
            target: e.target,
            property: if ok { prop } else { NONE },
        };
        send("answering for the clipboard", self.conn.send_event(false, e.requestor, EventMask::NO_EVENT, notify))
    }
}
