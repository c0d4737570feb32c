//! Committing (merging) a differencing child into its parent, or every level of a chain down
//! to a base: Hyper-V's Merge-VHD, qemu-img's `commit`.
//!
//! Crash safety comes from `parent_linkage2` ([MS-VHDX] §2.6.2.6.3): a merge changes the
//! target's DataWriteGuid, so the file just above the target first records the target's future
//! DataWriteGuid G beside the current one (through its log, flushed). Only then is the target
//! opened with G, which its first change writes into its header before any data. At every
//! instant the target's DataWriteGuid is one its child accepts, so the chain opens; and it reads
//! as before, because the target only gains data that the levels above already shadow. Copying
//! is idempotent: after a crash, running the commit again (it finds G in the locator and reuses
//! it) finishes the job.
//!
//! The steps, in order:
//! 1. validate the chain (identity, sizes) with the target opened read-only;
//! 2. `parent_linkage2 = G` in the locator of the level above the target (durable);
//! 3. open the target writable with DataWriteGuid G (a pending log is replayed under G too);
//! 4. for each target block that some level above has data for, write the chain's view of it
//!    into the target (all zeros: the target's write-zeroes, which frees space); flush, close;
//! 5. with `keep_top`: the top's locator names the target (linkage = its new DataWriteGuid, no
//!    linkage2) and every top block reads from the parent again; otherwise the caller removes
//!    the top. The levels between top and target are no longer valid either way.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::chain::{self, Chain, ChainOptions};
use super::error::{Error, Result};
use super::file::{DataWriteGuid, Source, VhdxFile};
use super::locator;
use super::rebase::{relinked, set_parent_locator, with_linkages};
use super::ReadSource;

/// The most bytes read and written per step (a block, or a piece of a larger block).
const STEP: u64 = 32 << 20;

#[derive(Clone, Debug, Default)]
pub struct CommitOptions {
    /// Leave the top in place, emptied, as a child of the target (`commit -d`).
    pub keep_top: bool,
}

/// Commits `upper` (the top first, then the levels down to the target's child, all opened
/// writable with [`DataWriteGuid::Keep`]) into the target, which `open_target(None)` opens
/// read-only and `open_target(Some(g))` writable with DataWriteGuid `g`, whose own parents are
/// `lower` (read-only; empty when the target is a base): the chain's view reads through them.
/// `progress(done, total)` follows the copy. Every file is closed cleanly on success.
pub fn commit(
    upper: Vec<VhdxFile>,
    open_target: &dyn Fn(Option<Uuid>) -> Result<VhdxFile>,
    lower: Vec<VhdxFile>,
    options: &CommitOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    if upper.is_empty() {
        return Err(Error::InvalidArgument("nothing to commit".into()));
    }
    if let Some(f) = upper.iter().find(|f| !f.is_writable()) {
        return Err(Error::InvalidArgument(format!(
            "{} must be open for writing",
            f.path().display()
        )));
    }
    // 1. The chain as it is, checked.
    let k = upper.len();
    let mut layers = upper;
    layers.push(open_target(None)?);
    layers.extend(lower);
    let mut upper = Chain::from_layers(layers)?.into_layers();
    let lower = upper.split_off(k + 1);
    drop(upper.pop());

    // 2. The target's future identity, recorded above it (or found there after a crash).
    let above = upper.last_mut().expect("not empty");
    let locator = above
        .metadata
        .parent_locator
        .clone()
        .expect("checked: it has a parent");
    let g = match locator
        .get(locator::KEY_PARENT_LINKAGE2)
        .and_then(locator::parse_guid_string)
    {
        Some(g) => g,
        None => {
            let g = Uuid::new_v4();
            let linkage = locator
                .get(locator::KEY_PARENT_LINKAGE)
                .and_then(locator::parse_guid_string)
                .expect("validated at open");
            let new = with_linkages(above, linkage, Some(g))?;
            set_parent_locator(above, new)?;
            g
        }
    };

    // 3. and 4. The copy.
    let mut layers = upper;
    layers.push(open_target(Some(g))?);
    layers.extend(lower);
    let chain = Chain::from_layers(layers)?;
    copy_into_target(&chain, k, progress)?;
    let mut layers = chain.into_layers();
    drop(layers.split_off(k + 1));
    let target = layers.pop().expect("not empty");
    let target_path = target.path().to_path_buf();
    // G if anything was written; the old one if the levels above held nothing.
    let target_guid = target.data_write_guid();
    target.close()?;

    // 5. The top, kept as an empty child of the target.
    if options.keep_top {
        let direct = layers.len() == 1;
        let top = &mut layers[0];
        let new = if direct {
            with_linkages(top, target_guid, None)?
        } else {
            relinked(top, &target_path, target_guid, None)?
        };
        set_parent_locator(top, new)?;
        let g = top.geometry();
        let bs = u64::from(g.block_size);
        let writer = top.writer()?;
        let mut freed = Vec::new();
        for block in 0..g.payload_blocks() {
            let (state, entry) = top.bat.payload(block);
            if state.has_data() {
                freed.push(entry.file_offset());
            }
            writer.unmap_to_parent(block)?;
        }
        // Once no durable BAT entry points at the old blocks, their host space goes back (the
        // close only gives back the free tail of the file). Nothing writes them meanwhile.
        writer.flush()?;
        for offset in freed {
            top.storage()
                .punch_hole(offset, bs)
                .map_err(|e| Error::io("giving back an emptied block's space", e))?;
        }
    }
    for f in layers {
        f.close()?;
    }
    Ok(())
}

/// Writes the chain's view of every range that a level above the target (layer `k`) has
/// something for into the target, then flushes it.
fn copy_into_target(chain: &Chain, k: usize, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let layers = chain.layers();
    let (upper, target) = (&layers[..k], &layers[k]);
    let size = chain.virtual_size();
    let step = u64::from(target.geometry().block_size).min(STEP);
    let mut buf = vec![0u8; step as usize];
    let mut extents = super::Extents::new();
    let mut offset = 0;
    progress(0, size);
    while offset < size {
        let len = step.min(size - offset);
        let mut touched = false;
        for layer in upper {
            layer.map(offset, len, &mut |s, _| touched |= s != Source::Parent)?;
            if touched {
                break;
            }
        }
        if touched {
            extents.clear();
            chain.resolve(offset, len, &mut extents)?;
            let data = &mut buf[..len as usize];
            let zero = extents.iter().all(|e| e.source == ReadSource::Zero) || {
                chain.read_at(data, offset)?;
                data.iter().all(|&b| b == 0)
            };
            if zero {
                target.trim(offset, len, true)?;
            } else {
                target.write(offset, &&*data)?;
            }
        }
        offset += len;
        progress(offset, size);
    }
    target.flush()
}

/// What [`commit_files`] did.
#[derive(Debug, Default)]
pub struct CommitReport {
    /// The file the data went into.
    pub target: PathBuf,
    /// Files removed: the top (unless kept) and the levels between it and the target.
    pub removed: Vec<PathBuf>,
}

/// `commit [-b BASE] [-d] CHILD` on files: validates the chain, refuses when a level that
/// changes or goes away has other children in the directories of the chain (unless `force`),
/// commits, and removes what the commit made invalid.
pub fn commit_files(
    top: &Path,
    base: Option<&Path>,
    parent_overrides: &[PathBuf],
    force: bool,
    options: &CommitOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CommitReport> {
    let chain = Chain::open(
        top,
        &ChainOptions {
            writable: false,
            parent_overrides: parent_overrides.to_vec(),
            force_share: false,
            direct: false,
        },
    )?;
    let paths: Vec<PathBuf> = chain
        .layers()
        .iter()
        .map(|l| l.path().to_path_buf())
        .collect();
    if paths.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "{} has no parent: there is nothing to commit it into",
            top.display()
        )));
    }
    let k = match base {
        None => 1,
        Some(b) => {
            let want = canonical(b);
            (1..paths.len())
                .find(|&i| canonical(&paths[i]) == want)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{} is not a parent of {} (its chain: {})",
                        b.display(),
                        top.display(),
                        paths
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(" -> ")
                    ))
                })?
        }
    };
    if !force {
        // The levels whose view changes, and the top too when it is removed.
        let first = usize::from(options.keep_top);
        let others = other_children(&chain, first, k)?;
        if let Some((child, parent)) = others.first() {
            return Err(Error::InvalidArgument(format!(
                "{} is also a child of {}, which the commit changes or removes (it would read wrong data); --force to commit anyway",
                child.display(),
                parent.display()
            )));
        }
    }
    drop(chain);

    let upper = paths[..k]
        .iter()
        .map(|p| VhdxFile::open_with_guid(p, DataWriteGuid::Keep))
        .collect::<Result<Vec<_>>>()?;
    let target_path = paths[k].clone();
    let open_target = |g: Option<Uuid>| match g {
        None => VhdxFile::open(&target_path, false),
        Some(g) => VhdxFile::open_with_guid(&target_path, DataWriteGuid::Set(g)),
    };
    let lower = paths[k + 1..]
        .iter()
        .map(|p| VhdxFile::open(p, false))
        .collect::<Result<Vec<_>>>()?;
    commit(upper, &open_target, lower, options, progress)?;

    let first = usize::from(options.keep_top);
    let mut removed = Vec::new();
    for p in &paths[first..k] {
        std::fs::remove_file(p).map_err(|e| Error::io(format!("removing {}", p.display()), e))?;
        removed.push(p.clone());
    }
    for dir in removed
        .iter()
        .filter_map(|p| p.parent())
        .collect::<HashSet<_>>()
    {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(CommitReport {
        target: target_path,
        removed,
    })
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Differencing files in the chain's directories, not in the chain, whose parent is one of the
/// levels `first..=k` and that accept its identity.
fn other_children(chain: &Chain, first: usize, k: usize) -> Result<Vec<(PathBuf, PathBuf)>> {
    let layers = chain.layers();
    let ours: HashSet<PathBuf> = layers.iter().map(|l| canonical(l.path())).collect();
    let changed: Vec<(PathBuf, Uuid, &Path)> = layers[first..=k]
        .iter()
        .map(|l| (canonical(l.path()), l.data_write_guid(), l.path()))
        .collect();
    let dirs: HashSet<PathBuf> = layers
        .iter()
        .map(|l| match canonical(l.path()).parent() {
            Some(d) => d.to_path_buf(),
            None => PathBuf::from("/"),
        })
        .collect();
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_image = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("vhdx") || e.eq_ignore_ascii_case("avhdx"));
            if !is_image || !path.is_file() || ours.contains(&canonical(&path)) {
                continue;
            }
            // Unreadable or not a differencing VHDX: not a child we can see.
            let Ok(f) = VhdxFile::open_shared(&path, false) else {
                continue;
            };
            let Some(loc) = f.metadata.parent_locator.as_ref() else {
                continue;
            };
            let Ok(parent) = chain::parent_path(&f) else {
                continue;
            };
            let parent = canonical(&parent);
            if let Some((_, _, p)) = changed
                .iter()
                .find(|(c, g, _)| *c == parent && loc.linkages().contains(g))
            {
                found.push((path.clone(), p.to_path_buf()));
            }
        }
    }
    found.sort();
    Ok(found)
}
