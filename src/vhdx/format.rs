//! On-disk structures, signatures, GUIDs and constants of the VHDX format ([MS-VHDX] §2).
//!
//! Every integer is little-endian and every structure is byte-aligned, so the structs use
//! zerocopy's little-endian wrapper types and can be read from or written to any byte offset.
//! GUIDs are kept as the raw 16 on-disk bytes (Microsoft mixed-endian order) and converted with
//! `Uuid::from_bytes_le` / `to_bytes_le` at the edges.

use uuid::Uuid;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

/// The header section: file identifier, two headers, two region tables (§2.1).
pub const HEADER_SECTION_SIZE: u64 = MIB;
pub const FILE_IDENTIFIER_OFFSET: u64 = 0;
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// Bytes covered by a header's checksum.
pub const HEADER_SIZE: usize = 4096;
/// Bytes covered by a region table's checksum.
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
pub const REGION_TABLE_MAX_ENTRIES: u32 = 2047;
/// The metadata table occupies the first 64 KiB of the metadata region.
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
pub const METADATA_TABLE_MAX_ENTRIES: u16 = 2047;
pub const METADATA_MAX_USER_ENTRIES: usize = 1024;
pub const METADATA_ITEM_MAX_LENGTH: u32 = MIB as u32;
/// Every object after the header section is placed on a 1 MiB boundary (§2.1).
pub const OBJECT_ALIGNMENT: u64 = MIB;
pub const MIN_BLOCK_SIZE: u32 = MIB as u32;
pub const MAX_BLOCK_SIZE: u32 = 256 * MIB as u32;
pub const MAX_VIRTUAL_DISK_SIZE: u64 = 64 * TIB;
/// A sector bitmap block covers 2^23 sectors with one bit each (§2.5.1).
pub const SECTOR_BITMAP_BLOCK_SIZE: u64 = MIB;
pub const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;
/// The log is written in 4 KiB sectors (§2.3).
pub const LOG_SECTOR_SIZE: usize = 4096;

pub const SIG_FILE: &[u8; 8] = b"vhdxfile";
pub const SIG_HEADER: &[u8; 4] = b"head";
pub const SIG_REGION: &[u8; 4] = b"regi";
pub const SIG_METADATA: &[u8; 8] = b"metadata";
pub const SIG_LOG_ENTRY: &[u8; 4] = b"loge";
pub const SIG_ZERO_DESC: &[u8; 4] = b"zero";
pub const SIG_DATA_DESC: &[u8; 4] = b"desc";
pub const SIG_DATA_SECTOR: &[u8; 4] = b"data";

pub const BAT_REGION_GUID: Uuid = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
pub const METADATA_REGION_GUID: Uuid = Uuid::from_u128(0x8B7CA206_4790_4B9A_B8FE_575F050F886E);

pub const FILE_PARAMETERS_GUID: Uuid = Uuid::from_u128(0xCAA16737_FA36_4D43_B3B6_33F0AA44E76B);
pub const VIRTUAL_DISK_SIZE_GUID: Uuid = Uuid::from_u128(0x2FA54224_CD1B_4876_B211_5DBED83BF4B8);
pub const VIRTUAL_DISK_ID_GUID: Uuid = Uuid::from_u128(0xBECA12AB_B2E6_4523_93EF_C309E000C746);
pub const LOGICAL_SECTOR_SIZE_GUID: Uuid = Uuid::from_u128(0x8141BF1D_A96F_4709_BA47_F233A8FAAB5F);
pub const PHYSICAL_SECTOR_SIZE_GUID: Uuid = Uuid::from_u128(0xCDA348C7_445D_4471_9CC9_E9885251C556);
pub const PARENT_LOCATOR_GUID: Uuid = Uuid::from_u128(0xA8D35F2D_B30B_454D_ABF7_D3D84834AB0C);
/// The only parent locator type defined: a VHDX parent (§2.6.2.6).
pub const VHDX_LOCATOR_TYPE_GUID: Uuid = Uuid::from_u128(0xB04AEFB7_D19E_4A81_B789_25B8E9445913);

/// A GUID as stored on disk (mixed-endian, §8.1 of the notes).
pub fn guid_from_disk(bytes: [u8; 16]) -> Uuid {
    Uuid::from_bytes_le(bytes)
}

pub fn guid_to_disk(guid: Uuid) -> [u8; 16] {
    guid.to_bytes_le()
}

/// CRC-32C of `buf` as if the 4 bytes at `checksum_offset` were zero (§2.2.2, §2.3.1.1).
pub fn checksum_with_field_zeroed(buf: &[u8], checksum_offset: usize) -> u32 {
    let before = &buf[..checksum_offset];
    let after = &buf[checksum_offset + 4..];
    let crc = crc32c::crc32c(before);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, after)
}

/// Writes the CRC-32C of `buf` into its checksum field.
pub fn stamp_checksum(buf: &mut [u8], checksum_offset: usize) {
    let crc = checksum_with_field_zeroed(buf, checksum_offset);
    buf[checksum_offset..checksum_offset + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Reads the checksum stored in `buf` and compares it with the computed one.
pub fn checksum_matches(buf: &[u8], checksum_offset: usize) -> bool {
    let stored = u32::from_le_bytes(
        buf[checksum_offset..checksum_offset + 4]
            .try_into()
            .expect("4-byte slice"),
    );
    stored == checksum_with_field_zeroed(buf, checksum_offset)
}

/// The 80 meaningful bytes of a header (§2.2.2); the remaining 4016 bytes are reserved.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    pub signature: [u8; 4],
    pub checksum: U32,
    pub sequence_number: U64,
    pub file_write_guid: [u8; 16],
    pub data_write_guid: [u8; 16],
    pub log_guid: [u8; 16],
    pub log_version: U16,
    pub version: U16,
    pub log_length: U32,
    pub log_offset: U64,
}
pub const HEADER_CHECKSUM_OFFSET: usize = 4;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RegionTableHeader {
    pub signature: [u8; 4],
    pub checksum: U32,
    pub entry_count: U32,
    pub reserved: U32,
}
pub const REGION_TABLE_CHECKSUM_OFFSET: usize = 4;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RegionTableEntry {
    pub guid: [u8; 16],
    pub file_offset: U64,
    pub length: U32,
    pub required: U32,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct MetadataTableHeader {
    pub signature: [u8; 8],
    pub reserved: U16,
    pub entry_count: U16,
    pub reserved2: [u8; 20],
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct MetadataTableEntry {
    pub item_id: [u8; 16],
    pub offset: U32,
    pub length: U32,
    pub flags: U32,
    pub reserved2: U32,
}
pub const METADATA_FLAG_IS_USER: u32 = 1;
pub const METADATA_FLAG_IS_VIRTUAL_DISK: u32 = 2;
pub const METADATA_FLAG_IS_REQUIRED: u32 = 4;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FileParameters {
    pub block_size: U32,
    pub flags: U32,
}
pub const FILE_PARAM_LEAVE_BLOCK_ALLOCATED: u32 = 1;
pub const FILE_PARAM_HAS_PARENT: u32 = 2;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ParentLocatorHeader {
    pub locator_type: [u8; 16],
    pub reserved: U16,
    pub key_value_count: U16,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ParentLocatorEntry {
    pub key_offset: U32,
    pub value_offset: U32,
    pub key_length: U16,
    pub value_length: U16,
}

/// The 64-byte header at the start of a log entry (§2.3.1.1).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct LogEntryHeader {
    pub signature: [u8; 4],
    pub checksum: U32,
    pub entry_length: U32,
    pub tail: U32,
    pub sequence_number: U64,
    pub descriptor_count: U32,
    pub reserved: U32,
    pub log_guid: [u8; 16],
    pub flushed_file_offset: U64,
    pub last_file_offset: U64,
}
pub const LOG_ENTRY_CHECKSUM_OFFSET: usize = 4;

/// A zero or data descriptor (§2.3.1.2, §2.3.1.3): both are 32 bytes and share the layout of the
/// signature and the trailing sequence number.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct LogDescriptor {
    pub signature: [u8; 4],
    /// Zero descriptor: reserved. Data descriptor: bytes 4092..4096 of the sector.
    pub trailing_bytes: [u8; 4],
    /// Zero descriptor: ZeroLength. Data descriptor: bytes 0..8 of the sector.
    pub leading_bytes: [u8; 8],
    pub file_offset: U64,
    pub sequence_number: U64,
}

/// A 4 KiB log data sector (§2.3.1.4).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct LogDataSector {
    pub signature: [u8; 4],
    pub sequence_high: U32,
    pub data: [u8; 4084],
    pub sequence_low: U32,
}

pub const LOG_ENTRY_HEADER_SIZE: usize = 64;
pub const LOG_DESCRIPTOR_SIZE: usize = 32;

/// Payload block states (§2.5.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PayloadBlockState {
    NotPresent,
    Undefined,
    Zero,
    /// Value 3, or 5 from the v0.95 draft (read as 3, never written).
    Unmapped,
    FullyPresent,
    PartiallyPresent,
}

impl PayloadBlockState {
    pub fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0 => Self::NotPresent,
            1 => Self::Undefined,
            2 => Self::Zero,
            3 | 5 => Self::Unmapped,
            6 => Self::FullyPresent,
            7 => Self::PartiallyPresent,
            _ => return None,
        })
    }

    pub fn bits(self) -> u8 {
        match self {
            Self::NotPresent => 0,
            Self::Undefined => 1,
            Self::Zero => 2,
            Self::Unmapped => 3,
            Self::FullyPresent => 6,
            Self::PartiallyPresent => 7,
        }
    }

    /// States whose FileOffsetMB locates data in this file.
    pub fn has_data(self) -> bool {
        matches!(self, Self::FullyPresent | Self::PartiallyPresent)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::NotPresent => "not_present",
            Self::Undefined => "undefined",
            Self::Zero => "zero",
            Self::Unmapped => "unmapped",
            Self::FullyPresent => "fully_present",
            Self::PartiallyPresent => "partially_present",
        }
    }
}

pub const SB_BLOCK_NOT_PRESENT: u8 = 0;
pub const SB_BLOCK_PRESENT: u8 = 6;

/// A BAT entry: state in bits 0–2, FileOffsetMB in bits 20–63 (§2.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatEntry(pub u64);

impl BatEntry {
    const STATE_MASK: u64 = 0x7;
    const OFFSET_MASK: u64 = 0xFFFF_FFFF_FFF0_0000;

    pub fn new(state_bits: u8, file_offset: u64) -> Self {
        debug_assert_eq!(file_offset % MIB, 0);
        BatEntry((file_offset & Self::OFFSET_MASK) | u64::from(state_bits & 7))
    }

    pub fn state_bits(self) -> u8 {
        (self.0 & Self::STATE_MASK) as u8
    }

    pub fn file_offset(self) -> u64 {
        self.0 & Self::OFFSET_MASK
    }

    pub fn reserved_bits(self) -> u64 {
        self.0 & !(Self::OFFSET_MASK | Self::STATE_MASK)
    }
}

pub fn is_aligned(value: u64, alignment: u64) -> bool {
    value % alignment == 0
}

pub fn align_up(value: u64, alignment: u64) -> Option<u64> {
    value
        .checked_add(alignment - 1)
        .map(|v| v / alignment * alignment)
}

/// `[a, a+alen)` and `[b, b+blen)` share at least one byte.
pub fn ranges_overlap(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn structure_sizes_match_the_spec() {
        assert_eq!(size_of::<RawHeader>(), 80);
        assert_eq!(size_of::<RegionTableHeader>(), 16);
        assert_eq!(size_of::<RegionTableEntry>(), 32);
        assert_eq!(size_of::<MetadataTableHeader>(), 32);
        assert_eq!(size_of::<MetadataTableEntry>(), 32);
        assert_eq!(size_of::<FileParameters>(), 8);
        assert_eq!(size_of::<ParentLocatorHeader>(), 20);
        assert_eq!(size_of::<ParentLocatorEntry>(), 12);
        assert_eq!(size_of::<LogEntryHeader>(), LOG_ENTRY_HEADER_SIZE);
        assert_eq!(size_of::<LogDescriptor>(), LOG_DESCRIPTOR_SIZE);
        assert_eq!(size_of::<LogDataSector>(), LOG_SECTOR_SIZE);
    }

    #[test]
    fn guids_are_stored_mixed_endian() {
        assert_eq!(
            guid_to_disk(BAT_REGION_GUID),
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
        assert_eq!(
            guid_to_disk(PARENT_LOCATOR_GUID),
            [
                0x2D, 0x5F, 0xD3, 0xA8, 0x0B, 0xB3, 0x4D, 0x45, 0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34,
                0xAB, 0x0C
            ]
        );
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn checksum_ignores_the_field_itself() {
        let mut buf = vec![7u8; 64];
        stamp_checksum(&mut buf, 4);
        assert!(checksum_matches(&buf, 4));
        buf[10] ^= 1;
        assert!(!checksum_matches(&buf, 4));
    }

    #[test]
    fn bat_entry_fields() {
        let e = BatEntry(0x0000_0000_0370_0006);
        assert_eq!(e.state_bits(), 6);
        assert_eq!(e.file_offset(), 0x370_0000);
        assert_eq!(BatEntry::new(6, 55 * MIB).0, (55 << 20) | 6);
        assert_eq!(
            PayloadBlockState::from_bits(5),
            Some(PayloadBlockState::Unmapped)
        );
        assert_eq!(PayloadBlockState::from_bits(4), None);
    }

    #[test]
    fn overlap_is_symmetric_and_exclusive_at_ends() {
        assert!(!ranges_overlap(0, 10, 10, 10));
        assert!(ranges_overlap(0, 11, 10, 10));
        assert!(ranges_overlap(10, 10, 0, 11));
        assert!(ranges_overlap(0, 100, 10, 1));
    }
}
