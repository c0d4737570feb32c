//! Moving request data between the image file and guest memory without a bounce buffer:
//! [`ReadTarget`] and [`WriteSource`] over guest memory segments, with `preadv`/`pwritev`
//! straight into / out of the mapped guest pages. This is the one place where guest memory
//! becomes host slices, and so where the data path's `unsafe` lives.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsFd;

use smallvec::SmallVec;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice};

use crate::vhdx::buffers::SourceFault;
use crate::vhdx::{ReadTarget, Storage, WriteSource};
use crate::virtio_blk::Segment;

/// The kernel takes at most this many iovecs per call.
const IOV_MAX: usize = 1024;

/// Largest buffer between guest memory and a storage that is not a plain file (a log replayed
/// in memory, tests): one request may cover nearly 4 GiB, on many queues at once.
const BOUNCE: usize = 1 << 20;

/// A few of something per request (slices, their guards, iovecs) without a heap allocation.
type Few<T> = SmallVec<[T; 4]>;

/// Request data in guest memory: `segments` back to back make up `len` bytes.
pub struct GuestBuffers<'a> {
    mem: &'a GuestMemoryMmap,
    segments: &'a [Segment],
    len: usize,
}

impl<'a> GuestBuffers<'a> {
    /// Checks that every segment lies in guest memory; `Err` names the first that does not.
    pub fn new(mem: &'a GuestMemoryMmap, segments: &'a [Segment]) -> Result<Self, String> {
        let mut len = 0u64;
        for s in segments {
            if !mem.check_range(s.addr, s.len as usize, Permissions::ReadWrite) {
                return Err(format!(
                    "data buffer {:#x}+{:#x} is not in guest memory",
                    s.addr.0, s.len
                ));
            }
            len += s.len;
        }
        let len = usize::try_from(len).map_err(|_| "data buffers too large".to_string())?;
        Ok(GuestBuffers { mem, segments, len })
    }

    /// The guest memory of bytes `[at, at + len)`, region by region.
    fn slices(&self, mut at: usize, mut len: usize) -> Few<VolatileSlice<'a, ()>> {
        let mut out = Few::new();
        for s in self.segments {
            if len == 0 {
                break;
            }
            let slen = s.len as usize;
            if at >= slen {
                at -= slen;
                continue;
            }
            let n = (slen - at).min(len);
            let addr = GuestAddress(s.addr.0 + at as u64);
            // Checked in new(): the whole segment is mapped.
            let slices = self
                .mem
                .get_slices(addr, n, Permissions::ReadWrite)
                .expect("checked guest range");
            for slice in slices {
                out.push(slice.expect("checked guest range"));
            }
            len -= n;
            at = 0;
        }
        out
    }
}

fn pread_all(file: &std::fs::File, iovs: &mut [IoSliceMut<'_>], mut offset: u64) -> io::Result<()> {
    let mut iovs = iovs;
    while !iovs.is_empty() {
        let n =
            nix::sys::uio::preadv(file.as_fd(), iovs, offset as i64).map_err(io::Error::from)?;
        if n == 0 {
            // Past the end of the file: the rest reads as zeros.
            for iov in iovs.iter_mut() {
                iov.fill(0);
            }
            return Ok(());
        }
        offset += n as u64;
        IoSliceMut::advance_slices(&mut iovs, n);
    }
    Ok(())
}

fn pwrite_all(file: &std::fs::File, iovs: &mut [IoSlice<'_>], mut offset: u64) -> io::Result<()> {
    let mut iovs = iovs;
    while !iovs.is_empty() {
        let n =
            nix::sys::uio::pwritev(file.as_fd(), iovs, offset as i64).map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        offset += n as u64;
        IoSlice::advance_slices(&mut iovs, n);
    }
    Ok(())
}

/// Runs `io` on the iovecs at most [`IOV_MAX`] at a time, each call at the file offset where the
/// previous one's bytes ended (the first at `offset`).
fn in_iov_max_calls<T: std::ops::Deref<Target = [u8]>>(
    iovs: &mut [T],
    mut offset: u64,
    mut io: impl FnMut(&mut [T], u64) -> io::Result<()>,
) -> io::Result<()> {
    for chunk in iovs.chunks_mut(IOV_MAX) {
        let n: usize = chunk.iter().map(|c| c.len()).sum();
        io(chunk, offset)?;
        offset += n as u64;
    }
    Ok(())
}

impl ReadTarget for GuestBuffers<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn read_from(
        &mut self,
        at: usize,
        len: usize,
        storage: &dyn Storage,
        file_offset: u64,
    ) -> io::Result<()> {
        let Some(file) = storage.as_file() else {
            // A layer over the file (replayed log, tests): copy through a bounded buffer.
            let mut buf = vec![0u8; len.min(BOUNCE)];
            for piece in (0..len).step_by(BOUNCE) {
                let n = (len - piece).min(BOUNCE);
                storage.read_at(&mut buf[..n], file_offset + piece as u64)?;
                let mut done = 0;
                for s in &self.slices(at + piece, n) {
                    s.copy_from(&buf[done..done + s.len()]);
                    done += s.len();
                }
            }
            return Ok(());
        };
        let slices = self.slices(at, len);
        let guards: Few<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iovs: Few<IoSliceMut<'_>> = guards
            .iter()
            .zip(&slices)
            .map(|(g, s)| {
                // SAFETY: the slice is a checked range of guest memory that stays mapped while
                // the request holds the memory guard; the guest may access it concurrently,
                // which is the nature of shared guest memory and harmless for the kernel copy.
                IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(g.as_ptr(), s.len()) })
            })
            .collect();
        in_iov_max_calls(&mut iovs, file_offset, |chunk, at| {
            pread_all(file, chunk, at)
        })
    }

    fn fill_zero(&mut self, at: usize, len: usize) {
        const ZEROS: [u8; 4096] = [0; 4096];
        for s in self.slices(at, len) {
            let mut done = 0;
            while done < s.len() {
                let n = (s.len() - done).min(ZEROS.len());
                // In range by construction.
                let _ = s.write_slice(&ZEROS[..n], done);
                done += n;
            }
        }
    }
}

impl WriteSource for GuestBuffers<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn write_to(
        &self,
        at: usize,
        len: usize,
        storage: &dyn Storage,
        file_offset: u64,
    ) -> io::Result<()> {
        let Some(file) = storage.as_file() else {
            // As in read_from: a bounded buffer, piece by piece.
            let mut buf = vec![0u8; len.min(BOUNCE)];
            for piece in (0..len).step_by(BOUNCE) {
                let n = (len - piece).min(BOUNCE);
                let mut done = 0;
                for s in &self.slices(at + piece, n) {
                    s.copy_to(&mut buf[done..done + s.len()]);
                    done += s.len();
                }
                storage.write_at(&buf[..n], file_offset + piece as u64)?;
            }
            return Ok(());
        };
        let slices = self.slices(at, len);
        let guards: Few<_> = slices.iter().map(|s| s.ptr_guard()).collect();
        let mut iovs: Few<IoSlice<'_>> = guards
            .iter()
            .zip(&slices)
            .map(|(g, s)| {
                // SAFETY: as in read_from; the kernel only reads these bytes.
                IoSlice::new(unsafe { std::slice::from_raw_parts(g.as_ptr(), s.len()) })
            })
            .collect();
        in_iov_max_calls(&mut iovs, file_offset, |chunk, at| {
            pwrite_all(file, chunk, at).map_err(|e| {
                // The kernel could not read the guest's pages (a memory file shrunk under its
                // mapping): the guest's fault, not the image's.
                if e.raw_os_error() == Some(nix::libc::EFAULT) {
                    SourceFault::error(format!("guest data buffer: {e}"))
                } else {
                    e
                }
            })
        })
    }
}

/// Writes `bytes` into guest memory at the given segments (GET_ID), as much as fits.
pub fn write_to_segments(mem: &GuestMemoryMmap, segments: &[Segment], bytes: &[u8]) -> usize {
    let mut done = 0;
    for s in segments {
        if done == bytes.len() {
            break;
        }
        let n = (s.len as usize).min(bytes.len() - done);
        if mem.write_slice(&bytes[done..done + n], s.addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhdx::MemStorage;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A storage that is not a plain file, remembering the largest single read or write.
    #[derive(Default)]
    struct Layer {
        mem: MemStorage,
        largest: AtomicUsize,
    }

    impl Storage for Layer {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.largest.fetch_max(buf.len(), Ordering::Relaxed);
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.largest.fetch_max(buf.len(), Ordering::Relaxed);
            self.mem.write_at(buf, offset)
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            self.mem.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.mem.set_len(len)
        }
    }

    /// 5 MiB + 6 sectors of request data in three guest buffers whose edges fall inside the
    /// 1 MiB pieces, written to and read back from a layer: every byte lands at its offset, and
    /// no single copy is larger than the bounce limit.
    #[test]
    fn a_layer_is_copied_through_a_bounded_buffer() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let segments = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 1536,
            },
            Segment {
                addr: GuestAddress(0x20_0000),
                len: 3 << 20,
            },
            Segment {
                addr: GuestAddress(0x80_0000),
                len: (2 << 20) + 1536,
            },
        ];
        let total: u64 = segments.iter().map(|s| s.len).sum();
        let pattern = |i: u64| (i * 7 + i / 4099) as u8;
        let mut at = 0;
        for s in &segments {
            let bytes: Vec<u8> = (at..at + s.len).map(pattern).collect();
            mem.write_slice(&bytes, s.addr).unwrap();
            at += s.len;
        }
        let layer = Layer::default();
        let buffers = GuestBuffers::new(&mem, &segments).unwrap();
        let file_offset = 4096 * 3;
        buffers
            .write_to(0, total as usize, &layer, file_offset)
            .unwrap();
        assert!(layer.largest.load(Ordering::Relaxed) <= BOUNCE);
        let mut written = vec![0u8; total as usize];
        layer.mem.read_at(&mut written, file_offset).unwrap();
        assert!(written
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(i as u64)));

        // Back into the guest, shifted by 512 bytes, after wiping the buffers.
        for s in &segments {
            mem.write_slice(&vec![0xee; s.len as usize], s.addr)
                .unwrap();
        }
        let mut buffers = GuestBuffers::new(&mem, &segments).unwrap();
        buffers
            .read_from(512, total as usize - 512, &layer, file_offset)
            .unwrap();
        assert!(layer.largest.load(Ordering::Relaxed) <= BOUNCE);
        let mut at = 0u64;
        for s in &segments {
            let mut got = vec![0u8; s.len as usize];
            mem.read_slice(&mut got, s.addr).unwrap();
            for (i, &b) in got.iter().enumerate() {
                let pos = at + i as u64;
                let want = if pos < 512 { 0xee } else { pattern(pos - 512) };
                assert_eq!(b, want, "guest byte {pos}");
            }
            at += s.len;
        }
    }
}
