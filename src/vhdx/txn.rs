//! Metadata transactions for offline maintenance (`resize`, `compact`): a batch of changed
//! metadata pages (BAT, sector bitmaps, region tables, metadata items) made durable as *one* log
//! entry by the engine's WAL writer ([`super::log::writer`]).
//!
//! Why not the [`super::write::Writer`]: it logs pages it derives from its in-memory BAT and
//! bitmap cache, whose shape is fixed at open; a resize changes that shape, the region table and
//! the metadata region. Here the caller stages the new contents of whole pages, and the WAL
//! snapshots exactly those. A batch never holds more than [`Txn::MAX_PAGES`], so the WAL writes
//! it as a single entry: after a crash, replay applies all of it or none of it.
//!
//! The session protocol is the writer's: the WAL starts with an empty entry under a new LogGuid,
//! then the headers name it (with a new FileWriteGuid, and a new DataWriteGuid only when the
//! disk's contents change), and [`Txn::finish`] empties the log again.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::error::{Error, Result};
use super::format::*;
use super::header::Headers;
use super::log::writer::{PageSource, Wal};
use super::storage::Storage;

/// The pages staged for the next commit; every other page reads from the file.
struct Staged {
    storage: Arc<dyn Storage>,
    pages: Mutex<BTreeMap<u64, Box<[u8; LOG_SECTOR_SIZE]>>>,
}

impl PageSource for Staged {
    fn page(&self, file_offset: u64, out: &mut [u8; LOG_SECTOR_SIZE]) -> io::Result<()> {
        if let Some(p) = self
            .pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&file_offset)
        {
            out.copy_from_slice(&p[..]);
            return Ok(());
        }
        self.storage.read_at(&mut out[..], file_offset).map(drop)
    }
}

pub struct Txn {
    storage: Arc<dyn Storage>,
    headers: Headers,
    staged: Arc<Staged>,
    wal: Option<Wal>,
}

impl Txn {
    /// The most pages one commit holds: one log entry with a single descriptor sector (the
    /// WAL's limit is 126 for any log of 1 MiB or more).
    pub const MAX_PAGES: usize = 120;

    /// Starts a session on a file whose log is empty (it was opened writable, so any log was
    /// replayed). `data_changes`: the virtual disk's contents change, so the DataWriteGuid does
    /// too (children linked to the old one would no longer match).
    pub fn begin(storage: Arc<dyn Storage>, headers: &Headers, data_changes: bool) -> Result<Txn> {
        let mut headers = headers.clone();
        let h = headers.current;
        if h.log_length == 0 {
            return Err(Error::Unsupported(
                "a file without a log cannot be changed".into(),
            ));
        }
        let staged = Arc::new(Staged {
            storage: Arc::clone(&storage),
            pages: Mutex::new(BTreeMap::new()),
        });
        let log_guid = Uuid::new_v4();
        let wal = Wal::start(
            Arc::clone(&storage),
            Arc::clone(&staged) as Arc<dyn PageSource>,
            Box::new(|_| {}),
            h.log_offset,
            u64::from(h.log_length),
            log_guid,
        )
        .map_err(|e| Error::io("starting the log", e))?;
        let mut new = h;
        new.file_write_guid = Uuid::new_v4();
        if data_changes {
            new.data_write_guid = Uuid::new_v4();
        }
        new.log_guid = log_guid;
        headers.update(&*storage, new)?;
        Ok(Txn {
            storage,
            headers,
            staged,
            wal: Some(wal),
        })
    }

    /// Stages `bytes` at file offset `offset` for the next commit. Pages whose contents do not
    /// change are not staged.
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let ps = LOG_SECTOR_SIZE as u64;
        let mut at = 0usize;
        while at < bytes.len() {
            let pos = offset + at as u64;
            let page = pos / ps * ps;
            let within = (pos - page) as usize;
            let n = (LOG_SECTOR_SIZE - within).min(bytes.len() - at);
            let mut buf = Box::new([0u8; LOG_SECTOR_SIZE]);
            self.staged
                .page(page, &mut buf)
                .map_err(|e| Error::io("reading a metadata page", e))?;
            if buf[within..within + n] != bytes[at..at + n] {
                buf[within..within + n].copy_from_slice(&bytes[at..at + n]);
                self.staged
                    .pages
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(page, buf);
            }
            at += n;
        }
        Ok(())
    }

    /// Pages staged so far.
    pub fn staged(&self) -> usize {
        self.staged
            .pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Makes the staged pages durable as one log entry (after everything written to the file
    /// before the call) and writes them in place.
    pub fn commit(&self) -> Result<()> {
        let pages: Vec<u64> = self
            .staged
            .pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        if pages.len() > Self::MAX_PAGES {
            // A caller's bug: more would be split over several entries, losing atomicity.
            return Err(Error::InvalidArgument(format!(
                "{} metadata pages in one transaction (at most {})",
                pages.len(),
                Self::MAX_PAGES
            )));
        }
        let wal = self.wal.as_ref().expect("open until finish");
        let r = if pages.is_empty() {
            wal.flush()
        } else {
            // The guard ends before the flush waits for the commit (see `Wal::change`).
            let marked = wal.change().mark_dirty(&pages);
            marked.and_then(|_| wal.flush())
        };
        r.map_err(|e| Error::io("committing a metadata change", e))?;
        // The WAL wrote them in place before the commit returned: the file has them now.
        self.staged
            .pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(())
    }

    /// Commits what is staged, makes the in-place writes durable and empties the log.
    pub fn finish(mut self) -> Result<()> {
        self.commit()?;
        let wal = self.wal.take().expect("open until finish");
        wal.shutdown()
            .map_err(|e| Error::io("committing the log", e))?;
        self.storage.flush().map_err(|e| Error::io("flushing", e))?;
        let mut h = self.headers.current;
        h.log_guid = Uuid::nil();
        self.headers.update(&*self.storage, h)
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhdx::create::{create_on, CreateOptions};
    use crate::vhdx::file::VhdxFile;
    use crate::vhdx::storage::MemStorage;

    #[test]
    fn a_batch_larger_than_one_log_entry_is_refused_and_a_finished_one_leaves_a_clean_log() {
        let m = Arc::new(MemStorage::default());
        let options = CreateOptions {
            virtual_size: Some(64 << 20),
            ..Default::default()
        };
        create_on(&*m, &options).unwrap();
        let f = VhdxFile::open_storage(m.clone(), "t.vhdx".into(), true).unwrap();
        let headers = f.current_headers();
        let txn = Txn::begin(m.clone(), &headers, false).unwrap();
        // Pages of the free space after the structures: staged, not yet in the file.
        let base = m.len().unwrap();
        for i in 0..=Txn::MAX_PAGES as u64 {
            txn.write(base + i * 4096, &[0xa5; 8]).unwrap();
        }
        assert_eq!(txn.staged(), Txn::MAX_PAGES + 1);
        assert!(txn.commit().is_err());
        let mut b = [0u8; 8];
        m.read_at(&mut b, base).unwrap();
        assert_eq!(b, [0; 8], "nothing written in place");
        drop(txn);
        drop(f);

        // (Reopening replays the abandoned session's empty log, which renews the GUIDs.)
        let f = VhdxFile::open_storage(m.clone(), "t.vhdx".into(), true).unwrap();
        let data_guid = f.data_write_guid();
        let txn = Txn::begin(m.clone(), &f.current_headers(), false).unwrap();
        txn.write(base, &[0x5a; 8]).unwrap();
        txn.finish().unwrap();
        m.read_at(&mut b, base).unwrap();
        assert_eq!(b, [0x5a; 8]);
        drop(f);
        let f = VhdxFile::open_storage(m, "t.vhdx".into(), false).unwrap();
        assert_eq!(f.log_state, crate::vhdx::LogState::Clean);
        assert_eq!(
            f.data_write_guid(),
            data_guid,
            "contents unchanged: same DataWriteGuid"
        );
    }
}
