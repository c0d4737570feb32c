//! A vhost-user-blk load generator on the `blkio` crate (a real vhost-user client, no VM), so
//! that a benchmark measures nothing but the backend. Used by contrib/bench/run.sh.
//!
//!   blk_bench --socket SOCK --job randread|randwrite|read|write [--bs 4k] [--qd 32]
//!             [--queues 1] [--seconds 5] [--region BYTES] [--offset BYTES]
//!             [--flush-every N] [--idle SECONDS] [--mem memfd|hugetlb]
//!
//! Prints one JSON object: iops, MB/s, p50/p99 latency in microseconds, bytes moved.
//! `--idle S`: after the job, stays connected doing nothing for S seconds before it prints and
//! leaves (for measuring what an idle, connected backend uses).
//! `--mem hugetlb`: the request buffers live in 2 MiB huge pages (reserve them first:
//! /proc/sys/vm/nr_hugepages), as a VM's RAM often does. With the default, a memfd of 4 KiB
//! pages, how physically contiguous a buffer is depends on what the kernel's free
//! lists held when the buffers were first touched; that decides whether a 1 MiB O_DIRECT read
//! reaches the disk whole (the disk takes at most 254 segments per request), and it moved cold
//! 1 MiB figures by ±30 % from run to run (README, "Cold").

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, ReqFlags};

struct Args {
    socket: String,
    job: String,
    bs: u64,
    qd: usize,
    queues: usize,
    seconds: f64,
    region: u64,
    offset: u64,
    flush_every: u64,
    idle: f64,
    hugetlb: bool,
}

fn size(s: &str) -> u64 {
    vhost_user_vhdx::cli::options::parse_size(s).unwrap_or_else(|e| panic!("{e}"))
}

fn args() -> Args {
    let mut a = Args {
        socket: String::new(),
        job: "randread".into(),
        bs: 4096,
        qd: 32,
        queues: 1,
        seconds: 5.0,
        region: 0,
        offset: 0,
        flush_every: 0,
        idle: 0.0,
        hugetlb: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--socket" => a.socket = v,
            "--job" => a.job = v,
            "--bs" => a.bs = size(&v),
            "--qd" => a.qd = v.parse().unwrap(),
            "--queues" => a.queues = v.parse().unwrap(),
            "--seconds" => a.seconds = v.parse().unwrap(),
            "--region" => a.region = size(&v),
            "--offset" => a.offset = size(&v),
            "--flush-every" => a.flush_every = v.parse().unwrap(),
            "--idle" => a.idle = v.parse().unwrap(),
            "--mem" => {
                a.hugetlb = match v.as_str() {
                    "hugetlb" => true,
                    "memfd" => false,
                    _ => panic!("--mem is memfd or hugetlb"),
                }
            }
            other => panic!("unknown option {other}"),
        }
    }
    a
}

/// A shared memfd mapping of `len` bytes (rounded up to the page size: 2 MiB with `hugetlb`)
/// for the request buffers, described for `map_mem_region` (the vhost-user backend maps the
/// same fd). It is never unmapped: it lives as long as the process.
fn buffer_region(len: usize, hugetlb: bool) -> blkio::MemoryRegion {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use nix::sys::mman::{mmap, MapFlags, ProtFlags};
    use std::os::fd::IntoRawFd;
    let (page, flags) = if hugetlb {
        (2 << 20, MFdFlags::MFD_HUGETLB)
    } else {
        (4096, MFdFlags::empty())
    };
    let len = len.div_ceil(page) * page;
    let fd = memfd_create("blk_bench-buf", flags)
        .unwrap_or_else(|e| panic!("memfd_create({flags:?}): {e}"));
    nix::unistd::ftruncate(&fd, len as i64).expect("ftruncate the buffers' memfd");
    // SAFETY: a new shared mapping of a file we own; nothing else refers to that address range.
    let addr = unsafe {
        mmap(
            None,
            std::num::NonZeroUsize::new(len).expect("a non-empty buffer"),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            &fd,
            0,
        )
    }
    .unwrap_or_else(|e| {
        panic!("mmap {len} bytes (huge pages: reserve them in /proc/sys/vm/nr_hugepages): {e}")
    });
    blkio::MemoryRegion {
        addr: addr.as_ptr() as usize,
        iova: 0,
        len,
        fd: fd.into_raw_fd(),
        fd_offset: 0,
        flags: 0,
    }
}

struct QueueResult {
    ops: u64,
    latencies_us: Vec<u32>,
}

fn main() {
    let a = args();
    let per_queue = a.qd * a.bs as usize;
    let len = per_queue * a.queues;
    // The buffers are allocated and touched before the client connects, as a guest's RAM is
    // populated long before its I/O, and so that nothing the backend does while it sets up the
    // connection (its own allocations and frees) decides which page frames they get.
    let mem = buffer_region(len, a.hugetlb);
    // SAFETY: the region is mapped for at least `per_queue * queues` bytes and stays mapped
    // until the process exits; each queue's thread uses its own disjoint slice of it.
    let base = mem.addr as *mut u8;
    for i in 0..len {
        // SAFETY: inside the region (see above).
        unsafe { *base.add(i) = (i % 251) as u8 };
    }
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
    b.set_str("path", &a.socket).expect("path");
    b.connect().expect("connect");
    b.set_i32("num-queues", a.queues as i32)
        .expect("num-queues");
    let outcome = b.start().expect("start");
    let capacity = b.get_u64("capacity").expect("capacity");
    let region = if a.region == 0 {
        capacity - a.offset
    } else {
        a.region
    };
    b.map_mem_region(&mem).expect("map_mem_region");
    let deadline = Duration::from_secs_f64(a.seconds);
    let random = a.job.starts_with("rand");
    let write = a.job.ends_with("write");
    let blocks = region / a.bs;
    let started = Instant::now();
    let results: Vec<QueueResult> = std::thread::scope(|s| {
        let handles: Vec<_> = outcome
            .queues
            .into_iter()
            .enumerate()
            .map(|(qi, mut q)| {
                let bufs = base as usize + qi * per_queue;
                let a = &a;
                s.spawn(move || {
                    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (qi as u64 + 1);
                    let mut next_seq = (qi as u64 * blocks / a.queues as u64) % blocks.max(1);
                    let mut pick = || {
                        if random {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            a.offset + (rng % blocks) * a.bs
                        } else {
                            let o = a.offset + next_seq * a.bs;
                            next_seq = (next_seq + 1) % blocks;
                            o
                        }
                    };
                    let mut submitted_at = vec![Instant::now(); a.qd];
                    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
                        let buf = (bufs + slot * a.bs as usize) as *mut u8;
                        if write {
                            q.write(off, buf, a.bs as usize, slot, ReqFlags::empty());
                        } else {
                            q.read(off, buf, a.bs as usize, slot, ReqFlags::empty());
                        }
                    };
                    for (slot, at) in submitted_at.iter_mut().enumerate() {
                        *at = Instant::now();
                        submit(&mut q, slot, pick());
                    }
                    let mut res = QueueResult {
                        ops: 0,
                        latencies_us: Vec::with_capacity(1 << 20),
                    };
                    let mut completions: Vec<MaybeUninit<blkio::Completion>> =
                        (0..a.qd + 1).map(|_| MaybeUninit::uninit()).collect();
                    let mut since_flush = 0u64;
                    loop {
                        let n = q.do_io(&mut completions, 1, None, None).expect("do_io");
                        let now = Instant::now();
                        let done = now.duration_since(started) >= deadline;
                        for c in &completions[..n] {
                            // SAFETY: do_io initialised the first `n` completions.
                            let c = unsafe { c.assume_init_read() };
                            assert!(c.ret == 0, "request failed: {}", c.ret);
                            if c.user_data == usize::MAX {
                                continue; // a flush
                            }
                            let slot = c.user_data;
                            res.latencies_us
                                .push(now.duration_since(submitted_at[slot]).as_micros() as u32);
                            res.ops += 1;
                            if !done {
                                since_flush += 1;
                                if a.flush_every > 0 && since_flush >= a.flush_every {
                                    since_flush = 0;
                                    q.flush(usize::MAX, ReqFlags::empty());
                                }
                                submitted_at[slot] = Instant::now();
                                submit(&mut q, slot, pick());
                            }
                        }
                        if done {
                            // Drain what is still in flight, uncounted.
                            let mut left = a.qd;
                            while left > 0 {
                                let n = q
                                    .do_io(
                                        &mut completions,
                                        0,
                                        Some(&mut Duration::from_millis(200)),
                                        None,
                                    )
                                    .unwrap_or(0);
                                if n == 0 {
                                    break;
                                }
                                left = left.saturating_sub(n);
                            }
                            break;
                        }
                    }
                    res
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs_f64(a.idle));
    let ops: u64 = results.iter().map(|r| r.ops).sum();
    let mut lat: Vec<u32> = results.into_iter().flat_map(|r| r.latencies_us).collect();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let bytes = ops * a.bs;
    println!(
        "{{\"job\":\"{}\",\"bs\":{},\"qd\":{},\"queues\":{},\"seconds\":{secs:.3},\"ops\":{ops},\"iops\":{:.0},\"mbps\":{:.1},\"p50_us\":{},\"p99_us\":{},\"bytes\":{bytes}}}",
        a.job,
        a.bs,
        a.qd,
        a.queues,
        ops as f64 / secs,
        bytes as f64 / secs / 1e6,
        pct(0.50),
        pct(0.99)
    );
}
