//! What a viewer may send to drive the desktop, and its validation.
//!
//! JSON text messages on the bridge's `/stream` WebSocket (docs/protocol.md,
//! "Input"):
//!
//! ```text
//! {"type":"key","code":"KeyA","key":"a","down":true}   physical key (KeyboardEvent.code);
//!                                                       `key` (one character) types text
//!                                                       when `code` names no key we know
//! {"type":"pointer","x":0.5,"y":0.25}                   absolute, fractions of the picture
//! {"type":"button","button":0,"down":true}              MouseEvent.button 0..4
//! {"type":"wheel","dx":0,"dy":1}                        wheel clicks (+y: down)
//! {"type":"scroll","dx":0.0,"dy":12.5}                  smooth scroll, pixels (+y: down)
//! {"type":"release"}                                    the page lost focus: let go of
//!                                                       every key and button
//! {"type":"clipboard","text":"…"}                       set the desktop's clipboard
//! ```
//!
//! Anything else (unknown types, unknown codes, out-of-range values, text
//! over [`CLIPBOARD_MAX`]) is an [`InputError`]: the bridge counts it and logs
//! it, and the viewer stays connected.

use serde::Deserialize;

use crate::keys;

/// The largest clipboard text either way, in bytes.
pub const CLIPBOARD_MAX: usize = 256 * 1024;
/// Wheel clicks or scroll pixels beyond this in one event are out of range.
pub const WHEEL_MAX: i32 = 100;
pub const SCROLL_MAX: f64 = 10_000.0;

/// One input event, in desktop-neutral terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputEvent {
    /// A physical key by Linux evdev code (KEY_A = 30).
    Key { code: u32, down: bool },
    /// Text no physical key maps to, by X keysym.
    Keysym { sym: u32, down: bool },
    /// Absolute pointer position as a fraction of the picture, each in 0..=1.
    Pointer { x: f64, y: f64 },
    /// A pointer button by evdev code (BTN_LEFT = 0x110).
    Button { code: u32, down: bool },
    /// Wheel clicks (positive: down, right).
    Wheel { dx: i32, dy: i32 },
    /// Smooth scrolling in pixels (positive: down, right).
    Scroll { dx: f64, dy: f64 },
}

/// A validated message from a viewer.
#[derive(Debug, Clone, PartialEq)]
pub enum ViewerMessage {
    Input(InputEvent),
    /// Release every key and button this viewer holds down.
    Release,
    Clipboard(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InputError {
    #[error("not an input message: {0}")]
    Malformed(String),
    #[error("unknown key code {code:?} and no text to type")]
    UnknownKey { code: String },
    #[error("unknown pointer button {0}")]
    UnknownButton(u64),
    #[error("{what} out of range")]
    OutOfRange { what: &'static str },
    #[error("clipboard text of {0} bytes is over the {CLIPBOARD_MAX}-byte limit")]
    ClipboardTooLarge(usize),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum Raw {
    Key {
        #[serde(default)]
        code: String,
        #[serde(default)]
        key: Option<String>,
        down: bool,
    },
    Pointer {
        x: f64,
        y: f64,
    },
    Button {
        button: u64,
        down: bool,
    },
    Wheel {
        #[serde(default)]
        dx: i64,
        #[serde(default)]
        dy: i64,
    },
    Scroll {
        #[serde(default)]
        dx: f64,
        #[serde(default)]
        dy: f64,
    },
    Release {},
    Clipboard {
        text: String,
    },
}

/// The message types this module handles (the bridge routes the rest, such
/// as `ping` and `keyframe`, itself).
pub const TYPES: &[&str] = &["key", "pointer", "button", "wheel", "scroll", "release", "clipboard"];

impl ViewerMessage {
    /// Parses and validates one JSON text message.
    pub fn parse(text: &str) -> Result<ViewerMessage, InputError> {
        // The bridge bounds the message size before it gets here.
        let raw: Raw = serde_json::from_str(text).map_err(|e| InputError::Malformed(e.to_string()))?;
        Ok(match raw {
            Raw::Key { code, key, down } => match keys::evdev_code(&code) {
                Some(code) => ViewerMessage::Input(InputEvent::Key { code, down }),
                None => match key.as_deref().and_then(keys::keysym_for_text) {
                    Some(sym) => ViewerMessage::Input(InputEvent::Keysym { sym, down }),
                    None => return Err(InputError::UnknownKey { code: code.chars().take(32).collect() }),
                },
            },
            Raw::Pointer { x, y } => {
                let ok = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
                if !ok(x) || !ok(y) {
                    return Err(InputError::OutOfRange { what: "pointer position" });
                }
                ViewerMessage::Input(InputEvent::Pointer { x, y })
            }
            Raw::Button { button, down } => {
                let code =
                    u8::try_from(button).ok().and_then(keys::button_code).ok_or(InputError::UnknownButton(button))?;
                ViewerMessage::Input(InputEvent::Button { code, down })
            }
            Raw::Wheel { dx, dy } => {
                let ok = |v: i64| v.unsigned_abs() <= WHEEL_MAX as u64;
                if !ok(dx) || !ok(dy) || (dx == 0 && dy == 0) {
                    return Err(InputError::OutOfRange { what: "wheel clicks" });
                }
                ViewerMessage::Input(InputEvent::Wheel { dx: dx as i32, dy: dy as i32 })
            }
            Raw::Scroll { dx, dy } => {
                let ok = |v: f64| v.is_finite() && v.abs() <= SCROLL_MAX;
                if !ok(dx) || !ok(dy) {
                    return Err(InputError::OutOfRange { what: "scroll distance" });
                }
                ViewerMessage::Input(InputEvent::Scroll { dx, dy })
            }
            Raw::Release {} => ViewerMessage::Release,
            Raw::Clipboard { text } => {
                if text.len() > CLIPBOARD_MAX {
                    return Err(InputError::ClipboardTooLarge(text.len()));
                }
                ViewerMessage::Clipboard(text)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ViewerMessage, InputError> {
        ViewerMessage::parse(s)
    }

    #[test]
    fn valid_messages() {
        assert_eq!(
            p(r#"{"type":"key","code":"KeyA","key":"a","down":true}"#),
            Ok(ViewerMessage::Input(InputEvent::Key { code: 30, down: true }))
        );
        assert_eq!(
            p(r#"{"type":"key","code":"","key":"é","down":false}"#),
            Ok(ViewerMessage::Input(InputEvent::Keysym { sym: 0xe9, down: false }))
        );
        assert_eq!(
            p(r#"{"type":"pointer","x":1,"y":0.25}"#),
            Ok(ViewerMessage::Input(InputEvent::Pointer { x: 1.0, y: 0.25 }))
        );
        assert_eq!(
            p(r#"{"type":"button","button":2,"down":true}"#),
            Ok(ViewerMessage::Input(InputEvent::Button { code: keys::BTN_RIGHT, down: true }))
        );
        assert_eq!(p(r#"{"type":"wheel","dy":-3}"#), Ok(ViewerMessage::Input(InputEvent::Wheel { dx: 0, dy: -3 })));
        assert_eq!(
            p(r#"{"type":"scroll","dx":1.5,"dy":-12}"#),
            Ok(ViewerMessage::Input(InputEvent::Scroll { dx: 1.5, dy: -12.0 }))
        );
        assert_eq!(p(r#"{"type":"release"}"#), Ok(ViewerMessage::Release));
        assert_eq!(p(r#"{"type":"clipboard","text":"hi"}"#), Ok(ViewerMessage::Clipboard("hi".into())));
    }

    #[test]
    fn invalid_messages_are_errors_not_panics() {
        for bad in [
            "",
            "null",
            "[]",
            r#"{"type":"key","code":"Fn","down":true}"#,
            r#"{"type":"key","code":"KeyA"}"#,
            r#"{"type":"key","code":"","key":"ab","down":true}"#,
            r#"{"type":"pointer","x":1.01,"y":0}"#,
            r#"{"type":"pointer","x":-0.1,"y":0}"#,
            r#"{"type":"pointer","x":"0","y":0}"#,
            r#"{"type":"pointer","x":1e400,"y":0}"#,
            r#"{"type":"button","button":5,"down":true}"#,
            r#"{"type":"button","button":-1,"down":true}"#,
            r#"{"type":"button","button":18446744073709551615,"down":true}"#,
            r#"{"type":"wheel","dx":0,"dy":0}"#,
            r#"{"type":"wheel","dy":101}"#,
            r#"{"type":"wheel","dy":-9223372036854775808}"#,
            r#"{"type":"scroll","dy":1e9}"#,
            r#"{"type":"pointer","x":0,"y":0,"extra":1}"#,
            r#"{"type":"teleport"}"#,
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        let big = format!(r#"{{"type":"clipboard","text":"{}"}}"#, "x".repeat(CLIPBOARD_MAX + 1));
        assert_eq!(p(&big), Err(InputError::ClipboardTooLarge(CLIPBOARD_MAX + 1)));
    }
}
