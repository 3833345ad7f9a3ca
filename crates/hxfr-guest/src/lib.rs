//! The guest's end of HXFR: where the host is ([`HostAddr`]), a blocking
//! [`Connection`] to it, the guest's view of a shared-memory region
//! ([`shm`]) and of virtio-gpu resources ([`drm`]). The GStreamer element
//! and the static guest program that the VM tests boot (`hxfr-vmguest`)
//! both build on this.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

pub mod client;
pub mod drm;
pub mod shm;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hxfr_proto::{
    Addr, AddrError, DecodeError, FrameDecoder, Hello, HelloResp, Message, PROTOCOL_VERSION, Packet, defaults,
};
use thiserror::Error;

/// Where the host is, as the element's `host` property spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAddr {
    /// `tcp:HOST:PORT` (QEMU user networking: `tcp:10.0.2.2:15937`)
    Tcp(String, u16),
    /// `unix:PATH`
    Unix(PathBuf),
    /// `vsock:CID:PORT` (the host is CID 2)
    Vsock(u32, u32),
    /// `serial:PATH`, a virtio-serial port such as /dev/virtio-ports/com.helix.frame-export
    Serial(PathBuf),
}

impl FromStr for HostAddr {
    type Err = AddrError;
    /// The shared grammar ([`hxfr_proto::addr`]); `vsock:PORT` means the host (CID 2).
    fn from_str(s: &str) -> Result<Self, AddrError> {
        Ok(match s.parse::<Addr>()? {
            Addr::Tcp { host, port } => HostAddr::Tcp(host, port),
            Addr::Unix(p) => HostAddr::Unix(p),
            Addr::Vsock { cid, port } => HostAddr::Vsock(cid.unwrap_or(defaults::HOST_CID), port),
            Addr::Serial(p) => HostAddr::Serial(p),
        })
    }
}

impl From<&HostAddr> for Addr {
    fn from(a: &HostAddr) -> Addr {
        match a.clone() {
            HostAddr::Tcp(host, port) => Addr::Tcp { host, port },
            HostAddr::Unix(p) => Addr::Unix(p),
            HostAddr::Vsock(cid, port) => Addr::Vsock { cid: Some(cid), port },
            HostAddr::Serial(p) => Addr::Serial(p),
        }
    }
}

impl std::fmt::Display for HostAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Addr::from(self).fmt(f)
    }
}

#[derive(Debug, Error)]
pub enum GuestError {
    #[error("cannot reach the host at {addr}: {source}")]
    Connect { addr: HostAddr, source: io::Error },
    #[error("host connection: {0}")]
    Io(#[from] io::Error),
    #[error("host sent something unreadable: {0}")]
    Decode(#[from] DecodeError),
    #[error("no HELLO_RESP from the host within {0:?}")]
    HelloTimeout(Duration),
    #[error("host unreachable; next attempt in {0:?}")]
    Backoff(Duration),
}

/// The byte stream to the host.
pub enum Transport {
    Tcp(TcpStream),
    Unix(UnixStream),
    Vsock(vsock::VsockStream),
    /// A virtio-serial port (a character device has no SO_RCVTIMEO or
    /// SO_SNDTIMEO: reads and writes poll() first when a timeout is set).
    Serial(File, Timeouts),
}

/// Read and write timeouts of a serial port.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    pub read: Option<Duration>,
    pub write: Option<Duration>,
}

/// Send buffer asked for on TCP and UNIX sockets: on a UNIX stream socket
/// it bounds how much of a frame the kernel queues for the host at once, so
/// the default (~200 KB) would move a 4K frame in 160 wake-ups of each side.
/// The kernel caps it at `net.core.wmem_max`.
const SEND_BUFFER: libc::c_int = 4 << 20;

/// Asks for [`SEND_BUFFER`], never for less than the socket has.
fn grow_send_buffer(s: &impl std::os::fd::AsRawFd) {
    let fd = s.as_raw_fd();
    let mut have: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd is an open socket borrowed for this call; the option
    // values are c_ints that live across the calls.
    unsafe {
        if libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, (&raw mut have).cast(), &mut len) == 0
            && have < SEND_BUFFER
        {
            let want = SEND_BUFFER;
            let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, (&raw const want).cast(), len);
        }
    }
}

impl Transport {
    pub fn connect(addr: &HostAddr, timeout: Duration) -> Result<Transport, GuestError> {
        let err = |source| GuestError::Connect { addr: addr.clone(), source };
        let t = match addr {
            HostAddr::Tcp(host, port) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut found = None;
                for a in (host.as_str(), *port).to_socket_addrs().map_err(err)? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or_else(|| err(last))?;
                s.set_nodelay(true).map_err(err)?;
                grow_send_buffer(&s);
                Transport::Tcp(s)
            }
            HostAddr::Unix(p) => {
                let s = UnixStream::connect(p).map_err(err)?;
                grow_send_buffer(&s);
                Transport::Unix(s)
            }
            HostAddr::Vsock(cid, port) => {
                Transport::Vsock(vsock::VsockStream::connect(&vsock::VsockAddr::new(*cid, *port)).map_err(err)?)
            }
            HostAddr::Serial(p) => {
                Transport::Serial(OpenOptions::new().read(true).write(true).open(p).map_err(err)?, Timeouts::default())
            }
        };
        Ok(t)
    }

    /// A byte stream whose framing can be lost across restarts (virtio-serial).
    pub fn needs_resync(&self) -> bool {
        matches!(self, Transport::Serial(..))
    }

    /// Read timeout: a read that waits longer fails with `WouldBlock`, on
    /// sockets (SO_RCVTIMEO) and serial ports (poll) alike.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Transport::Tcp(s) => s.set_read_timeout(t),
            Transport::Unix(s) => s.set_read_timeout(t),
            Transport::Vsock(s) => s.set_read_timeout(t),
            Transport::Serial(_, timeouts) => {
                timeouts.read = t;
                Ok(())
            }
        }
    }

    /// Write timeout: a write that makes no progress for this long fails
    /// with `WouldBlock` (a host that stopped reading), sockets and serial
    /// ports alike.
    pub fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Transport::Tcp(s) => s.set_write_timeout(t),
            Transport::Unix(s) => s.set_write_timeout(t),
            Transport::Vsock(s) => s.set_write_timeout(t),
            Transport::Serial(_, timeouts) => {
                timeouts.write = t;
                Ok(())
            }
        }
    }

    pub fn try_clone(&self) -> io::Result<Transport> {
        Ok(match self {
            Transport::Tcp(s) => Transport::Tcp(s.try_clone()?),
            Transport::Unix(s) => Transport::Unix(s.try_clone()?),
            Transport::Vsock(s) => Transport::Vsock(s.try_clone()?),
            Transport::Serial(f, t) => Transport::Serial(f.try_clone()?, *t),
        })
    }

    /// Shuts both directions, waking a reader blocked on the other handle.
    pub fn shutdown(&self) {
        let _ = match self {
            Transport::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Transport::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Transport::Vsock(s) => s.shutdown(std::net::Shutdown::Both),
            Transport::Serial(..) => Ok(()),
        };
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.read(buf),
            Transport::Unix(s) => s.read(buf),
            Transport::Vsock(s) => s.read(buf),
            Transport::Serial(f, timeouts) => {
                if let Some(t) = timeouts.read {
                    wait_for(f.as_raw_fd(), libc::POLLIN, t)?;
                }
                f.read(buf)
            }
        }
    }
}

impl Transport {
    fn socket_fd(&self) -> Option<RawFd> {
        match self {
            Transport::Tcp(s) => Some(s.as_raw_fd()),
            Transport::Unix(s) => Some(s.as_raw_fd()),
            Transport::Vsock(s) => Some(s.as_raw_fd()),
            Transport::Serial(..) => None,
        }
    }
}

/// Waits until `fd` is ready for `events` (or its peer hung up, which the
/// read or write then reports); `WouldBlock` after `timeout`, as a socket
/// would.
fn wait_for(fd: RawFd, events: libc::c_short, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let mut p = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        match unsafe { libc::poll(&mut p, 1, ms) } {
            0 => return Err(io::Error::new(io::ErrorKind::WouldBlock, "timed out")),
            n if n > 0 => return Ok(()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// `sendmsg` with MSG_NOSIGNAL: a host that went away must give us EPIPE,
/// not a SIGPIPE that kills the application we are loaded into (gst-launch
/// does not ignore SIGPIPE, and `writev` would raise it).
fn send_nosignal(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; iov points at IoSlices, which are
    // ABI-compatible with iovec and outlive the call.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len() as _;
        libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match (self.socket_fd(), self) {
            (Some(fd), _) => send_nosignal(fd, bufs),
            (None, Transport::Serial(f, timeouts)) => {
                if let Some(t) = timeouts.write {
                    wait_for(f.as_raw_fd(), libc::POLLOUT, t)?;
                }
                f.write_vectored(bufs)
            }
            (None, _) => unreachable!("every socket has an fd"),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sending half of a connection (split off so a reader thread can own the other).
pub struct Sender {
    t: Transport,
    scratch: BytesMut,
}

impl Sender {
    /// Writes one packet; inline pixels go out by reference in a vectored write.
    pub fn send(&mut self, p: &Packet) -> io::Result<()> {
        hxfr_proto::io::write_packet(&mut self.t, p, &mut self.scratch)
    }

    /// Writes bytes as they are, framing or not: for tests that cut a
    /// message short, as a guest that crashes mid-send does.
    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.t.write_all(bytes)
    }

    pub fn transport(&self) -> &Transport {
        &self.t
    }
}

/// Receiving half.
pub struct Receiver {
    t: Transport,
    dec: FrameDecoder,
    buf: BytesMut,
}

impl Receiver {
    /// The next packet from the host (blocking, subject to the read timeout).
    /// Non-fatal decode errors are returned; the stream stays usable after them.
    pub fn recv(&mut self) -> Result<Packet, DecodeError> {
        hxfr_proto::io::read_packet(&mut self.t, &mut self.dec, &mut self.buf)
    }

    /// How long [`Receiver::recv`] may wait (None: for ever).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.t.set_read_timeout(t)
    }
}

/// A conversation with the host.
pub struct Connection {
    pub tx: Sender,
    pub rx: Receiver,
}

impl Connection {
    pub fn connect(addr: &HostAddr, timeout: Duration) -> Result<Connection, GuestError> {
        Connection::from_transport(Transport::connect(addr, timeout)?)
    }

    /// A conversation over a transport opened some other way (an accepted
    /// socket, in tests that play the host).
    pub fn from_transport(t: Transport) -> Result<Connection, GuestError> {
        let resync = t.needs_resync();
        let r = t.try_clone()?;
        Ok(Connection {
            tx: Sender { t, scratch: BytesMut::with_capacity(256) },
            rx: Receiver { t: r, dec: FrameDecoder::default().resynchronising(resync), buf: BytesMut::new() },
        })
    }

    pub fn send(&mut self, p: &Packet) -> io::Result<()> {
        self.tx.send(p)
    }

    pub fn recv(&mut self) -> Result<Packet, DecodeError> {
        self.rx.recv()
    }

    /// Starts a clean conversation: sends HELLO with a fresh nonce and skips
    /// everything until the HELLO_RESP carrying it (stale answers left in a
    /// virtio-serial port by an earlier run, or by a host restarted mid-stream).
    /// Hosts that predate HELLO never answer it: only use it with ours.
    pub fn hello(&mut self, features: u32, timeout: Duration) -> Result<HelloResp, GuestError> {
        let nonce = nonce();
        self.send(&Packet::new(0, Message::Hello(Hello { nonce, version: PROTOCOL_VERSION, features })))?;
        let deadline = Instant::now() + timeout;
        self.rx.t.set_read_timeout(Some(timeout))?;
        let result = loop {
            if Instant::now() >= deadline {
                break Err(GuestError::HelloTimeout(timeout));
            }
            match self.recv() {
                Ok(Packet { message: Message::HelloResp(r), .. }) if r.nonce == nonce => break Ok(r),
                Ok(_) => continue,
                Err(e) if e.is_timeout() => {
                    break Err(GuestError::HelloTimeout(timeout));
                }
                Err(e) if e.is_fatal() => break Err(e.into()),
                Err(_) => continue,
            }
        };
        self.rx.t.set_read_timeout(None)?;
        result
    }

    pub fn split(self) -> (Sender, Receiver) {
        (self.tx, self.rx)
    }
}

/// A nonce that differs between runs and processes (no RNG crate needed).
fn nonce() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u32) ^ std::process::id().rotate_left(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut t = Transport::Unix(a);
        // Without MSG_NOSIGNAL this would kill the test process with SIGPIPE.
        let e = t.write_all(&[0u8; 1 << 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        let e = t.write_vectored(&[io::IoSlice::new(b"x"), io::IoSlice::new(b"y")]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn parses_host_addresses() {
        assert_eq!("tcp:10.0.2.2:15937".parse(), Ok(HostAddr::Tcp("10.0.2.2".into(), 15937)));
        assert_eq!("tcp:[::1]:5".parse(), Ok(HostAddr::Tcp("::1".into(), 5)));
        assert_eq!("vsock:2:5000".parse(), Ok(HostAddr::Vsock(2, 5000)));
        assert_eq!("unix:/run/h.sock".parse(), Ok(HostAddr::Unix("/run/h.sock".into())));
        assert_eq!(
            "serial:/dev/virtio-ports/com.helix.frame-export".parse(),
            Ok(HostAddr::Serial("/dev/virtio-ports/com.helix.frame-export".into()))
        );
        assert_eq!("vsock:5000".parse(), Ok(HostAddr::Vsock(2, 5000)), "no CID: the host's");
        for bad in ["", "tcp:", "tcp:host", "tcp::5", "vsock:", "unix:", "ftp:x"] {
            assert!(bad.parse::<HostAddr>().is_err(), "{bad}");
        }
        for ok in ["tcp:[::1]:5", "vsock:2:5000", "unix:/x"] {
            assert_eq!(ok.parse::<HostAddr>().unwrap().to_string(), ok);
        }
    }
}

#[cfg(test)]
mod serial_tests {
    use super::*;

    /// A character device has no SO_RCVTIMEO: the read timeout must still
    /// hold (a FIFO stands in for the virtio-serial port).
    #[test]
    fn serial_reads_honour_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("port");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut t = Transport::connect(&HostAddr::Serial(fifo.clone()), Duration::from_secs(1)).unwrap();
        t.set_read_timeout(Some(Duration::from_millis(150))).unwrap();
        let start = Instant::now();
        let e = t.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(start.elapsed() >= Duration::from_millis(140), "{:?}", start.elapsed());
        t.write_all(b"HXFR").unwrap();
        let mut got = [0u8; 4];
        t.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"HXFR");
    }
}

#[cfg(test)]
mod hello_tests {
    use super::*;

    /// A peer that accepts but never answers HELLO (a host that predates it)
    /// must give HelloTimeout, not a connection error.
    #[test]
    fn a_silent_host_times_out_hello() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quiet.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let keep = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(800));
            drop(s);
        });
        let mut c = Connection::connect(&HostAddr::Unix(path), Duration::from_secs(1)).unwrap();
        let r = c.hello(0, Duration::from_millis(200));
        assert!(matches!(r, Err(GuestError::HelloTimeout(_))), "{r:?}");
        let _ = keep.join();
    }
}
