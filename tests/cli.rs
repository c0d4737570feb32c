//! The command line's behaviour: messages, exit statuses, JSON field names (checked against
//! qemu-img's where they overlap), and what is left on disk when a command fails.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Output;

use common::*;
use serde_json::Value;
use vhost_user_vhdx::vhdx::VhdxFile;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&ours_ok(args)).unwrap_or_else(|e| panic!("{args:?}: invalid JSON: {e}"))
}

/// Runs our binary, which must exit with status `code`.
fn ours_exits(code: i32, args: &[&str]) -> Output {
    let out = ours(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        describe_ours(args, &out)
    );
    out
}

/// Runs a command that must fail with exit status `code` and exactly one line on stderr (and
/// nothing on stdout); returns that line.
fn fails(code: i32, args: &[&str]) -> String {
    let out = ours_exits(code, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line on stderr; {}",
        describe_ours(args, &out)
    );
    assert!(err.starts_with("vhost-user-vhdx: "), "{err}");
    assert!(out.stdout.is_empty(), "{}", describe_ours(args, &out));
    err.trim_end().to_string()
}

/// The exit status of `check ARGS` and its stdout.
fn check(args: &[&str]) -> (i32, String) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let out = ours(&all);
    (
        out.status.code().expect("exit status"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every key of `theirs` (qemu-img's JSON) except `skip` is in `ours` with the same JSON type.
fn has_qemu_fields(ours: &Value, theirs: &Value, skip: &[&str], what: &str) {
    for (k, v) in theirs.as_object().expect("an object") {
        if skip.contains(&k.as_str()) {
            continue;
        }
        let mine = ours
            .get(k)
            .unwrap_or_else(|| panic!("{what}: qemu-img has {k:?}, we do not:\n{ours:#}"));
        assert_eq!(kind(mine), kind(v), "{what}: type of {k:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------------------------

#[test]
fn create_prints_its_formatting_line() {
    let dir = tempdir("cli-create-");
    let img = dir.path().join("a.vhdx");
    let out = ours_ok(&["create", "-o", "block_size=8M", s(&img), "1G"]);
    assert_eq!(
        out,
        format!(
            "Formatting '{}', fmt=vhdx size={} block_size={} log_size={} logical_sector_size=512 \
             subformat=dynamic\n",
            img.display(),
            GIB,
            8 * MIB,
            MIB
        )
    );
    let fixed = dir.path().join("f.vhdx");
    let out = ours_ok(&[
        "create",
        "-o",
        "subformat=fixed,logical_sector_size=4096,block_size=1M,log_size=2M",
        s(&fixed),
        "10M",
    ]);
    assert!(
        out.starts_with(&format!("Formatting '{}', fmt=vhdx", fixed.display()))
            && out.contains(" size=10485760 ")
            && out.contains(" block_size=1048576 ")
            && out.contains(" log_size=2097152 ")
            && out.contains(" logical_sector_size=4096 ")
            && out.ends_with(" subformat=fixed\n"),
        "{out}"
    );
    let child = dir.path().join("c.vhdx");
    let out = ours_ok(&["create", "-b", s(&img), s(&child)]);
    assert!(
        out.contains(" size=1073741824 ")
            && out.contains(" block_size=8388608 ")
            && out.contains(" subformat=differencing ")
            && out
                .trim_end()
                .ends_with(&format!("backing_file={}", img.display()))
            && out.lines().count() == 1,
        "{out}"
    );
    let quiet = dir.path().join("q.vhdx");
    assert_eq!(ours_ok(&["create", "-q", s(&quiet), "1M"]), "");
    assert!(quiet.exists());
}

#[test]
fn create_refuses_an_existing_file() {
    let dir = tempdir("cli-create-exists-");
    let img = dir.path().join("a.vhdx");
    ours_ok(&["create", "-q", s(&img), "64M"]);
    let before = std::fs::read(&img).unwrap();
    let line = fails(1, &["create", s(&img), "1G"]);
    assert!(line.contains("already exists"), "{line}");
    assert_eq!(std::fs::read(&img).unwrap(), before, "the file changed");
    // Also a non-VHDX file is left alone.
    let other = dir.path().join("notes.txt");
    std::fs::write(&other, b"keep me").unwrap();
    fails(1, &["create", "-o", "subformat=fixed", s(&other), "1M"]);
    assert_eq!(std::fs::read(&other).unwrap(), b"keep me");
    assert_eq!(dir_entries(dir.path()), ["a.vhdx", "notes.txt"]);
}

#[test]
fn create_rejects_bad_options_with_one_line_and_no_file() {
    let dir = tempdir("cli-create-bad-");
    let img = dir.path().join("bad.vhdx");
    let cases: &[(&[&str], &str)] = &[
        (&["-o", "block_size=3M"], "block size"),
        (&["-o", "block_size=512M"], "block size"),
        (&["-o", "logical_sector_size=1024"], "sector size"),
        (&["-o", "physical_sector_size=2048"], "sector size"),
        (&["-o", "log_size=1536K"], "log size"),
        (&["-o", "subformat=sparse"], "subformat"),
        (&["-o", "cluster_size=64k"], "cluster_size"),
        (&["-o", "size=10X"], "10X"),
        (&["-o", "size=-1"], "-1"),
    ];
    for (opts, needle) in cases {
        let mut args = vec!["create"];
        args.extend_from_slice(opts);
        args.extend([s(&img), "64M"]);
        let line = fails(1, &args);
        assert!(line.contains(needle), "{args:?}: {line}");
        assert_eq!(
            dir_entries(dir.path()),
            Vec::<String>::new(),
            "{args:?} left files (also no .NAME.creating-* may remain)"
        );
    }
    for size in ["64Q", "1.5G", "G", "0", "65T"] {
        let args = ["create", s(&img), size];
        let line = fails(1, &args);
        assert!(line.contains("size"), "{args:?}: {line}");
        assert_eq!(dir_entries(dir.path()), Vec::<String>::new(), "{args:?}");
    }
    // No size and no parent; no file name; a missing parent.
    let line = fails(1, &["create", s(&img)]);
    assert!(line.contains("size"), "{line}");
    let line = fails(1, &["create"]);
    assert!(line.contains("<FILE>"), "names what is missing: {line}");
    let line = fails(1, &["create", "-b", "/nonexistent/p.vhdx", s(&img)]);
    assert!(line.contains("/nonexistent/p.vhdx"), "{line}");
    assert_eq!(dir_entries(dir.path()), Vec::<String>::new());
}

#[test]
fn create_o_help_lists_the_options() {
    let dir = tempdir("cli-create-help-");
    let img = dir.path().join("x.vhdx");
    for args in [
        vec!["create", "-o", "help"],
        vec!["create", "-o", "?"],
        vec!["create", "-o", "help", s(&img), "1G"],
    ] {
        let out = ours_ok(&args);
        for option in [
            "size=",
            "subformat=",
            "block_size=",
            "log_size=",
            "logical_sector_size=",
            "physical_sector_size=",
        ] {
            assert!(out.contains(option), "{args:?}: no {option}:\n{out}");
        }
    }
    assert!(!img.exists(), "-o help must not create the file");
}

// ---------------------------------------------------------------------------------------------
// info
// ---------------------------------------------------------------------------------------------

#[test]
fn info_json_field_names_follow_qemu_img() {
    let dir = tempdir("cli-info-");
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    let leaf = dir.path().join("leaf.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&base), "64M"]);
    ours_ok(&["create", "-q", "-b", s(&base), s(&child)]);
    ours_ok(&["create", "-q", "-b", s(&child), s(&leaf)]);

    let info = json(&["info", "--output", "json", s(&child)]);
    assert_eq!(info["filename"], s(&child));
    assert_eq!(info["format"], "vhdx");
    assert_eq!(info["virtual-size"], 64 * MIB);
    assert_eq!(info["cluster-size"], MIB);
    assert_eq!(
        info["actual-size"],
        std::fs::metadata(&child).unwrap().blocks() * 512
    );
    assert_eq!(info["dirty-flag"], false);
    assert_eq!(info["backing-filename"], s(&base));
    assert_eq!(info["full-backing-filename"], s(&base));
    assert_eq!(info["backing-filename-format"], "vhdx");
    assert_eq!(info["format-specific"]["type"], "vhdx");
    let d = &info["format-specific"]["data"];
    for (k, t) in [
        ("subformat", "string"),
        ("block-size", "number"),
        ("logical-sector-size", "number"),
        ("physical-sector-size", "number"),
        ("file-size", "number"),
        ("creator", "string"),
        ("virtual-disk-id", "string"),
        ("file-write-guid", "string"),
        ("data-write-guid", "string"),
        ("log", "object"),
        ("block-states", "object"),
        ("sector-bitmap-blocks", "number"),
        ("parent-locator", "object"),
        ("chain", "array"),
    ] {
        assert_eq!(kind(&d[k]), t, "format-specific.data.{k}: {d:#}");
    }
    assert_eq!(d["subformat"], "differencing");
    assert_eq!(d["file-size"], std::fs::metadata(&child).unwrap().len());
    for k in ["offset", "length", "guid", "state", "replayed-entries"] {
        assert!(d["log"].get(k).is_some(), "log.{k}: {d:#}");
    }
    assert_eq!(d["chain"], serde_json::json!([s(&child), s(&base)]));

    // The GUIDs are the ones libvhdi reads (byte order of the mixed-endian layout).
    let py = pyvhdi_info(&child);
    let py_base = pyvhdi_info(&base);
    assert_eq!(d["data-write-guid"], py["identifier"], "{py}");
    assert_eq!(
        d["parent-locator"]["parent_linkage"]
            .as_str()
            .unwrap()
            .trim_matches(|c| c == '{' || c == '}'),
        py["parent_identifier"].as_str().unwrap(),
        "{py}"
    );
    assert_eq!(py["parent_identifier"], py_base["identifier"]);

    // The top-level names and types are those of qemu-img (a qcow2 chain shows them all).
    let qbase = dir.path().join("b.qcow2");
    let qchild = dir.path().join("c.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&qbase), "64M"]);
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&qbase),
        "-F",
        "qcow2",
        s(&qchild),
    ]);
    let q: Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output", "json", s(&qchild)])).unwrap();
    has_qemu_fields(&info, &q, &["children"], "info");
    has_qemu_fields(
        &info["format-specific"],
        &q["format-specific"],
        &[],
        "format-specific",
    );
    // And those qemu-img prints for a vhdx.
    let qv = dir.path().join("q.vhdx");
    qemu_img_create_vhdx(&qv, "64M", "");
    let q: Value =
        serde_json::from_str(&qemu_img_ok(&["info", "--output", "json", s(&qv)])).unwrap();
    let ours = json(&["info", "--output", "json", s(&qv)]);
    has_qemu_fields(&ours, &q, &["children"], "info of a qemu vhdx");
    for k in [
        "virtual-size",
        "cluster-size",
        "format",
        "filename",
        "dirty-flag",
    ] {
        assert_eq!(ours[k], q[k], "{k}");
    }
    assert!(ours.get("backing-filename").is_none());

    // --backing-chain: an array, leaf first, each entry a full info.
    let chain = json(&["info", "--backing-chain", "--output", "json", s(&leaf)]);
    let chain = chain.as_array().expect("an array");
    let names: Vec<&str> = chain
        .iter()
        .map(|i| i["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names, [s(&leaf), s(&child), s(&base)]);
    assert_eq!(chain[0]["backing-filename"], s(&child));
    assert_eq!(chain[1]["backing-filename"], s(&base));
    assert!(chain[2].get("backing-filename").is_none());
    assert_eq!(chain[2]["format-specific"]["data"]["subformat"], "dynamic");
    // Without --backing-chain: one object.
    assert!(json(&["info", "--output", "json", s(&leaf)]).is_object());
}

// ---------------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------------

/// Sets BAT entry `index` of a file to `value` (raw bytes).
fn poke_bat(img: &Path, index: u64, value: u64) {
    let bat = VhdxFile::open(img, false)
        .unwrap()
        .regions
        .bat()
        .file_offset;
    let f = OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&value.to_le_bytes(), bat + 8 * index)
        .unwrap();
}

#[test]
fn check_exit_codes_and_json() {
    let dir = tempdir("cli-check-");
    let img = dir.path().join("a.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&img), "64M"]);
    qemu_io_ok(&img, &["write -P 0x7e 1M 2M"]);
    let (code, out) = check(&[s(&img)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("No errors were found"), "{out}");

    // JSON: qemu-img's field names and types.
    let clean = json(&["check", "--output", "json", s(&img)]);
    let q: Value = serde_json::from_str(&qemu_img_ok(&[
        "check",
        "--output",
        "json",
        "-f",
        "vhdx",
        s(&img),
    ]))
    .unwrap();
    has_qemu_fields(&clean, &q, &[], "check --output json (clean vhdx)");
    let qcow = dir.path().join("q.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&qcow), "64M"]);
    let q: Value =
        serde_json::from_str(&qemu_img_ok(&["check", "--output", "json", s(&qcow)])).unwrap();
    has_qemu_fields(
        &clean,
        &q,
        &["filename", "format"],
        "check --output json (qcow2 names)",
    );
    assert_eq!(clean["filename"], s(&img));
    assert_eq!(clean["format"], "vhdx");
    assert_eq!(clean["check-errors"], 0);
    assert_eq!(clean["corruptions"], 0);
    assert_eq!(clean["leaks"], 0);
    assert_eq!(clean["total-clusters"], 64);
    assert_eq!(clean["allocated-clusters"], 2);
    assert_eq!(
        clean["image-end-offset"],
        std::fs::metadata(&img).unwrap().len()
    );

    // Leaked space: 3 MiB more at the end; -r leaks gives it back.
    let size = std::fs::metadata(&img).unwrap().len();
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(size + 3 * MIB).unwrap();
    drop(f);
    let (code, out) = check(&[s(&img)]);
    assert_eq!(code, 3, "{out}");
    let leaky = json_any(&["check", "--output", "json", s(&img)], 3);
    assert_eq!(leaky["leaks"], 1);
    assert_eq!(leaky["leaked-bytes"], 3 * MIB);
    assert_eq!(leaky["corruptions"], 0);
    let fixed = json_any(&["check", "-r", "leaks", "--output", "json", s(&img)], 0);
    assert_eq!(fixed["leaks-fixed"], 1, "{fixed:#}");
    assert_eq!(fixed["leaks"], 0, "{fixed:#}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), size, "shrunk back");
    assert_eq!(check(&[s(&img)]).0, 0);
    let (code, report) = qemu_img_check(&img);
    assert_eq!(code, 0, "qemu-img check after -r leaks:\n{report}");
    assert_eq!(
        read_at_vhdx(&img, dir.path(), MIB, 2 * MIB as usize),
        vec![0x7e; 2 * MIB as usize]
    );

    // A damaged BAT entry (a block beyond the end of the file): corruption, exit 2, as qemu-img.
    let bad = dir.path().join("bad.vhdx");
    std::fs::copy(&img, &bad).unwrap();
    poke_bat(&bad, 5, 6 | (100 * MIB));
    let (code, out) = check(&[s(&bad)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("BAT entry 5"), "{out}");
    let ours = json_any(&["check", "--output", "json", s(&bad)], 2);
    let (qcode, qreport) = qemu_img_check(&bad);
    assert_eq!(qcode, 2, "qemu-img agrees it is corrupt:\n{qreport}");
    let q: Value = serde_json::from_slice(
        &qemu_img(&["check", "--output", "json", "-f", "vhdx", s(&bad)]).stdout,
    )
    .unwrap();
    has_qemu_fields(&ours, &q, &[], "check --output json (corrupt)");
    assert_eq!(ours["corruptions"], q["corruptions"]);
    assert_eq!(ours["check-errors"], q["check-errors"]);
    // A reserved state value.
    std::fs::copy(&img, &bad).unwrap();
    poke_bat(&bad, 7, 4);
    assert_eq!(check(&[s(&bad)]).0, 2);
    // -r leaks does not "repair" corruption.
    assert_eq!(check(&["-r", "leaks", s(&bad)]).0, 2);
}

/// What our check says about files qemu made, which qemu-img check calls clean (its vhdx check
/// looks for no leaks at all):
/// * qemu puts the first payload block 5 MiB after the BAT (BAT at 2 MiB, metadata at 3 MiB,
///   data from 8 MiB), so every qemu-made file has 4 MiB unused at 4 MiB. That is not a leak
///   (our writer fills such gaps before growing the file): exit 0, reported as unused bytes;
/// * a default `subformat=fixed` file (block_state_zero=on: every entry ZERO, offset 0) never
///   uses its preallocated space, which lies past the last structure. The file is fixed
///   (LeaveBlockAllocated), so it must keep room for every block it has not allocated: only
///   the 4 MiB past that room are leaked, and `-r leaks` truncates just those; qemu-img then
///   still finds the file clean and writes and reads it as before. Once qemu has written to
///   the unrepaired file, its new blocks follow the unused space, which becomes a gap like the
///   one above.
#[test]
fn check_of_qemu_made_files() {
    let dir = tempdir("cli-check-qemu-");
    let dynamic = dir.path().join("d.vhdx");
    qemu_img_create_vhdx(&dynamic, "64M", "block_size=1M");
    qemu_io_ok(&dynamic, &["write -P 0x31 0 1536k", "write -P 0x32 63M 1M"]);
    let report = json_any(&["check", "--output", "json", s(&dynamic)], 0);
    assert_eq!(report["leaks"], 0, "{report:#}");
    assert_eq!(report["unused-bytes"], 4 * MIB, "{report:#}");
    assert_eq!(report["corruptions"], 0, "{report:#}");
    let (_, human) = check(&[s(&dynamic)]);
    assert!(
        human.contains("4194304 bytes between structures are unused"),
        "{human}"
    );
    assert_eq!(qemu_img_check(&dynamic).0, 0);

    let fixed = dir.path().join("f.vhdx");
    qemu_img_create_vhdx(&fixed, "64M", "subformat=fixed,block_size=8M");
    let copy = dir.path().join("f-copy.vhdx");
    std::fs::copy(&fixed, &copy).unwrap();
    let leaky = json_any(&["check", "--output", "json", s(&fixed)], 3);
    assert_eq!(leaky["leaks"], 1, "{leaky:#}");
    assert_eq!(leaky["leaked-bytes"], 4 * MIB, "{leaky:#}");
    let repaired = json_any(&["check", "-r", "leaks", "--output", "json", s(&fixed)], 0);
    assert_eq!(repaired["leaks-fixed"], 1, "{repaired:#}");
    assert_eq!(std::fs::metadata(&fixed).unwrap().len(), 68 * MIB);
    let (code, report) = qemu_img_check(&fixed);
    assert_eq!(code, 0, "qemu-img check after our -r leaks:\n{report}");
    // qemu writes into the shrunk file (new blocks at the end) and reads what it wrote.
    qemu_io_ok(&fixed, &["write -P 0x33 8M 4k", "write -P 0x34 63M 1M"]);
    assert_eq!(qemu_img_check(&fixed).0, 0);
    assert_eq!(check(&[s(&fixed)]).0, 0);
    qemu_io_ok(&copy, &["write -P 0x33 8M 4k", "write -P 0x34 63M 1M"]);
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    qemu_img_convert_raw(&fixed, &a);
    qemu_img_convert_raw(&copy, &b);
    if let Err(e) = files_equal(&a, &b) {
        panic!("-r leaks changed what qemu writes and reads: {e}");
    }
    // In the unrepaired copy the preallocated space is now between the metadata and the new
    // blocks at the end: a gap, no longer a leak.
    let gap = json_any(&["check", "--output", "json", s(&copy)], 0);
    assert_eq!(gap["leaks"], 0, "{gap:#}");
    assert_eq!(gap["unused-bytes"], 68 * MIB, "{gap:#}");
}

/// JSON printed by a command that exits with `code`.
fn json_any(args: &[&str], code: i32) -> Value {
    let out = ours_exits(code, args);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Reads a range of a VHDX through our convert.
fn read_at_vhdx(img: &Path, dir: &Path, off: u64, len: usize) -> Vec<u8> {
    let raw = dir.join("read.raw");
    let _ = std::fs::remove_file(&raw);
    ours_ok(&["convert", "-O", "raw", s(img), s(&raw)]);
    read_at(&raw, off, len)
}

#[test]
fn check_of_the_dirty_log_fixture() {
    let (_dir, img) = fixture("discutils-vhdx-log-replay");
    let before = std::fs::read(&img).unwrap();
    let (code, out) = check(&[s(&img)]);
    assert_eq!(code, 2, "a log to replay is reported as corruption:\n{out}");
    assert!(out.contains("-r all"), "says how to repair:\n{out}");
    // -r leaks does not replay the log.
    assert_eq!(check(&["-r", "leaks", s(&img)]).0, 2);
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "check without -r all changed the file"
    );
    let fixed = json_any(&["check", "-r", "all", "--output", "json", s(&img)], 0);
    assert_eq!(fixed["corruptions-fixed"], 1, "{fixed:#}");
    assert_eq!(fixed["corruptions"], 0, "{fixed:#}");
    assert_eq!(check(&[s(&img)]).0, 0);
    let (code, report) = qemu_img_check(&img);
    assert_eq!(code, 0, "qemu-img check after our -r all:\n{report}");
}

#[test]
fn check_and_its_repairs_of_a_differencing_child() {
    // The repairs open the child for writing and its parents read-only beside it: the chain
    // must not open the child a second time (its own write lock refused that) and must not
    // want the parent writable.
    let dir = tempdir("cli-check-child-");
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    ours_ok(&["create", "-q", s(&base), "64M"]);
    ours_ok(&["io", "-c", "write -P 0x11 0 1M", s(&base)]);
    ours_ok(&["create", "-q", "-b", s(&base), s(&child)]);
    ours_ok(&["io", "-c", "write -P 0x22 1M 1M", s(&child)]);
    let base_before = std::fs::read(&base).unwrap();
    for repair in [&[][..], &["-r", "leaks"], &["-r", "all"]] {
        let mut args = vec!["check", "--output", "json"];
        args.extend_from_slice(repair);
        args.push(s(&child));
        let report = json_any(&args, 0);
        assert_eq!(report["corruptions"], 0, "{args:?}: {report:#}");
        assert_eq!(report["check-errors"], 0, "{args:?}: {report:#}");
        assert_eq!(
            std::fs::read(&base).unwrap(),
            base_before,
            "{args:?} changed the parent"
        );
    }
    // The chain still reads what was written to each layer.
    let data = read_at_vhdx(&child, dir.path(), 0, 2 * MIB as usize);
    assert!(data[..MIB as usize].iter().all(|&b| b == 0x11));
    assert!(data[MIB as usize..].iter().all(|&b| b == 0x22));
}

// ---------------------------------------------------------------------------------------------
// convert
// ---------------------------------------------------------------------------------------------

#[test]
fn convert_output_is_sparse_and_correct() {
    let dir = tempdir("cli-convert-");
    let img = dir.path().join("empty.vhdx");
    ours_ok(&["create", "-q", s(&img), "10G"]);
    let raw = dir.path().join("empty.raw");
    ours_ok(&["convert", "-O", "raw", s(&img), s(&raw)]);
    let m = std::fs::metadata(&raw).unwrap();
    assert_eq!(m.len(), 10 * GIB);
    assert!(
        m.blocks() * 512 < MIB,
        "an empty 10G disk took {} bytes",
        m.blocks() * 512
    );
    assert!(is_all_zero(&raw));

    // Data written by qemu comes out where qemu-img puts it, and the zeros between stay holes.
    let data = dir.path().join("data.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&data), "1G"]);
    qemu_io_ok(
        &data,
        &[
            "write -P 0x42 0 64k",
            "write -P 0x43 500M 1M",
            "write -P 0x44 1073741312 512",
        ],
    );
    let ours = dir.path().join("ours.raw");
    let theirs = dir.path().join("qemu.raw");
    ours_ok(&["convert", "-f", "vhdx", "-O", "raw", s(&data), s(&ours)]);
    qemu_img_convert_raw(&data, &theirs);
    if let Err(e) = files_equal(&ours, &theirs) {
        panic!("ours vs qemu-img: {e}");
    }
    assert!(std::fs::metadata(&ours).unwrap().blocks() * 512 < 4 * MIB);
    // An existing output is replaced.
    ours_ok(&["convert", "-O", "raw", s(&img), s(&ours)]);
    assert!(is_all_zero(&ours));
    assert_eq!(
        dir_entries(dir.path()),
        [
            "data.vhdx",
            "empty.raw",
            "empty.vhdx",
            "ours.raw",
            "qemu.raw"
        ]
    );
}

#[test]
fn convert_refuses_and_fails_cleanly() {
    let dir = tempdir("cli-convert-fail-");
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&base), "64M"]);
    qemu_io_ok(&base, &["write -P 0x42 0 64k"]);
    ours_ok(&["create", "-q", "-b", s(&base), s(&child)]);
    let base_bytes = std::fs::read(&base).unwrap();
    let child_bytes = std::fs::read(&child).unwrap();

    // Its own input, or a parent in its chain.
    for (input, output) in [(&base, &base), (&child, &child), (&child, &base)] {
        let line = fails(1, &["convert", "-O", "raw", s(input), s(output)]);
        assert!(line.contains("input chain"), "{line}");
    }
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes);
    assert_eq!(std::fs::read(&child).unwrap(), child_bytes);

    // An unknown output format.
    let out = dir.path().join("out.img");
    let line = fails(1, &["convert", "-O", "qcow2", s(&base), s(&out)]);
    assert!(line.contains("qcow2"), "{line}");
    let line = fails(1, &["convert", "-f", "qcow2", s(&base), s(&out)]);
    assert!(line.contains("qcow2"), "{line}");
    assert!(!out.exists());

    // A corrupt input: no output, no temporary file; an existing output is left as it was.
    let bad = dir.path().join("bad.vhdx");
    std::fs::copy(&base, &bad).unwrap();
    poke_bat(&bad, 3, 6 | (500 * MIB));
    let line = fails(1, &["convert", "-O", "raw", s(&bad), s(&out)]);
    assert!(line.contains("BAT entry 3"), "{line}");
    assert!(!out.exists());
    std::fs::write(&out, b"previous contents").unwrap();
    fails(1, &["convert", "-O", "raw", s(&bad), s(&out)]);
    assert_eq!(std::fs::read(&out).unwrap(), b"previous contents");
    // A missing parent.
    std::fs::rename(&base, dir.path().join("moved.vhdx")).unwrap();
    let out2 = dir.path().join("out2.img");
    let line = fails(1, &["convert", s(&child), s(&out2)]);
    assert!(line.contains("not found"), "{line}");
    assert_eq!(
        dir_entries(dir.path()),
        ["bad.vhdx", "child.vhdx", "moved.vhdx", "out.img"],
        "no partial or temporary output"
    );
}

// ---------------------------------------------------------------------------------------------
// Unreadable input
// ---------------------------------------------------------------------------------------------

#[test]
fn unreadable_and_missing_files_give_one_line() {
    let dir = tempdir("cli-unreadable-");
    let missing = dir.path().join("missing.vhdx");
    let junk = dir.path().join("junk.vhdx");
    std::fs::write(&junk, vec![0x5au8; 2 * MIB as usize]).unwrap();
    let empty = dir.path().join("empty.vhdx");
    std::fs::write(&empty, b"").unwrap();
    let subdir = dir.path().join("subdir");
    std::fs::create_dir(&subdir).unwrap();
    let out = dir.path().join("out.raw");

    for (path, needle) in [
        (&missing, "No such file"),
        (&subdir, "directory"),
        (&junk, "signature"),
        (&empty, "too small"),
    ] {
        for args in [
            vec!["info", s(path)],
            vec!["info", "--output", "json", s(path)],
            vec!["convert", "-O", "raw", s(path), s(&out)],
        ] {
            let line = fails(1, &args);
            assert!(line.contains(s(path)), "{args:?}: names the file: {line}");
            assert!(line.contains(needle), "{args:?}: {line}");
            assert!(!out.exists());
        }
    }
    // check: a file that cannot be opened is an error (1, one line); a file that opens but is
    // not a VHDX is a corruption finding (2).
    for path in [&missing, &subdir] {
        let line = fails(1, &["check", s(path)]);
        assert!(line.contains(s(path)), "{line}");
    }
    for path in [&junk, &empty] {
        let (code, out) = check(&[s(path)]);
        assert_eq!(code, 2, "{out}");
    }
    // Unknown subcommands and options are one line too.
    for args in [
        vec!["frobnicate"],
        vec!["info", "--bogus", s(&junk)],
        vec!["check", "-r", "some", s(&junk)],
    ] {
        fails(1, &args);
    }
    assert_eq!(
        dir_entries(dir.path()),
        ["empty.vhdx", "junk.vhdx", "subdir"]
    );
}

/// `serve --cache none` of a file on a filesystem without O_DIRECT (ramfs: mounted here, which
/// needs root) fails at once with one line that names `--cache writeback`; `--cache writeback`
/// then gets as far as listening. Both `--cache writethrough` and the old `--writethrough`
/// are accepted, but not together with `--cache`.
#[test]
fn serve_cache_none_on_a_filesystem_without_o_direct() {
    let dir = tempdir("cli-ramfs-");
    let mnt = dir.path().join("ramfs");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "ramfs", "none"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mounted || std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() != 0),
        "root could not mount a ramfs"
    );
    if !mounted {
        eprintln!("serve_cache_none_on_a_filesystem_without_o_direct: NOT RUN (mounting a ramfs needs root)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let img = mnt.join("disk.vhdx");
    ours_ok(&["create", "-q", s(&img), "64M"]);
    let sock = dir.path().join("s.sock");
    let line = fails(
        1,
        &[
            "serve",
            "--cache",
            "none",
            "--socket-path",
            s(&sock),
            s(&img),
        ],
    );
    assert!(line.contains("O_DIRECT"), "{line}");
    assert!(line.contains("--cache writeback"), "{line}");
    assert!(line.contains(s(&img)), "{line}");
    let line = fails(
        1,
        &[
            "serve",
            "--cache",
            "none",
            "--writethrough",
            "--socket-path",
            s(&sock),
            s(&img),
        ],
    );
    assert!(line.contains("--writethrough"), "{line}");
    for cache in [
        &["--cache", "writeback"][..],
        &["--cache", "writethrough"],
        &["--writethrough"],
    ] {
        let mut child = std::process::Command::new(bin())
            .arg("serve")
            .args(cache)
            .arg("--socket-path")
            .arg(&sock)
            .arg(&img)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let listening =
            common::wait_for_path(&mut child, &sock, std::time::Duration::from_secs(10));
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&sock);
        assert!(listening.is_ok(), "{cache:?} did not serve");
    }
}
