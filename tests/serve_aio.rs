//! The asynchronous data path (issue 9, `--aio`), which `serve` runs by default, at its edges:
//! - a restart right after a SIGKILL takes the image's lock, though the dead process's io_uring
//!   holds the file for a moment; a lock a live process holds still fails, after the wait;
//! - FLUSH ordering: writes that completed before a flush survive a SIGKILL right after it,
//!   with io_uring and the thread pool, `--cache none` and writeback;
//! - an I/O error mid-flight (injected: `--debug-inject-eio`, see src/io/fault.rs for why not
//!   device-mapper) gets VIRTIO_BLK_S_IOERR, loses nothing else, and serving goes on;
//! - io_uring forbidden by a seccomp filter (as Docker's default profile does): `--aio auto`
//!   falls back to the thread pool and says so, `--aio io_uring` is a one-line error.
//!
//! (`--cache none` on a filesystem without O_DIRECT: tests/cli.rs.)

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::frontend::*;
use common::*;

const BLOCK: u64 = MIB;
const SECTOR: u64 = 512;

/// Writes one byte pattern into each of `blocks` (their first touch: allocation, made durable
/// before completion), so that later writes and reads there go asynchronously.
fn allocate(f: &mut Frontend, mem: &Memory, blocks: std::ops::Range<u64>) {
    for b in blocks {
        f.write(mem, 0, b * BLOCK / SECTOR, &pattern(b, 4096));
    }
}

/// `n` writes of `len` bytes made available at once on queue 0 (one kick), at `offset(i)`.
fn writes(
    f: &mut Frontend,
    mem: &Memory,
    n: u64,
    len: usize,
    seed: u64,
    offset: impl Fn(u64) -> u64,
) -> Vec<(Pending, u64, Vec<u8>)> {
    let reqs = (0..n)
        .map(|i| {
            let data = pattern(seed + i, len);
            let buf = mem.alloc(len as u64, 4096);
            let req = Blk::Write {
                sector: offset(i) / SECTOR,
                data: data.clone(),
            };
            (f.add(mem, 0, &req, buf), offset(i), data)
        })
        .collect();
    f.kick(0);
    reqs
}

/// The image as raw bytes, through our log replay (`check -r all` first, which must leave it
/// clean for qemu-img too).
fn repaired_raw(image: &Path, dir: &Path) -> std::path::PathBuf {
    ours_ok(&["check", "-r", "all", s(image)]);
    assert_qemu_img_check_clean(image, "after check -r all");
    let raw = dir.join("after.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img_convert_raw(image, &raw);
    raw
}

// ---------------------------------------------------------------------------------------------
// The image lock across a SIGKILL

/// The supervisor's loop: serve with io_uring, deep writes in flight, SIGKILL, restart at
/// once. Without the wait for the lock at open, a restart failed now and then ("failed to get
/// "write" lock"): the killed process's ring (its in-flight writes, on io-wq workers) still
/// held the image's open file description. Every restart must now serve, and the image is
/// whole at the end.
#[test]
fn a_restart_right_after_a_sigkill_takes_the_lock() {
    const ROUNDS: u64 = 25;
    let dir = tempdir("aio-restart-");
    let d = dir.path();
    let image = d.join("disk.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&image), "64M"]);
    let mut serve = Serve::start(d, &image, &["--aio", "io_uring"]);
    let mut waited = 0;
    for round in 0..ROUNDS {
        let mem = Memory::new(0, 48 * MIB);
        let mut f = Frontend::connect(&serve.socket);
        f.start(&mem, &Setup::default());
        if round == 0 {
            allocate(&mut f, &mem, 0..32);
            assert_eq!(f.request(&mem, 0, &Blk::Flush), blk::S_OK);
        }
        // 80 writes of 256 KiB into allocated blocks: buffered writes that io_uring hands to
        // its workers, still running when the process dies.
        let _ = writes(&mut f, &mem, 80, 256 * KIB as usize, round * 1000, |i| {
            (i % 32) * BLOCK + (1 + i / 32) * 256 * KIB
        });
        std::thread::sleep(Duration::from_millis(2));
        serve.kill9();
        drop(f);
        serve.spawn();
        let log = std::fs::read_to_string(&serve.log).unwrap();
        waited = log.matches("waiting up to").count();
    }
    eprintln!("{ROUNDS} restarts after SIGKILL; {waited} found the lock still held and waited");
    let mem = Memory::new(0, 16 * MIB);
    let mut f = Frontend::connect(&serve.socket);
    f.start(&mem, &Setup::default());
    assert_eq!(
        f.read(&mem, 0, 0, 4096),
        pattern(0, 4096),
        "block 0's first write"
    );
    f.close();
    serve.terminate_within(Duration::from_secs(5));
    assert_qemu_img_check_clean(&image, "after the restarts");
}

/// A lock held by a live process is not a dying one's: serve waits its bound, then fails with
/// the lock's own message (and exit status 1), having said once that it waits.
#[test]
fn a_lock_held_by_a_live_process_still_fails_after_the_wait() {
    let dir = tempdir("aio-lock-live-");
    let d = dir.path();
    let image = d.join("disk.vhdx");
    ours_ok(&["create", "-q", s(&image), "64M"]);
    let holder_dir = d.join("holder");
    std::fs::create_dir(&holder_dir).unwrap();
    let mut holder = Serve::start(&holder_dir, &image, &[]);
    let t0 = Instant::now();
    let out = Command::new(bin())
        .args([
            "serve",
            "--socket-path",
            s(&d.join("second.sock")),
            s(&image),
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(lines.len(), 2, "the waiting line and the error: {err}");
    assert!(lines[0].contains("waiting up to 5 s"), "{err}");
    let last = lines[1];
    assert!(
        last.starts_with("vhost-user-vhdx: ") && last.contains("\"write\" lock"),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(15),
        "gave up after {took:?}, not after its 5 s bound"
    );
    assert!(
        !d.join("second.sock").exists(),
        "the refused serve listened"
    );
    holder.assert_alive("while another serve was refused");
    holder.terminate_within(Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// FLUSH ordering

/// Writes in flight complete; then more writes and a FLUSH made available together; the
/// moment the flush completes, SIGKILL. Every write that completed before that is on the file
/// (after `check -r all`), the rest of the disk as it was.
fn flush_then_sigkill(aio: &str, cache: &str) {
    let dir = if cache == "none" {
        direct_io_tempdir("aio-flush-")
    } else {
        tempdir("aio-flush-")
    };
    let d = dir.path();
    let image = d.join("disk.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&image), "64M"]);
    let mut serve = Serve::start(d, &image, &["--aio", aio, "--cache", cache]);
    let log = serve.log_text();
    let says = if aio == "threads" {
        "a thread pool"
    } else {
        "data I/O: io_uring"
    };
    assert!(log.contains(says), "not on {aio}:\n{log}");
    let mem = Memory::new(0, 48 * MIB);
    let mut f = Frontend::connect(&serve.socket);
    f.start(&mem, &Setup::default());
    allocate(&mut f, &mem, 0..16);
    assert_eq!(f.request(&mem, 0, &Blk::Flush), blk::S_OK);

    let first = writes(&mut f, &mem, 64, 64 * KIB as usize, 100, |i| {
        (i % 16) * BLOCK + 64 * KIB + (i / 16) * 64 * KIB
    });
    for _ in 0..first.len() {
        f.wait(&mem, 0);
    }
    let second = writes(&mut f, &mem, 64, 64 * KIB as usize, 300, |i| {
        (i % 16) * BLOCK + 512 * KIB + (i / 16) * 64 * KIB
    });
    let flush = f.submit(&mem, 0, &Blk::Flush, 0);
    // Completions in any order; stop at the flush's.
    let mut completed = std::collections::HashSet::new();
    loop {
        let (head, _) = f.wait(&mem, 0);
        if head == flush.head {
            break;
        }
        completed.insert(head);
    }
    serve.kill9();
    assert_eq!(mem.get(flush.status, 1)[0], blk::S_OK, "flush status");

    let raw = repaired_raw(&image, d);
    let mut checked = 0;
    for (set, beside, what) in [
        (&first, false, "before the flush"),
        (&second, true, "beside the flush"),
    ] {
        for (i, (p, offset, data)) in set.iter().enumerate() {
            if beside && !completed.contains(&p.head) {
                continue;
            }
            assert_eq!(mem.get(p.status, 1)[0], blk::S_OK, "write {i} {what}");
            assert!(
                &read_at(&raw, *offset, data.len()) == data,
                "{aio}, --cache {cache}: write {i} {what} at {offset:#x} completed before the \
                 flush, yet is lost after a SIGKILL"
            );
            checked += 1;
        }
    }
    // A flush covers what completed before it was made available: the first batch at least.
    assert!(checked >= first.len(), "{checked} writes checked");
    for b in 0..16 {
        assert!(
            read_at(&raw, b * BLOCK, 4096) == pattern(b, 4096),
            "block {b}'s first write"
        );
    }
}

#[test]
fn flush_then_sigkill_io_uring_writeback() {
    flush_then_sigkill("io_uring", "writeback");
}

#[test]
fn flush_then_sigkill_io_uring_cache_none() {
    flush_then_sigkill("io_uring", "none");
}

#[test]
fn flush_then_sigkill_threads_writeback() {
    flush_then_sigkill("threads", "writeback");
}

#[test]
fn flush_then_sigkill_threads_cache_none() {
    flush_then_sigkill("threads", "none");
}

// ---------------------------------------------------------------------------------------------
// An I/O error mid-flight

/// The third asynchronous read fails: that request gets IOERR, the others around it (in
/// flight at the same time) read the right bytes, and later requests of every kind succeed.
fn a_failed_read(aio: &str) {
    let dir = tempdir("aio-eio-read-");
    let d = dir.path();
    let image = d.join("disk.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&image), "64M"]);
    let mut serve = Serve::start(d, &image, &["--aio", aio, "--debug-inject-eio", "read:3"]);
    let mem = Memory::new(0, 16 * MIB);
    let mut f = Frontend::connect(&serve.socket);
    f.start(&mem, &Setup::default());
    allocate(&mut f, &mem, 0..8);
    // Eight reads at once, one per allocated block.
    let reads = f.reads(&mem, 0, (0..8).map(|b| b * BLOCK / SECTOR), 4096);
    for _ in 0..reads.len() {
        f.wait(&mem, 0);
    }
    let failed: Vec<usize> = (0..8)
        .filter(|&b| mem.get(reads[b].status, 1)[0] != blk::S_OK)
        .collect();
    assert_eq!(failed.len(), 1, "one read fails: {failed:?}");
    assert_eq!(mem.get(reads[failed[0]].status, 1)[0], blk::S_IOERR);
    for (b, r) in reads.iter().enumerate() {
        if b != failed[0] {
            assert!(mem.get(r.data, 4096) == pattern(b as u64, 4096), "read {b}");
        }
    }
    // Serving goes on: the failed block reads, writes go through.
    let b = failed[0] as u64;
    assert_eq!(f.read(&mem, 0, b * BLOCK / SECTOR, 4096), pattern(b, 4096));
    f.write(&mem, 0, (b * BLOCK + 8192) / SECTOR, &pattern(77, 4096));
    assert_eq!(f.request(&mem, 0, &Blk::Flush), blk::S_OK);
    f.close();
    serve.assert_alive("after the failed read");
    serve.terminate_within(Duration::from_secs(5));
    let log = std::fs::read_to_string(&serve.log).unwrap();
    assert!(log.contains("read: Input/output error"), "{log}");
    assert_qemu_img_check_clean(&image, "after a failed read");
    let raw = d.join("after.raw");
    qemu_img_convert_raw(&image, &raw);
    assert!(read_at(&raw, b * BLOCK + 8192, 4096) == pattern(77, 4096));
}

#[test]
fn a_failed_read_io_uring() {
    a_failed_read("io_uring");
}

#[test]
fn a_failed_read_threads() {
    a_failed_read("threads");
}

/// The second asynchronous write fails: it gets IOERR, and, as after any failed write (what
/// the disk holds is no longer known, see tests/poison.rs), the image takes no more writes
/// (IOERR) while reads go on; the process stays up. What completed before is on the file,
/// which checks clean after `check -r all`.
fn a_failed_write(aio: &str) {
    let dir = tempdir("aio-eio-write-");
    let d = dir.path();
    let image = d.join("disk.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&image), "64M"]);
    let mut serve = Serve::start(d, &image, &["--aio", aio, "--debug-inject-eio", "write:2"]);
    let mem = Memory::new(0, 16 * MIB);
    let mut f = Frontend::connect(&serve.socket);
    f.start(&mem, &Setup::default());
    allocate(&mut f, &mem, 0..4);
    assert_eq!(f.request(&mem, 0, &Blk::Flush), blk::S_OK);
    let one = pattern(11, 8192);
    f.write(&mem, 0, (BLOCK + 8192) / SECTOR, &one);
    let st = f.request(
        &mem,
        0,
        &Blk::Write {
            sector: (2 * BLOCK + 8192) / SECTOR,
            data: pattern(12, 8192),
        },
    );
    assert_eq!(st, blk::S_IOERR, "the failing write");
    // Reads go on, and see what completed.
    for b in 0..4 {
        assert_eq!(f.read(&mem, 0, b * BLOCK / SECTOR, 4096), pattern(b, 4096));
    }
    assert_eq!(f.read(&mem, 0, (BLOCK + 8192) / SECTOR, 8192), one);
    let st = f.request(
        &mem,
        0,
        &Blk::Write {
            sector: (3 * BLOCK + 8192) / SECTOR,
            data: pattern(13, 8192),
        },
    );
    assert_eq!(st, blk::S_IOERR, "a write after the failure");
    f.close();
    serve.assert_alive("after the failed write");
    serve.kill9();
    let log = std::fs::read_to_string(&serve.log).unwrap();
    assert!(log.contains("write: Input/output error"), "{log}");
    let raw = repaired_raw(&image, d);
    for b in 0..4 {
        assert!(
            read_at(&raw, b * BLOCK, 4096) == pattern(b, 4096),
            "block {b}"
        );
    }
    assert!(
        read_at(&raw, BLOCK + 8192, 8192) == one,
        "the write before the failure"
    );
}

#[test]
fn a_failed_write_io_uring() {
    a_failed_write("io_uring");
}

#[test]
fn a_failed_write_threads() {
    a_failed_write("threads");
}

// ---------------------------------------------------------------------------------------------
// io_uring forbidden

/// `serve ARGS` on `image` in a child whose seccomp filter makes io_uring_setup fail with
/// EPERM, as Docker's default profile does; everything else is allowed (serve adds its own
/// sandbox on top).
fn serve_without_io_uring(dir: &Path, image: &Path, args: &[&str]) -> Command {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
    let filter = SeccompFilter::new(
        [(nix::libc::SYS_io_uring_setup, vec![])]
            .into_iter()
            .collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(nix::libc::EPERM as u32),
        std::env::consts::ARCH.try_into().unwrap(),
    )
    .unwrap();
    let program: BpfProgram = filter.try_into().unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--socket-path")
        .arg(dir.join("vhost.sock"))
        .args(args)
        .arg(image)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    // SAFETY: between fork and exec the closure only makes system calls (prctl, seccomp) on
    // memory prepared before the fork; nothing allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_no_new_privs().map_err(std::io::Error::from)?;
            seccompiler::apply_filter(&program).map_err(std::io::Error::other)
        });
    }
    cmd
}

#[test]
fn without_io_uring_auto_uses_the_thread_pool_and_a_forced_io_uring_fails() {
    let dir = tempdir("aio-no-uring-");
    let d = dir.path();
    let image = d.join("disk.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&image), "64M"]);

    // Forced: one line, exit 1, nothing served.
    let out = serve_without_io_uring(d, &image, &["--aio", "io_uring"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("--aio io_uring") && err.contains("seccomp") && err.contains("--aio threads"),
        "{err}"
    );
    assert!(!d.join("vhost.sock").exists());

    // Auto (the default): the thread pool, named in the log, and requests in flight work.
    let log_path = d.join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = serve_without_io_uring(d, &image, &[])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let served = wait_for_path(&mut child, &d.join("vhost.sock"), Duration::from_secs(10));
    let text = || std::fs::read_to_string(&log_path).unwrap();
    assert!(served.is_ok(), "serve did not start:\n{}", text());
    let mem = Memory::new(0, 16 * MIB);
    let mut f = Frontend::connect(&d.join("vhost.sock"));
    f.start(&mem, &Setup::default());
    allocate(&mut f, &mem, 0..4);
    let w = writes(&mut f, &mem, 16, 16 * KIB as usize, 40, |i| {
        (i % 4) * BLOCK + 64 * KIB + (i / 4) * 16 * KIB
    });
    for _ in 0..w.len() {
        f.wait(&mem, 0);
    }
    for (p, offset, data) in &w {
        assert_eq!(mem.get(p.status, 1)[0], blk::S_OK);
        assert_eq!(&f.read(&mem, 0, offset / SECTOR, data.len() as u32), data);
    }
    f.close();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_or_kill(&mut child, Duration::from_secs(5));
    let log = text();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(
        log.contains("data I/O: a thread pool (--aio auto), because io_uring cannot be used")
            && log.contains("seccomp"),
        "{log}"
    );
    assert!(log.contains("ran in flight"), "{log}");
    assert!(!log.contains("io_uring of"), "{log}");
    assert_qemu_img_check_clean(&image, "after serving on the thread pool");
}
