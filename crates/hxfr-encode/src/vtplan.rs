//! What the VideoToolbox backend decides, without the framework: the session
//! settings a config maps to, which properties must stick, frame timing, how
//! a frame reaches a CVPixelBuffer, and the synchronous hand-off from the
//! encoder's output callback (another thread) back to `encode`.
//!
//! Everything here is plain Rust, compiled and unit-tested on every system;
//! `videotoolbox.rs` only turns these decisions into framework calls.

// On other systems only the tests use this module.
#![cfg_attr(not(all(feature = "videotoolbox", target_os = "macos")), allow(dead_code))]

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::frame::MAX_DIMENSION;
use crate::{EncodeError, EncoderConfig, Frame, PixelFormat};

/// How long one frame may take in the encoder before we call it failed
/// (the GStreamer backend allows the same).
pub const OUTPUT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long CoreVideo may hold on to a frame we wrapped after its output
/// arrived. It lets go when the encoder drops its last reference, which with
/// no reordering and no lookahead happens as the frame is encoded.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);
/// After tearing a session down because a wrapped frame was not let go: how
/// long to wait for the teardown to release it.
pub const TEARDOWN_GRACE: Duration = Duration::from_secs(2);

/// CoreVideo pixel formats (the values of `kCVPixelFormatType_32BGRA` and
/// `kCVPixelFormatType_420YpCbCr8BiPlanarVideoRange`: their FourCCs).
pub const CV_PIXEL_FORMAT_32BGRA: u32 = u32::from_be_bytes(*b"BGRA");
pub const CV_PIXEL_FORMAT_NV12: u32 = u32::from_be_bytes(*b"420v");

/// Plane strides and addresses that are multiples of this are wrapped as
/// they lie (CoreVideo's own buffers align rows to at least 16 bytes);
/// anything else is copied into a buffer from a pool.
pub const WRAP_ALIGN: usize = 16;

/// A hard cap of 1.5 times the average bitrate over any one second (as
/// WebRTC sets it): an IDR on demand still fits, a burst cannot run away.
const RATE_LIMIT_SECONDS: f64 = 1.0;
/// IDRs come when the guest asks for them (vsockenc forces one every
/// `keyframe-interval` frames); these only bound how long a stream can go
/// without one, as WebRTC and Chromium bound it. Zero would mean "the
/// encoder chooses", not "never".
const MAX_KEYFRAME_INTERVAL: i64 = 7200;
const MAX_KEYFRAME_INTERVAL_SECONDS: f64 = 240.0;
/// Lowest average bitrate asked for (the x264 backend's floor).
const MIN_BITRATE: u32 = 50_000;

/// `kVTProfileLevel_H264_*_AutoLevel`: the encoder picks the level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    ConstrainedBaseline,
    Main,
    High,
}

impl Profile {
    /// The profile for a requested profile_idc: 66 (and 0, the backend's
    /// choice, as with x264's fast presets) is Constrained Baseline, 77 and
    /// 88 Main, 100 and up High. Never more than was asked.
    pub fn from_idc(idc: u8) -> Profile {
        match idc {
            0..=76 => Profile::ConstrainedBaseline,
            77..=99 => Profile::Main,
            _ => Profile::High,
        }
    }
}

/// A session's settings, derived from an [`EncoderConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub width: i32,
    pub height: i32,
    pub profile: Profile,
    /// `AverageBitRate`, bits per second.
    pub average_bitrate: i64,
    /// `DataRateLimits`: at most this many bytes …
    pub rate_limit_bytes: i64,
    /// … in any window of this many seconds.
    pub rate_limit_seconds: f64,
    pub expected_frame_rate: f64,
    /// Presentation timestamps count in units of 1/`timescale` s …
    pub timescale: i32,
    /// … and frames are this many units apart.
    pub frame_duration: i64,
}

impl Settings {
    pub fn new(c: &EncoderConfig) -> Result<Settings, EncodeError> {
        let dim = |d: u32| (1..=MAX_DIMENSION).contains(&d).then_some(d as i32);
        let (Some(width), Some(height)) = (dim(c.width), dim(c.height)) else {
            return Err(EncodeError::Open(format!(
                "VideoToolbox: {}x{} is outside 1x1..{MAX_DIMENSION}x{MAX_DIMENSION}",
                c.width, c.height
            )));
        };
        let (num, den) = (c.fps_num.max(1), c.fps_den.max(1));
        // Exact frame times when the rate's numerator fits a CMTimeScale;
        // otherwise (never in practice) MPEG's 90 kHz clock.
        let (timescale, frame_duration) = match i32::try_from(num) {
            Ok(ts) => (ts, den as i64),
            Err(_) => (90_000, ((90_000 * den as u64) / num as u64).max(1) as i64),
        };
        let bitrate = c.bitrate.max(MIN_BITRATE) as i64;
        Ok(Settings {
            width,
            height,
            profile: Profile::from_idc(c.profile),
            average_bitrate: bitrate,
            rate_limit_bytes: bitrate * 3 / 2 / 8,
            rate_limit_seconds: RATE_LIMIT_SECONDS,
            expected_frame_rate: num as f64 / den as f64,
            timescale,
            frame_duration,
        })
    }

    /// Frame `n`'s presentation time, in timescale units (strictly increasing,
    /// as VTCompressionSessionEncodeFrame requires).
    pub fn pts(&self, n: u64) -> i64 {
        (n as i64).saturating_mul(self.frame_duration)
    }

    /// How long to wait for an output before asking the encoder to emit
    /// pending frames (VTCompressionSessionCompleteFrames): two frame times,
    /// within 20..250 ms. A real-time encoder answers well before.
    pub fn flush_after(&self) -> Duration {
        let two_frames_ns = 2 * self.frame_duration as u128 * 1_000_000_000 / self.timescale.max(1) as u128;
        Duration::from_nanos(two_frames_ns.min(u64::MAX as u128) as u64)
            .clamp(Duration::from_millis(20), Duration::from_millis(250))
    }
}

/// A compression property (`kVTCompressionPropertyKey_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    RealTime,
    AllowFrameReordering,
    ProfileLevel,
    AverageBitRate,
    DataRateLimits,
    MaxKeyFrameInterval,
    MaxKeyFrameIntervalDuration,
    ExpectedFrameRate,
    ColorPrimaries,
    TransferFunction,
    YCbCrMatrix,
}

impl Key {
    /// The framework's name for it, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Key::RealTime => "RealTime",
            Key::AllowFrameReordering => "AllowFrameReordering",
            Key::ProfileLevel => "ProfileLevel",
            Key::AverageBitRate => "AverageBitRate",
            Key::DataRateLimits => "DataRateLimits",
            Key::MaxKeyFrameInterval => "MaxKeyFrameInterval",
            Key::MaxKeyFrameIntervalDuration => "MaxKeyFrameIntervalDuration",
            Key::ExpectedFrameRate => "ExpectedFrameRate",
            Key::ColorPrimaries => "ColorPrimaries",
            Key::TransferFunction => "TransferFunction",
            Key::YCbCrMatrix => "YCbCrMatrix",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Profile(Profile),
    /// A CFArray of one bytes/seconds pair.
    RateLimit {
        bytes: i64,
        seconds: f64,
    },
    /// `kCVImageBuffer*_ITU_R_709_2` for the colour keys: the stream's VUI
    /// says BT.709, which is how the other backends convert and signal RGB.
    Bt709,
}

/// One property to set on a new session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Property {
    pub key: Key,
    pub value: Value,
    /// A session that refuses it is not opened. Other properties are
    /// best-effort: encoders differ in what they take, and the stream itself
    /// tells the guest the profile and level it got.
    pub required: bool,
}

/// The properties of a session, in the order they are set. `low_latency`:
/// the session was created with EnableLowLatencyRateControl, which already
/// rules out frame reordering (so an encoder refusing the key is fine).
pub fn session_properties(s: &Settings, low_latency: bool) -> Vec<Property> {
    let p = |key, value, required| Property { key, value, required };
    vec![
        p(Key::RealTime, Value::Bool(true), false),
        p(Key::AllowFrameReordering, Value::Bool(false), !low_latency),
        p(Key::ProfileLevel, Value::Profile(s.profile), false),
        p(Key::AverageBitRate, Value::Int(s.average_bitrate), true),
        p(Key::DataRateLimits, Value::RateLimit { bytes: s.rate_limit_bytes, seconds: s.rate_limit_seconds }, false),
        p(Key::MaxKeyFrameInterval, Value::Int(MAX_KEYFRAME_INTERVAL), false),
        p(Key::MaxKeyFrameIntervalDuration, Value::Float(MAX_KEYFRAME_INTERVAL_SECONDS), false),
        p(Key::ExpectedFrameRate, Value::Float(s.expected_frame_rate), false),
        p(Key::ColorPrimaries, Value::Bt709, false),
        p(Key::TransferFunction, Value::Bt709, false),
        p(Key::YCbCrMatrix, Value::Bt709, false),
    ]
}

/// An OSStatus (or CVReturn) as a result: 0 is success.
pub fn os_check(call: &str, status: i32) -> Result<(), EncodeError> {
    if status == 0 { Ok(()) } else { Err(EncodeError::OsStatus { call: call.to_string(), status }) }
}

/// What VTSessionSetProperty's answer means for the session: a required
/// property that did not stick fails it, anything else is logged and skipped.
pub fn property_result(p: &Property, status: i32) -> Result<(), EncodeError> {
    let call = format!("VTSessionSetProperty({})", p.key.name());
    match os_check(&call, status) {
        Err(e) if !p.required => {
            tracing::warn!("VideoToolbox: {e}; {} left to the encoder", p.key.name());
            Ok(())
        }
        r => r,
    }
}

/// The CoreVideo format a frame is encoded from: packed RGB as BGRA (RGBx is
/// swizzled on the way), NV12 as video-range 4:2:0 bi-planar.
pub fn cv_pixel_format(f: PixelFormat) -> u32 {
    match f {
        PixelFormat::Bgrx | PixelFormat::Rgbx => CV_PIXEL_FORMAT_32BGRA,
        PixelFormat::Nv12 => CV_PIXEL_FORMAT_NV12,
    }
}

/// How a frame becomes a CVPixelBuffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputPath {
    /// CVPixelBufferCreateWithBytes / WithPlanarBytes over the frame's own
    /// memory (a socket buffer, the shared-memory mapping): no copy on our side.
    Wrap,
    /// Copied (RGBx swizzled) into an IOSurface-backed buffer from a pool.
    Copy,
}

/// Wraps BGRx and NV12 whose every plane starts and strides on a
/// [`WRAP_ALIGN`] boundary and holds a whole stride for its last row too
/// (CoreVideo takes a plane to be rows × stride bytes; a frame's plane ends
/// at its last pixel, so in practice: tight strides), unless wrapping was
/// turned off (a wrapped frame was once held past its output). Copies the rest.
pub fn input_path(frame: &Frame<'_>, wrap_allowed: bool) -> InputPath {
    let fits = |p: usize| {
        let (plane, stride) = (frame.planes[p], frame.strides[p]);
        stride.is_multiple_of(WRAP_ALIGN)
            && plane.as_ptr().addr().is_multiple_of(WRAP_ALIGN)
            && plane.len() >= stride * frame.format.rows(p, frame.height) as usize
    };
    let wrap = wrap_allowed && frame.format != PixelFormat::Rgbx && (0..frame.format.num_planes()).all(fits);
    if wrap { InputPath::Wrap } else { InputPath::Copy }
}

/// Width and height of each plane in CoreVideo's terms (for
/// CVPixelBufferCreateWithPlanarBytes: NV12's CbCr plane counts pairs).
pub fn plane_sizes(frame: &Frame<'_>) -> [(usize, usize); 2] {
    let (w, h) = (frame.width as usize, frame.height as usize);
    match frame.format {
        PixelFormat::Nv12 => [(w, h), (w.div_ceil(2), h.div_ceil(2))],
        _ => [(w, h), (0, 0)],
    }
}

/// Copies `frame` into the planes of a locked pixel buffer (`dst[p]` holds
/// plane `p` from its first byte, rows `strides[p]` apart), RGBx as BGRx.
pub fn copy_frame(frame: &Frame<'_>, dst: &mut [&mut [u8]], strides: &[usize]) -> Result<(), EncodeError> {
    let planes = frame.format.num_planes();
    if dst.len() < planes || strides.len() < planes {
        return Err(EncodeError::Encode(format!("pixel buffer has {} planes, the frame {planes}", dst.len())));
    }
    for p in 0..planes {
        let row = frame.format.row_bytes(p, frame.width) as usize;
        let rows = frame.format.rows(p, frame.height) as usize;
        let (d, ds, s, ss) = (&mut *dst[p], strides[p], frame.planes[p], frame.strides[p]);
        if ds < row || d.len() < ds * (rows - 1) + row {
            return Err(EncodeError::Encode(format!(
                "pixel buffer plane {p} ({} bytes, stride {ds}) cannot hold {rows} rows of {row} bytes",
                d.len()
            )));
        }
        for r in 0..rows {
            let (from, to) = (&s[r * ss..r * ss + row], &mut d[r * ds..r * ds + row]);
            if frame.format == PixelFormat::Rgbx {
                for (o, i) in to.chunks_exact_mut(4).zip(from.chunks_exact(4)) {
                    o.copy_from_slice(&[i[2], i[1], i[0], i[3]]);
                }
            } else {
                to.copy_from_slice(from);
            }
        }
    }
    Ok(())
}

/// Outputs handed from the encoder's callback thread to the thread waiting
/// in `encode`, tagged with the sequence number of the frame they answer.
pub struct Mailbox<T> {
    queue: Mutex<VecDeque<(u64, T)>>,
    ready: Condvar,
}

/// Why [`Mailbox::wait_for`] returned without the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    Timeout,
    /// The output of a later frame came first: the one waited for is lost.
    Skipped {
        got: u64,
    },
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox { queue: Mutex::new(VecDeque::new()), ready: Condvar::new() }
    }
}

impl<T> Mailbox<T> {
    /// Called by the output callback.
    pub fn deliver(&self, seq: u64, item: T) {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).push_back((seq, item));
        self.ready.notify_all();
    }

    /// The output for frame `seq`. Outputs of earlier frames (ones whose wait
    /// timed out and that answered late) are dropped on the way.
    pub fn wait_for(&self, seq: u64, timeout: Duration) -> Result<T, Missing> {
        let deadline = Instant::now() + timeout;
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            while let Some((got, item)) = queue.pop_front() {
                match got.cmp(&seq) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => return Ok(item),
                    std::cmp::Ordering::Greater => return Err(Missing::Skipped { got }),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Missing::Timeout);
            }
            queue = self.ready.wait_timeout(queue, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// Waits for frame `seq`'s output: `flush_after`, then `flush` (asks the
/// encoder to emit what it holds), then up to `timeout` in all. One output
/// per frame, in order, or an error that says which.
pub fn wait_output<T>(
    mailbox: &Mailbox<Result<T, EncodeError>>,
    seq: u64,
    flush_after: Duration,
    timeout: Duration,
    flush: impl FnOnce() -> Result<(), EncodeError>,
) -> Result<T, EncodeError> {
    let started = Instant::now();
    let first = match mailbox.wait_for(seq, flush_after.min(timeout)) {
        Err(Missing::Timeout) => {
            flush()?;
            mailbox.wait_for(seq, timeout.saturating_sub(started.elapsed()))
        }
        r => r,
    };
    match first {
        Ok(r) => r,
        Err(Missing::Timeout) => {
            Err(EncodeError::Encode(format!("VideoToolbox gave no output for frame {seq} within {timeout:?}")))
        }
        Err(Missing::Skipped { got }) => Err(EncodeError::Encode(format!(
            "VideoToolbox answered frame {got} before frame {seq}: frame {seq} is lost"
        ))),
    }
}

/// Set once, waited for: CoreVideo's release callback for a wrapped frame.
#[derive(Default)]
pub struct Latch(Mailbox<()>);

impl Latch {
    pub fn set(&self) {
        self.0.deliver(0, ());
    }

    /// Whether it was set within `timeout` (or before).
    pub fn wait(&self, timeout: Duration) -> bool {
        self.0.wait_for(0, timeout).is_ok()
    }

    /// Returns once it is set, however long that takes.
    pub fn wait_forever(&self) {
        while !self.wait(Duration::from_secs(3600)) {}
    }
}

/// How a wrapped frame's memory came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Released within `timeout`.
    Prompt,
    /// Only after `teardown` (the session invalidated).
    AfterTeardown,
    /// Not even within `grace`: the encoder may still read the memory.
    Never,
}

/// The frame's memory is only ours again once CoreVideo calls the release
/// callback (`released`). Waits `timeout` for it; if it is late, runs
/// `teardown` and waits `grace` more.
pub fn await_release(released: &Latch, timeout: Duration, grace: Duration, teardown: impl FnOnce()) -> Release {
    if released.wait(timeout) {
        return Release::Prompt;
    }
    teardown();
    if released.wait(grace) { Release::AfterTeardown } else { Release::Never }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hxfr_proto::Layout;

    use super::*;

    fn config(w: u32, h: u32) -> EncoderConfig {
        EncoderConfig::new(w, h)
    }

    #[test]
    fn profiles_never_exceed_the_request() {
        assert_eq!(Profile::from_idc(0), Profile::ConstrainedBaseline);
        assert_eq!(Profile::from_idc(66), Profile::ConstrainedBaseline);
        assert_eq!(Profile::from_idc(77), Profile::Main);
        assert_eq!(Profile::from_idc(88), Profile::Main);
        assert_eq!(Profile::from_idc(100), Profile::High);
        assert_eq!(Profile::from_idc(244), Profile::High);
    }

    #[test]
    fn settings_from_the_default_config() {
        let s = Settings::new(&config(1280, 720)).unwrap();
        assert_eq!((s.width, s.height), (1280, 720));
        assert_eq!(s.average_bitrate, 4_000_000);
        // 1.5 × 4 Mbit/s over one second, in bytes.
        assert_eq!((s.rate_limit_bytes, s.rate_limit_seconds), (750_000, 1.0));
        assert_eq!(s.expected_frame_rate, 30.0);
        assert_eq!((s.timescale, s.frame_duration), (30, 1));
        assert_eq!(s.pts(0), 0);
        assert_eq!(s.pts(90), 90);
        assert_eq!(s.flush_after(), Duration::from_nanos(66_666_666), "two frames");
    }

    #[test]
    fn settings_edge_cases() {
        let mut c = config(640, 360);
        (c.fps_num, c.fps_den, c.bitrate) = (30000, 1001, 1);
        let s = Settings::new(&c).unwrap();
        assert_eq!((s.timescale, s.frame_duration), (30000, 1001));
        assert!((s.expected_frame_rate - 29.97).abs() < 0.01);
        assert_eq!(s.average_bitrate, 50_000, "bitrate floor");
        assert_eq!(s.pts(3), 3003);
        // A rate whose numerator does not fit a CMTimeScale falls back to 90 kHz.
        (c.fps_num, c.fps_den) = (u32::MAX, 1);
        let s = Settings::new(&c).unwrap();
        assert_eq!((s.timescale, s.frame_duration), (90_000, 1));
        assert_eq!(s.flush_after(), Duration::from_millis(20), "clamped low");
        // Zero rates are treated as 1 (as the x264 backend does); slow rates clamp high.
        (c.fps_num, c.fps_den) = (0, 0);
        assert_eq!(Settings::new(&c).unwrap().flush_after(), Duration::from_millis(250));
        assert!(matches!(Settings::new(&config(0, 360)), Err(EncodeError::Open(_))));
        assert!(matches!(Settings::new(&config(640, MAX_DIMENSION + 1)), Err(EncodeError::Open(_))));
    }

    #[test]
    fn properties_set_on_every_session() {
        let s = Settings::new(&config(1920, 1080)).unwrap();
        let props = session_properties(&s, false);
        let get = |k| props.iter().find(|p| p.key == k).copied().unwrap();
        assert_eq!(get(Key::RealTime).value, Value::Bool(true));
        assert_eq!(get(Key::AllowFrameReordering).value, Value::Bool(false));
        assert!(get(Key::AllowFrameReordering).required);
        assert_eq!(get(Key::ProfileLevel).value, Value::Profile(Profile::ConstrainedBaseline));
        assert_eq!(
            get(Key::AverageBitRate),
            Property { key: Key::AverageBitRate, value: Value::Int(4_000_000), required: true }
        );
        assert_eq!(get(Key::DataRateLimits).value, Value::RateLimit { bytes: 750_000, seconds: 1.0 });
        assert_eq!(get(Key::MaxKeyFrameInterval).value, Value::Int(7200));
        assert_eq!(get(Key::ExpectedFrameRate).value, Value::Float(30.0));
        for k in [Key::ColorPrimaries, Key::TransferFunction, Key::YCbCrMatrix] {
            assert_eq!(get(k).value, Value::Bt709);
        }
        let required: Vec<_> = props.iter().filter(|p| p.required).map(|p| p.key).collect();
        assert_eq!(required, [Key::AllowFrameReordering, Key::AverageBitRate]);
        // Low-latency rate control already forbids reordering.
        let ll = session_properties(&s, true);
        assert!(!ll.iter().find(|p| p.key == Key::AllowFrameReordering).unwrap().required);
        assert_eq!(ll.len(), props.len());
    }

    #[test]
    fn os_status_maps_to_encode_errors() {
        assert!(os_check("VTCompressionSessionCreate", 0).is_ok());
        let e = os_check("VTCompressionSessionCreate", -12908).unwrap_err();
        assert!(matches!(&e, EncodeError::OsStatus { call, status: -12908 } if call == "VTCompressionSessionCreate"));
        assert_eq!(e.to_string(), "VTCompressionSessionCreate failed: OSStatus -12908");
        let s = Settings::new(&config(64, 64)).unwrap();
        let props = session_properties(&s, false);
        let bitrate = props.iter().find(|p| p.key == Key::AverageBitRate).unwrap();
        let profile = props.iter().find(|p| p.key == Key::ProfileLevel).unwrap();
        assert!(property_result(profile, -12900).is_ok(), "best effort");
        assert!(property_result(bitrate, 0).is_ok());
        let e = property_result(bitrate, -12900).unwrap_err();
        assert_eq!(e.to_string(), "VTSessionSetProperty(AverageBitRate) failed: OSStatus -12900");
    }

    /// A frame over `data` with the given plane strides (NV12's plane 1 right after plane 0).
    fn frame(data: &[u8], format: PixelFormat, w: u32, h: u32, stride: u32) -> Frame<'_> {
        Frame::new(data, &Layout::inline(format, w, h, stride), false).unwrap()
    }

    /// `len` bytes starting on a WRAP_ALIGN boundary, plus an offset into them.
    fn aligned(len: usize, offset: usize) -> (Vec<u8>, usize) {
        let v = vec![0u8; len + 64];
        let start = (WRAP_ALIGN - v.as_ptr() as usize % WRAP_ALIGN) % WRAP_ALIGN + offset;
        (v, start)
    }

    #[test]
    fn aligned_bgrx_and_nv12_are_wrapped_the_rest_copied() {
        let (v, at) = aligned(64 * 4 * 8, 0);
        let f = frame(&v[at..at + 64 * 4 * 8], PixelFormat::Bgrx, 64, 8, 256);
        assert_eq!(input_path(&f, true), InputPath::Wrap);
        assert_eq!(input_path(&f, false), InputPath::Copy, "wrapping turned off");
        let f = frame(&v[at..at + 64 * 4 * 8], PixelFormat::Rgbx, 64, 8, 256);
        assert_eq!(input_path(&f, true), InputPath::Copy, "RGBx is swizzled");
        // A stride that is not a multiple of 16.
        let f = frame(&v[at..at + 62 * 4 * 8], PixelFormat::Bgrx, 62, 8, 248);
        assert_eq!(input_path(&f, true), InputPath::Copy);
        // Aligned, but the last row's padding lies past the frame (60 × 4 < 256).
        let f = frame(&v[at..at + 256 * 7 + 240], PixelFormat::Bgrx, 60, 8, 256);
        assert_eq!(input_path(&f, true), InputPath::Copy);
        // A plane that starts off the boundary.
        let (v, at) = aligned(64 * 4 * 8, 4);
        let f = frame(&v[at..at + 64 * 4 * 8], PixelFormat::Bgrx, 64, 8, 256);
        assert_eq!(input_path(&f, true), InputPath::Copy);
        // NV12: both planes must qualify; 64x6 puts plane 1 at 384, 64x5 would not be even.
        let (v, at) = aligned(64 * 9, 0);
        let f = frame(&v[at..at + 64 * 9], PixelFormat::Nv12, 64, 6, 64);
        assert_eq!(input_path(&f, true), InputPath::Wrap);
        assert_eq!(plane_sizes(&f), [(64, 6), (32, 3)]);
        let (v, at) = aligned(72 * 9, 0);
        let f = frame(&v[at..at + 72 * 9], PixelFormat::Nv12, 64, 6, 72);
        assert_eq!(input_path(&f, true), InputPath::Copy);
        assert_eq!(cv_pixel_format(PixelFormat::Nv12), 0x3432_3076);
        assert_eq!(cv_pixel_format(PixelFormat::Rgbx), 0x4247_5241);
    }

    #[test]
    fn copies_into_wider_rows() {
        // 4x2 BGRx with a padded source stride into a destination stride of 32.
        let src: Vec<u8> = (0..2 * 20).map(|i| i as u8).collect();
        let f = frame(&src, PixelFormat::Bgrx, 4, 2, 20);
        let mut d = [0xeeu8; 64];
        copy_frame(&f, &mut [&mut d[..]], &[32]).unwrap();
        assert_eq!(&d[..16], &src[..16]);
        assert_eq!(&d[16..32], &[0xee; 16], "destination padding untouched");
        assert_eq!(&d[32..48], &src[20..36]);
        // RGBx comes out as BGRx, x kept.
        let f = frame(&src, PixelFormat::Rgbx, 4, 2, 20);
        copy_frame(&f, &mut [&mut d[..]], &[32]).unwrap();
        assert_eq!(&d[..8], &[2, 1, 0, 3, 6, 5, 4, 7]);
        assert_eq!(&d[32..36], &[22, 21, 20, 23]);
        // Too small a destination is an error, not a panic.
        assert!(copy_frame(&f, &mut [&mut d[..40]], &[32]).is_err());
        assert!(copy_frame(&f, &mut [&mut d[..]], &[8]).is_err());
        assert!(copy_frame(&f, &mut [], &[]).is_err());
    }

    #[test]
    fn copies_nv12_planes() {
        let (w, h, stride) = (4u32, 4u32, 6u32);
        let src: Vec<u8> = (0..stride * h + stride * h / 2).map(|i| i as u8).collect();
        let f = frame(&src, PixelFormat::Nv12, w, h, stride);
        let (mut y, mut uv) = (vec![0u8; 16 * 4], vec![0u8; 16 * 2]);
        copy_frame(&f, &mut [&mut y[..], &mut uv[..]], &[16, 16]).unwrap();
        for r in 0..4 {
            assert_eq!(&y[r * 16..r * 16 + 4], &src[r * 6..r * 6 + 4]);
        }
        for r in 0..2 {
            assert_eq!(&uv[r * 16..r * 16 + 4], &src[24 + r * 6..24 + r * 6 + 4]);
        }
    }

    #[test]
    fn outputs_come_back_in_order_across_threads() {
        let mb = Arc::new(Mailbox::<u32>::default());
        let tx = mb.clone();
        let t = std::thread::spawn(move || {
            for seq in 0..50u64 {
                std::thread::sleep(Duration::from_micros(200));
                tx.deliver(seq, seq as u32 * 10);
            }
        });
        for seq in 0..50u64 {
            assert_eq!(mb.wait_for(seq, OUTPUT_TIMEOUT), Ok(seq as u32 * 10));
        }
        t.join().unwrap();
    }

    #[test]
    fn late_outputs_are_dropped_later_ones_reported() {
        let mb = Mailbox::default();
        assert_eq!(mb.wait_for(0, Duration::from_millis(10)), Err(Missing::Timeout));
        // Frame 0's output turns up while frame 1 is waited for: skipped.
        mb.deliver(0, "late");
        mb.deliver(1, "one");
        assert_eq!(mb.wait_for(1, Duration::ZERO), Ok("one"));
        // An output for a frame after the one waited for means ours is lost.
        mb.deliver(3, "three");
        assert_eq!(mb.wait_for(2, Duration::ZERO), Err(Missing::Skipped { got: 3 }));
    }

    #[test]
    fn wait_output_flushes_then_gives_up() {
        let mb = Mailbox::<Result<u8, EncodeError>>::default();
        // Answered before the flush point: no flush.
        mb.deliver(0, Ok(7));
        let out = wait_output(&mb, 0, Duration::from_millis(5), OUTPUT_TIMEOUT, || panic!("no flush needed"));
        assert_eq!(out.unwrap(), 7);
        // The encoder holds the frame until asked: the flush delivers it.
        let out = wait_output(&mb, 1, Duration::from_millis(5), OUTPUT_TIMEOUT, || {
            mb.deliver(1, Ok(8));
            Ok(())
        });
        assert_eq!(out.unwrap(), 8);
        // An error from the callback is the frame's error.
        mb.deliver(2, Err(EncodeError::Encode("dropped".into())));
        assert!(
            matches!(wait_output(&mb, 2, Duration::ZERO, OUTPUT_TIMEOUT, || Ok(())), Err(EncodeError::Encode(m)) if m == "dropped")
        );
        // A failing flush fails the frame.
        let e = wait_output(&mb, 3, Duration::ZERO, OUTPUT_TIMEOUT, || {
            os_check("VTCompressionSessionCompleteFrames", -12903)
        });
        assert!(matches!(e, Err(EncodeError::OsStatus { status: -12903, .. })));
        // Nothing at all: bounded.
        let started = Instant::now();
        let e = wait_output(&mb, 4, Duration::from_millis(5), Duration::from_millis(30), || Ok(())).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(e.to_string().contains("no output for frame 4"), "{e}");
        // A later frame's output: this one is lost.
        mb.deliver(6, Ok(0));
        let e = wait_output(&mb, 5, Duration::ZERO, OUTPUT_TIMEOUT, || Ok(())).unwrap_err();
        assert!(e.to_string().contains("frame 5 is lost"), "{e}");
    }

    #[test]
    fn release_waits_then_tears_down() {
        let latch = Latch::default();
        latch.set();
        assert_eq!(await_release(&latch, Duration::ZERO, Duration::ZERO, || panic!("not late")), Release::Prompt);

        let latch = Arc::new(Latch::default());
        let l = latch.clone();
        let r = await_release(&latch, Duration::from_millis(5), OUTPUT_TIMEOUT, move || {
            std::thread::spawn(move || l.set());
        });
        assert_eq!(r, Release::AfterTeardown);

        let latch = Arc::new(Latch::default());
        let mut torn = false;
        let r = await_release(&latch, Duration::from_millis(1), Duration::from_millis(1), || torn = true);
        assert_eq!((r, torn), (Release::Never, true));
        // What the backend then does: wait until it comes, however late.
        let l = latch.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            l.set();
        });
        latch.wait_forever();
        t.join().unwrap();
    }
}
