//! Hot-plugging a scanout through QEMU's D-Bus display (`-display dbus`).
//!
//! With unpatched QEMU a vhost-user-gpu backend cannot raise the guest's
//! display-changed event itself (QEMU owns the device config and rejects a
//! backend config change). QEMU's D-Bus display can: `SetUIInfo` on the
//! console of a GPU head makes QEMU report that head enabled at the given
//! size, and the guest's driver sees a new connector (within a second).
//! The bus is the one `DBUS_SESSION_BUS_ADDRESS` names, unless one is given.

use std::time::Duration;

use thiserror::Error;
use zbus::Connection;

/// How long one D-Bus exchange may take.
const TIMEOUT: Duration = Duration::from_secs(3);
/// Consoles looked at for the head (QEMU numbers them from 0).
const MAX_CONSOLES: u32 = 64;

#[derive(Debug, Error)]
pub enum DisplayError {
    #[error(
        "no D-Bus session bus to reach QEMU's display on (start QEMU with -display dbus,gl=off on a bus DBUS_SESSION_BUS_ADDRESS names)"
    )]
    NoBus,
    #[error("QEMU's D-Bus display: {0}")]
    Bus(String),
    #[error("QEMU's D-Bus display has no console for GPU head {0} (give the device max_outputs > {0})")]
    NoHead(u32),
    #[error("QEMU's D-Bus display did not answer within {0:?}")]
    Timeout(Duration),
}

/// QEMU's D-Bus display, reached on a bus.
#[derive(Debug, Clone, Default)]
pub struct QemuDisplay {
    /// A D-Bus address; `None`: the session bus from the environment.
    pub bus: Option<String>,
}

impl QemuDisplay {
    /// Makes GPU head `head` an enabled output of `width`x`height` (0x0
    /// disables it).
    pub async fn set_output(&self, head: u32, width: u32, height: u32) -> Result<(), DisplayError> {
        tokio::time::timeout(TIMEOUT, self.set_output_now(head, width, height))
            .await
            .map_err(|_| DisplayError::Timeout(TIMEOUT))?
    }

    async fn set_output_now(&self, head: u32, width: u32, height: u32) -> Result<(), DisplayError> {
        let bus = |e: zbus::Error| DisplayError::Bus(e.to_string());
        let conn = match &self.bus {
            Some(a) => zbus::connection::Builder::address(a.as_str()).map_err(bus)?.build().await.map_err(bus)?,
            None if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none() => return Err(DisplayError::NoBus),
            None => Connection::session().await.map_err(bus)?,
        };
        for n in 0..MAX_CONSOLES {
            let path = format!("/org/qemu/Display1/Console_{n}");
            let proxy =
                zbus::Proxy::new(&conn, "org.qemu", path.as_str(), "org.qemu.Display1.Console").await.map_err(bus)?;
            // The consoles are numbered without gaps: the first missing one ends the search.
            let Ok(h) = proxy.get_property::<u32>("Head").await else { break };
            let kind: String = proxy.get_property("Type").await.unwrap_or_default();
            if h == head && kind == "Graphic" {
                let args = (0u16, 0u16, 0i32, 0i32, width, height);
                proxy.call_method("SetUIInfo", &args).await.map_err(bus)?;
                return Ok(());
            }
        }
        Err(DisplayError::NoHead(head))
    }
}
