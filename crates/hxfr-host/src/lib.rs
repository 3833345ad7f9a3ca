//! The hxfr host encode server.
//!
//! Guests hand it raw frames (inline on the socket, in a shared-memory
//! region, or by virtio-gpu resource id); it encodes each with the best H.264
//! encoder the host has and answers every frame, in order, per session. It
//! serves Helix's C `vsockenc` element unchanged as well as ours.
//!
//! One tokio task reads each connection, one thread per session encodes, one
//! task writes answers; every queue between them is bounded. In scanout push
//! mode (SUBSCRIBE) one thread per subscribed scanout encodes its flips and
//! offers each access unit to every subscriber's small queue, which that
//! subscriber's writer drains.
//!
//! The modules depend one way: `lib` (listeners, accept and connect loops)
//! → `conn` (one connection: dispatch and writer; `reader`, its bounded
//! reader) → `session` (one stream: its encoder and its answers, in order).
//! Each hands the next only the parts it uses. Below them sit leaves:
//! `source` (the one seam for the three places a frame's pixels can be),
//! `resolver` (resource id → pixels, per VM; `gpu` adapts the host's own
//! virtio-gpu device to it), `scanout` (the VM's displays, for SUBSCRIBE)
//! and `push` (one encoder per subscribed scanout, fanned out), `shm`, `budget`
//! (`--max-buffered-mib`), `encoder` (caps on live encoders), `memory`,
//! `stats`, `addr`.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

mod addr;
mod budget;
mod conn;
mod encoder;
#[cfg(all(target_os = "linux", feature = "vhost-user-gpu"))]
pub mod gpu;
mod memory;
mod pool;
mod push;
#[cfg(all(target_os = "linux", feature = "vhost-user-gpu"))]
pub mod qemu_display;
mod reader;
mod resolver;
mod scanout;
mod session;
mod shm;
mod source;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use budget::Budget;
use bytes::BytesMut;
use encoder::EncoderFactory;
use hxfr_encode::EncoderKind;
use hxfr_proto::{ErrorCode, Packet};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tracing::{info, warn};

pub use addr::{DEFAULT_TCP_PORT, DEFAULT_VSOCK_PORT, ListenAddr, parse_tcp};
pub use budget::BufferGauge;
pub use conn::StreamKind;
pub use encoder::EncoderGauge;
pub use reader::MessageDeadline;
pub use resolver::{MemoryResolver, Peer, ResolveError, Resolved, ResourceResolver, VmResolvers, Vms};
pub use scanout::{Enabling, Flip, MemoryScanouts, ScanoutSource, VmScanouts, monotonic_ns};
pub use shm::ShmRegion;
pub use stats::{SessionInfo, Snapshot, StatsRegistry};

/// Bounds on what guests may make the host hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; one more is answered ERROR and closed.
    pub max_connections: usize,
    /// Sessions (streams) on one connection.
    pub max_sessions: usize,
    /// Largest message payload accepted (an inline 4K BGRx frame is 33 MB).
    pub max_payload: u32,
    /// Requests queued per session before the host stops reading the socket.
    pub max_in_flight: usize,
    /// Message bytes buffered across the whole host (inline pixels until
    /// encoded, any large message while it arrives), in bytes. A connection
    /// whose message does not fit waits (and so stops reading), whatever its
    /// own limits allow. The frame buffers a connection keeps for its next
    /// frames count too (they go back when anyone waits for room). Only a
    /// 16 KiB read-ahead per connection is outside it.
    pub max_buffered: u64,
    /// How long a message may take from its first byte to its last.
    pub message_deadline: MessageDeadline,
    /// Encoders live across the host.
    pub max_encoders: usize,
    /// Width × height summed over the live encoders.
    pub max_encoder_pixels: u64,
    /// A session's encoder is closed after this long without a frame.
    pub encoder_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            max_sessions: 16,
            max_payload: hxfr_proto::DEFAULT_MAX_PAYLOAD,
            max_in_flight: 4,
            max_buffered: 1 << 30,
            message_deadline: MessageDeadline::default(),
            max_encoders: 32,
            max_encoder_pixels: 64_000_000,
            encoder_idle: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
pub struct HostConfig {
    pub encoder: EncoderKind,
    /// x264 preset (x264 and gst:x264enc backends).
    pub x264_preset: String,
    /// Encoder threads per session, 0 = one per core, at most 4.
    pub encoder_threads: u32,
    pub limits: Limits,
    /// File shared with the guest for SHM_FRAME_REQUEST.
    pub shm_path: Option<PathBuf>,
    pub resolver: Option<Arc<dyn ResourceResolver>>,
    /// The VMs' displays (scanouts), for SUBSCRIBE: scoped per connection
    /// like `resolver`. `None`: SUBSCRIBE is answered `success = 0`.
    pub scanouts: Option<Arc<dyn ScanoutSource>>,
    /// Push a subscribed scanout's picture again after this long without a
    /// flip, for viewers that need a heartbeat. `None` (the default, and
    /// what Helix's subscriber wants): a still screen sends nothing.
    pub scanout_keepalive: Option<Duration>,
    /// Print per-session stats this often (and always on exit).
    pub stats_interval: Option<Duration>,
    /// Permit TCP listeners on non-loopback addresses.
    pub allow_remote: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            encoder: EncoderKind::Auto,
            x264_preset: "ultrafast".into(),
            encoder_threads: 0,
            limits: Limits::default(),
            shm_path: None,
            resolver: None,
            scanouts: None,
            scanout_keepalive: None,
            stats_interval: None,
            allow_remote: false,
        }
    }
}

#[derive(Debug, Error)]
pub enum HostError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error(
        "refusing to listen on {0}: it is reachable from other machines and frames are screen contents; pass --allow-remote if you mean it"
    )]
    RemoteNotAllowed(String),
    #[error("cannot listen on {addr}: {why}")]
    Unsupported { addr: String, why: &'static str },
    #[error("cannot map shared memory {path}: {source}")]
    Shm { path: PathBuf, source: std::io::Error },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// Refusals being written at once; beyond this a refused guest's
/// connection is only closed.
const MAX_REFUSING: usize = 64;
/// How long a refusal may take to write (and to drain what the guest sent,
/// so that closing does not reset the connection before the ERROR is read).
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// What the accept and connect loops share: the parts every connection
/// gets, connection ids, and connection slots.
struct Acceptor {
    conns: Arc<conn::Shared>,
    next_conn_id: AtomicU64,
    max_connections: usize,
    slots: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    refused: AtomicU64,
}

impl Acceptor {
    fn serve<S>(
        &self,
        stream: S,
        peer: String,
        via: String,
        kind: StreamKind,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        conn::serve(self.conns.clone(), id, stream, peer, via, kind)
    }

    /// Serves an accepted guest in a slot of its own, or, with every slot
    /// taken, answers ERROR and closes.
    fn admit<S>(&self, stream: S, peer: String, via: &str)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return self.refuse(stream, peer);
        };
        let conn = self.serve(stream, peer, via.to_owned(), StreamKind::Socket);
        tokio::spawn(async move {
            conn.await;
            drop(slot);
        });
    }

    fn refuse<S>(&self, mut stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let max = self.max_connections;
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(%peer, "refused: {max} guests are connected, the limit (--max-connections); {n} refused so far");
        }
        let Ok(writing) = self.refusing.clone().try_acquire_owned() else { return };
        let message = format!("host busy: {max} guests are connected, the host's limit (--max-connections {max})");
        let mut bytes = BytesMut::new();
        Packet::error(0, ErrorCode::Internal as i32, message).encode(&mut bytes);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REFUSAL_TIME, async {
                stream.write_all(&bytes).await?;
                stream.shutdown().await?;
                tokio::io::copy(&mut (&mut stream).take(1 << 20), &mut tokio::io::sink()).await
            })
            .await;
            drop(writing);
        });
    }
}

/// The host's live figures.
#[derive(Clone)]
struct Gauges {
    budget: Arc<Budget>,
    encoders: Arc<EncoderFactory>,
}

/// A bound listener, ready to serve.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    #[cfg(target_os = "linux")]
    Vsock(tokio_vsock::VsockListener, u32),
}

impl Listener {
    /// What to tell a guest to connect to (the real port when 0 was asked).
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Listener::Tcp(l) => ListenAddr::Tcp(l.local_addr().expect("bound socket has an address")),
            Listener::Unix(_, p) => ListenAddr::Unix(p.clone()),
            #[cfg(target_os = "linux")]
            Listener::Vsock(_, port) => ListenAddr::Vsock(*port),
        }
    }
}

#[derive(Clone)]
pub struct Host {
    acceptor: Arc<Acceptor>,
    /// `config.encoder` with `auto` resolved once at start.
    encoder: EncoderKind,
    stats: StatsRegistry,
    gauges: Gauges,
    stats_interval: Option<Duration>,
    allow_remote: bool,
}

impl Host {
    /// Resolves the encoder (`auto` probes hardware once) and maps shared memory.
    pub fn new(config: HostConfig) -> Result<Host, HostError> {
        let encoder = hxfr_encode::resolve(&config.encoder);
        let shm = match &config.shm_path {
            Some(p) => {
                let r = ShmRegion::open(p).map_err(|source| HostError::Shm { path: p.clone(), source })?;
                info!("shared memory: {} ({} bytes)", p.display(), r.len());
                Some(Arc::new(r))
            }
            None => None,
        };
        let limits = &config.limits;
        let stats = StatsRegistry::default();
        let budget = Arc::new(Budget::new(limits.max_buffered));
        let encoders = Arc::new(EncoderFactory::new(
            encoder.clone(),
            config.x264_preset,
            config.encoder_threads,
            limits.max_encoders,
            limits.max_encoder_pixels,
        ));
        let conns = Arc::new(conn::Shared {
            max_sessions: limits.max_sessions,
            max_payload: limits.max_payload,
            message_deadline: limits.message_deadline,
            max_in_flight: limits.max_in_flight,
            encoder_idle: limits.encoder_idle,
            budget: budget.clone(),
            encoders: encoders.clone(),
            shm,
            resolver: config.resolver,
            scanouts: config.scanouts,
            feeds: Arc::new(push::Feeds::new(encoders.clone(), config.scanout_keepalive, stats.clone())),
            stats: stats.clone(),
        });
        let acceptor = Arc::new(Acceptor {
            conns,
            next_conn_id: AtomicU64::new(1),
            max_connections: limits.max_connections.max(1),
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            refused: AtomicU64::new(0),
        });
        Ok(Host {
            acceptor,
            encoder,
            stats,
            gauges: Gauges { budget, encoders },
            stats_interval: config.stats_interval,
            allow_remote: config.allow_remote,
        })
    }

    /// The encoder sessions will use (`auto` already resolved).
    pub fn encoder(&self) -> &EncoderKind {
        &self.encoder
    }

    pub fn stats(&self) -> StatsRegistry {
        self.stats.clone()
    }

    /// How much of `--max-buffered-mib` is taken, and who waits for it.
    pub fn buffers(&self) -> BufferGauge {
        self.gauges.budget.gauge()
    }

    /// Live encoders and their pixels, against `--max-encoders` and `--max-encoder-mpix`.
    pub fn encoders(&self) -> EncoderGauge {
        self.gauges.encoders.gauge()
    }

    /// Binds a listener (needs a tokio runtime).
    pub async fn bind(&self, addr: &ListenAddr) -> Result<Listener, HostError> {
        Host::bind_addr(addr, self.allow_remote).await
    }

    /// Binds a listener before there is a host (whose resolver may need to
    /// know the bound addresses): `allow_remote` as in [`HostConfig`].
    pub async fn bind_addr(addr: &ListenAddr, allow_remote: bool) -> Result<Listener, HostError> {
        let err = |source| HostError::Listen { addr: addr.to_string(), source };
        match addr {
            ListenAddr::Tcp(a) => {
                if addr.is_remote() {
                    if !allow_remote {
                        return Err(HostError::RemoteNotAllowed(addr.to_string()));
                    }
                    warn!("listening on {addr}: anyone who can reach it can send frames and read the video back");
                }
                Ok(Listener::Tcp(TcpListener::bind(a).await.map_err(err)?))
            }
            ListenAddr::Unix(p) => {
                // A stale socket file from an earlier run would make bind fail.
                if std::fs::metadata(p).map(|m| is_socket(&m)).unwrap_or(false) {
                    let _ = std::fs::remove_file(p);
                }
                Ok(Listener::Unix(UnixListener::bind(p).map_err(err)?, p.clone()))
            }
            #[cfg(target_os = "linux")]
            ListenAddr::Vsock(port) => {
                let a = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port);
                Ok(Listener::Vsock(tokio_vsock::VsockListener::bind(a).map_err(err)?, *port))
            }
            #[cfg(not(target_os = "linux"))]
            ListenAddr::Vsock(_) => Err(HostError::Unsupported {
                addr: addr.to_string(),
                why: "vsock (AF_VSOCK) needs a Linux host; listen on tcp: or unix: instead (a QEMU guest on user networking reaches tcp:127.0.0.1:15937 at 10.0.2.2:15937)",
            }),
        }
    }

    /// Serves until `shutdown` completes: every listener, and a reconnecting
    /// client for every `connect` path (a QEMU chardev socket in server mode,
    /// behind a virtio-serial port).
    pub async fn serve(self, listeners: Vec<Listener>, connect: Vec<PathBuf>, shutdown: impl Future<Output = ()>) {
        let mut tasks = tokio::task::JoinSet::new();
        for l in listeners {
            info!("listening on {}", l.local_addr());
            tasks.spawn(accept_loop(self.acceptor.clone(), l));
        }
        for p in connect {
            tasks.spawn(connect_loop(self.acceptor.clone(), p));
        }
        if let Some(every) = self.stats_interval {
            let stats = self.stats.clone();
            tasks.spawn(async move {
                let mut t = tokio::time::interval(every);
                t.tick().await;
                loop {
                    t.tick().await;
                    for line in stats.report() {
                        info!("stats: {line}");
                    }
                }
            });
        }
        shutdown.await;
        tasks.shutdown().await;
    }
}

#[cfg(unix)]
fn is_socket(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    m.file_type().is_socket()
}

/// Receive buffer asked for on accepted sockets: a large frame then
/// arrives in a few large reads, not a chain of ~200 KB ones each waking the
/// host and the blocked sender. The kernel caps it at `net.core.rmem_max`.
/// (On a UNIX stream socket the sender's SO_SNDBUF bounds what is queued,
/// so the guest client asks for a larger one too.)
const RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// Asks for [`RECEIVE_BUFFER`], never for less than the socket has.
fn grow_receive_buffer(s: &impl std::os::fd::AsRawFd) {
    let fd = s.as_raw_fd();
    let mut have: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd is an open socket borrowed for this call; the option
    // values are c_ints that live across the calls.
    unsafe {
        if libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, (&raw mut have).cast(), &mut len) == 0
            && have < RECEIVE_BUFFER
        {
            let want = RECEIVE_BUFFER;
            let len = size_of::<libc::c_int>() as libc::socklen_t;
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, (&raw const want).cast(), len);
        }
    }
}

async fn accept_loop(acceptor: Arc<Acceptor>, listener: Listener) {
    let via = listener.local_addr().to_string();
    loop {
        // Accept at once, also at the limit: a guest over it is told so,
        // rather than left unanswered in the kernel's backlog.
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, a)| {
                let _ = s.set_nodelay(true);
                grow_receive_buffer(&s);
                acceptor.admit(s, format!("tcp:{a}"), &via)
            }),
            Listener::Unix(l, p) => l.accept().await.map(|(s, _)| {
                grow_receive_buffer(&s);
                acceptor.admit(s, format!("unix:{}", p.display()), &via)
            }),
            #[cfg(target_os = "linux")]
            Listener::Vsock(l, _) => {
                l.accept().await.map(|(s, a)| acceptor.admit(s, format!("vsock:{}:{}", a.cid(), a.port()), &via))
            }
        };
        if let Err(e) = accepted {
            warn!("accept on {} failed: {e}", listener.local_addr());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Keeps a connection to a QEMU chardev socket: QEMU listens, we connect, and
/// connect again whenever the VM restarts or the socket goes away.
async fn connect_loop(acceptor: Arc<Acceptor>, path: PathBuf) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match tokio::net::UnixStream::connect(&path).await {
            Ok(s) => {
                backoff = Duration::from_millis(100);
                let peer = format!("serial:{}", path.display());
                let via = format!("unix:{}", path.display());
                acceptor.serve(s, peer, via, StreamKind::Serial).await;
            }
            Err(e) => {
                if backoff >= Duration::from_secs(5) {
                    tracing::debug!("waiting for {}: {e}", path.display());
                } else {
                    info!("waiting for {}: {e}", path.display());
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A host running on its own thread: for tests, benchmarks and the demo.
pub struct HostHandle {
    /// The bound addresses, in the order given (real ports when 0 was asked).
    pub addrs: Vec<ListenAddr>,
    pub encoder: EncoderKind,
    stats: StatsRegistry,
    gauges: Gauges,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostHandle {
    pub fn stats(&self) -> Vec<Snapshot> {
        self.stats.snapshots()
    }

    /// How much of `--max-buffered-mib` is taken, and who waits for it.
    pub fn buffers(&self) -> BufferGauge {
        self.gauges.budget.gauge()
    }

    /// Live encoders and their pixels, against `--max-encoders` and `--max-encoder-mpix`.
    pub fn encoders(&self) -> EncoderGauge {
        self.gauges.encoders.gauge()
    }

    /// Stops the host and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HostHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a host on a thread of its own with its own runtime, listening on
/// `listen` (and connecting to each of `connect`). Works from any thread,
/// inside an async runtime or not.
pub fn spawn(config: HostConfig, listen: Vec<ListenAddr>, connect: Vec<PathBuf>) -> Result<HostHandle, HostError> {
    let host = Host::new(config)?;
    let (stats, encoder, gauges) = (host.stats(), host.encoder().clone(), host.gauges.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("hxfr-host-main".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("hxfr-host")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(HostError::Runtime(e)));
                    return;
                }
            };
            let bound = rt.block_on(async {
                let mut v = Vec::new();
                for a in &listen {
                    v.push(host.bind(a).await?);
                }
                Ok::<_, HostError>(v)
            });
            let listeners = match bound {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(listeners.iter().map(Listener::local_addr).collect::<Vec<_>>()));
            rt.block_on(host.serve(listeners, connect, async {
                let _ = stop_rx.await;
            }));
            rt.shutdown_timeout(Duration::from_secs(2));
        })
        .map_err(HostError::Runtime)?;
    let addrs = ready_rx
        .recv()
        .map_err(|_| HostError::Runtime(std::io::Error::other("host thread ended before binding")))??;
    Ok(HostHandle { addrs, encoder, stats, gauges, stop: Some(stop_tx), thread: Some(thread) })
}
