//! Mutter's private D-Bus APIs, as much of them as the bridge uses
//! (mutter's data/dbus-interfaces/org.gnome.Mutter.{RemoteDesktop,ScreenCast,
//! DisplayConfig}.xml; the same since mutter 43).

use std::collections::HashMap;

use zbus::proxy;
use zbus::zvariant::{OwnedFd, OwnedObjectPath, OwnedValue, Value};

pub const REMOTE_DESKTOP: &str = "org.gnome.Mutter.RemoteDesktop";

pub type Options<'a> = HashMap<&'a str, Value<'a>>;
pub type Dict = HashMap<String, OwnedValue>;

#[proxy(
    interface = "org.gnome.Mutter.RemoteDesktop",
    default_service = "org.gnome.Mutter.RemoteDesktop",
    default_path = "/org/gnome/Mutter/RemoteDesktop"
)]
pub trait RemoteDesktop {
    fn create_session(&self) -> zbus::Result<OwnedObjectPath>;
}

#[proxy(interface = "org.gnome.Mutter.RemoteDesktop.Session", default_service = "org.gnome.Mutter.RemoteDesktop")]
pub trait RdSession {
    #[zbus(property)]
    fn session_id(&self) -> zbus::Result<String>;
    fn start(&self) -> zbus::Result<()>;
    fn stop(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn closed(&self) -> zbus::Result<()>;

    fn notify_keyboard_keycode(&self, keycode: u32, state: bool) -> zbus::Result<()>;
    fn notify_keyboard_keysym(&self, keysym: u32, state: bool) -> zbus::Result<()>;
    fn notify_pointer_button(&self, button: i32, state: bool) -> zbus::Result<()>;
    fn notify_pointer_axis(&self, dx: f64, dy: f64, flags: u32) -> zbus::Result<()>;
    fn notify_pointer_axis_discrete(&self, axis: u32, steps: i32) -> zbus::Result<()>;
    fn notify_pointer_motion_absolute(&self, stream: &str, x: f64, y: f64) -> zbus::Result<()>;

    fn enable_clipboard(&self, options: Options<'_>) -> zbus::Result<()>;
    fn set_selection(&self, options: Options<'_>) -> zbus::Result<()>;
    fn selection_write(&self, serial: u32) -> zbus::Result<OwnedFd>;
    fn selection_write_done(&self, serial: u32, success: bool) -> zbus::Result<()>;
    fn selection_read(&self, mime_type: &str) -> zbus::Result<OwnedFd>;
    #[zbus(signal)]
    fn selection_owner_changed(&self, options: Dict) -> zbus::Result<()>;
    #[zbus(signal)]
    fn selection_transfer(&self, mime_type: String, serial: u32) -> zbus::Result<()>;
}

#[proxy(
    interface = "org.gnome.Mutter.ScreenCast",
    default_service = "org.gnome.Mutter.ScreenCast",
    default_path = "/org/gnome/Mutter/ScreenCast"
)]
pub trait ScreenCast {
    fn create_session(&self, properties: Options<'_>) -> zbus::Result<OwnedObjectPath>;
}

// In a module of its own: its Closed signal's generated types would clash
// with the RemoteDesktop session's.
pub mod sc {
    use super::*;

    #[proxy(interface = "org.gnome.Mutter.ScreenCast.Session", default_service = "org.gnome.Mutter.ScreenCast")]
    pub trait ScSession {
        fn record_monitor(&self, connector: &str, properties: Options<'_>) -> zbus::Result<OwnedObjectPath>;
        #[zbus(signal)]
        fn closed(&self) -> zbus::Result<()>;
    }
}
pub use sc::ScSessionProxy;

#[proxy(interface = "org.gnome.Mutter.ScreenCast.Stream", default_service = "org.gnome.Mutter.ScreenCast")]
pub trait ScStream {
    #[zbus(signal, name = "PipeWireStreamAdded")]
    fn pipewire_stream_added(&self, node_id: u32) -> zbus::Result<()>;
}

/// (connector, vendor, product, serial)
pub type MonitorSpec = (String, String, String, String);
/// (id, width, height, refresh, preferred scale, supported scales, properties)
pub type Mode = (String, i32, i32, f64, f64, Vec<f64>, Dict);
pub type Monitor = (MonitorSpec, Vec<Mode>, Dict);
/// (x, y, scale, transform, primary, monitors, properties)
pub type LogicalMonitor = (i32, i32, f64, u32, bool, Vec<MonitorSpec>, Dict);

#[proxy(
    interface = "org.gnome.Mutter.DisplayConfig",
    default_service = "org.gnome.Mutter.DisplayConfig",
    default_path = "/org/gnome/Mutter/DisplayConfig"
)]
pub trait DisplayConfig {
    #[allow(clippy::type_complexity)]
    fn get_current_state(&self) -> zbus::Result<(u32, Vec<Monitor>, Vec<LogicalMonitor>, Dict)>;
}

/// The monitor to record: the primary one (else the first), and its current
/// mode's size in pixels.
pub fn pick_monitor(monitors: &[Monitor], logical: &[LogicalMonitor]) -> Option<(String, (u32, u32))> {
    let primary = logical.iter().find(|l| l.4).and_then(|l| l.5.first()).map(|s| s.0.as_str());
    let m = monitors.iter().find(|m| Some(m.0.0.as_str()) == primary).or_else(|| monitors.first())?;
    let flag = |mode: &Mode, key: &str| mode.6.get(key).and_then(|v| bool::try_from(v).ok()).unwrap_or(false);
    let mode =
        m.1.iter()
            .find(|mode| flag(mode, "is-current"))
            .or_else(|| m.1.iter().find(|mode| flag(mode, "is-preferred")))
            .or_else(|| m.1.first())?;
    let w = u32::try_from(mode.1).ok().filter(|w| *w > 0)?;
    let h = u32::try_from(mode.2).ok().filter(|h| *h > 0)?;
    Some((m.0.0.clone(), (w, h)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(w: i32, h: i32, current: bool) -> Mode {
        let props: Dict = [("is-current".to_string(), OwnedValue::from(current))].into();
        (format!("{w}x{h}"), w, h, 60.0, 1.0, vec![1.0], props)
    }

    fn spec(c: &str) -> MonitorSpec {
        (c.into(), "v".into(), "p".into(), "s".into())
    }

    #[test]
    fn the_primary_monitor_at_its_current_mode() {
        let monitors = vec![
            (spec("Meta-0"), vec![mode(800, 600, true)], Dict::new()),
            (spec("Meta-1"), vec![mode(1920, 1080, false), mode(1280, 720, true)], Dict::new()),
        ];
        let logical = vec![
            (0, 0, 1.0, 0, false, vec![spec("Meta-0")], Dict::new()),
            (800, 0, 1.0, 0, true, vec![spec("Meta-1")], Dict::new()),
        ];
        assert_eq!(pick_monitor(&monitors, &logical), Some(("Meta-1".into(), (1280, 720))));
        // No primary: the first monitor.
        assert_eq!(pick_monitor(&monitors, &[]), Some(("Meta-0".into(), (800, 600))));
        // Nothing usable: none, not a panic.
        assert_eq!(pick_monitor(&[], &logical), None);
        assert_eq!(pick_monitor(&[(spec("X"), vec![mode(-1, 600, true)], Dict::new())], &[]), None);
        assert_eq!(pick_monitor(&[(spec("X"), vec![], Dict::new())], &[]), None);
    }
}
