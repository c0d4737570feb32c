//! The block allocation table ([MS-VHDX] §2.5): geometry (chunk ratio, entry counts,
//! interleaving of sector-bitmap entries) and the in-memory table.
//!
//! Entries are `AtomicU64` so that queue threads can read the table without a lock while the
//! writer publishes new entries; the WAL worker is the one that makes them durable.

use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{Corruption, Error, Result};
use super::format::*;
use super::storage::Storage;

/// The shape of the BAT, derived from the metadata and never from constants (§3.2 of the notes:
/// the chunk ratio depends on the logical sector size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub virtual_disk_size: u64,
    pub has_parent: bool,
}

impl Geometry {
    /// Payload blocks per sector bitmap block: (2^23 × logical sector size) / block size.
    pub fn chunk_ratio(&self) -> u64 {
        (SECTORS_PER_BITMAP_BLOCK * u64::from(self.logical_sector_size))
            / u64::from(self.block_size)
    }

    pub fn payload_blocks(&self) -> u64 {
        self.virtual_disk_size.div_ceil(u64::from(self.block_size))
    }

    pub fn sector_bitmap_blocks(&self) -> u64 {
        self.payload_blocks().div_ceil(self.chunk_ratio())
    }

    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size / self.logical_sector_size)
    }

    /// TotalBATEntries (§2.5): no trailing SB entry for fixed/dynamic files; whole chunks for
    /// differencing files.
    pub fn total_entries(&self) -> u64 {
        let cr = self.chunk_ratio();
        if self.has_parent {
            self.sector_bitmap_blocks() * (cr + 1)
        } else {
            let pb = self.payload_blocks();
            pb + (pb - 1) / cr
        }
    }

    /// Entries of the differencing layout, which is never smaller: what `create` reserves so a
    /// file can gain a parent without growing its BAT.
    pub fn max_entries(&self) -> u64 {
        self.sector_bitmap_blocks() * (self.chunk_ratio() + 1)
    }

    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio()
    }

    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio() + 1) + self.chunk_ratio()
    }

    /// For a BAT index, the payload block it describes, or `None` for a sector-bitmap entry.
    pub fn block_of_index(&self, index: u64) -> Option<u64> {
        let per = self.chunk_ratio() + 1;
        let within = index % per;
        (within != self.chunk_ratio()).then(|| index / per * self.chunk_ratio() + within)
    }
}

/// The in-memory BAT.
pub struct Bat {
    pub geometry: Geometry,
    entries: Box<[AtomicU64]>,
}

/// The BAT is read in pieces of this size.
const LOAD_PIECE: u64 = 1 << 20;

/// A file extent that holds a structure (header section, log, region): BAT targets must not
/// overlap any of them.
#[derive(Clone, Debug)]
pub struct Occupied {
    pub offset: u64,
    pub length: u64,
    pub what: String,
}

impl Bat {
    pub fn from_entries(geometry: Geometry, raw: &[u64]) -> Bat {
        Bat {
            geometry,
            entries: raw.iter().map(|&e| AtomicU64::new(e)).collect(),
        }
    }

    /// Reads the BAT region and validates every entry (§2.5, §3.5–3.6 of the notes).
    pub fn load(
        storage: &dyn Storage,
        geometry: Geometry,
        region_offset: u64,
        region_length: u64,
        file_size: u64,
        occupied: &[Occupied],
    ) -> Result<Bat> {
        let count = geometry.total_entries();
        let needed = count * 8;
        if needed > region_length {
            return Err(Corruption::BatTooSmall {
                region_length,
                entries: count,
            }
            .into());
        }
        // `needed` ≤ the region length, which the region table checked against the file size,
        // so the table is bounded by the file itself; it is read straight into place a piece
        // at a time, so that nothing else as large as the BAT is ever held.
        let mut entries: Vec<AtomicU64> = Vec::with_capacity(count as usize);
        let mut piece = vec![0u8; needed.min(LOAD_PIECE) as usize];
        let mut at = 0u64;
        while at < needed {
            let n = (needed - at).min(LOAD_PIECE) as usize;
            storage
                .read_at(&mut piece[..n], region_offset + at)
                .map_err(|e| Error::io("reading the BAT", e))?;
            entries.extend(
                piece[..n]
                    .chunks_exact(8)
                    .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().expect("8 bytes")))),
            );
            at += n as u64;
        }
        let bat = Bat {
            geometry,
            entries: entries.into_boxed_slice(),
        };
        validate(&bat, file_size, occupied)?;
        Ok(bat)
    }

    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entry(&self, index: u64) -> BatEntry {
        BatEntry(self.entries[index as usize].load(Ordering::Acquire))
    }

    pub fn set_entry(&self, index: u64, entry: BatEntry) {
        self.entries[index as usize].store(entry.0, Ordering::Release);
    }

    /// The payload entry for a block, with its state.
    pub fn payload(&self, block: u64) -> (PayloadBlockState, BatEntry) {
        let e = self.entry(self.geometry.payload_index(block));
        let state = PayloadBlockState::from_bits(e.state_bits()).expect("validated at load");
        (state, e)
    }

    pub fn bitmap(&self, chunk: u64) -> BatEntry {
        self.entry(self.geometry.bitmap_index(chunk))
    }

    /// Payload blocks that have no space in the file (a fixed file keeps room for them).
    pub fn unallocated_blocks(&self) -> u64 {
        (0..self.geometry.payload_blocks())
            .filter(|&b| !self.payload(b).0.has_data())
            .count() as u64
    }

    /// Counts of payload blocks per state, for `info` and `check`.
    pub fn state_counts(&self) -> Vec<(PayloadBlockState, u64)> {
        let mut counts = std::collections::BTreeMap::new();
        for b in 0..self.geometry.payload_blocks() {
            *counts.entry(self.payload(b).0).or_insert(0u64) += 1;
        }
        counts.into_iter().collect()
    }
}

fn validate(bat: &Bat, file_size: u64, occupied: &[Occupied]) -> Result<()> {
    let geometry = &bat.geometry;
    let block_size = u64::from(geometry.block_size);
    // (offset, index) of every extent the BAT points at; its length follows from the index.
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let extent_length = |index: u64| match geometry.block_of_index(index) {
        Some(_) => block_size,
        None => SECTOR_BITMAP_BLOCK_SIZE,
    };
    for index in 0..bat.len() {
        let entry = bat.entry(index);
        let value = entry.0;
        let bits = entry.state_bits();
        let bad_state = |context| Corruption::BadBlockState {
            index,
            entry: value,
            state: bits,
            context,
        };
        let length = match geometry.block_of_index(index) {
            Some(block) => {
                if block >= geometry.payload_blocks() {
                    // Padding past the last block in a differencing BAT: must be unused.
                    if bits != 0 {
                        return Err(bad_state("an entry past the last payload block").into());
                    }
                    continue;
                }
                let state = PayloadBlockState::from_bits(bits)
                    .ok_or_else(|| bad_state("a payload block"))?;
                if state == PayloadBlockState::PartiallyPresent {
                    if !geometry.has_parent {
                        return Err(bad_state("a payload block of a non-differencing file").into());
                    }
                    let chunk = block / geometry.chunk_ratio();
                    let sb = bat.entry(geometry.bitmap_index(chunk));
                    if sb.state_bits() != SB_BLOCK_PRESENT {
                        return Err(Corruption::MissingSectorBitmap { index, chunk }.into());
                    }
                }
                if !state.has_data() {
                    continue;
                }
                block_size
            }
            None => match bits {
                SB_BLOCK_NOT_PRESENT => continue,
                SB_BLOCK_PRESENT if geometry.has_parent => SECTOR_BITMAP_BLOCK_SIZE,
                _ if geometry.has_parent => return Err(bad_state("a sector bitmap entry").into()),
                _ => {
                    return Err(
                        bad_state("a sector bitmap entry of a non-differencing file").into(),
                    )
                }
            },
        };
        let offset = entry.file_offset();
        let bad_offset = |reason: String| Corruption::BadBlockOffset {
            index,
            entry: value,
            offset,
            reason,
        };
        if offset < HEADER_SECTION_SIZE {
            return Err(bad_offset("lies in the header section".into()).into());
        }
        // A final payload block may stop short of the end of the file (old qemu fixed images);
        // the missing bytes read as zeros. A block that starts at or past the end is corrupt.
        if offset >= file_size {
            return Err(bad_offset(format!(
                "starts beyond the end of the file ({file_size:#x})"
            ))
            .into());
        }
        for o in occupied {
            if ranges_overlap(offset, length, o.offset, o.length) {
                return Err(bad_offset(format!("overlaps {}", o.what)).into());
            }
        }
        extents.push((offset, index));
    }
    extents.sort_unstable();
    for pair in extents.windows(2) {
        let (a_off, a_idx) = pair[0];
        let (b_off, b_idx) = pair[1];
        if a_off + extent_length(a_idx) > b_off {
            if a_off == b_off {
                return Err(Corruption::DuplicateBlockOffset {
                    first: a_idx.min(b_idx),
                    second: a_idx.max(b_idx),
                    offset: a_off,
                }
                .into());
            }
            return Err(Corruption::Overlap {
                a: format!("the block of BAT entry {a_idx} at {a_off:#x}"),
                b: format!("the block of BAT entry {b_idx} at {b_off:#x}"),
            }
            .into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(size: u64, block: u64, lss: u32, diff: bool) -> Geometry {
        Geometry {
            block_size: block as u32,
            logical_sector_size: lss,
            virtual_disk_size: size,
            has_parent: diff,
        }
    }

    #[test]
    fn entry_counts_match_the_worked_examples() {
        // (size, block, lss, CR, payload, SB, entries fixed/dyn, entries diff) from the notes §3.4.
        let cases = [
            (128 * MIB, 8 * MIB, 512, 512, 16, 1, 16, 513),
            (4 * GIB, MIB, 512, 4096, 4096, 1, 4096, 4097),
            (10 * GIB, MIB, 512, 4096, 10240, 3, 10242, 12291),
            (127 * GIB, 32 * MIB, 512, 128, 4064, 32, 4095, 4128),
            (4 * TIB, 32 * MIB, 4096, 1024, 131072, 128, 131199, 131200),
            (64 * TIB, 256 * MIB, 512, 16, 262144, 16384, 278527, 278528),
        ];
        for (size, block, lss, cr, pb, sb, dynamic, diff) in cases {
            let g = geo(size, block, lss, false);
            assert_eq!(g.chunk_ratio(), cr, "{size}");
            assert_eq!(g.payload_blocks(), pb);
            assert_eq!(g.sector_bitmap_blocks(), sb);
            assert_eq!(g.total_entries(), dynamic);
            assert_eq!(geo(size, block, lss, true).total_entries(), diff);
        }
    }

    #[test]
    fn interleaving() {
        let g = geo(10 * GIB, 32 * MIB, 512, true);
        assert_eq!(g.chunk_ratio(), 128);
        assert_eq!(g.payload_index(127), 127);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(0), 128);
        assert_eq!(g.block_of_index(128), None);
        assert_eq!(g.block_of_index(129), Some(128));
        for b in 0..g.payload_blocks() {
            assert_eq!(g.block_of_index(g.payload_index(b)), Some(b));
        }
    }

    #[test]
    fn partially_present_needs_a_parent_and_a_bitmap() {
        let g = geo(64 * MIB, 32 * MIB, 512, false);
        let raw = [BatEntry::new(7, 4 * MIB).0, 0];
        let err = validate(&Bat::from_entries(g, &raw), 100 * MIB, &[]).unwrap_err();
        assert!(matches!(
            err.corruption(),
            Some(Corruption::BadBlockState { state: 7, .. })
        ));
        let g = geo(64 * MIB, 32 * MIB, 512, true);
        let mut raw = vec![0u64; g.total_entries() as usize];
        raw[0] = BatEntry::new(7, 4 * MIB).0;
        let err = validate(&Bat::from_entries(g, &raw), 100 * MIB, &[]).unwrap_err();
        assert!(matches!(
            err.corruption(),
            Some(Corruption::MissingSectorBitmap { .. })
        ));
        raw[g.bitmap_index(0) as usize] = BatEntry::new(6, 40 * MIB).0;
        validate(&Bat::from_entries(g, &raw), 100 * MIB, &[]).unwrap();
    }

    #[test]
    fn overlapping_and_duplicate_blocks_are_refused() {
        let g = geo(128 * MIB, 32 * MIB, 512, false);
        let raw = [
            BatEntry::new(6, 4 * MIB).0,
            BatEntry::new(6, 4 * MIB).0,
            0,
            0,
        ];
        assert!(matches!(
            validate(&Bat::from_entries(g, &raw), GIB, &[])
                .unwrap_err()
                .corruption(),
            Some(Corruption::DuplicateBlockOffset { .. })
        ));
        let raw = [
            BatEntry::new(6, 4 * MIB).0,
            BatEntry::new(6, 5 * MIB).0,
            0,
            0,
        ];
        assert!(matches!(
            validate(&Bat::from_entries(g, &raw), GIB, &[])
                .unwrap_err()
                .corruption(),
            Some(Corruption::Overlap { .. })
        ));
    }
}
