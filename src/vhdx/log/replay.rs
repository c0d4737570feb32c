//! Finding the active log sequence ([MS-VHDX] §2.3.3) and the plan to replay it.
//!
//! Unlike qemu, this honours the head's Tail (entries before it are already applied) and
//! validates every entry of a sequence completely before anything is replayed.

use std::collections::HashMap;

use uuid::Uuid;

use super::entry::{parse_entry, LogEntry, LogOp};
use crate::vhdx::error::{Corruption, Error, Result};
use crate::vhdx::format::*;
use crate::vhdx::storage::Storage;

/// Logs larger than this are refused rather than read into memory (Windows and qemu make 1 MiB
/// logs); it bounds what a hostile header can make us allocate.
pub const MAX_LOG_LENGTH: u64 = 256 * MIB;

/// The changes to make, in order, and how large the file must be afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayPlan {
    pub ops: Vec<LogOp>,
    /// The head entry's LastFileOffset, rounded up to 1 MiB.
    pub min_file_size: u64,
    pub entries: usize,
    pub head_sequence: u64,
}

/// A run of entries, each right after the previous with sequence numbers increasing by one.
struct Sequence {
    entries: Vec<LogEntry>,
}

impl Sequence {
    fn head(&self) -> &LogEntry {
        self.entries.last().expect("non-empty")
    }

    /// Complete when the head's Tail is the start of one of its own entries.
    fn is_complete(&self) -> bool {
        let tail = self.head().tail;
        self.entries.iter().any(|e| e.position == tail)
    }
}

/// Reads the log and returns the replay plan for its active sequence. The caller has checked
/// that the header's LogGuid is set; no valid sequence is then corruption.
pub fn find_active_sequence(
    storage: &dyn Storage,
    log_offset: u64,
    log_length: u64,
    log_guid: Uuid,
    file_size: u64,
) -> Result<ReplayPlan> {
    if log_length > MAX_LOG_LENGTH {
        return Err(Error::Unsupported(format!(
            "log of {log_length} bytes is larger than {MAX_LOG_LENGTH}"
        )));
    }
    let mut log = vec![0u8; log_length as usize];
    storage
        .read_at(&mut log, log_offset)
        .map_err(|e| Error::io("reading the log", e))?;
    let (plan, head_flushed, origins) = plan_from_log(&log, log_guid)?;
    if file_size < head_flushed {
        return Err(Corruption::LogFileTruncated {
            file_size,
            flushed: head_flushed,
        }
        .into());
    }
    check_targets(&plan, &origins, log_offset, log_length)?;
    Ok(plan)
}

/// Where in the log the changes of a plan come from, for error messages.
#[derive(Debug)]
struct Origins {
    /// The log offset of the entry of each op, in order.
    ops: Vec<u64>,
    /// The log offset of the head entry.
    head: u64,
}

/// The scan of §2.3.3 over an in-memory copy of the log. Returns the plan, the head's
/// FlushedFileOffset and the entries its changes come from.
fn plan_from_log(log: &[u8], log_guid: Uuid) -> Result<(ReplayPlan, u64, Origins)> {
    let log_len = log.len() as u64;
    // Each position is parsed at most once, which keeps the scan linear in the log size even
    // for a hostile log.
    let mut memo: HashMap<u64, Option<LogEntry>> = HashMap::new();
    let mut entry_at = |pos: u64| -> Option<LogEntry> {
        memo.entry(pos)
            .or_insert_with(|| parse_entry(log, pos, log_guid).ok())
            .clone()
    };
    let mut candidate: Option<Sequence> = None;
    let mut cur_tail = 0u64;
    loop {
        let mut current = Sequence {
            entries: Vec::new(),
        };
        let mut pos = cur_tail;
        let mut covered = 0u64;
        let mut wrapped = false;
        while let Some(e) = entry_at(pos) {
            if let Some(prev) = current.entries.last() {
                if e.sequence_number != prev.sequence_number.wrapping_add(1) {
                    break;
                }
            }
            // Stop before the run would wrap onto its own start.
            covered += e.length;
            if covered > log_len {
                wrapped = true;
                break;
            }
            pos = (pos + e.length) % log_len;
            current.entries.push(e);
        }
        let valid = !current.entries.is_empty() && current.is_complete();
        // An invalid run needs no rescanning from each of its sectors: a run starting at one of
        // its later entries ends at the same head, whose Tail is in neither, and a sector inside
        // a valid entry (a descriptor or data sector, with its own signature) never starts an
        // entry. Skipping them keeps the scan linear; rescanning made a hostile 64 MiB log cost
        // seconds. Only a run cut short by the wrap-around check depends on where it started.
        let next = if valid || (!current.entries.is_empty() && !wrapped) {
            pos
        } else {
            (cur_tail + LOG_SECTOR_SIZE as u64) % log_len
        };
        if valid
            && candidate
                .as_ref()
                .is_none_or(|c| current.head().sequence_number > c.head().sequence_number)
        {
            candidate = Some(current);
        }
        // The whole log has been scanned once the position wraps around.
        if next <= cur_tail {
            break;
        }
        cur_tail = next;
    }
    let seq = candidate.ok_or(Corruption::NoValidLogSequence)?;
    let head = seq.head().clone();
    let start = seq
        .entries
        .iter()
        .position(|e| e.position == head.tail)
        .expect("complete sequence");
    let entries = &seq.entries[start..];
    let ops = entries.iter().flat_map(|e| e.ops.iter().cloned()).collect();
    let origins = Origins {
        ops: entries
            .iter()
            .flat_map(|e| e.ops.iter().map(|_| e.position))
            .collect(),
        head: head.position,
    };
    let min_file_size = align_up(head.last_file_offset, MIB).unwrap_or(u64::MAX);
    Ok((
        ReplayPlan {
            ops,
            min_file_size,
            entries: entries.len(),
            head_sequence: head.sequence_number,
        },
        head.flushed_file_offset,
        origins,
    ))
}

/// Replay may touch metadata anywhere after the headers (the region tables are logged), but
/// never the file identifier, the headers or the log itself.
fn check_targets(
    plan: &ReplayPlan,
    origins: &Origins,
    log_offset: u64,
    log_length: u64,
) -> Result<()> {
    let first_allowed = REGION_TABLE_OFFSETS[0];
    for (op, &entry) in plan.ops.iter().zip(&origins.ops) {
        let (offset, length) = (op.file_offset(), op.length());
        let bad = |reason: &str| {
            Error::from(Corruption::BadLogEntry {
                offset: entry,
                reason: format!("a change at {offset:#x} length {length:#x} {reason}"),
            })
        };
        if offset < first_allowed {
            return Err(bad("would overwrite the file identifier or a header"));
        }
        if offset
            .checked_add(length)
            .is_none_or(|e| e > 2 * MAX_VIRTUAL_DISK_SIZE)
        {
            return Err(bad("lies beyond any possible VHDX file"));
        }
        if ranges_overlap(offset, length, log_offset, log_length) {
            return Err(bad("would overwrite the log"));
        }
    }
    if plan.min_file_size > 2 * MAX_VIRTUAL_DISK_SIZE {
        return Err(Corruption::BadLogEntry {
            offset: origins.head,
            reason: format!(
                "LastFileOffset {:#x} is beyond any possible VHDX file",
                plan.min_file_size
            ),
        }
        .into());
    }
    Ok(())
}

/// Applies a plan to a writable file: every change, the file extension, then a flush.
pub fn apply(storage: &dyn Storage, plan: &ReplayPlan) -> Result<()> {
    let io = |e| Error::io("replaying the log", e);
    let zeros = vec![0u8; MIB as usize];
    for op in &plan.ops {
        match op {
            LogOp::Data { file_offset, data } => {
                storage.write_at(&data[..], *file_offset).map_err(io)?
            }
            LogOp::Zero {
                file_offset,
                length,
            } => {
                // Bytes past the end of the file already read as zero once it is extended. The
                // end as it is now: an earlier change may have written past the original one.
                let size = storage.len().map_err(io)?;
                let end = (file_offset + length).min(size.max(*file_offset));
                let mut at = *file_offset;
                while at < end {
                    let n = (end - at).min(MIB);
                    storage.write_at(&zeros[..n as usize], at).map_err(io)?;
                    at += n;
                }
                if file_offset + length > size && storage.len().map_err(io)? < file_offset + length
                {
                    storage.set_len(file_offset + length).map_err(io)?;
                }
            }
        }
    }
    if storage.len().map_err(io)? < plan.min_file_size {
        storage.set_len(plan.min_file_size).map_err(io)?;
    }
    storage.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::super::entry::build_entry;
    use super::*;
    use crate::vhdx::storage::MemStorage;

    const GUID: Uuid = Uuid::from_u128(0xabc);

    fn data_op(offset: u64, fill: u8) -> LogOp {
        LogOp::Data {
            file_offset: offset,
            data: Box::new([fill; 4096]),
        }
    }

    fn put(log: &mut [u8], pos: usize, bytes: &[u8]) {
        log[pos..pos + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn replays_from_the_tail_of_the_newest_sequence() {
        let mut log = vec![0u8; 64 * 1024];
        // Entries 10 (at 0) and 11 (at 8K, tail = 8K: entry 10 already applied).
        let e10 = build_entry(GUID, 10, 0, 0, 4 * MIB, &[data_op(2 * MIB, 1)]);
        let e11 = build_entry(GUID, 11, 8192, 0, 5 * MIB, &[data_op(3 * MIB, 2)]);
        put(&mut log, 0, &e10);
        put(&mut log, 8192, &e11);
        let (plan, ..) = plan_from_log(&log, GUID).unwrap();
        assert_eq!(plan.ops, vec![data_op(3 * MIB, 2)]);
        assert_eq!(plan.min_file_size, 5 * MIB);
        assert_eq!(plan.head_sequence, 11);
    }

    #[test]
    fn an_incomplete_sequence_is_not_chosen() {
        let mut log = vec![0u8; 64 * 1024];
        let good = build_entry(GUID, 3, 0, 0, 0, &[data_op(2 * MIB, 1)]);
        // Seq 9 claims a tail at 32K where there is no entry: incomplete.
        let orphan = build_entry(GUID, 9, 32768, 0, 0, &[data_op(2 * MIB, 9)]);
        put(&mut log, 0, &good);
        put(&mut log, 16384, &orphan);
        let (plan, ..) = plan_from_log(&log, GUID).unwrap();
        assert_eq!(plan.head_sequence, 3);
    }

    #[test]
    fn no_valid_sequence_is_corruption() {
        let log = vec![0u8; 64 * 1024];
        assert!(matches!(
            plan_from_log(&log, GUID).unwrap_err().corruption(),
            Some(Corruption::NoValidLogSequence)
        ));
    }

    #[test]
    fn a_long_incomplete_run_is_scanned_once() {
        // 16383 one-sector entries in a row whose head's Tail points at sector 0, which holds no
        // entry: no run is complete. Rescanning the run from each of its sectors walked 134
        // million entries (7 s in a release build); skipping it walks each once (milliseconds).
        let mut log = vec![0u8; 64 << 20];
        let n = log.len() / 4096;
        for i in 1..n {
            put(
                &mut log,
                i * 4096,
                &build_entry(GUID, 100 + i as u64, 0, 0, 0, &[]),
            );
        }
        let started = std::time::Instant::now();
        assert!(matches!(
            plan_from_log(&log, GUID).unwrap_err().corruption(),
            Some(Corruption::NoValidLogSequence)
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(3));
    }

    #[test]
    fn a_complete_run_right_after_an_incomplete_one_is_found() {
        // Sector 0 holds nothing; two-sector entries seq 5, 6, 7 follow with Tail 0, so no run
        // through them is complete; then seq 20 with its Tail on itself. The scan resumes right
        // after the incomplete run and finds it.
        let mut log = vec![0u8; 64 * 1024];
        for (i, seq) in [5u64, 6, 7].into_iter().enumerate() {
            let e = build_entry(GUID, seq, 0, 0, 0, &[data_op(2 * MIB, seq as u8)]);
            put(&mut log, 4096 + i * 8192, &e);
        }
        let at = 4096 + 3 * 8192;
        let e = build_entry(GUID, 20, at as u64, 0, 0, &[data_op(2 * MIB, 20)]);
        put(&mut log, at, &e);
        let (plan, ..) = plan_from_log(&log, GUID).unwrap();
        assert_eq!(plan.head_sequence, 20);
        assert_eq!(plan.ops, vec![data_op(2 * MIB, 20)]);
    }

    #[test]
    fn apply_zeroes_what_an_earlier_change_wrote_past_the_end() {
        let m = MemStorage::new(vec![1u8; MIB as usize]);
        let plan = ReplayPlan {
            ops: vec![
                data_op(MIB, 0xab),
                LogOp::Zero {
                    file_offset: MIB,
                    length: 4096,
                },
            ],
            min_file_size: 2 * MIB,
            entries: 1,
            head_sequence: 1,
        };
        apply(&m, &plan).unwrap();
        let data = m.snapshot();
        assert_eq!(data.len() as u64, 2 * MIB);
        assert!(data[MIB as usize..].iter().all(|&b| b == 0));
        assert!(data[..MIB as usize].iter().all(|&b| b == 1));
    }

    #[test]
    fn targets_in_the_headers_or_the_log_are_refused() {
        let plan = ReplayPlan {
            ops: vec![data_op(64 * 1024, 0)],
            min_file_size: 0,
            entries: 1,
            head_sequence: 1,
        };
        let origins = Origins {
            ops: vec![0x2000],
            head: 0x2000,
        };
        assert!(check_targets(&plan, &origins, MIB, MIB).is_err());
        let plan = ReplayPlan {
            ops: vec![data_op(MIB + 4096, 0)],
            ..plan
        };
        assert!(check_targets(&plan, &origins, MIB, MIB).is_err());
    }

    #[test]
    fn a_refused_change_names_its_entry() {
        // Entry 1 at 0 is fine; entry 2 at 8K (same sequence, Tail 0) writes over header 1.
        let mut log = vec![0u8; 64 * 1024];
        put(
            &mut log,
            0,
            &build_entry(GUID, 1, 0, 0, 0, &[data_op(2 * MIB, 1)]),
        );
        let e2 = build_entry(GUID, 2, 0, 0, 0, &[data_op(64 * 1024, 2)]);
        put(&mut log, 8192, &e2);
        let (plan, _, origins) = plan_from_log(&log, GUID).unwrap();
        assert_eq!(origins.ops, vec![0, 8192]);
        let err = check_targets(&plan, &origins, MIB, MIB).unwrap_err();
        assert_eq!(
            err.corruption(),
            Some(&Corruption::BadLogEntry {
                offset: 8192,
                reason: "a change at 0x10000 length 0x1000 would overwrite the file identifier \
                         or a header"
                    .into()
            })
        );
    }
}
