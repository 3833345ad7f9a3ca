//! Physical keys: the page sends `KeyboardEvent.code` (the key's position,
//! whatever the layout), the desktops take Linux evdev codes (X11 keycodes are
//! evdev + 8). Text that no physical key produces falls back to a keysym.

/// The evdev code (linux/input-event-codes.h) of a `KeyboardEvent.code`.
pub fn evdev_code(code: &str) -> Option<u32> {
    let c = match code {
        "Escape" => 1,
        "Digit1" => 2,
        "Digit2" => 3,
        "Digit3" => 4,
        "Digit4" => 5,
        "Digit5" => 6,
        "Digit6" => 7,
        "Digit7" => 8,
        "Digit8" => 9,
        "Digit9" => 10,
        "Digit0" => 11,
        "Minus" => 12,
        "Equal" => 13,
        "Backspace" => 14,
        "Tab" => 15,
        "KeyQ" => 16,
        "KeyW" => 17,
        "KeyE" => 18,
        "KeyR" => 19,
        "KeyT" => 20,
        "KeyY" => 21,
        "KeyU" => 22,
        "KeyI" => 23,
        "KeyO" => 24,
        "KeyP" => 25,
        "BracketLeft" => 26,
        "BracketRight" => 27,
        "Enter" => 28,
        "ControlLeft" => 29,
        "KeyA" => 30,
        "KeyS" => 31,
        "KeyD" => 32,
        "KeyF" => 33,
        "KeyG" => 34,
        "KeyH" => 35,
        "KeyJ" => 36,
        "KeyK" => 37,
        "KeyL" => 38,
        "Semicolon" => 39,
        "Quote" => 40,
        "Backquote" => 41,
        "ShiftLeft" => 42,
        "Backslash" => 43,
        "KeyZ" => 44,
        "KeyX" => 45,
        "KeyC" => 46,
        "KeyV" => 47,
        "KeyB" => 48,
        "KeyN" => 49,
        "KeyM" => 50,
        "Comma" => 51,
        "Period" => 52,
        "Slash" => 53,
        "ShiftRight" => 54,
        "NumpadMultiply" => 55,
        "AltLeft" => 56,
        "Space" => 57,
        "CapsLock" => 58,
        "F1" => 59,
        "F2" => 60,
        "F3" => 61,
        "F4" => 62,
        "F5" => 63,
        "F6" => 64,
        "F7" => 65,
        "F8" => 66,
        "F9" => 67,
        "F10" => 68,
        "NumLock" => 69,
        "ScrollLock" => 70,
        "Numpad7" => 71,
        "Numpad8" => 72,
        "Numpad9" => 73,
        "NumpadSubtract" => 74,
        "Numpad4" => 75,
        "Numpad5" => 76,
        "Numpad6" => 77,
        "NumpadAdd" => 78,
        "Numpad1" => 79,
        "Numpad2" => 80,
        "Numpad3" => 81,
        "Numpad0" => 82,
        "NumpadDecimal" => 83,
        "IntlBackslash" => 86,
        "F11" => 87,
        "F12" => 88,
        "IntlRo" => 89,
        "Convert" => 92,
        "KanaMode" => 93,
        "NonConvert" => 94,
        "NumpadEnter" => 96,
        "ControlRight" => 97,
        "NumpadDivide" => 98,
        "PrintScreen" => 99,
        "AltRight" => 100,
        "Home" => 102,
        "ArrowUp" => 103,
        "PageUp" => 104,
        "ArrowLeft" => 105,
        "ArrowRight" => 106,
        "End" => 107,
        "ArrowDown" => 108,
        "PageDown" => 109,
        "Insert" => 110,
        "Delete" => 111,
        "AudioVolumeMute" => 113,
        "AudioVolumeDown" => 114,
        "AudioVolumeUp" => 115,
        "NumpadEqual" => 117,
        "Pause" => 119,
        "NumpadComma" => 121,
        "Lang1" => 122,
        "Lang2" => 123,
        "IntlYen" => 124,
        "MetaLeft" => 125,
        "MetaRight" => 126,
        "ContextMenu" => 127,
        "F13" => 183,
        "F14" => 184,
        "F15" => 185,
        "F16" => 186,
        "F17" => 187,
        "F18" => 188,
        "F19" => 189,
        "F20" => 190,
        "F21" => 191,
        "F22" => 192,
        "F23" => 193,
        "F24" => 194,
        _ => return None,
    };
    Some(c)
}

/// The X keysym that types `key` (a `KeyboardEvent.key` of one character):
/// Latin-1 keysyms are the code point, everything else is 0x0100_0000 + it.
pub fn keysym_for_text(key: &str) -> Option<u32> {
    let mut chars = key.chars();
    let c = chars.next()?;
    if chars.next().is_some() || c.is_control() {
        return None;
    }
    let cp = c as u32;
    Some(if (0x20..=0x7e).contains(&cp) || (0xa0..=0xff).contains(&cp) { cp } else { 0x0100_0000 + cp })
}

/// Evdev codes of the pointer buttons, by `MouseEvent.button` (0 main, 1
/// middle, 2 secondary, 3 back, 4 forward).
pub fn button_code(dom_button: u8) -> Option<u32> {
    match dom_button {
        0 => Some(BTN_LEFT),
        1 => Some(BTN_MIDDLE),
        2 => Some(BTN_RIGHT),
        3 => Some(BTN_SIDE),
        4 => Some(BTN_EXTRA),
        _ => None,
    }
}

pub const BTN_LEFT: u32 = 0x110;
pub const BTN_RIGHT: u32 = 0x111;
pub const BTN_MIDDLE: u32 = 0x112;
pub const BTN_SIDE: u32 = 0x113;
pub const BTN_EXTRA: u32 = 0x114;
pub const KEY_LEFTSHIFT: u32 = 42;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_linux_input_event_codes() {
        assert_eq!(evdev_code("KeyA"), Some(30));
        assert_eq!(evdev_code("Enter"), Some(28));
        assert_eq!(evdev_code("ControlLeft"), Some(29));
        assert_eq!(evdev_code("KeyL"), Some(38));
        assert_eq!(evdev_code("F24"), Some(194));
        assert_eq!(evdev_code("Fn"), None);
        assert_eq!(evdev_code(""), None);
    }

    #[test]
    fn text_keysyms() {
        assert_eq!(keysym_for_text("a"), Some(0x61));
        assert_eq!(keysym_for_text("é"), Some(0xe9));
        assert_eq!(keysym_for_text("€"), Some(0x0100_20ac));
        assert_eq!(keysym_for_text("ab"), None);
        assert_eq!(keysym_for_text("\n"), None);
        assert_eq!(keysym_for_text(""), None);
    }

    #[test]
    fn buttons() {
        assert_eq!(button_code(0), Some(BTN_LEFT));
        assert_eq!(button_code(2), Some(BTN_RIGHT));
        assert_eq!(button_code(5), None);
    }
}
