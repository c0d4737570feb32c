//! Crash-point enumeration: a workload runs on a file layer that records every write and flush;
//! then, for every boundary of that record, the file as a crash would leave it is rebuilt with
//! the unflushed writes (a) all lost, (b) a random subset applied in random order, (c) torn at
//! 4 KiB, and opened again. Each must replay, check clean, give back every byte a completed
//! flush covered, and never show a sector anything but a value the workload put there (or what
//! it had before): no block ever reads another block's stale data.

mod common;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use vhost_user_vhdx::vhdx::check;
use vhost_user_vhdx::vhdx::create::{self, CreateOptions};
use vhost_user_vhdx::vhdx::{Chain, MemStorage, Storage, VhdxFile};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
const DISK: u64 = 8 * MIB + 64 * 1024;
const BLOCK: u32 = MIB as u32;

#[derive(Clone, Debug)]
enum Event {
    Write(u64, Arc<Vec<u8>>),
    SetLen(u64),
    Flush,
    /// Workload op `n` is about to start; every op before it returned.
    OpStart(usize),
    /// The flush of op `n` returned.
    FlushDone(usize),
}

/// Storage that applies everything to a memory file and records it.
#[derive(Default)]
struct Recorder {
    mem: MemStorage,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    fn record(&self, e: Event) {
        self.events.lock().unwrap().push(e);
    }
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Recorded under the same lock order as applied, so the record is the true order.
        let mut ev = self.events.lock().unwrap();
        self.mem.write_at(buf, offset)?;
        ev.push(Event::Write(offset, Arc::new(buf.to_vec())));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.record(Event::Flush);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut ev = self.events.lock().unwrap();
        self.mem.set_len(len)?;
        ev.push(Event::SetLen(len));
        Ok(())
    }
}

/// A crash image: the durable file, shared, with the writes that made it to disk laid over it
/// in 4 KiB pages, so that thousands of images cost no copies of the whole file.
struct CrashImage {
    base: Arc<Vec<u8>>,
    state: Mutex<CrashState>,
}

struct CrashState {
    pages: std::collections::BTreeMap<u64, Box<[u8; 4096]>>,
    len: u64,
    /// Bytes of `base` past this read as zeros (the file was cut shorter).
    base_limit: u64,
}

impl CrashImage {
    fn new(base: Arc<Vec<u8>>) -> Self {
        let len = base.len() as u64;
        CrashImage {
            base,
            state: Mutex::new(CrashState {
                pages: Default::default(),
                len,
                base_limit: len,
            }),
        }
    }

    fn page(base: &[u8], st: &CrashState, page: u64) -> [u8; 4096] {
        if let Some(p) = st.pages.get(&page) {
            return **p;
        }
        let mut out = [0u8; 4096];
        let limit = st.base_limit.min(base.len() as u64);
        if page < limit {
            let n = (limit - page).min(4096) as usize;
            out[..n].copy_from_slice(&base[page as usize..page as usize + n]);
        }
        out
    }
}

/// `len` bytes at file offset `offset`, cut at 4 KiB page boundaries: for each piece, where it
/// starts in the buffer, the offset of its page, where it starts in the page, and its length.
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (usize, u64, usize, usize)> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at as u64;
        let page = pos / 4096 * 4096;
        let within = (pos - page) as usize;
        let n = (4096 - within).min(len - at);
        let piece = (at, page, within, n);
        at += n;
        Some(piece)
    })
}

impl Storage for CrashImage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let st = self.state.lock().unwrap();
        for (at, page, within, n) in pieces(offset, buf.len()) {
            if page + within as u64 >= st.len {
                buf[at..].fill(0);
                break;
            }
            let p = Self::page(&self.base, &st, page);
            buf[at..at + n].copy_from_slice(&p[within..within + n]);
        }
        Ok(buf.len().min(st.len.saturating_sub(offset) as usize))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        for (at, page, within, n) in pieces(offset, buf.len()) {
            let mut p = Self::page(&self.base, &st, page);
            p[within..within + n].copy_from_slice(&buf[at..at + n]);
            st.pages.insert(page, Box::new(p));
        }
        st.len = st.len.max(offset + buf.len() as u64);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap().len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        if len < st.len {
            st.base_limit = st.base_limit.min(len);
            let cut = len / 4096 * 4096;
            if len % 4096 != 0 {
                let mut p = Self::page(&self.base, &st, cut);
                p[(len - cut) as usize..].fill(0);
                st.pages.insert(cut, Box::new(p));
            }
            let from = len.div_ceil(4096) * 4096;
            st.pages.retain(|&k, _| k < from);
        }
        st.len = len;
        Ok(())
    }
}

/// What a sector may hold: a tag names the op that wrote it (0 = zeros).
type Tag = u64;
const ZEROS: Tag = 0;
const PARENT: Tag = u64::MAX;

fn sector_bytes(tag: Tag, sector: u64, parent: &[u8]) -> Vec<u8> {
    match tag {
        ZEROS => vec![0; SECTOR as usize],
        PARENT => parent[(sector * SECTOR) as usize..((sector + 1) * SECTOR) as usize].to_vec(),
        _ => {
            let mut v = vec![(tag as u8) ^ (sector as u8) | 1; SECTOR as usize];
            v[..8].copy_from_slice(&tag.to_le_bytes());
            v[8..16].copy_from_slice(&sector.to_le_bytes());
            v
        }
    }
}

enum Op {
    Write { sector: u64, count: u64, tag: Tag },
    Zero { sector: u64, count: u64 },
    Discard { sector: u64, count: u64 },
    Flush,
}

/// Sectors an op sets and to what; discards affect whole blocks only.
fn effect(op: &Op) -> Vec<(u64, Tag)> {
    let per_block = u64::from(BLOCK) / SECTOR;
    let disk = DISK / SECTOR;
    match *op {
        Op::Write { sector, count, tag } => (sector..sector + count).map(|s| (s, tag)).collect(),
        Op::Zero { sector, count } => (sector..sector + count).map(|s| (s, ZEROS)).collect(),
        Op::Discard { sector, count } => {
            let first = sector.div_ceil(per_block) * per_block;
            let mut v = Vec::new();
            let mut b = first;
            while b < sector + count {
                let end = (b + per_block).min(disk);
                if end <= sector + count {
                    v.extend((b..end).map(|s| (s, ZEROS)));
                }
                b += per_block;
            }
            v
        }
        Op::Flush => Vec::new(),
    }
}

/// `aligned` percent of the ops start on a block boundary (0 keeps the seed's original
/// sequence): whole-block writes, discards and write-zeroes over partially present blocks.
fn workload(rng: &mut StdRng, n: usize, aligned: u32) -> Vec<Op> {
    let disk = DISK / SECTOR;
    let per_block = u64::from(BLOCK) / SECTOR;
    (0..n)
        .map(|i| {
            let count = match rng.gen_range(0..10) {
                0..=6 => rng.gen_range(1..=16),
                7..=8 => rng.gen_range(1..=4096),
                _ => per_block,
            }
            .min(disk);
            let mut sector = rng.gen_range(0..=disk - count);
            if aligned > 0 && rng.gen_range(0..100) < aligned {
                sector = sector / per_block * per_block;
                if rng.gen_bool(0.5) {
                    sector = (sector + per_block).min(disk - count) / per_block * per_block;
                }
            }
            match rng.gen_range(0..100) {
                0..=59 => Op::Write {
                    sector,
                    count,
                    tag: i as u64 + 1,
                },
                60..=71 => Op::Zero { sector, count },
                72..=83 => Op::Discard { sector, count },
                _ => Op::Flush,
            }
        })
        .collect()
}

struct Outcome {
    points: usize,
    recovered: usize,
    flushed_bytes_lost: u64,
    failures: Vec<String>,
}

/// What a run exercises.
#[derive(Clone, Copy)]
struct Mode {
    differencing: bool,
    ops: usize,
    /// Percent of ops aligned to a block (see [`workload`]).
    aligned: u32,
    /// Commit the log after every metadata change (`VhdxFile::commit_every_change`), so that a
    /// crash point lies between any two metadata changes of one operation.
    commit_every_change: bool,
}

/// Runs the workload on a new file over `parent` (differencing) or alone, then enumerates the
/// crash points.
fn enumerate(seed: u64, mode: Mode) -> Outcome {
    let differencing = mode.differencing;
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = common::tempdir("crash-");
    let parent_path = dir.path().join("parent.vhdx");
    let leaf_path = dir.path().join("leaf.vhdx");
    let mut parent_content = vec![0u8; DISK as usize];
    let base_opts = CreateOptions {
        virtual_size: Some(DISK),
        block_size: Some(BLOCK),
        ..Default::default()
    };
    let initial: Vec<u8> = if differencing {
        create::create(&parent_path, &base_opts).unwrap();
        let c = Chain::open(
            &parent_path,
            &vhost_user_vhdx::vhdx::ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        for (i, chunk) in parent_content.chunks_mut(64 * 1024).enumerate() {
            if i % 3 != 1 {
                chunk
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (i * 7 + j) as u8 | 1);
            }
        }
        c.write_at(&parent_content, 0).unwrap();
        c.close().unwrap();
        create::create(
            &leaf_path,
            &CreateOptions {
                parent: Some(parent_path.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        std::fs::read(&leaf_path).unwrap()
    } else {
        let m = MemStorage::default();
        create::create_on(&m, &base_opts).unwrap();
        m.into_inner()
    };
    let parent_file = || VhdxFile::open(&parent_path, false).unwrap();
    let open_chain =
        |storage: Arc<dyn Storage>, writable: bool| -> vhost_user_vhdx::vhdx::Result<Chain> {
            let leaf = VhdxFile::open_storage(storage, leaf_path.clone(), writable)?;
            if differencing {
                Chain::from_layers(vec![leaf, parent_file()])
            } else {
                Chain::from_layers(vec![leaf])
            }
        };

    // Run the workload, recording.
    let ops = workload(&mut rng, mode.ops, mode.aligned);
    let rec = Arc::new(Recorder {
        mem: MemStorage::new(initial.clone()),
        events: Mutex::new(Vec::new()),
    });
    let start_tag = if differencing { PARENT } else { ZEROS };
    // model[s] after each flush op, by op index.
    let mut model = vec![start_tag; (DISK / SECTOR) as usize];
    let mut snapshots: HashMap<usize, Vec<Tag>> = HashMap::new();
    {
        let chain = open_chain(rec.clone(), true).unwrap();
        chain.leaf().commit_every_change(mode.commit_every_change);
        for (i, op) in ops.iter().enumerate() {
            rec.record(Event::OpStart(i));
            match *op {
                Op::Write { sector, count, tag } => {
                    let mut buf = Vec::with_capacity((count * SECTOR) as usize);
                    for s in sector..sector + count {
                        buf.extend(sector_bytes(tag, s, &parent_content));
                    }
                    chain.write_at(&buf, sector * SECTOR).unwrap();
                }
                Op::Zero { sector, count } => {
                    chain.write_zeroes(sector * SECTOR, count * SECTOR).unwrap()
                }
                Op::Discard { sector, count } => {
                    chain.discard(sector * SECTOR, count * SECTOR).unwrap()
                }
                Op::Flush => {
                    chain.flush().unwrap();
                    rec.record(Event::FlushDone(i));
                }
            }
            for (s, t) in effect(op) {
                model[s as usize] = t;
            }
            if matches!(op, Op::Flush) {
                snapshots.insert(i, model.clone());
            }
        }
        rec.record(Event::OpStart(ops.len()));
        chain.close().unwrap();
    }
    let events = rec.events.lock().unwrap().clone();

    // Walk the record, keeping the durable image up to date.
    let mut durable = Arc::new(initial.clone());
    let mut pending: Vec<usize> = Vec::new();
    let mut last_flush_done: Option<usize> = None;
    let mut next_op = 0usize;
    let mut out = Outcome {
        points: 0,
        recovered: 0,
        flushed_bytes_lost: 0,
        failures: Vec::new(),
    };
    let apply = |img: &mut Vec<u8>, e: &Event| match e {
        Event::Write(off, data) => {
            let end = (*off as usize) + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].copy_from_slice(data);
        }
        Event::SetLen(len) => img.resize(*len as usize, 0),
        _ => {}
    };
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Flush => {
                let d = Arc::make_mut(&mut durable);
                for &p in &pending {
                    apply(d, &events[p]);
                }
                pending.clear();
            }
            Event::Write(..) | Event::SetLen(_) => pending.push(i),
            Event::OpStart(n) => next_op = *n,
            Event::FlushDone(n) => last_flush_done = Some(*n),
        }
        if !matches!(e, Event::Write(..) | Event::SetLen(_) | Event::Flush) {
            continue;
        }
        // Acceptable tags per sector: the state at the last completed flush, plus anything an
        // op started since then wrote (ops up to `next_op`, the one in progress included).
        let base = match last_flush_done {
            Some(f) => snapshots[&f].clone(),
            None => vec![start_tag; model.len()],
        };
        let first_unflushed = last_flush_done.map_or(0, |f| f + 1);
        let mut extra: HashMap<u64, Vec<Tag>> = HashMap::new();
        for op in &ops[first_unflushed..=next_op.min(ops.len() - 1)] {
            for (s, t) in effect(op) {
                extra.entry(s).or_default().push(t);
            }
        }
        for variant in 0..3 {
            if variant > 0 && pending.is_empty() {
                break;
            }
            let img = CrashImage::new(Arc::clone(&durable));
            let put = |e: &Event| match e {
                Event::Write(off, data) => img.write_at(data, *off).unwrap(),
                Event::SetLen(len) => img.set_len(*len).unwrap(),
                _ => {}
            };
            match variant {
                0 => {}
                1 => {
                    let mut chosen: Vec<usize> = pending
                        .iter()
                        .copied()
                        .filter(|_| rng.gen_bool(0.5))
                        .collect();
                    chosen.shuffle(&mut rng);
                    for p in chosen {
                        put(&events[p]);
                    }
                }
                _ => {
                    for &p in &pending {
                        match &events[p] {
                            Event::Write(off, data) => {
                                for (k, piece) in data.chunks(4096).enumerate() {
                                    if rng.gen_bool(0.5) {
                                        img.write_at(piece, off + (k * 4096) as u64).unwrap();
                                    }
                                }
                            }
                            other => {
                                if rng.gen_bool(0.5) {
                                    put(other)
                                }
                            }
                        }
                    }
                }
            }
            out.points += 1;
            let what = format!("event {i} variant {variant}");
            match verify(img, &open_chain, &base, &extra, &parent_content) {
                Ok(()) => out.recovered += 1,
                Err((msg, lost)) => {
                    out.flushed_bytes_lost += lost;
                    if out.failures.len() < 5 {
                        out.failures.push(format!("{what}: {msg}"));
                    }
                }
            }
        }
    }
    out
}

fn verify(
    img: CrashImage,
    open_chain: &dyn Fn(Arc<dyn Storage>, bool) -> vhost_user_vhdx::vhdx::Result<Chain>,
    base: &[Tag],
    extra: &HashMap<u64, Vec<Tag>>,
    parent: &[u8],
) -> Result<(), (String, u64)> {
    let storage: Arc<dyn Storage> = Arc::new(img);
    let chain = open_chain(storage, true).map_err(|e| (format!("reopen: {e}"), 0))?;
    let report = check::check_file(chain.leaf());
    if !report.corruptions.is_empty() {
        return Err((format!("check: {:?}", report.corruptions), 0));
    }
    let mut disk = vec![0u8; DISK as usize];
    chain
        .read_at(&mut disk, 0)
        .map_err(|e| (format!("read: {e}"), 0))?;
    let mut lost = 0;
    let mut first_error = None;
    for (s, got) in disk.chunks(SECTOR as usize).enumerate() {
        let s = s as u64;
        let mut allowed = vec![base[s as usize]];
        if let Some(x) = extra.get(&s) {
            allowed.extend(x);
        }
        if allowed.iter().any(|&t| sector_bytes(t, s, parent) == got) {
            continue;
        }
        if !extra.contains_key(&s) {
            lost += SECTOR;
        }
        first_error.get_or_insert_with(|| {
            format!(
                "sector {s} holds {:02x?}…, allowed tags {allowed:?}",
                &got[..16]
            )
        });
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err((e, lost)),
    }
}

fn run(seed: u64, mode: Mode) {
    let out = enumerate(seed, mode);
    println!(
        "crash points: {}, recovered: {}, flushed bytes lost: {}",
        out.points, out.recovered, out.flushed_bytes_lost
    );
    assert!(
        out.failures.is_empty() && out.recovered == out.points && out.flushed_bytes_lost == 0,
        "{} of {} crash points did not recover; first failures:\n{}",
        out.points - out.recovered,
        out.points,
        out.failures.join("\n")
    );
}

const NORMAL: Mode = Mode {
    differencing: false,
    ops: 1000,
    aligned: 0,
    commit_every_change: false,
};

#[test]
fn every_crash_point_of_a_dynamic_file_recovers() {
    run(1, NORMAL);
}

#[test]
fn every_crash_point_of_a_differencing_file_recovers() {
    run(
        2,
        Mode {
            differencing: true,
            ..NORMAL
        },
    );
}

/// A commit between any two metadata changes of one operation: partially present blocks of a
/// differencing file taken whole by a write, write-zeroes or discard must never be durable as
/// PARTIALLY_PRESENT with their bits cleared (every sector would read from the parent again).
#[test]
fn a_commit_between_any_two_metadata_changes_of_a_differencing_file_recovers() {
    for seed in [3, 4] {
        run(
            seed,
            Mode {
                differencing: true,
                ops: 300,
                aligned: 40,
                commit_every_change: true,
            },
        );
    }
}

#[test]
fn a_commit_between_any_two_metadata_changes_of_a_dynamic_file_recovers() {
    run(
        5,
        Mode {
            ops: 300,
            aligned: 40,
            commit_every_change: true,
            ..NORMAL
        },
    );
}
