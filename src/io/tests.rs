//! The same tests for both implementations.

use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::*;

fn both(depth: usize) -> Vec<Box<dyn AsyncIo>> {
    vec![
        Box::new(uring::UringIo::new(depth).expect("io_uring works on the test machine")),
        Box::new(threads::ThreadPoolIo::new(depth).unwrap()),
    ]
}

fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

fn op(kind: OpKind, fd: RawFd, offset: u64, bufs: &mut [&mut [u8]]) -> Op {
    Op {
        kind,
        fd,
        offset,
        bufs: bufs.iter_mut().map(|b| iov(b)).collect(),
    }
}

fn wait_all(io: &mut dyn AsyncIo, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    while out.len() < n {
        io.wait(&mut out).unwrap();
    }
    out
}

fn scratch_file(len: usize) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i / 4096) as u8 ^ (i as u8)).collect();
    f.write_all(&data).unwrap();
    f
}

#[test]
fn many_operations_in_flight_read_and_write_the_right_bytes() {
    for mut io in both(32) {
        let f = scratch_file(64 * 4096);
        let fd = f.as_raw_fd();
        // 32 writes of 4 KiB, each in two iovecs, then 32 reads back.
        let mut bufs: Vec<Vec<u8>> = (0..32).map(|i| vec![i as u8 + 1; 4096]).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            let (a, c) = b.split_at_mut(1000);
            let o = op(OpKind::Write, fd, (i * 2 * 4096) as u64, &mut [a, c]);
            // SAFETY: the buffers live until wait_all has every token back.
            unsafe { io.submit(o, i as u64) }.ok().unwrap();
        }
        assert_eq!(io.in_flight(), 32, "{}", io.name());
        // Full: the next one is handed back for the caller's pending list.
        let mut extra = vec![0u8; 4096];
        // SAFETY: refused, so never used.
        assert!(unsafe { io.submit(op(OpKind::Read, fd, 0, &mut [&mut extra]), 99) }.is_err());
        io.commit().unwrap();
        let done = wait_all(&mut *io, 32);
        let mut tokens: Vec<u64> = done
            .iter()
            .map(|(t, r)| {
                assert_eq!(*r.as_ref().unwrap(), 4096);
                *t
            })
            .collect();
        tokens.sort();
        assert_eq!(tokens, (0..32).collect::<Vec<_>>());
        assert_eq!(io.in_flight(), 0);

        let mut reads: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 4096]).collect();
        for (i, b) in reads.iter_mut().enumerate() {
            let o = op(OpKind::Read, fd, (i * 2 * 4096) as u64, &mut [b]);
            // SAFETY: as above.
            unsafe { io.submit(o, 100 + i as u64) }.ok().unwrap();
        }
        io.commit().unwrap();
        wait_all(&mut *io, 32);
        for (i, b) in reads.iter().enumerate() {
            assert!(
                b.iter().all(|&x| x == i as u8 + 1),
                "{} read {i}",
                io.name()
            );
        }
        // What the file holds says the same (and the untouched blocks are unchanged).
        let mut odd = vec![0u8; 4096];
        f.read_exact_at(&mut odd, 4096).unwrap();
        assert_eq!(odd[1], 1 ^ 1);
        let mut sync = op(OpKind::Fdatasync, fd, 0, &mut []);
        sync.bufs.clear();
        // SAFETY: no buffers.
        unsafe { io.submit(sync, 7) }.ok().unwrap();
        io.commit().unwrap();
        let done = wait_all(&mut *io, 1);
        assert_eq!(done[0].0, 7);
        assert!(done[0].1.is_ok());
    }
}

#[test]
fn completions_come_back_out_of_order() {
    for mut io in both(4) {
        let (r, w) = nix::unistd::pipe().unwrap();
        let f = scratch_file(8192);
        // The pipe read cannot finish before the test writes; the file read can.
        let mut slow = vec![0u8; 16];
        let mut fast = vec![0u8; 4096];
        // SAFETY: both buffers outlive the completions waited for below.
        unsafe {
            io.submit(op(OpKind::Read, r.as_raw_fd(), STREAM, &mut [&mut slow]), 1)
                .ok()
                .unwrap();
            io.submit(op(OpKind::Read, f.as_raw_fd(), 4096, &mut [&mut fast]), 2)
                .ok()
                .unwrap();
        }
        io.commit().unwrap();
        let first = wait_all(&mut *io, 1);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, 2, "{}: the file read finishes first", io.name());
        assert_eq!(fast[0], 1);
        assert_eq!(nix::unistd::write(&w, &[5u8; 16]).unwrap(), 16);
        let second = wait_all(&mut *io, 1);
        assert_eq!(second[0].0, 1);
        assert_eq!(*second[0].1.as_ref().unwrap(), 16);
        assert_eq!(slow, [5u8; 16]);
    }
}

#[test]
fn the_notifier_becomes_readable_on_completion() {
    for mut io in both(2) {
        let f = scratch_file(4096);
        let mut buf = vec![0u8; 512];
        // SAFETY: buf outlives the completion.
        unsafe { io.submit(op(OpKind::Read, f.as_raw_fd(), 0, &mut [&mut buf]), 3) }
            .ok()
            .unwrap();
        io.commit().unwrap();
        // SAFETY: the notifier is open while io lives.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(io.notifier()) };
        let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let n = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(10_000u16)).unwrap();
        assert_eq!(n, 1, "{}: the eventfd signalled", io.name());
        let mut out = Vec::new();
        // The eventfd may signal before the result is visible to this thread's lock; wait.
        io.wait(&mut out).unwrap();
        assert_eq!(out[0].0, 3);
    }
}

#[test]
fn errors_come_back_with_their_token() {
    for mut io in both(8) {
        // EISDIR: a file that cannot be read (EIO needs a failing device, not available here).
        let mem = std::fs::File::open(env!("CARGO_MANIFEST_DIR")).unwrap();
        let mut a = vec![0u8; 4096];
        // EBADF: a descriptor that is not open (a closed one could be reused by another test
        // thread at once; this one is past any open descriptor).
        let closed: RawFd = 1 << 24;
        let mut b = vec![0u8; 4096];
        // EBADF: writing through a read-only descriptor.
        let ro = std::fs::File::open("/proc/self/cmdline").unwrap();
        let mut c = vec![0u8; 16];
        // Past the end of a file: zeros, not an error.
        let f = scratch_file(4096);
        let mut d = vec![9u8; 8192];
        // SAFETY: every buffer outlives wait_all.
        unsafe {
            io.submit(op(OpKind::Read, mem.as_raw_fd(), 0, &mut [&mut a]), 1)
                .ok()
                .unwrap();
            io.submit(op(OpKind::Read, closed, 0, &mut [&mut b]), 2)
                .ok()
                .unwrap();
            io.submit(op(OpKind::Write, ro.as_raw_fd(), 0, &mut [&mut c]), 3)
                .ok()
                .unwrap();
            io.submit(op(OpKind::Read, f.as_raw_fd(), 0, &mut [&mut d]), 4)
                .ok()
                .unwrap();
        }
        io.commit().unwrap();
        let mut done = wait_all(&mut *io, 4);
        done.sort_by_key(|(t, _)| *t);
        let errno = |i: usize| done[i].1.as_ref().unwrap_err().raw_os_error();
        assert_eq!(errno(0), Some(libc::EISDIR), "{}", io.name());
        assert_eq!(errno(1), Some(libc::EBADF), "{}", io.name());
        assert_eq!(errno(2), Some(libc::EBADF), "{}", io.name());
        assert_eq!(*done[3].1.as_ref().unwrap(), 8192);
        assert_eq!(d[4095], (4095 / 4096) as u8 ^ (4095u32 as u8));
        assert!(d[4096..].iter().all(|&x| x == 0), "{}", io.name());
        // Serving goes on: a good read after the failures.
        let mut e = vec![0u8; 4096];
        // SAFETY: as above.
        unsafe { io.submit(op(OpKind::Read, f.as_raw_fd(), 0, &mut [&mut e]), 5) }
            .ok()
            .unwrap();
        io.commit().unwrap();
        assert!(wait_all(&mut *io, 1)[0].1.is_ok());
    }
}

#[test]
fn a_failed_io_uring_probe_chooses_threads() {
    let eperm = || Err(io::Error::from_raw_os_error(libc::EPERM));
    assert_eq!(choose_with(None, eperm).unwrap(), AioChoice::Threads);
    let enosys = || Err(io::Error::from_raw_os_error(libc::ENOSYS));
    assert_eq!(choose_with(None, enosys).unwrap(), AioChoice::Threads);
    // Forced io_uring that cannot start is an error that names the way out.
    let err = choose_with(Some(AioChoice::IoUring), eperm).unwrap_err();
    assert!(err.to_string().contains("--aio threads"), "{err}");
    assert!(err.to_string().contains("seccomp"), "{err}");
    // Forced threads never asks.
    let never = || -> io::Result<()> { panic!("probed") };
    assert_eq!(
        choose_with(Some(AioChoice::Threads), never).unwrap(),
        AioChoice::Threads
    );
    // And here, where io_uring works, the real probe picks it.
    assert_eq!(choose(None).unwrap(), AioChoice::IoUring);
}

#[test]
fn a_ring_that_cannot_be_set_up_is_an_error() {
    // More entries than the kernel allows (IORING_MAX_ENTRIES is 32768).
    let err = uring::UringIo::new(1 << 20).err().expect("refused");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
}

#[test]
fn workers_start_on_demand_and_exit_when_idle() {
    let mut io =
        threads::ThreadPoolIo::with_idle_exit(4, std::time::Duration::from_millis(100)).unwrap();
    assert_eq!(io.workers(), 0, "no threads before any work");
    let f = scratch_file(4096);
    let mut bufs: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; 1024]).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        // SAFETY: the buffers outlive the completions.
        unsafe { io.submit(op(OpKind::Read, f.as_raw_fd(), 0, &mut [b]), i as u64) }
            .ok()
            .unwrap();
    }
    io.commit().unwrap();
    wait_all(&mut io, 4);
    assert!((1..=4).contains(&io.workers()), "{} workers", io.workers());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while io.workers() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle workers did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // And work after that starts a worker again.
    let mut b = vec![0u8; 512];
    // SAFETY: as above.
    unsafe { io.submit(op(OpKind::Read, f.as_raw_fd(), 0, &mut [&mut b]), 9) }
        .ok()
        .unwrap();
    io.commit().unwrap();
    assert_eq!(wait_all(&mut io, 1)[0].0, 9);
}
