//! In-memory files for the harnesses.

use std::io;
use std::sync::Mutex;

use vhost_user_vhdx::vhdx::{MemStorage, Storage};

/// The largest a file may grow. More than an input decodes to ([`crate::sparse::MAX_FILE`]): a
/// writer grows a file by at least 32 MiB at a time.
pub const MAX_GROWTH: u64 = 64 << 20;

fn too_large(len: u64) -> io::Error {
    io::Error::other(format!("fuzz file limit: {len} bytes"))
}

/// A memory file that refuses to grow past [`MAX_GROWTH`], so that a hostile size (a log's
/// LastFileOffset, a BAT entry) is an I/O error rather than an allocation of the harness.
#[derive(Default)]
pub struct Capped(pub MemStorage);

impl Capped {
    pub fn new(bytes: Vec<u8>) -> Self {
        Capped(MemStorage::new(bytes))
    }
}

impl Storage for Capped {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > MAX_GROWTH {
            return Err(too_large(end));
        }
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > MAX_GROWTH {
            return Err(too_large(len));
        }
        self.0.set_len(len)
    }
}

/// A memory file that knows what a crash would keep: `durable` is the file as of the last
/// flush, `pending` the writes and size changes since, in order.
pub struct Crashable {
    current: Capped,
    state: Mutex<Durability>,
}

enum Change {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

struct Durability {
    durable: Vec<u8>,
    pending: Vec<Change>,
}

impl Crashable {
    pub fn new(bytes: Vec<u8>) -> Self {
        Crashable {
            current: Capped::new(bytes.clone()),
            state: Mutex::new(Durability {
                durable: bytes,
                pending: Vec::new(),
            }),
        }
    }

    /// The file after a crash now: the durable file with the pending changes whose bit in
    /// `keep` (cycled) is set applied in order, the rest lost.
    pub fn crash(&self, keep: u64) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        let mut file = st.durable.clone();
        for (i, c) in st.pending.iter().enumerate() {
            if keep >> (i % 64) & 1 == 0 {
                continue;
            }
            apply(&mut file, c);
        }
        file
    }
}

fn apply(file: &mut Vec<u8>, c: &Change) {
    match c {
        Change::Write(off, data) => {
            let end = *off as usize + data.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[*off as usize..end].copy_from_slice(data);
        }
        Change::SetLen(len) => file.resize(*len as usize, 0),
    }
}

impl Storage for Crashable {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.current.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        self.current.write_at(buf, offset)?;
        st.pending.push(Change::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        let pending = std::mem::take(&mut st.pending);
        for c in &pending {
            apply(&mut st.durable, c);
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.current.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        self.current.set_len(len)?;
        st.pending.push(Change::SetLen(len));
        Ok(())
    }
}
