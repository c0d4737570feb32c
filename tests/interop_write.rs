//! Interop of the write path with the real peers: what we write (through the `io` command)
//! must be what qemu-img, qemu-io and libvhdi (pyvhdi) read, what QEMU writes into our files
//! must be what we read, and both must be able to take turns on the same file. Every step is
//! compared with an in-memory model of the disk, written out as a raw image.
//!
//! Model semantics (the engine's, see `VhdxFile::trim`): write-zeroes reads back as zeros;
//! our discard zeroes the whole blocks inside the range and leaves partial edges alone;
//! QEMU's vhdx driver has no discard, so a qemu-io discard changes nothing.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Writer {
    Us,
    Qemu,
}

/// The disk as every reader must see it.
struct Model {
    data: Vec<u8>,
    block: u64,
    sector: u64,
}

impl Model {
    fn new(size: u64, block: u64, sector: u64) -> Model {
        Model {
            data: vec![0; size as usize],
            block,
            sector,
        }
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn fill(&mut self, off: u64, len: u64, value: u8) {
        self.data[off as usize..(off + len) as usize].fill(value);
    }

    fn apply(&mut self, op: &Op, by: Writer) {
        match *op {
            Op::Write(p, off, len) => self.fill(off, len, p),
            Op::Zero(off, len) => self.fill(off, len, 0),
            Op::Discard(off, len) if by == Writer::Us => {
                // Whole blocks (the last one may be cut short by the end of the disk).
                let end = off + len;
                let mut pos = off.div_ceil(self.block) * self.block;
                while pos < end {
                    let block_end = (pos + self.block).min(self.size());
                    if block_end <= end {
                        self.fill(pos, block_end - pos, 0);
                    }
                    pos += self.block;
                }
            }
            Op::Discard(..) | Op::Flush => {}
        }
    }

    /// Writes the model as a sparse raw image.
    fn write_raw(&self, path: &Path) {
        let f = File::create(path).unwrap();
        f.set_len(self.size()).unwrap();
        for (i, chunk) in self.data.chunks(64 << 10).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                f.write_all_at(chunk, i as u64 * (64 << 10)).unwrap();
            }
        }
    }

    /// A random range: a few sectors, one crossing a block boundary, whole blocks, or the
    /// end of the disk.
    fn range(&self, rng: &mut StdRng) -> (u64, u64) {
        let (ss, bs, size) = (self.sector, self.block, self.size());
        let sectors = size / ss;
        let (off, len) = match rng.gen_range(0..6) {
            0 | 1 => {
                let len = rng.gen_range(1..=32) * ss;
                (rng.gen_range(0..sectors) * ss, len)
            }
            2 => {
                let boundary = rng.gen_range(1..=(size - 1) / bs) * bs;
                let before = rng.gen_range(1..=64) * ss;
                (
                    boundary.saturating_sub(before),
                    before + rng.gen_range(1..=64) * ss,
                )
            }
            3 => {
                let blocks = size.div_ceil(bs);
                let first = rng.gen_range(0..blocks);
                (first * bs, rng.gen_range(1..=2) * bs)
            }
            4 => {
                // Most of a block or more, from an odd place.
                let len = rng.gen_range(bs / ss / 2..=bs / ss * 3 / 2) * ss;
                (rng.gen_range(0..sectors) * ss, len.min(4 * MIB))
            }
            _ => {
                let len = rng.gen_range(1..=128) * ss;
                (size.saturating_sub(len), len)
            }
        };
        let off = off.min(size - ss);
        (off, len.min(size - off))
    }

    fn random_op(&self, rng: &mut StdRng) -> Op {
        let (off, len) = self.range(rng);
        match rng.gen_range(0..20) {
            0..=9 => Op::Write(rng.gen_range(1..=255), off, len),
            10..=13 => Op::Zero(off, len),
            14..=17 => Op::Discard(off, len),
            _ => Op::Flush,
        }
    }

    fn random_ops(&self, rng: &mut StdRng, n: usize) -> Vec<Op> {
        (0..n).map(|_| self.random_op(rng)).collect()
    }
}

/// Runs `ops` through our `io` command (one session) and applies them to the model.
fn our_round(img: &Path, model: &mut Model, ops: &[Op]) {
    let cmds: Vec<String> = ops.iter().map(Op::command).collect();
    let mut args = vec!["io", "-q"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(s(img));
    ours_ok(&args);
    for op in ops {
        model.apply(op, Writer::Us);
    }
}

/// Runs `ops` through qemu-io (one session) and applies them to the model.
fn qemu_round(img: &Path, model: &mut Model, ops: &[Op]) {
    let cmds: Vec<String> = ops.iter().map(Op::command).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_ok(img, &cmds);
    for op in ops {
        model.apply(op, Writer::Qemu);
    }
}

fn our_check_clean(img: &Path, what: &str) {
    let out = ours(&["check", s(img)]);
    assert!(
        out.status.success(),
        "{what}: our check exited with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_compare(img: &Path, raw: &Path, what: &str) {
    let out = qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(img), s(raw)]);
    assert!(
        out.status.success(),
        "{what}: qemu-img compare exited with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Images are identical"),
        "{what}: {out:?}"
    );
}

/// Every reader sees the model: qemu-img (check, compare, convert), pyvhdi, and our own
/// check and convert. `chain` is the leaf and its parents (qemu only for a single file).
fn verify_all(dir: &Path, chain: &[&Path], model: &Model, what: &str) {
    let img = chain[0];
    let expected = dir.join("expected.raw");
    model.write_raw(&expected);
    if chain.len() == 1 && model.sector == 512 {
        assert_qemu_img_check_clean(img, what);
        qemu_compare(img, &expected, what);
        let by_qemu = dir.join("qemu.raw");
        qemu_img_convert_raw(img, &by_qemu);
        assert_files_equal(&by_qemu, &expected, &format!("{what}: qemu-img convert"));
    }
    let by_libvhdi = dir.join("pyvhdi.raw");
    pyvhdi_read_raw(&by_libvhdi, chain);
    assert_files_equal(&by_libvhdi, &expected, &format!("{what}: pyvhdi"));
    our_check_clean(img, what);
    let by_us = dir.join("ours.raw");
    let _ = std::fs::remove_file(&by_us);
    ours_ok(&["convert", "-q", s(img), s(&by_us)]);
    assert_files_equal(&by_us, &expected, &format!("{what}: our convert"));
}

/// qemu and we both see the model (a single non-differencing 512-byte-sector file). A fixed
/// file never shrinks below its structures (at least 4 MiB) plus a block for every block.
fn verify_both(dir: &Path, img: &Path, model: &Model, fixed: bool, what: &str) {
    let expected = dir.join("expected.raw");
    model.write_raw(&expected);
    assert_qemu_img_check_clean(img, what);
    let by_qemu = dir.join("qemu.raw");
    qemu_img_convert_raw(img, &by_qemu);
    assert_files_equal(&by_qemu, &expected, &format!("{what}: qemu-img convert"));
    our_check_clean(img, what);
    if fixed {
        let len = std::fs::metadata(img).unwrap().len();
        let need = 4 * MIB + model.size().div_ceil(model.block) * model.block;
        assert!(len >= need, "{what}: the fixed file shrank to {len} bytes");
    }
    let by_us = dir.join("ours.raw");
    let _ = std::fs::remove_file(&by_us);
    ours_ok(&["convert", "-q", s(img), s(&by_us)]);
    assert_files_equal(&by_us, &expected, &format!("{what}: our convert"));
}

/// A file we create and write in three sessions of random writes, write-zeroes, discards
/// and flushes; then every peer reads the model.
fn our_writes_read_by_every_peer(subformat: &str, block: u64, sector: u64, seed: u64) {
    let what = format!(
        "{subformat}, {} MiB blocks, {sector}-byte sectors",
        block / MIB
    );
    let dir = tempdir("interop-write-");
    let img = dir.path().join("img.vhdx");
    // A partial last block, and enough blocks for discards to matter.
    let size = (3 * block).max(24 * MIB) + block / 2 + 3 * sector;
    let opts = format!("subformat={subformat},block_size={block},logical_sector_size={sector}");
    ours_ok(&["create", "-q", "-o", &opts, s(&img), &size.to_string()]);
    let mut model = Model::new(size, block, sector);
    let mut rng = StdRng::seed_from_u64(seed);
    for session in 0..3 {
        let ops = model.random_ops(&mut rng, 40);
        our_round(&img, &mut model, &ops);
        if sector == 512 {
            assert_qemu_img_check_clean(&img, &format!("{what}, session {session}"));
        }
    }
    // Whole-disk operations at the end: the whole disk zeroed, then written again in part.
    let ops = [
        Op::Write(0x5a, 0, size),
        Op::Flush,
        Op::Discard(block, 2 * block),
        Op::Zero(0, block / 2),
        Op::Write(0xa5, block / 4, block),
    ];
    our_round(&img, &mut model, &ops);
    verify_all(dir.path(), &[&img], &model, &what);
    let info: Value =
        serde_json::from_str(&ours_ok(&["info", "--output", "json", s(&img)])).expect("info JSON");
    assert_eq!(
        info["format-specific"]["data"]["log"]["state"], "clean",
        "{what}: {info}"
    );
}

#[test]
fn dynamic_1m_blocks_written_by_us() {
    our_writes_read_by_every_peer("dynamic", MIB, 512, 1);
}

#[test]
fn dynamic_8m_blocks_written_by_us() {
    our_writes_read_by_every_peer("dynamic", 8 * MIB, 512, 2);
}

#[test]
fn dynamic_32m_blocks_written_by_us() {
    our_writes_read_by_every_peer("dynamic", 32 * MIB, 512, 3);
}

#[test]
fn fixed_1m_blocks_written_by_us() {
    our_writes_read_by_every_peer("fixed", MIB, 512, 4);
}

#[test]
fn fixed_8m_blocks_written_by_us() {
    our_writes_read_by_every_peer("fixed", 8 * MIB, 512, 5);
}

#[test]
fn fixed_32m_blocks_written_by_us() {
    our_writes_read_by_every_peer("fixed", 32 * MIB, 512, 6);
}

/// 4096-byte sectors: qemu cannot open such a VHDX, so pyvhdi and our own reader judge.
#[test]
fn sector_4k_written_by_us_reads_like_pyvhdi() {
    our_writes_read_by_every_peer("dynamic", MIB, 4096, 7);
    our_writes_read_by_every_peer("fixed", 8 * MIB, 4096, 8);
}

/// After each qemu round, our reader checks every range qemu wrote that still holds its
/// pattern, with `io -r -c 'read -P ...'`.
fn our_pattern_reads(img: &Path, model: &Model, ops: &[Op]) {
    let cmds: Vec<String> = ops
        .iter()
        .filter_map(|op| match *op {
            Op::Write(p, off, len)
                if model.data[off as usize..(off + len) as usize]
                    .iter()
                    .all(|&b| b == p) =>
            {
                Some(format!("read -P {p:#04x} {off} {len}"))
            }
            _ => None,
        })
        .collect();
    let mut args = vec!["io", "-r", "-q"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(s(img));
    if !cmds.is_empty() {
        ours_ok(&args);
    }
}

/// Rounds of qemu-io and of our `io` on the same file, checked by both after every round.
fn alternate(
    img: &Path,
    dir: &Path,
    model: &mut Model,
    (first, fixed): (Writer, bool),
    seed: u64,
    what: &str,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut by = first;
    for round in 0..4 {
        let ops = model.random_ops(&mut rng, 30);
        let what = format!("{what}, round {round} by {by:?}");
        match by {
            Writer::Us => our_round(img, model, &ops),
            Writer::Qemu => {
                qemu_round(img, model, &ops);
                our_pattern_reads(img, model, &ops);
            }
        }
        verify_both(dir, img, model, fixed, &what);
        by = if by == Writer::Us {
            Writer::Qemu
        } else {
            Writer::Us
        };
    }
    let expected = dir.join("expected.raw");
    model.write_raw(&expected);
    let by_libvhdi = dir.join("pyvhdi.raw");
    pyvhdi_read_raw(&by_libvhdi, &[img]);
    assert_files_equal(
        &by_libvhdi,
        &expected,
        &format!("{what}: pyvhdi at the end"),
    );
}

#[test]
fn qemu_writes_into_our_file_and_we_read_it() {
    let dir = tempdir("interop-alt-ours-");
    let img = dir.path().join("ours.vhdx");
    let size = 24 * MIB + 512;
    ours_ok(&[
        "create",
        "-q",
        "-o",
        "block_size=1M",
        s(&img),
        &size.to_string(),
    ]);
    let mut model = Model::new(size, MIB, 512);
    alternate(
        &img,
        dir.path(),
        &mut model,
        (Writer::Qemu, false),
        11,
        "our dynamic file",
    );
    // And a fixed file of ours.
    let img = dir.path().join("ours-fixed.vhdx");
    ours_ok(&[
        "create",
        "-q",
        "-o",
        "subformat=fixed,block_size=2M",
        s(&img),
        "20M",
    ]);
    let mut model = Model::new(20 * MIB, 2 * MIB, 512);
    alternate(
        &img,
        dir.path(),
        &mut model,
        (Writer::Qemu, true),
        12,
        "our fixed file",
    );
}

fn we_write_into_qemu_file(opts: &str, seed: u64) {
    let dir = tempdir("interop-alt-qemu-");
    let img = dir.path().join("qemu.vhdx");
    let size = 24 * MIB;
    qemu_img_create_vhdx(&img, &size.to_string(), opts);
    let mut model = Model::new(size, MIB, 512);
    let fixed = opts.contains("fixed");
    // A new qemu file: qemu reads zeros and finds no error. qemu leaves 4 MiB past its
    // metadata for "future expansion" that nothing will use (it allocates at the end of the
    // file): unless the preallocated blocks of a fixed file follow, our check calls that a
    // leak (exit 3) until our first session trims it.
    assert_qemu_img_check_clean(&img, opts);
    let out = ours(&["check", s(&img)]);
    let report = String::from_utf8_lossy(&out.stdout);
    if opts.contains("block_state_zero=off") {
        assert_eq!(out.status.code(), Some(0), "{opts}: {report}");
        assert!(report.contains("4194304 bytes between structures are unused"));
    } else {
        assert_eq!(out.status.code(), Some(3), "{opts}: {report}");
        assert!(
            report.contains("Leaked space: 4194304 bytes"),
            "{opts}: {report}"
        );
    }
    let by_us = dir.path().join("ours.raw");
    ours_ok(&["convert", "-q", s(&img), s(&by_us)]);
    assert!(
        is_all_zero(&by_us),
        "{opts}: a new qemu file reads as zeros"
    );
    alternate(
        &img,
        dir.path(),
        &mut model,
        (Writer::Us, fixed),
        seed,
        &format!("qemu file {opts}"),
    );
}

#[test]
fn we_write_into_qemu_dynamic_file() {
    we_write_into_qemu_file("block_size=1M", 21);
}

#[test]
fn we_write_into_qemu_fixed_file() {
    we_write_into_qemu_file("subformat=fixed,block_size=1M", 22);
}

#[test]
fn we_write_into_qemu_fixed_file_without_block_state_zero() {
    we_write_into_qemu_file("subformat=fixed,block_size=1M,block_state_zero=off", 23);
}

/// A differencing chain of depth 3, written by us at every level; pyvhdi (through
/// `set_parent`) and our reader see the model, and writing a child never changes a parent.
#[test]
fn differencing_chain_written_at_every_level() {
    let dir = tempdir("interop-diff-");
    let d = dir.path();
    let size = 20 * MIB + 1536;
    let paths: Vec<PathBuf> = ["base.vhdx", "child.vhdx", "grandchild.vhdx"]
        .iter()
        .map(|n| d.join(n))
        .collect();
    ours_ok(&[
        "create",
        "-q",
        "-o",
        "block_size=1M",
        s(&paths[0]),
        &size.to_string(),
    ]);
    let mut model = Model::new(size, MIB, 512);
    let mut rng = StdRng::seed_from_u64(31);
    let mut frozen: Vec<Vec<u8>> = Vec::new();
    for level in 0..3 {
        if level > 0 {
            ours_ok(&["create", "-q", "-b", s(&paths[level - 1]), s(&paths[level])]);
        }
        for _ in 0..2 {
            let ops = model.random_ops(&mut rng, 40);
            our_round(&paths[level], &mut model, &ops);
        }
        let chain: Vec<&Path> = paths[..=level].iter().rev().map(PathBuf::as_path).collect();
        verify_all(d, &chain, &model, &format!("chain level {level}"));
        for (i, bytes) in frozen.iter().enumerate() {
            assert!(
                std::fs::read(&paths[i]).unwrap() == *bytes,
                "writing level {level} changed {}",
                paths[i].display()
            );
        }
        frozen.push(std::fs::read(&paths[level]).unwrap());
    }
    assert_qemu_img_check_clean(&paths[0], "the base");
}

/// Blocks of `size` bytes (the last may be short) that hold a non-zero byte.
fn blocks_with_data(raw: &[u8], block: u64) -> u64 {
    raw.chunks(block as usize)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64
}

#[test]
fn convert_sparse_raw_to_vhdx_and_back() {
    let dir = tempdir("interop-convert-");
    let d = dir.path();
    let size = 100 * MIB + 1536;
    let mut data = vec![0u8; size as usize];
    let mut rng = StdRng::seed_from_u64(41);
    // Scattered data: a boot sector, odd small pieces, a run across a block boundary, a few
    // MiB in the middle, the last sector.
    let pieces: [(u64, u64); 6] = [
        (0, 4096),
        (5 * MIB + 512, 1024),
        (17 * MIB - 4096, 8192),
        (50 * MIB + 12345, 3 * MIB),
        (81 * MIB + 7, 1),
        (size - 512, 512),
    ];
    for (off, len) in pieces {
        for b in &mut data[off as usize..(off + len) as usize] {
            *b = rng.gen_range(1..=255);
        }
    }
    let input = d.join("in.raw");
    let f = File::create(&input).unwrap();
    f.set_len(size).unwrap();
    for (off, len) in pieces {
        f.write_all_at(&data[off as usize..(off + len) as usize], off)
            .unwrap();
    }
    // Zeros that are data, not a hole: a converter must not allocate for them.
    f.write_all_at(&vec![0u8; 3 * MIB as usize], 70 * MIB)
        .unwrap();
    drop(f);

    for (opts, block, fixed) in [
        ("block_size=1M", MIB, false),
        ("", 32 * MIB, false),
        ("subformat=fixed,block_size=8M", 8 * MIB, true),
    ] {
        let what = format!("convert -o {opts:?}");
        let out = d.join("out.vhdx");
        let _ = std::fs::remove_file(&out);
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&input), s(&out)]);
        ours_ok(&args);
        assert_qemu_img_check_clean(&out, &what);
        qemu_compare(&out, &input, &what);
        let by_libvhdi = d.join("pyvhdi.raw");
        pyvhdi_read_raw(&by_libvhdi, &[&out]);
        assert_files_equal(&by_libvhdi, &input, &format!("{what}: pyvhdi"));
        our_check_clean(&out, &what);
        let back = d.join("back.raw");
        let _ = std::fs::remove_file(&back);
        ours_ok(&["convert", "-q", s(&out), s(&back)]);
        assert_files_equal(&back, &input, &format!("{what}: converted back to raw"));

        let info: Value =
            serde_json::from_str(&ours_ok(&["info", "--output", "json", s(&out)])).unwrap();
        let facts = &info["format-specific"]["data"];
        assert_eq!(facts["block-size"], block, "{what}");
        let total = size.div_ceil(block);
        let states = facts["block-states"].as_object().unwrap();
        let count = |k: &str| states.get(k).and_then(Value::as_u64).unwrap_or(0);
        if fixed {
            assert_eq!(count("fully_present"), total, "{what}: {states:?}");
        } else {
            let with_data = blocks_with_data(&data, block);
            assert_eq!(count("fully_present"), with_data, "{what}: {states:?}");
            assert_eq!(
                count("not_present"),
                total - with_data,
                "{what}: {states:?}"
            );
            assert!(
                states
                    .keys()
                    .all(|k| k == "fully_present" || k == "not_present"),
                "{what}: {states:?}"
            );
        }
    }
}
