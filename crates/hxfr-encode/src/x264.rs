//! libx264, through a small safe wrapper of our own over `x264-sys`
//! (the `x264` crate cannot force IDR frames).

use std::ffi::CString;
use std::mem::MaybeUninit;
use std::os::raw::c_int;
use std::ptr;

use bytes::Bytes;
use x264_sys as sys;

use crate::convert::{I420Buffer, Matrix, rgb_to_i420};
use crate::{EncodeError, EncodedFrame, Encoder, EncoderConfig, Frame, PixelFormat};

/// A low-latency libx264 encoder: `zerolatency` tune (no B-frames, no
/// lookahead, sliced threads), ABR with a VBV cap at the target bitrate, an
/// infinite GOP with IDRs on demand, SPS/PPS repeated before every IDR.
pub struct X264Encoder {
    enc: *mut sys::x264_t,
    config: EncoderConfig,
    i420: I420Buffer,
    frame_no: i64,
}

// SAFETY: an x264_t is used by one thread at a time (we need &mut self for
// every call); libx264 has no thread affinity.
unsafe impl Send for X264Encoder {}

impl X264Encoder {
    pub fn new(config: &EncoderConfig) -> Result<X264Encoder, EncodeError> {
        let preset = CString::new(config.preset.as_str()).map_err(|_| EncodeError::Open("bad preset".into()))?;
        let tune = c"zerolatency";
        let mut p = MaybeUninit::<sys::x264_param_t>::uninit();
        // SAFETY: x264_param_default_preset fully initialises the struct.
        let mut p = unsafe {
            if sys::x264_param_default_preset(p.as_mut_ptr(), preset.as_ptr(), tune.as_ptr()) < 0 {
                return Err(EncodeError::Open(format!("unknown x264 preset {:?}", config.preset)));
            }
            p.assume_init()
        };
        p.i_width = config.width as c_int;
        p.i_height = config.height as c_int;
        p.i_csp = sys::X264_CSP_I420 as c_int;
        p.i_threads = config.threads as c_int;
        p.i_log_level = sys::X264_LOG_ERROR as c_int;
        p.i_fps_num = config.fps_num.max(1);
        p.i_fps_den = config.fps_den.max(1);
        p.b_vfr_input = 0;
        p.b_repeat_headers = 1;
        p.b_annexb = 1;
        p.i_keyint_max = sys::X264_KEYINT_MAX_INFINITE as c_int;
        p.i_bframe = 0;
        p.rc.i_lookahead = 0;
        p.rc.i_rc_method = sys::X264_RC_ABR as c_int;
        let kbps = (config.bitrate / 1000).max(50) as c_int;
        p.rc.i_bitrate = kbps;
        p.rc.i_vbv_max_bitrate = kbps;
        // Half a second of buffer: IDRs on demand still look decent, latency stays low.
        p.rc.i_vbv_buffer_size = (kbps / 2).max(1);
        // Tell decoders exactly how to turn it back into RGB (we convert with BT.709).
        p.vui.i_colorprim = 1;
        p.vui.i_transfer = 1;
        p.vui.i_colmatrix = 1;
        p.vui.b_fullrange = 0;
        let profile = match config.profile {
            66 => Some(c"baseline"),
            77 => Some(c"main"),
            100 => Some(c"high"),
            _ => None,
        };
        // apply_profile only caps the profile; x264 derives profile_idc from the
        // tools in use, and fast presets turn off the ones Main and High need.
        if config.profile >= 77 {
            p.b_cabac = 1;
        }
        if config.profile >= 100 {
            p.analyse.b_transform_8x8 = 1;
        }
        if let Some(profile) = profile {
            // SAFETY: p is initialised; the profile name is a valid C string.
            if unsafe { sys::x264_param_apply_profile(&mut p, profile.as_ptr()) } < 0 {
                return Err(EncodeError::Open(format!("x264 cannot apply profile {}", config.profile)));
            }
        }
        // SAFETY: p is a fully initialised parameter set.
        let enc = unsafe { sys::x264_encoder_open(&mut p) };
        if enc.is_null() {
            return Err(EncodeError::Open(format!("x264_encoder_open failed for {}x{}", config.width, config.height)));
        }
        Ok(X264Encoder { enc, config: config.clone(), i420: I420Buffer::default(), frame_no: 0 })
    }
}

impl Encoder for X264Encoder {
    fn name(&self) -> &str {
        "x264"
    }

    fn config(&self) -> &EncoderConfig {
        &self.config
    }

    fn encode(&mut self, frame: &Frame<'_>) -> Result<EncodedFrame, EncodeError> {
        self.config.check_size(frame)?;
        let w = self.config.width;
        let mut pic = MaybeUninit::<sys::x264_picture_t>::uninit();
        // SAFETY: x264_picture_init initialises every field.
        let mut pic = unsafe {
            sys::x264_picture_init(pic.as_mut_ptr());
            pic.assume_init()
        };
        match frame.format {
            // x264 takes NV12 natively: no conversion, any stride.
            PixelFormat::Nv12 => {
                pic.img.i_csp = sys::X264_CSP_NV12 as c_int;
                pic.img.i_plane = 2;
                for p in 0..2 {
                    pic.img.plane[p] = frame.planes[p].as_ptr() as *mut u8;
                    pic.img.i_stride[p] = frame.strides[p] as c_int;
                }
            }
            PixelFormat::Bgrx | PixelFormat::Rgbx => {
                rgb_to_i420(frame, Matrix::Bt709, &mut self.i420)?;
                let (y, u, v) = self.i420.planes();
                let cs = self.i420.chroma_stride() as c_int;
                pic.img.i_csp = sys::X264_CSP_I420 as c_int;
                pic.img.i_plane = 3;
                pic.img.plane[0] = y.as_ptr() as *mut u8;
                pic.img.plane[1] = u.as_ptr() as *mut u8;
                pic.img.plane[2] = v.as_ptr() as *mut u8;
                pic.img.i_stride = [w as c_int, cs, cs, 0];
            }
        }
        pic.i_pts = self.frame_no;
        self.frame_no += 1;
        if frame.force_keyframe {
            pic.i_type = sys::X264_TYPE_IDR as c_int;
        }
        let mut nals: *mut sys::x264_nal_t = ptr::null_mut();
        let mut n_nals: c_int = 0;
        let mut out = MaybeUninit::<sys::x264_picture_t>::uninit();
        // SAFETY: the planes point into memory that outlives this call (x264
        // copies the picture before returning); enc is open.
        let size = unsafe { sys::x264_encoder_encode(self.enc, &mut nals, &mut n_nals, &mut pic, out.as_mut_ptr()) };
        if size < 0 {
            return Err(EncodeError::Encode(format!("x264_encoder_encode returned {size}")));
        }
        if size == 0 || nals.is_null() {
            // zerolatency never delays a frame; anything else is a bug.
            return Err(EncodeError::Encode("x264 produced no output for a frame".into()));
        }
        // SAFETY: on success, x264 guarantees the NAL payloads are contiguous,
        // starting at the first NAL, `size` bytes long, valid until the next call.
        let (data, keyframe) = unsafe {
            let first = &*nals;
            let bytes = std::slice::from_raw_parts(first.p_payload, size as usize);
            (Bytes::copy_from_slice(bytes), out.assume_init_ref().b_keyframe != 0)
        };
        Ok(EncodedFrame { data, keyframe })
    }
}

impl Drop for X264Encoder {
    fn drop(&mut self) {
        // SAFETY: enc came from x264_encoder_open and is closed once.
        unsafe { sys::x264_encoder_close(self.enc) };
    }
}
