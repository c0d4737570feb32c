//! The real peers: qemu-img, qemu-io, and libvhdi's pyvhdi (through tests/peers/*.py).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{describe, repo_root, run, run_ok, s};

/// Runs `qemu-img ARGS` and returns its output, whatever the exit status.
pub fn qemu_img(args: &[&str]) -> Output {
    run("qemu-img", args)
}

/// Runs `qemu-img ARGS`, panics with its stdout and stderr unless it succeeds, returns stdout.
pub fn qemu_img_ok(args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ok("qemu-img", args).stdout).into_owned()
}

/// `qemu-img create -q -f vhdx [-o OPTS] PATH SIZE` (no `-o` when `opts` is empty); panics on
/// failure.
pub fn qemu_img_create_vhdx(path: &Path, size: &str, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "vhdx"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(path), size]);
    qemu_img_ok(&args);
}

/// `qemu-img check -f vhdx PATH` (no repair): its exit code and stdout followed by stderr.
/// Codes: 0 clean, 1 check failed to run (e.g. unreadable or dirty-log image), 2 corruption,
/// 3 leaked clusters only, 63 check not supported.
pub fn qemu_img_check(path: &Path) -> (i32, String) {
    let args = ["check", "-f", "vhdx", s(path)];
    let out = qemu_img(&args);
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("{}", describe("qemu-img", &args, &out)));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (code, text)
}

/// `qemu-img check` finds no error and no leak (exit code 0); `what` starts the panic message.
pub fn assert_qemu_img_check_clean(path: &Path, what: &str) {
    let (code, text) = qemu_img_check(path);
    assert_eq!(
        code,
        0,
        "{what}: qemu-img check {}:\n{text}",
        path.display()
    );
}

/// `qemu-img convert -f vhdx -O raw IMG OUT` (sparse output); panics on failure.
pub fn qemu_img_convert_raw(img: &Path, out: &Path) {
    qemu_img_ok(&["convert", "-f", "vhdx", "-O", "raw", s(img), s(out)]);
}

/// `qemu-io -f vhdx -c CMD... IMG`, returning its output whatever happened. Beware: qemu-io
/// exits 0 even when a command fails; use [`qemu_io_ok`] to catch that.
pub fn qemu_io(img: &Path, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "vhdx"];
    for cmd in cmds {
        args.extend(["-c", cmd]);
    }
    args.push(s(img));
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
        let mut all = vec![s(&script)];
        all.extend_from_slice(args);
        panic!("{}", describe(s(&python), &all, &out));
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
    let mut args = vec![s(out)];
    args.extend(chain.iter().map(|p| s(p)));
    run_peer_script("pyvhdi_read.py", &args);
}

/// What pyvhdi reports about one file (see tests/peers/pyvhdi_info.py for the keys).
pub fn pyvhdi_info(img: &Path) -> serde_json::Value {
    let out = run_peer_script("pyvhdi_info.py", &[s(img)]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pyvhdi_info.py printed invalid JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
