//! `kill -9` of a writer mid-run: whatever moment the process dies at, the file must recover
//! (qemu's replay and ours give the same disk), both checks must be clean afterwards, and
//! every command that completed before the last completed `flush` must be there.
//!
//! The writer is our `io` command on a 64 MiB dynamic file (1 MiB blocks). It prints a line
//! when each write or discard completes (a flush prints nothing), so its stdout tells which
//! commands finished: commands run in order, so a flush followed by a printed command had
//! completed. Commands after that flush may or may not have reached the disk, in part or in
//! whole; every command is 4 KiB-aligned, so each 4 KiB page must read either as it was after
//! the flush or as one of those later commands left it.
//!
//! Each killed file is copied four times and recovered four ways: `qemu-img check -r all`
//! (qemu's replay), our `check -r all`, our writable open (`io`, which replays), and our
//! read-only convert (an in-memory replay that leaves the file alone).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const BLOCK: u64 = MIB;
const PAGE: u64 = 4096;

// What an op does to the disk (its command line is common's `Op::command`).
impl Op {
    /// The value each page of the op's range has afterwards (`None`: unchanged), page by page.
    fn effect(&self) -> Vec<(u64, u8)> {
        let pages =
            |off: u64, len: u64, v: u8| (off / PAGE..(off + len) / PAGE).map(move |p| (p, v));
        match *self {
            Op::Write(v, off, len) => pages(off, len, v).collect(),
            Op::Zero(off, len) => pages(off, len, 0).collect(),
            Op::Discard(off, len) => {
                // Whole blocks only; partial edges are left alone.
                let first = off.div_ceil(BLOCK) * BLOCK;
                let last = (off + len) / BLOCK * BLOCK;
                if last > first {
                    pages(first, last - first, 0).collect()
                } else {
                    Vec::new()
                }
            }
            Op::Flush => Vec::new(),
        }
    }
}

/// Thousands of small commands: writes of fresh patterns, whole-block discards, write-zeroes,
/// and a flush after about every other command.
fn small_ops(seed: u64, n: usize) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let pages = SIZE / PAGE;
    let mut ops = Vec::with_capacity(n);
    let mut pattern = 0u8;
    while ops.len() < n {
        let op = match rng.gen_range(0..10) {
            0 => {
                let first = rng.gen_range(0..SIZE / BLOCK);
                let blocks = rng.gen_range(1..=2).min(SIZE / BLOCK - first);
                Op::Discard(first * BLOCK, blocks * BLOCK)
            }
            1 => {
                let len = rng.gen_range(1..=64) * PAGE;
                let off = rng.gen_range(0..=pages - len / PAGE) * PAGE;
                Op::Zero(off, len)
            }
            _ => {
                pattern = pattern % 255 + 1;
                let len = rng.gen_range(1..=128) * PAGE;
                let off = rng.gen_range(0..=pages - len / PAGE) * PAGE;
                Op::Write(pattern, off, len)
            }
        };
        ops.push(op);
        if rng.gen_bool(0.5) {
            ops.push(Op::Flush);
        }
    }
    ops
}

/// A few huge commands: the whole disk written again and again, big discards and zeroes.
fn large_ops() -> Vec<Op> {
    let mut ops = Vec::new();
    for round in 0..16u8 {
        let p = 0x0f * (round + 1);
        ops.extend([
            Op::Write(p, 0, SIZE),
            Op::Flush,
            Op::Write(p + 1, 4 * MIB, 56 * MIB),
            Op::Discard(u64::from(round % 6) * 8 * MIB, 16 * MIB),
            Op::Flush,
            Op::Zero(32 * MIB + u64::from(round) * PAGE, 8 * MIB),
            Op::Write(p + 2, 60 * MIB, 4 * MIB),
            Op::Flush,
        ]);
    }
    ops
}

enum Kill {
    /// After the child has printed this many lines (two per completed write or discard).
    AfterLines(usize),
    /// This long after the start.
    AfterMillis(u64),
}

/// What the child's output says about how far it got.
struct Progress {
    /// Commands before this index completed before a flush that completed: they are durable.
    durable: usize,
    /// Commands from `durable` up to (not including) this index may have reached the disk.
    started: usize,
    /// The child finished on its own (clean close: everything is durable).
    finished: bool,
    /// Completed writes and discards.
    completed: usize,
}

fn progress(ops: &[Op], op_lines: usize, finished: bool) -> Progress {
    if finished {
        assert_eq!(
            op_lines,
            ops.iter().filter(|o| **o != Op::Flush).count(),
            "a child that exited 0 completed every command"
        );
        return Progress {
            durable: ops.len(),
            started: ops.len(),
            finished,
            completed: op_lines,
        };
    }
    // Index of the last printed command, if any.
    let last_done = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| **o != Op::Flush)
        .nth(op_lines.wrapping_sub(1))
        .map(|(i, _)| i)
        .filter(|_| op_lines > 0);
    let durable = match last_done {
        Some(j) => ops[..j].iter().rposition(|o| *o == Op::Flush).unwrap_or(0),
        None => 0,
    };
    // The next write or discard after the last printed one may be under way (flushes in
    // between may have completed silently).
    let from = last_done.map_or(0, |j| j + 1);
    let started = ops[from..]
        .iter()
        .position(|o| *o != Op::Flush)
        .map_or(ops.len(), |k| from + k + 1);
    Progress {
        durable,
        started,
        finished,
        completed: op_lines,
    }
}

/// Runs `io` with `ops` on `img` and kills it with SIGKILL at the given moment.
fn run_and_kill(img: &Path, ops: &[Op], kill: Kill) -> Progress {
    let mut cmd = Command::new(bin());
    cmd.arg("io");
    for op in ops {
        cmd.arg("-c").arg(op.command());
    }
    cmd.arg(img).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut guard = KillOnDrop(cmd.spawn().expect("start vhost-user-vhdx io"));
    let stdout = guard.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut lines = Vec::new();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                // A line cut short by the kill does not count.
                Ok(_) if buf.last() == Some(&b'\n') => {
                    lines.push(String::from_utf8_lossy(&buf).trim_end().to_string());
                    let _ = tx.send(lines.len());
                }
                Ok(_) => break,
            }
        }
        lines
    });
    let started = Instant::now();
    match kill {
        Kill::AfterLines(n) => loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(count) if count >= n => break,
                Ok(_) => {}
                // The child ended (or stalled): kill whatever is left.
                Err(_) => break,
            }
        },
        Kill::AfterMillis(ms) => {
            std::thread::sleep(Duration::from_millis(ms).saturating_sub(started.elapsed()))
        }
    }
    let _ = guard.0.kill();
    let status = guard.0.wait().expect("wait for the child");
    let lines = reader.join().expect("stdout reader");
    let op_lines = lines
        .iter()
        .filter(|l| l.starts_with("wrote ") || l.starts_with("discard "))
        .count();
    let mut stderr = String::new();
    if let Some(mut e) = guard.0.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    // Killed, or finished on its own before the kill; never a failure of its own.
    assert!(
        status.success() || status.code().is_none(),
        "the writer failed on its own ({status}): {stderr}"
    );
    progress(ops, op_lines, status.success())
}

fn ours_code(args: &[&str]) -> (Option<i32>, String) {
    let out = ours(args);
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

fn both_checks_clean(img: &Path, what: &str) {
    assert_qemu_img_check_clean(img, what);
    let (code, text) = ours_code(&["check", s(img)]);
    assert_eq!(code, Some(0), "{what}: our check:\n{text}");
}

/// A replayed file that nothing has trimmed since: the killed writer had grown the file ahead
/// of its blocks. A replay (qemu's, or our writable open when nothing is written after it)
/// leaves that length alone, and qemu-img check looks for no leaks in VHDX, but ours reports
/// the space past the last structure as leaked, and nothing else; `-r leaks` trims it.
fn clean_but_for_the_grown_tail(img: &Path, what: &str) {
    assert_qemu_img_check_clean(img, what);
    let (code, text) = ours_code(&["check", s(img)]);
    assert!(
        code == Some(0)
            || (code == Some(3) && text.contains("Leaked space") && !text.contains("ERROR")),
        "{what}: our check:\n{text}"
    );
    let (code, text) = ours_code(&["check", "-r", "leaks", s(img)]);
    assert_eq!(code, Some(0), "{what}: our check -r leaks:\n{text}");
    both_checks_clean(img, what);
}

/// Page-by-page check of a recovered raw image against what the progress allows.
fn verify_content(raw: &Path, ops: &[Op], p: &Progress, what: &str) {
    let pages = (SIZE / PAGE) as usize;
    let mut model = vec![0u8; pages];
    for op in &ops[..p.durable] {
        for (page, v) in op.effect() {
            model[page as usize] = v;
        }
    }
    let mut maybe: Vec<Vec<u8>> = vec![Vec::new(); pages];
    for op in &ops[p.durable..p.started] {
        for (page, v) in op.effect() {
            maybe[page as usize].push(v);
        }
    }
    let data = std::fs::read(raw).unwrap();
    assert_eq!(data.len() as u64, SIZE, "{what}");
    for (i, page) in data.chunks(PAGE as usize).enumerate() {
        let v = page[0];
        let off = i as u64 * PAGE;
        if let Some(j) = page.iter().position(|&b| b != v) {
            panic!(
                "{what}: page at {off:#x} is torn: {v:#04x} then {:#04x} at +{j}",
                page[j]
            );
        }
        if v != model[i] && !maybe[i].contains(&v) {
            panic!(
                "{what}: page at {off:#x} reads {v:#04x}; after the last completed flush it \
                 was {:#04x}, and the commands after it would leave one of {:02x?} \
                 (durable: commands 0..{}, under way: up to {}, {} writes/discards printed)",
                model[i], maybe[i], p.durable, p.started, p.completed
            );
        }
    }
}

fn kill9_case(name: &str, ops: &[Op], kill: Kill) {
    let dir = tempdir(&format!("kill9-{name}-"));
    let d = dir.path();
    let img = d.join("img.vhdx");
    let out = ours(&["create", "-q", "-o", "block_size=1M", s(&img), "64M"]);
    assert!(out.status.success(), "create: {out:?}");
    let p = run_and_kill(&img, ops, kill);
    let what = format!(
        "{name}: {} of {} commands completed, durable 0..{}, {}",
        p.completed,
        ops.len(),
        p.durable,
        if p.finished { "finished" } else { "killed" }
    );

    let info: Value = serde_json::from_str(&String::from_utf8_lossy(
        &ours(&["info", "--output", "json", s(&img)]).stdout,
    ))
    .unwrap_or_else(|e| panic!("{what}: info of the killed file: {e}"));
    let log = info["format-specific"]["data"]["log"]["state"]
        .as_str()
        .unwrap()
        .to_string();
    if p.finished {
        assert_eq!(log, "clean", "{what}");
    }
    eprintln!("{what}; log {log}");
    // qemu refuses a dirty log read-only; its check says so without -r.
    let (code, text) = qemu_img_check(&img);
    if log == "dirty" {
        assert_eq!(code, 1, "{what}: qemu-img check of a dirty log:\n{text}");
        assert!(text.contains("needs to be replayed"), "{what}: {text}");
    } else {
        assert_eq!(code, 0, "{what}: {text}");
    }

    let copy = |n: &str| {
        let c = d.join(n);
        std::fs::copy(&img, &c).unwrap();
        c
    };
    let (a, b, c, w) = (
        copy("a.vhdx"),
        copy("b.vhdx"),
        copy("c.vhdx"),
        copy("w.vhdx"),
    );
    let raw = |n: &str| d.join(n);

    // A: qemu replays (check -r all), then converts.
    qemu_img_ok(&["check", "-r", "all", "-f", "vhdx", s(&a)]);
    clean_but_for_the_grown_tail(&a, &format!("{what}, after qemu-img check -r all"));
    qemu_img_convert_raw(&a, &raw("a.raw"));

    // B: our check -r all replays; then we convert.
    let (code, text) = ours_code(&["check", "-r", "all", s(&b)]);
    assert_eq!(code, Some(0), "{what}: our check -r all:\n{text}");
    both_checks_clean(&b, &format!("{what}, after our check -r all"));
    let out = ours(&["convert", "-q", s(&b), s(&raw("b.raw"))]);
    assert!(out.status.success(), "{what}: {out:?}");

    // C: our read-only convert replays in memory and leaves the file as it was.
    let before = std::fs::read(&c).unwrap();
    let out = ours(&["convert", "-q", s(&c), s(&raw("c.raw"))]);
    assert!(out.status.success(), "{what}: {out:?}");
    assert!(
        std::fs::read(&c).unwrap() == before,
        "{what}: a read-only convert changed the file"
    );

    // W: a writable open replays; a read through it, then qemu converts.
    let out = ours(&["io", "-c", "read 0 4096", s(&w)]);
    assert!(out.status.success(), "{what}: {out:?}");
    clean_but_for_the_grown_tail(&w, &format!("{what}, after our writable open"));
    qemu_img_convert_raw(&w, &raw("w.raw"));

    for other in ["b.raw", "c.raw", "w.raw"] {
        if let Err(e) = files_equal(&raw("a.raw"), &raw(other)) {
            panic!("{what}: qemu's replay and ours ({other}) differ: {e}");
        }
    }
    verify_content(&raw("a.raw"), ops, &p, &what);
}

#[test]
fn kill9_early_in_many_small_commands() {
    kill9_case("small-early", &small_ops(1, 4000), Kill::AfterLines(40));
}

#[test]
fn kill9_midway_through_many_small_commands() {
    kill9_case("small-mid", &small_ops(2, 4000), Kill::AfterLines(800));
}

#[test]
fn kill9_late_in_many_small_commands() {
    kill9_case("small-late", &small_ops(3, 4000), Kill::AfterLines(3000));
}

#[test]
fn kill9_during_huge_writes_after_50ms() {
    kill9_case("large-50ms", &large_ops(), Kill::AfterMillis(50));
}

#[test]
fn kill9_during_huge_writes_after_200ms() {
    kill9_case("large-200ms", &large_ops(), Kill::AfterMillis(200));
}

#[test]
fn kill9_during_huge_writes_after_600ms() {
    kill9_case("large-600ms", &large_ops(), Kill::AfterMillis(600));
}

/// A writer that finishes before the kill leaves a clean file, compared all the same.
#[test]
fn kill9_too_late_finds_a_clean_file() {
    kill9_case(
        "small-finished",
        &small_ops(4, 300),
        Kill::AfterLines(usize::MAX),
    );
}

/// The progress arithmetic on a known output.
#[test]
fn progress_from_printed_lines() {
    use Op::*;
    let ops = [
        Write(1, 0, PAGE),
        Flush,
        Write(2, 0, PAGE),
        Flush,
        Flush,
        Write(3, 0, PAGE),
        Write(4, 0, PAGE),
    ];
    let p = progress(&ops, 0, false);
    assert_eq!((p.durable, p.started), (0, 1));
    let p = progress(&ops, 1, false);
    assert_eq!((p.durable, p.started), (0, 3));
    // The second write printed: the flush before it completed; the flushes after it and
    // the third write may have run.
    let p = progress(&ops, 2, false);
    assert_eq!((p.durable, p.started), (1, 6));
    let p = progress(&ops, 3, false);
    assert_eq!((p.durable, p.started), (4, 7));
    let p = progress(&ops, 4, true);
    assert_eq!((p.durable, p.started), (7, 7));
}
