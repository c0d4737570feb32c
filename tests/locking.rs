//! Image locking against QEMU: its file driver and our engine take the same OFD lock bytes
//! (100 + permission while using it, 200 + permission while refusing to share it), so neither
//! can write an image the other has open, and a reader in either refuses an image the other
//! writes, while readers share.
//!
//! What makes QEMU hold the write permission: a `vhdx` blockdev opened read-write (the default,
//! `read-only=off`) takes WRITE and RESIZE on its file child as soon as it is opened, whether or
//! not an export writes through it; with `read-only=on` it takes only CONSISTENT_READ (and still
//! refuses to share WRITE and RESIZE).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vhost_user_vhdx::vhdx::{Chain, ChainError, ChainOptions, Error};

fn text(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Our command must fail with exit 1 and one line on stderr that names a lock.
fn refused_for_a_lock(args: &[&str]) -> String {
    let out = ours(args);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {all}");
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(err.lines().count(), 1, "{args:?}: one line: {all}");
    assert!(err.contains("lock"), "{args:?}: {all}");
    err
}

/// qemu's failure to open because of a lock: exit 1 and its "Failed to get ... lock" line.
fn qemu_refused_for_a_lock(program: &str, out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {}", text(out));
    assert!(
        err.contains("Failed to get") && err.contains("lock"),
        "{what}: {program} did not fail for a lock: {}",
        text(out)
    );
}

fn qemu_io_args(img: &Path, args: &[&str]) -> Output {
    let mut all = vec!["-f", "vhdx"];
    all.extend_from_slice(args);
    all.push(s(img));
    run("qemu-io", &all)
}

/// Retries `f` for a moment while it fails: a child that another test thread forks while we
/// close a file shares that file (and its lock) until it execs.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn open_chain(path: &Path, writable: bool) -> Chain {
    let options = ChainOptions {
        writable,
        ..Default::default()
    };
    eventually(&format!("open {}", path.display()), || {
        Chain::open(path, &options).map_err(|e| e.to_string())
    })
}

fn new_image(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&img), "16M"]);
    ours_ok(&["io", "-q", "-c", "write -P 0x5a 0 1M", s(&img)]);
    img
}

/// Starts qemu-storage-daemon with the image as a vhdx blockdev over a file blockdev with
/// locking on, exported writable over NBD on a unix socket; returns once the socket exists
/// (the blockdevs, and so their locks, come first).
fn storage_daemon(img: &Path, sock: &Path, read_only: bool) -> KillOnDrop {
    let file = format!(
        "driver=file,node-name=f,filename={},locking=on{}",
        s(img),
        if read_only { ",read-only=on" } else { "" }
    );
    let vhdx = format!(
        "driver=vhdx,node-name=d,file=f{}",
        if read_only { ",read-only=on" } else { "" }
    );
    let export = format!(
        "type=nbd,id=e,node-name=d,writable={}",
        if read_only { "off" } else { "on" }
    );
    let mut guard = KillOnDrop(
        Command::new("qemu-storage-daemon")
            .args(["--blockdev", &file, "--blockdev", &vhdx])
            .args([
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", s(sock)),
            ])
            .args(["--export", &export])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-storage-daemon (install qemu-system or qemu-utils 10)"),
    );
    match wait_for_path(&mut guard.0, sock, Duration::from_secs(20)) {
        Ok(()) => guard,
        Err(PathNotCreated::Exited(status)) => {
            let mut err = String::new();
            let _ = guard.0.stderr.take().unwrap().read_to_string(&mut err);
            panic!("qemu-storage-daemon exited with {status}: {err}");
        }
        Err(PathNotCreated::TimedOut) => {
            panic!("qemu-storage-daemon did not create {}", sock.display())
        }
    }
}

#[test]
fn a_writable_qemu_storage_daemon_locks_us_out() {
    let dir = tempdir("lock-qsd-");
    let img = new_image(dir.path(), "img.vhdx");
    let before = std::fs::read(&img).unwrap();
    let sock = dir.path().join("nbd.sock");
    let daemon = storage_daemon(&img, &sock, false);

    // A writer is refused, and so is a reader: qemu writes and does not share that.
    let write = ["io", "-c", "write -P 0x77 0 4096", s(&img)];
    let line = refused_for_a_lock(&write);
    assert!(line.contains("\"write\" lock"), "{line}");
    let line = refused_for_a_lock(&["info", s(&img)]);
    assert!(line.contains("shared \"write\" lock"), "{line}");
    refused_for_a_lock(&["io", "-r", "-c", "read -P 0x5a 0 4096", s(&img)]);
    // check has nothing to report on a file it could not open: one line on stderr, exit 1,
    // and nothing on stdout (as qemu-img check), in either output format.
    for format in ["human", "json"] {
        let line = refused_for_a_lock(&["check", "--output", format, s(&img)]);
        assert!(line.contains("\"write\" lock"), "{line}");
        assert!(ours(&["check", "--output", format, s(&img)])
            .stdout
            .is_empty());
    }
    let out = dir.path().join("out.raw");
    refused_for_a_lock(&["convert", s(&img), s(&out)]);
    assert!(!out.exists(), "a refused convert left its output");
    // In the test process too: a writable and a read-only open fail with Locked.
    for writable in [true, false] {
        let options = ChainOptions {
            writable,
            ..Default::default()
        };
        match Chain::open(&img, &options) {
            Err(Error::Chain(ChainError::Open { source, .. }))
                if matches!(*source, Error::Locked(_)) => {}
            Err(e) => panic!("writable={writable}: not a lock error: {e}"),
            Ok(_) => panic!("writable={writable}: opened an image qemu writes"),
        }
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a refused open changed the file"
    );

    // Once qemu is gone, we write again.
    drop(daemon);
    eventually("write after qemu-storage-daemon exited", || {
        let out = ours(&write);
        out.status.success().then_some(()).ok_or_else(|| text(&out))
    });
    ours_ok(&["io", "-r", "-c", "read -P 0x77 0 4096", s(&img)]);
}

#[test]
fn a_read_only_qemu_storage_daemon_lets_us_read_but_not_write() {
    let dir = tempdir("lock-qsd-ro-");
    let img = new_image(dir.path(), "img.vhdx");
    let sock = dir.path().join("nbd.sock");
    let _daemon = storage_daemon(&img, &sock, true);
    // Readers share: our read-only opens work.
    ours_ok(&["info", s(&img)]);
    ours_ok(&["io", "-r", "-c", "read -P 0x5a 0 1M", s(&img)]);
    // qemu does not share write with anyone, readers included.
    let line = refused_for_a_lock(&["io", "-c", "write -P 0x77 0 4096", s(&img)]);
    assert!(line.contains("\"write\" lock"), "{line}");
}

#[test]
fn qemu_cannot_open_an_image_we_write() {
    let dir = tempdir("lock-ours-");
    let img = new_image(dir.path(), "img.vhdx");
    let chain = open_chain(&img, true);

    let out = qemu_io_args(&img, &["-c", "write -P 0x11 0 4096"]);
    qemu_refused_for_a_lock("qemu-io", &out, "qemu-io write");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get \"write\" lock"),
        "{}",
        text(&out)
    );
    let out = qemu_io_args(&img, &["-r", "-c", "read 0 4096"]);
    qemu_refused_for_a_lock("qemu-io", &out, "qemu-io -r read");
    let out = qemu_img(&["info", s(&img)]);
    qemu_refused_for_a_lock("qemu-img", &out, "qemu-img info");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock"),
        "{}",
        text(&out)
    );
    // -U (force share) does not look at locks: it reads what is on disk.
    let info = qemu_img_ok(&["info", "-U", "--output", "json", s(&img)]);
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    // Another process of ours is refused as qemu is.
    refused_for_a_lock(&["io", "-c", "write 0 512", s(&img)]);
    refused_for_a_lock(&["info", s(&img)]);

    // Once we have written, our log holds the session's metadata changes until the clean
    // close (qemu empties its log after every flush): qemu then refuses even -U, read-only,
    // because the log needs replaying.
    chain.write_at(&[0x22; 4096], 4 << 20).unwrap();
    chain.flush().unwrap();
    let out = qemu_img(&["info", "-U", s(&img)]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("needs to be replayed"),
        "qemu-img info -U during our session: {}",
        text(&out)
    );

    chain.close().unwrap();
    eventually("qemu-io after our close", || {
        let out = qemu_io_args(&img, &["-c", "read -P 0x22 4M 4096"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && err.is_empty() && !stdout.contains("failed"))
            .then_some(())
            .ok_or(err + &stdout)
    });
    let info = qemu_img_ok(&["info", "-U", s(&img)]);
    assert!(info.contains("vhdx"), "{info}");
}

#[test]
fn a_parent_we_read_cannot_be_written_by_qemu() {
    let dir = tempdir("lock-parent-");
    let base = new_image(dir.path(), "base.vhdx");
    let child = dir.path().join("child.vhdx");
    ours_ok(&["create", "-q", "-b", s(&base), s(&child)]);

    for leaf_writable in [true, false] {
        let what = format!("leaf open writable={leaf_writable}");
        let chain = open_chain(&child, leaf_writable);
        let out = qemu_io_args(&base, &["-c", "write -P 0x11 0 4096"]);
        qemu_refused_for_a_lock("qemu-io", &out, &format!("{what}: qemu-io write"));
        // Readers share the parent.
        let info = qemu_img_ok(&["info", s(&base)]);
        assert!(info.contains("vhdx"), "{what}: {info}");
        let out = qemu_io_args(&base, &["-r", "-c", "read -P 0x5a 0 1M"]);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{what}: qemu-io -r: {}",
            text(&out)
        );
        ours_ok(&["io", "-r", "-c", "read -P 0x5a 0 1M", s(&base)]);
        // And our own writer is refused like qemu's.
        refused_for_a_lock(&["io", "-c", "write 0 512", s(&base)]);
        if leaf_writable {
            refused_for_a_lock(&["io", "-r", "-c", "read 0 512", s(&child)]);
        } else {
            ours_ok(&["io", "-r", "-c", "read -P 0x5a 0 1M", s(&child)]);
        }
        drop(chain);
    }
    // With the chain closed, the parent is writable again.
    eventually("write the parent after the chain closed", || {
        let out = qemu_io_args(&base, &["-c", "write -P 0x11 1M 4096"]);
        (out.status.success() && out.stderr.is_empty())
            .then_some(())
            .ok_or_else(|| text(&out))
    });
}
