//! Adaptive polling (`--poll-us`), driven by the raw front-end of tests/common/frontend.rs
//! against the built `serve`:
//! - no kick is lost: a driver that kicks only when the device asks for kicks (EVENT_IDX
//!   `avail_event`, or no `VRING_USED_F_NO_NOTIFY` without it), as Linux's virtio driver
//!   does, makes requests available at every distance from the end of the device's last batch
//!   (inside the polling window, at its edge, long after it) and each one completes; a device
//!   that went to sleep with kicks still suppressed would leave one waiting for ever;
//! - polling off (`--poll-us 0`) serves the same driver the same way;
//! - an idle device uses no CPU: once the driver stops, connected, every thread of `serve`
//!   stays asleep (its utime + stime do not move), even with the largest window.
//!
//! The asynchronous paths are covered when `VHDX_SERVE_ARGS` does not choose one: each case
//! runs without `--aio`, with `--aio io_uring` and with `--aio threads`.

mod common;

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use common::frontend::*;
use common::{env_args, thread_cpu, Case, MARK_LEN, MARK_SECTOR};

/// The `--aio` settings to run each case with (only the environment's, if it names one).
fn aio_variants() -> Vec<Vec<&'static str>> {
    if env_args().iter().any(|a| a.starts_with("--aio")) {
        return vec![vec![]];
    }
    vec![vec![], vec!["--aio", "io_uring"], vec!["--aio", "threads"]]
}

/// Whether the driver must kick after moving the avail index from `old` to `new`: virtio 1.2
/// §2.7.10 (EVENT_IDX: the device's `avail_event` lies in `[old, new)`), else the used ring's
/// NO_NOTIFY flag.
fn must_kick(ring: &Ring, mem: &Memory, old: u16, new: u16) -> bool {
    // The avail index is published before the device's wish is read (the other half of the
    // device's "enable, fence, look again").
    fence(Ordering::SeqCst);
    if ring.event_idx {
        let avail_event = mem.get_u16(ring.used + 4 + 8 * u64::from(ring.size));
        new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
    } else {
        mem.get_u16(ring.used) & 1 == 0
    }
}

/// Waits for the next completion, spinning first (so that the next request can follow the
/// completion within the device's polling window), then sleeping a little; panics after the
/// front-end's timeout: the request was lost.
fn wait_one(f: &mut Frontend, mem: &Memory, what: &str) -> (u16, u32) {
    let start = Instant::now();
    loop {
        if let Some(u) = f.queues[0].take_used(mem) {
            return u;
        }
        let waited = start.elapsed();
        assert!(
            waited < TIMEOUT,
            "{what}: no completion after {waited:?}: the device slept with kicks suppressed"
        );
        if waited < Duration::from_millis(2) {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Spins (short) or sleeps (long) for `d`.
fn pause(d: Duration) {
    if d >= Duration::from_millis(1) {
        std::thread::sleep(d);
        return;
    }
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Gaps between a completion (or the previous request) and the next request: none, inside a
/// window, around the default window's edge, past the largest window.
const GAPS_US: [u64; 9] = [0, 1, 3, 10, 30, 35, 70, 300, 2000];

/// Reads of the mark, made available by a driver that honours the device's wish for kicks,
/// one at a time and in small batches whose requests arrive apart; each must complete with
/// the right data.
fn honouring_driver(extra: &[&str], event_idx: bool) {
    let (c, mem, mut f) = Case::marked(extra, 16 * MIB);
    f.start(
        &mem,
        &Setup {
            event_idx,
            ..Setup::default()
        },
    );
    let want = pattern(1, MARK_LEN);
    let buf = mem.alloc(4096, 4096);
    let mut kicks = 0usize;
    let mut quiet = 0usize;
    let mut add = |f: &mut Frontend, n: u64| {
        let old = f.queues[0].avail_idx;
        let sector = MARK_SECTOR + (n % 16) * 8;
        let p = f.add(&mem, 0, &Blk::Read { sector, len: 4096 }, buf);
        if must_kick(&f.queues[0], &mem, old, f.queues[0].avail_idx) {
            f.kick(0);
            kicks += 1;
        } else {
            quiet += 1;
        }
        (p, sector)
    };
    let what = format!("{extra:?}, event_idx {event_idx}");
    let mut n = 0u64;
    for round in 0..4 {
        for (i, &gap) in GAPS_US.iter().enumerate() {
            // One at a time: the request follows the last completion after `gap`.
            pause(Duration::from_micros(gap));
            let (p, sector) = add(&mut f, n);
            n += 1;
            let (head, _) = wait_one(&mut f, &mem, &format!("{what}: single, gap {gap} us"));
            assert_eq!(head, p.head);
            assert_eq!(mem.get(p.status, 1)[0], blk::S_OK, "{what}: status");
            let at = ((sector - MARK_SECTOR) * 512) as usize;
            assert!(
                mem.get(buf, 4096) == want[at..at + 4096],
                "{what}: read at sector {sector} returned other data"
            );
            // A batch of three whose members arrive `gap` apart, while the device serves,
            // polls or sleeps; one buffer for all (reads of the same bytes).
            let batch = 1 + (round + i) % 3;
            for _ in 0..batch {
                add(&mut f, 0);
                pause(Duration::from_micros(gap));
            }
            for _ in 0..batch {
                wait_one(&mut f, &mem, &format!("{what}: batch, gap {gap} us"));
            }
            assert!(mem.get(buf, 4096) == want[..4096], "{what}: batch data");
        }
    }
    assert_eq!(f.queues[0].in_flight(), 0);
    // The device asked for at least the first kick (it was asleep); the rest depends on
    // timing, so it is reported, not asserted.
    assert!(kicks >= 1, "{what}: the device never asked for a kick");
    eprintln!("{what}: {kicks} kicks, {quiet} requests without one");
    c.after(f);
}

#[test]
fn no_kick_is_lost_with_polling() {
    for aio in aio_variants() {
        for event_idx in [true, false] {
            let mut extra = aio.clone();
            extra.extend(["--poll-us", "50"]);
            honouring_driver(&extra, event_idx);
        }
    }
}

#[test]
fn no_kick_is_lost_with_the_default_window() {
    for aio in aio_variants() {
        honouring_driver(&aio, true);
    }
}

#[test]
fn polling_off_serves_the_same_driver() {
    for aio in aio_variants() {
        for event_idx in [true, false] {
            let mut extra = aio.clone();
            extra.extend(["--poll-us", "0"]);
            honouring_driver(&extra, event_idx);
        }
    }
}

/// utime + stime of every thread of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    thread_cpu(pid).values().map(|(_, t)| t).sum()
}

#[test]
fn an_idle_connected_device_uses_no_cpu_after_activity() {
    for aio in aio_variants() {
        // The largest window there is: the worst case for a device that stops being used.
        let mut extra = aio.clone();
        extra.extend(["--poll-us", "1000000"]);
        let (mut c, mem, mut f) = Case::marked(&extra, 16 * MIB);
        f.start(&mem, &Setup::default());
        let buf = mem.alloc(4096, 4096);
        // Activity that grows the window: back-to-back reads, each following the last
        // completion at once.
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut served = 0;
        while Instant::now() < deadline {
            f.submit(
                &mem,
                0,
                &Blk::Read {
                    sector: MARK_SECTOR,
                    len: 4096,
                },
                buf,
            );
            wait_one(&mut f, &mem, "activity");
            served += 1;
        }
        assert!(served > 0);
        // The last window (at most 1 s) runs out; then nothing may run, connected or not.
        std::thread::sleep(Duration::from_millis(1500));
        let pid = c.serve.pid();
        let before = cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(3));
        let used = cpu_ticks(pid) - before;
        // A tick is 10 ms: one is allowed for a stray timer (an idle I/O worker's exit).
        assert!(
            used <= 1,
            "{extra:?}: serve used {used} ticks of CPU in 3 s while connected and idle\n{}",
            c.serve.log_text()
        );
        c.serve.assert_alive("idle");
        c.after(f);
    }
}
