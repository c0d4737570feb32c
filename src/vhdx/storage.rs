//! The byte store under a VHDX file.
//!
//! The engine never touches `std::fs::File` directly: it goes through [`Storage`], so that tests
//! can put a recording or crash-simulating layer underneath, a read-only open of a file with a
//! dirty log can put the replayed log pages over the file ([`OverlayStorage`]), and the backend
//! can reach the underlying file for vectored I/O into guest memory. With `--cache none` the
//! file is a [`DirectFile`] (O_DIRECT), which aligns what the engine reads and writes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nix::fcntl::{fallocate, FallocateFlags};

use super::direct::DirectFile;

/// Positioned I/O on a file-like object. All methods take `&self` so that queues can use the
/// same file from several threads without a shared file offset.
#[allow(clippy::len_without_is_empty)] // a file length, not a collection
pub trait Storage: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`. Bytes past the end of the file read as zeros; the
    /// return value is the number of bytes that lay inside the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros, keeping it allocated.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeroes_by_writing(self, offset, len)
    }
    /// Makes `[offset, offset + len)` read as zeros and gives its space back to the host
    /// filesystem where it can (a hole).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
    /// The plain file under this storage, when reads of payload data may bypass the layer (no
    /// overlay and no interception). Used by the backend for vectored I/O into guest memory.
    fn as_file(&self) -> Option<&File> {
        None
    }
    /// The O_DIRECT file under this storage (`--cache none`), whose payload data may be moved
    /// directly only in aligned pieces.
    fn direct(&self) -> Option<&DirectFile> {
        None
    }
}

/// Writes zeros in 1 MiB pieces: the portable way to zero a range.
pub fn write_zeroes_by_writing<S: Storage + ?Sized>(
    s: &S,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    const PIECE: u64 = 1 << 20;
    let zeros = vec![0u8; PIECE.min(len) as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(PIECE);
        s.write_at(&zeros[..n as usize], offset + at)?;
        at += n;
    }
    Ok(())
}

/// `fallocate(mode | FALLOC_FL_KEEP_SIZE)` of `[offset, offset + len)` if that range is not
/// empty and lies inside the file. `Ok(false)` when it was not tried or the filesystem refused
/// it: the caller then writes instead.
pub(crate) fn fallocate_inside(
    file: &File,
    mode: FallocateFlags,
    offset: u64,
    len: u64,
) -> io::Result<bool> {
    if len == 0 || offset.saturating_add(len) > Storage::len(file)? {
        return Ok(false);
    }
    let r = fallocate(
        file,
        mode | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    );
    Ok(r.is_ok())
}

impl Storage for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
            match FileExt::read_at(self, &mut buf[done..], pos) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(done)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // Zeroing by the filesystem keeps the space allocated without writing it; where it is
        // not supported (or the range extends the file), write the zeros.
        if fallocate_inside(self, FallocateFlags::FALLOC_FL_ZERO_RANGE, offset, len)? {
            return Ok(());
        }
        write_zeroes_by_writing(self, offset, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if fallocate_inside(self, FallocateFlags::FALLOC_FL_PUNCH_HOLE, offset, len)? {
            return Ok(());
        }
        Storage::write_zeroes(self, offset, len)
    }

    fn as_file(&self) -> Option<&File> {
        Some(self)
    }
}

impl<S: Storage + ?Sized> Storage for Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn as_file(&self) -> Option<&File> {
        (**self).as_file()
    }
    fn direct(&self) -> Option<&DirectFile> {
        (**self).direct()
    }
}

/// What the overlay holds over one extent of the file.
#[derive(Clone)]
enum Patch {
    Zero,
    /// Exactly one 4 KiB page.
    Page(Box<[u8; 4096]>),
}

/// A read-only view of a file with replayed log changes laid over it: what an in-memory log
/// replay produces for a read-only open of a file whose log is not empty ([MS-VHDX] §2.3.3,
/// footnote 5). Extents are 4 KiB-aligned and never overlap; later changes replace earlier ones.
pub struct OverlayStorage {
    base: Arc<dyn Storage>,
    /// start → (end, contents).
    patches: BTreeMap<u64, (u64, Patch)>,
    len: u64,
}

impl OverlayStorage {
    pub fn new(base: Arc<dyn Storage>, len: u64) -> Self {
        OverlayStorage {
            base,
            patches: BTreeMap::new(),
            len,
        }
    }

    pub fn write_page(&mut self, offset: u64, page: Box<[u8; 4096]>) {
        self.insert(offset, offset + 4096, Patch::Page(page));
    }

    pub fn write_zeros(&mut self, offset: u64, length: u64) {
        if length > 0 {
            self.insert(offset, offset + length, Patch::Zero);
        }
    }

    fn insert(&mut self, start: u64, end: u64, patch: Patch) {
        self.len = self.len.max(end);
        let overlapping: Vec<u64> = self
            .patches
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let (e, old) = self.patches.remove(&s).expect("listed");
            // Pages are 4 KiB-aligned like every change, so only zero extents are ever cut.
            if let Patch::Zero = old {
                if s < start {
                    self.patches.insert(s, (start, Patch::Zero));
                }
                if e > end {
                    self.patches.insert(end, (e, Patch::Zero));
                }
            }
        }
        self.patches.insert(start, (end, patch));
    }
}

impl Storage for OverlayStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.base.read_at(buf, offset)?;
        let end = offset.saturating_add(buf.len() as u64);
        let first = self
            .patches
            .range(..=offset)
            .next_back()
            .map_or(offset, |(s, _)| *s);
        for (&s, (e, patch)) in self.patches.range(first..end) {
            let from = s.max(offset);
            let to = (*e).min(end);
            if from >= to {
                continue;
            }
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match patch {
                Patch::Zero => dst.fill(0),
                Patch::Page(page) => {
                    dst.copy_from_slice(&page[(from - s) as usize..(to - s) as usize])
                }
            }
        }
        Ok(buf.len().min(self.len.saturating_sub(offset) as usize))
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "read-only view of a file with a replayed log",
        ))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "read-only view of a file with a replayed log",
        ))
    }
}

/// A growable in-memory file, for tests and fuzzing.
#[derive(Default)]
pub struct MemStorage {
    data: std::sync::Mutex<Vec<u8>>,
}

impl MemStorage {
    pub fn new(data: Vec<u8>) -> Self {
        MemStorage {
            data: std::sync::Mutex::new(data),
        }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let data = self.lock();
        let start = (offset.min(data.len() as u64)) as usize;
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        buf[n..].fill(0);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= 1 << 40)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past 1 TiB"))?;
        if data.len() < end as usize {
            data.resize(end as usize, 0);
        }
        data[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > 1 << 40 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "length past 1 TiB",
            ));
        }
        self.lock().resize(len as usize, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_replaces_whole_and_partial_pages() {
        let base: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![1u8; 3 * 4096]));
        let mut ov = OverlayStorage::new(base, 3 * 4096);
        ov.write_zeros(0, 3 * 4096);
        ov.write_page(4096, Box::new([9u8; 4096]));
        ov.write_zeros(4096 * 2, 4096);
        ov.write_page(0, Box::new([1u8; 4096]));
        let mut buf = vec![0u8; 4096];
        ov.read_at(&mut buf, 2048).unwrap();
        assert!(buf[..2048].iter().all(|&b| b == 1));
        assert!(buf[2048..].iter().all(|&b| b == 9));
        let mut buf = vec![7u8; 100];
        ov.read_at(&mut buf, 8192 + 10).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn reads_past_end_are_zero() {
        let m = MemStorage::new(vec![5u8; 10]);
        let mut buf = [7u8; 20];
        assert_eq!(m.read_at(&mut buf, 5).unwrap(), 5);
        assert_eq!(&buf[..5], &[5; 5]);
        assert_eq!(&buf[5..], &[0; 15]);
    }
}
