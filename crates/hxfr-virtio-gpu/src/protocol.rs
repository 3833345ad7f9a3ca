//! The virtio-gpu 2D command set on the wire (virtio spec 1.2, §5.7.6):
//! requests decoded from the bytes a driver put in a descriptor chain, and
//! responses encoded for it.
//!
//! Everything is little-endian and parsed by hand: a request is untrusted
//! bytes of any length, so every read is bounds-checked and a short or
//! unknown request is an error value, never a panic.

use thiserror::Error;

/// Size of `struct virtio_gpu_ctrl_hdr`.
pub const HDR_SIZE: usize = 24;
/// Scanouts a virtio-gpu device can have (`VIRTIO_GPU_MAX_SCANOUTS`).
pub const MAX_SCANOUTS: usize = 16;
/// Size of one `virtio_gpu_mem_entry` after RESOURCE_ATTACH_BACKING.
pub const MEM_ENTRY_SIZE: usize = 16;
/// Bytes of EDID a GET_EDID response can carry.
pub const EDID_BLOB_SIZE: usize = 1024;

// Command types.
pub const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
pub const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
pub const CMD_RESOURCE_UNREF: u32 = 0x0102;
pub const CMD_SET_SCANOUT: u32 = 0x0103;
pub const CMD_RESOURCE_FLUSH: u32 = 0x0104;
pub const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
pub const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
pub const CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
pub const CMD_GET_EDID: u32 = 0x010a;
pub const CMD_UPDATE_CURSOR: u32 = 0x0300;
pub const CMD_MOVE_CURSOR: u32 = 0x0301;

// Response types.
pub const RESP_OK_NODATA: u32 = 0x1100;
pub const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
pub const RESP_OK_EDID: u32 = 0x1104;
pub const RESP_ERR_UNSPEC: u32 = 0x1200;
pub const RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
pub const RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
pub const RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
pub const RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;

/// The driver wants a fence: answer with the same `fence_id`.
pub const FLAG_FENCE: u32 = 1 << 0;
/// The fence belongs to the context ring `ring_idx` (echoed as given).
pub const FLAG_INFO_RING_IDX: u32 = 1 << 1;

/// `struct virtio_gpu_ctrl_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtrlHdr {
    pub type_: u32,
    pub flags: u32,
    pub fence_id: u64,
    pub ctx_id: u32,
    pub ring_idx: u8,
}

/// `struct virtio_gpu_rect`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    /// Whether the rect lies inside a `width × height` area (no overflow:
    /// the sums are done in u64).
    pub fn inside(&self, width: u32, height: u32) -> bool {
        self.x as u64 + self.width as u64 <= width as u64 && self.y as u64 + self.height as u64 <= height as u64
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// The overlap of two rects (empty if none). Both must be in u32 range
    /// end to end, which [`Rect::inside`] checks before this is used.
    pub fn intersect(&self, o: &Rect) -> Rect {
        let x0 = self.x.max(o.x) as u64;
        let y0 = self.y.max(o.y) as u64;
        let x1 = (self.x as u64 + self.width as u64).min(o.x as u64 + o.width as u64);
        let y1 = (self.y as u64 + self.height as u64).min(o.y as u64 + o.height as u64);
        if x1 <= x0 || y1 <= y0 {
            return Rect::default();
        }
        Rect { x: x0 as u32, y: y0 as u32, width: (x1 - x0) as u32, height: (y1 - y0) as u32 }
    }
}

/// One guest-physical extent of a resource's backing (`virtio_gpu_mem_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemEntry {
    pub addr: u64,
    pub length: u32,
}

/// `struct virtio_gpu_cursor_pos`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CursorPos {
    pub scanout_id: u32,
    pub x: u32,
    pub y: u32,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    GetDisplayInfo,
    GetEdid {
        scanout_id: u32,
    },
    ResourceCreate2d {
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    },
    ResourceUnref {
        resource_id: u32,
    },
    SetScanout {
        rect: Rect,
        scanout_id: u32,
        resource_id: u32,
    },
    ResourceFlush {
        rect: Rect,
        resource_id: u32,
    },
    TransferToHost2d {
        rect: Rect,
        offset: u64,
        resource_id: u32,
    },
    /// The entries as sent; their count is bounded by the caller's limit
    /// before any is read.
    ResourceAttachBacking {
        resource_id: u32,
        entries: Vec<MemEntry>,
    },
    ResourceDetachBacking {
        resource_id: u32,
    },
    UpdateCursor {
        pos: CursorPos,
        resource_id: u32,
        hot_x: u32,
        hot_y: u32,
    },
    MoveCursor {
        pos: CursorPos,
        resource_id: u32,
    },
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("request of {0} bytes is shorter than the {HDR_SIZE}-byte header")]
    NoHeader(usize),
    #[error("command {type_:#x}: {len} bytes, needs {need}")]
    Short { type_: u32, len: usize, need: usize },
    #[error("unsupported command {0:#x}")]
    Unsupported(u32),
    #[error("attach backing with {nr} entries: more than the {max} allowed")]
    TooManyEntries { nr: u32, max: u32 },
}

/// Little-endian reader over a byte slice that reports how much it needed.
struct Le<'a> {
    b: &'a [u8],
}

impl Le<'_> {
    // Callers check the length first (`need`); a read past the end would
    // give 0 rather than panic.
    fn u32(&self, at: usize) -> u32 {
        self.b.get(at..at + 4).and_then(|s| s.try_into().ok()).map(u32::from_le_bytes).unwrap_or(0)
    }
    fn u64(&self, at: usize) -> u64 {
        self.b.get(at..at + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0)
    }
    fn rect(&self, at: usize) -> Rect {
        Rect { x: self.u32(at), y: self.u32(at + 4), width: self.u32(at + 8), height: self.u32(at + 12) }
    }
}

/// Decodes the header alone: a request too short for one has no fence to echo.
pub fn decode_header(bytes: &[u8]) -> Result<CtrlHdr, DecodeError> {
    if bytes.len() < HDR_SIZE {
        return Err(DecodeError::NoHeader(bytes.len()));
    }
    let r = Le { b: bytes };
    Ok(CtrlHdr { type_: r.u32(0), flags: r.u32(4), fence_id: r.u64(8), ctx_id: r.u32(16), ring_idx: bytes[20] })
}

/// Decodes one request. `max_entries` bounds RESOURCE_ATTACH_BACKING's
/// entry count before anything is allocated for it.
pub fn decode(bytes: &[u8], max_entries: u32) -> Result<(CtrlHdr, Command), DecodeError> {
    let hdr = decode_header(bytes)?;
    let body_len = match hdr.type_ {
        CMD_GET_DISPLAY_INFO => 0,
        CMD_GET_EDID | CMD_RESOURCE_UNREF | CMD_RESOURCE_DETACH_BACKING => 8,
        CMD_RESOURCE_CREATE_2D => 16,
        CMD_SET_SCANOUT | CMD_RESOURCE_FLUSH => 24,
        CMD_TRANSFER_TO_HOST_2D => 32,
        CMD_RESOURCE_ATTACH_BACKING => 8,
        CMD_UPDATE_CURSOR | CMD_MOVE_CURSOR => 32,
        t => return Err(DecodeError::Unsupported(t)),
    };
    let need = HDR_SIZE + body_len;
    if bytes.len() < need {
        return Err(DecodeError::Short { type_: hdr.type_, len: bytes.len(), need });
    }
    let r = Le { b: &bytes[HDR_SIZE..] };
    let cmd = match hdr.type_ {
        CMD_GET_DISPLAY_INFO => Command::GetDisplayInfo,
        CMD_GET_EDID => Command::GetEdid { scanout_id: r.u32(0) },
        CMD_RESOURCE_UNREF => Command::ResourceUnref { resource_id: r.u32(0) },
        CMD_RESOURCE_DETACH_BACKING => Command::ResourceDetachBacking { resource_id: r.u32(0) },
        CMD_RESOURCE_CREATE_2D => {
            Command::ResourceCreate2d { resource_id: r.u32(0), format: r.u32(4), width: r.u32(8), height: r.u32(12) }
        }
        CMD_SET_SCANOUT => Command::SetScanout { rect: r.rect(0), scanout_id: r.u32(16), resource_id: r.u32(20) },
        CMD_RESOURCE_FLUSH => Command::ResourceFlush { rect: r.rect(0), resource_id: r.u32(16) },
        CMD_TRANSFER_TO_HOST_2D => {
            Command::TransferToHost2d { rect: r.rect(0), offset: r.u64(16), resource_id: r.u32(24) }
        }
        CMD_RESOURCE_ATTACH_BACKING => {
            let (resource_id, nr) = (r.u32(0), r.u32(4));
            if nr > max_entries {
                return Err(DecodeError::TooManyEntries { nr, max: max_entries });
            }
            // nr ≤ max_entries (a u32 bound the caller keeps small), so this
            // product cannot overflow usize on a 64-bit host.
            let need = need + nr as usize * MEM_ENTRY_SIZE;
            if bytes.len() < need {
                return Err(DecodeError::Short { type_: hdr.type_, len: bytes.len(), need });
            }
            let entries = (0..nr as usize)
                .map(|i| {
                    let at = 8 + i * MEM_ENTRY_SIZE;
                    MemEntry { addr: r.u64(at), length: r.u32(at + 8) }
                })
                .collect();
            Command::ResourceAttachBacking { resource_id, entries }
        }
        CMD_UPDATE_CURSOR | CMD_MOVE_CURSOR => {
            let pos = CursorPos { scanout_id: r.u32(0), x: r.u32(4), y: r.u32(8) };
            let resource_id = r.u32(16);
            if hdr.type_ == CMD_UPDATE_CURSOR {
                Command::UpdateCursor { pos, resource_id, hot_x: r.u32(20), hot_y: r.u32(24) }
            } else {
                Command::MoveCursor { pos, resource_id }
            }
        }
        // Every other type returned Unsupported above.
        t => return Err(DecodeError::Unsupported(t)),
    };
    Ok((hdr, cmd))
}

/// One scanout in a display-info response (`virtio_gpu_display_one`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DisplayOne {
    pub rect: Rect,
    pub enabled: bool,
    pub flags: u32,
}

/// A response to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    OkNoData,
    OkDisplayInfo(Box<[DisplayOne; MAX_SCANOUTS]>),
    /// The EDID bytes, at most [`EDID_BLOB_SIZE`] (longer is cut).
    OkEdid(Vec<u8>),
    ErrUnspec,
    ErrOutOfMemory,
    ErrInvalidScanoutId,
    ErrInvalidResourceId,
    ErrInvalidParameter,
}

impl Response {
    pub fn type_(&self) -> u32 {
        match self {
            Response::OkNoData => RESP_OK_NODATA,
            Response::OkDisplayInfo(_) => RESP_OK_DISPLAY_INFO,
            Response::OkEdid(_) => RESP_OK_EDID,
            Response::ErrUnspec => RESP_ERR_UNSPEC,
            Response::ErrOutOfMemory => RESP_ERR_OUT_OF_MEMORY,
            Response::ErrInvalidScanoutId => RESP_ERR_INVALID_SCANOUT_ID,
            Response::ErrInvalidResourceId => RESP_ERR_INVALID_RESOURCE_ID,
            Response::ErrInvalidParameter => RESP_ERR_INVALID_PARAMETER,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.type_() < RESP_ERR_UNSPEC
    }

    /// The response bytes. A fenced request (`FLAG_FENCE`) gets its flags,
    /// fence id, context and ring index back: 2D commands complete before
    /// the response is written, so the fence has signalled by then.
    pub fn encode(&self, req: Option<&CtrlHdr>) -> Vec<u8> {
        let mut out = Vec::with_capacity(match self {
            Response::OkDisplayInfo(_) => HDR_SIZE + MAX_SCANOUTS * 24,
            Response::OkEdid(_) => HDR_SIZE + 8 + EDID_BLOB_SIZE,
            _ => HDR_SIZE,
        });
        let (flags, fence_id, ctx_id, ring_idx) = match req {
            Some(h) if h.flags & FLAG_FENCE != 0 => {
                (h.flags & (FLAG_FENCE | FLAG_INFO_RING_IDX), h.fence_id, h.ctx_id, h.ring_idx)
            }
            _ => (0, 0, 0, 0),
        };
        out.extend_from_slice(&self.type_().to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&fence_id.to_le_bytes());
        out.extend_from_slice(&ctx_id.to_le_bytes());
        out.extend_from_slice(&[ring_idx, 0, 0, 0]);
        match self {
            Response::OkDisplayInfo(modes) => {
                for m in modes.iter() {
                    for v in [m.rect.x, m.rect.y, m.rect.width, m.rect.height, m.enabled as u32, m.flags] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            Response::OkEdid(edid) => {
                let n = edid.len().min(EDID_BLOB_SIZE);
                out.extend_from_slice(&(n as u32).to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                out.extend_from_slice(&edid[..n]);
                out.resize(HDR_SIZE + 8 + EDID_BLOB_SIZE, 0);
            }
            _ => {}
        }
        out
    }
}

/// Test and fuzz helpers: requests as a driver writes them.
pub mod encode {
    use super::*;

    pub fn hdr(type_: u32, flags: u32, fence_id: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(HDR_SIZE);
        v.extend_from_slice(&type_.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&fence_id.to_le_bytes());
        v.extend_from_slice(&[0; 8]);
        v
    }

    fn with(type_: u32, words: &[u32]) -> Vec<u8> {
        let mut v = hdr(type_, 0, 0);
        for w in words {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    pub fn get_display_info() -> Vec<u8> {
        hdr(CMD_GET_DISPLAY_INFO, 0, 0)
    }
    pub fn get_edid(scanout_id: u32) -> Vec<u8> {
        with(CMD_GET_EDID, &[scanout_id, 0])
    }
    pub fn create_2d(resource_id: u32, format: u32, width: u32, height: u32) -> Vec<u8> {
        with(CMD_RESOURCE_CREATE_2D, &[resource_id, format, width, height])
    }
    pub fn unref(resource_id: u32) -> Vec<u8> {
        with(CMD_RESOURCE_UNREF, &[resource_id, 0])
    }
    pub fn detach_backing(resource_id: u32) -> Vec<u8> {
        with(CMD_RESOURCE_DETACH_BACKING, &[resource_id, 0])
    }
    pub fn set_scanout(scanout_id: u32, resource_id: u32, r: Rect) -> Vec<u8> {
        with(CMD_SET_SCANOUT, &[r.x, r.y, r.width, r.height, scanout_id, resource_id])
    }
    pub fn flush(resource_id: u32, r: Rect) -> Vec<u8> {
        with(CMD_RESOURCE_FLUSH, &[r.x, r.y, r.width, r.height, resource_id, 0])
    }
    pub fn transfer_2d(resource_id: u32, r: Rect, offset: u64) -> Vec<u8> {
        with(
            CMD_TRANSFER_TO_HOST_2D,
            &[r.x, r.y, r.width, r.height, offset as u32, (offset >> 32) as u32, resource_id, 0],
        )
    }
    pub fn attach_backing(resource_id: u32, entries: &[(u64, u32)]) -> Vec<u8> {
        let mut v = with(CMD_RESOURCE_ATTACH_BACKING, &[resource_id, entries.len() as u32]);
        for (addr, len) in entries {
            v.extend_from_slice(&addr.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(&0u32.to_le_bytes());
        }
        v
    }
    pub fn update_cursor(scanout_id: u32, x: u32, y: u32, resource_id: u32, hot_x: u32, hot_y: u32) -> Vec<u8> {
        with(CMD_UPDATE_CURSOR, &[scanout_id, x, y, 0, resource_id, hot_x, hot_y, 0])
    }
    pub fn move_cursor(scanout_id: u32, x: u32, y: u32) -> Vec<u8> {
        with(CMD_MOVE_CURSOR, &[scanout_id, x, y, 0, 0, 0, 0, 0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_decodes() {
        let r = Rect { x: 1, y: 2, width: 3, height: 4 };
        let cases = [
            (encode::get_display_info(), Command::GetDisplayInfo),
            (encode::get_edid(3), Command::GetEdid { scanout_id: 3 }),
            (
                encode::create_2d(7, 2, 640, 480),
                Command::ResourceCreate2d { resource_id: 7, format: 2, width: 640, height: 480 },
            ),
            (encode::unref(7), Command::ResourceUnref { resource_id: 7 }),
            (encode::detach_backing(7), Command::ResourceDetachBacking { resource_id: 7 }),
            (encode::set_scanout(1, 7, r), Command::SetScanout { rect: r, scanout_id: 1, resource_id: 7 }),
            (encode::flush(7, r), Command::ResourceFlush { rect: r, resource_id: 7 }),
            (
                encode::transfer_2d(7, r, 0x1_0000_0040),
                Command::TransferToHost2d { rect: r, offset: 0x1_0000_0040, resource_id: 7 },
            ),
            (
                encode::attach_backing(7, &[(0x1000, 4096), (0x9000, 100)]),
                Command::ResourceAttachBacking {
                    resource_id: 7,
                    entries: vec![MemEntry { addr: 0x1000, length: 4096 }, MemEntry { addr: 0x9000, length: 100 }],
                },
            ),
            (
                encode::update_cursor(0, 10, 20, 9, 1, 2),
                Command::UpdateCursor {
                    pos: CursorPos { scanout_id: 0, x: 10, y: 20 },
                    resource_id: 9,
                    hot_x: 1,
                    hot_y: 2,
                },
            ),
            (
                encode::move_cursor(0, 10, 20),
                Command::MoveCursor { pos: CursorPos { scanout_id: 0, x: 10, y: 20 }, resource_id: 0 },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode(&bytes, 16).unwrap().1, want);
            // Every strict prefix is too short and is refused, not a panic.
            for n in 0..bytes.len() {
                assert!(decode(&bytes[..n], 16).is_err(), "{want:?} cut at {n}");
            }
        }
    }

    #[test]
    fn bad_requests_are_errors() {
        assert_eq!(decode(&[0; 5], 16), Err(DecodeError::NoHeader(5)));
        assert_eq!(decode(&encode::hdr(0x0200, 0, 0), 16), Err(DecodeError::Unsupported(0x0200)));
        // Capsets and blobs are not offered, so they are unknown here.
        assert_eq!(decode(&encode::hdr(0x0108, 0, 0), 16), Err(DecodeError::Unsupported(0x0108)));
        let mut huge = encode::attach_backing(1, &[]);
        huge[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge, 16), Err(DecodeError::TooManyEntries { nr: u32::MAX, max: 16 }));
        huge[28..32].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(decode(&huge, 16), Err(DecodeError::Short { need: 80, .. })));
    }

    #[test]
    fn fences_are_echoed() {
        let hdr = decode_header(&encode::hdr(CMD_RESOURCE_FLUSH, FLAG_FENCE | FLAG_INFO_RING_IDX | 0x80, 77)).unwrap();
        let out = Response::OkNoData.encode(Some(&hdr));
        assert_eq!(out.len(), HDR_SIZE);
        assert_eq!(u32::from_le_bytes(out[0..4].try_into().unwrap()), RESP_OK_NODATA);
        assert_eq!(u32::from_le_bytes(out[4..8].try_into().unwrap()), FLAG_FENCE | FLAG_INFO_RING_IDX);
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 77);
        // Without the fence flag, no fence id goes back.
        let hdr = decode_header(&encode::hdr(CMD_RESOURCE_FLUSH, 0, 77)).unwrap();
        let out = Response::ErrInvalidParameter.encode(Some(&hdr));
        assert_eq!(u32::from_le_bytes(out[0..4].try_into().unwrap()), RESP_ERR_INVALID_PARAMETER);
        assert_eq!(&out[4..16], &[0; 12]);
    }

    #[test]
    fn response_sizes_match_the_spec() {
        assert_eq!(Response::OkDisplayInfo(Box::default()).encode(None).len(), 408);
        let edid = Response::OkEdid(vec![1; 128]).encode(None);
        assert_eq!(edid.len(), 1056);
        assert_eq!(u32::from_le_bytes(edid[24..28].try_into().unwrap()), 128);
    }

    #[test]
    fn rects() {
        let r = Rect { x: 10, y: 10, width: 100, height: 100 };
        assert!(r.inside(110, 110));
        assert!(!r.inside(109, 110));
        assert!(!Rect { x: u32::MAX, y: 0, width: 2, height: 1 }.inside(u32::MAX, 1));
        assert_eq!(
            r.intersect(&Rect { x: 50, y: 0, width: 100, height: 20 }),
            Rect { x: 50, y: 10, width: 60, height: 10 }
        );
        assert!(r.intersect(&Rect { x: 0, y: 0, width: 10, height: 10 }).is_empty());
    }
}
