//! GNOME: capture through Mutter's ScreenCast API (a PipeWire node for
//! `pipewiresrc`) and input through its RemoteDesktop API, in one session
//! that is started again whenever Mutter closes it or restarts.
//!
//! [`GnomeDesktop`] owns the session (and a task watching it); [`GnomeInput`]
//! is the [`Backend`] that injects into whichever session is current.

mod clipboard;
mod dbus;
mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{oneshot, watch};

use crate::DesktopError;
use crate::control::{Backend, ClipboardTx};
use crate::input::InputEvent;
use clipboard::Ours;
use session::{Live, Signals};

/// How long [`GnomeDesktop::start`] may take for the first session.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Between attempts to start a new session after one ended.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long an input event waits for a session that is being restarted.
const INPUT_WAIT: Duration = Duration::from_secs(2);
/// NotifyPointerAxis flag: from a device that scrolls continuously (no
/// kinetic scrolling after it, no finish event expected).
const AXIS_SOURCE_CONTINUOUS: u32 = 8;

#[derive(Debug, Clone, Default)]
pub struct GnomeConfig {
    /// The D-Bus address of Mutter's session bus; `None`:
    /// `$DBUS_SESSION_BUS_ADDRESS`.
    pub dbus_address: Option<String>,
}

/// What the watching task and the input backend share.
struct Shared {
    session: watch::Sender<Option<Arc<Live>>>,
    ours: Ours,
}

/// A Mutter remote desktop session that keeps itself going.
pub struct GnomeDesktop {
    node: watch::Receiver<Option<u32>>,
    size: watch::Receiver<(u32, u32)>,
    /// The recorded monitor's connector (`Virtual-1` on virtio-gpu, `Meta-0` headless).
    connector: String,
    sessions: Arc<AtomicU64>,
    /// Dropping it tells the task to stop the session and end.
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Input into the current session of a [`GnomeDesktop`].
pub struct GnomeInput {
    session: watch::Receiver<Option<Arc<Live>>>,
    shared: Arc<Shared>,
}

impl GnomeDesktop {
    /// Starts a session and returns once its PipeWire node is known. The
    /// desktop's clipboard text is published on `clipboard` when it changes.
    pub async fn start(cfg: GnomeConfig, clipboard: ClipboardTx) -> Result<(GnomeDesktop, GnomeInput), DesktopError> {
        let address = match cfg.dbus_address {
            Some(a) => a,
            None => std::env::var("DBUS_SESSION_BUS_ADDRESS").map_err(|_| {
                DesktopError::Unavailable("no D-Bus session bus: DBUS_SESSION_BUS_ADDRESS is not set".into())
            })?,
        };
        let first = tokio::time::timeout(START_TIMEOUT, session::establish(&address)).await.map_err(|_| {
            DesktopError::Timeout { what: "starting a Mutter remote desktop session", after: START_TIMEOUT }
        })??;
        tracing::info!(
            "gnome: recording {} ({}x{}) as PipeWire node {}",
            first.0.connector,
            first.0.size.0,
            first.0.size.1,
            first.0.node
        );
        let connector = first.0.connector.clone();
        let (node_tx, node) = watch::channel(Some(first.0.node));
        let (size_tx, size) = watch::channel(first.0.size);
        let (session_tx, session_rx) = watch::channel(None);
        let shared = Arc::new(Shared { session: session_tx, ours: Ours::default() });
        let sessions = Arc::new(AtomicU64::new(1));
        let (stop, stop_rx) = oneshot::channel();
        let sup = Supervisor {
            address,
            shared: shared.clone(),
            node: node_tx,
            size: size_tx,
            clipboard,
            sessions: sessions.clone(),
        };
        let task = tokio::spawn(sup.run(first, stop_rx));
        let desktop = GnomeDesktop { node, size, connector, sessions, stop: Some(stop), task: Some(task) };
        Ok((desktop, GnomeInput { session: session_rx, shared }))
    }

    /// The PipeWire node of the monitor's stream; `None` while a new session
    /// is being started.
    pub fn node(&self) -> watch::Receiver<Option<u32>> {
        self.node.clone()
    }

    /// The recorded monitor's size in pixels (the last session's while a new
    /// one is being started).
    pub fn size(&self) -> (u32, u32) {
        *self.size.borrow()
    }

    /// The connector of the monitor the first session recorded.
    pub fn connector(&self) -> &str {
        &self.connector
    }

    /// Stops the session and waits until Mutter has it closed (dropping
    /// does the same without waiting). Mutter 43 does not exit on SIGTERM
    /// while a session runs: stop it before stopping Mutter.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(session::CALL_TIMEOUT, task).await;
        }
    }

    /// How many sessions have been started so far (1, then one more per
    /// restart).
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }
}

impl Drop for GnomeDesktop {
    fn drop(&mut self) {
        // The task calls Stop on the session, then ends (dropping its bus
        // connection, which ends the session even if Stop did not get through).
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Why a session's service ended.
enum Ended {
    Stop,
    Lost(&'static str),
}

struct Supervisor {
    address: String,
    shared: Arc<Shared>,
    node: watch::Sender<Option<u32>>,
    size: watch::Sender<(u32, u32)>,
    clipboard: ClipboardTx,
    sessions: Arc<AtomicU64>,
}

impl Supervisor {
    async fn run(self, first: (Live, Signals), mut stop: oneshot::Receiver<()>) {
        let mut next = Some(first);
        let mut backoff = BACKOFF_MIN;
        loop {
            let (live, signals) = match next.take() {
                Some(s) => s,
                None => {
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    let attempt = tokio::select! {
                        _ = &mut stop => return,
                        r = session::establish(&self.address) => r,
                    };
                    match attempt {
                        Ok(s) => {
                            tracing::info!("gnome: new session, PipeWire node {}", s.0.node);
                            self.sessions.fetch_add(1, Ordering::Relaxed);
                            s
                        }
                        Err(e) => {
                            tracing::warn!("gnome: starting a new session (next try in {backoff:?}): {e}");
                            continue;
                        }
                    }
                }
            };
            backoff = BACKOFF_MIN;
            // Text the viewer set is offered again in the new session.
            if self.shared.ours.get().is_some()
                && let Err(e) = clipboard::offer(&live.rd).await
            {
                tracing::warn!("gnome: offering the clipboard again: {e}");
            }
            let live = Arc::new(live);
            self.size.send_if_modified(|s| std::mem::replace(s, live.size) != live.size);
            self.shared.session.send_replace(Some(live.clone()));
            // Only a change is news: the first session's node is there from the start.
            self.node.send_if_modified(|n| n.replace(live.node) != Some(live.node));

            let ended = self.serve(&live, signals, &mut stop).await;
            self.node.send_replace(None);
            self.shared.session.send_replace(None);
            match ended {
                Ended::Stop => {
                    if let Err(e) = live.rd.stop().await {
                        tracing::debug!("gnome: stopping the session: {e}");
                    }
                    return;
                }
                Ended::Lost(why) => tracing::warn!("gnome: {why}; starting a new session"),
            }
        }
    }

    /// Answers the session's clipboard signals until it ends.
    async fn serve(&self, live: &Live, mut s: Signals, stop: &mut oneshot::Receiver<()>) -> Ended {
        loop {
            tokio::select! {
                _ = &mut *stop => return Ended::Stop,
                _ = s.closed.next() => return Ended::Lost("Mutter closed the remote desktop session"),
                _ = s.sc_closed.next() => return Ended::Lost("Mutter closed the screencast session"),
                _ = s.owner.next() => return Ended::Lost("Mutter left the bus"),
                Some(sig) = s.selection_owner.next() => {
                    let Ok(args) = sig.args() else { continue };
                    tracing::debug!("gnome: SelectionOwnerChanged {:?}", args.options);
                    if clipboard::session_is_owner(&args.options) {
                        continue; // our own SetSelection
                    }
                    // The desktop owns the clipboard now, not the viewer's text.
                    self.shared.ours.set(None);
                    if let Some(mime) = clipboard::text_mime(&args.options) {
                        tokio::spawn(clipboard::read(live.rd.clone(), mime, self.clipboard.clone()));
                    }
                }
                Some(sig) = s.transfer.next() => {
                    let Ok(args) = sig.args() else { continue };
                    tracing::debug!("gnome: SelectionTransfer {} {}", args.mime_type, args.serial);
                    let ours = self.shared.ours.get();
                    tokio::spawn(clipboard::transfer(live.rd.clone(), ours, args.mime_type, args.serial));
                }
            }
        }
    }
}

impl GnomeInput {
    /// The current session, waiting a little for one being restarted.
    async fn live(&mut self) -> Result<Arc<Live>, DesktopError> {
        let current = self.session.borrow().clone();
        if let Some(l) = current {
            return Ok(l);
        }
        match tokio::time::timeout(INPUT_WAIT, self.session.wait_for(|s| s.is_some())).await {
            Ok(Ok(s)) => s.clone().ok_or_else(|| DesktopError::Unavailable("no GNOME session".into())),
            Ok(Err(_)) => Err(DesktopError::Unavailable("the GNOME session has ended".into())),
            Err(_) => Err(DesktopError::Unavailable("no GNOME session (restarting)".into())),
        }
    }
}

impl Backend for GnomeInput {
    fn name(&self) -> &'static str {
        "gnome"
    }

    async fn inject(&mut self, ev: InputEvent) -> Result<(), DesktopError> {
        let live = self.live().await?;
        let rd = &live.rd;
        let r = match ev {
            InputEvent::Key { code, down } => rd.notify_keyboard_keycode(code, down).await,
            InputEvent::Keysym { sym, down } => rd.notify_keyboard_keysym(sym, down).await,
            InputEvent::Pointer { x, y } => {
                let (w, h) = live.size;
                let px = |f: f64, n: u32| (f * n as f64).clamp(0.0, n.saturating_sub(1) as f64);
                rd.notify_pointer_motion_absolute(&live.stream, px(x, w), px(y, h)).await
            }
            InputEvent::Button { code, down } => {
                let code = i32::try_from(code).map_err(|_| DesktopError::Rejected(format!("button {code}")))?;
                rd.notify_pointer_button(code, down).await
            }
            InputEvent::Wheel { dx, dy } => {
                // Axis 0 is vertical, 1 horizontal; positive steps scroll down/right.
                let mut r = Ok(());
                for (axis, steps) in [(0, dy), (1, dx)] {
                    if steps != 0 && r.is_ok() {
                        r = rd.notify_pointer_axis_discrete(axis, steps).await;
                    }
                }
                r
            }
            InputEvent::Scroll { dx, dy } => rd.notify_pointer_axis(dx, dy, AXIS_SOURCE_CONTINUOUS).await,
        };
        r.map_err(|e| DesktopError::Rejected(format!("Mutter: {e}")))
    }

    async fn set_clipboard(&mut self, text: String) -> Result<(), DesktopError> {
        // Kept even without a session: the next one offers it.
        self.shared.ours.set(Some(text.into()));
        let live = self.live().await?;
        clipboard::offer(&live.rd).await
    }
}
