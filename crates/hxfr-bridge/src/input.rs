//! Input from viewers into the desktop, gated: only on a desktop that takes
//! input (gnome, x11), never with `--view-only`, and only from viewers that
//! got in (the token, when one is set, is checked before a socket opens).
//! Every message is validated by `hxfr_desktop::input`; refusals and
//! malformed messages are counted and logged at most once a second, and the
//! viewer stays connected.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hxfr_desktop::control::{ClipboardRx, ViewerId};
use hxfr_desktop::{Control, ViewerMessage};

#[derive(Debug, Default)]
pub struct InputCounters {
    /// Taken for the desktop (a flood's overflow is counted as dropped by
    /// the control queue instead).
    pub accepted: AtomicU64,
    /// Malformed, unknown or out of range.
    pub invalid: AtomicU64,
    /// Sent to a view-only bridge or a desktop that takes no input.
    pub refused: AtomicU64,
}

pub struct InputGate {
    control: Option<Arc<Control>>,
    view_only: bool,
    pub counters: InputCounters,
    last_log: Mutex<Option<Instant>>,
    next_viewer: AtomicU64,
}

impl InputGate {
    pub fn new(control: Option<Arc<Control>>, view_only: bool) -> InputGate {
        InputGate {
            control,
            view_only,
            counters: InputCounters::default(),
            last_log: Mutex::new(None),
            next_viewer: AtomicU64::new(1),
        }
    }

    /// Whether viewers' input reaches the desktop.
    pub fn interactive(&self) -> bool {
        self.control.is_some() && !self.view_only
    }

    /// The desktop that takes the input ("gnome", "x11"), if any.
    pub fn desktop(&self) -> Option<&'static str> {
        self.control.as_ref().map(|c| c.name())
    }

    /// The control queue's own counters (dropped in a flood, backend failures).
    pub fn control(&self) -> Option<&Control> {
        self.control.as_deref()
    }

    /// The desktop's clipboard, for interactive viewers only.
    pub fn clipboard(&self) -> Option<ClipboardRx> {
        self.control.as_ref().filter(|_| !self.view_only).map(|c| c.clipboard())
    }

    /// A number for a new viewer: whose keys are whose.
    pub fn viewer(&self) -> ViewerId {
        self.next_viewer.fetch_add(1, Ordering::Relaxed)
    }

    /// One input message from viewer `from` (its `type` is one of
    /// `hxfr_desktop::input::TYPES`).
    pub fn handle(&self, from: ViewerId, text: &str) {
        let Some(control) = self.control.as_ref().filter(|_| !self.view_only) else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            let why = if self.view_only { "the bridge is view-only" } else { "this source takes no input" };
            self.log(|n| tracing::info!("ignoring viewer input: {why} ({n} so far)"), &self.counters.refused);
            return;
        };
        match ViewerMessage::parse(text) {
            Ok(m) => {
                // Dropped in a flood: counted by the control queue, not here.
                if control.send(from, m) {
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => self.invalid(&e.to_string()),
        }
    }

    /// A text message that is not JSON, or of a type nobody handles.
    pub fn invalid(&self, why: &str) {
        self.counters.invalid.fetch_add(1, Ordering::Relaxed);
        self.log(|n| tracing::warn!("dropping a viewer message: {why} ({n} so far)"), &self.counters.invalid);
    }

    /// Lets go of every key and button viewer `from` holds (it left).
    pub fn release(&self, from: ViewerId) {
        if let Some(c) = self.control.as_ref().filter(|_| !self.view_only) {
            c.release(from);
        }
    }

    /// Logs at most once a second, whatever a viewer floods.
    fn log(&self, f: impl FnOnce(u64), counter: &AtomicU64) {
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            f(counter.load(Ordering::Relaxed));
        }
    }
}
