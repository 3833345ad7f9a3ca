//! `hxfr demo`: the whole system on one machine, on embedded defaults.
//!
//! Starts `hxfr host` on a private UNIX socket and a bridge whose test source
//! (or X11 desktop, when $DISPLAY is set and ximagesrc is installed) is
//! encoded by vsockenc through that host, then prints the page's URL.
//! Ctrl-C stops everything.

use std::net::SocketAddr;

use anyhow::Result;
use hxfr_bridge::{Bridge, BridgeConfig, Source};
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
    let source = match std::env::var("DISPLAY") {
        Ok(d) if gst::init().is_ok() && gst::ElementFactory::find("ximagesrc").is_some() => Source::X11(Some(d)),
        Ok(_) => {
            eprintln!("$DISPLAY is set but ximagesrc is not installed: showing the test pattern");
            Source::Test
        }
        Err(_) => Source::Test,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async {
        let bridge = Bridge::start(BridgeConfig {
            source,
            width,
            height,
            fps: a.fps,
            // This machine has no virtio-gpu: name the element the guest of a VM would get.
            encoder: "vsockenc".into(),
            host_encoder: format!("unix:{}", sock.display()),
            listen: a.listen,
            ..Default::default()
        })
        .await?;
        println!("hxfr demo: host encoder {} on unix:{}", host.encoder, sock.display());
        println!(
            "           bridge: {} ({}), {width}x{height} at {} fps",
            bridge.choice.element, bridge.choice.reason, a.fps
        );
        println!();
        println!("  open {}", bridge.url());
        println!("  or measure it: hxfr stream {} --duration 30", bridge.url());
        println!("  Helix's client: {}", bridge.helix_url());
        println!();
        println!("Ctrl-C stops.");
        let r = tokio::select! {
            r = bridge.wait() => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        };
        bridge.stop();
        r
    });
    for s in host.stats() {
        println!("host: {s}");
    }
    host.stop();
    result
}
