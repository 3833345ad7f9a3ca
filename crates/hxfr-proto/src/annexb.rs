//! Annex-B start-code scanning: the one place that finds NAL units in a
//! byte stream (`00 00 01` or `00 00 00 01` in front of each).

/// One NAL unit found in a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nal<'a> {
    /// Where its start code begins (the leading zero of a 4-byte one).
    pub start_code_at: usize,
    /// The NAL unit without its start code (trailing zeros of the next
    /// 4-byte start code excluded).
    pub data: &'a [u8],
}

impl Nal<'_> {
    /// nal_unit_type (7 SPS, 8 PPS, 5 IDR slice, 1 slice, 9 AUD …).
    pub fn nal_type(&self) -> u8 {
        self.data.first().map_or(0, |b| b & 0x1f)
    }
}

/// The NAL units of `stream`, in order. Bytes before the first start code
/// are not a NAL unit and are skipped.
pub fn nal_units(stream: &[u8]) -> Vec<Nal<'_>> {
    let mut starts = Vec::new(); // (start code offset, first byte of the NAL)
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            let at = if i > 0 && stream[i - 1] == 0 { i - 1 } else { i };
            starts.push((at, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(k, &(at, s))| {
            let mut end = starts.get(k + 1).map_or(stream.len(), |&(next, _)| next);
            // Trailing zero bytes before the next start code are not data.
            while k + 1 < starts.len() && end > s && stream[end - 1] == 0 {
                end -= 1;
            }
            Nal { start_code_at: at, data: &stream[s..end.max(s)] }
        })
        .collect()
}

/// Whether `b` begins with a start code.
pub fn has_start_code(b: &[u8]) -> bool {
    b.starts_with(&[0, 0, 1]) || b.starts_with(&[0, 0, 0, 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nals_behind_3_and_4_byte_start_codes() {
        let au = [0, 0, 0, 1, 0x67, 0x42, 0xc0, 0x1f, 0xaa, 0, 0, 0, 1, 0x68, 0xce, 0, 0, 1, 0x65, 0x88];
        let n = nal_units(&au);
        assert_eq!(n.len(), 3);
        assert_eq!(n[0].data, &[0x67, 0x42, 0xc0, 0x1f, 0xaa]);
        assert_eq!((n[0].start_code_at, n[0].nal_type()), (0, 7));
        assert_eq!(n[1].data, &[0x68, 0xce]);
        assert_eq!(n[1].start_code_at, 9);
        assert_eq!(n[2].data, &[0x65, 0x88]);
        assert_eq!((n[2].start_code_at, n[2].nal_type()), (15, 5));
    }

    #[test]
    fn garbage_and_truncation_are_harmless() {
        assert!(nal_units(&[]).is_empty());
        assert!(nal_units(&[1, 2, 3, 0, 0]).is_empty());
        let n = nal_units(&[9, 0, 0, 1]);
        assert_eq!(n.len(), 1);
        assert!(n[0].data.is_empty());
        assert_eq!(n[0].nal_type(), 0);
        assert!(has_start_code(&[0, 0, 1, 5]) && has_start_code(&[0, 0, 0, 1]) && !has_start_code(&[0, 1]));
    }
}
