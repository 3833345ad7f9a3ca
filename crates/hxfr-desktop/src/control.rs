//! The one way input reaches a desktop: a bounded queue in front of a
//! backend task. A viewer that floods gets its events dropped (counted), not
//! a growing queue. What must not be lost is not lost: a release that does
//! not fit marks its viewer for a full release, which the task carries out
//! before anything else (and presses that viewer sent before it, still in
//! the queue, are dropped, so they cannot press a key after its release);
//! clipboard text is one slot (the newest wins). Keys and buttons held down are remembered per viewer, so a
//! page that loses focus, or a viewer that leaves, lets go of its own keys
//! and nobody else's.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, watch};

use crate::DesktopError;
use crate::input::{InputEvent, ViewerMessage};

/// Events waiting for the backend; more are dropped.
pub const QUEUE: usize = 256;
/// Keys and buttons held down at once, all viewers together; a press beyond
/// this is dropped.
pub const HELD_MAX: usize = 64;

/// Who sent an event: one number per viewer connection.
pub type ViewerId = u64;

/// The desktop's clipboard text, as the backend last saw it.
pub type ClipboardTx = watch::Sender<Option<Arc<str>>>;
pub type ClipboardRx = watch::Receiver<Option<Arc<str>>>;

pub fn clipboard_channel() -> (ClipboardTx, ClipboardRx) {
    watch::channel(None)
}

/// A desktop that takes input: GNOME through RemoteDesktop, X11 through XTest.
pub trait Backend: Send + 'static {
    /// For logs and the page: "gnome", "x11".
    fn name(&self) -> &'static str;
    fn inject(&mut self, ev: InputEvent) -> impl Future<Output = Result<(), DesktopError>> + Send;
    fn set_clipboard(&mut self, text: String) -> impl Future<Output = Result<(), DesktopError>> + Send;
}

#[derive(Debug, Default)]
pub struct ControlStats {
    pub injected: AtomicU64,
    /// Dropped because the queue was full or too much was held down.
    pub dropped: AtomicU64,
    /// The backend said no (logged).
    pub failed: AtomicU64,
    pub clipboard_set: AtomicU64,
    /// Pointer moves passed over for a newer one right behind them.
    pub coalesced: AtomicU64,
}

/// What does not go through the queue.
#[derive(Default)]
struct Urgent {
    /// Viewers whose held keys and buttons must all be let go, with the
    /// sequence number of that release.
    release: Mutex<HashMap<ViewerId, u64>>,
    /// The newest clipboard text not yet handed to the backend.
    clipboard: Mutex<Option<String>>,
    wake: Notify,
}

/// A queued message, in the order viewers sent them.
struct Queued {
    who: ViewerId,
    seq: u64,
    release: bool,
    ev: Option<InputEvent>,
}

/// The handle the bridge holds.
pub struct Control {
    name: &'static str,
    tx: mpsc::Sender<Queued>,
    seq: AtomicU64,
    urgent: Arc<Urgent>,
    clipboard: ClipboardRx,
    pub stats: Arc<ControlStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Control {
    /// Starts the backend's task (needs a tokio runtime).
    pub fn spawn<B: Backend>(backend: B, clipboard: ClipboardRx) -> Control {
        let name = backend.name();
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(ControlStats::default());
        let urgent = Arc::new(Urgent::default());
        let task = tokio::spawn(run(backend, rx, urgent.clone(), stats.clone()));
        Control { name, tx, seq: AtomicU64::new(0), urgent, clipboard, stats, task }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Hands over a validated message from viewer `from`; false when it was
    /// dropped (the queue is full). A release is never dropped: if a key or
    /// button going up does not fit, everything `from` holds is let go.
    pub fn send(&self, from: ViewerId, m: ViewerMessage) -> bool {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (ev, release) = match m {
            ViewerMessage::Input(ev) => (Some(ev), false),
            ViewerMessage::Release => (None, true),
            ViewerMessage::Clipboard(text) => {
                *self.urgent.clipboard.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
                self.urgent.wake.notify_one();
                return true;
            }
        };
        let up = ev.as_ref().and_then(Held::key).is_some_and(|(_, down)| !down);
        if self.tx.try_send(Queued { who: from, seq, release, ev }).is_ok() {
            return true;
        }
        if release || up {
            self.urgent.release.lock().unwrap_or_else(|p| p.into_inner()).insert(from, seq);
            self.urgent.wake.notify_one();
            return true;
        }
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Lets go of everything viewer `from` holds (it left, or lost focus).
    pub fn release(&self, from: ViewerId) {
        self.send(from, ViewerMessage::Release);
    }

    /// The desktop's clipboard, for viewers to watch.
    pub fn clipboard(&self) -> ClipboardRx {
        self.clipboard.clone()
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What is held down, by whom: keys, keysyms and buttons, so they can be let go.
#[derive(Default)]
struct Held(BTreeSet<(ViewerId, u8, u32)>);

impl Held {
    fn key(ev: &InputEvent) -> Option<((u8, u32), bool)> {
        match *ev {
            InputEvent::Key { code, down } => Some(((0, code), down)),
            InputEvent::Keysym { sym, down } => Some(((1, sym), down)),
            InputEvent::Button { code, down } => Some(((2, code), down)),
            _ => None,
        }
    }

    /// Whether `ev` from `who` may go through: a press past [`HELD_MAX`] may
    /// not, nor a release of something `who` does not hold (a flood of those
    /// reaches nobody, and one viewer cannot let go of another's keys).
    fn admit(&mut self, who: ViewerId, ev: &InputEvent) -> bool {
        match Held::key(ev) {
            Some(((kind, code), true)) => {
                let k = (who, kind, code);
                self.0.contains(&k) || self.0.len() < HELD_MAX && self.0.insert(k)
            }
            Some(((kind, code), false)) => self.0.remove(&(who, kind, code)),
            None => true,
        }
    }

    fn release(&mut self, who: ViewerId) -> Vec<InputEvent> {
        let mine: Vec<_> = self.0.range((who, 0, 0)..=(who, u8::MAX, u32::MAX)).copied().collect();
        mine.into_iter()
            .map(|k| {
                self.0.remove(&k);
                let (_, kind, code) = k;
                match kind {
                    0 => InputEvent::Key { code, down: false },
                    1 => InputEvent::Keysym { sym: code, down: false },
                    _ => InputEvent::Button { code, down: false },
                }
            })
            .collect()
    }
}

async fn run<B: Backend>(
    mut backend: B,
    mut rx: mpsc::Receiver<Queued>,
    urgent: Arc<Urgent>,
    stats: Arc<ControlStats>,
) {
    let mut held = Held::default();
    // Urgent releases not yet overtaken by the queue: presses queued before
    // them must not press anything after the release.
    let mut barriers: HashMap<ViewerId, u64> = HashMap::new();
    // A message taken from the queue while looking past a pointer move.
    let mut next: Option<Queued> = None;
    loop {
        // Releases and the clipboard first: they must not wait behind a flood.
        let releases: Vec<(ViewerId, u64)> = urgent.release.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        let mut events = Vec::new();
        for (who, seq) in releases {
            events.extend(held.release(who));
            barriers.insert(who, seq);
        }
        let text = urgent.clipboard.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(text) = text {
            match backend.set_clipboard(text).await {
                Ok(()) => stats.clipboard_set.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!("{}: setting the clipboard: {e}", backend.name());
                    stats.failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        if events.is_empty() {
            let mut q = match next.take() {
                Some(q) => q,
                None => tokio::select! {
                    biased;
                    _ = urgent.wake.notified() => continue,
                    q = rx.recv() => match q {
                        Some(q) => q,
                        None => return,
                    },
                },
            };
            // Pointer positions are absolute: of a run of them only the last
            // matters, and a desktop that redraws its cursor for each would
            // fall behind a fast mouse (or a flood).
            while matches!(q.ev, Some(InputEvent::Pointer { .. })) {
                match rx.try_recv() {
                    Ok(n) if matches!(n.ev, Some(InputEvent::Pointer { .. })) && n.who == q.who => {
                        stats.coalesced.fetch_add(1, Ordering::Relaxed);
                        q = n;
                    }
                    Ok(n) => {
                        next = Some(n);
                        break;
                    }
                    Err(_) => break,
                }
            }
            // The queue is in order: once past a barrier, it is done with.
            barriers.retain(|_, at| *at > q.seq);
            match q.ev {
                None if q.release => events = held.release(q.who),
                None => {}
                Some(ev) => {
                    let stale_press = barriers.get(&q.who).is_some_and(|at| q.seq < *at)
                        && Held::key(&ev).is_some_and(|(_, down)| down);
                    if stale_press || !held.admit(q.who, &ev) {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    events.push(ev);
                }
            }
        }
        for ev in events {
            match backend.inject(ev).await {
                Ok(()) => stats.injected.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!("{}: {ev:?}: {e}", backend.name());
                    stats.failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<InputEvent>>>, Arc<Mutex<Vec<String>>>);

    impl Backend for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        async fn inject(&mut self, ev: InputEvent) -> Result<(), DesktopError> {
            self.0.lock().unwrap().push(ev);
            Ok(())
        }
        async fn set_clipboard(&mut self, text: String) -> Result<(), DesktopError> {
            self.1.lock().unwrap().push(text);
            Ok(())
        }
    }

    async fn settle(c: &Control, n: u64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while c.stats.injected.load(Ordering::Relaxed) + c.stats.clipboard_set.load(Ordering::Relaxed) < n {
            assert!(tokio::time::Instant::now() < deadline, "backend got fewer than {n}");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn release_lets_go_of_everything_held_and_nothing_else() {
        let r = Recorder::default();
        let c = Control::spawn(r.clone(), clipboard_channel().1);
        let key = |code, down| ViewerMessage::Input(InputEvent::Key { code, down });
        for m in [
            key(29, true),
            key(30, true),
            key(30, false),
            ViewerMessage::Input(InputEvent::Button { code: 0x110, down: true }),
            ViewerMessage::Release,
            ViewerMessage::Clipboard("x".into()),
        ] {
            assert!(c.send(1, m));
        }
        settle(&c, 7).await;
        let got = r.0.lock().unwrap().clone();
        assert_eq!(got.len(), 6);
        let released: BTreeSet<_> = got[4..].iter().map(|e| format!("{e:?}")).collect();
        assert_eq!(
            released,
            [InputEvent::Key { code: 29, down: false }, InputEvent::Button { code: 0x110, down: false }]
                .iter()
                .map(|e| format!("{e:?}"))
                .collect()
        );
        assert_eq!(*r.1.lock().unwrap(), vec!["x".to_string()]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_flood_is_bounded_and_counted() {
        let r = Recorder::default();
        let c = Control::spawn(r.clone(), clipboard_channel().1);
        // The backend task cannot run until this loop yields: the queue fills.
        let sent = (0..10_000)
            .filter(|i| c.send(1, ViewerMessage::Input(InputEvent::Pointer { x: (*i as f64) / 1e4, y: 0.5 })))
            .count();
        assert_eq!(sent, QUEUE);
        assert_eq!(c.stats.dropped.load(Ordering::Relaxed), 10_000 - QUEUE as u64);
        // The queued moves collapse into the newest: the desktop moves once.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let handled = || c.stats.injected.load(Ordering::Relaxed) + c.stats.coalesced.load(Ordering::Relaxed);
        while handled() < QUEUE as u64 {
            assert!(tokio::time::Instant::now() < deadline, "the queue never drained");
            tokio::task::yield_now().await;
        }
        assert_eq!(*r.0.lock().unwrap(), vec![InputEvent::Pointer { x: (QUEUE - 1) as f64 / 1e4, y: 0.5 }]);
    }

    #[tokio::test]
    async fn presses_beyond_the_held_limit_are_dropped() {
        let r = Recorder::default();
        let c = Control::spawn(r.clone(), clipboard_channel().1);
        for sym in 0..(HELD_MAX as u32 + 10) {
            c.send(1, ViewerMessage::Input(InputEvent::Keysym { sym: 0x1000000 + sym, down: true }));
        }
        // A marker behind them: once it is through, so is everything before it.
        c.send(1, ViewerMessage::Input(InputEvent::Pointer { x: 0.0, y: 0.0 }));
        settle(&c, HELD_MAX as u64 + 1).await;
        assert_eq!(r.0.lock().unwrap().last(), Some(&InputEvent::Pointer { x: 0.0, y: 0.0 }));
        assert_eq!(c.stats.injected.load(Ordering::Relaxed), HELD_MAX as u64 + 1);
        assert_eq!(c.stats.dropped.load(Ordering::Relaxed), 10);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_release_behind_a_flood_is_not_lost_and_nothing_stays_pressed() {
        let r = Recorder::default();
        let c = Control::spawn(r.clone(), clipboard_channel().1);
        let key = |down| ViewerMessage::Input(InputEvent::Key { code: 42, down });
        // Nothing runs the task until this test awaits: the press queues, a
        // flood fills the queue, and the release does not fit.
        assert!(c.send(1, key(true)));
        for i in 0..QUEUE {
            c.send(1, ViewerMessage::Input(InputEvent::Pointer { x: i as f64 / QUEUE as f64, y: 0.0 }));
        }
        assert!(c.send(1, key(false)), "a release is always taken");
        c.send(1, ViewerMessage::Input(InputEvent::Pointer { x: 1.0, y: 1.0 }));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while r.0.lock().unwrap().last() != Some(&InputEvent::Pointer { x: 1.0, y: 1.0 }) {
            assert!(tokio::time::Instant::now() < deadline, "the queue never drained");
            tokio::task::yield_now().await;
            // The marker was dropped with the flood: send it again once there is room.
            c.send(1, ViewerMessage::Input(InputEvent::Pointer { x: 1.0, y: 1.0 }));
        }
        let keys: Vec<_> =
            r.0.lock().unwrap().iter().filter(|e| matches!(e, InputEvent::Key { .. })).copied().collect();
        assert!(
            keys.last().is_none_or(|k| *k == InputEvent::Key { code: 42, down: false }),
            "Shift is left pressed: {keys:?}"
        );
    }

    #[tokio::test]
    async fn one_viewer_s_release_leaves_another_s_keys_alone() {
        let r = Recorder::default();
        let c = Control::spawn(r.clone(), clipboard_channel().1);
        let key = |code, down| ViewerMessage::Input(InputEvent::Key { code, down });
        c.send(1, key(29, true));
        c.send(2, key(30, true));
        c.send(2, ViewerMessage::Release);
        c.send(2, key(29, false)); // viewer 2 never pressed it
        c.send(1, ViewerMessage::Input(InputEvent::Pointer { x: 0.0, y: 0.0 }));
        settle(&c, 4).await;
        assert_eq!(
            *r.0.lock().unwrap(),
            vec![
                InputEvent::Key { code: 29, down: true },
                InputEvent::Key { code: 30, down: true },
                InputEvent::Key { code: 30, down: false },
                InputEvent::Pointer { x: 0.0, y: 0.0 },
            ]
        );
    }
}
