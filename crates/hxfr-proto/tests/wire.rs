//! The wire format against Helix's bytes, round trips, split reads and hostile input.

use bytes::{Bytes, BytesMut};
use hxfr_proto::*;
use proptest::prelude::*;

/// The C element's first 640x360 BGRx request, from the wire-format notes.
fn helix_vector() -> Vec<u8> {
    let hex = "48584652 01 01 0100 2c100e00 \
               00000000 80020000 68010000 41523234 \
               000a0000 0000000000000000 55a0fc0100000000 01 00000000000000";
    let mut v: Vec<u8> = hex
        .split_whitespace()
        .flat_map(|w| (0..w.len()).step_by(2).map(move |i| u8::from_str_radix(&w[i..i + 2], 16).unwrap()))
        .collect();
    // 921600 pixel bytes, a recognisable pattern.
    v.extend((0..921_600u32).map(|i| (i % 251) as u8));
    v
}

fn decode_all(dec: &mut FrameDecoder, buf: &mut BytesMut) -> Vec<Result<Packet, DecodeError>> {
    let mut out = Vec::new();
    loop {
        match dec.decode(buf) {
            Ok(Some(p)) => out.push(Ok(p)),
            Ok(None) => return out,
            Err(e) if e.is_fatal() => {
                out.push(Err(e));
                return out;
            }
            Err(e) => out.push(Err(e)),
        }
    }
}

#[test]
fn helix_request_decodes_to_its_fields() {
    let bytes = helix_vector();
    let mut buf = BytesMut::from(&bytes[..]);
    let p = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    assert_eq!(p.session_id, 1);
    let Message::FrameRequest(r) = &p.message else { panic!("not a frame request: {p:?}") };
    assert_eq!((r.resource_id, r.width, r.height, r.stride), (0, 640, 360, 2560));
    assert_eq!(r.format, Fourcc::ARGB8888);
    assert_eq!((r.pts, r.duration, r.force_keyframe), (0, 33_333_333, true));
    let px = r.pixels.as_ref().unwrap();
    assert_eq!(px.len(), 921_600);
    assert_eq!(&px[..], &bytes[HEADER_LEN + 44..]);

    let mut again = BytesMut::new();
    p.encode(&mut again);
    assert_eq!(&again[..], &bytes[..], "re-encoding must give Helix's bytes back");
}

#[test]
fn inline_pixels_are_not_copied() {
    let bytes = helix_vector();
    let mut buf = BytesMut::from(&bytes[..]);
    let base = buf.as_ptr() as usize;
    let p = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
    let Message::FrameRequest(r) = p.message else { unreachable!() };
    // The pixels are a view into the read buffer, right after header + body.
    assert_eq!(r.pixels.unwrap().as_ptr() as usize, base + HEADER_LEN + 44);
}

#[test]
fn helix_request_survives_every_split_size() {
    let bytes = helix_vector();
    for chunk in [1usize, 3, 7, 12, 13, 55, 56, 4096, 65_536, 1_000_000] {
        let mut dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(chunk) {
            buf.extend_from_slice(piece);
            got.extend(decode_all(&mut dec, &mut buf));
        }
        assert_eq!(got.len(), 1, "chunk {chunk}");
        assert!(got[0].is_ok());
    }
}

#[test]
fn bad_magic_is_fatal() {
    let mut b = helix_vector();
    b[0] = b'X';
    let mut buf = BytesMut::from(&b[..]);
    let e = FrameDecoder::default().decode(&mut buf).unwrap_err();
    assert!(matches!(e, DecodeError::BadMagic(_)) && e.is_fatal(), "{e}");
}

#[test]
fn huge_payload_is_refused_before_allocating() {
    let h = Header { msg_type: msg_type::FRAME_REQUEST, flags: 1, session_id: 1, payload_size: u32::MAX };
    let mut buf = BytesMut::from(&h.to_bytes()[..]);
    let cap = buf.capacity();
    let e = FrameDecoder::default().decode(&mut buf).unwrap_err();
    assert_eq!(e, DecodeError::PayloadTooLarge { size: u32::MAX, max: DEFAULT_MAX_PAYLOAD });
    assert!(e.is_fatal());
    assert_eq!(buf.capacity(), cap, "nothing may be reserved for a refused size");
    // A smaller configured limit applies too.
    let h = Header { payload_size: 1025, ..h };
    let mut buf = BytesMut::from(&h.to_bytes()[..]);
    assert!(matches!(FrameDecoder::new(1024).decode(&mut buf), Err(DecodeError::PayloadTooLarge { .. })));
}

fn raw(msg_type: u8, flags: u8, payload: &[u8]) -> BytesMut {
    let h = Header { msg_type, flags, session_id: 7, payload_size: payload.len() as u32 };
    let mut b = BytesMut::from(&h.to_bytes()[..]);
    b.extend_from_slice(payload);
    b
}

#[test]
fn truncated_bodies_are_errors_and_the_stream_goes_on() {
    for (ty, need) in [
        (msg_type::FRAME_REQUEST, 44),
        (msg_type::FRAME_RESPONSE, 24),
        (msg_type::CONFIG_REQ, 28),
        (msg_type::CONFIG_RESP, 48),
        (msg_type::ENABLE_SCANOUT, 16),
        (msg_type::DISABLE_SCANOUT, 4),
        (msg_type::SCANOUT_RESP, 72),
        (msg_type::SUBSCRIBE, 4),
        (msg_type::SUBSCRIBE_RESP, 8),
        (msg_type::ERROR, 260),
        (msg_type::SHM_FRAME_REQUEST, 72),
        (msg_type::HELLO, 16),
        (msg_type::HELLO_RESP, 24),
    ] {
        let mut buf = raw(ty, 0, &vec![0u8; need - 1]);
        Packet::new(2, Message::Ping).encode(&mut buf);
        let got = decode_all(&mut FrameDecoder::default(), &mut buf);
        assert_eq!(got.len(), 2, "type {ty:#x}");
        let e = got[0].as_ref().unwrap_err();
        assert_eq!(*e, DecodeError::BodyTooShort { msg_type: ty, need, got: need - 1 });
        assert!(!e.is_fatal());
        assert_eq!(got[1].as_ref().unwrap(), &Packet::new(2, Message::Ping), "framing kept after type {ty:#x}");
    }
}

fn response_body(nal_count: u32, entries: &[(u32, &[u8])]) -> Vec<u8> {
    let mut b = vec![0u8; 20];
    b.extend_from_slice(&nal_count.to_le_bytes());
    for (size, data) in entries {
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(data);
    }
    b
}

#[test]
fn nal_sizes_past_the_end_are_errors() {
    type Check = fn(&DecodeError) -> bool;
    let cases: Vec<(Vec<u8>, Check)> = vec![
        (response_body(1, &[(100, b"abc")]), |e| {
            matches!(e, DecodeError::NalOverrun { index: 0, size: 100, avail: 3 })
        }),
        (response_body(2, &[(3, b"abcd")]), |e| matches!(e, DecodeError::NalOverrun { index: 1, .. })),
        (response_body(u32::MAX, &[(3, b"abc")]), |e| matches!(e, DecodeError::NalCount { .. })),
        (response_body(1_000_000, &[]), |e| matches!(e, DecodeError::NalCount { .. })),
        (response_body(1, &[(2, b"abc")]), |e| matches!(e, DecodeError::TrailingBytes(1))),
    ];
    for (body, check) in cases {
        let mut buf = raw(msg_type::FRAME_RESPONSE, 0, &body);
        let e = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert!(check(&e), "unexpected error {e:?}");
        assert!(!e.is_fatal());
        assert!(buf.is_empty(), "the bad message is consumed");
    }
}

#[test]
fn unknown_types_are_skipped_by_size() {
    let mut buf = raw(0x77, 0x80, b"future stuff");
    Packet::new(1, Message::KeyframeReq).encode(&mut buf);
    let got = decode_all(&mut FrameDecoder::default(), &mut buf);
    assert_eq!(
        got[0].as_ref().unwrap().message,
        Message::Unknown { msg_type: 0x77, flags: 0x80, payload: Bytes::from_static(b"future stuff") }
    );
    assert_eq!(got[1].as_ref().unwrap().message, Message::KeyframeReq);
}

#[test]
fn longer_fixed_bodies_are_accepted() {
    // Additive fields appended by a newer peer must not break us.
    let mut body = vec![0u8; 4 + 4];
    body[0] = 9;
    body.extend_from_slice(b"extra");
    let mut buf = raw(msg_type::DISABLE_SCANOUT, 0, &body);
    let p = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
    assert_eq!(p.message, Message::DisableScanout { scanout_id: 9 });
}

#[test]
fn one_entry_per_nal_reads_as_annex_b() {
    let r = FrameResponse {
        pts: 0,
        dts: 0,
        is_keyframe: true,
        nals: vec![Bytes::from_static(&[0x67, 1]), Bytes::from_static(&[0, 0, 1, 0x68, 2])],
    };
    assert_eq!(&r.to_annex_b()[..], &[0, 0, 0, 1, 0x67, 1, 0, 0, 1, 0x68, 2]);
}

#[test]
fn error_text_is_cut_to_fit_with_a_nul() {
    let long = "é".repeat(200); // 400 bytes of two-byte characters
    let p = Packet::error(1, -5, long);
    let mut b = BytesMut::new();
    p.encode(&mut b);
    assert_eq!(b.len(), HEADER_LEN + 260);
    assert_eq!(b[b.len() - 1], 0);
    let Message::Error { code, message } = FrameDecoder::default().decode(&mut b).unwrap().unwrap().message else {
        unreachable!()
    };
    assert_eq!(code, -5);
    assert_eq!(message, "é".repeat(127));
}

#[test]
fn resynchronising_decoder_recovers_from_a_cut_message() {
    // A guest restarted mid-frame: half a request, then a fresh conversation.
    let full = helix_vector();
    let mut stream = BytesMut::from(&full[..HEADER_LEN + 44 + 1000][..]);
    // The cut message claims 921644 bytes; the restarted guest's messages are
    // swallowed as its payload until that count is reached, then the decoder
    // meets garbage and hunts for the next magic.
    let mut fresh = BytesMut::new();
    for _ in 0..200 {
        Packet::new(1, Message::Hello(Hello { nonce: 42, version: PROTOCOL_VERSION, features: 0 })).encode(&mut fresh);
        fresh.extend_from_slice(&full);
    }
    stream.extend_from_slice(&fresh);
    let mut dec = FrameDecoder::default().resynchronising(true);
    let got = decode_all(&mut dec, &mut stream);
    assert!(got.iter().any(|r| matches!(r, Err(DecodeError::Resynced(_)))));
    let hellos = got.iter().filter(|r| matches!(r, Ok(Packet { message: Message::Hello(_), .. }))).count();
    assert!(hellos >= 198, "stream resynchronised ({hellos} hellos seen)");
}

// ---- round trips of every message -------------------------------------------

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::char::range('\u{1}', '\u{7f}'), 0..max).prop_map(|v| v.into_iter().collect())
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<i64>(),
            any::<i64>(),
            any::<bool>(),
            proptest::option::of(bytes(300))
        )
            .prop_map(|(resource_id, width, height, f, stride, pts, duration, force_keyframe, pixels)| {
                Message::FrameRequest(FrameRequest {
                    resource_id,
                    width,
                    height,
                    format: Fourcc(f),
                    stride,
                    pts,
                    duration,
                    force_keyframe,
                    pixels,
                })
            }),
        (any::<i64>(), any::<i64>(), any::<bool>(), proptest::collection::vec(bytes(100), 0..5)).prop_map(
            |(pts, dts, is_keyframe, nals)| Message::FrameResponse(FrameResponse { pts, dts, is_keyframe, nals })
        ),
        Just(Message::KeyframeReq),
        (any::<[u32; 5]>(), any::<u8>(), any::<u8>(), any::<bool>()).prop_map(|(v, profile, level_x10, realtime)| {
            Message::ConfigReq(ConfigReq {
                width: v[0],
                height: v[1],
                bitrate: v[2],
                fps_num: v[3],
                fps_den: v[4],
                profile,
                level_x10,
                realtime,
            })
        }),
        (any::<i32>(), any::<u32>(), any::<u32>(), any::<u8>(), any::<u8>(), text(31)).prop_map(
            |(status, width, height, profile, level_x10, encoder)| {
                Message::ConfigResp(ConfigResp { status, width, height, profile, level_x10, encoder })
            }
        ),
        Just(Message::Ping),
        Just(Message::Pong),
        any::<[u32; 3]>().prop_map(|v| Message::EnableScanout { scanout_id: v[0], width: v[1], height: v[2] }),
        any::<u32>().prop_map(|scanout_id| Message::DisableScanout { scanout_id }),
        (any::<u32>(), any::<bool>(), text(63)).prop_map(|(scanout_id, success, connector)| Message::ScanoutResp {
            scanout_id,
            success,
            connector
        }),
        any::<u32>().prop_map(|scanout_id| Message::Subscribe { scanout_id }),
        (any::<u32>(), any::<bool>()).prop_map(|(scanout_id, success)| Message::SubscribeResp { scanout_id, success }),
        (any::<i32>(), text(255)).prop_map(|(code, message)| Message::Error { code, message }),
        (any::<[u32; 6]>(), any::<[u64; 2]>(), any::<i64>(), any::<i64>(), any::<bool>()).prop_map(
            |(v, o, pts, duration, force_keyframe)| {
                Message::ShmFrameRequest(ShmFrameRequest {
                    width: v[0],
                    height: v[1],
                    format: Fourcc(v[2]),
                    num_planes: v[3],
                    planes: [ShmPlane { offset: o[0], stride: v[4] }, ShmPlane { offset: o[1], stride: v[5] }],
                    pts,
                    duration,
                    force_keyframe,
                })
            }
        ),
        (any::<u32>(), any::<u16>(), any::<u32>()).prop_map(|(nonce, version, features)| Message::Hello(Hello {
            nonce,
            version,
            features
        })),
        (any::<u32>(), any::<u16>(), any::<u32>(), any::<u64>(), any::<u32>()).prop_map(
            |(nonce, version, features, shm_size, max_in_flight)| {
                Message::HelloResp(HelloResp { nonce, version, features, shm_size, max_in_flight })
            }
        ),
        (0x50u8..0xF0, any::<u8>(), bytes(100)).prop_map(|(msg_type, flags, payload)| Message::Unknown {
            msg_type,
            flags,
            payload
        }),
    ]
}

fn packet() -> impl Strategy<Value = Packet> {
    (any::<u16>(), message()).prop_map(|(s, m)| Packet::new(s, m))
}

proptest! {
    #[test]
    fn every_message_round_trips(p in packet()) {
        let mut b = BytesMut::new();
        p.encode(&mut b);
        prop_assert_eq!(b.len(), p.encoded_len());
        let mut head = BytesMut::new();
        p.encode_head(&mut head);
        prop_assert_eq!(head.len() + p.tail().map_or(0, |t| t.len()), b.len());
        let got = FrameDecoder::default().decode(&mut b).unwrap().unwrap();
        prop_assert!(b.is_empty());
        prop_assert_eq!(got, p);
    }

    #[test]
    fn streams_decode_across_any_split(ps in proptest::collection::vec(packet(), 1..12), cuts in proptest::collection::vec(1usize..400, 1..50)) {
        let mut all = BytesMut::new();
        for p in &ps { p.encode(&mut all); }
        let mut dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut pos = 0;
        for c in cuts.iter().cycle() {
            if pos >= all.len() { break; }
            let end = (pos + c).min(all.len());
            buf.extend_from_slice(&all[pos..end]);
            pos = end;
            while let Some(p) = dec.decode(&mut buf).unwrap() { got.push(p); }
        }
        prop_assert_eq!(got, ps);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000), resync in any::<bool>()) {
        let mut dec = FrameDecoder::new(4096).resynchronising(resync);
        let mut buf = BytesMut::from(&data[..]);
        for _ in 0..data.len() + 2 {
            match dec.decode(&mut buf) {
                Ok(None) => break,
                Err(e) if e.is_fatal() => break,
                _ => {}
            }
        }
        prop_assert!(buf.capacity() <= 4096 + 2000 + 64);
    }
}

#[test]
fn blocking_io_round_trip_over_a_socket_pair() {
    use std::os::unix::net::UnixStream;
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let sent = helix_vector();
    let p = FrameDecoder::default().decode(&mut BytesMut::from(&sent[..])).unwrap().unwrap();
    let p2 = p.clone();
    let t = std::thread::spawn(move || {
        let mut scratch = BytesMut::new();
        for _ in 0..3 {
            io::write_packet(&mut a, &p2, &mut scratch).unwrap();
        }
    });
    let (mut dec, mut buf) = (FrameDecoder::default(), BytesMut::new());
    for _ in 0..3 {
        assert_eq!(io::read_packet(&mut b, &mut dec, &mut buf).unwrap(), p);
    }
    t.join().unwrap();
    assert!(matches!(
        io::read_packet(&mut b, &mut dec, &mut buf),
        Err(DecodeError::Io { kind: std::io::ErrorKind::UnexpectedEof, .. })
    ));
}

#[test]
fn strings_without_nul_or_with_bad_utf8_decode_to_what_fits() {
    let mut body = (-2i32).to_le_bytes().to_vec();
    body.extend(std::iter::repeat_n(0xFFu8, 256)); // no NUL, not UTF-8
    let mut buf = raw(msg_type::ERROR, 0, &body);
    let p = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
    let Message::Error { message, .. } = &p.message else { unreachable!() };
    assert!(message.len() <= 255 && message.chars().all(|c| c == '\u{FFFD}'));
    let mut again = BytesMut::new();
    p.encode(&mut again);
    assert_eq!(FrameDecoder::default().decode(&mut again).unwrap().unwrap(), p);
}
