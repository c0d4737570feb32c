//! `vhost-user-vhdx serve` as a child process seen from outside, as a VMM's supervisor sees it:
//! started on a socket path, watched through /proc (alive, CPU time per thread, open fds,
//! threads, RSS), stopped with SIGTERM or SIGKILL, restarted on the same socket.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::frontend::{pattern, Frontend, Memory, Setup, MIB};
use super::s;

/// What the sandbox's SIGSYS handler writes before it stops `serve` (src/sandbox/seccomp.rs).
pub const FORBIDDEN_CALL: &str = "seccomp: forbidden system call";

/// The binary that runs `serve`: this build's, or `$VHDX_SERVE_BIN` (to judge another build,
/// e.g. main's, with the same tests).
pub fn serve_bin() -> PathBuf {
    std::env::var_os("VHDX_SERVE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(super::bin)
}

/// Arguments every `serve` of these tests gets first: `$VHDX_SERVE_ARGS`, split at spaces (to
/// run a suite on another path, e.g. `VHDX_SERVE_ARGS="--aio threads"`).
pub fn env_args() -> Vec<String> {
    std::env::var("VHDX_SERVE_ARGS")
        .map(|a| a.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// A running `serve`; killed (SIGKILL) on drop, its log printed if the test is failing.
pub struct Serve {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    starts: usize,
}

impl Serve {
    /// Starts `serve --socket-path DIR/vhost.sock EXTRA IMAGE` and waits for the socket.
    pub fn start(dir: &Path, image: &Path, extra: &[&str]) -> Serve {
        let mut s = Serve {
            child: None,
            socket: dir.join("vhost.sock"),
            image: image.to_path_buf(),
            log: dir.join("serve.log"),
            args: extra.iter().map(|a| a.to_string()).collect(),
            starts: 0,
        };
        s.spawn();
        s
    }

    /// (Re)starts the process on the same socket and image; its log is appended to.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "serve is already running");
        let _ = std::fs::remove_file(&self.socket);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("creating the serve log");
        self.starts += 1;
        let child = Command::new(serve_bin())
            .arg("serve")
            .arg("--socket-path")
            .arg(&self.socket)
            .args(env_args())
            .args(&self.args)
            .arg(&self.image)
            .env(
                "RUST_LOG",
                std::env::var("SERVE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting vhost-user-vhdx serve");
        self.child = Some(child);
        let child = self.child.as_mut().unwrap();
        if let Err(e) = super::wait_for_path(child, &self.socket, Duration::from_secs(10)) {
            panic!(
                "serve did not create its socket: {e:?}\n{}",
                self.log_text()
            );
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("serve is not running").id() as i32
    }

    /// The last 60 lines of the log (a spinning queue can log a line per turn).
    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        format!(
            "--- serve log {} ({} lines, the last 60) ---\n{tail}",
            self.log.display(),
            lines.len()
        )
    }

    /// Panics if the process has exited.
    pub fn assert_alive(&mut self, when: &str) {
        let child = self.child.as_mut().expect("serve is not running");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("serve died {when} ({status})\n{}", self.log_text());
        }
    }

    /// Samples the CPU time of every thread over `window` and panics if one used more than
    /// `max_share` of a core (a spinning thread uses all of one).
    pub fn assert_no_spin(&mut self, window: Duration, max_share: f64) {
        self.assert_alive("before the CPU sample");
        let before = thread_cpu(self.pid());
        let t0 = Instant::now();
        std::thread::sleep(window);
        let after = thread_cpu(self.pid());
        let secs = t0.elapsed().as_secs_f64();
        let tick = 100.0; // USER_HZ on Linux
        let mut total = 0.0;
        for (tid, (name, ticks)) in &after {
            let was = before.get(tid).map(|b| b.1).unwrap_or(0);
            let share = (ticks - was) as f64 / tick / secs;
            total += share;
            assert!(
                share <= max_share,
                "thread {tid} ({name}) of serve used {:.0} % of a core over {secs:.1} s\n{}",
                share * 100.0,
                self.log_text()
            );
        }
        assert!(
            total <= 2.0 * max_share,
            "serve used {:.0} % of a core over {secs:.1} s\n{}",
            total * 100.0,
            self.log_text()
        );
    }

    /// SIGTERM; the process must exit with status 0 within `limit`.
    pub fn terminate_within(&mut self, limit: Duration) {
        let mut child = self.child.take().expect("serve is not running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        let t0 = Instant::now();
        let status = super::wait_or_kill(&mut child, limit);
        match status {
            None => panic!(
                "serve did not exit within {limit:?} of SIGTERM (killed)\n{}",
                self.log_text()
            ),
            Some(s) => assert!(
                s.success(),
                "serve exited with {s} after SIGTERM ({:?})\n{}",
                t0.elapsed(),
                self.log_text()
            ),
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("serve is not running");
        let _ = child.kill();
        child.wait().unwrap()
    }

    /// Open fds, threads and resident set (KiB) of the process.
    pub fn footprint(&self) -> Footprint {
        let pid = self.pid();
        let count = |d: &str| {
            std::fs::read_dir(format!("/proc/{pid}/{d}"))
                .map(|r| r.count())
                .unwrap_or(0)
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kib = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Footprint {
            fds: count("fd"),
            threads: count("task"),
            rss_kib,
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("{}", self.log_text());
                return;
            }
        }
        // A serve stopped by its sandbox fails the test that ran it, even a test that did not
        // notice (one that restarts the backend, or expects it to fail a request).
        if !std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            assert!(
                !log.contains(FORBIDDEN_CALL),
                "serve made a system call its sandbox forbids\n{}",
                self.log_text()
            );
        }
    }
}

/// What a process holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    pub fds: usize,
    pub threads: usize,
    pub rss_kib: u64,
}

/// utime + stime (clock ticks) of every thread of `pid`, with the thread's name.
pub fn thread_cpu(pid: i32) -> std::collections::HashMap<String, (String, u64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // The name is in parentheses and may hold spaces; fields count from after it.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // rest[0] is field 3 (state); utime is field 14, stime 15.
        let utime: u64 = rest.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let stime: u64 = rest.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        out.insert(tid, (name, utime + stime));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A case: a fresh image, a serve on it, and the checks that follow a misbehaving front-end

/// What a thread may use of a core while nothing is asked of the device.
pub const IDLE_SHARE: f64 = 0.25;
/// Where the mark is written before the misbehaviour, and how long it is.
pub const MARK_SECTOR: u64 = 2048;
pub const MARK_LEN: usize = 64 * 1024;

/// A fresh image and a `serve` on it.
pub struct Case {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub serve: Serve,
}

impl Case {
    /// A fresh 64 MiB dynamic VHDX and `serve EXTRA` on it.
    pub fn start(extra: &[&str]) -> Case {
        let dir = super::tempdir("hostile-vmm-");
        let image = dir.path().join("disk.vhdx");
        super::ours_ok(&["create", "-q", s(&image), "64M"]);
        let serve = Serve::start(dir.path(), &image, extra);
        Case { dir, image, serve }
    }

    /// A correct connection writes the mark and leaves.
    pub fn write_mark(&mut self) {
        let mem = Memory::new(0, 16 * MIB);
        let mut f = Frontend::connect(&self.serve.socket);
        f.start(&mem, &Setup::default());
        f.write(&mem, 0, MARK_SECTOR, &pattern(1, MARK_LEN));
        f.close();
    }

    /// [`Case::start`] with the mark written, guest memory of `mem_size` bytes and a connection
    /// for misbehaving: how most cases begin.
    pub fn marked(extra: &[&str], mem_size: u64) -> (Case, Memory, Frontend) {
        let mut c = Case::start(extra);
        c.write_mark();
        let mem = Memory::new(0, mem_size);
        let f = c.connect();
        (c, mem, f)
    }

    /// A connection for misbehaving.
    pub fn connect(&self) -> Frontend {
        Frontend::connect(&self.serve.socket)
    }

    /// After the misbehaving front-end `f` did its thing (still connected): no death, no
    /// spin, then it leaves and the common aftermath follows.
    pub fn after(mut self, f: Frontend) {
        self.serve
            .assert_alive("while the misbehaving front-end was connected");
        self.serve
            .assert_no_spin(Duration::from_millis(700), IDLE_SHARE);
        f.close();
        self.aftermath();
    }

    /// Alive, idle, serving a correct front-end that finds the mark, clean exit on SIGTERM,
    /// clean image.
    pub fn aftermath(mut self) {
        self.serve
            .assert_alive("after the misbehaving front-end left");
        self.serve
            .assert_no_spin(Duration::from_millis(700), IDLE_SHARE);
        let mem = Memory::new(0, 16 * MIB);
        let mut g = self.connect();
        g.start(&mem, &Setup::default());
        assert!(
            g.read(&mem, 0, MARK_SECTOR, MARK_LEN as u32) == pattern(1, MARK_LEN),
            "the mark written before the misbehaviour does not read back"
        );
        let fresh = pattern(2, 8192);
        g.write(&mem, 0, 8192, &fresh);
        assert!(
            g.read(&mem, 0, 8192, 8192) == fresh,
            "a new write does not read back"
        );
        g.close();
        self.serve.terminate_within(Duration::from_secs(2));
        super::assert_qemu_img_check_clean(&self.image, "after the hostile front-end");
    }
}
