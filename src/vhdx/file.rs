//! One open VHDX file: the open sequence (identifier, headers, log replay, regions, metadata,
//! BAT) and the resolution of a virtual range into where its bytes come from.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use super::bat::{Bat, Geometry, Occupied};
use super::bitmap;
use super::buffers::WriteSource;
use super::direct::{open_direct, DirectFile};
use super::error::{Corruption, Error, Result};
use super::format::*;
use super::header::{self, Headers};
use super::log::{self, ReplayPlan};
use super::metadata::{self, Metadata};
use super::region::{self, RegionTable};
use super::storage::{OverlayStorage, Storage};
use super::write::{WritePlan, Writer, WriterParts};

/// Where the bytes of a run of a file's virtual disk come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The run reads as zeros.
    Zero,
    /// The run is in this file at this byte offset.
    Data(u64),
    /// The run is not in this file: read it from the parent.
    Parent,
}

/// What happened to the log when the file was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogState {
    /// LogGuid was zero: nothing to replay.
    Clean,
    /// The log was replayed into the file and the header cleaned.
    Replayed { entries: usize },
    /// A read-only open replayed the log in memory; the file on disk is unchanged and still dirty.
    ReplayedInMemory { entries: usize },
}

/// What a writable open does to DataWriteGuid, which the file's children record as their
/// parent's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataWriteGuid {
    /// A new one when the log is replayed and at the first change (any writer's rule).
    New,
    /// Keep the file's own: changes that leave its data as it reads (a parent locator, a
    /// child emptied into its parent), so that the file's own children stay valid.
    Keep,
    /// Set this one: the target of a commit, whose children already accept it.
    Set(Uuid),
}

pub struct VhdxFile {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    pub creator: String,
    pub headers: Headers,
    pub regions: RegionTable,
    pub metadata: Metadata,
    pub bat: Arc<Bat>,
    pub log_state: LogState,
    writer: Option<Writer>,
}

impl std::fmt::Debug for VhdxFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxFile")
            .field("path", &self.path)
            .field("metadata", &self.metadata)
            .field("log_state", &self.log_state)
            .finish_non_exhaustive()
    }
}

impl VhdxFile {
    /// Opens the file at `path`, read-only or read-write, and locks it the way QEMU does: a
    /// writer excludes every other user, a reader excludes writers.
    pub fn open(path: &Path, writable: bool) -> Result<VhdxFile> {
        Self::open_file(path, writable, true, false)
    }

    /// [`VhdxFile::open`], with O_DIRECT when `direct` (`--cache none`).
    pub fn open_with(path: &Path, writable: bool, direct: bool) -> Result<VhdxFile> {
        Self::open_file(path, writable, true, direct)
    }

    /// Opens read-only without taking or honouring locks (qemu-img's `-U`): for looking at an
    /// image that a running backend owns. What it reads may be stale.
    pub fn open_shared(path: &Path, direct: bool) -> Result<VhdxFile> {
        Self::open_file(path, false, false, direct)
    }

    /// Opens writable, treating DataWriteGuid as `guid` says (see [`DataWriteGuid`]).
    pub fn open_with_guid(path: &Path, guid: DataWriteGuid) -> Result<VhdxFile> {
        Self::open_file_with(path, true, true, false, guid)
    }

    fn open_file(path: &Path, writable: bool, lock: bool, direct: bool) -> Result<VhdxFile> {
        Self::open_file_with(path, writable, lock, direct, DataWriteGuid::New)
    }

    fn open_file_with(
        path: &Path,
        writable: bool,
        lock: bool,
        direct: bool,
        guid: DataWriteGuid,
    ) -> Result<VhdxFile> {
        let opened = if direct {
            open_direct(path, writable)
        } else {
            OpenOptions::new().read(true).write(writable).open(path)
        };
        let file: File = opened.map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // A directory opens read-only and has a size: without this it was reported as a
        // "file too small" corruption.
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(Error::io(
                format!("opening {}", path.display()),
                std::io::ErrorKind::IsADirectory.into(),
            ));
        }
        if lock {
            super::lock::lock_image(&file, writable)
                .map_err(|e| Error::Locked(format!("{}: {e}", path.display())))?;
        }
        let storage: Arc<dyn Storage> = if direct {
            Arc::new(DirectFile::new(file))
        } else {
            Arc::new(file)
        };
        Self::open_storage_with(storage, path.to_path_buf(), writable, guid)
    }

    /// Opens a VHDX held by any [`Storage`]; `path` is used for messages and to find parents.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        path: PathBuf,
        writable: bool,
    ) -> Result<VhdxFile> {
        Self::open_storage_with(storage, path, writable, DataWriteGuid::New)
    }

    /// [`VhdxFile::open_storage`] with a choice of what happens to DataWriteGuid.
    pub fn open_storage_with(
        storage: Arc<dyn Storage>,
        path: PathBuf,
        writable: bool,
        guid: DataWriteGuid,
    ) -> Result<VhdxFile> {
        let size = storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        if size < HEADER_SECTION_SIZE {
            return Err(Corruption::FileTooSmall { size }.into());
        }
        let creator = header::read_file_identifier(&*storage)?;
        let mut headers = header::read_headers(&*storage)?;
        let log_extent = log_extent(&headers, size)?;

        let mut storage = storage;
        let mut log_state = LogState::Clean;
        if headers.current.has_log_to_replay() {
            let (log_offset, log_length) = log_extent.expect("a log to replay has an extent");
            let plan = log::find_active_sequence(
                &*storage,
                log_offset,
                log_length,
                headers.current.log_guid,
                size,
            )?;
            if writable {
                let data_guid = match guid {
                    DataWriteGuid::New => Uuid::new_v4(),
                    DataWriteGuid::Keep => headers.current.data_write_guid,
                    DataWriteGuid::Set(g) => g,
                };
                replay_into_file(&*storage, &mut headers, &plan, data_guid)?;
                log_state = LogState::Replayed {
                    entries: plan.entries,
                };
            } else {
                storage = Arc::new(overlay(storage, size, &plan));
                log_state = LogState::ReplayedInMemory {
                    entries: plan.entries,
                };
            }
        }

        let size = storage
            .len()
            .map_err(|e| Error::io("reading the file size", e))?;
        let regions = region::read_region_table(&*storage, size, log_extent)?;
        let metadata = metadata::read_metadata(&*storage, &regions.metadata())?;
        let geometry = Geometry {
            block_size: metadata.block_size,
            logical_sector_size: metadata.logical_sector_size,
            virtual_disk_size: metadata.virtual_disk_size,
            has_parent: metadata.has_parent,
        };
        let mut occupied = vec![Occupied {
            offset: 0,
            length: HEADER_SECTION_SIZE,
            what: "the header section".into(),
        }];
        if let Some((offset, length)) = log_extent {
            occupied.push(Occupied {
                offset,
                length,
                what: format!("the log at {offset:#x}"),
            });
        }
        for r in &regions.regions {
            occupied.push(Occupied {
                offset: r.file_offset,
                length: r.length,
                what: format!("the region {} at {:#x}", r.guid, r.file_offset),
            });
        }
        let bat_region = regions.bat();
        let bat = Arc::new(Bat::load(
            &*storage,
            geometry,
            bat_region.file_offset,
            bat_region.length,
            size,
            &occupied,
        )?);
        let mut file = VhdxFile {
            path,
            storage,
            creator,
            headers,
            regions,
            metadata,
            bat,
            log_state,
            writer: None,
        };
        if writable {
            let h = file.headers.current;
            if h.log_length == 0 {
                return Err(Error::Unsupported(
                    "a file without a log cannot be written".into(),
                ));
            }
            file.writer = Some(Writer::new(WriterParts {
                storage: Arc::clone(&file.storage),
                bat: Arc::clone(&file.bat),
                bitmaps: Default::default(),
                fixed: file.metadata.leave_block_allocated && !file.metadata.has_parent,
                bat_offset: bat_region.file_offset,
                log_offset: h.log_offset,
                log_length: u64::from(h.log_length),
                used: file.used_extents(),
                headers: file.headers.clone(),
                data_write_guid: match guid {
                    DataWriteGuid::New => None,
                    DataWriteGuid::Keep => Some(file.headers.current.data_write_guid),
                    DataWriteGuid::Set(g) => Some(g),
                },
            }));
        }
        Ok(file)
    }

    /// Every extent a structure occupies: header section, log, regions, allocated payload and
    /// sector bitmap blocks.
    pub fn used_extents(&self) -> Vec<(u64, u64)> {
        let mut used = vec![(0, HEADER_SECTION_SIZE)];
        let h = &self.headers.current;
        if h.log_length != 0 {
            used.push((h.log_offset, u64::from(h.log_length)));
        }
        for r in &self.regions.regions {
            used.push((r.file_offset, r.length));
        }
        let g = self.geometry();
        for index in 0..self.bat.len() {
            let e = self.bat.entry(index);
            let len = match g.block_of_index(index) {
                Some(b) if b < g.payload_blocks() => {
                    match PayloadBlockState::from_bits(e.state_bits()) {
                        Some(s) if s.has_data() => u64::from(g.block_size),
                        _ => continue,
                    }
                }
                None if e.state_bits() == SB_BLOCK_PRESENT => SECTOR_BITMAP_BLOCK_SIZE,
                _ => continue,
            };
            used.push((e.file_offset(), len));
        }
        used
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn is_writable(&self) -> bool {
        self.writer.is_some()
    }

    pub(crate) fn writer(&self) -> Result<&Writer> {
        self.writer.as_ref().ok_or(Error::ReadOnly)
    }

    /// Writes at a virtual offset (sector-aligned, inside the disk: the chain checks).
    pub fn write(&self, offset: u64, src: &dyn WriteSource) -> Result<()> {
        self.writer()?.write(offset, src)
    }

    /// Where a write's bytes go when it changes no metadata (see [`Writer::plan_write`]).
    pub fn plan_write(&self, offset: u64, len: u64) -> Result<Option<WritePlan>> {
        self.writer()?.plan_write(offset, len)
    }

    /// A planned write failed: the file is poisoned, as after a failed synchronous write.
    pub fn data_write_failed(&self, e: &std::io::Error) {
        if let Some(w) = &self.writer {
            w.data_write_failed(e);
        }
    }

    /// Discards (`zero == false`) or zeroes a virtual range.
    pub fn trim(&self, offset: u64, len: u64, zero: bool) -> Result<()> {
        self.writer()?.trim(offset, len, zero)
    }

    /// Makes a write, discard or write-zeroes return only once the metadata change it made
    /// or relies on is durable in the log (see [`Writer::wait_for_metadata`]): what a server
    /// needs so that a restart of its process loses nothing its client saw complete. Off by
    /// default, for tools that make everything durable with one flush at the end.
    pub fn wait_for_metadata(&self, on: bool) {
        if let Some(w) = &self.writer {
            w.wait_for_metadata(on);
        }
    }

    /// Waits for a generation that [`super::write::defer_metadata_waits`] returned.
    pub fn wait_durable(&self, generation: u64) -> Result<()> {
        match &self.writer {
            Some(w) => w.wait_durable(generation),
            None => Ok(()),
        }
    }

    /// Testing aid for crash-point tests: when on, every metadata change of a write, discard or
    /// write-zeroes is committed to the log before the next one is made, so that a crash can be
    /// enumerated between any two changes of one operation.
    #[doc(hidden)]
    pub fn commit_every_change(&self, on: bool) {
        if let Some(w) = &self.writer {
            w.commit_every_change(on);
        }
    }

    pub fn flush(&self) -> Result<()> {
        match &self.writer {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }

    /// Commits everything and leaves the file clean (empty log, free tail given back).
    pub fn close(mut self) -> Result<()> {
        match self.writer.take() {
            Some(w) => w.close(),
            None => Ok(()),
        }
    }

    /// The current headers (a writer changes them during its session).
    pub fn current_headers(&self) -> Headers {
        match &self.writer {
            Some(w) => w.headers(),
            None => self.headers.clone(),
        }
    }

    pub fn geometry(&self) -> Geometry {
        self.bat.geometry
    }

    pub fn virtual_size(&self) -> u64 {
        self.metadata.virtual_disk_size
    }

    pub fn logical_sector_size(&self) -> u32 {
        self.metadata.logical_sector_size
    }

    pub fn data_write_guid(&self) -> Uuid {
        self.current_headers().current.data_write_guid
    }

    pub fn is_differencing(&self) -> bool {
        self.metadata.has_parent
    }

    /// Calls `f(source, length)` for consecutive runs covering `[offset, offset + length)` of
    /// the virtual disk, merging neighbours of the same kind. The range must be sector-aligned
    /// and inside the disk (the chain checks).
    pub fn map(&self, offset: u64, length: u64, f: &mut dyn FnMut(Source, u64)) -> Result<()> {
        let g = self.geometry();
        let block_size = u64::from(g.block_size);
        let lss = u64::from(g.logical_sector_size);
        let mut merged = Merger::new(f);
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let block = pos / block_size;
            let in_block = pos % block_size;
            let n = (block_size - in_block).min(end - pos);
            let (state, entry) = self.bat.payload(block);
            match state {
                PayloadBlockState::FullyPresent => {
                    merged.push(Source::Data(entry.file_offset() + in_block), n)
                }
                PayloadBlockState::NotPresent if g.has_parent => merged.push(Source::Parent, n),
                PayloadBlockState::NotPresent
                | PayloadBlockState::Undefined
                | PayloadBlockState::Zero
                | PayloadBlockState::Unmapped => merged.push(Source::Zero, n),
                PayloadBlockState::PartiallyPresent => {
                    let chunk = block / g.chunk_ratio();
                    let sb_offset = self.bat.bitmap(chunk).file_offset();
                    let first_bit =
                        (block % g.chunk_ratio()) * g.sectors_per_block() + in_block / lss;
                    let bits = n / lss;
                    let byte_start = first_bit / 8;
                    let byte_end = (first_bit + bits).div_ceil(8);
                    let mut buf = Vec::new();
                    match &self.writer {
                        // A writer's cache is the truth; the file may lag behind the log.
                        Some(w) => w.bitmaps().read_bits(
                            &*self.storage,
                            sb_offset,
                            first_bit,
                            bits,
                            &mut buf,
                        ),
                        None => {
                            buf.resize((byte_end - byte_start) as usize, 0);
                            self.storage
                                .read_at(&mut buf, sb_offset + byte_start)
                                .map(drop)
                        }
                    }
                    .map_err(|e| Error::io("reading a sector bitmap", e))?;
                    let data_base = entry.file_offset() + in_block;
                    bitmap::for_each_run(&buf, first_bit % 8, bits, |present, start, count| {
                        let run_off = (start - first_bit % 8) * lss;
                        let source = if present {
                            Source::Data(data_base + run_off)
                        } else {
                            Source::Parent
                        };
                        merged.push(source, count * lss);
                    });
                }
            }
            pos += n;
        }
        merged.finish();
        Ok(())
    }
}

/// Merges adjacent runs of the same kind before handing them on.
struct Merger<'a> {
    f: &'a mut dyn FnMut(Source, u64),
    pending: Option<(Source, u64)>,
}

impl<'a> Merger<'a> {
    fn new(f: &'a mut dyn FnMut(Source, u64)) -> Self {
        Merger { f, pending: None }
    }

    fn push(&mut self, source: Source, len: u64) {
        if let Some((s, l)) = &mut self.pending {
            let joins = match (*s, source) {
                (Source::Zero, Source::Zero) | (Source::Parent, Source::Parent) => true,
                (Source::Data(a), Source::Data(b)) => a + *l == b,
                _ => false,
            };
            if joins {
                *l += len;
                return;
            }
            (self.f)(*s, *l);
        }
        self.pending = Some((source, len));
    }

    fn finish(&mut self) {
        if let Some((s, l)) = self.pending.take() {
            (self.f)(s, l);
        }
    }
}

/// The log's place in the file, checked, or `None` when the file has no log.
fn log_extent(headers: &Headers, size: u64) -> Result<Option<(u64, u64)>> {
    let h = &headers.current;
    if h.log_length == 0 {
        return Ok(None);
    }
    let (offset, length) = (h.log_offset, u64::from(h.log_length));
    if offset < HEADER_SECTION_SIZE || !is_aligned(offset, MIB) || !is_aligned(length, MIB) {
        return Err(Corruption::BadLogLocation { offset, length }.into());
    }
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(Corruption::BeyondEndOfFile {
            what: "the log".into(),
            offset,
            length,
            file_size: size,
        }
        .into());
    }
    Ok(Some((offset, length)))
}

/// Replays the log into a writable file. The first header update of the session gets a new
/// FileWriteGuid and the DataWriteGuid `data_guid` (new, unless a commit or rebase needs the
/// file's identity kept or set) before anything else changes (replay modifies the file and its
/// metadata, §6.9 of the notes); once the changes are durable, the log is closed.
fn replay_into_file(
    storage: &dyn Storage,
    headers: &mut Headers,
    plan: &ReplayPlan,
    data_guid: Uuid,
) -> Result<()> {
    let mut h = headers.current;
    h.file_write_guid = Uuid::new_v4();
    h.data_write_guid = data_guid;
    headers.update(storage, h)?;
    log::replay::apply(storage, plan)?;
    let mut h = headers.current;
    h.log_guid = Uuid::nil();
    headers.update(storage, h)
}

fn overlay(base: Arc<dyn Storage>, size: u64, plan: &ReplayPlan) -> OverlayStorage {
    let mut ov = OverlayStorage::new(base, size);
    // The extension to LastFileOffset first, as `log::replay::apply` does it last: it only adds
    // zeros past the end of the file and must not wipe what the log writes there.
    if plan.min_file_size > size {
        ov.write_zeros(size, plan.min_file_size - size);
    }
    for op in &plan.ops {
        match op {
            log::LogOp::Data { file_offset, data } => ov.write_page(*file_offset, data.clone()),
            log::LogOp::Zero {
                file_offset,
                length,
            } => ov.write_zeros(*file_offset, *length),
        }
    }
    ov
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhdx::storage::MemStorage;

    #[test]
    fn overlay_keeps_pages_the_log_writes_past_the_end_of_the_file() {
        let base: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![1u8; MIB as usize]));
        let plan = ReplayPlan {
            ops: vec![log::LogOp::Data {
                file_offset: MIB + 8192,
                data: Box::new([0xab; 4096]),
            }],
            min_file_size: 4 * MIB,
            entries: 1,
            head_sequence: 1,
        };
        let ov = overlay(base, MIB, &plan);
        assert_eq!(ov.len().unwrap(), 4 * MIB);
        let mut buf = vec![0xeeu8; 3 * 4096];
        ov.read_at(&mut buf, MIB + 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 0xab));
        assert!(buf[8192..].iter().all(|&b| b == 0));
        ov.read_at(&mut buf, MIB - 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 1));
    }
}
