//! Crash-point enumeration: a workload runs on a file layer that records every write and flush;
//! then, for every boundary of that record, the file as a crash would leave it is rebuilt with
//! the unflushed writes (a) all lost, (b) a random subset applied in random order, (c) torn at
//! 4 KiB, and opened again. Each must replay, check clean, give back every byte a completed
//! flush covered, and never show a sector anything but a value the workload put there (or what
//! it had before): no block ever reads another block's stale data.
//!
//! The serve-like runs batch ops as `serve`'s queue does (metadata waits deferred, one wait per
//! batch, while the log worker commits concurrently, so commits follow each other and the
//! pipelined order -- an entry's flush shared with the next commit's data -- is taken). They
//! also check a kill at every point: the file exactly as written so far must give back every
//! op whose batch completed.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::crash_storage::{apply, for_each_crash_point, CrashImage, Event, Outcome, Recorder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vhost_user_vhdx::vhdx::check;
use vhost_user_vhdx::vhdx::create::{self, CreateOptions};
use vhost_user_vhdx::vhdx::write::defer_metadata_waits;
use vhost_user_vhdx::vhdx::{Chain, MemStorage, Storage, VhdxFile};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
const DISK: u64 = 8 * MIB + 64 * 1024;
const BLOCK: u32 = MIB as u32;

/// The workload's notes in the record, between the file's changes.
#[derive(Clone, Debug)]
enum Mark {
    /// Workload op `n` is about to start; every op before it returned.
    OpStart(usize),
    /// The flush of op `n` returned.
    FlushDone(usize),
    /// Serve-like runs: ops up to `n` completed, their metadata durable in the log.
    Completed(usize),
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
    /// Run as `serve` does: waits for metadata deferred over batches of this many ops (0: no).
    serve_batch: usize,
}

/// Runs the workload on a new file over `parent` (differencing) or alone, then enumerates the
/// crash points.
/// Also returns how many log entries were chained to the one before ([`chained_entries`]).
fn enumerate(seed: u64, mode: Mode) -> (Outcome, usize) {
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
    let rec = Arc::new(Recorder::alone(initial.clone()));
    let start_tag = if differencing { PARENT } else { ZEROS };
    // model[s] after each flush op, by op index.
    let mut model = vec![start_tag; (DISK / SECTOR) as usize];
    let mut snapshots: HashMap<usize, Vec<Tag>> = HashMap::new();
    let mut completed: HashMap<usize, Vec<Tag>> = HashMap::new();
    {
        let storage: Arc<dyn Storage> = if mode.serve_batch > 0 {
            Arc::new(SlowFlush(rec.clone()))
        } else {
            rec.clone()
        };
        let chain = open_chain(storage, true).unwrap();
        chain.leaf().commit_every_change(mode.commit_every_change);
        chain.leaf().wait_for_metadata(mode.serve_batch > 0);
        let mut batch_generation = 0;
        for (i, op) in ops.iter().enumerate() {
            rec.mark(Mark::OpStart(i));
            let ((), generation) = defer_metadata_waits(|| match *op {
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
                    rec.mark(Mark::FlushDone(i));
                }
            });
            batch_generation = batch_generation.max(generation);
            if mode.serve_batch > 0 {
                // Requests reach a queue one after another, not all at once: the log worker
                // takes a commit's snapshot while the batch is still running.
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            for (s, t) in effect(op) {
                model[s as usize] = t;
            }
            if matches!(op, Op::Flush) {
                snapshots.insert(i, model.clone());
            }
            if mode.serve_batch > 0 && (i + 1) % mode.serve_batch == 0 {
                chain.leaf().wait_durable(batch_generation).unwrap();
                batch_generation = 0;
                rec.mark(Mark::Completed(i));
                completed.insert(i, model.clone());
            }
        }
        rec.mark(Mark::OpStart(ops.len()));
        chain.close().unwrap();
    }
    let events = rec.events();

    // Walk the record. At each crash point, the acceptable tags per sector: the state at the
    // last completed flush, plus anything an op started since then wrote (ops up to `next_op`,
    // the one in progress included).
    let mut last_flush_done: Option<usize> = None;
    let mut next_op = 0usize;
    let mut seen = 0usize;
    let mut base = Vec::new();
    let mut extra: HashMap<u64, Vec<Tag>> = HashMap::new();
    let mut out = Outcome::default();
    // Serve-like runs: the file as a kill leaves it (every write so far), and what it must hold.
    let mut killed = Arc::new(initial.clone());
    let mut last_completed: Option<usize> = None;
    let mut kill_base = Vec::new();
    let mut kill_extra: HashMap<u64, Vec<Tag>> = HashMap::new();
    for_each_crash_point(&events, vec![initial], &mut rng, |i, variant, images| {
        if seen <= i {
            for e in &events[seen..=i] {
                match e {
                    Event::Mark(Mark::OpStart(n)) => next_op = *n,
                    Event::Mark(Mark::FlushDone(n)) => last_flush_done = Some(*n),
                    Event::Mark(Mark::Completed(n)) => last_completed = Some(*n),
                    _ => {}
                }
                if mode.serve_batch > 0 {
                    apply(Arc::make_mut(&mut killed), e);
                }
            }
            seen = i + 1;
            if mode.serve_batch > 0 {
                // A flush completes every op before it too.
                let done = last_completed.max(last_flush_done);
                kill_base = match done {
                    Some(n) => completed.get(&n).unwrap_or_else(|| &snapshots[&n]).clone(),
                    None => vec![start_tag; model.len()],
                };
                kill_extra.clear();
                for op in &ops[done.map_or(0, |n| n + 1)..=next_op.min(ops.len() - 1)] {
                    for (s, t) in effect(op) {
                        kill_extra.entry(s).or_default().push(t);
                    }
                }
            }
            base = match last_flush_done {
                Some(f) => snapshots[&f].clone(),
                None => vec![start_tag; model.len()],
            };
            let first_unflushed = last_flush_done.map_or(0, |f| f + 1);
            extra.clear();
            for op in &ops[first_unflushed..=next_op.min(ops.len() - 1)] {
                for (s, t) in effect(op) {
                    extra.entry(s).or_default().push(t);
                }
            }
        }
        let img = images.into_iter().next().unwrap();
        out.count(
            || format!("event {i} variant {variant}"),
            verify(img, &open_chain, &base, &extra, &parent_content),
        );
        if mode.serve_batch > 0 && variant == 0 {
            out.count(
                || format!("event {i}, killed"),
                verify(
                    CrashImage::new(Arc::clone(&killed)),
                    &open_chain,
                    &kill_base,
                    &kill_extra,
                    &parent_content,
                ),
            );
        }
    });
    (out, chained_entries(&events))
}

/// The recording file with a flush that takes as long as a fast disk's: serve-like runs want
/// the workload's next changes to land while the log worker flushes, as they do in `serve`.
struct SlowFlush(Arc<Recorder<Mark>>);

impl Storage for SlowFlush {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(1));
        self.0.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
}

/// Log entries written with a Tail before themselves: the previous entry's pages were written
/// in place but not flushed yet, the order the log writer takes when one commit follows
/// another at once. The log starts at 1 MiB in files `create` makes.
fn chained_entries(events: &[Event<Mark>]) -> usize {
    events
        .iter()
        .filter(|e| match e {
            Event::Write(_, off, data) if data.starts_with(b"loge") && *off >= MIB => {
                let tail = u32::from_le_bytes(data[12..16].try_into().unwrap());
                u64::from(tail) != *off - MIB
            }
            _ => false,
        })
        .count()
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
    enumerate(seed, mode).0.assert_all_recovered("");
}

const NORMAL: Mode = Mode {
    differencing: false,
    ops: 1000,
    aligned: 0,
    commit_every_change: false,
    serve_batch: 0,
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
                serve_batch: 0,
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

/// Ops batched as `serve`'s queue runs them, its log committing while they run: every crash
/// point (commits that share a flush with the next one's data among them) recovers, and a kill
/// at any point keeps every op whose batch completed.
#[test]
fn serve_like_batches_recover_from_a_crash_or_a_kill_at_every_point() {
    let mut chained = 0;
    for (seed, differencing) in [(6, false), (7, true)] {
        let (outcome, n) = enumerate(
            seed,
            Mode {
                differencing,
                ops: 400,
                aligned: 40,
                serve_batch: 8,
                ..NORMAL
            },
        );
        println!("entries whose Tail is the entry before them: {n}");
        outcome.assert_all_recovered("");
        chained += n;
    }
    assert!(
        chained > 0,
        "no commit followed another closely enough to share its flush"
    );
}
