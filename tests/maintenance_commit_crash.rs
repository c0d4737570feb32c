//! Crash-point enumeration of `commit`: a commit (of a child into its parent, with and without
//! -d; of a top into a middle level; of a top down two levels with -d) runs on storage that
//! records every write, length change and flush of every file, in order. Then, at every
//! boundary of that record, all files are rebuilt as a crash would leave them, their unflushed
//! writes (a) all lost, (b) a random subset applied in random order, (c) torn at 4 KiB. The
//! files must open as a chain, check clean, read exactly what the chain read before the commit
//! (a commit never changes what the chain reads), and running the commit again must finish it:
//! the target (over its own parents) then reads the same. The test prints
//! `crash points: N, recovered: N, flushed bytes lost: 0` (bytes of the chain that read wrong).

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::crash_storage::{for_each_crash_point, CrashImage, Event, Outcome, Record, Recorder};
use rand::rngs::StdRng;
use rand::SeedableRng;
use uuid::Uuid;
use vhost_user_vhdx::vhdx::commit::{commit, CommitOptions};
use vhost_user_vhdx::vhdx::create::{self, CreateOptions};
use vhost_user_vhdx::vhdx::{chain, check};
use vhost_user_vhdx::vhdx::{
    Chain, ChainOptions, DataWriteGuid, PayloadBlockState, Storage, VhdxFile,
};

const MIB: u64 = 1 << 20;
const DISK: u64 = 8 * MIB + 64 * 1024;

fn create_child(child: &Path, parent: &Path) {
    create::create(
        child,
        &CreateOptions {
            parent: Some(parent.to_path_buf()),
            ..Default::default()
        },
    )
    .unwrap();
}

fn writable() -> ChainOptions {
    ChainOptions {
        writable: true,
        ..Default::default()
    }
}

/// A base with data and a child over it that overwrites some: whole blocks, single sectors
/// (PARTIALLY_PRESENT), zeroed ranges (holes), a discard; with `three`, a top over the child
/// with single sectors over blocks only the base holds. Returns the files, top first.
fn make_chain(dir: &Path, three: bool) -> Vec<PathBuf> {
    let base = dir.join("base.vhdx");
    let child = dir.join("child.vhdx");
    create::create(
        &base,
        &CreateOptions {
            virtual_size: Some(DISK),
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap();
    let c = Chain::open(&base, &writable()).unwrap();
    let mut data = vec![0u8; DISK as usize];
    for (i, chunk) in data.chunks_mut(64 * 1024).enumerate() {
        if i % 5 != 2 {
            chunk.fill(i as u8 | 1);
        }
    }
    c.write_at(&data, 0).unwrap();
    c.close().unwrap();
    create_child(&child, &base);
    let c = Chain::open(&child, &writable()).unwrap();
    c.write_at(&vec![0xa1; 2 * MIB as usize], MIB).unwrap();
    c.write_at(&[0xa2; 512], 4 * MIB + 4096).unwrap();
    c.write_at(&vec![0xa3; 3 * 512], 5 * MIB + 100 * 512)
        .unwrap();
    c.write_zeroes(6 * MIB, MIB).unwrap();
    c.write_zeroes(7 * MIB + 8192, 4096).unwrap();
    c.discard(0, MIB).unwrap();
    c.write_at(&vec![0xa4; 64 * 1024], 8 * MIB).unwrap();
    c.close().unwrap();
    if !three {
        return vec![child, base];
    }
    let top = dir.join("top.vhdx");
    create_child(&top, &child);
    let c = Chain::open(&top, &writable()).unwrap();
    c.write_at(&[0xb1; 1024], 3 * MIB + 512).unwrap();
    c.write_at(&vec![0xb2; MIB as usize], 5 * MIB).unwrap();
    c.write_at(&[0xb3; 512], 7 * MIB).unwrap();
    c.close().unwrap();
    vec![top, child, base]
}

/// What the chain whose top is `path` reads.
fn chain_reads(path: &Path) -> Vec<u8> {
    let c = Chain::open(path, &ChainOptions::default()).unwrap();
    read_all(&c).unwrap()
}

/// One commit: the files top first, the target's index among them (the files above it are
/// committed into it; those below are its parents), and whether the top is kept (-d).
struct Scenario {
    files: Vec<PathBuf>,
    target: usize,
    keep_top: bool,
}

/// Runs the engine's commit on the storages (top first, one per file).
fn run_commit(storages: &[Arc<dyn Storage>], sc: &Scenario) -> vhost_user_vhdx::vhdx::Result<()> {
    let k = sc.target;
    let upper = (0..k)
        .map(|i| {
            VhdxFile::open_storage_with(
                Arc::clone(&storages[i]),
                sc.files[i].clone(),
                true,
                DataWriteGuid::Keep,
            )
        })
        .collect::<vhost_user_vhdx::vhdx::Result<Vec<_>>>()?;
    let lower = (k + 1..sc.files.len())
        .map(|i| VhdxFile::open_storage(Arc::clone(&storages[i]), sc.files[i].clone(), false))
        .collect::<vhost_user_vhdx::vhdx::Result<Vec<_>>>()?;
    let target = &storages[k];
    let path = &sc.files[k];
    let open_target = |g: Option<Uuid>| match g {
        None => VhdxFile::open_storage(Arc::clone(target), path.clone(), false),
        Some(g) => VhdxFile::open_storage_with(
            Arc::clone(target),
            path.clone(),
            true,
            DataWriteGuid::Set(g),
        ),
    };
    commit(
        upper,
        &open_target,
        lower,
        &CommitOptions {
            keep_top: sc.keep_top,
        },
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

/// Opens files `from..` of the scenario read-only, checks each, and links them into a chain.
fn open_chain(storages: &[Arc<dyn Storage>], sc: &Scenario, from: usize) -> Result<Chain, String> {
    let mut layers = Vec::new();
    for (storage, path) in storages.iter().zip(&sc.files).skip(from) {
        let f = VhdxFile::open_storage(Arc::clone(storage), path.clone(), false)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        let r = check::check_file(&f);
        if !r.corruptions.is_empty() {
            return Err(format!("check of {}: {:?}", path.display(), r.corruptions));
        }
        layers.push(f);
    }
    Chain::from_layers(layers).map_err(|e| format!("chain: {e}"))
}

/// The files as the top's locators link them now, as indices into `sc.files`: after a commit
/// down two levels with -d has relinked the top, the level between is no longer in its chain.
fn linked(storages: &[Arc<dyn Storage>], sc: &Scenario) -> Result<Vec<usize>, String> {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap();
    let mut order = vec![0];
    loop {
        let i = *order.last().unwrap();
        let f = VhdxFile::open_storage(Arc::clone(&storages[i]), sc.files[i].clone(), false)
            .map_err(|e| format!("open {}: {e}", sc.files[i].display()))?;
        if !f.is_differencing() {
            return Ok(order);
        }
        let parent = chain::parent_path(&f).map_err(|e| e.to_string())?;
        let j = sc
            .files
            .iter()
            .position(|p| canonical(p) == canonical(&parent))
            .ok_or_else(|| format!("{} is not one of the files", parent.display()))?;
        order.push(j);
    }
}

/// The crash images of one point: open, check, read, then commit again and look at the result.
fn verify(images: Vec<CrashImage>, sc: &Scenario, expected: &[u8]) -> Result<(), (String, u64)> {
    let all: Vec<Arc<dyn Storage>> = images
        .into_iter()
        .map(|img| Arc::new(img) as Arc<dyn Storage>)
        .collect();
    // The chain as it is linked now, and the same commit on it (as `commit_files` finds it).
    let order = linked(&all, sc).map_err(|e| (e, 0))?;
    let storages: Vec<Arc<dyn Storage>> = order.iter().map(|&i| Arc::clone(&all[i])).collect();
    let sc = &Scenario {
        files: order.iter().map(|&i| sc.files[i].clone()).collect(),
        target: order
            .iter()
            .position(|&i| i == sc.target)
            .ok_or_else(|| ("the target left the chain".to_string(), 0))?,
        keep_top: sc.keep_top,
    };
    {
        let chain = open_chain(&storages, sc, 0).map_err(|e| (e, 0))?;
        let got = read_all(&chain).map_err(|e| (e, 0))?;
        let lost = bytes_differing(&got, expected);
        if lost > 0 {
            return Err(("the chain reads differently".into(), lost));
        }
    }
    run_commit(&storages, sc).map_err(|e| (format!("commit again: {e}"), 0))?;
    let alone = open_chain(&storages, sc, sc.target)
        .map_err(|e| (format!("after the second commit: {e}"), 0))?;
    if read_all(&alone).map_err(|e| (e, 0))? != expected {
        return Err(("the target does not read what the chain did".into(), 0));
    }
    if sc.keep_top {
        let top = VhdxFile::open_storage(Arc::clone(&storages[0]), sc.files[0].clone(), false)
            .map_err(|e| (format!("open the kept top: {e}"), 0))?;
        let g = top.geometry();
        if (0..g.payload_blocks()).any(|b| top.bat.payload(b).0 != PayloadBlockState::NotPresent) {
            return Err(("the kept top is not empty".into(), 0));
        }
        let mut layers = vec![top];
        layers.extend(alone.into_layers());
        let chain = Chain::from_layers(layers)
            .map_err(|e| (format!("the kept top over the target: {e}"), 0))?;
        if read_all(&chain).map_err(|e| (e, 0))? != expected {
            return Err(("the kept top's chain reads differently".into(), 0));
        }
    }
    Ok(())
}

fn enumerate(seed: u64, three: bool, target: usize, keep_top: bool) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = common::tempdir("commit-crash-");
    let files = make_chain(dir.path(), three);
    let expected = chain_reads(&files[0]);
    let sc = Scenario {
        files,
        target,
        keep_top,
    };
    let initial: Vec<Vec<u8>> = sc.files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let events: Record = Arc::new(Mutex::new(Vec::new()));
    let storages: Vec<Arc<dyn Storage>> = (0..initial.len())
        .map(|file| {
            Arc::new(Recorder::new(file, initial[file].clone(), &events)) as Arc<dyn Storage>
        })
        .collect();
    run_commit(&storages, &sc).unwrap();
    let events = events.lock().unwrap().clone();
    for f in [target - 1, target] {
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Write(x, ..) if *x == f)),
            "the commit wrote nothing to file {f}"
        );
    }
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Write(x, ..) | Event::SetLen(x, _) if *x > target)),
        "the commit wrote to a parent of its target"
    );

    let mut out = Outcome::default();
    for_each_crash_point(&events, initial, &mut rng, |i, variant, images| {
        out.count(
            || format!("event {i} ({}) variant {variant}", events[i].describe()),
            verify(images, &sc, &expected),
        );
    });
    out
}

fn run(seed: u64, three: bool, target: usize, keep_top: bool) {
    let out = enumerate(seed, three, target, keep_top);
    assert!(out.points > 20, "too few crash points: {}", out.points);
    out.assert_all_recovered("");
}

#[test]
fn every_crash_point_of_a_commit_recovers() {
    run(11, false, 1, false);
}

#[test]
fn every_crash_point_of_a_commit_keeping_the_child_recovers() {
    run(12, false, 1, true);
}

#[test]
fn every_crash_point_of_a_commit_into_a_middle_level_recovers() {
    run(13, true, 1, false);
}

#[test]
fn every_crash_point_of_a_commit_down_two_levels_keeping_the_top_recovers() {
    run(14, true, 2, true);
}
