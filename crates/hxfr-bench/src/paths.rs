//! The paths a frame can take to an encoder, each run the same way:
//! frames in, access units out, time and CPU measured.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use gst::prelude::*;
use hxfr_encode::{EncoderConfig, EncoderKind, Frame};
use hxfr_guest::HostAddr;
use hxfr_guest::client::{self, Answer, Client, Event, Handler};
use hxfr_host::{HostConfig, HostHandle, ListenAddr};
use hxfr_proto::{FrameRequest, Layout, Message, Packet, PixelFormat, ShmFrameRequest};
use hxfr_testkit::{Content, pattern_bgrx, pattern_nv12};

use crate::report::PathKind;
use crate::sys::{CpuMark, CpuSplit};

pub(crate) struct Input {
    format: PixelFormat,
    content: Content,
    w: u32,
    h: u32,
    stride: usize,
    frames: Vec<Bytes>,
}

impl Input {
    pub fn new(format: PixelFormat, content: Content, w: u32, h: u32) -> Input {
        let stride = if format == PixelFormat::Nv12 { (w as usize).next_multiple_of(4) } else { w as usize * 4 };
        // A handful of distinct frames, reused: drawing must not be what is measured.
        let frames = (0..10)
            .map(|i| match format {
                PixelFormat::Nv12 => Bytes::from(pattern_nv12(w, h, stride, i * 3)),
                _ => Bytes::from(pattern_bgrx(content, w, h, stride, i * 3)),
            })
            .collect();
        Input { format, content, w, h, stride, frames }
    }
    pub fn format(&self) -> PixelFormat {
        self.format
    }
    pub fn content(&self) -> Content {
        self.content
    }
    fn layout(&self) -> Layout {
        Layout::inline(self.format, self.w, self.h, self.stride as u32)
    }
    pub fn bytes(&self) -> usize {
        self.frames[0].len()
    }
    fn frame(&self, i: u32) -> &Bytes {
        &self.frames[i as usize % self.frames.len()]
    }
}

/// What one run of a path measured.
#[derive(Clone)]
pub(crate) struct Run {
    pub frames: u32,
    pub secs: f64,
    /// Round trip p50 and p99.
    pub rtt_ms: [f64; 2],
    pub cpu: CpuSplit,
}

/// p50 and p99 of a run's round trips.
fn quantiles(v: &mut [f64]) -> [f64; 2] {
    [0.5, 0.99].map(|p| hxfr_metrics::percentile(v, p).unwrap_or(0.0))
}

/// The host and its addresses, shared by every socket path.
pub(crate) struct Env {
    _host: HostHandle,
    _dir: tempfile::TempDir,
    pub unix: PathBuf,
    tcp: HostAddr,
    shm: memmap2::MmapMut,
    area: usize,
    pub socat: Option<(Child, HostAddr)>,
}

const MAX_BYTES: usize = 3840 * 2160 * 4;
pub(crate) const PACE: Duration = Duration::from_nanos(33_333_333);

impl Env {
    pub fn start(in_flight: usize) -> Result<Env> {
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
    Ok(Run {
        frames,
        secs,
        rtt_ms: quantiles(&mut rtt),
        cpu: CpuSplit { host_ns: cpu.guest_ns + cpu.host_ns, guest_ns: 0 },
    })
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// The answers of one run, collected on the client's reader thread.
#[derive(Default)]
struct Answers {
    rtt_ms: Mutex<Vec<f64>>,
    failures: Mutex<Vec<String>>,
}

impl Handler<u32> for Answers {
    fn handle(&self, event: Event<u32>) {
        match event {
            Event::Answered { pending, answer: Answer::Frame(_) } => {
                self.rtt_ms.lock().unwrap().push(pending.sent.elapsed().as_secs_f64() * 1e3)
            }
            Event::Answered { pending, answer: Answer::Error { message, .. } } => {
                self.failures.lock().unwrap().push(format!("frame {}: host answered ERROR: {message}", pending.tag))
            }
            Event::Lost { pending, why } if !pending.is_empty() => {
                self.failures.lock().unwrap().push(format!("{} frame(s) lost: {why}", pending.len()))
            }
            _ => {}
        }
    }
}

/// Streams frames through the host as vsockenc does, with the same client:
/// at most `in_flight` outstanding, optionally paced.
pub(crate) fn through_host(
    addr: &HostAddr,
    input: &Input,
    frames: u32,
    in_flight: usize,
    pace: Option<Duration>,
    mut shm: Option<(&mut memmap2::MmapMut, usize)>,
) -> Result<Run> {
    let answers = Arc::new(Answers::default());
    let config = client::Config { max_in_flight: in_flight, ..client::Config::new(addr.clone()) };
    let mut client = Client::connect(config, answers.clone())?;
    if shm.is_some() {
        client.set_areas(in_flight);
    }
    let wait = Duration::from_secs(30);
    let layout = input.layout();
    let mark = CpuMark::now();
    let start = Instant::now();
    for i in 0..frames {
        client.wait_below(in_flight, wait).map_err(|e| anyhow::anyhow!("frame {i}: {e}"))?;
        if let Some(p) = pace {
            sleep_until(start + p * i);
        }
        let pixels = input.frame(i);
        let (msg, area) = match &mut shm {
            None => {
                let req = FrameRequest::inline(input.format, input.w, input.h, input.stride as u32, pixels.clone());
                (Message::FrameRequest(req.timed(i as i64, PACE.as_nanos() as i64).keyframe(i == 0)), None)
            }
            Some((region, area_bytes)) => {
                let area = client.take_area().context("no free shared-memory area")?;
                let off = area * *area_bytes;
                region[off..off + pixels.len()].copy_from_slice(pixels); // the one copy
                let req = ShmFrameRequest::new(&layout, off as u64).timed(i as i64, PACE.as_nanos() as i64);
                (Message::ShmFrameRequest(req.keyframe(i == 0)), Some(area))
            }
        };
        client.send(i, area, &Packet::new(1, msg)).map_err(|e| anyhow::anyhow!("frame {i}: {e}"))?;
    }
    client.wait_below(1, wait).map_err(|e| anyhow::anyhow!("draining: {e}"))?;
    // Read the CPU while the host's session threads still live.
    let (secs, cpu) = (start.elapsed().as_secs_f64(), mark.since());
    if let Some(f) = answers.failures.lock().unwrap().first() {
        bail!("{f}");
    }
    let mut rtt = std::mem::take(&mut *answers.rtt_ms.lock().unwrap());
    if rtt.len() != frames as usize {
        bail!("{} of {frames} frames answered", rtt.len());
    }
    Ok(Run { frames, secs, rtt_ms: quantiles(&mut rtt), cpu })
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
    let mut rtt = std::mem::take(&mut *rtt.lock().unwrap());
    Ok(Run {
        frames,
        secs,
        rtt_ms: quantiles(&mut rtt),
        cpu: CpuSplit { host_ns: 0, guest_ns: cpu.guest_ns + cpu.host_ns },
    })
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
    // The element keeps its own round-trip window; its percentiles are the figures.
    let rtt_ms = [stats.get::<f64>("rtt-p50-ms")?, stats.get::<f64>("rtt-p99-ms")?];
    Ok(Run { frames, secs, rtt_ms, cpu })
}

pub(crate) fn run_path(
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

/// What [`profile`] measured: one path, BGRx motion frames, no pacing.
#[derive(Debug, Clone)]
pub struct Profile {
    pub frames: u32,
    pub secs: f64,
    pub cpu: CpuSplit,
    /// Minor page faults of the whole process per frame (fresh memory touched).
    pub minor_faults_per_frame: f64,
    /// CPU nanoseconds by thread name over the run (set-up included).
    pub threads: Vec<(String, u64)>,
}

/// Runs one path alone for `frames` BGRx motion frames of `w`×`h`, as fast as
/// it goes: a harness for profilers (`examples/inline_recv.rs` under
/// `valgrind --tool=callgrind`), where the difference between a socket path
/// and in-process is what moving the frames costs.
pub fn profile(path: PathKind, w: u32, h: u32, frames: u32, in_flight: usize) -> Result<Profile> {
    let mut env = Env::start(in_flight)?;
    let input = Input::new(PixelFormat::Bgrx, Content::Motion, w, h);
    let faults = crate::sys::minor_faults();
    let mark = CpuMark::now();
    let r = run_path(&mut env, path, &input, frames, in_flight, None)?;
    let threads = mark.since_by_name();
    let faults = crate::sys::minor_faults().saturating_sub(faults);
    Ok(Profile {
        frames: r.frames,
        secs: r.secs,
        cpu: r.cpu,
        minor_faults_per_frame: faults as f64 / frames as f64,
        threads,
    })
}
