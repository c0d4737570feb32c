//! The metadata region ([MS-VHDX] §2.6): the table of items and the known system items
//! (file parameters, virtual disk size and id, sector sizes, parent locator).

use uuid::Uuid;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, IntoBytes};

use super::error::{Corruption, Error, Result};
use super::format::*;
use super::locator::ParentLocator;
use super::region::Region;
use super::storage::Storage;

/// One entry of the metadata table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataItem {
    pub item_id: Uuid,
    /// From the start of the metadata region.
    pub offset: u32,
    pub length: u32,
    pub is_user: bool,
    pub is_virtual_disk: bool,
    pub is_required: bool,
}

impl MetadataItem {
    fn flags(&self) -> u32 {
        (u32::from(self.is_user) * METADATA_FLAG_IS_USER)
            | (u32::from(self.is_virtual_disk) * METADATA_FLAG_IS_VIRTUAL_DISK)
            | (u32::from(self.is_required) * METADATA_FLAG_IS_REQUIRED)
    }
}

/// The facts the known items hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_block_allocated: bool,
    pub has_parent: bool,
    pub virtual_disk_size: u64,
    pub virtual_disk_id: Uuid,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub parent_locator: Option<ParentLocator>,
    /// Every table entry, unknown items included, so a rewrite keeps them.
    pub items: Vec<MetadataItem>,
}

const KNOWN_ITEMS: [(Uuid, &str); 6] = [
    (FILE_PARAMETERS_GUID, "file parameters"),
    (VIRTUAL_DISK_SIZE_GUID, "virtual disk size"),
    (VIRTUAL_DISK_ID_GUID, "virtual disk id"),
    (LOGICAL_SECTOR_SIZE_GUID, "logical sector size"),
    (PHYSICAL_SECTOR_SIZE_GUID, "physical sector size"),
    (PARENT_LOCATOR_GUID, "parent locator"),
];

/// Parses the 64 KiB metadata table at the start of the region.
pub fn parse_table(table: &[u8], region: &Region) -> Result<Vec<MetadataItem>> {
    let header = MetadataTableHeader::read_from_prefix(table)
        .expect("64K > 32")
        .0;
    if &header.signature != SIG_METADATA {
        return Err(Corruption::BadMetadataSignature {
            offset: region.file_offset,
        }
        .into());
    }
    let count = header.entry_count.get();
    if count > METADATA_TABLE_MAX_ENTRIES {
        return Err(Corruption::MetadataTooManyEntries {
            offset: region.file_offset,
            count,
        }
        .into());
    }
    let mut items: Vec<MetadataItem> = Vec::with_capacity(usize::from(count));
    for i in 0..usize::from(count) {
        let e = MetadataTableEntry::read_from_prefix(&table[32 + i * 32..])
            .expect("in table")
            .0;
        let flags = e.flags.get();
        let item = MetadataItem {
            item_id: guid_from_disk(e.item_id),
            offset: e.offset.get(),
            length: e.length.get(),
            is_user: flags & METADATA_FLAG_IS_USER != 0,
            is_virtual_disk: flags & METADATA_FLAG_IS_VIRTUAL_DISK != 0,
            is_required: flags & METADATA_FLAG_IS_REQUIRED != 0,
        };
        let out_of_region = || Corruption::MetadataItemOutOfRegion {
            item: item.item_id,
            offset: item.offset,
            length: item.length,
            region_length: region.length,
        };
        if item.length == 0 {
            if item.offset != 0 {
                return Err(out_of_region().into());
            }
        } else {
            let end = u64::from(item.offset) + u64::from(item.length);
            if u64::from(item.offset) < METADATA_TABLE_SIZE as u64
                || item.length > METADATA_ITEM_MAX_LENGTH
                || end > region.length
            {
                return Err(out_of_region().into());
            }
        }
        if items
            .iter()
            .any(|o| o.item_id == item.item_id && o.is_user == item.is_user)
        {
            return Err(Corruption::DuplicateMetadataItem(item.item_id).into());
        }
        let known = !item.is_user && KNOWN_ITEMS.iter().any(|(g, _)| *g == item.item_id);
        if item.is_required && !known {
            return Err(Error::Unsupported(format!(
                "unknown required metadata item {}",
                item.item_id
            )));
        }
        items.push(item);
    }
    if items.iter().filter(|i| i.is_user).count() > METADATA_MAX_USER_ENTRIES {
        return Err(Corruption::TooManyUserMetadata.into());
    }
    // Items must not overlap each other.
    let mut spans: Vec<_> = items.iter().filter(|i| i.length > 0).collect();
    spans.sort_by_key(|i| i.offset);
    for pair in spans.windows(2) {
        if u64::from(pair[0].offset) + u64::from(pair[0].length) > u64::from(pair[1].offset) {
            return Err(Corruption::Overlap {
                a: format!("metadata item {}", pair[0].item_id),
                b: format!("metadata item {}", pair[1].item_id),
            }
            .into());
        }
    }
    Ok(items)
}

/// Reads the metadata region and every known item.
pub fn read_metadata(storage: &dyn Storage, region: &Region) -> Result<Metadata> {
    let mut table = vec![0u8; METADATA_TABLE_SIZE];
    storage
        .read_at(&mut table, region.file_offset)
        .map_err(|e| Error::io("reading the metadata table", e))?;
    let items = parse_table(&table, region)?;

    let read_item = |id: Uuid, name: &'static str| -> Result<Option<Vec<u8>>> {
        let Some(item) = items.iter().find(|i| i.item_id == id && !i.is_user) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; item.length as usize];
        storage
            .read_at(&mut buf, region.file_offset + u64::from(item.offset))
            .map_err(|e| Error::io(format!("reading the {name} metadata item"), e))?;
        Ok(Some(buf))
    };
    let fixed = |id: Uuid, name: &'static str, len: u32| -> Result<Vec<u8>> {
        let buf = read_item(id, name)?.ok_or(Corruption::MissingMetadataItem(name))?;
        if buf.len() != len as usize {
            return Err(Corruption::MetadataItemLength {
                item: name,
                length: buf.len() as u32,
                expected: len,
            }
            .into());
        }
        Ok(buf)
    };

    let fp = FileParameters::read_from_bytes(&fixed(FILE_PARAMETERS_GUID, "file parameters", 8)?)
        .expect("8 bytes");
    let block_size = fp.block_size.get();
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Corruption::BadBlockSize(block_size).into());
    }
    let flags = fp.flags.get();
    if flags & !(FILE_PARAM_LEAVE_BLOCK_ALLOCATED | FILE_PARAM_HAS_PARENT) != 0 {
        return Err(Corruption::FileParameterReservedBits(flags).into());
    }
    let has_parent = flags & FILE_PARAM_HAS_PARENT != 0;

    let u32_item = |id, name| -> Result<u32> {
        Ok(u32::from_le_bytes(
            fixed(id, name, 4)?.try_into().expect("4 bytes"),
        ))
    };
    let logical_sector_size = u32_item(LOGICAL_SECTOR_SIZE_GUID, "logical sector size")?;
    let physical_sector_size = u32_item(PHYSICAL_SECTOR_SIZE_GUID, "physical sector size")?;
    for (which, size) in [
        ("logical", logical_sector_size),
        ("physical", physical_sector_size),
    ] {
        if size != 512 && size != 4096 {
            return Err(Corruption::BadSectorSize { which, size }.into());
        }
    }
    let virtual_disk_size = u64::from_le_bytes(
        fixed(VIRTUAL_DISK_SIZE_GUID, "virtual disk size", 8)?
            .try_into()
            .expect("8 bytes"),
    );
    if virtual_disk_size == 0
        || virtual_disk_size > MAX_VIRTUAL_DISK_SIZE
        || virtual_disk_size % u64::from(logical_sector_size) != 0
    {
        return Err(Corruption::BadVirtualDiskSize {
            size: virtual_disk_size,
            sector_size: logical_sector_size,
        }
        .into());
    }
    let virtual_disk_id = guid_from_disk(
        fixed(VIRTUAL_DISK_ID_GUID, "virtual disk id", 16)?
            .try_into()
            .expect("16 bytes"),
    );
    let parent_locator = match (
        read_item(PARENT_LOCATOR_GUID, "parent locator")?,
        has_parent,
    ) {
        (Some(bytes), true) => Some(ParentLocator::parse(&bytes)?),
        (None, true) => return Err(Corruption::MissingParentLocator.into()),
        (Some(_), false) => return Err(Corruption::UnexpectedParentLocator.into()),
        (None, false) => None,
    };
    Ok(Metadata {
        block_size,
        leave_block_allocated: flags & FILE_PARAM_LEAVE_BLOCK_ALLOCATED != 0,
        has_parent,
        virtual_disk_size,
        virtual_disk_id,
        logical_sector_size,
        physical_sector_size,
        parent_locator,
        items,
    })
}

/// Builds the contents of a metadata region (table plus items) for a new file.
pub fn build_region(meta: &Metadata, region_length: u64) -> Result<Vec<u8>> {
    let mut region = vec![0u8; region_length as usize];
    let mut items: Vec<(MetadataItem, Vec<u8>)> = Vec::new();
    let mut push = |id: Uuid, virtual_disk: bool, data: Vec<u8>| {
        items.push((
            MetadataItem {
                item_id: id,
                offset: 0,
                length: data.len() as u32,
                is_user: false,
                is_virtual_disk: virtual_disk,
                is_required: true,
            },
            data,
        ));
    };
    let flags = (u32::from(meta.leave_block_allocated) * FILE_PARAM_LEAVE_BLOCK_ALLOCATED)
        | (u32::from(meta.has_parent) * FILE_PARAM_HAS_PARENT);
    let fp = FileParameters {
        block_size: U32::new(meta.block_size),
        flags: U32::new(flags),
    };
    push(FILE_PARAMETERS_GUID, false, fp.as_bytes().to_vec());
    push(
        VIRTUAL_DISK_SIZE_GUID,
        true,
        meta.virtual_disk_size.to_le_bytes().to_vec(),
    );
    push(
        VIRTUAL_DISK_ID_GUID,
        true,
        guid_to_disk(meta.virtual_disk_id).to_vec(),
    );
    push(
        LOGICAL_SECTOR_SIZE_GUID,
        true,
        meta.logical_sector_size.to_le_bytes().to_vec(),
    );
    push(
        PHYSICAL_SECTOR_SIZE_GUID,
        true,
        meta.physical_sector_size.to_le_bytes().to_vec(),
    );
    if let Some(locator) = &meta.parent_locator {
        push(PARENT_LOCATOR_GUID, false, locator.to_bytes()?);
    }
    let header = MetadataTableHeader {
        signature: *SIG_METADATA,
        reserved: U16::new(0),
        entry_count: U16::new(items.len() as u16),
        reserved2: [0; 20],
    };
    header.write_to_prefix(&mut region[..]).expect("fits");
    let mut next = METADATA_TABLE_SIZE;
    for (i, (item, data)) in items.iter_mut().enumerate() {
        item.offset = next as u32;
        if next + data.len() > region.len() {
            return Err(Error::InvalidArgument(
                "metadata items do not fit the metadata region".into(),
            ));
        }
        region[next..next + data.len()].copy_from_slice(data);
        next += data.len();
        let e = MetadataTableEntry {
            item_id: guid_to_disk(item.item_id),
            offset: U32::new(item.offset),
            length: U32::new(item.length),
            flags: U32::new(item.flags()),
            reserved2: U32::new(0),
        };
        e.write_to_prefix(&mut region[32 + i * 32..]).expect("fits");
    }
    Ok(region)
}
