//! Asynchronous data I/O: a queue's thread submits reads, writes and flushes and keeps working
//! while they run, so that the guest's queue depth reaches the disk.
//!
//! One interface ([`AsyncIo`]) and two implementations: [`uring::UringIo`] (one io_uring per
//! queue thread) and [`threads::ThreadPoolIo`] (a worker pool for kernels or sandboxes without
//! io_uring: Docker's default seccomp profile and `kernel.io_uring_disabled` forbid it). Both
//! take at most [`AsyncIo::capacity`] operations at once; a caller with more keeps them in its
//! own pending list and submits them as completions free room, so nothing is ever refused to
//! the guest for lack of room. Each operation carries a `u64` token that comes back with its
//! result, in whatever order operations finish; [`AsyncIo::notifier`] is an eventfd that becomes
//! readable when results are waiting, for the queue thread's epoll.
//!
//! Short transfers are finished here (the rest is resubmitted), a read that reaches the end of
//! the file fills the rest with zeros, and EINTR/EAGAIN are retried: a result is either the
//! whole length or an error. The VHDX engine does not depend on this module.

pub mod fault;
pub mod threads;
pub mod uring;

use std::io;
use std::os::fd::RawFd;

use nix::libc;
use smallvec::SmallVec;

/// `--aio`: how a device's queues run their data I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AioMode {
    /// io_uring where it works, else the thread pool (the default).
    Auto,
    /// io_uring; an error if it cannot be set up here.
    #[value(name = "io_uring")]
    IoUring,
    /// The thread pool.
    Threads,
    /// No requests in flight: each queue thread runs one request at a time (with
    /// `--helper-threads` for large reads). An escape hatch, not for production.
    Off,
}

impl AioMode {
    /// The engine this mode forces, if it forces one; `None` for `auto` and `off`.
    pub fn forced(self) -> Option<AioChoice> {
        match self {
            AioMode::IoUring => Some(AioChoice::IoUring),
            AioMode::Threads => Some(AioChoice::Threads),
            AioMode::Auto | AioMode::Off => None,
        }
    }
}

/// Which implementation serves a device's queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AioChoice {
    /// io_uring (Linux 5.1+, where the sandbox allows it).
    IoUring,
    /// A pool of worker threads running preadv/pwritev/fdatasync.
    Threads,
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Fill the buffers from the file at `offset` (past the end of the file: zeros).
    Read,
    /// Write the buffers to the file at `offset`.
    Write,
    /// fdatasync the file (`offset` and the buffers are ignored).
    Fdatasync,
}

/// The offset that means "the file's own position" (a pipe or socket; used by tests).
pub const STREAM: u64 = u64::MAX;

/// One operation. The buffers are raw memory (guest pages, bounce buffers) that the caller
/// keeps valid and untouched by others until the operation's token comes back from `reap`.
pub struct Op {
    pub kind: OpKind,
    pub fd: RawFd,
    pub offset: u64,
    pub bufs: SmallVec<[libc::iovec; 4]>,
}

// SAFETY: an Op is addresses and lengths; `AsyncIo::submit`'s contract makes the memory behind
// them valid until completion, whichever thread then performs the transfer.
unsafe impl Send for Op {}

impl Op {
    pub fn len(&self) -> usize {
        self.bufs.iter().map(|b| b.iov_len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the first `n` bytes of the buffers (after a short transfer).
    fn advance(&mut self, mut n: usize) {
        if self.offset != STREAM {
            self.offset += n as u64;
        }
        let mut drop = 0;
        for b in self.bufs.iter_mut() {
            if n == 0 {
                break;
            }
            let k = n.min(b.iov_len);
            b.iov_base = b.iov_base.wrapping_add(k);
            b.iov_len -= k;
            n -= k;
            if b.iov_len == 0 {
                drop += 1;
            }
        }
        self.bufs.drain(..drop);
    }

    /// Fills what is left of the buffers with zeros (a read past the end of the file).
    ///
    /// # Safety
    /// The buffers must be valid for writes (the submit contract).
    unsafe fn zero_rest(&mut self) {
        for b in &self.bufs {
            // SAFETY: the caller's submit contract makes each buffer valid for writes.
            unsafe { std::ptr::write_bytes(b.iov_base.cast::<u8>(), 0, b.iov_len) };
        }
        self.bufs.clear();
    }
}

/// A result: the token given to `submit` and the bytes moved (the whole length) or the error.
pub type Completion = (u64, io::Result<usize>);

/// What a queue thread's data I/O runs on.
pub trait AsyncIo: Send {
    /// "io_uring" or "threads", for logs.
    fn name(&self) -> &'static str;
    /// Operations that can be in flight at once.
    fn capacity(&self) -> usize;
    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Starts `op`; its result comes back from [`AsyncIo::reap`] with `token`. When
    /// `in_flight() == capacity()` the op is handed back (`Err(op)`) for the caller's pending
    /// list. io_uring queues the op until [`AsyncIo::commit`] (or the next `reap`).
    ///
    /// # Safety
    /// Every buffer of `op` must stay valid (and, for a read, not be read or written by anyone
    /// else) until the token has come back from `reap`; `fd` must stay open until then.
    unsafe fn submit(&mut self, op: Op, token: u64) -> Result<(), Op>;
    /// Runs `op` on the calling thread, now, and returns its result: for transfers that only
    /// copy into the page cache, where handing them to another thread (a worker, or io_uring's
    /// io-wq, where buffered writes to most filesystems go) costs more than the copy.
    ///
    /// # Safety
    /// As [`AsyncIo::submit`], until this returns.
    unsafe fn run_now(&mut self, mut op: Op) -> io::Result<usize> {
        threads::run(&mut op)
    }
    /// Hands every queued operation to the kernel or the workers (one syscall for a batch).
    fn commit(&mut self) -> io::Result<()>;
    /// Appends the results that are ready to `out` without waiting; returns how many.
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize;
    /// Waits until at least one result is ready (or nothing is in flight), then reaps.
    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<usize>;
    /// An eventfd that is readable while results may be waiting; [`Self::before_sleep`]
    /// clears it (and `reap` may).
    fn notifier(&self) -> RawFd;
    /// True if results are ready to reap: cheap, for a thread that polls (no syscall unless
    /// the kernel has completion work that only a syscall runs).
    fn ready(&mut self) -> bool;
    /// The caller is about to sleep on [`Self::notifier`]: clears it, then returns true if
    /// results came in meanwhile (reap them instead of sleeping).
    fn before_sleep(&mut self) -> bool {
        false
    }
}

/// Which implementation to use: `forced` when given (io_uring that cannot start is then an
/// error), else io_uring when `probe` says it works, else threads. Logs the choice and why.
pub fn choose(forced: Option<AioChoice>) -> io::Result<AioChoice> {
    choose_with(forced, uring::probe)
}

/// [`choose`] with the io_uring probe given (tests make it fail).
pub fn choose_with(
    forced: Option<AioChoice>,
    probe: impl FnOnce() -> io::Result<()>,
) -> io::Result<AioChoice> {
    match forced {
        Some(AioChoice::Threads) => {
            log::info!("data I/O: a thread pool (--aio threads)");
            Ok(AioChoice::Threads)
        }
        Some(AioChoice::IoUring) => match probe() {
            Ok(()) => {
                log::info!("data I/O: io_uring (--aio io_uring)");
                Ok(AioChoice::IoUring)
            }
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!(
                    "--aio io_uring: io_uring cannot be used here ({}); use --aio threads",
                    why_no_uring(&e)
                ),
            )),
        },
        None => match probe() {
            Ok(()) => {
                log::info!("data I/O: io_uring (--aio auto: it works here)");
                Ok(AioChoice::IoUring)
            }
            Err(e) => {
                log::warn!(
                    "data I/O: a thread pool (--aio auto), because io_uring cannot be used ({})",
                    why_no_uring(&e)
                );
                Ok(AioChoice::Threads)
            }
        },
    }
}

/// Names the usual reasons io_uring is missing.
fn why_no_uring(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => format!("{e}: the kernel has no io_uring, or a filter hides it"),
        Some(libc::EPERM) => format!(
            "{e}: forbidden by a seccomp profile (Docker's default) or kernel.io_uring_disabled"
        ),
        Some(libc::EINVAL) => format!("{e}: the kernel's io_uring is too old"),
        _ => e.to_string(),
    }
}

/// A new instance of `choice` for one queue thread, `depth` operations deep (wrapped in
/// [`fault::FaultyIo`] when serve was asked to inject errors).
pub fn new_io(choice: AioChoice, depth: usize) -> io::Result<Box<dyn AsyncIo>> {
    let io: Box<dyn AsyncIo> = match choice {
        AioChoice::IoUring => Box::new(uring::UringIo::new(depth)?),
        AioChoice::Threads => Box::new(threads::ThreadPoolIo::new(depth)?),
    };
    Ok(fault::wrap(io))
}

#[cfg(test)]
pub(crate) mod tests;
