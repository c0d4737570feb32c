//! Log entries: parsing with full validation (§6.7 of the notes) and building.
//!
//! An entry is one or more descriptor sectors (the 64-byte header, then 32-byte zero or data
//! descriptors packed contiguously) followed by one 4 KiB data sector per data descriptor. The
//! first 8 and last 4 bytes of each logged sector live in its descriptor; the data sector carries
//! the sequence number at both ends so that a torn write is detected.

use uuid::Uuid;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use crate::vhdx::format::*;

/// One change an entry makes to the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogOp {
    /// Write one 4 KiB sector at `file_offset`.
    Data {
        file_offset: u64,
        data: Box<[u8; LOG_SECTOR_SIZE]>,
    },
    /// Zero `length` bytes at `file_offset` (both multiples of 4 KiB).
    Zero { file_offset: u64, length: u64 },
}

impl LogOp {
    pub fn file_offset(&self) -> u64 {
        match self {
            LogOp::Data { file_offset, .. } | LogOp::Zero { file_offset, .. } => *file_offset,
        }
    }

    pub fn length(&self) -> u64 {
        match self {
            LogOp::Data { .. } => LOG_SECTOR_SIZE as u64,
            LogOp::Zero { length, .. } => *length,
        }
    }
}

/// A validated entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Byte offset of the entry from the start of the log.
    pub position: u64,
    pub length: u64,
    pub tail: u64,
    pub sequence_number: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub ops: Vec<LogOp>,
}

/// Descriptor sectors needed for `count` descriptors: the header takes the room of two.
pub fn descriptor_sectors(count: u64) -> u64 {
    (count + 2).div_ceil(128)
}

/// Parses and validates the entry at `position` of the log (the whole log region in `log`).
/// `Err` says why there is no valid entry there.
///
/// The scan of §2.3.3 tries every 4 KiB position of the log, so this must not cost more than
/// what it has validated: the header and descriptors are checked in place, the entry's length is
/// checked against its descriptors before any data sector is read, and the checksum is computed
/// last. A hostile EntryLength then costs one sector, not a copy of the whole log per position.
pub fn parse_entry(log: &[u8], position: u64, log_guid: Uuid) -> Result<LogEntry, String> {
    let log_len = log.len() as u64;
    let sector_size = LOG_SECTOR_SIZE as u64;
    if position % sector_size != 0 || log_len % sector_size != 0 || log_len == 0 {
        return Err(format!(
            "position {position:#x} is not a 4 KiB sector of the log"
        ));
    }
    // Sector `k` of the entry; the log is whole sectors, so none straddles the wrap-around.
    let sector = |k: u64| -> &[u8] {
        let at = ((position + k * sector_size) % log_len) as usize;
        &log[at..at + LOG_SECTOR_SIZE]
    };
    let header = LogEntryHeader::read_from_prefix(sector(0))
        .expect("4096 > 64")
        .0;
    if &header.signature != SIG_LOG_ENTRY {
        return Err("no entry signature".into());
    }
    let length = u64::from(header.entry_length.get());
    if length == 0 || length % sector_size != 0 || length > log_len {
        return Err(format!("entry length {length:#x} is invalid"));
    }
    let sequence_number = header.sequence_number.get();
    if sequence_number == 0 {
        return Err("sequence number 0".into());
    }
    if guid_from_disk(header.log_guid) != log_guid {
        return Err("LogGuid does not match the header's".into());
    }
    let tail = u64::from(header.tail.get());
    if tail % sector_size != 0 || tail >= log_len {
        return Err(format!("tail {tail:#x} is invalid"));
    }
    let count = u64::from(header.descriptor_count.get());
    let desc_sectors = descriptor_sectors(count);
    if desc_sectors * sector_size > length {
        return Err(format!(
            "{count} descriptors do not fit in {length:#x} bytes"
        ));
    }
    // Descriptors first (32 bytes each, never across a sector boundary).
    let descriptor = |i: u64| -> LogDescriptor {
        let at = LOG_ENTRY_HEADER_SIZE as u64 + i * LOG_DESCRIPTOR_SIZE as u64;
        let within = (at % sector_size) as usize;
        LogDescriptor::read_from_prefix(&sector(at / sector_size)[within..])
            .expect("inside descriptor sectors")
            .0
    };
    let mut data_descriptors = 0u64;
    for i in 0..count {
        let d = descriptor(i);
        if d.sequence_number.get() != sequence_number {
            return Err(format!("descriptor {i} has another sequence number"));
        }
        let file_offset = d.file_offset.get();
        if file_offset % sector_size != 0 {
            return Err(format!(
                "descriptor {i} file offset {file_offset:#x} is not 4 KiB aligned"
            ));
        }
        if &d.signature == SIG_ZERO_DESC {
            let zero_length = u64::from_le_bytes(d.leading_bytes);
            if zero_length % sector_size != 0 {
                return Err(format!(
                    "zero descriptor {i} length {zero_length:#x} is not 4 KiB aligned"
                ));
            }
        } else if &d.signature == SIG_DATA_DESC {
            data_descriptors += 1;
        } else {
            return Err(format!("descriptor {i} has no valid signature"));
        }
    }
    if (desc_sectors + data_descriptors) * sector_size != length {
        return Err(format!(
            "entry length {length:#x} does not match its {count} descriptors"
        ));
    }
    // Then the data sectors: one per data descriptor, in order.
    let data_sector = |j: u64| -> LogDataSector {
        LogDataSector::read_from_bytes(sector(desc_sectors + j)).expect("4096 bytes")
    };
    for j in 0..data_descriptors {
        let s = data_sector(j);
        let seq = (u64::from(s.sequence_high.get()) << 32) | u64::from(s.sequence_low.get());
        if &s.signature != SIG_DATA_SECTOR || seq != sequence_number {
            return Err(format!(
                "data sector {} is torn or misplaced",
                desc_sectors + j
            ));
        }
    }
    // The checksum covers every sector, with the checksum field taken as zero.
    let first = sector(0);
    let mut crc = crc32c::crc32c(&first[..LOG_ENTRY_CHECKSUM_OFFSET]);
    crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc = crc32c::crc32c_append(crc, &first[LOG_ENTRY_CHECKSUM_OFFSET + 4..]);
    for k in 1..length / sector_size {
        crc = crc32c::crc32c_append(crc, sector(k));
    }
    if crc != header.checksum.get() {
        return Err("bad checksum".into());
    }
    let mut ops = Vec::with_capacity(count as usize);
    let mut next_data = 0;
    for i in 0..count {
        let d = descriptor(i);
        let file_offset = d.file_offset.get();
        if &d.signature == SIG_ZERO_DESC {
            ops.push(LogOp::Zero {
                file_offset,
                length: u64::from_le_bytes(d.leading_bytes),
            });
        } else {
            let sector = data_sector(next_data);
            next_data += 1;
            let mut data = Box::new([0u8; LOG_SECTOR_SIZE]);
            data[..8].copy_from_slice(&d.leading_bytes);
            data[8..4092].copy_from_slice(&sector.data);
            data[4092..].copy_from_slice(&d.trailing_bytes);
            ops.push(LogOp::Data { file_offset, data });
        }
    }
    Ok(LogEntry {
        position,
        length,
        tail,
        sequence_number,
        flushed_file_offset: header.flushed_file_offset.get(),
        last_file_offset: header.last_file_offset.get(),
        ops,
    })
}

/// Builds the bytes of an entry (the inverse of [`parse_entry`]).
pub fn build_entry(
    log_guid: Uuid,
    sequence_number: u64,
    tail: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    ops: &[LogOp],
) -> Vec<u8> {
    let count = ops.len() as u64;
    let desc_sectors = descriptor_sectors(count) as usize;
    let data_count = ops
        .iter()
        .filter(|o| matches!(o, LogOp::Data { .. }))
        .count();
    let length = (desc_sectors + data_count) * LOG_SECTOR_SIZE;
    let mut bytes = vec![0u8; length];
    let header = LogEntryHeader {
        signature: *SIG_LOG_ENTRY,
        checksum: U32::new(0),
        entry_length: U32::new(length as u32),
        tail: U32::new(tail as u32),
        sequence_number: U64::new(sequence_number),
        descriptor_count: U32::new(count as u32),
        reserved: U32::new(0),
        log_guid: guid_to_disk(log_guid),
        flushed_file_offset: U64::new(flushed_file_offset),
        last_file_offset: U64::new(last_file_offset),
    };
    header.write_to_prefix(&mut bytes[..]).expect("fits");
    let mut data_sector = desc_sectors;
    for (i, op) in ops.iter().enumerate() {
        let d = match op {
            LogOp::Zero {
                file_offset,
                length,
            } => LogDescriptor {
                signature: *SIG_ZERO_DESC,
                trailing_bytes: [0; 4],
                leading_bytes: length.to_le_bytes(),
                file_offset: U64::new(*file_offset),
                sequence_number: U64::new(sequence_number),
            },
            LogOp::Data { file_offset, data } => {
                let sector = LogDataSector {
                    signature: *SIG_DATA_SECTOR,
                    sequence_high: U32::new((sequence_number >> 32) as u32),
                    data: data[8..4092].try_into().expect("4084 bytes"),
                    sequence_low: U32::new(sequence_number as u32),
                };
                let at = data_sector * LOG_SECTOR_SIZE;
                bytes[at..at + LOG_SECTOR_SIZE].copy_from_slice(sector.as_bytes());
                data_sector += 1;
                LogDescriptor {
                    signature: *SIG_DATA_DESC,
                    trailing_bytes: data[4092..].try_into().expect("4 bytes"),
                    leading_bytes: data[..8].try_into().expect("8 bytes"),
                    file_offset: U64::new(*file_offset),
                    sequence_number: U64::new(sequence_number),
                }
            }
        };
        let at = LOG_ENTRY_HEADER_SIZE + i * LOG_DESCRIPTOR_SIZE;
        d.write_to_prefix(&mut bytes[at..]).expect("fits");
    }
    stamp_checksum(&mut bytes, LOG_ENTRY_CHECKSUM_OFFSET);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<LogOp> {
        let mut data = Box::new([0u8; 4096]);
        for (i, b) in data.iter_mut().enumerate() {
            *b = i as u8;
        }
        vec![
            LogOp::Data {
                file_offset: 3 * MIB,
                data,
            },
            LogOp::Zero {
                file_offset: 4 * MIB,
                length: 8192,
            },
        ]
    }

    #[test]
    fn build_then_parse_round_trips() {
        let guid = Uuid::from_u128(9);
        let bytes = build_entry(guid, 7, 0, 8 * MIB, 9 * MIB, &ops());
        assert_eq!(bytes.len(), 2 * 4096);
        let mut log = vec![0u8; MIB as usize];
        log[..bytes.len()].copy_from_slice(&bytes);
        let e = parse_entry(&log, 0, guid).unwrap();
        assert_eq!(e.ops, ops());
        assert_eq!(e.sequence_number, 7);
        assert_eq!(e.last_file_offset, 9 * MIB);
        assert!(parse_entry(&log, 0, Uuid::from_u128(8)).is_err());
    }

    #[test]
    fn entries_may_wrap_around_the_end_of_the_log() {
        let guid = Uuid::from_u128(9);
        let bytes = build_entry(guid, 1, 60 * 1024, 0, 0, &ops());
        let mut log = vec![0u8; 64 * 1024];
        log[60 * 1024..].copy_from_slice(&bytes[..4096]);
        log[..4096].copy_from_slice(&bytes[4096..]);
        assert_eq!(parse_entry(&log, 60 * 1024, guid).unwrap().ops, ops());
    }

    #[test]
    fn a_torn_data_sector_invalidates_the_entry() {
        let guid = Uuid::from_u128(9);
        let mut bytes = build_entry(guid, 1, 0, 0, 0, &ops());
        bytes[4096 + 4092] ^= 1; // sequence low of the data sector
        let err = parse_entry(&bytes, 0, guid).unwrap_err();
        assert!(err.contains("torn"), "{err}");
    }

    #[test]
    fn a_hostile_entry_length_costs_one_sector() {
        // Every sector of a 32 MiB log starts an entry header that claims the whole log. The
        // scan tries each position; each must be refused without reading 32 MiB (copying the
        // claimed length first made a 64 MiB log take minutes).
        let guid = Uuid::from_u128(9);
        let header = build_entry(guid, 1, 0, 0, 0, &[]);
        let mut log = vec![0u8; 32 << 20];
        for at in (0..log.len()).step_by(4096) {
            log[at..at + 64].copy_from_slice(&header[..64]);
            log[at + 8..at + 12].copy_from_slice(&(32u32 << 20).to_le_bytes());
        }
        let started = std::time::Instant::now();
        for at in (0..log.len() as u64).step_by(4096) {
            let err = parse_entry(&log, at, guid).unwrap_err();
            assert!(err.contains("does not match its 0 descriptors"), "{err}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_wrong_checksum_is_still_detected() {
        let guid = Uuid::from_u128(9);
        let mut bytes = build_entry(guid, 1, 0, 0, 0, &ops());
        parse_entry(&bytes, 0, guid).unwrap();
        bytes[4096 + 100] ^= 1; // inside the data sector's payload
        assert_eq!(parse_entry(&bytes, 0, guid).unwrap_err(), "bad checksum");
    }

    #[test]
    fn descriptor_sector_counts() {
        assert_eq!(descriptor_sectors(0), 1);
        assert_eq!(descriptor_sectors(126), 1);
        assert_eq!(descriptor_sectors(127), 2);
        assert_eq!(descriptor_sectors(254), 2);
        assert_eq!(descriptor_sectors(255), 3);
    }
}
