//! `--flips N`: a guest display that changes N times and then holds still,
//! for the scanout push tests: the guest sets a mode on a virtio-gpu
//! connector and page-flips between two dumb buffers, drawing frame `i` of
//! the test pattern into the back buffer before flip `i`. No frame is sent
//! anywhere: the host, being the GPU, sees every flip.
//!
//! Prints `HXFR-FLIP i` as each flip completes and, once the display has
//! held still for `--hold-ms`, `HXFR-FLIPS done flips=N WxH`.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use drm::buffer::DrmFourcc;
use drm::control::{Device as ControlDevice, Event, Mode, PageFlipFlags, connector};
use hxfr_testkit::{Content, pattern_bgrx};

struct Card(File);

impl AsFd for Card {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
impl drm::Device for Card {}
impl ControlDevice for Card {}

pub struct Flips {
    pub card: std::path::PathBuf,
    /// Which connected connector, in the card's order (0: the first).
    pub connector: usize,
    /// The mode to set, if the connector offers it (else its preferred one).
    pub size: (u32, u32),
    pub flips: u32,
    pub pace: Duration,
    pub hold: Duration,
}

/// An io::Error with what was being done.
fn io(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

pub fn run(f: &Flips) -> Result<(u32, u32), String> {
    let file =
        OpenOptions::new().read(true).write(true).open(&f.card).map_err(|e| format!("{}: {e}", f.card.display()))?;
    let card = Card(file);
    let res = card.resource_handles().map_err(io("DRM resources"))?;
    let connected: Vec<connector::Info> = res
        .connectors()
        .iter()
        .filter_map(|&c| card.get_connector(c, true).ok())
        .filter(|c| c.state() == connector::State::Connected)
        .collect();
    let conn = connected
        .get(f.connector)
        .ok_or_else(|| format!("connector {} is not connected ({} are)", f.connector, connected.len()))?;
    let mode: Mode = conn
        .modes()
        .iter()
        .find(|m| (m.size().0 as u32, m.size().1 as u32) == f.size)
        .or_else(|| conn.modes().first())
        .copied()
        .ok_or("the connector offers no mode")?;
    let (w, h) = (mode.size().0 as u32, mode.size().1 as u32);
    let encoder = conn.current_encoder().or_else(|| conn.encoders().first().copied()).ok_or("no encoder")?;
    let enc = card.get_encoder(encoder).map_err(io("encoder"))?;
    let crtc = enc
        .crtc()
        .or_else(|| res.filter_crtcs(enc.possible_crtcs()).first().copied())
        .ok_or("no CRTC for the connector")?;
    let mut bufs = Vec::new();
    let mut fbs = Vec::new();
    for _ in 0..2 {
        let b = card.create_dumb_buffer((w, h), DrmFourcc::Xrgb8888, 32).map_err(io("dumb buffer"))?;
        fbs.push(card.add_framebuffer(&b, 24, 32).map_err(io("framebuffer"))?);
        bufs.push(b);
    }
    eprintln!("hxfr-vmguest: {w}x{h} on connector {} (CRTC {crtc:?}), {} flips", f.connector, f.flips);
    for i in 0..f.flips {
        let k = (i % 2) as usize;
        {
            let pitch = drm::buffer::Buffer::pitch(&bufs[k]) as usize;
            let mut map = card.map_dumb_buffer(&mut bufs[k]).map_err(io("map"))?;
            let px = pattern_bgrx(Content::Motion, w, h, pitch, i);
            map[..px.len()].copy_from_slice(&px);
        }
        if i == 0 {
            card.set_crtc(crtc, Some(fbs[k]), (0, 0), &[conn.handle()], Some(mode)).map_err(io("set CRTC"))?;
        } else {
            card.page_flip(crtc, fbs[k], PageFlipFlags::EVENT, None).map_err(io("page flip"))?;
            // The flip is done when its event comes: only then is the other
            // buffer free to draw into.
            let flipped = card.receive_events().map_err(io("DRM events"))?.any(|e| matches!(e, Event::PageFlip(_)));
            if !flipped {
                return Err(format!("flip {i}: no page-flip event"));
            }
        }
        println!("HXFR-FLIP {i}");
        std::thread::sleep(f.pace);
    }
    std::thread::sleep(f.hold);
    Ok((w, h))
}
