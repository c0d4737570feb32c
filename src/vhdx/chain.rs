//! A differencing chain: the leaf plus its parents, found through parent locators
//! ([MS-VHDX] §2.6.2.6) and checked for identity, geometry, depth and loops.

use std::path::{Path, PathBuf};

use smallvec::SmallVec;

use super::buffers::{ReadTarget, WriteSource};
use super::error::{ChainError, Error, Result};
use super::file::{Source, VhdxFile};
use super::locator::{self, ParentLocator};
use super::write::WritePlan;

/// The deepest chain we open; real chains (Hyper-V checkpoints) are far shallower.
pub const MAX_CHAIN_DEPTH: usize = 64;

#[derive(Clone, Debug, Default)]
pub struct ChainOptions {
    /// Open the leaf for writing (parents are always read-only).
    pub writable: bool,
    /// Explicit locations for moved parents: `parents[0]` is the leaf's parent, `parents[1]`
    /// the grandparent, and so on. They replace the locator's paths, not its identity check.
    pub parent_overrides: Vec<PathBuf>,
    /// Read without taking or honouring locks (qemu-img's `-U`); only for read-only opens.
    pub force_share: bool,
    /// Open every file of the chain with O_DIRECT (`--cache none`).
    pub direct: bool,
}

/// Where a run of the virtual disk is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadSource {
    Zero,
    /// `layer` 0 is the leaf.
    File {
        layer: usize,
        offset: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub source: ReadSource,
    pub len: u64,
}

/// The extents of one range: a request's range mostly has one or two, kept off the heap.
pub type Extents = SmallVec<[Extent; 4]>;

pub struct Chain {
    /// Leaf first.
    layers: Vec<VhdxFile>,
}

impl Chain {
    /// Opens the file at `path` and, if it is a differencing file, its parents.
    pub fn open(path: &Path, options: &ChainOptions) -> Result<Chain> {
        let open = |p: &Path, writable: bool| {
            if options.force_share && !writable {
                VhdxFile::open_shared(p, options.direct)
            } else {
                VhdxFile::open_with(p, writable, options.direct)
            }
            .map_err(|e| open_error(p, e))
        };
        Chain::with_parents(open(path, options.writable)?, options)
    }

    /// Opens the parents of an already opened `leaf` (read-only, as [`Chain::open`] does) and
    /// makes the chain. For a caller that must open the leaf itself first, for writing (a
    /// repair): opening the leaf a second time would conflict with its own write lock.
    pub fn with_parents(leaf: VhdxFile, options: &ChainOptions) -> Result<Chain> {
        let mut seen = vec![canonical(leaf.path())];
        let mut layers = vec![leaf];
        while layers.last().expect("non-empty").is_differencing() {
            let depth = layers.len();
            if depth >= MAX_CHAIN_DEPTH {
                return Err(ChainError::TooDeep(MAX_CHAIN_DEPTH).into());
            }
            let child = layers.last().expect("non-empty");
            let locator = child
                .metadata
                .parent_locator
                .as_ref()
                .expect("validated: differencing files have a locator");
            let parent_path = match options.parent_overrides.get(depth - 1) {
                Some(p) => p.clone(),
                None => find_parent(child.path(), locator)?,
            };
            let key = canonical(&parent_path);
            if seen.contains(&key) {
                return Err(ChainError::Loop(parent_path).into());
            }
            let parent = VhdxFile::open_with(&parent_path, false, options.direct)
                .map_err(|e| open_error(&parent_path, e))?;
            check_parent(child, locator, &parent)?;
            seen.push(key);
            layers.push(parent);
        }
        Ok(Chain { layers })
    }

    /// A chain of already opened files (leaf first), checked like [`Chain::open`] does.
    pub fn from_layers(layers: Vec<VhdxFile>) -> Result<Chain> {
        for pair in layers.windows(2) {
            let locator = pair[0].metadata.parent_locator.as_ref().ok_or_else(|| {
                Error::InvalidArgument(format!("{} has no parent", pair[0].path().display()))
            })?;
            check_parent(&pair[0], locator, &pair[1])?;
        }
        Ok(Chain { layers })
    }

    /// The files, leaf first, for an operation that changes more than the leaf (commit).
    pub fn into_layers(self) -> Vec<VhdxFile> {
        self.layers
    }

    pub fn leaf(&self) -> &VhdxFile {
        &self.layers[0]
    }

    pub fn layers(&self) -> &[VhdxFile] {
        &self.layers
    }

    pub fn virtual_size(&self) -> u64 {
        self.leaf().virtual_size()
    }

    pub fn logical_sector_size(&self) -> u32 {
        self.leaf().logical_sector_size()
    }

    /// Checks that a guest-visible range is sector-aligned and inside the disk.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let lss = u64::from(self.logical_sector_size());
        let end = offset.checked_add(len);
        if offset % lss != 0 || len % lss != 0 {
            return Err(Error::InvalidArgument(format!(
                "range {offset:#x}+{len:#x} is not aligned to the {lss}-byte sector"
            )));
        }
        if end.is_none_or(|end| end > self.virtual_size()) {
            return Err(Error::InvalidArgument(format!(
                "range {offset:#x}+{len:#x} ends beyond the disk size {:#x}",
                self.virtual_size()
            )));
        }
        Ok(())
    }

    /// Appends to `out` the runs that make up `[offset, offset + len)`, adjacent runs merged.
    pub fn resolve(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        self.check_range(offset, len)?;
        self.resolve_layer(0, offset, len, out)
    }

    fn resolve_layer(&self, layer: usize, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        let Some(file) = self.layers.get(layer) else {
            push_merged(out, ReadSource::Zero, len);
            return Ok(());
        };
        // A grown leaf is larger than its parents: past a parent's end the disk reads zeros.
        let inside = len.min(file.virtual_size().saturating_sub(offset));
        if inside < len {
            self.resolve_layer(layer, offset, inside, out)?;
            push_merged(out, ReadSource::Zero, len - inside);
            return Ok(());
        }
        let mut runs: SmallVec<[(Source, u64); 4]> = SmallVec::new();
        file.map(offset, len, &mut |s, l| runs.push((s, l)))?;
        let mut pos = offset;
        for (source, l) in runs {
            match source {
                Source::Zero => push_merged(out, ReadSource::Zero, l),
                Source::Data(o) => push_merged(out, ReadSource::File { layer, offset: o }, l),
                Source::Parent => self.resolve_layer(layer + 1, pos, l, out)?,
            }
            pos += l;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset` (sector-aligned).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read(offset, &mut &mut *buf)
    }

    /// Reads `dst.len()` bytes of the virtual disk at `offset` into `dst`.
    pub fn read(&self, offset: u64, dst: &mut dyn ReadTarget) -> Result<()> {
        self.read_from_layer(0, offset, dst)
    }

    /// Reads as the chain below `layer` sees the disk (`layer` 1: what the leaf's parent
    /// supplies); zeros when there is no such layer. For maintenance that must know whether a
    /// parent reads zeros.
    pub fn read_from_layer(
        &self,
        layer: usize,
        offset: u64,
        dst: &mut dyn ReadTarget,
    ) -> Result<()> {
        let mut extents = Extents::new();
        self.check_range(offset, dst.len() as u64)?;
        self.resolve_layer(layer, offset, dst.len() as u64, &mut extents)?;
        let mut at = 0usize;
        for e in extents {
            let len = e.len as usize;
            match e.source {
                ReadSource::Zero => dst.fill_zero(at, len),
                ReadSource::File { layer, offset } => {
                    let file = &self.layers[layer];
                    dst.read_from(at, len, &**file.storage(), offset)
                        .map_err(|err| {
                            Error::io(format!("reading {}", file.path().display()), err)
                        })?;
                }
            }
            at += len;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` (sector-aligned) into the leaf.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write(offset, &buf)
    }

    pub fn write(&self, offset: u64, src: &dyn WriteSource) -> Result<()> {
        self.check_range(offset, src.len() as u64)?;
        self.leaf().write(offset, src)
    }

    /// The fast path of an asynchronous write: where the bytes of `[offset, offset + len)` go
    /// in the leaf (layer 0) when every block it touches is already FULLY_PRESENT, with a guard
    /// that keeps those blocks in place until it is dropped after the write completes. `None`:
    /// the write needs a metadata change; run it with [`Chain::write`].
    pub fn plan_write(&self, offset: u64, len: u64) -> Result<Option<WritePlan>> {
        self.check_range(offset, len)?;
        self.leaf().plan_write(offset, len)
    }

    /// A planned write failed (see [`VhdxFile::data_write_failed`]).
    pub fn data_write_failed(&self, e: &std::io::Error) {
        self.leaf().data_write_failed(e)
    }

    /// Gives back whole blocks inside the range; they read as zeros afterwards. Partial blocks
    /// at the edges are left as they are.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.leaf().trim(offset, len, false)
    }

    /// Makes the range read as zeros; whole blocks change state and give back their space.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.leaf().trim(offset, len, true)
    }

    pub fn flush(&self) -> Result<()> {
        self.leaf().flush()
    }

    /// Closes the chain; the leaf is left clean.
    pub fn close(mut self) -> Result<()> {
        let leaf = self.layers.remove(0);
        leaf.close()
    }
}

fn push_merged(out: &mut Extents, source: ReadSource, len: u64) {
    if let Some(last) = out.last_mut() {
        let joins = match (last.source, source) {
            (ReadSource::Zero, ReadSource::Zero) => true,
            (
                ReadSource::File {
                    layer: a,
                    offset: oa,
                },
                ReadSource::File {
                    layer: b,
                    offset: ob,
                },
            ) => a == b && oa + last.len == ob,
            _ => false,
        };
        if joins {
            last.len += len;
            return;
        }
    }
    out.push(Extent { source, len });
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn open_error(path: &Path, e: Error) -> Error {
    match e {
        Error::Chain(c) => Error::Chain(c),
        other => ChainError::Open {
            path: path.to_path_buf(),
            source: Box::new(other),
        }
        .into(),
    }
}

/// A Windows path from a locator, in this host's terms: `\` becomes `/`, and the extended-length
/// prefix `\\?\` is dropped.
fn host_path(windows: &str) -> PathBuf {
    let stripped = windows.strip_prefix(r"\\?\").unwrap_or(windows);
    PathBuf::from(stripped.replace('\\', "/"))
}

/// Where the parent of the differencing file `child` is, by its locator's paths (not checked
/// for identity: [`Chain::from_layers`] does that).
pub fn parent_path(child: &VhdxFile) -> Result<PathBuf> {
    let locator = child.metadata.parent_locator.as_ref().ok_or_else(|| {
        Error::InvalidArgument(format!("{} has no parent", child.path().display()))
    })?;
    find_parent(child.path(), locator)
}

/// Tries the locator's paths in the spec's order: relative_path against the child's directory,
/// then the absolute forms that exist on this host.
fn find_parent(child: &Path, locator: &ParentLocator) -> Result<PathBuf> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut tried = Vec::new();
    if let Some(rel) = locator.get(locator::KEY_RELATIVE_PATH) {
        let p = dir.join(host_path(rel));
        if p.is_file() {
            return Ok(p);
        }
        tried.push(format!("relative_path {rel:?} → {}", p.display()));
    }
    for key in [locator::KEY_ABSOLUTE_WIN32_PATH, locator::KEY_VOLUME_PATH] {
        if let Some(abs) = locator.get(key) {
            let p = host_path(abs);
            if p.is_absolute() && p.is_file() {
                return Ok(p);
            }
            tried.push(format!("{key} {abs:?}"));
        }
    }
    Err(ChainError::ParentNotFound {
        child: child.to_path_buf(),
        tried: tried.join(", "),
    }
    .into())
}

fn check_parent(child: &VhdxFile, locator: &ParentLocator, parent: &VhdxFile) -> Result<()> {
    let linkages = locator.linkages();
    if !linkages.contains(&parent.data_write_guid()) {
        return Err(ChainError::LinkageMismatch {
            child: child.path().to_path_buf(),
            parent: parent.path().to_path_buf(),
            expected: linkages
                .iter()
                .map(|g| locator::format_guid_string(*g))
                .collect::<Vec<_>>()
                .join(" or "),
            found: parent.data_write_guid(),
        }
        .into());
    }
    if parent.logical_sector_size() != child.logical_sector_size() {
        return Err(ChainError::SectorSizeMismatch {
            child: child.path().to_path_buf(),
            parent: parent.path().to_path_buf(),
            child_size: child.logical_sector_size(),
            parent_size: parent.logical_sector_size(),
        }
        .into());
    }
    // A child may be larger than its parent (a grown leaf reads zeros past the parent's end),
    // never smaller.
    if parent.virtual_size() > child.virtual_size() {
        return Err(ChainError::VirtualSizeMismatch {
            child: child.path().to_path_buf(),
            parent: parent.path().to_path_buf(),
            child_size: child.virtual_size(),
            parent_size: parent.virtual_size(),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_paths_become_host_paths() {
        assert_eq!(
            host_path(r"..\base\p.vhdx"),
            PathBuf::from("../base/p.vhdx")
        );
        assert_eq!(
            host_path(r"\\?\\srv\img\p.vhdx"),
            PathBuf::from("/srv/img/p.vhdx")
        );
    }

    #[test]
    fn merging_joins_only_contiguous_runs() {
        let mut v = Extents::new();
        push_merged(&mut v, ReadSource::Zero, 512);
        push_merged(&mut v, ReadSource::Zero, 512);
        push_merged(
            &mut v,
            ReadSource::File {
                layer: 0,
                offset: 4096,
            },
            512,
        );
        push_merged(
            &mut v,
            ReadSource::File {
                layer: 0,
                offset: 4608,
            },
            512,
        );
        push_merged(
            &mut v,
            ReadSource::File {
                layer: 1,
                offset: 5120,
            },
            512,
        );
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].len, 1024);
        assert_eq!(v[1].len, 1024);
    }
}
