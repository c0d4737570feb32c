//! O_DIRECT storage for `--cache none`: the file's bytes go between the disk and our buffers
//! without the host page cache, so a host serving many disks does not cache each one twice.
//!
//! Direct I/O has rules the rest of the engine does not follow: a buffer's address must be a
//! multiple of the file's memory alignment, and the file offset and length of each transfer a
//! multiple of its offset alignment (statx `STATX_DIOALIGN`; the two are kept apart because
//! many devices accept buffers aligned far less strictly than offsets). [`DirectFile`] takes
//! any request: aligned ones go straight to the file; the others go through an aligned bounce
//! buffer of at most [`BOUNCE_PIECE`] plus two alignment units, reading the partial first and
//! last alignment units first when the write does not cover them (read-modify-write).
//!
//! A read-modify-write rewrites bytes outside its own range, so it must not run alongside any
//! other write of the same file: every write holds the file's [`WriteGate`], shared when it is
//! aligned and exclusive for a read-modify-write. The gate's guards own their reference, so an
//! asynchronous write can keep one until it completes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::storage::{fallocate_inside, Storage};
use nix::fcntl::FallocateFlags;

/// The largest piece of a misaligned transfer bounced at once.
pub const BOUNCE_PIECE: usize = 1 << 20;

/// The alignment used when the file cannot tell: every device and filesystem we know accepts
/// 4096 for both.
const FALLBACK_ALIGN: u32 = 4096;

/// Direct-I/O alignment of one file (both powers of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlign {
    /// Buffer addresses (and, by the kernel's iovec check, nothing else).
    pub mem: usize,
    /// File offsets and lengths, also the length of each iovec.
    pub offset: u64,
}

impl DioAlign {
    /// Asks the file: statx `STATX_DIOALIGN` (Linux 6.1), else the logical block size of a
    /// block device (BLKSSZGET), else 4096 for both.
    pub fn probe(file: &File) -> DioAlign {
        use rustix::fs::{statx, AtFlags, StatxFlags};
        if let Ok(st) = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
            let reported = st.stx_mask & StatxFlags::DIOALIGN.bits() != 0;
            if reported && st.stx_dio_mem_align != 0 && st.stx_dio_offset_align != 0 {
                return DioAlign::new(st.stx_dio_mem_align, st.stx_dio_offset_align);
            }
        }
        let is_block = file
            .metadata()
            .is_ok_and(|m| m.file_type().is_block_device());
        if is_block {
            if let Ok(lbs) = rustix::fs::ioctl_blksszget(file) {
                return DioAlign::new(lbs, lbs);
            }
        }
        DioAlign::new(FALLBACK_ALIGN, FALLBACK_ALIGN)
    }

    /// Alignments that are not a power of two (or absurdly large) fall back to 4096.
    pub fn new(mem: u32, offset: u32) -> DioAlign {
        let sane = |a: u32| {
            if a.is_power_of_two() && a <= 1 << 16 {
                a
            } else {
                FALLBACK_ALIGN
            }
        };
        DioAlign {
            mem: sane(mem) as usize,
            offset: u64::from(sane(offset)),
        }
    }

    /// Whether a file range can be transferred directly.
    pub fn range_ok(&self, offset: u64, len: u64) -> bool {
        (offset | len) % self.offset == 0
    }

    /// Whether one buffer (one iovec) can be transferred directly.
    pub fn buffer_ok(&self, addr: usize, len: usize) -> bool {
        addr % self.mem == 0 && len as u64 % self.offset == 0
    }
}

/// A byte buffer whose start is aligned, carved out of a larger `Vec` (no `unsafe`).
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting at a multiple of `align` (a power of two).
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align);
        AlignedBuf { raw, start, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Whether a file's writes currently run shared (aligned) or one at a time (read-modify-write).
#[derive(Default)]
pub struct WriteGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    shared: usize,
    exclusive: bool,
    /// Exclusive holders waiting: new shared holders wait behind them, so a stream of aligned
    /// writes cannot starve a read-modify-write.
    exclusive_waiting: usize,
}

/// Held while a write to the file is running; dropping it lets the gate's waiters on.
pub struct GateGuard {
    gate: Arc<WriteGate>,
    exclusive: bool,
}

impl WriteGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For an aligned write: runs alongside other aligned writes.
    pub fn shared(self: &Arc<Self>) -> GateGuard {
        let mut s = self.lock();
        while s.exclusive || s.exclusive_waiting > 0 {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.shared += 1;
        GateGuard {
            gate: Arc::clone(self),
            exclusive: false,
        }
    }

    /// [`Self::shared`] without waiting: `None` while a read-modify-write runs or waits. For a
    /// thread that holds shared guards of its own in flight and must not wait behind a writer
    /// that waits for them.
    pub fn try_shared(self: &Arc<Self>) -> Option<GateGuard> {
        let mut s = self.lock();
        if s.exclusive || s.exclusive_waiting > 0 {
            return None;
        }
        s.shared += 1;
        Some(GateGuard {
            gate: Arc::clone(self),
            exclusive: false,
        })
    }

    /// For a read-modify-write: runs alone.
    pub fn exclusive(self: &Arc<Self>) -> GateGuard {
        let mut s = self.lock();
        s.exclusive_waiting += 1;
        while s.exclusive || s.shared > 0 {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.exclusive_waiting -= 1;
        s.exclusive = true;
        GateGuard {
            gate: Arc::clone(self),
            exclusive: true,
        }
    }
}

impl Drop for GateGuard {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        if self.exclusive {
            s.exclusive = false;
        } else {
            s.shared -= 1;
        }
        drop(s);
        self.gate.changed.notify_all();
    }
}

/// Opens `path` with O_DIRECT. A filesystem that refuses direct I/O (EINVAL: ramfs, tmpfs
/// before Linux 6.6, some FUSE filesystems) gets an error that says what to do instead.
pub fn open_direct(path: &Path, writable: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
        .map_err(|e| {
            if path.is_dir() {
                io::ErrorKind::IsADirectory.into()
            } else if e.raw_os_error() == Some(nix::libc::EINVAL) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the filesystem does not support O_DIRECT (--cache none); use --cache writeback",
                )
            } else {
                e
            }
        })
}

/// A file opened with O_DIRECT, with the alignment it needs.
pub struct DirectFile {
    file: File,
    align: DioAlign,
    gate: Arc<WriteGate>,
}

impl DirectFile {
    /// `file` must have been opened with O_DIRECT ([`open_direct`]).
    pub fn new(file: File) -> DirectFile {
        let align = DioAlign::probe(&file);
        Self::with_align(file, align)
    }

    pub fn with_align(file: File, align: DioAlign) -> DirectFile {
        DirectFile {
            file,
            align,
            gate: Arc::default(),
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn align(&self) -> DioAlign {
        self.align
    }

    /// The gate every write to this file holds (see the module docs).
    pub fn gate(&self) -> &Arc<WriteGate> {
        &self.gate
    }

    fn aligned(&self, buf: &[u8], offset: u64) -> bool {
        self.align.range_ok(offset, buf.len() as u64)
            && self.align.buffer_ok(buf.as_ptr() as usize, buf.len())
    }

    /// The aligned window `[start, end)` around `[offset, offset + len)`.
    fn window(&self, offset: u64, len: u64) -> io::Result<(u64, u64)> {
        let a = self.align.offset;
        let end = offset
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(a))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        Ok((offset - offset % a, end))
    }

    /// Reads `buf.len()` bytes at `offset` (both aligned, `buf` aligned); past the end of the
    /// file reads zeros. Returns the bytes that lay inside the file.
    fn read_aligned(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(&self.file, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            // A short read ends at the end of the file; one that ends misaligned cannot be
            // continued with O_DIRECT, and what follows is past the end anyway.
            if done as u64 % self.align.offset != 0 {
                break;
            }
        }
        buf[done..].fill(0);
        Ok(done)
    }

    /// One bounced piece of a read: `buf.len() <= BOUNCE_PIECE`.
    fn read_piece(
        &self,
        bounce: &mut AlignedBuf,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<usize> {
        let (start, end) = self.window(offset, buf.len() as u64)?;
        let w = &mut bounce.as_mut_slice()[..(end - start) as usize];
        let inside = self.read_aligned(w, start)?;
        let head = (offset - start) as usize;
        buf.copy_from_slice(&w[head..head + buf.len()]);
        Ok(inside.saturating_sub(head).min(buf.len()))
    }

    /// One read-modify-written piece of a write: `buf.len() <= BOUNCE_PIECE`.
    fn write_piece(&self, bounce: &mut AlignedBuf, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, end) = self.window(offset, buf.len() as u64)?;
        let a = self.align.offset as usize;
        let w = &mut bounce.as_mut_slice()[..(end - start) as usize];
        let head = (offset - start) as usize;
        let tail = head + buf.len();
        if head == 0 && tail == w.len() {
            // Aligned on the file: only the buffer was misaligned.
            w.copy_from_slice(buf);
            return self.file.write_all_at(w, start);
        }
        if head != 0 {
            self.read_aligned(&mut w[..a], start)?;
        }
        if tail % a != 0 && (tail > a || head == 0) {
            let last = w.len() - a;
            self.read_aligned(&mut w[last..], start + last as u64)?;
        }
        w[head..tail].copy_from_slice(buf);
        // The window may reach past the end of the file, where the write must not grow it.
        let old_len = self.file.metadata()?.len();
        self.file.write_all_at(w, start)?;
        let want = old_len.max(offset + buf.len() as u64);
        if end > want {
            self.file.set_len(want)?;
        }
        Ok(())
    }
}

impl Storage for DirectFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if self.aligned(buf, offset) {
            return self.read_aligned(buf, offset);
        }
        let piece = buf.len().min(BOUNCE_PIECE);
        let mut bounce = AlignedBuf::new(piece + 2 * self.align.offset as usize, self.align.mem);
        let mut done = 0;
        let mut inside = 0;
        for chunk in buf.chunks_mut(BOUNCE_PIECE) {
            inside += self.read_piece(&mut bounce, chunk, offset + done as u64)?;
            done += chunk.len();
        }
        Ok(inside)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.aligned(buf, offset) {
            let _shared = self.gate.shared();
            return self.file.write_all_at(buf, offset);
        }
        // Only a range off the alignment rewrites bytes around it; a misaligned buffer alone
        // is copied, and runs beside other aligned writes.
        let _gate = if self.align.range_ok(offset, buf.len() as u64) {
            self.gate.shared()
        } else {
            self.gate.exclusive()
        };
        let piece = buf.len().min(BOUNCE_PIECE);
        let mut bounce = AlignedBuf::new(piece + 2 * self.align.offset as usize, self.align.mem);
        let mut done = 0;
        for chunk in buf.chunks(BOUNCE_PIECE) {
            self.write_piece(&mut bounce, chunk, offset + done as u64)?;
            done += chunk.len();
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if fallocate_inside(
            &self.file,
            FallocateFlags::FALLOC_FL_ZERO_RANGE,
            offset,
            len,
        )? {
            return Ok(());
        }
        // Aligned zeros, so that the common (aligned) range is written without a bounce.
        let piece = (len.min(BOUNCE_PIECE as u64)) as usize;
        let zeros = AlignedBuf::new(piece, self.align.mem);
        let mut at = 0;
        while at < len {
            let n = (len - at).min(piece as u64) as usize;
            self.write_at(&zeros.as_slice()[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if fallocate_inside(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE,
            offset,
            len,
        )? {
            return Ok(());
        }
        Storage::write_zeroes(self, offset, len)
    }

    fn direct(&self) -> Option<&DirectFile> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file on the build directory's filesystem (tmpfs /tmp may refuse O_DIRECT).
    fn scratch(name: &str, len: usize) -> (std::path::PathBuf, DirectFile) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/direct-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &pattern).unwrap();
        let f = open_direct(&path, true).expect("the build directory's filesystem takes O_DIRECT");
        (path, DirectFile::new(f))
    }

    #[test]
    fn try_shared_never_waits_behind_a_read_modify_write() {
        let gate = Arc::new(WriteGate::default());
        let a = gate.try_shared().expect("a free gate is shared");
        drop(a);
        let x = gate.exclusive();
        assert!(
            gate.try_shared().is_none(),
            "shared beside an exclusive holder"
        );
        drop(x);
        let b = gate
            .try_shared()
            .expect("shared again once the exclusive holder left");
        drop(b);
    }

    #[test]
    fn probe_gives_powers_of_two() {
        let (path, d) = scratch("probe", 8192);
        let a = d.align();
        assert!(a.mem.is_power_of_two() && a.offset.is_power_of_two());
        assert!(a.offset <= 4096, "{a:?}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn misaligned_reads_and_writes_match_a_plain_file() {
        let len = 3 * BOUNCE_PIECE + 12345;
        let (path, d) = scratch("rmw", len);
        // A stricter alignment than the filesystem's makes every odd case a bounce.
        let d = DirectFile::with_align(d.file.try_clone().unwrap(), DioAlign::new(4096, 4096));
        let mut model: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let cases: [(u64, usize); 6] = [
            (1, 10),
            (4095, 2),
            (8192, 4096),
            (5000, BOUNCE_PIECE * 2 + 77),
            (len as u64 - 100, 100),
            (len as u64 - 3, 40), // grows the file by 37 bytes, not to the next 4 KiB
        ];
        for (n, &(off, l)) in cases.iter().enumerate() {
            let data: Vec<u8> = (0..l).map(|i| (i * 7 + n) as u8).collect();
            d.write_at(&data, off).unwrap();
            let end = off as usize + l;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&data);
            assert_eq!(d.len().unwrap(), model.len() as u64, "case {n}");
        }
        for &(off, l) in &[
            (0u64, model.len()),
            (3, 5000),
            (model.len() as u64 - 10, 20),
        ] {
            let mut buf = vec![0xeeu8; l];
            let inside = d.read_at(&mut buf, off).unwrap();
            let end = (off as usize + l).min(model.len());
            assert_eq!(inside, end - off as usize);
            assert_eq!(&buf[..inside], &model[off as usize..end]);
            assert!(buf[inside..].iter().all(|&b| b == 0));
        }
        assert_eq!(std::fs::read(&path).unwrap(), model);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_read_modify_write_waits_for_aligned_writes() {
        let gate: Arc<WriteGate> = Arc::default();
        let shared = gate.shared();
        // An asynchronous write keeps its guard in an in-flight slot, on another thread.
        fn assert_send<T: Send>(_: &T) {}
        assert_send(&shared);
        let (tx, rx) = std::sync::mpsc::channel();
        let g = Arc::clone(&gate);
        let t = std::thread::spawn(move || {
            let _x = g.exclusive();
            tx.send(()).unwrap();
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
        drop(shared);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn refused_o_direct_names_the_way_out() {
        // ramfs has no direct I/O at all; mounting one needs root.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/direct-ramfs");
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "ramfs", "none"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        });
        assert!(mounted || !root, "root could not mount a ramfs");
        if !mounted {
            eprintln!("refused_o_direct_names_the_way_out: NOT RUN (mounting a ramfs needs root)");
            return;
        }
        let path = dir.join("f");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let err = open_direct(&path, false).unwrap_err();
        let _ = std::process::Command::new("umount").arg(&dir).status();
        assert!(err.to_string().contains("--cache writeback"), "{err}");
    }
}
