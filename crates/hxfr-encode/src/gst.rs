//! Any GStreamer H.264 encoder element, driven through appsrc/appsink.
//!
//! `appsrc ! videoconvert ! ELEMENT ! h264parse ! appsink`, one buffer in and
//! one access unit out per call. Packed RGB is converted to I420 by our SIMD
//! converter first (videoconvert is then a passthrough); NV12 goes in as it
//! is and videoconvert only works for elements that cannot take it.
//! Each known element gets its low-latency settings (no B-frames, no
//! reordering, realtime) so that it answers every frame at once.

use std::time::Duration;

use gst::prelude::*;
use gst_app::{AppSink, AppSrc};

use crate::convert::{I420Buffer, Matrix, rgb_to_i420};
use crate::{EncodeError, EncodedFrame, Encoder, EncoderConfig, Frame, PixelFormat};

/// How long one frame may take in the element before we call it failed.
const PULL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct GstEncoder {
    name: String,
    config: EncoderConfig,
    pipeline: gst::Pipeline,
    src: AppSrc,
    sink: AppSink,
    /// The format appsrc was last set up for.
    input: Option<PixelFormat>,
    /// Matrix for RGB input: BT.709 where the element writes it into the VUI.
    matrix: Matrix,
    i420: I420Buffer,
    frame_no: u64,
}

fn init() -> Result<(), EncodeError> {
    gst::init().map_err(|e| EncodeError::Open(format!("GStreamer init: {e}")))
}

/// Elements that write the input's colorimetry into the stream's VUI. Others
/// (openh264enc) leave decoders to guess, so RGB is converted with the matrix
/// they guess.
const SIGNALS_COLORIMETRY: &[&str] =
    &["x264enc", "nvh264enc", "vtenc_h264", "vtenc_h264_hw", "vah264enc", "vaapih264enc", "qsvh264enc"];

/// Low-latency, bitrate and keyframe settings for the elements we know.
/// Properties an element lacks are skipped: versions differ.
fn tune(enc: &gst::Element, factory: &str, config: &EncoderConfig) {
    let kbps = (config.bitrate / 1000).max(50).to_string();
    let bps = config.bitrate.to_string();
    let settings: &[(&str, &str)] = match factory {
        "x264enc" => &[
            ("tune", "zerolatency"),
            ("speed-preset", config.preset.as_str()),
            ("bitrate", &kbps),
            ("vbv-buf-capacity", "500"),
            ("key-int-max", "0"),
            ("bframes", "0"),
            ("byte-stream", "true"),
        ],
        "openh264enc" => &[
            ("usage-type", "screen"),
            ("rate-control", "bitrate"),
            ("bitrate", &bps),
            ("gop-size", "2147483647"),
            ("complexity", "low"),
        ],
        "nvh264enc" => &[
            ("preset", "low-latency-hq"),
            ("zerolatency", "true"),
            ("bframes", "0"),
            ("rc-mode", "cbr"),
            ("bitrate", &kbps),
            ("gop-size", "-1"),
        ],
        "vtenc_h264" | "vtenc_h264_hw" => &[
            ("realtime", "true"),
            ("allow-frame-reordering", "false"),
            ("bitrate", &kbps),
            ("max-keyframe-interval", "0"),
        ],
        "vah264enc" => &[("b-frames", "0"), ("rate-control", "cbr"), ("bitrate", &kbps), ("key-int-max", "1024")],
        "vaapih264enc" => {
            &[("max-bframes", "0"), ("rate-control", "cbr"), ("bitrate", &kbps), ("keyframe-period", "0")]
        }
        "qsvh264enc" => &[("b-frames", "0"), ("low-latency", "true"), ("bitrate", &kbps)],
        _ => &[],
    };
    for (prop, value) in settings {
        if enc.find_property(prop).is_some() {
            enc.set_property_from_str(prop, value);
        }
    }
}

impl GstEncoder {
    pub fn new(factory: &str, config: &EncoderConfig) -> Result<GstEncoder, EncodeError> {
        init()?;
        let make = |name: &str| {
            gst::ElementFactory::make(name).build().map_err(|_| EncodeError::Unavailable(format!("gst:{name}")))
        };
        let enc = make(factory)?;
        let matrix = if SIGNALS_COLORIMETRY.contains(&factory) {
            Matrix::Bt709
        } else {
            Matrix::untagged_default(config.height)
        };
        tune(&enc, factory, config);
        let convert = make("videoconvert")?;
        let parse = make("h264parse")?;
        parse.set_property("config-interval", -1i32);
        let src = AppSrc::builder()
            .format(gst::Format::Time)
            .is_live(true)
            .do_timestamp(false)
            .max_buffers(2)
            .block(true)
            .build();
        let sink = AppSink::builder()
            .caps(
                &gst::Caps::builder("video/x-h264")
                    .field("stream-format", "byte-stream")
                    .field("alignment", "au")
                    .build(),
            )
            .sync(false)
            .max_buffers(8)
            .build();
        let pipeline = gst::Pipeline::new();
        pipeline
            .add_many([src.upcast_ref(), &convert, &enc, &parse, sink.upcast_ref()])
            .and_then(|_| gst::Element::link_many([src.upcast_ref(), &convert, &enc, &parse, sink.upcast_ref()]))
            .map_err(|e| EncodeError::Open(format!("gst:{factory}: cannot link: {e}")))?;
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| EncodeError::Open(format!("gst:{factory}: cannot start: {e}")))?;
        Ok(GstEncoder {
            name: format!("gst:{factory}"),
            config: config.clone(),
            pipeline,
            src,
            sink,
            input: None,
            matrix,
            i420: I420Buffer::default(),
            frame_no: 0,
        })
    }

    fn set_caps(&mut self, format: PixelFormat) {
        let caps = gst_video::VideoInfo::builder(
            if format == PixelFormat::Nv12 { gst_video::VideoFormat::Nv12 } else { gst_video::VideoFormat::I420 },
            self.config.width,
            self.config.height,
        )
        .fps(gst::Fraction::new(self.config.fps_num.max(1) as i32, self.config.fps_den.max(1) as i32))
        .colorimetry(&if self.matrix == Matrix::Bt709 { "bt709" } else { "bt601" }.parse().expect("valid colorimetry"))
        .build()
        .and_then(|i| i.to_caps())
        .expect("valid video caps");
        self.src.set_caps(Some(&caps));
        self.input = Some(format);
    }

    /// The element's first error on the bus, if any, as text.
    fn bus_error(&self) -> Option<String> {
        let bus = self.pipeline.bus()?;
        while let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
            if let gst::MessageView::Error(e) = msg.view() {
                return Some(format!("{}: {}", e.error(), e.debug().unwrap_or_default()));
            }
        }
        None
    }

    fn buffer_for(&mut self, frame: &Frame<'_>) -> Result<gst::Buffer, EncodeError> {
        let (w, h) = (frame.width as usize, frame.height as usize);
        let fmt = if frame.format == PixelFormat::Nv12 { PixelFormat::Nv12 } else { PixelFormat::Bgrx };
        if self.input != Some(fmt) {
            self.set_caps(fmt);
        }
        if frame.format == PixelFormat::Nv12 {
            // Pack to the default NV12 layout the caps describe.
            let stride = w.next_multiple_of(4);
            let ch = h.div_ceil(2);
            let mut data = vec![0u8; stride * h.next_multiple_of(2) + stride * ch];
            for r in 0..h {
                data[r * stride..r * stride + w].copy_from_slice(&frame.planes[0][r * frame.strides[0]..][..w]);
            }
            let uv = stride * h.next_multiple_of(2);
            let uv_row = w.div_ceil(2) * 2;
            for r in 0..ch {
                data[uv + r * stride..uv + r * stride + uv_row]
                    .copy_from_slice(&frame.planes[1][r * frame.strides[1]..][..uv_row]);
            }
            Ok(gst::Buffer::from_mut_slice(data))
        } else {
            rgb_to_i420(frame, self.matrix, &mut self.i420)?;
            Ok(gst::Buffer::from_slice(self.i420.data.clone()))
        }
    }
}

impl Encoder for GstEncoder {
    fn name(&self) -> &str {
        &self.name
    }

    fn config(&self) -> &EncoderConfig {
        &self.config
    }

    fn encode(&mut self, frame: &Frame<'_>) -> Result<EncodedFrame, EncodeError> {
        self.config.check_size(frame)?;
        let mut buffer = self.buffer_for(frame)?;
        let dur = gst::ClockTime::SECOND.mul_div_floor(self.config.fps_den as u64, self.config.fps_num.max(1) as u64);
        {
            let b = buffer.get_mut().expect("new buffer is writable");
            let pts = dur.map(|d| d * self.frame_no);
            b.set_pts(pts);
            b.set_duration(dur);
        }
        self.frame_no += 1;
        if frame.force_keyframe {
            let ev = gst_video::DownstreamForceKeyUnitEvent::builder().all_headers(true).build();
            self.src.send_event(ev);
        }
        self.src.push_buffer(buffer).map_err(|e| EncodeError::Encode(format!("{}: push: {e:?}", self.name)))?;
        let sample = self.sink.try_pull_sample(gst::ClockTime::from_nseconds(PULL_TIMEOUT.as_nanos() as u64));
        let Some(sample) = sample else {
            let why = self.bus_error().unwrap_or_else(|| "no output within 5 s".into());
            return Err(EncodeError::Encode(format!("{}: {why}", self.name)));
        };
        let buf = sample.buffer().ok_or_else(|| EncodeError::Encode("sample without buffer".into()))?;
        let map = buf.map_readable().map_err(|_| EncodeError::Encode("cannot map output".into()))?;
        Ok(EncodedFrame {
            data: bytes::Bytes::copy_from_slice(map.as_slice()),
            keyframe: !buf.flags().contains(gst::BufferFlags::DELTA_UNIT),
        })
    }
}

impl Drop for GstEncoder {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Whether `factory` exists and encodes a small test frame.
pub fn probe(factory: &str) -> Result<(), EncodeError> {
    init()?;
    if gst::ElementFactory::find(factory).is_none() {
        return Err(EncodeError::Unavailable(format!("gst:{factory}")));
    }
    let (w, h) = crate::PROBE_SIZE;
    crate::probe_encode(&mut GstEncoder::new(factory, &EncoderConfig::new(w, h))?)
}
