//! Exclusive use of image files, compatible with QEMU's locking.
//!
//! QEMU's file-posix driver takes shared OFD locks on single bytes: byte 100 + i while it holds
//! permission i, and byte 200 + i while it does *not* share permission i with others. Before
//! taking them it tests for conflicts: another holder of 200 + i conflicts with our use of
//! permission i, another holder of 100 + i with our refusal to share it. We take the same bytes
//! for the same meanings, so neither we nor QEMU can write a file the other has open, and a
//! reader in either refuses a file the other writes.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// QEMU's BLK_PERM_* bits: CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE.
const CONSISTENT_READ: u32 = 0;
const WRITE: u32 = 1;
const WRITE_UNCHANGED: u32 = 2;
const RESIZE: u32 = 3;

fn flock(kind: i32, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Is `byte` locked by another open file description?
fn held_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let mut probe = flock(libc::F_WRLCK, byte);
    fcntl(file.as_fd(), FcntlArg::F_OFD_GETLK(&mut probe))?;
    Ok(probe.l_type != libc::F_UNLCK as i16)
}

fn take(file: &File, byte: i64) -> io::Result<()> {
    fcntl(
        file.as_fd(),
        FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK, byte)),
    )?;
    Ok(())
}

const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// Locks `file` for our use: as the writer of a leaf, or as a reader (parents, read-only
/// opens) that does not let anyone write. Fails with a message naming the conflicting
/// permission when another process (QEMU or another of us) holds the file incompatibly.
pub fn lock_image(file: &File, writable: bool) -> io::Result<()> {
    let perms: &[u32] = if writable {
        &[CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE]
    } else {
        &[CONSISTENT_READ]
    };
    let unshared: &[u32] = &[WRITE, RESIZE];
    for &p in perms {
        if held_by_others(file, SHARED_BASE + i64::from(p))? {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "failed to get \"{}\" lock: another process has the image open and does not share it",
                    PERM_NAMES[p as usize]
                ),
            ));
        }
    }
    for &u in unshared {
        if held_by_others(file, PERM_BASE + i64::from(u))? {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "failed to get shared \"{}\" lock: another process is writing the image",
                    PERM_NAMES[u as usize]
                ),
            ));
        }
    }
    for &p in perms {
        take(file, PERM_BASE + i64::from(p))?;
    }
    for &u in unshared {
        take(file, SHARED_BASE + i64::from(u))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_second_writer_or_a_reader_of_a_written_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let a = open(&path);
        lock_image(&a, true).unwrap();
        let b = open(&path);
        assert!(lock_image(&b, true).is_err());
        assert!(lock_image(&b, false).is_err());
        drop(a);
        lock_image(&b, false).unwrap();
        // Two readers may share; a writer may not join them.
        let c = open(&path);
        lock_image(&c, false).unwrap();
        let d = open(&path);
        assert!(lock_image(&d, true).is_err());
    }
}
