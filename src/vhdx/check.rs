//! Consistency check of a VHDX file and its chain, with the repairs that are safe to make.
//!
//! Opening a file already validates every structure (a damaged one is refused with a precise
//! error); the check adds what an open tolerates: a log that still needs replaying, reserved
//! bits, blocks cut short by the end of the file, unreachable parents, and space that no
//! structure uses (leaks).

use std::path::{Path, PathBuf};

use super::bat::Bat;
use super::chain::{Chain, ChainOptions};
use super::error::Error;
use super::file::{DataWriteGuid, LogState, VhdxFile};
use super::format::*;
use super::locator;
use super::space::FreeSpace;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Repair {
    #[default]
    None,
    /// Give back leaked space at the end of the file.
    Leaks,
    /// Also replay a pending log.
    All,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub filename: PathBuf,
    /// Problems that make data wrong or unreadable.
    pub corruptions: Vec<String>,
    /// Space past the last structure `(offset, length)`, which `-r leaks` gives back.
    pub leaks: Vec<(u64, u64)>,
    /// Space between structures that nothing uses (reused by new blocks; not a leak).
    pub unused_bytes: u64,
    pub corruptions_fixed: usize,
    pub leaks_fixed: usize,
    /// Things worth knowing that are not errors.
    pub notes: Vec<String>,
    /// End of the last structure in the file.
    pub image_end_offset: u64,
    pub total_blocks: u64,
    pub allocated_blocks: u64,
    /// The file could not be checked at all (I/O error, unsupported feature).
    pub check_errors: usize,
}

impl CheckReport {
    pub fn leaked_bytes(&self) -> u64 {
        self.leaks.iter().map(|(_, l)| l).sum()
    }
}

/// Checks the file at `path` (and its parents), repairing what `repair` allows.
pub fn check(path: &Path, repair: Repair, parent_overrides: &[PathBuf]) -> CheckReport {
    let mut report = CheckReport {
        filename: path.to_path_buf(),
        ..Default::default()
    };
    let writable = repair != Repair::None;
    // A read-only open replays a dirty log in memory; note that, and apply it only for -r all.
    let pending_log = match VhdxFile::open(path, false) {
        Ok(f) => matches!(f.log_state, LogState::ReplayedInMemory { .. }),
        Err(e) => {
            record_open_error(&mut report, e);
            return report;
        }
    };
    if pending_log && repair != Repair::All {
        report
            .corruptions
            .push("the log holds changes that were never applied (repair with -r all)".into());
    }
    let open_writable = writable && (!pending_log || repair == Repair::All);
    // A repair keeps DataWriteGuid: replaying restores what the last session wrote under the
    // GUID it already set, and a parent in the middle of a commit must keep the one its child
    // accepts (parent_linkage2).
    let opened = if open_writable {
        VhdxFile::open_with_guid(path, DataWriteGuid::Keep)
    } else {
        VhdxFile::open(path, false)
    };
    let file = match opened {
        Ok(f) => f,
        Err(e) => {
            record_open_error(&mut report, e);
            return report;
        }
    };
    if let LogState::Replayed { entries } = file.log_state {
        report.corruptions_fixed += 1;
        report.notes.push(format!("replayed {entries} log entries"));
    }
    let file_report = check_file(&file);
    report.corruptions.extend(file_report.corruptions);
    report.leaks = file_report.leaks;
    report.notes.extend(file_report.notes);
    report.unused_bytes = file_report.unused_bytes;
    report.image_end_offset = file_report.image_end_offset;
    report.total_blocks = file_report.total_blocks;
    report.allocated_blocks = file_report.allocated_blocks;
    if open_writable && !report.leaks.is_empty() {
        truncate_trailing_leak(&file, &mut report);
    }
    if file.is_differencing() {
        let options = ChainOptions {
            parent_overrides: parent_overrides.to_vec(),
            ..Default::default()
        };
        // The parents are opened beside the leaf we already hold: opening the leaf again
        // would conflict with its own write lock during a repair.
        match Chain::with_parents(file, &options) {
            Ok(chain) => {
                note_linkage2(&chain, &mut report);
                for layer in &chain.layers()[1..] {
                    if matches!(layer.log_state, LogState::ReplayedInMemory { .. }) {
                        report.notes.push(format!(
                            "parent {} has a log that was never applied",
                            layer.path().display()
                        ));
                    }
                }
            }
            Err(e) => report.corruptions.push(format!("parent chain: {e}")),
        }
    }
    report
}

/// A child whose locator holds parent_linkage2 is in the middle of a commit into its parent
/// (or one was interrupted): say which of the two identities the parent has.
fn note_linkage2(chain: &Chain, report: &mut CheckReport) {
    for pair in chain.layers().windows(2) {
        let Some(l) = pair[0].metadata.parent_locator.as_ref() else {
            continue;
        };
        let Some(l2) = l
            .get(locator::KEY_PARENT_LINKAGE2)
            .and_then(locator::parse_guid_string)
        else {
            continue;
        };
        let state = if pair[1].data_write_guid() == l2 {
            "has been changed by it"
        } else {
            "is not changed yet"
        };
        report.notes.push(format!(
            "{} records parent_linkage2 {}: a commit into {} started and did not finish; the parent {state}, the chain reads as before; run `commit` again to finish it",
            pair[0].path().display(),
            locator::format_guid_string(l2),
            pair[1].path().display()
        ));
    }
}

/// The checks of an open file: BAT entries and space. (Opening already validated every
/// structure.)
pub fn check_file(file: &VhdxFile) -> CheckReport {
    let mut report = CheckReport {
        filename: file.path().to_path_buf(),
        ..Default::default()
    };
    check_bat(file, &mut report);
    find_leaks(file, &mut report);
    report
}

fn record_open_error(report: &mut CheckReport, e: Error) {
    match e {
        Error::Corrupt(c) => report.corruptions.push(c.to_string()),
        Error::Chain(c) => report.corruptions.push(c.to_string()),
        other => {
            report.check_errors += 1;
            report.notes.push(other.to_string());
        }
    }
}

fn check_bat(file: &VhdxFile, report: &mut CheckReport) {
    let bat: &Bat = &file.bat;
    let g = file.geometry();
    let file_size = file.storage().len().unwrap_or(0);
    for index in 0..bat.len() {
        let e = bat.entry(index);
        if e.reserved_bits() != 0 {
            report.corruptions.push(format!(
                "BAT entry {index} ({:#x}) has reserved bits set",
                e.0
            ));
        }
    }
    report.total_blocks = g.payload_blocks();
    for block in 0..g.payload_blocks() {
        let (state, e) = bat.payload(block);
        if !state.has_data() {
            continue;
        }
        report.allocated_blocks += 1;
        let end = e.file_offset() + u64::from(g.block_size);
        if end > file_size {
            report.notes.push(format!(
                "block {block} at {:#x} ends {:#x} bytes beyond the end of the file (read as zeros)",
                e.file_offset(),
                end - file_size
            ));
        }
    }
}

/// Space past the last structure is leaked: `-r leaks` gives it back. Gaps between structures
/// are not leaks: a writer reuses them for new blocks before it grows the file, so they are
/// only reported (qemu-img's own files have such a gap between the metadata and the data).
fn find_leaks(file: &VhdxFile, report: &mut CheckReport) {
    let mut used = file.used_extents();
    used.sort_unstable();
    let file_size = file.storage().len().unwrap_or(0);
    let mut pos = 0;
    let mut gaps = 0;
    for &(start, len) in &used {
        if start > pos {
            gaps += start - pos;
        }
        pos = pos.max(start + len);
    }
    report.image_end_offset = pos;
    report.unused_bytes = gaps;
    if gaps > 0 {
        report.notes.push(format!(
            "{gaps} bytes between structures are unused; new blocks will fill them"
        ));
    }
    // A file ends on a 1 MiB boundary; anything past the last structure is leaked, except
    // the room a fixed file keeps for the blocks it has not allocated.
    let keep = if file.metadata.leave_block_allocated && !file.metadata.has_parent {
        let bs = u64::from(file.geometry().block_size);
        FreeSpace::new(&used, file_size).fixed_min_len(file.bat.unallocated_blocks(), bs)
    } else {
        pos
    };
    if file_size > keep {
        let end = align_up(file_size, MIB).unwrap_or(file_size);
        report.leaks.push((keep, end - keep));
    }
}

fn truncate_trailing_leak(file: &VhdxFile, report: &mut CheckReport) {
    let Some(&(offset, _)) = report.leaks.last() else {
        return;
    };
    if offset < report.image_end_offset {
        return;
    }
    // The log is empty after a writable open, so a shorter file cannot look truncated to a
    // later replay (the FlushedFileOffset rule).
    match file
        .storage()
        .set_len(offset)
        .and_then(|_| file.storage().flush())
    {
        Ok(()) => {
            report.leaks.pop();
            report.leaks_fixed += 1;
            report
                .notes
                .push(format!("truncated the file to {offset:#x}"));
        }
        Err(e) => report.notes.push(format!("could not truncate: {e}")),
    }
}
