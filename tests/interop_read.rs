//! Our reader and our `create` against the real peers (qemu-img, qemu-io and libvhdi's pyvhdi).
//!
//! * Windows-made fixtures: `info --output json` states the facts of the fixture README, and
//!   `convert -O raw` gives the bytes qemu-img and pyvhdi give (the dirty-log fixture: the bytes
//!   qemu-img gives after its own log replay; and our writable open replays the log into the file
//!   so that qemu-img then finds it clean and reads the same data).
//! * qemu-made files (dynamic, fixed, fixed without block_state_zero; 1 to 256 MiB blocks),
//!   written with qemu-io: our convert and `Chain::read_at` read what qemu-img reads and what the
//!   writes put there.
//! * Files made by our `create`: qemu-img check and pyvhdi accept them with the right geometry.
//! * A differencing chain of depth 4 made by our `create -b` over a qemu-written base, with data
//!   put into the children by a test-only raw injector: pyvhdi, our convert and a model agree.
//! * `--parent PATH` for a moved parent.

mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Output;

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use vhost_user_vhdx::vhdx::{Chain, ChainOptions, LogState, VhdxFile};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn stderr_line(out: &Output) -> String {
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        e.trim_end().lines().count(),
        1,
        "expected exactly one line on stderr, got:\n{e}"
    );
    e.trim_end().to_string()
}

fn our_info(img: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["info", "--output", "json"];
    args.extend_from_slice(extra);
    args.push(s(img));
    serde_json::from_str(&ours_ok(&args)).expect("info prints JSON")
}

fn our_convert(img: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["convert", "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend([s(img), s(out)]);
    ours_ok(&args);
}

/// Reads `ranges` (sector-aligned) through `Chain::read_at` and compares them with a raw image.
fn spot_check(chain: &Chain, reference: &Path, ranges: &[(u64, u64)]) {
    for &(off, len) in ranges {
        let mut got = vec![0u8; len as usize];
        chain
            .read_at(&mut got, off)
            .unwrap_or_else(|e| panic!("Chain::read_at({off:#x}, {len:#x}): {e}"));
        let want = read_at(reference, off, len as usize);
        if got != want {
            let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!(
                "Chain::read_at({off:#x}, {len:#x}) differs from {} at byte {:#x}: {:#04x} != {:#04x}",
                reference.display(),
                off + i as u64,
                got[i],
                want[i]
            );
        }
    }
}

/// Sector-aligned ranges at odd sectors: across block boundaries, the first and last sectors,
/// and random ones (seeded, so a failure repeats).
fn odd_ranges(vsize: u64, block: u64, lss: u64, seed: u64) -> Vec<(u64, u64)> {
    let mut v = vec![
        (0, lss),
        (lss, 3 * lss),
        (vsize - lss, lss),
        (vsize - 3 * lss, 3 * lss),
    ];
    let mut b = block;
    while b < vsize && v.len() < 12 {
        v.push((b - lss, 2 * lss));
        v.push((b - 5 * lss, (11 * lss).min(vsize - (b - 5 * lss))));
        b += block * 7;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sectors = vsize / lss;
    for _ in 0..24 {
        let first = rng.gen_range(0..sectors / 2) * 2 + 1;
        let first = first.min(sectors - 1);
        let count = rng.gen_range(1..=(256 * KIB / lss)).min(sectors - first);
        v.push((first * lss, count * lss));
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Windows-made fixtures
// ---------------------------------------------------------------------------------------------

/// The facts every fixture shares (fixture README): 32 MiB blocks, 512/4096-byte sectors, a
/// 1 MiB log at 1 MiB, no parent.
fn assert_fixture_geometry(name: &str, info: &Value, virtual_size: u64) {
    let d = &info["format-specific"]["data"];
    assert_eq!(info["format"], "vhdx", "{name}: {info}");
    assert_eq!(info["virtual-size"], virtual_size, "{name}: virtual size");
    assert_eq!(info["cluster-size"], 32 * MIB, "{name}: cluster size");
    assert_eq!(d["block-size"], 32 * MIB, "{name}: block size");
    assert_eq!(d["logical-sector-size"], 512, "{name}: logical sector");
    assert_eq!(d["physical-sector-size"], 4096, "{name}: physical sector");
    assert_eq!(d["subformat"], "dynamic", "{name}: subformat");
    assert_eq!(d["log"]["offset"], MIB, "{name}: log offset");
    assert_eq!(d["log"]["length"], MIB, "{name}: log length");
    assert!(info.get("backing-filename").is_none(), "{name}: no parent");
    assert_eq!(d["sector-bitmap-blocks"], 0, "{name}");
}

/// `block-states` as our info prints it: only the states that occur; NOT_PRESENT is the rest.
fn block_states(total: u64, counts: &[(&str, u64)]) -> Value {
    let mut m = serde_json::Map::new();
    let mut rest = total;
    for &(k, n) in counts {
        m.insert(k.into(), json!(n));
        rest -= n;
    }
    if rest > 0 {
        m.insert("not_present".into(), json!(rest));
    }
    Value::Object(m)
}

fn clean_fixture_reads_like_the_peers(name: &str, virtual_size: u64, counts: &[(&str, u64)]) {
    let (dir, img) = fixture(name);
    let info = our_info(&img, &[]);
    assert_fixture_geometry(name, &info, virtual_size);
    let d = &info["format-specific"]["data"];
    assert_eq!(d["log"]["state"], "clean", "{name}: log state");
    assert_eq!(info["dirty-flag"], false, "{name}");
    assert_eq!(
        d["block-states"],
        block_states(virtual_size / (32 * MIB), counts),
        "{name}: block states (fixture README)"
    );

    let by_us = dir.path().join("ours.raw");
    let by_qemu = dir.path().join("qemu.raw");
    let by_libvhdi = dir.path().join("pyvhdi.raw");
    our_convert(&img, &by_us, &[]);
    qemu_img_convert_raw(&img, &by_qemu);
    pyvhdi_read_raw(&by_libvhdi, &[&img]);
    assert!(!is_all_zero(&by_us), "{name}: we read only zeros");
    assert_files_equal(&by_us, &by_qemu, &format!("{name}: ours vs qemu-img"));
    assert_files_equal(&by_us, &by_libvhdi, &format!("{name}: ours vs pyvhdi"));

    let chain = Chain::open(&img, &ChainOptions::default()).expect("open the fixture");
    spot_check(
        &chain,
        &by_qemu,
        &odd_ranges(virtual_size, 32 * MIB, 512, virtual_size),
    );
}

#[test]
fn fixture_btrfs_reads_like_the_peers() {
    clean_fixture_reads_like_the_peers(
        "discutils-btrfs",
        GIB,
        &[("fully_present", 2), ("zero", 1)],
    );
}

#[test]
fn fixture_lvm2_with_unmapped_blocks_reads_like_the_peers() {
    clean_fixture_reads_like_the_peers(
        "discutils-lvm2",
        10 * GIB,
        &[("fully_present", 18), ("zero", 39), ("unmapped", 25)],
    );
}

#[test]
fn fixture_swap_with_interleaved_bitmap_entries_reads_like_the_peers() {
    clean_fixture_reads_like_the_peers(
        "discutils-swap",
        10 * GIB,
        &[("fully_present", 1), ("zero", 1)],
    );
}

#[test]
fn fixture_xfs5_reads_like_the_peers() {
    clean_fixture_reads_like_the_peers(
        "discutils-xfs5",
        10 * GIB,
        &[("fully_present", 5), ("zero", 50)],
    );
}

/// Payload block states counted straight from the bytes of a non-differencing file (region
/// table 1, BAT), independently of our engine.
fn raw_block_states(path: &Path) -> BTreeMap<&'static str, u64> {
    const BAT_GUID: [u8; 16] = [
        0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A,
        0x08,
    ];
    let table = read_at(path, 192 * KIB, 64 * KIB as usize);
    assert_eq!(&table[..4], b"regi", "region table signature");
    let count = u32::from_le_bytes(table[8..12].try_into().unwrap()) as usize;
    let entry = (0..count)
        .map(|i| &table[16 + 32 * i..48 + 32 * i])
        .find(|e| e[..16] == BAT_GUID)
        .expect("a BAT region");
    let bat_offset = u64::from_le_bytes(entry[16..24].try_into().unwrap());
    // Every fixture: 32 MiB blocks, 512-byte sectors: chunk ratio 128.
    let payload_blocks = {
        let f = VhdxFile::open(path, false).unwrap();
        f.virtual_size().div_ceil(32 * MIB)
    };
    let mut counts = BTreeMap::new();
    for b in 0..payload_blocks {
        let index = b + b / 128;
        let e = u64::from_le_bytes(read_at(path, bat_offset + 8 * index, 8).try_into().unwrap());
        let name = match e & 7 {
            0 => "not_present",
            1 => "undefined",
            2 => "zero",
            3 => "unmapped",
            6 => "fully_present",
            7 => "partially_present",
            s => panic!("block {b}: reserved state {s}"),
        };
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// The dirty-log fixture. Read-only, we replay the log in memory: info says `dirty`, the block
/// states are those qemu's repaired copy has on disk, convert reads what qemu reads after
/// `check -r all`, and the file is not modified. A writable open through our engine replays the
/// log into the file: qemu-img check then finds it clean, and qemu and pyvhdi (which never
/// replays) read the same data from it.
#[test]
fn fixture_with_dirty_log_reads_like_qemu_after_replay() {
    let name = "discutils-vhdx-log-replay";
    let (dir, img) = fixture(name);
    let (_pristine_dir, pristine) = fixture(name);
    let before = raw_block_states(&img);
    assert_eq!(
        before,
        BTreeMap::from([("not_present", 32)]),
        "{name}: on disk, before replay, every block is NOT_PRESENT (fixture README)"
    );

    let info = our_info(&img, &[]);
    assert_fixture_geometry(name, &info, GIB);
    let d = &info["format-specific"]["data"];
    assert_eq!(d["log"]["state"], "dirty", "{name}: log state");
    assert!(d["log"]["replayed-entries"].as_u64().unwrap() > 0, "{d}");
    assert_eq!(info["dirty-flag"], true, "{name}");

    // qemu: refuses the dirty file read-only; repair a copy first.
    let qemu_copy = dir.path().join("qemu-repaired.vhdx");
    std::fs::copy(&img, &qemu_copy).unwrap();
    let (code, report) = qemu_img_check(&qemu_copy);
    assert_ne!(code, 0, "qemu-img check accepted a dirty log:\n{report}");
    qemu_img_ok(&["check", "-r", "all", "-f", "vhdx", s(&qemu_copy)]);
    let by_qemu = dir.path().join("qemu.raw");
    qemu_img_convert_raw(&qemu_copy, &by_qemu);
    assert_eq!(read_at(&by_qemu, 510, 2), [0x55, 0xAA], "MBR after replay");

    let after = raw_block_states(&qemu_copy);
    let ours_states: BTreeMap<&str, u64> = d["block-states"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_u64().unwrap()))
        .collect();
    assert_eq!(
        ours_states, after,
        "{name}: block states after our in-memory replay vs the BAT qemu wrote"
    );

    let by_us = dir.path().join("ours.raw");
    our_convert(&img, &by_us, &[]);
    assert_files_equal(
        &by_us,
        &by_qemu,
        "dirty log: our in-memory replay vs qemu's replay",
    );
    let by_libvhdi = dir.path().join("pyvhdi-after-qemu-replay.raw");
    pyvhdi_read_raw(&by_libvhdi, &[&qemu_copy]);
    assert_files_equal(&by_libvhdi, &by_qemu, "pyvhdi on qemu's repaired copy");
    assert_files_equal(
        &img,
        &pristine,
        "info and convert must not modify a dirty file",
    );

    // Our writable open replays the log into the file.
    let our_copy = dir.path().join("ours-replayed.vhdx");
    std::fs::copy(&img, &our_copy).unwrap();
    {
        let f = VhdxFile::open(&our_copy, true).expect("writable open of the dirty fixture");
        assert!(
            matches!(f.log_state, LogState::Replayed { entries } if entries > 0),
            "{:?}",
            f.log_state
        );
    }
    let (code, report) = qemu_img_check(&our_copy);
    assert_eq!(
        code, 0,
        "qemu-img check after our replay must be clean:\n{report}"
    );
    let qemu_of_ours = dir.path().join("qemu-of-ours.raw");
    qemu_img_convert_raw(&our_copy, &qemu_of_ours);
    assert_files_equal(&qemu_of_ours, &by_qemu, "qemu reading our replayed file");
    let libvhdi_of_ours = dir.path().join("pyvhdi-of-ours.raw");
    pyvhdi_read_raw(&libvhdi_of_ours, &[&our_copy]);
    assert_files_equal(
        &libvhdi_of_ours,
        &by_qemu,
        "pyvhdi (no replay of its own) reading our replayed file",
    );
    let info = our_info(&our_copy, &[]);
    assert_eq!(info["format-specific"]["data"]["log"]["state"], "clean");
    assert_eq!(info["dirty-flag"], false);
}

// ---------------------------------------------------------------------------------------------
// Files made and written by qemu
// ---------------------------------------------------------------------------------------------

/// `(pattern, offset, length)` writes for a disk: the first sectors, across block boundaries,
/// unaligned inside a block, an overwrite, in the middle, and the last sector.
fn qemu_writes(vsize: u64, block: u64) -> Vec<(u8, u64, u64)> {
    let mut w = vec![(0xa1, 0, 8 * KIB), (0xa2, 2 * 512, 3 * 512)];
    if vsize > block {
        // Across the first block boundary, unaligned, at most 2 MiB + 1 KiB of data.
        let len = (2 * MIB + KIB).min(block + KIB);
        w.push((0xa3, block - len / 2 - 512, len));
    }
    if vsize > 4 * block {
        w.push((0xa4, 3 * block + 7 * 512, 13 * 512));
    }
    let mid = (vsize / 2) / 512 * 512 + 3 * 512;
    w.push((0xa5, mid, 64 * KIB + 512));
    w.push((0xa6, vsize - 512, 512));
    w.push((0xa7, vsize - 5 * 512, 3 * 512));
    w
}

/// Applies `(pattern, offset, length)` writes to a new sparse file: what the disk must read.
fn model_of_writes(path: &Path, vsize: u64, writes: &[(u8, u64, u64)]) {
    let f = File::create(path).unwrap();
    f.set_len(vsize).unwrap();
    for &(p, off, len) in writes {
        f.write_all_at(&vec![p; len as usize], off).unwrap();
    }
}

/// qemu-io writes `(pattern, offset, length)` writes into the image.
fn qemu_io_writes(img: &Path, writes: &[(u8, u64, u64)]) {
    let cmds: Vec<String> = writes
        .iter()
        .map(|&(p, off, len)| Op::Write(p, off, len).command())
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_ok(img, &cmds);
}

/// A qemu-made file, written by qemu-io, reads the same through our convert, qemu-img convert and
/// the model; `Chain::read_at` agrees at odd offsets; our info states qemu's geometry.
fn qemu_made_file_reads_identically(opts: &str, vsize: u64, block: u64, pyvhdi_too: bool) {
    let dir = tempdir("qemu-made-");
    let img = dir.path().join("disk.vhdx");
    let size = vsize.to_string();
    qemu_img_create_vhdx(&img, &size, opts);
    let writes = qemu_writes(vsize, block);
    qemu_io_writes(&img, &writes);
    assert_qemu_img_check_clean(&img, &format!("{opts}: after qemu-io"));

    let info = our_info(&img, &[]);
    let qinfo: Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output", "json", s(&img)])).unwrap();
    assert_eq!(info["virtual-size"], vsize, "{opts}");
    assert_eq!(info["virtual-size"], qinfo["virtual-size"], "{opts}");
    assert_eq!(info["cluster-size"], qinfo["cluster-size"], "{opts}");
    assert_eq!(info["cluster-size"], block, "{opts}");
    let d = &info["format-specific"]["data"];
    assert_eq!(d["logical-sector-size"], 512, "{opts}");
    let fixed = opts.contains("subformat=fixed");
    assert_eq!(
        d["subformat"],
        if fixed { "fixed" } else { "dynamic" },
        "{opts}"
    );

    let model = dir.path().join("model.raw");
    let by_us = dir.path().join("ours.raw");
    let by_qemu = dir.path().join("qemu.raw");
    model_of_writes(&model, vsize, &writes);
    our_convert(&img, &by_us, &[]);
    qemu_img_convert_raw(&img, &by_qemu);
    assert_files_equal(&by_qemu, &model, &format!("{opts}: qemu-img vs the model"));
    assert_files_equal(&by_us, &model, &format!("{opts}: ours vs the model"));
    if pyvhdi_too {
        let by_libvhdi = dir.path().join("pyvhdi.raw");
        pyvhdi_read_raw(&by_libvhdi, &[&img]);
        assert_files_equal(&by_libvhdi, &model, &format!("{opts}: pyvhdi vs the model"));
    }

    let chain = Chain::open(&img, &ChainOptions::default()).unwrap();
    let mut ranges = odd_ranges(vsize, block, 512, vsize ^ block);
    for &(_, off, len) in &writes {
        // The edges of every write, one sector either side.
        let start = off.saturating_sub(512);
        ranges.push((start, (off + len + 512).min(vsize) - start));
    }
    spot_check(&chain, &model, &ranges);
}

#[test]
fn qemu_dynamic_64m_1m_blocks() {
    qemu_made_file_reads_identically("block_size=1M", 64 * MIB, MIB, true);
}

#[test]
fn qemu_dynamic_1g_8m_blocks() {
    qemu_made_file_reads_identically("block_size=8M", GIB, 8 * MIB, true);
}

#[test]
fn qemu_dynamic_5g_plus_512_256m_blocks() {
    qemu_made_file_reads_identically("block_size=256M", 5 * GIB + 512, 256 * MIB, false);
}

#[test]
fn qemu_dynamic_10g_32m_blocks() {
    qemu_made_file_reads_identically("block_size=32M", 10 * GIB, 32 * MIB, true);
}

/// qemu's default fixed file: every BAT entry ZERO, the preallocated space unused; writes go to
/// new blocks at the end of the file.
#[test]
fn qemu_fixed_64m_8m_blocks_block_state_zero() {
    qemu_made_file_reads_identically("subformat=fixed,block_size=8M", 64 * MIB, 8 * MIB, true);
}

/// A real fixed layout: every entry FULLY_PRESENT in place.
#[test]
fn qemu_fixed_64m_1m_blocks_without_block_state_zero() {
    qemu_made_file_reads_identically(
        "subformat=fixed,block_state_zero=off,block_size=1M",
        64 * MIB,
        MIB,
        true,
    );
}

#[test]
fn qemu_fixed_1g_32m_blocks_without_block_state_zero() {
    qemu_made_file_reads_identically(
        "subformat=fixed,block_state_zero=off,block_size=32M",
        GIB,
        32 * MIB,
        false,
    );
}

// ---------------------------------------------------------------------------------------------
// Files made by our create
// ---------------------------------------------------------------------------------------------

/// Our `create` makes files qemu and libvhdi accept with the geometry we asked for.
///
/// What qemu accepts: qemu's vhdx driver opens only 512-byte logical sectors (its metadata
/// parser returns ENOTSUP for anything else), so for 4096-byte files `qemu-img check` exits 1 with
/// "Could not open ...: Operation not supported" — that refusal is asserted, so a qemu that
/// learns 4Kn shows up here. Block sizes 1–256 MiB, dynamic and fixed (LeaveBlockAllocated,
/// every entry FULLY_PRESENT), sizes that are not a multiple of the block size: all accepted.
/// pyvhdi (libvhdi) accepts both sector sizes.
#[test]
fn files_made_by_our_create_pass_qemu_and_pyvhdi() {
    let dir = tempdir("our-create-");
    // (subformat, logical sector size, block size, size argument, virtual size)
    let cases: &[(&str, u64, &str, &str, u64)] = &[
        ("dynamic", 512, "1M", "64M", 64 * MIB),
        ("dynamic", 512, "1M", "1000001", 1000448), // rounded up to the sector
        ("fixed", 512, "1M", "104858112", 100 * MIB + 512), // not a multiple of the block
        ("dynamic", 512, "32M", "10G", 10 * GIB),
        ("dynamic", 512, "256M", "5368709632", 5 * GIB + 512),
        ("fixed", 512, "256M", "300M", 300 * MIB),
        ("dynamic", 4096, "1M", "67112960", 64 * MIB + 4096),
        ("dynamic", 4096, "32M", "1000001", 1003520),
        ("fixed", 4096, "32M", "100M", 100 * MIB),
        ("dynamic", 4096, "256M", "10G", 10 * GIB),
    ];
    for (i, &(sub, lss, block, size, vsize)) in cases.iter().enumerate() {
        let what = format!("{sub} lss={lss} block={block} size={size}");
        let img = dir.path().join(format!("c{i}.vhdx"));
        let opts = format!("subformat={sub},logical_sector_size={lss},block_size={block}");
        ours_ok(&["create", "-q", "-o", &opts, s(&img), size]);

        let (code, report) = qemu_img_check(&img);
        if lss == 512 {
            assert_eq!(code, 0, "{what}: qemu-img check:\n{report}");
            assert!(report.contains("No errors were found"), "{what}: {report}");
            let q: Value =
                serde_json::from_str(&qemu_img_ok(&["info", "--output", "json", s(&img)])).unwrap();
            assert_eq!(q["virtual-size"], vsize, "{what}: qemu-img info");
            assert_eq!(q["format"], "vhdx", "{what}");
        } else {
            assert_eq!(code, 1, "{what}: qemu-img check of a 4Kn file:\n{report}");
            assert!(
                report.contains("Operation not supported"),
                "{what}: qemu's refusal changed:\n{report}"
            );
        }

        let py = pyvhdi_info(&img);
        assert_eq!(py["media_size"], vsize, "{what}: pyvhdi media size {py}");
        assert_eq!(
            py["bytes_per_sector"], lss,
            "{what}: pyvhdi sector size {py}"
        );
        assert_eq!(py["disk_type_name"], sub, "{what}: pyvhdi disk type {py}");
        assert!(py["parent_identifier"].is_null(), "{what}: {py}");

        // Our own view, and our check: clean, nothing leaked.
        let info = our_info(&img, &[]);
        let d = &info["format-specific"]["data"];
        assert_eq!(info["virtual-size"], vsize, "{what}");
        assert_eq!(d["logical-sector-size"], lss, "{what}");
        assert_eq!(d["subformat"], sub, "{what}");
        let blocks = vsize.div_ceil(info["cluster-size"].as_u64().unwrap());
        let state = if sub == "fixed" {
            "fully_present"
        } else {
            "not_present"
        };
        assert_eq!(d["block-states"], json!({ state: blocks }), "{what}");
        let out = ours(&["check", s(&img)]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{what}: our check:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// qemu writes into files made by our `create` (512-byte sectors): qemu-img check stays clean,
/// and we read back what qemu wrote.
#[test]
fn qemu_writes_into_files_made_by_our_create() {
    let dir = tempdir("our-create-qemu-writes-");
    for (sub, block, vsize) in [
        ("dynamic", MIB, 64 * MIB + 512),
        ("fixed", 8 * MIB, 72 * MIB),
        ("dynamic", 32 * MIB, 2 * GIB),
    ] {
        let what = format!("{sub} block={block} size={vsize}");
        let img = dir.path().join(format!("{sub}-{block}.vhdx"));
        let opts = format!("subformat={sub},block_size={block}");
        ours_ok(&["create", "-q", "-o", &opts, s(&img), &vsize.to_string()]);
        let writes = qemu_writes(vsize, block);
        qemu_io_writes(&img, &writes);
        assert_qemu_img_check_clean(&img, &format!("{what}: after qemu-io"));
        let model = dir.path().join("model.raw");
        let by_us = dir.path().join("ours.raw");
        let by_qemu = dir.path().join("qemu.raw");
        for p in [&model, &by_us, &by_qemu] {
            let _ = std::fs::remove_file(p);
        }
        model_of_writes(&model, vsize, &writes);
        our_convert(&img, &by_us, &[]);
        qemu_img_convert_raw(&img, &by_qemu);
        assert_files_equal(&by_qemu, &model, &format!("{what}: qemu vs model"));
        assert_files_equal(&by_us, &model, &format!("{what}: ours vs model"));
    }
}

// ---------------------------------------------------------------------------------------------
// Differencing chains
// ---------------------------------------------------------------------------------------------

/// The bytes a layer holds at a virtual range: every 512 bytes stamped with the layer and the
/// virtual offset, so that misplaced, stale or wrong-layer data is recognised.
fn stamp(layer: u8, voff: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    for (i, sector) in v.chunks_mut(512).enumerate() {
        let off = voff + 512 * i as u64;
        sector.fill((layer.wrapping_mul(37) ^ (off / 512) as u8) | 1);
        sector[..8].copy_from_slice(&off.to_le_bytes());
        sector[8] = layer;
    }
    v
}

/// Test-only writer for differencing files (our engine cannot write yet): allocates space at the
/// 1 MiB-aligned end of the file and sets BAT and sector-bitmap entries directly.
struct Injector {
    file: File,
    layer: u8,
    bat_offset: u64,
    block_size: u64,
    lss: u64,
    chunk_ratio: u64,
    vsize: u64,
}

const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;
const ZERO: u64 = 2;
const SB_BLOCK_PRESENT: u64 = 6;

impl Injector {
    fn open(path: &Path, layer: u8) -> Injector {
        let f = VhdxFile::open(path, false).unwrap();
        assert!(
            f.is_differencing(),
            "{} is not differencing",
            path.display()
        );
        let block_size = u64::from(f.metadata.block_size);
        let lss = u64::from(f.logical_sector_size());
        Injector {
            file: OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap(),
            layer,
            bat_offset: f.regions.bat().file_offset,
            block_size,
            lss,
            chunk_ratio: ((1u64 << 23) * lss) / block_size,
            vsize: f.virtual_size(),
        }
    }

    fn alloc(&self, len: u64) -> u64 {
        let end = self.file.metadata().unwrap().len();
        let at = end.next_multiple_of(MIB);
        self.file.set_len(at + len).unwrap();
        at
    }

    fn entry(&self, index: u64) -> u64 {
        let mut b = [0u8; 8];
        self.file
            .read_exact_at(&mut b, self.bat_offset + 8 * index)
            .unwrap();
        u64::from_le_bytes(b)
    }

    fn set_entry(&self, index: u64, state: u64, offset: u64) {
        assert_eq!(offset % MIB, 0);
        self.file
            .write_all_at(&(state | offset).to_le_bytes(), self.bat_offset + 8 * index)
            .unwrap();
    }

    fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// A whole block of this layer's data.
    fn full(&self, block: u64, model: &mut Vec<(u64, Vec<u8>)>) {
        let at = self.alloc(self.block_size);
        let voff = block * self.block_size;
        let data = stamp(self.layer, voff, self.block_size);
        self.file.write_all_at(&data, at).unwrap();
        self.set_entry(self.payload_index(block), FULLY_PRESENT, at);
        let visible = self.block_size.min(self.vsize - voff) as usize;
        model.push((voff, data[..visible].to_vec()));
    }

    /// A ZERO block: reads zeros, never the parent's data.
    fn zero(&self, block: u64, model: &mut Vec<(u64, Vec<u8>)>) {
        self.set_entry(self.payload_index(block), ZERO, 0);
        let voff = block * self.block_size;
        model.push((
            voff,
            vec![0; self.block_size.min(self.vsize - voff) as usize],
        ));
    }

    /// A PARTIALLY_PRESENT block with the given `(first sector in block, count)` runs present.
    fn partial(&self, block: u64, runs: &[(u64, u64)], model: &mut Vec<(u64, Vec<u8>)>) {
        let chunk = block / self.chunk_ratio;
        let sb_index = chunk * (self.chunk_ratio + 1) + self.chunk_ratio;
        let mut sb = self.entry(sb_index);
        if sb & 7 == 0 {
            let at = self.alloc(MIB);
            self.set_entry(sb_index, SB_BLOCK_PRESENT, at);
            sb = SB_BLOCK_PRESENT | at;
        }
        assert_eq!(sb & 7, SB_BLOCK_PRESENT);
        let sb_offset = sb & !(MIB - 1);
        let mut bitmap = vec![0u8; MIB as usize];
        self.file.read_exact_at(&mut bitmap, sb_offset).unwrap();

        let at = self.alloc(self.block_size);
        let sectors_per_block = self.block_size / self.lss;
        for &(first, count) in runs {
            assert!(first + count <= sectors_per_block);
            let voff = block * self.block_size + first * self.lss;
            assert!(voff + count * self.lss <= self.vsize);
            let data = stamp(self.layer, voff, count * self.lss);
            self.file
                .write_all_at(&data, at + first * self.lss)
                .unwrap();
            model.push((voff, data));
            for sector in first..first + count {
                let bit = (block % self.chunk_ratio) * sectors_per_block + sector;
                bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        self.file.write_all_at(&bitmap, sb_offset).unwrap();
        self.set_entry(self.payload_index(block), PARTIALLY_PRESENT, at);
    }
}

fn write_model(path: &Path, vsize: u64, base: &[(u8, u64, u64)], layers: &[(u64, Vec<u8>)]) {
    model_of_writes(path, vsize, base);
    let f = OpenOptions::new().write(true).open(path).unwrap();
    for (off, data) in layers {
        f.write_all_at(data, *off).unwrap();
    }
}

/// A chain of depth 4: a base made and written by qemu (8 MiB blocks, 5 GiB + 1 MiB so that it
/// has two sector-bitmap chunks and a short last block), then three differencing files made by
/// our `create -b` with 8, 1 and 2 MiB blocks, filled by the injector with full blocks, partial
/// blocks with scattered runs (in both chunks), a ZERO block, blocks that override the parents,
/// and holes that fall through one, two or three levels. Our convert and the model agree byte for
/// byte, and so does `Chain::read_at` at odd offsets; pyvhdi (set_parent) agrees too, except that
/// it reads the ZERO block from the parent.
#[test]
fn differencing_chain_reads_like_pyvhdi_and_the_model() {
    let dir = tempdir("chain-");
    let vsize = 5 * GIB + MIB;
    let base = dir.path().join("base.vhdx");
    let child1 = dir.path().join("child1.vhdx");
    let child2 = dir.path().join("child2.vhdx");
    let leaf = dir.path().join("leaf.vhdx");

    qemu_img_create_vhdx(&base, &vsize.to_string(), "block_size=8M");
    let base_writes: Vec<(u8, u64, u64)> = vec![
        (0x11, 0, 12 * MIB),                // blocks 0 and half of 1
        (0x22, 20 * MIB + 512, 8 * MIB),    // unaligned, across 24M
        (0x33, 4 * GIB - 4 * KIB, 8 * KIB), // across the 4 GiB chunk boundary
        (0x55, 100 * MIB, MIB),             // hidden by child1's ZERO block
        (0x66, 4 * GIB + 8 * MIB, 3 * MIB), // falls through everything
        (0x44, vsize - 512, 512),           // the last sector
    ];
    qemu_io_writes(&base, &base_writes);

    ours_ok(&["create", "-q", "-b", s(&base), s(&child1)]);
    ours_ok(&[
        "create",
        "-q",
        "-o",
        "block_size=1M",
        "-b",
        s(&child1),
        s(&child2),
    ]);
    ours_ok(&[
        "create",
        "-q",
        "-o",
        "block_size=2M",
        "-b",
        s(&child2),
        s(&leaf),
    ]);

    let mut model: Vec<(u64, Vec<u8>)> = Vec::new();
    // child1: 8 MiB blocks, chunk ratio 512 (a chunk is 4 GiB).
    let c1 = Injector::open(&child1, 1);
    assert_eq!((c1.block_size, c1.chunk_ratio), (8 * MIB, 512));
    c1.full(1, &mut model); // 8M..16M: over base's 0x11 (8M..12M)
    c1.partial(
        2,
        &[(0, 1), (7, 9), (8000, 100), (8190, 4), (16383, 1)],
        &mut model,
    ); // 16M..24M: 20M-1K..20M+1K over base's 0x22
    c1.zero(12, &mut model); // 96M..104M: hides base's 0x55
    c1.partial(512, &[(0, 3), (100, 50)], &mut model); // 4G: chunk 1
    c1.partial(640, &[(0, 8), (1000, 24)], &mut model); // the short last block
    drop(c1);
    // child2: 1 MiB blocks, chunk ratio 4096.
    let c2 = Injector::open(&child2, 2);
    assert_eq!((c2.block_size, c2.chunk_ratio), (MIB, 4096));
    c2.full(10, &mut model); // 10M..11M over base's 0x11
    c2.partial(17, &[(0, 2), (1000, 48)], &mut model); // inside child1's partial block 2
    c2.partial(4096, &[(1, 1), (2040, 8)], &mut model); // 4G: over child1's sectors 0..3
    c2.full(99, &mut model); // next to child1's ZERO block
    drop(c2);
    // leaf: 2 MiB blocks, chunk ratio 2048.
    let lf = Injector::open(&leaf, 3);
    assert_eq!((lf.block_size, lf.chunk_ratio), (2 * MIB, 2048));
    lf.partial(0, &[(5, 10), (4095, 1)], &mut model); // the rest falls to base's 0x11
    lf.full(8, &mut model); // 16M..18M over child1's and child2's partial blocks
    lf.partial(2048, &[(0, 1), (3000, 7)], &mut model); // 4G, chunk 1
    lf.partial(2560, &[(0, 4), (2046, 1)], &mut model); // last block; 2047 is base's 0x44
    drop(lf);

    let expected = dir.path().join("model.raw");
    write_model(&expected, vsize, &base_writes, &model);

    // Our view of the chain.
    let infos = our_info(&leaf, &["--backing-chain"]);
    let infos = infos.as_array().expect("--backing-chain gives an array");
    let names: Vec<&str> = infos
        .iter()
        .map(|i| i["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names, [s(&leaf), s(&child2), s(&child1), s(&base)]);
    let leaf_data = &infos[0]["format-specific"]["data"];
    assert_eq!(leaf_data["subformat"], "differencing");
    assert_eq!(
        leaf_data["block-states"],
        json!({"fully_present": 1, "partially_present": 3, "not_present": 2561 - 4})
    );
    assert_eq!(leaf_data["sector-bitmap-blocks"], 2);
    for child in [&child1, &child2, &leaf] {
        let out = ours(&["check", s(child)]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "our check of injected {}:\n{}",
            child.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // pyvhdi sees a differential disk linked to its parent.
    let py_leaf = pyvhdi_info(&leaf);
    let py_child2 = pyvhdi_info(&child2);
    assert_eq!(py_leaf["disk_type_name"], "differential", "{py_leaf}");
    assert_eq!(py_leaf["media_size"], vsize);
    assert_eq!(py_leaf["bytes_per_sector"], 512);
    assert_eq!(
        py_leaf["parent_identifier"], py_child2["identifier"],
        "leaf's parent_linkage vs child2's DataWriteGuid"
    );

    let by_us = dir.path().join("ours.raw");
    let by_libvhdi = dir.path().join("pyvhdi.raw");
    our_convert(&leaf, &by_us, &[]);
    pyvhdi_read_raw(&by_libvhdi, &[&leaf, &child2, &child1, &base]);
    assert_files_equal(&by_us, &expected, "our convert vs the model");
    // libvhdi deviates in one place: it reads a ZERO block of a differencing file from the
    // parent (here base's 0x55 at 100M), where MS-VHDX says it MUST read zeros (we do). Compare
    // pyvhdi with the model minus the ZERO block (the only all-zero model entry; stamped data is
    // never zero), and check the deviation so a fixed libvhdi shows up here.
    let libvhdi_model = dir.path().join("model-libvhdi.raw");
    let non_zero: Vec<(u64, Vec<u8>)> = model
        .iter()
        .filter(|(_, d)| d.iter().any(|&b| b != 0))
        .cloned()
        .collect();
    assert_eq!(non_zero.len(), model.len() - 1);
    write_model(&libvhdi_model, vsize, &base_writes, &non_zero);
    assert_files_equal(
        &by_libvhdi,
        &libvhdi_model,
        "pyvhdi vs the model (ZERO → parent)",
    );
    assert_eq!(
        read_at(&by_libvhdi, 100 * MIB, 512),
        vec![0x55; 512],
        "libvhdi now reads a differencing ZERO block as zeros: drop the libvhdi model"
    );
    assert_eq!(read_at(&by_us, 100 * MIB, 512), vec![0; 512]);

    // Chain::read_at around every injected run and at odd offsets.
    let chain = Chain::open(&leaf, &ChainOptions::default()).unwrap();
    assert_eq!(chain.layers().len(), 4);
    let mut ranges = odd_ranges(vsize, MIB, 512, 4);
    for (off, data) in &model {
        let start = off.saturating_sub(3 * 512);
        let end = (off + data.len() as u64 + 3 * 512).min(vsize);
        ranges.push((start, (end - start).min(MIB)));
        ranges.push((end - 4 * 512, 4 * 512));
    }
    spot_check(&chain, &expected, &ranges);
}

/// A chain with 4096-byte logical sectors (qemu can neither make nor read those; pyvhdi can):
/// an empty base and two children made by our `create`, data injected into the children. The
/// sector bitmap has one bit per 4 KiB sector and a chunk covers 32 GiB, so the disk is a little
/// over 40 GiB (sparse) to have two chunks.
#[test]
fn differencing_chain_with_4k_sectors_reads_like_pyvhdi() {
    let dir = tempdir("chain-4k-");
    let vsize = 40 * GIB + 64 * MIB; // two chunks: chunk ratio 32768 × 1 MiB = 32 GiB
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    let leaf = dir.path().join("leaf.vhdx");
    ours_ok(&[
        "create",
        "-q",
        "-o",
        "logical_sector_size=4096,block_size=1M",
        s(&base),
        &vsize.to_string(),
    ]);
    ours_ok(&["create", "-q", "-b", s(&base), s(&child)]);
    ours_ok(&[
        "create",
        "-q",
        "-o",
        "block_size=4M",
        "-b",
        s(&child),
        s(&leaf),
    ]);
    let mut model = Vec::new();
    let c = Injector::open(&child, 1);
    assert_eq!((c.lss, c.chunk_ratio), (4096, 32768));
    c.full(3, &mut model);
    c.partial(5, &[(0, 1), (17, 30), (255, 1)], &mut model);
    c.partial(32768 + 2, &[(100, 20)], &mut model); // chunk 1
    drop(c);
    let l = Injector::open(&leaf, 2);
    assert_eq!((l.lss, l.chunk_ratio), (4096, 8192));
    l.partial(0, &[(770, 5), (1020, 4)], &mut model); // 3M+8K.. over child's block 3
    l.full(8 * 1024 + 1, &mut model); // 32G+4M, chunk 1 (leaf chunk = 32 GiB)
    l.partial(10 * 1024 + 15, &[(1023, 1)], &mut model); // the last sector of the disk
    drop(l);
    let expected = dir.path().join("model.raw");
    write_model(&expected, vsize, &[], &model);

    let py = pyvhdi_info(&leaf);
    assert_eq!(py["bytes_per_sector"], 4096, "{py}");
    assert_eq!(py["disk_type_name"], "differential", "{py}");
    let by_us = dir.path().join("ours.raw");
    let by_libvhdi = dir.path().join("pyvhdi.raw");
    our_convert(&leaf, &by_us, &[]);
    pyvhdi_read_raw(&by_libvhdi, &[&leaf, &child, &base]);
    assert_files_equal(&by_libvhdi, &expected, "pyvhdi vs the model (4K sectors)");
    assert_files_equal(&by_us, &expected, "our convert vs the model (4K sectors)");
    let chain = Chain::open(&leaf, &ChainOptions::default()).unwrap();
    let mut ranges = Vec::new();
    for (off, data) in &model {
        let start = off.saturating_sub(2 * 4096);
        let end = (off + data.len() as u64 + 2 * 4096).min(vsize);
        ranges.push((start, (end - start).min(MIB)));
    }
    spot_check(&chain, &expected, &ranges);
}

/// `--parent PATH` for a parent that was moved into another directory: without it, info and
/// convert fail with one line naming the paths tried (and leave no output); with it, they work
/// and read what pyvhdi reads; with the wrong file, they fail with a linkage error.
#[test]
fn parent_override_for_a_moved_parent() {
    let dir = tempdir("moved-parent-");
    let first = dir.path().join("first");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&first).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    let base = first.join("base.vhdx");
    let child = first.join("child.vhdx");
    qemu_img_create_vhdx(&base, "64M", "block_size=1M");
    let base_writes = [(0x5a, 0, 3 * MIB), (0x5b, 40 * MIB + 512, 4 * KIB)];
    qemu_io_ok(&base, &["write -P 0x5a 0 3M", "write -P 0x5b 41943552 4k"]);
    ours_ok(&["create", "-q", "-b", s(&base), s(&child)]);
    let mut model = Vec::new();
    let inj = Injector::open(&child, 1);
    inj.full(1, &mut model);
    inj.partial(40, &[(2, 2)], &mut model);
    drop(inj);
    let expected = dir.path().join("model.raw");
    write_model(&expected, 64 * MIB, &base_writes, &model);

    // The child alone moved: relative_path fails, absolute_win32_path still finds the parent.
    let child_copy = elsewhere.join("child.vhdx");
    std::fs::copy(&child, &child_copy).unwrap();
    let info = our_info(&child_copy, &[]);
    assert_eq!(info["backing-filename"], s(&base));
    std::fs::remove_file(&child_copy).unwrap();

    let moved = elsewhere.join("base.vhdx");
    std::fs::rename(&base, &moved).unwrap();

    // Without the override: one line naming the relative and absolute paths tried.
    let out_raw = dir.path().join("out.raw");
    for args in [
        vec!["info", s(&child)],
        vec!["convert", "-O", "raw", s(&child), s(&out_raw)],
    ] {
        let out = ours(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let line = stderr_line(&out);
        assert!(line.contains("not found"), "{args:?}: {line}");
        assert!(
            line.contains(&format!("relative_path \"base.vhdx\" → {}", s(&base))),
            "{args:?}: the relative path, resolved: {line}"
        );
        assert!(
            line.contains("absolute_win32_path"),
            "{args:?}: the absolute path: {line}"
        );
        assert!(!out_raw.exists(), "convert left an output behind");
    }

    // With the override.
    let info = our_info(&child, &["--parent", s(&moved)]);
    assert_eq!(info["backing-filename"], s(&moved));
    assert_eq!(
        info["format-specific"]["data"]["chain"],
        json!([s(&child), s(&moved)])
    );
    our_convert(&child, &out_raw, &["--parent", s(&moved)]);
    let by_libvhdi = dir.path().join("pyvhdi.raw");
    pyvhdi_read_raw(&by_libvhdi, &[&child, &moved]);
    assert_files_equal(&by_libvhdi, &expected, "pyvhdi with the moved parent");
    assert_files_equal(&out_raw, &expected, "convert --parent");

    // With the wrong file: same size and geometry, different DataWriteGuid.
    let wrong = elsewhere.join("other.vhdx");
    qemu_img_create_vhdx(&wrong, "64M", "block_size=1M");
    let out_raw2 = dir.path().join("out2.raw");
    for args in [
        vec!["info", "--parent", s(&wrong), s(&child)],
        vec!["convert", "--parent", s(&wrong), s(&child), s(&out_raw2)],
    ] {
        let out = ours(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let line = stderr_line(&out);
        assert!(
            line.contains("DataWriteGuid") && line.contains(s(&wrong)),
            "{args:?}: expected a linkage error: {line}"
        );
        assert!(!out_raw2.exists(), "convert left an output behind");
    }
}
