//! `hxfr bench`: every way a frame can reach an encoder, side by side, in one
//! run, as ratios of the encoder called in-process.
//!
//! Paths: the encoder in-process (the ceiling); `hxfr host` inline over a
//! UNIX socket and over TCP loopback, the way vsockenc sends frames; shared
//! memory (the ivshmem path); inline TCP through a `socat` hop into the host's
//! UNIX socket (Helix's Mac set-up); and a guest-local GStreamer x264enc
//! pipeline (the fallback without a host, which pays videoconvert). Every
//! path gets the same frames and the same encoder settings (x264 ultrafast,
//! zerolatency, 4 Mbit/s).

mod plot;
pub mod sys;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use gst::prelude::*;
use hxfr_encode::{EncoderConfig, EncoderKind, Frame};
use hxfr_guest::{Connection, HostAddr};
use hxfr_host::{HostConfig, HostHandle, ListenAddr};
use hxfr_proto::{FrameRequest, Layout, Message, Packet, PixelFormat, ShmFrameRequest, ShmPlane};
use hxfr_testkit::{Content, pattern_bgrx, pattern_nv12};
use serde::{Deserialize, Serialize};
use sys::{CpuMark, CpuSplit};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A reduced matrix that finishes in well under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Sizes to run (default: 640x360 to 3840x2160; --quick: 640x360, 1280x720).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<String>,
    /// Frames outstanding on the socket paths (vsockenc's max-in-flight).
    #[arg(long, default_value_t = 2)]
    pub in_flight: usize,
    /// Seconds of work per throughput cell (frames are counted to fit).
    #[arg(long, default_value_t = 1.5)]
    pub seconds: f64,
    /// Write every figure as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw fps and p50 latency by size and path (SVG) here.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Print (and plot) a run saved with --json instead of measuring.
    #[arg(long, value_name = "FILE")]
    pub from_json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathKind {
    InProcess,
    InlineUnix,
    InlineTcp,
    SharedMemory,
    SocatHop,
    GuestLocal,
    /// The real vsockenc element (`appsrc ! vsockenc ! fakesink`), inline over UNIX.
    Vsockenc,
}

impl PathKind {
    pub fn label(self) -> &'static str {
        match self {
            PathKind::InProcess => "in-process",
            PathKind::InlineUnix => "inline UNIX",
            PathKind::InlineTcp => "inline TCP",
            PathKind::SharedMemory => "shared memory",
            PathKind::SocatHop => "socat hop",
            PathKind::GuestLocal => "guest x264enc",
            PathKind::Vsockenc => "vsockenc element",
        }
    }

    /// Bytes of the frame copied per frame by construction of the path:
    /// a socket costs one copy in and one out of the kernel; shared memory
    /// one memcpy; the socat hop crosses two sockets.
    fn copies(self) -> u64 {
        match self {
            PathKind::InProcess | PathKind::GuestLocal => 0,
            PathKind::InlineUnix | PathKind::InlineTcp | PathKind::Vsockenc => 2,
            PathKind::SharedMemory => 1,
            PathKind::SocatHop => 4,
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub content: String,
    pub path: PathKind,
    /// Throughput with frames in flight.
    pub fps: f64,
    /// fps divided by in-process fps for the same input.
    pub ratio: f64,
    /// Frame handed over → access unit back, at a paced 30 fps.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub host_cpu_ms_per_frame: f64,
    pub guest_cpu_ms_per_frame: f64,
    pub bytes_copied_per_frame: u64,
    pub peak_rss_mb: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Floor {
    pub width: u32,
    pub height: u32,
    pub frame_bytes: usize,
    /// Bare UNIX-socket send of the BGRx frame.
    pub socket_ms: f64,
    /// Bare memcpy of the BGRx frame.
    pub memcpy_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleRow {
    pub sessions: usize,
    pub fps_per_session_min: f64,
    pub aggregate_fps: f64,
    /// Aggregate fps over the single-session in-process capacity at 1280x720.
    pub vs_in_process_capacity: f64,
    pub sustained: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub what: String,
    pub met: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub machine: String,
    pub in_flight: usize,
    pub cells: Vec<Cell>,
    pub floors: Vec<Floor>,
    pub scale: Vec<ScaleRow>,
    pub targets: Vec<Target>,
    pub skipped: Vec<String>,
}

struct Input {
    format: PixelFormat,
    w: u32,
    h: u32,
    stride: usize,
    frames: Vec<Bytes>,
}

impl Input {
    fn new(format: PixelFormat, content: Content, w: u32, h: u32) -> Input {
        let stride = if format == PixelFormat::Nv12 { (w as usize).next_multiple_of(4) } else { w as usize * 4 };
        // A handful of distinct frames, reused: drawing must not be what is measured.
        let frames = (0..10)
            .map(|i| match format {
                PixelFormat::Nv12 => Bytes::from(pattern_nv12(w, h, stride, i * 3)),
                _ => Bytes::from(pattern_bgrx(content, w, h, stride, i * 3)),
            })
            .collect();
        Input { format, w, h, stride, frames }
    }
    fn layout(&self) -> Layout {
        Layout::inline(self.format, self.w, self.h, self.stride as u32)
    }
    fn bytes(&self) -> usize {
        self.frames[0].len()
    }
    fn frame(&self, i: u32) -> &Bytes {
        &self.frames[i as usize % self.frames.len()]
    }
}

/// What one run of a path measured.
struct Run {
    frames: u32,
    secs: f64,
    rtt_ms: Vec<f64>,
    cpu: CpuSplit,
}

/// The host and its addresses, shared by every socket path.
struct Env {
    _host: HostHandle,
    _dir: tempfile::TempDir,
    unix: PathBuf,
    tcp: HostAddr,
    shm: memmap2::MmapMut,
    area: usize,
    socat: Option<(Child, HostAddr)>,
}

const MAX_BYTES: usize = 3840 * 2160 * 4;
const PACE: Duration = Duration::from_nanos(33_333_333);

impl Env {
    fn start(in_flight: usize) -> Result<Env> {
        let base = if Path::new("/dev/shm").is_dir() { Path::new("/dev/shm") } else { Path::new("/tmp") };
        let dir = tempfile::tempdir_in(base)?;
        let shm_path = dir.path().join("region");
        let area = MAX_BYTES.next_multiple_of(4096);
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&shm_path)?;
        f.set_len((area * in_flight) as u64)?;
        // SAFETY: our own file, sized above, mapped while it exists.
        let shm = unsafe { memmap2::MmapMut::map_mut(&f)? };
        let unix = dir.path().join("host.sock");
        let host = hxfr_host::spawn(
            HostConfig {
                encoder: EncoderKind::X264,
                shm_path: Some(shm_path),
                limits: hxfr_host::Limits { max_in_flight: in_flight.max(4), ..Default::default() },
                ..Default::default()
            },
            vec![ListenAddr::Unix(unix.clone()), "tcp:127.0.0.1:0".parse().map_err(anyhow::Error::msg)?],
            vec![],
        )?;
        let tcp = match &host.addrs[1] {
            ListenAddr::Tcp(a) => HostAddr::Tcp(a.ip().to_string(), a.port()),
            _ => unreachable!("second listener is TCP"),
        };
        let socat = start_socat(&unix);
        Ok(Env { _host: host, _dir: dir, unix, tcp, shm, area, socat })
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some((child, _)) = &mut self.socat {
            let _ = child.kill(); // the socat we started, by its handle
            let _ = child.wait();
        }
    }
}

/// `socat TCP-LISTEN ↔ UNIX-CONNECT` in front of the host, when socat is installed.
fn start_socat(unix: &Path) -> Option<(Child, HostAddr)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let child = Command::new("socat")
        // socat moves 8 KiB per read/write by default; give it frame-sized gulps.
        .arg("-b262144")
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("UNIX-CONNECT:{}", unix.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((child, HostAddr::Tcp("127.0.0.1".into(), port)))
}

fn in_process(input: &Input, frames: u32, pace: Option<Duration>) -> Result<Run> {
    let mut enc = hxfr_encode::open(&EncoderKind::X264, &EncoderConfig::new(input.w, input.h))?;
    let layout = input.layout();
    let mark = CpuMark::now();
    let start = Instant::now();
    let mut rtt = Vec::new();
    for i in 0..frames {
        if let Some(p) = pace {
            sleep_until(start + p * i);
        }
        let t = Instant::now();
        enc.encode(&Frame::new(input.frame(i), &layout, i == 0)?)?;
        rtt.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let secs = start.elapsed().as_secs_f64();
    // The encoder is the host's work wherever it runs.
    let cpu = mark.since();
    Ok(Run { frames, secs, rtt_ms: rtt, cpu: CpuSplit { host_ns: cpu.guest_ns + cpu.host_ns, guest_ns: 0 } })
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// Streams frames through the host as vsockenc does: a sender and an answer
/// reader, at most `in_flight` outstanding, optionally paced.
fn through_host(
    addr: &HostAddr,
    input: &Input,
    frames: u32,
    in_flight: usize,
    pace: Option<Duration>,
    mut shm: Option<(&mut memmap2::MmapMut, usize)>,
) -> Result<Run> {
    let conn = Connection::connect(addr, Duration::from_secs(5))?;
    let (mut tx, mut rx) = conn.split();
    let (tok_tx, tok_rx) = mpsc::sync_channel::<()>(in_flight);
    for _ in 0..in_flight {
        tok_tx.send(()).expect("room for every token");
    }
    let (sent_tx, sent_rx) = mpsc::channel::<Instant>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
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
        let _ = done_tx.send(());
        // Keep the connection (and the host's session threads) alive until
        // the CPU has been read.
        std::thread::sleep(Duration::from_millis(50));
        Ok(rtt)
    });
    let layout = input.layout();
    let mark = CpuMark::now();
    let start = Instant::now();
    for i in 0..frames {
        tok_rx.recv().context("answer thread ended early")?;
        if let Some(p) = pace {
            sleep_until(start + p * i);
        }
        let pixels = input.frame(i);
        let msg = match &mut shm {
            None => Message::FrameRequest(FrameRequest {
                resource_id: 0,
                width: input.w,
                height: input.h,
                format: input.format.fourcc(),
                stride: input.stride as u32,
                pts: i as i64,
                duration: PACE.as_nanos() as i64,
                force_keyframe: i == 0,
                pixels: Some(pixels.clone()),
            }),
            Some((region, area)) => {
                let off = (i as usize % in_flight) * *area;
                region[off..off + pixels.len()].copy_from_slice(pixels); // the one copy
                Message::ShmFrameRequest(ShmFrameRequest {
                    width: input.w,
                    height: input.h,
                    format: input.format.fourcc(),
                    num_planes: input.format.num_planes() as u32,
                    planes: [
                        ShmPlane { offset: off as u64 + layout.offsets[0], stride: layout.strides[0] as u32 },
                        ShmPlane { offset: off as u64 + layout.offsets[1], stride: layout.strides[1] as u32 },
                    ],
                    pts: i as i64,
                    duration: PACE.as_nanos() as i64,
                    force_keyframe: i == 0,
                })
            }
        };
        sent_tx.send(Instant::now())?;
        tx.send(&Packet::new(1, msg))?;
    }
    let _ = done_rx.recv();
    let secs = start.elapsed().as_secs_f64();
    let cpu = mark.since();
    let rtt = answers.join().map_err(|_| anyhow::anyhow!("answer thread panicked"))??;
    Ok(Run { frames, secs, rtt_ms: rtt, cpu })
}

/// `appsrc ! videoconvert ! x264enc ! appsink` in this process: what a guest
/// without a host does.
fn guest_local(input: &Input, frames: u32, pace: Option<Duration>) -> Result<Run> {
    gst::init()?;
    let fmt = if input.format == PixelFormat::Nv12 { "NV12" } else { "BGRx" };
    let desc = format!(
        "appsrc name=src format=time is-live=false block=true max-buffers=2 \
         caps=video/x-raw,format={fmt},width={},height={},framerate=30/1 ! videoconvert ! \
         x264enc tune=zerolatency speed-preset=ultrafast bitrate=4000 key-int-max=0 ! appsink name=sink sync=false",
        input.w, input.h
    );
    let (pipeline, src) = launch(&desc)?;
    let sink = pipeline
        .by_name("sink")
        .context("appsink")?
        .downcast::<gst_app::AppSink>()
        .map_err(|_| anyhow::anyhow!("sink is not an appsink"))?;
    let pushed: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let rtt: Arc<Mutex<Vec<f64>>> = Arc::default();
    let (p2, r2) = (pushed.clone(), rtt.clone());
    let mut out_n = 0usize;
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let _ = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                // zerolatency x264enc: one access unit per frame, in order.
                if let Some(t) = p2.lock().unwrap().get(out_n) {
                    r2.lock().unwrap().push(t.elapsed().as_secs_f64() * 1e3);
                }
                out_n += 1;
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    let (secs, cpu) = feed(&pipeline, &src, input, frames, pace, || pushed.lock().unwrap().push(Instant::now()))?;
    pipeline.set_state(gst::State::Null)?;
    let rtt = std::mem::take(&mut *rtt.lock().unwrap());
    Ok(Run { frames, secs, rtt_ms: rtt, cpu: CpuSplit { host_ns: 0, guest_ns: cpu.guest_ns + cpu.host_ns } })
}

/// Parses a pipeline with an `appsrc name=src`.
fn launch(desc: &str) -> Result<(gst::Pipeline, gst_app::AppSrc)> {
    let pipeline =
        gst::parse::launch(desc)?.downcast::<gst::Pipeline>().map_err(|_| anyhow::anyhow!("not a pipeline"))?;
    let src = pipeline
        .by_name("src")
        .context("appsrc")?
        .downcast::<gst_app::AppSrc>()
        .map_err(|_| anyhow::anyhow!("src is not an appsrc"))?;
    Ok((pipeline, src))
}

/// Plays `pipeline`, pushes `frames` into `src` (paced, or as fast as it takes
/// them), ends the stream and waits for it to drain. Returns seconds and CPU.
/// On failure the pipeline is stopped; on success the caller stops it (after
/// reading any element stats).
fn feed(
    pipeline: &gst::Pipeline,
    src: &gst_app::AppSrc,
    input: &Input,
    frames: u32,
    pace: Option<Duration>,
    mut on_push: impl FnMut(),
) -> Result<(f64, CpuSplit)> {
    pipeline.set_state(gst::State::Playing)?;
    let mark = CpuMark::now();
    let start = Instant::now();
    let pushed = (|| -> Result<()> {
        for i in 0..frames {
            if let Some(p) = pace {
                sleep_until(start + p * i);
            }
            let mut b = gst::Buffer::from_slice(input.frame(i).clone());
            b.get_mut().expect("new buffer").set_pts(gst::ClockTime::from_nseconds(i as u64 * PACE.as_nanos() as u64));
            on_push();
            src.push_buffer(b)?;
        }
        src.end_of_stream()?;
        Ok(())
    })();
    let bus = pipeline.bus().context("bus")?;
    let msg =
        bus.timed_pop_filtered(gst::ClockTime::from_seconds(120), &[gst::MessageType::Eos, gst::MessageType::Error]);
    let (secs, cpu) = (start.elapsed().as_secs_f64(), mark.since());
    let failure = match (pushed, msg.as_ref().map(|m| m.view())) {
        (Ok(()), Some(gst::MessageView::Eos(_))) => None,
        (_, Some(gst::MessageView::Error(e))) => Some(format!("{} ({:?})", e.error(), e.debug())),
        (Err(e), _) => Some(e.to_string()),
        (Ok(()), _) => Some("no end of stream within 120 s".into()),
    };
    if let Some(why) = failure {
        let _ = pipeline.set_state(gst::State::Null);
        bail!("pipeline failed: {why}");
    }
    Ok((secs, cpu))
}

/// The real element: `appsrc ! vsockenc ! fakesink` with `in_flight` frames
/// outstanding. Round trips come from the element's own stats.
fn element(sock: &Path, input: &Input, frames: u32, in_flight: usize, pace: Option<Duration>) -> Result<Run> {
    gst::init()?;
    gstvsockenc::plugin_register_static()?;
    let fmt = if input.format == PixelFormat::Nv12 { "NV12" } else { "BGRx" };
    let desc = format!(
        "appsrc name=src format=time block=true max-buffers=2 caps=video/x-raw,format={fmt},width={},height={},framerate=30/1 ! \
         vsockenc name=v socket-path={} max-in-flight={in_flight} ! fakesink sync=false",
        input.w,
        input.h,
        sock.display()
    );
    let (pipeline, src) = launch(&desc)?;
    let (secs, cpu) = feed(&pipeline, &src, input, frames, pace, || {})?;
    let stats = pipeline.by_name("v").context("vsockenc")?.property::<gst::Structure>("stats");
    pipeline.set_state(gst::State::Null)?;
    let answered = stats.get::<u64>("frames-answered")?;
    if answered != frames as u64 {
        bail!("vsockenc: {answered} of {frames} frames answered");
    }
    let (p50, p99) = (stats.get::<f64>("rtt-p50-ms")?, stats.get::<f64>("rtt-p99-ms")?);
    Ok(Run { frames, secs, rtt_ms: vec![p50, p50, p99], cpu })
}

fn run_path(
    env: &mut Env,
    path: PathKind,
    input: &Input,
    frames: u32,
    in_flight: usize,
    pace: Option<Duration>,
) -> Result<Run> {
    match path {
        PathKind::InProcess => in_process(input, frames, pace),
        PathKind::InlineUnix => through_host(&HostAddr::Unix(env.unix.clone()), input, frames, in_flight, pace, None),
        PathKind::InlineTcp => through_host(&env.tcp.clone(), input, frames, in_flight, pace, None),
        PathKind::SharedMemory => {
            let area = env.area;
            let addr = HostAddr::Unix(env.unix.clone());
            through_host(&addr, input, frames, in_flight, pace, Some((&mut env.shm, area)))
        }
        PathKind::SocatHop => {
            let addr = env.socat.as_ref().map(|(_, a)| a.clone()).context("socat is not running")?;
            through_host(&addr, input, frames, in_flight, pace, None)
        }
        PathKind::GuestLocal => guest_local(input, frames, pace),
        PathKind::Vsockenc => element(&env.unix.clone(), input, frames, in_flight, pace),
    }
}

fn sizes(a: &BenchArgs) -> Result<Vec<(u32, u32)>> {
    let names: Vec<String> = if !a.sizes.is_empty() {
        a.sizes.clone()
    } else if a.quick {
        vec!["640x360".into(), "1280x720".into()]
    } else {
        ["640x360", "1280x720", "1920x1080", "2560x1440", "3840x2160"].map(String::from).to_vec()
    };
    names
        .iter()
        .map(|s| {
            s.split_once('x')
                .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                .with_context(|| format!("size {s:?}: expected WIDTHxHEIGHT"))
        })
        .collect()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next()?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    format!("{cpu}, {cores} cores, {mem:.0} GiB")
}

/// Runs the matrix and prints it; returns the report.
pub fn run(a: BenchArgs) -> Result<Report> {
    if let Some(f) = &a.from_json {
        let report: Report =
            serde_json::from_slice(&std::fs::read(f).with_context(|| format!("reading {}", f.display()))?)?;
        print_markdown(&report, &mut std::io::stdout())?;
        if let Some(p) = &a.plot {
            plot::draw(&report, p)?;
        }
        return Ok(report);
    }
    if a.in_flight == 0 || a.in_flight > 4 {
        bail!("--in-flight must be 1..4");
    }
    let sizes = sizes(&a)?;
    let formats: &[PixelFormat] = if a.quick { &[PixelFormat::Bgrx] } else { &[PixelFormat::Bgrx, PixelFormat::Nv12] };
    let contents: &[Content] = if a.quick { &[Content::Motion] } else { &[Content::Desktop, Content::Motion] };
    let mut env = Env::start(a.in_flight)?;
    let mut skipped = Vec::new();
    let mut paths = vec![
        PathKind::InProcess,
        PathKind::InlineUnix,
        PathKind::InlineTcp,
        PathKind::SharedMemory,
        PathKind::SocatHop,
        PathKind::GuestLocal,
        PathKind::Vsockenc,
    ];
    if env.socat.is_none() {
        paths.retain(|p| *p != PathKind::SocatHop);
        skipped.push("socat hop: socat is not installed (apt-get install socat)".to_string());
    }
    let machine = machine();
    println!("hxfr bench on {machine}: x264 ultrafast/zerolatency 4 Mbit/s, {} in flight", a.in_flight);

    let total = (sizes.len() * formats.len() * contents.len() * paths.len()) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut cells = Vec::new();
    let mut floors = Vec::new();
    for &(w, h) in &sizes {
        let bytes = (w * h * 4) as usize;
        floors.push(Floor {
            width: w,
            height: h,
            frame_bytes: bytes,
            socket_ms: sys::socket_floor_ms(bytes, 20),
            memcpy_ms: sys::memcpy_floor_ms(bytes, 20),
        });
        for &format in formats {
            for &content in contents {
                if format == PixelFormat::Nv12 && content == Content::Desktop {
                    // NV12 inputs come from one synthetic pattern; the desktop
                    // content is drawn in RGB only.
                    bar.inc(paths.len() as u64);
                    continue;
                }
                let input = Input::new(format, content, w, h);
                let mut base_fps = 0.0;
                for &path in &paths {
                    bar.set_message(format!("{w}x{h} {format:?} {content:?} {}", path.label()));
                    // About `seconds` of work at the encoder's own rate (in-process runs first).
                    let est_fps =
                        if base_fps > 0.0 { base_fps } else { (300.0 * 921_600.0 / (w * h) as f64).clamp(15.0, 600.0) };
                    let frames = if a.quick { 20 } else { ((a.seconds * est_fps) as u32).clamp(30, 600) };
                    sys::reset_peak_rss();
                    let t = run_path(&mut env, path, &input, frames, a.in_flight, None)
                        .with_context(|| format!("{} at {w}x{h}", path.label()))?;
                    let peak = sys::peak_rss();
                    let paced_frames = if a.quick { 10 } else { 45 };
                    let l = run_path(&mut env, path, &input, paced_frames, a.in_flight, Some(PACE))?;
                    let fps = t.frames as f64 / t.secs;
                    if path == PathKind::InProcess {
                        base_fps = fps;
                    }
                    cells.push(Cell {
                        width: w,
                        height: h,
                        format: if format == PixelFormat::Nv12 { "NV12" } else { "BGRx" }.into(),
                        content: if content == Content::Desktop { "desktop" } else { "motion" }.into(),
                        path,
                        fps,
                        ratio: if base_fps > 0.0 { fps / base_fps } else { 0.0 },
                        p50_ms: sys::percentile(l.rtt_ms.clone(), 0.5),
                        p99_ms: sys::percentile(l.rtt_ms, 0.99),
                        host_cpu_ms_per_frame: t.cpu.host_ns as f64 / 1e6 / t.frames as f64,
                        guest_cpu_ms_per_frame: t.cpu.guest_ns as f64 / 1e6 / t.frames as f64,
                        bytes_copied_per_frame: path.copies() * input.bytes() as u64,
                        peak_rss_mb: peak as f64 / 1e6,
                    });
                    bar.inc(1);
                }
            }
        }
    }
    bar.finish_and_clear();
    let scale = scale(&env, if a.quick { &[1, 2] } else { &[1, 2, 4, 8] }, &cells, a.quick)?;
    let targets = targets(&cells, &floors);
    let report = Report { machine, in_flight: a.in_flight, cells, floors, scale, targets, skipped };
    print_markdown(&report, &mut std::io::stdout())?;
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        plot::draw(&report, p)?;
    }
    Ok(report)
}

/// N guests at once, each 1280x720 BGRx paced at 30 fps on its own
/// connection, until one of them cannot keep up.
fn scale(env: &Env, counts: &[usize], cells: &[Cell], quick: bool) -> Result<Vec<ScaleRow>> {
    let capacity = cells
        .iter()
        .find(|c| c.path == PathKind::InProcess && c.width == 1280 && c.format == "BGRx")
        .map_or(0.0, |c| c.fps);
    let input = Arc::new(Input::new(PixelFormat::Bgrx, Content::Desktop, 1280, 720));
    let frames = if quick { 30 } else { 90 };
    let mut rows = Vec::new();
    for &n in counts {
        let workers: Vec<_> = (0..n)
            .map(|_| {
                let input = input.clone();
                let addr = HostAddr::Unix(env.unix.clone());
                std::thread::spawn(move || through_host(&addr, &input, frames, 2, Some(PACE), None))
            })
            .collect();
        let mut fps = Vec::new();
        for w in workers {
            let r = w.join().map_err(|_| anyhow::anyhow!("scale worker panicked"))??;
            fps.push(r.frames as f64 / r.secs);
        }
        let min = fps.iter().copied().fold(f64::MAX, f64::min);
        let sustained = min >= 28.5;
        rows.push(ScaleRow {
            sessions: n,
            fps_per_session_min: min,
            aggregate_fps: fps.iter().sum(),
            vs_in_process_capacity: if capacity > 0.0 { fps.iter().sum::<f64>() / capacity } else { 0.0 },
            sustained,
        });
        if !sustained {
            break;
        }
    }
    Ok(rows)
}

fn cell<'a>(cells: &'a [Cell], w: u32, format: &str, content: &str, path: PathKind) -> Option<&'a Cell> {
    cells.iter().find(|c| c.width == w && c.format == format && c.content == content && c.path == path)
}

/// The targets of issue 6, judged on this run.
fn targets(cells: &[Cell], floors: &[Floor]) -> Vec<Target> {
    let mut t = Vec::new();
    for (w, name) in [(1280, "1280x720"), (1920, "1920x1080")] {
        for content in ["desktop", "motion"] {
            let (unix_min, shm_min) = if w == 1280 { (0.90, 0.97) } else { (0.85, 0.97) };
            for (path, min) in [(PathKind::InlineUnix, unix_min), (PathKind::SharedMemory, shm_min)] {
                if let Some(c) = cell(cells, w, "BGRx", content, path) {
                    t.push(Target {
                        what: format!("{} ≥ {min:.2}× in-process fps, {name} BGRx {content}", path.label()),
                        met: c.ratio >= min,
                        detail: format!("{:.2}×", c.ratio),
                    });
                }
                let (Some(c), Some(base), Some(f)) = (
                    cell(cells, w, "BGRx", content, path),
                    cell(cells, w, "BGRx", content, PathKind::InProcess),
                    floors.iter().find(|f| f.width == w),
                ) else {
                    continue;
                };
                let floor = if path == PathKind::SharedMemory { f.memcpy_ms } else { f.socket_ms };
                let added = c.p50_ms - base.p50_ms;
                t.push(Target {
                    what: format!("{} added p50 ≤ bare move + 0.5 ms, {name} BGRx {content}", path.label()),
                    met: added <= floor + 0.5,
                    detail: format!("added {added:.2} ms, floor {floor:.2} ms"),
                });
            }
        }
        if w == 1920 {
            for content in ["desktop", "motion"] {
                if let (Some(best), Some(local)) = (
                    cell(cells, w, "BGRx", content, PathKind::SharedMemory),
                    cell(cells, w, "BGRx", content, PathKind::GuestLocal),
                ) {
                    let x = best.fps / local.fps;
                    t.push(Target {
                        what: format!("host offload ≥ 1.5× guest x264enc fps, 1920x1080 BGRx {content}"),
                        met: x >= 1.5,
                        detail: format!("{x:.2}× ({:.0} vs {:.0} fps)", best.fps, local.fps),
                    });
                }
            }
        }
    }
    t
}

pub fn print_markdown(r: &Report, out: &mut dyn std::io::Write) -> Result<()> {
    writeln!(out, "\n### Paths ({}, {} frames in flight)\n", r.machine, r.in_flight)?;
    writeln!(
        out,
        "| size | input | content | path | fps | × in-process | p50 ms @30fps | p99 ms | host CPU ms/frame | guest CPU ms/frame | copied MB/frame | peak RSS MB |"
    )?;
    writeln!(out, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for c in &r.cells {
        writeln!(
            out,
            "| {}x{} | {} | {} | {} | {:.1} | {:.2}× | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} |",
            c.width,
            c.height,
            c.format,
            c.content,
            c.path.label(),
            c.fps,
            c.ratio,
            c.p50_ms,
            c.p99_ms,
            c.host_cpu_ms_per_frame,
            c.guest_cpu_ms_per_frame,
            c.bytes_copied_per_frame as f64 / 1e6,
            c.peak_rss_mb
        )?;
    }
    writeln!(out, "\n### Physical floor (BGRx frame)\n")?;
    writeln!(out, "| size | bytes | UNIX socket send ms | memcpy ms |")?;
    writeln!(out, "|---|---:|---:|---:|")?;
    for f in &r.floors {
        writeln!(out, "| {}x{} | {} | {:.2} | {:.2} |", f.width, f.height, f.frame_bytes, f.socket_ms, f.memcpy_ms)?;
    }
    writeln!(out, "\n### Sessions at once (1280x720 BGRx, each paced at 30 fps)\n")?;
    writeln!(out, "| sessions | slowest session fps | aggregate fps | × in-process capacity | sustained |")?;
    writeln!(out, "|---:|---:|---:|---:|---|")?;
    for s in &r.scale {
        writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.2}× | {} |",
            s.sessions,
            s.fps_per_session_min,
            s.aggregate_fps,
            s.vs_in_process_capacity,
            if s.sustained { "yes" } else { "no" }
        )?;
    }
    if !r.targets.is_empty() {
        writeln!(out, "\n### Targets\n")?;
        for t in &r.targets {
            writeln!(out, "- {} {}: {}", if t.met { "MET" } else { "NOT MET" }, t.what, t.detail)?;
        }
    }
    for s in &r.skipped {
        writeln!(out, "\nskipped: {s}")?;
    }
    Ok(())
}
