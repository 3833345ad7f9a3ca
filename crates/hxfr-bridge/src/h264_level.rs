//! Making a stream announce what Helix's browser client decodes it as:
//! Constrained Baseline at level 4.0 or below (`avc1.42d028`).
//!
//! Only the SPS header bytes change, and only where the stream already obeys
//! what the new values promise:
//!
//! - **Level.** A level above 4.0 becomes 4.0 when the stream fits level 4.0
//!   (H.264 table A-1): at most 8192 macroblocks a frame (1920x1088 is 8160)
//!   and 256 in either direction, at most 245 760 a second at the bridge's
//!   frame rate, a bitrate of at most 20 Mbit/s (the bridge's setting, and
//!   any HRD parameters in the SPS), and no more reference frames than a
//!   32 768-macroblock DPB holds. Levels at or below 4.0 stay as they are: a
//!   level-4.0 decoder decodes them.
//! - **Constrained Baseline.** Baseline (profile_idc 66) gains
//!   constraint_set1_flag when the access unit's PPSs use neither slice
//!   groups (FMO) nor redundant pictures. Arbitrary slice order cannot be
//!   seen in parameter sets; no encoder the bridge drives uses it.
//! - **Main or High** cannot be made Baseline by rewriting: such a stream is
//!   passed on as it is and reported ([`Unfit::NotBaseline`]); the encoder
//!   must be configured for Baseline.
//!
//! constraint_set3_flag is left alone: Helix's codec string sets it
//! (`0xd0`), but for Baseline outside level 1b the standard reserves it and
//! tells decoders to ignore it.
//!
//! The three bytes sit right after the NAL header, before any Exp-Golomb
//! field. With profile_idc 66 and a non-zero level no emulation-prevention
//! byte can sit in or next to them, so patching them in place keeps the NAL
//! well formed.

use h264_reader::Context;
use h264_reader::nal::pps::PicParameterSet;
use h264_reader::nal::sps::{FrameMbsFlags, HrdParameters, SeqParameterSet};
use h264_reader::rbsp::{BitReader, decode_nal};
use thiserror::Error;

use crate::wire::nal_units;

pub const BASELINE: u8 = 66;
pub const LEVEL_4_0: u8 = 40;
const CONSTRAINT_SET1: u8 = 0x40;
/// Table A-1, level 4.0.
const MAX_FS: u32 = 8192;
const MAX_MBPS: u64 = 245_760;
const MAX_DPB_MBS: u32 = 32_768;
/// MaxBR × cpbBrVclFactor (1000 for Baseline), and × cpbBrNalFactor (1200).
const MAX_VCL_BITRATE: u64 = 20_000_000;
const MAX_NAL_BITRATE: u64 = 24_000_000;
const MAX_VCL_CPB: u64 = 25_000_000;
const MAX_NAL_CPB: u64 = 30_000_000;

/// What the bridge asked of its encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub fps: u32,
    pub bitrate_bps: u32,
}

/// (profile_idc, constraint flags, level_idc), as in the codec string.
pub type Triple = [u8; 3];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// No SPS in this access unit.
    NoSps,
    /// Already Constrained Baseline at level 4.0 or below.
    AsIs(Triple),
    Rewritten {
        before: Triple,
        after: Triple,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Unfit {
    #[error("the SPS does not parse: {0}")]
    Sps(String),
    #[error("a PPS does not parse: {0}")]
    Pps(String),
    #[error("profile_idc {0} is not Baseline: configure the encoder for Constrained Baseline")]
    NotBaseline(u8),
    #[error("Baseline without constraint_set1 and no PPS in the access unit to check it against")]
    NoPps,
    #[error("the PPS uses {0}, which Constrained Baseline does not allow")]
    NotConstrained(&'static str),
    #[error("level {level} stays: the stream does not fit level 4.0 ({why})")]
    Level { level: u8, why: String },
}

/// Rewrites the SPS header bytes of an Annex-B access unit in place, where
/// valid, so that it announces Constrained Baseline at level ≤ 4.0.
pub fn fit_constrained_baseline(au: &mut [u8], limits: &Limits) -> Result<Fit, Unfit> {
    let base = au.as_ptr() as usize;
    let (mut sps_at, mut pps_at) = (Vec::new(), Vec::new());
    for nal in nal_units(au) {
        let range = (nal.as_ptr() as usize - base, nal.len());
        match nal.first().map(|h| h & 0x1f) {
            Some(7) => sps_at.push(range),
            Some(8) => pps_at.push(range),
            _ => {}
        }
    }
    let mut fit = Fit::NoSps;
    for &(at, len) in &sps_at {
        let nal = &au[at..at + len];
        if nal.len() < 5 {
            return Err(Unfit::Sps(format!("{} bytes", nal.len())));
        }
        let before: Triple = [nal[1], nal[2], nal[3]];
        let sps = parse_sps(nal)?;
        let after = fit_triple(&sps, before, limits, || pps_at.iter().map(|&(p, l)| &au[p..p + l]).collect())?;
        au[at + 1..at + 4].copy_from_slice(&after);
        fit = if after == before { Fit::AsIs(before) } else { Fit::Rewritten { before, after } };
    }
    Ok(fit)
}

fn parse_sps(nal: &[u8]) -> Result<SeqParameterSet, Unfit> {
    let rbsp = decode_nal(nal).map_err(|e| Unfit::Sps(e.to_string()))?;
    SeqParameterSet::from_bits(BitReader::new(&rbsp[..])).map_err(|e| Unfit::Sps(format!("{e:?}")))
}

fn fit_triple<'a>(
    sps: &SeqParameterSet,
    [profile, mut flags, mut level]: Triple,
    limits: &Limits,
    ppss: impl FnOnce() -> Vec<&'a [u8]>,
) -> Result<Triple, Unfit> {
    if profile != BASELINE {
        return Err(Unfit::NotBaseline(profile));
    }
    if flags & CONSTRAINT_SET1 == 0 {
        let ppss = ppss();
        if ppss.is_empty() {
            return Err(Unfit::NoPps);
        }
        let mut ctx = Context::new();
        ctx.put_seq_param_set(sps.clone());
        for nal in ppss {
            let rbsp = decode_nal(nal).map_err(|e| Unfit::Pps(e.to_string()))?;
            let pps = PicParameterSet::from_bits(&ctx, BitReader::new(&rbsp[..]))
                .map_err(|e| Unfit::Pps(format!("{e:?}")))?;
            if pps.slice_groups.is_some() {
                return Err(Unfit::NotConstrained("slice groups (FMO)"));
            }
            if pps.redundant_pic_cnt_present_flag {
                return Err(Unfit::NotConstrained("redundant pictures"));
            }
        }
        flags |= CONSTRAINT_SET1;
    }
    if level > LEVEL_4_0 {
        level4_fits(sps, limits).map_err(|why| Unfit::Level { level, why })?;
        level = LEVEL_4_0;
    }
    Ok([profile, flags, level])
}

/// Whether the stream obeys level 4.0's limits; why not otherwise.
fn level4_fits(sps: &SeqParameterSet, limits: &Limits) -> Result<(), String> {
    let width = sps.pic_width_in_mbs();
    let rows = match sps.frame_mbs_flags {
        FrameMbsFlags::Frames => 1,
        FrameMbsFlags::Fields { .. } => 2,
    };
    let height = sps.pic_height_in_map_units() * rows;
    let frame = width * height;
    if frame > MAX_FS || width > 256 || height > 256 {
        return Err(format!("{width}x{height} macroblocks a frame"));
    }
    let rate = frame as u64 * limits.fps as u64;
    if limits.fps == 0 || rate > MAX_MBPS {
        return Err(format!("{rate} macroblocks a second at {} fps", limits.fps));
    }
    if limits.bitrate_bps as u64 > MAX_VCL_BITRATE {
        return Err(format!("{} bit/s", limits.bitrate_bps));
    }
    let dpb_frames = (MAX_DPB_MBS / frame).min(16);
    let vui = sps.vui_parameters.as_ref();
    let buffered = vui.and_then(|v| v.bitstream_restrictions.as_ref()).map_or(0, |b| b.max_dec_frame_buffering);
    if sps.max_num_ref_frames.max(buffered) > dpb_frames {
        return Err(format!(
            "{} frames in the DPB, level 4.0 holds {dpb_frames}",
            sps.max_num_ref_frames.max(buffered)
        ));
    }
    let hrd_fits = |hrd: &Option<HrdParameters>, max_rate: u64, max_cpb: u64| {
        hrd.as_ref().is_none_or(|h| {
            h.cpb_specs.iter().all(|c| {
                let rate = (c.bit_rate_value_minus1 as u64 + 1) << (6 + h.bit_rate_scale);
                let cpb = (c.cpb_size_value_minus1 as u64 + 1) << (4 + h.cpb_size_scale);
                rate <= max_rate && cpb <= max_cpb
            })
        })
    };
    if let Some(v) = vui
        && (!hrd_fits(&v.nal_hrd_parameters, MAX_NAL_BITRATE, MAX_NAL_CPB)
            || !hrd_fits(&v.vcl_hrd_parameters, MAX_VCL_BITRATE, MAX_VCL_CPB))
    {
        return Err("the HRD parameters ask for more than level 4.0's bitrate or buffer".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes RBSP bits (the SPS and PPS we need are free of emulation
    /// prevention: no two zero bytes in a row).
    #[derive(Default)]
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        fn put(&mut self, v: u64, bits: u32) -> &mut Self {
            for i in (0..bits).rev() {
                self.acc = (self.acc << 1) | ((v >> i) & 1);
                self.n += 1;
                if self.n == 8 {
                    self.out.push(self.acc as u8);
                    (self.acc, self.n) = (0, 0);
                }
            }
            self
        }
        fn ue(&mut self, v: u64) -> &mut Self {
            let len = 64 - (v + 1).leading_zeros();
            self.put(0, len - 1).put(v + 1, len)
        }
        fn finish(&mut self) -> Vec<u8> {
            self.put(1, 1);
            while self.n != 0 {
                self.put(0, 1);
            }
            assert!(!self.out.windows(3).any(|w| w[0] == 0 && w[1] == 0 && w[2] <= 3), "needs emulation prevention");
            std::mem::take(&mut self.out)
        }
    }

    /// An SPS NAL: Baseline-style fields, `w_mbs`x`h_mbs`, `refs` reference frames.
    fn sps(flags: u8, level: u8, w_mbs: u64, h_mbs: u64, refs: u64) -> Vec<u8> {
        let mut b = Bits::default();
        b.put(0x67, 8).put(BASELINE as u64, 8).put(flags as u64, 8).put(level as u64, 8);
        b.ue(0).ue(0).ue(2).ue(refs).put(0, 1).ue(w_mbs - 1).ue(h_mbs - 1).put(1, 1).put(1, 1).put(0, 1).put(0, 1);
        b.finish()
    }

    fn pps(slice_groups: u64, redundant: bool) -> Vec<u8> {
        let mut b = Bits::default();
        b.put(0x68, 8).ue(0).ue(0).put(0, 1).put(0, 1).ue(slice_groups);
        if slice_groups > 0 {
            b.ue(0); // slice_group_map_type 0: run lengths
            for _ in 0..=slice_groups {
                b.ue(0);
            }
        }
        b.ue(0).ue(0).put(0, 1).put(0, 2).ue(0).ue(0).ue(0).put(1, 1).put(0, 1).put(redundant as u64, 1);
        b.finish()
    }

    fn au(nals: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for n in nals {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(n);
        }
        out.extend_from_slice(&[0, 0, 0, 1, 0x65, 0x88, 0x84]);
        out
    }

    const P1080: Limits = Limits { fps: 30, bitrate_bps: 4_000_000 };

    fn triple(au: &[u8]) -> Triple {
        let nal = nal_units(au).into_iter().find(|n| n[0] & 0x1f == 7).unwrap();
        [nal[1], nal[2], nal[3]]
    }

    #[test]
    fn constrained_baseline_at_or_below_4_0_is_left_alone() {
        for (level, w, h) in [(31, 80, 45), (40, 120, 68)] {
            let mut a = au(&[&sps(0xc0, level, w, h, 1), &pps(0, false)]);
            let orig = a.clone();
            assert_eq!(fit_constrained_baseline(&mut a, &P1080), Ok(Fit::AsIs([66, 0xc0, level])));
            assert_eq!(a, orig);
        }
        let mut no_sps = vec![0, 0, 0, 1, 0x41, 0x9a];
        assert_eq!(fit_constrained_baseline(&mut no_sps, &P1080), Ok(Fit::NoSps));
    }

    #[test]
    fn a_1080p30_stream_announcing_4_2_becomes_4_0_and_still_parses() {
        let mut a = au(&[&sps(0xc0, 42, 120, 68, 1), &pps(0, false)]);
        let len = a.len();
        assert_eq!(
            fit_constrained_baseline(&mut a, &P1080),
            Ok(Fit::Rewritten { before: [66, 0xc0, 42], after: [66, 0xc0, 40] })
        );
        assert_eq!(a.len(), len);
        assert_eq!(triple(&a), [66, 0xc0, 40]);
        let nal = nal_units(&a)[0].to_vec();
        let s = parse_sps(&nal).unwrap();
        assert_eq!((s.level_idc, s.pic_width_in_mbs(), s.max_num_ref_frames), (40, 120, 1));
        assert_eq!(crate::wire::codec_string(&a).unwrap(), "avc1.42c028");
    }

    #[test]
    fn baseline_gains_constraint_set1_only_without_fmo_or_redundant_pictures() {
        let mut a = au(&[&sps(0x80, 31, 80, 45, 1), &pps(0, false)]);
        assert_eq!(
            fit_constrained_baseline(&mut a, &P1080),
            Ok(Fit::Rewritten { before: [66, 0x80, 31], after: [66, 0xc0, 31] })
        );
        let mut fmo = au(&[&sps(0x80, 31, 80, 45, 1), &pps(1, false)]);
        assert_eq!(fit_constrained_baseline(&mut fmo, &P1080), Err(Unfit::NotConstrained("slice groups (FMO)")));
        let mut redundant = au(&[&sps(0x80, 31, 80, 45, 1), &pps(0, true)]);
        assert_eq!(fit_constrained_baseline(&mut redundant, &P1080), Err(Unfit::NotConstrained("redundant pictures")));
        let mut alone = au(&[&sps(0x80, 31, 80, 45, 1)]);
        assert_eq!(fit_constrained_baseline(&mut alone, &P1080), Err(Unfit::NoPps));
        assert_eq!(triple(&alone), [66, 0x80, 31], "an unfit stream is passed on unchanged");
    }

    #[test]
    fn the_level_stays_when_the_stream_does_not_fit_4_0() {
        let cases = [
            (sps(0xc0, 51, 160, 90, 1), P1080, "macroblocks a frame"), // 2560x1440
            (sps(0xc0, 42, 120, 68, 1), Limits { fps: 60, bitrate_bps: 4_000_000 }, "macroblocks a second"),
            (sps(0xc0, 41, 120, 68, 1), Limits { fps: 30, bitrate_bps: 30_000_000 }, "bit/s"),
            (sps(0xc0, 41, 120, 68, 5), P1080, "frames in the DPB"),
        ];
        for (s, limits, needle) in cases {
            let mut a = au(&[&s, &pps(0, false)]);
            let before = triple(&a);
            match fit_constrained_baseline(&mut a, &limits) {
                Err(e @ Unfit::Level { .. }) => assert!(e.to_string().contains(needle), "{e}"),
                other => panic!("{needle}: {other:?}"),
            }
            assert_eq!(triple(&a), before);
        }
    }

    #[test]
    fn main_and_high_are_reported_not_rewritten() {
        let mut s = sps(0x00, 40, 80, 45, 1);
        s[1] = 77;
        let mut a = au(&[&s, &pps(0, false)]);
        assert_eq!(fit_constrained_baseline(&mut a, &P1080), Err(Unfit::NotBaseline(77)));
        assert_eq!(triple(&a), [77, 0, 40]);
    }
}
