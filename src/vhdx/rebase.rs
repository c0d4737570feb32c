//! Rewriting a differencing file's parent locator: `rebase -u` (the parent moved), and the
//! steps of a commit that record the parent's future identity (`parent_linkage2`) or point a
//! child at a new parent.
//!
//! The locator lives in the metadata region, which only ever changes through the log: the new
//! item and its table entry are logged together in one entry, so a crash leaves the old locator
//! or the new one, never a mix. The item is rewritten where it is when the new one fits there,
//! and otherwise moved to free space in the region (the old bytes are then simply unused).

use std::path::Path;

use uuid::Uuid;
use zerocopy::FromBytes;

use super::create::{relative_path, resolved};
use super::error::{Error, Result};
use super::file::{DataWriteGuid, VhdxFile};
use super::format::*;
use super::locator::{self, ParentLocator};

const PAGE: u64 = LOG_SECTOR_SIZE as u64;

/// The locator of `child` with its paths pointing at `parent_path` (relative_path and
/// absolute_win32_path, as `create -b` writes them) and its linkages set to `linkage` and, if
/// given, `linkage2`. Other keys (volume_path excepted: it named the old place) are kept.
pub fn relinked(
    child: &VhdxFile,
    parent_path: &Path,
    linkage: Uuid,
    linkage2: Option<Uuid>,
) -> Result<ParentLocator> {
    let abs_parent = resolved(parent_path)?;
    let abs_child = resolved(child.path())?;
    let child_dir = abs_child.parent().unwrap_or(Path::new("/"));
    let windows = |p: &Path| p.to_string_lossy().replace('/', "\\");
    let mut entries = vec![(
        locator::KEY_PARENT_LINKAGE.to_string(),
        locator::format_guid_string(linkage),
    )];
    if let Some(l2) = linkage2 {
        entries.push((
            locator::KEY_PARENT_LINKAGE2.to_string(),
            locator::format_guid_string(l2),
        ));
    }
    if let Some(rel) = relative_path(child_dir, &abs_parent) {
        entries.push((locator::KEY_RELATIVE_PATH.to_string(), windows(&rel)));
    }
    entries.push((
        locator::KEY_ABSOLUTE_WIN32_PATH.to_string(),
        format!(r"\\?\{}", windows(&abs_parent)),
    ));
    if let Some(old) = &child.metadata.parent_locator {
        const REPLACED: [&str; 5] = [
            locator::KEY_PARENT_LINKAGE,
            locator::KEY_PARENT_LINKAGE2,
            locator::KEY_RELATIVE_PATH,
            locator::KEY_ABSOLUTE_WIN32_PATH,
            locator::KEY_VOLUME_PATH,
        ];
        for (k, v) in &old.entries {
            if !REPLACED.contains(&k.as_str()) {
                entries.push((k.clone(), v.clone()));
            }
        }
    }
    Ok(ParentLocator { entries })
}

/// The locator of `child` with only its linkages changed.
pub fn with_linkages(
    child: &VhdxFile,
    linkage: Uuid,
    linkage2: Option<Uuid>,
) -> Result<ParentLocator> {
    let old = child.metadata.parent_locator.as_ref().ok_or_else(|| {
        Error::InvalidArgument(format!("{} has no parent", child.path().display()))
    })?;
    let mut entries = vec![(
        locator::KEY_PARENT_LINKAGE.to_string(),
        locator::format_guid_string(linkage),
    )];
    if let Some(l2) = linkage2 {
        entries.push((
            locator::KEY_PARENT_LINKAGE2.to_string(),
            locator::format_guid_string(l2),
        ));
    }
    entries.extend(
        old.entries
            .iter()
            .filter(|(k, _)| k != locator::KEY_PARENT_LINKAGE && k != locator::KEY_PARENT_LINKAGE2)
            .cloned(),
    );
    Ok(ParentLocator { entries })
}

/// Replaces the parent locator of a writable differencing file through its log; durable once
/// this returns (the file is flushed).
pub fn set_parent_locator(file: &mut VhdxFile, new: ParentLocator) -> Result<()> {
    let writer = file.writer()?;
    let bytes = new.to_bytes()?;
    let region = file.regions.metadata();
    let (index, _) = file
        .metadata
        .items
        .iter()
        .enumerate()
        .find(|(_, i)| i.item_id == PARENT_LOCATOR_GUID && !i.is_user)
        .map(|(n, i)| (n, *i))
        .ok_or_else(|| {
            Error::InvalidArgument(format!("{} has no parent locator", file.path().display()))
        })?;
    let len = bytes.len() as u64;
    let offset = place(&file.metadata.items, index, len, region.length).ok_or_else(|| {
        Error::Unsupported(format!(
            "no room for a {len}-byte parent locator in the {}-byte metadata region",
            region.length
        ))
    })?;

    // The pages to rewrite: the item's new place and the table entry that points at it.
    let mut pages: Vec<(u64, Box<[u8; LOG_SECTOR_SIZE]>)> = Vec::new();
    let mut patch = |at: u64, data: &[u8]| -> Result<()> {
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = region.file_offset + at + pos as u64;
            let page = abs / PAGE * PAGE;
            let within = (abs - page) as usize;
            let n = (LOG_SECTOR_SIZE - within).min(data.len() - pos);
            let slot = match pages.iter().position(|(o, _)| *o == page) {
                Some(i) => i,
                None => {
                    pages.push((page, writer.metadata_page(page)?));
                    pages.len() - 1
                }
            };
            pages[slot].1[within..within + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
        Ok(())
    };
    patch(offset, &bytes)?;
    let entry_at = 32 + 32 * index as u64;
    let at = region.file_offset + entry_at;
    let current = writer.metadata_page(at / PAGE * PAGE)?;
    let within = (at % PAGE) as usize;
    let (mut e, _) =
        MetadataTableEntry::read_from_prefix(&current[within..]).expect("an entry fits a page");
    e.offset.set(offset as u32);
    e.length.set(len as u32);
    patch(entry_at, zerocopy::IntoBytes::as_bytes(&e))?;
    writer.log_pages(pages)?;
    writer.flush()?;

    file.metadata.items[index].offset = offset as u32;
    file.metadata.items[index].length = len as u32;
    file.metadata.parent_locator = Some(new);
    Ok(())
}

/// Where an item of `len` bytes replacing `items[index]` goes (offset in the region): where it
/// is if it fits before the next item, else the lowest gap after the table that holds it.
fn place(
    items: &[super::metadata::MetadataItem],
    index: usize,
    len: u64,
    region_len: u64,
) -> Option<u64> {
    let mut spans: Vec<(u64, u64)> = items
        .iter()
        .enumerate()
        .filter(|(n, i)| *n != index && i.length > 0)
        .map(|(_, i)| {
            (
                u64::from(i.offset),
                u64::from(i.offset) + u64::from(i.length),
            )
        })
        .collect();
    spans.sort_unstable();
    let free = |start: u64| -> bool {
        start >= METADATA_TABLE_SIZE as u64
            && start + len <= region_len.min(u64::from(u32::MAX))
            && spans.iter().all(|&(s, e)| start + len <= s || start >= e)
    };
    let here = u64::from(items[index].offset);
    if free(here) {
        return Some(here);
    }
    std::iter::once(METADATA_TABLE_SIZE as u64)
        .chain(spans.iter().map(|&(_, e)| align_up(e, 8).unwrap_or(e)))
        .filter(|&s| free(s))
        .min()
}

/// `rebase -u -b NEW_PARENT CHILD`: points `child` at `new_parent`. Unless `force`, the new
/// parent must have a DataWriteGuid the child accepts (it is the same disk, moved); with
/// `force` the child takes the new parent's as its linkage. Sizes and sector sizes must match
/// either way, or the chain would not open. The child's own DataWriteGuid is kept, so its own
/// children stay valid.
pub fn rebase(child_path: &Path, new_parent: &Path, force: bool) -> Result<()> {
    let mut child = VhdxFile::open_with_guid(child_path, DataWriteGuid::Keep)?;
    let parent = VhdxFile::open(new_parent, false)?;
    let old = child.metadata.parent_locator.clone().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{} is not a differencing file: it has no parent to change",
            child_path.display()
        ))
    })?;
    let guid = parent.data_write_guid();
    let matches = old.linkages().contains(&guid);
    if !matches && !force {
        return Err(Error::InvalidArgument(format!(
            "{} has DataWriteGuid {}, but {} expects {} (a different disk, or the parent changed since; --force to relink anyway)",
            new_parent.display(),
            locator::format_guid_string(guid),
            child_path.display(),
            old.linkages()
                .iter()
                .map(|g| locator::format_guid_string(*g))
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    let (linkage, linkage2) = if matches {
        let l = old
            .get(locator::KEY_PARENT_LINKAGE)
            .and_then(locator::parse_guid_string)
            .unwrap_or(guid);
        let l2 = old
            .get(locator::KEY_PARENT_LINKAGE2)
            .and_then(locator::parse_guid_string);
        (l, l2)
    } else {
        (guid, None)
    };
    let new = relinked(&child, new_parent, linkage, linkage2)?;
    // The chain must open with the new locator, so check before anything is written.
    check_fits(&child, &parent, &new)?;
    set_parent_locator(&mut child, new)?;
    child.close()?;
    drop(parent);
    Ok(())
}

/// The checks `Chain::from_layers` makes, applied to a locator before it is written.
fn check_fits(child: &VhdxFile, parent: &VhdxFile, new: &ParentLocator) -> Result<()> {
    if !new.linkages().contains(&parent.data_write_guid()) {
        return Err(Error::InvalidArgument(
            "the new linkage does not match the parent".into(),
        ));
    }
    if child.logical_sector_size() != parent.logical_sector_size()
        || child.virtual_size() != parent.virtual_size()
    {
        return Err(Error::InvalidArgument(format!(
            "{} ({} bytes, {}-byte sectors) cannot be the parent of {} ({} bytes, {}-byte sectors)",
            parent.path().display(),
            parent.virtual_size(),
            parent.logical_sector_size(),
            child.path().display(),
            child.virtual_size(),
            child.logical_sector_size()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhdx::metadata::MetadataItem;

    fn item(offset: u32, length: u32) -> MetadataItem {
        MetadataItem {
            item_id: Uuid::new_v4(),
            offset,
            length,
            is_user: false,
            is_virtual_disk: false,
            is_required: true,
        }
    }

    #[test]
    fn a_locator_stays_where_it_fits_and_moves_where_it_does_not() {
        let t = METADATA_TABLE_SIZE as u32;
        // The locator (index 1) between two items, 100 bytes of room.
        let items = [item(t, 8), item(t + 8, 60), item(t + 108, 16)];
        let region = 1 << 20;
        assert_eq!(place(&items, 1, 100, region), Some(u64::from(t) + 8));
        // Too long for its slot: after the last item, 8-byte aligned.
        assert_eq!(place(&items, 1, 101, region), Some(u64::from(t) + 128));
        // No room anywhere.
        assert_eq!(place(&items, 1, region, region), None);
    }
}
