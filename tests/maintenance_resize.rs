//! `resize` and `compact`, judged by real peers: after each operation `qemu-img check` is clean,
//! and `qemu-img compare`, qemu-io and libvhdi (pyvhdi) read the expected content: a grown disk
//! keeps its data and reads zeros beyond, a shrunk one keeps what lies before the new end, a
//! compacted file equals its former self and is smaller. Bad input gets one line on stderr, a
//! non-zero exit status, and leaves the file byte for byte as it was.

mod common;

use std::path::Path;

use common::{
    assert_qemu_img_check_clean, ours, ours_ok, pyvhdi_read_raw, qemu_img, qemu_img_convert_raw,
    qemu_img_create_vhdx, qemu_io_ok, s,
};
use vhost_user_vhdx::vhdx::{Chain, ChainOptions, ReadSource, VhdxFile};

const MIB: u64 = 1 << 20;

fn raw_of(img: &Path, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    qemu_img_convert_raw(img, &out);
    std::fs::read(out).unwrap()
}

fn pyvhdi_of(chain: &[&Path], dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    pyvhdi_read_raw(&out, chain);
    let mut v = std::fs::read(&out).unwrap();
    // The script writes sparse output: a zero tail is a shorter file.
    let size = VhdxFile::open_shared(chain[0], false)
        .unwrap()
        .virtual_size();
    v.resize(size as usize, 0);
    v
}

/// Writes `pattern` at `offset` of a raw file (to build the expected content).
fn put(v: &mut [u8], offset: u64, len: u64, pattern: u8) {
    v[offset as usize..(offset + len) as usize].fill(pattern);
}

/// A new dynamic VHDX of `size` with 1 MiB blocks, made by our `create`.
fn create_1m(img: &Path, size: &str) {
    ours_ok(&["create", "-f", "vhdx", "-o", "block_size=1M", s(img), size]);
}

fn io(img: &Path, cmds: &[String]) {
    let mut args = vec!["io".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(s(img).into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    ours_ok(&a);
}

/// The file's virtual size and one line per peer that it reads `expected`.
fn assert_reads(img: &Path, expected: &[u8], dir: &Path, what: &str) {
    assert_qemu_img_check_clean(img, what);
    let check = ours(&["check", s(img)]);
    assert!(check.status.success(), "{what}: our check: {check:?}");
    let size = VhdxFile::open_shared(img, false).unwrap().virtual_size();
    assert_eq!(size, expected.len() as u64, "{what}: virtual size");
    let q = raw_of(img, dir, "qemu.raw");
    assert!(q == expected, "{what}: qemu-img reads other content");
    let p = pyvhdi_of(&[img], dir, "pyvhdi.raw");
    assert!(p == expected, "{what}: pyvhdi reads other content");
    let exp_path = dir.join("expected.raw");
    std::fs::write(&exp_path, expected).unwrap();
    let out = qemu_img(&["compare", "-f", "vhdx", "-F", "raw", s(img), s(&exp_path)]);
    assert!(out.status.success(), "{what}: qemu-img compare: {out:?}");
}

#[test]
fn a_dynamic_disk_grows_keeps_its_data_and_reads_zeros_beyond() {
    let d = common::tempdir("resize-");
    let img = d.path().join("a.vhdx");
    // Not a whole number of 1 MiB blocks: the last block is partial.
    let size = 6 * MIB + 3 * 512;
    create_1m(&img, &size.to_string());
    let mut expected = vec![0u8; size as usize];
    io(
        &img,
        &[
            "write -P 0x5a 0 1M".into(),
            format!("write -P 0x6b {} 1536", 6 * MIB),
        ],
    );
    put(&mut expected, 0, MIB, 0x5a);
    put(&mut expected, 6 * MIB, 1536, 0x6b);
    assert_reads(&img, &expected, d.path(), "before");

    let out = ours_ok(&["resize", s(&img), "+10M"]);
    assert!(out.contains("resized"), "{out}");
    expected.resize((size + 10 * MIB) as usize, 0);
    assert_reads(&img, &expected, d.path(), "grown by 10M");
}

#[test]
fn the_old_last_block_reads_zeros_past_the_old_end() {
    let d = common::tempdir("resize-");
    let img = d.path().join("a.vhdx");
    create_1m(&img, "4M");
    io(&img, &["write -P 0x77 0 4M".into()]);
    // Cut inside block 3: its bytes past the new end stay in the file, invisible.
    let cut = 3 * MIB + 512;
    ours_ok(&["resize", "--shrink", "--force", s(&img), &cut.to_string()]);
    let mut expected = vec![0x77u8; cut as usize];
    assert_reads(&img, &expected, d.path(), "shrunk into a block");
    ours_ok(&["resize", s(&img), "5M"]);
    expected.resize(5 * MIB as usize, 0);
    assert_reads(&img, &expected, d.path(), "grown past the old end");
}

#[test]
fn a_fixed_disk_grows_with_allocated_zeroed_blocks() {
    let d = common::tempdir("resize-");
    let img = d.path().join("f.vhdx");
    ours_ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "subformat=fixed,block_size=1M",
        s(&img),
        "8M",
    ]);
    io(&img, &["write -P 0x11 0 8M".into()]);
    ours_ok(&["resize", s(&img), "40M"]);
    let mut expected = vec![0x11u8; 8 * MIB as usize];
    expected.resize(40 * MIB as usize, 0);
    assert_reads(&img, &expected, d.path(), "fixed grown");
    let f = VhdxFile::open_shared(&img, false).unwrap();
    assert!(f.metadata.leave_block_allocated);
    assert_eq!(
        f.bat.unallocated_blocks(),
        0,
        "every new block is allocated"
    );
}

#[test]
fn a_grow_past_the_bat_region_relocates_it() {
    let d = common::tempdir("resize-");
    let img = d.path().join("q.vhdx");
    // qemu's BAT region for a small disk is 1 MiB: room for 131072 entries.
    qemu_img_create_vhdx(&img, "64M", "block_size=1M");
    qemu_io_ok(&img, &["write -P 0x22 0 64M"]);
    let before = VhdxFile::open_shared(&img, false).unwrap().regions.bat();
    ours_ok(&["resize", s(&img), "200G"]);
    let f = VhdxFile::open_shared(&img, false).unwrap();
    assert_ne!(f.regions.bat().file_offset, before.file_offset, "BAT moved");
    assert!(f.regions.bat().length >= 204_800 * 8);
    drop(f);
    assert_qemu_img_check_clean(&img, "relocated");
    qemu_io_ok(
        &img,
        &[
            "read -P 0x22 0 64M",
            "read -P 0 64M 1M",
            "read -P 0 100G 1M",
            "read -P 0 199G 1M",
        ],
    );
    // Our engine: everything past the old end is unallocated.
    let chain = Chain::open(&img, &ChainOptions::default()).unwrap();
    let mut ext = Default::default();
    chain
        .resolve(64 * MIB, 200 * 1024 * MIB - 64 * MIB, &mut ext)
        .unwrap();
    assert!(ext.iter().all(|e| e.source == ReadSource::Zero), "{ext:?}");
}

#[test]
fn shrinking_needs_shrink_and_force_when_data_would_be_lost() {
    let d = common::tempdir("resize-");
    let img = d.path().join("a.vhdx");
    create_1m(&img, "16M");
    io(
        &img,
        &["write -P 0x31 0 2M".into(), "write -P 0x32 12M 1M".into()],
    );
    let original = std::fs::read(&img).unwrap();
    for (args, needle) in [
        (vec!["resize", s(&img), "8M"], "--shrink"),
        (vec!["resize", "--shrink", s(&img), "8M"], "--force"),
        (vec!["resize", s(&img), "-8M"], "--shrink"),
    ] {
        let out = ours(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(
            std::fs::read(&img).unwrap() == original,
            "{args:?} changed the file"
        );
    }
    // Zeros past the new end are not data: no --force needed.
    ours_ok(&["resize", "--shrink", s(&img), "13M"]);
    let mut expected = vec![0u8; 13 * MIB as usize];
    put(&mut expected, 0, 2 * MIB, 0x31);
    put(&mut expected, 12 * MIB, MIB, 0x32);
    assert_reads(&img, &expected, d.path(), "shrunk to 13M");
    ours_ok(&["resize", "--shrink", "--force", s(&img), "1M"]);
    expected.truncate(MIB as usize);
    assert_reads(&img, &expected, d.path(), "shrunk to 1M");
    assert!(std::fs::metadata(&img).unwrap().len() < original.len() as u64);
}

#[test]
fn bad_input_is_one_line_and_changes_nothing() {
    let d = common::tempdir("resize-");
    let img = d.path().join("a.vhdx");
    ours_ok(&["create", "-f", "vhdx", s(&img), "16M"]);
    let text = d.path().join("not.vhdx");
    std::fs::write(&text, vec![7u8; 4 * MIB as usize]).unwrap();
    let parent = d.path().join("p.vhdx");
    let child = d.path().join("c.vhdx");
    ours_ok(&["create", "-f", "vhdx", s(&parent), "16M"]);
    ours_ok(&["create", "-f", "vhdx", "-b", s(&parent), s(&child)]);
    let orphan_dir = d.path().join("o");
    std::fs::create_dir(&orphan_dir).unwrap();
    // A child whose parent is gone: a broken chain.
    let gone = orphan_dir.join("p.vhdx");
    let orphan = orphan_dir.join("c.vhdx");
    ours_ok(&["create", "-f", "vhdx", s(&gone), "16M"]);
    ours_ok(&["create", "-f", "vhdx", "-b", s(&gone), s(&orphan)]);
    std::fs::remove_file(&gone).unwrap();
    let fixed = d.path().join("f.vhdx");
    ours_ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "subformat=fixed",
        s(&fixed),
        "8M",
    ]);
    let snapshot = |p: &Path| std::fs::read(p).unwrap();
    let cases: Vec<(Vec<&str>, &Path, &str)> = vec![
        (vec!["resize", s(&img), "1000"], &img, "sector"),
        (vec!["resize", s(&img), "65T"], &img, "64 TiB"),
        (vec!["resize", s(&img), "+64T"], &img, "64 TiB"),
        (vec!["resize", s(&text), "32M"], &text, "VHDX"),
        (vec!["compact", s(&text)], &text, "VHDX"),
        (vec!["resize", s(&parent), "32M"], &parent, "parent"),
        (vec!["resize", s(&orphan), "32M"], &orphan, "parent"),
        (vec!["compact", s(&orphan)], &orphan, "parent"),
        (vec!["compact", s(&fixed)], &fixed, "fixed"),
        (vec!["resize", "--shrink", s(&img), "0"], &img, "sector"),
    ];
    for (args, file, needle) in cases {
        let before = snapshot(file);
        let out = ours(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            snapshot(file) == before,
            "{args:?} changed {}",
            file.display()
        );
    }
    // A locked image: a writer holds it.
    let before = snapshot(&img);
    let holder = VhdxFile::open(&img, true).unwrap();
    for args in [vec!["resize", s(&img), "32M"], vec!["compact", s(&img)]] {
        let out = ours(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} succeeded on a locked image"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.to_lowercase().contains("lock"), "{err}");
    }
    drop(holder);
    assert!(snapshot(&img) == before);
}

#[test]
fn a_differencing_leaf_grows_and_reads_zeros_not_its_parent() {
    let d = common::tempdir("resize-");
    let parent = d.path().join("p.vhdx");
    let child = d.path().join("c.vhdx");
    create_1m(&parent, "10M");
    io(&parent, &["write -P 0x33 0 10M".into()]);
    ours_ok(&["create", "-f", "vhdx", "-b", s(&parent), s(&child)]);
    io(&child, &["write -P 0x44 1M 512".into()]);
    ours_ok(&["resize", s(&child), "+6M"]);
    let check = ours(&["check", s(&child)]);
    assert!(check.status.success(), "{check:?}");
    let mut expected = vec![0x33u8; 10 * MIB as usize];
    put(&mut expected, MIB, 512, 0x44);
    expected.resize(16 * MIB as usize, 0);
    let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
    assert_eq!(chain.virtual_size(), 16 * MIB);
    let mut got = vec![0xeeu8; 16 * MIB as usize];
    chain.read_at(&mut got, 0).unwrap();
    assert!(got == expected, "the grown chain reads other content");
    // Our own convert flattens it the same way.
    let raw = d.path().join("c.raw");
    ours_ok(&["convert", s(&child), s(&raw)]);
    assert!(std::fs::read(&raw).unwrap() == expected);
    // The parent keeps its size and linkage.
    assert_eq!(chain.layers()[1].virtual_size(), 10 * MIB);
    // A differencing disk never goes below its parent.
    drop(chain);
    let out = ours(&["resize", "--shrink", s(&child), "8M"]);
    assert!(!out.status.success());
}

#[test]
fn compact_gives_back_zero_blocks_and_the_content_stays() {
    let d = common::tempdir("compact-");
    for maker in ["qemu", "ours"] {
        let img = d.path().join(format!("{maker}.vhdx"));
        let mut cmds = Vec::new();
        let mut expected = vec![0u8; 64 * MIB as usize];
        for i in (0..64u64).step_by(2) {
            cmds.push(format!("write -P {} {}M 1M", i + 1, i));
            // An allocated block of zeros.
            cmds.push(format!("write -P 0 {}M 1M", i + 1));
            put(&mut expected, i * MIB, MIB, i as u8 + 1);
        }
        if maker == "qemu" {
            qemu_img_create_vhdx(&img, "64M", "block_size=1M");
            let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io_ok(&img, &c);
        } else {
            create_1m(&img, "64M");
            io(&img, &cmds);
        }
        let copy = d.path().join(format!("{maker}-before.vhdx"));
        std::fs::copy(&img, &copy).unwrap();
        let before_len = std::fs::metadata(&img).unwrap().len();
        let out = ours_ok(&["compact", s(&img)]);
        println!("{maker}: {out}");
        let after_len = std::fs::metadata(&img).unwrap().len();
        assert!(
            after_len + 30 * MIB <= before_len,
            "{maker}: {before_len} -> {after_len}"
        );
        assert_reads(&img, &expected, d.path(), maker);
        let cmp = qemu_img(&["compare", s(&copy), s(&img)]);
        assert!(cmp.status.success(), "{maker}: {cmp:?}");
        // Nothing left to do the second time.
        let again = ours_ok(&["compact", s(&img)]);
        assert!(again.starts_with("0 blocks reclaimed"), "{again}");
        assert_eq!(std::fs::metadata(&img).unwrap().len(), after_len);
    }
}

#[test]
fn compact_of_a_differencing_file_keeps_zeros_that_hide_parent_data() {
    let d = common::tempdir("compact-");
    let parent = d.path().join("p.vhdx");
    let child = d.path().join("c.vhdx");
    create_1m(&parent, "8M");
    io(&parent, &["write -P 0x55 0 4M".into()]);
    ours_ok(&["create", "-f", "vhdx", "-b", s(&parent), s(&child)]);
    // Zeros over parent data (blocks 0-1) must stay; zeros over parent zeros (4-5) may go;
    // a partial block of zeros over zeros (6) too; data (7) stays.
    io(
        &child,
        &[
            "write -P 0 0 2M".into(),
            "write -P 0 4M 2M".into(),
            "write -P 0 6M 4096".into(),
            "write -P 0x66 7M 1M".into(),
        ],
    );
    let mut expected = vec![0u8; 8 * MIB as usize];
    put(&mut expected, 2 * MIB, 2 * MIB, 0x55);
    put(&mut expected, 7 * MIB, MIB, 0x66);
    let guid_before = VhdxFile::open_shared(&child, false)
        .unwrap()
        .data_write_guid();
    let out = ours_ok(&["compact", s(&child)]);
    assert!(out.starts_with("3 blocks reclaimed"), "{out}");
    let check = ours(&["check", s(&child)]);
    assert!(check.status.success(), "{check:?}");
    let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
    let mut got = vec![0xeeu8; 8 * MIB as usize];
    chain.read_at(&mut got, 0).unwrap();
    assert!(got == expected, "the compacted chain reads other content");
    assert_eq!(
        chain.leaf().data_write_guid(),
        guid_before,
        "contents unchanged"
    );
    drop(chain);
    let p = pyvhdi_of(&[&child, &parent], d.path(), "chain.raw");
    assert!(p == expected, "pyvhdi reads other content");
    // A parent with a child may be compacted: its DataWriteGuid stays, the child still opens.
    ours_ok(&["compact", s(&parent)]);
    Chain::open(&child, &ChainOptions::default()).unwrap();
}
