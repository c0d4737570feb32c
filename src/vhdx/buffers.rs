//! Where the data of a read goes and where the data of a write comes from.
//!
//! The engine resolves a virtual range into file extents and then asks the buffer to move the
//! bytes itself. A plain byte slice copies through [`Storage`]; the vhost-user backend
//! implements these traits over guest memory with vectored positioned I/O, so guest data moves
//! between the image file and the mapped guest pages without a bounce buffer, and the engine
//! stays free of `unsafe`.

use std::io;

use super::storage::Storage;

/// An error of a [`WriteSource`]'s own memory (a guest buffer the kernel could not read:
/// EFAULT), not of the storage: the write fails, and the file is not poisoned for it. Wrap it in
/// an `io::Error` ([`SourceFault::error`]).
#[derive(Debug)]
pub struct SourceFault(pub String);

impl std::fmt::Display for SourceFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SourceFault {}

impl SourceFault {
    pub fn error(why: impl Into<String>) -> io::Error {
        io::Error::other(SourceFault(why.into()))
    }

    /// True if `e` is a source fault.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<SourceFault>())
    }
}

/// The destination of a read of `len()` bytes.
#[allow(clippy::len_without_is_empty)] // a request length, not a collection
pub trait ReadTarget {
    fn len(&self) -> usize;
    /// Fills `[at, at + len)` with the file's bytes at `file_offset`.
    fn read_from(
        &mut self,
        at: usize,
        len: usize,
        storage: &dyn Storage,
        file_offset: u64,
    ) -> io::Result<()>;
    /// Fills `[at, at + len)` with zeros.
    fn fill_zero(&mut self, at: usize, len: usize);
}

/// The source of a write of `len()` bytes.
#[allow(clippy::len_without_is_empty)] // a request length, not a collection
pub trait WriteSource {
    fn len(&self) -> usize;
    /// Writes `[at, at + len)` to the file at `file_offset`.
    fn write_to(
        &self,
        at: usize,
        len: usize,
        storage: &dyn Storage,
        file_offset: u64,
    ) -> io::Result<()>;
}

impl ReadTarget for &mut [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read_from(
        &mut self,
        at: usize,
        len: usize,
        storage: &dyn Storage,
        file_offset: u64,
    ) -> io::Result<()> {
        storage.read_at(&mut self[at..at + len], file_offset)?;
        Ok(())
    }

    fn fill_zero(&mut self, at: usize, len: usize) {
        self[at..at + len].fill(0);
    }
}

impl WriteSource for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn write_to(
        &self,
        at: usize,
        len: usize,
        storage: &dyn Storage,
        file_offset: u64,
    ) -> io::Result<()> {
        storage.write_at(&self[at..at + len], file_offset)
    }
}

/// `len` zero bytes, written without a buffer of that size.
pub struct Zeros(pub usize);

impl WriteSource for Zeros {
    fn len(&self) -> usize {
        self.0
    }

    fn write_to(
        &self,
        _at: usize,
        len: usize,
        storage: &dyn Storage,
        file_offset: u64,
    ) -> io::Result<()> {
        storage.write_zeroes(file_offset, len as u64)
    }
}
