//! A hostile guest or a buggy VMM cannot make `serve` spin, hang, leak or die (issue 14).
//!
//! Each case runs against a fresh `serve` on a fresh VHDX, with the raw front-end of
//! tests/common/frontend.rs: a correct connection first writes a mark, a second connection
//! misbehaves in one precise way, and then every case asserts the same aftermath:
//! - the process is alive and no thread spins (CPU time of every thread sampled over a
//!   second, while the misbehaving front-end is still connected and after it left);
//! - a correct front-end connects, reads the mark back and writes and reads new data;
//! - SIGTERM ends the process with status 0 within 2 s;
//! - `qemu-img check` finds the image clean.
//!
//! The last tests connect and disconnect 1,000 times and compare the process's open fds,
//! threads and resident memory with those after the first cycles.

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::frontend::*;
use common::{s, Case, Serve, MARK_LEN, MARK_SECTOR};

/// The messages of [`Frontend::start`] for one ring, with any base, stopping at the first
/// refusal.
fn ring_up(f: &Frontend, mem: &Memory, r: &Ring, base: u32) -> Result<(), Refused> {
    f.set_vring_num(r.index, r.size as u32)?;
    f.set_vring_base(r.index, base)?;
    f.set_vring_addr(r.index, mem.va(r.desc), mem.va(r.used), mem.va(r.avail))?;
    f.set_vring_call(r.index, r.call.as_raw_fd())?;
    f.set_vring_kick(r.index, r.kick.as_raw_fd())?;
    f.set_vring_enable(r.index, true)
}

// ---------------------------------------------------------------------------------------------
// The raw front-end itself, behaving

/// Every request type through the raw front-end, on 4 queues, with and without EVENT_IDX:
/// what the misbehaving cases rely on works against the device.
#[test]
fn the_raw_frontend_behaving_is_served() {
    for event_idx in [true, false] {
        let mut c = Case::start(&["--serial", "raw-frontend"]);
        let mem = Memory::new(0, 16 * MIB);
        let mut f = c.connect();
        f.start(
            &mem,
            &Setup {
                queues: 4,
                event_idx,
                ..Default::default()
            },
        );
        assert_eq!(
            f.features & feat::RING_EVENT_IDX != 0,
            event_idx,
            "EVENT_IDX negotiation"
        );
        let config = f.get_config(0, 8).expect("GET_CONFIG");
        assert_eq!(
            u64::from_le_bytes(config[..8].try_into().unwrap()),
            64 * MIB / 512
        );
        for q in 0..4 {
            let data = pattern(10 + q as u64, 8192);
            let sector = 100 + 64 * q as u64;
            f.write(&mem, q, sector, &data);
            assert!(f.read(&mem, q, sector, 8192) == data, "queue {q}");
            assert_eq!(f.request(&mem, q, &Blk::Flush), blk::S_OK);
            assert_eq!(
                f.request(
                    &mem,
                    q,
                    &Blk::WriteZeroes {
                        sector,
                        sectors: 8,
                        unmap: false
                    }
                ),
                blk::S_OK
            );
            assert!(f.read(&mem, q, sector, 4096) == vec![0; 4096]);
            assert!(f.read(&mem, q, sector + 8, 4096) == data[4096..]);
            assert_eq!(
                f.request(
                    &mem,
                    q,
                    &Blk::Discard {
                        sector: 4096,
                        sectors: 2048
                    }
                ),
                blk::S_OK
            );
            assert_eq!(f.request(&mem, q, &Blk::GetId), blk::S_OK);
            let id = mem.get(f.queues[q].scratch, 20);
            assert_eq!(&id[..12], b"raw-frontend");
        }
        // Many in flight at once on one queue.
        let reqs = f.reads(&mem, 0, (0..80u64).map(|i| 100 + (i % 16) * 8), 4096);
        f.drain(&mem, 0);
        assert!(reqs.iter().all(|p| mem.get(p.status, 1)[0] == blk::S_OK));
        f.close();
        c.serve.terminate_within(Duration::from_secs(2));
        common::assert_qemu_img_check_clean(&c.image, "after the raw front-end");
    }
}

// ---------------------------------------------------------------------------------------------
// Guest-controlled

#[test]
fn avail_idx_jump_beyond_queue_size_with_event_idx() {
    let (c, mem, mut f) = Case::marked(&[], 16 * MIB);
    f.start(&mem, &Setup::default());
    f.read(&mem, 0, 0, 4096);
    let r = &f.queues[0];
    mem.put_u16(r.avail + 2, r.avail_idx.wrapping_add(1000));
    f.kick(0);
    std::thread::sleep(Duration::from_millis(100));
    c.after(f);
}

/// A read whose buffer is one of the queue's own rings: the device overwrites the ring with
/// disk data (the mark).
fn data_overlaps_ring(used: bool) {
    let (c, mem, mut f) = Case::marked(&[], 16 * MIB);
    f.start(&mem, &Setup::default());
    let r = &f.queues[0];
    let target = if used { r.used } else { r.avail };
    f.submit(
        &mem,
        0,
        &Blk::Read {
            sector: MARK_SECTOR,
            len: 4096,
        },
        target,
    );
    std::thread::sleep(Duration::from_millis(200));
    c.after(f);
}

#[test]
fn data_buffer_overlaps_the_avail_ring() {
    data_overlaps_ring(false);
}

#[test]
fn data_buffer_overlaps_the_used_ring() {
    data_overlaps_ring(true);
}

// ---------------------------------------------------------------------------------------------
// VMM-controlled: ring setup

#[test]
fn set_vring_base_beyond_the_ring() {
    let (c, mem, mut f) = Case::marked(&[], 16 * MIB);
    f.negotiate(&Setup::default());
    f.set_mem_table(&[mem.region()]).unwrap();
    let r = Ring::new(&mem, 0, 256, RingPlace::default(), true);
    let up = ring_up(&f, &mem, &r, 70000);
    f.queues.push(r);
    if up.is_ok() {
        // Accepted: the queue must not spin on it, whatever it does with the requests.
        let scratch = f.queues[0].scratch;
        f.submit(
            &mem,
            0,
            &Blk::Read {
                sector: 0,
                len: 512,
            },
            scratch,
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.after(f);
}

#[test]
fn ring_at_guest_physical_address_zero_is_served() {
    let (c, mem, mut f) = Case::marked(&[], 16 * MIB);
    f.start(
        &mem,
        &Setup {
            place0: RingPlace {
                desc: Some(0),
                avail: Some(0x1000),
                used: Some(0x2000),
            },
            ..Default::default()
        },
    );
    assert_eq!(f.queues[0].desc, 0);
    assert!(
        f.read(&mem, 0, MARK_SECTOR, 4096) == pattern(1, MARK_LEN)[..4096],
        "a ring at guest address 0 read the wrong data"
    );
    f.write(&mem, 0, 16384, &pattern(3, 4096));
    assert!(f.read(&mem, 0, 16384, 4096) == pattern(3, 4096));
    c.after(f);
}

#[test]
fn set_vring_num_not_a_power_of_two_is_refused_or_used() {
    let (c, mem, mut f) = Case::marked(&[], 16 * MIB);
    f.negotiate(&Setup::default());
    f.set_mem_table(&[mem.region()]).unwrap();
    // The used ring gets room for 256 entries so that a device still using 256 writes
    // avail_event over the canary (inside our memory), not over something else.
    let used = mem.alloc(8 * 256 + 64, 4096);
    let canary = used + 4 + 8 * 256;
    mem.put_u16(canary, 0xA5A5);
    let r = Ring::new(
        &mem,
        0,
        100,
        RingPlace {
            used: Some(used),
            ..Default::default()
        },
        true,
    );
    let up = ring_up(&f, &mem, &r, 0);
    f.queues.push(r);
    match up {
        Err(e) => eprintln!("SET_VRING_NUM 100 refused ({e:?}): fine"),
        Ok(()) => {
            // Accepted: the device must use 100 entries. 150 requests go round the ring.
            for i in 0..150u64 {
                let got = f.read(&mem, 0, MARK_SECTOR + (i % 8), 512);
                assert_eq!(got.len(), 512);
            }
            assert_eq!(
                mem.get_u16(canary),
                0xA5A5,
                "SET_VRING_NUM 100 was acked but the device wrote avail_event as for 256 entries"
            );
        }
    }
    c.after(f);
}

// ---------------------------------------------------------------------------------------------
// VMM-controlled: memory

#[test]
fn memory_region_larger_than_its_memfd_is_refused() {
    let (mut c, mem, mut f) = Case::marked(&[], 16 * MIB);
    f.negotiate(&Setup::default());
    let mut region = mem.region();
    region.size = 32 * MIB;
    let accepted = f.set_mem_table(&[region]).is_ok();
    if accepted {
        // Accepted: a request whose header is in the missing half must not kill the process.
        let r = Ring::new(&mem, 0, 256, RingPlace::default(), true);
        let up = ring_up(&f, &mem, &r, 0);
        f.queues.push(r);
        if up.is_ok() {
            let status = f.queues[0].status_of(0);
            f.queues[0].add(&mem, &[rd(24 * MIB, 16), wr(status, 1)]);
            f.kick(0);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    c.serve
        .assert_alive("after a request in the part of a region beyond its memfd");
    assert!(
        !accepted,
        "SET_MEM_TABLE of 32 MiB on a 16 MiB memfd was accepted"
    );
    c.after(f);
}

/// What sits in the part of guest memory that disappears when the memfd shrinks.
#[derive(Clone, Copy, PartialEq)]
enum Missing {
    Header,
    Status,
    UsedRing,
    DataBuffer,
}

/// 16 MiB of guest memory, shrunk to 8 MiB after SET_MEM_TABLE; `what` is at 12 MiB.
fn truncated_memfd(what: Missing) {
    const GONE: u64 = 12 * MIB;
    let (mut c, mem, mut f) = Case::marked(&[], 16 * MIB);
    let place0 = if what == Missing::UsedRing {
        RingPlace {
            used: Some(GONE),
            ..Default::default()
        }
    } else {
        RingPlace::default()
    };
    f.start(
        &mem,
        &Setup {
            place0,
            ..Default::default()
        },
    );
    mem.file.set_len(8 * MIB).unwrap();
    // From here on this process must not touch guest memory above 8 MiB either.
    let ring_hdr = f.queues[0].hdr_of(0);
    let status = f.queues[0].status_of(0);
    let data = f.queues[0].scratch;
    mem.put_u32(ring_hdr, blk::OUT);
    mem.put_u32(ring_hdr + 4, 0);
    mem.put_u64(ring_hdr + 8, 4096);
    mem.put(status, &[0xAA]);
    match what {
        Missing::Header => {
            f.queues[0].add(&mem, &[rd(GONE, 16), rd(data, 4096), wr(status, 1)]);
        }
        Missing::Status => {
            f.queues[0].add(&mem, &[rd(ring_hdr, 16), rd(data, 4096), wr(GONE, 1)]);
        }
        Missing::UsedRing => {
            f.queues[0].add(&mem, &[rd(ring_hdr, 16), rd(data, 4096), wr(status, 1)]);
        }
        Missing::DataBuffer => {
            f.queues[0].add(&mem, &[rd(ring_hdr, 16), rd(GONE, 4096), wr(status, 1)]);
        }
    }
    f.kick(0);
    std::thread::sleep(Duration::from_millis(300));
    c.serve
        .assert_alive("after a request in the part of guest memory cut off its memfd");
    if what == Missing::DataBuffer {
        let (head, _) = f.wait(&mem, 0);
        assert_eq!(head, 0);
        assert_eq!(
            mem.get(status, 1)[0],
            blk::S_IOERR,
            "a write from a buffer that faults must fail with IOERR"
        );
        // A bad guest buffer is the request's failure, not the disk's: later writes work.
        f.write(&mem, 0, 4096, &pattern(4, 4096));
        assert!(f.read(&mem, 0, 4096, 4096) == pattern(4, 4096));
    }
    c.after(f);
}

#[test]
fn truncated_memfd_request_header() {
    truncated_memfd(Missing::Header);
}

#[test]
fn truncated_memfd_status_byte() {
    truncated_memfd(Missing::Status);
}

#[test]
fn truncated_memfd_used_ring() {
    truncated_memfd(Missing::UsedRing);
}

#[test]
fn truncated_memfd_data_buffer_fails_the_request_not_the_image() {
    truncated_memfd(Missing::DataBuffer);
}

/// The queue is sized, given its eventfds, enabled and kicked before there is any memory; then
/// come the memory table, GET_VRING_BASE (stop) and the whole ring setup in QEMU's order. The
/// queue must serve.
#[test]
fn kicks_before_set_mem_table_on_a_second_connection() {
    let (c, mem, mut f) = Case::marked(&[], 16 * MIB);
    f.negotiate(&Setup::default());
    let r = Ring::new(&mem, 0, 256, RingPlace::default(), true);
    f.set_vring_num(0, 256).unwrap();
    f.set_vring_call(0, r.call.as_raw_fd()).unwrap();
    f.set_vring_kick(0, r.kick.as_raw_fd()).unwrap();
    f.set_vring_enable(0, true).unwrap();
    r.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    r.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    f.set_mem_table(&[mem.region()]).unwrap();
    // Stop the ring as QEMU does before it sets a ring up again, then set it up in full.
    f.get_vring_base(0).expect("GET_VRING_BASE");
    f.queues.push(r);
    f.start_queue(&mem, 0, 0);
    assert!(
        f.read(&mem, 0, MARK_SECTOR, MARK_LEN as u32) == pattern(1, MARK_LEN),
        "the mark does not read back on a queue kicked before SET_MEM_TABLE"
    );
    c.after(f);
}

/// `n` regions of 2 MiB, consecutive slices of `mem`'s memfd.
fn slices(mem: &Memory, n: usize, each: u64) -> Vec<Region> {
    (0..n as u64)
        .map(|i| Region {
            gpa: mem.gpa + i * each,
            size: each,
            va: mem.va(mem.gpa + i * each),
            offset: i * each,
            fd: mem.file.as_raw_fd(),
        })
        .collect()
}

/// After a refusal the connection is either closed or still usable: if it is open, a correct
/// memory table and queue on it must serve.
fn still_usable(f: &mut Frontend, mem: &Memory) {
    if f.closed_by_peer() {
        return;
    }
    if f.set_mem_table(&[mem.region()]).is_err() {
        return;
    }
    let r = Ring::new(mem, 0, 256, RingPlace::default(), true);
    f.queues.push(r);
    f.start_queue(mem, 0, 0);
    assert!(f.read(mem, 0, MARK_SECTOR, 4096) == pattern(1, MARK_LEN)[..4096]);
}

#[test]
fn nine_regions_in_set_mem_table_are_refused() {
    let (mut c, mem, mut f) = Case::marked(&[], 32 * MIB);
    f.negotiate(&Setup::default());
    let r = f.set_mem_table(&slices(&mem, 9, 2 * MIB));
    c.serve.assert_alive("after SET_MEM_TABLE with 9 regions");
    assert!(
        r.is_err(),
        "SET_MEM_TABLE with 9 regions (the spec allows 8) was accepted"
    );
    still_usable(&mut f, &mem);
    c.after(f);
}

#[test]
fn add_mem_reg_beyond_the_advertised_slots_is_refused() {
    let mut c = Case::start(&[]);
    c.write_mark();
    let mut f = c.connect();
    f.negotiate(&Setup::default());
    let slots = f.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS") as usize;
    assert!((1..=1024).contains(&slots), "{slots} memory slots");
    let each = 64 * KIB;
    let mem = Memory::new(0, (slots as u64 + 1) * each);
    let regions = slices(&mem, slots + 1, each);
    for (i, r) in regions[..slots].iter().enumerate() {
        f.add_mem_reg(r)
            .unwrap_or_else(|e| panic!("ADD_MEM_REG {i} of {slots} refused: {e:?}"));
    }
    let extra = f.add_mem_reg(&regions[slots]);
    c.serve.assert_alive("after ADD_MEM_REG beyond the slots");
    assert!(
        extra.is_err(),
        "ADD_MEM_REG number {} accepted with {slots} slots advertised",
        slots + 1
    );
    c.after(f);
}

// ---------------------------------------------------------------------------------------------
// SIGTERM on an inherited abstract socket

#[test]
fn sigterm_while_waiting_on_an_abstract_fd_socket() {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    use std::os::unix::process::CommandExt;

    let dir = common::tempdir("hostile-vmm-");
    let image = dir.path().join("disk.vhdx");
    common::ours_ok(&["create", "-q", s(&image), "64M"]);
    let name = format!("vhost-user-vhdx-test-{}", std::process::id());
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        sock.as_raw_fd(),
        &UnixAddr::new_abstract(name.as_bytes()).unwrap(),
    )
    .unwrap();
    listen(&sock, Backlog::new(4).unwrap()).unwrap();
    let fd = sock.as_raw_fd();
    let log = dir.path().join("serve.log");
    let mut cmd = Command::new(common::serve_bin());
    cmd.arg("serve")
        .args(common::env_args())
        .args(["--fd", &fd.to_string(), s(&image)])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: between fork and exec only fcntl runs (async-signal-safe); it lets the
    // listening socket (and nothing else) be inherited.
    unsafe {
        cmd.pre_exec(move || {
            nix::fcntl::fcntl(
                std::os::fd::BorrowedFd::borrow_raw(fd),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map(|_| ())
            .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().expect("starting serve --fd");
    let mut child = common::KillOnDrop(child);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "serve --fd exited early:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = common::wait_or_kill(&mut child.0, Duration::from_secs(2));
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("serve on an abstract --fd socket did not exit within 2 s of SIGTERM\n{log_text}")
    });
    assert!(status.success(), "serve exited with {status}\n{log_text}");
    common::assert_qemu_img_check_clean(&image, "after SIGTERM");
}

// ---------------------------------------------------------------------------------------------
// 1,000 connections

/// One connection of kind `kind % 3`: a bare connect and close; negotiation and a memory
/// table; all 16 queues started with one request each.
fn cycle(socket: &Path, kind: usize) {
    let mut f = Frontend::connect(socket);
    match kind % 3 {
        0 => {}
        1 => {
            let mem = Memory::new(0, 4 * MIB);
            f.negotiate(&Setup::default());
            f.set_mem_table(&[mem.region()]).unwrap();
        }
        _ => {
            let mem = Memory::new(0, 16 * MIB);
            f.start(
                &mem,
                &Setup {
                    queues: 16,
                    queue_size: 64,
                    ..Default::default()
                },
            );
            for q in 0..16 {
                let scratch = f.queues[q].scratch;
                f.submit(
                    &mem,
                    q,
                    &Blk::Read {
                        sector: q as u64 * 8,
                        len: 4096,
                    },
                    scratch,
                );
            }
            for q in 0..16 {
                f.wait(&mem, q);
            }
        }
    }
    f.close();
}

/// The footprint once it has stopped changing (threads of a closed connection may take a
/// moment to go).
fn settled(serve: &Serve, want: Option<common::Footprint>) -> common::Footprint {
    let mut last = serve.footprint();
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(50));
        let now = serve.footprint();
        let same = now.fds == last.fds && now.threads == last.threads;
        let matches = want.is_none_or(|w| now.fds == w.fds && now.threads == w.threads);
        if same && matches {
            return now;
        }
        last = now;
    }
    last
}

#[test]
fn a_thousand_connections_leak_no_fd_thread_or_memory() {
    let mut c = Case::start(&["--num-queues", "16"]);
    c.write_mark();
    for kind in 0..3 {
        cycle(&c.serve.socket, kind);
    }
    // A fourth cycle of the heaviest kind: lazily made things (thread pools, caches) exist
    // by now.
    cycle(&c.serve.socket, 2);
    let first = settled(&c.serve, None);
    for i in 0..1000 {
        cycle(&c.serve.socket, i);
        if i % 100 == 99 {
            c.serve
                .assert_alive(&format!("after {} connections", i + 1));
        }
    }
    let last = settled(&c.serve, Some(first));
    eprintln!("after the first cycles: {first:?}; after 1,000 more: {last:?}");
    assert_eq!(last.fds, first.fds, "open fds grew over 1,000 connections");
    assert_eq!(
        last.threads, first.threads,
        "threads grew over 1,000 connections"
    );
    assert!(
        last.rss_kib <= first.rss_kib + 4096,
        "resident memory grew from {} KiB to {} KiB over 1,000 connections",
        first.rss_kib,
        last.rss_kib
    );
    c.aftermath();
}
