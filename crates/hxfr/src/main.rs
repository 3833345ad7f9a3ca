//! `hxfr`: one binary, thin over the libraries.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

#[cfg(feature = "gstreamer")]
mod bridge;
#[cfg(feature = "gstreamer")]
mod demo;
mod gpu;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hxfr_encode::EncoderKind;
use hxfr_host::{HostConfig, Limits, ListenAddr};
use tracing::info;

#[derive(Parser)]
#[command(name = "hxfr", version, about = "Hand a VM's desktop video to the host for H.264 encoding")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve guests: take raw frames, answer each with H.264, in order.
    Host(HostArgs),
    #[cfg(feature = "gstreamer")]
    /// Guest side: capture, encode (on the host through vsockenc, or locally), serve the page.
    Bridge(bridge::BridgeArgs),
    #[cfg(feature = "gstreamer")]
    /// Watch a bridge like a viewer and report frames, fps, bitrate, latency.
    Stream(bridge::StreamArgs),
    #[cfg(feature = "gstreamer")]
    /// The whole system on this machine: a host, a bridge encoding through
    /// it, and the page to open.
    Demo(demo::DemoArgs),
    #[cfg(feature = "gstreamer")]
    /// Measure the offload paths side by side against the encoder in-process.
    Bench(hxfr_bench::BenchArgs),
}

#[derive(clap::Args)]
struct HostArgs {
    /// Where to listen: tcp:HOST:PORT, unix:PATH, vsock:PORT. Repeatable.
    /// [default: tcp:127.0.0.1:15937, where QEMU user networking sends a
    /// guest's 10.0.2.2:15937]. With several --vhost-user-gpu VMs, NAME@ADDR
    /// says whose guests come through it.
    #[arg(long = "listen", value_name = "[NAME@]ADDR")]
    listen: Vec<String>,
    /// Connect to a QEMU chardev socket (unix:PATH) behind a virtio-serial
    /// port such as com.helix.frame-export; reconnects when the VM restarts.
    /// NAME@unix:PATH binds it to a --vhost-user-gpu VM.
    #[arg(long = "connect", value_name = "[NAME@]unix:PATH")]
    connect: Vec<String>,
    /// Be a VM's GPU: serve QEMU's vhost-user-gpu-pci on this UNIX socket
    /// (one per VM, repeatable; NAME= names the VM for NAME@ bindings).
    /// Frames its guests name by virtio-gpu resource id are read from its
    /// resources. Linux only.
    #[arg(long = "vhost-user-gpu", value_name = "[NAME=]PATH")]
    vhost_user_gpu: Vec<String>,
    /// The D-Bus bus of QEMU's display (`-display dbus,gl=off`), through
    /// which ENABLE_SCANOUT plugs a display into the guest. [default: the
    /// session bus, DBUS_SESSION_BUS_ADDRESS]
    #[arg(long, value_name = "ADDRESS")]
    qemu_dbus: Option<String>,
    /// Scanout push: repeat a still display's last frame every this many ms
    /// (for viewers that need a heartbeat; 0: never, as Helix expects).
    #[arg(long, default_value_t = 0)]
    scanout_keepalive_ms: u64,
    /// auto (hardware first: VideoToolbox on macOS, GStreamer elements
    /// elsewhere; then x264), videotoolbox, x264, or gst:ELEMENT.
    #[arg(long, default_value = "auto")]
    encoder: EncoderKind,
    /// x264 speed preset.
    #[arg(long, default_value = "ultrafast")]
    x264_preset: String,
    /// Encoder threads per session (0: one per core, at most 4).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// A file shared with the guest (QEMU memory-backend-file behind
    /// ivshmem-plain) for shared-memory frames.
    #[arg(long, value_name = "PATH")]
    shm: Option<PathBuf>,
    /// Allow TCP listeners on non-loopback addresses (frames are screen contents).
    #[arg(long)]
    allow_remote: bool,
    /// Seconds between stats lines (0: only on exit).
    #[arg(long, default_value_t = 10)]
    stats_interval: u64,
    /// Guests served at once; one more is answered ERROR and closed.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Streams per connection.
    #[arg(long, default_value_t = Limits::default().max_sessions)]
    max_sessions: usize,
    /// Frames queued per session before the host stops reading (backpressure).
    #[arg(long, default_value_t = Limits::default().max_in_flight)]
    max_in_flight: usize,
    /// Largest message accepted, in MiB.
    #[arg(long, default_value_t = Limits::default().max_payload >> 20)]
    max_payload_mib: u32,
    /// Message bytes buffered across all guests (inline pixels until
    /// encoded, large messages while they arrive), in MiB.
    #[arg(long, default_value_t = Limits::default().max_buffered >> 20)]
    max_buffered_mib: u64,
    /// Encoders live across all guests; a session over it is answered ERROR.
    #[arg(long, default_value_t = Limits::default().max_encoders)]
    max_encoders: usize,
    /// Megapixels (width x height) of all live encoders together.
    #[arg(long, default_value_t = Limits::default().max_encoder_pixels / 1_000_000)]
    max_encoder_mpix: u64,
    /// A session's encoder is closed after this many seconds without a frame.
    #[arg(long, default_value_t = Limits::default().encoder_idle.as_secs())]
    encoder_idle_secs: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The server logs its sessions; the measuring commands print their own
    // report and only want the host's warnings.
    let default_filter = match cli.command {
        Command::Host(_) => "info",
        #[cfg(feature = "gstreamer")]
        Command::Bridge(_) => "info",
        #[allow(unreachable_patterns)] // only Host without the gstreamer feature
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Host(a) => host(a),
        #[cfg(feature = "gstreamer")]
        Command::Bridge(a) => bridge::bridge(a),
        #[cfg(feature = "gstreamer")]
        Command::Stream(a) => bridge::stream(a),
        #[cfg(feature = "gstreamer")]
        Command::Demo(a) => demo::run(a),
        #[cfg(feature = "gstreamer")]
        Command::Bench(a) => hxfr_bench::run(a).map(|_| ()),
    }
}

/// `WIDTHxHEIGHT`.
#[cfg(feature = "gstreamer")]
pub(crate) fn parse_size(s: &str) -> Result<(u32, u32)> {
    let z: hxfr_proto::Size = s.parse().map_err(anyhow::Error::msg)?;
    Ok((z.width, z.height))
}

fn host(a: HostArgs) -> Result<()> {
    if a.max_payload_mib == 0 || a.max_payload_mib > 1024 {
        bail!("--max-payload-mib must be between 1 and 1024");
    }
    let gpus = gpu::parse_devices(&a.vhost_user_gpu)?;
    let vm_names: Vec<&str> = gpus.iter().map(|g| g.name.as_str()).collect();
    let mut connect = Vec::new();
    let mut bindings = Vec::new();
    for c in &a.connect {
        let (vm, addr) = gpu::split_vm(c, &vm_names);
        let path = addr.strip_prefix("unix:").map(PathBuf::from).context("--connect takes unix:PATH")?;
        if let Some(vm) = vm {
            bindings.push((gpu::Via::Connect(path.clone()), vm.to_owned()));
        }
        connect.push(path);
    }
    let mut listen = Vec::new();
    for l in &a.listen {
        let (vm, addr) = gpu::split_vm(l, &vm_names);
        let addr: ListenAddr = addr.parse().map_err(|e| anyhow::anyhow!("--listen {l}: {e}"))?;
        if let Some(vm) = vm {
            bindings.push((gpu::Via::Listen(listen.len()), vm.to_owned()));
        }
        listen.push(addr);
    }
    if listen.is_empty() && connect.is_empty() {
        listen.push(ListenAddr::default());
    }
    let config = HostConfig {
        encoder: a.encoder,
        x264_preset: a.x264_preset,
        encoder_threads: a.threads,
        limits: Limits {
            max_connections: a.max_connections,
            max_sessions: a.max_sessions,
            max_payload: a.max_payload_mib << 20,
            max_in_flight: a.max_in_flight,
            max_buffered: a.max_buffered_mib.max(1) << 20,
            max_encoders: a.max_encoders,
            max_encoder_pixels: a.max_encoder_mpix.saturating_mul(1_000_000),
            encoder_idle: Duration::from_secs(a.encoder_idle_secs.max(1)),
            ..Limits::default()
        },
        shm_path: a.shm,
        resolver: None, // set below, once listeners are bound
        scanouts: None, // set below, with the resolver
        scanout_keepalive: (a.scanout_keepalive_ms > 0).then(|| Duration::from_millis(a.scanout_keepalive_ms)),
        stats_interval: (a.stats_interval > 0).then(|| Duration::from_secs(a.stats_interval)),
        allow_remote: a.allow_remote,
    };
    let qemu_dbus = a.qemu_dbus;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut listeners = Vec::new();
        for l in &listen {
            listeners.push(hxfr_host::Host::bind_addr(l, config.allow_remote).await?);
        }
        let vias: Vec<String> = listeners.iter().map(|l| l.local_addr().to_string()).collect();
        let mut config = config;
        (config.resolver, config.scanouts) = gpu::start(&gpus, &bindings, &vias, qemu_dbus)?;
        let host = hxfr_host::Host::new(config)?;
        info!("encoder: {}", host.encoder());
        let stats = host.stats();
        host.serve(listeners, connect, async {
            let _ = tokio::signal::ctrl_c().await;
            info!("stopping");
        })
        .await;
        gpu::cleanup(&gpus);
        for s in stats.snapshots() {
            info!("final: {s}");
        }
        Ok(())
    })
}
