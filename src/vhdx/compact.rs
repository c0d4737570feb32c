//! Giving back space offline (Hyper-V's Optimize-VHD, "pretrimmed/prezeroed" modes): the
//! virtual disk reads the same before, during and after.
//!
//! 1. Reclaim: an allocated block whose contents are all zeros becomes NOT_PRESENT. In a
//!    differencing file only where the parent reads zeros there too, since NOT_PRESENT reads
//!    the parent (a block of zeros over parent data stays, as the engine's trim leaves it). A
//!    PARTIALLY_PRESENT block that goes also has its bitmap bits cleared, and a sector bitmap
//!    block no PARTIALLY_PRESENT block uses any more is freed.
//! 2. Pack: from the end of the file, each block (payload or bitmap) is copied into the lowest
//!    hole it fits, then its BAT entry is switched through the log. A hole is only used when
//!    the state that frees it is durable: holes are computed from the BAT after each commit,
//!    and a block's old place joins them only after the commit that moved it.
//! 3. The file is cut after its last structure, once the log is empty (no replay needs the
//!    bytes).
//!
//! Every BAT change goes through the log in batches that fit one entry ([`Txn`]); data is
//! copied before the entry that points at it. The DataWriteGuid is kept: the contents do not
//! change, so children of the file stay linked to it.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::chain::Chain;
use super::error::{Error, Result};
use super::format::*;
use super::resize::Progress;
use super::txn::Txn;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Payload blocks that became unallocated.
    pub blocks_reclaimed: u64,
    /// Sector bitmap blocks freed.
    pub bitmaps_freed: u64,
    /// Blocks (payload or bitmap) moved down the file.
    pub blocks_moved: u64,
    pub old_len: u64,
    pub new_len: u64,
}

/// Room left in a batch for one more change: a BAT page and a block's bitmap bits (up to 16
/// pages for 256 MiB blocks of 512-byte sectors).
const BATCH_LIMIT: usize = Txn::MAX_PAGES - 20;

/// Compacts the leaf of `chain` (opened writable). The chain is consumed: its in-memory state
/// describes the file as it was.
pub fn compact(chain: Chain, progress: Progress) -> Result<CompactReport> {
    let leaf = chain.leaf();
    if !leaf.is_writable() {
        return Err(Error::ReadOnly);
    }
    let g = leaf.geometry();
    if leaf.metadata.leave_block_allocated && !g.has_parent {
        return Err(Error::InvalidArgument(
            "a fixed disk keeps every block allocated: there is nothing to compact".into(),
        ));
    }
    let storage = Arc::clone(leaf.storage());
    let io = |what: &'static str| move |e| Error::io(what, e);
    let bs = u64::from(g.block_size);
    let size = leaf.virtual_size();
    let bat_offset = leaf.regions.bat().file_offset;
    let mut report = CompactReport {
        old_len: storage.len().map_err(io("reading the file size"))?,
        ..Default::default()
    };
    let mut entries: Vec<u64> = (0..leaf.bat.len()).map(|i| leaf.bat.entry(i).0).collect();
    let h = leaf.current_headers().current;
    let mut structures = vec![
        (0, HEADER_SECTION_SIZE),
        (h.log_offset, u64::from(h.log_length)),
    ];
    structures.extend(
        leaf.regions
            .regions
            .iter()
            .map(|r| (r.file_offset, r.length)),
    );

    let txn = Txn::begin(Arc::clone(&storage), &leaf.current_headers(), false)?;
    let set = |entries: &mut Vec<u64>, index: u64, e: BatEntry| -> Result<()> {
        entries[index as usize] = e.0;
        txn.write(bat_offset + index * 8, &e.0.to_le_bytes())
    };
    let total = g.payload_blocks() * 2;
    let mut done = 0;

    // 1. Reclaim.
    let mut buf = vec![0u8; bs as usize];
    for block in 0..g.payload_blocks() {
        done += 1;
        progress(done, total);
        let index = g.payload_index(block);
        let entry = BatEntry(entries[index as usize]);
        let state = PayloadBlockState::from_bits(entry.state_bits());
        if !state.is_some_and(|s| s.has_data()) {
            continue;
        }
        let n = bs.min(size - block * bs) as usize;
        chain.read_at(&mut buf[..n], block * bs)?;
        if !is_zero(&buf[..n]) {
            continue;
        }
        if g.has_parent {
            chain.read_from_layer(1, block * bs, &mut &mut buf[..n])?;
            if !is_zero(&buf[..n]) {
                continue;
            }
        }
        set(&mut entries, index, BatEntry(0))?;
        if state == Some(PayloadBlockState::PartiallyPresent) {
            // Bits must not outlive the block (a later partial write would expose them).
            let sb = BatEntry(entries[g.bitmap_index(block / g.chunk_ratio()) as usize]);
            let first_bit = (block % g.chunk_ratio()) * g.sectors_per_block();
            let bytes = vec![0u8; (g.sectors_per_block() / 8) as usize];
            txn.write(sb.file_offset() + first_bit / 8, &bytes)?;
        }
        report.blocks_reclaimed += 1;
        if txn.staged() >= BATCH_LIMIT {
            txn.commit()?;
        }
    }
    if g.has_parent {
        for chunk in 0..g.sector_bitmap_blocks() {
            let index = g.bitmap_index(chunk);
            if BatEntry(entries[index as usize]).state_bits() != SB_BLOCK_PRESENT {
                continue;
            }
            let first = chunk * g.chunk_ratio();
            let last = (first + g.chunk_ratio()).min(g.payload_blocks());
            let used = (first..last).any(|b| {
                BatEntry(entries[g.payload_index(b) as usize]).state_bits()
                    == PayloadBlockState::PartiallyPresent.bits()
            });
            if !used {
                set(&mut entries, index, BatEntry(0))?;
                report.bitmaps_freed += 1;
                if txn.staged() >= BATCH_LIMIT {
                    txn.commit()?;
                }
            }
        }
    }
    txn.commit()?;

    // 2. Pack, in rounds: each round's holes are what the durable state leaves free.
    loop {
        let mut holes = holes(&structures, &entries, &g);
        let mut movable = extents(&entries, &g);
        movable.sort_unstable_by_key(|m| std::cmp::Reverse(m.0));
        let mut moved = 0;
        for (offset, len, index) in movable {
            let Some((&hole, &hole_len)) =
                holes.iter().find(|(&o, &l)| l >= len && o + len <= offset)
            else {
                continue;
            };
            copy(&*storage, offset, hole, len, &mut buf)?;
            holes.remove(&hole);
            if hole_len > len {
                holes.insert(hole + len, hole_len - len);
            }
            let old = BatEntry(entries[index as usize]);
            set(&mut entries, index, BatEntry::new(old.state_bits(), hole))?;
            moved += 1;
            report.blocks_moved += 1;
            done = (done + 1).min(total);
            progress(done, total);
            if txn.staged() >= BATCH_LIMIT {
                break;
            }
        }
        txn.commit()?;
        if moved == 0 {
            break;
        }
    }
    txn.finish()?;

    // 3. Cut the file after its last structure.
    let end = extents(&entries, &g)
        .iter()
        .map(|&(o, l, _)| o + l)
        .chain(structures.iter().map(|&(o, l)| o + l))
        .max()
        .unwrap_or(HEADER_SECTION_SIZE);
    let end = align_up(end, MIB).unwrap_or(end);
    if report.old_len > end {
        storage
            .set_len(end)
            .and_then(|_| storage.flush())
            .map_err(io("trimming the file"))?;
    }
    report.new_len = storage.len().map_err(io("reading the file size"))?;
    progress(total, total);
    drop(chain);
    Ok(report)
}

fn is_zero(buf: &[u8]) -> bool {
    let words = buf.chunks_exact(16);
    words.remainder().iter().all(|&b| b == 0)
        && words
            .into_iter()
            .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
}

/// Every allocated payload or bitmap block: (file offset, length, BAT index).
fn extents(entries: &[u64], g: &super::bat::Geometry) -> Vec<(u64, u64, u64)> {
    let bs = u64::from(g.block_size);
    let mut out = Vec::new();
    for (index, &e) in entries.iter().enumerate() {
        let e = BatEntry(e);
        let index = index as u64;
        let len = match g.block_of_index(index) {
            Some(b) if b < g.payload_blocks() => {
                match PayloadBlockState::from_bits(e.state_bits()) {
                    Some(s) if s.has_data() => bs,
                    _ => continue,
                }
            }
            None if e.state_bits() == SB_BLOCK_PRESENT => SECTOR_BITMAP_BLOCK_SIZE,
            _ => continue,
        };
        out.push((e.file_offset(), len, index));
    }
    out
}

/// The gaps between structures and blocks: offset → length.
fn holes(
    structures: &[(u64, u64)],
    entries: &[u64],
    g: &super::bat::Geometry,
) -> BTreeMap<u64, u64> {
    let mut used: Vec<(u64, u64)> = structures.to_vec();
    used.extend(extents(entries, g).iter().map(|&(o, l, _)| (o, l)));
    used.sort_unstable();
    let mut holes = BTreeMap::new();
    let mut pos = 0;
    for (o, l) in used {
        if o > pos {
            holes.insert(pos, o - pos);
        }
        pos = pos.max(o + l);
    }
    holes
}

/// Copies `len` bytes from `from` to `to` (non-overlapping); runs of zeros become holes.
fn copy(
    storage: &dyn super::storage::Storage,
    from: u64,
    to: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<()> {
    let piece = buf.len().min(4 * MIB as usize) as u64;
    let mut at = 0;
    while at < len {
        let n = (len - at).min(piece) as usize;
        storage
            .read_at(&mut buf[..n], from + at)
            .map_err(|e| Error::io("reading a block to move", e))?;
        if is_zero(&buf[..n]) {
            storage.punch_hole(to + at, n as u64)
        } else {
            storage.write_at(&buf[..n], to + at)
        }
        .map_err(|e| Error::io("writing a moved block", e))?;
        at += n as u64;
    }
    Ok(())
}
