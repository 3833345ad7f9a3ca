//! The desktop side of the bridge: what it captures and what it drives.
//!
//! A viewer's keyboard, pointer and clipboard arrive as JSON on the bridge's
//! WebSocket ([`input::ViewerMessage`]); they are validated into
//! desktop-neutral [`input::InputEvent`]s (Linux evdev codes, pointer
//! positions as fractions of the picture) and handed through a bounded
//! channel ([`control`]) to one backend per desktop kind:
//! Mutter's RemoteDesktop API for GNOME, XTest for X11, none for the test
//! pattern. A backend that sees the desktop's clipboard change publishes the
//! text back the same way.
//!
//! [`gnome::GnomeDesktop`] keeps a Mutter remote desktop session (and the
//! PipeWire node of its monitor's screencast) going; [`headless`] starts a
//! private headless Mutter for tests and `hxfr demo`.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

pub mod control;
pub mod gnome;
pub mod headless;
pub mod input;
pub mod keys;
pub mod x11;

pub use control::{Backend, Control, ControlStats};
pub use gnome::{GnomeConfig, GnomeDesktop, GnomeInput};
pub use headless::{HeadlessConfig, HeadlessDesktop};
pub use input::{InputEvent, ViewerMessage};

/// Why the desktop could not be reached or driven.
#[derive(Debug, thiserror::Error)]
pub enum DesktopError {
    #[error("{0}")]
    Unavailable(String),
    #[error("input rejected: {0}")]
    Rejected(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not installed: run scripts/install-deps.sh")]
    NotInstalled(String),
    #[error("{what} did not come up ({why}){}", tail(log))]
    NotReady { what: String, why: String, log: String },
    #[error("{what}: {msg}")]
    Bus { what: &'static str, msg: String },
    #[error("{what}: no answer within {after:?}")]
    Timeout { what: &'static str, after: std::time::Duration },
}

impl DesktopError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> DesktopError {
        DesktopError::Io { what: what.into(), source }
    }

    pub(crate) fn bus(what: &'static str) -> impl FnOnce(zbus::Error) -> DesktopError {
        move |e| DesktopError::Bus { what, msg: e.to_string() }
    }
}

fn tail(log: &str) -> String {
    if log.is_empty() { String::new() } else { format!("; its output ends with:\n{log}") }
}
