//! Test media shared by hxfr's tests and benchmarks: frames to send, a real
//! decoder for what comes back, and PSNR to compare the two. Without the
//! default `decode` feature it needs no GStreamer (the static guest program
//! that the VM tests boot draws its frames with it).

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

// (It uses `bytes`, which only `decode` brings.)
#[cfg(all(unix, feature = "decode"))]
pub mod subscriber;

#[cfg(feature = "decode")]
use bytes::Bytes;
#[cfg(feature = "decode")]
use gst::prelude::*;
#[cfg(feature = "decode")]
use gst_video::prelude::*;

/// Which kind of picture a pattern draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Smooth gradients and a box that move every frame.
    Motion,
    /// A mostly static "desktop": flat panels, text-like detail, one moving window.
    Desktop,
}

/// A packed 4-byte-per-pixel frame, B,G,R,x order, rows `stride` bytes apart.
pub fn pattern_bgrx(content: Content, width: u32, height: u32, stride: usize, frame: u32) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    assert!(stride >= w * 4);
    let mut buf = vec![0u8; stride * h];
    let t = frame as usize;
    let (bx, by) = ((t * 7) % w.max(1), (t * 3) % h.max(1));
    let (bw, bh) = (w / 5, h / 4);
    for y in 0..h {
        let row = &mut buf[y * stride..y * stride + w * 4];
        for x in 0..w {
            let in_box = x >= bx && x < bx + bw && y >= by && y < by + bh;
            let px = match content {
                Content::Motion => {
                    if in_box {
                        [40, 200, 240]
                    } else {
                        [tri((x + 2 * t) * 255 / w), tri((y + t) * 255 / h), tri((x + y) / 2 + 3 * t)]
                    }
                }
                Content::Desktop => {
                    if in_box {
                        // The moving window: a light panel with dark "text" rows.
                        let text = (y - by) % 12 < 7 && (x - bx) % 9 < 6 && (x * 31 + y * 17) % 5 != 0;
                        if text { [30, 30, 30] } else { [235, 235, 235] }
                    } else if y < h / 16 {
                        [80, 60, 50] // a title bar
                    } else {
                        let text = y % 14 < 8 && x % 8 < 5 && ((x / 8) * 7 + (y / 14) * 13) % 6 != 0 && x < w / 2;
                        if text { [20, 20, 20] } else { [250, 250, 250] }
                    }
                }
            };
            row[x * 4..x * 4 + 4].copy_from_slice(&[px[0], px[1], px[2], 255]);
        }
    }
    buf
}

/// A triangle wave 0..=255..0 with period 510: smooth ramps that move
/// without the hard edges a wrap-around would draw.
fn tri(v: usize) -> u8 {
    let v = v % 510;
    if v < 256 { v as u8 } else { (510 - v) as u8 }
}

/// An NV12 frame in Helix's inline layout: Y rows `stride` apart, UV at
/// `stride * round_up(height, 2)`, same stride.
pub fn pattern_nv12(width: u32, height: u32, stride: usize, frame: u32) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let t = frame as usize;
    let uv_off = stride * h.next_multiple_of(2);
    let mut buf = vec![0u8; uv_off + stride * h.div_ceil(2)];
    let (bx, by) = ((t * 7) % w, (t * 3) % h);
    for y in 0..h {
        for x in 0..w {
            let in_box = x >= bx && x < bx + w / 5 && y >= by && y < by + h / 4;
            buf[y * stride + x] =
                if in_box { 220 } else { 16 + (tri((x + 2 * t) * 200 / w + y * 20 / h) as usize * 219 / 255) as u8 };
        }
    }
    for y in 0..h.div_ceil(2) {
        for x in 0..w.div_ceil(2) {
            buf[uv_off + y * stride + 2 * x] = (64 + (x * 2 + t) * 128 / w) as u8;
            buf[uv_off + y * stride + 2 * x + 1] = (64 + (y * 2) * 128 / h) as u8;
        }
    }
    buf
}

/// A decoded picture, tightly packed (no row padding).
#[derive(Debug, Clone)]
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
    /// The colorimetry the stream's VUI names, as GStreamer spells it
    /// (`bt601`, `bt709`, ...); empty when the decoder did not say.
    pub colorimetry: String,
}

/// Output format of [`decode_h264`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Bgrx,
    Nv12,
}

/// Decodes a whole Annex-B stream (one access unit per entry) with
/// GStreamer's `h264parse ! avdec_h264` and returns every picture.
#[cfg(feature = "decode")]
pub fn decode_h264(aus: &[Bytes], output: Output) -> Result<Vec<Picture>, String> {
    gst::init().map_err(|e| e.to_string())?;
    let fmt = match output {
        Output::Bgrx => "BGRx",
        Output::Nv12 => "NV12",
    };
    let desc = format!(
        "appsrc name=src format=time caps=video/x-h264,stream-format=byte-stream,alignment=au ! h264parse ! \
         avdec_h264 ! videoconvert ! video/x-raw,format={fmt} ! appsink name=sink sync=false"
    );
    let pipeline = gst::parse::launch(&desc).map_err(|e| e.to_string())?.downcast::<gst::Pipeline>().unwrap();
    let src = pipeline.by_name("src").unwrap().downcast::<gst_app::AppSrc>().unwrap();
    let sink = pipeline.by_name("sink").unwrap().downcast::<gst_app::AppSink>().unwrap();
    let pictures = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = pictures.clone();
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let info = gst_video::VideoInfo::from_caps(sample.caps().unwrap()).unwrap();
                let frame =
                    gst_video::VideoFrameRef::from_buffer_ref_readable(sample.buffer().unwrap(), &info).unwrap();
                let mut pic = pack(&frame);
                pic.colorimetry = info.colorimetry().to_string();
                out.lock().unwrap().push(pic);
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    pipeline.set_state(gst::State::Playing).map_err(|e| e.to_string())?;
    for (i, au) in aus.iter().enumerate() {
        let mut b = gst::Buffer::from_slice(au.clone());
        b.get_mut().unwrap().set_pts(gst::ClockTime::from_mseconds(33 * i as u64));
        src.push_buffer(b).map_err(|e| format!("push: {e:?}"))?;
    }
    src.end_of_stream().map_err(|e| format!("eos: {e:?}"))?;
    let bus = pipeline.bus().unwrap();
    let result = match bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(60), &[gst::MessageType::Eos, gst::MessageType::Error])
    {
        Some(m) => match m.view() {
            gst::MessageView::Error(e) => Err(format!("decoder error: {} ({:?})", e.error(), e.debug())),
            _ => Ok(()),
        },
        None => Err("decoder timed out".into()),
    };
    let _ = pipeline.set_state(gst::State::Null);
    result?;
    Ok(std::mem::take(&mut *pictures.lock().unwrap()))
}

/// Copies a mapped frame into a tightly packed picture.
#[cfg(feature = "decode")]
fn pack(frame: &gst_video::VideoFrameRef<&gst::BufferRef>) -> Picture {
    let (w, h) = (frame.width(), frame.height());
    let mut data = Vec::new();
    for p in 0..frame.n_planes() {
        let stride = frame.plane_stride()[p as usize] as usize;
        let plane = frame.plane_data(p).unwrap();
        let (rows, row_bytes) = match frame.format() {
            gst_video::VideoFormat::Nv12 if p == 1 => (h.div_ceil(2) as usize, w.div_ceil(2) as usize * 2),
            gst_video::VideoFormat::Nv12 => (h as usize, w as usize),
            _ => (h as usize, w as usize * 4),
        };
        for r in 0..rows {
            data.extend_from_slice(&plane[r * stride..r * stride + row_bytes]);
        }
    }
    Picture { width: w, height: h, data, colorimetry: String::new() }
}

/// A BGRx frame (rows `stride` apart) in NV12 (tightly packed, as
/// [`decode_h264`] gives it with [`Output::Nv12`]), converted by GStreamer's
/// `videoconvert` with `colorimetry` (take it from the decoded picture: the
/// stream's VUI). Comparing in YUV measures the path and the encoder, not
/// the 4:2:0 subsampling every H.264 picture pays for sharp colour edges;
/// and the converter is not the host's, so it checks the host's matrix too.
#[cfg(feature = "decode")]
pub fn bgrx_to_nv12(src: &[u8], width: u32, height: u32, stride: usize, colorimetry: &str) -> Result<Vec<u8>, String> {
    gst::init().map_err(|e| e.to_string())?;
    let (w, h) = (width as usize, height as usize);
    let mut packed = Vec::with_capacity(w * h * 4);
    for y in 0..h {
        packed.extend_from_slice(&src[y * stride..y * stride + w * 4]);
    }
    let colorimetry = if colorimetry.is_empty() { String::new() } else { format!(",colorimetry={colorimetry}") };
    let desc = format!(
        "appsrc name=src format=time caps=video/x-raw,format=BGRx,width={width},height={height},framerate=30/1 ! \
         videoconvert ! video/x-raw,format=NV12{colorimetry} ! appsink name=sink sync=false"
    );
    let pipeline = gst::parse::launch(&desc).map_err(|e| e.to_string())?.downcast::<gst::Pipeline>().unwrap();
    let src = pipeline.by_name("src").unwrap().downcast::<gst_app::AppSrc>().unwrap();
    let sink = pipeline.by_name("sink").unwrap().downcast::<gst_app::AppSink>().unwrap();
    pipeline.set_state(gst::State::Playing).map_err(|e| e.to_string())?;
    src.push_buffer(gst::Buffer::from_mut_slice(packed)).map_err(|e| format!("push: {e:?}"))?;
    src.end_of_stream().map_err(|e| format!("eos: {e:?}"))?;
    let sample = sink.try_pull_sample(gst::ClockTime::from_seconds(10)).ok_or("videoconvert gave no picture");
    let _ = pipeline.set_state(gst::State::Null);
    let sample = sample?;
    let info = gst_video::VideoInfo::from_caps(sample.caps().ok_or("no caps")?).map_err(|e| e.to_string())?;
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(sample.buffer().ok_or("no buffer")?, &info)
        .map_err(|_| "cannot map")?;
    Ok(pack(&frame).data)
}

/// PSNR in dB of BGRx `b` (tightly packed) against BGRx `a` (rows `stride`
/// apart), over the colour bytes only.
pub fn psnr_bgrx(a: &[u8], stride: usize, b: &[u8], width: u32, height: u32) -> f64 {
    let (w, h) = (width as usize, height as usize);
    let mut se = 0u64;
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let d = a[y * stride + x * 4 + c] as i64 - b[(y * w + x) * 4 + c] as i64;
                se += (d * d) as u64;
            }
        }
    }
    psnr_from(se, (w * h * 3) as u64)
}

/// PSNR of an NV12 picture (tightly packed) against an NV12 frame in Helix's
/// inline layout with row `stride`, over Y and UV.
pub fn psnr_nv12(a: &[u8], stride: usize, b: &[u8], width: u32, height: u32) -> f64 {
    let (w, h) = (width as usize, height as usize);
    let uv_a = stride * h.next_multiple_of(2);
    let uv_row = w.div_ceil(2) * 2;
    let uv_b = w * h;
    let mut se = 0u64;
    let mut n = 0u64;
    for y in 0..h {
        for x in 0..w {
            let d = a[y * stride + x] as i64 - b[y * w + x] as i64;
            se += (d * d) as u64;
        }
        n += w as u64;
    }
    for y in 0..h.div_ceil(2) {
        for x in 0..uv_row {
            let d = a[uv_a + y * stride + x] as i64 - b[uv_b + y * uv_row + x] as i64;
            se += (d * d) as u64;
        }
        n += uv_row as u64;
    }
    psnr_from(se, n)
}

/// PSNR of a decoded picture against its source, in the source's format:
/// BGRx rows or Helix's NV12 layout, both `stride` bytes apart.
pub fn psnr(format: Output, src: &[u8], stride: usize, pic: &Picture) -> f64 {
    match format {
        Output::Bgrx => psnr_bgrx(src, stride, &pic.data, pic.width, pic.height),
        Output::Nv12 => psnr_nv12(src, stride, &pic.data, pic.width, pic.height),
    }
}

fn psnr_from(se: u64, n: u64) -> f64 {
    if se == 0 {
        return 99.0;
    }
    let mse = se as f64 / n as f64;
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// The NAL unit types in an Annex-B access unit, in order.
pub fn nal_types(au: &[u8]) -> Vec<u8> {
    hxfr_proto::annexb::nal_units(au).iter().filter(|n| !n.data.is_empty()).map(|n| n.nal_type()).collect()
}
