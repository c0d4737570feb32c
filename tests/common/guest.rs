//! The guest harness of tests/guest.rs and tests/guest_maintenance.rs: a backend serving an
//! image on a vhost-user socket ([`Backend`]) and `tests/guest/guest-run`, which boots a Linux
//! guest on such sockets and runs one script in it ([`run_guest`]).
//!
//! Deadlines: the guests run under TCG on a shared 2-core machine, where a boot can take many
//! times as long as on an idle one. Every deadline here is generous, and all of them (with the
//! waits inside the guest, which guest-run scales itself) are multiplied by
//! `VHDX_GUEST_TIME_SCALE` (a number, at least 1; default 1) on a slower machine. A deadline
//! that passes fails the test with what the backend logged and, from guest-run, the last lines
//! of the guest's console.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{env_args, repo_root, s, serve_bin, wait_or_kill};

/// `VHDX_GUEST_TIME_SCALE`, the factor of every deadline of the guest tests (at least 1).
pub fn time_scale() -> f64 {
    match std::env::var("VHDX_GUEST_TIME_SCALE") {
        Err(_) => 1.0,
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(f) if f.is_finite() && f >= 1.0 => f,
            _ => panic!("VHDX_GUEST_TIME_SCALE must be a number of at least 1, not {v:?}"),
        },
    }
}

/// `d` times [`time_scale`].
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(time_scale())
}

/// `secs` times [`time_scale`], in whole seconds (for guest-run's `--timeout`).
pub fn scaled_secs(secs: u32) -> u32 {
    (f64::from(secs) * time_scale()).ceil() as u32
}

pub fn guest_dir() -> PathBuf {
    repo_root().join("tests/guest")
}

fn env_flag(name: &str) -> bool {
    matches!(std::env::var(name).as_deref(), Ok(v) if !v.is_empty() && v != "0")
}

/// Whether a test that would run our serve is skipped (`VHDX_GUEST_SKIP_SERVE=1`); says so.
pub fn skip_our_serve(test: &str) -> bool {
    let skip = env_flag("VHDX_GUEST_SKIP_SERVE");
    if skip {
        eprintln!(
            "guest: {test}: SKIPPED (it runs `vhost-user-vhdx serve`; VHDX_GUEST_SKIP_SERVE is set)"
        );
    }
    skip
}

/// This build's serve, or `$VHDX_SERVE_BIN`'s (to judge another build with the same tests),
/// with `$VHDX_SERVE_ARGS` first, as every other suite's serve (a test's own options follow
/// and win).
pub fn our_backend() -> Vec<String> {
    let mut command = vec![s(&serve_bin()).to_owned(), "serve".to_owned()];
    command.extend(env_args());
    command
}

/// [`our_backend`] on the thread pool (`--aio threads`), for the tests that time a kill or a
/// reset by the bytes the backend moved (/proc/PID/io): io_uring's transfers do not show
/// there (the kernel counts rchar/wchar in the read/write system calls only), so on io_uring,
/// the default, those stops would never come.
pub fn our_backend_counted() -> Vec<String> {
    let mut command = our_backend();
    command.extend(["--aio".to_owned(), "threads".to_owned()]);
    command
}

// ------------------------------------------------------------------------------------- backend

/// Where the backend on `socket` logs: `<socket>.log`.
pub fn log_of(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".log");
    PathBuf::from(p)
}

pub fn read_log(socket: &Path) -> String {
    fs::read_to_string(log_of(socket)).unwrap_or_else(|e| format!("(no log: {e})"))
}

/// Whether a socket at `socket` is listening. Connecting to find out could use up a backend's
/// one connection, so look in /proc/net/unix for the listening state (__SO_ACCEPTCON).
fn is_listening(socket: &Path) -> bool {
    let table = fs::read_to_string("/proc/net/unix").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && Path::new(fields[7]) == socket
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// Runs `COMMAND --socket-path SOCK [--num-queues N] IMAGE` (its stdout and stderr to
/// `<socket>.log`) and returns once it listens; panics with its log if it exits first or does
/// not listen within 30 s (scaled).
pub fn spawn_backend(
    command: &[String],
    image: &Path,
    socket: &Path,
    queues: Option<u16>,
) -> Child {
    let log_path = log_of(socket);
    let log = File::create(&log_path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]).arg("--socket-path").arg(socket);
    if let Some(q) = queues {
        cmd.arg("--num-queues").arg(q.to_string());
    }
    cmd.arg(image)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup the log file"))
        .stderr(log);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the backend {command:?}: {e}"));
    let limit = scaled(Duration::from_secs(30));
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the backend") {
            panic!(
                "the backend {command:?} exited with {status} before listening on {}\n--- its log ---\n{}",
                socket.display(),
                read_log(socket)
            );
        }
        if is_listening(socket) {
            return child;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the backend {command:?} did not listen on {} within {:.0} s\n--- its log ---\n{}",
                socket.display(),
                limit.as_secs_f64(),
                read_log(socket)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running backend; killed if the test fails before [`Backend::stop`].
pub struct Backend {
    pub child: Option<Child>,
    pub socket: PathBuf,
}

impl Backend {
    /// [`spawn_backend`] of `command`.
    pub fn spawn(command: &[String], image: &Path, socket: &Path, queues: Option<u16>) -> Backend {
        Backend {
            child: Some(spawn_backend(command, image, socket, queues)),
            socket: socket.to_owned(),
        }
    }

    /// This build's serve ([`our_backend`]).
    pub fn start_ours(image: &Path, socket: &Path, queues: Option<u16>) -> Backend {
        Backend::spawn(&our_backend(), image, socket, queues)
    }

    /// [`Backend::start_ours`] with [`our_backend_counted`].
    pub fn start_ours_counted(image: &Path, socket: &Path, queues: Option<u16>) -> Backend {
        Backend::spawn(&our_backend_counted(), image, socket, queues)
    }

    /// No process: the socket (and log) of a backend something else runs, for [`run_guest`].
    pub fn view(socket: &Path) -> Backend {
        Backend {
            child: None,
            socket: socket.to_owned(),
        }
    }

    pub fn log(&self) -> String {
        read_log(&self.socket)
    }

    /// SIGTERM, then the backend must close the image and exit 0 within 60 s (scaled).
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(
            matches!(killed, Ok(st) if st.success()),
            "kill -TERM {pid} failed: {killed:?}"
        );
        let limit = scaled(Duration::from_secs(60));
        let status = wait_or_kill(&mut child, limit).unwrap_or_else(|| {
            panic!(
                "the backend did not exit within {:.0} s of SIGTERM\n--- its log ---\n{}",
                limit.as_secs_f64(),
                self.log()
            )
        });
        assert!(
            status.success(),
            "the backend exited with {status} after SIGTERM\n--- its log ---\n{}",
            self.log()
        );
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ------------------------------------------------------------------------------------- guest

/// What one guest-run did.
pub struct GuestOutput {
    pub status: ExitStatus,
    /// The script's stdout.
    pub stdout: String,
    /// The script's stderr, then guest-run's own lines (on a failure, the console's last lines).
    pub stderr: String,
}

impl GuestOutput {
    /// Everything there is to know about a failed run, for a test's failure message: the
    /// script's output, guest-run's report and the backends' logs.
    pub fn failure(&self, what: &str, backends: &[&Backend]) -> String {
        let logs: Vec<String> = backends
            .iter()
            .map(|b| format!("--- backend log ({}) ---\n{}", b.socket.display(), b.log()))
            .collect();
        format!(
            "{what} exited with {} (124: timeout, 125: boot or harness failure)\n--- guest \
             stdout ---\n{}--- guest-run stderr ---\n{}{}",
            self.status,
            self.stdout,
            self.stderr,
            logs.join("\n")
        )
    }
}

/// Runs `guest-run --socket SOCK... [--queues N] --timeout T OPTS... SCRIPT ARGS...` (SCRIPT in
/// tests/guest), `timeout_secs` scaled, and says how long it took. Never panics on the guest's
/// account: the caller judges the [`GuestOutput`].
pub fn run_guest(
    test: &str,
    backends: &[&Backend],
    queues: Option<u16>,
    timeout_secs: u32,
    opts: &[&str],
    script: &str,
    args: &[String],
) -> GuestOutput {
    let mut cmd = Command::new(guest_dir().join("guest-run"));
    for b in backends {
        cmd.arg("--socket").arg(&b.socket);
    }
    if let Some(q) = queues {
        cmd.args(["--queues", &q.to_string()]);
    }
    cmd.args(["--timeout", &scaled_secs(timeout_secs).to_string()])
        .args(opts);
    if env_flag("VHDX_GUEST_VERBOSE") {
        cmd.arg("-v");
    }
    cmd.arg(guest_dir().join(script)).args(args);
    let started = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run tests/guest/guest-run: {e}"));
    let out = GuestOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let summary = out
        .stderr
        .lines()
        .rfind(|l| l.starts_with("guest-run: accel="))
        .unwrap_or("");
    eprintln!(
        "guest: {test}: guest-run {script} {args:?} {:.1} s ({summary})",
        started.elapsed().as_secs_f64()
    );
    out
}

/// The guest printed `line` (a whole line of its stdout).
pub fn assert_line(out: &str, line: &str) {
    assert!(
        out.lines().any(|l| l == line),
        "the guest did not print {line:?}; its stdout:\n{out}"
    );
}

/// A host tool that may live in /usr/sbin or /sbin, outside a normal user's PATH (e2fsck,
/// debugfs, which judge the guest's file systems).
pub fn sbin(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The message of a caught panic.
pub fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(a panic without a message)".into())
}
