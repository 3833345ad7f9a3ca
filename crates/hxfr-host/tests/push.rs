//! Scanout push mode (SUBSCRIBE) over a real UNIX socket, with an in-memory
//! scanout source standing in for the GPU device. The subscriber keeps
//! Helix's rules: SUBSCRIBE, SUBSCRIBE_RESP as the very next message,
//! CONFIG_REQ, then nothing but FRAME_RESPONSEs with one entry each.

use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hxfr_encode::EncoderKind;
use hxfr_host::{Flip, HostConfig, MemoryScanouts, Peer, ResolveError, Resolved, ScanoutSource};
use hxfr_proto::io::{read_packet, write_packet};
use hxfr_proto::{ConfigReq, DecodeError, FrameDecoder, FrameResponse, Layout, Message, Packet, PixelFormat};
use hxfr_testkit::{Content, Output, bgrx_to_nv12, decode_h264, nal_types, pattern_bgrx, psnr_nv12};

mod common;
use common::{Host, TIMEOUT};

const W: u32 = 320;
const H: u32 = 192;
/// How long "nothing comes" is watched for.
const QUIET: Duration = Duration::from_millis(300);

fn start(scanouts: &Arc<MemoryScanouts>) -> Host {
    Host::start(HostConfig { encoder: EncoderKind::X264, scanouts: Some(scanouts.clone()), ..Default::default() })
}

fn pattern(i: u32) -> Vec<u8> {
    pattern_bgrx(Content::Motion, W, H, W as usize * 4, i)
}

fn picture(px: Vec<u8>) -> Resolved {
    Resolved { data: Bytes::from(px), layout: Layout::inline(PixelFormat::Bgrx, W, H, W * 4) }
}

/// Pixels that compress badly: large access units.
fn noise(seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..W * H * 4)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A subscriber that behaves exactly like Helix's (`hxfr_testkit`'s), whose
/// every breach of Helix's rules fails the test.
struct Subscriber(hxfr_testkit::subscriber::Subscriber);

impl Subscriber {
    /// Subscribes; `None` when refused. Then sends Helix's CONFIG_REQ.
    fn subscribe(host: &Host, scanout: u32, bitrate: u32) -> Option<Subscriber> {
        let config = hxfr_testkit::subscriber::helix_config(W, H, bitrate);
        hxfr_testkit::subscriber::Subscriber::subscribe(&host.unix, scanout, config).unwrap().map(Subscriber)
    }

    /// A connection for `scanout` that has not subscribed.
    fn connect(host: &Host, scanout: u32) -> Subscriber {
        Subscriber(hxfr_testkit::subscriber::Subscriber::connect(&host.unix, scanout).unwrap())
    }

    fn send(&mut self, m: Message) {
        self.0.send(m).unwrap()
    }

    /// The next message, or `None` when none came within `t`.
    fn read(&mut self, t: Duration) -> Option<Packet> {
        self.0.read(t).unwrap()
    }

    /// The next frame, or `None` when none came within `t`. Anything but a
    /// FRAME_RESPONSE with one entry for this scanout fails, as it would
    /// end Helix's stream.
    fn frame(&mut self, t: Duration) -> Option<FrameResponse> {
        self.0.frame(t).unwrap()
    }

    /// Frames until the one with pts `pts` (the flip's time).
    fn frames_until(&mut self, pts: u64) -> Vec<FrameResponse> {
        let deadline = Instant::now() + TIMEOUT;
        let mut got = Vec::new();
        while got.last().is_none_or(|r: &FrameResponse| r.pts != pts as i64) {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self.frame(left).unwrap_or_else(|| panic!("no frame with pts {pts} after {} frames", got.len()));
            got.push(r);
        }
        got
    }

    /// Asserts nothing arrives for [`QUIET`].
    fn assert_quiet(&mut self, what: &str) {
        if let Some(p) = self.read(QUIET) {
            panic!("{what}: expected nothing, got {}", p.message.name());
        }
    }
}

fn assert_idr(r: &FrameResponse) {
    assert!(r.is_keyframe, "an IDR");
    let t = nal_types(&r.nals[0]);
    assert!(t.starts_with(&[7, 8]) || t.starts_with(&[9, 7, 8]), "SPS/PPS in front of the IDR: {t:?}");
    assert!(t.contains(&5), "an IDR slice: {t:?}");
}

/// Decodes a subscriber's frames and compares each with the picture it
/// should show, in YUV with the stream's colorimetry.
fn assert_pictures(frames: &[FrameResponse], shown: &[Vec<u8>]) {
    assert_eq!(frames.len(), shown.len());
    let aus: Vec<Bytes> = frames.iter().map(|r| r.nals[0].clone()).collect();
    let pics = decode_h264(&aus, Output::Nv12).unwrap();
    assert_eq!(pics.len(), frames.len(), "every frame decodes");
    for (i, (pic, px)) in pics.iter().zip(shown).enumerate() {
        let want = bgrx_to_nv12(px, W, H, W as usize * 4, &pic.colorimetry).unwrap();
        let p = psnr_nv12(&want, W as usize, &pic.data, W, H);
        assert!(p >= 40.0, "frame {i}: PSNR {p:.1} dB");
    }
}

#[test]
fn a_helix_subscriber_gets_every_flip_decodable_and_starts_at_an_idr() {
    let scanouts = Arc::new(MemoryScanouts::default());
    let host = start(&scanouts);
    let first = scanouts.flip(0, picture(pattern(0)));
    let mut sub = Subscriber::subscribe(&host, 0, 4_000_000).expect("scanout 0 exists");
    let mut frames = vec![sub.frame(TIMEOUT).expect("the picture shown when it subscribed")];
    assert_idr(&frames[0]);
    assert_eq!(frames[0].pts, first.at_ns as i64, "pts is the flip's CLOCK_MONOTONIC time");
    let mut shown = vec![pattern(0)];
    for i in 1..12 {
        let px = pattern(i);
        let flip = scanouts.flip(0, picture(px.clone()));
        let r = sub.frame(TIMEOUT).expect("a frame for the flip");
        assert_eq!((r.pts, r.dts), (flip.at_ns as i64, flip.at_ns as i64), "frame {i}");
        assert!(!r.is_keyframe, "frame {i}: no IDR but the first");
        frames.push(r);
        shown.push(px);
    }
    sub.assert_quiet("no flip");
    assert_pictures(&frames, &shown);
}

#[test]
fn a_still_scanout_sends_nothing() {
    let scanouts = Arc::new(MemoryScanouts::default());
    let host = start(&scanouts);
    scanouts.add(2); // enabled, nothing shown yet
    let mut sub = Subscriber::subscribe(&host, 2, 0).expect("scanout 2 exists");
    sub.assert_quiet("nothing shown yet");
    let flip = scanouts.flip(2, picture(pattern(5)));
    let r = sub.frame(TIMEOUT).expect("the first flip's frame");
    assert_idr(&r);
    assert_eq!(r.pts, flip.at_ns as i64);
    sub.assert_quiet("one flip, one frame");
    assert_eq!(host.handle.encoders().live, 1, "one encoder, idle");
    let stats = host.handle.stats();
    assert_eq!(stats.len(), 1);
    let info = &stats[0].info;
    assert_eq!((info.session_id, info.frames, info.keyframes, info.dropped), (2, 1, 1, 0), "{info:?}");
    assert_eq!((info.peer.as_str(), info.encoder.as_str(), info.width), ("scanout 2 (push)", "x264", W));
    drop(sub);
    common::wait_for("the encoder to close with its last subscriber", || host.handle.encoders().live == 0);
}

#[test]
fn a_burst_of_flips_is_coalesced_and_the_newest_picture_wins() {
    let scanouts = Arc::new(MemoryScanouts::default());
    let host = start(&scanouts);
    scanouts.flip(0, picture(pattern(0)));
    let mut sub = Subscriber::subscribe(&host, 0, 4_000_000).unwrap();
    let mut frames = vec![sub.frame(TIMEOUT).unwrap()];
    let pictures: Vec<Vec<u8>> = (1..=30).map(pattern).collect();
    let flips: Vec<Flip> = pictures.iter().map(|px| scanouts.flip(0, picture(px.clone()))).collect();
    let last = flips.last().unwrap();
    frames.extend(sub.frames_until(last.at_ns));
    // Nothing more, but for one IDR of that same newest picture: a CONFIG_REQ
    // that reached a loaded host after its grace re-encodes what is shown.
    if let Some(r) = sub.frame(QUIET) {
        assert!(r.is_keyframe && r.pts == last.at_ns as i64, "a frame after the newest picture was sent");
        sub.assert_quiet("the newest picture was sent");
    }
    assert!(frames.len() - 1 < flips.len(), "{} frames for {} flips", frames.len() - 1, flips.len());
    // Every frame carries one of the flips' times, in order; the last shows the newest picture.
    let mut at = flips.iter().map(|f| f.at_ns as i64).peekable();
    for r in &frames[1..] {
        assert!(at.by_ref().any(|t| t == r.pts), "pts {} is a flip's, in order", r.pts);
    }
    let aus: Vec<Bytes> = frames.iter().map(|r| r.nals[0].clone()).collect();
    let pics = decode_h264(&aus, Output::Nv12).unwrap();
    let newest = pics.last().unwrap();
    let want = bgrx_to_nv12(pictures.last().unwrap(), W, H, W as usize * 4, &newest.colorimetry).unwrap();
    let p = psnr_nv12(&want, W as usize, &newest.data, W, H);
    assert!(p >= 40.0, "the last frame shows the newest picture: PSNR {p:.1} dB");
}

#[test]
fn two_subscribers_share_one_encoder_and_a_late_joiner_starts_at_an_idr() {
    let scanouts = Arc::new(MemoryScanouts::default());
    let host = start(&scanouts);
    scanouts.flip(0, picture(pattern(0)));
    let mut a = Subscriber::subscribe(&host, 0, 0).unwrap();
    let mut a_frames = vec![a.frame(TIMEOUT).unwrap()];
    let mut a_shown = vec![pattern(0)];
    for i in 1..4 {
        let flip = scanouts.flip(0, picture(pattern(i)));
        a_frames.extend(a.frames_until(flip.at_ns));
        a_shown.push(pattern(i));
    }
    let mut b = Subscriber::subscribe(&host, 0, 0).unwrap();
    let b_first = b.frame(TIMEOUT).unwrap();
    assert_idr(&b_first);
    // The joiner's IDR went to both: one encoder, one stream.
    let a_idr = a.frame(TIMEOUT).unwrap();
    assert_eq!((a_idr.pts, &a_idr.nals), (b_first.pts, &b_first.nals));
    assert!(b_first.pts > a_frames.last().unwrap().pts, "pts keeps rising across the repeat");
    a_frames.push(a_idr);
    a_shown.push(pattern(3));
    let mut b_frames = vec![b_first];
    let mut b_shown = vec![pattern(3)];
    for i in 4..10 {
        let flip = scanouts.flip(0, picture(pattern(i)));
        let (ra, rb) = (a.frame(TIMEOUT).unwrap(), b.frame(TIMEOUT).unwrap());
        assert_eq!((ra.pts, &ra.nals), (flip.at_ns as i64, &rb.nals), "the same access unit to both");
        a_frames.push(ra);
        b_frames.push(rb);
        a_shown.push(pattern(i));
        b_shown.push(pattern(i));
    }
    assert_eq!(host.handle.encoders().live, 1, "one encoder for the scanout");
    assert_pictures(&a_frames, &a_shown);
    assert_pictures(&b_frames, &b_shown);
}

#[test]
fn keyframe_req_gets_an_idr_of_the_picture_shown_now() {
    let scanouts = Arc::new(MemoryScanouts::default());
    let host = start(&scanouts);
    scanouts.flip(1, picture(pattern(0)));
    let mut sub = Subscriber::subscribe(&host, 1, 0).unwrap();
    let mut frames = vec![sub.frame(TIMEOUT).unwrap()];
    let flip = scanouts.flip(1, picture(pattern(1)));
    frames.extend(sub.frames_until(flip.at_ns));
    assert!(!frames[1].is_keyframe);
    sub.send(Message::KeyframeReq);
    let r = sub.frame(TIMEOUT).expect("an IDR without a flip");
    assert_idr(&r);
    assert!(r.pts > flip.at_ns as i64, "a repeat carries the time it was encoded");
    frames.push(r);
    sub.assert_quiet("one request, one IDR");
    // It asked for a PONG: that is the one other message it gets.
    sub.send(Message::Ping);
    let p = sub.read(TIMEOUT).unwrap();
    assert_eq!((p.session_id, p.message), (1, Message::Pong));
    assert_pictures(&frames, &[pattern(0), pattern(1), pattern(1)]);
}

#[test]
fn a_stalled_subscriber_does_not_slow_another_and_resumes_at_an_idr() {
    const N: u32 = 60;
    const EVERY: Duration = Duration::from_millis(25);
    let scanouts = Arc::new(MemoryScanouts::default());
    let host = start(&scanouts);
    scanouts.flip(0, picture(noise(0)));
    // 20 Mbit/s of noise: tens of KB a frame, so the stalled socket fills fast.
    let mut stalled = Subscriber::subscribe(&host, 0, 20_000_000).unwrap();
    let mut live = Subscriber::subscribe(&host, 0, 20_000_000).unwrap();
    let mut live_frames = vec![live.frame(TIMEOUT).unwrap()];
    assert_idr(&live_frames[0]);
    let pictures: Vec<Vec<u8>> = (1..=N).map(noise).collect();
    let started = Instant::now();
    let source = scanouts.clone();
    let flipper = std::thread::spawn(move || {
        let mut flips = Vec::new();
        for px in pictures {
            flips.push(source.flip(0, picture(px)));
            std::thread::sleep(EVERY);
        }
        flips
    });
    // The live one reads as frames come, until the flips stop.
    while let Some(r) = live.frame(Duration::from_secs(2)) {
        live_frames.push(r);
        if live_frames.len() as u32 > N {
            break;
        }
    }
    let took = started.elapsed();
    let flips = flipper.join().unwrap();
    let got = &live_frames[1..];
    let n = got.len();
    assert_eq!(got.last().unwrap().pts, flips.last().unwrap().at_ns as i64, "the live one got the last flip");
    assert!(n as u32 >= N * 9 / 10, "the live one kept its rate: {n} frames for {N} flips");
    assert!(got.iter().all(|r| !r.is_keyframe), "the stalled one costs the live one no IDRs");
    assert!(took < EVERY * N + Duration::from_secs(3), "{took:?} for {N} flips every {EVERY:?}");
    assert_eq!(
        decode_h264(&live_frames.iter().map(|r| r.nals[0].clone()).collect::<Vec<_>>(), Output::Nv12).unwrap().len(),
        n + 1
    );

    // The stalled one kept a bounded backlog: what its socket holds and a
    // few queued frames, not every flip.
    let mut backlog = Vec::new();
    while let Some(r) = stalled.frame(Duration::from_millis(500)) {
        backlog.push(r);
    }
    let bytes: usize = backlog.iter().map(|r| r.nals[0].len()).sum();
    assert!(backlog.len() < (N as usize) / 2, "{} frames were kept for the stalled one", backlog.len());
    assert!(bytes < 2 << 20, "{bytes} bytes were kept for the stalled one");
    assert_idr(&backlog[0]);
    // Reading again, it resumes at an IDR.
    let flip = scanouts.flip(0, picture(noise(1000)));
    let r = stalled.frame(TIMEOUT).expect("a frame once it reads again");
    assert_idr(&r);
    assert_eq!(r.pts, flip.at_ns as i64);
    backlog.push(r);
    let aus: Vec<Bytes> = backlog.iter().map(|r| r.nals[0].clone()).collect();
    assert_eq!(decode_h264(&aus, Output::Nv12).unwrap().len(), backlog.len(), "its stream decodes across the gap");
    let r = live.frame(TIMEOUT).unwrap();
    assert_eq!(r.pts, flip.at_ns as i64, "the live one gets that IDR too");
}

#[test]
fn an_unknown_scanout_is_refused_and_the_connection_still_serves_ping() {
    let scanouts = Arc::new(MemoryScanouts::default());
    let host = start(&scanouts);
    scanouts.add(0);
    let mut c = Subscriber::connect(&host, 7);
    c.send(Message::Subscribe { scanout_id: 7 });
    let p = c.read(TIMEOUT).unwrap();
    assert_eq!((p.session_id, p.message), (7, Message::SubscribeResp { scanout_id: 7, success: false }));
    c.send(Message::Ping);
    let p = c.read(TIMEOUT).unwrap();
    assert_eq!((p.session_id, p.message), (7, Message::Pong));
    assert!(c.read(QUIET).is_none());
    // A host without scanouts says no too.
    let bare = Host::x264();
    assert!(Subscriber::subscribe(&bare, 0, 0).is_none());
}

#[test]
fn a_removed_scanout_ends_its_subscribers_stream() {
    let scanouts = Arc::new(MemoryScanouts::default());
    let host = start(&scanouts);
    scanouts.flip(3, picture(pattern(0)));
    let mut sub = Subscriber::subscribe(&host, 3, 0).unwrap();
    assert_idr(&sub.frame(TIMEOUT).unwrap());
    scanouts.remove(3);
    match sub.0.read_packet(TIMEOUT) {
        Err(DecodeError::Io { kind, .. }) => assert_eq!(kind, ErrorKind::UnexpectedEof, "closed, not timed out"),
        other => panic!("expected the connection to close, got {other:?}"),
    }
    common::wait_for("the encoder to close", || host.handle.encoders().live == 0);
}

#[test]
fn the_keepalive_repeats_a_still_picture() {
    let scanouts = Arc::new(MemoryScanouts::default());
    let host = Host::start(HostConfig {
        encoder: EncoderKind::X264,
        scanouts: Some(scanouts.clone()),
        scanout_keepalive: Some(Duration::from_millis(100)),
        ..Default::default()
    });
    let flip = scanouts.flip(0, picture(pattern(4)));
    let mut sub = Subscriber::subscribe(&host, 0, 0).unwrap();
    let started = Instant::now();
    let mut frames = vec![sub.frame(TIMEOUT).unwrap()];
    assert_idr(&frames[0]);
    assert_eq!(frames[0].pts, flip.at_ns as i64);
    while frames.len() < 4 {
        frames.push(sub.frame(TIMEOUT).expect("a keepalive frame"));
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "three repeats 100 ms apart took {took:?}");
    assert!(frames[1..].iter().all(|r| !r.is_keyframe));
    assert!(frames.windows(2).all(|w| w[1].pts - w[0].pts >= 90_000_000), "about 100 ms apart, by pts");
    assert_pictures(&frames, &vec![pattern(4); 4]);
}

/// Two VMs' scanouts, each connection scoped to its listener's VM.
struct TwoVms {
    unix: Arc<MemoryScanouts>,
    tcp: Arc<MemoryScanouts>,
}

impl ScanoutSource for TwoVms {
    fn watch(&self, _: u32) -> Option<tokio::sync::watch::Receiver<Flip>> {
        None
    }
    fn picture(&self, id: u32) -> Result<Resolved, ResolveError> {
        Err(ResolveError::NotFound(id))
    }
    fn scope(&self, peer: Peer<'_>) -> Option<Arc<dyn ScanoutSource>> {
        Some(if peer.via.starts_with("unix:") { self.unix.clone() } else { self.tcp.clone() })
    }
}

/// A stream with what has been read ahead of the next message.
type Reading = (FrameDecoder, BytesMut);

fn subscribed<S: std::io::Read + std::io::Write>(s: &mut S, r: &mut Reading, scanout: u32) -> bool {
    let sub = Packet::new(scanout as u16, Message::Subscribe { scanout_id: scanout });
    write_packet(s, &sub, &mut BytesMut::new()).unwrap();
    let p = read_packet(s, &mut r.0, &mut r.1).unwrap();
    match p.message {
        Message::SubscribeResp { scanout_id, success } if scanout_id == scanout => success,
        other => panic!("expected SUBSCRIBE_RESP, got {other:?}"),
    }
}

#[test]
fn each_connection_subscribes_in_its_own_vm_only() {
    let vms = TwoVms { unix: Arc::default(), tcp: Arc::default() };
    vms.unix.flip(0, picture(pattern(0)));
    vms.tcp.flip(5, picture(pattern(1)));
    let host =
        Host::start(HostConfig { encoder: EncoderKind::X264, scanouts: Some(Arc::new(vms)), ..Default::default() });
    let mut u = UnixStream::connect(&host.unix).unwrap();
    u.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert!(!subscribed(&mut u, &mut Reading::default(), 5), "the other VM's scanout 5");
    let addr = match &host.handle.addrs[1] {
        hxfr_host::ListenAddr::Tcp(a) => *a,
        _ => unreachable!(),
    };
    let mut t = std::net::TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut r = Reading::default();
    assert!(!subscribed(&mut t, &mut r, 0), "the other VM's scanout 0");
    assert!(subscribed(&mut t, &mut r, 5));
    let p = read_packet(&mut t, &mut r.0, &mut r.1).unwrap();
    assert!(matches!(p.message, Message::FrameResponse(ref r) if r.is_keyframe), "{p:?}");
    let mut sub = Subscriber::subscribe(&host, 0, 0).expect("its own VM's scanout 0");
    assert_idr(&sub.frame(TIMEOUT).unwrap());
    assert_eq!(host.handle.encoders().live, 2, "one encoder per VM's scanout");
}

#[test]
fn config_req_on_a_subscription_sets_rate_and_fps_without_an_answer() {
    let scanouts = Arc::new(MemoryScanouts::default());
    let host = start(&scanouts);
    scanouts.flip(0, picture(pattern(0)));
    let mut sub = Subscriber::subscribe(&host, 0, 4_000_000).unwrap();
    assert_idr(&sub.frame(TIMEOUT).unwrap());
    // 5 fps at 1 Mbit/s: the encoder is rebuilt (an IDR), and no CONFIG_RESP comes.
    let c = ConfigReq {
        width: W,
        height: H,
        bitrate: 1_000_000,
        fps_num: 5,
        fps_den: 1,
        profile: 66,
        level_x10: 40,
        realtime: true,
    };
    sub.send(Message::ConfigReq(c));
    sub.assert_quiet("CONFIG_REQ is not answered");
    let flip = scanouts.flip(0, picture(pattern(1)));
    let r = sub.frame(TIMEOUT).unwrap();
    assert_eq!(r.pts, flip.at_ns as i64);
    assert_idr(&r);
    // Flips every 20 ms for 400 ms: at most 5 a second get encoded.
    let mut last = flip;
    for i in 2..22 {
        std::thread::sleep(Duration::from_millis(20));
        last = scanouts.flip(0, picture(pattern(i)));
    }
    let frames = sub.frames_until(last.at_ns);
    assert!(frames.len() <= 4, "{} frames for 20 flips in 400 ms at 5 fps", frames.len());
    assert!(frames.iter().all(|r| !r.is_keyframe));
}
