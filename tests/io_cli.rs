//! The `io` command's behaviour: qemu-io's output lines, exit statuses, and that a refused
//! command (typo, read-only, unaligned or out-of-range) leaves the file byte for byte as it was.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

const MIB: u64 = 1 << 20;
/// Virtual size of the test images.
const SIZE: u64 = 16 * MIB;

/// `vhost-user-vhdx io [extra...] -c CMD... IMG`.
fn io(img: &Path, extra: &[&str], cmds: &[&str]) -> (Vec<String>, Output) {
    let mut args: Vec<&str> = vec!["io"];
    args.extend_from_slice(extra);
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(s(img));
    let out = ours(&args);
    (args.iter().map(|a| a.to_string()).collect(), out)
}

fn io_ok(img: &Path, cmds: &[&str]) -> String {
    let (args, out) = io(img, &[], cmds);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(out.status.success(), "{}", describe_ours(&args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A new 16 MiB dynamic image (1 MiB blocks) holding 0x11 in its first 64 KiB and 0x22 in
/// its second MiB.
fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&img), "16M"]);
    io_ok(&img, &["write -P 0x11 0 64k", "write -P 0x22 1M 1M"]);
    img
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Runs `io` with `cmds` (and `extra` options), which must fail with exit status 1, exactly
/// one line on stderr, nothing on stdout, and the file unchanged byte for byte. Returns the
/// line.
fn refused(img: &Path, extra: &[&str], cmds: &[&str]) -> String {
    let before = bytes(img);
    let (args, out) = io(img, extra, cmds);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let what = describe_ours(&args, &out);
    assert_eq!(out.status.code(), Some(1), "{what}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {what}");
    assert!(err.starts_with("vhost-user-vhdx: "), "{what}");
    assert!(out.stdout.is_empty(), "{what}");
    assert!(
        bytes(img) == before,
        "the file changed although the command was refused: {what}"
    );
    err.trim_end().to_string()
}

/// The `verb N/N bytes at offset O` lines of qemu-io style output.
fn op_lines(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.contains(" bytes at offset "))
        .map(str::to_string)
        .collect()
}

#[test]
fn output_lines_are_qemu_io_lines() {
    let dir = tempdir("io-lines-");
    let img = image(dir.path(), "a.vhdx");
    let theirs = dir.path().join("b.vhdx");
    std::fs::copy(&img, &theirs).unwrap();
    let cmds = [
        "write -P 0x33 0 4096",
        "write -z 4096 4096",
        "discard 4M 1M",
        "flush",
        "read -P 0x33 0 4096",
        "read 1M 512",
        "write -P 0xfe 15M 1M",
        "read -P 0xfe 15M 1M",
    ];
    let stdout = io_ok(&img, &cmds);
    let qemu = qemu_io_ok(&theirs, &cmds);
    assert_eq!(
        op_lines(&stdout),
        op_lines(&qemu),
        "ours:\n{stdout}\nqemu-io:\n{qemu}"
    );
    assert_eq!(op_lines(&stdout).len(), 7, "{stdout}");
    // Each op line is followed by a statistics line as qemu-io prints it.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 14, "{stdout}");
    for pair in lines.chunks(2) {
        assert!(pair[0].contains(" bytes at offset "), "{stdout}");
        assert!(
            pair[1].contains(", 1 ops; ") && pair[1].contains(" sec ("),
            "{stdout}"
        );
    }
    // Both images now hold the same disk.
    let (ra, rb) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    qemu_img_convert_raw(&img, &ra);
    qemu_img_convert_raw(&theirs, &rb);
    files_equal(&ra, &rb).unwrap();
    // -q prints nothing.
    let (args, out) = io(&img, &["-q"], &["write -P 1 0 512", "read -P 1 0 512"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(out.status.success(), "{}", describe_ours(&args, &out));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        describe_ours(&args, &out)
    );
}

#[test]
fn pattern_mismatch_fails_but_later_commands_run() {
    let dir = tempdir("io-pattern-");
    let img = image(dir.path(), "a.vhdx");
    let (args, out) = io(
        &img,
        &[],
        &[
            "read -P 0x11 0 64k",
            "read -P 0x11 0 128k",
            "write -P 0x44 8M 4096",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let what = describe_ours(&args, &out);
    assert_eq!(out.status.code(), Some(1), "{what}");
    let err = String::from_utf8_lossy(&out.stderr);
    let failures: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("Pattern verification failed"))
        .collect();
    assert_eq!(failures.len(), 1, "{what}");
    // The first byte that differs is the first one past the 64 KiB of 0x11.
    assert!(failures[0].contains("65536"), "{what}");
    // Like qemu-io, the commands after a failed verification still run.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        op_lines(&stdout),
        [
            "read 65536/65536 bytes at offset 0",
            "read 131072/131072 bytes at offset 0",
            "wrote 4096/4096 bytes at offset 8388608"
        ],
        "{what}"
    );
    io_ok(&img, &["read -P 0x44 8M 4096"]);
    // A mismatch on a read-only open fails the same way.
    let (_, out) = io(&img, &["-r"], &["read -P 0x99 1M 512"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Pattern verification failed"));
    let (code, text) = qemu_img_check(&img);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn a_bad_command_is_one_line_and_changes_nothing() {
    let dir = tempdir("io-bad-");
    let img = image(dir.path(), "a.vhdx");
    for bad in [
        "wirte 0 512",
        "write 0",
        "write 0 512 512",
        "write -P 0x100 0 512",
        "write -P 1 -z 0 512",
        "write -P",
        "write -x 0 512",
        "read -z 0 512",
        "discard -P 1 0 512",
        "flush now",
        "write 0 1X",
        "write -1 512",
        "",
    ] {
        // Every command is parsed before the image is opened: the good write before the bad
        // command does not happen either.
        let line = refused(&img, &[], &["write -P 0x55 0 4096", bad, "flush"]);
        assert!(!line.contains("Usage"), "{bad:?}: {line}");
    }
    // Unknown options of io itself are usage errors, also one line.
    refused(&img, &["--bogus"], &["write 0 512"]);
    io_ok(&img, &["read -P 0x11 0 64k", "read -P 0x22 1M 1M"]);
}

#[test]
fn read_only_refuses_writes_and_changes_nothing() {
    let dir = tempdir("io-ro-");
    let img = image(dir.path(), "a.vhdx");
    for cmd in [
        "write -P 0x66 0 4096",
        "write -z 0 4096",
        "write -z 0 1M",
        "discard 1M 1M",
    ] {
        let line = refused(&img, &["-r"], &[cmd]);
        assert!(line.contains("read-only"), "{cmd}: {line}");
    }
    // Reads work on a read-only open and change nothing; so do reads on a writable open
    // (a session that never writes leaves the file untouched).
    let before = bytes(&img);
    for extra in [&["-r"][..], &[][..]] {
        let (_, out) = io(&img, extra, &["read -P 0x11 0 64k", "read -P 0 64k 512"]);
        assert!(out.status.success(), "{out:?}");
        assert!(bytes(&img) == before, "{extra:?}: reading changed the file");
    }
    // A flush on a read-only open has nothing to make durable: it succeeds (as in qemu-io).
    let (_, out) = io(&img, &["-r"], &["flush"]);
    assert!(out.status.success(), "{out:?}");
    assert!(bytes(&img) == before, "a read-only flush changed the file");
}

#[test]
fn unaligned_or_out_of_range_is_one_line_and_changes_nothing() {
    let dir = tempdir("io-range-");
    let img = image(dir.path(), "a.vhdx");
    let size = SIZE.to_string();
    let past = (SIZE - 512).to_string();
    let huge = (u64::MAX - 511).to_string();
    let cases = [
        "write -P 1 1 512".to_string(),
        "write -P 1 0 100".into(),
        "write -P 1 256 512".into(),
        "write -z 513 512".into(),
        "write -z 0 1000".into(),
        "discard 7 1M".into(),
        "read 0 511".into(),
        format!("write -P 1 {size} 512"),
        format!("write -P 1 {past} 1024"),
        format!("write -z {past} 1024"),
        format!("discard 0 {}", SIZE + 512),
        format!("read {past} 1024"),
        format!("write -P 1 {huge} 1024"),
        format!("read {huge} 1024"),
        "write -P 1 0 64G".into(),
    ];
    for cmd in &cases {
        let line = refused(&img, &[], &[cmd]);
        assert!(
            line.contains("aligned") || line.contains("beyond") || line.contains("too large"),
            "{cmd}: {line}"
        );
    }
    // The last sector itself is fine.
    io_ok(
        &img,
        &[
            &format!("write -P 0x77 {past} 512"),
            &format!("read -P 0x77 {past} 512"),
        ],
    );
    let (code, text) = qemu_img_check(&img);
    assert_eq!(code, 0, "{text}");
}

/// `io -t none` (O_DIRECT) on an image with 512-byte sectors: writes of odd sector runs (the
/// engine's aligned read-modify-write), a first touch, a discard and a log full of metadata
/// changes all go through O_DIRECT; qemu-img check finds the image clean and qemu-io reads
/// back the same bytes; `-t writethrough` reads them too, and so does `convert -T none`.
#[test]
fn cache_none_writes_what_qemu_reads() {
    let dir = direct_io_tempdir("io-cache-none-");
    let img = dir.path().join("d.vhdx");
    ours_ok(&[
        "create",
        "-q",
        "-o",
        "block_size=1M,logical_sector_size=512",
        s(&img),
        "16M",
    ]);
    let (args, out) = io(
        &img,
        &["-t", "none"],
        &[
            "write -P 0x31 512 1536",
            "write -P 0x32 3M 1M",
            "write -P 0x33 5M 4608",
            "write -P 0x34 8M 1M",
            "discard 8M 1M",
            "read -P 0x31 512 1536",
            "read -P 0x33 5M 4608",
            "flush",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(out.status.success(), "{}", describe_ours(&args, &out));
    assert_qemu_img_check_clean(&img, "after io -t none");
    qemu_io_ok(
        &img,
        &[
            "read -P 0 0 512",
            "read -P 0x31 512 1536",
            "read -P 0 2048 2048",
            "read -P 0x32 3M 1M",
            "read -P 0x33 5M 4608",
            "read -P 0 8M 1M",
        ],
    );
    let (args, out) = io(&img, &["-t", "writethrough"], &["read -P 0x32 3M 1M"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(out.status.success(), "{}", describe_ours(&args, &out));
    // convert -T none reads the image with O_DIRECT; qemu-img finds the copy identical.
    let raw = dir.path().join("d.raw");
    ours_ok(&["convert", "-q", "-T", "none", "-O", "raw", s(&img), s(&raw)]);
    run_ok(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "raw", s(&img), s(&raw)],
    );
}
