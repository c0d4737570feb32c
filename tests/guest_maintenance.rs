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
//! `contrib/setup-test-deps.sh`); `VHDX_GUEST_SKIP_SERVE=1` skips it as it skips those, and
//! `VHDX_GUEST_TIME_SCALE` multiplies its deadlines as it does theirs (tests/common/guest.rs).

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::guest::*;
use common::*;
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;
/// guest-run's own timeout; a boot and a script take well under a minute.
const GUEST_TIMEOUT_SECS: u32 = 240;

// ------------------------------------------------------------------------------------- guest

/// Serves `image` with our backend and runs `guest-run ... maint.sh /dev/vda STEPS...` with
/// `files` copied into the guest; returns the script's stdout once serve has exited cleanly.
/// Panics with the guest's output and serve's log unless both succeed and the script printed
/// "MAINT OK".
fn boot(test: &str, dir: &Path, image: &Path, files: &[&Path], steps: &[&str]) -> String {
    let socket = dir.join("vhost.sock");
    let _ = fs::remove_file(&socket);
    let backend = Backend::start_ours(image, &socket, None);
    let mut opts = vec!["--no-fio"];
    for f in files {
        opts.extend(["--file", s(f)]);
    }
    let mut args = vec!["/dev/vda".to_owned()];
    args.extend(steps.iter().map(|s| s.to_string()));
    let out = run_guest(
        test,
        &[&backend],
        None,
        GUEST_TIMEOUT_SECS,
        &opts,
        "maint.sh",
        &args,
    );
    assert!(
        out.status.success() && out.stdout.lines().any(|l| l == "MAINT OK"),
        "{test}: {}",
        out.failure(&format!("guest-run maint.sh {steps:?}"), &[&backend])
    );
    backend.stop();
    out.stdout
}

/// The number after `key ` on the first stdout line that starts so (e.g. "TRIMMED 123").
fn number(out: &str, key: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no '{key} N' line in the guest's stdout:\n{out}"))
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
    if skip_our_serve(test) {
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
