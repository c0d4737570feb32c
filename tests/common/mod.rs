//! Helpers shared by the integration tests: fixtures, the real peers (qemu-img, qemu-io,
//! libvhdi's pyvhdi) and file comparison.
//!
//! Include with `mod common;`. Every helper panics with a message that says what failed and how
//! to fix the environment; a missing peer is a failure, never a silent skip. Install the peers
//! with `contrib/setup-test-deps.sh` (or run everything through `contrib/test.sh`).
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `vhost-user-vhdx` binary that cargo built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vhost-user-vhdx"))
}

/// Gunzips `tests/data/fixtures/<name>.vhdx.gz` into a new temporary directory and returns the
/// directory (keep it alive: dropping it deletes the copy) and the path of `<name>.vhdx` in it.
/// The copy is writable, so a test may modify it; the gzipped original is never touched.
pub fn fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let gz = repo_root()
        .join("tests/data/fixtures")
        .join(format!("{name}.vhdx.gz"));
    let input = File::open(&gz)
        .unwrap_or_else(|e| panic!("fixture {name}: cannot open {}: {e}", gz.display()));
    let dir = tempdir(&format!("fixture-{name}-"));
    let path = dir.path().join(format!("{name}.vhdx"));
    let mut output = File::create(&path)
        .unwrap_or_else(|e| panic!("fixture {name}: cannot create {}: {e}", path.display()));
    io::copy(&mut flate2::read::GzDecoder::new(input), &mut output)
        .unwrap_or_else(|e| panic!("fixture {name}: cannot gunzip {}: {e}", gz.display()));
    (dir, path)
}

/// A new temporary directory whose name starts with `vhdx-test-<prefix>`.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("vhdx-test-{prefix}"))
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
            "cannot run `{program}` ({e}); install the test peers with contrib/setup-test-deps.sh"
        )
        })
}

fn describe(program: &str, args: &[&str], out: &Output) -> String {
    format!(
        "`{program} {}` exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path_str(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("path is not UTF-8: {}", path.display()))
}

/// Runs `qemu-img ARGS` and returns its output, whatever the exit status.
pub fn qemu_img(args: &[&str]) -> Output {
    run("qemu-img", args)
}

/// Runs `qemu-img ARGS`, panics with its stdout and stderr unless it succeeds, returns stdout.
pub fn qemu_img_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    if !out.status.success() {
        panic!("{}", describe("qemu-img", args, &out));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check -f vhdx PATH` (no repair): its exit code and stdout followed by stderr.
/// Codes: 0 clean, 1 check failed to run (e.g. unreadable or dirty-log image), 2 corruption,
/// 3 leaked clusters only, 63 check not supported.
pub fn qemu_img_check(path: &Path) -> (i32, String) {
    let args = ["check", "-f", "vhdx", path_str(path)];
    let out = qemu_img(&args);
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("{}", describe("qemu-img", &args, &out)));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (code, text)
}

/// `qemu-img convert -f vhdx -O raw IMG OUT` (sparse output); panics on failure.
pub fn qemu_img_convert_raw(img: &Path, out: &Path) {
    qemu_img_ok(&[
        "convert",
        "-f",
        "vhdx",
        "-O",
        "raw",
        path_str(img),
        path_str(out),
    ]);
}

/// `qemu-io -f vhdx -c CMD... IMG`, returning its output whatever happened. Beware: qemu-io
/// exits 0 even when a command fails; use [`qemu_io_ok`] to catch that.
pub fn qemu_io(img: &Path, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "vhdx"];
    for cmd in cmds {
        args.extend(["-c", cmd]);
    }
    args.push(path_str(img));
    run("qemu-io", &args)
}

/// Like [`qemu_io`], but panics if qemu-io fails or any command reports an error; returns stdout.
pub fn qemu_io_ok(img: &Path, cmds: &[&str]) -> String {
    let out = qemu_io(img, cmds);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed = |s: &str| {
        s.lines()
            .any(|l| l.contains(" failed: ") || l.starts_with("qemu-io: "))
    };
    if !out.status.success() || failed(&stdout) || failed(&stderr) {
        panic!(
            "qemu-io on {} with {cmds:?} failed ({})\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
            img.display(),
            out.status
        );
    }
    stdout
}

/// The Python interpreter that has pyvhdi: `$VHDX_PYTHON`, else `<repo>/.venv/bin/python`.
/// Panics (with the fix) if it does not exist.
pub fn vhdx_python() -> PathBuf {
    let python = match std::env::var_os("VHDX_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join(".venv/bin/python"),
    };
    if !python.exists() {
        panic!(
            "the Python interpreter for pyvhdi ({}) does not exist: run contrib/setup-test-deps.sh \
             (or set VHDX_PYTHON to a python that can `import pyvhdi`)",
            python.display()
        );
    }
    python
}

fn run_peer_script(script: &str, args: &[&str]) -> Output {
    let python = vhdx_python();
    let script = repo_root().join("tests/peers").join(script);
    let out = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", python.display(), script.display()));
    if out.status.code() == Some(3) {
        panic!(
            "pyvhdi is not importable by {}: run contrib/setup-test-deps.sh\n{}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !out.status.success() {
        let mut all = vec![path_str(&script)];
        all.extend_from_slice(args);
        panic!("{}", describe(path_str(&python), &all, &out));
    }
    out
}

/// Reads a VHDX with libvhdi (pyvhdi) and writes its whole media to `out` as a sparse raw file.
/// `chain[0]` is the leaf, `chain[1]` its parent, and so on down to the base image.
pub fn pyvhdi_read_raw(out: &Path, chain: &[&Path]) {
    assert!(
        !chain.is_empty(),
        "pyvhdi_read_raw needs at least the leaf image"
    );
    let mut args = vec![path_str(out)];
    args.extend(chain.iter().map(|p| path_str(p)));
    run_peer_script("pyvhdi_read.py", &args);
}

/// What pyvhdi reports about one file (see tests/peers/pyvhdi_info.py for the keys).
pub fn pyvhdi_info(img: &Path) -> serde_json::Value {
    let out = run_peer_script("pyvhdi_info.py", &[path_str(img)]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pyvhdi_info.py printed invalid JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;

extern "C" {
    fn lseek(fd: i32, offset: i64, whence: i32) -> i64;
}

/// `lseek(SEEK_DATA / SEEK_HOLE)`: the next data (or hole) offset at or after `pos`, `len` if none.
/// Filesystems without hole reporting treat the whole file as data, which is still correct.
fn seek_extent(file: &File, pos: u64, len: u64, whence: i32) -> io::Result<u64> {
    // SAFETY: lseek on a file descriptor that `file` keeps open; no memory is passed.
    let r = unsafe { lseek(file.as_raw_fd(), pos as i64, whence) };
    if r >= 0 {
        return Ok(r as u64);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(6) => Ok(len), // ENXIO: no data at or after pos (SEEK_DATA)
        Some(22) => Ok(if whence == SEEK_DATA { pos } else { len }), // EINVAL: not supported
        _ => Err(err),
    }
}

/// Compares two files byte for byte in 1 MiB chunks. Ranges that are holes in both files are
/// skipped (so comparing two sparse 10 GiB raw images is cheap). Err says where they differ:
/// the sizes, or the offset of the first differing byte and both values.
pub fn files_equal(a: &Path, b: &Path) -> Result<(), String> {
    const CHUNK: usize = 1 << 20;
    let open = |p: &Path| File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let len_of = |f: &File, p: &Path| {
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| format!("cannot stat {}: {e}", p.display()))
    };
    let (la, lb) = (len_of(&fa, a)?, len_of(&fb, b)?);
    if la != lb {
        return Err(format!(
            "sizes differ: {} is {la} bytes, {} is {lb} bytes",
            a.display(),
            b.display()
        ));
    }
    let io_err = |what: &str, p: &Path, e: io::Error| format!("{what} {}: {e}", p.display());
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut pos = 0u64;
    while pos < la {
        // Skip what is a hole in both files: zeros on both sides.
        let da = seek_extent(&fa, pos, la, SEEK_DATA).map_err(|e| io_err("seek", a, e))?;
        let db = seek_extent(&fb, pos, lb, SEEK_DATA).map_err(|e| io_err("seek", b, e))?;
        let start = da.min(db);
        if start >= la {
            break;
        }
        // Compare up to where both files are holes again.
        let ha = seek_extent(&fa, start, la, SEEK_HOLE).map_err(|e| io_err("seek", a, e))?;
        let hb = seek_extent(&fb, start, lb, SEEK_HOLE).map_err(|e| io_err("seek", b, e))?;
        let end = ha.max(hb).min(la).max(start + 1);
        fa.seek(SeekFrom::Start(start))
            .map_err(|e| io_err("seek", a, e))?;
        fb.seek(SeekFrom::Start(start))
            .map_err(|e| io_err("seek", b, e))?;
        let mut off = start;
        while off < end {
            let n = CHUNK.min((end - off) as usize);
            fa.read_exact(&mut ba[..n])
                .map_err(|e| io_err("read", a, e))?;
            fb.read_exact(&mut bb[..n])
                .map_err(|e| io_err("read", b, e))?;
            if ba[..n] != bb[..n] {
                let i = ba[..n]
                    .iter()
                    .zip(&bb[..n])
                    .position(|(x, y)| x != y)
                    .unwrap();
                let at = off + i as u64;
                return Err(format!(
                    "files differ at byte {at} (sector {}): {} has {:#04x}, {} has {:#04x}",
                    at / 512,
                    a.display(),
                    ba[i],
                    b.display(),
                    bb[i]
                ));
            }
            off += n as u64;
        }
        pos = end;
    }
    Ok(())
}

/// Reads `len` bytes at `offset` from a file (e.g. a raw image made by a peer).
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap_or_else(|e| {
        panic!(
            "cannot read {len} bytes at {offset} of {}: {e}",
            path.display()
        )
    });
    buf
}

/// True if the file holds only zero bytes (holes are skipped cheaply).
pub fn is_all_zero(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let len = f
        .metadata()
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .len();
    let seek = |pos, whence| {
        seek_extent(&f, pos, len, whence)
            .unwrap_or_else(|e| panic!("cannot seek in {}: {e}", path.display()))
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let data = seek(pos, SEEK_DATA);
        if data >= len {
            break;
        }
        let end = seek(data, SEEK_HOLE).clamp(data + 1, len);
        let mut off = data;
        while off < end {
            let n = buf.len().min((end - off) as usize);
            f.read_exact_at(&mut buf[..n], off)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            if buf[..n].iter().any(|&b| b != 0) {
                return false;
            }
            off += n as u64;
        }
        pos = end;
    }
    true
}
