//! Creating new VHDX files: dynamic, fixed and differencing.
//!
//! Layout: header section, log at 1 MiB, BAT, metadata region, then payload blocks. The BAT
//! region is sized with the differencing formula so that a file can gain a parent (or grow a
//! little) without moving its BAT. A new file is written under a temporary name in the target
//! directory and renamed into place only when complete and durable, so a failed `create` never
//! leaves a half-written file behind.

use std::fs::OpenOptions;
use std::path::{Component, Path, PathBuf};

use uuid::Uuid;

use super::bat::Geometry;
use super::chain::{Chain, ChainOptions};
use super::error::{Error, Result};
use super::format::*;
use super::header::Header;
use super::locator::{self, ParentLocator};
use super::metadata::{self, Metadata};
use super::region::{Region, RegionTable};
use super::storage::Storage;

pub const DEFAULT_BLOCK_SIZE: u32 = 32 * MIB as u32;
pub const DEFAULT_LOG_SIZE: u64 = MIB;
pub const MAX_LOG_SIZE: u64 = super::log::replay::MAX_LOG_LENGTH;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Subformat {
    #[default]
    Dynamic,
    /// Every block allocated and FULLY_PRESENT (LeaveBlockAllocated = 1).
    Fixed,
}

#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Bytes; rounded up to the logical sector size. Taken from the parent when `None`.
    pub virtual_size: Option<u64>,
    /// Default: the parent's for a differencing file, otherwise 32 MiB (Hyper-V's default).
    pub block_size: Option<u32>,
    /// Default: the parent's, otherwise 512.
    pub logical_sector_size: Option<u32>,
    /// Default: the parent's, otherwise 4096.
    pub physical_sector_size: Option<u32>,
    /// Default 1 MiB.
    pub log_size: Option<u64>,
    pub subformat: Subformat,
    /// Make a differencing file over this parent.
    pub parent: Option<PathBuf>,
}

/// Facts about the parent that a differencing child records.
struct ParentFacts {
    virtual_disk_id: Uuid,
    virtual_size: u64,
    block_size: u32,
    logical_sector_size: u32,
    physical_sector_size: u32,
    locator: ParentLocator,
}

/// Creates `path`, which must not exist yet.
pub fn create(path: &Path, options: &CreateOptions) -> Result<()> {
    if path.exists() {
        return Err(Error::InvalidArgument(format!(
            "{} already exists; remove it first",
            path.display()
        )));
    }
    let parent = match &options.parent {
        Some(p) => Some(parent_facts(path, p)?),
        None => None,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not a file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.creating-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        write_new_file(&file, options, parent.as_ref())?;
        std::fs::rename(&tmp, path).map_err(|e| {
            Error::io(
                format!("renaming {} to {}", tmp.display(), path.display()),
                e,
            )
        })?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a complete new VHDX into an empty storage.
pub fn create_on(storage: &dyn Storage, options: &CreateOptions) -> Result<()> {
    if options.parent.is_some() {
        return Err(Error::InvalidArgument(
            "differencing files need a path: use create()".into(),
        ));
    }
    write_new_file(storage, options, None)
}

fn parent_facts(child: &Path, parent_path: &Path) -> Result<ParentFacts> {
    let chain = Chain::open(parent_path, &ChainOptions::default())?;
    let p = chain.leaf();
    let abs_parent = resolved(parent_path)?;
    let abs_child = resolved(child)?;
    let child_dir = abs_child.parent().unwrap_or(Path::new("/"));
    let relative = relative_path(child_dir, &abs_parent);
    let windows = |p: &Path| p.to_string_lossy().replace('/', "\\");
    let mut entries = vec![(
        locator::KEY_PARENT_LINKAGE.to_string(),
        locator::format_guid_string(p.data_write_guid()),
    )];
    if let Some(rel) = relative {
        entries.push((locator::KEY_RELATIVE_PATH.to_string(), windows(&rel)));
    }
    entries.push((
        locator::KEY_ABSOLUTE_WIN32_PATH.to_string(),
        format!(r"\\?\{}", windows(&abs_parent)),
    ));
    Ok(ParentFacts {
        virtual_disk_id: p.metadata.virtual_disk_id,
        virtual_size: p.virtual_size(),
        block_size: p.metadata.block_size,
        logical_sector_size: p.metadata.logical_sector_size,
        physical_sector_size: p.metadata.physical_sector_size,
        locator: ParentLocator { entries },
    })
}

/// `path` with its directory resolved by the OS (absolute, no `.`, `..` or symlinked
/// directories) and its file name kept. `std::path::absolute` alone keeps `..`, which made the
/// locator's relative path count `..` components as directories (`../c/child.vhdx` over
/// `/x/b/p.vhdx` recorded `..\..\..\b\p.vhdx`) and put `..` into the `\\?\` absolute path,
/// where Windows does not resolve it.
pub(crate) fn resolved(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} is not a file name", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
    Ok(dir.join(name))
}

/// `target` relative to `base` (both absolute), with `..` where needed.
pub(crate) fn relative_path(base: &Path, target: &Path) -> Option<PathBuf> {
    let base: Vec<Component> = base.components().collect();
    let target: Vec<Component> = target.components().collect();
    let common = base.iter().zip(&target).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return None;
    }
    let mut out = PathBuf::new();
    for _ in common..base.len() {
        out.push("..");
    }
    for c in &target[common..] {
        out.push(c.as_os_str());
    }
    Some(out)
}

fn validate_sector_size(which: &str, size: u32) -> Result<u32> {
    if size == 512 || size == 4096 {
        Ok(size)
    } else {
        Err(Error::InvalidArgument(format!(
            "{which} sector size {size} must be 512 or 4096"
        )))
    }
}

fn write_new_file(
    storage: &dyn Storage,
    options: &CreateOptions,
    parent: Option<&ParentFacts>,
) -> Result<()> {
    let lss = validate_sector_size(
        "logical",
        options
            .logical_sector_size
            .or(parent.map(|p| p.logical_sector_size))
            .unwrap_or(512),
    )?;
    let pss = validate_sector_size(
        "physical",
        options
            .physical_sector_size
            .or(parent.map(|p| p.physical_sector_size))
            .unwrap_or(4096),
    )?;
    let block_size = options
        .block_size
        .or(parent.map(|p| p.block_size))
        .unwrap_or(DEFAULT_BLOCK_SIZE);
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Error::InvalidArgument(format!(
            "block size {block_size} must be a power of two from 1 MiB to 256 MiB"
        )));
    }
    let requested = options
        .virtual_size
        .or(parent.map(|p| p.virtual_size))
        .ok_or_else(|| Error::InvalidArgument("a virtual size is needed".into()))?;
    let virtual_size = align_up(requested, u64::from(lss))
        .filter(|&s| s > 0 && s <= MAX_VIRTUAL_DISK_SIZE)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "virtual size {requested} must be between 1 byte and 64 TiB"
            ))
        })?;
    if let Some(p) = parent {
        if virtual_size != p.virtual_size || lss != p.logical_sector_size {
            return Err(Error::InvalidArgument(format!(
                "a differencing file must have its parent's size ({}) and logical sector size ({})",
                p.virtual_size, p.logical_sector_size
            )));
        }
    }
    let log_size = options.log_size.unwrap_or(DEFAULT_LOG_SIZE);
    if log_size < MIB || log_size % MIB != 0 || log_size > MAX_LOG_SIZE {
        return Err(Error::InvalidArgument(format!(
            "log size {log_size} must be a multiple of 1 MiB from 1 MiB to {} MiB",
            MAX_LOG_SIZE / MIB
        )));
    }
    let fixed = options.subformat == Subformat::Fixed;
    if fixed && parent.is_some() {
        return Err(Error::InvalidArgument(
            "a differencing file cannot be fixed".into(),
        ));
    }

    let geometry = Geometry {
        block_size,
        logical_sector_size: lss,
        virtual_disk_size: virtual_size,
        has_parent: parent.is_some(),
    };
    let log_offset = MIB;
    let bat_offset = log_offset + log_size;
    let bat_length = align_up(geometry.max_entries() * 8, MIB).expect("bounded by 64 TiB");
    let metadata_offset = bat_offset + bat_length;
    let metadata_length = MIB;
    let data_start = metadata_offset + metadata_length;
    let io = |what: &str| {
        let what = what.to_string();
        move |e| Error::io(format!("writing the {what}"), e)
    };

    // File identifier.
    let mut ident = vec![0u8; 8 + 512];
    ident[..8].copy_from_slice(SIG_FILE);
    let creator = format!("vhost-user-vhdx {}", env!("CARGO_PKG_VERSION"));
    for (i, u) in creator.encode_utf16().take(255).enumerate() {
        ident[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    storage.write_at(&ident, 0).map_err(io("file identifier"))?;

    // Region tables.
    let regions = RegionTable {
        regions: vec![
            Region {
                guid: BAT_REGION_GUID,
                file_offset: bat_offset,
                length: bat_length,
                required: true,
            },
            Region {
                guid: METADATA_REGION_GUID,
                file_offset: metadata_offset,
                length: metadata_length,
                required: true,
            },
        ],
        copy: 0,
    };
    let table = regions.to_bytes();
    for offset in REGION_TABLE_OFFSETS {
        storage
            .write_at(&table, offset)
            .map_err(io("region table"))?;
    }

    // Metadata.
    let meta = Metadata {
        block_size,
        leave_block_allocated: fixed,
        has_parent: parent.is_some(),
        virtual_disk_size: virtual_size,
        virtual_disk_id: parent.map_or_else(Uuid::new_v4, |p| p.virtual_disk_id),
        logical_sector_size: lss,
        physical_sector_size: pss,
        parent_locator: parent.map(|p| p.locator.clone()),
        items: Vec::new(),
    };
    let region = metadata::build_region(&meta, metadata_length)?;
    storage
        .write_at(&region, metadata_offset)
        .map_err(io("metadata region"))?;

    // BAT: dynamic and differencing files start with every entry NOT_PRESENT (all zero: the
    // new file's space already reads as zero); fixed files point every block at its place.
    let mut end = data_start;
    if fixed {
        let block = u64::from(block_size);
        let mut page = Vec::with_capacity(MIB as usize);
        let mut page_offset = bat_offset;
        for index in 0..geometry.total_entries() {
            let entry = match geometry.block_of_index(index) {
                Some(b) => BatEntry::new(
                    PayloadBlockState::FullyPresent.bits(),
                    data_start + b * block,
                ),
                None => BatEntry(0),
            };
            page.extend_from_slice(&entry.0.to_le_bytes());
            if page.len() == MIB as usize {
                storage.write_at(&page, page_offset).map_err(io("BAT"))?;
                page_offset += MIB;
                page.clear();
            }
        }
        storage.write_at(&page, page_offset).map_err(io("BAT"))?;
        end = data_start + geometry.payload_blocks() * block;
    }
    storage.set_len(end).map_err(io("file size"))?;

    // Headers last: until they are written the file is not a VHDX at all.
    let file_write_guid = Uuid::new_v4();
    let data_write_guid = Uuid::new_v4();
    for (slot, seq) in [(0usize, 1u64), (1, 2)] {
        let h = Header {
            sequence_number: seq,
            file_write_guid,
            data_write_guid,
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: log_size as u32,
            log_offset,
        };
        storage
            .write_at(&h.to_bytes()[..], HEADER_OFFSETS[slot])
            .map_err(io("headers"))?;
    }
    storage.flush().map_err(io("new file"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhdx::file::VhdxFile;
    use crate::vhdx::storage::MemStorage;
    use std::sync::Arc;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/c/p.vhdx")),
            Some(PathBuf::from("../c/p.vhdx"))
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/p.vhdx")),
            Some(PathBuf::from("p.vhdx"))
        );
    }

    #[test]
    fn locator_paths_have_no_dot_dot() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for d in ["a", "b", "c"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        let parent = root.join("b/p.vhdx");
        let opts = CreateOptions {
            virtual_size: Some(MIB),
            ..Default::default()
        };
        create(&parent, &opts).unwrap();
        // `..` in the child's path: the relative path used to count it as a directory.
        let facts = parent_facts(&root.join("a/../c/child.vhdx"), &parent).unwrap();
        assert_eq!(
            facts.locator.get(locator::KEY_RELATIVE_PATH),
            Some(r"..\b\p.vhdx")
        );
        // `..` in the parent's path: the absolute path used to keep it.
        let facts = parent_facts(&root.join("c/child.vhdx"), &root.join("a/../b/p.vhdx")).unwrap();
        assert_eq!(
            facts.locator.get(locator::KEY_RELATIVE_PATH),
            Some(r"..\b\p.vhdx")
        );
        let abs = facts.locator.get(locator::KEY_ABSOLUTE_WIN32_PATH).unwrap();
        assert!(!abs.contains(".."), "{abs}");
        assert!(abs.ends_with(r"\b\p.vhdx"), "{abs}");
    }

    #[test]
    fn new_files_open_with_the_requested_geometry() {
        for (subformat, lss, block) in [
            (Subformat::Dynamic, 512, MIB as u32),
            (Subformat::Fixed, 4096, 32 * MIB as u32),
        ] {
            let m = Arc::new(MemStorage::default());
            let opts = CreateOptions {
                virtual_size: Some(100 * MIB + 1),
                block_size: Some(block),
                logical_sector_size: Some(lss),
                subformat,
                ..Default::default()
            };
            create_on(&*m, &opts).unwrap();
            let f = VhdxFile::open_storage(m, "mem".into(), false).unwrap();
            assert_eq!(f.virtual_size(), 100 * MIB + u64::from(lss));
            assert_eq!(f.logical_sector_size(), lss);
            assert_eq!(f.metadata.block_size, block);
            assert_eq!(
                f.metadata.leave_block_allocated,
                subformat == Subformat::Fixed
            );
        }
    }

    #[test]
    fn bad_options_are_refused() {
        let m = MemStorage::default();
        let bad = [
            CreateOptions {
                virtual_size: Some(MIB),
                block_size: Some(3 * MIB as u32),
                ..Default::default()
            },
            CreateOptions {
                virtual_size: Some(65 * TIB),
                ..Default::default()
            },
            CreateOptions {
                virtual_size: Some(MIB),
                logical_sector_size: Some(1024),
                ..Default::default()
            },
            CreateOptions {
                virtual_size: Some(MIB),
                log_size: Some(MIB + 1),
                ..Default::default()
            },
        ];
        for opts in bad {
            assert!(matches!(
                create_on(&m, &opts),
                Err(Error::InvalidArgument(_))
            ));
        }
    }
}
