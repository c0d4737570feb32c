//! [`AsyncIo`] on io_uring: one ring per queue thread, as deep as the queue, with an eventfd
//! registered for completions so that the queue thread's epoll wakes on them.
//!
//! Every operation has a slot that owns its iovec array (the kernel reads it after submit) and
//! its progress; the SQE's user_data is the slot's index. A short transfer is resubmitted from
//! the slot for the rest, so one slot has at most one SQE in the kernel and the ring never
//! holds more than `capacity` entries.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, register::Restriction, types, IoUring};
use nix::libc;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{AsyncIo, Completion, Op, OpKind, STREAM};

/// Whether io_uring works here, with the operations we need: a ring can be set up and READV,
/// WRITEV and FSYNC are supported.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(2)?;
    let mut p = io_uring::Probe::new();
    ring.submitter().register_probe(&mut p)?;
    for code in [
        opcode::Readv::CODE,
        opcode::Writev::CODE,
        opcode::Fsync::CODE,
    ] {
        if !p.is_supported(code) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
    }
    Ok(())
}

/// A ring of `entries`, and whether it starts disabled (to be restricted, then enabled).
/// COOP_TASKRUN (5.19) spares an interrupt per completion, as the submitting thread also reaps;
/// R_DISABLED (5.10) lets the ring be restricted before it runs. A kernel that refuses a flag
/// (EINVAL) gets a ring without it.
fn build(entries: u32) -> io::Result<(IoUring, bool)> {
    let mut last = None;
    for (coop, disabled) in [(true, true), (false, true), (false, false)] {
        let mut b = IoUring::builder();
        if coop {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        if disabled {
            b.setup_r_disabled();
        }
        match b.build(entries) {
            Ok(ring) => return Ok((ring, disabled)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("tried at least once"))
}

struct Slot {
    token: u64,
    op: Op,
    done: usize,
}

pub struct UringIo {
    ring: IoUring,
    event: EventFd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Slots whose SQE is waiting for room in the submission queue (after a resubmit).
    unqueued: Vec<usize>,
    /// CQEs copied out of the ring before they are handled (kept to avoid an allocation).
    ready: Vec<(u64, i32)>,
}

impl UringIo {
    /// A ring for `depth` operations (at least 1).
    pub fn new(depth: usize) -> io::Result<UringIo> {
        let entries =
            u32::try_from(depth.max(1)).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let (ring, disabled) = build(entries)?;
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        if disabled {
            // seccomp cannot see inside a ring: let this one carry nothing but our three
            // operations (no openat, no connect, ...), and no further registrations.
            ring.submitter().register_restrictions(&mut [
                Restriction::sqe_op(opcode::Readv::CODE),
                Restriction::sqe_op(opcode::Writev::CODE),
                Restriction::sqe_op(opcode::Fsync::CODE),
            ])?;
            ring.submitter().register_enable_rings()?;
        }
        Ok(UringIo {
            ring,
            event,
            slots: (0..depth.max(1)).map(|_| None).collect(),
            free: (0..depth.max(1)).rev().collect(),
            unqueued: Vec::new(),
            ready: Vec::with_capacity(depth.max(1)),
        })
    }

    /// Puts slot `index`'s (remaining) operation on the submission queue.
    fn queue(&mut self, index: usize) {
        let slot = self.slots[index].as_ref().expect("queued slot is in use");
        let op = &slot.op;
        let fd = types::Fd(op.fd);
        let offset = if op.offset == STREAM {
            u64::MAX
        } else {
            op.offset
        };
        let n = op.bufs.len().min(1024) as u32;
        let entry = match op.kind {
            OpKind::Read => opcode::Readv::new(fd, op.bufs.as_ptr(), n)
                .offset(offset)
                .build(),
            OpKind::Write => opcode::Writev::new(fd, op.bufs.as_ptr(), n)
                .offset(offset)
                .build(),
            OpKind::Fdatasync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(index as u64);
        // SAFETY: the entry points at the slot's iovec array, which the slot owns and keeps in
        // place (a SmallVec inside a Vec that never reallocates: its length is fixed at new)
        // until the CQE; the buffers behind it are the submitter's promise (`submit`).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.unqueued.push(index);
        }
    }

    /// Handles one CQE: Some(completion) when its operation is finished.
    fn complete(&mut self, index: usize, res: i32) -> Option<Completion> {
        let slot = self.slots.get_mut(index)?.as_mut()?;
        let total = slot.done + slot.op.len();
        let outcome = if res < 0 {
            match -res {
                libc::EINTR | libc::EAGAIN => None,
                errno => Some(Err(io::Error::from_raw_os_error(errno))),
            }
        } else if slot.op.kind == OpKind::Fdatasync {
            Some(Ok(0))
        } else {
            let n = res as usize;
            slot.done += n;
            slot.op.advance(n);
            if slot.op.bufs.is_empty() {
                Some(Ok(total))
            } else if n == 0 && slot.op.kind == OpKind::Read {
                // SAFETY: the buffers are valid for writes until completion (`submit`).
                unsafe { slot.op.zero_rest() };
                Some(Ok(total))
            } else if n == 0 {
                Some(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "wrote nothing",
                )))
            } else {
                None
            }
        };
        match outcome {
            Some(result) => {
                let slot = self.slots[index].take().expect("in use");
                self.free.push(index);
                Some((slot.token, result))
            }
            None => {
                // The rest (or a retry) goes back to the kernel.
                self.queue(index);
                None
            }
        }
    }

    fn requeue_waiting(&mut self) {
        for index in std::mem::take(&mut self.unqueued) {
            self.queue(index);
        }
    }
}

impl AsyncIo for UringIo {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    unsafe fn submit(&mut self, op: Op, token: u64) -> Result<(), Op> {
        let Some(index) = self.free.pop() else {
            return Err(op);
        };
        self.slots[index] = Some(Slot { token, op, done: 0 });
        self.queue(index);
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        self.requeue_waiting();
        if self.ring.submission().is_empty() {
            // Nothing to hand over: spare the syscall.
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        // The eventfd is left as it is (a read is a syscall per reap): `before_sleep` clears
        // it once, before the caller sleeps on it.
        let mut n = 0;
        loop {
            let mut ready = std::mem::take(&mut self.ready);
            ready.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if ready.is_empty() {
                self.ready = ready;
                break;
            }
            for (user_data, res) in ready.drain(..) {
                if let Some(c) = self.complete(user_data as usize, res) {
                    out.push(c);
                    n += 1;
                }
            }
            self.ready = ready;
        }
        // Resubmissions (short transfers, EAGAIN) go out now.
        if self.ring.submission().is_empty() && self.unqueued.is_empty() {
            return n;
        }
        if let Err(e) = self.commit() {
            log::error!("io_uring submit: {e}");
        }
        n
    }

    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<usize> {
        loop {
            let n = self.reap(out);
            if n > 0 || self.in_flight() == 0 {
                return Ok(n);
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn notifier(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    fn ready(&mut self) -> bool {
        if self.in_flight() == 0 {
            return false;
        }
        // With COOP_TASKRUN a finished request may wait as task work that only runs when this
        // thread enters the kernel; the kernel flags it (TASKRUN_FLAG). Then one enter.
        if self.ring.submission().taskrun() {
            let _ = self.ring.submit();
        }
        !self.ring.completion().is_empty()
    }

    fn before_sleep(&mut self) -> bool {
        // Cleared first: a completion posted after the look below signals it again.
        let _ = self.event.read();
        self.ready()
    }
}

impl Drop for UringIo {
    /// Closing a ring does not cancel what the kernel has started, and its buffers are the
    /// caller's: wait for every operation before the slots (their iovec arrays) go away.
    fn drop(&mut self) {
        let mut sink = Vec::new();
        while self.in_flight() > 0 {
            if self.wait(&mut sink).is_err() {
                break;
            }
            sink.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only READV, WRITEV and FSYNC run on our rings: anything else (here a NOP; an OPENAT
    /// would be refused the same way) completes with EACCES.
    #[test]
    fn a_ring_carries_only_reads_writes_and_fsync() {
        let mut io = UringIo::new(4).unwrap();
        let nop = opcode::Nop::new().build().user_data(7);
        // SAFETY: a NOP points at no memory.
        unsafe { io.ring.submission().push(&nop).unwrap() };
        io.ring.submit_and_wait(1).unwrap();
        let cqe = io.ring.completion().next().unwrap();
        assert_eq!(cqe.user_data(), 7);
        assert_eq!(cqe.result(), -libc::EACCES);
    }
}
