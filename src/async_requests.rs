//! Requests in flight at the guest's queue depth: a queue thread that submits the data I/O of
//! the requests it pops through its [`AsyncIo`] and keeps popping, and finishes each request
//! when its I/O comes back, in whatever order (virtio lets a device complete out of order).
//!
//! Only the data path goes through here: reads whose extents are all plain-file data or
//! zeros, and writes that [`Chain::plan_write`] accepts (every block already FULLY_PRESENT, so
//! no metadata changes). With `--cache none` only transfers whose buffers, file offsets and
//! lengths meet the file's O_DIRECT alignment; the rest keeps the synchronous bounce path.
//! Everything else (first-touch writes, partial differencing writes, discard, write-zeroes,
//! flush, get-id, malformed requests, writes under write-through) runs synchronously through
//! [`Requests`], as before; one that changed metadata not yet durable is held back
//! ([`crate::held`]) while the requests behind it run, as the one-at-a-time path does. A flush run when popped covers every write the guest saw complete:
//! their data went to the same file descriptors, which the engine's flush fdatasyncs.
//!
//! Before running any request synchronously the queue completes its own asynchronous I/O, so
//! that the thread never blocks while it holds something another thread may wait for: a trim
//! waits for the write guards of its blocks ([`WriteGuard`]), and a read-modify-write of an
//! O_DIRECT file for the file's shared write gate, which this thread's writes in flight hold
//! until it reaps them; the engine's own writes (its log, a first touch) queue behind such a
//! read-modify-write, and a flush or a read may wait for those. Holding nothing while blocked
//! rules every such cycle out, at the cost of a short drain before the (rarer) synchronous
//! requests.
//!
//! A request's guest memory (its `Arc`), its write guard and gate guard live in its slot until
//! every part of it is done; a request split over several extents completes once, with the
//! first error's status. Every request still goes through the queue's in-flight record
//! ([`Queue::pop`] / [`Queue::complete`]), which is what a stop waits on; the thread keeps
//! reaping while a stop waits, and completes everything before it exits ([`AsyncQueue::drain`]).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, warn};
use smallvec::SmallVec;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::guest_io::{GuestBuffers, IOV_MAX};
use crate::guest_memory;
use crate::held::Held;
use crate::io::{AsyncIo, Completion, Op, OpKind};
use crate::queue::{Outcome, Popped, Queue, QueueServer};
use crate::requests::{overlaps, Requests};
use crate::vhdx::chain::{Extents, ReadSource};
use crate::vhdx::direct::{DirectFile, GateGuard};
use crate::vhdx::write::{defer_metadata_waits, WriteGuard};
use crate::vhdx::ReadTarget;
use crate::virtio_blk::{self, Kind};

/// Completions after which a waiting driver is signalled mid-batch (as the synchronous path),
/// whether they come from requests run here or from a batch of reaped results: the driver
/// starts on the first ones (and sends more requests) while this thread finishes the rest.
const EARLY_SIGNAL_AFTER: usize = 8;

/// One request whose data I/O is in flight.
struct Slot {
    /// Keeps the guest memory behind the operations' buffers mapped.
    mem: Arc<GuestMemoryMmap>,
    status_at: GuestAddress,
    /// The used length on success (bytes written to the guest, without the status byte).
    written: u32,
    /// Operations not yet back.
    parts: usize,
    status: u8,
    write: bool,
    /// Dropped once the data is written: keeps the blocks from being trimmed meanwhile.
    _guard: Option<WriteGuard>,
    /// The O_DIRECT file's shared write gate (no read-modify-write beside this write).
    _gate: Option<GateGuard>,
}

/// What became of a popped request.
enum Start {
    /// Its I/O is in flight; `device` if it reads or writes an O_DIRECT file.
    Submitted { device: bool },
    /// Done already (only zeros to read): complete it with this used length.
    Done(u32),
    /// Not for the asynchronous path: run it synchronously, once this queue's asynchronous
    /// I/O is complete.
    Sync,
}

/// A queue thread's asynchronous state.
pub struct AsyncQueue {
    requests: Arc<Requests>,
    io: Box<dyn AsyncIo>,
    /// Indexed by head (unique while in flight).
    slots: Vec<Option<Slot>>,
    /// Requests with a slot.
    active: usize,
    /// Operations the AsyncIo had no room for, submitted as completions free room.
    pending: VecDeque<(Op, u64)>,
    /// Reaped results, reused.
    done: Vec<Completion>,
    /// Requests whose last part is done, for the used ring (reused).
    finished: Vec<(u16, Outcome)>,
    /// Requests completed into the used ring since the driver was last signalled.
    unsignalled: usize,
    /// Requests run one at a time whose metadata change is not durable yet.
    held: Held,
    /// Requests served so far: reads and writes in flight, one at a time, and buffered writes
    /// copied on this thread (for the log).
    counts: [u64; 4],
}

impl AsyncQueue {
    /// For a queue of at most `max_size` heads.
    pub fn new(requests: Arc<Requests>, io: Box<dyn AsyncIo>, max_size: u16) -> AsyncQueue {
        AsyncQueue {
            requests,
            io,
            slots: (0..max_size).map(|_| None).collect(),
            active: 0,
            pending: VecDeque::new(),
            done: Vec::new(),
            finished: Vec::new(),
            unsignalled: 0,
            held: Held::default(),
            counts: [0; 4],
        }
    }

    /// The fd the queue thread waits on for completions.
    pub fn notifier(&self) -> RawFd {
        self.io.notifier()
    }

    /// Serves `queue`: finishes what has completed, then pops and starts every available
    /// request, with one submission for the whole batch. Asynchronous requests may still be in
    /// flight on return; guest notifications are left disabled (see [`QueueServer`]).
    pub fn serve(&mut self, queue: &Arc<Queue>) {
        self.reap_ready(queue);
        queue.disable_notification();
        while let Some(p) = queue.pop() {
            match self.start(&p) {
                // A request for the disk goes to the kernel at once, not with the batch, so
                // the device starts on it while the rest are popped. A batch of 32 O_DIRECT
                // reads in one call reached this machine's virtio disk ~230 us after the
                // completions that let the driver send them, as one notification once the
                // kernel had prepared all 32; one call each: cold 4 KiB QD32 61k -> 82k IOPS
                // (README, "Cold"). From the page cache a read is a copy done inside the
                // call, and one call per batch is cheaper there (4 KiB QD32: 345k IOPS
                // batched, 268k one call each).
                Start::Submitted { device: true } => self.commit(),
                Start::Submitted { device: false } => {}
                Start::Done(used) => self.finish(queue, p.head, Outcome::Used(used)),
                Start::Sync => {
                    self.counts[2] += 1;
                    self.drain(queue);
                    // A first touch (or a write relying on one) waits for its commit held
                    // aside, not here: the requests behind it run meanwhile and share it.
                    let (outcome, generation) =
                        defer_metadata_waits(|| self.requests.run_popped(&p));
                    if generation > 0 {
                        self.held.hold(p, outcome, generation);
                        continue;
                    }
                    self.finish(queue, p.head, outcome);
                }
            }
            if self.held.passed_one() {
                self.complete_held(queue);
            }
            if self.unsignalled >= EARLY_SIGNAL_AFTER {
                self.signal(queue);
            }
        }
        self.commit();
        self.complete_held(queue);
        // Whatever finished meanwhile goes out with this batch's signal.
        self.reap_ready(queue);
        if self.unsignalled > 0 {
            self.signal(queue);
        }
    }

    /// When the queue thread exits: completes everything in flight and logs what ran how.
    pub fn finish_all(&mut self, queue: &Arc<Queue>) {
        self.drain(queue);
        let [reads, writes, sync, copied] = self.counts;
        if reads + writes + sync + copied > 0 {
            log::info!(
                "queue {}: {reads} reads and {writes} writes ran in flight, {copied} buffered writes \
                 were copied at once, {sync} requests ran one at a time",
                queue.index
            );
        }
    }

    /// Waits for and finishes every request in flight (before a synchronous request that must
    /// not run beside them, and before the thread exits).
    pub fn drain(&mut self, queue: &Arc<Queue>) {
        while self.active > 0 {
            self.commit();
            self.done.clear();
            let mut done = std::mem::take(&mut self.done);
            if let Err(e) = self.io.wait(&mut done) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("queue {}: waiting for data I/O: {e}", queue.index);
                }
            }
            self.finish_results(queue, &mut done);
            self.done = done;
        }
        if self.unsignalled > 0 {
            self.signal(queue);
        }
    }

    fn reap_ready(&mut self, queue: &Arc<Queue>) {
        loop {
            let mut done = std::mem::take(&mut self.done);
            done.clear();
            self.io.reap(&mut done);
            let any = !done.is_empty();
            self.finish_results(queue, &mut done);
            self.done = done;
            if !any {
                return;
            }
        }
    }

    fn finish_results(&mut self, queue: &Arc<Queue>, done: &mut Vec<Completion>) {
        for (token, res) in done.drain(..) {
            self.part_done(queue, token, res);
            if self.finished.len() >= EARLY_SIGNAL_AFTER {
                self.unsignalled += queue.complete_all(&mut self.finished);
                self.signal(queue);
            }
        }
        // The rest of the requests these results finished go on the used ring under one lock.
        self.unsignalled += queue.complete_all(&mut self.finished);
        // Room was freed: move pending operations in.
        if !self.pending.is_empty() {
            self.submit_pending();
            self.commit();
        }
    }

    fn part_done(&mut self, queue: &Arc<Queue>, token: u64, res: io::Result<usize>) {
        let head = token as usize;
        let Some(slot) = self.slots.get_mut(head).and_then(Option::as_mut) else {
            warn!(
                "queue {}: a completion for no request ({token})",
                queue.index
            );
            return;
        };
        slot.parts -= 1;
        if let Err(e) = res {
            failed(&self.requests, slot, &e);
        }
        if slot.parts > 0 {
            return;
        }
        let slot = self.slots[head].take().expect("checked above");
        self.active -= 1;
        let used = complete_status(&slot);
        // Its guards and memory go now; it goes on the used ring with the rest of the results.
        drop(slot);
        self.finished.push((head as u16, Outcome::Used(used)));
    }

    fn finish(&mut self, queue: &Arc<Queue>, head: u16, outcome: Outcome) {
        if queue.complete(head, outcome, false) {
            self.unsignalled += 1;
        }
    }

    /// Completes the held requests once their metadata is in the log.
    fn complete_held(&mut self, queue: &Arc<Queue>) {
        self.unsignalled += self.held.complete(&self.requests, queue);
    }

    fn signal(&mut self, queue: &Arc<Queue>) {
        queue.signal_if_needed();
        self.unsignalled = 0;
    }

    fn commit(&mut self) {
        if let Err(e) = self.io.commit() {
            // The operations stay queued; the next commit or wait tries again.
            debug!("submitting data I/O: {e}");
        }
    }

    fn submit_pending(&mut self) {
        while let Some((op, token)) = self.pending.pop_front() {
            // SAFETY: the op's buffers are guest memory kept mapped by the slot's `Arc` (or
            // nothing, for a flush), untouched by this process until the token comes back; its
            // fd is a file of the chain, which `requests` keeps open.
            if let Err(op) = unsafe { self.io.submit(op, token) } {
                self.pending.push_front((op, token));
                return;
            }
        }
    }

    fn submit(&mut self, op: Op, token: u64) {
        if !self.pending.is_empty() {
            self.pending.push_back((op, token));
            return;
        }
        // SAFETY: as in `submit_pending`.
        if let Err(op) = unsafe { self.io.submit(op, token) } {
            self.pending.push_back((op, token));
        }
    }

    /// Starts `p` asynchronously if it can be.
    fn start(&mut self, p: &Popped) -> Start {
        let head = usize::from(p.head);
        if head >= self.slots.len() || self.slots[head].is_some() {
            return Start::Sync;
        }
        let mem = &p.mem;
        // Anything unusual (malformed, outside memory, into the rings) is the synchronous
        // path's to answer.
        let Ok(req) = virtio_blk::parse(&p.descs, mem) else {
            return Start::Sync;
        };
        if overlaps(&p.rings, req.status, 1) || !mem.check_range(req.status, 1, Permissions::Write)
        {
            return Start::Sync;
        }
        let r = &self.requests;
        let write = match req.kind {
            Kind::In => false,
            Kind::Out if !r.read_only && !r.writethrough.load(Ordering::Relaxed) => true,
            _ => return Start::Sync,
        };
        let capacity = r.chain.virtual_size();
        let block = u64::from(r.chain.logical_sector_size());
        let Ok((offset, len)) = virtio_blk::disk_range(req.sector, req.data_len, capacity, block)
        else {
            return Start::Sync;
        };
        if !write && req.data.iter().any(|s| overlaps(&p.rings, s.addr, s.len)) {
            return Start::Sync;
        }
        let Ok(mut buffers) = GuestBuffers::new(mem, &req.data) else {
            return Start::Sync;
        };
        let written = if write {
            0
        } else {
            u32::try_from(req.data_len).unwrap_or(u32::MAX)
        };
        let mut ops: SmallVec<[Op; 4]> = SmallVec::new();
        let mut device = false;
        let mut guard = None;
        let mut gate = None;
        if write {
            let plan = match r.chain.plan_write(offset, len) {
                Ok(Some(plan)) => plan,
                _ => return Start::Sync,
            };
            let storage = r.chain.leaf().storage();
            let (fd, direct) = match (storage.direct(), storage.as_file()) {
                (Some(d), _) => (d.file().as_raw_fd(), Some(d)),
                (None, Some(f)) => (f.as_raw_fd(), None),
                (None, None) => return Start::Sync,
            };
            let mut at = 0usize;
            for &(file_offset, n) in &plan.extents {
                let n = n as usize;
                match transfer(&buffers, at, n, fd, direct, file_offset, OpKind::Write) {
                    Some(op) => ops.push(op),
                    None => return Start::Sync,
                }
                at += n;
            }
            device = direct.is_some();
            if let Some(d) = direct {
                // A read-modify-write of the file runs or waits: do not queue behind it while
                // holding shared guards it waits for.
                match d.gate().try_shared() {
                    Some(g) => gate = Some(g),
                    None => return Start::Sync,
                }
            }
            guard = Some(plan.guard);
        } else {
            let mut extents = Extents::new();
            if r.chain.resolve(offset, len, &mut extents).is_err() {
                return Start::Sync;
            }
            let mut zeros: SmallVec<[(usize, usize); 2]> = SmallVec::new();
            let mut at = 0usize;
            for e in &extents {
                let n = e.len as usize;
                match e.source {
                    ReadSource::Zero => zeros.push((at, n)),
                    ReadSource::File {
                        layer,
                        offset: file_offset,
                    } => {
                        let storage = r.chain.layers()[layer].storage();
                        let (fd, direct) = match (storage.direct(), storage.as_file()) {
                            (Some(d), _) => (d.file().as_raw_fd(), Some(d)),
                            (None, Some(f)) => (f.as_raw_fd(), None),
                            (None, None) => return Start::Sync,
                        };
                        device |= direct.is_some();
                        match transfer(&buffers, at, n, fd, direct, file_offset, OpKind::Read) {
                            Some(op) => ops.push(op),
                            None => return Start::Sync,
                        }
                    }
                }
                at += n;
            }
            let faults = guest_memory::faults();
            for (at, n) in zeros {
                buffers.fill_zero(at, n);
            }
            if guest_memory::faults() != faults {
                warn!("guest memory faulted during a request: failed");
                let slot = Slot {
                    mem: Arc::clone(mem),
                    status_at: req.status,
                    written,
                    parts: 0,
                    status: virtio_blk::VIRTIO_BLK_S_IOERR,
                    write,
                    _guard: None,
                    _gate: None,
                };
                return Start::Done(complete_status(&slot));
            }
        }
        let slot = Slot {
            mem: Arc::clone(mem),
            status_at: req.status,
            written,
            parts: ops.len(),
            status: virtio_blk::VIRTIO_BLK_S_OK,
            write,
            _guard: guard,
            _gate: gate,
        };
        if ops.is_empty() {
            return Start::Done(complete_status(&slot));
        }
        if write && !device {
            // A buffered write is a copy into the page cache: done here, it costs less than a
            // hop to io_uring's io-wq worker (where ext4 sends buffered writes) or to a pool
            // thread and back (page cache, 4 KiB QD32: 126k IOPS through io_uring, 189k here).
            // Its guard is held only while it copies, so nothing waits on this thread.
            let mut slot = slot;
            self.counts[3] += 1;
            for op in ops {
                // SAFETY: the buffers are the guest memory this request owns, kept mapped by
                // `slot.mem`, and the fd is the chain's open file; both outlive the call.
                if let Err(e) = unsafe { self.io.run_now(op) } {
                    failed(&self.requests, &mut slot, &e);
                    break;
                }
            }
            return Start::Done(complete_status(&slot));
        }
        self.slots[head] = Some(slot);
        self.active += 1;
        self.counts[usize::from(write)] += 1;
        for op in ops {
            self.submit(op, head as u64);
        }
        Start::Submitted { device }
    }
}

impl QueueServer for AsyncQueue {
    fn serve(&mut self, queue: &Arc<Queue>) {
        AsyncQueue::serve(self, queue);
    }

    fn ready(&mut self, queue: &Arc<Queue>) -> bool {
        self.io.ready() || queue.has_avail()
    }

    fn before_sleep(&mut self, _queue: &Arc<Queue>) -> bool {
        self.io.before_sleep()
    }
}

/// A transfer of `slot`'s request failed: IOERR for it, and for a write the engine learns of
/// it (a write that failed half-way makes the file unusable, as on the synchronous path).
fn failed(requests: &Requests, slot: &mut Slot, e: &io::Error) {
    if slot.status == virtio_blk::VIRTIO_BLK_S_OK {
        slot.status = virtio_blk::VIRTIO_BLK_S_IOERR;
    }
    if e.raw_os_error() == Some(nix::libc::EFAULT) {
        // Guest memory under the request vanished: the guest's fault, not the disk's.
        warn!("guest memory faulted during a request: failed");
    } else if slot.write {
        warn!("write: {e}");
        requests.chain.data_write_failed(e);
    } else {
        warn!("read: {e}");
    }
}

/// Writes the request's status byte; returns the used length (0 if the byte cannot be
/// written, as the synchronous path).
fn complete_status(slot: &Slot) -> u32 {
    if slot.mem.write_obj(slot.status, slot.status_at).is_err() {
        debug!(
            "status byte at {:#x} is not in guest memory",
            slot.status_at.0
        );
        return 0;
    }
    let written = if slot.status == virtio_blk::VIRTIO_BLK_S_OK {
        slot.written
    } else {
        0
    };
    written.saturating_add(1)
}

/// The operation moving request bytes `[at, at + len)` to or from `fd` at `file_offset`, or
/// `None` when it cannot go asynchronously: more iovecs than one call takes, or, on an O_DIRECT
/// file, anything off its alignment (the synchronous path bounces it).
fn transfer(
    buffers: &GuestBuffers<'_>,
    at: usize,
    len: usize,
    fd: RawFd,
    direct: Option<&DirectFile>,
    file_offset: u64,
    kind: OpKind,
) -> Option<Op> {
    let bufs = buffers.iovecs(at, len);
    if bufs.len() > IOV_MAX {
        return None;
    }
    if let Some(d) = direct {
        let align = d.align();
        if !align.range_ok(file_offset, len as u64)
            || !bufs
                .iter()
                .all(|b| align.buffer_ok(b.iov_base as usize, b.iov_len))
        {
            return None;
        }
    }
    Some(Op {
        kind,
        fd,
        offset: file_offset,
        bufs,
    })
}
