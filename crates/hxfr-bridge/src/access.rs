//! Who may talk to the bridge, and how much of it a client may hold.
//!
//! No web page in: every request's `Host` must name the bridge as the user
//! reaches it (a loopback name or address, the listen address, or a name
//! given with `--allow-host`), which defeats DNS rebinding; every request
//! that carries an `Origin` (every WebSocket upgrade a browser makes does)
//! must come from the bridge's own page (same scheme-less host and port as
//! its `Host`) or from an origin given with `--allow-origin`, which defeats
//! cross-site WebSocket hijacking. Clients that are not browsers (`hxfr
//! stream`, Helix's CLI) send no `Origin` and are let through. Refusals are
//! 403s with a reason and a log line.
//!
//! Bounded clients: [`serve`] accepts at most `max_connections` connections
//! at a time (WebSocket viewers included, for as long as they stay), answers
//! the next with a 503 and a log line, closes a connection whose request head
//! has not arrived within `header_timeout`, and refuses heads larger than
//! `max_header_bytes`. The viewers close a socket that has not taken a
//! message within `write_timeout` (`server.rs`, `helix_ws.rs`).

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

/// The `Host` and `Origin` rules.
#[derive(Debug)]
pub struct Access {
    /// Exact origins (`scheme://host[:port]`, lower case, no trailing slash).
    origins: Vec<String>,
    /// Extra host names (lower case, no port).
    hosts: Vec<String>,
    listen: IpAddr,
    /// Requests refused for their `Host` or `Origin`.
    pub refused: AtomicU64,
    /// Connections refused at `max_connections`.
    pub busy: AtomicU64,
}

impl Access {
    pub fn new(listen: IpAddr, allow_origins: &[String], allow_hosts: &[String]) -> Access {
        Access {
            origins: allow_origins.iter().map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase()).collect(),
            hosts: allow_hosts.iter().map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase()).collect(),
            listen,
            refused: AtomicU64::new(0),
            busy: AtomicU64::new(0),
        }
    }

    /// Whether a `Host` header value (`name[:port]`, `[v6][:port]`) names this bridge.
    pub fn host_allowed(&self, host: &str) -> bool {
        let Some(name) = host_name(host) else { return false };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name == "localhost" || name.ends_with(".localhost") || self.hosts.contains(&name) {
            return true;
        }
        match name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            // An address cannot be rebound: a page reaching the bridge by address is
            // the bridge's own page, but only addresses the bridge listens on count.
            Ok(ip) => ip.is_loopback() || ip == self.listen || self.listen.is_unspecified(),
            Err(_) => false,
        }
    }

    /// Whether an `Origin` header value may open a stream of a bridge reached as `host`.
    pub fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        if self.origins.contains(&origin) {
            return true;
        }
        let same = |scheme: &str| origin.strip_prefix(scheme).is_some_and(|rest| rest == host.to_ascii_lowercase());
        same("http://") || same("https://")
    }

    /// Checks one request's head; the error is the reason given with the 403.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), String> {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if !self.host_allowed(host) {
            return Err(format!(
                "Host {host:?} is not this bridge's (loopback, its listen address, or --allow-host NAME)"
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("?");
            if !self.origin_allowed(origin, host) {
                return Err(format!(
                    "pages from {origin} may not open this bridge's stream (start it with --allow-origin {origin} to allow them)"
                ));
            }
        }
        Ok(())
    }
}

/// The name (or bracketed address) part of a `Host` value; `None` if it is malformed.
fn host_name(host: &str) -> Option<&str> {
    let (name, port) = if host.starts_with('[') {
        let end = host.find(']')?;
        (&host[..=end], &host[end + 1..])
    } else {
        match host.rsplit_once(':') {
            Some((n, _)) => (n, &host[n.len()..]),
            None => (host, ""),
        }
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (!name.is_empty() && port_ok).then_some(name)
}

/// Middleware over every route: refuses what [`Access::check`] refuses.
pub async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    match access.check(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            access.refused.fetch_add(1, Ordering::Relaxed);
            warn!(path = %req.uri().path(), "refused a request: {why}");
            (StatusCode::FORBIDDEN, format!("{why}\n")).into_response()
        }
    }
}

/// How much a client may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections at a time, WebSocket viewers included.
    pub max_connections: usize,
    /// From a connection's first byte (or the end of its last response) to the end of a request head.
    pub header_timeout: Duration,
    /// The largest request head (at least 8 KiB).
    pub max_header_bytes: usize,
    /// How long a viewer may leave one message untaken before it is closed.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 32,
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// What a client over the connection limit reads before the bridge closes it.
const BUSY: &str = "the bridge has as many connections as it takes (--max-connections); try again later\n";

/// Serves `app` on `listener` within `limits`.
pub async fn serve(listener: TcpListener, app: axum::Router, limits: Limits, access: Arc<Access>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            access.busy.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, max = limits.max_connections, "refused a connection: the bridge is at --max-connections");
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let io = TokioIo::new(Counted { stream, _slot: permit });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_header_size(limits.max_header_bytes)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .serve_connection(io, service)
                .with_upgrades();
            if let Err(e) = conn.await {
                debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

/// Answers 503 and closes, reading what the client sent meanwhile (for at most
/// a second) so that the close is not a reset that could eat the answer.
async fn refuse_busy(mut stream: TcpStream) {
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BUSY}",
        BUSY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        io::Result::Ok(())
    })
    .await;
}

/// A connection that holds its slot until it is dropped, which for a
/// WebSocket is when the upgraded socket goes, not when its HTTP part ends.
struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let a = Access::new("127.0.0.1".parse().unwrap(), &[], &["bridge.lan".into()]);
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.:1",
            "a.localhost:9",
            "127.0.0.1:8080",
            "127.9.9.9",
            "[::1]:8080",
            "bridge.lan:80",
        ] {
            assert!(a.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "",
            "10.0.0.5:8080",
            "localhost:x",
            "127.0.0.1:",
            "[::1",
            "localhost.evil.example",
        ] {
            assert!(!a.host_allowed(bad), "{bad}");
        }
        let lan = Access::new("192.168.1.7".parse().unwrap(), &[], &[]);
        assert!(lan.host_allowed("192.168.1.7:8080"));
        assert!(!lan.host_allowed("192.168.1.8:8080"));
        let any = Access::new("0.0.0.0".parse().unwrap(), &[], &[]);
        assert!(any.host_allowed("10.0.0.5:8080") && !any.host_allowed("evil.example"));
    }

    #[test]
    fn origins() {
        let a = Access::new("127.0.0.1".parse().unwrap(), &["http://127.0.0.1:3000/".into()], &[]);
        assert!(a.origin_allowed("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(a.origin_allowed("https://LOCALHOST:8080", "localhost:8080"));
        assert!(a.origin_allowed("http://127.0.0.1:3000", "127.0.0.1:8080"));
        for bad in ["http://127.0.0.3:18090", "http://127.0.0.1:8081", "null", "file://", "ftp://127.0.0.1:8080"] {
            assert!(!a.origin_allowed(bad, "127.0.0.1:8080"), "{bad}");
        }
    }
}
