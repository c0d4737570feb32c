//! The reference readers agree with each other, independent of our engine: for every Windows-made
//! fixture and for a qemu-made image, `qemu-img convert -O raw` and libvhdi (pyvhdi) produce the
//! same bytes. If this suite fails, the test environment (not vhost-user-vhdx) is broken; fix it
//! with `contrib/setup-test-deps.sh`.

mod common;

use common::*;
use std::path::{Path, PathBuf};

const GIB: u64 = 1 << 30;

/// The image's media as qemu-img convert and as pyvhdi read it: raw files `qemu.raw` and
/// `pyvhdi.raw` in `dir`.
fn read_by_both_peers(dir: &Path, img: &Path) -> (PathBuf, PathBuf) {
    let by_qemu = dir.join("qemu.raw");
    let by_libvhdi = dir.join("pyvhdi.raw");
    qemu_img_convert_raw(img, &by_qemu);
    pyvhdi_read_raw(&by_libvhdi, &[img]);
    (by_qemu, by_libvhdi)
}

/// qemu-img and pyvhdi read the same media from a clean fixture; pyvhdi sees what the fixture
/// README says (dynamic disk, 512-byte logical sectors, the stated size).
fn peers_agree_on_clean_fixture(name: &str, virtual_size: u64) {
    let (dir, img) = fixture(name);
    let (code, report) = qemu_img_check(&img);
    assert_eq!(
        code, 0,
        "qemu-img check {name}: expected a clean image, got:\n{report}"
    );

    let info = pyvhdi_info(&img);
    assert_eq!(
        info["media_size"], virtual_size,
        "{name}: pyvhdi media_size; info: {info}"
    );
    assert_eq!(
        info["disk_type_name"], "dynamic",
        "{name}: pyvhdi disk type; info: {info}"
    );
    assert_eq!(
        info["bytes_per_sector"], 512,
        "{name}: pyvhdi sector size; info: {info}"
    );
    assert!(
        info["parent_identifier"].is_null(),
        "{name}: has no parent; info: {info}"
    );

    let (by_qemu, by_libvhdi) = read_by_both_peers(dir.path(), &img);
    assert!(
        !is_all_zero(&by_qemu),
        "{name}: qemu-img read only zeros from a fixture with data"
    );
    if let Err(e) = files_equal(&by_qemu, &by_libvhdi) {
        panic!("{name}: qemu-img and pyvhdi disagree: {e}");
    }
}

#[test]
fn peers_agree_on_btrfs_fixture() {
    peers_agree_on_clean_fixture("discutils-btrfs", GIB);
}

#[test]
fn peers_agree_on_lvm2_fixture_with_unmapped_blocks() {
    peers_agree_on_clean_fixture("discutils-lvm2", 10 * GIB);
}

#[test]
fn peers_agree_on_swap_fixture_with_interleaved_bitmaps() {
    peers_agree_on_clean_fixture("discutils-swap", 10 * GIB);
}

#[test]
fn peers_agree_on_xfs5_fixture() {
    peers_agree_on_clean_fixture("discutils-xfs5", 10 * GIB);
}

/// The dirty-log fixture: pyvhdi does not replay the log, so it reads zeros everywhere; qemu-img
/// refuses it read-only, replays it with `check -r all`, and then sector 0 is an MBR (55 AA).
#[test]
fn pyvhdi_ignores_dirty_log_and_qemu_replays_it() {
    let (dir, img) = fixture("discutils-vhdx-log-replay");

    let by_libvhdi = dir.path().join("pyvhdi.raw");
    pyvhdi_read_raw(&by_libvhdi, &[&img]);
    assert_eq!(
        std::fs::metadata(&by_libvhdi).unwrap().len(),
        GIB,
        "pyvhdi media size"
    );
    assert!(
        is_all_zero(&by_libvhdi),
        "pyvhdi read non-zero data from the un-replayed fixture: does libvhdi replay logs now?"
    );

    let (code, report) = qemu_img_check(&img);
    assert_ne!(
        code, 0,
        "qemu-img check without -r accepted an image with a dirty log:\n{report}"
    );
    assert!(
        report.contains("log that needs to be replayed"),
        "unexpected report:\n{report}"
    );

    let repaired = qemu_img_ok(&["check", "-r", "all", "-f", "vhdx", img.to_str().unwrap()]);
    assert!(
        repaired.contains("No errors were found"),
        "after replay:\n{repaired}"
    );
    let by_qemu = dir.path().join("qemu.raw");
    qemu_img_convert_raw(&img, &by_qemu);
    assert_eq!(
        read_at(&by_qemu, 510, 2),
        [0x55, 0xAA],
        "MBR signature after log replay"
    );

    // After the replay the log is clean, and libvhdi now sees the same data as qemu.
    pyvhdi_read_raw(&by_libvhdi, &[&img]);
    if let Err(e) = files_equal(&by_qemu, &by_libvhdi) {
        panic!("after log replay, qemu-img and pyvhdi disagree: {e}");
    }
}

/// An image made and written by QEMU reads the same through both peers.
#[test]
fn peers_agree_on_qemu_written_image() {
    let dir = tempdir("qemu-made-");
    let img = dir.path().join("disk.vhdx");
    qemu_img_create_vhdx(&img, "64M", "block_size=1M");
    qemu_io_ok(&img, &["write -P 0xab 0 1M", "write -P 0xcd 40961k 4k"]);
    let (code, report) = qemu_img_check(&img);
    assert_eq!(code, 0, "qemu-img check after qemu-io writes:\n{report}");

    let info = pyvhdi_info(&img);
    assert_eq!(
        info["media_size"],
        64u64 << 20,
        "pyvhdi media_size; info: {info}"
    );

    let (by_qemu, by_libvhdi) = read_by_both_peers(dir.path(), &img);
    assert_eq!(
        read_at(&by_libvhdi, 0, 1 << 20),
        vec![0xab; 1 << 20],
        "pyvhdi: first MiB"
    );
    assert_eq!(
        read_at(&by_libvhdi, 40961 << 10, 4096),
        vec![0xcd; 4096],
        "pyvhdi: 4k at 40961k"
    );
    assert_eq!(
        read_at(&by_libvhdi, 1 << 20, 4096),
        vec![0; 4096],
        "pyvhdi: unwritten data"
    );
    if let Err(e) = files_equal(&by_qemu, &by_libvhdi) {
        panic!("qemu-img and pyvhdi disagree on a qemu-made image: {e}");
    }
}

/// files_equal itself: finds the first differing byte, and a size mismatch.
#[test]
fn files_equal_reports_first_difference_and_size_mismatch() {
    let dir = tempdir("files-equal-");
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let mut data = vec![7u8; 3 << 20];
    std::fs::write(&a, &data).unwrap();
    data[(2 << 20) + 5] = 8;
    std::fs::write(&b, &data).unwrap();
    std::fs::write(&c, &data[..data.len() - 1]).unwrap();
    assert_eq!(files_equal(&a, &a), Ok(()));
    let err = files_equal(&a, &b).unwrap_err();
    assert!(err.contains(&format!("byte {}", (2 << 20) + 5)), "{err}");
    let err = files_equal(&b, &c).unwrap_err();
    assert!(err.contains("sizes differ"), "{err}");
    // Sparse files: a hole on one side and written zeros on the other are equal.
    let f = std::fs::File::create(&c).unwrap();
    f.set_len(8 << 20).unwrap();
    std::fs::write(&a, vec![0u8; 8 << 20]).unwrap();
    assert_eq!(files_equal(&a, &c), Ok(()));
    assert_eq!(files_equal(&c, Path::new(&c)), Ok(()));
    assert!(is_all_zero(&c) && is_all_zero(&a));
    // One byte of data inside a long hole is found.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&c).unwrap();
        f.write_all_at(&[1], (5 << 20) + 3).unwrap();
    }
    assert!(!is_all_zero(&c));
    let err = files_equal(&a, &c).unwrap_err();
    assert!(err.contains(&format!("byte {}", (5 << 20) + 3)), "{err}");
}
