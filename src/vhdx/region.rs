//! Region tables ([MS-VHDX] §2.2.3): where the BAT, the metadata region and any other regions
//! live. Regions are found by GUID, never by position or by the Required flag (qemu writes
//! Required = 0 for both known regions).

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use uuid::Uuid;

use super::error::{Corruption, Error, Result};
use super::format::*;
use super::storage::Storage;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub guid: Uuid,
    pub file_offset: u64,
    pub length: u64,
    pub required: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionTable {
    /// Every region in table order, unknown ones included (they are kept when rewriting).
    pub regions: Vec<Region>,
    /// Which copy was read: 0 or 1.
    pub copy: usize,
}

impl RegionTable {
    pub fn find(&self, guid: Uuid) -> Option<&Region> {
        self.regions.iter().find(|r| r.guid == guid)
    }

    pub fn bat(&self) -> Region {
        *self.find(BAT_REGION_GUID).expect("validated at parse")
    }

    pub fn metadata(&self) -> Region {
        *self.find(METADATA_REGION_GUID).expect("validated at parse")
    }

    /// The 64 KiB on-disk form, checksum stamped.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        let header = RegionTableHeader {
            signature: *SIG_REGION,
            checksum: U32::new(0),
            entry_count: U32::new(self.regions.len() as u32),
            reserved: U32::new(0),
        };
        header.write_to_prefix(&mut buf[..]).expect("fits");
        for (i, r) in self.regions.iter().enumerate() {
            let e = RegionTableEntry {
                guid: guid_to_disk(r.guid),
                file_offset: U64::new(r.file_offset),
                length: U32::new(r.length as u32),
                required: U32::new(u32::from(r.required)),
            };
            let at = 16 + i * 32;
            e.write_to_prefix(&mut buf[at..]).expect("fits");
        }
        stamp_checksum(&mut buf, REGION_TABLE_CHECKSUM_OFFSET);
        buf
    }
}

/// Parses one 64 KiB region table. The outer `Err` means the table is damaged (signature or
/// checksum), so the other copy may be tried; the inner result judges the contents of an intact
/// table, which are the file's real contents and are not second-guessed.
fn parse_table(
    buf: &[u8],
    offset: u64,
    copy: usize,
) -> std::result::Result<Result<RegionTable>, String> {
    let header = RegionTableHeader::read_from_prefix(buf)
        .expect("64K > 16")
        .0;
    if &header.signature != SIG_REGION {
        return Err("bad signature".into());
    }
    if !checksum_matches(buf, REGION_TABLE_CHECKSUM_OFFSET) {
        return Err("bad checksum".into());
    }
    Ok(parse_entries(buf, offset, copy, header.entry_count.get()))
}

fn parse_entries(buf: &[u8], offset: u64, copy: usize, count: u32) -> Result<RegionTable> {
    if count > REGION_TABLE_MAX_ENTRIES {
        return Err(Corruption::RegionTableTooManyEntries { offset, count }.into());
    }
    let mut regions: Vec<Region> = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let at = 16 + i * 32;
        let e = RegionTableEntry::read_from_prefix(&buf[at..])
            .expect("in table")
            .0;
        let region = Region {
            guid: guid_from_disk(e.guid),
            file_offset: e.file_offset.get(),
            length: u64::from(e.length.get()),
            required: e.required.get() & 1 != 0,
        };
        if regions.iter().any(|r| r.guid == region.guid) {
            return Err(Corruption::DuplicateRegion { guid: region.guid }.into());
        }
        let known = region.guid == BAT_REGION_GUID || region.guid == METADATA_REGION_GUID;
        if !known && region.required {
            return Err(Error::Unsupported(format!(
                "region table at {offset:#x}: unknown required region {}",
                region.guid
            )));
        }
        regions.push(region);
    }
    for (guid, name) in [(BAT_REGION_GUID, "BAT"), (METADATA_REGION_GUID, "metadata")] {
        if !regions.iter().any(|r| r.guid == guid) {
            return Err(Corruption::MissingRegion(name).into());
        }
    }
    Ok(RegionTable { regions, copy })
}

/// Reads the region table, falling back to the second copy when the first is damaged, and
/// checks every region's placement against the file, the header section, the log and the other
/// regions.
pub fn read_region_table(
    storage: &dyn Storage,
    file_size: u64,
    log: Option<(u64, u64)>,
) -> Result<RegionTable> {
    let mut reasons = Vec::new();
    let mut table = None;
    for (copy, offset) in REGION_TABLE_OFFSETS.into_iter().enumerate() {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        storage
            .read_at(&mut buf, offset)
            .map_err(|e| Error::io(format!("reading the region table at {offset:#x}"), e))?;
        match parse_table(&buf, offset, copy) {
            Ok(t) => {
                table = Some(t?);
                break;
            }
            Err(reason) => reasons.push(reason),
        }
    }
    let table = table.ok_or_else(|| Corruption::NoValidRegionTable {
        first: reasons.first().cloned().unwrap_or_default(),
        second: reasons.get(1).cloned().unwrap_or_default(),
    })?;
    validate_placement(&table, file_size, log)?;
    Ok(table)
}

fn region_name(guid: Uuid) -> String {
    if guid == BAT_REGION_GUID {
        "BAT region".into()
    } else if guid == METADATA_REGION_GUID {
        "metadata region".into()
    } else {
        format!("region {guid}")
    }
}

fn validate_placement(table: &RegionTable, file_size: u64, log: Option<(u64, u64)>) -> Result<()> {
    for (i, r) in table.regions.iter().enumerate() {
        if !is_aligned(r.file_offset, MIB)
            || !is_aligned(r.length, MIB)
            || r.file_offset < HEADER_SECTION_SIZE
            || r.length == 0
        {
            return Err(Corruption::RegionMisaligned {
                guid: r.guid,
                offset: r.file_offset,
                length: r.length,
            }
            .into());
        }
        let end = r.file_offset.checked_add(r.length);
        if end.is_none_or(|end| end > file_size) {
            return Err(Corruption::BeyondEndOfFile {
                what: region_name(r.guid),
                offset: r.file_offset,
                length: r.length,
                file_size,
            }
            .into());
        }
        if let Some((log_offset, log_length)) = log {
            if ranges_overlap(r.file_offset, r.length, log_offset, log_length) {
                return Err(Corruption::Overlap {
                    a: format!("{} at {:#x}", region_name(r.guid), r.file_offset),
                    b: format!("the log at {log_offset:#x}"),
                }
                .into());
            }
        }
        for other in &table.regions[..i] {
            if ranges_overlap(r.file_offset, r.length, other.file_offset, other.length) {
                return Err(Corruption::Overlap {
                    a: format!("{} at {:#x}", region_name(r.guid), r.file_offset),
                    b: format!("{} at {:#x}", region_name(other.guid), other.file_offset),
                }
                .into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhdx::storage::MemStorage;

    fn table(regions: Vec<Region>) -> RegionTable {
        RegionTable { regions, copy: 0 }
    }

    fn known(bat: u64, meta: u64) -> Vec<Region> {
        vec![
            Region {
                guid: BAT_REGION_GUID,
                file_offset: bat,
                length: MIB,
                required: true,
            },
            Region {
                guid: METADATA_REGION_GUID,
                file_offset: meta,
                length: MIB,
                required: true,
            },
        ]
    }

    fn storage_with(t: &RegionTable, copies: [bool; 2]) -> MemStorage {
        let m = MemStorage::new(vec![0; 8 * MIB as usize]);
        for (i, on) in copies.into_iter().enumerate() {
            if on {
                m.write_at(&t.to_bytes(), REGION_TABLE_OFFSETS[i]).unwrap();
            }
        }
        m
    }

    #[test]
    fn round_trip_and_fallback_to_the_copy() {
        let t = table(known(2 * MIB, 3 * MIB));
        let m = storage_with(&t, [false, true]);
        let got = read_region_table(&m, 8 * MIB, Some((MIB, MIB))).unwrap();
        assert_eq!(got.regions, t.regions);
        assert_eq!(got.copy, 1);
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let t = table(known(2 * MIB, 2 * MIB));
        let m = storage_with(&t, [true, true]);
        let err = read_region_table(&m, 8 * MIB, None).unwrap_err();
        assert!(
            matches!(err.corruption(), Some(Corruption::Overlap { .. })),
            "{err}"
        );
    }

    #[test]
    fn region_overlapping_the_log_is_refused() {
        let t = table(known(2 * MIB, 3 * MIB));
        let m = storage_with(&t, [true, true]);
        let err = read_region_table(&m, 8 * MIB, Some((3 * MIB, MIB))).unwrap_err();
        assert!(
            matches!(err.corruption(), Some(Corruption::Overlap { .. })),
            "{err}"
        );
    }

    #[test]
    fn unknown_required_region_is_refused_unknown_optional_kept() {
        let mut regions = known(2 * MIB, 3 * MIB);
        regions.push(Region {
            guid: Uuid::from_u128(5),
            file_offset: 4 * MIB,
            length: MIB,
            required: false,
        });
        let m = storage_with(&table(regions.clone()), [true, true]);
        assert_eq!(
            read_region_table(&m, 8 * MIB, None).unwrap().regions.len(),
            3
        );
        regions[2].required = true;
        let m = storage_with(&table(regions), [true, true]);
        assert!(matches!(
            read_region_table(&m, 8 * MIB, None),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn region_beyond_end_of_file_is_refused() {
        let m = storage_with(&table(known(2 * MIB, 30 * MIB)), [true, true]);
        let err = read_region_table(&m, 8 * MIB, None).unwrap_err();
        assert!(matches!(
            err.corruption(),
            Some(Corruption::BeyondEndOfFile { .. })
        ));
    }
}
