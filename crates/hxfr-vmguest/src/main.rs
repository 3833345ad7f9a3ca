//! `hxfr-vmguest`: the guest half of the VM tests (`make vm-test`).
//!
//! It runs inside a busybox guest under QEMU, so it is built static and
//! depends on nothing but the crates vsockenc itself uses to reach the host
//! (hxfr-guest, hxfr-proto). It sends `--frames` test frames (inline or
//! through an ivshmem region), writes each answer to `--out` as a record
//! `[pts u32 LE][len u32 LE][Annex-B access unit]` for the test to decode
//! on the host, and ends with one line the test reads:
//!
//! `HXFR-VMGUEST-RESULT frames=N answered=N errors=0 order_errors=0 reconnects=0 keyframes=1 bytes=…`
//!
//! It talks through the same pipelined client as vsockenc
//! ([`hxfr_guest::client`]). When the host goes away (restarted, or a
//! virtio-serial port whose other end closed) it reconnects, says HELLO
//! again and resends every frame not yet answered.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

mod flip;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hxfr_guest::client::{self, Answer, Client, Event, HelloConfig, Link, Lost};
use hxfr_guest::shm::{self, Region};
use hxfr_guest::{HostAddr, drm};
use hxfr_proto::{ConfigReq, FrameRequest, Layout, Message, Packet, PixelFormat, ShmFrameRequest, Size, features};
use hxfr_testkit::{Content, pattern_bgrx, pattern_nv12};

#[derive(Parser, Debug)]
#[command(version, about = "Send test frames to an hxfr host from inside a VM")]
struct Args {
    /// tcp:HOST:PORT, unix:PATH, vsock:CID:PORT or serial:PATH
    #[arg(long, required_unless_present_any = ["gpu_resource", "flips"])]
    host: Option<HostAddr>,
    /// Send nothing: create a WIDTHxHEIGHT dumb buffer on the virtio-gpu
    /// card, export it as a DMA-BUF and print the resource id vsockenc's
    /// resource mode finds for it (`HXFR-GPU-RESOURCE id=N`).
    #[arg(long, value_name = "WxH")]
    gpu_resource: Option<Size>,
    /// Resource mode: draw each frame into a dumb buffer on the virtio-gpu
    /// card and send only its resource id (the host reads the pixels from
    /// the buffer's backing pages). One frame in flight: the guest draws the
    /// next picture only when the last is answered.
    #[arg(long)]
    resource: bool,
    /// With --resource: half-way through, also send three requests the host
    /// must refuse (an id that does not exist, the buffer at the wrong size,
    /// and a buffer freed just before) and count their ERRORs in `errors=`.
    #[arg(long, requires = "resource")]
    resource_faults: bool,
    /// Send nothing: set a mode on a virtio-gpu connector and page-flip N
    /// times, drawing frame i of the test pattern before flip i (the scanout
    /// push tests; see flip.rs). --size picks the mode, --pace-ms spaces the
    /// flips.
    #[arg(long, value_name = "N")]
    flips: Option<u32>,
    /// With --flips: which connected connector (0: the first).
    #[arg(long, default_value_t = 0)]
    connector: usize,
    /// With --flips: how long the display then holds still, in ms.
    #[arg(long, default_value_t = 1000)]
    hold_ms: u64,
    /// With --resource: ask the host for this many bits per second (CONFIG_REQ).
    #[arg(long, requires = "resource")]
    bitrate: Option<u32>,
    #[arg(long, default_value_t = 30)]
    frames: u32,
    #[arg(long, default_value = "320x240")]
    size: Size,
    /// bgrx or nv12
    #[arg(long, default_value = "bgrx")]
    format: String,
    /// Send frames through shared memory: a path, or `auto` for the first
    /// ivshmem-plain device's BAR 2.
    #[arg(long)]
    shm: Option<String>,
    /// Where the answers go (a virtio-serial port backed by a file on the host).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Frames sent ahead of their answers (capped by what the host allows).
    #[arg(long, default_value_t = 2)]
    in_flight: u32,
    /// Pause between frames, in ms (the tests use it to restart the host mid-stream).
    #[arg(long, default_value_t = 0)]
    pace_ms: u64,
    /// Die half-way through sending this frame (a guest that crashes mid-message).
    #[arg(long)]
    die_mid_frame: Option<u32>,
    /// Seconds to wait for an answer before starting the conversation over.
    #[arg(long, default_value_t = 10)]
    reply_timeout: u64,
    /// Give up after this many seconds in all.
    #[arg(long, default_value_t = 240)]
    deadline: u64,
}

struct Frames {
    format: PixelFormat,
    width: u32,
    height: u32,
    stride: u32,
}

impl Frames {
    fn bytes(&self) -> usize {
        Layout::inline(self.format, self.width, self.height, self.stride).plane_end(self.format.num_planes() - 1)
            as usize
    }

    fn pixels(&self, i: u32) -> Vec<u8> {
        match self.format {
            PixelFormat::Nv12 => pattern_nv12(self.width, self.height, self.stride as usize, i),
            _ => pattern_bgrx(Content::Motion, self.width, self.height, self.stride as usize, i),
        }
    }
}

#[derive(Default)]
struct Tally {
    answered: u32,
    errors: u32,
    order_errors: u32,
    reconnects: u32,
    keyframes: u32,
    bytes: u64,
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("hxfr-vmguest: {msg}");
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(size) = args.gpu_resource {
        return match gpu_resource(size) {
            Ok(id) => {
                println!("HXFR-GPU-RESOURCE id={id}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                log(format!("error: {e}"));
                ExitCode::FAILURE
            }
        };
    }
    if let Some(n) = args.flips {
        let f = flip::Flips {
            card: match virtio_card() {
                Ok(c) => c,
                Err(e) => {
                    log(format!("error: {e}"));
                    return ExitCode::FAILURE;
                }
            },
            connector: args.connector,
            size: (args.size.width, args.size.height),
            flips: n,
            pace: Duration::from_millis(args.pace_ms),
            hold: Duration::from_millis(args.hold_ms),
        };
        return match flip::run(&f) {
            Ok((w, h)) => {
                println!("HXFR-FLIPS done flips={n} {w}x{h}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                log(format!("error: {e}"));
                ExitCode::FAILURE
            }
        };
    }
    let result = if args.resource { run_resource(&args) } else { run(&args) };
    let faults = if args.resource_faults { 3 } else { 0 };
    match result {
        Ok(t) => {
            println!(
                "HXFR-VMGUEST-RESULT frames={} answered={} errors={} order_errors={} reconnects={} keyframes={} bytes={}",
                args.frames, t.answered, t.errors, t.order_errors, t.reconnects, t.keyframes, t.bytes
            );
            if t.answered == args.frames && t.errors == faults && t.order_errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            log(format!("error: {e}"));
            println!("HXFR-VMGUEST-RESULT failed");
            ExitCode::FAILURE
        }
    }
}

/// The virtio-gpu card (the primary node, which can make dumb buffers).
fn virtio_card() -> Result<PathBuf, String> {
    drm::find_card(Path::new("/sys/class/drm"), Path::new("/dev/dri")).map_err(|e| e.to_string())
}

/// A dumb buffer and its resource id, found as vsockenc finds it.
fn gpu_buffer(card: &Path, gpu: &drm::VirtioGpu, w: u32, h: u32) -> Result<(drm::DumbBuffer, u32), String> {
    let buf = drm::DumbBuffer::create(card, w, h).map_err(|e| e.to_string())?;
    let dmabuf = buf.export().map_err(|e| e.to_string())?;
    let id = gpu.resource_id(std::os::fd::AsRawFd::as_raw_fd(&dmabuf)).map_err(|e| e.to_string())?;
    Ok((buf, id))
}

/// Resource mode (`--resource`): frames drawn into a dumb buffer, named by
/// id. Each request is answered before the next picture is drawn, since
/// the host reads the buffer when it encodes, not when the request arrives.
fn run_resource(args: &Args) -> Result<Tally, String> {
    let host = args.host.clone().ok_or("--host is needed")?;
    let (w, h) = (args.size.width, args.size.height);
    let card = virtio_card()?;
    let node = drm::find_render_node(Path::new("/sys/class/drm"), Path::new("/dev/dri")).map_err(|e| e.to_string())?;
    let gpu = drm::VirtioGpu::open(&node).map_err(|e| e.to_string())?;
    let (buf, id) = gpu_buffer(&card, &gpu, w, h)?;
    let mut map = buf.map().map_err(|e| e.to_string())?;
    log(format!("{w}x{h} dumb buffer on {}, pitch {}, resource {id}", card.display(), buf.pitch));
    let mut out = match &args.out {
        Some(p) => Some(File::create(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let reply = Duration::from_secs(args.reply_timeout);
    let config = client::Config {
        session_id: 1,
        connect_timeout: Duration::from_secs(5),
        reply_timeout: reply,
        max_in_flight: 1,
        hello: Some(HelloConfig { features: 0, timeout: Duration::from_secs(3) }),
        ..client::Config::new(host)
    };
    let (events_tx, events) = mpsc::channel::<Event<u32>>();
    let deadline = Instant::now() + Duration::from_secs(args.deadline);
    let mut client = loop {
        match Client::connect(config.clone(), Arc::new(events_tx.clone())) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                log(&e);
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    client.ensure().map_err(|e| format!("HELLO: {e}"))?;
    if let Some(bitrate) = args.bitrate {
        let cfg = ConfigReq {
            width: w,
            height: h,
            bitrate,
            fps_num: 30,
            fps_den: 1,
            profile: 0,
            level_x10: 0,
            realtime: true,
        };
        client.send_control(&Packet::new(1, Message::ConfigReq(cfg))).map_err(|e| format!("CONFIG_REQ: {e}"))?;
    }
    let ask = |client: &mut Client<u32>, tag: u32, req: FrameRequest| -> Result<Answer, String> {
        let packet = Packet::new(1, Message::FrameRequest(req.timed(tag as i64, 33_333_333)));
        client.send(tag, None, &packet).map_err(|e| format!("send: {e}"))?;
        loop {
            match events.recv_timeout(reply).map_err(|_| format!("no answer to request {tag} in {reply:?}"))? {
                Event::Answered { pending, answer } if pending.tag == tag => return Ok(answer),
                Event::Lost { why, .. } => return Err(format!("request {tag} lost: {why:?}")),
                _ => {}
            }
        }
    };
    let mut t = Tally::default();
    let pitch = buf.pitch;
    for i in 0..args.frames {
        if args.resource_faults && i == args.frames / 2 {
            // Each is refused, and the stream goes on after it.
            let (freed_buf, freed) = gpu_buffer(&card, &gpu, w, h)?;
            // The last reference: the kernel queues RESOURCE_UNREF and kicks
            // the device before this thread goes on to send the request, so
            // the device has it long before the request crosses QEMU.
            drop(freed_buf);
            let faults = [
                ("an id that does not exist", FrameRequest::resource(0x7fff_fff0, PixelFormat::Bgrx, w, h, pitch)),
                ("the wrong size", FrameRequest::resource(id, PixelFormat::Bgrx, w / 2, h / 2, pitch)),
                ("a freed buffer", FrameRequest::resource(freed, PixelFormat::Bgrx, w, h, pitch)),
            ];
            for (k, (what, req)) in faults.into_iter().enumerate() {
                match ask(&mut client, 1_000_000 + k as u32, req)? {
                    Answer::Error { code, message } => {
                        log(format!("{what}: ERROR {code}: {message}"));
                        t.errors += 1;
                    }
                    Answer::Frame(_) => log(format!("{what}: the host encoded it")),
                }
            }
        }
        let px = pattern_bgrx(Content::Motion, w, h, pitch as usize, i);
        map[..px.len()].copy_from_slice(&px);
        match ask(&mut client, i, FrameRequest::resource(id, PixelFormat::Bgrx, w, h, pitch))? {
            Answer::Frame(r) => {
                if r.pts != i as i64 {
                    t.order_errors += 1;
                }
                let au = r.to_annex_b();
                t.keyframes += r.is_keyframe as u32;
                t.bytes += au.len() as u64;
                if let Some(o) = out.as_mut() {
                    write_record(o, i, &au).map_err(|e| format!("--out: {e}"))?;
                }
                t.answered += 1;
            }
            Answer::Error { code, message } => {
                log(format!("host refused frame {i}: ERROR {code}: {message}"));
                t.errors += 1;
            }
        }
        if (i + 1).is_multiple_of(10) {
            log(format!("{} of {} frames answered", i + 1, args.frames));
        }
    }
    if let Some(o) = out.as_mut() {
        o.flush().map_err(|e| format!("--out: {e}"))?;
    }
    Ok(t)
}

/// The guest half of zero copy, without GStreamer: a scanout-like buffer on
/// the virtio-gpu card, and the resource id found for its DMA-BUF the way
/// vsockenc finds it (render node by vendor, PRIME import, RESOURCE_INFO).
fn gpu_resource(size: Size) -> Result<u32, String> {
    let (w, h) = (size.width, size.height);
    let card = virtio_card()?;
    let node = drm::find_render_node(Path::new("/sys/class/drm"), Path::new("/dev/dri")).map_err(|e| e.to_string())?;
    let gpu = drm::VirtioGpu::open(&node).map_err(|e| e.to_string())?;
    let (_buf, id) = gpu_buffer(&card, &gpu, w, h)?;
    log(format!("{w}x{h} dumb buffer on {}, imported on {}", card.display(), node.display()));
    Ok(id)
}

/// Which conversation a frame was sent in: answers from one a restart
/// has ended are stale.
type Tag = (u32, u32);

fn run(args: &Args) -> Result<Tally, String> {
    let host = args.host.clone().ok_or("--host is needed")?;
    let (width, height) = (args.size.width, args.size.height);
    let (format, bpp) = match args.format.as_str() {
        "bgrx" => (PixelFormat::Bgrx, 4),
        "nv12" => (PixelFormat::Nv12, 1),
        f => return Err(format!("--format {f:?}: expected bgrx or nv12")),
    };
    let frames = Frames { format, width, height, stride: width * bpp };
    let shm_path = match args.shm.as_deref() {
        None => None,
        Some("auto") => Some(shm::find_ivshmem(Path::new("/sys")).ok_or("no ivshmem-plain device in /sys")?),
        Some(p) => Some(PathBuf::from(p)),
    };
    if let Some(p) = &shm_path {
        enable_pci_device(p);
    }
    let mut out = match &args.out {
        Some(p) => Some(File::create(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };

    let deadline = Instant::now() + Duration::from_secs(args.deadline);
    let give_up =
        |next: u32| format!("gave up after {}s with {next} of {} frames answered", args.deadline, args.frames);
    let config = client::Config {
        session_id: 1,
        connect_timeout: Duration::from_secs(5),
        reply_timeout: Duration::from_secs(args.reply_timeout),
        max_in_flight: args.in_flight.max(1) as usize,
        hello: Some(HelloConfig {
            features: if shm_path.is_some() { features::SHM } else { 0 },
            timeout: Duration::from_secs(3),
        }),
        backoff_min: Duration::from_millis(300),
        backoff_max: Duration::from_secs(2),
        ..client::Config::new(host)
    };
    let (events_tx, events) = mpsc::channel::<Event<Tag>>();
    let mut t = Tally::default();
    let mut last_err = String::new();
    // Retries repeat the same failure: say it once.
    let mut say = |e: String| {
        if e != last_err {
            log(&e);
            last_err = e;
        }
    };
    let mut client = loop {
        match Client::connect(config.clone(), Arc::new(events_tx.clone())) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                say(e.to_string());
                std::thread::sleep(config.backoff_min);
            }
            Err(e) => return Err(format!("{e}; {}", give_up(0))),
        }
    };

    let mut next = 0u32; // the first frame without an answer
    let mut sent = 0u32;
    let mut conversation = 0u32;
    let mut region: Option<Region> = None;
    let mut fresh = true;
    while next < args.frames {
        if Instant::now() > deadline {
            return Err(give_up(next));
        }
        match client.ensure() {
            Ok(Link::Up) if !fresh => {}
            Ok(link) => {
                // A new conversation: everything not answered is sent again.
                if link == Link::Reconnected {
                    t.reconnects += 1;
                }
                fresh = false;
                conversation += 1;
                sent = next;
                let Some(hello) = client.hello().copied() else {
                    say("the host does not answer HELLO (not an hxfr host?)".into());
                    client.kill("no HELLO");
                    continue;
                };
                log(format!(
                    "host speaks version {}, features {:#x}, {} frames in flight, shared memory {} bytes",
                    hello.version, hello.features, hello.max_in_flight, hello.shm_size
                ));
                if let Some(p) = &shm_path {
                    if hello.features & features::SHM == 0 {
                        return Err("the host does not serve shared-memory frames (start it with --shm)".into());
                    }
                    let r = Region::open(p, frames.bytes(), client.window())
                        .map_err(|e| format!("{}: {e}", p.display()))?;
                    client.set_areas(r.areas);
                    region = Some(r);
                }
            }
            Err(e) => {
                say(format!("HELLO: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        while sent < args.frames && sent - next < client.window() as u32 {
            if args.die_mid_frame == Some(sent) {
                let mut b = bytes::BytesMut::new();
                inline_request(&frames, sent).encode(&mut b);
                let _ = client.write_raw(&b[..b.len() / 2]);
                log(format!("dying half-way through frame {sent}"));
                std::process::exit(3);
            }
            // The reader frees an answered frame's area just after handing
            // the answer over: wait for that before looking for a free one.
            if let Err(e) = client.wait_below(client.window(), Duration::from_secs(args.reply_timeout)) {
                log(format!("waiting for room: {e}"));
                break;
            }
            let area = region.as_ref().and_then(|_| client.take_area());
            let packet = match (region.as_mut(), area) {
                (Some(r), Some(a)) => shm_request(&frames, r, sent, a),
                (Some(_), None) => return Err("no free shared-memory area inside the window".into()),
                (None, _) => inline_request(&frames, sent),
            };
            if let Err(e) = client.send((conversation, sent), area, &packet) {
                log(format!("send: {e}"));
                break;
            }
            sent += 1;
            if args.pace_ms > 0 {
                std::thread::sleep(Duration::from_millis(args.pace_ms));
            }
        }
        let event = match events.recv_timeout(Duration::from_secs(args.reply_timeout)) {
            Ok(e) => e,
            Err(_) => {
                log(format!("no answer for frame {next} in {}s: starting over", args.reply_timeout));
                client.kill("no answer");
                continue;
            }
        };
        match event {
            Event::Answered { pending, answer } if pending.tag.0 == conversation => match answer {
                Answer::Frame(r) => {
                    if r.pts != next as i64 {
                        log(format!("answer for frame {} while waiting for {next}", r.pts));
                        t.order_errors += 1;
                    }
                    let au = r.to_annex_b();
                    t.keyframes += r.is_keyframe as u32;
                    t.bytes += au.len() as u64;
                    if let Some(o) = out.as_mut() {
                        write_record(o, next, &au).map_err(|e| format!("--out: {e}"))?;
                    }
                    t.answered += 1;
                    next += 1;
                    if next.is_multiple_of(10) || next == args.frames {
                        log(format!("{next} of {} frames answered", args.frames));
                    }
                }
                Answer::Error { code, message } => {
                    log(format!("host refused frame {next}: ERROR {code}: {message}"));
                    t.errors += 1;
                    next += 1;
                }
            },
            // A virtio-serial port outlives the host behind it: a host
            // restarted while we were writing loses frames without closing
            // anything we can see. An answer past a gap says so.
            Event::Lost { pending, why: Lost::Skipped } if pending.first().is_some_and(|p| p.tag.0 == conversation) => {
                log(format!("an answer skipped frame {next} (host restarted?): starting over"));
                conversation += 1; // what this conversation still sends is stale
                client.kill("starting over");
            }
            Event::Lost { why: Lost::Disconnected(why), .. } => log(format!("host connection lost: {why}")),
            Event::Unreadable(e) => log(format!("skipped a bad message: {e}")),
            _ => {} // stale answers, asides (CONFIG_RESP, PONG)
        }
    }
    if let Some(o) = out.as_mut() {
        o.flush().map_err(|e| format!("--out: {e}"))?;
    }
    Ok(t)
}

fn inline_request(f: &Frames, i: u32) -> Packet {
    let req = FrameRequest::inline(f.format, f.width, f.height, f.stride, Bytes::from(f.pixels(i)));
    Packet::new(1, Message::FrameRequest(req.timed(i as i64, 33_333_333)))
}

/// Frame `i` goes into shared-memory area `area`, which the client handed
/// out free (the frame that used it before has been answered).
fn shm_request(f: &Frames, r: &mut Region, i: u32, area: usize) -> Packet {
    let (offset, dst) = r.area(area);
    let px = f.pixels(i);
    dst[..px.len()].copy_from_slice(&px);
    let l = Layout::inline(f.format, f.width, f.height, f.stride);
    Packet::new(1, Message::ShmFrameRequest(ShmFrameRequest::new(&l, offset).timed(i as i64, 33_333_333)))
}

fn write_record(o: &mut File, pts: u32, au: &[u8]) -> std::io::Result<()> {
    o.write_all(&pts.to_le_bytes())?;
    o.write_all(&(au.len() as u32).to_le_bytes())?;
    o.write_all(au)
}

/// A PCI BAR only decodes once the device's memory space is on; with no
/// driver bound that is the guest's job (`/sys/bus/pci/devices/X/enable`).
fn enable_pci_device(resource: &Path) {
    if let Some(dev) = resource.parent().filter(|d| d.join("enable").exists())
        && let Err(e) = std::fs::write(dev.join("enable"), "1")
    {
        log(format!("{}: {e}", dev.join("enable").display()));
    }
}
