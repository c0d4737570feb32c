//! [`AsyncIo`] on a pool of worker threads, for where io_uring is missing or forbidden: each
//! worker runs one blocking preadv/pwritev/fdatasync at a time, so `capacity` operations can be
//! on the disk at once, as with io_uring.
//!
//! Like QEMU's `aio=threads` pool, a worker is started when an operation is queued and none is
//! idle (up to the depth), and a worker idle for [`IDLE_EXIT`] exits, so an idle device holds no
//! threads. Results go to a shared list and the eventfd is signalled.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::libc;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{AsyncIo, Completion, Op, OpKind, STREAM};

/// How long a worker waits for work before it exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct State {
    queue: VecDeque<(u64, Op)>,
    done: Vec<Completion>,
    workers: usize,
    idle: usize,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    event: EventFd,
    max_workers: usize,
    idle_exit: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct ThreadPoolIo {
    shared: Arc<Shared>,
    capacity: usize,
    in_flight: usize,
    /// Submitted since the last commit (handed to the workers at commit).
    batch: Vec<(u64, Op)>,
}

impl ThreadPoolIo {
    /// A pool for `depth` operations (at least 1), with up to `depth` workers (at most 64, as
    /// QEMU's pool).
    pub fn new(depth: usize) -> io::Result<ThreadPoolIo> {
        Self::with_idle_exit(depth, IDLE_EXIT)
    }

    /// [`ThreadPoolIo::new`] with another idle time before a worker exits.
    pub fn with_idle_exit(depth: usize, idle_exit: Duration) -> io::Result<ThreadPoolIo> {
        let depth = depth.max(1);
        Ok(ThreadPoolIo {
            shared: Arc::new(Shared {
                state: Mutex::default(),
                work: Condvar::new(),
                event: EventFd::new(EFD_NONBLOCK)?,
                max_workers: depth.min(64),
                idle_exit,
            }),
            capacity: depth,
            in_flight: 0,
            batch: Vec::new(),
        })
    }

    /// Worker threads alive now (for tests and logs).
    pub fn workers(&self) -> usize {
        self.shared.lock().workers
    }
}

fn worker(shared: Arc<Shared>) {
    let mut state = shared.lock();
    loop {
        if let Some((token, mut op)) = state.queue.pop_front() {
            drop(state);
            let result = run(&mut op);
            state = shared.lock();
            state.done.push((token, result));
            let _ = shared.event.write(1);
            continue;
        }
        if state.shutdown {
            break;
        }
        state.idle += 1;
        let (s, timeout) = shared
            .work
            .wait_timeout(state, shared.idle_exit)
            .unwrap_or_else(|e| e.into_inner());
        state = s;
        state.idle -= 1;
        if timeout.timed_out() && state.queue.is_empty() {
            break;
        }
    }
    state.workers -= 1;
}

/// Runs one operation to the end: short transfers continued, EINTR/EAGAIN retried, the end of
/// the file read as zeros. Its buffers and fd must be valid ([`AsyncIo::submit`]'s contract).
pub(super) fn run(op: &mut Op) -> io::Result<usize> {
    // SAFETY: the fd stays open until the operation completes (`submit`'s contract).
    let fd = unsafe { BorrowedFd::borrow_raw(op.fd) };
    if op.kind == OpKind::Fdatasync {
        return retry(|| nix::unistd::fdatasync(fd).map(|_| 0));
    }
    let total = op.len();
    while !op.bufs.is_empty() {
        let n = op.bufs.len().min(1024) as libc::c_int;
        let n = retry(|| {
            // SAFETY: the iovecs describe memory the submitter keeps valid (and, for a read,
            // writable and unshared) until completion; the kernel checks the fd.
            let r = unsafe {
                match (op.kind, op.offset == STREAM) {
                    (OpKind::Read, false) => {
                        libc::preadv(op.fd, op.bufs.as_ptr(), n, op.offset as libc::off_t)
                    }
                    (OpKind::Read, true) => libc::readv(op.fd, op.bufs.as_ptr(), n),
                    (_, false) => {
                        libc::pwritev(op.fd, op.bufs.as_ptr(), n, op.offset as libc::off_t)
                    }
                    (_, true) => libc::writev(op.fd, op.bufs.as_ptr(), n),
                }
            };
            if r < 0 {
                Err(nix::errno::Errno::last())
            } else {
                Ok(r as usize)
            }
        })?;
        if n == 0 {
            if op.kind == OpKind::Read {
                // SAFETY: valid for writes until completion (`submit`'s contract).
                unsafe { op.zero_rest() };
                break;
            }
            return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote nothing"));
        }
        op.advance(n);
    }
    Ok(total)
}

fn retry<T>(mut f: impl FnMut() -> nix::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => {}
            r => return r.map_err(io::Error::from),
        }
    }
}

impl AsyncIo for ThreadPoolIo {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    unsafe fn submit(&mut self, op: Op, token: u64) -> Result<(), Op> {
        if self.in_flight == self.capacity {
            return Err(op);
        }
        self.in_flight += 1;
        self.batch.push((token, op));
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut state = self.shared.lock();
        let n = self.batch.len();
        state.queue.extend(self.batch.drain(..));
        let wanted = (state.queue.len().saturating_sub(state.idle))
            .min(self.shared.max_workers - state.workers);
        for _ in 0..wanted {
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("vhdx-aio".into())
                .spawn(move || worker(shared));
            match spawned {
                Ok(_) => state.workers += 1,
                // The workers already running (if any) take the queue; with none, fail.
                Err(e) if state.workers == 0 => {
                    let failed: Vec<_> = state.queue.drain(..).collect();
                    for (token, _) in failed {
                        state
                            .done
                            .push((token, Err(io::Error::new(e.kind(), e.to_string()))));
                    }
                    let _ = self.shared.event.write(1);
                    return Err(e);
                }
                Err(_) => break,
            }
        }
        drop(state);
        for _ in 0..n {
            self.shared.work.notify_one();
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let _ = self.shared.event.read();
        let mut state = self.shared.lock();
        let n = state.done.len();
        out.append(&mut state.done);
        self.in_flight -= n;
        n
    }

    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<usize> {
        self.commit()?;
        loop {
            let n = self.reap(out);
            if n > 0 || self.in_flight == 0 {
                return Ok(n);
            }
            let mut pfd = [nix::poll::PollFd::new(
                borrowed(&self.shared.event),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn notifier(&self) -> RawFd {
        self.shared.event.as_raw_fd()
    }

    fn ready(&mut self) -> bool {
        self.in_flight > 0 && !self.shared.lock().done.is_empty()
    }
}

impl Drop for ThreadPoolIo {
    /// Workers may still be moving the caller's buffers: wait for them, then let them exit.
    fn drop(&mut self) {
        // Operations never committed never started.
        self.in_flight -= self.batch.len();
        self.batch.clear();
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            if self.wait(&mut sink).is_err() {
                break;
            }
            sink.clear();
        }
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
    }
}

/// An `EventFd` as a `BorrowedFd`, for poll (vmm-sys-util's has no `AsFd`).
fn borrowed(event: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the eventfd is open for as long as `event` is borrowed.
    unsafe { BorrowedFd::borrow_raw(event.as_raw_fd()) }
}
