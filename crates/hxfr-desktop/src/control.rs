//! The one way input reaches a desktop: a bounded queue in front of a
//! backend task. A viewer that floods gets its events dropped (counted), not
//! a growing queue; keys and buttons held down are remembered, so a page
//! that loses focus (or a viewer that leaves) releases them all.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, watch};

use crate::DesktopError;
use crate::input::{InputEvent, ViewerMessage};

/// Events waiting for the backend; more are dropped.
pub const QUEUE: usize = 256;
/// Keys and buttons held down at once; a press beyond this is dropped.
pub const HELD_MAX: usize = 64;

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
}

/// The handle the bridge holds.
pub struct Control {
    name: &'static str,
    tx: mpsc::Sender<ViewerMessage>,
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
        let task = tokio::spawn(run(backend, rx, stats.clone()));
        Control { name, tx, clipboard, stats, task }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Queues a validated message; false when it was dropped (queue full).
    pub fn send(&self, m: ViewerMessage) -> bool {
        let ok = self.tx.try_send(m).is_ok();
        if !ok {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
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

/// What is held down: keys, keysyms and buttons, so they can be let go.
#[derive(Default)]
struct Held(BTreeSet<(u8, u32)>);

impl Held {
    fn key(ev: &InputEvent) -> Option<((u8, u32), bool)> {
        match *ev {
            InputEvent::Key { code, down } => Some(((0, code), down)),
            InputEvent::Keysym { sym, down } => Some(((1, sym), down)),
            InputEvent::Button { code, down } => Some(((2, code), down)),
            _ => None,
        }
    }

    /// Whether `ev` may go through (a press past [`HELD_MAX`] may not).
    fn admit(&mut self, ev: &InputEvent) -> bool {
        match Held::key(ev) {
            Some((k, true)) => self.0.contains(&k) || self.0.len() < HELD_MAX && self.0.insert(k),
            Some((k, false)) => {
                self.0.remove(&k);
                true
            }
            None => true,
        }
    }

    fn release_all(&mut self) -> Vec<InputEvent> {
        std::mem::take(&mut self.0)
            .into_iter()
            .map(|(kind, code)| match kind {
                0 => InputEvent::Key { code, down: false },
                1 => InputEvent::Keysym { sym: code, down: false },
                _ => InputEvent::Button { code, down: false },
            })
            .collect()
    }
}

async fn run<B: Backend>(mut backend: B, mut rx: mpsc::Receiver<ViewerMessage>, stats: Arc<ControlStats>) {
    let mut held = Held::default();
    while let Some(m) = rx.recv().await {
        let events = match m {
            ViewerMessage::Input(ev) => {
                if !held.admit(&ev) {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                vec![ev]
            }
            ViewerMessage::Release => held.release_all(),
            ViewerMessage::Clipboard(text) => {
                match backend.set_clipboard(text).await {
                    Ok(()) => stats.clipboard_set.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        tracing::warn!("{}: setting the clipboard: {e}", backend.name());
                        stats.failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                continue;
            }
        };
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
            assert!(c.send(m));
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
            .filter(|i| c.send(ViewerMessage::Input(InputEvent::Pointer { x: (*i as f64) / 1e4, y: 0.5 })))
            .count();
        assert_eq!(sent, QUEUE);
        assert_eq!(c.stats.dropped.load(Ordering::Relaxed), 10_000 - QUEUE as u64);
        settle(&c, QUEUE as u64).await;
    }

    #[tokio::test]
    async fn presses_beyond_the_held_limit_are_dropped() {
        let r = Recorder::default();
        let c = Control::spawn(r.clone(), clipboard_channel().1);
        for sym in 0..(HELD_MAX as u32 + 10) {
            c.send(ViewerMessage::Input(InputEvent::Keysym { sym: 0x1000000 + sym, down: true }));
        }
        // A marker behind them: once it is through, so is everything before it.
        c.send(ViewerMessage::Input(InputEvent::Pointer { x: 0.0, y: 0.0 }));
        settle(&c, HELD_MAX as u64 + 1).await;
        assert_eq!(r.0.lock().unwrap().last(), Some(&InputEvent::Pointer { x: 0.0, y: 0.0 }));
        assert_eq!(c.stats.injected.load(Ordering::Relaxed), HELD_MAX as u64 + 1);
        assert_eq!(c.stats.dropped.load(Ordering::Relaxed), 10);
    }
}
