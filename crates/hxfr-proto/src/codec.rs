//! `tokio_util::codec` adapter.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::{DecodeError, FrameDecoder, Packet};

/// A codec for `Framed`/`FramedRead`. Items are `Result<Packet, DecodeError>`:
/// a malformed message that kept framing intact arrives as an `Err` item and
/// the stream goes on; only a fatal error ends it.
#[derive(Debug, Clone, Default)]
pub struct HxfrCodec {
    pub decoder: FrameDecoder,
}

impl HxfrCodec {
    pub fn new(decoder: FrameDecoder) -> HxfrCodec {
        HxfrCodec { decoder }
    }
}

impl Decoder for HxfrCodec {
    type Item = Result<Packet, DecodeError>;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, DecodeError> {
        match self.decoder.decode(src) {
            Ok(Some(p)) => Ok(Some(Ok(p))),
            Ok(None) => Ok(None),
            Err(e) if e.is_fatal() => Err(e),
            Err(e) => Ok(Some(Err(e))),
        }
    }
}

impl Encoder<Packet> for HxfrCodec {
    type Error = DecodeError;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), DecodeError> {
        item.encode(dst);
        Ok(())
    }
}

impl Encoder<&Packet> for HxfrCodec {
    type Error = DecodeError;

    fn encode(&mut self, item: &Packet, dst: &mut BytesMut) -> Result<(), DecodeError> {
        item.encode(dst);
        Ok(())
    }
}
