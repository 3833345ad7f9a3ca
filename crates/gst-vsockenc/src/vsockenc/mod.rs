use gst::glib;
use gst::prelude::*;

mod answers;
mod imp;
mod lock;
mod settings;
mod transfer;

static CAT: std::sync::LazyLock<gst::DebugCategory> = std::sync::LazyLock::new(|| {
    gst::DebugCategory::new("vsockenc", gst::DebugColorFlags::empty(), Some("hxfr host-offload H.264 encoder"))
});

glib::wrapper! {
    pub struct VsockEnc(ObjectSubclass<imp::VsockEnc>) @extends gst_video::VideoEncoder, gst::Element, gst::Object;
}

/// How frames reach the host.
#[derive(Debug, Eq, PartialEq, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstVsockEncMode")]
pub enum Mode {
    /// resource for DMA-BUF input, else shm when a region is there and the host has it, else inline.
    #[default]
    #[enum_value(name = "Auto: the best that works (resource, shm, inline)", nick = "auto")]
    Auto,
    #[enum_value(name = "Resource: virtio-gpu resource id of a DMA-BUF (zero copy)", nick = "resource")]
    Resource,
    #[enum_value(name = "Shm: copy into a shared-memory region (one copy)", nick = "shm")]
    Shm,
    #[enum_value(name = "Inline: pixels on the socket", nick = "inline")]
    Inline,
}

/// Registers `vsockenc` with rank NONE: it only works with an hxfr host
/// listening, so decodebin/encodebin must never pick it on their own (a
/// pipeline that auto-plugged it without a host would fail at start). Name it
/// explicitly in a pipeline.
pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(Some(plugin), "vsockenc", gst::Rank::NONE, VsockEnc::static_type())
}
