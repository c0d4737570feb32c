//! The file type identifier and the two headers ([MS-VHDX] §2.2): validation, choosing the
//! current header, and the update protocol (write the non-current slot, flush, twice).

use uuid::Uuid;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::error::{Corruption, Error, Result};
use super::format::*;
use super::storage::Storage;

/// A header as the engine uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses and validates one 4 KiB header. `Err` carries why it is not valid.
    pub fn parse(buf: &[u8; HEADER_SIZE]) -> std::result::Result<Header, String> {
        let raw = RawHeader::read_from_prefix(buf).expect("4096 > 80").0;
        if &raw.signature != SIG_HEADER {
            return Err("bad signature".into());
        }
        if !checksum_matches(buf, HEADER_CHECKSUM_OFFSET) {
            return Err("bad checksum".into());
        }
        Ok(Header {
            sequence_number: raw.sequence_number.get(),
            file_write_guid: guid_from_disk(raw.file_write_guid),
            data_write_guid: guid_from_disk(raw.data_write_guid),
            log_guid: guid_from_disk(raw.log_guid),
            log_version: raw.log_version.get(),
            version: raw.version.get(),
            log_length: raw.log_length.get(),
            log_offset: raw.log_offset.get(),
        })
    }

    /// The 4 KiB on-disk form, reserved bytes zero, checksum stamped.
    pub fn to_bytes(&self) -> Box<[u8; HEADER_SIZE]> {
        let raw = RawHeader {
            signature: *SIG_HEADER,
            checksum: U32::new(0),
            sequence_number: U64::new(self.sequence_number),
            file_write_guid: guid_to_disk(self.file_write_guid),
            data_write_guid: guid_to_disk(self.data_write_guid),
            log_guid: guid_to_disk(self.log_guid),
            log_version: U16::new(self.log_version),
            version: U16::new(self.version),
            log_length: U32::new(self.log_length),
            log_offset: U64::new(self.log_offset),
        };
        let mut buf = Box::new([0u8; HEADER_SIZE]);
        raw.write_to_prefix(&mut buf[..]).expect("4096 > 80");
        stamp_checksum(&mut buf[..], HEADER_CHECKSUM_OFFSET);
        buf
    }

    pub fn has_log_to_replay(&self) -> bool {
        !self.log_guid.is_nil() && self.log_length != 0
    }
}

/// Both header slots and which one is current.
#[derive(Clone, Debug)]
pub struct Headers {
    pub current: Header,
    /// 0 or 1: the slot holding `current`.
    pub current_slot: usize,
}

/// Checks the file type identifier and returns the creator string (diagnostics only).
pub fn read_file_identifier(storage: &dyn Storage) -> Result<String> {
    let mut buf = vec![0u8; 8 + 512];
    storage
        .read_at(&mut buf, FILE_IDENTIFIER_OFFSET)
        .map_err(|e| Error::io("reading the file identifier", e))?;
    if &buf[..8] != SIG_FILE {
        return Err(Corruption::BadFileSignature.into());
    }
    let units: Vec<u16> = buf[8..]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    Ok(String::from_utf16_lossy(&units))
}

/// Reads both headers and selects the current one (§2.2.2).
pub fn read_headers(storage: &dyn Storage) -> Result<Headers> {
    let mut parsed = Vec::with_capacity(2);
    let mut raw80 = Vec::with_capacity(2);
    for offset in HEADER_OFFSETS {
        let mut buf = Box::new([0u8; HEADER_SIZE]);
        storage
            .read_at(&mut buf[..], offset)
            .map_err(|e| Error::io(format!("reading the header at {offset:#x}"), e))?;
        raw80.push(buf[..80].to_vec());
        parsed.push(Header::parse(&buf));
    }
    let (current_slot, current) = match (&parsed[0], &parsed[1]) {
        (Err(a), Err(b)) => {
            return Err(Corruption::NoValidHeader {
                first: a.clone(),
                second: b.clone(),
            }
            .into())
        }
        (Ok(h), Err(_)) => (0, *h),
        (Err(_), Ok(h)) => (1, *h),
        (Ok(a), Ok(b)) => match a.sequence_number.cmp(&b.sequence_number) {
            std::cmp::Ordering::Greater => (0, *a),
            std::cmp::Ordering::Less => (1, *b),
            // Disk2VHD writes two byte-identical headers; the spec calls equal sequence numbers
            // corrupt, but identical headers leave no doubt which data to use.
            std::cmp::Ordering::Equal if raw80[0] == raw80[1] => (0, *a),
            std::cmp::Ordering::Equal => {
                return Err(Corruption::HeaderSequenceTie {
                    sequence: a.sequence_number,
                }
                .into())
            }
        },
    };
    let offset = HEADER_OFFSETS[current_slot];
    if current.version != 1 {
        return Err(Error::Unsupported(format!(
            "header at {offset:#x} has version {}, only version 1 is defined",
            current.version
        )));
    }
    if current.log_version != 0 && !current.log_guid.is_nil() {
        return Err(Error::Unsupported(format!(
            "header at {offset:#x} has log version {} with a log to replay",
            current.log_version
        )));
    }
    if current.log_length != 0 || current.has_log_to_replay() {
        for (field, value) in [
            ("LogOffset", current.log_offset),
            ("LogLength", u64::from(current.log_length)),
        ] {
            if !is_aligned(value, MIB) {
                return Err(Corruption::HeaderMisaligned {
                    offset,
                    field,
                    value,
                }
                .into());
            }
        }
    }
    Ok(Headers {
        current,
        current_slot,
    })
}

impl Headers {
    /// Writes `new` through the update protocol (§2.2.2.1): into the non-current slot with the
    /// next sequence number, flushed, then once more so that both slots hold it.
    pub fn update(&mut self, storage: &dyn Storage, new: Header) -> Result<()> {
        for _ in 0..2 {
            let sequence_number = self.current.sequence_number.checked_add(1).ok_or(
                Corruption::HeaderSequenceOverflow(self.current.sequence_number),
            )?;
            let header = Header {
                sequence_number,
                ..new
            };
            let slot = 1 - self.current_slot;
            storage
                .write_at(&header.to_bytes()[..], HEADER_OFFSETS[slot])
                .map_err(|e| Error::io("writing a header", e))?;
            storage
                .flush()
                .map_err(|e| Error::io("flushing a header", e))?;
            self.current = header;
            self.current_slot = slot;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhdx::storage::MemStorage;

    fn header(seq: u64) -> Header {
        Header {
            sequence_number: seq,
            file_write_guid: Uuid::from_u128(1),
            data_write_guid: Uuid::from_u128(2),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    fn file_with(h1: Option<Header>, h2: Option<Header>) -> MemStorage {
        let m = MemStorage::new(vec![0; MIB as usize]);
        if let Some(h) = h1 {
            m.write_at(&h.to_bytes()[..], HEADER_OFFSETS[0]).unwrap();
        }
        if let Some(h) = h2 {
            m.write_at(&h.to_bytes()[..], HEADER_OFFSETS[1]).unwrap();
        }
        m
    }

    #[test]
    fn round_trip() {
        let h = header(42);
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn greater_sequence_wins_and_invalid_is_ignored() {
        let m = file_with(Some(header(5)), Some(header(6)));
        assert_eq!(read_headers(&m).unwrap().current_slot, 1);
        let m = file_with(Some(header(7)), Some(header(6)));
        assert_eq!(read_headers(&m).unwrap().current_slot, 0);
        // Header 2 damaged: header 1 is current even with the lower sequence number.
        let m = file_with(Some(header(5)), Some(header(6)));
        m.write_at(&[0xff], HEADER_OFFSETS[1] + 100).unwrap();
        assert_eq!(read_headers(&m).unwrap().current_slot, 0);
    }

    #[test]
    fn identical_headers_are_accepted_differing_ties_are_not() {
        let m = file_with(Some(header(3)), Some(header(3)));
        assert_eq!(read_headers(&m).unwrap().current.sequence_number, 3);
        let mut other = header(3);
        other.data_write_guid = Uuid::from_u128(99);
        let m = file_with(Some(header(3)), Some(other));
        assert!(matches!(
            read_headers(&m).unwrap_err().corruption(),
            Some(Corruption::HeaderSequenceTie { sequence: 3 })
        ));
    }

    #[test]
    fn update_writes_both_slots() {
        let m = file_with(Some(header(1)), Some(header(2)));
        let mut hs = read_headers(&m).unwrap();
        let mut new = hs.current;
        new.log_guid = Uuid::from_u128(77);
        hs.update(&m, new).unwrap();
        assert_eq!(hs.current.sequence_number, 4);
        let again = read_headers(&m).unwrap();
        assert_eq!(again.current.sequence_number, 4);
        assert_eq!(again.current.log_guid, Uuid::from_u128(77));
    }

    #[test]
    fn sequence_overflow_is_an_error() {
        let m = file_with(Some(header(u64::MAX)), Some(header(1)));
        let mut hs = read_headers(&m).unwrap();
        let cur = hs.current;
        assert!(matches!(
            hs.update(&m, cur).unwrap_err().corruption(),
            Some(Corruption::HeaderSequenceOverflow(_))
        ));
    }
}
