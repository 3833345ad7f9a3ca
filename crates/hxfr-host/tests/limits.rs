//! What hostile or broken guests can make the host hold, and for how long
//! (issue 18): connection slots, buffered bytes, encoders. Loopback UNIX
//! sockets only; every wait polls for its condition with a deadline.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hxfr_encode::EncoderKind;
use hxfr_guest::Connection;
use hxfr_host::{EncoderGauge, HostConfig, Limits, MessageDeadline};
use hxfr_proto::{ErrorCode, FrameDecoder, Header, Message, Packet, msg_type};

mod common;
use common::{Host, TIMEOUT, bgrx_frame, wait_for};

/// Deadlines short enough for a test: 1 s, or 64 MB/s.
const QUICK: MessageDeadline = MessageDeadline { floor: Duration::from_secs(1), min_rate: 64_000_000 };

/// A connection that is not a guest: it writes raw bytes.
fn raw(host: &Host) -> UnixStream {
    let s = UnixStream::connect(&host.unix).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

fn frame(session: u16, w: u32, h: u32) -> Packet {
    let px: Vec<u8> = (0..w * h * 4).map(|i| (i % 251) as u8).collect();
    bgrx_frame(session, w, h, Bytes::from(px))
}

/// Sends a frame and returns the answer.
fn ask(c: &mut Connection, session: u16, w: u32, h: u32) -> Packet {
    c.send(&frame(session, w, h)).unwrap();
    let p = c.recv().unwrap();
    assert_eq!(p.session_id, session);
    p
}

fn keyframe(p: &Packet) -> bool {
    match &p.message {
        Message::FrameResponse(r) => r.is_keyframe,
        other => panic!("expected FRAME_RESPONSE, got {other:?}"),
    }
}

fn error(p: &Packet) -> (i32, &str) {
    match &p.message {
        Message::Error { code, message } => (*code, message),
        other => panic!("expected ERROR, got {other:?}"),
    }
}

/// Reads until the host closes; how long that took.
fn closed_after(s: &mut UnixStream) -> Duration {
    let t = Instant::now();
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return t.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return t.elapsed(),
            Err(e) => panic!("the host did not close the connection: {e}"),
        }
    }
}

/// Rows 4 and 10 of issue 18. Guests trickling a header one byte at a time
/// (never silent for long) hold every slot; a guest over the limit is
/// answered ERROR and closed at once; each trickler is closed when its
/// message's deadline passes, not a polling period later; then a good guest
/// is served.
#[test]
fn trickling_guests_lose_their_slots_and_a_guest_over_the_limit_is_told() {
    let host = Host::with_limits(Limits { max_connections: 4, message_deadline: QUICK, ..Default::default() });
    let header = Header { msg_type: msg_type::FRAME_REQUEST, flags: 1, session_id: 1, payload_size: 1000 }.to_bytes();
    let tricklers: Vec<(UnixStream, Instant)> = (0..4)
        .map(|_| {
            let s = raw(&host);
            let mut w = s.try_clone().unwrap();
            w.write_all(&header[..1]).unwrap(); // the message's clock starts
            let started = Instant::now();
            std::thread::spawn(move || {
                // A byte every 150 ms: the header alone would take 1.65 s.
                for b in &header[1..] {
                    std::thread::sleep(Duration::from_millis(150));
                    if w.write_all(&[*b]).is_err() {
                        return;
                    }
                }
            });
            (s, started)
        })
        .collect();

    let mut fifth = raw(&host);
    let p = hxfr_proto::io::read_packet(&mut fifth, &mut FrameDecoder::default(), &mut Default::default()).unwrap();
    let (code, message) = error(&p);
    assert_eq!(code, ErrorCode::Internal as i32);
    assert!(message.contains("--max-connections 4"), "{message}");
    assert!(closed_after(&mut fifth) < Duration::from_secs(2), "and closed");

    for (mut s, started) in tricklers {
        closed_after(&mut s);
        let took = started.elapsed();
        assert!(
            took >= QUICK.floor && took < QUICK.floor + Duration::from_millis(600),
            "a trickler closed {took:?} after its first byte (deadline {:?})",
            QUICK.floor
        );
    }
    wait_for("a good guest to be served", || {
        let mut c = host.connect(&host.unix_addr());
        c.send(&frame(1, 64, 64)).is_ok() && c.recv().is_ok_and(|p| matches!(p.message, Message::FrameResponse(_)))
    });
}

/// Row 5 of issue 18. A header promising 64 MiB takes its room in the
/// budget before a byte of payload is read: one such guest holds the whole
/// (8 MiB) budget, the next waits without being read, a good guest's frame
/// waits too; each is closed at its own deadline (size at the minimum rate,
/// not counting its wait for room), and then the good frame is served.
#[test]
fn a_huge_header_takes_budget_before_its_payload_and_only_until_its_deadline() {
    let budget = 8 << 20;
    let host = Host::with_limits(Limits { max_buffered: budget, message_deadline: QUICK, ..Default::default() });
    let promise = (64 << 20) - 1;
    let header = Header { msg_type: msg_type::FRAME_REQUEST, flags: 1, session_id: 1, payload_size: promise };
    let allowance = QUICK.allowance(12 + promise as u64);
    let mut holders = Vec::new();
    for k in 0..2 {
        let s = raw(&host);
        let mut w = s.try_clone().unwrap();
        w.write_all(&header.to_bytes()).unwrap();
        let started = Instant::now();
        // 2 MiB of the payload, then nothing: blocks while the host does not read.
        std::thread::spawn(move || w.write_all(&vec![0u8; 2 << 20]));
        holders.push((s, started));
        wait_for("the first to hold the whole budget, the next to wait", || {
            let g = host.handle.buffers();
            (g.in_use, g.waiting) == (budget, k)
        });
    }
    let mut good = host.connect(&host.unix_addr());
    good.send(&frame(1, 32, 32)).unwrap();
    wait_for("the good frame to wait for room", || host.handle.buffers().waiting == 2);

    let slack = Duration::from_millis(600);
    let (mut first, t0) = holders.remove(0);
    closed_after(&mut first);
    let took = t0.elapsed();
    assert!(took >= allowance && took < allowance + slack, "first closed after {took:?}, deadline {allowance:?}");
    let first_closed = Instant::now();
    let (mut second, _) = holders.remove(0);
    closed_after(&mut second);
    // Its clock ran only once it had room: from the first one's close.
    let took = first_closed.elapsed();
    let early = Duration::from_millis(20); // the first one's close was seen a little late
    assert!(took + early >= allowance && took < allowance + slack, "second closed {took:?} after the first");
    let p = good.recv().unwrap();
    assert!(keyframe(&p), "the good frame is served");
    wait_for("the budget to be free", || host.handle.buffers().in_use == 0);
}

/// Row 6 of issue 18: an idle session's encoder is closed; a busy one's is not.
#[test]
fn an_idle_session_releases_its_encoder() {
    let host = Host::with_limits(Limits { encoder_idle: Duration::from_millis(300), ..Default::default() });
    let mut c = host.connect(&host.unix_addr());
    assert!(keyframe(&ask(&mut c, 1, 320, 240)));
    for _ in 0..6 {
        // A frame every 100 ms: busy, the encoder stays (no new IDR).
        std::thread::sleep(Duration::from_millis(100));
        assert!(!keyframe(&ask(&mut c, 1, 320, 240)));
        assert_eq!(host.handle.encoders(), EncoderGauge { live: 1, pixels: 320 * 240 });
    }
    wait_for("the idle encoder to be closed", || host.handle.encoders().live == 0);
    assert!(keyframe(&ask(&mut c, 1, 320, 240)), "the next frame opens a new encoder, at an IDR");
    assert_eq!(host.handle.encoders().live, 1);
}

/// Row 6 of issue 18: live encoders and their pixels are capped host-wide,
/// and a session over a cap is told which.
#[test]
fn encoder_caps_answer_error_until_an_encoder_closes() {
    let host = Host::with_limits(Limits { max_encoders: 2, max_encoder_pixels: 1_500_000, ..Default::default() });
    let mut a = host.connect(&host.unix_addr());
    let mut b = host.connect(&host.unix_addr());
    assert!(keyframe(&ask(&mut a, 1, 1280, 720)));
    let p = ask(&mut b, 1, 1280, 720);
    let (code, message) = error(&p);
    assert_eq!(code, ErrorCode::EncodeFailed as i32);
    assert!(message.contains("--max-encoder-mpix"), "{message}");
    assert!(keyframe(&ask(&mut b, 2, 320, 240)));
    let p = ask(&mut b, 3, 320, 240);
    let (code, message) = error(&p);
    assert_eq!(code, ErrorCode::EncodeFailed as i32);
    assert!(message.contains("--max-encoders 2"), "{message}");
    assert_eq!(host.handle.encoders(), EncoderGauge { live: 2, pixels: 1280 * 720 + 320 * 240 });
    drop(a);
    wait_for("the gone guest's encoder to close", || host.handle.encoders().live == 1);
    assert!(keyframe(&ask(&mut b, 3, 320, 240)), "served once there is room");
}

/// A virtio-serial guest that died half-way through a frame: the restarted
/// guest's HELLO lands inside the dead message. The host drops that message
/// once the port has been quiet for the stall time and answers the HELLO at
/// once (it used to wait for more bytes first).
#[test]
fn a_serial_port_drops_a_cut_off_message_and_answers_the_next_at_once() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("hxfr_host=debug").try_init();
    let dir = tempfile::tempdir().unwrap();
    let chardev = dir.path().join("chardev.sock");
    let listener = UnixListener::bind(&chardev).unwrap();
    let config = HostConfig { encoder: EncoderKind::X264, ..Default::default() };
    let _host = hxfr_host::spawn(config, vec![], vec![chardev.clone()]).unwrap();
    let (mut port, _) = listener.accept().unwrap();
    port.set_read_timeout(Some(TIMEOUT)).unwrap();

    let header = Header { msg_type: msg_type::FRAME_REQUEST, flags: 1, session_id: 1, payload_size: 1 << 20 };
    port.write_all(&header.to_bytes()).unwrap();
    port.write_all(&vec![7u8; 300 << 10]).unwrap();
    let hello = hxfr_proto::Hello { nonce: 42, version: hxfr_proto::PROTOCOL_VERSION, features: 0 };
    let mut bytes = bytes::BytesMut::new();
    Packet::new(0, Message::Hello(hello)).encode(&mut bytes);
    port.write_all(&bytes).unwrap();
    let sent = Instant::now();
    let p = hxfr_proto::io::read_packet(&mut port, &mut FrameDecoder::default(), &mut Default::default()).unwrap();
    let took = sent.elapsed();
    match p.message {
        Message::HelloResp(r) => assert_eq!(r.nonce, 42),
        other => panic!("expected HELLO_RESP, got {other:?}"),
    }
    let stall = Duration::from_secs(2);
    assert!(took >= stall && took < stall + Duration::from_millis(600), "answered {took:?} after the HELLO");
}
