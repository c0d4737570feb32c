//! Changing a VHDX's virtual size offline (Hyper-V's Resize-VHD), crash-safe at every instant.
//!
//! One atomic log entry ([`Txn`]) switches the file from the old size to the new: the
//! VirtualDiskSize metadata item, the BAT entries that change and, when the BAT moves, both
//! region tables. Everything that entry refers to is written first, directly, into space
//! nothing references yet (a relocated BAT, a fixed disk's new blocks) or space no reader can
//! see (the tail of the old last block past the old end), so that a crash before the entry
//! leaves the old disk and a crash after it the new one.
//!
//! - Grow: new blocks read zeros. Dynamic: NOT_PRESENT. Differencing: ZERO, because NOT_PRESENT
//!   would read the (smaller) parent. Fixed: allocated at the end of the file and zeroed. If the
//!   old size was not a whole number of blocks, the old last block's bytes past the old end are
//!   zeroed first: they were invisible and may hold anything (an earlier shrink's data).
//! - Shrink (asked for explicitly): the entries past the new end are cleared, and refused while
//!   data that is not zeros lies there, unless forced. The file is cut back afterwards.
//! - The BAT region moves to the end of the file when the new table does not fit it, or when
//!   more of its pages change than one log entry holds: the new table is written there whole and
//!   only the region tables go through the log.
//! - A file other images use as their parent is refused: its DataWriteGuid changes, so they
//!   would no longer open.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::bat::Geometry;
use super::chain::Chain;
use super::error::{Error, Result};
use super::file::{Source, VhdxFile};
use super::format::*;
use super::region::RegionTable;
use super::space::FreeSpace;
use super::storage::Storage;
use super::txn::Txn;

#[derive(Clone, Copy, Debug, Default)]
pub struct ResizeOptions {
    /// Allow a smaller size (qemu-img's `--shrink`).
    pub shrink: bool,
    /// Shrink even though data lies past the new end (it is lost).
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResizeReport {
    pub old_size: u64,
    pub new_size: u64,
    /// The BAT region moved to a new place in the file.
    pub bat_relocated: bool,
    /// Blocks of a fixed disk allocated for the new area.
    pub blocks_allocated: u64,
}

/// Progress: (done, total) in arbitrary units.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Resizes the leaf of `chain` (opened writable) to `new_size`. The chain is consumed: its
/// in-memory state describes the old file.
pub fn resize(
    chain: Chain,
    new_size: u64,
    options: &ResizeOptions,
    progress: Progress,
) -> Result<ResizeReport> {
    let leaf = chain.leaf();
    if !leaf.is_writable() {
        return Err(Error::ReadOnly);
    }
    let old_size = leaf.virtual_size();
    let lss = u64::from(leaf.logical_sector_size());
    if new_size == 0 || new_size % lss != 0 {
        return Err(Error::InvalidArgument(format!(
            "size {new_size} is not a positive multiple of the {lss}-byte sector"
        )));
    }
    if new_size > MAX_VIRTUAL_DISK_SIZE {
        return Err(Error::InvalidArgument(format!(
            "size {new_size} is above the VHDX limit of 64 TiB"
        )));
    }
    let mut report = ResizeReport {
        old_size,
        new_size,
        bat_relocated: false,
        blocks_allocated: 0,
    };
    if new_size == old_size {
        return Ok(report);
    }
    let shrinking = new_size < old_size;
    if shrinking && !options.shrink {
        return Err(Error::InvalidArgument(format!(
            "{new_size} is smaller than the current size {old_size}; shrinking loses data past \
             the new end: use --shrink"
        )));
    }
    if let Some(parent) = chain.layers().get(1) {
        if new_size < parent.virtual_size() {
            return Err(Error::InvalidArgument(format!(
                "a differencing disk cannot be smaller than its parent ({} bytes)",
                parent.virtual_size()
            )));
        }
    }
    if let Some(child) = find_child(leaf)? {
        return Err(Error::InvalidArgument(format!(
            "{} is the parent of {}: resizing it would break that child",
            leaf.path().display(),
            child.display()
        )));
    }
    if shrinking && !options.force {
        if let Some(at) = first_data_past(leaf, new_size)? {
            return Err(Error::InvalidArgument(format!(
                "data lies past the new end (at virtual offset {at:#x}); use --force to discard it"
            )));
        }
    }

    let storage = Arc::clone(leaf.storage());
    let old = leaf.geometry();
    let new = Geometry {
        virtual_disk_size: new_size,
        ..old
    };
    let bs = u64::from(old.block_size);
    let fixed = leaf.metadata.leave_block_allocated && !old.has_parent;
    let io = |what: &'static str| move |e| Error::io(what, e);

    // Where free space at the end of the file starts: past every structure, and past the
    // physical end (a crash of an earlier session may have left bytes there).
    let used = leaf.used_extents();
    let used_end = used.iter().map(|&(o, l)| o + l).max().unwrap_or(0);
    let file_len = storage.len().map_err(io("reading the file size"))?;
    let mut end = align_up(used_end.max(file_len), MIB).unwrap_or(used_end);

    // Until the switch, a failure (say, no space for a fixed disk's blocks) gives back what
    // was appended, so that bad luck leaves the file as it was.
    let mut restore = RestoreLength {
        storage: Arc::clone(&storage),
        len: Some(file_len),
    };

    // Old last block's tail: invisible now, visible after a grow.
    if !shrinking && old_size % bs != 0 {
        let (state, entry) = leaf.bat.payload(old_size / bs);
        if state.has_data() {
            let at = old_size % bs;
            storage
                .write_zeroes(entry.file_offset() + at, bs - at)
                .map_err(io("zeroing the tail of the last block"))?;
        }
    }

    // The new table. Indices do not move: the chunk ratio depends only on the block and
    // sector sizes.
    let old_len = leaf.bat.len();
    let new_len = new.total_entries();
    let mut entries = vec![0u64; new_len as usize];
    let mut new_blocks = Vec::new();
    for (index, slot) in entries.iter_mut().enumerate() {
        let index = index as u64;
        *slot = match new.block_of_index(index) {
            Some(b) if b >= new.payload_blocks() => 0,
            Some(b) if b < old.payload_blocks() => leaf.bat.entry(index).0,
            Some(_) if old.has_parent => BatEntry::new(PayloadBlockState::Zero.bits(), 0).0,
            Some(_) if fixed => {
                new_blocks.push(index);
                0
            }
            Some(_) => 0,
            None if index < old_len
                && index / (old.chunk_ratio() + 1) < new.sector_bitmap_blocks() =>
            {
                leaf.bat.entry(index).0
            }
            None => 0,
        };
    }

    // A fixed disk's new blocks: allocated at the end of the file and zeroed (kept allocated),
    // before the entries that point at them exist anywhere but here.
    if !new_blocks.is_empty() {
        let total = new_blocks.len() as u64;
        storage
            .set_len(end + total * bs)
            .map_err(io("growing the file"))?;
        for (i, &index) in new_blocks.iter().enumerate() {
            storage
                .write_zeroes(end, bs)
                .map_err(io("zeroing a new block"))?;
            entries[index as usize] = BatEntry::new(PayloadBlockState::FullyPresent.bits(), end).0;
            end += bs;
            progress(i as u64 + 1, total);
        }
        report.blocks_allocated = total;
    }

    // Which BAT pages change, against what the file holds (past the old table the region may
    // hold anything, e.g. what an earlier shrink left).
    let bat_region = leaf.regions.bat();
    let span = new_len.max(old_len) * 8;
    let fits = new_len * 8 <= bat_region.length;
    // Page numbers (4 KiB pages from the region's start) whose entries change.
    let mut changed: Vec<u64> = Vec::new();
    if fits {
        let piece = MIB;
        let mut buf = vec![0u8; piece as usize];
        let mut start = 0;
        while start < span && changed.len() <= Txn::MAX_PAGES - 4 {
            let n = (span - start).min(piece) as usize;
            storage
                .read_at(&mut buf[..n], bat_region.file_offset + start)
                .map_err(io("reading the BAT"))?;
            for (p, page) in buf[..n].chunks(LOG_SECTOR_SIZE).enumerate() {
                let first = (start as usize + p * LOG_SECTOR_SIZE) / 8;
                let differs = page.chunks_exact(8).enumerate().any(|(i, c)| {
                    let want = entries.get(first + i).copied().unwrap_or(0);
                    u64::from_le_bytes(c.try_into().expect("8 bytes")) != want
                });
                if differs {
                    changed.push((start / LOG_SECTOR_SIZE as u64) + p as u64);
                }
            }
            start += n as u64;
        }
    }
    let relocate = !fits || changed.len() > Txn::MAX_PAGES - 4;

    let mut regions = leaf.regions.clone();
    if relocate {
        // The new table (with room for a parent's layout, so that later grows fit) goes to the
        // end of the file, written whole before anything points at it.
        let length = align_up(new_len.max(new.max_entries()) * 8, MIB).expect("≤ 512 MiB");
        let offset = end;
        end += length;
        storage.set_len(end).map_err(io("growing the file"))?;
        write_table(&*storage, offset, &entries)?;
        let r = regions
            .regions
            .iter_mut()
            .find(|r| r.guid == BAT_REGION_GUID)
            .expect("validated at open");
        r.file_offset = offset;
        r.length = length;
        report.bat_relocated = true;
    }

    // The switch: one log entry.
    restore.len = None;
    let txn = Txn::begin(Arc::clone(&storage), &leaf.current_headers(), true)?;
    let md = leaf
        .metadata
        .items
        .iter()
        .find(|i| i.item_id == VIRTUAL_DISK_SIZE_GUID && !i.is_user);
    let md = md.expect("validated at open");
    txn.write(
        leaf.regions.metadata().file_offset + u64::from(md.offset),
        &new_size.to_le_bytes(),
    )?;
    if relocate {
        write_region_tables(&txn, &regions)?;
    } else {
        let per_page = (LOG_SECTOR_SIZE / 8) as u64;
        for &page in &changed {
            let first = page * per_page;
            let last = (first + per_page).min(span / 8);
            let bytes: Vec<u8> = (first..last)
                .flat_map(|i| entries.get(i as usize).copied().unwrap_or(0).to_le_bytes())
                .collect();
            txn.write(bat_region.file_offset + first * 8, &bytes)?;
        }
    }
    txn.finish()?;

    // Give back what the smaller disk no longer uses at the end of the file (the log is empty,
    // so no replay can need those bytes).
    let mut used: Vec<(u64, u64)> = vec![(0, HEADER_SECTION_SIZE)];
    let h = leaf.current_headers().current;
    used.push((h.log_offset, u64::from(h.log_length)));
    used.extend(regions.regions.iter().map(|r| (r.file_offset, r.length)));
    let mut unallocated = 0;
    for (index, &e) in entries.iter().enumerate() {
        let e = BatEntry(e);
        match new.block_of_index(index as u64) {
            Some(b) if b < new.payload_blocks() => {
                match PayloadBlockState::from_bits(e.state_bits()) {
                    Some(s) if s.has_data() => used.push((e.file_offset(), bs)),
                    _ => unallocated += 1,
                }
            }
            None if e.state_bits() == SB_BLOCK_PRESENT => {
                used.push((e.file_offset(), SECTOR_BITMAP_BLOCK_SIZE))
            }
            _ => {}
        }
    }
    let space = FreeSpace::new(&used, end);
    let mut keep = align_up(space.trimmed_end(), MIB).unwrap_or(end);
    if fixed {
        keep = keep.max(space.fixed_min_len(unallocated, bs));
    }
    let len = storage.len().map_err(io("reading the file size"))?;
    if len > keep {
        storage
            .set_len(keep)
            .and_then(|_| storage.flush())
            .map_err(io("trimming the file"))?;
    }
    drop(chain);
    progress(1, 1);
    Ok(report)
}

/// Cuts the file back to `len` when dropped, unless `len` was taken away.
struct RestoreLength {
    storage: Arc<dyn Storage>,
    len: Option<u64>,
}

impl Drop for RestoreLength {
    fn drop(&mut self) {
        if let Some(len) = self.len {
            if self.storage.len().is_ok_and(|now| now > len) {
                let _ = self.storage.set_len(len);
            }
        }
    }
}

/// Writes a BAT straight into space nothing references yet, zero-padded to whole pages.
fn write_table(storage: &dyn Storage, offset: u64, entries: &[u64]) -> Result<()> {
    for (i, piece) in entries.chunks(128 * 1024).enumerate() {
        let bytes: Vec<u8> = piece.iter().flat_map(|e| e.to_le_bytes()).collect();
        storage
            .write_at(&bytes, offset + (i * 128 * 1024 * 8) as u64)
            .map_err(|e| Error::io("writing the new BAT", e))?;
    }
    Ok(())
}

/// Stages both copies of the region table.
pub(crate) fn write_region_tables(txn: &Txn, regions: &RegionTable) -> Result<()> {
    let bytes = regions.to_bytes();
    for offset in REGION_TABLE_OFFSETS {
        txn.write(offset, &bytes)?;
    }
    Ok(())
}

/// The first virtual offset at or past `from` whose bytes are in this file and not zeros.
fn first_data_past(file: &VhdxFile, from: u64) -> Result<Option<u64>> {
    let mut runs = Vec::new();
    file.map(from, file.virtual_size() - from, &mut |s, l| {
        runs.push((s, l))
    })?;
    let mut pos = from;
    let mut buf = vec![0u8; MIB as usize];
    for (source, len) in runs {
        if let Source::Data(offset) = source {
            let mut at = 0;
            while at < len {
                let n = (len - at).min(MIB) as usize;
                file.storage()
                    .read_at(&mut buf[..n], offset + at)
                    .map_err(|e| Error::io("reading data past the new end", e))?;
                if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                    return Ok(Some(pos + at + i as u64));
                }
                at += n as u64;
            }
        }
        pos += len;
    }
    Ok(None)
}

/// A VHDX next to `file` whose locator names `file`'s DataWriteGuid: resizing `file` would
/// break it. Only the file's directory is searched (where `create -b` puts children, and where
/// a relative locator finds them); files that do not open are ignored.
fn find_child(file: &VhdxFile) -> Result<Option<PathBuf>> {
    let dir = file.path().parent().unwrap_or(Path::new("."));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(listing) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let me = std::fs::canonicalize(file.path()).ok();
    let guid = file.data_write_guid();
    for entry in listing.flatten() {
        let path = entry.path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if !matches!(ext.as_deref(), Some("vhdx" | "avhdx")) {
            continue;
        }
        if me.is_some() && std::fs::canonicalize(&path).ok() == me {
            continue;
        }
        let Ok(other) = VhdxFile::open_shared(&path, false) else {
            continue;
        };
        if let Some(locator) = &other.metadata.parent_locator {
            if locator.linkages().contains(&guid) {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}
