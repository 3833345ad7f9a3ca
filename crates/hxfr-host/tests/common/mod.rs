//! Helpers the host's integration tests share: a host on a private UNIX
//! socket (and loopback TCP), requests, and waiting for a condition.
#![allow(dead_code)] // each test binary uses its own part

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hxfr_encode::EncoderKind;
use hxfr_guest::{Connection, HostAddr};
use hxfr_host::{HostConfig, HostHandle, Limits, ListenAddr};
use hxfr_proto::{FrameRequest, Message, Packet, PixelFormat};

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct Host {
    pub handle: HostHandle,
    _dir: tempfile::TempDir,
    pub unix: PathBuf,
}

impl Host {
    /// Listens on a UNIX socket, then on loopback TCP (port 0).
    pub fn start(config: HostConfig) -> Host {
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("hxfr_host=debug").try_init();
        let dir = tempfile::tempdir().unwrap();
        let unix = dir.path().join("host.sock");
        let handle =
            hxfr_host::spawn(config, vec![ListenAddr::Unix(unix.clone()), "tcp:127.0.0.1:0".parse().unwrap()], vec![])
                .unwrap();
        Host { handle, _dir: dir, unix }
    }

    pub fn x264() -> Host {
        Host::start(HostConfig { encoder: EncoderKind::X264, ..Default::default() })
    }

    pub fn with_limits(limits: Limits) -> Host {
        Host::start(HostConfig { encoder: EncoderKind::X264, limits, ..Default::default() })
    }

    pub fn unix_addr(&self) -> HostAddr {
        HostAddr::Unix(self.unix.clone())
    }

    pub fn tcp_addr(&self) -> HostAddr {
        match &self.handle.addrs[1] {
            ListenAddr::Tcp(a) => HostAddr::Tcp(a.ip().to_string(), a.port()),
            _ => unreachable!(),
        }
    }

    /// A connection whose reads give up after [`TIMEOUT`].
    pub fn connect(&self, addr: &HostAddr) -> Connection {
        let mut c = Connection::connect(addr, TIMEOUT).unwrap();
        c.rx.set_timeout(Some(TIMEOUT)).unwrap();
        c
    }
}

/// A FRAME_REQUEST for a `w × h` picture at 30 fps: inline `pixels`, or
/// (with `None`) by resource id, which the caller sets.
pub fn frame_request(format: PixelFormat, w: u32, h: u32, stride: u32, pixels: Option<Bytes>) -> FrameRequest {
    FrameRequest {
        resource_id: 0,
        width: w,
        height: h,
        format: format.fourcc(),
        stride,
        pts: 0,
        duration: 33_333_333,
        force_keyframe: false,
        pixels,
    }
}

/// An inline BGRx frame with tight rows.
pub fn bgrx_frame(session: u16, w: u32, h: u32, pixels: Bytes) -> Packet {
    Packet::new(session, Message::FrameRequest(frame_request(PixelFormat::Bgrx, w, h, w * 4, Some(pixels))))
}

/// Polls `cond` until it holds, failing after [`TIMEOUT`].
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
