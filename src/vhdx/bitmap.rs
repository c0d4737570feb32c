//! Sector bitmaps of differencing files ([MS-VHDX] §2.5.1, §4 of the notes): one bit per
//! logical sector, LSB first; 1 = the sector is in this file, 0 = read it from the parent.
//!
//! A writable file keeps the 4 KiB bitmap pages it has touched in [`BitmapCache`]: that is the
//! truth readers consult, and what the WAL logs when a page changes. A page covers 2^15 sectors
//! (16 MiB of disk with 512-byte sectors), so the cache costs 1/4096 of the data it describes.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use super::storage::Storage;

const PAGE: u64 = 4096;
const BITS_PER_PAGE: u64 = PAGE * 8;

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

/// The bitmap pages of a writable differencing file, keyed by file offset.
#[derive(Default)]
pub struct BitmapCache {
    pages: Mutex<HashMap<u64, Box<[u8; PAGE as usize]>>>,
}

impl BitmapCache {
    fn page<'a>(
        pages: &'a mut HashMap<u64, Box<[u8; PAGE as usize]>>,
        storage: &dyn Storage,
        offset: u64,
    ) -> io::Result<&'a mut Box<[u8; PAGE as usize]>> {
        match pages.entry(offset) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(v) => {
                let mut page = Box::new([0u8; PAGE as usize]);
                storage.read_at(&mut page[..], offset)?;
                Ok(v.insert(page))
            }
        }
    }

    /// Copies bits `[first_bit, first_bit + count)` of the bitmap block at `sb_offset` into
    /// `out`, starting at bit `first_bit % 8` of `out[0]`.
    pub fn read_bits(
        &self,
        storage: &dyn Storage,
        sb_offset: u64,
        first_bit: u64,
        count: u64,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let byte_start = first_bit / 8;
        let byte_end = (first_bit + count).div_ceil(8);
        out.clear();
        out.resize((byte_end - byte_start) as usize, 0);
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        let mut at = byte_start;
        while at < byte_end {
            let page_off = at / PAGE * PAGE;
            let n = (page_off + PAGE).min(byte_end) - at;
            let page = Self::page(&mut pages, storage, sb_offset + page_off)?;
            let dst = (at - byte_start) as usize;
            out[dst..dst + n as usize]
                .copy_from_slice(&page[(at - page_off) as usize..(at - page_off + n) as usize]);
            at += n;
        }
        Ok(())
    }

    /// Sets bits `[first_bit, first_bit + count)` of the bitmap block at `sb_offset` to `value`
    /// and returns the file offsets of the pages that changed.
    pub fn set_bits(
        &self,
        storage: &dyn Storage,
        sb_offset: u64,
        first_bit: u64,
        count: u64,
        value: bool,
    ) -> io::Result<Vec<u64>> {
        let mut changed = Vec::new();
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        let mut bit = first_bit;
        let end = first_bit + count;
        while bit < end {
            let page_index = bit / BITS_PER_PAGE;
            let n = ((page_index + 1) * BITS_PER_PAGE).min(end) - bit;
            let page_off = sb_offset + page_index * PAGE;
            let page = Self::page(&mut pages, storage, page_off)?;
            set_range(&mut page[..], bit % BITS_PER_PAGE, n, value);
            changed.push(page_off);
            bit += n;
        }
        Ok(changed)
    }

    /// The current contents of a cached page (what the WAL logs).
    pub fn copy_page(&self, offset: u64, out: &mut [u8]) -> bool {
        let pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        match pages.get(&offset) {
            Some(p) => {
                out.copy_from_slice(&p[..]);
                true
            }
            None => false,
        }
    }

    /// Drops a page whose bitmap block was given up or replaced by a zeroed one.
    pub fn forget_block(&self, sb_offset: u64) {
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        pages.retain(|&o, _| {
            o < sb_offset || o >= sb_offset + super::format::SECTOR_BITMAP_BLOCK_SIZE
        });
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
    fn cache_reads_through_and_tracks_changed_pages() {
        use crate::vhdx::storage::MemStorage;
        let m = MemStorage::new(vec![0xffu8; 3 * 4096]);
        let c = BitmapCache::default();
        let mut out = Vec::new();
        c.read_bits(&m, 0, 8, 16, &mut out).unwrap();
        assert_eq!(out, vec![0xff, 0xff]);
        // Clear bits spanning the boundary between page 0 and page 1.
        let changed = c.set_bits(&m, 0, BITS_PER_PAGE - 4, 8, false).unwrap();
        assert_eq!(changed, vec![0, 4096]);
        c.read_bits(&m, 0, BITS_PER_PAGE - 8, 16, &mut out).unwrap();
        assert_eq!(out, vec![0x0f, 0xf0]);
        // The file itself is untouched: the cache is the truth until the WAL writes it.
        let mut page = [0u8; 4096];
        assert!(c.copy_page(4096, &mut page));
        assert_eq!(page[0], 0xf0);
        let mut disk = [0u8; 1];
        m.read_at(&mut disk, 4096).unwrap();
        assert_eq!(disk[0], 0xff);
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
