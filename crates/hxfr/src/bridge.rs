//! `hxfr bridge` and `hxfr stream`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use hxfr_bridge::probe::Protocol;
use hxfr_bridge::{Bridge, BridgeConfig, Source};

#[derive(clap::Args)]
pub struct BridgeArgs {
    /// gnome (Mutter's ScreenCast and RemoteDesktop on the session bus: capture and input),
    /// x11[:DISPLAY] (capture, input through XTest), pipewire[:NODE|:fd=N] (a node someone
    /// else set up; no input), test, or scanout:N (the host, as the VM's GPU, encodes
    /// scanout N on every flip and pushes it; --host-encoder is where).
    #[arg(long, default_value = "test")]
    source: Source,
    /// Frame size, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x720")]
    size: String,
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// auto (by GPU vendor) or an encoder element (vsockenc, nvh264enc, vah264enc, x264enc, …).
    #[arg(long, default_value = "auto")]
    encoder: String,
    /// Where vsockenc finds the host encoder (with --source scanout:N, where the bridge subscribes).
    #[arg(long, default_value = "tcp:10.0.2.2:15937")]
    host_encoder: String,
    /// With --source scanout:N: ask the host to enable (hot-plug) the scanout at --size first.
    #[arg(long)]
    enable_scanout: bool,
    /// Bits per second.
    #[arg(long, default_value_t = hxfr_proto::defaults::BITRATE)]
    bitrate: u32,
    /// Where the page and the stream are served.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Viewers must add ?token=… (required off loopback unless --allow-lan-without-auth).
    #[arg(long)]
    token: Option<String>,
    #[arg(long)]
    allow_lan_without_auth: bool,
    /// A web origin (scheme://host:port) whose pages may open the stream, besides the
    /// bridge's own page; repeatable. Without it no other site's page gets in.
    #[arg(long, value_name = "ORIGIN")]
    allow_origin: Vec<String>,
    /// A host name the bridge answers to besides loopback and its listen address
    /// (requests naming any other host get 403, against DNS rebinding); repeatable.
    #[arg(long, value_name = "NAME")]
    allow_host: Vec<String>,
    /// Connections at a time, viewers included; the next one gets 503.
    #[arg(long, default_value_t = hxfr_bridge::access::Limits::default().max_connections)]
    max_connections: usize,
    /// Viewers watch only: no keyboard, pointer or clipboard reaches the desktop.
    #[arg(long)]
    view_only: bool,
    /// With --source gnome: the D-Bus bus Mutter is on (default: $DBUS_SESSION_BUS_ADDRESS).
    #[arg(long, value_name = "ADDRESS")]
    desktop_bus: Option<String>,
    /// With --source gnome: the PipeWire socket Mutter streams to (default: PipeWire's
    /// own lookup through $PIPEWIRE_RUNTIME_DIR or $XDG_RUNTIME_DIR).
    #[arg(long, value_name = "PATH")]
    pipewire_socket: Option<PathBuf>,
    /// sysfs root the GPU vendor is read from.
    #[arg(long, default_value = "/sys", hide = true)]
    sysfs: PathBuf,
}

pub fn bridge(a: BridgeArgs) -> Result<()> {
    let (width, height) = crate::parse_size(&a.size)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let bridge = Bridge::start(BridgeConfig {
            source: a.source,
            width,
            height,
            fps: a.fps,
            encoder: a.encoder,
            host_encoder: a.host_encoder,
            enable_scanout: a.enable_scanout,
            bitrate: a.bitrate,
            listen: a.listen,
            token: a.token,
            allow_lan_without_auth: a.allow_lan_without_auth,
            allow_origins: a.allow_origin,
            allow_hosts: a.allow_host,
            limits: hxfr_bridge::access::Limits { max_connections: a.max_connections, ..Default::default() },
            sysfs: a.sysfs,
            view_only: a.view_only,
            desktop: hxfr_bridge::desktop::DesktopConfig {
                dbus_address: a.desktop_bus,
                pipewire_socket: a.pipewire_socket,
            },
        })
        .await?;
        println!("hxfr bridge: {} ({}); open {}", bridge.choice.element, bridge.choice.reason, bridge.url());
        println!("Helix's client: {}", bridge.helix_url());
        match (bridge.input.desktop(), bridge.input.interactive()) {
            (Some(d), true) => println!("input: viewers drive the desktop ({d})"),
            (Some(_), false) => println!("input: off (--view-only)"),
            (None, _) => println!("input: none for this source"),
        }
        let r = tokio::select! {
            r = bridge.wait() => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        };
        bridge.stop();
        r
    })
}

#[derive(clap::Args)]
pub struct StreamArgs {
    /// The bridge's page URL, e.g. http://127.0.0.1:8080/ (with ?token=… if it has one),
    /// or its Helix endpoint, ws://127.0.0.1:8080/ws/stream.
    url: String,
    /// hxfr (`/stream`) or helix (Helix's desktop stream protocol, `/ws/stream`);
    /// by default helix when the URL's path ends in /ws/stream.
    #[arg(long, value_name = "hxfr|helix")]
    protocol: Option<Protocol>,
    /// Seconds to watch.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn stream(a: StreamArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let protocol = a.protocol.unwrap_or_else(|| Protocol::detect(&a.url));
    let report = rt.block_on(hxfr_bridge::probe::watch_as(&a.url, protocol, Duration::from_secs(a.duration), |p| {
        eprint!(
            "\r  {:4.0} s  {:6} frames  {:5.1} fps  {:6.2} Mbit/s ",
            p.elapsed.as_secs_f64(),
            p.frames,
            p.fps,
            p.bitrate_bps / 1e6
        );
        let _ = std::io::stderr().flush();
    }))?;
    eprintln!();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let ms = |v: Option<f64>| v.map_or("n/a (clocks not shared)".to_string(), |v| format!("{v:.1} ms"));
        println!(
            "stream:    {} ({}) — {}x{}, {} level {}",
            report.url, report.protocol, report.width, report.height, report.profile, report.level
        );
        if !report.encoder.is_empty() {
            println!("encoder:   {} ({})", report.encoder, report.encoder_reason);
        }
        println!("frames:    {} in {:.1} s, {} keyframes", report.frames, report.seconds, report.keyframes);
        println!("fps:       {:.1} average, {:.0} in the worst second", report.fps_avg, report.fps_worst_1s);
        println!("bitrate:   {:.2} Mbit/s", report.bitrate_bps / 1e6);
        let how = match protocol {
            Protocol::Hxfr => "captured → received",
            Protocol::Helix => "captured → sent, from Pongs, + half the round trip",
        };
        println!(
            "latency:   p50 {}, p95 {}, p99 {} ({how})",
            ms(report.latency_ms_p50),
            ms(report.latency_ms_p95),
            ms(report.latency_ms_p99)
        );
        println!("starts at an IDR: {}", if report.starts_with_idr { "yes" } else { "NO" });
        for p in &report.problems {
            println!("problem:   {p}");
        }
    }
    if !report.ok() {
        bail!("the stream is broken or empty");
    }
    Ok(())
}
