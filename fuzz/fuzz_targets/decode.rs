//! Feeds arbitrary bytes, split at fuzzer-chosen points, to the decoder in
//! both modes. It must never panic, never allocate past its limit, and every
//! packet it returns must re-encode to a decodable packet equal to itself.
#![no_main]

use bytes::BytesMut;
use hxfr_proto::{FrameDecoder, Packet};
use libfuzzer_sys::fuzz_target;

const LIMIT: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, data)) = data.split_first() else { return };
    let resync = ctl & 1 == 1;
    let step = 1 + (ctl as usize >> 1);
    let mut dec = FrameDecoder::new(LIMIT).resynchronising(resync);
    let mut buf = BytesMut::new();
    for chunk in data.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(p)) => check_round_trip(&p),
                Ok(None) => break,
                Err(e) if e.is_fatal() => return,
                Err(_) => {}
            }
        }
        assert!(buf.capacity() <= LIMIT as usize + data.len() + 64);
    }
});

fn check_round_trip(p: &Packet) {
    let mut b = BytesMut::new();
    p.encode(&mut b);
    let again = FrameDecoder::new(u32::MAX).decode(&mut b).expect("re-encoded packet decodes").expect("complete");
    assert_eq!(&again, p);
}
