//! One virtqueue of the device: its ring, its file descriptors, what is in flight on it, and the
//! thread that serves it.
//!
//! Everything about a queue is behind one mutex ([`Queue::lock`]): the vhost-user handler
//! changes it (addresses, size, base, kick, call, enable, memory), the queue thread pops from it,
//! and whoever finishes a request (the queue thread, a helper) completes into it. Because a head
//! is recorded as in flight in the same critical section that pops it, and removed in the one
//! that puts it on the used ring, "stop" is simple: mark the queue stopped, then wait on the
//! condition variable until the record is empty ([`Queue::stop`]). Nothing pops a stopped queue,
//! and nothing touches its ring once the last completion is in.
//!
//! A ring found broken (an avail index that jumps, areas outside memory, a request that would
//! write into the rings, a head taken twice) stops only this queue, with one log line, until the
//! VMM sets the ring up again ([`QueueState::reinit`]); it is never retried in a loop.
//!
//! The queue thread waits in epoll on the kick eventfd, a control eventfd (stop, exit,
//! "look again": a new kick fd, the ring started, new memory) and, with requests in flight
//! ([`crate::async_requests`]), the completion notifier of its asynchronous I/O: those
//! completions go through [`Queue::complete`] like any other. After serving it may poll a
//! while before it sleeps ([`crate::poll`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use log::{debug, warn};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::inflight::InflightRecord;
use crate::poll::AdaptivePoll;
use crate::ring::{Chain, SplitRing};

/// A request taken from a queue, owned, so that any thread can run it.
pub struct Popped {
    pub head: u16,
    pub descs: Chain,
    pub mem: Arc<GuestMemoryMmap>,
    /// The ring's areas (start, length): a request must not write into them.
    pub rings: [(GuestAddress, u64); 3],
}

/// How a request ended.
pub enum Outcome {
    /// Done: `len` bytes written to the guest's buffers.
    Used(u32),
    /// The request showed the ring is broken (it would write into it).
    Broken(String),
}

/// Why [`QueueState::resume`] could not.
#[derive(Debug)]
pub enum ResumeError {
    /// The ring's areas are not in guest memory: nothing was recovered.
    Ring(String),
    /// The region is not one this backend wrote: it is dropped, and nothing is tracked.
    Region(String),
}

pub struct QueueState {
    pub ring: SplitRing,
    max_size: u16,
    /// SET_VRING_ADDR received (and the addresses translated).
    pub addresses_set: bool,
    kick: Option<Arc<File>>,
    call: Option<File>,
    /// Kick received and not stopped by GET_VRING_BASE.
    started: bool,
    /// SET_VRING_ENABLE (or enabled from the start without PROTOCOL_FEATURES).
    enabled: bool,
    /// Why the ring is broken, if it is (logged once).
    broken: Option<String>,
    /// The ring's areas were checked against `mem`.
    checked: bool,
    exit: bool,
    mem: Option<Arc<GuestMemoryMmap>>,
    pub inflight: InflightRecord,
    /// Heads recovered from the in-flight region, run before any new one.
    resubmit: VecDeque<u16>,
    /// Kicks are suppressed ([`Queue::disable_notification`]): without EVENT_IDX,
    /// `VRING_USED_F_NO_NOTIFY` is set in the used ring, and must be cleared before the ring
    /// is handed back ([`QueueState::unsuppress`]).
    suppressed: bool,
}

impl QueueState {
    fn running(&self) -> bool {
        self.started
            && self.enabled
            && self.addresses_set
            && self.broken.is_none()
            && !self.exit
            && self.mem.is_some()
    }

    /// The ring is being set up again (size, addresses or base): forget a breakage.
    pub fn reinit(&mut self) {
        self.broken = None;
        self.checked = false;
    }

    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    pub fn mem(&self) -> Option<&Arc<GuestMemoryMmap>> {
        self.mem.as_ref()
    }

    pub fn set_mem(&mut self, mem: Arc<GuestMemoryMmap>) {
        self.mem = Some(mem);
        self.checked = false;
    }

    pub fn set_call(&mut self, call: Option<File>) {
        self.call = call;
    }

    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn started(&self) -> bool {
        self.started
    }

    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Sets the kick fd; the ring starts (vhost-user: "start ring upon receiving a kick").
    pub fn set_kick(&mut self, kick: Option<File>) {
        self.kick = kick.map(Arc::new);
        self.started = true;
    }

    /// Heads to resubmit before popping new ones.
    pub fn set_resubmit(&mut self, heads: Vec<u16>) {
        self.resubmit = heads.into();
    }

    /// The ring starts over an in-flight region: asks the region what the last session left
    /// unfinished, given the used index the ring shows. `Ok(None)`: the region is fresh, and
    /// tracking starts from where SET_VRING_BASE put the ring. `Ok(Some(heads))`: the ring is
    /// put back where that session left it (the next used entry at the used index, the next
    /// avail one after the heads it left), and `heads` run before any new request. What the
    /// VMM's base said is ignored then: Cloud Hypervisor sends the avail index.
    pub fn resume(&mut self, mem: &GuestMemoryMmap) -> Result<Option<Vec<u16>>, ResumeError> {
        let size = self.ring.size;
        let used = self
            .ring
            .check(mem)
            .and_then(|()| self.ring.used_idx(mem))
            .map_err(|e| ResumeError::Ring(e.to_string()))?;
        let heads = match self.inflight.recover(size, used) {
            Ok(None) => return Ok(None),
            Ok(Some(heads)) => heads,
            Err(e) => {
                self.inflight.set_region(None);
                return Err(ResumeError::Region(e));
            }
        };
        self.ring.set_next_used(used);
        self.ring
            .set_next_avail(used.wrapping_add(heads.len() as u16));
        self.set_resubmit(heads.clone());
        Ok(Some(heads))
    }

    /// Heads recovered but not yet resubmitted are not run by this ring any more: they leave
    /// the record (nothing will complete them) but stay marked in the shared region, so that
    /// the next start recovers them again.
    fn forget_resubmit(&mut self) {
        for head in std::mem::take(&mut self.resubmit) {
            self.inflight.forget(head);
        }
    }

    /// Asks for kicks again before the ring is stopped or changed, so that whoever runs it
    /// next (this process after a restart, another backend after a migration) does not find
    /// the driver told not to kick. Called under the lock that stops the ring, before the VMM
    /// gets its answer.
    fn unsuppress(&mut self) {
        if !std::mem::take(&mut self.suppressed) || self.ring.event_idx || !self.checked {
            return;
        }
        if let (Some(mem), None) = (self.mem.clone(), &self.broken) {
            if let Err(e) = self.ring.enable_notification(&mem) {
                debug!("queue: cannot clear VRING_USED_F_NO_NOTIFY: {e}");
            }
        }
    }

    /// The body of [`Queue::complete`], under the lock.
    fn complete(&mut self, index: usize, head: u16, outcome: Outcome, signal: bool) -> bool {
        let mut pending = false;
        // The memory is borrowed, not cloned: no atomic count per request.
        let added = match (outcome, &self.mem) {
            (Outcome::Used(len), Some(mem)) if self.broken.is_none() && self.addresses_set => {
                self.inflight.before_used(head);
                Some(self.ring.add_used(mem, head, len))
            }
            (Outcome::Broken(why), _) => {
                self.fail(index, why);
                None
            }
            _ => None,
        };
        let used = match added {
            Some(Ok(())) => {
                pending = true;
                Some(self.ring.next_used())
            }
            Some(Err(e)) => {
                self.fail(index, e.to_string());
                None
            }
            None => None,
        };
        self.inflight.end(head, used);
        if pending && (signal || !self.started || !self.enabled) && self.signal_if_needed(index) {
            pending = false;
        }
        pending
    }

    /// Stops using the ring for good: a broken ring is logged once.
    fn fail(&mut self, index: usize, why: String) {
        if self.broken.is_none() {
            warn!("queue {index} stopped until the VMM sets it up again: {why}");
            self.broken = Some(why);
        }
    }

    /// Signals the driver that used entries are there (no check of its wishes).
    pub fn signal(&self) {
        if let Some(call) = &self.call {
            if let Err(e) = (call as &File).write_all(&1u64.to_ne_bytes()) {
                if e.kind() != io::ErrorKind::WouldBlock {
                    debug!("cannot signal the call eventfd: {e}");
                }
            }
        }
    }

    /// Signals the driver if it asked to be told.
    fn signal_if_needed(&mut self, index: usize) -> bool {
        let Some(mem) = self.mem.clone() else {
            return false;
        };
        match self.ring.needs_notification(&mem) {
            Ok(true) => {
                self.signal();
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.fail(index, e.to_string());
                false
            }
        }
    }
}

pub struct Queue {
    pub index: usize,
    state: Mutex<QueueState>,
    /// Notified when the in-flight record empties.
    idle: Condvar,
    /// Wakes the queue thread to look at its state again.
    ctrl: EventFd,
}

/// Locks, ignoring poisoning: a panic in a request leaves the queue's state consistent (every
/// change to it is made whole under the lock).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Queue {
    pub fn new(index: usize, max_size: u16) -> io::Result<Queue> {
        Ok(Queue {
            index,
            state: Mutex::new(QueueState {
                ring: SplitRing::new(max_size),
                max_size,
                addresses_set: false,
                kick: None,
                call: None,
                started: false,
                enabled: false,
                broken: None,
                checked: false,
                exit: false,
                mem: None,
                inflight: InflightRecord::new(max_size),
                resubmit: VecDeque::new(),
                suppressed: false,
            }),
            idle: Condvar::new(),
            ctrl: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, QueueState> {
        lock(&self.state)
    }

    /// Wakes the queue thread to look at the queue again.
    pub fn wake(&self) {
        let _ = self.ctrl.write(1);
    }

    /// Stops the queue and returns once every request taken from it is complete; from then on
    /// nothing touches its ring or buffers. Returns the next avail index.
    pub fn stop(&self, disable_only: bool) -> u16 {
        let mut st = self.lock();
        if disable_only {
            st.enabled = false;
        } else {
            st.started = false;
        }
        st.forget_resubmit();
        while !st.inflight.is_empty() {
            st = self.idle.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.unsuppress();
        if !disable_only {
            st.kick = None;
            st.call = None;
        }
        let next = st.ring.next_avail();
        drop(st);
        self.wake();
        next
    }

    /// For a change of the ring's set-up (size, addresses, base): stops the ring if it was
    /// started (SET_VRING_KICK starts it again), waits until nothing is in flight, and returns
    /// the locked state to change.
    pub fn quiesce(&self) -> MutexGuard<'_, QueueState> {
        let mut st = self.lock();
        st.started = false;
        st.forget_resubmit();
        while !st.inflight.is_empty() {
            st = self.idle.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.unsuppress();
        st
    }

    /// Asks the queue thread to exit once its requests are done.
    pub fn request_exit(&self) {
        self.lock().exit = true;
        self.wake();
    }

    /// Takes the next request: a resubmitted head first, then the avail ring.
    pub fn pop(&self) -> Option<Popped> {
        let mut st = self.lock();
        loop {
            if !st.running() {
                return None;
            }
            let mem = Arc::clone(st.mem.as_ref()?);
            if !st.checked {
                if let Err(e) = st.ring.check(&mem) {
                    st.fail(self.index, e.to_string());
                    return None;
                }
                st.checked = true;
            }
            let head = if let Some(head) = st.resubmit.pop_front() {
                // Already in the record (recovered from the region).
                head
            } else {
                match st.ring.pop(&mem) {
                    Ok(None) => return None,
                    Err(e) => {
                        st.fail(self.index, e.to_string());
                        return None;
                    }
                    Ok(Some(head)) if head >= st.ring.size => {
                        // Nothing can be used for it; the queue goes on.
                        debug!(
                            "queue {}: head {head} is past the ring: dropped",
                            self.index
                        );
                        continue;
                    }
                    Ok(Some(head)) => {
                        if !st.inflight.begin(head) {
                            st.fail(
                                self.index,
                                format!("head {head} made available while in flight"),
                            );
                            return None;
                        }
                        head
                    }
                }
            };
            let descs = st.ring.chain(&mem, head);
            let rings = st.ring.areas().map(|(_, at, len)| (at, len));
            return Some(Popped {
                head,
                descs,
                mem,
                rings,
            });
        }
    }

    /// Finishes a request taken by [`Self::pop`]: puts it on the used ring, then signals the
    /// driver if `signal` and it wants to be told, or if the queue is stopping (its last
    /// completions must not wait for a signal that will not come). Returns true if it went on
    /// the used ring and the driver was not signalled yet.
    pub fn complete(&self, head: u16, outcome: Outcome, signal: bool) -> bool {
        let mut st = self.lock();
        let pending = st.complete(self.index, head, outcome, signal);
        if st.inflight.is_empty() {
            self.idle.notify_all();
        }
        pending
    }

    /// [`Self::complete`] (without signalling) for every request in `done`, under one lock;
    /// empties `done` and returns how many went on the used ring with the driver not yet
    /// signalled.
    pub fn complete_all(&self, done: &mut Vec<(u16, Outcome)>) -> usize {
        if done.is_empty() {
            return 0;
        }
        let mut st = self.lock();
        let mut pending = 0;
        for (head, outcome) in done.drain(..) {
            pending += usize::from(st.complete(self.index, head, outcome, false));
        }
        if st.inflight.is_empty() {
            self.idle.notify_all();
        }
        pending
    }

    /// Signals the driver if it asked to be told; true if it was.
    pub fn signal_if_needed(&self) -> bool {
        let mut st = self.lock();
        if !st.started || st.broken.is_some() || st.mem.is_none() {
            return false;
        }
        st.signal_if_needed(self.index)
    }

    /// Stops asking for kicks while the queue is being served or polled: without EVENT_IDX
    /// by setting `VRING_USED_F_NO_NOTIFY`; with it there is nothing to write, as the driver
    /// kicks only when its avail index passes the `avail_event` we last published, which
    /// [`Self::enable_notification`] alone moves.
    pub fn disable_notification(&self) {
        let mut st = self.lock();
        if !st.running() || st.suppressed {
            return;
        }
        st.suppressed = true;
        if st.ring.event_idx {
            return;
        }
        let mem = st.mem.clone().expect("running");
        if let Err(e) = st.ring.disable_notification(&mem) {
            st.fail(self.index, e.to_string());
        }
    }

    /// Asks for kicks again; true if the queue has more to serve now (then serve it before
    /// sleeping: a request made available before the driver saw kicks wanted would otherwise
    /// wait for the next one).
    pub fn enable_notification(&self) -> bool {
        let mut st = self.lock();
        if !st.running() {
            return false;
        }
        st.suppressed = false;
        let mem = st.mem.clone().expect("running");
        match st.ring.enable_notification(&mem) {
            Ok(more) => more,
            Err(e) => {
                st.fail(self.index, e.to_string());
                false
            }
        }
    }

    /// Whether the avail ring has a request not yet taken (or a recovered head waits), without
    /// taking it: what a polling queue thread looks at.
    pub fn has_avail(&self) -> bool {
        let st = self.lock();
        if !st.running() {
            return false;
        }
        if !st.resubmit.is_empty() {
            return true;
        }
        let mem = st.mem.as_ref().expect("running");
        // An unreadable ring is the next pop's to report.
        st.ring
            .avail_idx(mem)
            .map_or(true, |avail| avail != st.ring.next_avail())
    }
}

/// What a queue thread runs: [`run_queue_thread`] calls `serve` after every wake-up and, while
/// it polls, `ready` to learn whether serving again would find anything.
pub trait QueueServer {
    /// Serves what is available (pops and starts or runs requests, completes what is done,
    /// signals the driver). Leaves guest notifications disabled
    /// ([`Queue::disable_notification`]); the thread enables them before it sleeps.
    fn serve(&mut self, queue: &Arc<Queue>);
    /// True if serving now would find work: a request in the avail ring, or completed I/O.
    /// Called in a loop while polling, so it must be cheap (no blocking, no syscall in the
    /// usual case).
    fn ready(&mut self, queue: &Arc<Queue>) -> bool {
        queue.has_avail()
    }
    /// Called just before the thread sleeps, notifications enabled: true if something
    /// turned up meanwhile (serve instead of sleeping).
    fn before_sleep(&mut self, _queue: &Arc<Queue>) -> bool {
        false
    }
}

const TOKEN_CTRL: u64 = 0;
const TOKEN_KICK: u64 = 1;
/// The asynchronous I/O layer's completion notifier (`serve` reaps, which clears it).
const TOKEN_COMPLETIONS: u64 = 2;

/// The queue thread: waits for kicks, control events and, if `completions` is given, that
/// notifier, and serves the queue with `server` after each wake-up, until asked to exit.
/// `serve` runs even while the queue is stopped, so that completions still come in.
///
/// After serving, the thread polls (`server.ready`) for up to `poll`'s window before it
/// sleeps, with kicks still suppressed; then it asks for kicks again and looks once more
/// before sleeping, so that a request made available meanwhile is not left waiting.
pub fn run_queue_thread(
    queue: &Arc<Queue>,
    completions: Option<std::os::fd::RawFd>,
    poll: &mut AdaptivePoll,
    server: &mut impl QueueServer,
) -> io::Result<()> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        queue.ctrl.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_CTRL),
    )?;
    if let Some(fd) = completions {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, TOKEN_COMPLETIONS),
        )?;
    }
    let mut kick: Option<Arc<File>> = None;
    let mut events = [EpollEvent::default(); 4];
    loop {
        {
            let st = queue.lock();
            if st.exit {
                return Ok(());
            }
            let same = match (&kick, &st.kick) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                if let Some(old) = kick.take() {
                    let _ = epoll.ctl(
                        ControlOperation::Delete,
                        old.as_raw_fd(),
                        EpollEvent::default(),
                    );
                }
                if let Some(new) = &st.kick {
                    match epoll.ctl(
                        ControlOperation::Add,
                        new.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, TOKEN_KICK),
                    ) {
                        Ok(()) => kick = Some(Arc::clone(new)),
                        Err(e) => warn!("queue {}: cannot wait on its kick fd: {e}", queue.index),
                    }
                }
            }
        }
        server.serve(queue);
        let idle_since = poll.start();
        if poll.poll(idle_since, || server.ready(queue)) {
            continue;
        }
        if queue.enable_notification() || server.before_sleep(queue) {
            continue;
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if events[..n].iter().any(|ev| ev.data() != TOKEN_CTRL) {
            poll.woken(idle_since);
        }
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_CTRL => {
                    let _ = queue.ctrl.read();
                }
                TOKEN_KICK => {
                    if let Some(k) = &kick {
                        let mut buf = [0u8; 8];
                        // A kick fd that hung up, errs or is not an eventfd (a read that is
                        // not 8 bytes) is dropped, not polled in a loop.
                        let bad = ev
                            .event_set()
                            .intersects(EventSet::HANG_UP | EventSet::ERROR)
                            || match (&**k as &File).read(&mut buf) {
                                Ok(n) => n != 8,
                                Err(e) => e.kind() != io::ErrorKind::WouldBlock,
                            };
                        if bad {
                            warn!(
                                "queue {}: its kick fd is not a working eventfd",
                                queue.index
                            );
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                k.as_raw_fd(),
                                EpollEvent::default(),
                            );
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::{queue_region_size, QueueRegion};
    use vm_memory::VolatileSlice;

    #[test]
    fn a_stop_does_not_wait_for_recovered_heads_that_never_ran() {
        let q = Queue::new(0, 8).unwrap();
        // A region saying head 3 was in flight when the last backend died.
        let len = queue_region_size(8);
        let mut bytes = vec![0u8; len];
        bytes[8] = 1; // version
        bytes[10] = 8; // desc_num
        bytes[16 + 48] = 1; // head 3 in flight
        bytes[16 + 48 + 8] = 1; // its counter
        let map = Arc::new(Mutex::new(bytes));
        let ptr = map.lock().unwrap().as_mut_ptr();
        // SAFETY: the Vec lives in `map`, which the region keeps alive and nobody resizes.
        let slice = unsafe { VolatileSlice::new(ptr, len) };
        {
            let mut st = q.lock();
            st.inflight
                .set_region(Some(QueueRegion::new(slice, map.clone())));
            let heads = st.inflight.recover(8, 0).unwrap().unwrap();
            assert_eq!(heads, vec![3]);
            st.set_resubmit(heads);
            assert_eq!(st.inflight.len(), 1);
        }
        // The ring never ran (no kick, no memory): the stop must not wait for head 3.
        q.stop(false);
        assert!(q.lock().inflight.is_empty());
        // It is still in flight in the region, for the next start.
        assert_eq!(map.lock().unwrap()[16 + 48], 1);
    }
}
