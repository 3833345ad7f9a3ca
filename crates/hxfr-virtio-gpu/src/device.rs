//! The device's command handling, independent of how requests arrive: bytes
//! in, response bytes out, the resource table updated, and the display
//! (QEMU's window, through [`Display`]) told what to show.

use std::sync::{Arc, Mutex, MutexGuard};

use tracing::debug;
use vm_memory::GuestMemoryMmap;

use crate::edid;
use crate::protocol::{self, Command, CursorPos, DisplayOne, MAX_SCANOUTS, Rect, Response};
use crate::resources::{BYTES_PER_PIXEL, GpuError, Limits, Resource, ResourceTable};

/// Cursor images are 64 × 64 pixels, four bytes each.
pub const CURSOR_BYTES: usize = 64 * 64 * 4;
/// Largest UPDATE sent to the display at once: a big flush goes in bands of
/// rows so no message (and no buffer) grows with the guest's numbers.
const MAX_UPDATE_BYTES: usize = 4 << 20;

/// Where the guest's display goes. QEMU's vhost-user-gpu display socket is
/// one; without one the device answers display queries itself and shows
/// nothing. Every method has a do-nothing default.
pub trait Display: Send {
    /// The display's modes, if it knows them (QEMU owns the window sizes).
    fn display_info(&mut self) -> Option<[DisplayOne; MAX_SCANOUTS]> {
        None
    }
    /// The EDID of scanout `scanout_id`, if the display has one.
    fn edid(&mut self, _scanout_id: u32) -> Option<Vec<u8>> {
        None
    }
    /// Whether [`Display::update`] wants pixels (saves copying them when not).
    fn shows_pixels(&self) -> bool {
        false
    }
    /// Scanout `scanout_id` now shows a `width × height` image (0 × 0: off).
    fn scanout(&mut self, _scanout_id: u32, _width: u32, _height: u32) {}
    /// New pixels for `rect` of a scanout, as B,G,R,x bytes, `rect.width * 4` a row.
    fn update(&mut self, _scanout_id: u32, _rect: Rect, _bgrx: &[u8]) {}
    /// A new cursor image (B,G,R,A bytes, 64 × 64) at `pos`.
    fn cursor_update(&mut self, _pos: CursorPos, _hot_x: u32, _hot_y: u32, _image: &[u8; CURSOR_BYTES]) {}
    /// The cursor moved (or hid: `visible` false).
    fn cursor_move(&mut self, _pos: CursorPos, _visible: bool) {}
}

/// A display that shows nothing.
pub struct NoDisplay;
impl Display for NoDisplay {}

/// What a scanout was told to do, for observers (e.g. a push of every new
/// frame of a scanout to an encoder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanoutEvent {
    /// The scanout now shows `rect` of `resource_id` (0: disabled).
    Set { scanout_id: u32, resource_id: u32, rect: Rect },
    /// The guest flushed `rect` (in resource coordinates) of the resource
    /// the scanout shows: those pixels in its backing are new.
    Flush { scanout_id: u32, resource_id: u32, rect: Rect },
}

/// Called on the device's thread for each [`ScanoutEvent`]; it must not block.
pub type Observer = Arc<dyn Fn(ScanoutEvent) + Send + Sync>;

/// How the device presents itself.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub limits: Limits,
    /// The mode scanout 0 reports when no display (QEMU) answers for it.
    pub preferred_size: (u32, u32),
}

impl Default for Config {
    fn default() -> Self {
        Config { limits: Limits::default(), preferred_size: (1280, 800) }
    }
}

/// Locks a table, recovering it if a thread panicked while holding it: the
/// table's invariants hold between statements that can panic.
pub(crate) fn lock(t: &Mutex<ResourceTable>) -> MutexGuard<'_, ResourceTable> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// One virtio-gpu 2D device's command state.
pub struct Device {
    config: Config,
    table: Arc<Mutex<ResourceTable>>,
    display: Box<dyn Display>,
    observer: Option<Observer>,
}

impl Device {
    pub fn new(config: Config) -> Device {
        Device::with_table(config, Arc::new(Mutex::new(ResourceTable::new(config.limits))))
    }

    /// A device whose table is shared (readers resolve ids in it).
    pub fn with_table(config: Config, table: Arc<Mutex<ResourceTable>>) -> Device {
        Device { config, table, display: Box::new(NoDisplay), observer: None }
    }

    pub fn table(&self) -> &Arc<Mutex<ResourceTable>> {
        &self.table
    }

    pub fn set_display(&mut self, display: Box<dyn Display>) {
        self.display = display;
    }

    pub fn set_observer(&mut self, observer: Option<Observer>) {
        self.observer = observer;
    }

    fn notify(&self, e: ScanoutEvent) {
        if let Some(o) = &self.observer {
            o(e);
        }
    }

    /// Handles one request and returns the response bytes. Never panics:
    /// a request it cannot decode or carry out gets an error response
    /// (with the fence echoed when the header was readable).
    pub fn handle_command(&mut self, mem: &GuestMemoryMmap, req: &[u8]) -> Vec<u8> {
        let hdr = match protocol::decode_header(req) {
            Ok(h) => h,
            Err(e) => {
                debug!("virtio-gpu: {e}");
                return Response::ErrUnspec.encode(None);
            }
        };
        let resp = match protocol::decode(req, self.config.limits.max_entries) {
            Ok((_, cmd)) => self.execute(mem, cmd).unwrap_or_else(|e| {
                debug!("virtio-gpu: command {:#x} failed: {e}", hdr.type_);
                e.response()
            }),
            Err(e) => {
                debug!("virtio-gpu: {e}");
                Response::ErrUnspec
            }
        };
        resp.encode(Some(&hdr))
    }

    fn execute(&mut self, mem: &GuestMemoryMmap, cmd: Command) -> Result<Response, GpuError> {
        match cmd {
            Command::GetDisplayInfo => Ok(Response::OkDisplayInfo(Box::new(self.display_info()))),
            Command::GetEdid { scanout_id } => self.get_edid(scanout_id),
            Command::ResourceCreate2d { resource_id, format, width, height } => {
                lock(&self.table).create_2d(resource_id, format, width, height)?;
                Ok(Response::OkNoData)
            }
            Command::ResourceUnref { resource_id } => {
                let showing: Vec<u32> = {
                    let mut t = lock(&self.table);
                    let showing = (0..MAX_SCANOUTS as u32)
                        .filter(|&s| t.scanout(s).is_some_and(|s| s.resource_id == resource_id))
                        .collect();
                    t.unref(resource_id)?;
                    showing
                };
                for scanout_id in showing {
                    self.display.scanout(scanout_id, 0, 0);
                    self.notify(ScanoutEvent::Set { scanout_id, resource_id: 0, rect: Rect::default() });
                }
                Ok(Response::OkNoData)
            }
            Command::ResourceAttachBacking { resource_id, entries } => {
                lock(&self.table).attach_backing(resource_id, &entries, mem)?;
                Ok(Response::OkNoData)
            }
            Command::ResourceDetachBacking { resource_id } => {
                lock(&self.table).detach_backing(resource_id)?;
                Ok(Response::OkNoData)
            }
            Command::SetScanout { rect, scanout_id, resource_id } => {
                let set = lock(&self.table).set_scanout(scanout_id, resource_id, rect)?;
                let rect = set.map_or(Rect::default(), |s| s.rect);
                self.display.scanout(scanout_id, rect.width, rect.height);
                self.notify(ScanoutEvent::Set { scanout_id, resource_id: set.map_or(0, |s| s.resource_id), rect });
                Ok(Response::OkNoData)
            }
            Command::ResourceFlush { rect, resource_id } => {
                let (targets, res) = {
                    let t = lock(&self.table);
                    (t.flush(resource_id, rect)?, t.get(resource_id).cloned())
                };
                for (scanout_id, part) in targets {
                    let shown = lock(&self.table).scanout(scanout_id).map(|s| s.rect).unwrap_or_default();
                    if let (Some(res), true) = (&res, self.display.shows_pixels()) {
                        self.send_update(mem, res, scanout_id, part.rect, shown);
                    }
                    self.notify(ScanoutEvent::Flush { scanout_id, resource_id, rect: part.rect });
                }
                Ok(Response::OkNoData)
            }
            Command::TransferToHost2d { rect, offset, resource_id } => {
                lock(&self.table).transfer_to_host_2d(resource_id, rect, offset)?;
                Ok(Response::OkNoData)
            }
            Command::UpdateCursor { pos, resource_id, hot_x, hot_y } => {
                self.check_scanout(pos.scanout_id)?;
                if resource_id == 0 {
                    self.display.cursor_move(pos, false);
                    return Ok(Response::OkNoData);
                }
                let res = lock(&self.table).get(resource_id).cloned().ok_or(GpuError::NoResource(resource_id))?;
                let image = cursor_image(mem, &res)?;
                self.display.cursor_update(pos, hot_x, hot_y, &image);
                Ok(Response::OkNoData)
            }
            Command::MoveCursor { pos, .. } => {
                self.check_scanout(pos.scanout_id)?;
                self.display.cursor_move(pos, true);
                Ok(Response::OkNoData)
            }
        }
    }

    fn check_scanout(&self, scanout_id: u32) -> Result<(), GpuError> {
        if scanout_id >= lock(&self.table).limits().num_scanouts {
            return Err(GpuError::NoScanout(scanout_id));
        }
        Ok(())
    }

    fn display_info(&mut self) -> [DisplayOne; MAX_SCANOUTS] {
        if let Some(modes) = self.display.display_info() {
            return modes;
        }
        let mut modes = [DisplayOne::default(); MAX_SCANOUTS];
        let (width, height) = self.config.preferred_size;
        modes[0] = DisplayOne { rect: Rect { x: 0, y: 0, width, height }, enabled: true, flags: 0 };
        modes
    }

    fn get_edid(&mut self, scanout_id: u32) -> Result<Response, GpuError> {
        if scanout_id >= lock(&self.table).limits().num_scanouts {
            return Err(GpuError::InvalidParameter(format!("EDID of scanout {scanout_id}")));
        }
        if let Some(e) = self.display.edid(scanout_id) {
            return Ok(Response::OkEdid(e));
        }
        let mode = self.display_info()[scanout_id as usize];
        let (w, h) = if mode.rect.width > 0 && mode.rect.height > 0 {
            (mode.rect.width, mode.rect.height)
        } else {
            self.config.preferred_size
        };
        Ok(Response::OkEdid(edid::edid(w, h).to_vec()))
    }

    /// Sends `part` (resource coordinates, inside `shown`) of a resource to
    /// the display, converted to B,G,R,x, in bands of at most 4 MiB.
    fn send_update(&mut self, mem: &GuestMemoryMmap, res: &Resource, scanout_id: u32, part: Rect, shown: Rect) {
        let Some(backing) = &res.backing else { return };
        let row_bytes = part.width as usize * BYTES_PER_PIXEL as usize;
        if row_bytes == 0 {
            return;
        }
        let rows_per_band = (MAX_UPDATE_BYTES / row_bytes).max(1);
        let bgr = res.format.bgr_offsets();
        let mut y = part.y;
        let end = part.y + part.height;
        while y < end {
            let rows = (end - y).min(rows_per_band as u32);
            let mut buf = vec![0u8; rows as usize * row_bytes];
            for (i, row) in buf.chunks_exact_mut(row_bytes).enumerate() {
                // Inside the resource (flush checked the rect), so inside the
                // backing (attach checked it covers the resource).
                let off = (y as u64 + i as u64) * res.stride() as u64 + part.x as u64 * BYTES_PER_PIXEL as u64;
                if let Err(e) = backing.read_at(mem, off, row) {
                    debug!("virtio-gpu: flush read failed: {e}");
                    return;
                }
            }
            if bgr != [0, 1, 2] {
                for px in buf.chunks_exact_mut(4) {
                    let p = [px[bgr[0]], px[bgr[1]], px[bgr[2]], 0xff];
                    px.copy_from_slice(&p);
                }
            }
            let rect = Rect { x: part.x - shown.x, y: y - shown.y, width: part.width, height: rows };
            self.display.update(scanout_id, rect, &buf);
            y += rows;
        }
    }
}

/// A cursor resource's top-left 64 × 64 pixels as B,G,R,A (transparent
/// where the resource is smaller).
fn cursor_image(mem: &GuestMemoryMmap, res: &Resource) -> Result<Box<[u8; CURSOR_BYTES]>, GpuError> {
    let backing = res.backing.as_ref().ok_or_else(|| GpuError::Unspec("cursor resource without backing".into()))?;
    let mut image = Box::new([0u8; CURSOR_BYTES]);
    let (w, h) = (res.width.min(64) as usize, res.height.min(64) as usize);
    for y in 0..h {
        let row = &mut image[y * 256..y * 256 + w * 4];
        backing.read_at(mem, y as u64 * res.stride() as u64, row)?;
    }
    let bgr = res.format.bgr_offsets();
    if bgr != [0, 1, 2] {
        // The fourth byte is the one that is neither B, G nor R.
        let a = 6 - bgr[0] - bgr[1] - bgr[2];
        for px in image.chunks_exact_mut(4) {
            let p = [px[bgr[0]], px[bgr[1]], px[bgr[2]], px[a]];
            px.copy_from_slice(&p);
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{self as p, encode};
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<String>>>);
    impl Display for Recorder {
        fn shows_pixels(&self) -> bool {
            true
        }
        fn scanout(&mut self, s: u32, w: u32, h: u32) {
            self.0.lock().unwrap().push(format!("scanout {s} {w}x{h}"));
        }
        fn update(&mut self, s: u32, r: Rect, px: &[u8]) {
            self.0.lock().unwrap().push(format!("update {s} {},{} {}x{} {:?}", r.x, r.y, r.width, r.height, &px[..4]));
        }
        fn cursor_update(&mut self, pos: CursorPos, hx: u32, hy: u32, img: &[u8; CURSOR_BYTES]) {
            self.0.lock().unwrap().push(format!("cursor {},{} hot {hx},{hy} {:?}", pos.x, pos.y, &img[..4]));
        }
        fn cursor_move(&mut self, pos: CursorPos, visible: bool) {
            self.0.lock().unwrap().push(format!("move {},{} {visible}", pos.x, pos.y));
        }
    }

    fn resp_type(b: &[u8]) -> u32 {
        u32::from_le_bytes(b[0..4].try_into().unwrap())
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn a_linux_session() {
        let (m, rec) = (mem(), Recorder::default());
        let mut d = Device::new(Config::default());
        d.set_display(Box::new(rec.clone()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        d.set_observer(Some(Arc::new(move |e| ev.lock().unwrap().push(e))));

        let edid = d.handle_command(&m, &encode::get_edid(0));
        assert_eq!(resp_type(&edid), p::RESP_OK_EDID);
        assert_eq!(u32::from_le_bytes(edid[24..28].try_into().unwrap()), 128);
        let info = d.handle_command(&m, &encode::get_display_info());
        assert_eq!(resp_type(&info), p::RESP_OK_DISPLAY_INFO);
        let words: Vec<u32> = info[24..48].chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(words, [0, 0, 1280, 800, 1, 0]);

        // A 4×2 X8R8G8B8 resource (bytes x,R,G,B) in two extents.
        m.write_slice(&[0, 30, 20, 10].repeat(8), GuestAddress(0x2000)).unwrap();
        let ok = |d: &mut Device, req: Vec<u8>| assert_eq!(resp_type(&d.handle_command(&m, &req)), p::RESP_OK_NODATA);
        ok(&mut d, encode::create_2d(5, 4, 4, 2));
        ok(&mut d, encode::attach_backing(5, &[(0x2000, 20), (0x2014, 12)]));
        let full = Rect { x: 0, y: 0, width: 4, height: 2 };
        ok(&mut d, encode::set_scanout(0, 5, full));
        ok(&mut d, encode::transfer_2d(5, full, 0));
        ok(&mut d, encode::flush(5, Rect { x: 1, y: 1, width: 2, height: 1 }));
        // The cursor: 1×1 B8G8R8A8 cursor resource.
        m.write_slice(&[1, 2, 3, 4], GuestAddress(0x3000)).unwrap();
        ok(&mut d, encode::create_2d(6, 1, 1, 1));
        ok(&mut d, encode::attach_backing(6, &[(0x3000, 4)]));
        ok(&mut d, encode::update_cursor(0, 7, 8, 6, 0, 0));
        ok(&mut d, encode::move_cursor(0, 9, 9));
        ok(&mut d, encode::update_cursor(0, 9, 9, 0, 0, 0));
        ok(&mut d, encode::unref(5));
        assert_eq!(
            *rec.0.lock().unwrap(),
            [
                "scanout 0 4x2",
                "update 0 1,1 2x1 [10, 20, 30, 255]",
                "cursor 7,8 hot 0,0 [1, 2, 3, 4]",
                "move 9,9 true",
                "move 9,9 false",
                "scanout 0 0x0"
            ]
        );
        let events = events.lock().unwrap();
        assert_eq!(events[0], ScanoutEvent::Set { scanout_id: 0, resource_id: 5, rect: full });
        assert_eq!(
            events[1],
            ScanoutEvent::Flush { scanout_id: 0, resource_id: 5, rect: Rect { x: 1, y: 1, width: 2, height: 1 } }
        );
        assert_eq!(events[2], ScanoutEvent::Set { scanout_id: 0, resource_id: 0, rect: Rect::default() });
    }

    #[test]
    fn errors_are_answered_and_the_device_goes_on() {
        let m = mem();
        let mut d = Device::new(Config::default());
        let fenced = |mut req: Vec<u8>| {
            req[4..8].copy_from_slice(&p::FLAG_FENCE.to_le_bytes());
            req[8..16].copy_from_slice(&42u64.to_le_bytes());
            req
        };
        let r = d.handle_command(&m, &fenced(encode::unref(3)));
        assert_eq!(resp_type(&r), p::RESP_ERR_INVALID_RESOURCE_ID);
        assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 42, "fence echoed on errors too");
        assert_eq!(resp_type(&d.handle_command(&m, &[1, 2, 3])), p::RESP_ERR_UNSPEC);
        assert_eq!(resp_type(&d.handle_command(&m, &fenced(encode::hdr(0x0207, 0, 0)))), p::RESP_ERR_UNSPEC);
        let r = |d: &mut Device, req: Vec<u8>| resp_type(&d.handle_command(&m, &req));
        assert_eq!(r(&mut d, encode::get_edid(16)), p::RESP_ERR_INVALID_PARAMETER);
        assert_eq!(r(&mut d, encode::set_scanout(16, 0, Rect::default())), p::RESP_ERR_INVALID_SCANOUT_ID);
        assert_eq!(r(&mut d, encode::create_2d(1, 2, 16384, 16384)), p::RESP_ERR_OUT_OF_MEMORY);
        assert_eq!(r(&mut d, encode::create_2d(1, 2, 64, 64)), p::RESP_OK_NODATA);
        assert_eq!(r(&mut d, encode::attach_backing(1, &[(1 << 20, 16384)])), p::RESP_ERR_UNSPEC);
        assert_eq!(r(&mut d, encode::update_cursor(0, 0, 0, 1, 0, 0)), p::RESP_ERR_UNSPEC, "no backing");
        assert_eq!(r(&mut d, encode::attach_backing(1, &[(0, 16384)])), p::RESP_OK_NODATA);
        assert_eq!(
            r(&mut d, encode::flush(1, Rect { x: 0, y: 0, width: 65, height: 1 })),
            p::RESP_ERR_INVALID_PARAMETER
        );
        assert_eq!(r(&mut d, encode::flush(1, Rect { x: 0, y: 0, width: 64, height: 64 })), p::RESP_OK_NODATA);
    }
}
