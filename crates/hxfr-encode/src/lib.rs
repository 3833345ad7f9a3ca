//! H.264 encoders for the hxfr host, behind one [`Encoder`] trait.
//!
//! Each backend lives in its own module behind a cargo feature (as crosvm's
//! video device does): `videotoolbox` drives Apple's VideoToolbox directly
//! (macOS); `x264` wraps libx264 directly; `gst` drives any GStreamer H.264
//! encoder element, which is how a Linux host with hardware gets it (NVENC,
//! VA-API, Quick Sync). [`open`] builds one from an [`EncoderKind`]; `auto`
//! probes hardware in a documented order and falls back to x264.
//!
//! Every backend is low latency: one access unit out for every frame in, in
//! order, SPS/PPS in front of every IDR, no B-frames.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

pub mod avcc;
pub mod convert;
mod frame;
#[cfg(all(feature = "gst", not(target_os = "macos")))]
pub mod gst;
#[cfg(all(feature = "videotoolbox", target_os = "macos"))]
pub mod videotoolbox;
mod vtplan;
#[cfg(all(feature = "x264", not(target_os = "macos")))]
pub mod x264;

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use thiserror::Error;

pub use frame::{Frame, FrameError};
pub use hxfr_proto::PixelFormat;

/// What the encoder is asked to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderConfig {
    pub width: u32,
    pub height: u32,
    pub fps_num: u32,
    pub fps_den: u32,
    /// Target bits per second (VBV-constrained).
    pub bitrate: u32,
    /// H.264 profile_idc wanted (66/77/100), or 0 for the backend's choice.
    pub profile: u8,
    /// x264 preset (`ultrafast` … `veryslow`); ignored by other backends.
    pub preset: String,
    /// Encoder threads, 0 = the backend decides.
    pub threads: u32,
}

impl EncoderConfig {
    /// The C element's defaults: 4 Mbit/s at 30 fps.
    pub fn new(width: u32, height: u32) -> EncoderConfig {
        EncoderConfig {
            width,
            height,
            fps_num: 30,
            fps_den: 1,
            bitrate: hxfr_proto::defaults::BITRATE,
            profile: 0,
            preset: "ultrafast".into(),
            threads: 0,
        }
    }
}

impl EncoderConfig {
    /// The frame must have the size this encoder was opened for.
    pub fn check_size(&self, frame: &Frame<'_>) -> Result<(), EncodeError> {
        if (frame.width, frame.height) != (self.width, self.height) {
            return Err(EncodeError::SizeMismatch {
                got_w: frame.width,
                got_h: frame.height,
                want_w: self.width,
                want_h: self.height,
            });
        }
        Ok(())
    }
}

/// One encoded access unit, Annex B with 4-byte start codes.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    pub data: Bytes,
    pub keyframe: bool,
}

#[derive(Debug, Error)]
pub enum EncodeError {
    #[error("invalid frame: {0}")]
    Frame(#[from] FrameError),
    #[error("frame is {got_w}x{got_h}, encoder is configured for {want_w}x{want_h}")]
    SizeMismatch { got_w: u32, got_h: u32, want_w: u32, want_h: u32 },
    #[error("encoder {0} is not available on this host")]
    Unavailable(String),
    #[error("could not open encoder: {0}")]
    Open(String),
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("colour conversion failed: {0}")]
    Convert(String),
    /// A platform framework call (VideoToolbox, CoreVideo, CoreMedia) failed.
    #[error("{call} failed: OSStatus {status}")]
    OsStatus { call: String, status: i32 },
}

/// A low-latency H.264 encoder: every frame in gives one access unit out.
pub trait Encoder: Send {
    /// What the host reports, e.g. `x264` or `gst:nvh264enc`.
    fn name(&self) -> &str;
    fn config(&self) -> &EncoderConfig;
    /// Encodes one frame. `frame.force_keyframe` makes it an IDR with SPS/PPS.
    fn encode(&mut self, frame: &Frame<'_>) -> Result<EncodedFrame, EncodeError>;
}

/// Which backend to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncoderKind {
    /// VideoToolbox on macOS; elsewhere [`HARDWARE_ELEMENTS`], then x264.
    Auto,
    /// Apple's VideoToolbox, called directly (macOS).
    VideoToolbox,
    X264,
    /// A GStreamer H.264 encoder element by factory name.
    Gst(String),
}

/// GStreamer elements `auto` tries, in this order: VideoToolbox, NVENC, VA
/// (new then legacy), Intel Quick Sync. The first that encodes a test frame
/// wins. (Not on macOS, where VideoToolbox is called directly.)
pub const HARDWARE_ELEMENTS: &[&str] =
    &["vtenc_h264_hw", "vtenc_h264", "nvh264enc", "vah264enc", "vaapih264enc", "qsvh264enc"];

impl FromStr for EncoderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EncoderKind::Auto),
            "videotoolbox" => Ok(EncoderKind::VideoToolbox),
            "x264" => Ok(EncoderKind::X264),
            _ => match s.strip_prefix("gst:") {
                Some(e) if !e.is_empty() => Ok(EncoderKind::Gst(e.to_string())),
                _ => Err(format!("unknown encoder {s:?}: use auto, videotoolbox, x264 or gst:ELEMENT")),
            },
        }
    }
}

impl fmt::Display for EncoderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncoderKind::Auto => f.write_str("auto"),
            EncoderKind::VideoToolbox => f.write_str("videotoolbox"),
            EncoderKind::X264 => f.write_str("x264"),
            EncoderKind::Gst(e) => write!(f, "gst:{e}"),
        }
    }
}

/// Resolves `auto` to a concrete backend. Call once at start-up; the answer
/// does not change.
///
/// On macOS that is VideoToolbox, the only encoder built there; a test
/// frame is encoded so that a broken one shows at start. Elsewhere each
/// element of [`HARDWARE_ELEMENTS`] is tried on a test frame, then x264.
pub fn resolve(kind: &EncoderKind) -> EncoderKind {
    if *kind != EncoderKind::Auto {
        return kind.clone();
    }
    resolve_auto()
}

#[cfg(target_os = "macos")]
fn resolve_auto() -> EncoderKind {
    #[cfg(feature = "videotoolbox")]
    match videotoolbox::probe() {
        Ok(()) => tracing::info!(encoder = "videotoolbox", "hardware encoder found"),
        Err(e) => tracing::warn!(encoder = "videotoolbox", "test encode failed: {e}; sessions will try again"),
    }
    EncoderKind::VideoToolbox
}

#[cfg(not(target_os = "macos"))]
fn resolve_auto() -> EncoderKind {
    #[cfg(feature = "gst")]
    for name in HARDWARE_ELEMENTS {
        let k = EncoderKind::Gst(name.to_string());
        match gst::probe(name) {
            Ok(()) => {
                tracing::info!(encoder = %k, "hardware encoder found");
                return k;
            }
            Err(e) => tracing::debug!(encoder = %k, "not usable: {e}"),
        }
    }
    tracing::info!("no hardware encoder usable; using x264");
    EncoderKind::X264
}

/// The size of the frame `auto` tries a hardware encoder with.
#[cfg(any(all(feature = "gst", not(target_os = "macos")), all(feature = "videotoolbox", target_os = "macos")))]
const PROBE_SIZE: (u32, u32) = (128, 64);

/// Whether `enc` (opened at [`PROBE_SIZE`]) encodes one grey NV12 frame as an IDR.
#[cfg(any(all(feature = "gst", not(target_os = "macos")), all(feature = "videotoolbox", target_os = "macos")))]
fn probe_encode(enc: &mut dyn Encoder) -> Result<(), EncodeError> {
    let (w, h) = PROBE_SIZE;
    let y = vec![128u8; (w * h) as usize];
    let uv = vec![128u8; (w * h / 2) as usize];
    let frame = Frame {
        format: PixelFormat::Nv12,
        width: w,
        height: h,
        planes: [&y, &uv],
        strides: [w as usize, w as usize],
        force_keyframe: true,
    };
    enc.encode(&frame).map(|_| ())
}

/// Builds an encoder. `Auto` is resolved first (prefer resolving once with
/// [`resolve`] and passing the result).
pub fn open(kind: &EncoderKind, config: &EncoderConfig) -> Result<Box<dyn Encoder>, EncodeError> {
    match resolve(kind) {
        #[cfg(all(feature = "videotoolbox", target_os = "macos"))]
        EncoderKind::VideoToolbox => Ok(Box::new(videotoolbox::VtEncoder::new(config)?)),
        #[cfg(all(feature = "x264", not(target_os = "macos")))]
        EncoderKind::X264 => Ok(Box::new(x264::X264Encoder::new(config)?)),
        #[cfg(all(feature = "gst", not(target_os = "macos")))]
        EncoderKind::Gst(element) => Ok(Box::new(gst::GstEncoder::new(&element, config)?)),
        other => Err(EncodeError::Unavailable(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_kinds_parse_and_print() {
        for (text, kind) in [
            ("auto", EncoderKind::Auto),
            ("videotoolbox", EncoderKind::VideoToolbox),
            ("x264", EncoderKind::X264),
            ("gst:nvh264enc", EncoderKind::Gst("nvh264enc".into())),
        ] {
            assert_eq!(text.parse::<EncoderKind>().unwrap(), kind);
            assert_eq!(kind.to_string(), text);
        }
        for bad in ["", "gst:", "vt", "nvenc"] {
            assert!(bad.parse::<EncoderKind>().is_err(), "{bad}");
        }
    }

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn videotoolbox_is_unavailable_off_macos() {
        let e = open(&EncoderKind::VideoToolbox, &EncoderConfig::new(64, 64)).err().unwrap();
        assert!(matches!(&e, EncodeError::Unavailable(k) if k == "videotoolbox"), "{e}");
    }
}
