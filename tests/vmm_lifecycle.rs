//! The device across the VMM's lifecycle (issue 10), driven by the raw front-end of
//! tests/common/frontend.rs against the built `serve`:
//! - stop means stopped: GET_VRING_BASE replies only after the last request popped from the
//!   ring has completed, nothing touches the ring afterwards, and a ring re-initialised at new
//!   addresses (a guest reset) never receives a head from before;
//! - SET_VRING_CALL is followed by one signal (QEMU's qtest `idx` waits for it);
//! - a driver that negotiates neither FLUSH nor CONFIG_WCE gets a write-through device;
//! - a back-end killed with SIGKILL and restarted on the same socket completes every request
//!   exactly once, through the in-flight region (INFLIGHT_SHMFD) the front-end keeps;
//! - an in-flight region that cannot be right is refused, never trusted;
//! - a ring of 1024 entries (what QEMU and Cloud Hypervisor may ask for) works by default.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::frontend::*;
use common::{Case, MARK_LEN, MARK_SECTOR};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Makes `n` reads of `len` bytes available on queue 0 at consecutive 1 MiB-aligned offsets,
/// each into its own buffer, and kicks once.
fn many_reads(f: &mut Frontend, mem: &Memory, n: usize, len: u32) -> Vec<Pending> {
    let sectors = (0..n as u64).map(|i| (i * MIB / 512) % (60 * MIB / 512));
    f.reads(mem, 0, sectors, len)
}

/// Waits until the device has completed at least one request on `ring`.
fn first_completion(ring: &Ring, mem: &Memory) {
    let deadline = Instant::now() + TIMEOUT;
    while ring.used_idx(mem) == 0 {
        assert!(Instant::now() < deadline, "no request completed");
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// One request at a time with a helper thread (`--aio off`); the same with requests in
/// flight is `get_vring_base_waits_for_requests_in_flight_*`.
#[test]
fn get_vring_base_returns_after_the_last_completion() {
    let (c, mem, mut f) = Case::marked(&["--aio", "off", "--helper-threads", "1"], 80 * MIB);
    f.start(&mem, &Setup::default());
    many_reads(&mut f, &mem, 64, MIB as u32);
    first_completion(&f.queues[0], &mem);
    let base = f.get_vring_base(0).expect("GET_VRING_BASE");
    let used = f.queues[0].used_idx(&mem);
    assert_eq!(
        used as u32, base,
        "GET_VRING_BASE replied {base} while the used index was {used}: requests were still running"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        f.queues[0].used_idx(&mem),
        used,
        "the used index moved after GET_VRING_BASE had replied"
    );
    c.after(f);
}

/// With requests in flight (`--aio`): GET_VRING_BASE waits for reads of allocated data that
/// the queue thread submitted and did not complete yet, and nothing moves afterwards.
fn get_vring_base_waits_for_requests_in_flight(aio: &str) {
    // Overrides a suite run's `VHDX_SERVE_ARGS="--aio ..."` (the last `--aio` counts).
    let mut c = Case::start(&["--aio", aio]);
    c.write_mark();
    let mem = Memory::new(0, 80 * MIB);
    let mut f = c.connect();
    f.start(&mem, &Setup::default());
    // Allocate every block the reads touch, so that they go to the file asynchronously.
    // (A first write to a block allocates all of it; these keep clear of the mark.)
    let data = pattern(3, 4096);
    for i in 0..60 {
        f.write(&mem, 0, (i * MIB + MIB / 2) / 512, &data);
    }
    // Writes to allocated blocks, then reads of them, all at once: deep in flight.
    let writes: Vec<Pending> = (0..24u64)
        .map(|i| {
            let buf = mem.alloc(MIB, 4096);
            f.add(
                &mem,
                0,
                &Blk::Write {
                    sector: (36 + i) * MIB / 512,
                    data: pattern(4, MIB as usize),
                },
                buf,
            )
        })
        .collect();
    let reads = many_reads(&mut f, &mem, 24, MIB as u32);
    let before = f.queues[0].used_idx(&mem);
    let deadline = Instant::now() + TIMEOUT;
    while f.queues[0].used_idx(&mem) == before {
        assert!(Instant::now() < deadline, "no request completed");
        std::thread::sleep(Duration::from_micros(100));
    }
    let base = f.get_vring_base(0).expect("GET_VRING_BASE");
    let used = f.queues[0].used_idx(&mem);
    assert_eq!(
        used as u32, base,
        "GET_VRING_BASE replied {base} while the used index was {used}: requests were still in flight"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        f.queues[0].used_idx(&mem),
        used,
        "the used index moved after GET_VRING_BASE had replied"
    );
    let _ = (writes, reads);
    c.after(f);
}

#[test]
fn get_vring_base_waits_for_requests_in_flight_io_uring() {
    get_vring_base_waits_for_requests_in_flight("io_uring");
}

#[test]
fn get_vring_base_waits_for_requests_in_flight_threads() {
    get_vring_base_waits_for_requests_in_flight("threads");
}

#[test]
fn a_reinitialised_ring_never_receives_an_old_head() {
    let (c, mem, mut f) = Case::marked(&["--aio", "off", "--helper-threads", "1"], 80 * MIB);
    f.start(&mem, &Setup::default());
    // Old heads are 0, 3, 6, ... (three descriptors a request).
    many_reads(&mut f, &mem, 64, MIB as u32);
    first_completion(&f.queues[0], &mem);
    f.get_vring_base(0).expect("GET_VRING_BASE");
    // A guest reset: a new ring at new addresses, whose first head is 255.
    let mut ring = Ring::new(&mem, 0, 256, RingPlace::default(), true);
    ring.free = (0..256).collect();
    f.queues[0] = ring;
    f.start_queue(&mem, 0, 0);
    let scratch = f.queues[0].scratch;
    let p = f.submit(
        &mem,
        0,
        &Blk::Read {
            sector: MARK_SECTOR,
            len: 4096,
        },
        scratch,
    );
    assert_eq!(p.head, 255);
    std::thread::sleep(Duration::from_millis(500));
    let r = &f.queues[0];
    let n = r.used_idx(&mem);
    let heads: Vec<u32> = (0..n).map(|i| r.used_elem(&mem, i).0).collect();
    assert_eq!(
        heads,
        vec![255],
        "the new ring's used elements (only head 255 was made available on it)"
    );
    assert!(mem.get(scratch, 4096) == pattern(1, MARK_LEN)[..4096]);
    c.after(f);
}

#[test]
fn set_vring_call_is_signalled_once() {
    let mut c = Case::start(&[]);
    let mem = Memory::new(0, 16 * MIB);
    let mut f = c.connect();
    f.start(&mem, &Setup::default());
    f.read(&mem, 0, 0, 512);
    // A new call eventfd, as QEMU sets after a reconnect: the back-end signals it at once, in
    // case an interrupt was lost while there was none.
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    f.set_vring_call(0, call.as_raw_fd())
        .expect("SET_VRING_CALL");
    std::thread::sleep(Duration::from_millis(300));
    let got = call.read().unwrap_or(0);
    assert!(
        got >= 1,
        "no signal on the call eventfd after SET_VRING_CALL"
    );
    f.queues[0].call = call;
    assert!(f.read(&mem, 0, MARK_SECTOR, 512) == vec![0; 512]);
    c.serve.assert_alive("after SET_VRING_CALL");
    f.close();
    c.serve.terminate_within(Duration::from_secs(2));
}

#[test]
fn without_flush_or_config_wce_every_completed_write_is_durable() {
    let mut c = Case::start(&[]);
    let mem = Memory::new(0, 32 * MIB);
    let mut f = c.connect();
    f.start(
        &mem,
        &Setup {
            without: feat::BLK_FLUSH | feat::BLK_CONFIG_WCE,
            ..Default::default()
        },
    );
    assert_eq!(f.features & (feat::BLK_FLUSH | feat::BLK_CONFIG_WCE), 0);
    // Each write allocates a new block: data and metadata (BAT) must both be on disk.
    let writes: Vec<(u64, Vec<u8>)> = (0..24u64)
        .map(|i| (i * 2 * MIB / 512 + 8, pattern(100 + i, 64 * 1024)))
        .collect();
    for (sector, data) in &writes {
        f.write(&mem, 0, *sector, data);
    }
    c.serve.kill9();
    let raw = c.dir.path().join("after-kill.raw");
    common::ours_ok(&["convert", "-O", "raw", common::s(&c.image), common::s(&raw)]);
    for (sector, data) in &writes {
        let got = common::read_at(&raw, sector * 512, data.len());
        assert!(
            &got == data,
            "a write completed at sector {sector} is lost after SIGKILL (no FLUSH, no WCE)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Backend restart with in-flight recovery

/// What a split queue's in-flight region takes (vhost-user.rst; QEMU's and libvhost-user's
/// formula, so that regions made by either line up).
fn queue_region_size(queue_size: u16) -> u64 {
    (16 * queue_size as u64 + 2).div_ceil(64) * 64
}

/// Which writes the back-end had completed before the SIGKILL.
#[derive(Clone, Copy, PartialEq)]
enum Judge {
    /// Those made available but not completed: resubmitted, completed once, on the disk.
    Resubmitted,
    /// Those completed before: still on the disk.
    CompletedBefore,
}

#[test]
fn restart_after_sigkill_completes_every_request_exactly_once() {
    restart_after_sigkill(Judge::Resubmitted, Base::AvailIdx);
}

/// The same with SET_VRING_BASE at the used index, as QEMU sends after a back-end crash.
#[test]
fn restart_after_sigkill_with_the_base_at_the_used_index() {
    restart_after_sigkill(Judge::Resubmitted, Base::UsedIdx);
}

/// The guest goes on running across a back-end restart and trusts what completed: a process
/// that dies loses no page cache, only what it kept in its own memory (a write-back cache of
/// metadata, say), and that must not be data the guest was told is written.
#[test]
fn writes_completed_before_a_sigkill_survive_the_restart() {
    restart_after_sigkill(Judge::CompletedBefore, Base::AvailIdx);
}

/// What the reconnecting front-end sends as SET_VRING_BASE: Cloud Hypervisor the avail index,
/// QEMU (after a crash) the used index. A back-end with a valid in-flight region takes its
/// position from the region either way.
#[derive(Clone, Copy)]
enum Base {
    AvailIdx,
    UsedIdx,
}

fn restart_after_sigkill(judge: Judge, base: Base) {
    let mut c = Case::start(&["--helper-threads", "1"]);
    let mem = Memory::new(0, 64 * MIB);
    let mut f = c.connect();
    f.start(
        &mem,
        &Setup {
            inflight: true,
            ..Default::default()
        },
    );
    let region = f.inflight.as_ref().unwrap();
    assert!(
        region.size >= queue_region_size(256),
        "in-flight region of {} bytes",
        region.size
    );
    // 32 writes are kicked and the back-end dies while it runs them; 16 more are made
    // available while it is down.
    let write = |f: &mut Frontend, i: u64| {
        let buf = mem.alloc(256 * KIB, 4096);
        f.add(
            &mem,
            0,
            &Blk::Write {
                sector: i * 512,
                data: pattern(1000 + i, 256 * KIB as usize),
            },
            buf,
        )
    };
    let mut reqs: Vec<Pending> = (0..32).map(|i| write(&mut f, i)).collect();
    f.kick(0);
    first_completion(&f.queues[0], &mem);
    c.serve.kill9();
    let done_before = f.queues[0].used_idx(&mem);
    let heads_before: Vec<u32> = (0..done_before)
        .map(|i| f.queues[0].used_elem(&mem, i).0)
        .collect();
    reqs.extend((32..48).map(|i| write(&mut f, i)));
    eprintln!("{done_before} of 32 completed before SIGKILL; 48 made available in all");

    // The VMM reconnects to a new back-end with the same memory, region and rings, and
    // restarts the ring at its avail index as Cloud Hypervisor does (the back-end must take
    // its position from the in-flight region).
    c.serve.spawn();
    let mut g = c.connect();
    g.negotiate(&Setup {
        inflight: true,
        ..Default::default()
    });
    g.set_mem_table(&[mem.region()]).expect("SET_MEM_TABLE");
    g.inflight = f.inflight.take();
    g.resend_inflight();
    g.queues = std::mem::take(&mut f.queues);
    let base = match base {
        Base::AvailIdx => g.queues[0].avail_idx,
        Base::UsedIdx => g.queues[0].used_idx(&mem),
    };
    g.start_queue(&mem, 0, base);
    g.kick(0);
    // take_used panics on a head completed twice (it is no longer in flight).
    g.drain(&mem, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        g.queues[0].used_idx(&mem),
        48,
        "more completions than requests"
    );
    for p in &reqs {
        assert_eq!(
            mem.get(p.status, 1)[0],
            blk::S_OK,
            "status of head {}",
            p.head
        );
    }
    let lost: Vec<usize> = (0..48usize)
        .filter(|&i| {
            let i = i as u64;
            g.read(&mem, 0, i * 512, 256 * KIB as u32) != pattern(1000 + i, 256 * KIB as usize)
        })
        .collect();
    let before: Vec<usize> = heads_before
        .iter()
        .filter_map(|h| reqs.iter().position(|p| p.head as u32 == *h))
        .collect();
    let (judged, lost): (Vec<usize>, Vec<usize>) = match judge {
        Judge::Resubmitted => (
            (0..48).filter(|i| !before.contains(i)).collect(),
            lost.into_iter().filter(|i| !before.contains(i)).collect(),
        ),
        Judge::CompletedBefore => (
            before.clone(),
            lost.into_iter().filter(|i| before.contains(i)).collect(),
        ),
    };
    assert!(
        lost.is_empty(),
        "writes {lost:?} are not on the disk after the restart (of {judged:?}; writes \
         {before:?} had completed before the SIGKILL)"
    );
    if judge == Judge::CompletedBefore {
        assert!(!before.is_empty(), "no write completed before the SIGKILL");
    }
    g.close();
    c.serve.terminate_within(Duration::from_secs(2));
    common::assert_qemu_img_check_clean(&c.image, "after the restart");
}

/// An in-flight region made by hand: `num_queues` regions for `queue_size`, each with this
/// header (version, desc_num, last_batch_head, used_idx) and these in-flight heads (index,
/// counter).
fn crafted_region(
    num_queues: u16,
    queue_size: u16,
    header: (u16, u16, u16, u16),
    inflight: &[(u16, u64)],
) -> (std::fs::File, u64) {
    let each = queue_region_size(queue_size);
    let size = each * num_queues as u64;
    let mem = Memory::new(0, size);
    for q in 0..num_queues as u64 {
        let base = q * each;
        mem.put_u64(base, 0);
        mem.put_u16(base + 8, header.0);
        mem.put_u16(base + 10, header.1);
        mem.put_u16(base + 12, header.2);
        mem.put_u16(base + 14, header.3);
        for &(i, counter) in inflight {
            let d = base + 16 + 16 * i as u64;
            if d + 16 <= base + each {
                mem.put(d, &[1]);
                mem.put_u64(d + 8, counter);
            }
        }
    }
    (mem.file.try_clone().unwrap(), size)
}

/// Offers `region` (fd, size, num_queues, queue_size) to a fresh back-end, then starts a queue
/// of 256 entries whose rings hold nothing: a region that cannot be right must be refused at
/// SET_INFLIGHT_FD or when the queue starts, with an error in the log, and nothing of it
/// resubmitted; the process keeps serving.
fn refused_region(fd: &std::fs::File, size: u64, num_queues: u16, queue_size: u16) {
    let (mut c, mem, mut f) = Case::marked(&[], 16 * MIB);
    f.negotiate(&Setup {
        inflight: true,
        ..Default::default()
    });
    f.set_mem_table(&[mem.region()]).expect("SET_MEM_TABLE");
    let log_before = std::fs::read_to_string(&c.serve.log)
        .unwrap_or_default()
        .len();
    let set = f.set_inflight_fd(fd.as_raw_fd(), size, 0, num_queues, queue_size);
    let mut started = false;
    if set.is_ok() && !f.closed_by_peer() {
        f.queues
            .push(Ring::new(&mem, 0, 256, RingPlace::default(), true));
        let r = &f.queues[0];
        started = f.set_vring_num(0, 256).is_ok()
            && f.set_vring_base(0, 0).is_ok()
            && f.set_vring_addr(0, mem.va(r.desc), mem.va(r.used), mem.va(r.avail))
                .is_ok()
            && f.set_vring_call(0, r.call.as_raw_fd()).is_ok()
            && f.set_vring_kick(0, r.kick.as_raw_fd()).is_ok()
            && f.set_vring_enable(0, true).is_ok();
        if started {
            f.kick(0);
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(
                f.queues[0].used_idx(&mem),
                0,
                "the back-end completed requests that only a bad in-flight region names"
            );
        }
    }
    c.serve.assert_alive("after a bad in-flight region");
    let log = std::fs::read_to_string(&c.serve.log).unwrap_or_default();
    let new = log[log_before..].to_lowercase();
    assert!(
        new.contains("inflight") || new.contains("in-flight"),
        "no error about the in-flight region in the log (SET_INFLIGHT_FD {}, queue {})\n{}",
        if set.is_ok() { "accepted" } else { "refused" },
        if started { "started" } else { "not started" },
        c.serve.log_text()
    );
    c.after(f);
}

#[test]
fn inflight_region_smaller_than_its_queues_is_refused() {
    let (fd, size) = crafted_region(1, 256, (0, 0, 0, 0), &[]);
    refused_region(&fd, size / 2, 1, 256);
}

#[test]
fn inflight_region_larger_than_its_fd_is_refused() {
    let (fd, _) = crafted_region(1, 256, (0, 0, 0, 0), &[]);
    refused_region(&fd, 64 * MIB, 16, 256);
}

#[test]
fn inflight_region_for_more_queues_than_offered_is_refused() {
    let (fd, size) = crafted_region(65, 256, (0, 0, 0, 0), &[]);
    refused_region(&fd, size, 65, 256);
}

#[test]
fn inflight_region_from_another_queue_size_is_refused() {
    // Made for queues of 128 (desc_num 128) with three requests in flight; the queue is 256.
    let (fd, size) = crafted_region(1, 128, (1, 128, 0, 0), &[(0, 1), (3, 2), (6, 3)]);
    refused_region(&fd, size, 1, 128);
}

#[test]
fn inflight_region_with_an_unknown_version_is_refused() {
    let (fd, size) = crafted_region(1, 256, (7, 256, 0, 0), &[(0, 1), (3, 2)]);
    refused_region(&fd, size, 1, 256);
}

#[test]
fn inflight_region_with_nonsense_counters_is_refused() {
    // Every head in flight (more requests than a ring of 256 three-descriptor chains can hold)
    // with one counter, and a last batch head beyond the ring.
    let all: Vec<(u16, u64)> = (0..256).map(|i| (i, 5)).collect();
    let (fd, size) = crafted_region(1, 256, (1, 256, 9999, 3), &all);
    refused_region(&fd, size, 1, 256);
}

// ---------------------------------------------------------------------------------------------
// Queue size

#[test]
fn a_ring_of_1024_entries_works_by_default() {
    let (c, mem, mut f) = Case::marked(&[], 16 * MIB);
    f.start(
        &mem,
        &Setup {
            queue_size: 1024,
            ..Default::default()
        },
    );
    // 300 requests of three descriptors: more than 256 in flight at once.
    let reqs = f.reads(
        &mem,
        0,
        (0..300u64).map(|i| MARK_SECTOR + (i % 16) * 8),
        4096,
    );
    f.drain(&mem, 0);
    let mark = pattern(1, MARK_LEN);
    for (i, p) in reqs.iter().enumerate() {
        assert_eq!(mem.get(p.status, 1)[0], blk::S_OK);
        let at = (i % 16) * 4096;
        assert!(mem.get(p.data, 4096) == mark[at..at + 4096], "read {i}");
    }
    c.after(f);
}
