//! End to end for the image tools (issue 13): after `rebase`, `commit`, `resize` and `compact`
//! a real Linux guest, served the result by our `serve`, mounts its file system and reads every
//! file back with the right contents; the host judges each result with `qemu-img check`, our
//! `check`, `qemu-img compare` and `e2fsck -fn`.
//!
//! One test, four guest boots (each costs seconds with KVM, tens of seconds under TCG):
//! 1. a base gets an ext2 file system and files;
//! 2. a differencing child is made over it, the base moved and the child `rebase`d onto the new
//!    path; the guest, served the child, reads the base's files and writes more files (and a
//!    bulk file) into the child;
//! 3. `commit` merges the child into the base, `resize` grows the base by 64 MiB; the guest,
//!    served the base alone, sees the bigger disk, reads every file, overwrites the bulk file
//!    with zeros and deletes it (no fstrim: the zero blocks stay allocated);
//! 4. `compact` shrinks the file; the guest reads the remaining files.
//!
//! The guest has no e2fsprogs (busybox only), so the file system is checked on the host, on the
//! image converted to raw. Needs what tests/guest.rs needs (see its module doc and
//! `contrib/setup-test-deps.sh`); `VHDX_GUEST_SKIP_SERVE=1` skips it as it skips those.

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;
/// guest-run's own timeout; a boot and a script take well under a minute.
const GUEST_TIMEOUT_SECS: u32 = 240;

// ------------------------------------------------------------------------------------- backend

/// Our `serve` on a socket; killed if the test fails before [`Backend::stop`].
struct Backend {
    child: Option<Child>,
    log: PathBuf,
}

impl Backend {
    /// Starts `vhost-user-vhdx serve --socket-path SOCK IMAGE` and returns once it listens.
    fn start(image: &Path, socket: &Path) -> Backend {
        let log = socket.with_extension("log");
        let out = File::create(&log).expect("create the backend log");
        let mut cmd = Command::new(serve_bin());
        cmd.arg("serve")
            .arg("--socket-path")
            .arg(socket)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup the log file"))
            .stderr(out);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().expect("start vhost-user-vhdx serve");
        let mut backend = Backend {
            child: Some(child),
            log,
        };
        // Connecting to find out would use up the backend's one connection: look for the
        // socket in /proc/net/unix in the listening state (__SO_ACCEPTCON).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_listening(socket) {
            let child = backend.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("wait for serve") {
                panic!(
                    "serve exited with {status} before listening\n--- its log ---\n{}",
                    backend.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "serve did not listen on {} within 30 s\n--- its log ---\n{}",
                socket.display(),
                backend.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        backend
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// SIGTERM; serve must close the image and exit 0 within 60 s.
    fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        run_ok(Path::new("kill"), &["-TERM", &pid]);
        let status = wait_or_kill(&mut child, Duration::from_secs(60)).unwrap_or_else(|| {
            panic!(
                "serve did not exit within 60 s of SIGTERM\n--- its log ---\n{}",
                self.log_text()
            )
        });
        assert!(
            status.success(),
            "serve exited with {status} after SIGTERM\n--- its log ---\n{}",
            self.log_text()
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

fn is_listening(socket: &Path) -> bool {
    let table = fs::read_to_string("/proc/net/unix").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && Path::new(fields[7]) == socket
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

// ------------------------------------------------------------------------------------- guest

/// Serves `image` with our backend and runs `guest-run ... maint.sh /dev/vda STEPS...` with
/// `files` copied into the guest; returns the script's stdout once serve has exited cleanly.
/// Panics with the guest's output and serve's log unless both succeed and the script printed
/// "MAINT OK".
fn boot(test: &str, dir: &Path, image: &Path, files: &[&Path], steps: &[&str]) -> String {
    let socket = dir.join("vhost.sock");
    let _ = fs::remove_file(&socket);
    let backend = Backend::start(image, &socket);
    let guest_dir = repo_root().join("tests/guest");
    let mut cmd = Command::new(guest_dir.join("guest-run"));
    cmd.arg("--socket").arg(&socket).args([
        "--timeout",
        &GUEST_TIMEOUT_SECS.to_string(),
        "--no-fio",
    ]);
    for f in files {
        cmd.arg("--file").arg(f);
    }
    if matches!(std::env::var("VHDX_GUEST_VERBOSE").as_deref(), Ok(v) if !v.is_empty() && v != "0")
    {
        cmd.arg("-v");
    }
    cmd.arg(guest_dir.join("maint.sh"))
        .arg("/dev/vda")
        .args(steps);
    let started = Instant::now();
    let out: Output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run tests/guest/guest-run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stderr
        .lines()
        .rfind(|l| l.starts_with("guest-run: accel="))
        .unwrap_or("");
    eprintln!(
        "guest: {test}: maint.sh {steps:?} {:.1} s ({summary})",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "MAINT OK"),
        "{test}: guest-run maint.sh {steps:?} exited with {} (124: timeout, 125: boot or harness \
         failure)\n--- guest stdout ---\n{stdout}--- guest-run stderr ---\n{stderr}--- serve log \
         ---\n{}",
        out.status,
        backend.log_text()
    );
    backend.stop();
    stdout
}

/// The number after `key ` on the first stdout line that starts so (e.g. "TRIMMED 123").
fn number(out: &str, key: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no '{key} N' line in the guest's stdout:\n{out}"))
}

fn assert_line(out: &str, line: &str) {
    assert!(
        out.lines().any(|l| l == line),
        "the guest did not print {line:?}; its stdout:\n{out}"
    );
}

// ------------------------------------------------------------------------------------- host side

/// Writes `files` (name, length) under `root/top` with random contents from `seed`, and returns
/// their "sha256  ./top/name" lines, as `sha256sum -c` run at the file system's root reads them.
fn make_files(root: &Path, top: &str, seed: u64, files: &[(&str, u64)]) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sums = Vec::new();
    for (name, len) in files {
        let path = root.join(top).join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut data = vec![0u8; *len as usize];
        rng.fill_bytes(&mut data);
        fs::write(&path, &data).unwrap();
        let sum = run_ok(Path::new("sha256sum"), &[s(&path)]);
        let hex = String::from_utf8_lossy(&sum.stdout)
            .split_whitespace()
            .next()
            .expect("a sum")
            .to_owned();
        sums.push(format!("{hex}  ./{top}/{name}"));
    }
    sums
}

fn write_sums(path: &Path, sums: &[&[String]]) {
    let text: String = sums.concat().iter().map(|l| format!("{l}\n")).collect();
    fs::write(path, text).unwrap();
}

/// A host tool that may live in /usr/sbin or /sbin, outside a normal user's PATH.
fn sbin(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The host's judgement of a plain (non-differencing) image after an operation: qemu-img check
/// and our check are clean, and e2fsck -fn finds the guest's file system clean on the image
/// converted to raw (returned).
fn judge(image: &Path, raw: &Path, what: &str) {
    assert_qemu_img_check_clean(image, what);
    ours_ok(&["check", s(image)]);
    let _ = fs::remove_file(raw);
    qemu_img_convert_raw(image, raw);
    let fsck = Command::new(sbin("e2fsck"))
        .args(["-fn", s(raw)])
        .output()
        .expect("run e2fsck");
    assert!(
        fsck.status.success(),
        "{what}: e2fsck -fn finds the file system damaged:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}

/// `qemu-img compare` finds `a` (format `fa`) and `b` (format `fb`) identical.
fn assert_same(a: &Path, fa: &str, b: &Path, fb: &str, what: &str) {
    let out = qemu_img(&["compare", "-f", fa, "-F", fb, s(a), s(b)]);
    assert!(
        out.status.success(),
        "{what}: {}",
        describe("qemu-img", &["compare", s(a), s(b)], &out)
    );
}

// ------------------------------------------------------------------------------------- the test

#[test]
fn rebase_commit_resize_compact_then_the_guest_mounts() {
    let test = "guest_maintenance";
    if matches!(std::env::var("VHDX_GUEST_SKIP_SERVE").as_deref(), Ok(v) if !v.is_empty() && v != "0")
    {
        eprintln!("guest: {test}: SKIPPED (it runs `vhost-user-vhdx serve`; VHDX_GUEST_SKIP_SERVE is set)");
        return;
    }
    let t = Instant::now();
    let tmp = tempdir("guest-maint-");
    let dir = tmp.path();
    let host = dir.join("host");
    let raw = dir.join("disk.raw");
    let base_sums = make_files(
        &host,
        "base",
        1,
        &[
            ("one", 1),
            ("odd", 4095),
            ("sub/mid", MIB + 17),
            ("sub/big", 3 * MIB),
        ],
    );
    let child_sums = make_files(
        &host,
        "child",
        2,
        &[("small", 511), ("sub/two", 2 * MIB + 3)],
    );
    let bulk_len = 24 * MIB;
    let bulk_sums = make_files(&host, "bulk", 3, &[("data", bulk_len)]);
    let sums_base = host.join("sums-base");
    let sums_all = host.join("sums-all");
    let sums_kept = host.join("sums-kept");
    write_sums(&sums_base, &[&base_sums]);
    write_sums(&sums_all, &[&base_sums, &child_sums, &bulk_sums]);
    write_sums(&sums_kept, &[&base_sums, &child_sums]);
    let at = |name: &str| host.join(name);

    // 1. The base: 128 MiB, 1 MiB blocks (so that compact has whole blocks to give back).
    let old_dir = dir.join("old");
    fs::create_dir(&old_dir).unwrap();
    let old_base = old_dir.join("base.vhdx");
    qemu_img_create_vhdx(&old_base, "128M", "block_size=1M");
    let out = boot(
        test,
        dir,
        &old_base,
        &[&at("base"), &sums_base],
        &["mkfs", "copy", "base", "verify", "sums-base"],
    );
    assert_line(&out, &format!("VERIFIED {}", base_sums.len()));
    judge(&old_base, &raw, "the base");

    // 2. A child over it; the base moves and the child is rebased onto its new path. The guest
    // reads the base's files through the child and writes its own, the bulk file first: its
    // blocks, zeroed later, are allocated before the child's files, so compact most likely
    // has to move blocks down, not just cut the tail.
    let child = dir.join("child.vhdx");
    ours_ok(&["create", "-q", "-b", s(&old_base), s(&child)]);
    let base = dir.join("base.vhdx");
    fs::rename(&old_base, &base).unwrap();
    ours_ok(&["rebase", "-u", "-b", s(&base), s(&child)]);
    ours_ok(&["check", s(&child)]);
    let base_before = fs::read(&base).unwrap();
    let out = boot(
        test,
        dir,
        &child,
        &[&at("child"), &at("bulk"), &sums_base, &sums_all],
        &[
            "verify",
            "sums-base",
            "copy",
            "bulk",
            "copy",
            "child",
            "verify",
            "sums-all",
        ],
    );
    assert_line(&out, &format!("VERIFIED {}", base_sums.len()));
    assert_line(
        &out,
        &format!(
            "VERIFIED {}",
            base_sums.len() + child_sums.len() + bulk_sums.len()
        ),
    );
    assert!(
        fs::read(&base).unwrap() == base_before,
        "serving the child changed its parent"
    );
    ours_ok(&["check", s(&child)]);
    // The chain flattened, as the merged base must read.
    let chain_raw = dir.join("chain.raw");
    ours_ok(&["convert", "-O", "raw", s(&child), s(&chain_raw)]);

    // 3. commit: the child merges into the base and is removed; the base alone now reads as the
    // chain did. Then resize +64M.
    ours_ok(&["commit", s(&child)]);
    assert!(!child.exists(), "commit without -d left the child in place");
    judge(&base, &raw, "after commit");
    assert_same(
        &chain_raw,
        "raw",
        &base,
        "vhdx",
        "the merged base vs the chain before",
    );
    fs::remove_file(&chain_raw).unwrap();

    ours_ok(&["resize", s(&base), "+64M"]);
    judge(&base, &raw, "after resize +64M");
    let grown = fs::metadata(&raw).unwrap().len();
    eprintln!(
        "guest: {test}: after commit and resize the base file holds {} MiB",
        fs::metadata(&base).unwrap().len() / MIB
    );
    assert_eq!(grown, 192 * MIB, "the disk's size after resize +64M");
    let out = boot(
        test,
        dir,
        &base,
        &[&sums_all],
        &["size", "verify", "sums-all", "zero", "bulk/data"],
    );
    assert_eq!(
        number(&out, "SECTORS"),
        192 * MIB / 512,
        "the guest's disk size after resize +64M"
    );
    assert_line(
        &out,
        &format!(
            "VERIFIED {}",
            base_sums.len() + child_sums.len() + bulk_sums.len()
        ),
    );
    assert_eq!(
        number(&out, "ZEROED"),
        bulk_len,
        "the bulk file the guest zeroed"
    );
    judge(
        &base,
        &raw,
        "after the guest zeroed and deleted the bulk file",
    );

    // 4. compact: the file shrinks, its content stays; the guest reads what is left.
    let before = dir.join("before-compact.vhdx");
    fs::copy(&base, &before).unwrap();
    let len_before = fs::metadata(&base).unwrap().len();
    ours_ok(&["compact", s(&base)]);
    let len_after = fs::metadata(&base).unwrap().len();
    judge(&base, &raw, "after compact");
    assert_same(
        &before,
        "vhdx",
        &base,
        "vhdx",
        "the compacted file vs itself before",
    );
    fs::remove_file(&before).unwrap();
    assert!(
        len_after + bulk_len / 2 <= len_before,
        "compact shrank the file only from {len_before} to {len_after} bytes after the guest \
         zeroed a {} MiB file",
        bulk_len / MIB
    );
    let out = boot(test, dir, &base, &[&sums_kept], &["verify", "sums-kept"]);
    assert_line(
        &out,
        &format!("VERIFIED {}", base_sums.len() + child_sums.len()),
    );
    eprintln!(
        "guest: {test}: compact: {} -> {} MiB; {:.1} s in all",
        len_before / MIB,
        len_after / MIB,
        t.elapsed().as_secs_f64()
    );
}
