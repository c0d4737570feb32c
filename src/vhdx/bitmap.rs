//! Sector bitmaps of differencing files ([MS-VHDX] §2.5.1, §4 of the notes): one bit per
//! logical sector, LSB first; 1 = the sector is in this file, 0 = read it from the parent.

/// Calls `f(present, first_bit, count)` for each maximal run of equal bits in
/// `bits[start..start + count]` (bit indices into the byte slice, LSB first).
///
/// Whole 64-bit words of equal bits are skipped at once, so a block that is mostly one state
/// costs a few iterations, not one per sector.
pub fn for_each_run(bits: &[u8], start: u64, count: u64, mut f: impl FnMut(bool, u64, u64)) {
    let end = start + count;
    let bit = |i: u64| bits[(i / 8) as usize] >> (i % 8) & 1 == 1;
    let mut i = start;
    while i < end {
        let value = bit(i);
        let run_start = i;
        i += 1;
        while i < end {
            if i % 64 == 0 && i + 64 <= end {
                let at = (i / 8) as usize;
                let word = u64::from_le_bytes(bits[at..at + 8].try_into().expect("8 bytes"));
                if word == if value { u64::MAX } else { 0 } {
                    i += 64;
                    continue;
                }
            }
            if bit(i) != value {
                break;
            }
            i += 1;
        }
        f(value, run_start, i - run_start);
    }
}

/// Sets bits `[start, start + count)` to `value`.
pub fn set_range(bits: &mut [u8], start: u64, count: u64, value: bool) {
    let mut i = start;
    let end = start + count;
    while i < end {
        if i % 8 == 0 && i + 8 <= end {
            bits[(i / 8) as usize] = if value { 0xff } else { 0 };
            i += 8;
        } else {
            let mask = 1u8 << (i % 8);
            if value {
                bits[(i / 8) as usize] |= mask;
            } else {
                bits[(i / 8) as usize] &= !mask;
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(bits: &[u8], start: u64, count: u64) -> Vec<(bool, u64, u64)> {
        let mut v = Vec::new();
        for_each_run(bits, start, count, |p, s, c| v.push((p, s, c)));
        v
    }

    #[test]
    fn runs_cover_the_range_exactly() {
        let mut bits = vec![0u8; 64];
        set_range(&mut bits, 3, 5, true);
        set_range(&mut bits, 100, 300, true);
        assert_eq!(
            runs(&bits, 0, 512),
            vec![
                (false, 0, 3),
                (true, 3, 5),
                (false, 8, 92),
                (true, 100, 300),
                (false, 400, 112)
            ]
        );
        assert_eq!(runs(&bits, 5, 2), vec![(true, 5, 2)]);
        assert_eq!(runs(&bits, 101, 64), vec![(true, 101, 64)]);
    }

    #[test]
    fn runs_match_a_bit_by_bit_reference() {
        let mut state = 12345u64;
        let mut bits = vec![0u8; 256];
        for b in bits.iter_mut() {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = match state >> 62 {
                0 => 0,
                1 => 0xff,
                _ => (state >> 33) as u8,
            };
        }
        for (start, count) in [(0, 2048), (7, 1000), (64, 128), (1, 1)] {
            let mut expect = Vec::new();
            for i in start..start + count {
                let v = bits[(i / 8) as usize] >> (i % 8) & 1 == 1;
                match expect.last_mut() {
                    Some((pv, _, c)) if *pv == v => *c += 1,
                    _ => expect.push((v, i, 1)),
                }
            }
            assert_eq!(runs(&bits, start, count), expect);
        }
    }
}
