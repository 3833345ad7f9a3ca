//! The desktop behind a source: who takes the viewers' input, and, for
//! `--source gnome`, the Mutter session whose PipeWire stream is captured.
//!
//! GNOME: the bridge opens a RemoteDesktop session with a ScreenCast of the
//! primary monitor (`hxfr_desktop::gnome`); Mutter names the PipeWire node.
//! When Mutter closes the session or restarts, a new one names a new node and
//! [`Desktop::follow`] points the running pipeline's `pipewiresrc` at it.
//! X11: XTest and the X selections on the captured display. The test
//! pattern and scanout push take no input.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use gst::prelude::*;
use hxfr_desktop::Control;
use hxfr_desktop::control::clipboard_channel;
use hxfr_desktop::gnome::{GnomeConfig, GnomeDesktop};

use crate::pipeline::{CAPTURE, Source};

/// Where `--source gnome` finds its desktop.
#[derive(Debug, Clone, Default)]
pub struct DesktopConfig {
    /// The D-Bus session bus Mutter is on (default: `$DBUS_SESSION_BUS_ADDRESS`).
    pub dbus_address: Option<String>,
    /// The PipeWire socket Mutter streams to (default: PipeWire's own lookup,
    /// `$PIPEWIRE_RUNTIME_DIR` or `$XDG_RUNTIME_DIR`, `pipewire-0`).
    pub pipewire_socket: Option<PathBuf>,
}

pub struct Desktop {
    pub control: Option<Arc<Control>>,
    gnome: Option<Arc<Gnome>>,
}

struct Gnome {
    session: GnomeDesktop,
    socket: Option<PathBuf>,
    /// The connection `pipewiresrc` was given; a restarted capture gets a new one.
    connection: Mutex<Option<UnixStream>>,
    /// The session count when the capture was built.
    captured: std::sync::atomic::AtomicU64,
}

impl Gnome {
    /// A new connection to Mutter's PipeWire for `pipewiresrc` (None: its default).
    fn connect(&self) -> Result<Option<RawFd>> {
        Ok(match &self.socket {
            Some(path) => {
                let conn = UnixStream::connect(path)
                    .with_context(|| format!("connecting to PipeWire at {}", path.display()))?;
                let fd = conn.as_raw_fd();
                // pipewiresrc duplicates the fd; ours stays open until the next capture.
                *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
                Some(fd)
            }
            None => None,
        })
    }
}

impl Desktop {
    /// Connects to the desktop `source` names (needs a tokio runtime).
    pub async fn start(source: &Source, cfg: &DesktopConfig) -> Result<Desktop> {
        Ok(match source {
            Source::Gnome => {
                let (clip_tx, clip_rx) = clipboard_channel();
                let (session, input) = GnomeDesktop::start(
                    GnomeConfig { dbus_address: cfg.dbus_address.clone() },
                    clip_tx,
                )
                .await
                .context(
                    "starting a GNOME remote desktop session (is Mutter or gnome-shell running on this session bus?)",
                )?;
                let control = Arc::new(Control::spawn(input, clip_rx));
                let gnome = Gnome {
                    session,
                    socket: cfg.pipewire_socket.clone(),
                    connection: Mutex::new(None),
                    captured: Default::default(),
                };
                Desktop { control: Some(control), gnome: Some(Arc::new(gnome)) }
            }
            Source::X11(display) => {
                let (clip_tx, clip_rx) = clipboard_channel();
                // A few round trips to the X server: off the async workers.
                let display = display.clone();
                let connected = tokio::task::spawn_blocking(move || {
                    hxfr_desktop::x11::X11Input::connect(display.as_deref(), clip_tx)
                })
                .await
                .context("connecting to the X server")?;
                match connected {
                    Ok(input) => Desktop { control: Some(Arc::new(Control::spawn(input, clip_rx))), gnome: None },
                    Err(e) => {
                        tracing::warn!("X11 input is off: {e}");
                        Desktop { control: None, gnome: None }
                    }
                }
            }
            Source::Test | Source::Pipewire { .. } | Source::Scanout(_) => Desktop { control: None, gnome: None },
        })
    }

    /// The virtio-gpu scanout the desktop's monitor is on, and its connector:
    /// Linux names virtio-gpu head N `Virtual-{N+1}`. None for other monitors
    /// (Mutter's headless `Meta-0`, real GPUs) and other sources.
    pub fn scanout(&self) -> Option<(u32, String)> {
        let connector = self.gnome.as_ref()?.session.connector().to_string();
        Some((scanout_of_connector(&connector)?, connector))
    }

    /// Ends the GNOME session and waits until Mutter has closed it (Mutter 43
    /// will not exit on SIGTERM while a remote desktop session is open).
    pub async fn stop(self) {
        if let Some(g) = self.gnome.and_then(|g| Arc::try_unwrap(g).ok()) {
            g.session.stop().await;
        }
    }

    /// What the pipeline captures: for GNOME, the session's PipeWire node.
    pub fn capture(&self, source: &Source) -> Result<Source> {
        match &self.gnome {
            Some(g) => {
                g.captured.store(g.session.sessions(), std::sync::atomic::Ordering::Relaxed);
                let node = (*g.session.node().borrow()).context("the GNOME session has no PipeWire stream yet")?;
                Ok(Source::Pipewire { node: Some(node.to_string()), fd: g.connect()? })
            }
            None => Ok(source.clone()),
        }
    }

    /// Follows a restarted GNOME session: the pipeline captures its new node.
    /// Every new session counts, even one whose node has the old id (PipeWire
    /// reuses ids).
    pub fn follow(&self, pipeline: &gst::Pipeline) {
        let Some(g) = &self.gnome else { return };
        let mut node = g.session.node();
        let (gnome, weak) = (Arc::downgrade(g), pipeline.downgrade());
        // What `capture` saw: a restart since then is caught up with at once.
        let mut seen = g.captured.load(std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            loop {
                let (id, sessions) = {
                    let n = *node.borrow_and_update();
                    (n, gnome.upgrade().map_or(0, |g| g.session.sessions()))
                };
                if let (Some(id), true) = (id, sessions != seen) {
                    seen = sessions;
                    let (Some(pipeline), Some(g)) = (weak.upgrade(), gnome.upgrade()) else { return };
                    tracing::info!("the GNOME session restarted: capturing PipeWire node {id}");
                    let fd = g.connect();
                    // State changes block: off the async workers.
                    let restarted = tokio::task::spawn_blocking(move || {
                        let src = pipeline.by_name(CAPTURE)?;
                        let _ = pipeline.set_state(gst::State::Null);
                        src.set_property("path", id.to_string());
                        match fd {
                            Ok(Some(fd)) => src.set_property("fd", fd),
                            Ok(None) => {}
                            Err(e) => tracing::warn!("{e:#}"),
                        }
                        Some(pipeline.set_state(gst::State::Playing))
                    })
                    .await;
                    if let Ok(Some(Err(e))) = restarted {
                        tracing::warn!("restarting the capture on node {id}: {e}");
                    }
                }
                if node.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Whether an error from the pipeline is the capture losing a GNOME
    /// session's stream, which [`Desktop::follow`] recovers from.
    pub fn recovers(&self, src: Option<&gst::Object>) -> bool {
        self.gnome.is_some() && src.is_some_and(|s| s.name() == CAPTURE)
    }
}

/// `Virtual-N` (N from 1) → scanout N − 1.
pub fn scanout_of_connector(name: &str) -> Option<u32> {
    let n: u32 = name.strip_prefix("Virtual-")?.parse().ok()?;
    n.checked_sub(1).filter(|&s| s < 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_gpu_connectors_name_their_scanout() {
        assert_eq!(scanout_of_connector("Virtual-1"), Some(0));
        assert_eq!(scanout_of_connector("Virtual-16"), Some(15));
        for other in ["Virtual-0", "Virtual-17", "Virtual-", "Meta-0", "HDMI-A-1", "virtual-1", "Virtual-1x"] {
            assert_eq!(scanout_of_connector(other), None, "{other}");
        }
    }
}
