//! Privileges: another user (when started as root), no capabilities, no new privileges, not
//! dumpable, and resource limits that fit a backend whose files are all open.

use std::io;

use nix::libc;
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{Gid, Group, Uid, User};

/// The user and group to run as after entry (`--user`, `--group`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: Uid,
    pub gid: Gid,
}

/// Resolves `--user NAME|UID` and `--group NAME|GID` (the user's own group by default). Done
/// before anything is opened: a bad name is a usage error.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Credentials>, String> {
    let Some(user) = user else {
        return match group {
            Some(_) => Err("--group needs --user".into()),
            None => Ok(None),
        };
    };
    if !Uid::effective().is_root() {
        return Err("--user needs root: an unprivileged process is already that user".into());
    }
    let found = match user.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)),
        Err(_) => User::from_name(user),
    }
    .map_err(|e| format!("--user {user}: {e}"))?;
    let (uid, user_gid) = match (found, user.parse::<u32>()) {
        (Some(u), _) => (u.uid, Some(u.gid)),
        (None, Ok(n)) => (Uid::from_raw(n), None),
        (None, Err(_)) => return Err(format!("--user {user}: no such user")),
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => Gid::from_raw(n),
            Err(_) => {
                Group::from_name(g)
                    .map_err(|e| format!("--group {g}: {e}"))?
                    .ok_or_else(|| format!("--group {g}: no such group"))?
                    .gid
            }
        },
        None => user_gid.ok_or_else(|| format!("--user {user}: no such user; name a --group"))?,
    };
    if uid.is_root() || gid.as_raw() == 0 {
        return Err("--user/--group: the point is to stop being root".into());
    }
    Ok(Some(Credentials { uid, gid }))
}

/// Open files allowed after entry: the ones open now, plus what one VMM connection brings
/// (src/handler.rs, src/queue.rs): 509 memory regions at most, each mapping holding its fd,
/// and as many of the previous table while the queues still use it (src/guest_memory.rs); the
/// in-flight fd, old and new; a kick, call and error eventfd per queue, and a control eventfd
/// and an epoll per queue thread; and room for the rest (the connection and its clone, the
/// epolls and the stop eventfd of src/daemon.rs, the WAL worker's epoll and eventfd).
pub(super) fn file_limit(open_now: u64, num_queues: u64) -> u64 {
    open_now + 2 * (509 + 1) + 5 * num_queues + 64
}

/// RLIMIT_CORE 0 (guest data must not end up in core files) and RLIMIT_NOFILE `files`.
/// RLIMIT_NPROC is left alone: the control thread starts a connection's queue threads at each
/// connection (src/handler.rs), and the limit counts threads, of every process of the user, so
/// no value both lets a reconnect start them and stops anything seccomp does not already stop
/// (it allows `clone` of threads only).
pub(super) fn limit_resources(files: u64) -> io::Result<()> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    setrlimit(Resource::RLIMIT_NOFILE, files, files)?;
    Ok(())
}

/// The number of open files, from /proc/self/fd (before Landlock).
pub(super) fn open_files() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(64)
}

/// The highest capability number this kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Empties the bounding and ambient sets (this thread; only execve would use them, and
/// execve is refused), switches to `creds` on every thread (glibc applies set*id to all
/// threads; leaving uid 0 clears the capabilities), empties this thread's capabilities, then
/// sets no_new_privs and clears the dumpable flag (which a uid change resets).
pub(super) fn drop_privileges(creds: Option<Credentials>) -> Result<String, String> {
    let last = last_capability();
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            // EPERM: no CAP_SETPCAP (not root), so nothing to drop that execve could use.
            break;
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let mut said = String::new();
    if let Some(c) = creds {
        nix::unistd::setgroups(&[c.gid]).map_err(|e| format!("setgroups: {e}"))?;
        nix::unistd::setresgid(c.gid, c.gid, c.gid).map_err(|e| format!("setresgid: {e}"))?;
        nix::unistd::setresuid(c.uid, c.uid, c.uid).map_err(|e| format!("setresuid: {e}"))?;
        if nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).is_ok() {
            return Err("dropping root: setuid(0) still works".into());
        }
        said = format!("uid {} gid {}, ", c.uid, c.gid);
    }
    drop_capabilities().map_err(|e| format!("dropping capabilities: {e}"))?;
    // SAFETY: prctl with integer arguments only.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(format!("no_new_privs: {}", io::Error::last_os_error()));
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(format!("PR_SET_DUMPABLE: {}", io::Error::last_os_error()));
        }
    }
    Ok(format!("{said}no capabilities, no_new_privs, not dumpable"))
}

/// Empties the calling thread's effective, permitted and inheritable capability sets.
pub(super) fn drop_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs, both valid for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
