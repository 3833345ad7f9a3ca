//! `vsockenc`: a GStreamer H.264 "encoder" that does not encode. It hands
//! each frame to an hxfr host (by virtio-gpu resource id, through shared
//! memory, or inline on the socket) and outputs the access units that come
//! back. A drop-in replacement for Helix's C element: same name, same
//! properties, same wire format.

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

use gst::glib;

pub use hxfr_guest::{drm, shm};
mod vsockenc;

pub use vsockenc::{Mode, VsockEnc};

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    vsockenc::register(plugin)
}

gst::plugin_define!(
    vsockenc,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    "hxfr",
    "hxfr",
    "https://github.com/helixml/helix",
    env!("BUILD_REL_DATE")
);
