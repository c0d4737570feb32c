//! VHDX images to start from: the gzipped fixtures, and writable opens through the engine.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use vhost_user_vhdx::vhdx::{Chain, ChainError, ChainOptions, Error};

use super::{repo_root, tempdir};

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

/// Opens the image (and its parents) writable with the engine; panics on any error but a lock
/// that does not go away. A child that another test thread forks (qemu-img, python) shares our
/// just-closed file, and its lock, between fork and exec: that is waited out (up to 2 s).
pub fn open_writable(path: &Path) -> Chain {
    let options = ChainOptions {
        writable: true,
        ..Default::default()
    };
    for _ in 0..100 {
        match Chain::open(path, &options) {
            Err(Error::Chain(ChainError::Open { source, .. }))
                if matches!(*source, Error::Locked(_)) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other.unwrap_or_else(|e| panic!("open {}: {e}", path.display())),
        }
    }
    panic!("{} stayed locked", path.display())
}
