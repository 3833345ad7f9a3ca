//! The numbers both ends assume when nobody says otherwise. Helix's C element
//! and QEMU use the same ones; every crate takes them from here.

/// TCP port of the host (QEMU user networking turns the guest's
/// `10.0.2.2:15937` into the host's `127.0.0.1:15937`).
pub const TCP_PORT: u16 = 15937;
/// Helix's well-known vsock port.
pub const VSOCK_PORT: u32 = 5000;
/// The host's vsock context id (VMADDR_CID_HOST).
pub const HOST_CID: u32 = 2;
/// Target bitrate, bit/s.
pub const BITRATE: u32 = 4_000_000;
/// A keyframe every this many frames (the C element's default).
pub const KEYFRAME_INTERVAL: u32 = 60;
/// Frame rate assumed until a CONFIG_REQ or a frame duration says otherwise.
pub const FPS: u32 = 30;
/// The virtio-serial port name Helix's QEMU and element use.
pub const SERIAL_PORT_NAME: &str = "com.helix.frame-export";
