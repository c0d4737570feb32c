//! A structure-aware sequence of writes, discards, write-zeroes, flushes, clean reopens and
//! crashes against a model of the disk. After every reopen and every crash the image must
//! open (replaying its log), `check` clean and read back what the model allows: exactly the
//! model after a clean close; after a crash, per sector the value at the last completed flush
//! or one written since.
//!
//! The sequence can ask for a commit after every metadata change
//! (`VhdxFile::commit_every_change`), so that crashes land between the changes of one
//! operation, not only where the WAL worker's timer happens to commit.

use std::path::PathBuf;
use std::sync::Arc;

use arbitrary::{Arbitrary, Result, Unstructured};
use vhost_user_vhdx::vhdx::{check, Chain, VhdxFile};

use crate::queue_requests::small_image;
use crate::storage::Crashable;

const DISK: u64 = 4 << 20;
const BLOCK: u64 = 1 << 20;
const MAX_OPS: usize = 48;

#[derive(Arbitrary, Debug)]
enum Op {
    /// `whole`: from a block boundary, one or two blocks; else any sectors.
    Write {
        at: u16,
        len: u16,
        byte: u8,
        whole: bool,
    },
    Discard {
        at: u16,
        len: u16,
        whole: bool,
    },
    Zero {
        at: u16,
        len: u16,
        whole: bool,
    },
    Flush,
    Reopen,
    /// Keep the pending writes whose bit (cycled) is set, lose the others.
    Crash {
        keep: u64,
    },
}

struct Model {
    sectors: u64,
    lss: u64,
    /// What each sector holds now (every byte the same).
    now: Vec<u8>,
    /// What it held at the last completed flush.
    flushed: Vec<u8>,
    /// Values written since then.
    since: Vec<Vec<u8>>,
}

impl Model {
    fn set(&mut self, first: u64, count: u64, value: u8) {
        for s in first..first + count {
            let s = s as usize;
            self.now[s] = value;
            if !self.since[s].contains(&value) {
                self.since[s].push(value);
            }
        }
    }

    fn flush(&mut self) {
        self.flushed.clone_from(&self.now);
        self.since.iter_mut().for_each(Vec::clear);
    }

    /// After a crash and reopen: the disk read is the new truth, if allowed.
    fn after_crash(&mut self, disk: &[u8]) {
        for (s, got) in disk.chunks(self.lss as usize).enumerate() {
            let allowed = |v: u8| crate::uniform(got, v);
            assert!(
                allowed(self.flushed[s]) || self.since[s].iter().any(|&v| allowed(v)),
                "sector {s} after a crash holds {:02x?}…; flushed {:#x}, written since {:x?}",
                &got[..16],
                self.flushed[s],
                self.since[s]
            );
            self.now[s] = got[0];
        }
        self.flush();
    }

    fn exact(&self, disk: &[u8]) {
        for (s, got) in disk.chunks(self.lss as usize).enumerate() {
            assert!(
                crate::uniform(got, self.now[s]),
                "sector {s} holds {:02x?}…, the model {:#x}",
                &got[..16],
                self.now[s]
            );
        }
    }

    /// The sectors an op covers.
    fn range(&self, at: u16, len: u16, whole: bool) -> (u64, u64) {
        let per_block = BLOCK / self.lss;
        if whole {
            let first = u64::from(at) % (self.sectors / per_block) * per_block;
            let count = per_block * (1 + u64::from(len) % 2);
            (first, count.min(self.sectors - first))
        } else {
            let first = u64::from(at) % self.sectors;
            let count = 1 + u64::from(len) % (self.sectors - first).min(4096);
            (first, count)
        }
    }
}

fn open(storage: Arc<Crashable>, commit_each: bool) -> Chain {
    let file = VhdxFile::open_storage(storage, PathBuf::from("/fuzz/disk.vhdx"), true)
        .unwrap_or_else(|e| panic!("reopen: {e}"));
    let report = check::check_file(&file);
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    file.commit_every_change(commit_each);
    Chain::from_layers(vec![file]).unwrap()
}

fn read_disk(chain: &Chain) -> Vec<u8> {
    let mut disk = vec![0u8; DISK as usize];
    chain.read_at(&mut disk, 0).unwrap();
    disk
}

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = drive(&mut u);
}

fn drive(u: &mut Unstructured) -> Result<()> {
    let lss: u64 = if u.ratio(1, 4)? { 4096 } else { 512 };
    let commit_each: bool = u.arbitrary()?;
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS && !u.is_empty() {
        ops.push(Op::arbitrary(u)?);
    }
    let sectors = DISK / lss;
    let mut model = Model {
        sectors,
        lss,
        now: vec![0; sectors as usize],
        flushed: vec![0; sectors as usize],
        since: vec![Vec::new(); sectors as usize],
    };
    let mut storage = Arc::new(Crashable::new(small_image(lss as u32)));
    let mut chain = open(storage.clone(), commit_each);
    for op in ops {
        match op {
            Op::Write {
                at,
                len,
                byte,
                whole,
            } => {
                let (first, count) = model.range(at, len, whole);
                let buf = vec![byte; (count * lss) as usize];
                chain.write_at(&buf, first * lss).unwrap();
                model.set(first, count, byte);
            }
            Op::Zero { at, len, whole } => {
                let (first, count) = model.range(at, len, whole);
                chain.write_zeroes(first * lss, count * lss).unwrap();
                model.set(first, count, 0);
            }
            Op::Discard { at, len, whole } => {
                let (first, count) = model.range(at, len, whole);
                chain.discard(first * lss, count * lss).unwrap();
                // Only whole blocks read as zeros afterwards; the rest is left alone.
                let per_block = BLOCK / lss;
                let mut b = first.div_ceil(per_block) * per_block;
                while b + per_block <= first + count {
                    model.set(b, per_block, 0);
                    b += per_block;
                }
            }
            Op::Flush => {
                chain.flush().unwrap();
                model.flush();
            }
            Op::Reopen => {
                chain.close().unwrap();
                model.flush();
                chain = open(storage.clone(), commit_each);
                model.exact(&read_disk(&chain));
            }
            Op::Crash { keep } => {
                let image = storage.crash(keep);
                drop(chain);
                storage = Arc::new(Crashable::new(image));
                chain = open(storage.clone(), commit_each);
                model.after_crash(&read_disk(&chain));
            }
        }
    }
    model.exact(&read_disk(&chain));
    chain.close().unwrap();
    Ok(())
}
