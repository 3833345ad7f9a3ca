//! A guest program for the VM tests: the real vsockenc fed DMA-BUF buffers
//! from the virtio-gpu card, as a compositor's capture would feed it.
//!
//! `dmabuf_frames HOST FRAMES WxH MODE OUT`: draws frame `i` of the test
//! pattern (`hxfr_testkit::pattern_bgrx`, motion) into a dumb buffer of its
//! own, pushes it as DMA-BUF memory through
//! `appsrc ! vsockenc host=HOST mode=MODE ! h264parse ! filesink location=OUT`,
//! and prints the element's stats and `HXFR-DMABUF done frames=N`.
//! A buffer per frame, never drawn over: the host reads a resource when it
//! encodes it, so a buffer must not change until its answer is back; each
//! is freed (RESOURCE_UNREF) when the element lets go of it.

use std::path::Path;
use std::process::ExitCode;

use gst::prelude::*;
use gst_allocators::prelude::*;
use hxfr_guest::drm::DumbBuffer;
use hxfr_testkit::{Content, pattern_bgrx};

fn main() -> ExitCode {
    match run() {
        Ok(n) => {
            println!("HXFR-DMABUF done frames={n}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dmabuf_frames: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<u32, String> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [host, frames, size, mode, out] = a.as_slice() else {
        return Err("usage: dmabuf_frames HOST FRAMES WxH MODE OUT".into());
    };
    let frames: u32 = frames.parse().map_err(|e| format!("FRAMES: {e}"))?;
    let size: hxfr_proto::Size = size.parse().map_err(|e| format!("WxH: {e}"))?;
    let (w, h) = (size.width, size.height);
    gst::init().map_err(|e| e.to_string())?;
    let card =
        hxfr_guest::drm::find_card(Path::new("/sys/class/drm"), Path::new("/dev/dri")).map_err(|e| e.to_string())?;
    let pipeline = gst::parse::launch(&format!(
        "appsrc name=src format=time is-live=false \
         caps=video/x-raw(memory:DMABuf),format=BGRx,width={w},height={h},framerate=30/1 ! \
         vsockenc name=enc host={host} mode={mode} ! h264parse ! filesink location={out}"
    ))
    .map_err(|e| format!("pipeline: {e}"))?
    .downcast::<gst::Pipeline>()
    .map_err(|_| "not a pipeline")?;
    let src = pipeline.by_name("src").and_downcast::<gst_app::AppSrc>().ok_or("no appsrc")?;
    pipeline.set_state(gst::State::Playing).map_err(|e| format!("PLAYING: {e}"))?;
    let allocator = gst_allocators::DmaBufAllocator::new();
    let frame_ns = 1_000_000_000u64 / 30;
    for i in 0..frames {
        let buf = DumbBuffer::create(&card, w, h).map_err(|e| e.to_string())?;
        {
            let mut map = buf.map().map_err(|e| e.to_string())?;
            let px = pattern_bgrx(Content::Motion, w, h, buf.pitch as usize, i);
            map[..px.len()].copy_from_slice(&px);
        }
        let fd = buf.export().map_err(|e| e.to_string())?;
        // SAFETY: the memory takes the DMA-BUF fd over and closes it when it
        // goes; `size` is the buffer's size as the kernel made it.
        let mem = unsafe { allocator.alloc_dmabuf(fd, buf.size as usize) }.map_err(|e| e.to_string())?;
        let mut gbuf = gst::Buffer::new();
        {
            let b = gbuf.get_mut().ok_or("new buffer is not writable")?;
            b.append_memory(mem);
            b.set_pts(gst::ClockTime::from_nseconds(i as u64 * frame_ns));
            b.set_duration(gst::ClockTime::from_nseconds(frame_ns));
            gst_video::VideoMeta::add_full(
                b,
                gst_video::VideoFrameFlags::empty(),
                gst_video::VideoFormat::Bgrx,
                w,
                h,
                &[0],
                &[buf.pitch as i32],
            )
            .map_err(|e| e.to_string())?;
        }
        // The DMA-BUF holds the buffer now; the handle can go.
        drop(buf);
        src.push_buffer(gbuf).map_err(|e| format!("push frame {i}: {e:?}"))?;
    }
    src.end_of_stream().map_err(|e| format!("EOS: {e:?}"))?;
    let bus = pipeline.bus().ok_or("no bus")?;
    let mut result = Err("no EOS within 120 s".to_string());
    for msg in bus.iter_timed(gst::ClockTime::from_seconds(120)) {
        match msg.view() {
            gst::MessageView::Eos(..) => {
                result = Ok(frames);
                break;
            }
            gst::MessageView::Error(e) => {
                result = Err(format!("{}: {:?}", e.error(), e.debug()));
                break;
            }
            _ => {}
        }
    }
    if let Some(enc) = pipeline.by_name("enc") {
        println!("HXFR-DMABUF stats {}", enc.property::<gst::Structure>("stats"));
    }
    let _ = pipeline.set_state(gst::State::Null);
    result
}
