//! Landlock: after entry no path can be opened, created, removed or executed (every file the
//! process uses is already open; Landlock checks paths when they are resolved, so open fds keep
//! working), no abstract unix socket outside the process can be reached, and no signal can be
//! sent outside it. Landlock is an LSM, so it also covers what seccomp cannot see, such as an
//! open submitted through an io_uring.
//!
//! Connecting to a pathname unix socket is refused too where the kernel mediates it (ABI 9):
//! nothing connects after entry (SIGTERM wakes the accept through an eventfd, see
//! `crate::daemon`).
//!
//! Best effort: each right the running kernel lacks is dropped and said in the log (Landlock
//! ABI 6, Linux 6.12, enforces all of this; without Landlock nothing is enforced and seccomp is
//! the only wall).
//! Before ABI 8 (Linux 7.0) a domain covers only the calling thread and the threads it starts
//! later. Every thread of `serve` starts after entry; a thread that already existed would join
//! the domain itself ([`super::ThreadKind::confine`]).

use landlock::{
    Access, AccessFs, LandlockStatus, RestrictSelfAttr, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetStatus, Scope, ABI,
};

/// The newest ABI whose rights this code was tested with.
const TESTED_ABI: ABI = ABI::V9;

/// What one restriction achieved.
pub(super) struct Outcome {
    /// Every thread of the process is in the domain (ABI 8), not only this one and its children.
    pub all_threads: bool,
    /// Something was enforced.
    pub enforced: bool,
    /// One line for the log.
    pub summary: String,
}

/// Restricts the calling thread (and, on ABI 8, every thread).
pub(super) fn restrict() -> Result<Outcome, String> {
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let created = Ruleset::default()
        .handle_access(AccessFs::from_all(TESTED_ABI))
        .map_err(err)?
        .scope(Scope::from_all(TESTED_ABI))
        .map_err(err)?
        .create()
        .map_err(err)?;
    let status = created
        .all_threads(true)
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(outcome(&status))
}

/// Restricts the calling thread alone, for a thread that existed before entry.
pub(super) fn restrict_thread() -> Result<(), String> {
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    Ruleset::default()
        .handle_access(AccessFs::from_all(TESTED_ABI))
        .map_err(err)?
        .scope(Scope::from_all(TESTED_ABI))
        .map_err(err)?
        .create()
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(())
}

fn outcome(status: &RestrictionStatus) -> Outcome {
    let abi = match status.landlock {
        LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => match kernel_abi {
            Some(k) => format!("kernel ABI {k} (used as {effective_abi})"),
            None => format!("kernel ABI {effective_abi}"),
        },
        LandlockStatus::NotEnabled => "not enabled in this kernel (lsm=)".to_string(),
        LandlockStatus::NotImplemented => "not built into this kernel".to_string(),
    };
    let enforced = status.ruleset != RulesetStatus::NotEnforced;
    let what = match status.ruleset {
        RulesetStatus::FullyEnforced => {
            "fully enforced: no path access, abstract sockets and \
                                         signals scoped to the process"
        }
        RulesetStatus::PartiallyEnforced => {
            "partially enforced (best effort: this kernel lacks \
                                             some rights; seccomp still refuses opens)"
        }
        RulesetStatus::NotEnforced => "NOT enforced (seccomp still refuses opens)",
    };
    let threads = if status.all_threads {
        "every thread"
    } else {
        "this thread and the threads it starts; older threads confine themselves"
    };
    Outcome {
        all_threads: status.all_threads,
        enforced,
        summary: format!("Landlock {abi}: {what}; {threads}"),
    }
}
