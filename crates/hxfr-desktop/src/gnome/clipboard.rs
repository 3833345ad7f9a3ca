//! Text through RemoteDesktop's selection API, both ways: we offer the
//! viewer's text (SetSelection, then answer each SelectionTransfer), and read
//! what the desktop copies (SelectionOwnerChanged → SelectionRead).

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use zbus::zvariant::Value;

use super::dbus::{Dict, RdSessionProxy};
use crate::DesktopError;
use crate::control::ClipboardTx;
use crate::input::CLIPBOARD_MAX;

/// How long one transfer through a pipe may take, either way.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(3);

/// The text types we offer, best first; and the ones we accept.
const OFFER: &[&str] = &["text/plain;charset=utf-8", "text/plain", "UTF8_STRING", "STRING", "TEXT"];

/// The text we offered, if the desktop's clipboard is still ours.
#[derive(Default)]
pub struct Ours(Mutex<Option<Arc<str>>>);

impl Ours {
    pub fn get(&self) -> Option<Arc<str>> {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn set(&self, text: Option<Arc<str>>) {
        if let Ok(mut g) = self.0.lock() {
            *g = text;
        }
    }
}

/// Makes the session the clipboard's owner, offering text.
pub async fn offer(rd: &RdSessionProxy<'static>) -> Result<(), DesktopError> {
    let mimes: Vec<&str> = OFFER.to_vec();
    rd.set_selection([("mime-types", Value::from(mimes))].into()).await.map_err(DesktopError::bus("SetSelection"))
}

/// Mutter asks for our text: write it into the pipe it gives us.
pub async fn transfer(rd: RdSessionProxy<'static>, ours: Option<Arc<str>>, mime: String, serial: u32) {
    let ok = match ours {
        Some(text) if OFFER.contains(&mime.as_str()) => match write(&rd, serial, &text).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("gnome: clipboard transfer ({mime}): {e}");
                false
            }
        },
        _ => false,
    };
    if let Err(e) = rd.selection_write_done(serial, ok).await {
        tracing::debug!("gnome: SelectionWriteDone: {e}");
    }
}

async fn write(rd: &RdSessionProxy<'static>, serial: u32, text: &str) -> Result<(), DesktopError> {
    let fd: OwnedFd = rd.selection_write(serial).await.map_err(DesktopError::bus("SelectionWrite"))?.into();
    let mut tx = pipe::Sender::from_owned_fd(fd).map_err(|e| DesktopError::io("the SelectionWrite pipe", e))?;
    tokio::time::timeout(TRANSFER_TIMEOUT, tx.write_all(text.as_bytes()))
        .await
        .map_err(|_| DesktopError::Timeout { what: "writing the clipboard to Mutter", after: TRANSFER_TIMEOUT })?
        .map_err(|e| DesktopError::io("writing the clipboard to Mutter", e))
}

/// The text type to read from an owner that offers `options["mime-types"]`.
pub fn text_mime(options: &Dict) -> Option<String> {
    let offered = mime_types(options.get("mime-types")?);
    OFFER.iter().find(|m| offered.iter().any(|o| o == *m)).map(|m| m.to_string())
}

/// The documented `as`, or the `(as)` Mutter 43 actually sends.
fn mime_types(v: &Value<'_>) -> Vec<String> {
    match v {
        Value::Value(inner) => mime_types(inner),
        Value::Structure(s) => s.fields().first().map(mime_types).unwrap_or_default(),
        Value::Array(a) => a.iter().filter_map(|m| <&str>::try_from(m).ok().map(String::from)).collect(),
        _ => Vec::new(),
    }
}

/// Whether the new owner is this session itself (our own SetSelection).
pub fn session_is_owner(options: &Dict) -> bool {
    options.get("session-is-owner").and_then(|v| bool::try_from(v).ok()).unwrap_or(false)
}

/// The desktop copied text: read it and publish it.
pub async fn read(rd: RdSessionProxy<'static>, mime: String, tx: ClipboardTx) {
    match read_text(&rd, &mime).await {
        Ok(text) => {
            let text: Arc<str> = text.into();
            tracing::debug!("gnome: the desktop copied {} bytes", text.len());
            tx.send_if_modified(|cur| {
                let changed = cur.as_deref() != Some(&*text);
                *cur = Some(text);
                changed
            });
        }
        Err(e) => tracing::warn!("gnome: reading the desktop's clipboard ({mime}): {e}"),
    }
}

async fn read_text(rd: &RdSessionProxy<'static>, mime: &str) -> Result<String, DesktopError> {
    let fd: OwnedFd = rd.selection_read(mime).await.map_err(DesktopError::bus("SelectionRead"))?.into();
    let rx = pipe::Receiver::from_owned_fd(fd).map_err(|e| DesktopError::io("the SelectionRead pipe", e))?;
    let mut buf = Vec::new();
    // One byte over the limit tells "too large" from "exactly at it".
    tokio::time::timeout(TRANSFER_TIMEOUT, rx.take(CLIPBOARD_MAX as u64 + 1).read_to_end(&mut buf))
        .await
        .map_err(|_| DesktopError::Timeout { what: "reading the desktop's clipboard", after: TRANSFER_TIMEOUT })?
        .map_err(|e| DesktopError::io("reading the desktop's clipboard", e))?;
    if buf.len() > CLIPBOARD_MAX {
        return Err(DesktopError::Rejected(format!("clipboard text over the {CLIPBOARD_MAX}-byte limit")));
    }
    String::from_utf8(buf).map_err(|_| DesktopError::Rejected("clipboard text is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::zvariant::OwnedValue;

    fn dict(k: &str, v: Value<'_>) -> Dict {
        [(k.to_string(), OwnedValue::try_from(v).expect("owned"))].into()
    }

    #[test]
    fn mime_types_as_documented_and_as_mutter_43_sends_them() {
        let plain = dict("mime-types", Value::from(vec!["image/png", "text/plain"]));
        assert_eq!(text_mime(&plain).as_deref(), Some("text/plain"));
        let wrapped = dict("mime-types", Value::from((vec!["UTF8_STRING", "text/plain;charset=utf-8"],)));
        assert_eq!(text_mime(&wrapped).as_deref(), Some("text/plain;charset=utf-8"));
        assert_eq!(text_mime(&dict("mime-types", Value::from(vec!["image/png"]))), None);
        assert_eq!(text_mime(&dict("mime-types", Value::from(7u32))), None);
        assert_eq!(text_mime(&Dict::new()), None);
    }

    #[test]
    fn session_is_owner_defaults_to_no() {
        assert!(session_is_owner(&dict("session-is-owner", Value::from(true))));
        assert!(!session_is_owner(&dict("session-is-owner", Value::from("yes"))));
        assert!(!session_is_owner(&Dict::new()));
    }
}
