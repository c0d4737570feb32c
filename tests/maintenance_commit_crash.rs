//! Crash-point enumeration of `commit`: the commit of a child into its parent runs on storage
//! that records every write, length change and flush of both files, in order. Then, at every
//! boundary of that record, both files are rebuilt as a crash would leave them, their unflushed
//! writes (a) all lost, (b) a random subset applied in random order, (c) torn at 4 KiB. Each
//! pair must open as a chain, check clean, read exactly what the chain read before the commit
//! (a commit never changes what the chain reads), and running the commit again must finish it:
//! the parent alone then reads the same. The test prints
//! `crash points: N, recovered: N, flushed bytes lost: 0` (bytes of the chain that read wrong).

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use uuid::Uuid;
use vhost_user_vhdx::vhdx::check;
use vhost_user_vhdx::vhdx::commit::{commit, CommitOptions};
use vhost_user_vhdx::vhdx::create::{self, CreateOptions};
use vhost_user_vhdx::vhdx::{
    Chain, ChainOptions, DataWriteGuid, MemStorage, PayloadBlockState, Storage, VhdxFile,
};

const MIB: u64 = 1 << 20;
const DISK: u64 = 8 * MIB + 64 * 1024;
const TOP: usize = 0;
const TARGET: usize = 1;

#[derive(Clone)]
enum Event {
    Write(usize, u64, Arc<Vec<u8>>),
    SetLen(usize, u64),
    Flush(usize),
}

/// One file's storage in memory; every change goes into the record both files share.
struct Recorder {
    file: usize,
    mem: MemStorage,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Recorded under the lock it is applied under, so the record is the true order.
        let mut ev = self.events.lock().unwrap();
        self.mem.write_at(buf, offset)?;
        ev.push(Event::Write(self.file, offset, Arc::new(buf.to_vec())));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.events.lock().unwrap().push(Event::Flush(self.file));
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut ev = self.events.lock().unwrap();
        self.mem.set_len(len)?;
        ev.push(Event::SetLen(self.file, len));
        Ok(())
    }
}

/// An event in a failure message (without the data).
fn describe(e: &Event) -> String {
    let name = |f: usize| ["child", "parent"][f];
    match e {
        Event::Write(f, off, data) => {
            format!("write {} bytes at {off:#x} of the {}", data.len(), name(*f))
        }
        Event::SetLen(f, len) => format!("set the {}'s length to {len:#x}", name(*f)),
        Event::Flush(f) => format!("flush the {}", name(*f)),
    }
}

fn apply(img: &mut Vec<u8>, e: &Event) {
    match e {
        Event::Write(_, off, data) => {
            let end = *off as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].copy_from_slice(data);
        }
        Event::SetLen(_, len) => img.resize(*len as usize, 0),
        Event::Flush(_) => {}
    }
}

/// A parent with data and a child over it that overwrites some: whole blocks, single sectors
/// (PARTIALLY_PRESENT), zeroed ranges (holes), a discard; returns what the chain reads.
fn make_chain(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let parent = dir.join("parent.vhdx");
    let child = dir.join("child.vhdx");
    create::create(
        &parent,
        &CreateOptions {
            virtual_size: Some(DISK),
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap();
    let writable = ChainOptions {
        writable: true,
        ..Default::default()
    };
    let c = Chain::open(&parent, &writable).unwrap();
    let mut data = vec![0u8; DISK as usize];
    for (i, chunk) in data.chunks_mut(64 * 1024).enumerate() {
        if i % 5 != 2 {
            chunk.fill(i as u8 | 1);
        }
    }
    c.write_at(&data, 0).unwrap();
    c.close().unwrap();
    create::create(
        &child,
        &CreateOptions {
            parent: Some(parent.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let c = Chain::open(&child, &writable).unwrap();
    c.write_at(&vec![0xa1; 2 * MIB as usize], MIB).unwrap();
    c.write_at(&[0xa2; 512], 4 * MIB + 4096).unwrap();
    c.write_at(&vec![0xa3; 3 * 512], 5 * MIB + 100 * 512)
        .unwrap();
    c.write_zeroes(6 * MIB, MIB).unwrap();
    c.write_zeroes(7 * MIB + 8192, 4096).unwrap();
    c.discard(0, MIB).unwrap();
    c.write_at(&vec![0xa4; 64 * 1024], 8 * MIB).unwrap();
    c.close().unwrap();
    let c = Chain::open(&child, &ChainOptions::default()).unwrap();
    let mut expected = vec![0u8; DISK as usize];
    c.read_at(&mut expected, 0).unwrap();
    (parent, child, expected)
}

/// Runs the engine's commit on the two storages.
fn run_commit(
    top: Arc<dyn Storage>,
    target: Arc<dyn Storage>,
    paths: &(PathBuf, PathBuf),
    keep_top: bool,
) -> vhost_user_vhdx::vhdx::Result<()> {
    let top = VhdxFile::open_storage_with(top, paths.0.clone(), true, DataWriteGuid::Keep)?;
    let open_target = |g: Option<Uuid>| match g {
        None => VhdxFile::open_storage(Arc::clone(&target), paths.1.clone(), false),
        Some(g) => VhdxFile::open_storage_with(
            Arc::clone(&target),
            paths.1.clone(),
            true,
            DataWriteGuid::Set(g),
        ),
    };
    commit(
        vec![top],
        &open_target,
        Vec::new(),
        &CommitOptions { keep_top },
        &mut |_, _| {},
    )
}

fn read_all(chain: &Chain) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; DISK as usize];
    chain
        .read_at(&mut buf, 0)
        .map_err(|e| format!("read: {e}"))?;
    Ok(buf)
}

fn bytes_differing(a: &[u8], b: &[u8]) -> u64 {
    a.chunks(512)
        .zip(b.chunks(512))
        .filter(|(x, y)| x != y)
        .count() as u64
        * 512
}

fn clean(f: &VhdxFile, what: &str) -> Result<(), String> {
    let r = check::check_file(f);
    if r.corruptions.is_empty() {
        Ok(())
    } else {
        Err(format!("check of the {what}: {:?}", r.corruptions))
    }
}

/// The crash images of one point: open, check, read, then commit again and look at the result.
fn verify(
    top: Vec<u8>,
    target: Vec<u8>,
    paths: &(PathBuf, PathBuf),
    expected: &[u8],
    keep_top: bool,
) -> Result<(), (String, u64)> {
    let top: Arc<dyn Storage> = Arc::new(MemStorage::new(top));
    let target: Arc<dyn Storage> = Arc::new(MemStorage::new(target));
    {
        let open = |s: &Arc<dyn Storage>, p: &PathBuf| {
            VhdxFile::open_storage(Arc::clone(s), p.clone(), false)
                .map_err(|e| (format!("open {}: {e}", p.display()), 0))
        };
        let layers = vec![open(&top, &paths.0)?, open(&target, &paths.1)?];
        clean(&layers[0], "child").map_err(|e| (e, 0))?;
        clean(&layers[1], "parent").map_err(|e| (e, 0))?;
        let chain = Chain::from_layers(layers).map_err(|e| (format!("chain: {e}"), 0))?;
        let got = read_all(&chain).map_err(|e| (e, 0))?;
        let lost = bytes_differing(&got, expected);
        if lost > 0 {
            return Err(("the chain reads differently".into(), lost));
        }
    }
    run_commit(Arc::clone(&top), Arc::clone(&target), paths, keep_top)
        .map_err(|e| (format!("commit again: {e}"), 0))?;
    let parent = VhdxFile::open_storage(Arc::clone(&target), paths.1.clone(), false)
        .map_err(|e| (format!("open the parent after the second commit: {e}"), 0))?;
    clean(&parent, "parent after the second commit").map_err(|e| (e, 0))?;
    let alone = Chain::from_layers(vec![parent]).map_err(|e| (e.to_string(), 0))?;
    let got = read_all(&alone).map_err(|e| (e, 0))?;
    if got != expected {
        return Err(("the parent does not read what the chain did".into(), 0));
    }
    if keep_top {
        let child = VhdxFile::open_storage(top, paths.0.clone(), false)
            .map_err(|e| (format!("open the child after the second commit: {e}"), 0))?;
        let g = child.geometry();
        if (0..g.payload_blocks()).any(|b| child.bat.payload(b).0 != PayloadBlockState::NotPresent)
        {
            return Err(("the kept child is not empty".into(), 0));
        }
        let chain = Chain::from_layers(vec![child, alone.into_layers().remove(0)])
            .map_err(|e| (format!("the kept child over its parent: {e}"), 0))?;
        if read_all(&chain).map_err(|e| (e, 0))? != expected {
            return Err(("the kept child's chain reads differently".into(), 0));
        }
    }
    Ok(())
}

struct Outcome {
    points: usize,
    recovered: usize,
    lost: u64,
    failures: Vec<String>,
}

fn enumerate(seed: u64, keep_top: bool) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = common::tempdir("commit-crash-");
    let (parent, child, expected) = make_chain(dir.path());
    let paths = (child, parent);
    let initial = [
        std::fs::read(&paths.0).unwrap(),
        std::fs::read(&paths.1).unwrap(),
    ];
    let events = Arc::new(Mutex::new(Vec::new()));
    let rec = |file: usize| -> Arc<dyn Storage> {
        Arc::new(Recorder {
            file,
            mem: MemStorage::new(initial[file].clone()),
            events: Arc::clone(&events),
        })
    };
    run_commit(rec(TOP), rec(TARGET), &paths, keep_top).unwrap();
    let events = events.lock().unwrap().clone();
    for f in [TOP, TARGET] {
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Write(x, ..) if *x == f)),
            "the commit wrote nothing to file {f}"
        );
    }

    let mut durable = initial.clone();
    let mut pending: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
    let mut out = Outcome {
        points: 0,
        recovered: 0,
        lost: 0,
        failures: Vec::new(),
    };
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Flush(f) => {
                for &p in &pending[*f] {
                    apply(&mut durable[*f], &events[p]);
                }
                pending[*f].clear();
            }
            Event::Write(f, ..) | Event::SetLen(f, _) => pending[*f].push(i),
        }
        for variant in 0..3 {
            if variant > 0 && pending.iter().all(Vec::is_empty) {
                break;
            }
            let mut images = durable.clone();
            for f in [TOP, TARGET] {
                let img = &mut images[f];
                match variant {
                    0 => {}
                    1 => {
                        let mut chosen: Vec<usize> = pending[f]
                            .iter()
                            .copied()
                            .filter(|_| rng.gen_bool(0.5))
                            .collect();
                        chosen.shuffle(&mut rng);
                        for p in chosen {
                            apply(img, &events[p]);
                        }
                    }
                    _ => {
                        for &p in &pending[f] {
                            match &events[p] {
                                Event::Write(x, off, data) => {
                                    for (k, piece) in data.chunks(4096).enumerate() {
                                        if rng.gen_bool(0.5) {
                                            let at = off + (k * 4096) as u64;
                                            let torn =
                                                Event::Write(*x, at, Arc::new(piece.to_vec()));
                                            apply(img, &torn);
                                        }
                                    }
                                }
                                other => {
                                    if rng.gen_bool(0.5) {
                                        apply(img, other)
                                    }
                                }
                            }
                        }
                    }
                }
            }
            out.points += 1;
            let [top, target] = images;
            match verify(top, target, &paths, &expected, keep_top) {
                Ok(()) => out.recovered += 1,
                Err((msg, lost)) => {
                    out.lost += lost;
                    if out.failures.len() < 5 {
                        out.failures.push(format!(
                            "event {i} ({}) variant {variant}: {msg}",
                            describe(e)
                        ));
                    }
                }
            }
        }
    }
    out
}

fn run(seed: u64, keep_top: bool) {
    let out = enumerate(seed, keep_top);
    println!(
        "crash points: {}, recovered: {}, flushed bytes lost: {}",
        out.points, out.recovered, out.lost
    );
    assert!(out.points > 20, "too few crash points: {}", out.points);
    assert!(
        out.failures.is_empty() && out.recovered == out.points && out.lost == 0,
        "{} of {} crash points did not recover; first failures:\n{}",
        out.points - out.recovered,
        out.points,
        out.failures.join("\n")
    );
}

#[test]
fn every_crash_point_of_a_commit_recovers() {
    run(11, false);
}

#[test]
fn every_crash_point_of_a_commit_keeping_the_child_recovers() {
    run(12, true);
}
