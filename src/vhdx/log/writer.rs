//! The WAL worker: one thread per writable file, running an epoll loop on an eventfd.
//!
//! Writers change metadata in memory (the BAT, bitmap pages) and mark the 4 KiB pages they
//! touched dirty, both inside one [`Change`]. The worker turns dirty pages into log entries in
//! *commits*, one generation each. A commit k:
//!
//! 1. snapshot the dirty pages' current contents, with no change in progress: a change that
//!    touches several pages (a block's BAT entry and the bits it makes meaningless) is in one
//!    commit whole, never split between two;
//! 2. `fdatasync`: every data write published before the snapshot is durable (design rule 2);
//! 3. write entry k. It is durable after the next `fdatasync` (rule 3), and only then are its
//!    waiters released and its pages written in place; those in-place writes are durable after
//!    the `fdatasync` after that (rule 4), and until then a crash replays entry k.
//!
//! The flushes are shared: commit k+1 takes its snapshot *before* the flush that makes entry k
//! durable, so one `fdatasync` is step 2 of commit k+1 and step 3 of commit k, and a stream of
//! commits (a busy `serve`) costs one flush each instead of two. When nothing is dirty the
//! next commit logs nothing and is durable with that same flush. Replay stays right at every
//! instant because an entry's Tail is its predecessor while the predecessor's in-place writes
//! are not flushed yet (entry k+1 is written right after entry k's pages go in place): a crash
//! then replays both, in order. An entry is at most half the log (its terminator included),
//! so entry k+1 never touches entry k, and entry k+2, which may overwrite entry k, is written
//! only after the flush that made k's in-place writes durable. FlushedFileOffset is the file
//! size read before the flush that precedes the entry.
//!
//! More dirty pages than fit in one entry take several rounds, each flushed and applied before
//! the next is logged. A crash between rounds leaves the earlier rounds durable and the later
//! ones not, so rounds go in the order [`PageSource::order`] gives: the pages that make others
//! safe first. The log therefore never fills up: a large commit simply takes more rounds
//! (back-pressure on the flushes waiting for it), never an error.
//!
//! Any I/O error poisons the file: the worker stops writing and every waiter and later request
//! gets the error.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uuid::Uuid;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::entry::{build_entry, descriptor_sectors, LogOp};
use crate::vhdx::format::*;
use crate::vhdx::storage::Storage;

/// Dirty metadata is committed at least this often even without a guest flush.
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(2);

/// Supplies the current contents of a metadata page by file offset. A page that was marked
/// dirty must come from the in-memory truth, never from the file: the in-place writes of the
/// last entry are made only after the next snapshot is taken.
pub trait PageSource: Send + Sync {
    fn page(&self, file_offset: u64, out: &mut [u8; LOG_SECTOR_SIZE]) -> io::Result<()>;

    /// Where a page goes among the pages of one commit, which may take several rounds: pages
    /// with a lower key become durable no later than pages with a higher one. A page whose
    /// change makes another page's change safe must sort first. By file offset unless said.
    fn order(&self, file_offset: u64) -> (u8, u64) {
        (0, file_offset)
    }
}

/// Called with each generation once it is durable (to release freed space).
pub type DurableHook = Box<dyn Fn(u64) + Send + Sync>;

struct State {
    dirty: BTreeSet<u64>,
    /// Generation of the last commit that started; the next one is `started + 1`.
    started: u64,
    /// Generation of the last commit that is durable.
    durable: u64,
    /// Highest generation somebody waits for.
    requested: u64,
    /// A commit (the worker's, or a flusher's data-only one) is running.
    committing: bool,
    poisoned: Option<String>,
    shutdown: bool,
    /// Changes marked since the last snapshot (for [`Stats`]).
    changes: u64,
    stats: Stats,
}

/// What the log did since its last report: printed at debug level about once a second while
/// it works (`RUST_LOG=vhost_user_vhdx::vhdx::log::writer=debug`), so that the cost of a
/// commit can be taken apart without a profiler.
#[derive(Default)]
struct Stats {
    since: Option<Instant>,
    /// Steps ([`step`]): each a generation, one flush at least.
    commits: u64,
    entries: u64,
    pages: u64,
    changes: u64,
    flushes: u64,
    flush_time: Duration,
    /// Flushes made for data before an entry ...
    data_flushes: u64,
    /// ... and of those, how many also made the previous entry durable.
    shared_flushes: u64,
    /// Waits for a generation ([`Wal::wait_durable`]) and the time spent in them.
    waits: u64,
    waited: Duration,
    longest_wait: Duration,
}

impl Stats {
    fn report_if_due(&mut self) {
        let since = *self.since.get_or_insert_with(Instant::now);
        let elapsed = since.elapsed();
        if elapsed < Duration::from_secs(1) || !log::log_enabled!(log::Level::Debug) {
            return;
        }
        let per = |d: Duration, n: u64| d.as_micros() as u64 / n.max(1);
        log::debug!(
            "log: {:.0} steps/s, {} entries, {:.1} changes and {:.1} pages per entry; \
             {} flushes of {} us avg, {} for data, {} of those also for an entry; \
             {} waits, {} us avg, {} us longest",
            self.commits as f64 / elapsed.as_secs_f64(),
            self.entries,
            self.changes as f64 / self.entries.max(1) as f64,
            self.pages as f64 / self.entries.max(1) as f64,
            self.flushes,
            per(self.flush_time, self.flushes),
            self.data_flushes,
            self.shared_flushes,
            self.waits,
            per(self.waited, self.waits),
            self.longest_wait.as_micros(),
        );
        *self = Stats {
            since: Some(Instant::now()),
            ..Stats::default()
        };
    }
}

struct Shared {
    state: Mutex<State>,
    /// Held shared by every [`Change`], exclusively by a commit while it takes its snapshot.
    cut: RwLock<()>,
    changed: Condvar,
    kick: EventFd,
    storage: Arc<dyn Storage>,
    pages: Arc<dyn PageSource>,
    on_durable: DurableHook,
    log_offset: u64,
    log_length: u64,
    log_guid: Uuid,
}

/// Where the worker writes next, and what it has written but not flushed; touched only by the
/// worker thread.
struct Cursor {
    position: u64,
    sequence: u64,
    /// The newest entry, written but not flushed yet.
    unflushed: Option<Unflushed>,
    /// Where the entry whose pages were last written in place starts, until a flush makes
    /// those writes durable: the next entry's Tail, so that a replay applies it again.
    applied: Option<u64>,
}

/// An entry written but not flushed: its pages go in place once a flush makes it durable.
struct Unflushed {
    position: u64,
    ops: Vec<LogOp>,
    /// The generation it makes durable; `None` for a round of a commit other than its last.
    generation: Option<u64>,
}

pub struct Wal {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Wal {
    /// Starts a log for a new session: writes an empty entry under the new `log_guid` at the
    /// start of the log and flushes it, then starts the worker. The caller sets LogGuid in the
    /// headers only after this returns, so a header that names the log always finds a valid
    /// sequence in it, even if the session ends before its first commit.
    pub fn start(
        storage: Arc<dyn Storage>,
        pages: Arc<dyn PageSource>,
        on_durable: DurableHook,
        log_offset: u64,
        log_length: u64,
        log_guid: Uuid,
    ) -> io::Result<Wal> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                dirty: BTreeSet::new(),
                started: 0,
                durable: 0,
                requested: 0,
                committing: false,
                poisoned: None,
                shutdown: false,
                changes: 0,
                stats: Stats::default(),
            }),
            cut: RwLock::new(()),
            changed: Condvar::new(),
            kick: EventFd::new(EFD_NONBLOCK)?,
            storage,
            pages,
            on_durable,
            log_offset,
            log_length,
            log_guid,
        });
        let size = shared.storage.len()?;
        let empty = build_entry(
            log_guid,
            1,
            0,
            size / MIB * MIB,
            align_up(size, MIB).unwrap_or(size),
            &[],
        );
        write_wrapped(&shared, 0, &terminated(empty.clone()))?;
        shared.storage.flush()?;
        let cursor = Cursor {
            position: empty.len() as u64,
            sequence: 1,
            unflushed: None,
            applied: None,
        };
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vhdx-wal".into())
            .spawn(move || run(&worker, cursor))?;
        Ok(Wal {
            shared,
            thread: Some(thread),
        })
    }

    /// Starts a metadata change. Make the in-memory changes and mark their pages dirty while
    /// the returned guard lives: a commit then sees all of them or none. Never start a second
    /// change, or wait for a commit, while holding one.
    pub fn change(&self) -> Change<'_> {
        Change {
            shared: &self.shared,
            _cut: self.shared.cut.read().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Asks for a commit without waiting (e.g. so that freed space comes back soon).
    pub fn nudge(&self) {
        let mut st = lock(&self.shared);
        st.requested = st.requested.max(st.started + 1);
        drop(st);
        let _ = self.shared.kick.write(1);
    }

    /// Waits until everything done before the call is durable: data and metadata. Concurrent
    /// callers share one commit.
    pub fn flush(&self) -> io::Result<()> {
        let mut st = lock(&self.shared);
        if let Some(p) = &st.poisoned {
            return Err(poison_error(p));
        }
        // Nothing to log and nothing in progress: the commit is a bare fdatasync, which the
        // caller does itself rather than pay two thread switches for it. It is a generation
        // like any other, so concurrent flushes still coalesce on it.
        if st.dirty.is_empty() && !st.committing && st.requested <= st.durable {
            let generation = st.started + 1;
            st.started = generation;
            st.committing = true;
            drop(st);
            let result = self.shared.storage.flush();
            let mut st = lock(&self.shared);
            st.committing = false;
            match &result {
                Ok(()) => st.durable = st.durable.max(generation),
                Err(e) => {
                    st.poisoned.get_or_insert(e.to_string());
                }
            }
            self.shared.changed.notify_all();
            drop(st);
            if result.is_ok() {
                (self.shared.on_durable)(generation);
            }
            return result;
        }
        let target = st.started + 1;
        st.requested = st.requested.max(target);
        let _ = self.shared.kick.write(1);
        loop {
            if let Some(p) = &st.poisoned {
                return Err(poison_error(p));
            }
            if st.durable >= target {
                return Ok(());
            }
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until generation `generation` (what [`Change::mark_dirty`] returned) is durable,
    /// asking for its commit if nobody has yet. Concurrent waiters share one commit, and a
    /// generation already durable costs no more than a lock.
    pub fn wait_durable(&self, generation: u64) -> io::Result<()> {
        let mut st = lock(&self.shared);
        let mut started = None;
        loop {
            if let Some(p) = &st.poisoned {
                return Err(poison_error(p));
            }
            if st.durable >= generation {
                if let Some(started) = started {
                    let waited = Instant::elapsed(&started);
                    st.stats.waits += 1;
                    st.stats.waited += waited;
                    st.stats.longest_wait = st.stats.longest_wait.max(waited);
                }
                return Ok(());
            }
            started.get_or_insert_with(Instant::now);
            if st.requested < generation {
                st.requested = generation;
                let _ = self.shared.kick.write(1);
            }
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether generation `generation` is durable already.
    pub fn is_durable(&self, generation: u64) -> bool {
        lock(&self.shared).durable >= generation
    }

    /// Asks for the commit of `generation` without waiting for it (a waiter comes later).
    pub fn request(&self, generation: u64) {
        let mut st = lock(&self.shared);
        if st.requested < generation && st.durable < generation {
            st.requested = generation;
            drop(st);
            let _ = self.shared.kick.write(1);
        }
    }

    pub fn poisoned(&self) -> Option<String> {
        lock(&self.shared).poisoned.clone()
    }

    /// Marks the file unusable: no more commits.
    pub fn poison(&self, reason: String) {
        let mut st = lock(&self.shared);
        st.poisoned.get_or_insert(reason);
        self.shared.changed.notify_all();
    }

    /// Commits what is dirty, then stops the worker.
    pub fn shutdown(mut self) -> io::Result<()> {
        let result = self.flush();
        self.stop();
        result
    }

    fn stop(&mut self) {
        lock(&self.shared).shutdown = true;
        let _ = self.shared.kick.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A metadata change in progress (see [`Wal::change`]).
pub struct Change<'a> {
    shared: &'a Shared,
    _cut: RwLockReadGuard<'a, ()>,
}

impl Change<'_> {
    /// Records changed metadata pages; returns the generation whose commit will contain them.
    pub fn mark_dirty(&self, pages: &[u64]) -> io::Result<u64> {
        let mut st = lock(self.shared);
        if let Some(p) = &st.poisoned {
            return Err(poison_error(p));
        }
        st.dirty.extend(pages.iter().copied());
        st.changes += u64::from(!pages.is_empty());
        Ok(st.started + 1)
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.stop();
    }
}

fn poison_error(reason: &str) -> io::Error {
    io::Error::other(format!(
        "the image is unusable after an earlier I/O error: {reason}"
    ))
}

fn run(shared: &Shared, mut cursor: Cursor) {
    let epfd = match epoll::create(true) {
        Ok(fd) => fd,
        Err(e) => return poison(shared, format!("epoll_create: {e}")),
    };
    let event = epoll::Event::new(epoll::Events::EPOLLIN, 0);
    if let Err(e) = epoll::ctl(
        epfd,
        epoll::ControlOptions::EPOLL_CTL_ADD,
        shared.kick.as_raw_fd(),
        event,
    ) {
        let _ = epoll::close(epfd);
        return poison(shared, format!("epoll_ctl: {e}"));
    }
    let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 1];
    let mut stats = Stats::default();
    loop {
        // An entry written but not flushed yet is made durable by the next step's flush, which
        // should not wait: go on at once. And a shutdown that found changes to commit has had
        // its kick consumed by now: after that commit the worker must not sleep a whole
        // interval before it sees the shutdown (a writable file dropped without `close` took
        // COMMIT_INTERVAL to drop).
        let timeout = if cursor.unflushed.is_some() || lock(shared).shutdown {
            0
        } else {
            COMMIT_INTERVAL.as_millis() as i32
        };
        match epoll::wait(epfd, timeout, &mut events) {
            Ok(_) => {
                let _ = shared.kick.read();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                poison(shared, format!("epoll_wait: {e}"));
                break;
            }
        }
        let mut st = lock(shared);
        if st.poisoned.is_some() {
            if st.shutdown {
                break;
            }
            continue;
        }
        let wanted =
            st.requested > st.durable || !st.dirty.is_empty() || cursor.unflushed.is_some();
        if !wanted {
            if st.shutdown {
                break;
            }
            continue;
        }
        // A flusher's data-only commit runs without the worker: let it finish first. While an
        // entry is unflushed the worker keeps `committing` set, so no such commit starts.
        if cursor.unflushed.is_none() {
            while st.committing {
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        let generation = st.started + 1;
        st.started = generation;
        st.committing = true;
        drop(st);
        let result = step(shared, &mut cursor, generation, &mut stats);
        let mut st = lock(shared);
        match result {
            Ok(durable) => {
                st.committing = cursor.unflushed.is_some();
                if let Some(g) = durable {
                    st.durable = st.durable.max(g);
                }
                shared.changed.notify_all();
                let waits = std::mem::take(&mut st.stats);
                drop(st);
                stats.waits += waits.waits;
                stats.waited += waits.waited;
                stats.longest_wait = stats.longest_wait.max(waits.longest_wait);
                stats.report_if_due();
                if let Some(g) = durable {
                    (shared.on_durable)(g);
                }
            }
            Err(e) => {
                st.committing = false;
                drop(st);
                cursor.unflushed = None;
                poison(shared, e.to_string());
            }
        }
    }
    let _ = epoll::close(epfd);
}

fn poison(shared: &Shared, reason: String) {
    log::error!("VHDX log writer stopped: {reason}");
    let mut st = lock(shared);
    st.poisoned.get_or_insert(reason);
    shared.changed.notify_all();
}

/// Pages that fit in one entry of at most half the log.
///
/// Never more than fit in the first descriptor sector (126): qemu refuses to open a file whose
/// log holds a stale entry with a valid header but overwritten descriptors (its search treats a
/// bad descriptor as an I/O error, not as the end of a sequence), and with one descriptor sector
/// an entry's header and descriptors are always written, and overwritten, together.
///
/// Half the log less one sector: the terminator written after each entry (see [`terminated`])
/// must not reach the entry before it either.
fn pages_per_entry(log_length: u64) -> usize {
    const ONE_DESCRIPTOR_SECTOR: u64 = 126;
    let sectors = log_length / 2 / LOG_SECTOR_SIZE as u64 - 1;
    let mut n = sectors.saturating_sub(1).min(ONE_DESCRIPTOR_SECTOR);
    while n > 0 && descriptor_sectors(n) + n > sectors {
        n -= 1;
    }
    n.max(1) as usize
}

/// The dirty pages and their contents, taken with no [`Change`] in progress, in the order of
/// [`PageSource::order`]. Pages marked dirty after the generation was started but before the
/// snapshot come along: durable sooner than promised, never later.
fn snapshot(shared: &Shared, stats: &mut Stats) -> io::Result<Vec<LogOp>> {
    let _cut = shared.cut.write().unwrap_or_else(|e| e.into_inner());
    let mut st = lock(shared);
    stats.changes += std::mem::take(&mut st.changes);
    let dirty = std::mem::take(&mut st.dirty);
    drop(st);
    let dirty = in_commit_order(&*shared.pages, dirty);
    let mut ops = Vec::with_capacity(dirty.len());
    for offset in dirty {
        let mut data = Box::new([0u8; LOG_SECTOR_SIZE]);
        shared.pages.page(offset, &mut data)?;
        ops.push(LogOp::Data {
            file_offset: offset,
            data,
        });
    }
    Ok(ops)
}

fn in_commit_order(pages: &dyn PageSource, dirty: BTreeSet<u64>) -> Vec<u64> {
    let mut dirty: Vec<u64> = dirty.into_iter().collect();
    dirty.sort_by_key(|&offset| (pages.order(offset), offset));
    dirty
}

/// One step of the worker, generation `generation`'s: returns the highest generation now
/// durable, if this step made one so.
///
/// 1. Snapshot the dirty pages.
/// 2. `fdatasync`. It makes durable at once: the data written before the snapshot (rule 2);
///    the entry the previous step wrote, whose generation is durable now; and the in-place
///    writes made before it, so their entry is no longer needed (rule 4).
/// 3. Write the pages of the entry just made durable in place (rule 3: never before).
/// 4. Log the snapshot, if it holds any page: write its entry (more rounds if it is large, each
///    flushed as in 2 before the next is written). Its Tail is the entry whose pages 3 wrote,
///    if any: those writes are not durable yet, so a replay must apply that entry again. The
///    entry is left unflushed: the next step's flush makes it durable, together with the data
///    of the next snapshot -- one flush per commit while commits follow each other.
///
/// A snapshot with no page is durable with this step's flush: nothing to log.
fn step(
    shared: &Shared,
    cursor: &mut Cursor,
    generation: u64,
    stats: &mut Stats,
) -> io::Result<Option<u64>> {
    let storage = &*shared.storage;
    // Step 1: snapshot. Everything the snapshot shows was written before it was published.
    let ops = snapshot(shared, stats)?;
    let had_entry = cursor.unflushed.is_some();
    let mut durable = None;
    // Step 2, 3.
    let mut stable_size = flush_and_apply(shared, cursor, stats, !ops.is_empty(), &mut durable)?;
    if ops.is_empty() {
        stats.commits += 1;
        return Ok(Some(generation));
    }
    stats.commits += 1;
    stats.pages += ops.len() as u64;
    stats.shared_flushes += u64::from(had_entry);
    let per_entry = pages_per_entry(shared.log_length);
    let rounds = ops.len().div_ceil(per_entry);
    let mut ops = ops.into_iter();
    for round in 0..rounds {
        if round > 0 {
            // The previous round is durable, and its pages in place, before this one is logged:
            // rounds become durable in order.
            stable_size = flush_and_apply(shared, cursor, stats, false, &mut durable)?;
        }
        let chunk: Vec<LogOp> = ops.by_ref().take(per_entry).collect();
        // Step 4.
        let file_size = storage.len()?;
        cursor.sequence += 1;
        let tail = cursor.applied.unwrap_or(cursor.position);
        let entry = build_entry(
            shared.log_guid,
            cursor.sequence,
            tail,
            stable_size / MIB * MIB,
            align_up(file_size, MIB).unwrap_or(file_size),
            &chunk,
        );
        write_wrapped(shared, cursor.position, &terminated(entry.clone()))?;
        stats.entries += 1;
        cursor.unflushed = Some(Unflushed {
            position: cursor.position,
            ops: chunk,
            generation: (round + 1 == rounds).then_some(generation),
        });
        cursor.position = (cursor.position + entry.len() as u64) % shared.log_length;
    }
    Ok(durable)
}

/// Steps 2 and 3 of [`step`]: flushes the file, then writes the pages of the entry that flush
/// made durable in place. Returns the file size the flush made durable (FlushedFileOffset: a
/// concurrent allocation may grow the file meanwhile, which only LastFileOffset reflects); a
/// generation that became durable goes to `durable`.
fn flush_and_apply(
    shared: &Shared,
    cursor: &mut Cursor,
    stats: &mut Stats,
    data: bool,
    durable: &mut Option<u64>,
) -> io::Result<u64> {
    let storage = &*shared.storage;
    let stable_size = storage.len()?;
    let began = Instant::now();
    storage.flush()?;
    stats.flushes += 1;
    stats.flush_time += began.elapsed();
    stats.data_flushes += u64::from(data);
    // Whatever was written in place before the flush is durable.
    cursor.applied = None;
    if let Some(entry) = cursor.unflushed.take() {
        for op in &entry.ops {
            if let LogOp::Data { file_offset, data } = op {
                storage.write_at(&data[..], *file_offset)?;
            }
        }
        cursor.applied = Some(entry.position);
        if entry.generation.is_some() {
            *durable = entry.generation;
        }
    }
    Ok(stable_size)
}

/// An entry followed by one zero sector. qemu's log search takes any valid entry as the second
/// of a sequence (it checks sequence numbers only from the third on) and replays up to the end
/// of what it found: if the sector after the newest entry held an older entry of this session,
/// qemu would chain from the newest entry all the way round the log back to itself and fail
/// the open. A zero sector after every entry ends each sequence at its newest entry; the next
/// entry overwrites it.
fn terminated(mut entry: Vec<u8>) -> Vec<u8> {
    entry.resize(entry.len() + LOG_SECTOR_SIZE, 0);
    entry
}

fn write_wrapped(shared: &Shared, position: u64, bytes: &[u8]) -> io::Result<()> {
    let first = (shared.log_length - position).min(bytes.len() as u64) as usize;
    shared
        .storage
        .write_at(&bytes[..first], shared.log_offset + position)?;
    if first < bytes.len() {
        shared
            .storage
            .write_at(&bytes[first..], shared.log_offset)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_fit_in_half_the_log() {
        // Half of a 1 MiB log is 128 sectors: 126 pages take one descriptor sector (127 in
        // all); a 127th page would need a second descriptor sector (129).
        let n = pages_per_entry(MIB) as u64;
        assert_eq!(n, 126);
        // With its terminator sector, an entry takes at most half the log.
        assert!(descriptor_sectors(n) + n < 128);
        assert_eq!(pages_per_entry(8 * MIB), 126);
    }

    /// Pages below 1 MiB stand for the BAT: first, from the top down; the rest by offset.
    struct Ranked;
    impl PageSource for Ranked {
        fn page(&self, _: u64, _: &mut [u8; LOG_SECTOR_SIZE]) -> io::Result<()> {
            Ok(())
        }
        fn order(&self, offset: u64) -> (u8, u64) {
            if offset < MIB {
                (0, u64::MAX - offset)
            } else {
                (1, offset)
            }
        }
    }

    #[test]
    fn a_wal_dropped_with_dirty_pages_commits_and_stops_at_once() {
        use crate::vhdx::MemStorage;
        let storage = Arc::new(MemStorage::new(vec![0u8; 4 * MIB as usize]));
        let wal = Wal::start(
            storage.clone(),
            Arc::new(Ranked),
            Box::new(|_| {}),
            MIB,
            MIB,
            Uuid::new_v4(),
        )
        .unwrap();
        wal.change().mark_dirty(&[2 * MIB]).unwrap();
        let started = std::time::Instant::now();
        drop(wal);
        // The drop waits for the worker, which commits the dirty page and exits; it used to
        // sleep a whole COMMIT_INTERVAL after that commit before it noticed the shutdown.
        // (Not a performance bound: the commit takes microseconds, the interval 2 s.)
        assert!(
            started.elapsed() < COMMIT_INTERVAL,
            "dropping the WAL took {:?}",
            started.elapsed()
        );
        // And the page was committed: the log holds an entry after the empty one.
        let mut log = vec![0u8; 64 << 10];
        storage.read_at(&mut log, MIB).unwrap();
        let entries = log.chunks(4096).filter(|s| s.starts_with(b"loge")).count();
        assert!(entries >= 2, "{entries} log entries");
    }

    #[test]
    fn rounds_follow_the_page_order() {
        let dirty: BTreeSet<u64> = [3 * MIB, 4096, 2 * MIB, 8192, 0].into();
        assert_eq!(
            in_commit_order(&Ranked, dirty),
            [8192, 4096, 0, 2 * MIB, 3 * MIB]
        );
    }
}
