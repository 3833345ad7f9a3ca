//! A minimal EDID 1.4 block for a virtual monitor whose preferred mode is a
//! given size: what the device answers GET_EDID with when QEMU is not there
//! to answer it (QEMU owns the display and its EDID when it is).

/// Largest size a detailed timing descriptor can carry (12-bit fields).
pub const MAX_DTD_DIM: u32 = 4095;

/// The 128-byte EDID base block for a monitor named "hxfr" preferring
/// `width × height` at about 60 Hz (sizes are clamped to 1..=4095, what an
/// EDID 1.4 detailed timing can say).
pub fn edid(width: u32, height: u32) -> [u8; 128] {
    let w = width.clamp(1, MAX_DTD_DIM);
    let h = height.clamp(1, MAX_DTD_DIM);
    let mut e = [0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "HXF": three 5-bit letters (A = 1), big-endian.
    let mfg: u16 = (8 << 10) | (24 << 5) | 6;
    e[8..10].copy_from_slice(&mfg.to_be_bytes());
    e[10..12].copy_from_slice(&1u16.to_le_bytes()); // product code
    e[16] = 1; // week
    e[17] = 34; // year 2024 (offset from 1990)
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0x80; // digital input
    // Physical size in cm at about 96 dpi, so DPI-aware guests pick 1x.
    e[21] = (w * 254 / 9600).clamp(1, 255) as u8;
    e[22] = (h * 254 / 9600).clamp(1, 255) as u8;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // sRGB default colour space, preferred timing is native
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]); // sRGB primaries
    for i in 0..8 {
        e[38 + 2 * i] = 1; // standard timings: unused
        e[39 + 2 * i] = 1;
    }
    e[54..72].copy_from_slice(&detailed_timing(w, h));
    // Display product name.
    e[72..77].copy_from_slice(&[0, 0, 0, 0xfc, 0]);
    e[77..90].copy_from_slice(b"hxfr\n        ");
    // Two dummy descriptors.
    e[90..95].copy_from_slice(&[0, 0, 0, 0x10, 0]);
    e[108..113].copy_from_slice(&[0, 0, 0, 0x10, 0]);
    e[126] = 0; // no extensions
    e[127] = checksum(&e[..127]);
    e
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)))
}

/// An 18-byte detailed timing descriptor with reduced blanking.
fn detailed_timing(w: u32, h: u32) -> [u8; 18] {
    let (hblank, hso, hsw) = (160u32, 48u32, 32u32);
    let (vblank, vso, vsw) = (30u32, 3u32, 6u32);
    // Pixel clock in 10 kHz units; the field is 16 bits, so very large modes
    // get a lower refresh rate rather than a wrapped clock.
    let clock = ((w + hblank) as u64 * (h + vblank) as u64 * 60 / 10_000).clamp(1, 0xffff) as u16;
    let (wmm, hmm) = (w * 254 / 960, h * 254 / 960);
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&clock.to_le_bytes());
    d[2] = w as u8;
    d[3] = hblank as u8;
    d[4] = (((w >> 8) & 0xf) << 4 | ((hblank >> 8) & 0xf)) as u8;
    d[5] = h as u8;
    d[6] = vblank as u8;
    d[7] = (((h >> 8) & 0xf) << 4 | ((vblank >> 8) & 0xf)) as u8;
    d[8] = hso as u8;
    d[9] = hsw as u8;
    d[10] = ((vso & 0xf) << 4 | (vsw & 0xf)) as u8;
    d[11] = (((hso >> 8) & 3) << 6 | ((hsw >> 8) & 3) << 4 | ((vso >> 4) & 3) << 2 | ((vsw >> 4) & 3)) as u8;
    d[12] = wmm as u8;
    d[13] = hmm as u8;
    d[14] = (((wmm >> 8) & 0xf) << 4 | ((hmm >> 8) & 0xf)) as u8;
    d[17] = 0x1e; // digital separate sync, both polarities positive
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edid_is_valid_and_prefers_the_size() {
        for (w, h) in [(1280, 800), (1920, 1080), (3840, 2160), (1, 1)] {
            let e = edid(w, h);
            assert_eq!(&e[0..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
            assert_eq!(e.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0, "checksum for {w}x{h}");
            let d = &e[54..72];
            assert_ne!(u16::from_le_bytes([d[0], d[1]]), 0, "a DTD has a non-zero clock");
            assert_eq!(d[2] as u32 | ((d[4] as u32 >> 4) << 8), w);
            assert_eq!(d[5] as u32 | ((d[7] as u32 >> 4) << 8), h);
        }
        // Too large for a DTD: clamped, still valid.
        let e = edid(16384, 16384);
        assert_eq!(e.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        assert_eq!(e[56] as u32 | ((e[58] as u32 >> 4) << 8), MAX_DTD_DIM);
    }
}
