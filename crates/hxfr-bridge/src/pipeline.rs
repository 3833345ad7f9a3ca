//! The capture → encode → appsink pipeline, built element by element.

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use gst::prelude::*;
use hxfr_guest::HostAddr;

use crate::hub::{Hub, Unit};
use crate::select::Choice;
use crate::wire::{self, Header};

/// Where the desktop comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A moving test pattern with a running clock, so latency shows by eye.
    Test,
    /// An X11 display (`x11` uses $DISPLAY, `x11::1` names one).
    X11(Option<String>),
    /// PipeWire ScreenCast: `pipewire` (default node), `pipewire:NODE_ID`, or
    /// `pipewire:fd=N` for a portal's fd passed in.
    Pipewire { node: Option<String>, fd: Option<i32> },
    /// `scanout:N`: no capture; the host encodes scanout N of the VM's GPU on
    /// every flip and pushes the access units (see [`crate::scanout`]).
    Scanout(u32),
    /// `gnome`: the bridge asks Mutter (or gnome-shell) for a remote desktop
    /// session of the primary monitor and captures its PipeWire stream
    /// (see [`crate::desktop`]).
    Gnome,
}

/// The name of the capture element, for following a restarted GNOME session.
pub const CAPTURE: &str = "capture";

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, arg) = s.split_once(':').map_or((s, None), |(k, a)| (k, Some(a)));
        match (kind, arg) {
            ("test", None) => Ok(Source::Test),
            ("gnome", None) => Ok(Source::Gnome),
            ("x11", d) => Ok(Source::X11(d.filter(|d| !d.is_empty()).map(str::to_string))),
            ("pipewire", None) => Ok(Source::Pipewire { node: None, fd: None }),
            ("pipewire", Some(a)) => match a.strip_prefix("fd=") {
                Some(fd) => {
                    Ok(Source::Pipewire { node: None, fd: Some(fd.parse().map_err(|_| format!("bad fd in {s:?}"))?) })
                }
                None => Ok(Source::Pipewire { node: Some(a.to_string()), fd: None }),
            },
            ("scanout", Some(n)) => Ok(Source::Scanout(n.parse().map_err(|_| format!("bad scanout id in {s:?}"))?)),
            _ => Err(format!("{s:?}: expected test, gnome, x11[:DISPLAY], pipewire[:NODE|:fd=N], scanout:N")),
        }
    }
}

pub struct PipelineConfig {
    pub source: Source,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub encoder: Choice,
    /// Where vsockenc finds the host.
    pub host_encoder: String,
    pub bitrate: u32,
}

fn make(factory: &str) -> Result<gst::Element> {
    gst::ElementFactory::make(factory).build().map_err(|_| {
        anyhow!(
            "GStreamer element {factory:?} is missing (install the plugin that has it, see scripts/install-deps.sh)"
        )
    })
}

fn source(cfg: &PipelineConfig) -> Result<Vec<gst::Element>> {
    Ok(match &cfg.source {
        Source::Test => {
            let src = make("videotestsrc")?;
            src.set_property("is-live", true);
            src.set_property_from_str("pattern", "smpte");
            src.set_property("horizontal-speed", 4i32);
            // A running clock makes latency visible by eye; optional (gstreamer1.0-x).
            match make("timeoverlay") {
                Ok(clock) => {
                    clock.set_property_from_str("halignment", "center");
                    clock.set_property_from_str("valignment", "center");
                    clock.set_property("font-desc", format!("Sans Bold {}", (cfg.height / 12).max(12)));
                    vec![src, clock]
                }
                Err(e) => {
                    tracing::warn!("no clock on the test pattern: {e}");
                    vec![src]
                }
            }
        }
        Source::X11(display) => {
            let src = make("ximagesrc")?;
            if let Some(d) = display {
                src.set_property("display-name", d);
            }
            src.set_property("use-damage", false);
            vec![src, make("videoscale")?]
        }
        Source::Pipewire { node, fd } => {
            let src = gst::ElementFactory::make("pipewiresrc").name(CAPTURE).build().map_err(|_| {
                anyhow!(
                    "GStreamer element \"pipewiresrc\" is missing (gstreamer1.0-pipewire, see scripts/install-deps.sh)"
                )
            })?;
            if let Some(n) = node {
                src.set_property("path", n);
            }
            if let Some(fd) = fd {
                src.set_property("fd", *fd);
            }
            src.set_property("do-timestamp", true);
            // Mutter sends a frame only when the screen changes; a viewer wants a
            // steady stream (and a late one a picture): repeat the last frame.
            if src.find_property("keepalive-time").is_some() {
                src.set_property("keepalive-time", (1000 / cfg.fps.max(1)) as i32);
            } else {
                tracing::warn!(
                    "this pipewiresrc has no keepalive-time (PipeWire < 0.3.60?): a still desktop sends no frames"
                );
            }
            // Raw BGRx right after the source: a filter that takes anything stalls
            // negotiation with Mutter's variable-rate, shared-memory stream.
            let raw = make("capsfilter")?;
            raw.set_property("caps", gst::Caps::builder("video/x-raw").field("format", "BGRx").build());
            // Variable rate in, the configured rate out.
            let rate = make("videorate")?;
            rate.set_property("drop-only", false);
            vec![src, raw, rate, make("videoscale")?]
        }
        Source::Scanout(_) => bail!("--source scanout:N has no capture pipeline (the host pushes encoded frames)"),
        Source::Gnome => bail!("--source gnome is captured through its session's PipeWire node (Desktop::capture)"),
    })
}

/// The encoder element with low-latency settings, and the raw format it is fed.
fn encoder(cfg: &PipelineConfig) -> Result<(gst::Element, Option<&'static str>)> {
    let name = cfg.encoder.element.as_str();
    let enc = make(name)?;
    let kbps = (cfg.bitrate / 1000).max(100);
    let set = |p: &str, v: &str| {
        if enc.find_property(p).is_some() {
            enc.set_property_from_str(p, v);
        }
    };
    let gop = (cfg.fps * 10).to_string();
    let format = match name {
        "vsockenc" => {
            let addr: HostAddr =
                cfg.host_encoder.parse().map_err(|e: hxfr_proto::AddrError| anyhow!("--host-encoder {e}"))?;
            for (prop, value) in vsockenc_address(&addr, enc.find_property("host").is_some())? {
                if enc.find_property(prop).is_none() {
                    bail!("the installed vsockenc has no {prop:?} property, so it cannot reach {addr}");
                }
                enc.set_property_from_str(prop, &value);
            }
            set("bitrate", &cfg.bitrate.to_string());
            set("keyframe-interval", &gop);
            // The host converts colour with SIMD; the guest spends nothing on it.
            Some("BGRx")
        }
        "x264enc" => {
            set("tune", "zerolatency");
            set("speed-preset", "ultrafast");
            set("bitrate", &kbps.to_string());
            set("key-int-max", &gop);
            Some("I420")
        }
        "nvh264enc" => {
            set("preset", "low-latency-hq");
            set("zerolatency", "true");
            set("bframes", "0");
            set("bitrate", &kbps.to_string());
            set("gop-size", &gop);
            Some("NV12")
        }
        "vah264enc" | "vaapih264enc" => {
            set("b-frames", "0");
            set("max-bframes", "0");
            set("bitrate", &kbps.to_string());
            Some("NV12")
        }
        _ => None,
    };
    Ok((enc, format))
}

/// The vsockenc properties that name `addr`. Helix's C element has only
/// `socket-path`, `tcp-host`/`tcp-port` and `cid`/`port` (and ignores a
/// `host` it does not know, then connects to vsock 2:5000), so those carry
/// every address they can; `host` (hxfr's element only) is used for what
/// only it reaches, a virtio-serial port.
pub fn vsockenc_address(addr: &HostAddr, has_host: bool) -> Result<Vec<(&'static str, String)>> {
    Ok(match addr {
        HostAddr::Tcp(h, p) => vec![("tcp-host", h.clone()), ("tcp-port", p.to_string())],
        HostAddr::Unix(path) => vec![("socket-path", path.display().to_string())],
        HostAddr::Vsock(cid, port) => vec![("cid", cid.to_string()), ("port", port.to_string())],
        HostAddr::Serial(_) if has_host => vec![("host", addr.to_string())],
        HostAddr::Serial(_) => bail!(
            "{addr}: the installed vsockenc has no `host` property (Helix's C element?), and only hxfr's \
             vsockenc reaches a virtio-serial port; use hxfr's libgstvsockenc.so, or a tcp:, unix: or vsock: address"
        ),
    })
}

/// Wall-clock capture times by buffer PTS, for the latency a viewer sees.
#[derive(Default)]
struct CaptureTimes(Mutex<VecDeque<(gst::ClockTime, u64)>>);

impl CaptureTimes {
    fn record(&self, pts: gst::ClockTime) {
        let mut q = self.0.lock().unwrap();
        if q.len() == 256 {
            q.pop_front();
        }
        q.push_back((pts, wire::unix_us()));
    }
    fn lookup(&self, pts: Option<gst::ClockTime>) -> u64 {
        let q = self.0.lock().unwrap();
        pts.and_then(|p| q.iter().rev().find(|(t, _)| *t == p).map(|(_, us)| *us)).unwrap_or_else(wire::unix_us)
    }
}

/// Builds the pipeline; encoded access units go to `hub`.
pub fn build(cfg: &PipelineConfig, hub: Arc<Hub>) -> Result<gst::Pipeline> {
    gst::init()?;
    if cfg.width < 16
        || cfg.height < 16
        || !cfg.width.is_multiple_of(2)
        || !cfg.height.is_multiple_of(2)
        || cfg.fps == 0
        || cfg.fps > 240
    {
        bail!("size must be even and at least 16x16, fps 1..240 (got {}x{} at {})", cfg.width, cfg.height, cfg.fps);
    }
    let pipeline = gst::Pipeline::new();
    let mut chain = source(cfg)?;
    let size = make("capsfilter")?;
    size.set_property(
        "caps",
        gst_video::VideoCapsBuilder::new()
            .width(cfg.width as i32)
            .height(cfg.height as i32)
            .framerate(gst::Fraction::new(cfg.fps as i32, 1))
            .build(),
    );
    // The test source draws its clock after sizing; others scale first.
    if cfg.source == Source::Test {
        chain.insert(1, size.clone());
    } else {
        chain.push(size.clone());
    }
    let convert = make("videoconvert")?;
    let (enc, format) = encoder(cfg)?;
    let format_filter = make("capsfilter")?;
    if let Some(f) = format {
        format_filter.set_property("caps", gst::Caps::builder("video/x-raw").field("format", f).build());
    }
    // A slow encoder drops old frames here instead of building latency.
    let queue = make("queue")?;
    queue.set_property_from_str("leaky", "downstream");
    queue.set_property("max-size-buffers", 2u32);
    queue.set_property("max-size-time", 0u64);
    queue.set_property("max-size-bytes", 0u32);
    let parse = make("h264parse")?;
    parse.set_property("config-interval", -1i32);
    let h264 = make("capsfilter")?;
    h264.set_property(
        "caps",
        gst::Caps::builder("video/x-h264").field("stream-format", "byte-stream").field("alignment", "au").build(),
    );
    let sink = gst_app::AppSink::builder().sync(false).max_buffers(8).drop(false).build();
    chain.extend([convert, format_filter, queue, enc, parse, h264, sink.clone().upcast()]);
    pipeline.add_many(&chain)?;
    gst::Element::link_many(&chain).context("linking the pipeline")?;

    let times = Arc::new(CaptureTimes::default());
    let t = times.clone();
    size.static_pad("src").context("capsfilter src")?.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        if let Some(pts) = info.buffer().and_then(|b| b.pts()) {
            t.record(pts);
        }
        gst::PadProbeReturn::Ok
    });

    let weak_sink = sink.downgrade();
    hub.set_keyframe_fn(Box::new(move || {
        if let Some(pad) = weak_sink.upgrade().and_then(|s| s.static_pad("sink")) {
            pad.push_event(gst_video::UpstreamForceKeyUnitEvent::builder().all_headers(true).build());
        }
    }));
    let codec = Mutex::new(None::<String>);
    let hub2 = hub.clone();
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let buffer = sample.buffer().ok_or(gst::FlowError::Error)?;
                let caps = sample.caps().ok_or(gst::FlowError::NotNegotiated)?;
                let st = caps.structure(0).ok_or(gst::FlowError::NotNegotiated)?;
                let (width, height) = (st.get::<i32>("width").unwrap_or(0), st.get::<i32>("height").unwrap_or(0));
                let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
                let keyframe = !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
                let mut codec = codec.lock().unwrap();
                if keyframe && let Some(c) = wire::codec_string(&map) {
                    *codec = Some(c);
                }
                let Some(codec) = codec.clone() else { return Ok(gst::FlowSuccess::Ok) };
                let header = Header {
                    keyframe,
                    width: width as u32,
                    height: height as u32,
                    pts_us: buffer.pts().map_or(0, |p| p.useconds() as i64),
                    capture_us: times.lookup(buffer.pts()),
                    codec,
                };
                hub2.publish(Unit { keyframe, message: header.encode(&map) });
                Ok(gst::FlowSuccess::Ok)
            })
            .eos({
                let hub = hub.clone();
                move |_| hub.close()
            })
            .build(),
    );
    Ok(pipeline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        let p = |s: &str| s.parse::<Source>();
        assert_eq!(p("test"), Ok(Source::Test));
        assert_eq!(p("gnome"), Ok(Source::Gnome));
        assert_eq!(p("x11::1"), Ok(Source::X11(Some(":1".into()))));
        assert_eq!(p("pipewire:fd=7"), Ok(Source::Pipewire { node: None, fd: Some(7) }));
        assert_eq!(p("scanout:0"), Ok(Source::Scanout(0)));
        assert_eq!(p("scanout:15"), Ok(Source::Scanout(15)));
        for bad in ["scanout", "scanout:", "scanout:x", "scanout:-1", "webcam", "gnome:1"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vsockenc_is_addressed_through_the_properties_helix_s_element_shares() {
        let props = |a: &str, has_host| vsockenc_address(&a.parse().unwrap(), has_host);
        let own = |v: &[(&'static str, &str)]| v.iter().map(|(p, s)| (*p, s.to_string())).collect::<Vec<_>>();
        for has_host in [true, false] {
            assert_eq!(
                props("tcp:10.0.2.2:15937", has_host).unwrap(),
                own(&[("tcp-host", "10.0.2.2"), ("tcp-port", "15937")])
            );
            assert_eq!(props("unix:/run/hxfr.sock", has_host).unwrap(), own(&[("socket-path", "/run/hxfr.sock")]));
            assert_eq!(props("vsock:2:5000", has_host).unwrap(), own(&[("cid", "2"), ("port", "5000")]));
        }
        let serial = "serial:/dev/virtio-ports/com.helix.frame-export";
        assert_eq!(props(serial, true).unwrap(), own(&[("host", serial)]));
        let e = props(serial, false).unwrap_err().to_string();
        assert!(e.contains("no `host` property") && e.contains("virtio-serial"), "{e}");
    }

    #[test]
    fn the_bridge_sets_those_properties_on_the_element_and_leaves_host_unset() {
        gst::init().unwrap();
        gstvsockenc::plugin_register_static().unwrap();
        let cfg = |host: &str| PipelineConfig {
            source: Source::Test,
            width: 320,
            height: 240,
            fps: 30,
            encoder: Choice { element: "vsockenc".into(), reason: "test".into() },
            host_encoder: host.into(),
            bitrate: 1_000_000,
        };
        let (enc, format) = encoder(&cfg("tcp:10.0.2.2:15937")).unwrap();
        assert_eq!(format, Some("BGRx"));
        assert_eq!(enc.property::<Option<String>>("tcp-host").as_deref(), Some("10.0.2.2"));
        assert_eq!(enc.property::<u32>("tcp-port"), 15937);
        assert_eq!(enc.property::<Option<String>>("host"), None);
        let (enc, _) = encoder(&cfg("vsock:3:5001")).unwrap();
        assert_eq!((enc.property::<u32>("cid"), enc.property::<u32>("port")), (3, 5001));
        assert_eq!(enc.property::<Option<String>>("host"), None);
        let (enc, _) = encoder(&cfg("unix:/tmp/h.sock")).unwrap();
        assert_eq!(enc.property::<Option<String>>("socket-path").as_deref(), Some("/tmp/h.sock"));
        let (enc, _) = encoder(&cfg("serial:/dev/vport0p1")).unwrap();
        assert_eq!(enc.property::<Option<String>>("host").as_deref(), Some("serial:/dev/vport0p1"));
        assert!(encoder(&cfg("carrier-pigeon:1")).is_err());
    }
}
