//! Moving request data between the image file and guest memory without a bounce buffer:
//! [`ReadTarget`] and [`WriteSource`] over guest memory segments, with `preadv`/`pwritev`
//! straight into / out of the mapped guest pages. This is the one place where guest memory
//! becomes host slices, and so where the data path's `unsafe` lives.
//!
//! With `--cache none` the file is opened with O_DIRECT ([`DirectFile`]): guest buffers whose
//! address or length does not meet the file's direct-I/O alignment, and requests whose file
//! range does not, go through a bounce buffer of at most [`BOUNCE_CAP`] per queue thread,
//! piece by piece; aligned segments still go straight between the disk and guest memory.

use std::cell::RefCell;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsFd;

use smallvec::SmallVec;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice};

use crate::vhdx::buffers::SourceFault;
use crate::vhdx::direct::{AlignedBuf, DioAlign, DirectFile};
use crate::vhdx::{ReadTarget, Storage, WriteSource};
use crate::virtio_blk::Segment;

/// The kernel takes at most this many iovecs per call.
pub const IOV_MAX: usize = 1024;

/// Largest buffer between guest memory and a storage that is not a plain file (a log replayed
/// in memory, tests): one request may cover nearly 4 GiB, on many queues at once.
const LAYER_BOUNCE: usize = 1 << 20;

/// The largest piece of an O_DIRECT request bounced at once (a multiple of every offset
/// alignment [`DioAlign`] accepts).
pub const BOUNCE_CAP: usize = 256 << 10;

thread_local! {
    /// This thread's bounce buffer for O_DIRECT, made on first use.
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Runs `f` on this thread's bounce buffer ([`BOUNCE_CAP`] bytes aligned for `align`).
fn with_bounce<R>(align: DioAlign, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        let fits = b
            .as_ref()
            .is_some_and(|buf| buf.as_slice().as_ptr() as usize % align.mem == 0);
        if !fits {
            *b = Some(AlignedBuf::new(BOUNCE_CAP, align.mem.max(4096)));
        }
        f(b.as_mut().expect("made above").as_mut_slice())
    })
}

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

impl GuestBuffers<'_> {
    /// The iovecs of request bytes `[at, at + len)`, for an asynchronous transfer: they point
    /// into the guest memory mapping, which the caller keeps alive (its `Arc`) until the
    /// transfer is complete.
    pub fn iovecs(&self, at: usize, len: usize) -> SmallVec<[nix::libc::iovec; 4]> {
        self.slices(at, len)
            .iter()
            .map(|s| nix::libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect()
    }
}

/// Reads at `offset` until the iovecs are full; the end of the file reads as zeros. `align` is
/// the O_DIRECT offset alignment (1 without): a short read that ends off it is the end of file.
fn pread_all(
    file: &std::fs::File,
    iovs: &mut [IoSliceMut<'_>],
    mut offset: u64,
    align: u64,
) -> io::Result<()> {
    let mut iovs = iovs;
    while !iovs.is_empty() {
        let n =
            nix::sys::uio::preadv(file.as_fd(), iovs, offset as i64).map_err(io::Error::from)?;
        let ends_off_alignment =
            align > 1 && (offset + n as u64) % align != 0 && n < iovs.iter().map(|i| i.len()).sum();
        if n == 0 || ends_off_alignment {
            IoSliceMut::advance_slices(&mut iovs, n);
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

impl GuestBuffers<'_> {
    /// Request bytes `[at, at + len)` to or from an O_DIRECT file at `file_offset`: runs of
    /// aligned segments go straight to the file, the rest through the bounce buffer.
    fn direct_io(
        &self,
        at: usize,
        len: usize,
        d: &DirectFile,
        file_offset: u64,
        dir: Dir,
    ) -> io::Result<()> {
        let align = d.align();
        if !align.range_ok(file_offset, len as u64) {
            // Misaligned on the file (a 512-byte sector on a 4 KiB device): the file's own
            // read-modify-write, fed piece by piece.
            return self.bounce(at, len, d, file_offset, dir);
        }
        let slices = self.slices(at, len);
        let ok =
            |s: &VolatileSlice<'_, ()>| align.buffer_ok(s.ptr_guard().as_ptr() as usize, s.len());
        let (mut i, mut pos) = (0, 0usize);
        while i < slices.len() {
            let start = pos;
            let first = i;
            if ok(&slices[i]) {
                // Aligned lengths keep `pos` aligned on the file.
                while i < slices.len() && ok(&slices[i]) {
                    pos += slices[i].len();
                    i += 1;
                }
                let run = &slices[first..i];
                match dir {
                    Dir::Read => read_slices(d, run, file_offset + start as u64)?,
                    Dir::Write => write_slices(d, run, file_offset + start as u64)?,
                }
            } else {
                // Up to the next aligned segment that starts on an aligned file offset (the
                // end of the request is one: the range is aligned).
                while i < slices.len()
                    && !(i > first && ok(&slices[i]) && pos as u64 % align.offset == 0)
                {
                    pos += slices[i].len();
                    i += 1;
                }
                self.bounce(at + start, pos - start, d, file_offset + start as u64, dir)?;
            }
        }
        Ok(())
    }

    /// Request bytes `[at, at + len)` through this thread's bounce buffer, [`BOUNCE_CAP`] at a
    /// time; `DirectFile` takes care of any misalignment on the file.
    fn bounce(
        &self,
        at: usize,
        len: usize,
        d: &DirectFile,
        file_offset: u64,
        dir: Dir,
    ) -> io::Result<()> {
        with_bounce(d.align(), |buf| {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len());
                let piece = &mut buf[..n];
                let slices = self.slices(at + done, n);
                let fo = file_offset + done as u64;
                match dir {
                    Dir::Read => {
                        d.read_at(piece, fo)?;
                        let mut k = 0;
                        for s in &slices {
                            s.copy_from(&piece[k..k + s.len()]);
                            k += s.len();
                        }
                    }
                    Dir::Write => {
                        let mut k = 0;
                        for s in &slices {
                            s.copy_to(&mut piece[k..k + s.len()]);
                            k += s.len();
                        }
                        d.write_at(piece, fo)?;
                    }
                }
                done += n;
            }
            Ok(())
        })
    }
}

/// preadv of aligned guest slices from an O_DIRECT file.
fn read_slices(d: &DirectFile, slices: &[VolatileSlice<'_, ()>], offset: u64) -> io::Result<()> {
    preadv_slices(d.file(), slices, offset, d.align().offset)
}

/// pwritev of aligned guest slices to an O_DIRECT file, beside other aligned writes but never
/// beside a read-modify-write of the file.
fn write_slices(d: &DirectFile, slices: &[VolatileSlice<'_, ()>], offset: u64) -> io::Result<()> {
    let _shared = d.gate().shared();
    pwritev_slices(d.file(), slices, offset)
}

/// preadv of guest slices from `file` at `offset`, IOV_MAX slices a call (`align`: as for
/// [`pread_all`]).
fn preadv_slices(
    file: &std::fs::File,
    slices: &[VolatileSlice<'_, ()>],
    offset: u64,
    align: u64,
) -> io::Result<()> {
    let guards: Few<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iovs: Few<IoSliceMut<'_>> = guards
        .iter()
        .zip(slices)
        .map(|(g, s)| {
            // SAFETY: the slice is a checked range of guest memory that stays mapped while
            // the request holds the memory guard; the guest may access it concurrently,
            // which is the nature of shared guest memory and harmless for the kernel copy.
            IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(g.as_ptr(), s.len()) })
        })
        .collect();
    in_iov_max_calls(&mut iovs, offset, |chunk, at| {
        pread_all(file, chunk, at, align)
    })
}

/// pwritev of guest slices to `file` at `offset`, IOV_MAX slices a call.
fn pwritev_slices(
    file: &std::fs::File,
    slices: &[VolatileSlice<'_, ()>],
    offset: u64,
) -> io::Result<()> {
    let guards: Few<_> = slices.iter().map(|s| s.ptr_guard()).collect();
    let mut iovs: Few<IoSlice<'_>> = guards
        .iter()
        .zip(slices)
        .map(|(g, s)| {
            // SAFETY: as in `preadv_slices`; the kernel only reads these bytes.
            IoSlice::new(unsafe { std::slice::from_raw_parts(g.as_ptr(), s.len()) })
        })
        .collect();
    in_iov_max_calls(&mut iovs, offset, |chunk, at| pwrite_all(file, chunk, at))
}

/// Moves `len` bytes between the guest and a layer over the file (replayed log, tests) through
/// one buffer of at most [`LAYER_BOUNCE`] bytes: `piece(offset in the range, its buffer)` for
/// each piece in turn.
fn in_layer_bounce_pieces(
    len: usize,
    mut piece: impl FnMut(usize, &mut [u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(LAYER_BOUNCE)];
    for at in (0..len).step_by(LAYER_BOUNCE) {
        let n = (len - at).min(LAYER_BOUNCE);
        piece(at, &mut buf[..n])?;
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
        if let Some(d) = storage.direct() {
            return self.direct_io(at, len, d, file_offset, Dir::Read);
        }
        let Some(file) = storage.as_file() else {
            return in_layer_bounce_pieces(len, |piece, buf| {
                storage.read_at(buf, file_offset + piece as u64)?;
                let mut done = 0;
                for s in &self.slices(at + piece, buf.len()) {
                    s.copy_from(&buf[done..done + s.len()]);
                    done += s.len();
                }
                Ok(())
            });
        };
        preadv_slices(file, &self.slices(at, len), file_offset, 1)
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
        if let Some(d) = storage.direct() {
            return self.direct_io(at, len, d, file_offset, Dir::Write);
        }
        let Some(file) = storage.as_file() else {
            return in_layer_bounce_pieces(len, |piece, buf| {
                let mut done = 0;
                for s in &self.slices(at + piece, buf.len()) {
                    s.copy_to(&mut buf[done..done + s.len()]);
                    done += s.len();
                }
                storage.write_at(buf, file_offset + piece as u64)
            });
        };
        pwritev_slices(file, &self.slices(at, len), file_offset).map_err(|e| {
            // The kernel could not read the guest's pages (a memory file shrunk under its
            // mapping): the guest's fault, not the image's.
            if e.raw_os_error() == Some(nix::libc::EFAULT) {
                SourceFault::error(format!("guest data buffer: {e}"))
            } else {
                e
            }
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
        assert!(layer.largest.load(Ordering::Relaxed) <= LAYER_BOUNCE);
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
        assert!(layer.largest.load(Ordering::Relaxed) <= LAYER_BOUNCE);
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

    use crate::vhdx::direct::open_direct;
    use rand::{Rng, SeedableRng};

    /// Guest buffers at odd addresses and lengths, and file ranges on and off the alignment,
    /// through an O_DIRECT file with a 4 KiB alignment (stricter than the build directory's
    /// filesystem needs, so that every kind of bounce and read-modify-write happens): what is
    /// read back, and what the file holds, match a plain model.
    #[test]
    fn unaligned_guest_buffers_through_o_direct() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest-io-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("direct");
        const LEN: usize = 4 << 20;
        let mut model: Vec<u8> = (0..LEN).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &model).unwrap();
        let file = open_direct(&path, true).expect("the build directory takes O_DIRECT");
        let d = DirectFile::with_align(file, DioAlign::new(4096, 4096));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for round in 0..200 {
            // 512-byte sectors, so the file range is often off the 4 KiB alignment.
            let sectors = rng.gen_range(1..=(if round % 10 == 0 { 1200 } else { 24 }));
            let len = sectors * 512;
            let offset = rng.gen_range(0..(LEN - len) / 512) as u64 * 512;
            // 1 to 5 segments at random addresses (some 4 KiB-aligned), split at random bytes.
            let mut cuts: Vec<usize> = (0..rng.gen_range(0..5))
                .map(|_| rng.gen_range(0..=len))
                .collect();
            cuts.extend([0, len]);
            cuts.sort_unstable();
            let mut segments = Vec::new();
            let mut addr = rng.gen_range(0..4096u64);
            for w in cuts.windows(2).filter(|w| w[1] > w[0]) {
                if rng.gen_bool(0.5) {
                    addr = addr.next_multiple_of(4096);
                }
                segments.push(Segment {
                    addr: GuestAddress(addr),
                    len: (w[1] - w[0]) as u64,
                });
                addr += (w[1] - w[0]) as u64 + rng.gen_range(0..64);
            }
            let bufs = GuestBuffers::new(&mem, &segments).unwrap();
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if rng.gen_bool(0.5) {
                write_to_segments(&mem, &segments, &data);
                bufs.write_to(0, len, &d, offset).unwrap();
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            } else {
                let mut bufs = bufs;
                bufs.read_from(0, len, &d, offset).unwrap();
                let mut got = vec![0u8; len];
                let mut at = 0;
                for s in &segments {
                    mem.read_slice(&mut got[at..at + s.len as usize], s.addr)
                        .unwrap();
                    at += s.len as usize;
                }
                assert!(
                    got == model[offset as usize..offset as usize + len],
                    "round {round}: read {len} at {offset:#x} in {segments:?}"
                );
            }
        }
        assert!(std::fs::read(&path).unwrap() == model, "the file differs");
        std::fs::remove_file(path).unwrap();
    }
}
