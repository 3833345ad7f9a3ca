//! `hxfr bridge`: the guest side of hxfr, from desktop to browser.
//!
//! Captures a desktop (PipeWire, X11 or a test pattern), encodes it with the
//! encoder the guest's GPU calls for (vsockenc on virtio-gpu, so the host
//! encodes; NVENC or VA-API on real GPUs; x264 as the last resort), and
//! streams the access units over WebSocket to an embedded WebCodecs page,
//! and in Helix's desktop stream protocol to Helix's own client (`/ws/stream`).
//! With `--source scanout:N` there is no capture or encoding in the guest at
//! all: the host, being the VM's GPU, encodes scanout N on every flip and
//! pushes the access units, which the bridge forwards to the same viewers
//! ([`scanout`]).

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

pub mod access;
pub mod desktop;
pub mod h264_level;
pub mod helix;
pub mod helix_ws;
pub mod hub;
pub mod input;
pub mod pipeline;
/// The `hxfr stream` client: watches a bridge as a viewer would and reports what arrives.
pub mod probe;
pub mod scanout;
pub mod select;
mod server;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gst::prelude::*;
use serde_json::json;
use tracing::{info, warn};

pub use pipeline::Source;
pub use select::Choice;

pub struct BridgeConfig {
    pub source: Source,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// `auto` or an encoder element name.
    pub encoder: String,
    /// Where vsockenc finds the host (and, with `Source::Scanout`, where the
    /// bridge subscribes).
    pub host_encoder: String,
    /// With `Source::Scanout`: send ENABLE_SCANOUT at `width`x`height` before
    /// subscribing (hot-plug the connector).
    pub enable_scanout: bool,
    pub bitrate: u32,
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub allow_lan_without_auth: bool,
    /// Web origins besides the bridge's own page that may open its streams (`--allow-origin`).
    pub allow_origins: Vec<String>,
    /// Host names besides loopback and the listen address the bridge answers to (`--allow-host`).
    pub allow_hosts: Vec<String>,
    pub limits: access::Limits,
    /// Root of the sysfs tree the GPU vendor is read from.
    pub sysfs: PathBuf,
    /// No viewer's input reaches the desktop (`--view-only`).
    pub view_only: bool,
    /// Where `--source gnome` finds Mutter and PipeWire (defaults: the session's).
    pub desktop: desktop::DesktopConfig,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            source: Source::Test,
            width: 1280,
            height: 720,
            fps: 30,
            encoder: "auto".into(),
            host_encoder: format!("tcp:10.0.2.2:{}", hxfr_proto::defaults::TCP_PORT),
            enable_scanout: false,
            bitrate: hxfr_proto::defaults::BITRATE,
            listen: "127.0.0.1:8080".parse().expect("valid address"),
            token: None,
            allow_lan_without_auth: false,
            allow_origins: Vec::new(),
            allow_hosts: Vec::new(),
            limits: access::Limits::default(),
            sysfs: "/sys".into(),
            view_only: false,
            desktop: desktop::DesktopConfig::default(),
        }
    }
}

/// A running bridge.
pub struct Bridge {
    pub addr: SocketAddr,
    pub choice: Choice,
    pub hub: Arc<hub::Hub>,
    /// What `/ws/stream` has seen.
    pub helix: Arc<helix_ws::Counters>,
    /// The `Host`/`Origin` rules and their refusal counts.
    pub access: Arc<access::Access>,
    /// Viewers' input: whether it reaches the desktop, and what was refused.
    pub input: Arc<input::InputGate>,
    feed: Feed,
    /// Held for the bridge's life: the GNOME session, the input backend.
    desktop: desktop::Desktop,
    server: tokio::task::JoinHandle<()>,
    token: Option<String>,
}

impl Bridge {
    /// Builds and starts the pipeline and the web server (needs a tokio runtime).
    pub async fn start(cfg: BridgeConfig) -> Result<Bridge> {
        if !cfg.listen.ip().is_loopback() {
            match (&cfg.token, cfg.allow_lan_without_auth) {
                (Some(_), _) => warn!("listening on {}: viewers need the token; the stream is your screen", cfg.listen),
                (None, true) => warn!(
                    "listening on {} WITHOUT authentication: anyone who can reach it sees your screen",
                    cfg.listen
                ),
                (None, false) => bail!(
                    "refusing to listen on {} without --token (or --allow-lan-without-auth): the stream is your screen",
                    cfg.listen
                ),
            }
        }
        let hub = Arc::new(hub::Hub::default());
        // The desktop first: a GNOME session names the PipeWire node to capture.
        let desktop = desktop::Desktop::start(&cfg.source, &cfg.desktop).await?;
        let (choice, feed) = match &cfg.source {
            Source::Scanout(id) => {
                if cfg.encoder != "auto" {
                    warn!("--encoder {} is ignored: with --source scanout:{id} the host encodes", cfg.encoder);
                }
                let host = host_addr(&cfg)?;
                let choice = Choice {
                    element: SCANOUT_ENCODER.into(),
                    reason: format!("the host encodes scanout {id} on every flip and pushes it ({host})"),
                };
                let enable = cfg.enable_scanout.then_some((cfg.width, cfg.height));
                (choice, Feed::Scanout(subscribe(&cfg, *id, host, enable, &hub)?))
            }
            _ => {
                gst::init()?;
                gstvsockenc::plugin_register_static().context("registering vsockenc")?;
                let mut choice = select::choose(&cfg.encoder, &cfg.sysfs, &|e| gst::ElementFactory::find(e).is_some());
                // On virtio-gpu, a host that is the VM's GPU can encode the desktop's own
                // display on every flip: then the guest captures and encodes nothing.
                let pushed = match desktop.scanout() {
                    Some((id, connector)) if cfg.encoder == "auto" && choice.element == "vsockenc" => {
                        try_push(&cfg, id, &connector, &hub, &mut choice)?
                    }
                    _ => None,
                };
                match pushed {
                    Some(sub) => (choice, Feed::Scanout(sub)),
                    None => {
                        let pcfg = pipeline::PipelineConfig {
                            source: desktop.capture(&cfg.source)?,
                            width: cfg.width,
                            height: cfg.height,
                            fps: cfg.fps,
                            encoder: choice.clone(),
                            host_encoder: cfg.host_encoder.clone(),
                            bitrate: cfg.bitrate,
                        };
                        let pipeline = pipeline::build(&pcfg, hub.clone())?;
                        if let Err(e) = pipeline.set_state(gst::State::Playing) {
                            let why = first_error(&pipeline).unwrap_or_else(|| e.to_string());
                            let _ = pipeline.set_state(gst::State::Null);
                            bail!("the pipeline did not start: {why}");
                        }
                        desktop.follow(&pipeline);
                        (choice, Feed::Pipeline(pipeline))
                    }
                }
            }
        };
        info!("encoder: {} ({})", choice.element, choice.reason);
        let input = Arc::new(input::InputGate::new(desktop.control.clone(), cfg.view_only));
        match (input.desktop(), cfg.view_only) {
            (Some(d), false) => info!("input: viewers drive the desktop ({d})"),
            (Some(d), true) => info!("input: off (--view-only; the desktop, {d}, would take it)"),
            (None, _) => info!("input: none (this source takes no input)"),
        }
        let listener =
            tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let helix = Arc::new(helix_ws::Counters::default());
        let state = Arc::new(server::AppState {
            hub: hub.clone(),
            token: cfg.token.clone(),
            write_timeout: cfg.limits.write_timeout,
            hello: json!({
                "type": "hello",
                "encoder": choice.element,
                "reason": choice.reason,
                "width": cfg.width,
                "height": cfg.height,
                "fps": cfg.fps,
            }),
            helix: helix_ws::Endpoint {
                width: cfg.width,
                height: cfg.height,
                fps: cfg.fps,
                limits: h264_level::Limits { fps: cfg.fps, bitrate_bps: cfg.bitrate },
                counters: helix.clone(),
            },
            input: input.clone(),
        });
        let rules = Arc::new(access::Access::new(addr.ip(), &cfg.allow_origins, &cfg.allow_hosts));
        let app = server::router(state).layer(axum::middleware::from_fn_with_state(rules.clone(), access::guard));
        let server = tokio::spawn(access::serve(listener, app, cfg.limits, rules.clone()));
        Ok(Bridge { addr, choice, hub, helix, access: rules, input, feed, server, token: cfg.token, desktop })
    }

    /// The page's address (with the token when one is needed).
    pub fn url(&self) -> String {
        self.address("http", "/")
    }

    /// Where Helix's client connects: `/ws/stream` (with the token when one is needed).
    pub fn helix_url(&self) -> String {
        self.address("ws", "/ws/stream")
    }

    fn address(&self, scheme: &str, path: &str) -> String {
        let host = if self.addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { self.addr.ip().to_string() };
        let base = format!("{scheme}://{host}:{}{path}", self.addr.port());
        match &self.token {
            Some(t) => format!("{base}?token={t}"),
            None => base,
        }
    }

    /// The scanout subscription's counters (`Source::Scanout` only).
    pub fn scanout(&self) -> Option<&scanout::Counters> {
        match &self.feed {
            Feed::Scanout(s) => Some(s.counters()),
            Feed::Pipeline(_) => None,
        }
    }

    /// Waits until the pipeline fails or ends; returns its error if it failed.
    /// A scanout subscription never ends by itself (it reconnects).
    pub async fn wait(&self) -> Result<()> {
        let pipeline = match &self.feed {
            Feed::Pipeline(p) => p,
            Feed::Scanout(_) => return std::future::pending().await,
        };
        let bus = pipeline.bus().context("pipeline bus")?;
        let mut messages = bus.stream();
        while let Some(msg) = futures::StreamExt::next(&mut messages).await {
            match msg.view() {
                gst::MessageView::Error(e) if self.desktop.recovers(e.src()) => {
                    // Mutter went away under the capture; a new session follows.
                    warn!("capture: {} (waiting for a new GNOME session)", e.error())
                }
                gst::MessageView::Error(e) => {
                    bail!("{} ({})", e.error(), e.debug().map(|d| d.to_string()).unwrap_or_default())
                }
                gst::MessageView::Warning(w) => warn!("{}", w.error()),
                gst::MessageView::Eos(_) => return Ok(()),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn stop(self) {
        self.halt();
    }

    /// Stops, and waits until the desktop's session has ended (a GNOME
    /// session is closed at Mutter before this returns).
    pub async fn shutdown(self) {
        self.halt().stop().await;
    }

    fn halt(self) -> desktop::Desktop {
        match &self.feed {
            Feed::Pipeline(p) => {
                let _ = p.set_state(gst::State::Null);
            }
            Feed::Scanout(s) => s.stop(),
        }
        self.hub.close();
        self.server.abort();
        self.desktop
    }
}

/// What the page and `hello` name as the encoder with `--source scanout:N`.
pub const SCANOUT_ENCODER: &str = "host scanout push";

/// How long `--encoder auto` waits for the host's answer to SUBSCRIBE.
const PUSH_PROBE: Duration = Duration::from_secs(3);

fn host_addr(cfg: &BridgeConfig) -> Result<hxfr_guest::HostAddr> {
    cfg.host_encoder.parse().map_err(|e: hxfr_proto::AddrError| anyhow::anyhow!("--host-encoder {e}"))
}

fn subscribe(
    cfg: &BridgeConfig,
    scanout_id: u32,
    host: hxfr_guest::HostAddr,
    enable: Option<(u32, u32)>,
    hub: &Arc<hub::Hub>,
) -> Result<scanout::Subscription> {
    let scfg = scanout::ScanoutConfig {
        scanout_id,
        host,
        enable,
        width: cfg.width,
        height: cfg.height,
        bitrate: cfg.bitrate,
        fps: cfg.fps,
    };
    scanout::Subscription::start(scfg, hub.clone()).context("starting the scanout subscription")
}

/// `--encoder auto` on virtio-gpu with a desktop on scanout `id`: subscribes,
/// and keeps the subscription if the host takes it. Otherwise `choice`
/// (vsockenc) stands, its reason saying why there is no push.
fn try_push(
    cfg: &BridgeConfig,
    id: u32,
    connector: &str,
    hub: &Arc<hub::Hub>,
    choice: &mut Choice,
) -> Result<Option<scanout::Subscription>> {
    let host = host_addr(cfg)?;
    if matches!(host, hxfr_guest::HostAddr::Serial(_)) {
        // A port cannot be closed: a refused or late answer would leave a
        // subscription behind that pushes into the next user's stream.
        choice.reason += "; scanout push is not tried over virtio-serial (--source scanout:N asks for it)";
        return Ok(None);
    }
    let sub = subscribe(cfg, id, host.clone(), None, hub)?;
    match sub.first_answer(PUSH_PROBE) {
        Some(true) => {
            *choice = Choice {
                element: SCANOUT_ENCODER.into(),
                reason: format!(
                    "virtio-gpu, and the host at {host} is the VM's GPU: it encodes the desktop's display \
                     ({connector}, scanout {id}) on every flip"
                ),
            };
            Ok(Some(sub))
        }
        answer => {
            sub.stop();
            let why = if answer.is_some() { "it refused SUBSCRIBE" } else { "no answer to SUBSCRIBE" };
            choice.reason += &format!("; no scanout push for {connector} (scanout {id}): {why}");
            Ok(None)
        }
    }
}

/// Where the hub's access units come from.
enum Feed {
    /// Capture and encode in a GStreamer pipeline (its appsink publishes).
    Pipeline(gst::Pipeline),
    /// The host pushes a scanout's frames ([`scanout`]).
    Scanout(scanout::Subscription),
}

fn first_error(p: &gst::Pipeline) -> Option<String> {
    let bus = p.bus()?;
    while let Some(m) = bus.pop_filtered(&[gst::MessageType::Error]) {
        if let gst::MessageView::Error(e) = m.view() {
            return Some(format!("{} ({})", e.error(), e.debug().map(|d| d.to_string()).unwrap_or_default()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(host: &str) -> BridgeConfig {
        BridgeConfig { host_encoder: host.into(), width: 320, height: 192, ..Default::default() }
    }

    fn vsockenc() -> Choice {
        Choice { element: "vsockenc".into(), reason: "virtio-gpu GPU (0x1af4)".into() }
    }

    /// `--encoder auto` on virtio-gpu keeps scanout push only when the host
    /// takes SUBSCRIBE for the desktop's head; otherwise vsockenc stands and
    /// its reason says why.
    #[test]
    fn auto_prefers_scanout_push_when_the_host_takes_the_subscription() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("h.sock");
        let scanouts = Arc::new(hxfr_host::MemoryScanouts::default());
        scanouts.add(0);
        let _host = hxfr_host::spawn(
            hxfr_host::HostConfig { scanouts: Some(scanouts.clone()), ..Default::default() },
            vec![hxfr_host::ListenAddr::Unix(sock.clone())],
            vec![],
        )
        .unwrap();
        let host = format!("unix:{}", sock.display());
        let hub = Arc::new(hub::Hub::default());

        let mut choice = vsockenc();
        let sub = try_push(&cfg(&host), 0, "Virtual-1", &hub, &mut choice).unwrap().expect("the host takes scanout 0");
        assert_eq!(choice.element, SCANOUT_ENCODER);
        assert!(choice.reason.contains("Virtual-1, scanout 0"), "{}", choice.reason);
        sub.stop();

        let mut choice = vsockenc();
        assert!(try_push(&cfg(&host), 3, "Virtual-4", &hub, &mut choice).unwrap().is_none());
        assert_eq!(choice.element, "vsockenc");
        assert!(
            choice.reason.ends_with("no scanout push for Virtual-4 (scanout 3): it refused SUBSCRIBE"),
            "{}",
            choice.reason
        );

        let nobody = format!("unix:{}", dir.path().join("nobody.sock").display());
        let mut choice = vsockenc();
        assert!(try_push(&cfg(&nobody), 0, "Virtual-1", &hub, &mut choice).unwrap().is_none());
        assert!(choice.reason.ends_with("no answer to SUBSCRIBE"), "{}", choice.reason);

        let mut choice = vsockenc();
        let serial = "serial:/dev/virtio-ports/com.helix.frame-export";
        assert!(try_push(&cfg(serial), 0, "Virtual-1", &hub, &mut choice).unwrap().is_none());
        assert!(choice.reason.contains("not tried over virtio-serial"), "{}", choice.reason);
    }
}
