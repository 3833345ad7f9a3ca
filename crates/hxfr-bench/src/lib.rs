//! `hxfr bench`: every way a frame can reach an encoder, side by side, in one
//! run, as ratios of the encoder called in-process.
//!
//! Paths: the encoder in-process (the ceiling); `hxfr host` inline over a
//! UNIX socket and over TCP loopback, the way vsockenc sends frames; shared
//! memory (the ivshmem path); inline TCP through a `socat` hop into the host's
//! UNIX socket (Helix's Mac set-up); and a guest-local GStreamer x264enc
//! pipeline (the fallback without a host, which pays videoconvert); frames
//! named by virtio-gpu resource id, drawn into guest RAM the host's own
//! GPU device code reads (`hxfr host --vhost-user-gpu`), with scattered or
//! contiguous backing; and scanout push (the host encodes on every flip for
//! a subscriber). Every
//! path gets the same frames and the same encoder settings (x264 ultrafast,
//! zerolatency, 4 Mbit/s).
//!
//! Modules by job: [`cli`] (the arguments), [`paths`] (running one path),
//! [`matrix`] (the whole run), [`targets`] (judging it), [`report`] (its
//! data and tables), [`repeat`] (medians, spreads, paired ratios, judging on
//! them), `plot` (the SVG), [`sys`] (CPU, memory, floors), `gpu` (guest
//! RAM, GPU resources and a scanout for the resource and push paths).

#![cfg_attr(not(test), deny(unused_crate_dependencies))]

pub mod cli;
#[cfg(target_os = "linux")]
mod gpu;
mod matrix;
pub mod paths;
mod plot;
pub mod repeat;
pub mod report;
pub mod sys;
pub mod targets;

pub use cli::BenchArgs;
pub use matrix::run;
pub use report::{Cell, Floor, PathKind, PushIdle, PushRow, Report, ScaleRow, Spreads, Target, print_markdown};
