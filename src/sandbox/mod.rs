//! The sandbox `serve` enters once the chain is open and locked and the socket is listening,
//! before it reads the first vhost-user message: a guest or an image that takes over the process
//! gets that one disk and nothing more.
//!
//! [`enter`] does, in order:
//! 1. resource limits (no core files, open files bounded);
//! 2. privileges ([`privileges`]): `--user/--group` when root, no capabilities, no_new_privs,
//!    not dumpable;
//! 3. Landlock ([`landlock`]): no path access at all, abstract sockets and signals scoped;
//! 4. seccomp ([`seccomp`]): the errno filters and the base allowlist on every thread (TSYNC),
//!    with a SIGSYS handler that names a forbidden call before the process stops.
//!
//! Each thread then narrows itself to the allowlist of its kind with [`ThreadKind::confine`]
//! at its start. Every thread of `serve` starts after entry: the helpers
//! (`crate::helper_pool`), the signal thread and, at each connection, the queue threads
//! (`crate::handler`); the thread that entered becomes the control thread (`crate::daemon`)
//! once it has started the helpers and the signal thread. Filters are inherited and stack, so
//! the queue threads, which the control thread starts, run under the control thread's list and
//! their own. The WAL worker (src/vhdx/ knows nothing of the sandbox) starts at the first write,
//! from the thread that makes it, and inherits that thread's confinement (a queue thread's, in
//! practice); its needs are listed in the tables so that it works under any of them.
//!
//! A thread that existed before entry (none in `serve`; a library could start one) gets the
//! seccomp base filter through TSYNC, and joins the Landlock domain and drops its capabilities
//! itself in [`ThreadKind::confine`].

mod landlock;
pub mod privileges;
mod seccomp;
#[cfg(target_arch = "x86_64")]
mod syscall_names;

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::OnceLock;

use log::{info, warn};
use seccompiler::BpfProgram;

pub use privileges::Credentials;

/// `--seccomp`: what a system call outside the allowlists does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// Log the call's name on stderr and stop the process (SIGSYS).
    #[default]
    Kill,
    /// Let the call through; the kernel logs it to the audit log (to find a missing call).
    Log,
    /// No seccomp filter.
    Off,
}

/// What `serve` asks of the sandbox.
#[derive(Clone, Debug)]
pub struct Config {
    /// `--sandbox on|off`.
    pub enabled: bool,
    pub seccomp: SeccompMode,
    /// `--user/--group`, resolved.
    pub credentials: Option<Credentials>,
    /// Queues offered (bounds the open files).
    pub num_queues: u16,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: true,
            seccomp: SeccompMode::Kill,
            credentials: None,
            num_queues: 1,
        }
    }
}

/// A kind of thread, each with its own seccomp allowlist (see `seccomp.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The thread that entered the sandbox (the main thread): accepts each VMM, handles its
    /// vhost-user messages, starts and joins its queue threads, flushes after a disconnect and
    /// closes the image at exit.
    Control,
    /// A queue's worker thread.
    Queue,
    /// A helper thread sharing a queue's large reads.
    Helper,
    /// The thread that waits for SIGTERM/SIGINT.
    Signals,
    /// The WAL worker (listed for the base filter; it does not confine itself, and inherits
    /// the confinement of the thread that starts it).
    Wal,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Control,
        ThreadKind::Queue,
        ThreadKind::Helper,
        ThreadKind::Signals,
        ThreadKind::Wal,
    ];

    /// Narrows the calling thread to this kind's allowlist, once; a no-op before [`enter`],
    /// with the sandbox off, or when this thread is already confined. Cheap enough to call at
    /// the start of each piece of work (a thread-local flag). A thread that existed before
    /// entry also joins the Landlock domain and drops its capabilities here.
    pub fn confine(self) {
        if CONFINED.with(Cell::get) {
            return;
        }
        let Some(state) = STATE.get() else {
            return;
        };
        CONFINED.with(|c| c.set(true));
        if state.threads_at_entry.contains(&gettid()) {
            if state.landlock_per_thread {
                if let Err(e) = landlock::restrict_thread() {
                    warn!("{self:?} thread: {e}");
                }
            }
            if let Err(e) = privileges::drop_capabilities() {
                warn!("{self:?} thread: dropping capabilities: {e}");
            }
        }
        if let Some(programs) = &state.programs {
            // A call refused while SIGSYS is blocked stops the process without a word: let
            // the handler run in threads that block every signal (helpers, queue threads).
            let mut sigsys = nix::sys::signal::SigSet::empty();
            sigsys.add(nix::sys::signal::Signal::SIGSYS);
            let _ = sigsys.thread_unblock();
            if let Err(e) = seccomp::install_thread(&programs[self as usize]) {
                warn!("{self:?} thread: {e}");
            }
        }
    }
}

/// What [`ThreadKind::confine`] needs, set once by [`enter`].
struct State {
    /// One narrowing program per kind (None: seccomp off).
    programs: Option<Vec<BpfProgram>>,
    /// Landlock covers only the entering thread and its children (before ABI 8).
    landlock_per_thread: bool,
    /// Threads that existed at entry: they join the domain and drop capabilities themselves.
    threads_at_entry: HashSet<i32>,
}

static STATE: OnceLock<State> = OnceLock::new();

thread_local! {
    static CONFINED: Cell<bool> = const { Cell::new(false) };
}

/// The threads of this process, from /proc/self/task (before Landlock).
fn threads() -> HashSet<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The calling thread's id.
fn gettid() -> i32 {
    // SAFETY: gettid has no arguments.
    unsafe { nix::libc::syscall(nix::libc::SYS_gettid) as i32 }
}

/// Enters the sandbox. Called once, from the thread that will be the control thread (the main
/// thread), after every file is open and the socket listens, before any other thread starts.
/// An error means the process could not be confined as asked and must not serve.
pub fn enter(config: &Config) -> Result<(), String> {
    if !config.enabled {
        warn!("sandbox off (--sandbox off): the process keeps every right of its user");
        return Ok(());
    }
    // The other threads (none in `serve`): this one is confined here.
    let mut threads_at_entry = threads();
    threads_at_entry.remove(&gettid());
    let files = privileges::file_limit(privileges::open_files(), u64::from(config.num_queues));
    // Compiled before anything is restricted.
    let programs = seccomp::programs(config.seccomp)?;

    privileges::limit_resources(files).map_err(|e| format!("resource limits: {e}"))?;
    let privileges = privileges::drop_privileges(config.credentials)?;
    let landlock = landlock::restrict()?;
    if landlock.enforced {
        info!("{}", landlock.summary);
    } else {
        warn!("{}", landlock.summary);
    }
    if let Some(p) = &programs {
        if config.seccomp == SeccompMode::Kill {
            seccomp::install_sigsys_handler()?;
        }
        seccomp::install_process(p)?;
    }
    let seccomp = match config.seccomp {
        SeccompMode::Kill => "seccomp: a call outside the allowlists stops the process",
        SeccompMode::Log => {
            "seccomp --log: calls outside the allowlists are let through and \
                             audit-logged"
        }
        SeccompMode::Off => "seccomp off",
    };
    if config.seccomp == SeccompMode::Kill {
        info!("sandbox: {privileges}; at most {files} open files, no core files; {seccomp}");
    } else {
        warn!("sandbox: {privileges}; at most {files} open files, no core files; {seccomp}");
    }
    let _ = STATE.set(State {
        programs: programs.map(|p| p.kinds),
        landlock_per_thread: landlock.enforced && !landlock.all_threads,
        threads_at_entry,
    });
    Ok(())
}
