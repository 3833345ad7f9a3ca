//! The base class's stream lock as guards, so that taking and giving it
//! back is never written by hand.
//!
//! GstVideoEncoder guards its frames and output state with a recursive
//! `stream_lock` that it holds around every call into us from the streaming
//! thread. Two things need it managed from Rust:
//! - the streaming thread gives it up while it waits for the host
//!   ([`StreamUnlocked`]), so that answers can be finished meanwhile;
//! - the client's reader thread takes it before anything else
//!   ([`StreamLock`]), which keeps one lock order on every thread.

use gst::glib;
use gst::prelude::*;

fn stream_lock(enc: &gst_video::VideoEncoder) -> *mut glib::ffi::GRecMutex {
    let raw: *mut gst_video::ffi::GstVideoEncoder = enc.as_ptr();
    // SAFETY: `raw` is the live instance `enc` borrows; taking the address of
    // its stream_lock field reads nothing.
    unsafe { &raw mut (*raw).stream_lock }
}

/// Holds the stream lock (recursive: fine if this thread already has it).
pub struct StreamLock<'a> {
    enc: &'a gst_video::VideoEncoder,
}

impl<'a> StreamLock<'a> {
    pub fn lock(enc: &'a gst_video::VideoEncoder) -> StreamLock<'a> {
        // SAFETY: a GRecMutex initialised by the base class for the
        // instance's life, which `enc` keeps alive; unlocked in Drop, as
        // GST_VIDEO_ENCODER_STREAM_LOCK/UNLOCK pair up.
        unsafe { glib::ffi::g_rec_mutex_lock(stream_lock(enc)) };
        StreamLock { enc }
    }
}

impl Drop for StreamLock<'_> {
    fn drop(&mut self) {
        // SAFETY: locked once by this guard on this thread in `lock`.
        unsafe { glib::ffi::g_rec_mutex_unlock(stream_lock(self.enc)) };
    }
}

/// Gives the stream lock up for the guard's life. The caller must hold it
/// exactly once, as the base class does around handle_frame, set_format and
/// finish (and must not hold a frame handle, which also holds it).
pub struct StreamUnlocked<'a> {
    enc: &'a gst_video::VideoEncoder,
}

impl<'a> StreamUnlocked<'a> {
    pub fn new(enc: &'a gst_video::VideoEncoder) -> StreamUnlocked<'a> {
        // SAFETY: held once by this thread (the base class took it before
        // calling us); Drop takes it back before the base class sees it again.
        unsafe { glib::ffi::g_rec_mutex_unlock(stream_lock(enc)) };
        StreamUnlocked { enc }
    }
}

impl Drop for StreamUnlocked<'_> {
    fn drop(&mut self) {
        // SAFETY: given up by `new` on this thread; this restores it.
        unsafe { glib::ffi::g_rec_mutex_lock(stream_lock(self.enc)) };
    }
}
