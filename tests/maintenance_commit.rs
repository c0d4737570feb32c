//! `commit` and `rebase`, judged by real peers: after a commit the parent alone reads what the
//! whole chain read before (our convert of the chain vs qemu-img compare and pyvhdi), qemu-img
//! check and ours find it clean; `-d` leaves the child empty and still a valid child (pyvhdi
//! checks the linkage); `-b` commits several levels; bad input is refused with one line and no
//! file changed; `rebase -u` relinks a moved parent. The crash-point enumeration of a commit
//! is in tests/maintenance_commit_crash.rs.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_files_equal, assert_qemu_img_check_clean, ours, ours_ok, pyvhdi_read_raw, qemu_img_ok,
    qemu_io_ok, s, tempdir,
};

const MIB: u64 = 1 << 20;

/// Our `io` commands on `img`; panics unless they succeed.
fn io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["io"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(s(img));
    ours_ok(&args);
}

/// Our view of the chain at `img` as a raw file at `out`; returns `out`.
fn flatten(img: &Path, out: PathBuf) -> PathBuf {
    let _ = std::fs::remove_file(&out);
    ours_ok(&["convert", "-O", "raw", s(img), s(&out)]);
    out
}

/// pyvhdi's view of `chain` (top first) as a raw file `pyvhdi.raw` in `dir`.
fn pyvhdi_flatten(dir: &Path, chain: &[&Path]) -> PathBuf {
    let out = dir.join("pyvhdi.raw");
    pyvhdi_read_raw(&out, chain);
    out
}

fn our_check_clean(img: &Path) {
    let out = ours(&["check", s(img)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The facts `info --output json` gives about `img`.
fn info(img: &Path) -> serde_json::Value {
    serde_json::from_str(&ours_ok(&["info", "--output", "json", s(img)])).unwrap()
}

fn block_states(img: &Path) -> serde_json::Value {
    info(img)["format-specific"]["data"]["block-states"].clone()
}

/// A parent with data in most of its blocks and a child that overwrites some of it: whole
/// blocks, single sectors (PARTIALLY_PRESENT), zeroed and discarded ranges.
fn parent_and_child(dir: &Path, parent_opts: &str) -> (PathBuf, PathBuf) {
    let parent = dir.join("parent.vhdx");
    let child = dir.join("child.vhdx");
    ours_ok(&["create", "-o", parent_opts, s(&parent), "24M"]);
    io(
        &parent,
        &[
            "write -P 0x11 0 10M",
            "write -P 0x12 12M 5M",
            "write -P 0x13 20M 4M",
        ],
    );
    ours_ok(&["create", "-b", s(&parent), s(&child)]);
    io(
        &child,
        &[
            "write -P 0x21 1M 2M",
            "write -P 0x22 4096 4096",
            "write -P 0x23 5M 12288",
            "write -P 0x24 11M 3M",
            "write -z 21M 1M",
            "write -z 6M 4096",
            "discard 8M 1M",
            "write -P 0x25 23M 1M",
        ],
    );
    (parent, child)
}

/// Commits `child` into `parent` (dynamic, fixed, 4 KiB sectors...) and has the peers judge it:
/// qemu-img where it can read the file (it refuses 4 KiB logical sectors), pyvhdi always.
fn commit_and_judge(parent_opts: &str, qemu_reads: bool) {
    let dir = tempdir("commit-");
    let (parent, child) = parent_and_child(dir.path(), parent_opts);
    let before = flatten(&child, dir.path().join("before.raw"));
    let out = ours_ok(&["commit", s(&child)]);
    assert!(out.contains("committed"), "{out}");
    assert!(!child.exists(), "the child is removed without -d");
    our_check_clean(&parent);
    if qemu_reads {
        assert_qemu_img_check_clean(&parent, "committed parent");
        qemu_img_ok(&["compare", "-f", "raw", "-F", "vhdx", s(&before), s(&parent)]);
    }
    let ours_after = flatten(&parent, dir.path().join("after.raw"));
    assert_files_equal(&before, &ours_after, "our read of the committed parent");
    let by_pyvhdi = pyvhdi_flatten(dir.path(), &[&parent]);
    assert_files_equal(&before, &by_pyvhdi, "pyvhdi's read of the committed parent");
}

#[test]
fn commit_into_a_dynamic_parent() {
    commit_and_judge("block_size=1M", true);
}

#[test]
fn commit_into_a_fixed_parent() {
    commit_and_judge("subformat=fixed,block_size=2M", true);
}

#[test]
fn commit_into_a_parent_with_4k_sectors() {
    commit_and_judge("block_size=4M,logical_sector_size=4096", false);
}

#[test]
fn commit_into_a_parent_qemu_made() {
    let dir = tempdir("commit-qemu-");
    let parent = dir.path().join("parent.vhdx");
    let child = dir.path().join("child.vhdx");
    common::qemu_img_create_vhdx(&parent, "16M", "block_size=1M");
    qemu_io_ok(&parent, &["write -P 0x31 0 6M", "write -P 0x32 9M 3M"]);
    ours_ok(&["create", "-b", s(&parent), s(&child)]);
    io(&child, &["write -P 0x41 2M 3M", "write -P 0x42 10M 512"]);
    let before = flatten(&child, dir.path().join("before.raw"));
    ours_ok(&["commit", s(&child)]);
    assert_qemu_img_check_clean(&parent, "committed qemu-made parent");
    qemu_img_ok(&["compare", "-f", "raw", "-F", "vhdx", s(&before), s(&parent)]);
    // qemu-io reads what we wrote, through its own engine.
    qemu_io_ok(
        &parent,
        &[
            "read -P 0x41 2M 3M",
            "read -P 0x42 10M 512",
            "read -P 0x32 10486272 1M",
        ],
    );
}

#[test]
fn commit_d_leaves_an_empty_valid_child() {
    let dir = tempdir("commit-d-");
    let (parent, child) = parent_and_child(dir.path(), "block_size=1M");
    let before = flatten(&child, dir.path().join("before.raw"));
    ours_ok(&["commit", "-d", s(&child)]);
    assert!(child.exists());
    let states = block_states(&child);
    assert_eq!(states["not_present"], 24, "{states}");
    assert_eq!(states.as_object().unwrap().len(), 1, "{states}");
    // The emptied blocks' host space went back (the child held 7 MiB of data).
    let actual = info(&child)["actual-size"].as_u64().unwrap();
    assert!(
        actual < 2 * MIB,
        "the emptied child still uses {actual} bytes"
    );
    our_check_clean(&child);
    our_check_clean(&parent);
    assert_qemu_img_check_clean(&parent, "committed parent");
    qemu_img_ok(&["compare", "-f", "raw", "-F", "vhdx", s(&before), s(&parent)]);
    // pyvhdi links the chain only when the child's parent_linkage is the parent's
    // DataWriteGuid.
    let by_pyvhdi = pyvhdi_flatten(dir.path(), &[&child, &parent]);
    assert_files_equal(&before, &by_pyvhdi, "pyvhdi's read of the emptied chain");
    let locator = &info(&child)["format-specific"]["data"]["parent-locator"];
    assert!(locator.get("parent_linkage2").is_none(), "{locator}");
    // The child goes on as a child: write to it, commit again.
    io(&child, &["write -P 0x77 3M 1M"]);
    ours_ok(&["commit", s(&child)]);
    qemu_io_ok(&parent, &["read -P 0x77 3M 1M", "read -P 0x21 1M 1M"]);
}

#[test]
fn commit_b_merges_every_level_down_to_base() {
    let dir = tempdir("commit-b-");
    let (base, mid) = parent_and_child(dir.path(), "block_size=1M");
    let top = dir.path().join("top.vhdx");
    ours_ok(&["create", "-b", s(&mid), s(&top)]);
    io(&top, &["write -P 0x51 0 1M", "write -P 0x52 7M 8192"]);
    let before = flatten(&top, dir.path().join("before.raw"));
    let out = ours_ok(&["commit", "-d", "-p", "-b", s(&base), s(&top)]);
    assert!(out.contains("Removed"), "{out}");
    assert!(
        !mid.exists(),
        "the level between top and base is no longer valid: removed"
    );
    assert!(top.exists());
    qemu_img_ok(&["compare", "-f", "raw", "-F", "vhdx", s(&before), s(&base)]);
    assert_qemu_img_check_clean(&base, "base after commit -b");
    let chain = info(&top)["format-specific"]["data"]["chain"].clone();
    assert_eq!(
        chain.as_array().unwrap().len(),
        2,
        "top now sits on base: {chain}"
    );
    let by_pyvhdi = pyvhdi_flatten(dir.path(), &[&top, &base]);
    assert_files_equal(&before, &by_pyvhdi, "pyvhdi's read of top over base");
}

#[test]
fn commit_into_a_middle_level_reads_through_its_parent() {
    let dir = tempdir("commit-mid-");
    let (base, mid) = parent_and_child(dir.path(), "block_size=1M");
    let top = dir.path().join("top.vhdx");
    ours_ok(&["create", "-b", s(&mid), s(&top)]);
    // Single sectors over blocks that only the base holds: the rest of each block must come
    // from the base, through the middle level.
    io(
        &top,
        &[
            "write -P 0x61 12587008 4096",
            "write -P 0x62 20M 8192",
            "write -P 0x63 0 1M",
        ],
    );
    let before = flatten(&top, dir.path().join("before.raw"));
    let base_before = flatten(&base, dir.path().join("base.raw"));
    ours_ok(&["commit", s(&top)]);
    let after = flatten(&mid, dir.path().join("after.raw"));
    assert_files_equal(&before, &after, "the middle level after the commit");
    let by_pyvhdi = pyvhdi_flatten(dir.path(), &[&mid, &base]);
    assert_files_equal(&before, &by_pyvhdi, "pyvhdi's read of the middle level");
    let base_after = flatten(&base, dir.path().join("base-after.raw"));
    assert_files_equal(
        &base_before,
        &base_after,
        "the base, which a commit into mid leaves",
    );
    our_check_clean(&mid);
}

#[test]
fn a_child_with_children_is_kept_not_removed() {
    let dir = tempdir("commit-kids-");
    let (parent, child) = parent_and_child(dir.path(), "block_size=1M");
    let grandchild = dir.path().join("grandchild.vhdx");
    ours_ok(&["create", "-b", s(&child), s(&grandchild)]);
    io(&grandchild, &["write -P 0x71 2M 4096"]);
    let before = flatten(&grandchild, dir.path().join("before.raw"));
    refused(&["commit", s(&child)], "grandchild.vhdx is also a child of");
    assert!(child.exists());
    // With -d the child stays, reads the same and keeps its identity: the grandchild's chain
    // still opens and reads as before.
    ours_ok(&["commit", "-d", s(&child)]);
    let after = flatten(&grandchild, dir.path().join("after.raw"));
    assert_files_equal(
        &before,
        &after,
        "the grandchild's chain after commit -d of its parent",
    );
    let by_pyvhdi = pyvhdi_flatten(dir.path(), &[&grandchild, &child, &parent]);
    assert_files_equal(
        &before,
        &by_pyvhdi,
        "pyvhdi's read of the grandchild's chain",
    );
}

/// Every file in `dir` with its bytes, to prove a refused command changed nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

/// Runs our binary, expects exit status 1 with one line on stderr containing `needle`.
fn refused(args: &[&str], needle: &str) {
    let out = ours(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line wanted: {err}");
    assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
}

#[test]
fn bad_input_is_refused_and_nothing_changes() {
    let dir = tempdir("commit-bad-");
    let (parent, child) = parent_and_child(dir.path(), "block_size=1M");
    let sibling = dir.path().join("sibling.vhdx");
    ours_ok(&["create", "-b", s(&parent), s(&sibling)]);
    let other = dir.path().join("other.vhdx");
    ours_ok(&["create", s(&other), "24M"]);
    let text = dir.path().join("text.vhdx");
    std::fs::write(&text, vec![b'x'; 2 * MIB as usize]).unwrap();
    let files = snapshot(dir.path());

    refused(&["commit", s(&child)], "sibling.vhdx is also a child");

    refused(&["commit", s(&other)], "has no parent");
    refused(&["commit", s(&text)], "text.vhdx");
    refused(
        &["commit", "-b", s(&other), s(&child)],
        "is not a parent of",
    );
    refused(
        &["commit", s(&dir.path().join("missing.vhdx"))],
        "missing.vhdx",
    );
    {
        // A writer holds the parent (as a running backend would).
        let _held = common::open_writable(&parent);
        refused(&["commit", "--force", s(&child)], "lock");
    }
    {
        let _held = common::open_writable(&child);
        refused(&["commit", "--force", s(&child)], "lock");
    }
    refused(&["rebase", "-b", s(&parent), s(&child)], "rebase -u");
    refused(&["rebase", "-u", "-b", s(&other), s(&child)], "--force");
    refused(
        &["rebase", "-u", "-b", s(&parent), s(&other)],
        "not a differencing file",
    );
    // A broken chain: the parent is gone.
    let moved = dir.path().join("moved.vhdx");
    std::fs::rename(&parent, &moved).unwrap();
    refused(&["commit", "--force", s(&child)], "not found");
    std::fs::rename(&moved, &parent).unwrap();
    assert!(
        snapshot(dir.path()) == files,
        "a refused command changed a file"
    );

    // --force commits over the sibling's objection.
    ours_ok(&["commit", "--force", s(&child)]);
    assert_qemu_img_check_clean(&parent, "forced commit");
}

#[test]
fn rebase_relinks_a_moved_parent() {
    let dir = tempdir("rebase-");
    let (parent, child) = parent_and_child(dir.path(), "block_size=1M");
    let before = flatten(&child, dir.path().join("before.raw"));
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let moved = store.join("renamed.vhdx");
    std::fs::rename(&parent, &moved).unwrap();
    refused(&["info", s(&child)], "not found");
    ours_ok(&["rebase", "-u", "-b", s(&moved), s(&child)]);
    let after = flatten(&child, dir.path().join("after.raw"));
    assert_files_equal(&before, &after, "the chain after rebase");
    let locator = info(&child)["format-specific"]["data"]["parent-locator"].clone();
    assert_eq!(locator["relative_path"], r"store\renamed.vhdx", "{locator}");
    assert!(
        locator["absolute_win32_path"]
            .as_str()
            .unwrap()
            .ends_with(r"\store\renamed.vhdx"),
        "{locator}"
    );
    our_check_clean(&child);
    let by_pyvhdi = pyvhdi_flatten(dir.path(), &[&child, &moved]);
    assert_files_equal(&before, &by_pyvhdi, "pyvhdi's read after rebase");

    // --force relinks to a different disk (the child now reads it under its own data).
    let other = dir.path().join("other.vhdx");
    ours_ok(&["create", s(&other), "24M"]);
    ours_ok(&["rebase", "-u", "--force", "-b", s(&other), s(&child)]);
    io(&child, &["read -P 0x21 1M 2M", "read -P 0 0 4096"]);
}

#[test]
fn an_interrupted_commit_is_reported_and_finished_by_running_it_again() {
    use vhost_user_vhdx::vhdx::rebase::{set_parent_locator, with_linkages};
    use vhost_user_vhdx::vhdx::{DataWriteGuid, VhdxFile};

    let dir = tempdir("commit-again-");
    let (parent, child) = parent_and_child(dir.path(), "block_size=1M");
    let before = flatten(&child, dir.path().join("before.raw"));
    // What a commit killed half-way leaves: the child records the parent's future identity G,
    // and the parent has G and part of the child's data (where the child shadows it).
    let g = uuid::Uuid::new_v4();
    let mut c = VhdxFile::open_with_guid(&child, DataWriteGuid::Keep).unwrap();
    let old = c.metadata.parent_locator.as_ref().unwrap().linkages()[0];
    let new = with_linkages(&c, old, Some(g)).unwrap();
    set_parent_locator(&mut c, new).unwrap();
    c.close().unwrap();
    let p = VhdxFile::open_with_guid(&parent, DataWriteGuid::Set(g)).unwrap();
    p.write(MIB, &&vec![0x21u8; MIB as usize][..]).unwrap();
    p.close().unwrap();

    let out = ours_ok(&["check", s(&child)]);
    assert!(
        out.contains("parent_linkage2") && out.contains("has been changed"),
        "{out}"
    );
    let out = ours_ok(&["info", s(&child)]);
    assert!(out.contains("did not finish"), "{out}");
    let during = flatten(&child, dir.path().join("during.raw"));
    assert_files_equal(&before, &during, "the chain in the middle of a commit");

    ours_ok(&["commit", s(&child)]);
    qemu_img_ok(&["compare", "-f", "raw", "-F", "vhdx", s(&before), s(&parent)]);
    assert_qemu_img_check_clean(&parent, "parent after the commit ran again");
}

#[test]
fn commit_into_a_parent_windows_made() {
    // DiscUtils' file, made by Windows (its own layout of regions, metadata and log).
    let (dir, parent) = common::fixture("discutils-btrfs");
    let child = dir.path().join("child.vhdx");
    ours_ok(&["create", "-b", s(&parent), s(&child)]);
    io(
        &child,
        &[
            "write -P 0x81 0 1M",
            "write -P 0x82 3M 4096",
            "write -z 5M 64k",
        ],
    );
    let before = flatten(&child, dir.path().join("before.raw"));
    ours_ok(&["commit", s(&child)]);
    assert_qemu_img_check_clean(&parent, "committed Windows-made parent");
    qemu_img_ok(&["compare", "-f", "raw", "-F", "vhdx", s(&before), s(&parent)]);
    let by_pyvhdi = pyvhdi_flatten(dir.path(), &[&parent]);
    assert_files_equal(
        &before,
        &by_pyvhdi,
        "pyvhdi's read of the Windows-made parent",
    );
}
