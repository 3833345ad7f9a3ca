//! vsockenc in real pipelines against a real hxfr host started in the test.
//! Every stream is decoded by a real decoder and compared with its source.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gst::prelude::*;
use hxfr_encode::EncoderKind;
use hxfr_host::{HostConfig, HostHandle, ListenAddr};
use hxfr_testkit::{Content, Output, decode_h264, pattern_bgrx, psnr, psnr_bgrx};

fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        gst::init().unwrap();
        gstvsockenc::plugin_register_static().unwrap();
    });
}

struct Host {
    handle: Option<HostHandle>,
    dir: tempfile::TempDir,
}

impl Host {
    fn start() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let h = Host::spawn_in(&dir);
        Host { handle: Some(h), dir }
    }

    fn spawn_in(dir: &tempfile::TempDir) -> HostHandle {
        let shm = dir.path().join("shm");
        if !shm.exists() {
            std::fs::File::create(&shm).unwrap().set_len(16 << 20).unwrap();
        }
        hxfr_host::spawn(
            HostConfig { encoder: EncoderKind::X264, shm_path: Some(shm), ..Default::default() },
            vec![ListenAddr::Unix(dir.path().join("h.sock")), "tcp:127.0.0.1:0".parse().unwrap()],
            vec![],
        )
        .unwrap()
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("h.sock")
    }

    fn shm(&self) -> PathBuf {
        self.dir.path().join("shm")
    }

    fn tcp_port(&self) -> u16 {
        match &self.handle.as_ref().unwrap().addrs[1] {
            ListenAddr::Tcp(a) => a.port(),
            _ => unreachable!(),
        }
    }

    fn unix_props(&self) -> String {
        format!("socket-path={}", self.sock().display())
    }
}

/// What came out of a pipeline with an `appsink name=raw` (the source frames)
/// and an `appsink name=enc` (vsockenc's access units).
struct Run {
    raw: Vec<gst::Buffer>,
    enc: Vec<gst::Buffer>,
    messages: Vec<String>,
    element_stats: Option<gst::Structure>,
}

fn collect(sink: &gst::Element) -> Arc<Mutex<Vec<gst::Buffer>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    sink.downcast_ref::<gst_app::AppSink>().unwrap().set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                o.lock().unwrap().push(sample.buffer_owned().unwrap());
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    out
}

/// Runs `desc` to EOS (or error), with an optional action after `at`.
fn run(desc: &str, during: Option<(Duration, Box<dyn FnOnce()>)>) -> Result<Run, String> {
    init();
    let pipeline = gst::parse::launch(desc).unwrap().downcast::<gst::Pipeline>().unwrap();
    let raw = pipeline.by_name("raw").map(|s| collect(&s));
    let enc = collect(&pipeline.by_name("enc").unwrap());
    let bus = pipeline.bus().unwrap();
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        // The reason is on the bus.
        let why = bus
            .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error])
            .map(|m| match m.view() {
                gst::MessageView::Error(err) => format!("{} ({:?})", err.error(), err.debug()),
                _ => unreachable!(),
            })
            .unwrap_or_default();
        pipeline.set_state(gst::State::Null).unwrap();
        return Err(format!("cannot start: {e}: {why}"));
    }
    let start = Instant::now();
    let mut during = during;
    let mut messages = Vec::new();
    let result = loop {
        if let Some((at, _)) = &during
            && start.elapsed() >= *at
        {
            (during.take().unwrap().1)();
        }
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(50)) else {
            if start.elapsed() > Duration::from_secs(60) {
                break Err("pipeline timed out".to_string());
            }
            continue;
        };
        match msg.view() {
            gst::MessageView::Eos(_) => break Ok(()),
            gst::MessageView::Error(e) => break Err(format!("{} ({:?})", e.error(), e.debug())),
            gst::MessageView::Warning(w) => messages.push(w.error().to_string()),
            _ => {}
        }
    };
    // A frame lost when EOS gave up waiting for it is reported by the client's
    // reader thread: let the counters settle (every frame sent is answered or
    // dropped) before reading them.
    let element_stats = pipeline.by_name("v").map(|v| {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let st = v.property::<gst::Structure>("stats");
            let n = |f: &str| st.get::<u64>(f).unwrap_or(0);
            if n("frames-sent") <= n("frames-answered") + n("frames-dropped") || Instant::now() > deadline {
                break st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    pipeline.set_state(gst::State::Null).unwrap();
    result?;
    let raw = raw.map(|r| std::mem::take(&mut *r.lock().unwrap())).unwrap_or_default();
    let enc = std::mem::take(&mut *enc.lock().unwrap());
    Ok(Run { raw, enc, messages, element_stats })
}

fn bytes_of(b: &gst::Buffer) -> Bytes {
    Bytes::copy_from_slice(&b.map_readable().unwrap())
}

fn is_key(b: &gst::Buffer) -> bool {
    !b.flags().contains(gst::BufferFlags::DELTA_UNIT)
}

/// Decodes what vsockenc produced and compares each picture with its source
/// frame (in the source's own layout, `stride` bytes a row).
fn check_quality(r: &Run, out: Output, stride: usize) {
    assert_eq!(r.enc.len(), r.raw.len(), "frames out = frames in");
    assert!(is_key(&r.enc[0]), "the stream starts with a keyframe");
    let aus: Vec<Bytes> = r.enc.iter().map(bytes_of).collect();
    let pics = decode_h264(&aus, out).unwrap();
    assert_eq!(pics.len(), r.raw.len(), "every access unit decodes");
    for (i, (src, pic)) in r.raw.iter().zip(&pics).enumerate() {
        let p = psnr(out, &src.map_readable().unwrap(), stride, pic);
        assert!(p >= 30.0, "frame {i}: PSNR {p:.1} dB");
    }
}

fn tee(src_caps: &str, n: u32, enc_props: &str) -> String {
    format!(
        "videotestsrc num-buffers={n} pattern=ball ! {src_caps} ! tee name=t \
         t. ! queue ! appsink name=raw sync=false \
         t. ! queue ! vsockenc name=v {enc_props} ! appsink name=enc sync=false"
    )
}

#[test]
fn inline_over_unix_bgrx_every_frame_comes_back() {
    let host = Host::start();
    let r =
        run(&tee("video/x-raw,format=BGRx,width=640,height=360,framerate=30/1", 45, &host.unix_props()), None).unwrap();
    check_quality(&r, Output::Bgrx, 640 * 4);
    let st = r.element_stats.unwrap();
    assert_eq!(st.get::<u64>("frames-sent").unwrap(), 45);
    assert_eq!(st.get::<u64>("frames-answered").unwrap(), 45);
    assert_eq!(st.get::<u64>("frames-dropped").unwrap(), 0);
    assert_eq!(st.get::<&str>("mode").unwrap(), "inline");
    assert!(st.get::<f64>("rtt-p50-ms").unwrap() > 0.0);
    let host_frames: u64 = host.handle.as_ref().unwrap().stats().iter().map(|s| s.info.frames).sum();
    assert_eq!(host_frames, 45, "the host encoded each frame once");
}

#[test]
fn inline_over_tcp_nv12_odd_stride() {
    // 642 wide NV12: GStreamer pads the rows to 644 bytes.
    let host = Host::start();
    let props = format!("tcp-host=127.0.0.1 tcp-port={}", host.tcp_port());
    let r = run(&tee("video/x-raw,format=NV12,width=642,height=362,framerate=30/1", 30, &props), None).unwrap();
    check_quality(&r, Output::Nv12, 644);
}

#[test]
fn inline_bgrx_odd_width() {
    let host = Host::start();
    let r =
        run(&tee("video/x-raw,format=BGRx,width=642,height=362,framerate=30/1", 20, &host.unix_props()), None).unwrap();
    check_quality(&r, Output::Bgrx, 642 * 4);
}

#[test]
fn shared_memory_mode() {
    let host = Host::start();
    let props = format!("{} mode=shm shm-path={} max-in-flight=3", host.unix_props(), host.shm().display());
    let r = run(&tee("video/x-raw,format=BGRx,width=1280,height=720,framerate=30/1", 30, &props), None).unwrap();
    check_quality(&r, Output::Bgrx, 1280 * 4);
    assert_eq!(r.element_stats.unwrap().get::<&str>("mode").unwrap(), "shm");
    let r = run(&tee("video/x-raw,format=NV12,width=642,height=362,framerate=30/1", 20, &props), None).unwrap();
    check_quality(&r, Output::Nv12, 644);
}

#[test]
fn auto_mode_uses_shared_memory_when_host_and_guest_share_it() {
    let host = Host::start();
    let props = format!("{} shm-path={}", host.unix_props(), host.shm().display());
    let r = run(&tee("video/x-raw,format=BGRx,width=320,height=240,framerate=30/1", 10, &props), None).unwrap();
    assert_eq!(r.element_stats.unwrap().get::<&str>("mode").unwrap(), "shm");
    // A region that is not the host's: auto falls back to inline, shm refuses.
    let other = tempfile::NamedTempFile::new().unwrap();
    other.as_file().set_len(8 << 20).unwrap();
    let props = format!("{} shm-path={}", host.unix_props(), other.path().display());
    let r = run(&tee("video/x-raw,format=BGRx,width=320,height=240,framerate=30/1", 10, &props), None).unwrap();
    assert_eq!(r.element_stats.unwrap().get::<&str>("mode").unwrap(), "inline");
    let e = run(
        &tee("video/x-raw,format=BGRx,width=320,height=240,framerate=30/1", 10, &format!("{props} mode=shm")),
        None,
    )
    .err()
    .unwrap();
    assert!(e.contains("not-negotiated") || e.contains("negotiat"), "{e}");
}

#[test]
fn helix_pipeline_line_works_unchanged() {
    // Helix's bridge: videoconvert ! video/x-raw,format=NV12 ! vsockenc tcp-host=… tcp-port=… bitrate=… keyframe-interval=…
    let host = Host::start();
    let desc = format!(
        "videotestsrc num-buffers=61 ! video/x-raw,width=640,height=360,framerate=30/1 ! videoconvert ! \
         video/x-raw,format=NV12 ! vsockenc name=v tcp-host=127.0.0.1 tcp-port={} bitrate=2000000 keyframe-interval=30 ! \
         h264parse ! video/x-h264,stream-format=byte-stream,alignment=au ! appsink name=enc sync=false",
        host.tcp_port()
    );
    let r = run(&desc, None).unwrap();
    assert_eq!(r.enc.len(), 61, "N of N, the last frame included");
    let keys: Vec<usize> = r.enc.iter().enumerate().filter(|(_, b)| is_key(b)).map(|(i, _)| i).collect();
    assert_eq!(keys, vec![0, 30, 60], "keyframe-interval honoured");
    let pics = decode_h264(&r.enc.iter().map(bytes_of).collect::<Vec<_>>(), Output::Nv12).unwrap();
    assert_eq!(pics.len(), 61);
}

#[test]
fn output_caps_carry_profile_and_level_from_the_stream() {
    let host = Host::start();
    init();
    let desc = format!(
        "videotestsrc num-buffers=5 ! video/x-raw,format=BGRx,width=320,height=240 ! vsockenc {} ! appsink name=enc sync=false",
        host.unix_props()
    );
    let pipeline = gst::parse::launch(&desc).unwrap().downcast::<gst::Pipeline>().unwrap();
    let sink = pipeline.by_name("enc").unwrap();
    let got = collect(&sink); // appsink holds EOS until its buffers are pulled
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    bus.timed_pop_filtered(gst::ClockTime::from_seconds(30), &[gst::MessageType::Eos, gst::MessageType::Error])
        .unwrap();
    let caps = sink.static_pad("sink").unwrap().current_caps().unwrap();
    pipeline.set_state(gst::State::Null).unwrap();
    assert_eq!(got.lock().unwrap().len(), 5);
    let s = caps.structure(0).unwrap();
    assert_eq!(s.get::<&str>("stream-format").unwrap(), "byte-stream");
    assert_eq!(s.get::<&str>("profile").unwrap(), "constrained-baseline", "{caps}");
    assert!(s.get::<&str>("level").is_ok(), "{caps}");
}

#[test]
fn no_host_at_start_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody-here.sock");
    let e =
        run(&tee("video/x-raw,format=BGRx,width=64,height=64", 5, &format!("socket-path={}", sock.display())), None)
            .err()
            .unwrap();
    assert!(e.contains(&format!("unix:{}", sock.display())), "error names the address: {e}");
    let e =
        run(&tee("video/x-raw,format=BGRx,width=64,height=64", 5, "host=tcp:127.0.0.1:1 connect-timeout=500"), None)
            .err()
            .unwrap();
    assert!(e.contains("tcp:127.0.0.1:1"), "{e}");
    let e = run(&tee("video/x-raw,format=BGRx,width=64,height=64", 5, "host=pigeon:somewhere"), None).err().unwrap();
    assert!(e.contains("bad host address"), "{e}");
}

#[test]
fn host_restart_mid_stream_is_survived() {
    let mut host = Host::start();
    let dir_path = host.dir.path().to_owned();
    let handle = Arc::new(Mutex::new(host.handle.take()));
    let h2 = handle.clone();
    let dir = std::mem::replace(&mut host.dir, tempfile::tempdir().unwrap());
    let desc = format!(
        "videotestsrc is-live=true num-buffers=90 ! video/x-raw,format=BGRx,width=320,height=240,framerate=30/1 ! \
         vsockenc name=v socket-path={} reply-timeout=2000 ! appsink name=enc sync=false",
        dir_path.join("h.sock").display()
    );
    let restart: Box<dyn FnOnce()> = Box::new(move || {
        // Kill the host, leave the guest without one for a moment, bring it back.
        h2.lock().unwrap().take().unwrap().stop();
        std::thread::sleep(Duration::from_millis(300));
        *h2.lock().unwrap() = Some(Host::spawn_in(&dir));
        std::mem::forget(dir); // the new host's files must outlive the closure
    });
    let r = run(&desc, Some((Duration::from_millis(1000), restart))).expect("the pipeline keeps running");
    let st = r.element_stats.unwrap();
    let (sent, answered, dropped) = (
        st.get::<u64>("frames-sent").unwrap(),
        st.get::<u64>("frames-answered").unwrap(),
        st.get::<u64>("frames-dropped").unwrap(),
    );
    assert!(st.get::<u64>("reconnects").unwrap() >= 1, "{st}");
    assert_eq!(r.enc.len() as u64, answered, "{st}");
    assert!(dropped > 0 && dropped < 40, "frames in the gap are dropped and counted: {st}");
    assert_eq!(answered + dropped, 90, "every frame is accounted for: {st} (sent {sent})");
    assert!(r.messages.iter().any(|m| m.contains("Lost the host")), "a warning, not an error: {:?}", r.messages);
    // After the restart the stream starts again at a keyframe and decodes.
    let aus: Vec<Bytes> = r.enc.iter().map(bytes_of).collect();
    assert_eq!(decode_h264(&aus, Output::Bgrx).unwrap().len(), aus.len());
    assert!(handle.lock().unwrap().as_ref().unwrap().stats().iter().any(|s| s.info.frames > 0));
}

#[test]
fn harness_padded_strides_from_video_meta() {
    init();
    let host = Host::start();
    let (w, h) = (320u32, 240u32);
    let stride = w as usize * 4 + 128;
    let mut harness = gst_check::Harness::new_parse(&format!("vsockenc {}", host.unix_props()));
    harness.set_src_caps_str(&format!("video/x-raw,format=BGRx,width={w},height={h},framerate=30/1"));
    let mut sent = Vec::new();
    for i in 0..10u32 {
        let px = pattern_bgrx(Content::Motion, w, h, stride, i);
        let mut buf = gst::Buffer::from_slice(px.clone());
        {
            let b = buf.get_mut().unwrap();
            b.set_pts(gst::ClockTime::from_mseconds(33 * i as u64));
            b.set_duration(gst::ClockTime::from_mseconds(33));
            gst_video::VideoMeta::add_full(
                b,
                gst_video::VideoFrameFlags::empty(),
                gst_video::VideoFormat::Bgrx,
                w,
                h,
                &[0],
                &[stride as i32],
            )
            .unwrap();
        }
        assert_eq!(harness.push(buf), Ok(gst::FlowSuccess::Ok));
        sent.push(px);
    }
    assert!(harness.push_event(gst::event::Eos::new()));
    let mut aus = Vec::new();
    while let Some(b) = harness.try_pull() {
        aus.push(bytes_of(&b));
    }
    assert_eq!(aus.len(), 10, "all frames, the last included");
    let pics = decode_h264(&aus, Output::Bgrx).unwrap();
    for (src, pic) in sent.iter().zip(&pics) {
        assert!(psnr_bgrx(src, stride, &pic.data, w, h) >= 30.0);
    }
}

#[test]
fn harness_force_key_unit_and_latency() {
    init();
    let host = Host::start();
    let mut harness = gst_check::Harness::new_parse(&format!("vsockenc {} keyframe-interval=0", host.unix_props()));
    harness.set_src_caps_str("video/x-raw,format=BGRx,width=160,height=120,framerate=30/1");
    let push = |h: &mut gst_check::Harness, i: u64| {
        let mut b = gst::Buffer::from_slice(pattern_bgrx(Content::Motion, 160, 120, 640, i as u32));
        b.get_mut().unwrap().set_pts(gst::ClockTime::from_mseconds(33 * i));
        assert_eq!(h.push(b), Ok(gst::FlowSuccess::Ok));
    };
    for i in 0..4 {
        push(&mut harness, i);
    }
    assert!(harness.push_upstream_event(gst_video::UpstreamForceKeyUnitEvent::builder().all_headers(true).build()));
    for i in 4..8 {
        push(&mut harness, i);
    }
    assert!(harness.push_event(gst::event::Eos::new()));
    let mut keys = Vec::new();
    let mut n = 0;
    while let Some(b) = harness.try_pull() {
        if is_key(&b) {
            keys.push(n);
        }
        n += 1;
    }
    assert_eq!(n, 8);
    assert_eq!(keys.len(), 2, "the first frame and the one after the force-key-unit event: {keys:?}");
    assert_eq!(keys[0], 0);
    let enc = harness.find_element("vsockenc").unwrap().downcast::<gst_video::VideoEncoder>().unwrap();
    let (min, _) = gst_video::prelude::VideoEncoderExtManual::latency(&enc);
    assert!(min > gst::ClockTime::ZERO, "latency is reported");
}

#[test]
fn odd_sizes_are_refused_with_a_reason() {
    let host = Host::start();
    let e = run(&tee("video/x-raw,format=BGRx,width=321,height=240", 3, &host.unix_props()), None).err().unwrap();
    assert!(e.to_lowercase().contains("negotiat"), "{e}");
}

#[test]
fn properties_are_compatible_with_the_c_element() {
    init();
    let e = gst::ElementFactory::make("vsockenc").build().unwrap();
    assert_eq!(e.property::<u32>("tcp-port"), 15937);
    assert_eq!(e.property::<u32>("bitrate"), 4_000_000);
    assert_eq!(e.property::<u32>("keyframe-interval"), 60);
    assert_eq!(e.property::<u32>("cid"), 2);
    assert_eq!(e.property::<u32>("port"), 5000);
    assert_eq!(e.property::<Option<String>>("socket-path"), None);
    assert_eq!(e.property::<Option<String>>("tcp-host"), None);
    for p in ["host", "mode", "shm-path", "max-in-flight", "connect-timeout", "reply-timeout", "session-id", "stats"] {
        assert!(e.find_property(p).is_some(), "{p}");
    }
    assert_eq!(gst::ElementFactory::find("vsockenc").unwrap().rank(), gst::Rank::NONE);
}

// ---- a scripted host, for the faults a real one does not make ----------------

use hxfr_proto::{FrameResponse, HelloResp, Message, Packet};

/// What the scripted host does with the n-th frame request.
#[derive(Clone, Copy)]
enum Reply {
    Frame,
    Error,
    /// Unsolicited messages first (PONG, CONFIG_RESP, another session's answer), then the answer.
    NoiseThenFrame,
    Silence,
    /// Answered after this long (a host at the edge of the reply timeout).
    After(Duration),
    /// Never answered, but later frames are (a host restarted behind a
    /// virtio-serial port loses what it held; no connection closes).
    Lost,
}

/// A real x264 IDR access unit (SPS, PPS, slice) for the scripted host's keyframes.
fn keyframe_au() -> Bytes {
    static AU: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    AU.get_or_init(|| {
        let cfg = hxfr_encode::EncoderConfig::new(64, 64);
        let mut enc = hxfr_encode::open(&EncoderKind::X264, &cfg).unwrap();
        let px = pattern_bgrx(Content::Motion, 64, 64, 256, 0);
        let layout = hxfr_proto::Layout::inline(hxfr_proto::PixelFormat::Bgrx, 64, 64, 256);
        enc.encode(&hxfr_encode::Frame::new(&px, &layout, true).unwrap()).unwrap().data
    })
    .clone()
}

/// A host on a UNIX socket that answers HELLO and then frames as `script`
/// says. Returns the socket path and the force_keyframe flag of every request.
fn scripted_host(dir: &tempfile::TempDir, script: fn(usize) -> Reply) -> (PathBuf, Arc<Mutex<Vec<bool>>>) {
    let path = dir.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let mut n = 0usize;
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            let seen = seen2.clone();
            let mut dec = hxfr_proto::FrameDecoder::default();
            let (mut buf, mut scratch) = (bytes::BytesMut::new(), bytes::BytesMut::new());
            let mut w = s.try_clone().unwrap();
            let mut send = |p: Packet| hxfr_proto::io::write_packet(&mut w, &p, &mut scratch);
            while let Ok(p) = hxfr_proto::io::read_packet(&mut s, &mut dec, &mut buf) {
                let sid = p.session_id;
                let (pts, force) = match p.message {
                    Message::Hello(h) => {
                        let r = HelloResp { nonce: h.nonce, version: 1, features: 0, shm_size: 0, max_in_flight: 4 };
                        let _ = send(Packet::new(0, Message::HelloResp(r)));
                        continue;
                    }
                    Message::FrameRequest(r) => (r.pts, r.force_keyframe),
                    _ => continue,
                };
                seen.lock().unwrap().push(force);
                let answer = Packet::new(
                    sid,
                    Message::FrameResponse(FrameResponse {
                        pts,
                        dts: pts,
                        is_keyframe: force,
                        // Keyframes carry a real SPS (the element reads profile and level from it).
                        nals: vec![if force { keyframe_au() } else { Bytes::from_static(&[0, 0, 0, 1, 0x09, 0xf0]) }],
                    }),
                );
                let r = match script(n) {
                    Reply::Frame => send(answer),
                    Reply::Error => send(Packet::error(sid, -5, "boom: the encoder is on fire")),
                    Reply::NoiseThenFrame => {
                        let _ = send(Packet::new(sid, Message::Pong));
                        let _ =
                            send(Packet::new(sid + 1, Message::Error { code: -1, message: "other session".into() }));
                        let _ = send(Packet::new(
                            0x77,
                            Message::Unknown { msg_type: 0x77, flags: 0, payload: Bytes::new() },
                        ));
                        send(answer)
                    }
                    Reply::After(d) => {
                        std::thread::sleep(d); // the host's own slowness, not a wait for a condition
                        send(answer)
                    }
                    Reply::Silence | Reply::Lost => Ok(()),
                };
                n += 1;
                if r.is_err() {
                    break;
                }
            }
        }
    });
    (path, seen)
}

fn fake_pipeline(sock: &std::path::Path, n: u32, extra: &str) -> String {
    format!(
        "videotestsrc num-buffers={n} ! video/x-raw,format=BGRx,width=64,height=64,framerate=30/1 ! \
         vsockenc name=v socket-path={} keyframe-interval=0 {extra} ! appsink name=enc sync=false",
        sock.display()
    )
}

#[test]
fn an_error_answer_drops_that_frame_and_asks_for_a_keyframe() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, seen) = scripted_host(&dir, |n| if n == 3 { Reply::Error } else { Reply::Frame });
    let r = run(&fake_pipeline(&sock, 10, "max-in-flight=1"), None).unwrap();
    assert_eq!(r.enc.len(), 9, "frame 3 dropped, the rest delivered");
    let st = r.element_stats.unwrap();
    assert_eq!(st.get::<u64>("frames-dropped").unwrap(), 1);
    let forced = seen.lock().unwrap().clone();
    assert_eq!(&forced[..5], &[true, false, false, false, true], "the frame after the error is forced to a keyframe");
}

#[test]
fn errors_in_a_row_fail_with_the_hosts_message() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _) = scripted_host(&dir, |_| Reply::Error);
    let e = run(&fake_pipeline(&sock, 30, "max-errors=3 max-in-flight=1"), None).err().unwrap();
    assert!(e.contains("3 frames in a row") && e.contains("boom: the encoder is on fire"), "{e}");
}

#[test]
fn unsolicited_messages_never_shift_frame_matching() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _) = scripted_host(&dir, |_| Reply::NoiseThenFrame);
    let r = run(&fake_pipeline(&sock, 12, "max-in-flight=3"), None).unwrap();
    assert_eq!(r.enc.len(), 12);
    let pts: Vec<u64> = r.enc.iter().map(|b| b.pts().unwrap().mseconds()).collect();
    let want: Vec<u64> = (0..12).map(|i| i * 1000 / 30).collect();
    assert_eq!(pts, want, "each answer went to its own frame");
    assert_eq!(r.element_stats.unwrap().get::<u64>("frames-dropped").unwrap(), 0);
}

#[test]
fn a_frame_the_host_lost_is_dropped_and_later_answers_keep_their_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _) = scripted_host(&dir, |n| if n == 4 { Reply::Lost } else { Reply::Frame });
    let r = run(&fake_pipeline(&sock, 12, "max-in-flight=3"), None).unwrap();
    let pts: Vec<u64> = r.enc.iter().map(|b| b.pts().unwrap().mseconds()).collect();
    let want: Vec<u64> = (0..12).filter(|&i| i != 4).map(|i| i * 1000 / 30).collect();
    assert_eq!(pts, want, "frame 4 dropped, every other answer on its own frame");
    assert_eq!(r.element_stats.unwrap().get::<u64>("frames-dropped").unwrap(), 1);
}

#[test]
fn a_silent_host_counts_as_gone_after_the_reply_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, _) = scripted_host(&dir, |n| if n < 2 { Reply::Frame } else { Reply::Silence });
    let start = Instant::now();
    let r = run(&fake_pipeline(&sock, 8, "reply-timeout=300 max-in-flight=1"), None).expect("no error, only warnings");
    assert!(start.elapsed() < Duration::from_secs(15));
    assert_eq!(r.enc.len(), 2);
    let st = r.element_stats.unwrap();
    assert_eq!(st.get::<u64>("frames-dropped").unwrap(), 6, "{st}");
    assert!(r.messages.iter().any(|m| m.contains("no answer within 300 ms")), "{:?}", r.messages);
}

/// Feeds `runs` pipelines of `appsrc ! vsockenc {enc} ! {downstream}` with
/// `frames` frames whose size flips every third frame, and requires each to
/// reach EOS within 30 s with no error. Caps change through appsrc: a
/// capsfilter flipped from another thread races GStreamer's own
/// renegotiation and fails with not-negotiated even with no vsockenc in the
/// pipeline (measured: 1 of 6 runs with `identity` in its place).
/// Returns (caps changes, reconnects).
fn stress_caps_changes(enc: &str, downstream: &str, runs: u32, frames: u64) -> (u32, u64) {
    init();
    let (mut caps_changes, mut reconnects) = (0u32, 0u64);
    for run in 0..runs {
        let pipeline = gst::parse::launch(&format!(
            "appsrc name=src format=time is-live=true ! vsockenc name=v {enc} ! {downstream} ! appsink name=enc sync=false"
        ))
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
        let src = pipeline.by_name("src").unwrap().downcast::<gst_app::AppSrc>().unwrap();
        let _out = collect(&pipeline.by_name("enc").unwrap());
        pipeline.set_state(gst::State::Playing).unwrap();
        let start = Instant::now();
        let mut size = (160, 120);
        for i in 0..frames {
            if i % 3 == 0 {
                size = if size.1 == 120 { (160, 96) } else { (160, 120) };
                let caps = gst_video::VideoInfo::builder(gst_video::VideoFormat::Bgrx, size.0, size.1)
                    .fps(gst::Fraction::new(30, 1))
                    .build()
                    .unwrap()
                    .to_caps()
                    .unwrap();
                src.set_caps(Some(&caps));
                caps_changes += 1;
            }
            let px = pattern_bgrx(Content::Motion, size.0, size.1, size.0 as usize * 4, i as u32);
            let mut b = gst::Buffer::from_slice(px);
            b.get_mut().unwrap().set_pts(gst::ClockTime::from_mseconds(i * 33));
            if src.push_buffer(b).is_err() {
                break; // the pipeline failed: the bus says why
            }
        }
        let _ = src.end_of_stream();
        let bus = pipeline.bus().unwrap();
        let msg =
            bus.timed_pop_filtered(gst::ClockTime::from_seconds(30), &[gst::MessageType::Eos, gst::MessageType::Error]);
        let stats = pipeline.by_name("v").unwrap().property::<gst::Structure>("stats");
        reconnects += stats.get::<u64>("reconnects").unwrap();
        let outcome = match msg.as_ref().map(|m| m.view()) {
            Some(gst::MessageView::Eos(_)) => Ok(()),
            Some(gst::MessageView::Error(e)) => Err(format!("{} ({:?})", e.error(), e.debug())),
            _ => Err("no EOS within 30 s: hung".to_string()),
        };
        pipeline.set_state(gst::State::Null).unwrap();
        assert!(outcome.is_ok(), "run {run}: {outcome:?} after {:?}; {stats}", start.elapsed());
    }
    (caps_changes, reconnects)
}

/// Reply timeouts and caps changes racing: a host that answers right around
/// the reply timeout (so links die and are replaced mid-stream, and answers
/// for killed links arrive late) while the input changes size every few
/// frames (so set_format, the reader's renegotiation with the stream's
/// profile, and reconnects interleave). No deadlock, no error.
#[test]
fn caps_changes_racing_reply_timeouts_never_hang_or_fail() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, seen) = scripted_host(&dir, |n| {
        // 25..55 ms against a 40 ms reply timeout.
        Reply::After(Duration::from_millis(25 + (n as u64 * 7919 % 31)))
    });
    let enc = format!("socket-path={} reply-timeout=40 max-in-flight=2 connect-timeout=2000", sock.display());
    let (caps_changes, reconnects) = stress_caps_changes(&enc, "identity", 8, 60);
    assert!(seen.lock().unwrap().len() > 100, "the host saw the frames");
    assert!(caps_changes >= 160, "{caps_changes} caps changes");
    assert!(reconnects > 0, "the reply timeout fired and links were replaced ({reconnects} reconnects)");
}

/// The same against the real host, with a reply timeout as short as its
/// encode time and `h264parse` reading every access unit downstream.
#[test]
fn caps_changes_against_a_real_host_at_the_reply_timeout() {
    let host = Host::start();
    let enc = format!("{} reply-timeout=2 max-in-flight=2", host.unix_props());
    let (caps_changes, reconnects) = stress_caps_changes(&enc, "h264parse", 12, 90);
    assert!(caps_changes >= 12 * 30, "{caps_changes} caps changes");
    assert!(reconnects > 0, "links were replaced ({reconnects} reconnects)");
}

/// A host that answers HELLO and then never reads again (at its connection
/// limit, or stopped with SIGSTOP). Every connection is kept open.
fn deaf_host(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("deaf.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            let (mut dec, mut buf, mut scratch) =
                (hxfr_proto::FrameDecoder::default(), bytes::BytesMut::new(), bytes::BytesMut::new());
            if let Ok(Packet { message: Message::Hello(h), .. }) =
                hxfr_proto::io::read_packet(&mut s, &mut dec, &mut buf)
            {
                let r = HelloResp { nonce: h.nonce, version: 1, features: 0, shm_size: 0, max_in_flight: 4 };
                let _ = hxfr_proto::io::write_packet(&mut s, &Packet::new(0, Message::HelloResp(r)), &mut scratch);
            }
            held.push(s); // open, never read again
        }
    });
    path
}

/// Hardening row 1: a host that stops reading must not hold the streaming
/// thread (and with it EOS and state changes) past the reply timeout.
#[test]
fn a_host_that_stops_reading_never_blocks_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let sock = deaf_host(&dir);
    let start = Instant::now();
    let r = run(
        &format!(
            "videotestsrc num-buffers=8 ! video/x-raw,format=BGRx,width=1920,height=1080,framerate=30/1 ! \
             vsockenc name=v socket-path={} reply-timeout=400 ! appsink name=enc sync=false",
            sock.display()
        ),
        None,
    )
    .expect("warnings only, and EOS");
    let took = start.elapsed();
    // Each frame may cost one reply timeout (the write that stalls) plus a reconnect.
    assert!(took < Duration::from_secs(12), "took {took:?}");
    assert!(r.enc.is_empty(), "a deaf host answers nothing");
    let st = r.element_stats.unwrap();
    assert_eq!(st.get::<u64>("frames-dropped").unwrap(), 8, "every frame dropped and counted: {st}");
    assert!(r.messages.iter().any(|m| m.contains("stopped reading")), "{:?}", r.messages);
}

/// Hardening row 2: a live source through a host that stalls for 1.5 s.
/// Frames that come while the host is stalled are dropped at the input;
/// what comes out afterwards is the live picture at the live rate, never a
/// burst of late frames.
#[test]
fn a_stalled_host_drops_live_frames_instead_of_bursting_them_later() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sock, _) =
        scripted_host(&dir, |n| if n == 15 { Reply::After(Duration::from_millis(1500)) } else { Reply::Frame });
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc is-live=true num-buffers=120 ! video/x-raw,format=BGRx,width=64,height=64,framerate=30/1 ! \
         vsockenc name=v socket-path={} keyframe-interval=0 ! appsink name=enc sync=false",
        sock.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let a2 = arrivals.clone();
    pipeline.by_name("enc").unwrap().downcast_ref::<gst_app::AppSink>().unwrap().set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let _ = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                a2.lock().unwrap().push(Instant::now());
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let msg =
        bus.timed_pop_filtered(gst::ClockTime::from_seconds(20), &[gst::MessageType::Eos, gst::MessageType::Error]);
    let stats = pipeline.by_name("v").unwrap().property::<gst::Structure>("stats");
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(matches!(msg.as_ref().map(|m| m.view()), Some(gst::MessageView::Eos(_))), "{msg:?}");
    let t = arrivals.lock().unwrap().clone();
    // The most frames out in any 300 ms: about 9 at 30 fps; a burst of the
    // frames held back during the stall would be dozens.
    let burst =
        (0..t.len()).map(|i| t[i..].iter().take_while(|x| **x - t[i] < Duration::from_millis(300)).count()).max();
    assert!(burst.unwrap_or(0) <= 14, "{burst:?} frames within 300 ms: a late burst; {stats}");
    let dropped = stats.get::<u64>("frames-dropped").unwrap();
    assert!(dropped >= 20, "the frames of the stall were dropped at the input: {stats}");
    assert!(t.len() as u64 + dropped >= 118, "every frame answered or counted as dropped: {} out, {stats}", t.len());
}
