//! What comes back from the host: the client's events, turned into finished
//! frames on the client's reader thread as they arrive.
//!
//! Lock order (see `imp.rs`): this thread takes the encoder's stream lock
//! first (a [`StreamLock`]), then the leaf mutexes in [`Shared`]; it never
//! takes the element's `state` mutex.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gst::glib;
use gst::prelude::*;
use gst_video::prelude::*;
use hxfr_guest::client::{Answer, Event, Handler, Lost, Pending};
use hxfr_metrics::Window;
use hxfr_proto::{Message, annexb};

use super::CAT;
use super::lock::StreamLock;

/// Round trips kept for the stats percentiles.
const RTT_SAMPLES: usize = 1024;

/// The caller's tag for a frame in flight: its system_frame_number.
pub type FrameId = u32;

/// Counters behind the `stats` property.
#[derive(Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    pub dropped: AtomicU64,
    pub reconnects: AtomicU64,
    pub rtt_ms: Mutex<Option<Window>>,
}

impl Stats {
    pub fn rtt(&self) -> [f64; 2] {
        self.rtt_ms.lock().unwrap().as_ref().map_or([0.0; 2], |w| w.percentiles([0.5, 0.99]))
    }

    fn record_rtt(&self, ms: f64) {
        self.rtt_ms.lock().unwrap().get_or_insert_with(|| Window::new(RTT_SAMPLES)).push(ms);
    }
}

/// What the reader thread shares with the streaming thread. Leaf locks only.
pub struct Shared {
    /// Bumped at every start: a reader thread left over from an earlier run
    /// (frame numbers start again) must not touch this run's frames.
    pub generation: AtomicU64,
    pub stats: Stats,
    /// An ERROR answer asks for a keyframe on the next frame.
    pub want_keyframe: AtomicBool,
    pub errors_in_row: AtomicU32,
    pub max_errors: AtomicU32,
    /// The last downstream flow result, returned by the next handle_frame.
    pub flow: Mutex<Result<gst::FlowSuccess, gst::FlowError>>,
    /// (profile_idc, level_idc) announced in the output caps.
    pub profile: Mutex<Option<(u8, u8)>>,
    /// The negotiated input, for renegotiating the output from this thread.
    pub input: Mutex<Option<gst_video::VideoCodecState<'static, gst_video::video_codec_state::Readable>>>,
}

impl Shared {
    pub fn new(max_errors: u32) -> Shared {
        Shared {
            generation: AtomicU64::new(0),
            stats: Stats::default(),
            want_keyframe: AtomicBool::new(false),
            errors_in_row: AtomicU32::new(0),
            max_errors: AtomicU32::new(max_errors),
            flow: Mutex::new(Ok(gst::FlowSuccess::Ok)),
            profile: Mutex::new(None),
            input: Mutex::new(None),
        }
    }

    fn store_flow(&self, r: Result<gst::FlowSuccess, gst::FlowError>) {
        if r.is_err() {
            *self.flow.lock().unwrap() = r;
        }
    }
}

/// profile_idc and level_idc of the first SPS in an access unit.
pub fn sps_profile(au: &[u8]) -> Option<(u8, u8)> {
    use h264_reader::nal::sps::SeqParameterSet;
    use h264_reader::rbsp::{BitReader, decode_nal};
    let sps = annexb::nal_units(au).into_iter().find(|n| n.nal_type() == 7)?;
    // decode_nal skips the NAL header byte itself.
    let rbsp = decode_nal(sps.data).ok()?;
    let sps = SeqParameterSet::from_bits(BitReader::new(&rbsp[..])).ok()?;
    Some((sps.profile_idc.into(), sps.level_idc))
}

/// Caps strings for a profile_idc.
pub fn profile_name(profile_idc: u8) -> Option<&'static str> {
    Some(match profile_idc {
        66 => "constrained-baseline",
        77 => "main",
        100 => "high",
        110 => "high-10",
        _ => return None,
    })
}

/// level_idc 31 → "3.1", 40 → "4".
pub fn level_name(level_idc: u8) -> String {
    match level_idc % 10 {
        0 => format!("{}", level_idc / 10),
        minor => format!("{}.{minor}", level_idc / 10),
    }
}

/// The client's [`Handler`]: finishes frames as their answers arrive.
pub struct Answers {
    pub element: glib::WeakRef<super::VsockEnc>,
    pub shared: Arc<Shared>,
    pub generation: u64,
}

impl Answers {
    /// The element, unless it is gone or these answers belong to an earlier run.
    fn element(&self) -> Option<super::VsockEnc> {
        (self.shared.generation.load(Ordering::Acquire) == self.generation).then(|| self.element.upgrade())?
    }

    /// Announces profile and level in the output caps when an SPS shows new ones.
    fn update_caps(&self, enc: &super::VsockEnc, au: &[u8]) {
        let Some((profile, level)) = sps_profile(au) else { return };
        {
            let mut current = self.shared.profile.lock().unwrap();
            if *current == Some((profile, level)) {
                return;
            }
            *current = Some((profile, level));
        }
        let mut caps =
            gst::Caps::builder("video/x-h264").field("stream-format", "byte-stream").field("alignment", "au");
        if let Some(name) = profile_name(profile) {
            caps = caps.field("profile", name);
        }
        let caps = caps.field("level", level_name(level)).build();
        let input = self.shared.input.lock().unwrap().clone();
        match enc.set_output_state(caps, input.as_ref()) {
            Ok(state) => {
                if let Err(e) = enc.negotiate(state) {
                    gst::warning!(CAT, obj = enc, "renegotiating with profile/level failed: {e}");
                }
            }
            Err(e) => gst::warning!(CAT, obj = enc, "cannot set output caps: {e}"),
        }
    }

    /// Counters first, before the stream lock: whoever reads the stats
    /// after EOS must see every answer and every loss already counted.
    fn count(&self, event: &Event<FrameId>) {
        let stats = &self.shared.stats;
        match event {
            Event::Answered { pending, answer } => {
                stats.record_rtt(pending.sent.elapsed().as_secs_f64() * 1000.0);
                match answer {
                    Answer::Frame(_) => stats.answered.fetch_add(1, Ordering::Relaxed),
                    Answer::Error { .. } => stats.dropped.fetch_add(1, Ordering::Relaxed),
                };
            }
            Event::Lost { pending, .. } => {
                stats.dropped.fetch_add(pending.len() as u64, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    fn answered(&self, enc: &super::VsockEnc, pending: Pending<FrameId>, answer: Answer) {
        let shared = &self.shared;
        // Flushed frames are gone from the base class; the answer only kept the order.
        let frame = if pending.flushed { None } else { enc.frame(pending.tag as i32) };
        match answer {
            Answer::Frame(r) => {
                shared.errors_in_row.store(0, Ordering::Relaxed);
                let Some(mut frame) = frame else { return };
                let au = r.to_annex_b();
                if r.is_keyframe {
                    self.update_caps(enc, &au);
                    frame.set_flags(gst_video::VideoCodecFrameFlags::SYNC_POINT);
                }
                frame.set_output_buffer(gst::Buffer::from_slice(au));
                shared.store_flow(enc.finish_frame(frame));
            }
            Answer::Error { code, message } => {
                shared.want_keyframe.store(true, Ordering::Relaxed);
                let n = shared.errors_in_row.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= shared.max_errors.load(Ordering::Relaxed) {
                    gst::element_error!(
                        enc,
                        gst::StreamError::Encode,
                        ("host refused {n} frames in a row; last: {message} (code {code})")
                    );
                    *shared.flow.lock().unwrap() = Err(gst::FlowError::Error);
                } else {
                    gst::warning!(CAT, obj = enc, "host refused frame {}: {message} (code {code})", pending.tag);
                }
                // A frame with no output buffer is dropped by the base class.
                if let Some(frame) = frame {
                    shared.store_flow(enc.finish_frame(frame));
                }
            }
        }
    }

    fn lost(&self, enc: &super::VsockEnc, pending: Vec<Pending<FrameId>>, why: &Lost) {
        if let Lost::Disconnected(reason) = why {
            gst::element_warning!(
                enc,
                gst::ResourceError::Read,
                ("Lost the host: {reason}; reconnecting, frames are dropped meanwhile")
            );
        }
        if !pending.is_empty() {
            gst::warning!(CAT, obj = enc, "{why}: dropping {} frame(s) in flight", pending.len());
        }
        for p in pending.into_iter().filter(|p| !p.flushed) {
            if let Some(frame) = enc.frame(p.tag as i32) {
                let _ = enc.finish_frame(frame);
            }
        }
    }
}

impl Handler<FrameId> for Answers {
    fn handle(&self, event: Event<FrameId>) {
        let Some(enc) = self.element() else { return };
        self.count(&event);
        // Stream lock first, always: see the lock order in imp.rs.
        let _stream = StreamLock::lock(enc.upcast_ref());
        // The run may have ended while we waited for the lock.
        if self.shared.generation.load(Ordering::Acquire) != self.generation {
            return;
        }
        match event {
            Event::Answered { pending, answer } => self.answered(&enc, pending, answer),
            Event::Lost { pending, why } => self.lost(&enc, pending, &why),
            Event::Message(p) => match p.message {
                Message::ConfigResp(c) => gst::info!(
                    CAT,
                    obj = enc,
                    "host configured: encoder {}, status {}, profile {}",
                    c.encoder,
                    c.status,
                    c.profile
                ),
                Message::Error { message, .. } => gst::warning!(CAT, obj = enc, "{message}"),
                m => gst::debug!(CAT, obj = enc, "ignoring {} from host (session {})", m.name(), p.session_id),
            },
            Event::Unreadable(e) => gst::warning!(CAT, obj = enc, "unreadable message from host: {e}"),
            Event::Unexpected(_) => gst::warning!(CAT, obj = enc, "host answered a frame that was never sent; ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_and_level_come_from_the_sps() {
        // x264's constrained-baseline level 3.1 SPS for 1280x720.
        let au = [
            0, 0, 0, 1, 0x67, 0x42, 0xc0, 0x1f, 0xd9, 0x00, 0x50, 0x05, 0xbb, 0x01, 0x6a, 0x02, 0x02, 0x02, 0x80, 0x00,
            0x00, 0x03, 0x00, 0x80, 0x00, 0x00, 0x1e, 0x47, 0x8c, 0x19, 0x24, 0, 0, 0, 1, 0x68, 0xcb, 0x8c, 0xb2,
        ];
        assert_eq!(sps_profile(&au), Some((66, 31)));
        assert_eq!(sps_profile(&[0, 0, 0, 1, 0x65, 0x88]), None, "no SPS");
        assert_eq!(sps_profile(&[0, 0, 0, 1, 0x67]), None, "a cut-off SPS");
        assert_eq!(profile_name(66), Some("constrained-baseline"));
        assert_eq!(profile_name(1), None);
        assert_eq!((level_name(31), level_name(40), level_name(9)), ("3.1".into(), "4".into(), "0.9".into()));
    }
}
