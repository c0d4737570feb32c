//! End to end: a real Linux guest, booted in QEMU by `tests/guest/guest-run`, does I/O on a VHDX
//! served over vhost-user-blk; then, with the backend stopped, the host judges the image with
//! `qemu-img check`, `qemu-img convert` / our `convert`, `cmp`, `e2fsck`, `debugfs`, host `fio`
//! and pyvhdi.
//!
//! Needs: qemu-system-x86_64 (the version of the installed qemu-utils), busybox-static, cpio,
//! kmod, xz-utils, fio, e2fsprogs — `contrib/setup-test-deps.sh` installs them (so does
//! `contrib/test.sh`). The first run downloads Debian's kernel package (linux-image-amd64, about
//! 70 MB, `apt-get download`, never installed) and builds the guest image into
//! `${XDG_CACHE_HOME:-~/.cache}/vhost-user-vhdx-guest` (about 15 s, once).
//!
//! Time: the guests run under TCG (no KVM on the build machine), 2 vCPUs, one guest at a time
//! (the tests take a lock). On the 2-core build machine a boot takes 2-4 s, a test 3-12 s, the
//! whole file 20-35 s, with qemu-storage-daemon or our serve as the backend.
//!
//! Which backend serves the disk ([`start_backend`]):
//! * by default this build's `vhost-user-vhdx serve $VHDX_SERVE_ARGS --socket-path SOCK
//!   --num-queues N IMAGE`;
//! * `VHDX_GUEST_BACKEND=CMD` runs `CMD --socket-path SOCK --num-queues N IMAGE` instead (CMD is
//!   split at whitespace; `qsd` means `tests/guest/qsd-backend`, qemu-storage-daemon with QEMU's
//!   vhdx driver). The differencing test always runs our serve: QEMU cannot open differencing
//!   VHDX. Checks of what only our backend does (discarded blocks read back as zeros, fstrim
//!   gives the space back) are made only when our serve runs.
//! * `VHDX_GUEST_SKIP_SERVE=1` skips (passes with a note on stderr) every test that would run our
//!   serve: all of them without `VHDX_GUEST_BACKEND`, only the differencing one with it. It is
//!   for development before `serve` works; never set it in CI.
//!
//! The lifecycle tests at the end (issue 10) restart the backend with SIGKILL while the guest
//! runs fio (QEMU reconnects: guest-run `--reconnect-ms`) and pause and resume the VM over QMP
//! (guest-run `--qmp`); they always run our serve (`VHDX_SERVE_BIN` names another build of it).
//!
//! Deadlines (the backend's start and stop, QMP, guest-run's `--timeout`, the waits inside the
//! guest) are generous and all multiplied by `VHDX_GUEST_TIME_SCALE` (default 1) on a machine
//! slower or busier than that: see tests/common/guest.rs, which also holds the backend and
//! guest-run plumbing this file shares with tests/guest_maintenance.rs.
//!
//! `VHDX_GUEST_VERBOSE=1` streams each guest's kernel console to stderr (`guest-run -v`). Run
//! with `-- --nocapture` to see the timing lines.

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::guest::*;
use common::*;
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;
/// guest-run's own timeout; a test that passes takes well under a minute.
const GUEST_TIMEOUT_SECS: u32 = 180;

// ------------------------------------------------------------------------------------- backend

/// The backend command from `VHDX_GUEST_BACKEND`, or `None` for our own serve.
fn foreign_backend() -> Option<Vec<String>> {
    let v = std::env::var("VHDX_GUEST_BACKEND").ok()?;
    let mut words: Vec<String> = v.split_whitespace().map(String::from).collect();
    match words.first().map(String::as_str) {
        None => None,
        Some("qsd") => {
            words[0] = s(&guest_dir().join("qsd-backend")).to_owned();
            Some(words)
        }
        Some(_) => Some(words),
    }
}

/// Starts the backend serving `image` on `socket` with `queues` queues and returns once it
/// listens: `$VHDX_GUEST_BACKEND` if set, else `vhost-user-vhdx serve`. Its stdout and stderr go
/// to `<socket>.log`.
fn start_backend(image: &Path, socket: &Path, queues: u16) -> Backend {
    let command = foreign_backend().unwrap_or_else(our_backend);
    Backend::spawn(&command, image, socket, Some(queues))
}

// ------------------------------------------------------------------------------------- guest

/// A test's turn with the guest, held from its set-up to its last check: one guest at a time,
/// since two TCG guests on a 2-core machine would each take twice as long and risk their
/// timeouts.
struct Turn {
    _one: MutexGuard<'static, ()>,
    started: Instant,
}

impl Turn {
    fn take() -> Turn {
        static LOCK: Mutex<()> = Mutex::new(());
        Turn {
            _one: LOCK.lock().unwrap_or_else(|e| e.into_inner()),
            started: Instant::now(),
        }
    }

    /// The test passed: says how long it took.
    fn done(self, test: &str) {
        eprintln!(
            "guest: {test}: {:.1} s in all",
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// What every test starts with: its [`Turn`], a temporary directory and the usual paths in it
/// (`disk.vhdx`, the backend's `vhost.sock`, `disk.raw` for the image converted). A test
/// destructures it and keeps `dir` bound to the end (`dir: _dir`): dropping it removes the
/// directory.
struct GuestCase {
    turn: Turn,
    dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    raw: PathBuf,
}

impl GuestCase {
    /// In a new temporary directory whose name starts with `prefix`.
    fn new(prefix: &str) -> GuestCase {
        GuestCase::in_dir(tempdir(prefix))
    }

    fn in_dir(dir: tempfile::TempDir) -> GuestCase {
        let turn = Turn::take();
        let at = |name: &str| dir.path().join(name);
        GuestCase {
            turn,
            image: at("disk.vhdx"),
            socket: at("vhost.sock"),
            raw: at("disk.raw"),
            dir,
        }
    }
}

/// Runs `guest` (a [`guest_run`]) while `beside` (a pauser, a killer) runs on a thread of its
/// own, told by its flag once the guest has finished; returns the guest's stdout and what
/// `beside` returned. Either one's panic is caught, so that `beside` is always joined, and
/// reported with the other's outcome and `logs()`: a failing harness thread never hides what
/// the guest saw, nor the other way round.
fn run_beside<T: Send + 'static>(
    test: &str,
    beside: impl FnOnce(Arc<AtomicBool>) -> T + Send + 'static,
    guest: impl FnOnce() -> String,
    logs: impl FnOnce() -> String,
) -> (String, T) {
    let done = Arc::new(AtomicBool::new(false));
    let thread = {
        let done = done.clone();
        std::thread::spawn(move || beside(done))
    };
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(guest));
    done.store(true, Ordering::SeqCst);
    match (out, thread.join()) {
        (Ok(out), Ok(b)) => (out, b),
        (out, b) => {
            let mut msg = String::new();
            if let Err(e) = &b {
                msg += &format!(
                    "{test}: the harness thread beside the guest panicked: {}\n",
                    panic_message(e.as_ref())
                );
            }
            match &out {
                Err(e) => msg += &panic_message(e.as_ref()),
                Ok(stdout) => msg += &format!("--- the guest's stdout ---\n{stdout}"),
            }
            panic!("{msg}\n{}", logs());
        }
    }
}

/// Runs `guest-run --socket SOCK... --queues N --timeout T OPTS... SCRIPT ARGS...` (T:
/// `timeout_secs` scaled) and returns the script's stdout; panics with everything (guest stdout
/// and stderr, console tail, backend logs) unless the script exits 0.
fn guest_run(
    test: &str,
    timeout_secs: u32,
    backends: &[&Backend],
    queues: u16,
    opts: &[&str],
    script: &str,
    args: &[String],
) -> String {
    let out = run_guest(
        test,
        backends,
        Some(queues),
        timeout_secs,
        opts,
        script,
        args,
    );
    if !out.status.success() {
        panic!(
            "{test}: {}",
            out.failure(&format!("guest-run {script} {args:?}"), backends)
        );
    }
    out.stdout
}

/// The rest of the first stdout line that starts with `key ` (e.g. "TRIMMED 123" -> "123").
fn value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
}

/// Every queue of a `queues`-queue disk completed requests during the script ("QUEUE q IRQS n").
fn assert_all_queues_used(out: &str, queues: u16) {
    assert_line(out, &format!("QUEUES {queues}"));
    for q in 0..queues {
        let irqs: u64 = value(out, &format!("QUEUE {q} IRQS"))
            .unwrap_or_else(|| panic!("no 'QUEUE {q} IRQS' line in:\n{out}"))
            .parse()
            .expect("a count");
        assert!(irqs > 0, "queue {q} completed no request:\n{out}");
    }
}

// ------------------------------------------------------------------------------------- host side

fn random_bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut buf);
    buf
}

fn sha256(path: &Path) -> String {
    let out = run_ok(Path::new("sha256sum"), &[s(path)]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a sum")
        .to_owned()
}

/// `cmp` says the `len(pattern)` bytes of `raw` at `offset` are `pattern`'s.
fn assert_cmp(pattern: &Path, raw: &Path, offset: u64) {
    let len = fs::metadata(pattern).expect("pattern").len().to_string();
    run_ok(
        Path::new("cmp"),
        &["-n", &len, s(pattern), s(raw), "0", &offset.to_string()],
    );
}

/// Asserts that `data[range]` is all `byte`.
fn assert_filled(data: &[u8], start: u64, end: u64, byte: u8, what: &str) {
    if let Some(i) = data[start as usize..end as usize]
        .iter()
        .position(|&b| b != byte)
    {
        panic!(
            "{what}: byte at {} is {:#04x}, expected {byte:#04x} in [{start}, {end})",
            start + i as u64,
            data[start as usize + i]
        );
    }
}

// ------------------------------------------------------------------------------------- tests

/// (a) Two regions written in parallel from two vCPUs over 2 queues (one straddles a 32 MiB
/// block boundary), read back in the guest; on the host both are in the image and everything
/// else is still zero.
#[test]
fn pattern_two_queues() {
    let test = "pattern_two_queues";
    if foreign_backend().is_none() && skip_our_serve(test) {
        return;
    }
    pattern(test, tempdir("guest-pattern-"), None);
}

/// The same with our serve and `--cache none` (O_DIRECT), on a filesystem that takes it.
#[test]
fn pattern_two_queues_cache_none() {
    let test = "pattern_two_queues_cache_none";
    if skip_our_serve(test) {
        return;
    }
    let mut ours = our_backend();
    ours.extend(["--cache".to_owned(), "none".to_owned()]);
    pattern(test, direct_io_tempdir("guest-pattern-direct-"), Some(ours));
}

/// pattern.sh in a guest: two 8 MiB patterns written and read back through `/dev/vda`, then
/// judged on the host. `command`: the backend (default: [`start_backend`]'s).
fn pattern(test: &str, dir: tempfile::TempDir, command: Option<Vec<String>>) {
    let GuestCase {
        turn,
        dir,
        image,
        socket,
        raw,
    } = GuestCase::in_dir(dir);
    let pattern = dir.path().join("pattern.bin");
    let size = 256 * MIB;
    let offsets = [30 * MIB, 200 * MIB - 12 * 1024];
    fs::write(&pattern, random_bytes(1, 8 * MIB)).unwrap();
    ours_ok(&["create", "-q", s(&image), "256M"]);

    let backend = match &command {
        Some(c) => Backend::spawn(c, &image, &socket, Some(2)),
        None => start_backend(&image, &socket, 2),
    };
    if command.is_some() {
        let log = backend.log();
        assert!(
            log.contains("O_DIRECT"),
            "{test}: serve did not open O_DIRECT:\n{log}"
        );
    }
    let mut args = vec!["/dev/vda".to_owned(), "pattern.bin".to_owned()];
    args.extend(offsets.iter().map(u64::to_string));
    let out = guest_run(
        test,
        GUEST_TIMEOUT_SECS,
        &[&backend],
        2,
        &["--no-fio", "--file", s(&pattern)],
        "pattern.sh",
        &args,
    );
    backend.stop();
    assert_line(&out, "PATTERN OK");
    assert_all_queues_used(&out, 2);

    assert_qemu_img_check_clean(&image, test);
    qemu_img_convert_raw(&image, &raw);
    for off in offsets {
        assert_cmp(&pattern, &raw, off);
    }
    let data = fs::read(&raw).unwrap();
    assert_eq!(data.len() as u64, size);
    let mut at = 0;
    for off in offsets {
        assert_filled(&data, at, off, 0, "outside the pattern");
        at = off + 8 * MIB;
    }
    assert_filled(&data, at, size, 0, "outside the pattern");
    turn.done(test);
}

/// (b) ext2 (mounted by the ext4 driver) made in the guest, files copied on, verified after a
/// remount with cold caches, a bulk file deleted and fstrim run; on the host e2fsck finds the
/// file system clean and debugfs reads back every file. An image made by qemu-img, 1 MiB blocks.
#[test]
fn filesystem_copy_and_fstrim() {
    let test = "filesystem_copy_and_fstrim";
    let ours_serves = foreign_backend().is_none();
    if ours_serves && skip_our_serve(test) {
        return;
    }
    let GuestCase {
        turn,
        dir,
        image,
        socket,
        raw,
    } = GuestCase::new("guest-fs-");
    let files = dir.path().join("files");
    let bulk = dir.path().join("bulk.bin");
    let bulk_copies = 12u64; // 12 x 4 MiB
    fs::create_dir_all(files.join("sub")).unwrap();
    let contents: Vec<(&str, Vec<u8>)> = vec![
        ("one", random_bytes(10, 1)),
        ("sub/odd", random_bytes(11, 4095)),
        ("mid", random_bytes(12, MIB + 17)),
        ("sub/big", random_bytes(13, 3 * MIB)),
        ("empty", Vec::new()),
    ];
    for (name, data) in &contents {
        fs::write(files.join(name), data).unwrap();
    }
    let bulk_data = random_bytes(14, 4 * MIB);
    fs::write(&bulk, &bulk_data).unwrap();
    qemu_img_create_vhdx(&image, "256M", "block_size=1M");

    let backend = start_backend(&image, &socket, 1);
    let args = ["/dev/vda", "files", "bulk.bin", &bulk_copies.to_string()].map(String::from);
    let out = guest_run(
        test,
        GUEST_TIMEOUT_SECS,
        &[&backend],
        1,
        &["--no-fio", "--file", s(&files), "--file", s(&bulk)],
        "fs.sh",
        &args,
    );
    backend.stop();
    assert_line(&out, "FS OK");
    assert_line(&out, &format!("FILES {} VERIFIED", contents.len()));
    let trimmed: u64 = value(&out, "TRIMMED")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no TRIMMED line in:\n{out}"));
    assert!(
        trimmed >= bulk_copies * 4 * MIB,
        "fstrim trimmed only {trimmed} bytes after a {} MiB file was deleted",
        bulk_copies * 4
    );

    assert_qemu_img_check_clean(&image, test);
    qemu_img_convert_raw(&image, &raw);
    let fsck = Command::new(sbin("e2fsck"))
        .args(["-fn", s(&raw)])
        .output()
        .expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck -fn finds the guest's file system damaged:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let debugfs = |request: &str| {
        Command::new(sbin("debugfs"))
            .args(["-R", request, s(&raw)])
            .output()
            .expect("run debugfs")
    };
    for (name, data) in &contents {
        let got = debugfs(&format!("cat /files/{name}"));
        assert!(
            got.stdout == *data,
            "/files/{name} as debugfs reads it from the image: {} bytes, differs from the {} \
             the guest copied\n{}",
            got.stdout.len(),
            data.len(),
            String::from_utf8_lossy(&got.stderr)
        );
    }
    let stat = debugfs("stat /bulk");
    assert!(
        String::from_utf8_lossy(&stat.stderr).contains("File not found"),
        "/bulk should be deleted: {}",
        String::from_utf8_lossy(&stat.stderr)
    );

    // How much of the deleted bulk file is still in the image: its 4 KiB chunks, 4 KiB aligned.
    let chunks: HashSet<&[u8]> = bulk_data.chunks(4096).collect();
    let data = fs::read(&raw).unwrap();
    let left = data.chunks(4096).filter(|c| chunks.contains(c)).count() as u64;
    let total = bulk_copies * 4 * MIB / 4096;
    let allocated = fs::metadata(&image).unwrap().blocks() * 512;
    eprintln!(
        "guest: {test}: fstrim trimmed {} MiB; {left} of the deleted file's {total} blocks still \
         read back; the image holds {} MiB",
        trimmed / MIB,
        allocated / MIB
    );
    if ours_serves {
        assert!(
            left * 4 <= total,
            "after fstrim, {left} of the {total} 4 KiB blocks of the deleted file still read \
             back: the discards did not deallocate"
        );
    }
    turn.done(test);
}

/// (c) fio with crc32c verification, libaio, iodepth 16, one job per queue on 2 queues; then
/// the host's fio verifies the same job again (--verify_only) on the image converted to raw.
#[test]
fn fio_verify_two_queues() {
    let test = "fio_verify_two_queues";
    if foreign_backend().is_none() && skip_our_serve(test) {
        return;
    }
    let GuestCase {
        turn,
        dir,
        image,
        socket,
        raw,
    } = GuestCase::new("guest-fio-");
    let job = guest_dir().join("verify.fio");
    let region = 48 * MIB;
    ours_ok(&["create", "-q", s(&image), "128M"]);

    let backend = start_backend(&image, &socket, 2);
    let args = ["/dev/vda".to_owned(), region.to_string()];
    let out = guest_run(
        test,
        GUEST_TIMEOUT_SECS,
        &[&backend],
        2,
        &["--file", s(&job)],
        "fio-verify.sh",
        &args,
    );
    backend.stop();
    assert_line(&out, "FIO VERIFY OK");
    assert_line(&out, "JOBS 2");
    assert_all_queues_used(&out, 2);

    assert_qemu_img_check_clean(&image, test);
    qemu_img_convert_raw(&image, &raw);
    assert_host_fio_verifies(&job, dir.path(), &raw, region);
    turn.done(test);
}

/// (d) A differencing chain of depth 2 served by our backend (QEMU cannot open differencing
/// VHDX): the guest's writes land in the child, over the base's data; the base is untouched.
#[test]
fn differencing_chain_depth_2() {
    let test = "differencing_chain_depth_2";
    if skip_our_serve(test) {
        return;
    }
    let GuestCase {
        turn, dir, socket, ..
    } = GuestCase::new("guest-chain-");
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    let pattern = dir.path().join("pattern.bin");
    let raw = dir.path().join("chain.raw");
    let size = 64 * MIB;
    let plen = 4 * MIB;
    // 6 MiB: over the end of the base's data; 30 MiB: across the 32 MiB block boundary.
    let offsets = [6 * MIB, 30 * MIB];
    fs::write(&pattern, random_bytes(2, plen)).unwrap();
    ours_ok(&["create", "-q", s(&base), "64M"]);
    ours_ok(&["io", "-c", "write -P 0x33 0 8M", s(&base)]);
    ours_ok(&["create", "-q", "-b", s(&base), s(&child)]);
    let base_sum = sha256(&base);

    let backend = Backend::start_ours(&child, &socket, Some(2));
    let mut args = vec!["/dev/vda".to_owned(), "pattern.bin".to_owned()];
    args.extend(offsets.iter().map(u64::to_string));
    let out = guest_run(
        test,
        GUEST_TIMEOUT_SECS,
        &[&backend],
        2,
        &["--no-fio", "--file", s(&pattern)],
        "pattern.sh",
        &args,
    );
    backend.stop();
    assert_line(&out, "PATTERN OK");
    assert_all_queues_used(&out, 2);

    assert_eq!(
        sha256(&base),
        base_sum,
        "serving the child changed its parent"
    );
    assert_qemu_img_check_clean(&base, test);
    ours_ok(&["check", s(&child)]);
    ours_ok(&["convert", "-O", "raw", s(&child), s(&raw)]);
    for off in offsets {
        assert_cmp(&pattern, &raw, off);
    }
    let mut expected = vec![0u8; size as usize];
    expected[..8 * MIB as usize].fill(0x33);
    let pattern_data = fs::read(&pattern).unwrap();
    for off in offsets {
        expected[off as usize..(off + plen) as usize].copy_from_slice(&pattern_data);
    }
    let data = fs::read(&raw).unwrap();
    assert!(
        data == expected,
        "the chain does not read back as the base's 0x33 under the guest's writes"
    );
    // An independent reader of the chain agrees.
    let peer = dir.path().join("chain.pyvhdi.raw");
    pyvhdi_read_raw(&peer, &[&child, &base]);
    assert!(
        fs::read(&peer).unwrap() == expected,
        "pyvhdi reads the chain differently"
    );
    turn.done(test);
}

/// (e) Write zeroes and discard inside a 0xff-filled range (1 MiB blocks, the discard covers two
/// whole blocks): write-zeroes reads back as zeros with any backend, a discard with ours.
#[test]
fn discard_and_write_zeroes() {
    let test = "discard_and_write_zeroes";
    let ours_serves = foreign_backend().is_none();
    if ours_serves && skip_our_serve(test) {
        return;
    }
    let GuestCase {
        turn,
        dir: _dir,
        image,
        socket,
        raw,
    } = GuestCase::new("guest-discard-");
    let size = 64 * MIB;
    let (fill, fill_len) = (4 * MIB, 8 * MIB);
    let (zero, zero_len) = (5 * MIB, MIB);
    let (disc, disc_len) = (8 * MIB, 2 * MIB);
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&image), "64M"]);

    let backend = start_backend(&image, &socket, 1);
    let args = [fill, fill_len, zero, zero_len, disc, disc_len].map(|v| v.to_string());
    let mut all = vec!["/dev/vda".to_owned()];
    all.extend(args);
    let out = guest_run(
        test,
        GUEST_TIMEOUT_SECS,
        &[&backend],
        1,
        &["--no-fio"],
        "discard.sh",
        &all,
    );
    backend.stop();
    assert_line(&out, "QUEUES 1");
    assert_line(&out, "ZEROES OK");
    assert_line(&out, "DISCARD DONE");
    let discard_zeroes = out.lines().any(|l| l == "DISCARD READS ZEROS");
    if ours_serves {
        assert!(
            discard_zeroes,
            "our backend kept the data of a discarded range:\n{out}"
        );
    }

    assert_qemu_img_check_clean(&image, test);
    qemu_img_convert_raw(&image, &raw);
    let data = fs::read(&raw).unwrap();
    assert_eq!(data.len() as u64, size);
    assert_filled(&data, 0, fill, 0, "before the fill");
    assert_filled(&data, fill, zero, 0xff, "fill");
    assert_filled(&data, zero, zero + zero_len, 0, "write-zeroes range");
    assert_filled(&data, zero + zero_len, disc, 0xff, "fill");
    let discarded = if discard_zeroes { 0 } else { 0xff };
    assert_filled(&data, disc, disc + disc_len, discarded, "discarded range");
    assert_filled(&data, disc + disc_len, fill + fill_len, 0xff, "fill");
    assert_filled(&data, fill + fill_len, size, 0, "after the fill");
    turn.done(test);
}

// ------------------------------------------------------------------------------------- lifecycle

/// Locks `m`, also after a panic of another holder (whose message the test reports).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A backend that a test restarts while the guest runs: every start logs to its own file
/// (`<socket>.log.N`), so that [`RestartingBackend::logs`] shows all of them.
struct RestartingBackend {
    child: Option<Child>,
    image: PathBuf,
    socket: PathBuf,
    queues: u16,
    starts: usize,
}

impl RestartingBackend {
    fn start(image: &Path, socket: &Path, queues: u16) -> RestartingBackend {
        let mut b = RestartingBackend {
            child: None,
            image: image.to_owned(),
            socket: socket.to_owned(),
            queues,
            starts: 0,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        if self.starts > 0 {
            let _ = fs::rename(
                log_of(&self.socket),
                format!("{}.{}", log_of(&self.socket).display(), self.starts),
            );
        }
        self.starts += 1;
        // Its kills are timed by the bytes it moved: see `our_backend_counted`.
        self.child = Some(spawn_backend(
            &our_backend_counted(),
            &self.image,
            &self.socket,
            Some(self.queues),
        ));
    }

    /// `signal` (SIGKILL: a crash; SIGTERM: an upgrade), reap, start again on the same
    /// socket.
    fn kill_and_restart(&mut self, signal: &str) {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let sent = Command::new("kill").args([signal, &pid]).status();
        assert!(
            matches!(sent, Ok(st) if st.success()),
            "kill {signal} {pid}: {sent:?}"
        );
        let status = wait_or_kill(&mut child, scaled(Duration::from_secs(10)));
        if signal == "-TERM" {
            assert!(
                matches!(status, Some(st) if st.success()),
                "the backend exited with {status:?} after SIGTERM while the guest ran\n{}",
                read_log(&self.socket)
            );
        }
        self.spawn();
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for n in 1..self.starts {
            let p = format!("{}.{n}", log_of(&self.socket).display());
            all += &format!(
                "--- backend log, start {n} ---\n{}",
                fs::read_to_string(p).unwrap_or_default()
            );
        }
        all + &format!(
            "--- backend log, last start ---\n{}",
            read_log(&self.socket)
        )
    }

    /// SIGTERM; exit status 0 within 60 s; no start was stopped by the sandbox.
    fn stop(mut self) {
        let logs = self.logs();
        assert!(
            !logs.contains(common::FORBIDDEN_CALL),
            "a start of the backend made a system call its sandbox forbids\n{logs}"
        );
        let child = self.child.take().expect("running");
        let b = Backend {
            child: Some(child),
            socket: self.socket.clone(),
        };
        b.stop();
    }
}

impl Drop for RestartingBackend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// (Issue 10) The backend is killed with SIGKILL three times while the guest runs an fio verify
/// job on two queues, and started again on the same socket each time; QEMU reconnects
/// (`reconnect-ms`) and must find every request it had submitted completed exactly once (the
/// backend keeps them in the in-flight region QEMU holds): the job finishes with no verify
/// error and no I/O error in the guest's kernel log; the image checks clean and holds the data.
#[test]
fn backend_sigkilled_three_times_during_fio_verify() {
    restarts_during_fio_verify("backend_sigkilled_three_times_during_fio_verify", "-KILL");
}

/// The same with SIGTERM (an upgrade): each time the backend finishes what it took, closes the
/// image cleanly and exits 0, and the new one carries on.
#[test]
fn backend_sigtermed_and_restarted_three_times_during_fio_verify() {
    restarts_during_fio_verify(
        "backend_sigtermed_and_restarted_three_times_during_fio_verify",
        "-TERM",
    );
}

fn restarts_during_fio_verify(test: &str, signal: &'static str) {
    if skip_our_serve(test) {
        return;
    }
    let GuestCase {
        turn,
        dir,
        image,
        socket,
        raw,
    } = GuestCase::new("guest-restart-");
    let job = guest_dir().join("verify.fio");
    let region = 48 * MIB;
    ours_ok(&["create", "-q", s(&image), "128M"]);

    let backend = Arc::new(Mutex::new(RestartingBackend::start(&image, &socket, 2)));
    let seed = rand::random::<u64>();
    eprintln!("guest: {test}: kill times from seed {seed}");
    // Each kill comes once the running backend has moved a random 4-24 MiB through its
    // image (/proc/PID/io): in the middle of the guest's fio job, not during its boot.
    let killer = {
        let backend = backend.clone();
        move |done: Arc<AtomicBool>| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut kills = 0;
            let mut threshold = (4 + rng.next_u64() % 21) * MIB;
            while kills < 3 && !done.load(Ordering::SeqCst) {
                let moved = {
                    let b = lock(&backend);
                    b.child.as_ref().map_or(0, |c| bytes_moved(c.id()))
                };
                if moved >= threshold {
                    lock(&backend).kill_and_restart(signal);
                    kills += 1;
                    threshold = (4 + rng.next_u64() % 21) * MIB;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            kills
        }
    };
    // guest_run only needs the socket path and a log for its failure message.
    let view = Backend::view(&socket);
    let args = ["/dev/vda".to_owned(), region.to_string()];
    let job_script = guest_dir().join("fio-verify.sh");
    let logs = {
        let backend = backend.clone();
        move || lock(&backend).logs()
    };
    let (out, kills) = run_beside(
        test,
        killer,
        || {
            guest_run(
                test,
                120,
                &[&view],
                2,
                &[
                    "--file",
                    s(&job),
                    "--file",
                    s(&job_script),
                    "--reconnect-ms",
                    "200",
                ],
                "restart-verify.sh",
                &args,
            )
        },
        logs,
    );
    let backend = Arc::try_unwrap(backend)
        .ok()
        .expect("the killer thread has ended")
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    eprintln!("guest: {test}: {kills} kills during the guest's run");
    assert_eq!(kills, 3, "the guest finished before the third kill:\n{out}");
    backend.stop();
    assert_line(&out, "FIO VERIFY OK");
    assert_line(&out, "NO IO ERRORS");
    assert_all_queues_used(&out, 2);

    assert_qemu_img_check_clean(&image, test);
    qemu_img_convert_raw(&image, &raw);
    assert_host_fio_verifies(&job, dir.path(), &raw, region);
    turn.done(test);
}

/// Host fio `--verify_only` with the guest's 2-job `job` over `region` bytes of `raw` (the image
/// converted) must find every block the guest wrote. Runs in `dir`, where fio keeps its state.
fn assert_host_fio_verifies(job: &Path, dir: &Path, raw: &Path, region: u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let host = Command::new("fio")
        .args(["--verify_only", "--output-format=terse", s(job)])
        .current_dir(dir)
        .env("FIO_DEV", raw)
        .env("FIO_SIZE", region.to_string())
        .env("FIO_JOBS", "2")
        .env("FIO_CPUS", format!("0-{}", cpus - 1))
        .output()
        .expect("run fio on the host");
    let terse = String::from_utf8_lossy(&host.stdout);
    assert!(
        host.status.success() && terse.split(';').nth(4) == Some("0"),
        "the host's fio --verify_only finds the guest's data wrong in the image ({}):\n{terse}{}",
        host.status,
        String::from_utf8_lossy(&host.stderr)
    );
}

/// Bytes a process has read and written (`rchar + wchar` of /proc/PID/io).
fn bytes_moved(pid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .filter(|l| l.starts_with("rchar:") || l.starts_with("wchar:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// A QMP client: connects (retrying until QEMU has made the socket), negotiates, and runs
/// commands, skipping the events that come in between.
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> Option<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(_) => return None,
            }
        };
        stream
            .set_read_timeout(Some(scaled(Duration::from_secs(30))))
            .ok()?;
        let mut q = Qmp {
            reader: std::io::BufReader::new(stream.try_clone().ok()?),
            writer: stream,
        };
        let mut greeting = String::new();
        std::io::BufRead::read_line(&mut q.reader, &mut greeting).ok()?;
        q.run("qmp_capabilities")?;
        Some(q)
    }

    /// Runs `command`; `None` if QEMU has gone or answered with an error.
    fn run(&mut self, command: &str) -> Option<()> {
        use std::io::{BufRead, Write};
        writeln!(self.writer, "{{\"execute\": \"{command}\"}}").ok()?;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line.contains("\"return\"") {
                return Some(());
            }
            if line.contains("\"error\"") {
                eprintln!("QMP {command}: {line}");
                return None;
            }
        }
    }
}

/// (Issue 10) The VM is paused and resumed (QMP `stop` / `cont`) up to forty times while the
/// guest reads 4 MiB blocks with O_DIRECT and writes with a flush: stop must stop the device
/// (GET_VRING_BASE after the last completion) and cont restart it without a lost interrupt;
/// the guest's I/O keeps working and its data reads back.
#[test]
fn qmp_stop_and_cont_during_large_reads() {
    let test = "qmp_stop_and_cont_during_large_reads";
    if skip_our_serve(test) {
        return;
    }
    let GuestCase {
        turn,
        dir,
        image,
        socket,
        ..
    } = GuestCase::new("guest-stopcont-");
    let qmp_path = dir.path().join("qmp.sock");
    ours_ok(&["create", "-q", s(&image), "128M"]);
    let backend = Backend::start_ours(&image, &socket, Some(1));

    let seed = rand::random::<u64>();
    eprintln!("guest: {test}: stop/cont times from seed {seed}");
    let pauser = {
        let qmp_path = qmp_path.clone();
        move |done: Arc<AtomicBool>| {
            let Some(mut qmp) = Qmp::connect(&qmp_path, scaled(Duration::from_secs(60))) else {
                return 0;
            };
            let mut cycles = 0;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            std::thread::sleep(scaled(Duration::from_secs(4)));
            // Forty cycles at random moments, then the guest runs on: a guest that hangs
            // after them lost a completion or an interrupt.
            while cycles < 40 && !done.load(Ordering::SeqCst) {
                if qmp.run("stop").is_none() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50 + rng.next_u64() % 250));
                if qmp.run("cont").is_none() {
                    break;
                }
                cycles += 1;
                std::thread::sleep(Duration::from_millis(150 + rng.next_u64() % 550));
            }
            cycles
        }
    };
    let args = ["/dev/vda".to_owned(), "20".to_owned()];
    let (out, cycles) = run_beside(
        test,
        pauser,
        || {
            guest_run(
                test,
                120,
                &[&backend],
                1,
                &["--no-fio", "--qmp", s(&qmp_path)],
                "stop-cont.sh",
                &args,
            )
        },
        || backend.log(),
    );
    eprintln!("guest: {test}: {cycles} stop/cont cycles");
    assert!(cycles >= 3, "only {cycles} stop/cont cycles ran:\n{out}");
    backend.stop();
    assert_line(&out, "STOP CONT OK");
    assert_qemu_img_check_clean(&image, test);
    turn.done(test);
}

/// (Issue 10) The VM is reset (QMP `system_reset`) while the guest reads 4 MiB blocks with
/// O_DIRECT: the device is stopped and started again on the new rings the guest's driver sets
/// up, and no completion from before the reset may land in them ("id N is not a head"). On its
/// second boot the guest reads back what it wrote before the reset and writes and reads anew.
#[test]
fn qmp_system_reset_during_large_reads() {
    let test = "qmp_system_reset_during_large_reads";
    if skip_our_serve(test) {
        return;
    }
    let GuestCase {
        turn,
        dir,
        image,
        socket,
        ..
    } = GuestCase::new("guest-reset-");
    let qmp_path = dir.path().join("qmp.sock");
    ours_ok(&["create", "-q", s(&image), "128M"]);
    // The reset is timed by the bytes it moved: see `our_backend_counted`.
    let backend = Backend::start_ours_counted(&image, &socket, Some(1));
    let pid = backend.child.as_ref().unwrap().id();

    let resetter = {
        let qmp_path = qmp_path.clone();
        move |done: Arc<AtomicBool>| {
            let mut qmp = Qmp::connect(&qmp_path, scaled(Duration::from_secs(60)))?;
            // Reset once the first boot's read loop has moved 96 MiB through the backend.
            let start = bytes_moved(pid);
            while bytes_moved(pid) < start + 96 * MIB {
                if done.load(Ordering::SeqCst) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            qmp.run("system_reset")
        }
    };
    let args = ["/dev/vda".to_owned()];
    let (out, reset) = run_beside(
        test,
        resetter,
        || {
            guest_run(
                test,
                150,
                &[&backend],
                1,
                &["--no-fio", "--reboot", "--qmp", s(&qmp_path)],
                "reset.sh",
                &args,
            )
        },
        || backend.log(),
    );
    assert!(reset.is_some(), "the VM was not reset:\n{out}");
    backend.stop();
    assert_line(&out, "RESET OK");
    assert_qemu_img_check_clean(&image, test);
    turn.done(test);
}
