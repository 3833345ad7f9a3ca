//! The host, served over real sockets to a real client, its answers decoded
//! by a real decoder (GStreamer avdec_h264) and compared with what was sent.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hxfr_encode::EncoderKind;
use hxfr_guest::{Connection, HostAddr};
use hxfr_host::{BufferGauge, HostConfig, Limits, MemoryResolver, ResolveError, Resolved, ResourceResolver};
use hxfr_proto::{
    ConfigReq, ErrorCode, Fourcc, FrameRequest, FrameResponse, Header, Message, Packet, PixelFormat, ShmFrameRequest,
    ShmPlane, msg_type,
};
use hxfr_testkit::{Content, Output, decode_h264, nal_types, pattern_bgrx, pattern_nv12, psnr, psnr_bgrx, psnr_nv12};

mod common;
use common::{Host, TIMEOUT, frame_request, wait_for};

trait RxTimeout {
    fn rx_timeout(&mut self, t: Duration);
}
impl RxTimeout for Connection {
    fn rx_timeout(&mut self, t: Duration) {
        self.rx.set_timeout(Some(t)).unwrap();
    }
}

fn frame_pixels(format: PixelFormat, w: u32, h: u32, stride: usize, i: u32) -> Vec<u8> {
    match format {
        PixelFormat::Nv12 => pattern_nv12(w, h, stride, i),
        _ => pattern_bgrx(Content::Motion, w, h, stride, i),
    }
}

/// Format, size and plane-0 stride of an inline frame.
#[derive(Clone, Copy)]
struct Shape(PixelFormat, u32, u32, usize);

fn inline_request(session: u16, shape: Shape, i: u32, force: bool, px: Vec<u8>) -> Packet {
    let Shape(format, w, h, stride) = shape;
    let r = frame_request(format, w, h, stride as u32, Some(Bytes::from(px)));
    Packet::new(session, Message::FrameRequest(FrameRequest { pts: i as i64 * 33_333_333, force_keyframe: force, ..r }))
}

fn response(p: Packet) -> FrameResponse {
    match p.message {
        Message::FrameResponse(r) => r,
        other => panic!("expected FRAME_RESPONSE, got {other:?}"),
    }
}

fn error_code(p: &Packet) -> i32 {
    match &p.message {
        Message::Error { code, .. } => *code,
        other => panic!("expected ERROR, got {other:?}"),
    }
}

/// Sends `n` frames pipelined (a sender thread, like vsockenc), reads the
/// answers, decodes them and checks count, order, keyframes and PSNR.
fn stream_and_check(host: &Host, addr: &HostAddr, format: PixelFormat, w: u32, h: u32, n: u32) {
    let stride = match format {
        PixelFormat::Nv12 => (w as usize).next_multiple_of(4),
        _ => w as usize * 4,
    };
    let conn = host.connect(addr);
    let (mut tx, mut rx) = conn.split();
    let frames: Vec<Vec<u8>> = (0..n).map(|i| frame_pixels(format, w, h, stride, i)).collect();
    let to_send = frames.clone();
    let sender = std::thread::spawn(move || {
        for (i, px) in to_send.into_iter().enumerate() {
            let i = i as u32;
            tx.send(&inline_request(1, Shape(format, w, h, stride), i, i.is_multiple_of(15), px)).unwrap();
        }
    });
    let mut aus = Vec::new();
    for i in 0..n {
        let r = response(rx.recv().unwrap());
        assert_eq!(r.pts, i as i64 * 33_333_333, "answers in order, pts echoed");
        assert_eq!(r.is_keyframe, i.is_multiple_of(15), "frame {i} keyframe flag");
        if r.is_keyframe {
            let t = nal_types(&r.to_annex_b());
            assert!(t.starts_with(&[7, 8]) || t.starts_with(&[9, 7, 8]), "SPS/PPS before the IDR: {t:?}");
        }
        aus.push(r.to_annex_b());
    }
    sender.join().unwrap();
    let out = if format == PixelFormat::Nv12 { Output::Nv12 } else { Output::Bgrx };
    let pics = decode_h264(&aus, out).unwrap();
    assert_eq!(pics.len(), n as usize, "frames out = frames in");
    for (i, (src, pic)) in frames.iter().zip(&pics).enumerate() {
        let p = psnr(out, src, stride, pic);
        assert!(p >= 30.0, "{format:?} {w}x{h} via {addr}: frame {i} PSNR {p:.1} dB");
    }
}

#[test]
fn bgrx_and_nv12_over_unix_and_tcp() {
    let host = Host::x264();
    for addr in [host.unix_addr(), host.tcp_addr()] {
        for (w, h) in [(640, 360), (1280, 720)] {
            for format in [PixelFormat::Bgrx, PixelFormat::Nv12] {
                stream_and_check(&host, &addr, format, w, h, 20);
            }
        }
    }
    let stats = host.handle.stats();
    assert_eq!(stats.iter().map(|s| s.info.frames).sum::<u64>(), 20 * 8, "host stats count every frame");
    assert!(stats.iter().all(|s| s.info.dropped == 0 && s.info.encoder == "x264"));
}

#[test]
fn gstreamer_backends_take_the_same_path_a_mac_does() {
    for element in ["x264enc", "openh264enc"] {
        let host = Host::start(HostConfig { encoder: EncoderKind::Gst(element.into()), ..Default::default() });
        stream_and_check(&host, &host.unix_addr(), PixelFormat::Bgrx, 640, 360, 16);
        assert_eq!(host.handle.stats()[0].info.encoder, format!("gst:{element}"));
    }
}

#[test]
fn helix_request_byte_for_byte_gets_a_decodable_idr() {
    let host = Host::x264();
    let mut s = std::os::unix::net::UnixStream::connect(&host.unix).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let hex = "48584652 01 01 0100 2c100e00 00000000 80020000 68010000 41523234 \
               000a0000 0000000000000000 55a0fc0100000000 01 00000000000000";
    let mut bytes: Vec<u8> = hex
        .split_whitespace()
        .flat_map(|w| (0..w.len()).step_by(2).map(move |i| u8::from_str_radix(&w[i..i + 2], 16).unwrap()))
        .collect();
    let px = pattern_bgrx(Content::Motion, 640, 360, 2560, 0);
    bytes.extend_from_slice(&px);
    s.write_all(&bytes).unwrap();
    let mut dec = hxfr_proto::FrameDecoder::default();
    let p = hxfr_proto::io::read_packet(&mut s, &mut dec, &mut BytesMut::new()).unwrap();
    assert_eq!(p.session_id, 1);
    let r = response(p);
    assert!(r.is_keyframe);
    assert_eq!(r.nals.len(), 1, "one entry holding the whole access unit, as Helix's QEMU sends");
    assert!(nal_types(&r.nals[0]).contains(&5));
    let pics = decode_h264(&[r.to_annex_b()], Output::Bgrx).unwrap();
    assert_eq!(pics.len(), 1);
    assert!(psnr_bgrx(&px, 2560, &pics[0].data, 640, 360) >= 30.0);
}

#[test]
fn several_sessions_on_one_connection() {
    let host = Host::x264();
    let mut c = host.connect(&host.unix_addr());
    let sizes = [(1u16, 640u32, 360u32), (2, 320, 240), (7, 1280, 720)];
    let mut sent: Vec<Vec<Vec<u8>>> = vec![vec![]; 3];
    for i in 0..10u32 {
        for (k, &(sid, w, h)) in sizes.iter().enumerate() {
            let px = frame_pixels(PixelFormat::Bgrx, w, h, w as usize * 4, i);
            sent[k].push(px.clone());
            c.send(&inline_request(sid, Shape(PixelFormat::Bgrx, w, h, w as usize * 4), i, false, px)).unwrap();
        }
    }
    let mut got: Vec<Vec<Bytes>> = vec![vec![]; 3];
    for _ in 0..30 {
        let p = c.recv().unwrap();
        let k = sizes.iter().position(|s| s.0 == p.session_id).expect("known session");
        let r = response(p);
        assert_eq!(r.pts, got[k].len() as i64 * 33_333_333, "in order within session {}", sizes[k].0);
        got[k].push(r.to_annex_b());
    }
    for (k, &(sid, w, h)) in sizes.iter().enumerate() {
        let pics = decode_h264(&got[k], Output::Bgrx).unwrap();
        assert_eq!(pics.len(), 10, "session {sid}");
        assert!(!got[k][0].is_empty() && nal_types(&got[k][0]).contains(&5), "each session starts with an IDR");
        for (src, pic) in sent[k].iter().zip(&pics) {
            assert_eq!((pic.width, pic.height), (w, h));
            assert!(psnr_bgrx(src, w as usize * 4, &pic.data, w, h) >= 30.0);
        }
    }
    assert_eq!(host.handle.stats().len(), 3);
}

#[test]
fn several_connections_at_once() {
    let host = Arc::new(Host::x264());
    let threads: Vec<_> = (0..4)
        .map(|k| {
            let host = host.clone();
            std::thread::spawn(move || {
                let addr = if k % 2 == 0 { host.unix_addr() } else { host.tcp_addr() };
                stream_and_check(&host, &addr, PixelFormat::Bgrx, 640, 360, 15);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn resolution_change_mid_stream() {
    let host = Host::x264();
    let mut c = host.connect(&host.unix_addr());
    let mut aus = Vec::new();
    for (i, (w, h)) in [(640u32, 360u32); 5].into_iter().chain([(1280, 720); 5]).enumerate() {
        let px = frame_pixels(PixelFormat::Bgrx, w, h, w as usize * 4, i as u32);
        c.send(&inline_request(1, Shape(PixelFormat::Bgrx, w, h, w as usize * 4), i as u32, false, px)).unwrap();
        let r = response(c.recv().unwrap());
        assert_eq!(r.is_keyframe, i == 0 || i == 5, "frame {i}: IDR exactly at start and at the size change");
        aus.push(r.to_annex_b());
    }
    let pics = decode_h264(&aus, Output::Bgrx).unwrap();
    assert_eq!(pics.len(), 10);
    assert_eq!((pics[4].width, pics[5].width), (640, 1280));
}

#[test]
fn shared_memory_frames() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ivshmem");
    let size = 8 << 20;
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(size).unwrap();
    // The guest's view of the region: the same file, mapped writable.
    // SAFETY: the test's own file, sized above; the host only reads it.
    let mut region = unsafe { memmap2::MmapMut::map_mut(&file).unwrap() };
    let host = Host::start(HostConfig { encoder: EncoderKind::X264, shm_path: Some(path), ..Default::default() });
    let mut c = host.connect(&host.unix_addr());
    let hello = c.hello(hxfr_proto::features::SHM, TIMEOUT).unwrap();
    assert_eq!(hello.shm_size, size);
    assert!(hello.features & hxfr_proto::features::SHM != 0);

    let (w, h) = (1280u32, 720u32);
    let y_stride = 1280usize + 64; // padded strides, planes at arbitrary offsets
    let uv_off = 3 << 20;
    let mut sent = Vec::new();
    let mut aus = Vec::new();
    for i in 0..8u32 {
        let nv12 = pattern_nv12(w, h, y_stride, i);
        let base = 4096usize;
        region[base..base + y_stride * h as usize].copy_from_slice(&nv12[..y_stride * h as usize]);
        let uv_len = y_stride * (h as usize / 2);
        region[uv_off..uv_off + uv_len].copy_from_slice(&nv12[y_stride * h as usize..][..uv_len]);
        let req = ShmFrameRequest {
            width: w,
            height: h,
            format: Fourcc::NV12,
            num_planes: 2,
            planes: [
                ShmPlane { offset: base as u64, stride: y_stride as u32 },
                ShmPlane { offset: uv_off as u64, stride: y_stride as u32 },
            ],
            pts: i as i64,
            duration: 33_333_333,
            force_keyframe: false,
        };
        c.send(&Packet::new(1, Message::ShmFrameRequest(req))).unwrap();
        let r = response(c.recv().unwrap()); // the answer hands the area back
        assert_eq!(r.pts, i as i64);
        aus.push(r.to_annex_b());
        sent.push(nv12);
    }
    let pics = decode_h264(&aus, Output::Nv12).unwrap();
    assert_eq!(pics.len(), 8);
    for (src, pic) in sent.iter().zip(&pics) {
        assert!(psnr_nv12(src, y_stride, &pic.data, w, h) >= 30.0);
    }

    // Offsets and strides that leave the region are refused; the next good frame is served.
    let bad = |offset: u64, stride: u32| ShmFrameRequest {
        width: w,
        height: h,
        format: Fourcc::NV12,
        num_planes: 2,
        planes: [ShmPlane { offset, stride }, ShmPlane { offset: uv_off as u64, stride: y_stride as u32 }],
        pts: 99,
        duration: 0,
        force_keyframe: false,
    };
    for req in [bad(size - 100, y_stride as u32), bad(u64::MAX - 10, y_stride as u32), bad(0, 100), bad(size, 1280)] {
        c.send(&Packet::new(1, Message::ShmFrameRequest(req))).unwrap();
        assert_eq!(error_code(&c.recv().unwrap()), ErrorCode::InvalidMessage as i32);
    }
    let mut wrong_planes = bad(4096, y_stride as u32);
    wrong_planes.num_planes = 1;
    c.send(&Packet::new(1, Message::ShmFrameRequest(wrong_planes))).unwrap();
    assert_eq!(error_code(&c.recv().unwrap()), ErrorCode::InvalidMessage as i32);
    c.send(&Packet::new(1, Message::ShmFrameRequest(bad(4096, y_stride as u32)))).unwrap();
    assert_eq!(response(c.recv().unwrap()).pts, 99);
}

#[test]
fn shared_memory_request_without_a_region_is_an_error() {
    let host = Host::x264();
    let mut c = host.connect(&host.unix_addr());
    let req = ShmFrameRequest {
        width: 64,
        height: 64,
        format: Fourcc::ARGB8888,
        num_planes: 1,
        planes: [ShmPlane { offset: 0, stride: 256 }, ShmPlane::default()],
        pts: 0,
        duration: 0,
        force_keyframe: false,
    };
    c.send(&Packet::new(1, Message::ShmFrameRequest(req))).unwrap();
    match c.recv().unwrap().message {
        Message::Error { code, message } => {
            assert_eq!(code, -1);
            assert!(message.contains("shared-memory"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

fn good_frame(c: &mut Connection, pts: i64) {
    let px = frame_pixels(PixelFormat::Bgrx, 320, 240, 1280, 0);
    let mut p = inline_request(1, Shape(PixelFormat::Bgrx, 320, 240, 1280), 0, false, px);
    if let Message::FrameRequest(r) = &mut p.message {
        r.pts = pts;
    }
    c.send(&p).unwrap();
    assert_eq!(response(c.recv().unwrap()).pts, pts, "a good frame is still served");
}

fn raw(msg_type: u8, flags: u8, session_id: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Header { msg_type, flags, session_id, payload_size: payload.len() as u32 }.to_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let host = Host::x264();
    let mut c = host.connect(&host.unix_addr());
    good_frame(&mut c, 1);

    let req = FrameRequest {
        resource_id: 0,
        width: 320,
        height: 240,
        format: Fourcc::ARGB8888,
        stride: 1280,
        pts: 0,
        duration: 0,
        force_keyframe: false,
        pixels: Some(Bytes::from(vec![0u8; 1280 * 240])),
    };
    let cases: Vec<(FrameRequest, i32)> = vec![
        (FrameRequest { stride: 100, ..req.clone() }, -1), // stride below a row
        (FrameRequest { height: 480, ..req.clone() }, -1), // pixels run short
        (FrameRequest { format: Fourcc::from_chars(*b"YUYV"), ..req.clone() }, -1), // unsupported format
        (FrameRequest { width: 321, stride: 1284, ..req.clone() }, -1), // odd size
        (FrameRequest { width: 100_000, stride: 400_000, ..req.clone() }, -1), // absurd size
        (FrameRequest { resource_id: 42, pixels: None, ..req.clone() }, -2), // no resolver here
        (FrameRequest { pixels: None, ..req.clone() }, -1), // nothing to encode
    ];
    for (r, code) in cases {
        c.send(&Packet::new(1, Message::FrameRequest(r.clone()))).unwrap();
        let p = c.recv().unwrap();
        assert_eq!(error_code(&p), code, "for {:?}", FrameRequest { pixels: None, ..r });
    }
    good_frame(&mut c, 2);

    // A truncated body keeps its place: the ERROR comes back in order.
    let mut bytes = raw(msg_type::FRAME_REQUEST, 1, 1, &[0u8; 10]);
    c.tx.transport().try_clone().unwrap().write_all(&bytes).unwrap();
    assert_eq!(error_code(&c.recv().unwrap()), -1);
    // Unknown types are skipped silently; PING is answered.
    bytes = raw(0x99, 0, 1, b"from the future");
    c.tx.transport().try_clone().unwrap().write_all(&bytes).unwrap();
    c.send(&Packet::new(5, Message::Ping)).unwrap();
    assert_eq!(c.recv().unwrap(), Packet::new(5, Message::Pong));
    good_frame(&mut c, 3);
    let stats = host.handle.stats();
    assert_eq!(stats[0].info.dropped, 8, "every refused request is counted");
}

#[test]
fn lost_framing_closes_only_that_connection() {
    let host = Host::x264();
    let mut other = host.connect(&host.tcp_addr());
    good_frame(&mut other, 1);
    let oversize = Header { msg_type: 1, flags: 1, session_id: 1, payload_size: u32::MAX }.to_bytes().to_vec();
    let bad_magic = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    for garbage in [oversize, bad_magic] {
        let mut s = std::os::unix::net::UnixStream::connect(&host.unix).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(&garbage).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(std::io::Read::read(&mut s, &mut buf).unwrap(), 0, "host closes the connection, sends nothing");
        good_frame(&mut other, 2);
    }
    let mut fresh = host.connect(&host.unix_addr());
    good_frame(&mut fresh, 3);
}

#[test]
fn keyframe_request_and_ping() {
    let host = Host::x264();
    let mut c = host.connect(&host.unix_addr());
    let send = |c: &mut Connection, i: u32| {
        let px = frame_pixels(PixelFormat::Bgrx, 320, 240, 1280, i);
        c.send(&inline_request(1, Shape(PixelFormat::Bgrx, 320, 240, 1280), i, false, px)).unwrap();
        response(c.recv().unwrap()).is_keyframe
    };
    assert!(send(&mut c, 0));
    assert!(!send(&mut c, 1));
    c.send(&Packet::new(1, Message::KeyframeReq)).unwrap();
    assert!(send(&mut c, 2), "KEYFRAME_REQ makes the next frame an IDR");
    assert!(!send(&mut c, 3));
    c.send(&Packet::new(1, Message::Ping)).unwrap();
    assert_eq!(c.recv().unwrap().message, Message::Pong);
}

#[test]
fn config_request_is_answered_and_applied() {
    let host = Host::x264();
    let mut c = host.connect(&host.unix_addr());
    let cfg = ConfigReq {
        width: 640,
        height: 360,
        bitrate: 1_000_000,
        fps_num: 60,
        fps_den: 1,
        profile: 100,
        level_x10: 31,
        realtime: true,
    };
    c.send(&Packet::new(1, Message::ConfigReq(cfg))).unwrap();
    match c.recv().unwrap().message {
        Message::ConfigResp(r) => {
            assert_eq!((r.status, r.width, r.height, r.profile), (0, 640, 360, 100));
            assert_eq!(r.encoder, "x264");
        }
        other => panic!("{other:?}"),
    }
    let px = frame_pixels(PixelFormat::Bgrx, 640, 360, 2560, 0);
    c.send(&inline_request(1, Shape(PixelFormat::Bgrx, 640, 360, 2560), 0, true, px)).unwrap();
    let au = response(c.recv().unwrap()).to_annex_b();
    // SPS: start code, NAL header 0x67, then profile_idc.
    let sps = au.windows(5).position(|w| w[..4] == [0, 0, 0, 1] && w[4] & 0x1f == 7).unwrap();
    assert_eq!(au[sps + 5], 100, "High profile as configured");
}

#[test]
fn hello_resets_sessions_and_skips_stale_answers() {
    let host = Host::x264();
    let mut c = host.connect(&host.unix_addr());
    // A guest sends frames and "restarts" without reading the answers.
    for i in 0..3 {
        let px = frame_pixels(PixelFormat::Bgrx, 640, 360, 2560, i);
        c.send(&inline_request(1, Shape(PixelFormat::Bgrx, 640, 360, 2560), i, false, px)).unwrap();
    }
    let r = c.hello(0, TIMEOUT).unwrap();
    assert_eq!(r.version, hxfr_proto::PROTOCOL_VERSION);
    // The new conversation starts clean: its first frame is an IDR again.
    let px = frame_pixels(PixelFormat::Bgrx, 640, 360, 2560, 0);
    c.send(&inline_request(1, Shape(PixelFormat::Bgrx, 640, 360, 2560), 7, false, px)).unwrap();
    let r = response(c.recv().unwrap());
    assert_eq!(r.pts, 7 * 33_333_333);
    assert!(r.is_keyframe);
}

#[test]
fn half_closed_guest_gets_every_answer() {
    let host = Host::x264();
    let c = host.connect(&host.unix_addr());
    let (mut tx, mut rx) = c.split();
    for i in 0..6 {
        let px = frame_pixels(PixelFormat::Bgrx, 640, 360, 2560, i);
        tx.send(&inline_request(1, Shape(PixelFormat::Bgrx, 640, 360, 2560), i, false, px)).unwrap();
    }
    if let hxfr_guest::Transport::Unix(s) = tx.transport() {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    for i in 0..6 {
        assert_eq!(response(rx.recv().unwrap()).pts, i * 33_333_333);
    }
    assert!(rx.recv().is_err(), "then the host closes");
}

#[test]
fn session_limit_is_enforced_with_an_error() {
    let host = Host::start(HostConfig {
        encoder: EncoderKind::X264,
        limits: Limits { max_sessions: 2, ..Default::default() },
        ..Default::default()
    });
    let mut c = host.connect(&host.unix_addr());
    for sid in [1u16, 2, 3] {
        let px = frame_pixels(PixelFormat::Bgrx, 320, 240, 1280, 0);
        c.send(&inline_request(sid, Shape(PixelFormat::Bgrx, 320, 240, 1280), 0, false, px)).unwrap();
        let p = c.recv().unwrap();
        assert_eq!(p.session_id, sid);
        if sid == 3 {
            assert_eq!(error_code(&p), -1);
        } else {
            response(p);
        }
    }
}

#[test]
fn remote_tcp_needs_allow_remote() {
    let e = hxfr_host::spawn(HostConfig::default(), vec!["tcp:0.0.0.0:0".parse().unwrap()], vec![]).err().unwrap();
    assert!(e.to_string().contains("--allow-remote"), "{e}");
}

#[test]
fn oversize_inline_payload_is_refused_by_the_configured_limit() {
    let host = Host::start(HostConfig {
        encoder: EncoderKind::X264,
        limits: Limits { max_payload: 1 << 20, ..Default::default() },
        ..Default::default()
    });
    let mut c = host.connect(&host.unix_addr());
    let px = frame_pixels(PixelFormat::Bgrx, 640, 480, 2560, 0); // 1.2 MB > 1 MiB
    let _ = c.send(&inline_request(1, Shape(PixelFormat::Bgrx, 640, 480, 2560), 0, false, px));
    assert!(c.recv().is_err(), "connection closed");
}

#[test]
fn a_small_buffer_budget_slows_guests_but_serves_every_frame() {
    // 1 MiB for the whole host; frames of 0.9 MiB and 1.2 MiB (larger than
    // the budget itself) on several connections at once.
    let gate = Arc::new(GatedResolver::default());
    let resolver: Arc<dyn ResourceResolver> = gate.clone();
    let host = Arc::new(Host::start(HostConfig {
        encoder: EncoderKind::X264,
        limits: Limits { max_buffered: 1 << 20, ..Default::default() },
        resolver: Some(resolver),
        ..Default::default()
    }));
    let threads: Vec<_> = [(640u32, 360u32), (640, 480), (640, 360)]
        .into_iter()
        .map(|(w, h)| {
            let host = host.clone();
            std::thread::spawn(move || stream_and_check(&host, &host.unix_addr(), PixelFormat::Bgrx, w, h, 12))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    wait_for("the budget to be given back", || host.handle.buffers().in_use == 0);

    // Now prove the budget is what slowed them. Guest A's 0.9 MiB frame
    // queues behind a frame whose resource the gate holds, so it keeps its
    // share of the budget; guest B's 0.9 MiB frame then does not fit.
    gate.inner.insert(1, resolved_bgrx(320, 240, 0));
    let mut a = host.connect(&host.unix_addr());
    a.send(&resource_request(1, 1, 320, 240, 0)).unwrap();
    wait_for("the gate to hold A's first frame", || gate.held.load(Ordering::SeqCst) == 1);
    let px = frame_pixels(PixelFormat::Bgrx, 640, 360, 2560, 1);
    a.send(&inline_request(1, Shape(PixelFormat::Bgrx, 640, 360, 2560), 1, false, px)).unwrap();
    // Its payload (44-byte body + pixels), in KiB.
    let a_share = (44 + 640 * 360 * 4u64).div_ceil(1024) * 1024;
    wait_for("A's frame to hold 901 KiB", || host.handle.buffers().in_use == a_share);
    let b = host.connect(&host.unix_addr());
    let (mut b_tx, mut b_rx) = b.split();
    let b_sender = std::thread::spawn(move || {
        let px = frame_pixels(PixelFormat::Bgrx, 640, 360, 2560, 2);
        b_tx.send(&inline_request(1, Shape(PixelFormat::Bgrx, 640, 360, 2560), 2, false, px)).unwrap();
        b_tx
    });
    wait_for("B to wait for room", || host.handle.buffers().waiting == 1);
    let gauge = host.handle.buffers();
    assert_eq!((gauge.in_use, gauge.limit), (a_share, 1 << 20), "B's frame is not taken on while A's holds the room");
    b_rx.set_timeout(Some(Duration::from_millis(200))).unwrap();
    assert!(b_rx.recv().is_err_and(|e| e.is_timeout()), "B is not answered while it waits");
    b_rx.set_timeout(Some(TIMEOUT)).unwrap();
    gate.open();
    assert_eq!(response(a.recv().unwrap()).pts, 0);
    assert_eq!(response(a.recv().unwrap()).pts, 33_333_333);
    assert_eq!(response(b_rx.recv().unwrap()).pts, 2 * 33_333_333, "B is served once A's frame is encoded");
    let _b_tx = b_sender.join().unwrap();
    wait_for("the budget to be given back", || {
        host.handle.buffers() == BufferGauge { in_use: 0, limit: 1 << 20, waiting: 0 }
    });
}

/// A resolver double that holds every resolution until its gate opens.
#[derive(Default)]
struct GatedResolver {
    inner: MemoryResolver,
    open: Mutex<bool>,
    cv: Condvar,
    /// Resolutions waiting at the gate.
    held: AtomicUsize,
}

impl GatedResolver {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl ResourceResolver for GatedResolver {
    fn resolve(&self, id: u32) -> Result<Resolved, ResolveError> {
        self.held.fetch_add(1, Ordering::SeqCst);
        let open = self.open.lock().unwrap();
        drop(self.cv.wait_while(open, |open| !*open).unwrap());
        self.held.fetch_sub(1, Ordering::SeqCst);
        self.inner.resolve(id)
    }
}

/// A BGRx test picture as a resolved resource (stride padded past the row).
fn resolved_bgrx(w: u32, h: u32, i: u32) -> Resolved {
    let stride = w * 4 + 256;
    let data = Bytes::from(frame_pixels(PixelFormat::Bgrx, w, h, stride as usize, i));
    Resolved { data, layout: hxfr_proto::Layout::inline(PixelFormat::Bgrx, w, h, stride) }
}

fn resource_request(session: u16, id: u32, w: u32, h: u32, i: u32) -> Packet {
    let r = frame_request(PixelFormat::Bgrx, w, h, w * 4, None);
    Packet::new(session, Message::FrameRequest(FrameRequest { resource_id: id, pts: i as i64 * 33_333_333, ..r }))
}

fn resolver_host(resolver: Arc<MemoryResolver>) -> Host {
    let resolver: Arc<dyn ResourceResolver> = resolver;
    Host::start(HostConfig { encoder: EncoderKind::X264, resolver: Some(resolver), ..Default::default() })
}

#[test]
fn resource_frames_are_resolved_and_encoded() {
    let resources = Arc::new(MemoryResolver::default());
    let host = resolver_host(resources.clone());
    let mut c = host.connect(&host.unix_addr());
    let hello = c.hello(hxfr_proto::features::RESOURCE, TIMEOUT).unwrap();
    assert!(hello.features & hxfr_proto::features::RESOURCE != 0, "the host offers resource frames");
    c.rx_timeout(TIMEOUT);
    let (w, h) = (640, 360);
    let (mut sent, mut aus) = (Vec::new(), Vec::new());
    for i in 0..8 {
        // The guest draws into its resource, then names it.
        let r = resolved_bgrx(w, h, i);
        sent.push((r.data.clone(), r.layout.strides[0] as usize));
        resources.insert(5, r);
        c.send(&resource_request(1, 5, w, h, i)).unwrap();
        let r = response(c.recv().unwrap());
        assert_eq!(r.pts, i as i64 * 33_333_333);
        aus.push(r.to_annex_b());
    }
    let pics = decode_h264(&aus, Output::Bgrx).unwrap();
    assert_eq!(pics.len(), 8);
    for (i, ((src, stride), pic)) in sent.iter().zip(&pics).enumerate() {
        let p = psnr_bgrx(src, *stride, &pic.data, w, h);
        assert!(p >= 30.0, "frame {i}: PSNR {p:.1} dB");
    }
    let s = &host.handle.stats()[0].info;
    assert_eq!((s.frames, s.dropped, s.width, s.height), (8, 0, w, h));
}

#[test]
fn resource_errors_are_answered_and_the_session_goes_on() {
    let resources = Arc::new(MemoryResolver::default());
    let host = resolver_host(resources.clone());
    let mut c = host.connect(&host.unix_addr());
    resources.insert(5, resolved_bgrx(640, 360, 0));

    c.send(&resource_request(1, 99, 640, 360, 0)).unwrap();
    let p = c.recv().unwrap();
    assert_eq!(error_code(&p), ErrorCode::ResourceNotFound as i32, "an unknown id");

    for (w, h, format, says) in [
        (1280, 720, Fourcc::ARGB8888, "resource 5 is 640x360 Bgrx, the request says 1280x720 Bgrx"),
        (640, 360, Fourcc::NV12, "resource 5 is 640x360 Bgrx, the request says 640x360 Nv12"),
    ] {
        let mut req = resource_request(1, 5, w, h, 1);
        if let Message::FrameRequest(r) = &mut req.message {
            r.format = format;
        }
        c.send(&req).unwrap();
        match c.recv().unwrap().message {
            Message::Error { code, message } => {
                assert_eq!(code, ErrorCode::InvalidMessage as i32);
                assert_eq!(message, says);
            }
            other => panic!("expected ERROR, got {other:?}"),
        }
    }
    // Freed: -2; the same session still encodes what exists.
    resources.insert(6, resolved_bgrx(640, 360, 0));
    resources.remove(5);
    c.send(&resource_request(1, 5, 640, 360, 2)).unwrap();
    assert_eq!(error_code(&c.recv().unwrap()), ErrorCode::ResourceNotFound as i32, "a freed id");
    c.send(&resource_request(1, 6, 640, 360, 3)).unwrap();
    assert!(response(c.recv().unwrap()).is_keyframe);
    assert_eq!(host.handle.stats()[0].info.dropped, 4);
}

#[test]
fn varying_frame_durations_do_not_restart_the_encoder() {
    // A damage-driven source: durations jump around; only the first frame is an IDR.
    let host = Host::x264();
    let mut c = host.connect(&host.unix_addr());
    for (i, d) in [33_333_333i64, 16_666_666, 100_000_000, 41_000_000, 33_333_333, 8_000_000].into_iter().enumerate() {
        let px = frame_pixels(PixelFormat::Bgrx, 320, 240, 1280, i as u32);
        let mut p = inline_request(1, Shape(PixelFormat::Bgrx, 320, 240, 1280), i as u32, false, px);
        if let Message::FrameRequest(r) = &mut p.message {
            r.duration = d;
        }
        c.send(&p).unwrap();
        assert_eq!(response(c.recv().unwrap()).is_keyframe, i == 0, "frame {i}");
    }
}
