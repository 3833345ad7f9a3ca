//! Apple's VideoToolbox, called directly: one `VTCompressionSession` per
//! encoder (macOS only; the objc2 bindings need no SDK to type-check).
//!
//! The session is created for H.264 with low-latency rate control asked for
//! in the encoder specification (Apple Silicon), or without it where no
//! encoder offers it, and set up as `vtplan::session_properties` says:
//! real time, no frame reordering, the profile asked for, an average bitrate
//! with a hard cap, IDRs only when the guest asks. Each frame becomes a
//! CVPixelBuffer (wrapping the frame's own memory where its layout allows,
//! else copied into a pooled IOSurface-backed buffer), is encoded with
//! `ForceKeyFrame` when the guest asked for an IDR, and `encode` waits,
//! bounded, for that frame's output callback. The callback converts the AVCC
//! sample to Annex B with SPS/PPS in front of every IDR (`crate::avcc`).
//!
//! Only the framework calls are here; every decision is in `vtplan`, which
//! is compiled and tested on every system.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use objc2_core_foundation::{CFArray, CFBoolean, CFDictionary, CFNumber, CFRetained, CFString, CFType};
use objc2_core_media::{
    CMFormatDescription, CMSampleBuffer, CMTime, CMTimeFlags, CMVideoFormatDescriptionGetH264ParameterSetAtIndex,
    kCMVideoCodecType_H264,
};
use objc2_core_video::{
    CVPixelBuffer, CVPixelBufferCreateWithBytes, CVPixelBufferCreateWithPlanarBytes, CVPixelBufferGetBaseAddress,
    CVPixelBufferGetBaseAddressOfPlane, CVPixelBufferGetBytesPerRow, CVPixelBufferGetBytesPerRowOfPlane,
    CVPixelBufferGetHeight, CVPixelBufferGetHeightOfPlane, CVPixelBufferIsPlanar, CVPixelBufferLockBaseAddress,
    CVPixelBufferLockFlags, CVPixelBufferPool, CVPixelBufferUnlockBaseAddress,
    kCVImageBufferColorPrimaries_ITU_R_709_2, kCVImageBufferTransferFunction_ITU_R_709_2,
    kCVImageBufferYCbCrMatrix_ITU_R_709_2, kCVPixelBufferHeightKey, kCVPixelBufferIOSurfacePropertiesKey,
    kCVPixelBufferPixelFormatTypeKey, kCVPixelBufferWidthKey, kCVPixelFormatType_32BGRA,
    kCVPixelFormatType_420YpCbCr8BiPlanarVideoRange,
};
use objc2_video_toolbox::{
    VTCompressionSession, VTEncodeInfoFlags, VTSessionSetProperty, kVTCompressionPropertyKey_AllowFrameReordering,
    kVTCompressionPropertyKey_AverageBitRate, kVTCompressionPropertyKey_ColorPrimaries,
    kVTCompressionPropertyKey_DataRateLimits, kVTCompressionPropertyKey_ExpectedFrameRate,
    kVTCompressionPropertyKey_MaxKeyFrameInterval, kVTCompressionPropertyKey_MaxKeyFrameIntervalDuration,
    kVTCompressionPropertyKey_ProfileLevel, kVTCompressionPropertyKey_RealTime,
    kVTCompressionPropertyKey_TransferFunction, kVTCompressionPropertyKey_YCbCrMatrix,
    kVTEncodeFrameOptionKey_ForceKeyFrame, kVTProfileLevel_H264_ConstrainedBaseline_AutoLevel,
    kVTProfileLevel_H264_High_AutoLevel, kVTProfileLevel_H264_Main_AutoLevel,
    kVTVideoEncoderSpecification_EnableLowLatencyRateControl,
};

use crate::avcc::AvccAccessUnit;
use crate::vtplan::{
    InputPath, Key, Latch, Mailbox, OUTPUT_TIMEOUT, Profile, RELEASE_TIMEOUT, Release, Settings, TEARDOWN_GRACE, Value,
    await_release, copy_frame, cv_pixel_format, input_path, os_check, plane_sizes, property_result, session_properties,
    wait_output,
};
use crate::{EncodeError, EncodedFrame, Encoder, EncoderConfig, Frame, PixelFormat};

// vtplan's FourCCs are the framework's constants.
const _: () = assert!(crate::vtplan::CV_PIXEL_FORMAT_32BGRA == kCVPixelFormatType_32BGRA);
const _: () = assert!(crate::vtplan::CV_PIXEL_FORMAT_NV12 == kCVPixelFormatType_420YpCbCr8BiPlanarVideoRange);

/// Outputs from the callback to `encode`, tagged with their frame's number.
type Outputs = Mailbox<Result<EncodedFrame, EncodeError>>;

/// Cleared, for the whole process, the first time CoreVideo holds a wrapped
/// frame past its output: from then on frames are copied.
static WRAP_ALLOWED: AtomicBool = AtomicBool::new(true);

pub struct VtEncoder {
    config: EncoderConfig,
    settings: Settings,
    session: CFRetained<VTCompressionSession>,
    /// The session's output callback refcon: one strong count of `outputs`,
    /// given back in `Drop` once the session is invalidated.
    outputs_refcon: *const Outputs,
    outputs: Arc<Outputs>,
    low_latency: bool,
    /// Buffers for copied frames, for one CoreVideo pixel format.
    pool: Option<(u32, CFRetained<CVPixelBufferPool>)>,
    frame_no: u64,
}

// SAFETY: sessions, pools and pixel buffers are reference-counted CF objects
// that VideoToolbox and CoreVideo let any thread use; the encoder is used by
// one thread at a time (`&mut self`), and the output callback, which runs on
// VideoToolbox's threads, only touches `outputs` (a Mutex and a Condvar).
unsafe impl Send for VtEncoder {}

impl VtEncoder {
    pub fn new(config: &EncoderConfig) -> Result<VtEncoder, EncodeError> {
        let settings = Settings::new(config)?;
        let outputs = Arc::new(Outputs::default());
        let refcon = Arc::into_raw(outputs.clone());
        let mut failure = None;
        for low_latency in [true, false] {
            match create_session(&settings, low_latency, refcon) {
                Ok(session) => {
                    // From here on `Drop` gives the refcon back.
                    let enc = VtEncoder {
                        config: config.clone(),
                        settings,
                        session,
                        outputs_refcon: refcon,
                        outputs,
                        low_latency,
                        pool: None,
                        frame_no: 0,
                    };
                    enc.configure()?;
                    tracing::debug!(low_latency, "VideoToolbox session {}x{}", config.width, config.height);
                    return Ok(enc);
                }
                Err(e) => {
                    tracing::debug!(low_latency, "VideoToolbox: {e}");
                    failure = Some(e);
                }
            }
        }
        // SAFETY: no session was created with the refcon, so nothing else
        // holds the count it carries.
        drop(unsafe { Arc::from_raw(refcon) });
        Err(failure.expect("tried at least once"))
    }

    fn configure(&self) -> Result<(), EncodeError> {
        let session: &CFType = &self.session;
        for p in session_properties(&self.settings, self.low_latency) {
            let value = cf_value(p.key, p.value)?;
            // SAFETY: a live session; the key is a VideoToolbox constant and
            // the value a CF object of the type that key takes.
            let status = unsafe { VTSessionSetProperty(session, property_key(p.key), Some(&value)) };
            property_result(&p, status)?;
        }
        // SAFETY: a live session.
        os_check("VTCompressionSessionPrepareToEncodeFrames", unsafe { self.session.prepare_to_encode_frames() })
    }

    /// Encodes `buffer` as frame `seq` and waits for its output.
    fn encode_buffer(
        &self,
        buffer: &CVPixelBuffer,
        seq: u64,
        force_keyframe: bool,
    ) -> Result<EncodedFrame, EncodeError> {
        let pts = cm_time(self.settings.pts(seq), self.settings.timescale);
        let duration = cm_time(self.settings.frame_duration, self.settings.timescale);
        let options = force_keyframe.then(|| {
            // SAFETY: an immutable constant exported by VideoToolbox.
            let key = unsafe { kVTEncodeFrameOptionKey_ForceKeyFrame };
            let yes: &CFType = CFBoolean::new(true);
            CFDictionary::<CFString, CFType>::from_slices(&[key], &[yes])
        });
        let mut flags = VTEncodeInfoFlags(0);
        // SAFETY: a live session and pixel buffer (VideoToolbox retains the
        // buffer as long as it needs it); the options dictionary maps a
        // CFString key to a CFBoolean as the API wants; the frame refcon is
        // the frame number, never dereferenced; `flags` is a valid out-pointer.
        let status = unsafe {
            self.session.encode_frame(
                buffer,
                pts,
                duration,
                options.as_deref().map(|d| d.as_opaque()),
                ptr::without_provenance_mut(seq as usize),
                &mut flags,
            )
        };
        os_check("VTCompressionSessionEncodeFrame", status)?;
        if flags.contains(VTEncodeInfoFlags::FrameDropped) {
            return Err(EncodeError::Encode(format!("VideoToolbox dropped frame {seq}")));
        }
        wait_output(&self.outputs, seq, self.settings.flush_after(), OUTPUT_TIMEOUT, || {
            // SAFETY: a live session; emits every frame up to this one's pts.
            os_check("VTCompressionSessionCompleteFrames", unsafe { self.session.complete_frames(pts) })
        })
    }

    /// A pooled buffer holding a copy of `frame`.
    fn copy_to_pool(&mut self, frame: &Frame<'_>) -> Result<CFRetained<CVPixelBuffer>, EncodeError> {
        let format = cv_pixel_format(frame.format);
        if self.pool.as_ref().is_none_or(|(f, _)| *f != format) {
            self.pool = Some((format, create_pool(&self.settings, format)?));
        }
        let pool = &self.pool.as_ref().expect("created above").1;
        let mut out = ptr::null_mut();
        // SAFETY: a live pool; `out` is a valid out-pointer.
        let status = unsafe { CVPixelBufferPool::create_pixel_buffer(None, pool, NonNull::from(&mut out)) };
        os_check("CVPixelBufferPoolCreatePixelBuffer", status)?;
        // SAFETY: the Create rule: a non-null `out` is ours, +1.
        let buffer = unsafe { take_created(out, "CVPixelBufferPoolCreatePixelBuffer")? };
        // SAFETY: a live buffer, locked for writing (no flags).
        let status = unsafe { CVPixelBufferLockBaseAddress(&buffer, CVPixelBufferLockFlags::empty()) };
        os_check("CVPixelBufferLockBaseAddress", status)?;
        let copied = fill(&buffer, frame);
        // SAFETY: locked just above with the same flags.
        let status = unsafe { CVPixelBufferUnlockBaseAddress(&buffer, CVPixelBufferLockFlags::empty()) };
        copied?;
        os_check("CVPixelBufferUnlockBaseAddress", status)?;
        Ok(buffer)
    }
}

impl Encoder for VtEncoder {
    fn name(&self) -> &str {
        "videotoolbox"
    }

    fn config(&self) -> &EncoderConfig {
        &self.config
    }

    fn encode(&mut self, frame: &Frame<'_>) -> Result<EncodedFrame, EncodeError> {
        self.config.check_size(frame)?;
        let seq = self.frame_no;
        self.frame_no += 1;
        match input_path(frame, WRAP_ALLOWED.load(Ordering::Relaxed)) {
            InputPath::Wrap => {
                let wrapped = Wrapped::new(frame, &self.session)?;
                let out = self.encode_buffer(wrapped.buffer()?, seq, frame.force_keyframe);
                // The frame's memory is only ours again once CoreVideo let go.
                drop(wrapped);
                out
            }
            InputPath::Copy => {
                let buffer = self.copy_to_pool(frame)?;
                self.encode_buffer(&buffer, seq, frame.force_keyframe)
            }
        }
    }
}

impl Drop for VtEncoder {
    fn drop(&mut self) {
        // SAFETY: a live session. VTCompressionSessionInvalidate is the
        // documented deterministic teardown: once it returns VideoToolbox
        // makes no more output callbacks (WebRTC and Chromium free their
        // callback's refcon right after it the same way), so the count the
        // refcon carries can be given back.
        unsafe {
            self.session.invalidate();
            drop(Arc::from_raw(self.outputs_refcon));
        }
    }
}

/// Whether VideoToolbox encodes a small test frame.
pub fn probe() -> Result<(), EncodeError> {
    let (w, h) = crate::PROBE_SIZE;
    crate::probe_encode(&mut VtEncoder::new(&EncoderConfig::new(w, h))?)
}

fn create_session(
    s: &Settings,
    low_latency: bool,
    refcon: *const Outputs,
) -> Result<CFRetained<VTCompressionSession>, EncodeError> {
    let spec = low_latency.then(|| {
        // SAFETY: an immutable constant exported by VideoToolbox.
        let key = unsafe { kVTVideoEncoderSpecification_EnableLowLatencyRateControl };
        let yes: &CFType = CFBoolean::new(true);
        CFDictionary::<CFString, CFType>::from_slices(&[key], &[yes])
    });
    let mut out = ptr::null_mut();
    // SAFETY: the specification maps a CFString key to a CFBoolean; the
    // callback has VTCompressionOutputCallback's signature and reads `refcon`
    // as the `Outputs` it is (kept alive until the session is invalidated);
    // `out` is a valid out-pointer.
    let status = unsafe {
        VTCompressionSession::create(
            None,
            s.width,
            s.height,
            kCMVideoCodecType_H264,
            spec.as_deref().map(|d| d.as_opaque()),
            None,
            None,
            Some(on_output),
            refcon.cast_mut().cast(),
            NonNull::from(&mut out),
        )
    };
    let call = if low_latency {
        "VTCompressionSessionCreate (EnableLowLatencyRateControl)"
    } else {
        "VTCompressionSessionCreate"
    };
    os_check(call, status)?;
    // SAFETY: the Create rule: a non-null `out` is ours, +1.
    unsafe { take_created(out, call) }
}

/// Takes ownership of a CF object a Create function returned.
///
/// # Safety
/// `ptr` is null or a CF object of type `T` the caller owns one count of.
unsafe fn take_created<T: objc2_core_foundation::Type>(ptr: *mut T, call: &str) -> Result<CFRetained<T>, EncodeError> {
    let ptr = NonNull::new(ptr).ok_or_else(|| EncodeError::Encode(format!("{call} succeeded but returned nothing")))?;
    // SAFETY: as the caller promises.
    Ok(unsafe { CFRetained::from_raw(ptr) })
}

fn cm_time(value: i64, timescale: i32) -> CMTime {
    CMTime { value, timescale, flags: CMTimeFlags::Valid, epoch: 0 }
}

fn property_key(key: Key) -> &'static CFString {
    // SAFETY: immutable constants exported by VideoToolbox.
    unsafe {
        match key {
            Key::RealTime => kVTCompressionPropertyKey_RealTime,
            Key::AllowFrameReordering => kVTCompressionPropertyKey_AllowFrameReordering,
            Key::ProfileLevel => kVTCompressionPropertyKey_ProfileLevel,
            Key::AverageBitRate => kVTCompressionPropertyKey_AverageBitRate,
            Key::DataRateLimits => kVTCompressionPropertyKey_DataRateLimits,
            Key::MaxKeyFrameInterval => kVTCompressionPropertyKey_MaxKeyFrameInterval,
            Key::MaxKeyFrameIntervalDuration => kVTCompressionPropertyKey_MaxKeyFrameIntervalDuration,
            Key::ExpectedFrameRate => kVTCompressionPropertyKey_ExpectedFrameRate,
            Key::ColorPrimaries => kVTCompressionPropertyKey_ColorPrimaries,
            Key::TransferFunction => kVTCompressionPropertyKey_TransferFunction,
            Key::YCbCrMatrix => kVTCompressionPropertyKey_YCbCrMatrix,
        }
    }
}

/// The CF object a property value is set as.
fn cf_value(key: Key, value: Value) -> Result<CFRetained<CFType>, EncodeError> {
    Ok(match value {
        Value::Bool(b) => CFRetained::from(CFBoolean::new(b)),
        Value::Int(i) => CFNumber::new_i64(i).into(),
        Value::Float(f) => CFNumber::new_f64(f).into(),
        // SAFETY: reads immutable constants exported by VideoToolbox.
        Value::Profile(p) => CFRetained::from(unsafe {
            match p {
                Profile::ConstrainedBaseline => kVTProfileLevel_H264_ConstrainedBaseline_AutoLevel,
                Profile::Main => kVTProfileLevel_H264_Main_AutoLevel,
                Profile::High => kVTProfileLevel_H264_High_AutoLevel,
            }
        }),
        Value::RateLimit { bytes, seconds } => {
            let (bytes, seconds) = (CFNumber::new_i64(bytes), CFNumber::new_f64(seconds));
            CFArray::<CFNumber>::from_objects(&[&bytes, &seconds]).as_opaque().into()
        }
        // SAFETY: reads immutable constants exported by CoreVideo.
        Value::Bt709 => CFRetained::from(unsafe {
            match key {
                Key::ColorPrimaries => kCVImageBufferColorPrimaries_ITU_R_709_2,
                Key::TransferFunction => kCVImageBufferTransferFunction_ITU_R_709_2,
                Key::YCbCrMatrix => kCVImageBufferYCbCrMatrix_ITU_R_709_2,
                other => return Err(EncodeError::Open(format!("no BT.709 value for {}", other.name()))),
            }
        }),
    })
}

/// A pool of IOSurface-backed buffers (what the hardware encoder reads
/// without a copy of its own) of the session's size in `format`.
fn create_pool(s: &Settings, format: u32) -> Result<CFRetained<CVPixelBufferPool>, EncodeError> {
    // SAFETY: immutable constants exported by CoreVideo.
    let keys = unsafe {
        [
            kCVPixelBufferPixelFormatTypeKey,
            kCVPixelBufferWidthKey,
            kCVPixelBufferHeightKey,
            kCVPixelBufferIOSurfacePropertiesKey,
        ]
    };
    // The FourCCs used here are below 2^31: the CFNumber holds them exactly.
    let (f, w, h) = (CFNumber::new_i32(format as i32), CFNumber::new_i32(s.width), CFNumber::new_i32(s.height));
    let io = CFDictionary::<CFString, CFType>::empty();
    let values: [&CFType; 4] = [&f, &w, &h, io.as_opaque()];
    let attributes = CFDictionary::<CFString, CFType>::from_slices(&keys, &values);
    let mut out = ptr::null_mut();
    // SAFETY: the attributes map CoreVideo's keys to values of their types;
    // `out` is a valid out-pointer.
    let status =
        unsafe { CVPixelBufferPool::create(None, None, Some(attributes.as_opaque()), NonNull::from(&mut out)) };
    os_check("CVPixelBufferPoolCreate", status)?;
    // SAFETY: the Create rule: a non-null `out` is ours, +1.
    unsafe { take_created(out, "CVPixelBufferPoolCreate") }
}

/// Copies `frame` into `buffer`, which is locked for writing.
fn fill(buffer: &CVPixelBuffer, frame: &Frame<'_>) -> Result<(), EncodeError> {
    let planar = CVPixelBufferIsPlanar(buffer);
    let mut planes: Vec<&mut [u8]> = Vec::with_capacity(2);
    let mut strides = Vec::with_capacity(2);
    for p in 0..frame.format.num_planes() {
        let (base, stride, rows) = if planar {
            (
                CVPixelBufferGetBaseAddressOfPlane(buffer, p),
                CVPixelBufferGetBytesPerRowOfPlane(buffer, p),
                CVPixelBufferGetHeightOfPlane(buffer, p),
            )
        } else {
            (CVPixelBufferGetBaseAddress(buffer), CVPixelBufferGetBytesPerRow(buffer), CVPixelBufferGetHeight(buffer))
        };
        if base.is_null() {
            return Err(EncodeError::Encode(format!("pixel buffer plane {p} has no memory")));
        }
        // SAFETY: while the buffer is locked, plane `p` is `rows` rows of
        // `stride` writable bytes, and nothing else touches them: the buffer
        // came from the pool just now and is not yet given to the encoder.
        planes.push(unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>(), stride * rows) });
        strides.push(stride);
    }
    copy_frame(frame, &mut planes, &strides)
}

/// A CVPixelBuffer over a frame's own memory. The memory is borrowed for
/// `'f` only, so dropping this waits until CoreVideo has let go of it (its
/// release callback ran); if it is late, the session is torn down, which
/// releases every buffer it holds, and if even that does not help, the
/// drop waits for good.
struct Wrapped<'f, 's> {
    buffer: Option<CFRetained<CVPixelBuffer>>,
    released: Arc<Latch>,
    session: &'s VTCompressionSession,
    _frame: PhantomData<&'f [u8]>,
}

impl<'f, 's> Wrapped<'f, 's> {
    fn new(frame: &Frame<'f>, session: &'s VTCompressionSession) -> Result<Wrapped<'f, 's>, EncodeError> {
        let released = Arc::new(Latch::default());
        // One count for the release callback, which takes it back. Should
        // creation fail without calling it, the count leaks (a few bytes)
        // rather than risk a double free.
        let refcon: *mut c_void = Arc::into_raw(released.clone()).cast_mut().cast();
        let (w, h) = (frame.width as usize, frame.height as usize);
        let mut out = ptr::null_mut();
        let status = if frame.format == PixelFormat::Nv12 {
            let [(w0, h0), (w1, h1)] = plane_sizes(frame);
            let mut bases = frame.planes.map(|p| p.as_ptr().cast_mut().cast::<c_void>());
            let (mut widths, mut heights, mut strides) = ([w0, w1], [h0, h1], frame.strides);
            // SAFETY: each plane holds `strides[p]` bytes for every one of
            // its rows (`input_path` checked, on top of Frame::new's checks)
            // and stays valid until the release callback runs, which `Drop`
            // waits for; CoreVideo and the encoder only read it. The arrays
            // are read during the call. No plane descriptor block is given
            // (NULL, 0), as the API allows.
            unsafe {
                CVPixelBufferCreateWithPlanarBytes(
                    None,
                    w,
                    h,
                    kCVPixelFormatType_420YpCbCr8BiPlanarVideoRange,
                    ptr::null_mut(),
                    0,
                    2,
                    NonNull::from(&mut bases).cast(),
                    NonNull::from(&mut widths).cast(),
                    NonNull::from(&mut heights).cast(),
                    NonNull::from(&mut strides).cast(),
                    Some(release_planar),
                    refcon,
                    None,
                    NonNull::from(&mut out),
                )
            }
        } else {
            let base = NonNull::from(frame.planes[0]).cast::<c_void>();
            // SAFETY: as above, for the one BGRA plane.
            unsafe {
                CVPixelBufferCreateWithBytes(
                    None,
                    w,
                    h,
                    kCVPixelFormatType_32BGRA,
                    base,
                    frame.strides[0],
                    Some(release_bytes),
                    refcon,
                    None,
                    NonNull::from(&mut out),
                )
            }
        };
        let call = if frame.format == PixelFormat::Nv12 {
            "CVPixelBufferCreateWithPlanarBytes"
        } else {
            "CVPixelBufferCreateWithBytes"
        };
        os_check(call, status)?;
        // SAFETY: the Create rule: a non-null `out` is ours, +1.
        let buffer = unsafe { take_created(out, call)? };
        Ok(Wrapped { buffer: Some(buffer), released, session, _frame: PhantomData })
    }

    fn buffer(&self) -> Result<&CVPixelBuffer, EncodeError> {
        self.buffer.as_deref().ok_or_else(|| EncodeError::Encode("wrapped frame already given back".into()))
    }
}

impl Drop for Wrapped<'_, '_> {
    fn drop(&mut self) {
        drop(self.buffer.take());
        let session = self.session;
        let release = await_release(&self.released, RELEASE_TIMEOUT, TEARDOWN_GRACE, || {
            WRAP_ALLOWED.store(false, Ordering::Relaxed);
            tracing::warn!(
                "VideoToolbox held a frame for {RELEASE_TIMEOUT:?} past its output: session torn down, frames are copied from now on"
            );
            // SAFETY: a live session. Invalidating it releases every buffer
            // it holds; calls on it then fail with an OSStatus, and the host
            // opens a new encoder.
            unsafe { session.invalidate() };
        });
        if release == Release::Never {
            // The encoder could still read the frame, whose memory is only
            // borrowed until `encode` returns: this session's thread waits
            // for as long as that takes (its guest times out and
            // reconnects), rather than let the memory be freed or reused.
            tracing::error!(
                "VideoToolbox kept a frame after its session was torn down; this session waits until it lets go"
            );
            self.released.wait_forever();
        }
    }
}

/// VTCompressionOutputCallback: hands the frame's output (or error) to the
/// thread waiting in `encode`.
unsafe extern "C-unwind" fn on_output(
    refcon: *mut c_void,
    frame_refcon: *mut c_void,
    status: i32,
    flags: VTEncodeInfoFlags,
    sample: *mut CMSampleBuffer,
) {
    // SAFETY: `refcon` is the `Outputs` given to VTCompressionSessionCreate,
    // kept alive by the count it carries until the session is invalidated.
    let outputs = unsafe { &*refcon.cast_const().cast::<Outputs>() };
    // SAFETY: VideoToolbox passes a valid sample buffer for the duration of
    // the call, or null.
    let sample = unsafe { sample.as_ref() };
    // Never unwind into VideoToolbox.
    let result = catch_unwind(AssertUnwindSafe(|| read_output(status, flags, sample)))
        .unwrap_or_else(|_| Err(EncodeError::Encode("reading VideoToolbox's output panicked".into())));
    outputs.deliver(frame_refcon.addr() as u64, result);
}

/// One output as an Annex B access unit.
fn read_output(
    status: i32,
    flags: VTEncodeInfoFlags,
    sample: Option<&CMSampleBuffer>,
) -> Result<EncodedFrame, EncodeError> {
    os_check("VideoToolbox's output callback", status)?;
    let sample = match sample {
        Some(s) if !flags.contains(VTEncodeInfoFlags::FrameDropped) => s,
        _ => return Err(EncodeError::Encode("VideoToolbox dropped the frame".into())),
    };
    // SAFETY: a live sample buffer.
    let block = unsafe { sample.data_buffer() }
        .ok_or_else(|| EncodeError::Encode("VideoToolbox output without data".into()))?;
    // SAFETY: a live block buffer.
    let len = unsafe { block.data_length() };
    let mut avcc = vec![0u8; len];
    if let Some(dst) = NonNull::new(avcc.as_mut_ptr()) {
        // SAFETY: `dst` has `len` writable bytes; the block buffer holds `len`
        // (possibly in pieces: this copies across them).
        let status = unsafe { block.copy_data_bytes(0, len, dst.cast()) };
        os_check("CMBlockBufferCopyDataBytes", status)?;
    }
    // SAFETY: a live sample buffer.
    let desc = unsafe { sample.format_description() }
        .ok_or_else(|| EncodeError::Encode("VideoToolbox output without a format description".into()))?;
    let (length_size, parameter_sets) = avc_config(&desc)?;
    let au = AvccAccessUnit::parse(&avcc, length_size)
        .map_err(|e| EncodeError::Encode(format!("VideoToolbox output is not AVCC: {e}")))?;
    Ok(EncodedFrame { data: Bytes::from(au.to_annex_b(&parameter_sets)), keyframe: au.is_idr() })
}

/// The NAL length size of `desc`'s samples and its parameter sets (SPS, PPS),
/// borrowed from it.
fn avc_config(desc: &CMFormatDescription) -> Result<(usize, Vec<&[u8]>), EncodeError> {
    const CALL: &str = "CMVideoFormatDescriptionGetH264ParameterSetAtIndex";
    let (mut count, mut length_size) = (0usize, 0);
    // SAFETY: a live H.264 format description; null asks for nothing, the
    // other out-pointers are valid.
    let status = unsafe {
        CMVideoFormatDescriptionGetH264ParameterSetAtIndex(
            desc,
            0,
            ptr::null_mut(),
            ptr::null_mut(),
            &mut count,
            &mut length_size,
        )
    };
    os_check(CALL, status)?;
    let mut sets = Vec::with_capacity(count);
    for i in 0..count {
        let (mut set, mut size) = (ptr::null(), 0usize);
        // SAFETY: as above; `i` is below the count it reported.
        let status = unsafe {
            CMVideoFormatDescriptionGetH264ParameterSetAtIndex(
                desc,
                i,
                &mut set,
                &mut size,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        os_check(CALL, status)?;
        if set.is_null() {
            return Err(EncodeError::Encode(format!("{CALL}: no parameter set {i}")));
        }
        // SAFETY: `size` bytes inside `desc`, valid while it is retained,
        // which the borrow of `desc` guarantees for the returned slices.
        sets.push(unsafe { std::slice::from_raw_parts(set, size) });
    }
    Ok((usize::try_from(length_size).unwrap_or(0), sets))
}

/// CVPixelBufferReleaseBytesCallback for a wrapped BGRA frame.
unsafe extern "C-unwind" fn release_bytes(refcon: *mut c_void, _base: *const c_void) {
    // SAFETY: `refcon` is the count of the `Latch` taken in `Wrapped::new`
    // for this buffer; CoreVideo calls this once, when it frees the buffer.
    unsafe { Arc::from_raw(refcon.cast_const().cast::<Latch>()) }.set();
}

/// CVPixelBufferReleasePlanarBytesCallback for a wrapped NV12 frame.
unsafe extern "C-unwind" fn release_planar(
    refcon: *mut c_void,
    _data: *const c_void,
    _size: usize,
    _planes: usize,
    _bases: *mut *const c_void,
) {
    // SAFETY: as in `release_bytes`.
    unsafe { Arc::from_raw(refcon.cast_const().cast::<Latch>()) }.set();
}
