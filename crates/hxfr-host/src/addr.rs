//! Where the host listens or connects: `tcp:HOST:PORT`, `unix:PATH`,
//! `vsock:PORT`, in the grammar every hxfr address uses ([`hxfr_proto::addr`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use hxfr_proto::{Addr, defaults};

/// The C element's default port, also ours.
pub const DEFAULT_TCP_PORT: u16 = defaults::TCP_PORT;
/// Helix's well-known vsock port.
pub const DEFAULT_VSOCK_PORT: u32 = defaults::VSOCK_PORT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// AF_VSOCK on any CID at this port.
    Vsock(u32),
}

impl ListenAddr {
    /// A TCP address other guests or machines could reach.
    pub fn is_remote(&self) -> bool {
        matches!(self, ListenAddr::Tcp(a) if !a.ip().is_loopback())
    }
}

impl Default for ListenAddr {
    fn default() -> Self {
        ListenAddr::Tcp(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_TCP_PORT))
    }
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<Addr>().map_err(|e| e.to_string())? {
            Addr::Tcp { host, port } => tcp_addr(&host, port).map(ListenAddr::Tcp).map_err(|e| format!("{s:?}: {e}")),
            Addr::Unix(p) => Ok(ListenAddr::Unix(p)),
            Addr::Vsock { cid: None, port } => Ok(ListenAddr::Vsock(port)),
            Addr::Vsock { cid: Some(_), .. } => Err(format!("{s:?}: a host listens on vsock:PORT (any CID)")),
            Addr::Serial(_) => Err(format!("{s:?}: serial ports are reached with --connect, not --listen")),
        }
    }
}

/// `HOST:PORT`, `[V6]:PORT`, `localhost:PORT`.
pub fn parse_tcp(s: &str) -> Result<SocketAddr, String> {
    match format!("tcp:{s}").parse::<Addr>().map_err(|e| e.why)? {
        Addr::Tcp { host, port } => tcp_addr(&host, port),
        _ => Err(format!("{s:?}: expected IP:PORT")),
    }
}

/// An IP address (or `localhost`) and a port; listeners take no other names.
fn tcp_addr(host: &str, port: u16) -> Result<SocketAddr, String> {
    let ip = match host {
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        h => h.parse().map_err(|_| format!("{h:?} is not an IP address (or localhost)"))?,
    };
    Ok(SocketAddr::new(ip, port))
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Vsock(p) => write!(f, "vsock:{p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        assert_eq!("tcp:127.0.0.1:15937".parse::<ListenAddr>().unwrap(), ListenAddr::default());
        assert_eq!("tcp:localhost:15937".parse::<ListenAddr>().unwrap(), ListenAddr::default());
        assert!("tcp:[::1]:1".parse::<ListenAddr>().is_ok());
        assert_eq!("unix:/tmp/x".parse::<ListenAddr>().unwrap(), ListenAddr::Unix("/tmp/x".into()));
        assert_eq!("vsock:5000".parse::<ListenAddr>().unwrap(), ListenAddr::Vsock(5000));
        for bad in ["", "tcp:", "tcp:nohost", "unix:", "vsock:x", "udp:1.2.3.4:5"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
        assert!("tcp:0.0.0.0:1".parse::<ListenAddr>().unwrap().is_remote());
        assert!(!ListenAddr::default().is_remote());
    }
}
