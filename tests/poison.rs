//! An I/O error poisons a writable file: the failing request and every later one fail cleanly,
//! and nothing more is written to the file, whoever (a queue thread or the WAL worker) would
//! have written it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use vhost_user_vhdx::vhdx::create::{self, CreateOptions};
use vhost_user_vhdx::vhdx::{Chain, Error, MemStorage, Storage, VhdxFile};

const MIB: u64 = 1 << 20;

/// A memory file whose writes and flushes start failing on demand, counting what still gets
/// through afterwards.
#[derive(Default)]
struct Failing {
    mem: MemStorage,
    broken: AtomicBool,
    writes_after_break: AtomicUsize,
}

impl Failing {
    fn check(&self) -> io::Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            self.writes_after_break.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::other("injected I/O error"));
        }
        Ok(())
    }
}

impl Storage for Failing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check()?;
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.check()
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        self.mem.set_len(len)
    }
}

fn open(storage: Arc<Failing>) -> Chain {
    let leaf = VhdxFile::open_storage(storage, "mem.vhdx".into(), true).unwrap();
    Chain::from_layers(vec![leaf]).unwrap()
}

fn new_file() -> Arc<Failing> {
    let f = Arc::new(Failing::default());
    create::create_on(
        &f.mem,
        &CreateOptions {
            virtual_size: Some(64 * MIB),
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap();
    f
}

fn assert_poisoned(r: vhost_user_vhdx::vhdx::Result<()>, what: &str) {
    match r {
        Err(Error::Poisoned(_)) => {}
        other => panic!("{what} after the error: {other:?}, expected Poisoned"),
    }
}

#[test]
fn a_failed_data_write_poisons_the_file() {
    let f = new_file();
    let chain = open(Arc::clone(&f));
    chain.write_at(&[1u8; 4096], 0).unwrap();
    chain.flush().unwrap();
    f.broken.store(true, Ordering::SeqCst);
    assert!(chain.write_at(&[2u8; 4096], 0).is_err());
    let attempts = f.writes_after_break.load(Ordering::SeqCst);
    assert_poisoned(chain.write_at(&[3u8; 4096], 8 * MIB), "a write");
    assert_poisoned(chain.discard(0, MIB), "a discard");
    assert_poisoned(chain.write_zeroes(0, MIB), "a write-zeroes");
    assert_poisoned(chain.flush(), "a flush");
    assert!(
        chain.close().is_err(),
        "a poisoned file does not close cleanly"
    );
    assert_eq!(
        f.writes_after_break.load(Ordering::SeqCst),
        attempts,
        "something tried to write after the file was poisoned"
    );
    // Reads still work (the data written before the error is there).
    f.broken.store(false, Ordering::SeqCst);
}

#[test]
fn a_failed_log_commit_poisons_the_file() {
    let f = new_file();
    let chain = open(Arc::clone(&f));
    // Allocations leave BAT pages for the WAL worker to log.
    for i in 0..8 {
        chain.write_at(&[7u8; 4096], i * MIB).unwrap();
    }
    f.broken.store(true, Ordering::SeqCst);
    assert!(chain.flush().is_err(), "the commit must fail");
    let attempts = f.writes_after_break.load(Ordering::SeqCst);
    assert_poisoned(chain.write_at(&[3u8; 4096], 0), "a write");
    assert_poisoned(chain.flush(), "a flush");
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(f.writes_after_break.load(Ordering::SeqCst), attempts);
    drop(chain);
    // What reached the file is still a valid VHDX: it opens (replaying its log) and reads.
    f.broken.store(false, Ordering::SeqCst);
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(f.mem.snapshot()));
    let reopened = VhdxFile::open_storage(storage, "mem.vhdx".into(), false).unwrap();
    assert!(reopened.virtual_size() == 64 * MIB);
}
