//! Changing a writable file: writes, discards, write-zeroes, flush and clean close.
//!
//! Data goes straight to the file; metadata (BAT entries, sector-bitmap bits) changes in memory
//! and reaches the file only through the WAL worker ([`super::log::writer`]). The ordering rules
//! of the design notes, and where each is kept:
//!
//! 1. The first change of a session writes new File/DataWriteGuids and a LogGuid (flushed)
//!    before anything else: [`Writer::session`].
//! 2. A BAT entry never becomes durable before the space it points at holds what it promises:
//!    recycled space is zero-filled and data is written *before* the entry is published in
//!    memory, and the WAL flushes data before it logs the entry.
//! 5. Freed space is reused only once the change that freed it is durable: [`FreeSpace`].
//! 6. A bitmap block is allocated and zeroed before any PARTIALLY_PRESENT entry points at it, and
//!    a block's bits are cleared when it leaves PARTIALLY_PRESENT, in the same change as its
//!    entry ([`Writer::make_full`]): never durable as partial with its bits gone.
//!
//! A request may complete before its metadata change is durable (tools that batch: a flush
//! makes everything durable), or only once that change is at least in the log on the file
//! ([`Writer::wait_for_metadata`], what `serve` needs: a process killed and restarted must not
//! lose a write its guest saw complete, as the guest never learns of the restart). Then a
//! request that touches a block whose last change is not durable yet waits for it too, even if
//! it changed nothing itself: it relies on that change (a write into a block another queue
//! just allocated). Each stripe remembers the generation of the last change made under it.
//! A caller with other requests to run may take the wait over ([`defer_metadata_waits`]).
//!
//! Concurrency: 64 striped reader/writer locks guard block state. Writes and zero-fills to an
//! allocated block take the read side, so queues write different (or the same) allocated blocks
//! in parallel; state changes (allocation, trim) take the write side, so two writers allocate a
//! block once and a trim never frees space a write is still landing in.
//!
//! Asynchronous writes ([`Writer::plan_write`]) run after the call returns, so they cannot hold a
//! stripe lock: their blocks are counted in [`InFlightBlocks`] until the [`WriteGuard`] drops,
//! and a trim waits for its block's count to reach zero (without holding the stripe lock, so
//! the thread that will complete those writes is never blocked by the trim).

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, RwLockWriteGuard};

use smallvec::SmallVec;

use uuid::Uuid;

use super::bat::{Bat, Geometry};
use super::bitmap::BitmapCache;
use super::buffers::{SourceFault, WriteSource, Zeros};
use super::error::{Error, Result};
use super::format::*;
use super::header::Headers;
use super::log::writer::{PageSource, Wal};
use super::space::{Allocation, FreeSpace};
use super::storage::Storage;

const STRIPES: usize = 64;

thread_local! {
    /// Inside [`defer_metadata_waits`]: the highest generation this thread's requests would
    /// have waited for.
    static DEFERRED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` with the waits of [`Writer::wait_for_metadata`] deferred on this thread: a request
/// that would wait for its metadata change asks for the commit and returns at once, and the
/// highest generation it would have waited for is returned with `f`'s result (0: none). The
/// caller must pass it to [`Writer::wait_durable`] (of the one writable file `f` wrote to)
/// before anyone learns that those requests completed. A queue thread uses this to keep
/// running the requests behind an allocating write, so that a batch shares one commit.
pub fn defer_metadata_waits<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let outer = DEFERRED.with(|d| d.replace(Some(0)));
    let result = f();
    let generation = DEFERRED.with(|d| d.replace(outer)).unwrap_or(0);
    if let Some(outer) = outer {
        DEFERRED.with(|d| d.set(Some(outer.max(generation))));
    }
    (result, generation)
}

/// The metadata pages the WAL logs, read from the in-memory truth.
struct MetadataPages {
    storage: Arc<dyn Storage>,
    bat: Arc<Bat>,
    bitmaps: Arc<BitmapCache>,
    bat_offset: u64,
    other: Arc<Mutex<OtherPages>>,
}

/// New contents of metadata pages outside the BAT and the bitmaps (the metadata region), set
/// by [`Writer::log_pages`]: the truth until the session ends, as the file may lag the log.
type OtherPages = BTreeMap<u64, Box<[u8; LOG_SECTOR_SIZE]>>;

impl PageSource for MetadataPages {
    fn page(&self, file_offset: u64, out: &mut [u8; LOG_SECTOR_SIZE]) -> io::Result<()> {
        if let Some(p) = locked(&self.other).get(&file_offset) {
            out.copy_from_slice(&p[..]);
            return Ok(());
        }
        let bat_end = self.bat_offset + self.bat.len() * 8;
        if (self.bat_offset..bat_end).contains(&file_offset) {
            // Entries past the table's end (the region's slack) keep what the file has.
            self.storage.read_at(&mut out[..], file_offset)?;
            let first = (file_offset - self.bat_offset) / 8;
            for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
                let index = first + i as u64;
                if index < self.bat.len() {
                    chunk.copy_from_slice(&self.bat.entry(index).0.to_le_bytes());
                }
            }
            return Ok(());
        }
        if self.bitmaps.copy_page(file_offset, &mut out[..]) {
            return Ok(());
        }
        self.storage.read_at(&mut out[..], file_offset).map(|_| ())
    }

    /// BAT pages before every other page, and among them from the end of the table down: a
    /// block's entry makes its bitmap bits safe to clear (a partially present block with its
    /// bits cleared would read from the parent), and a chunk's sector bitmap entry, which
    /// follows the chunk's payload entries in the table, must be durable no later than a
    /// PARTIALLY_PRESENT entry that relies on it.
    fn order(&self, file_offset: u64) -> (u8, u64) {
        let bat_end = self.bat_offset + self.bat.len() * 8;
        if (self.bat_offset..bat_end).contains(&file_offset) {
            (0, u64::MAX - file_offset)
        } else {
            (1, file_offset)
        }
    }
}

/// Blocks with asynchronous writes in flight ([`Writer::plan_write`]).
#[derive(Default)]
pub struct InFlightBlocks {
    blocks: Mutex<HashMap<u64, BlockUse>>,
    changed: Condvar,
}

#[derive(Default)]
struct BlockUse {
    writes: u32,
    /// Trims waiting for `writes` to reach zero: no new write is planned on the block meanwhile.
    trims_waiting: u32,
}

impl InFlightBlocks {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, BlockUse>> {
        locked(&self.blocks)
    }

    /// Counts one more write on `block`, unless a trim is waiting for it.
    fn try_add(&self, block: u64) -> bool {
        let mut blocks = self.lock();
        let u = blocks.entry(block).or_default();
        if u.trims_waiting > 0 {
            return false;
        }
        u.writes += 1;
        true
    }

    fn remove(&self, block: u64) {
        let mut blocks = self.lock();
        if let Some(u) = blocks.get_mut(&block) {
            u.writes -= 1;
            if u.writes == 0 && u.trims_waiting == 0 {
                blocks.remove(&block);
            }
        }
        drop(blocks);
        self.changed.notify_all();
    }

    fn writes(&self, block: u64) -> u32 {
        self.lock().get(&block).map_or(0, |u| u.writes)
    }

    /// Announces a trim of `block` and waits until no write is in flight on it.
    fn wait_idle(&self, block: u64) {
        let mut blocks = self.lock();
        blocks.entry(block).or_default().trims_waiting += 1;
        while blocks.get(&block).is_some_and(|u| u.writes > 0) {
            blocks = self.changed.wait(blocks).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The trim announced by `wait_idle` is done waiting.
    fn trim_started(&self, block: u64) {
        let mut blocks = self.lock();
        if let Some(u) = blocks.get_mut(&block) {
            u.trims_waiting -= 1;
            if u.writes == 0 && u.trims_waiting == 0 {
                blocks.remove(&block);
            }
        }
    }
}

/// Keeps the blocks of a planned write from being trimmed, freed or reused until dropped (once
/// the write has completed). `Send`, so it can wait in an in-flight slot.
pub struct WriteGuard {
    inflight: Arc<InFlightBlocks>,
    blocks: SmallVec<[u64; 2]>,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        for &b in &self.blocks {
            self.inflight.remove(b);
        }
    }
}

/// Where a write's bytes go when no metadata changes: runs of `(file offset, length)` in the
/// leaf file, in request order, adjacent runs merged. The guard must live until the data I/O
/// has completed.
pub struct WritePlan {
    pub extents: SmallVec<[(u64, u64); 4]>,
    pub guard: WriteGuard,
}

/// State that exists once the session's first change has been made.
struct Session {
    wal: Wal,
    space: Arc<Mutex<FreeSpace>>,
}

pub struct Writer {
    storage: Arc<dyn Storage>,
    bat: Arc<Bat>,
    bitmaps: Arc<BitmapCache>,
    geometry: Geometry,
    /// LeaveBlockAllocated without a parent: blocks are zeroed in place, never freed.
    fixed: bool,
    bat_offset: u64,
    log_offset: u64,
    log_length: u64,
    /// Extents structures used at open; free space is derived from them at session start.
    used_at_open: Vec<(u64, u64)>,
    headers: Mutex<Headers>,
    stripes: Vec<RwLock<()>>,
    inflight: Arc<InFlightBlocks>,
    /// Per stripe: the WAL generation of the last metadata change to one of its blocks, set
    /// while the stripe's lock is held ([`Writer::note`]).
    stripe_generations: Vec<AtomicU64>,
    /// Requests return only once their metadata changes are durable ([`Writer::wait_for_metadata`]).
    metadata_before_return: AtomicBool,
    bitmap_alloc: Mutex<()>,
    session_init: Mutex<()>,
    session: OnceLock<Session>,
    poisoned: Mutex<Option<String>>,
    /// The DataWriteGuid the session's first change sets; `None`: a new one.
    data_write_guid: Option<Uuid>,
    other_pages: Arc<Mutex<OtherPages>>,
    /// Testing aid: commit after every metadata change ([`Writer::commit_every_change`]).
    commit_each_change: AtomicBool,
}

pub struct WriterParts {
    pub storage: Arc<dyn Storage>,
    pub bat: Arc<Bat>,
    pub bitmaps: Arc<BitmapCache>,
    pub fixed: bool,
    pub bat_offset: u64,
    pub log_offset: u64,
    pub log_length: u64,
    pub used: Vec<(u64, u64)>,
    pub headers: Headers,
    /// The DataWriteGuid the session's first change sets (a commit's target, or a file whose
    /// data does not change); `None`: a new one, as the spec asks of any data change.
    pub data_write_guid: Option<Uuid>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Writer {
    pub fn new(p: WriterParts) -> Writer {
        Writer {
            geometry: p.bat.geometry,
            storage: p.storage,
            bat: p.bat,
            bitmaps: p.bitmaps,
            fixed: p.fixed,
            bat_offset: p.bat_offset,
            log_offset: p.log_offset,
            log_length: p.log_length,
            used_at_open: p.used,
            headers: Mutex::new(p.headers),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            inflight: Arc::default(),
            stripe_generations: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            metadata_before_return: AtomicBool::new(false),
            bitmap_alloc: Mutex::new(()),
            session_init: Mutex::new(()),
            session: OnceLock::new(),
            poisoned: Mutex::new(None),
            data_write_guid: p.data_write_guid,
            other_pages: Default::default(),
            commit_each_change: AtomicBool::new(false),
        }
    }

    /// Testing aid: commit every metadata change before the next one is made.
    pub fn commit_every_change(&self, on: bool) {
        self.commit_each_change.store(on, Ordering::Relaxed);
    }

    /// When on, a write, discard or write-zeroes returns only once every metadata change it
    /// made or relies on (a BAT entry, sector-bitmap bits) is durable in the log, so that a
    /// process killed after the request completed replays it at the next open. Writes into
    /// blocks whose metadata is already durable pay nothing. Off: changes are committed in the
    /// background and by [`Writer::flush`].
    pub fn wait_for_metadata(&self, on: bool) {
        self.metadata_before_return.store(on, Ordering::Relaxed);
    }

    pub fn bitmaps(&self) -> &BitmapCache {
        &self.bitmaps
    }

    pub fn headers(&self) -> Headers {
        locked(&self.headers).clone()
    }

    fn check_poison(&self) -> Result<()> {
        if let Some(reason) = locked(&self.poisoned).clone() {
            return Err(Error::Poisoned(reason));
        }
        if let Some(reason) = self.session.get().and_then(|s| s.wal.poisoned()) {
            return Err(Error::Poisoned(reason));
        }
        Ok(())
    }

    /// Marks the file unusable: every later request fails and nothing more is written.
    fn poison(&self, reason: String) {
        log::error!("VHDX file poisoned: {reason}");
        locked(&self.poisoned).get_or_insert(reason.clone());
        if let Some(s) = self.session.get() {
            s.wal.poison(reason);
        }
    }

    /// Turns an I/O error into a poisoned file, unless the error is the data source's own
    /// (guest memory that cannot be read): that fails the write only.
    fn io<T>(&self, what: &str, r: io::Result<T>) -> Result<T> {
        r.map_err(|e| {
            if !SourceFault::is(&e) {
                self.poison(format!("{what}: {e}"));
            }
            Error::io(what, e)
        })
    }

    fn stripe(&self, block: u64) -> &RwLock<()> {
        &self.stripes[(block % STRIPES as u64) as usize]
    }

    fn stripe_generation(&self, block: u64) -> &AtomicU64 {
        &self.stripe_generations[(block % STRIPES as u64) as usize]
    }

    /// Records that `block`'s metadata changed in WAL generation `generation`. Called with the
    /// block's stripe lock held, so whoever takes the lock later and sees the change also sees
    /// the generation ([`Writer::relied_on`]).
    fn note(&self, block: u64, generation: u64) {
        self.stripe_generation(block)
            .fetch_max(generation, Ordering::AcqRel);
    }

    /// The generation whose durability a request that has just used `block` relies on: the
    /// last change to any block of its stripe (an upper bound: never too early).
    fn relied_on(&self, block: u64) -> u64 {
        self.stripe_generation(block).load(Ordering::Acquire)
    }

    /// In [`Writer::wait_for_metadata`] mode, waits until `generation` is durable.
    /// Deferred ([`defer_metadata_waits`]): the commit is asked for and the wait left to the
    /// caller.
    fn settle(&self, s: &Session, generation: u64) -> Result<()> {
        if generation == 0 || !self.metadata_before_return.load(Ordering::Relaxed) {
            return Ok(());
        }
        let deferred = DEFERRED.with(|d| match d.get() {
            Some(g) => {
                d.set(Some(g.max(generation)));
                true
            }
            None => false,
        });
        if deferred {
            s.wal.request(generation);
            return Ok(());
        }
        self.io("committing metadata", s.wal.wait_durable(generation))
    }

    /// Waits until the metadata changes of WAL generation `generation` (as returned by
    /// [`defer_metadata_waits`]) are durable in the log.
    pub fn wait_durable(&self, generation: u64) -> Result<()> {
        self.check_poison()?;
        match self.session.get() {
            Some(s) if generation > 0 => {
                self.io("committing metadata", s.wal.wait_durable(generation))
            }
            _ => Ok(()),
        }
    }

    /// The session, started on first use (design rule 1).
    fn session(&self) -> Result<&Session> {
        if let Some(s) = self.session.get() {
            return Ok(s);
        }
        let _init = locked(&self.session_init);
        if let Some(s) = self.session.get() {
            return Ok(s);
        }
        let session = self.start_session()?;
        Ok(self.session.get_or_init(|| session))
    }

    fn start_session(&self) -> Result<Session> {
        let log_guid = Uuid::new_v4();
        // Space past the last structure may hold anything an earlier session left (a crash
        // after a block's data but before its BAT entry): cut it off, so that growing the file
        // again yields space known to read as zeros. The flush of the log's first entry makes
        // the new length durable before any entry relies on it.
        let used_end = self
            .used_at_open
            .iter()
            .map(|&(o, l)| o + l)
            .max()
            .unwrap_or(0);
        let end = align_up(used_end, MIB).unwrap_or(used_end);
        let len = self.io("reading the file size", self.storage.len())?;
        if len != end {
            self.io("trimming the file", self.storage.set_len(end))?;
        }
        let mut space = FreeSpace::new(&self.used_at_open, end);
        if self.fixed {
            // Room for the blocks a fixed file has not allocated (zeros again now).
            let bs = u64::from(self.geometry.block_size);
            let min = space.fixed_min_len(self.bat.unallocated_blocks(), bs);
            if min > end {
                self.io("growing the file", self.storage.set_len(min))?;
                space = FreeSpace::new(&self.used_at_open, min);
            }
        }
        let space = Arc::new(Mutex::new(space));
        let hook_space = Arc::clone(&space);
        let pages = Arc::new(MetadataPages {
            storage: Arc::clone(&self.storage),
            bat: Arc::clone(&self.bat),
            bitmaps: Arc::clone(&self.bitmaps),
            bat_offset: self.bat_offset,
            other: Arc::clone(&self.other_pages),
        });
        let wal = self.io(
            "starting the log writer",
            Wal::start(
                Arc::clone(&self.storage),
                pages,
                Box::new(move |generation| locked(&hook_space).durable(generation)),
                self.log_offset,
                self.log_length,
                log_guid,
            ),
        )?;
        // Only now that the log holds a valid (empty) entry under the new LogGuid do the
        // headers name it, with the session's new File- and DataWriteGuid (rule 1).
        let mut headers = locked(&self.headers);
        let mut h = headers.current;
        h.file_write_guid = Uuid::new_v4();
        h.data_write_guid = self.data_write_guid.unwrap_or_else(Uuid::new_v4);
        h.log_guid = log_guid;
        if let Err(e) = headers.update(&*self.storage, h) {
            self.poison(e.to_string());
            return Err(e);
        }
        Ok(Session { wal, space })
    }

    fn allocate(&self, s: &Session, len: u64) -> Result<Allocation> {
        let mut space = locked(&s.space);
        let (allocation, grow) = space.allocate(len);
        if let Some(new_len) = grow {
            self.io("growing the file", self.storage.set_len(new_len))?;
        }
        Ok(allocation)
    }

    /// Makes one metadata change: `f` changes the in-memory truth and returns the pages it
    /// touched; the WAL logs them in one commit, whole (see [`Wal::change`]). Returns the
    /// generation whose commit makes the change durable.
    fn change(&self, s: &Session, f: impl FnOnce(&mut Vec<u64>) -> Result<()>) -> Result<u64> {
        let generation = {
            let change = s.wal.change();
            let mut pages = Vec::new();
            let changed = f(&mut pages);
            let marked = self.io("recording a metadata change", change.mark_dirty(&pages));
            changed?;
            marked?
        };
        if self.commit_each_change.load(Ordering::Relaxed) {
            self.io("committing a metadata change", s.wal.flush())?;
        }
        Ok(generation)
    }

    fn bat_page(&self, index: u64) -> u64 {
        self.bat_offset + index * 8 / LOG_SECTOR_SIZE as u64 * LOG_SECTOR_SIZE as u64
    }

    /// Sets a BAT entry in memory; part of a [`Writer::change`].
    fn set_entry(&self, pages: &mut Vec<u64>, index: u64, entry: BatEntry) {
        self.bat.set_entry(index, entry);
        pages.push(self.bat_page(index));
    }

    /// Publishes a BAT entry; returns the WAL generation.
    fn publish(&self, s: &Session, index: u64, entry: BatEntry) -> Result<u64> {
        self.change(s, |pages| {
            self.set_entry(pages, index, entry);
            Ok(())
        })
    }

    /// Sets or clears, in memory, the bitmap bits of sectors `[in_block, in_block + n)` of
    /// `block`; part of a [`Writer::change`].
    fn change_bits(
        &self,
        pages: &mut Vec<u64>,
        block: u64,
        in_block: u64,
        n: u64,
        value: bool,
    ) -> Result<()> {
        let g = &self.geometry;
        let lss = u64::from(g.logical_sector_size);
        let chunk = block / g.chunk_ratio();
        let sb = self.bat.bitmap(chunk).file_offset();
        let first_bit = (block % g.chunk_ratio()) * g.sectors_per_block() + in_block / lss;
        pages.extend(
            self.io(
                "updating a sector bitmap",
                self.bitmaps
                    .set_bits(&*self.storage, sb, first_bit, n / lss, value),
            )?,
        );
        Ok(())
    }

    /// Sets the bitmap bits of sectors `[in_block, in_block + n)` of `block`.
    fn set_bits(&self, s: &Session, block: u64, in_block: u64, n: u64) -> Result<u64> {
        self.change(s, |pages| self.change_bits(pages, block, in_block, n, true))
    }

    /// A PARTIALLY_PRESENT block becomes FULLY_PRESENT and its bits are cleared (rule 6), in
    /// one change. The entry changes first, so a concurrent reader never sees the block still
    /// partial with its bits gone; and within the commit, BAT pages become durable no later
    /// than bitmap pages ([`MetadataPages::order`]), so no crash finds it that way either: it
    /// would read every sector from the parent.
    fn make_full(&self, s: &Session, block: u64, offset: u64) -> Result<u64> {
        let bs = u64::from(self.geometry.block_size);
        let index = self.geometry.payload_index(block);
        self.change(s, |pages| {
            let full = BatEntry::new(PayloadBlockState::FullyPresent.bits(), offset);
            self.set_entry(pages, index, full);
            self.change_bits(pages, block, 0, bs, false)
        })
    }

    /// The bitmap block of `chunk`, allocated and zeroed if it was not present (rule 6).
    fn ensure_bitmap_block(&self, s: &Session, chunk: u64) -> Result<()> {
        let _guard = locked(&self.bitmap_alloc);
        if self.bat.bitmap(chunk).state_bits() == SB_BLOCK_PRESENT {
            return Ok(());
        }
        let a = self.allocate(s, SECTOR_BITMAP_BLOCK_SIZE)?;
        if !a.zeroed {
            self.io(
                "zeroing a sector bitmap block",
                self.storage
                    .write_zeroes(a.offset, SECTOR_BITMAP_BLOCK_SIZE),
            )?;
        }
        self.bitmaps.forget_block(a.offset);
        let index = self.geometry.bitmap_index(chunk);
        self.publish(s, index, BatEntry::new(SB_BLOCK_PRESENT, a.offset))?;
        Ok(())
    }

    /// The fast path of an asynchronous write of `[offset, offset + len)` (checked by the
    /// caller: sector-aligned, inside the disk): where its bytes go when every block it touches
    /// is already FULLY_PRESENT, so that writing them changes no metadata. `None` when any block
    /// needs the engine (first touch, partial blocks of a differencing file, a trim waiting):
    /// then [`Writer::write`] does it with every ordering rule.
    ///
    /// A thread must not trim a block while it holds a guard on it (the trim would wait for
    /// itself): a queue completes its own writes in flight before it runs a discard.
    pub fn plan_write(&self, offset: u64, len: u64) -> Result<Option<WritePlan>> {
        self.check_poison()?;
        // Rule 1: the session's new GUIDs are durable before the first byte changes.
        let s = self.session()?;
        let wait_for_metadata = self.metadata_before_return.load(Ordering::Relaxed);
        let bs = u64::from(self.geometry.block_size);
        let mut guard = WriteGuard {
            inflight: Arc::clone(&self.inflight),
            blocks: SmallVec::new(),
        };
        let mut extents: SmallVec<[(u64, u64); 4]> = SmallVec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            let _shared = self.stripe(block).read().unwrap_or_else(|e| e.into_inner());
            let (state, entry) = self.bat.payload(block);
            // In `wait_for_metadata` mode a write into a block whose allocation is not yet
            // durable must not complete before it is: the engine's path waits for it.
            let pending = wait_for_metadata && !s.wal.is_durable(self.relied_on(block));
            if state != PayloadBlockState::FullyPresent || pending || !self.inflight.try_add(block)
            {
                return Ok(None); // the guard gives back the blocks counted so far
            }
            guard.blocks.push(block);
            let at = entry.file_offset() + in_block;
            match extents.last_mut() {
                Some((o, l)) if *o + *l == at => *l += n,
                _ => extents.push((at, n)),
            }
            pos += n;
        }
        Ok(Some(WritePlan { extents, guard }))
    }

    /// An asynchronous write of a plan failed: like a failed synchronous write, the file is
    /// poisoned (what the disk holds is no longer known).
    pub fn data_write_failed(&self, e: &io::Error) {
        self.poison(format!("writing data: {e}"));
    }

    /// The stripe's write lock for a change of `block`'s state, once no planned write is in
    /// flight on the block. Waits without the lock, so that whoever completes those writes is
    /// never blocked by this trim.
    fn exclusive_without_writes(&self, block: u64) -> RwLockWriteGuard<'_, ()> {
        let lock = || {
            self.stripe(block)
                .write()
                .unwrap_or_else(|e| e.into_inner())
        };
        let exclusive = lock();
        if self.inflight.writes(block) == 0 {
            return exclusive;
        }
        drop(exclusive);
        loop {
            self.inflight.wait_idle(block);
            let exclusive = lock();
            // No write can have been planned since: a trim was waiting.
            if self.inflight.writes(block) == 0 {
                self.inflight.trim_started(block);
                return exclusive;
            }
            self.inflight.trim_started(block);
        }
    }

    /// Writes `src` at virtual `offset` (checked by the caller: sector-aligned, inside the disk).
    pub fn write(&self, offset: u64, src: &dyn WriteSource) -> Result<()> {
        self.check_poison()?;
        let s = self.session()?;
        let bs = u64::from(self.geometry.block_size);
        let end = offset + src.len() as u64;
        let mut pos = offset;
        let mut relied_on = 0;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            self.write_block(s, block, in_block, n, src, (pos - offset) as usize)?;
            relied_on = relied_on.max(self.relied_on(block));
            pos += n;
        }
        self.settle(s, relied_on)
    }

    /// Writes one block's part of a request. A metadata change is noted ([`Writer::note`])
    /// before the stripe lock is let go.
    fn write_block(
        &self,
        s: &Session,
        block: u64,
        in_block: u64,
        n: u64,
        src: &dyn WriteSource,
        at: usize,
    ) -> Result<()> {
        let bs = u64::from(self.geometry.block_size);
        let whole = n == bs;
        let write_at = |file_offset: u64| {
            self.io(
                "writing data",
                src.write_to(at, n as usize, &*self.storage, file_offset + in_block),
            )
        };
        // Fast path: the block is already where the data goes.
        {
            let _shared = self.stripe(block).read().unwrap_or_else(|e| e.into_inner());
            let (state, entry) = self.bat.payload(block);
            match state {
                PayloadBlockState::FullyPresent => return write_at(entry.file_offset()),
                PayloadBlockState::PartiallyPresent if !whole => {
                    write_at(entry.file_offset())?;
                    let generation = self.set_bits(s, block, in_block, n)?;
                    self.note(block, generation);
                    return Ok(());
                }
                _ => {}
            }
        }
        let _exclusive = self
            .stripe(block)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let index = self.geometry.payload_index(block);
        let (state, entry) = self.bat.payload(block);
        let generation = match state {
            PayloadBlockState::FullyPresent => write_at(entry.file_offset()).map(|()| 0),
            PayloadBlockState::PartiallyPresent if !whole => {
                write_at(entry.file_offset())?;
                self.set_bits(s, block, in_block, n)
            }
            PayloadBlockState::PartiallyPresent => {
                // Every sector is now in this file.
                write_at(entry.file_offset())?;
                self.make_full(s, block, entry.file_offset())
            }
            PayloadBlockState::NotPresent if self.geometry.has_parent && !whole => {
                // The rest of the block stays in the parent: no fill needed, only bits.
                self.ensure_bitmap_block(s, block / self.geometry.chunk_ratio())?;
                let a = self.allocate(s, bs)?;
                write_at(a.offset)?;
                self.set_bits(s, block, in_block, n)?;
                let partial = BatEntry::new(PayloadBlockState::PartiallyPresent.bits(), a.offset);
                self.publish(s, index, partial)
            }
            _ => {
                // NOT_PRESENT (no parent, or a whole-block write), ZERO, UNMAPPED, UNDEFINED:
                // the rest of the block reads as zeros, so recycled space is zero-filled.
                let a = self.allocate(s, bs)?;
                if !a.zeroed && !whole {
                    self.io(
                        "zero-filling a new block",
                        self.storage.write_zeroes(a.offset, in_block).and_then(|_| {
                            self.storage
                                .write_zeroes(a.offset + in_block + n, bs - in_block - n)
                        }),
                    )?;
                }
                write_at(a.offset)?;
                let full = BatEntry::new(PayloadBlockState::FullyPresent.bits(), a.offset);
                self.publish(s, index, full)
            }
        }?;
        self.note(block, generation);
        Ok(())
    }

    /// Discards (`zero == false`) or zeroes `[offset, offset + len)`. Whole blocks change state
    /// and give back their space; partial blocks are written with zeros when zeroing, and left
    /// alone by a discard (the advertised discard granularity is the block size).
    pub fn trim(&self, offset: u64, len: u64, zero: bool) -> Result<()> {
        self.check_poison()?;
        let s = self.session()?;
        let bs = u64::from(self.geometry.block_size);
        let disk_end = self.geometry.virtual_disk_size;
        let end = offset + len;
        let mut pos = offset;
        let mut relied_on = 0;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            // The last block may be cut short by the end of the disk.
            let whole = in_block == 0 && (n == bs || pos + n == disk_end);
            if whole {
                self.trim_block(s, block, zero)?;
            } else if zero {
                // Under the stripe lock, so that a block another request just made read as
                // zeros is seen together with that change's generation.
                let reads_zero = {
                    let _shared = self.stripe(block).read().unwrap_or_else(|e| e.into_inner());
                    self.reads_zero(block)
                };
                if !reads_zero {
                    self.write_block(s, block, in_block, n, &Zeros(n as usize), 0)?;
                }
            }
            relied_on = relied_on.max(self.relied_on(block));
            pos += n;
        }
        self.settle(s, relied_on)
    }

    /// Whether a block reads as zeros without consulting this file's data or a parent.
    fn reads_zero(&self, block: u64) -> bool {
        match self.bat.payload(block).0 {
            PayloadBlockState::Zero
            | PayloadBlockState::Unmapped
            | PayloadBlockState::Undefined => true,
            PayloadBlockState::NotPresent => !self.geometry.has_parent,
            _ => false,
        }
    }

    fn trim_block(&self, s: &Session, block: u64, zero: bool) -> Result<()> {
        let _exclusive = self.exclusive_without_writes(block);
        let generation = self.trim_locked_block(s, block, zero)?;
        self.note(block, generation);
        Ok(())
    }

    /// [`Writer::trim_block`] with the stripe lock held; returns the generation of the change
    /// it made (0: none).
    fn trim_locked_block(&self, s: &Session, block: u64, zero: bool) -> Result<u64> {
        let bs = u64::from(self.geometry.block_size);
        let (state, entry) = self.bat.payload(block);
        if self.fixed {
            // A fixed file keeps every block allocated: zero in place.
            if state == PayloadBlockState::FullyPresent {
                self.io(
                    "zeroing a block",
                    self.storage.write_zeroes(entry.file_offset(), bs),
                )?;
            }
            return Ok(0);
        }
        if self.geometry.has_parent {
            return self.trim_differencing_block(s, block, state, entry);
        }
        // Discard → UNMAPPED, write-zeroes → ZERO: both read as zeros, and the space is freed.
        let target = if zero {
            PayloadBlockState::Zero
        } else {
            PayloadBlockState::Unmapped
        };
        let index = self.geometry.payload_index(block);
        if !state.has_data() {
            // Already reads as zeros; a write-zeroes still moves it to ZERO, the one state every
            // reader must read as zeros.
            if zero && state != PayloadBlockState::Zero {
                return self.publish(s, index, BatEntry::new(target.bits(), 0));
            }
            return Ok(0);
        }
        let generation = self.publish(s, index, BatEntry::new(target.bits(), 0))?;
        locked(&s.space).release(entry.file_offset(), bs, generation);
        Ok(generation)
    }

    /// A trimmed block of a differencing file must read as zeros, never as the parent's data.
    /// The spec's ZERO state says so, but libvhdi (and so every tool built on it) reads ZERO and
    /// UNMAPPED blocks of a differencing file from the parent. A FULLY_PRESENT block whose
    /// space is a hole reads as zeros in every implementation and costs no host space, so that
    /// is what a trim makes here.
    fn trim_differencing_block(
        &self,
        s: &Session,
        block: u64,
        state: PayloadBlockState,
        entry: BatEntry,
    ) -> Result<u64> {
        let bs = u64::from(self.geometry.block_size);
        let index = self.geometry.payload_index(block);
        let offset = match state {
            PayloadBlockState::FullyPresent | PayloadBlockState::PartiallyPresent => {
                entry.file_offset()
            }
            // Reads zeros already (ours; see above for libvhdi): leave it.
            PayloadBlockState::Zero
            | PayloadBlockState::Unmapped
            | PayloadBlockState::Undefined => return Ok(0),
            PayloadBlockState::NotPresent => {
                let a = self.allocate(s, bs)?;
                if a.zeroed {
                    a.offset
                } else {
                    self.io("zeroing a block", self.storage.punch_hole(a.offset, bs))?;
                    a.offset
                }
            }
        };
        if state != PayloadBlockState::NotPresent {
            self.io("zeroing a block", self.storage.punch_hole(offset, bs))?;
        }
        match state {
            PayloadBlockState::PartiallyPresent => self.make_full(s, block, offset),
            PayloadBlockState::NotPresent => {
                let full = BatEntry::new(PayloadBlockState::FullyPresent.bits(), offset);
                self.publish(s, index, full)
            }
            _ => Ok(0),
        }
    }

    /// Makes every change completed before the call durable.
    pub fn flush(&self) -> Result<()> {
        self.check_poison()?;
        match self.session.get() {
            Some(s) => self.io("flushing", s.wal.flush()),
            None => Ok(()),
        }
    }

    /// Commits everything, empties the log (LogGuid back to zero) and gives back free space at
    /// the end of the file. A file that was never changed is left untouched.
    pub fn close(mut self) -> Result<()> {
        self.check_poison()?;
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        self.io("committing the log", s.wal.shutdown())?;
        // The last commit's in-place writes must be durable before the log is declared empty.
        self.io("flushing", self.storage.flush())?;
        {
            let mut headers = locked(&self.headers);
            let mut h = headers.current;
            h.log_guid = Uuid::nil();
            if let Err(e) = headers.update(&*self.storage, h) {
                self.poison(e.to_string());
                return Err(e);
            }
        }
        // With the log empty, a shorter file can no longer look truncated to a replay.
        let end = {
            let space = locked(&s.space);
            let trimmed = space.trimmed_end();
            let end = align_up(trimmed, MIB).unwrap_or(trimmed);
            if self.fixed {
                let bs = u64::from(self.geometry.block_size);
                end.max(space.fixed_min_len(self.bat.unallocated_blocks(), bs))
            } else {
                end
            }
        };
        self.io("trimming the file", self.storage.set_len(end))?;
        self.io("flushing", self.storage.flush())
    }
}

/// Changes made by the maintenance commands (commit, rebase) rather than by guest I/O.
impl Writer {
    /// The current contents of a metadata page: what [`Writer::log_pages`] set, else the file.
    pub fn metadata_page(&self, file_offset: u64) -> Result<Box<[u8; LOG_SECTOR_SIZE]>> {
        if let Some(p) = locked(&self.other_pages).get(&file_offset) {
            return Ok(p.clone());
        }
        let mut out = Box::new([0u8; LOG_SECTOR_SIZE]);
        self.storage
            .read_at(&mut out[..], file_offset)
            .map_err(|e| Error::io("reading a metadata page", e))?;
        Ok(out)
    }

    /// Replaces whole 4 KiB pages of the metadata region through the log, all in one log
    /// entry (they are marked dirty together), so a crash leaves all of them old or all new.
    /// Durable at the next flush.
    pub fn log_pages(&self, pages: Vec<(u64, Box<[u8; LOG_SECTOR_SIZE]>)>) -> Result<()> {
        self.check_poison()?;
        let s = self.session()?;
        let offsets: Vec<u64> = pages.iter().map(|(o, _)| *o).collect();
        self.change(s, |dirty| {
            locked(&self.other_pages).extend(pages);
            dirty.extend(offsets);
            Ok(())
        })
        .map(drop)
    }

    /// Makes a block of a differencing file read from the parent again (NOT_PRESENT), giving
    /// back its space: for a child emptied after its data was committed into the parent.
    pub fn unmap_to_parent(&self, block: u64) -> Result<()> {
        self.check_poison()?;
        if !self.geometry.has_parent {
            return Err(Error::InvalidArgument(
                "only a differencing file reads from a parent".into(),
            ));
        }
        let s = self.session()?;
        let bs = u64::from(self.geometry.block_size);
        let _exclusive = self
            .stripe(block)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let (state, entry) = self.bat.payload(block);
        if state == PayloadBlockState::NotPresent {
            return Ok(());
        }
        let index = self.geometry.payload_index(block);
        // The entry and the cleared bits in one change (rule 6), as in `make_full`.
        let generation = self.change(s, |pages| {
            let absent = BatEntry::new(PayloadBlockState::NotPresent.bits(), 0);
            self.set_entry(pages, index, absent);
            if state == PayloadBlockState::PartiallyPresent {
                self.change_bits(pages, block, 0, bs, false)?;
            }
            Ok(())
        })?;
        if state.has_data() {
            locked(&s.space).release(entry.file_offset(), bs, generation);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::vhdx::create::{create, CreateOptions};
    use crate::vhdx::{Chain, ChainOptions, ReadSource};

    const MIB: u64 = 1 << 20;

    /// 80 MiB in 1 MiB blocks: blocks 0 and 64 share a lock stripe.
    fn new_file(path: &Path, parent: Option<&Path>) {
        let opts = CreateOptions {
            virtual_size: Some(80 * MIB),
            block_size: Some(MIB as u32),
            parent: parent.map(Path::to_path_buf),
            ..Default::default()
        };
        create(path, &opts).unwrap();
    }

    fn open(path: &Path) -> Chain {
        let options = ChainOptions {
            writable: true,
            ..Default::default()
        };
        Chain::open(path, &options).unwrap()
    }

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn plan_write_only_for_blocks_that_need_no_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhdx");
        new_file(&base, None);
        let chain = open(&base);
        // Nothing allocated yet: every write needs the engine.
        assert!(chain.plan_write(0, 4096).unwrap().is_none());
        // Blocks 0 and 1 allocated by whole-block writes; block 3 written in part (a dynamic
        // file fills the rest with zeros: FULLY_PRESENT too).
        chain.write_at(&vec![1u8; 2 * MIB as usize], 0).unwrap();
        chain.write_at(&[3u8; 512], 3 * MIB + 512).unwrap();
        let plan = chain
            .plan_write(MIB - 4096, 8192)
            .unwrap()
            .expect("both blocks present");
        assert_send(&plan.guard);
        // Two blocks, two runs or one merged run, covering the 8 KiB in order.
        let total: u64 = plan.extents.iter().map(|e| e.1).sum();
        assert_eq!(total, 8192);
        let mut resolved = crate::vhdx::Extents::new();
        chain.resolve(MIB - 4096, 4096, &mut resolved).unwrap();
        assert_eq!(
            resolved[0].source,
            ReadSource::File {
                layer: 0,
                offset: plan.extents[0].0
            }
        );
        drop(plan);
        assert!(chain.plan_write(3 * MIB, 4096).unwrap().is_some());
        // Block 2 is not allocated: a range over blocks 1..=2 is refused, and the guard taken
        // on block 1 is given back (a trim of block 1 does not wait).
        assert!(chain.plan_write(2 * MIB - 4096, 8192).unwrap().is_none());
        chain.discard(MIB, MIB).unwrap();
        assert!(chain.plan_write(MIB, 4096).unwrap().is_none(), "trimmed");
        // Out of range and misaligned requests are errors, as for write.
        assert!(chain.plan_write(80 * MIB, 512).is_err());
        assert!(chain.plan_write(100, 512).is_err());
        chain.close().unwrap();

        // A differencing child: a partial write leaves the block PARTIALLY_PRESENT, which needs
        // bitmap changes on every write; a whole-block write makes it FULLY_PRESENT.
        let child = dir.path().join("child.vhdx");
        new_file(&child, Some(&base));
        let chain = open(&child);
        chain.write_at(&[5u8; 4096], 0).unwrap();
        assert!(
            chain.plan_write(0, 4096).unwrap().is_none(),
            "partial block"
        );
        chain.write_at(&vec![6u8; MIB as usize], 4 * MIB).unwrap();
        assert!(chain.plan_write(4 * MIB + 512, 512).unwrap().is_some());
        chain.close().unwrap();
    }

    #[test]
    fn a_trim_waits_for_a_planned_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhdx");
        new_file(&path, None);
        let chain = Arc::new(open(&path));
        chain.write_at(&vec![1u8; 2 * MIB as usize], 0).unwrap();
        let plan = chain.plan_write(4096, 4096).unwrap().unwrap();
        let (tx, rx) = mpsc::channel();
        let trimmer = {
            let chain = Arc::clone(&chain);
            std::thread::spawn(move || {
                chain.discard(0, MIB).unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the trim went ahead of a write in flight"
        );
        // Meanwhile the trim's lock stripe is not held: block 64 (same stripe as block 0) is
        // allocated and written (the thread that completes the write in flight could be the
        // one doing this), and a new plan for the block being trimmed is refused (it goes to
        // the engine, and waits there).
        chain.write_at(&[2u8; 512], 64 * MIB).unwrap();
        assert!(chain.plan_write(64 * MIB, 512).unwrap().is_some());
        assert!(chain.plan_write(0, 512).unwrap().is_none());
        // The write "completes": the trim runs.
        drop(plan);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the trim ran once the guard was dropped");
        trimmer.join().unwrap();
        assert!(
            chain.plan_write(0, 512).unwrap().is_none(),
            "block 0 trimmed"
        );
        let mut buf = [9u8; 512];
        chain.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0u8; 512]);
        Arc::try_unwrap(chain).ok().unwrap().close().unwrap();
    }
}
