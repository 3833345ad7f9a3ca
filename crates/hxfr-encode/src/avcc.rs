//! AVCC to Annex B.
//!
//! Encoders built on the MP4 model (VideoToolbox, MediaCodec's codec-config
//! path) hand out access units in AVCC form (ISO/IEC 14496-15): every NAL
//! unit behind a big-endian length of 1, 2 or 4 bytes, and the SPS/PPS kept
//! aside in a decoder configuration record. The wire wants Annex B: every NAL
//! unit behind a 4-byte start code, and SPS/PPS in front of every IDR so a
//! decoder can join at any keyframe.

use thiserror::Error;

/// The start code every NAL unit gets.
pub const START_CODE: [u8; 4] = [0, 0, 0, 1];

/// nal_unit_type values that matter here.
pub mod nal_type {
    pub const IDR: u8 = 5;
    pub const SPS: u8 = 7;
    pub const PPS: u8 = 8;
    pub const AUD: u8 = 9;
}

/// nal_unit_type of a NAL unit (its first byte's low five bits).
pub fn nal_type(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| b & 0x1f)
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AvccError {
    #[error("NAL length field of {0} bytes (AVCC allows 1, 2 or 4)")]
    LengthSize(usize),
    #[error("NAL unit at byte {at} is {len} bytes but only {left} remain")]
    Truncated { at: usize, len: usize, left: usize },
    #[error("empty NAL unit at byte {0}")]
    Empty(usize),
    #[error("access unit holds no NAL unit")]
    NoNalUnits,
}

/// One AVCC access unit, split into its NAL units (borrowed, not copied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvccAccessUnit<'a> {
    nals: Vec<&'a [u8]>,
}

impl<'a> AvccAccessUnit<'a> {
    /// Splits `sample` at its `length_size`-byte big-endian length prefixes.
    /// Every byte must belong to a NAL unit: a length that runs past the end
    /// or a zero length is an error, never a silent cut.
    pub fn parse(sample: &'a [u8], length_size: usize) -> Result<AvccAccessUnit<'a>, AvccError> {
        if !matches!(length_size, 1 | 2 | 4) {
            return Err(AvccError::LengthSize(length_size));
        }
        let mut nals = Vec::new();
        let mut at = 0;
        while at < sample.len() {
            let left = sample.len() - at;
            if left < length_size {
                return Err(AvccError::Truncated { at, len: length_size, left });
            }
            let len = sample[at..at + length_size].iter().fold(0usize, |n, &b| (n << 8) | b as usize);
            let start = at + length_size;
            if len == 0 {
                return Err(AvccError::Empty(at));
            }
            if len > sample.len() - start {
                return Err(AvccError::Truncated { at, len, left: sample.len() - start });
            }
            nals.push(&sample[start..start + len]);
            at = start + len;
        }
        if nals.is_empty() {
            return Err(AvccError::NoNalUnits);
        }
        Ok(AvccAccessUnit { nals })
    }

    pub fn nal_units(&self) -> &[&'a [u8]] {
        &self.nals
    }

    /// Whether it holds an IDR slice (a keyframe a decoder can start at).
    pub fn is_idr(&self) -> bool {
        self.nals.iter().any(|n| nal_type(n) == nal_type::IDR)
    }

    /// Whether it already carries both an SPS and a PPS in band.
    pub fn has_parameter_sets(&self) -> bool {
        let has = |t| self.nals.iter().any(|n| nal_type(n) == t);
        has(nal_type::SPS) && has(nal_type::PPS)
    }

    /// Whether [`Self::to_annex_b`] needs the parameter sets from the
    /// decoder configuration: an IDR that does not carry its own.
    pub fn needs_parameter_sets(&self) -> bool {
        self.is_idr() && !self.has_parameter_sets()
    }

    /// The access unit in Annex B with 4-byte start codes. When it
    /// [needs them](Self::needs_parameter_sets), `parameter_sets` (SPS then
    /// PPS, as the decoder configuration lists them) go in front, after an
    /// access unit delimiter if there is one (H.264 7.4.1.2.3 wants the AUD
    /// first); otherwise they are not used.
    pub fn to_annex_b(&self, parameter_sets: &[&[u8]]) -> Vec<u8> {
        let insert: &[&[u8]] = if self.needs_parameter_sets() { parameter_sets } else { &[] };
        let size = self.nals.iter().chain(insert).map(|n| START_CODE.len() + n.len()).sum();
        let mut out = Vec::with_capacity(size);
        let push = |out: &mut Vec<u8>, nal: &[u8]| {
            out.extend_from_slice(&START_CODE);
            out.extend_from_slice(nal);
        };
        let lead = self.nals.iter().take_while(|n| nal_type(n) == nal_type::AUD).count();
        for nal in &self.nals[..lead] {
            push(&mut out, nal);
        }
        for nal in insert {
            push(&mut out, nal);
        }
        for nal in &self.nals[lead..] {
            push(&mut out, nal);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPS: &[u8] = &[0x67, 0x42, 0xc0, 0x1f, 0x8c, 0x8d];
    const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];
    const IDR: &[u8] = &[0x65, 0x88, 0x84, 0x00, 0x00, 0x03, 0x01];
    const P: &[u8] = &[0x41, 0x9a, 0x02];
    const AUD: &[u8] = &[0x09, 0xf0];
    const SEI: &[u8] = &[0x06, 0x05, 0x01, 0xff, 0x80];

    /// An AVCC sample of `nals` with `n`-byte lengths.
    fn avcc(n: usize, nals: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for nal in nals {
            out.extend_from_slice(&nal.len().to_be_bytes()[8 - n..]);
            out.extend_from_slice(nal);
        }
        out
    }

    fn annex_b(nals: &[&[u8]]) -> Vec<u8> {
        nals.iter().flat_map(|n| START_CODE.iter().chain(n.iter()).copied()).collect()
    }

    #[test]
    fn every_length_size_converts() {
        for n in [1, 2, 4] {
            let sample = avcc(n, &[SEI, P]);
            let au = AvccAccessUnit::parse(&sample, n).unwrap();
            assert_eq!(au.nal_units(), &[SEI, P]);
            assert!(!au.is_idr());
            assert_eq!(au.to_annex_b(&[SPS, PPS]), annex_b(&[SEI, P]), "no parameter sets before a P frame");
        }
    }

    #[test]
    fn parameter_sets_go_in_front_of_every_idr() {
        let sample = avcc(4, &[SEI, IDR]);
        let au = AvccAccessUnit::parse(&sample, 4).unwrap();
        assert!(au.is_idr() && au.needs_parameter_sets());
        assert_eq!(au.to_annex_b(&[SPS, PPS]), annex_b(&[SPS, PPS, SEI, IDR]));
    }

    #[test]
    fn parameter_sets_follow_an_access_unit_delimiter() {
        let sample = avcc(4, &[AUD, IDR]);
        let au = AvccAccessUnit::parse(&sample, 4).unwrap();
        assert_eq!(au.to_annex_b(&[SPS, PPS]), annex_b(&[AUD, SPS, PPS, IDR]));
    }

    #[test]
    fn in_band_parameter_sets_are_not_doubled() {
        let sample = avcc(4, &[SPS, PPS, IDR]);
        let au = AvccAccessUnit::parse(&sample, 4).unwrap();
        assert!(au.has_parameter_sets() && !au.needs_parameter_sets());
        assert_eq!(au.to_annex_b(&[SPS, PPS]), annex_b(&[SPS, PPS, IDR]));
        // Only an SPS in band: the configuration's pair is still put in front.
        let sample = avcc(4, &[SPS, IDR]);
        assert!(AvccAccessUnit::parse(&sample, 4).unwrap().needs_parameter_sets());
    }

    #[test]
    fn emulation_prevention_bytes_pass_through() {
        // 00 00 03 inside a NAL unit is payload: the length says where it ends.
        let sample = avcc(4, &[IDR]);
        let out = AvccAccessUnit::parse(&sample, 4).unwrap().to_annex_b(&[]);
        assert_eq!(out, annex_b(&[IDR]));
    }

    #[test]
    fn malformed_samples_are_errors() {
        assert_eq!(AvccAccessUnit::parse(&[0, 1, 0x65], 3), Err(AvccError::LengthSize(3)));
        assert_eq!(AvccAccessUnit::parse(&[], 4), Err(AvccError::NoNalUnits));
        assert_eq!(AvccAccessUnit::parse(&[0, 0, 0, 9, 0x65], 4), Err(AvccError::Truncated { at: 0, len: 9, left: 1 }));
        assert_eq!(AvccAccessUnit::parse(&[0, 0, 0], 4), Err(AvccError::Truncated { at: 0, len: 4, left: 3 }));
        let mut tail = avcc(4, &[P]);
        tail.extend_from_slice(&[0, 0]);
        assert_eq!(AvccAccessUnit::parse(&tail, 4), Err(AvccError::Truncated { at: 7, len: 4, left: 2 }));
        assert_eq!(AvccAccessUnit::parse(&[0, 0, 0, 0, 0, 0, 0, 1, 0x41], 4), Err(AvccError::Empty(0)));
    }

    #[test]
    fn nal_types() {
        assert_eq!(nal_type(SPS), nal_type::SPS);
        assert_eq!(nal_type(PPS), nal_type::PPS);
        assert_eq!(nal_type(IDR), nal_type::IDR);
        assert_eq!(nal_type(AUD), nal_type::AUD);
        assert_eq!(nal_type(&[]), 0);
    }
}
