//! In-memory files for the harnesses, kept as a map of non-zero 4 KiB pages: a writer grows a
//! file by 32 MiB at a time, and zeroing, copying and cloning that much for every input would
//! cost more than the code under test.

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

use vhost_user_vhdx::vhdx::Storage;

/// The largest a file may grow. More than an input decodes to ([`crate::sparse::MAX_FILE`]): a
/// writer grows a file by at least 32 MiB at a time.
pub const MAX_GROWTH: u64 = 64 << 20;
const PAGE: u64 = 4096;

fn too_large(len: u64) -> io::Error {
    io::Error::other(format!("fuzz file limit: {len} bytes"))
}

/// A sparse file image: pages not in the map read as zeros.
#[derive(Clone, Default)]
pub struct Pages {
    pages: BTreeMap<u64, Box<[u8; PAGE as usize]>>,
    len: u64,
}

impl Pages {
    pub fn from_bytes(bytes: &[u8]) -> Pages {
        let mut p = Pages {
            pages: BTreeMap::new(),
            len: bytes.len() as u64,
        };
        for (i, chunk) in bytes.chunks(PAGE as usize).enumerate() {
            if !crate::uniform(chunk, 0) {
                let mut page = Box::new([0u8; PAGE as usize]);
                page[..chunk.len()].copy_from_slice(chunk);
                p.pages.insert(i as u64 * PAGE, page);
            }
        }
        p
    }

    /// An empty file of `len` bytes (all zeros).
    pub fn zeros(len: u64) -> Pages {
        Pages {
            pages: BTreeMap::new(),
            len,
        }
    }

    /// The file's length (a `len` would want an `is_empty` too).
    pub fn size(&self) -> u64 {
        self.len
    }

    /// The pages held (offset, 4 KiB), in order; the last may reach past the length.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.pages.iter().map(|(&at, p)| (at, &p[..]))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len as usize];
        self.read(&mut out, 0);
        out
    }

    /// `len` bytes at `offset` cut at page boundaries: (buffer index, page, index in page, n).
    fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (usize, u64, usize, usize)> {
        let mut at = 0usize;
        std::iter::from_fn(move || {
            if at >= len {
                return None;
            }
            let pos = offset + at as u64;
            let page = pos / PAGE * PAGE;
            let within = (pos - page) as usize;
            let n = (PAGE as usize - within).min(len - at);
            let piece = (at, page, within, n);
            at += n;
            Some(piece)
        })
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> usize {
        for (at, page, within, n) in Self::pieces(offset, buf.len()) {
            match self.pages.get(&page) {
                Some(p) => buf[at..at + n].copy_from_slice(&p[within..within + n]),
                None => buf[at..at + n].fill(0),
            }
        }
        buf.len().min(self.len.saturating_sub(offset) as usize)
    }

    pub fn write(&mut self, buf: &[u8], offset: u64) {
        for (at, page, within, n) in Self::pieces(offset, buf.len()) {
            let piece = &buf[at..at + n];
            // Zeros into a page that is not there change nothing (a log's zero descriptors,
            // a writer zeroing a new block): no page for them.
            if !self.pages.contains_key(&page) && crate::uniform(piece, 0) {
                continue;
            }
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| Box::new([0u8; PAGE as usize]));
            p[within..within + n].copy_from_slice(piece);
        }
        self.len = self.len.max(offset + buf.len() as u64);
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            let cut = len / PAGE * PAGE;
            if let Some(p) = self.pages.get_mut(&cut) {
                p[(len - cut) as usize..].fill(0);
            }
            self.pages
                .split_off(&len.div_ceil(PAGE).saturating_mul(PAGE));
        }
        self.len = len;
    }
}

/// A memory file that refuses to grow past [`MAX_GROWTH`], so that a hostile size (a log's
/// LastFileOffset, a BAT entry) is an I/O error rather than an allocation of the harness.
#[derive(Default)]
pub struct Capped(Mutex<Pages>);

impl Capped {
    pub fn new(bytes: Vec<u8>) -> Self {
        Capped(Mutex::new(Pages::from_bytes(&bytes)))
    }

    pub fn from_pages(pages: Pages) -> Self {
        Capped(Mutex::new(pages))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().to_bytes()
    }

    pub fn to_pages(&self) -> Pages {
        self.0.lock().unwrap().clone()
    }
}

fn write_capped(pages: &mut Pages, buf: &[u8], offset: u64) -> io::Result<()> {
    let end = offset.saturating_add(buf.len() as u64);
    if end > MAX_GROWTH {
        return Err(too_large(end));
    }
    pages.write(buf, offset);
    Ok(())
}

fn set_len_capped(pages: &mut Pages, len: u64) -> io::Result<()> {
    if len > MAX_GROWTH {
        return Err(too_large(len));
    }
    pages.set_len(len);
    Ok(())
}

impl Storage for Capped {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        Ok(self.0.lock().unwrap().read(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        write_capped(&mut self.0.lock().unwrap(), buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        set_len_capped(&mut self.0.lock().unwrap(), len)
    }
}

/// A capped memory file that knows what a crash would keep: `durable` is the file as of the
/// last flush, `pending` the writes and size changes since, in order.
pub struct Crashable(Mutex<Durability>);

enum Change {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

struct Durability {
    current: Pages,
    durable: Pages,
    pending: Vec<Change>,
}

fn apply(file: &mut Pages, c: &Change) {
    match c {
        Change::Write(off, data) => file.write(data, *off),
        Change::SetLen(len) => file.set_len(*len),
    }
}

impl Crashable {
    pub fn new(pages: Pages) -> Self {
        Crashable(Mutex::new(Durability {
            current: pages.clone(),
            durable: pages,
            pending: Vec::new(),
        }))
    }

    /// The file after a crash now: the durable file with the pending changes whose bit in
    /// `keep` (cycled) is set applied in order, the rest lost.
    pub fn crash(&self, keep: u64) -> Pages {
        let st = self.0.lock().unwrap();
        let mut file = st.durable.clone();
        for (i, c) in st.pending.iter().enumerate() {
            if keep >> (i % 64) & 1 != 0 {
                apply(&mut file, c);
            }
        }
        file
    }
}

impl Storage for Crashable {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        Ok(self.0.lock().unwrap().current.read(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.0.lock().unwrap();
        write_capped(&mut st.current, buf, offset)?;
        st.pending.push(Change::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let st = &mut *self.0.lock().unwrap();
        for c in st.pending.drain(..) {
            apply(&mut st.durable, &c);
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().current.len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.0.lock().unwrap();
        set_len_capped(&mut st.current, len)?;
        st.pending.push(Change::SetLen(len));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_behave_like_a_file() {
        let mut p = Pages::from_bytes(&[1u8; 5000]);
        p.write(&[2u8; 10], 8190);
        p.set_len(8195);
        let b = p.to_bytes();
        assert_eq!(b.len(), 8195);
        assert!(b[..5000].iter().all(|&x| x == 1));
        assert!(b[5000..8190].iter().all(|&x| x == 0));
        assert!(b[8190..].iter().all(|&x| x == 2));
        p.set_len(9000);
        assert!(p.to_bytes()[8195..].iter().all(|&x| x == 0));
    }
}
