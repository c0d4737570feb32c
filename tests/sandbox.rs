//! The sandbox `serve` enters (src/sandbox/), judged two ways:
//! - a forked child of this test enters the real sandbox (`sandbox::enter`, the function
//!   `serve` calls) and tries one forbidden thing; each attempt is asserted separately, with the
//!   error or the signal expected (and, for a signal, the log line that names the call);
//! - a running `serve` with a blkio client connected: every thread is under seccomp with
//!   no_new_privs, the open files are only the image, sockets, eventfds, epolls and the VMM's
//!   memory; and a forbidden call injected into it (with ptrace, from outside: no test hook in
//!   the binary) stops it by SIGSYS with a log line naming the call.

mod common;

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::s;
use nix::libc;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use vhost_user_vhdx::sandbox::{self, Config, SeccompMode};

/// How a sandboxed child ended, and what it wrote on stderr.
#[derive(Debug)]
struct Ended {
    status: WaitStatus,
    stderr: String,
}

impl Ended {
    /// The child's `attempt` returned this errno (0: it succeeded).
    fn errno(&self) -> i32 {
        match self.status {
            WaitStatus::Exited(_, code) if code < 200 => code,
            _ => panic!("the child did not exit normally: {self:?}"),
        }
    }

    fn assert_errno(&self, errno: i32, what: &str) {
        assert_eq!(
            self.errno(),
            errno,
            "{what}: expected {}, got {} ({self:?})",
            nix::errno::Errno::from_raw(errno),
            nix::errno::Errno::from_raw(self.errno())
        );
    }

    /// Stopped by SIGSYS, after a log line naming `call`.
    fn assert_sigsys(&self, call: &str) {
        assert!(
            matches!(self.status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "expected SIGSYS for {call}: {self:?}"
        );
        let want = format!("forbidden system call {call} (");
        assert!(
            self.stderr.contains(&want),
            "the log does not name {call}: {:?}",
            self.stderr
        );
    }
}

/// The errno of the last failed call.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// `ret < 0` → errno, else 0.
fn result(ret: libc::c_long) -> i32 {
    if ret < 0 {
        errno()
    } else {
        0
    }
}

/// Forks; the child enters the sandbox as `config` says, runs `attempt` and exits with the errno
/// it returns (201: entering failed). Waits at most 20 s.
fn in_sandbox(config: &Config, attempt: impl FnOnce() -> i32) -> Ended {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only makes system calls, enters the sandbox (allocation is fine in a
    // glibc child) and leaves with _exit; it never returns into the test harness.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            // SAFETY: plain system calls; _exit never returns.
            unsafe {
                libc::dup2(write_end.as_raw_fd(), 2);
                let code = match sandbox::enter(config) {
                    Ok(()) => attempt(),
                    Err(e) => {
                        let line = format!("entering: {e}\n");
                        libc::write(2, line.as_ptr().cast(), line.len());
                        201
                    }
                };
                libc::_exit(code)
            }
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            let deadline = Instant::now() + Duration::from_secs(20);
            let status = loop {
                match waitpid(child, Some(WaitPidFlag::WNOHANG)).expect("waitpid") {
                    WaitStatus::StillAlive if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    WaitStatus::StillAlive => {
                        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                        panic!("the sandboxed child hung");
                    }
                    done => break done,
                }
            };
            let mut stderr = String::new();
            let _ = File::from(read_end).read_to_string(&mut stderr);
            Ended { status, stderr }
        }
    }
}

fn full() -> Config {
    Config::default()
}

fn landlock_only() -> Config {
    Config {
        seccomp: SeccompMode::Off,
        ..Config::default()
    }
}

fn open(path: &str, flags: i32) -> i32 {
    let c = CString::new(path).unwrap();
    // SAFETY: a valid NUL-terminated path.
    result(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o600) } as libc::c_long)
}

#[test]
fn cannot_open_etc_passwd() {
    in_sandbox(&full(), || open("/etc/passwd", libc::O_RDONLY))
        .assert_errno(libc::EACCES, "open /etc/passwd");
    // Landlock alone says the same (seccomp answers first when both are on).
    in_sandbox(&landlock_only(), || open("/etc/passwd", libc::O_RDONLY))
        .assert_errno(libc::EACCES, "open /etc/passwd, Landlock alone");
}

#[test]
fn cannot_open_the_images_directory_or_its_files() {
    let dir = common::tempdir("sandbox-dir");
    let image = dir.path().join("disk.vhdx");
    std::fs::write(&image, b"not really").unwrap();
    for config in [full(), landlock_only()] {
        in_sandbox(&config, || {
            open(s(dir.path()), libc::O_RDONLY | libc::O_DIRECTORY)
        })
        .assert_errno(libc::EACCES, "open the image's directory");
        in_sandbox(&config, || open(s(&image), libc::O_RDWR))
            .assert_errno(libc::EACCES, "reopen the image");
    }
}

#[test]
fn cannot_create_a_file() {
    let dir = common::tempdir("sandbox-create");
    let new = dir.path().join("new");
    for config in [full(), landlock_only()] {
        in_sandbox(&config, || open(s(&new), libc::O_WRONLY | libc::O_CREAT))
            .assert_errno(libc::EACCES, "create a file");
        assert!(!new.exists());
    }
}

#[test]
fn cannot_execve() {
    in_sandbox(&full(), || {
        let sh = CString::new("/bin/true").unwrap();
        let argv = [sh.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NUL-terminated argv and envp.
        result(unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) } as libc::c_long)
    })
    .assert_sigsys("execve");
}

#[test]
fn cannot_create_an_inet_socket() {
    in_sandbox(&full(), || {
        // SAFETY: integer arguments only.
        result(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) } as libc::c_long)
    })
    .assert_sigsys("socket");
    in_sandbox(&full(), || {
        // SAFETY: integer arguments only.
        result(unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, 0) } as libc::c_long)
    })
    .assert_sigsys("socket");
}

#[test]
fn cannot_create_a_netlink_socket() {
    in_sandbox(&full(), || {
        // SAFETY: integer arguments only.
        result(
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) }
                as libc::c_long,
        )
    })
    .assert_sigsys("socket");
}

#[test]
fn cannot_ptrace() {
    let parent = std::process::id() as libc::pid_t;
    in_sandbox(&full(), || {
        // SAFETY: integer arguments only.
        result(unsafe { libc::ptrace(libc::PTRACE_ATTACH, parent, 0, 0) })
    })
    .assert_sigsys("ptrace");
}

#[test]
fn cannot_start_a_process() {
    // glibc's fork() is clone without CLONE_THREAD.
    in_sandbox(&full(), || {
        // SAFETY: the child, if the filter let one be made, exits at once.
        match unsafe { libc::fork() } {
            0 => unsafe { libc::_exit(0) },
            pid => result(pid as libc::c_long),
        }
    })
    .assert_sigsys("clone");
}

#[test]
fn cannot_connect_to_an_abstract_unix_socket() {
    // Created outside the sandbox, by this process.
    let name = format!("vhdx-sandbox-test-{}", std::process::id());
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let attempt = || match std::os::unix::net::UnixStream::connect_addr(&addr) {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    };
    // Nothing makes a socket after entry (the VMM's connection comes from accept): seccomp
    // stops the socket call itself.
    in_sandbox(&full(), attempt).assert_sigsys("socket");
    // Landlock alone scopes abstract sockets to the sandbox.
    in_sandbox(&landlock_only(), attempt)
        .assert_errno(libc::EPERM, "connect to an abstract socket");
    drop(listener);
}

#[test]
fn cannot_signal_another_process() {
    let parent = std::process::id() as libc::pid_t;
    // seccomp has no kill(2) at all; Landlock scopes signals to the sandbox.
    in_sandbox(&full(), || {
        // SAFETY: signal 0 only checks.
        result(unsafe { libc::kill(parent, 0) } as libc::c_long)
    })
    .assert_sigsys("kill");
    in_sandbox(&landlock_only(), || {
        // SAFETY: signal 0 only checks.
        result(unsafe { libc::kill(parent, 0) } as libc::c_long)
    })
    .assert_errno(libc::EPERM, "signal the parent, Landlock alone");
}

#[test]
fn logging_to_a_terminal_still_works() {
    // env_logger checks isatty(stderr) (ioctl TCGETS) for each line it writes.
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors; the other arguments may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both were just opened and are owned here.
    let (_master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    in_sandbox(&full(), || {
        // SAFETY: an open descriptor.
        match unsafe { libc::isatty(slave.as_raw_fd()) } {
            1 => 0,
            _ => errno(),
        }
    })
    .assert_errno(0, "isatty on a terminal");
}

#[test]
fn files_open_before_entry_and_threads_still_work() {
    let dir = common::tempdir("sandbox-open");
    let path = dir.path().join("open");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let ended = in_sandbox(&full(), || {
        if file.write_all_at(b"inside", 4096).is_err() || file.sync_data().is_err() {
            return 1;
        }
        let reader = file.try_clone().unwrap();
        let read = std::thread::spawn(move || {
            let mut buf = [0u8; 6];
            reader.read_exact_at(&mut buf, 4096).map(|_| buf)
        })
        .join();
        match read {
            Ok(Ok(buf)) if &buf == b"inside" => 0,
            _ => 2,
        }
    });
    ended.assert_errno(0, "write, sync and read an open file from a new thread");
    assert_eq!(common::read_at(&path, 4096, 6), b"inside");
}

// ---------------------------------------------------------------------------------------------
// A running serve

/// `serve` with a blkio client connected that has written and read.
struct Served {
    child: std::process::Child,
    log: std::path::PathBuf,
    image: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Served {
    let dir = common::tempdir("sandbox-serve");
    let image = dir.path().join("disk.vhdx");
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("serve.log");
    common::ours_ok(&["create", "-f", "vhdx", s(&image), "64M"]);
    let log_file = File::create(&log).unwrap();
    let mut command = Command::new(common::bin());
    command
        .args(["serve", "--num-queues", "2", "--socket-path", s(&socket)])
        .args(extra)
        .arg(&image)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file);
    // SAFETY: close_range is async-signal-safe. Descriptors that other tests of this process
    // have open without O_CLOEXEC would otherwise leak into serve and blur the fd check.
    unsafe {
        command.pre_exec(|| {
            libc::close_range(3, u32::MAX, 0);
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    if let Err(e) = common::wait_for_path(&mut child, &socket, Duration::from_secs(10)) {
        let _ = child.kill();
        panic!(
            "serve did not start ({e:?}): {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    Served {
        child,
        log,
        image,
        _dir: dir,
    }
}

/// Connects with blkio, writes and reads a block on each queue; the client stays connected.
fn connect(socket_dir: &Path) -> (blkio::Blkio, Vec<blkio::Blkioq>) {
    let socket = socket_dir.join("vhost.sock");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut b = loop {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", s(&socket)).unwrap();
        match b.connect() {
            Ok(()) => break b,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("blkio cannot connect: {e}"),
        }
    };
    b.set_i32("num-queues", 2).unwrap();
    let started = b.start().unwrap();
    let region = b.alloc_mem_region(1 << 20).unwrap();
    b.map_mem_region(&region).unwrap();
    let mut queues = started.queues;
    for (i, q) in queues.iter_mut().enumerate() {
        // SAFETY: the region is mapped and 1 MiB long; nothing else uses it.
        unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0x5a + i as u8, 1 << 20) };
        for write in [true, false] {
            if write {
                q.write(
                    i as u64 * (1 << 20),
                    region.addr as *const u8,
                    1 << 20,
                    0,
                    blkio::ReqFlags::empty(),
                );
            } else {
                q.read(
                    i as u64 * (1 << 20),
                    region.addr as *mut u8,
                    1 << 20,
                    0,
                    blkio::ReqFlags::empty(),
                );
            }
            let mut done = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let mut timeout = Duration::from_millis(500);
                match q.do_io(&mut done, 1, Some(&mut timeout), None) {
                    Ok(1) => break,
                    Ok(_) => {}
                    Err(e) if e.errno() == blkio::Errno::TIME => {}
                    Err(e) => panic!("do_io: {e}"),
                }
                assert!(
                    Instant::now() < deadline,
                    "a request did not complete in 30 s"
                );
            }
            // SAFETY: do_io filled the completion.
            let c = unsafe { done[0].assume_init_read() };
            assert_eq!(c.ret, 0, "request failed");
        }
    }
    (b, queues)
}

fn status_field(status: &str, field: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

#[test]
fn every_thread_of_a_running_serve_is_confined_and_only_its_files_are_open() {
    let mut served = serve(&[]);
    let (client, queues) = connect(served.image.parent().unwrap());
    let pid = served.child.id();
    let mut threads = 0;
    let mut queue_threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let name = status_field(&status, "Name").unwrap_or_default();
        assert_eq!(
            status_field(&status, "Seccomp").as_deref(),
            Some("2"),
            "{name}: {status}"
        );
        assert_eq!(
            status_field(&status, "NoNewPrivs").as_deref(),
            Some("1"),
            "{name}"
        );
        // The process-wide filters are 3, and every thread narrows itself to its kind (one
        // more). A queue thread is started by the control thread once that one has narrowed
        // itself: it runs under both lists (two more); so does the WAL worker when a queue
        // thread starts it (a helper may start it too), and io_uring's workers.
        let filters: u32 = status_field(&status, "Seccomp_filters")
            .unwrap()
            .parse()
            .unwrap();
        let expected: &[u32] = if name.starts_with("queue-") {
            queue_threads += 1;
            &[5]
        } else if name.starts_with("iou-wrk-") {
            // io_uring's workers (io-wq), which run a ring's blocking operations: kernel
            // threads in the process, copies of the queue thread that set the ring up.
            &[5]
        } else if name == "vhdx-wal" {
            &[4, 5]
        } else {
            &[4]
        };
        assert!(
            expected.contains(&filters),
            "{name}: {filters} filters, expected {expected:?}: {status}"
        );
        // Every thread starts after entry, when the main thread has dropped every capability.
        assert_eq!(
            status_field(&status, "CapEff").as_deref(),
            Some("0000000000000000"),
            "{name}"
        );
        threads += 1;
    }
    // The main (control) thread, the signal thread, a helper, two queue threads, the WAL worker.
    assert!(threads >= 5, "{threads} threads");
    assert_eq!(queue_threads, 2, "the two queues' threads");

    let mut saw_image = false;
    let mut saw_socket = false;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = fd.unwrap();
        let n: i32 = fd.file_name().to_str().unwrap().parse().unwrap();
        let target = std::fs::read_link(fd.path()).unwrap();
        let t = target.to_string_lossy();
        if n <= 2 {
            continue; // stdin, stdout, stderr: what the test gave
        }
        if target == served.image {
            saw_image = true;
        } else if t.starts_with("socket:[") {
            saw_socket = true;
        } else {
            assert!(
                t == "anon_inode:[eventfd]"
                    || t == "anon_inode:[eventpoll]"
                    // a queue thread's ring (requests in flight, the default)
                    || t == "anon_inode:[io_uring]"
                    || t.starts_with("/memfd:"),
                "fd {n} -> {t}: not the chain, a socket or the VMM's"
            );
        }
    }
    assert!(saw_image && saw_socket);
    drop(queues);
    drop(client);
    // Still serving after the client left; SIGTERM closes cleanly inside the sandbox.
    nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = common::wait_or_kill(&mut served.child, Duration::from_secs(20))
        .expect("serve did not stop after SIGTERM");
    let log = std::fs::read_to_string(&served.log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(
        log.contains("Landlock"),
        "the log says nothing of Landlock: {log}"
    );
    common::ours_ok(&["check", s(&served.image)]);
}

#[test]
fn as_root_user_switches_every_thread_to_the_user_and_keeps_serving() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("this test starts serve as root with --user and needs root");
    }
    let mut served = serve(&["--user", "65534", "--group", "65534"]);
    let (client, queues) = connect(served.image.parent().unwrap());
    let pid = served.child.id();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert_eq!(
            status_field(&status, "Uid").as_deref(),
            Some("65534\t65534\t65534\t65534"),
            "{status}\n{}",
            std::fs::read_to_string(&served.log).unwrap_or_default()
        );
        assert_eq!(
            status_field(&status, "Gid").as_deref(),
            Some("65534\t65534\t65534\t65534")
        );
        assert_eq!(status_field(&status, "Groups").as_deref(), Some("65534"));
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            assert_eq!(
                status_field(&status, set).as_deref(),
                Some("0000000000000000"),
                "{set}: {status}"
            );
        }
    }
    drop(queues);
    drop(client);
    nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = common::wait_or_kill(&mut served.child, Duration::from_secs(20))
        .expect("serve did not stop after SIGTERM");
    let log = std::fs::read_to_string(&served.log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("uid 65534 gid 65534"), "{log}");
    common::ours_ok(&["check", s(&served.image)]);
}

#[test]
fn bad_user_is_a_one_line_usage_error_before_anything_is_opened() {
    let out = common::ours(&[
        "serve",
        "--socket-path",
        "/nonexistent/s",
        "--user",
        "no-such-user-here",
        "/nonexistent/x.vhdx",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--user no-such-user-here"), "{err}");
}

/// Makes the stopped thread `tid` (inside a system call) call `nr(args)` when it resumes.
fn inject_syscall(tid: i32, nr: i64, args: [u64; 3]) -> Result<(), String> {
    let pid = Pid::from_raw(tid);
    let err = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: ptrace on a thread of a child this test started; the registers are read, changed
    // and written back whole; the tracee is detached before returning.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) != 0 {
            return Err(err("PTRACE_SEIZE"));
        }
        if libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) != 0 {
            return Err(err("PTRACE_INTERRUPT"));
        }
        waitpid(pid, Some(WaitPidFlag::__WALL)).map_err(|e| format!("waitpid: {e}"))?;
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        if libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs) != 0 {
            return Err(err("PTRACE_GETREGS"));
        }
        // The thread waits in a system call: the two bytes before rip are `syscall` (0f 05).
        let word = libc::ptrace(libc::PTRACE_PEEKTEXT, tid, regs.rip - 2, 0);
        if word as u16 != 0x050f {
            return Err(format!("no syscall instruction before rip ({word:#x})"));
        }
        regs.rip -= 2;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX; // no restart of the interrupted call
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        if libc::ptrace(libc::PTRACE_SETREGS, tid, 0, &regs) != 0 {
            return Err(err("PTRACE_SETREGS"));
        }
        if libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) != 0 {
            return Err(err("PTRACE_DETACH"));
        }
    }
    Ok(())
}

#[test]
#[cfg(target_arch = "x86_64")]
fn a_forbidden_call_stops_serve_with_a_log_line_naming_it() {
    if !nix::unistd::Uid::effective().is_root() {
        // serve is not dumpable: only CAP_SYS_PTRACE can inject the call.
        panic!("this test injects a system call with ptrace and needs root (CAP_SYS_PTRACE)");
    }
    let mut served = serve(&[]);
    let pid = served.child.id() as i32;
    // The main thread waits in epoll for a VMM; make it call socket(AF_INET, SOCK_STREAM).
    std::thread::sleep(Duration::from_millis(200));
    inject_syscall(
        pid,
        libc::SYS_socket,
        [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0],
    )
    .unwrap();
    let status = common::wait_or_kill(&mut served.child, Duration::from_secs(10))
        .expect("serve survived a forbidden call");
    let log = std::fs::read_to_string(&served.log).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}: {log}");
    assert!(
        log.contains("seccomp: forbidden system call socket (41) in thread vhost-user-vhdx"),
        "{log}"
    );
}

#[test]
#[cfg(target_arch = "x86_64")]
fn with_seccomp_log_a_forbidden_call_is_let_through() {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("this test injects a system call with ptrace and needs root (CAP_SYS_PTRACE)");
    }
    let mut served = serve(&["--seccomp", "log"]);
    let pid = served.child.id() as i32;
    std::thread::sleep(Duration::from_millis(200));
    inject_syscall(
        pid,
        libc::SYS_socket,
        [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0],
    )
    .unwrap();
    // The call is let through (the kernel audit-logs it): serve goes on serving.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "serve stopped in --seccomp log: {}",
        std::fs::read_to_string(&served.log).unwrap_or_default()
    );
    let (client, queues) = connect(served.image.parent().unwrap());
    drop(queues);
    drop(client);
    nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    let status = common::wait_or_kill(&mut served.child, Duration::from_secs(20))
        .expect("serve did not stop after SIGTERM");
    let log = std::fs::read_to_string(&served.log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(!log.contains("forbidden system call"), "{log}");
    assert!(log.contains("seccomp --log"), "{log}");
}

#[test]
fn sandbox_off_installs_nothing_and_says_so() {
    let mut served = serve(&["--sandbox", "off"]);
    let (client, queues) = connect(served.image.parent().unwrap());
    let pid = served.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&status, "Seccomp").as_deref(), Some("0"));
    drop(queues);
    drop(client);
    nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = common::wait_or_kill(&mut served.child, Duration::from_secs(20))
        .expect("serve did not stop after SIGTERM");
    let log = std::fs::read_to_string(&served.log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("sandbox off"), "{log}");
}

#[test]
fn serves_on_an_inherited_socket_fd_and_stops_cleanly() {
    let dir = common::tempdir("sandbox-fd");
    let image = dir.path().join("disk.vhdx");
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("serve.log");
    common::ours_ok(&["create", "-f", "vhdx", s(&image), "64M"]);
    // What systemd or libvirt would hand over: a listening socket as fd 3.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    let log_file = File::create(&log).unwrap();
    let mut command = Command::new(common::bin());
    command
        .args(["serve", "--num-queues", "2", "--fd", "3", s(&image)])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file);
    // SAFETY: dup2 and close_range are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself would keep O_CLOEXEC: clear it in every case.
            if libc::dup2(fd, 3) != 3 || libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close_range(4, u32::MAX, 0);
            Ok(())
        });
    }
    let child = command.spawn().unwrap();
    drop(listener);
    let mut served = Served {
        child,
        log,
        image,
        _dir: dir,
    };
    std::thread::sleep(Duration::from_millis(300));
    if let Some(status) = served.child.try_wait().unwrap() {
        panic!(
            "{status}: {}",
            std::fs::read_to_string(&served.log).unwrap()
        );
    }
    let (client, queues) = connect(served.image.parent().unwrap());
    drop(queues);
    drop(client);
    let pid = served.child.id() as i32;
    nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    let status = common::wait_or_kill(&mut served.child, Duration::from_secs(20))
        .expect("serve did not stop after SIGTERM");
    let log = std::fs::read_to_string(&served.log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("Landlock"), "{log}");
    common::ours_ok(&["check", s(&served.image)]);
}
