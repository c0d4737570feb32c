//! Helpers shared by the integration tests: fixtures and temporary directories, running our
//! binary and other programs, the real peers (qemu-img, qemu-io, libvhdi's pyvhdi), file
//! comparison and `io` commands.
//!
//! Include with `mod common;`. Every helper panics with a message that says what failed and how
//! to fix the environment; a missing peer is a failure, never a silent skip. Install the peers
//! with `contrib/setup-test-deps.sh` (or run everything through `contrib/test.sh`).
//!
//! Each test binary compiles this module on its own and uses only part of it, hence the
//! `allow(dead_code)` (and `allow(unused_imports)` on the re-exports).
#![allow(dead_code)]

pub mod crash_storage;
mod files;
pub mod frontend;
pub mod guest;
mod images;
mod io_commands;
mod peers;
mod process;
mod serve;

use std::path::{Path, PathBuf};

// Everything is reachable as `common::NAME`; a binary that uses none of a module's names
// would warn of its unused re-export.
#[allow(unused_imports)]
pub use {files::*, images::*, io_commands::*, peers::*, process::*, serve::*};

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A new temporary directory whose name starts with `vhdx-test-<prefix>`.
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("vhdx-test-{prefix}"))
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// A temporary directory on a filesystem that takes O_DIRECT, for `--cache none`: the system's
/// temporary directory when it does (tmpfs did not before Linux 6.6), else one on the build
/// directory's filesystem. Panics when neither does: a `--cache none` test never passes
/// without having run.
pub fn direct_io_tempdir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::OpenOptionsExt;
    let takes_o_direct = |dir: &Path| {
        let probe = dir.join("o_direct-probe");
        let ok = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(&probe)
            .is_ok();
        let _ = std::fs::remove_file(&probe);
        ok
    };
    let dir = tempdir(prefix);
    if takes_o_direct(dir.path()) {
        return dir;
    }
    let build = Path::new(env!("CARGO_TARGET_TMPDIR"));
    eprintln!(
        "{} does not take O_DIRECT: using {} for --cache none",
        dir.path().display(),
        build.display()
    );
    let dir = tempfile::Builder::new()
        .prefix(&format!("vhdx-test-{prefix}"))
        .tempdir_in(build)
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
    assert!(
        takes_o_direct(dir.path()),
        "neither the temporary directory nor the build directory takes O_DIRECT"
    );
    dir
}

/// A path as `&str`, for argument lists; panics if it is not UTF-8.
pub fn s(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("path is not UTF-8: {}", path.display()))
}
