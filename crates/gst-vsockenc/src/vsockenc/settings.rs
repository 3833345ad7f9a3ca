//! The element's properties as plain settings, and what they mean for the
//! connection: the host's address and the guest client's configuration.

use std::time::Duration;

use hxfr_guest::HostAddr;
use hxfr_guest::client::{self, HelloConfig};
use hxfr_proto::{defaults, features};

use super::Mode;

pub const DEFAULT_CID: u32 = defaults::HOST_CID;
pub const DEFAULT_PORT: u32 = defaults::VSOCK_PORT;
pub const DEFAULT_TCP_PORT: u32 = defaults::TCP_PORT as u32;
pub const DEFAULT_BITRATE: u32 = defaults::BITRATE;
pub const DEFAULT_KEYFRAME_INTERVAL: u32 = defaults::KEYFRAME_INTERVAL;
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 2;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u32 = 5000;
pub const DEFAULT_REPLY_TIMEOUT_MS: u32 = 5000;
pub const DEFAULT_SESSION_ID: u32 = 1;
pub const DEFAULT_MAX_ERRORS: u32 = 10;
/// How long a host that has never answered HELLO gets before it is taken for
/// one that predates it (Helix's QEMU): then only Helix's messages are sent.
const HELLO_TIMEOUT: Duration = Duration::from_millis(1000);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Settings {
    pub socket_path: Option<String>,
    pub cid: u32,
    pub port: u32,
    pub tcp_host: Option<String>,
    pub tcp_port: u32,
    pub bitrate: u32,
    pub keyframe_interval: u32,
    pub host: Option<String>,
    pub mode: Mode,
    pub shm_path: Option<String>,
    pub max_in_flight: u32,
    pub connect_timeout_ms: u32,
    pub reply_timeout_ms: u32,
    pub session_id: u32,
    pub max_errors: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            socket_path: None,
            cid: DEFAULT_CID,
            port: DEFAULT_PORT,
            tcp_host: None,
            tcp_port: DEFAULT_TCP_PORT,
            bitrate: DEFAULT_BITRATE,
            keyframe_interval: DEFAULT_KEYFRAME_INTERVAL,
            host: None,
            mode: Mode::Auto,
            shm_path: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            reply_timeout_ms: DEFAULT_REPLY_TIMEOUT_MS,
            session_id: DEFAULT_SESSION_ID,
            max_errors: DEFAULT_MAX_ERRORS,
        }
    }
}

impl Settings {
    /// `host` wins; then the C element's properties: tcp-host, socket-path,
    /// and vsock cid/port when neither is set.
    pub fn address(&self) -> Result<HostAddr, String> {
        if let Some(h) = &self.host {
            return h.parse().map_err(|e: hxfr_proto::AddrError| e.to_string());
        }
        Ok(match (&self.tcp_host, &self.socket_path) {
            (Some(h), _) => HostAddr::Tcp(h.clone(), u16::try_from(self.tcp_port).map_err(|_| "tcp-port over 65535")?),
            (None, Some(p)) => HostAddr::Unix(p.into()),
            (None, None) => HostAddr::Vsock(self.cid, self.port),
        })
    }

    pub fn reply_timeout(&self) -> Duration {
        Duration::from_millis(self.reply_timeout_ms.max(1) as u64)
    }

    pub fn client(&self, addr: HostAddr) -> client::Config {
        let connect_timeout = Duration::from_millis(self.connect_timeout_ms.max(1) as u64);
        client::Config {
            addr,
            session_id: self.session_id as u16,
            connect_timeout,
            reply_timeout: self.reply_timeout(),
            max_in_flight: self.max_in_flight.max(1) as usize,
            hello: Some(HelloConfig {
                features: features::SHM | features::RESOURCE,
                timeout: HELLO_TIMEOUT.min(connect_timeout),
            }),
            backoff_min: RECONNECT_MIN,
            backoff_max: RECONNECT_MAX,
        }
    }
}
