//! One Mutter remote desktop session with its monitor screencast: the D-Bus
//! dance that yields a PipeWire node, and the signals that end it.

use std::time::Duration;

use futures::StreamExt;
use zbus::proxy::CacheProperties;
use zbus::zvariant::Value;

use super::dbus::{
    self, DisplayConfigProxy, RdSessionProxy, RemoteDesktopProxy, ScSessionProxy, ScStreamProxy, ScreenCastProxy,
};
use crate::DesktopError;
use crate::keys::KEY_LEFTSHIFT;

/// How long one D-Bus call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long Mutter may take to announce the stream's PipeWire node after
/// Start (about 25 ms on these machines).
const NODE_TIMEOUT: Duration = Duration::from_secs(5);
/// Mutter drops the first key event of a new session; a harmless Shift
/// press and this long a pause absorb that.
const FIRST_KEY_SETTLE: Duration = Duration::from_millis(300);

/// A started session.
pub struct Live {
    /// Holds the bus connection, which must stay open for the session's
    /// life: Mutter ends a session whose creator leaves the bus.
    pub rd: RdSessionProxy<'static>,
    /// The screencast stream's object path (pointer positions are given
    /// in its pixels).
    pub stream: String,
    pub node: u32,
    pub size: (u32, u32),
    pub connector: String,
}

/// What tells us a session is over, and the clipboard's signals.
pub struct Signals {
    pub closed: dbus::ClosedStream,
    pub sc_closed: dbus::sc::ClosedStream,
    pub owner: zbus::fdo::NameOwnerChangedStream,
    pub selection_owner: dbus::SelectionOwnerChangedStream,
    pub transfer: dbus::SelectionTransferStream,
}

pub async fn connect(address: &str) -> Result<zbus::Connection, DesktopError> {
    let err = DesktopError::bus("connecting to the session bus");
    zbus::connection::Builder::address(address)
        .map_err(DesktopError::bus("the session bus address"))?
        .method_timeout(CALL_TIMEOUT)
        .build()
        .await
        .map_err(err)
}

/// CreateSession → SessionId → ScreenCast.CreateSession → RecordMonitor →
/// (PipeWireStreamAdded) ← Start.
pub async fn establish(address: &str) -> Result<(Live, Signals), DesktopError> {
    let conn = connect(address).await?;
    let b = DesktopError::bus;

    // Watched from before the session exists, so a restart in between is seen.
    let owner = zbus::fdo::DBusProxy::new(&conn)
        .await
        .map_err(b("the bus"))?
        .receive_name_owner_changed_with_args(&[(0, dbus::REMOTE_DESKTOP)])
        .await
        .map_err(b("watching Mutter's bus name"))?;

    let rd_path = RemoteDesktopProxy::new(&conn)
        .await
        .map_err(b("RemoteDesktop"))?
        .create_session()
        .await
        .map_err(b("RemoteDesktop.CreateSession (is Mutter running on this bus?)"))?;
    let rd = RdSessionProxy::builder(&conn)
        .path(rd_path)
        .map_err(b("RemoteDesktop session path"))?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(b("RemoteDesktop session"))?;
    let closed = rd.receive_closed().await.map_err(b("RemoteDesktop session Closed"))?;
    let selection_owner = rd.receive_selection_owner_changed().await.map_err(b("SelectionOwnerChanged"))?;
    let transfer = rd.receive_selection_transfer().await.map_err(b("SelectionTransfer"))?;
    let id = rd.session_id().await.map_err(b("RemoteDesktop session SessionId"))?;

    let sc_path = ScreenCastProxy::new(&conn)
        .await
        .map_err(b("ScreenCast"))?
        .create_session([("remote-desktop-session-id", Value::from(id.as_str()))].into())
        .await
        .map_err(b("ScreenCast.CreateSession"))?;
    let sc = ScSessionProxy::builder(&conn)
        .path(sc_path)
        .map_err(b("ScreenCast session path"))?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(b("ScreenCast session"))?;
    let sc_closed = sc.receive_closed().await.map_err(b("ScreenCast session Closed"))?;

    let (_, monitors, logical, _) = DisplayConfigProxy::new(&conn)
        .await
        .map_err(b("DisplayConfig"))?
        .get_current_state()
        .await
        .map_err(b("DisplayConfig.GetCurrentState"))?;
    let (connector, size) = dbus::pick_monitor(&monitors, &logical)
        .ok_or_else(|| DesktopError::Unavailable("Mutter reports no monitor to record".into()))?;

    // 1: the cursor drawn into the picture.
    let stream_path = sc
        .record_monitor(&connector, [("cursor-mode", Value::from(1u32))].into())
        .await
        .map_err(b("ScreenCast.RecordMonitor"))?;
    let stream = ScStreamProxy::builder(&conn)
        .path(stream_path.clone())
        .map_err(b("ScreenCast stream path"))?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(b("ScreenCast stream"))?;
    let mut added = stream.receive_pipewire_stream_added().await.map_err(b("PipeWireStreamAdded"))?;

    rd.start().await.map_err(b("RemoteDesktop session Start"))?;
    let node = match tokio::time::timeout(NODE_TIMEOUT, added.next()).await {
        Ok(Some(sig)) => sig.args().map_err(b("PipeWireStreamAdded arguments"))?.node_id,
        Ok(None) => return Err(DesktopError::Unavailable("the bus closed before Mutter announced the stream".into())),
        Err(_) => return Err(DesktopError::Timeout { what: "Mutter's PipeWireStreamAdded", after: NODE_TIMEOUT }),
    };

    rd.enable_clipboard(Default::default()).await.map_err(b("RemoteDesktop EnableClipboard"))?;
    for down in [true, false] {
        rd.notify_keyboard_keycode(KEY_LEFTSHIFT, down).await.map_err(b("the first (Shift) key event"))?;
    }
    tokio::time::sleep(FIRST_KEY_SETTLE).await;

    let live = Live { rd, stream: stream_path.to_string(), node, size, connector };
    Ok((live, Signals { closed, sc_closed, owner, selection_owner, transfer }))
}
