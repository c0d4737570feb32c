//! Running programs: our binary, any other program, and children that must not outlive a test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

/// The `vhost-user-vhdx` binary that cargo built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vhost-user-vhdx"))
}

/// Runs `PROGRAM ARGS` and returns its output, whatever the exit status; panics only if it
/// cannot be started.
pub fn run(program: impl AsRef<Path>, args: &[&str]) -> Output {
    let program = program.as_ref();
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
            "cannot run `{}` ({e}); install what the tests need with contrib/setup-test-deps.sh",
            program.display()
        )
        })
}

/// What a finished command did: the command line, its exit status, stdout and stderr.
pub fn describe(program: &str, args: &[&str], out: &Output) -> String {
    format!(
        "`{program} {}` exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `PROGRAM ARGS`; panics with its stdout and stderr unless it succeeds.
pub fn run_ok(program: impl AsRef<Path>, args: &[&str]) -> Output {
    let program = program.as_ref();
    let out = run(program, args);
    if !out.status.success() {
        panic!("{}", describe(&program.display().to_string(), args, &out));
    }
    out
}

/// Runs our binary (`vhost-user-vhdx ARGS`), whatever the outcome.
pub fn ours(args: &[&str]) -> Output {
    run(bin(), args)
}

/// [`describe`] for a run of our binary.
pub fn describe_ours(args: &[&str], out: &Output) -> String {
    describe("vhost-user-vhdx", args, out)
}

/// Runs our binary; panics with its stdout and stderr unless it succeeds, or if its stdout is
/// not UTF-8; returns stdout.
pub fn ours_ok(args: &[&str]) -> String {
    let out = ours(args);
    assert!(out.status.success(), "{}", describe_ours(args, &out));
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Kills (SIGKILL) and reaps the child when dropped, so that no process outlives the test, even
/// a failing one.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to `timeout` for the child to exit and returns its status; if it has not exited by
/// then, kills (SIGKILL) and reaps it and returns `None`.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child process") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Why [`wait_for_path`] gave up.
#[derive(Debug)]
pub enum PathNotCreated {
    /// The child exited first, with this status.
    Exited(ExitStatus),
    /// The timeout passed while the child ran on.
    TimedOut,
}

/// Waits up to `timeout` for the running child to create `path` (e.g. the socket it listens
/// on).
pub fn wait_for_path(
    child: &mut Child,
    path: &Path,
    timeout: Duration,
) -> Result<(), PathNotCreated> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if let Some(status) = child.try_wait().expect("wait for a child process") {
            return Err(PathNotCreated::Exited(status));
        }
        if Instant::now() > deadline {
            return Err(PathNotCreated::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
