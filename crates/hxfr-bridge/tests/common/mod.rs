//! Helpers the bridge's test binaries share (each uses what it needs).
#![allow(dead_code)]

pub mod chromium;
pub mod x11;
