//! `hxfr demo`: the whole system on one machine, on embedded defaults.
//!
//! Starts `hxfr host` on a private UNIX socket, a private headless GNOME
//! desktop (Mutter, its own D-Bus, PipeWire and runtime dir, with a terminal
//! in it), and a bridge that captures that desktop with `--source gnome`,
//! encodes it by vsockenc through the host, and lets the page type into it.
//! Without the desktop packages (or if Mutter does not start) it says why and
//! shows the test pattern instead. Ctrl-C (or SIGTERM, SIGHUP) stops everything it started.

use std::net::SocketAddr;

use anyhow::Result;
use hxfr_bridge::{Bridge, BridgeConfig, Source};
use hxfr_desktop::headless::{HeadlessConfig, HeadlessDesktop};
use hxfr_encode::EncoderKind;
use hxfr_host::{HostConfig, ListenAddr};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where the page is served.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Frame size, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x720")]
    size: String,
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// Host encoder: auto, x264 or gst:ELEMENT.
    #[arg(long, default_value = "auto")]
    encoder: EncoderKind,
    /// What to show: desktop (a private headless GNOME session with a terminal; the
    /// test pattern if it cannot start), test, or x11 ($DISPLAY).
    #[arg(long, default_value = "desktop", value_parser = ["desktop", "test", "x11"])]
    show: String,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let (width, height) = crate::parse_size(&a.size)?;
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("hxfr-host.sock");
    let host = hxfr_host::spawn(
        HostConfig { encoder: a.encoder, ..Default::default() },
        vec![ListenAddr::Unix(sock.clone())],
        vec![],
    )?;
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async {
        // Held until the demo ends: dropping it stops Mutter and everything in it.
        let mut desktop = None;
        let (source, mut shows) = match a.show.as_str() {
            "x11" => match std::env::var("DISPLAY") {
                Ok(d) => (Source::X11(Some(d.clone())), format!("your X11 display {d}")),
                Err(_) => anyhow::bail!("--show x11 needs $DISPLAY"),
            },
            "test" => (Source::Test, "the test pattern".to_string()),
            _ => {
                eprintln!("hxfr demo: starting a private headless GNOME desktop (Mutter) with a terminal…");
                let cfg = HeadlessConfig { width, height, apps: vec![vec!["foot".to_string()]] };
                match HeadlessDesktop::start(cfg).await {
                    Ok(d) => {
                        desktop = Some(d);
                        (Source::Gnome, "a headless GNOME desktop (Mutter) with a terminal in it".to_string())
                    }
                    Err(e) => {
                        eprintln!("hxfr demo: no desktop ({e}); showing the test pattern instead");
                        (Source::Test, "the test pattern (the desktop did not start)".to_string())
                    }
                }
            }
        };
        let bridge_cfg = |source: Source, desktop: &Option<HeadlessDesktop>| BridgeConfig {
            source,
            width,
            height,
            fps: a.fps,
            // This machine has no virtio-gpu: name the element the guest of a VM would get.
            encoder: "vsockenc".into(),
            host_encoder: format!("unix:{}", sock.display()),
            listen: a.listen,
            desktop: desktop.as_ref().map_or_else(Default::default, |d| hxfr_bridge::desktop::DesktopConfig {
                dbus_address: Some(d.dbus_address().to_string()),
                pipewire_socket: Some(d.pipewire_socket()),
            }),
            ..Default::default()
        };
        let bridge = match Bridge::start(bridge_cfg(source.clone(), &desktop)).await {
            Ok(b) => b,
            Err(e) if source == Source::Gnome => {
                eprintln!("hxfr demo: the desktop did not stream ({e:#}); showing the test pattern instead");
                desktop = None;
                shows = "the test pattern (the desktop did not stream)".to_string();
                Bridge::start(bridge_cfg(Source::Test, &desktop)).await?
            }
            Err(e) => return Err(e),
        };
        println!("hxfr demo: host encoder {} on unix:{}", host.encoder, sock.display());
        println!(
            "           bridge: {} ({}), {width}x{height} at {} fps",
            bridge.choice.element, bridge.choice.reason, a.fps
        );
        println!("           showing {shows}");
        if let Some(d) = &desktop {
            println!("           desktop session in {}", d.runtime_dir().display());
        }
        if bridge.input.interactive() {
            println!("           the page is interactive: click the picture, then type into the terminal");
        }
        println!();
        println!("  open {}", bridge.url());
        println!("  or measure it: hxfr stream {} --duration 30", bridge.url());
        println!("  Helix's client: {}", bridge.helix_url());
        println!();
        println!("Ctrl-C stops.");
        // Ctrl-C, a closed terminal or a kill all end it the same way: with
        // everything it started stopped.
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut hup) = (signal(SignalKind::terminate())?, signal(SignalKind::hangup())?);
        let r = tokio::select! {
            r = bridge.wait() => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
            _ = hup.recv() => Ok(()),
        };
        // The session first: Mutter does not exit while it has one open.
        bridge.shutdown().await;
        drop(desktop);
        r
    });
    for s in host.stats() {
        println!("host: {s}");
    }
    host.stop();
    result
}
