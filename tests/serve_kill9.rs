//! A `serve` killed with SIGKILL right after a request completed, with no flush: what the
//! guest saw complete is on the file. The guest never learns that its back-end was killed and
//! restarted, so the device's volatile cache must survive a process kill (not a power loss,
//! which the guest's flushes are for). Data is in the page cache as soon as it is written; a
//! request that changed metadata (the first write to a block, the sector-bitmap bits of a
//! partial write to a differencing file, a discard, a write-zeroes) must not complete before
//! that change is in the log on the file, which the next open replays.
//!
//! Each case flushes a baseline, then runs requests that each change metadata, kills the
//! process the moment the last one completed, and reads the file back through a log replay:
//! qemu's (`qemu-img check -r all`) for a dynamic file, ours (a writable open) for a
//! differencing one (qemu does not open those), with libvhdi (pyvhdi) reading the replayed
//! chain; our read-only, in-memory replay must read the same.

mod common;

use std::path::Path;

use common::frontend::*;
use common::*;

const BLOCK: u64 = MIB;
const SECTOR: u64 = 512;

/// A guest request and what the disk reads afterwards at `(offset, bytes)`.
struct Step {
    req: Blk,
    expect: (u64, Vec<u8>),
}

fn write(offset: u64, data: Vec<u8>) -> Step {
    Step {
        req: Blk::Write {
            sector: offset / SECTOR,
            data: data.clone(),
        },
        expect: (offset, data),
    }
}

fn discard(block: u64) -> Step {
    Step {
        req: Blk::Discard {
            sector: block * BLOCK / SECTOR,
            sectors: (BLOCK / SECTOR) as u32,
        },
        expect: (block * BLOCK, vec![0; BLOCK as usize]),
    }
}

fn write_zeroes(offset: u64, len: u64, unmap: bool) -> Step {
    Step {
        req: Blk::WriteZeroes {
            sector: offset / SECTOR,
            sectors: (len / SECTOR) as u32,
            unmap,
        },
        expect: (offset, vec![0; len as usize]),
    }
}

/// Serves `image`, writes `baseline` and flushes, runs `steps` one after the other (each
/// completes before the next is made), and SIGKILLs the process as soon as the last one
/// completed. Returns what each step promised.
fn run_then_kill(dir: &Path, image: &Path, baseline: &[(u64, Vec<u8>)], steps: &[Step]) {
    let mut serve = Serve::start(dir, image, &[]);
    let mem = Memory::new(0, 16 * MIB);
    let mut f = Frontend::connect(&serve.socket);
    f.start(&mem, &Setup::default());
    for (offset, data) in baseline {
        f.write(&mem, 0, offset / SECTOR, data);
    }
    assert_eq!(f.request(&mem, 0, &Blk::Flush), blk::S_OK, "flush");
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(
            f.request(&mem, 0, &step.req),
            blk::S_OK,
            "step {i}: {:?}",
            short(&step.req)
        );
    }
    serve.kill9();
}

/// A request without its data, for messages.
fn short(req: &Blk) -> String {
    match req {
        Blk::Write { sector, data } => format!("write {} bytes at sector {sector}", data.len()),
        other => format!("{other:?}"),
    }
}

fn assert_steps_survived(raw: &Path, steps: &[Step], what: &str) {
    for (i, step) in steps.iter().enumerate() {
        let (offset, want) = &step.expect;
        let got = read_at(raw, *offset, want.len());
        if &got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{what}: step {i} ({}) completed before the SIGKILL but is lost: byte {} reads \
                 {:#04x}, not {:#04x}",
                short(&step.req),
                offset + at as u64,
                got[at],
                want[at]
            );
        }
    }
}

#[test]
fn completed_metadata_changes_of_a_dynamic_file_survive_a_sigkill() {
    let dir = tempdir("serve-kill9-dynamic-");
    let d = dir.path();
    let image = d.join("disk.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&image), "64M"]);
    // Blocks 1, 2 and 3 hold data, made durable: losing the discard or write-zeroes of one
    // brings that data back.
    let baseline: Vec<(u64, Vec<u8>)> = (1..=3)
        .map(|b| (b * BLOCK, pattern(10 + b, 64 * KIB as usize)))
        .collect();
    let steps = vec![
        // First touch of block 8 (allocation, zero-filled around the data), then a write into
        // the same block, which changes no metadata but relies on the allocation.
        write(8 * BLOCK + 8 * KIB, pattern(20, 64 * KIB as usize)),
        write(8 * BLOCK + 512 * KIB, pattern(21, 4 * KIB as usize)),
        // Another first touch, at the end of a block.
        write(13 * BLOCK - 4 * KIB, pattern(22, 4 * KIB as usize)),
        discard(1),
        write_zeroes(2 * BLOCK, BLOCK, false),
        write_zeroes(3 * BLOCK, BLOCK, true),
    ];
    run_then_kill(d, &image, &baseline, &steps);

    // qemu's replay, then qemu reads.
    let replayed = d.join("qemu.vhdx");
    std::fs::copy(&image, &replayed).unwrap();
    qemu_img_ok(&["check", "-r", "all", "-f", "vhdx", s(&replayed)]);
    let raw = d.join("qemu.raw");
    qemu_img_convert_raw(&replayed, &raw);
    assert_steps_survived(&raw, &steps, "after qemu's replay");
    // Ours (an in-memory replay) agrees.
    let ours_raw = d.join("ours.raw");
    ours_ok(&["convert", "-q", s(&image), s(&ours_raw)]);
    assert_files_equal(&raw, &ours_raw, "qemu's replay and ours");
}

#[test]
fn completed_metadata_changes_of_a_differencing_file_survive_a_sigkill() {
    let dir = tempdir("serve-kill9-diff-");
    let d = dir.path();
    let parent = d.join("parent.vhdx");
    let child = d.join("child.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&parent), "64M"]);
    // The parent reads 0x11 over its first 16 MiB: a lost change of the child shows it.
    qemu_io_ok(&parent, &["write -P 0x11 0 16M"]);
    ours_ok(&["create", "-q", "-b", s(&parent), s(&child)]);
    let steps = vec![
        // A partial first write: the block becomes PARTIALLY_PRESENT, its bits are set (and
        // its chunk's sector bitmap block allocated).
        write(BLOCK + 8 * KIB, pattern(30, 16 * KIB as usize)),
        // Another partial write to that block: only bitmap bits change.
        write(BLOCK + 700 * KIB, pattern(31, 4 * KIB as usize)),
        // A first write at the start of another block.
        write(4 * BLOCK, pattern(32, 256 * KIB as usize)),
        // Both must read zeros, not the parent's data.
        discard(5),
        write_zeroes(6 * BLOCK, BLOCK, false),
        write_zeroes(7 * BLOCK, BLOCK, true),
    ];
    run_then_kill(d, &child, &[], &steps);

    // Our replay (a writable open) on a copy, then libvhdi reads the chain.
    let replayed = d.join("replayed.vhdx");
    std::fs::copy(&child, &replayed).unwrap();
    ours_ok(&["io", "-c", "read 0 4096", s(&replayed)]);
    let raw = d.join("pyvhdi.raw");
    pyvhdi_read_raw(&raw, &[&replayed, &parent]);
    assert_steps_survived(&raw, &steps, "after our replay, read by libvhdi");
    // What the child does not hold still reads from the parent.
    assert!(
        read_at(&raw, BLOCK, 8 * KIB as usize) == vec![0x11; 8 * KIB as usize],
        "the parent's data around a partial write"
    );
    // Our in-memory replay reads the same.
    let ours_raw = d.join("ours.raw");
    ours_ok(&["convert", "-q", s(&child), s(&ours_raw)]);
    assert_files_equal(
        &raw,
        &ours_raw,
        "libvhdi after our replay, and our in-memory replay",
    );
}

// ---------------------------------------------------------------------------------------------
// The engine's mode, directly

/// What a process that opened the file now would read (an in-memory replay of its log).
fn as_a_restart_reads(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    let chain = vhost_user_vhdx::vhdx::Chain::open(
        image,
        &vhost_user_vhdx::vhdx::ChainOptions {
            force_share: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0xee; len];
    chain.read_at(&mut buf, offset).unwrap();
    buf
}

/// A write that changes no metadata itself but lands in a block whose allocation is not
/// durable yet (another queue's write, still waiting for its commit) relies on that
/// allocation: in the mode, it returns only once the allocation is in the log.
#[test]
fn a_write_relying_on_a_pending_allocation_waits_for_it() {
    let dir = tempdir("wait-for-metadata-");
    let image = dir.path().join("disk.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&image), "64M"]);
    let chain = open_writable(&image);
    let first = pattern(40, 4096);
    let second = pattern(41, 4096);
    // Off (a tool's batching): the allocation stays in memory until a commit.
    chain.write_at(&first, 5 * BLOCK).unwrap();
    chain.leaf().wait_for_metadata(true);
    // No metadata change of its own: the block is FULLY_PRESENT in memory.
    chain.write_at(&second, 5 * BLOCK + 64 * KIB).unwrap();
    assert!(
        as_a_restart_reads(&image, 5 * BLOCK + 64 * KIB, 4096) == second,
        "a write into a block whose allocation was not durable returned before it was"
    );
    assert!(as_a_restart_reads(&image, 5 * BLOCK, 4096) == first);
    chain.close().unwrap();
}

/// 32 first writes to different blocks made available at once: the queue thread runs them
/// all and completes them once their allocations are in the log (one or two commits for the
/// batch); every one that completed before the SIGKILL is on the file.
#[test]
fn a_batch_of_first_writes_completed_before_a_sigkill_survives() {
    let dir = tempdir("serve-kill9-batch-");
    let d = dir.path();
    let image = d.join("disk.vhdx");
    ours_ok(&["create", "-q", "-o", "block_size=1M", s(&image), "64M"]);
    let mut serve = Serve::start(d, &image, &[]);
    let mem = Memory::new(0, 16 * MIB);
    let mut f = Frontend::connect(&serve.socket);
    f.start(&mem, &Setup::default());
    let writes: Vec<(u64, Vec<u8>)> = (0..32u64)
        .map(|i| {
            (
                (i + 16) * BLOCK + 4 * KIB,
                pattern(50 + i, 8 * KIB as usize),
            )
        })
        .collect();
    let reqs: Vec<Pending> = writes
        .iter()
        .map(|(offset, data)| {
            let buf = mem.alloc(data.len() as u64, 4096);
            let req = Blk::Write {
                sector: offset / SECTOR,
                data: data.clone(),
            };
            f.add(&mem, 0, &req, buf)
        })
        .collect();
    f.kick(0);
    for _ in 0..reqs.len() {
        f.wait(&mem, 0);
    }
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(mem.get(r.status, 1)[0], blk::S_OK, "write {i}");
    }
    serve.kill9();
    let raw = d.join("ours.raw");
    ours_ok(&["convert", "-q", s(&image), s(&raw)]);
    for (i, (offset, data)) in writes.iter().enumerate() {
        assert!(
            &read_at(&raw, *offset, data.len()) == data,
            "write {i} at {offset:#x} completed before the SIGKILL but is lost"
        );
    }
}
