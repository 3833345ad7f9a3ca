//! `hxfr bench`: the offload paths side by side, in one run, as ratios.
//!
//! The same frames and the same encoder settings go through each path:
//! the encoder called in-process (the ceiling), then through `hxfr host`
//! inline over a UNIX socket, inline over TCP loopback, and via shared memory.
//! Socket paths keep up to `--in-flight` frames outstanding, as vsockenc does;
//! the last rows drive the real vsockenc element with 1 and 2 in flight.

use std::io::Write as _;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use gst::prelude::*;
use hxfr_encode::{EncoderConfig, EncoderKind, Frame};
use hxfr_guest::{Connection, HostAddr};
use hxfr_host::{HostConfig, ListenAddr};
use hxfr_proto::{FrameRequest, Layout, Message, Packet, PixelFormat, ShmFrameRequest, ShmPlane};
use hxfr_testkit::{Content, pattern_bgrx, pattern_nv12};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Frame size, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x720")]
    size: String,
    /// bgrx or nv12.
    #[arg(long, default_value = "bgrx")]
    format: String,
    /// motion or desktop.
    #[arg(long, default_value = "motion")]
    content: String,
    /// Frames per path.
    #[arg(long, default_value_t = 300)]
    frames: u32,
    /// Frames outstanding per path (vsockenc's max-in-flight).
    #[arg(long, default_value_t = 2)]
    in_flight: usize,
    /// Host encoder: x264 (default, so runs compare), auto or gst:ELEMENT.
    #[arg(long, default_value = "x264")]
    encoder: EncoderKind,
    /// A reduced run that finishes in seconds (used by the tests).
    #[arg(long)]
    quick: bool,
}

/// What one path achieved.
struct Row {
    path: &'static str,
    frames: u32,
    secs: f64,
    /// Frame handed over → access unit back, median (None in-process).
    rtt_p50_ms: Option<f64>,
}

impl Row {
    fn fps(&self) -> f64 {
        self.frames as f64 / self.secs
    }
}

struct Input {
    format: PixelFormat,
    w: u32,
    h: u32,
    stride: usize,
    frames: Vec<Bytes>,
}

impl Input {
    fn layout(&self) -> Layout {
        Layout::inline(self.format, self.w, self.h, self.stride as u32)
    }
    fn len(&self) -> usize {
        self.frames[0].len()
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    let (w, h) = crate::parse_size(&a.size)?;
    let format = match a.format.as_str() {
        "bgrx" => PixelFormat::Bgrx,
        "nv12" => PixelFormat::Nv12,
        f => bail!("--format: {f:?} is not bgrx or nv12"),
    };
    let content = match a.content.as_str() {
        "motion" => Content::Motion,
        "desktop" => Content::Desktop,
        c => bail!("--content: {c:?} is not motion or desktop"),
    };
    let frames = if a.quick { a.frames.min(30) } else { a.frames };
    if frames == 0 || a.in_flight == 0 {
        bail!("--frames and --in-flight must be at least 1");
    }
    let stride = if format == PixelFormat::Nv12 { (w as usize).next_multiple_of(4) } else { w as usize * 4 };
    // 30 distinct frames, reused: drawing must not be what is measured.
    let pics = (0..30)
        .map(|i| match format {
            PixelFormat::Nv12 => Bytes::from(pattern_nv12(w, h, stride, i)),
            _ => Bytes::from(pattern_bgrx(content, w, h, stride, i)),
        })
        .collect();
    let input = Input { format, w, h, stride, frames: pics };
    let encoder = hxfr_encode::resolve(&a.encoder);
    println!(
        "hxfr bench: {w}x{h} {} {}, {frames} frames per path, {} in flight, encoder {encoder}",
        a.format, a.content, a.in_flight
    );

    let dir = tempfile::tempdir()?;
    let shm_path = dir.path().join("shm");
    let area = input.len().next_multiple_of(4096);
    let shm_file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&shm_path)?;
    shm_file.set_len((area * a.in_flight) as u64)?;
    let unix = dir.path().join("host.sock");
    let host = hxfr_host::spawn(
        HostConfig { encoder: encoder.clone(), shm_path: Some(shm_path), ..Default::default() },
        vec![ListenAddr::Unix(unix.clone()), "tcp:127.0.0.1:0".parse().map_err(anyhow::Error::msg)?],
        vec![],
    )?;
    let tcp = match &host.addrs[1] {
        ListenAddr::Tcp(t) => HostAddr::Tcp(t.ip().to_string(), t.port()),
        _ => unreachable!("second listener is TCP"),
    };

    let mut rows = Vec::new();
    progress("in-process");
    rows.push(in_process(&encoder, &input, frames)?);
    progress("inline UNIX");
    rows.push(over_socket("inline UNIX", &HostAddr::Unix(unix.clone()), &input, frames, a.in_flight, None)?);
    progress("inline TCP");
    rows.push(over_socket("inline TCP", &tcp, &input, frames, a.in_flight, None)?);
    progress("shared memory");
    // SAFETY: the file is ours, sized above, and outlives the mapping.
    let mut region = unsafe { memmap2::MmapMut::map_mut(&shm_file)? };
    rows.push(over_socket(
        "shared memory",
        &HostAddr::Unix(unix.clone()),
        &input,
        frames,
        a.in_flight,
        Some((&mut region, area)),
    )?);
    progress("vsockenc");
    rows.push(element("vsockenc, 1 in flight", &unix, &input, frames, 1)?);
    rows.push(element("vsockenc, 2 in flight", &unix, &input, frames, 2)?);
    eprintln!();
    host.stop();

    let base = rows[0].fps();
    println!();
    println!("| path | frames | fps | vs in-process | round trip p50 |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        let rtt = r.rtt_p50_ms.map_or("-".to_string(), |v| format!("{v:.2} ms"));
        println!("| {} | {} | {:.1} | {:.2}× | {rtt} |", r.path, r.frames, r.fps(), r.fps() / base);
    }
    Ok(())
}

fn progress(what: &str) {
    eprint!("\r  running: {what:<20}");
    let _ = std::io::stderr().flush();
}

fn in_process(kind: &EncoderKind, input: &Input, frames: u32) -> Result<Row> {
    let mut cfg = EncoderConfig::new(input.w, input.h);
    cfg.preset = HostConfig::default().x264_preset;
    let mut enc = hxfr_encode::open(kind, &cfg)?;
    let layout = input.layout();
    let start = Instant::now();
    for i in 0..frames {
        let f = Frame::new(&input.frames[i as usize % input.frames.len()], &layout, i == 0)?;
        enc.encode(&f)?;
    }
    Ok(Row { path: "in-process", frames, secs: start.elapsed().as_secs_f64(), rtt_p50_ms: None })
}

/// Streams `frames` through the host with at most `in_flight` outstanding.
/// With `shm`, each frame is copied into a free area of the region (the one
/// copy of that path) and named by offset; its answer frees the area.
fn over_socket(
    path: &'static str,
    addr: &HostAddr,
    input: &Input,
    frames: u32,
    in_flight: usize,
    mut shm: Option<(&mut memmap2::MmapMut, usize)>,
) -> Result<Row> {
    let conn = Connection::connect(addr, Duration::from_secs(5))?;
    let (mut tx, mut rx) = conn.split();
    // Tokens: one per frame that may be outstanding; answers return them.
    let (tok_tx, tok_rx) = mpsc::sync_channel::<()>(in_flight);
    for _ in 0..in_flight {
        tok_tx.send(()).expect("room for every token");
    }
    let (sent_tx, sent_rx) = mpsc::channel::<Instant>();
    let answers = std::thread::spawn(move || -> Result<Vec<f64>> {
        let mut rtt = Vec::with_capacity(frames as usize);
        for n in 0..frames {
            match rx.recv().context("reading an answer")?.message {
                Message::FrameResponse(_) => {}
                other => bail!("frame {n}: host answered {}", other.name()),
            }
            rtt.push(sent_rx.recv()?.elapsed().as_secs_f64() * 1e3);
            let _ = tok_tx.send(());
        }
        Ok(rtt)
    });
    let layout = input.layout();
    let start = Instant::now();
    for i in 0..frames {
        tok_rx.recv().context("answer thread ended early")?;
        let pixels = &input.frames[i as usize % input.frames.len()];
        let msg = match &mut shm {
            None => Message::FrameRequest(FrameRequest {
                resource_id: 0,
                width: input.w,
                height: input.h,
                format: input.format.fourcc(),
                stride: input.stride as u32,
                pts: i as i64,
                duration: 33_333_333,
                force_keyframe: i == 0,
                pixels: Some(pixels.clone()),
            }),
            Some((region, area)) => {
                let off = (i as usize % in_flight) * *area;
                region[off..off + pixels.len()].copy_from_slice(pixels);
                Message::ShmFrameRequest(ShmFrameRequest {
                    width: input.w,
                    height: input.h,
                    format: input.format.fourcc(),
                    num_planes: input.format.num_planes() as u32,
                    planes: [
                        ShmPlane { offset: (off as u64) + layout.offsets[0], stride: layout.strides[0] as u32 },
                        ShmPlane { offset: (off as u64) + layout.offsets[1], stride: layout.strides[1] as u32 },
                    ],
                    pts: i as i64,
                    duration: 33_333_333,
                    force_keyframe: i == 0,
                })
            }
        };
        sent_tx.send(Instant::now())?;
        tx.send(&Packet::new(1, msg))?;
    }
    let rtt = answers.join().map_err(|_| anyhow::anyhow!("answer thread panicked"))??;
    Ok(Row { path, frames, secs: start.elapsed().as_secs_f64(), rtt_p50_ms: Some(median(rtt)) })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The real GStreamer element: `appsrc ! vsockenc ! appsink`, as fast as it
/// goes, with `in_flight` frames outstanding. Round trip from its stats.
fn element(path: &'static str, sock: &Path, input: &Input, frames: u32, in_flight: usize) -> Result<Row> {
    gst::init()?;
    gstvsockenc::plugin_register_static()?;
    let fmt = if input.format == PixelFormat::Nv12 { "NV12" } else { "BGRx" };
    let desc = format!(
        "appsrc name=src format=time caps=video/x-raw,format={fmt},width={},height={},framerate=30/1 ! \
         vsockenc name=v socket-path={} max-in-flight={in_flight} ! fakesink sync=false",
        input.w,
        input.h,
        sock.display()
    );
    let pipeline =
        gst::parse::launch(&desc)?.downcast::<gst::Pipeline>().map_err(|_| anyhow::anyhow!("not a pipeline"))?;
    let src = pipeline
        .by_name("src")
        .context("appsrc")?
        .downcast::<gst_app::AppSrc>()
        .map_err(|_| anyhow::anyhow!("appsrc"))?;
    src.set_property("block", true);
    src.set_property("max-buffers", 2u64);
    pipeline.set_state(gst::State::Playing)?;
    let start = Instant::now();
    for i in 0..frames {
        let mut b = gst::Buffer::from_slice(input.frames[i as usize % input.frames.len()].clone());
        b.get_mut().expect("new buffer").set_pts(gst::ClockTime::from_nseconds(i as u64 * 33_333_333));
        src.push_buffer(b)?;
    }
    src.end_of_stream()?;
    let bus = pipeline.bus().context("bus")?;
    let msg =
        bus.timed_pop_filtered(gst::ClockTime::from_seconds(120), &[gst::MessageType::Eos, gst::MessageType::Error]);
    let secs = start.elapsed().as_secs_f64();
    let stats = pipeline.by_name("v").context("vsockenc")?.property::<gst::Structure>("stats");
    pipeline.set_state(gst::State::Null)?;
    match msg.as_ref().map(|m| m.view()) {
        Some(gst::MessageView::Eos(_)) => {}
        Some(gst::MessageView::Error(e)) => bail!("{path}: {}", e.error()),
        _ => bail!("{path}: timed out"),
    }
    let answered = stats.get::<u64>("frames-answered")?;
    if answered != frames as u64 {
        bail!("{path}: {answered} of {frames} frames answered");
    }
    Ok(Row { path, frames, secs, rtt_p50_ms: Some(stats.get::<f64>("rtt-p50-ms")?) })
}
