//! Raw files as the peers and our convert write them: byte comparison that skips holes, reads
//! at an offset, all-zero checks.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

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

/// [`files_equal`], panicking with `what` and where they differ unless they are equal.
pub fn assert_files_equal(a: &Path, b: &Path, what: &str) {
    if let Err(e) = files_equal(a, b) {
        panic!("{what}: {e}");
    }
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
