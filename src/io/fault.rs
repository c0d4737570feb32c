//! Injected I/O errors, for tests only: serve's hidden `--debug-inject-eio KIND:N` makes the
//! N-th asynchronous data operation of KIND (`read` or `write`, counted over the whole device
//! from 1) complete with EIO, as QEMU's blkdebug driver does for its tests.
//!
//! Why a hook and not a failing disk: a real kernel EIO needs device-mapper (`dmsetup` with
//! the `error` or `flakey` target), which neither this project's machines nor most CI runners
//! have. The operation still goes to the real engine (io_uring or the thread pool) and runs;
//! only its result is replaced on the way back, so the error reaches the queue thread through
//! the same completion path as a disk's (a CQE with `res < 0`, a failed `pwritev`). The engines'
//! own error paths are covered by src/io/tests.rs with errors the kernel really returns.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use nix::libc;

use super::{AsyncIo, Completion, Op, OpKind};

/// Marks an operation whose result becomes EIO (tokens are heads, far below this bit).
const FAIL: u64 = 1 << 63;

/// Which operation fails.
#[derive(Debug)]
pub struct Plan {
    kind: OpKind,
    nth: u64,
    seen: AtomicU64,
}

impl Plan {
    /// Parses `read:N` or `write:N` (N from 1).
    pub fn parse(spec: &str) -> Result<Plan, String> {
        let bad = || format!("--debug-inject-eio {spec:?}: expected read:N or write:N (N >= 1)");
        let (kind, n) = spec.split_once(':').ok_or_else(bad)?;
        let kind = match kind {
            "read" => OpKind::Read,
            "write" => OpKind::Write,
            _ => return Err(bad()),
        };
        let nth = n.parse::<u64>().ok().filter(|&n| n >= 1).ok_or_else(bad)?;
        Ok(Plan {
            kind,
            nth,
            seen: AtomicU64::new(0),
        })
    }

    /// Counts `kind`; true for the one operation that fails.
    fn hits(&self, kind: OpKind) -> bool {
        kind == self.kind && self.seen.fetch_add(1, Ordering::Relaxed) + 1 == self.nth
    }
}

static PLAN: OnceLock<Plan> = OnceLock::new();

/// Turns injection on for this process (serve, before its queues start).
pub fn install(plan: Plan) {
    log::warn!(
        "--debug-inject-eio: {:?} operation {} will fail with EIO (a test hook)",
        plan.kind,
        plan.nth
    );
    let _ = PLAN.set(plan);
}

/// `io` itself, or wrapped when injection is on.
pub fn wrap(io: Box<dyn AsyncIo>) -> Box<dyn AsyncIo> {
    match PLAN.get() {
        Some(plan) => Box::new(FaultyIo { inner: io, plan }),
        None => io,
    }
}

/// An [`AsyncIo`] whose chosen operation completes with EIO.
pub struct FaultyIo {
    inner: Box<dyn AsyncIo>,
    plan: &'static Plan,
}

impl FaultyIo {
    fn rewrite(&self, out: &mut [Completion]) {
        for (token, result) in out.iter_mut() {
            if *token & FAIL != 0 {
                *token &= !FAIL;
                *result = Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
    }
}

impl AsyncIo for FaultyIo {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    unsafe fn submit(&mut self, op: Op, token: u64) -> Result<(), Op> {
        // Counted only once the inner layer has room, so that a retried op is counted once.
        if self.inner.in_flight() == self.inner.capacity() {
            return Err(op);
        }
        let token = if self.plan.hits(op.kind) {
            log::warn!("--debug-inject-eio: failing this {:?}", op.kind);
            token | FAIL
        } else {
            token
        };
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { self.inner.submit(op, token) }
    }

    unsafe fn run_now(&mut self, op: Op) -> io::Result<usize> {
        let fail = self.plan.hits(op.kind);
        // SAFETY: the caller's contract, passed on unchanged.
        let result = unsafe { self.inner.run_now(op) };
        if fail {
            log::warn!("--debug-inject-eio: failing this operation");
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        result
    }

    fn commit(&mut self) -> io::Result<()> {
        self.inner.commit()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let start = out.len();
        let n = self.inner.reap(out);
        self.rewrite(&mut out[start..]);
        n
    }

    fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<usize> {
        let start = out.len();
        let n = self.inner.wait(out)?;
        self.rewrite(&mut out[start..]);
        Ok(n)
    }

    fn notifier(&self) -> RawFd {
        self.inner.notifier()
    }

    fn ready(&mut self) -> bool {
        self.inner.ready()
    }

    fn before_sleep(&mut self) -> bool {
        self.inner.before_sleep()
    }
}
