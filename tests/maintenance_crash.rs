//! Crash-point enumeration for `resize` and `compact`, as tests/crash.rs does it for writes:
//! the operation runs on a file layer that records every write, truncation and flush; then, for
//! every boundary of that record, the file as a crash would leave it is rebuilt with the
//! unflushed changes (a) all lost, (b) a random subset applied in random order, (c) torn at
//! 4 KiB, and opened again. Each must replay, check clean and read, block by block, as the disk
//! before the operation or as the disk after it (a resize's size switches with its blocks).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::crash_storage::{for_each_crash_point, CrashImage, Outcome, Recorder};
use rand::rngs::StdRng;
use rand::SeedableRng;
use vhost_user_vhdx::vhdx::check;
use vhost_user_vhdx::vhdx::compact::compact;
use vhost_user_vhdx::vhdx::create::{self, CreateOptions, Subformat};
use vhost_user_vhdx::vhdx::resize::{resize, ResizeOptions};
use vhost_user_vhdx::vhdx::{Chain, MemStorage, ReadSource, Storage, VhdxFile};

const MIB: u64 = 1 << 20;
/// Disks are compared byte for byte up to here; past it they must be unallocated.
const COMPARED: u64 = 64 * MIB;

/// What a disk reads: its size and its first `COMPARED` bytes.
#[derive(Clone, PartialEq, Eq)]
struct Content {
    size: u64,
    bytes: Vec<u8>,
}

fn content(chain: &Chain) -> Result<Content, String> {
    let size = chain.virtual_size();
    let n = size.min(COMPARED);
    let mut bytes = vec![0u8; n as usize];
    chain
        .read_at(&mut bytes, 0)
        .map_err(|e| format!("read: {e}"))?;
    if size > n {
        let mut ext = Default::default();
        chain
            .resolve(n, size - n, &mut ext)
            .map_err(|e| format!("resolve: {e}"))?;
        let ext: &vhost_user_vhdx::vhdx::Extents = &ext;
        if ext.iter().any(|e| e.source != ReadSource::Zero) {
            return Err(format!("data past {n:#x}: {ext:?}"));
        }
    }
    Ok(Content { size, bytes })
}

/// A leaf in memory over an optional parent on disk.
struct Setup {
    leaf_path: PathBuf,
    parent: Option<PathBuf>,
    initial: Vec<u8>,
}

impl Setup {
    fn open(&self, storage: Arc<dyn Storage>) -> vhost_user_vhdx::vhdx::Result<Chain> {
        let leaf = VhdxFile::open_storage(storage, self.leaf_path.clone(), true)?;
        let mut layers = vec![leaf];
        if let Some(p) = &self.parent {
            layers.push(VhdxFile::open(p, false)?);
        }
        Chain::from_layers(layers)
    }
}

fn enumerate(setup: &Setup, op: &dyn Fn(Chain)) -> Outcome {
    let mut rng = StdRng::seed_from_u64(7);
    let before = content(
        &setup
            .open(Arc::new(MemStorage::new(setup.initial.clone())))
            .unwrap(),
    )
    .unwrap();
    let rec: Arc<Recorder> = Arc::new(Recorder::alone(setup.initial.clone()));
    op(setup.open(rec.clone()).unwrap());
    let events = rec.events();
    let after = content(
        &setup
            .open(Arc::new(MemStorage::new(rec.snapshot())))
            .unwrap(),
    )
    .unwrap();
    // Whatever the operation: what both sizes share is unchanged, and a grown disk reads zeros
    // past its old end.
    let shared = before.bytes.len().min(after.bytes.len());
    assert!(
        before.bytes[..shared] == after.bytes[..shared],
        "the operation changed the disk's contents"
    );
    assert!(
        after.bytes[shared..].iter().all(|&b| b == 0),
        "the grown area does not read zeros"
    );

    let mut out = Outcome::default();
    let initial = vec![setup.initial.clone()];
    for_each_crash_point(&events, initial, &mut rng, |i, variant, images| {
        let img = images.into_iter().next().unwrap();
        out.count(
            || format!("event {i} variant {variant}"),
            verify(setup, img, &before, &after),
        );
    });
    out
}

fn verify(
    setup: &Setup,
    img: CrashImage,
    before: &Content,
    after: &Content,
) -> Result<(), (String, u64)> {
    let chain = setup
        .open(Arc::new(img))
        .map_err(|e| (format!("reopen: {e}"), 0))?;
    let report = check::check_file(chain.leaf());
    if !report.corruptions.is_empty() {
        return Err((format!("check: {:?}", report.corruptions), 0));
    }
    let got = content(&chain).map_err(|e| (e, 0))?;
    let candidates: Vec<&Content> = [before, after]
        .into_iter()
        .filter(|c| c.size == got.size)
        .collect();
    if candidates.is_empty() {
        return Err((format!("size {} is neither before nor after", got.size), 0));
    }
    let mut lost = 0;
    let mut first = None;
    for (b, block) in got.bytes.chunks(MIB as usize).enumerate() {
        let range = b * MIB as usize..b * MIB as usize + block.len();
        if candidates.iter().any(|c| c.bytes[range.clone()] == *block) {
            continue;
        }
        lost += block.len() as u64;
        first.get_or_insert_with(|| format!("block {b} reads neither before nor after"));
    }
    match first {
        None => Ok(()),
        Some(e) => Err((e, lost)),
    }
}

fn run(name: &str, setup: &Setup, op: &dyn Fn(Chain)) {
    enumerate(setup, op).assert_all_recovered(&format!("{name}: "));
}

/// A new file in memory, changed by `prepare` through the engine.
fn prepared(dir: &Path, opts: &CreateOptions, prepare: &dyn Fn(&Chain)) -> Setup {
    let leaf_path = dir.join("leaf.vhdx");
    let parent = opts.parent.clone();
    let initial = if parent.is_some() {
        create::create(&leaf_path, opts).unwrap();
        std::fs::read(&leaf_path).unwrap()
    } else {
        let m = MemStorage::default();
        create::create_on(&m, opts).unwrap();
        m.into_inner()
    };
    let mut setup = Setup {
        leaf_path,
        parent,
        initial,
    };
    let mem = Arc::new(MemStorage::new(setup.initial.clone()));
    let chain = setup.open(mem.clone()).unwrap();
    prepare(&chain);
    chain.close().unwrap();
    setup.initial = mem.snapshot();
    setup
}

fn dynamic(size: u64) -> CreateOptions {
    CreateOptions {
        virtual_size: Some(size),
        block_size: Some(MIB as u32),
        ..Default::default()
    }
}

/// Options for a child of a new `parent.vhdx` in `dir` of `size` bytes, whose first `filled`
/// bytes hold 0x55.
fn child_of(dir: &Path, size: u64, filled: u64) -> CreateOptions {
    let parent = dir.join("parent.vhdx");
    create::create(&parent, &dynamic(size)).unwrap();
    let p = Chain::open(
        &parent,
        &vhost_user_vhdx::vhdx::ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    p.write_at(&vec![0x55; filled as usize], 0).unwrap();
    p.close().unwrap();
    CreateOptions {
        parent: Some(parent),
        ..Default::default()
    }
}

/// Blocks of data and allocated blocks of zeros, alternating.
fn striped(chain: &Chain) {
    let blocks = chain.virtual_size() / MIB;
    for b in 0..blocks {
        let fill = if b % 2 == 0 { b as u8 + 1 } else { 0 };
        chain.write_at(&vec![fill; MIB as usize], b * MIB).unwrap();
    }
}

fn grow(size: u64) -> impl Fn(Chain) {
    move |c| {
        resize(c, size, &ResizeOptions::default(), &mut |_, _| {}).unwrap();
    }
}

#[test]
fn every_crash_point_of_a_grow_recovers() {
    let d = common::tempdir("crash-resize-");
    // Cut inside a block first, so the grow must zero the old last block's hidden tail.
    let setup = prepared(d.path(), &dynamic(16 * MIB), &|c| {
        c.write_at(&vec![0x77; 16 * MIB as usize], 0).unwrap();
    });
    let mem = Arc::new(MemStorage::new(setup.initial.clone()));
    let options = ResizeOptions {
        shrink: true,
        force: true,
    };
    resize(
        setup.open(mem.clone()).unwrap(),
        15 * MIB + 512,
        &options,
        &mut |_, _| {},
    )
    .unwrap();
    let setup = Setup {
        initial: mem.snapshot(),
        ..setup
    };
    run("grow in place", &setup, &grow(40 * MIB));
}

#[test]
fn every_crash_point_of_a_grow_that_moves_the_bat_recovers() {
    let d = common::tempdir("crash-resize-");
    let setup = prepared(d.path(), &dynamic(16 * MIB), &striped);
    run("grow relocating the BAT", &setup, &grow(200 << 30));
}

#[test]
fn every_crash_point_of_a_fixed_grow_recovers() {
    let d = common::tempdir("crash-resize-");
    let opts = CreateOptions {
        subformat: Subformat::Fixed,
        ..dynamic(8 * MIB)
    };
    let setup = prepared(d.path(), &opts, &striped);
    run("fixed grow", &setup, &grow(24 * MIB));
}

#[test]
fn every_crash_point_of_a_shrink_recovers() {
    let d = common::tempdir("crash-resize-");
    let setup = prepared(d.path(), &dynamic(16 * MIB), &striped);
    let options = ResizeOptions {
        shrink: true,
        force: true,
    };
    run("shrink", &setup, &move |c| {
        resize(c, 5 * MIB + 512, &options, &mut |_, _| {}).unwrap();
    });
}

#[test]
fn every_crash_point_of_a_compact_recovers() {
    let d = common::tempdir("crash-compact-");
    let setup = prepared(d.path(), &dynamic(16 * MIB), &striped);
    run("compact", &setup, &|c| {
        let r = compact(c, &mut |_, _| {}).unwrap();
        assert_eq!(r.blocks_reclaimed, 8);
        assert!(r.blocks_moved > 0);
    });
}

#[test]
fn every_crash_point_of_a_differencing_compact_recovers() {
    let d = common::tempdir("crash-compact-");
    let opts = child_of(d.path(), 16 * MIB, 4 * MIB);
    let setup = prepared(d.path(), &opts, &|c| {
        striped(c);
        // A partially present block of zeros over parent zeros.
        c.write_at(&[0u8; 4096], 9 * MIB).unwrap();
    });
    run("differencing compact", &setup, &|c| {
        let r = compact(c, &mut |_, _| {}).unwrap();
        assert!(r.blocks_reclaimed >= 5, "{r:?}");
    });
}

#[test]
fn every_crash_point_of_a_differencing_grow_recovers() {
    let d = common::tempdir("crash-resize-");
    let opts = child_of(d.path(), 15 * MIB + 512, 15 * MIB + 512);
    let setup = prepared(d.path(), &opts, &|c| {
        c.write_at(&vec![0x66; 2 * MIB as usize], 4 * MIB).unwrap();
        // The partial last block: in this file, past the parent's end after the grow.
        c.write_at(&[0x67; 512], 15 * MIB).unwrap();
    });
    run("differencing grow", &setup, &grow(40 * MIB));
}
