//! seccomp-bpf allowlists: one table per kind of thread, and the process-wide base filter (their
//! union) that [`super::enter`] installs on every thread with TSYNC.
//!
//! Filters stack: a thread runs under every filter installed on it or inherited, and the most
//! restrictive answer wins. So a thread that narrows itself ([`super::ThreadKind::confine`])
//! keeps the base filter too, and the threads it starts inherit its narrowing: the queue
//! threads, which the control thread starts at each connection, run under the control
//! thread's list and their own (so the control list holds everything a queue thread needs, and
//! the `seccomp` call with which it narrows itself). The helpers and the signal thread are
//! started before the control thread narrows itself, under the base filter.
//!
//! Each table says, line by line, who needs a call. When a change needs a new system call, add
//! it to the table of the threads that make it (and to `tests/sandbox.rs` if it matters): a
//! call outside the tables stops the process with a log line naming it (see [`on_sigsys`]).
//! Nothing is listed for work that is not there yet. With io_uring (`--aio auto`) each queue thread
//! sets up its own ring (the IO_URING table, also on the control thread's list, the ceiling of
//! the queue threads it starts); with `--aio threads` the pool's workers (`vhdx-aio`) are
//! started by the queue thread and run under its filters (STORAGE, THREADS).
//!
//! Two more filters turn calls into errors instead of a stop: opening, creating or removing a
//! path fails with EACCES (what Landlock says too; libraries try such things and cope, and the
//! socket file is left in place at exit), and `clone3` fails with ENOSYS so that glibc starts
//! threads with `clone`, whose flags a filter can check (CLONE_THREAD: no new processes).

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{SeccompMode, ThreadKind};

/// How a system call may be made.
#[derive(Clone, Copy, Debug)]
pub(super) enum Args {
    Any,
    /// Argument `.0` (as a 32-bit value) is one of `.1`.
    In(u8, &'static [u64]),
    /// Argument `.0` (32-bit) is not `.1`.
    Not(u8, u64),
    /// Argument `.0` (32-bit) masked with `.1` equals `.2`.
    Masked(u8, u64, u64),
}

pub(super) type Table = &'static [(i64, Args)];

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
/// Memory is never mapped executable: no code can be loaded.
const NO_EXEC: Args = Args::Masked(2, PROT_EXEC, 0);
const AT_EMPTY_PATH: u64 = libc::AT_EMPTY_PATH as u64;

/// Each gives memory back, nothing more (not MADV_REMOVE, which would punch holes in the
/// guest's shared memory).
const MADVICE: &[u64] = &[
    libc::MADV_DONTNEED as u64, // free() trimming an arena, thread exit (glibc)
    libc::MADV_FREE as u64,     // the same, by allocators that prefer it
];

const FCNTL_OPS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,         // O_NONBLOCK
    libc::F_DUPFD_CLOEXEC as u64, // try_clone: the connection kept to shut it down at a stop
    libc::F_ADD_SEALS as u64,     // GET_INFLIGHT_FD seals its memfd (src/handler.rs)
    libc::F_OFD_GETLK as u64,     // image locks (src/vhdx/lock.rs)
    libc::F_OFD_SETLK as u64,
    libc::F_OFD_SETLKW as u64,
];

const PRCTL_OPS: &[u64] = &[
    libc::PR_SET_NAME as u64,         // std names its threads
    libc::PR_GET_NAME as u64,         // the SIGSYS handler names the thread
    libc::PR_SET_NO_NEW_PRIVS as u64, // confine() (seccompiler, landlock)
    libc::PR_GET_NO_NEW_PRIVS as u64,
];

// The request type is c_ulong on some targets and c_int on others.
#[allow(clippy::unnecessary_cast)]
const TERMINAL_IOCTLS: &[u64] = &[libc::TCGETS as u64];

/// Every thread: the Rust runtime, glibc (malloc, thread start and exit), logging to stderr,
/// eventfd reads and writes, and the calls that fail with an errno (see the module doc).
const RUNTIME: Table = &[
    (libc::SYS_brk, Args::Any), // malloc
    // malloc and thread stacks; guest memory (SET_MEM_TABLE, ADD_MEM_REG) and the in-flight
    // region (SET_INFLIGHT_FD), MAP_SHARED from the control thread (src/handler.rs); and the
    // SIGBUS handler's zero page, MAP_FIXED | MAP_ANONYMOUS over a page of guest memory that
    // shrank, from whichever thread touched it (src/guest_memory.rs). Never executable.
    (libc::SYS_mmap, NO_EXEC),
    (libc::SYS_mprotect, NO_EXEC), // stack guard pages
    (libc::SYS_munmap, Args::Any), // free, thread exit, memory regions removed
    (libc::SYS_mremap, Args::Any), // realloc of large buffers
    (libc::SYS_madvise, Args::In(2, MADVICE)),
    (libc::SYS_futex, Args::Any), // Mutex, Condvar, RwLock, join
    (libc::SYS_set_robust_list, Args::Any), // glibc thread start
    (libc::SYS_rseq, Args::Any),  // glibc thread start
    (libc::SYS_sched_yield, Args::Any),
    (libc::SYS_sched_getaffinity, Args::Any), // available_parallelism
    (libc::SYS_getpid, Args::Any),
    (libc::SYS_gettid, Args::Any),
    (libc::SYS_getrandom, Args::Any),       // HashMap seeds
    (libc::SYS_clock_gettime, Args::Any),   // Instant, log timestamps (when not in the vDSO)
    (libc::SYS_clock_nanosleep, Args::Any), // thread::sleep
    (libc::SYS_nanosleep, Args::Any),
    // Queue threads and helpers block the asynchronous signals (src/guest_memory.rs), the
    // control thread blocks SIGTERM/SIGINT for the signal thread (src/daemon.rs).
    (libc::SYS_rt_sigprocmask, Args::Any),
    // Any handler but SIGSYS's: the SIGBUS handler of guest memory, set at the first memory
    // table and reset by itself on a fault outside guest memory (src/guest_memory.rs). The
    // SIGSYS handler that reports a forbidden call stays in place.
    (libc::SYS_rt_sigaction, Args::Not(0, libc::SIGSYS as u64)),
    (libc::SYS_rt_sigreturn, Args::Any),
    (libc::SYS_sigaltstack, Args::Any), // std's stack-overflow guard, per thread
    (libc::SYS_restart_syscall, Args::Any),
    (libc::SYS_exit, Args::Any),
    (libc::SYS_exit_group, Args::Any),
    (libc::SYS_read, Args::Any), // eventfds (kicks, a queue's control, the WAL's kick)
    (libc::SYS_write, Args::Any), // eventfds (calls, the stop eventfd), stderr
    (libc::SYS_writev, Args::Any), // stderr
    (libc::SYS_close, Args::Any),
    // abort(), and the SIGSYS handler stopping the process.
    (
        libc::SYS_tgkill,
        Args::In(2, &[libc::SIGABRT as u64, libc::SIGSYS as u64]),
    ),
    (libc::SYS_prctl, Args::In(0, PRCTL_OPS)),
    // env_logger asks whether stderr is a terminal (isatty) at each line it writes.
    (libc::SYS_ioctl, Args::In(1, TERMINAL_IOCTLS)),
    // Allowed here, answered with EACCES by the errno filter (see the module doc).
    (libc::SYS_openat, Args::Any),
    (libc::SYS_openat2, Args::Any),
    (libc::SYS_unlinkat, Args::Any),
    (libc::SYS_clone3, Args::Any), // ENOSYS
];

/// The same for the calls x86_64 has and aarch64 lacks.
#[cfg(target_arch = "x86_64")]
const RUNTIME_LEGACY: Table = &[
    (libc::SYS_open, Args::Any),   // EACCES
    (libc::SYS_creat, Args::Any),  // EACCES
    (libc::SYS_unlink, Args::Any), // EACCES: the socket file at exit
];
#[cfg(not(target_arch = "x86_64"))]
const RUNTIME_LEGACY: Table = &[];

/// Reading and writing the image files (the chain is open before entry; nothing is opened):
/// requests on the queue threads and helpers, flushes (the control thread after a disconnect
/// or a WCE config write), the image's close at exit, the WAL worker.
const STORAGE: Table = &[
    (libc::SYS_pread64, Args::Any), // VHDX metadata, BAT, log
    (libc::SYS_pwrite64, Args::Any),
    (libc::SYS_preadv, Args::Any), // guest_io: guest memory <-> image
    (libc::SYS_pwritev, Args::Any),
    (libc::SYS_fdatasync, Args::Any), // flush
    (libc::SYS_fallocate, Args::Any), // trim (punch hole), write-zeroes (zero range)
    // Growing the image, trimming its tail at close; the in-flight memfd (GET_INFLIGHT_FD).
    (libc::SYS_ftruncate, Args::Any),
    // File::metadata (the image's length), on an open fd only.
    (
        libc::SYS_statx,
        Args::Masked(2, AT_EMPTY_PATH, AT_EMPTY_PATH),
    ),
    // glibc's fstat: the size of a memory region's or the in-flight region's fd
    // (src/handler.rs), on an open fd only.
    (
        libc::SYS_newfstatat,
        Args::Masked(3, AT_EMPTY_PATH, AT_EMPTY_PATH),
    ),
    (libc::SYS_fstat, Args::Any),
    (libc::SYS_fcntl, Args::In(1, FCNTL_OPS)),
];

/// Event loops: the control thread's wait on the listener or connection and the stop eventfd
/// (src/daemon.rs) and the eventfd of each queue it makes (src/queue.rs); a queue thread's
/// wait on its kick and control eventfds; the WAL worker's wait and the eventfd its starter
/// makes (src/vhdx/log/writer.rs).
const EVENTS: Table = &[
    (libc::SYS_epoll_create1, Args::Any),
    (libc::SYS_epoll_ctl, Args::Any),
    (libc::SYS_epoll_pwait, Args::Any),
    (libc::SYS_epoll_pwait2, Args::Any),
    (libc::SYS_eventfd2, Args::Any),
];

#[cfg(target_arch = "x86_64")]
const EVENTS_LEGACY: Table = &[(libc::SYS_epoll_wait, Args::Any)];
#[cfg(not(target_arch = "x86_64"))]
const EVENTS_LEGACY: Table = &[];

// The request type is c_ulong on some targets and c_int on others.
#[allow(clippy::unnecessary_cast)]
const IOCTLS: &[u64] = &[
    libc::FIONBIO as u64, // set_nonblocking(false) on each accepted connection (src/daemon.rs)
];

/// The vhost-user control thread (src/daemon.rs, src/handler.rs): accepts each VMM, reads its
/// messages and the fds they carry (memory regions, kick, call and error eventfds, the
/// in-flight fd) and answers them; makes the in-flight memfd (GET_INFLIGHT_FD: memfd_create,
/// ftruncate, F_ADD_SEALS, mmap MAP_SHARED); flushes after a disconnect and closes the image
/// at exit (STORAGE).
const CONTROL: Table = &[
    (libc::SYS_accept4, Args::Any), // std's accept, on the listening socket
    (libc::SYS_recvmsg, Args::Any), // vhost's messages, with SCM_RIGHTS
    (libc::SYS_sendmsg, Args::Any), // its replies
    (
        libc::SYS_memfd_create,
        Args::In(1, &[(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) as u64]),
    ),
    (libc::SYS_ioctl, Args::In(1, IOCTLS)),
];

/// Starting threads: the control thread starts a connection's queue threads, and a
/// connection's first write starts the WAL worker (src/vhdx/log/writer.rs) from whichever
/// thread makes it. Threads only (CLONE_THREAD): no new process can be made; `clone3` answers
/// ENOSYS (see above). A thread started narrows itself ([`super::ThreadKind::confine`]) under
/// the filters it inherits, so its starter's list holds `seccomp` too (it can only take rights
/// away).
const THREADS: Table = &[
    (
        libc::SYS_clone,
        Args::Masked(0, libc::CLONE_THREAD as u64, libc::CLONE_THREAD as u64),
    ),
    (
        libc::SYS_seccomp,
        Args::In(0, &[libc::SECCOMP_SET_MODE_FILTER as u64]),
    ),
];

/// Requests in flight through io_uring (`--aio auto`, src/io/uring.rs): each queue thread
/// sets up its own ring, maps it (MAP_SHARED, never executable: the mmap rule above) and
/// registers its completion eventfd. seccomp cannot see the operations inside the ring; the
/// ring only ever carries reads, writes and fdatasync of the chain's files (src/io/).
const IO_URING: Table = &[
    (libc::SYS_io_uring_setup, Args::Any),
    (libc::SYS_io_uring_enter, Args::Any),
    (libc::SYS_io_uring_register, Args::Any),
    // `AsyncIo::wait` (src/io/): a queue thread that must drain its requests in flight (before
    // a synchronous request, at a stop) waits on the completion eventfd with poll; so does
    // `--aio threads`.
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_poll, Args::Any),
    (libc::SYS_ppoll, Args::Any),
];

/// The signal thread: waits for SIGTERM/SIGINT, sets the stop eventfd (`write`) and shuts down
/// the connection if one is being served (src/daemon.rs). No wake-up connect: the control
/// thread waits on the stop eventfd.
const SIGNALS: Table = &[
    (libc::SYS_rt_sigtimedwait, Args::Any),
    (libc::SYS_shutdown, Args::Any),
];

/// What [`super::ThreadKind::confine`] itself calls, under the base filter: each can only take
/// rights away. Landlock and capabilities only for a thread that existed at entry.
const CONFINE: Table = &[
    (
        libc::SYS_seccomp,
        Args::In(0, &[libc::SECCOMP_SET_MODE_FILTER as u64]),
    ),
    (libc::SYS_landlock_create_ruleset, Args::Any),
    (libc::SYS_landlock_restrict_self, Args::Any),
    (libc::SYS_capget, Args::Any),
    (libc::SYS_capset, Args::Any),
];

impl ThreadKind {
    /// The tables this kind of thread is allowed.
    pub(super) fn tables(self) -> &'static [Table] {
        match self {
            // Its list is also the ceiling of the queue threads it starts.
            ThreadKind::Control => &[CONTROL, THREADS, STORAGE, EVENTS, EVENTS_LEGACY, IO_URING],
            // A WAL worker started from a queue thread inherits its filter: EVENTS is its. So
            // do the `--aio threads` workers (src/io/threads.rs): STORAGE and THREADS.
            ThreadKind::Queue => &[THREADS, STORAGE, EVENTS, EVENTS_LEGACY, IO_URING],
            // A batch shared with the helpers holds whatever was on the ring after a large
            // read: writes too, and so the WAL worker's start.
            ThreadKind::Helper => &[THREADS, STORAGE, EVENTS, EVENTS_LEGACY],
            ThreadKind::Signals => &[SIGNALS],
            ThreadKind::Wal => &[STORAGE, EVENTS, EVENTS_LEGACY],
        }
    }
}

/// Calls that fail with an errno rather than stop the process.
fn errno_calls() -> Vec<(u32, Vec<i64>)> {
    let mut eacces = vec![libc::SYS_openat, libc::SYS_openat2, libc::SYS_unlinkat];
    #[cfg(target_arch = "x86_64")]
    eacces.extend([libc::SYS_open, libc::SYS_creat, libc::SYS_unlink]);
    vec![
        (libc::EACCES as u32, eacces),
        (libc::ENOSYS as u32, vec![libc::SYS_clone3]),
    ]
}

/// The compiled programs of one mode.
pub(super) struct Programs {
    /// The errno filters and the base allowlist, installed on every thread at entry.
    pub process: Vec<BpfProgram>,
    /// One narrowing allowlist per [`ThreadKind`], indexed by `kind as usize`.
    pub kinds: Vec<BpfProgram>,
}

fn arch() -> Result<TargetArch, String> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp: {e:?}"))
}

/// The alternatives (any one will do) that `args` allows; None: the call needs no condition.
fn alternatives(args: Args) -> Result<Option<Vec<SeccompRule>>, String> {
    let one = |arg: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(|e| format!("seccomp: {e}"))
    };
    Ok(Some(match args {
        Args::Any => return Ok(None),
        Args::In(arg, values) => values
            .iter()
            .map(|&v| one(arg, SeccompCmpOp::Eq, v))
            .collect::<Result<_, _>>()?,
        Args::Not(arg, v) => vec![one(arg, SeccompCmpOp::Ne, v)?],
        Args::Masked(arg, mask, v) => vec![one(arg, SeccompCmpOp::MaskedEq(mask), v)?],
    }))
}

/// The union of `tables` as seccompiler rules (an empty list: no condition): a call allowed
/// without condition anywhere is allowed without condition; otherwise any of its alternatives
/// will do.
fn union(tables: &[Table]) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut any = std::collections::BTreeSet::new();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &(nr, args) in tables.iter().flat_map(|t| t.iter()) {
        match alternatives(args)? {
            None => {
                any.insert(nr);
            }
            Some(alts) => rules.entry(nr).or_default().extend(alts),
        }
    }
    for nr in any {
        rules.insert(nr, Vec::new());
    }
    Ok(rules)
}

fn allowlist(tables: &[Table], mismatch: SeccompAction) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(union(tables)?, mismatch, SeccompAction::Allow, arch()?)
        .map_err(|e| format!("seccomp: {e}"))?;
    filter.try_into().map_err(|e| format!("seccomp: {e:?}"))
}

/// The tables of a kind plus what every thread needs.
fn kind_tables(kind: ThreadKind) -> Vec<Table> {
    let mut t = vec![RUNTIME, RUNTIME_LEGACY];
    t.extend_from_slice(kind.tables());
    t
}

/// Compiles every program for `mode` (None when seccomp is off).
pub(super) fn programs(mode: SeccompMode) -> Result<Option<Programs>, String> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut process = Vec::new();
    for (errno, calls) in errno_calls() {
        let rules = calls.into_iter().map(|nr| (nr, Vec::new())).collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
            arch()?,
        )
        .map_err(|e| format!("seccomp: {e}"))?;
        process.push(filter.try_into().map_err(|e| format!("seccomp: {e:?}"))?);
    }
    let mut base = vec![RUNTIME, RUNTIME_LEGACY, CONFINE];
    for kind in ThreadKind::ALL {
        base.extend_from_slice(kind.tables());
    }
    process.push(allowlist(&base, mismatch.clone())?);
    let kinds = ThreadKind::ALL
        .iter()
        .map(|&k| allowlist(&kind_tables(k), mismatch.clone()))
        .collect::<Result<_, _>>()?;
    Ok(Some(Programs { process, kinds }))
}

/// Installs the process-wide filters on every thread (TSYNC).
pub(super) fn install_process(programs: &Programs) -> Result<(), String> {
    for p in &programs.process {
        seccompiler::apply_filter_all_threads(p).map_err(|e| format!("seccomp: {e}"))?;
    }
    Ok(())
}

/// Narrows the calling thread.
pub(super) fn install_thread(program: &BpfProgram) -> Result<(), String> {
    seccompiler::apply_filter(program).map_err(|e| format!("seccomp: {e}"))
}

/// The name of a system call (x86_64; None elsewhere or past the table).
pub(super) fn syscall_name(nr: u32) -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        super::syscall_names::NAMES
            .binary_search_by_key(&nr, |&(n, _)| n)
            .ok()
            .map(|i| super::syscall_names::NAMES[i].1)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = nr;
        None
    }
}

/// Catches SIGSYS (the filters' answer to a call outside them in `--seccomp kill`) to log the
/// call, then stops the process with SIGSYS. Installed before the filters, with SA_RESETHAND,
/// and kept: the filters refuse `rt_sigaction(SIGSYS, ...)`.
pub(super) fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: a zeroed sigaction is valid; the handler only makes async-signal-safe system
    // calls (write, prctl, rt_sigprocmask, tgkill, exit_group) on stack buffers.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(format!(
                "installing the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// A line built on the stack (no allocation in a signal handler).
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Offset of `si_syscall` in a SIGSYS siginfo (after si_signo, si_errno, si_code, padding and
/// the `_call_addr` pointer of the `_sigsys` member; 64-bit layout).
const SI_SYSCALL_OFFSET: usize = 24;
/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: i32 = 1;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let mut line = Line {
        buf: [0; 192],
        len: 0,
    };
    line.push(b"vhost-user-vhdx: seccomp: forbidden system call ");
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler; for si_code
    // SYS_SECCOMP its `_sigsys` member holds the call's number at SI_SYSCALL_OFFSET.
    let (code, nr) = unsafe {
        let code = (*info).si_code;
        let nr = std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32);
        (code, nr)
    };
    if code == SYS_SECCOMP {
        match syscall_name(nr as u32) {
            Some(name) => {
                line.push(name.as_bytes());
                line.push(b" (");
                line.number(nr as u64);
                line.push(b")");
            }
            None => line.number(nr as u64),
        }
    } else {
        line.push(b"(SIGSYS not from seccomp)");
    }
    line.push(b" in thread ");
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into `name`.
    if unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) } == 0 {
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        line.push(&name[..end]);
    }
    line.push(b"; stopping\n");
    // SAFETY: write, rt_sigprocmask, getpid, gettid and tgkill are async-signal-safe system
    // calls on valid stack buffers. SA_RESETHAND made SIGSYS's action the default (stop the
    // process, no core: RLIMIT_CORE is 0), so the tgkill ends the process by SIGSYS.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
        libc::_exit(128 + libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_compiles_and_the_base_is_the_union() {
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            let p = programs(mode).unwrap().unwrap();
            assert_eq!(p.kinds.len(), ThreadKind::ALL.len());
            assert_eq!(p.process.len(), 3);
        }
        assert!(programs(SeccompMode::Off).unwrap().is_none());
        let mut base = vec![RUNTIME, RUNTIME_LEGACY, CONFINE];
        for kind in ThreadKind::ALL {
            base.extend_from_slice(kind.tables());
        }
        let base = union(&base).unwrap();
        for kind in ThreadKind::ALL {
            for (nr, _) in union(&kind_tables(kind)).unwrap() {
                assert!(base.contains_key(&nr), "{kind:?}: {nr} not in the base");
            }
        }
        // Never allowed anywhere.
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_mount,
            libc::SYS_setuid,
            libc::SYS_kill,
        ] {
            assert!(!base.contains_key(&nr), "{nr} is allowed");
        }
    }

    #[test]
    fn union_keeps_conditions_unless_a_table_allows_the_call_outright() {
        const A: Table = &[(1, Args::In(0, &[1, 2])), (2, Args::Not(0, 3))];
        const B: Table = &[
            (2, Args::Any),
            (3, Args::Masked(2, 4, 0)),
            (1, Args::In(0, &[7])),
        ];
        let u = union(&[A, B]).unwrap();
        assert_eq!(u.len(), 3);
        assert_eq!(u[&1].len(), 3, "alternatives of both tables");
        assert!(u[&2].is_empty(), "no condition wins");
        assert_eq!(u[&3].len(), 1);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn syscall_names_are_sorted_and_known() {
        let names = super::super::syscall_names::NAMES;
        assert!(names.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(syscall_name(libc::SYS_socket as u32), Some("socket"));
        assert_eq!(syscall_name(libc::SYS_execve as u32), Some("execve"));
        assert_eq!(
            syscall_name(libc::SYS_io_uring_setup as u32),
            Some("io_uring_setup")
        );
        assert_eq!(syscall_name(100_000), None);
    }
}
