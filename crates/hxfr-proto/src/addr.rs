//! The one grammar for HXFR endpoints: `tcp:HOST:PORT`, `unix:PATH`,
//! `vsock:CID:PORT` (or `vsock:PORT`), `serial:PATH`. The guest's
//! `HostAddr` and the host's `ListenAddr` both parse through [`Addr`] and
//! then keep the kinds that make sense on their side.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

/// An endpoint as written on a command line or in an element property.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    /// `tcp:HOST:PORT`, `tcp:[V6]:PORT`; the host is a name or an address.
    Tcp { host: String, port: u16 },
    /// `unix:PATH`
    Unix(PathBuf),
    /// `vsock:CID:PORT`, or `vsock:PORT` with no context id.
    Vsock { cid: Option<u32>, port: u32 },
    /// `serial:PATH`, a virtio-serial port (guest) or chardev (host).
    Serial(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{input:?}: {why}")]
pub struct AddrError {
    pub input: String,
    pub why: String,
}

impl AddrError {
    pub fn new(input: &str, why: impl Into<String>) -> AddrError {
        AddrError { input: input.to_string(), why: why.into() }
    }
}

const EXPECTED: &str = "expected tcp:HOST:PORT, unix:PATH, vsock:[CID:]PORT or serial:PATH";

impl FromStr for Addr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Addr, AddrError> {
        let bad = |why: &str| AddrError::new(s, why);
        let (kind, rest) = s.split_once(':').ok_or_else(|| bad(EXPECTED))?;
        match kind {
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
                let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
                if host.is_empty() {
                    return Err(bad("expected tcp:HOST:PORT (no host)"));
                }
                let port = port.parse().map_err(|_| bad("bad TCP port"))?;
                Ok(Addr::Tcp { host: host.to_string(), port })
            }
            "unix" if !rest.is_empty() => Ok(Addr::Unix(rest.into())),
            "serial" if !rest.is_empty() => Ok(Addr::Serial(rest.into())),
            "vsock" => {
                let num = |t: &str| t.parse::<u32>().map_err(|_| bad("expected vsock:CID:PORT or vsock:PORT"));
                match rest.split_once(':') {
                    Some((cid, port)) => Ok(Addr::Vsock { cid: Some(num(cid)?), port: num(port)? }),
                    None => Ok(Addr::Vsock { cid: None, port: num(rest)? }),
                }
            }
            _ => Err(bad(EXPECTED)),
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Addr::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Vsock { cid: Some(c), port } => write!(f, "vsock:{c}:{port}"),
            Addr::Vsock { cid: None, port } => write!(f, "vsock:{port}"),
            Addr::Serial(p) => write!(f, "serial:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_kind() {
        assert_eq!("tcp:10.0.2.2:15937".parse(), Ok(Addr::Tcp { host: "10.0.2.2".into(), port: 15937 }));
        assert_eq!("tcp:[::1]:5".parse(), Ok(Addr::Tcp { host: "::1".into(), port: 5 }));
        assert_eq!("vsock:2:5000".parse(), Ok(Addr::Vsock { cid: Some(2), port: 5000 }));
        assert_eq!("vsock:5000".parse(), Ok(Addr::Vsock { cid: None, port: 5000 }));
        assert_eq!("unix:/run/h.sock".parse(), Ok(Addr::Unix("/run/h.sock".into())));
        assert_eq!("serial:/dev/vport0p1".parse(), Ok(Addr::Serial("/dev/vport0p1".into())));
        for bad in ["", "tcp:", "tcp:host", "tcp::5", "tcp:h:99999", "vsock:", "vsock:x", "unix:", "serial:", "ftp:x"] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
        for ok in ["tcp:[::1]:5", "tcp:h:1", "vsock:2:5000", "vsock:7", "unix:/x", "serial:/y"] {
            assert_eq!(ok.parse::<Addr>().unwrap().to_string(), ok);
        }
    }
}
