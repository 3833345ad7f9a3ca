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
    /// Bytes of one frame request on the host's socket, where counted.
    pub request_bytes: Option<u64>,
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
    /// The guest's RAM and GPU resources, behind the host's resolver.
    #[cfg(target_os = "linux")]
    pub ram: crate::gpu::GuestRam,
    /// The guest's scanout 0, behind the host's push engine.
    #[cfg(target_os = "linux")]
    pub flips: Arc<crate::gpu::FlipSource>,
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
        // The host is the guest's GPU: frames by resource id and scanout push.
        #[cfg(target_os = "linux")]
        let (ram, flips) = crate::gpu::start(dir.path(), in_flight.max(2), MAX_BYTES)?;
        #[cfg(target_os = "linux")]
        let (resolver, scanouts) = (
            Some(Arc::new(ram.resolver()) as Arc<dyn hxfr_host::ResourceResolver>),
            Some(flips.clone() as Arc<dyn hxfr_host::ScanoutSource>),
        );
        #[cfg(not(target_os = "linux"))]
        let (resolver, scanouts) = (None, None);
        let host = hxfr_host::spawn(
            HostConfig {
                encoder: EncoderKind::X264,
                shm_path: Some(shm_path),
                limits: hxfr_host::Limits { max_in_flight: in_flight.max(4), ..Default::default() },
                resolver,
                scanouts,
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
        Ok(Env {
            _host: host,
            _dir: dir,
            unix,
            tcp,
            shm,
            area,
            socat,
            #[cfg(target_os = "linux")]
            ram,
            #[cfg(target_os = "linux")]
            flips,
        })
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
        request_bytes: None,
    })
}

pub(crate) fn sleep_until(t: Instant) {
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

/// How a frame reaches the host.
pub(crate) enum Via<'a> {
    /// Its pixels in the request.
    Inline,
    /// Copied into an area of the shared region (`area_bytes` each), named by offset.
    Shm(&'a mut memmap2::MmapMut, usize),
    /// Drawn into a GPU resource's backing in guest RAM, named by resource id.
    #[cfg(target_os = "linux")]
    Resource(&'a mut crate::gpu::GuestRam, crate::gpu::Backing),
}

/// Streams frames through the host as vsockenc does, with the same client:
/// at most `in_flight` outstanding, optionally paced. With areas (shared
/// memory, resources) a frame goes into an area whose last frame was
/// answered: the guest never draws into a buffer the host may still read.
pub(crate) fn through_host(
    addr: &HostAddr,
    input: &Input,
    frames: u32,
    in_flight: usize,
    pace: Option<Duration>,
    mut via: Via<'_>,
) -> Result<Run> {
    #[cfg(target_os = "linux")]
    let slots = match &mut via {
        Via::Resource(ram, backing) => {
            if input.format != PixelFormat::Bgrx {
                bail!("a virtio-gpu 2D resource holds BGRx, not {:?}", input.format);
            }
            Some(ram.create(input.w, input.h, in_flight, *backing)?)
        }
        _ => None,
    };
    #[cfg(target_os = "linux")]
    let run = stream(addr, input, frames, in_flight, pace, &mut via, slots.as_ref());
    #[cfg(target_os = "linux")]
    if let (Via::Resource(ram, _), Some(s)) = (&mut via, &slots) {
        ram.free(s);
    }
    #[cfg(not(target_os = "linux"))]
    let run = stream(addr, input, frames, in_flight, pace, &mut via);
    run
}

fn stream(
    addr: &HostAddr,
    input: &Input,
    frames: u32,
    in_flight: usize,
    pace: Option<Duration>,
    via: &mut Via<'_>,
    #[cfg(target_os = "linux")] slots: Option<&crate::gpu::Slots>,
) -> Result<Run> {
    let answers = Arc::new(Answers::default());
    let config = client::Config { max_in_flight: in_flight, ..client::Config::new(addr.clone()) };
    let mut client = Client::connect(config, answers.clone())?;
    if !matches!(via, Via::Inline) {
        client.set_areas(in_flight);
    }
    let mut request_bytes = None;
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
        let (msg, area) = match via {
            Via::Inline => {
                let req = FrameRequest::inline(input.format, input.w, input.h, input.stride as u32, pixels.clone());
                (Message::FrameRequest(req.timed(i as i64, PACE.as_nanos() as i64).keyframe(i == 0)), None)
            }
            Via::Shm(region, area_bytes) => {
                let area = client.take_area().context("no free shared-memory area")?;
                let off = area * *area_bytes;
                region[off..off + pixels.len()].copy_from_slice(pixels); // the one copy
                let req = ShmFrameRequest::new(&layout, off as u64).timed(i as i64, PACE.as_nanos() as i64);
                (Message::ShmFrameRequest(req.keyframe(i == 0)), Some(area))
            }
            #[cfg(target_os = "linux")]
            Via::Resource(ram, _) => {
                let slots = slots.context("no resources")?;
                let area = client.take_area().context("no free resource")?;
                // The guest draws the frame into its buffer (guest CPU).
                ram.draw(slots, area, pixels)?;
                let req = FrameRequest::resource(slots.ids[area], input.format, input.w, input.h, input.stride as u32);
                (Message::FrameRequest(req.timed(i as i64, PACE.as_nanos() as i64).keyframe(i == 0)), Some(area))
            }
        };
        let packet = Packet::new(1, msg);
        if i == 0 {
            request_bytes = Some(packet.encoded_len() as u64);
        }
        client.send(i, area, &packet).map_err(|e| anyhow::anyhow!("frame {i}: {e}"))?;
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
    Ok(Run { frames, secs, rtt_ms: quantiles(&mut rtt), cpu, request_bytes })
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
        request_bytes: None,
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
    Ok(Run { frames, secs, rtt_ms, cpu, request_bytes: None })
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
        PathKind::InlineUnix => {
            through_host(&HostAddr::Unix(env.unix.clone()), input, frames, in_flight, pace, Via::Inline)
        }
        PathKind::InlineTcp => through_host(&env.tcp.clone(), input, frames, in_flight, pace, Via::Inline),
        PathKind::SharedMemory => {
            let area = env.area;
            let addr = HostAddr::Unix(env.unix.clone());
            through_host(&addr, input, frames, in_flight, pace, Via::Shm(&mut env.shm, area))
        }
        PathKind::SocatHop => {
            let addr = env.socat.as_ref().map(|(_, a)| a.clone()).context("socat is not running")?;
            through_host(&addr, input, frames, in_flight, pace, Via::Inline)
        }
        #[cfg(target_os = "linux")]
        PathKind::Resource | PathKind::ResourceContiguous => {
            let backing = if path == PathKind::Resource {
                crate::gpu::Backing::Scattered
            } else {
                crate::gpu::Backing::Contiguous
            };
            let addr = HostAddr::Unix(env.unix.clone());
            through_host(&addr, input, frames, in_flight, pace, Via::Resource(&mut env.ram, backing))
        }
        #[cfg(not(target_os = "linux"))]
        PathKind::Resource | PathKind::ResourceContiguous => bail!("the resource path needs Linux (vhost-user-gpu)"),
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

/// What one scanout-push run measured.
#[cfg(target_os = "linux")]
pub(crate) struct PushRun {
    /// Flips measured (after a first frame that opens the encoder).
    pub frames: u32,
    /// Flip → access unit at the subscriber, p50 and p99.
    pub rtt_ms: [f64; 2],
    pub cpu: CpuSplit,
    /// With `idle`: seconds without flips, host CPU ns meanwhile, frames pushed meanwhile.
    pub idle: Option<(f64, u64, u32)>,
}

/// Scanout push: the guest double-buffers two resources (scattered backing)
/// and flips scanout 0 between them `frames` times at 30 fps, drawing into
/// the back buffer first; a subscriber that keeps Helix's rules takes every
/// access unit over UNIX. The latency runs from the flip (its
/// CLOCK_MONOTONIC time, which the access unit carries as its pts) to the
/// subscriber having read the whole access unit. With `idle`, the
/// subscriber then stays subscribed with no flips for that long.
#[cfg(target_os = "linux")]
pub(crate) fn push(env: &mut Env, input: &Input, frames: u32, idle: Option<Duration>) -> Result<PushRun> {
    if input.format != PixelFormat::Bgrx {
        bail!("a scanout shows a BGRx resource, not {:?}", input.format);
    }
    let slots = env.ram.create(input.w, input.h, 2, crate::gpu::Backing::Scattered)?;
    let run = push_on(env, &slots, input, frames, idle);
    env.flips.blank();
    env.ram.free(&slots);
    run
}

#[cfg(target_os = "linux")]
fn push_on(
    env: &mut Env,
    slots: &crate::gpu::Slots,
    input: &Input,
    frames: u32,
    idle: Option<Duration>,
) -> Result<PushRun> {
    use hxfr_testkit::subscriber::{Subscriber, helix_config};
    let wait = Duration::from_secs(10);
    let e = anyhow::Error::msg;
    env.ram.draw(slots, 0, input.frame(0))?;
    env.flips.flip(slots.ids[0]);
    let mut sub = Subscriber::subscribe(&env.unix, 0, helix_config(input.w, input.h, 4_000_000))
        .map_err(e)?
        .context("SUBSCRIBE answered success = 0")?;
    // First an IDR of the picture shown at SUBSCRIBE, which opens the encoder: not measured.
    sub.frame(wait).map_err(e)?.context("no first frame after SUBSCRIBE")?;
    let mut rtt = Vec::with_capacity(frames as usize);
    let mark = CpuMark::now();
    let start = Instant::now();
    for i in 1..=frames {
        let slot = i as usize % 2;
        // The back buffer's last frame was answered: the guest draws the next one.
        env.ram.draw(slots, slot, input.frame(i))?;
        sleep_until(start + PACE * i);
        let flip = env.flips.flip(slots.ids[slot]);
        let f = sub.frame(wait).map_err(e)?.with_context(|| format!("flip {i}: no frame within {wait:?}"))?;
        let now = hxfr_host::monotonic_ns();
        if f.pts != flip.at_ns as i64 {
            bail!("flip {i}: the frame's pts {} is not the flip's time {}", f.pts, flip.at_ns);
        }
        rtt.push(now.saturating_sub(flip.at_ns) as f64 / 1e6);
    }
    let cpu = mark.since();
    let idle = match idle {
        None => None,
        Some(d) => {
            let (mark, t) = (CpuMark::now(), Instant::now());
            let mut got = 0;
            while let Some(left) = d.checked_sub(t.elapsed()) {
                match sub.frame(left).map_err(e)? {
                    Some(_) => got += 1,
                    None => break,
                }
            }
            Some((t.elapsed().as_secs_f64(), mark.since().host_ns, got))
        }
    };
    Ok(PushRun { frames, rtt_ms: quantiles(&mut rtt), cpu, idle })
}
