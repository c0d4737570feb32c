//! `serve` driven end to end by a real vhost-user-blk driver: libblkio's virtio-blk-vhost-user
//! driver (the pure-Rust `blkio` crate, the one QEMU's and qemu-storage-daemon's blkio block
//! drivers are built on), in this process, with no VM.
//!
//! Each test starts `vhost-user-vhdx serve` as a child on a temporary unix socket, connects with
//! blkio, runs requests and checks every byte read against a model of the disk; then it
//! disconnects, stops the backend with SIGTERM (exit status 0) and checks the image with
//! `qemu-img check` / `check`, and that `convert -O raw` equals the model.
//!
//! blkio needs from the backend: VIRTIO_F_VERSION_1, the PROTOCOL_FEATURES bit with the
//! REPLY_ACK, CONFIG and CONFIGURE_MEM_SLOTS protocol features (it maps every buffer with
//! ADD_MEM_REGION, guest address = its own virtual address), and MQ for more than one queue.
//! It refuses to start on a device that offers VIRTIO_BLK_F_RO unless its own "read-only"
//! property is set, and then fails writes, discards and write-zeroes itself (EBADF) without
//! sending them; the backend's own rejection of those is covered by tests/virtio_requests.rs.
//!
//! Set `BLKIO_SEED` to replay the random requests, `BLKIO_BACKEND_LOG=debug` for the backend's
//! log (kept in the test's temporary directory, printed when a test fails).

mod common;

use std::fs::File;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blkio::{iovec, Blkio, Blkioq, Completion, Errno, ReqFlags};
use common::{ours_ok, s};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// The backend process

/// `vhost-user-vhdx serve` as a child process; killed on drop unless [`Backend::terminate`] ran.
struct Backend {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

static STARTED: AtomicUsize = AtomicUsize::new(0);

impl Backend {
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> Backend {
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let socket = dir.join(format!("vhost-{n}.sock"));
        let log = dir.join(format!("backend-{n}.log"));
        let log_file = File::create(&log).expect("creating the backend log");
        let level = std::env::var("BLKIO_BACKEND_LOG").unwrap_or_else(|_| "info".into());
        let child = Command::new(common::bin())
            .arg("serve")
            .arg("--socket-path")
            .arg(&socket)
            // `$VHDX_SERVE_ARGS` first (a suite run on the other engine); `extra` overrides.
            .args(common::env_args())
            .args(extra)
            .arg(image)
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("starting vhost-user-vhdx serve");
        let mut backend = Backend {
            child: Some(child),
            socket,
            log,
        };
        let child = backend.child.as_mut().unwrap();
        match common::wait_for_path(child, &backend.socket, Duration::from_secs(10)) {
            Ok(()) => backend,
            Err(common::PathNotCreated::Exited(status)) => {
                panic!(
                    "the backend exited early ({status})\n{}",
                    backend.log_text()
                )
            }
            Err(common::PathNotCreated::TimedOut) => panic!(
                "the backend did not create its socket in 10 s\n{}",
                backend.log_text()
            ),
        }
    }

    fn log_text(&self) -> String {
        format!(
            "--- backend log {} ---\n{}",
            self.log.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("the backend was stopped");
        if let Some(status) = child.try_wait().expect("waiting for the backend") {
            panic!("the backend exited early ({status})\n{}", self.log_text());
        }
    }

    /// SIGTERM, then waits (at most 20 s) for the exit status.
    fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the backend was stopped");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("sending SIGTERM");
        common::wait_or_kill(&mut child, Duration::from_secs(20)).unwrap_or_else(|| {
            panic!(
                "the backend did not exit within 20 s of SIGTERM\n{}",
                self.log_text()
            )
        })
    }

    /// SIGTERM and a clean exit (status 0).
    fn stop_clean(self) {
        let log = self.log.clone();
        let status = self.terminate();
        assert!(
            status.success(),
            "the backend exited with {status} after SIGTERM\n--- backend log ---\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("{}", self.log_text());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The blkio client

/// A window of the shared-memory buffer that blkio mapped into the backend.
#[derive(Clone, Copy, Debug)]
struct Buf {
    addr: usize,
    len: usize,
}

impl Buf {
    fn sub(self, off: usize, len: usize) -> Buf {
        assert!(off + len <= self.len, "buffer window out of range");
        Buf {
            addr: self.addr + off,
            len,
        }
    }

    fn ptr(self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Copies the window out (only call when no request using it is in flight).
    fn to_vec(self) -> Vec<u8> {
        // SAFETY: the window lies in a live mapping owned by the test's Client, and no request
        // that writes it is in flight.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }.to_vec()
    }

    fn fill_from(self, data: &[u8]) {
        assert_eq!(data.len(), self.len);
        // SAFETY: as in to_vec; the caller submits the request that reads it only afterwards.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr(), self.len) }
    }
}

struct Client {
    // Dropped in this order: the queues, then the driver (which closes the connection).
    queues: Vec<Blkioq>,
    buf: Buf,
    blkio: Blkio,
}

fn try_connect(
    socket: &Path,
    num_queues: i32,
    read_only: bool,
    buf_len: usize,
) -> blkio::Result<Client> {
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", socket.to_str().unwrap())?;
    b.set_bool("read-only", read_only)?;
    b.connect()?;
    b.set_i32("num-queues", num_queues)?;
    let started = b.start()?;
    // vhost-user needs buffers the backend can map: blkio's memfd-backed regions.
    let region = b.alloc_mem_region(buf_len)?;
    b.map_mem_region(&region)?;
    Ok(Client {
        queues: started.queues,
        buf: Buf {
            addr: region.addr,
            len: region.len,
        },
        blkio: b,
    })
}

fn connect(backend: &mut Backend, num_queues: i32, read_only: bool, buf_len: usize) -> Client {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        backend.assert_running();
        match try_connect(&backend.socket, num_queues, read_only, buf_len) {
            Ok(client) => return client,
            // The socket file appears at bind(), a moment before listen().
            Err(e) if e.errno() == Errno::CONNREFUSED && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!(
                "blkio could not connect ({:?}: {e})\n{}",
                e.errno(),
                backend.log_text()
            ),
        }
    }
}

#[derive(Clone, Debug)]
enum Req {
    /// `segs` > 1: readv with that many iovecs, split at random (not sector-aligned) places.
    Read {
        off: u64,
        len: usize,
        segs: usize,
    },
    Write {
        off: u64,
        len: usize,
        segs: usize,
        fua: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Flush,
}

impl Req {
    fn data_len(&self) -> usize {
        match self {
            Req::Read { len, .. } | Req::Write { len, .. } => *len,
            _ => 0,
        }
    }

    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Req::Read { off, len, .. } | Req::Write { off, len, .. } => Some((off, len as u64)),
            Req::Discard { off, len } | Req::Zero { off, len, .. } => Some((off, len)),
            Req::Flush => None,
        }
    }
}

/// Where each request's data goes in the buffer: one after the other.
fn layout(reqs: &[Req]) -> Vec<usize> {
    let mut at = 0;
    reqs.iter()
        .map(|r| {
            let here = at;
            at += r.data_len();
            here
        })
        .collect()
}

/// `segs` iovecs covering `b`, split at random byte positions.
fn split(b: Buf, segs: usize, rng: &mut StdRng) -> Vec<iovec> {
    let mut cuts: Vec<usize> = (1..segs.min(b.len))
        .map(|_| rng.gen_range(1..b.len))
        .collect();
    cuts.push(0);
    cuts.push(b.len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|w| iovec {
            iov_base: (b.addr + w[0]) as *mut std::ffi::c_void,
            iov_len: w[1] - w[0],
        })
        .collect()
}

/// Submits all of `reqs` on `q` at once (data at `layout(reqs)` in `buf`; write data must be
/// there already) and waits for them all; returns each request's `ret` (0 or -errno).
fn submit(q: &mut Blkioq, buf: Buf, reqs: &[Req], rng: &mut StdRng) -> Vec<i32> {
    let at = layout(reqs);
    // The iovec arrays must live until the requests complete (blkio may hold them backlogged).
    let mut iovs: Vec<Vec<iovec>> = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let b = buf.sub(at[i], r.data_len());
        match *r {
            Req::Read { off, len, segs } if segs <= 1 => {
                q.read(off, b.ptr(), len, i, ReqFlags::empty())
            }
            Req::Read { off, segs, .. } => {
                iovs.push(split(b, segs, rng));
                let v = iovs.last().unwrap();
                q.readv(off, v.as_ptr(), v.len() as u32, i, ReqFlags::empty())
            }
            Req::Write {
                off,
                len,
                segs,
                fua,
            } => {
                let flags = if fua {
                    ReqFlags::FUA
                } else {
                    ReqFlags::empty()
                };
                if segs <= 1 {
                    q.write(off, b.ptr(), len, i, flags)
                } else {
                    iovs.push(split(b, segs, rng));
                    let v = iovs.last().unwrap();
                    q.writev(off, v.as_ptr(), v.len() as u32, i, flags)
                }
            }
            Req::Discard { off, len } => q.discard(off, len, i, ReqFlags::empty()),
            Req::Zero { off, len, unmap } => {
                let flags = if unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                q.write_zeroes(off, len, i, flags)
            }
            Req::Flush => q.flush(i, ReqFlags::empty()),
        }
    }
    let rets = wait_all(q, reqs.len());
    drop(iovs);
    rets
}

fn wait_all(q: &mut Blkioq, n: usize) -> Vec<i32> {
    let mut rets: Vec<Option<i32>> = vec![None; n];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..n.max(1)).map(|_| MaybeUninit::uninit()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut done = 0;
    while done < n {
        let mut timeout = Duration::from_millis(500);
        match q.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(k) => {
                for c in &completions[..k] {
                    // SAFETY: do_io initialized the first k completions.
                    let c = unsafe { c.assume_init_read() };
                    assert!(rets[c.user_data].is_none(), "request completed twice");
                    rets[c.user_data] = Some(c.ret);
                    done += 1;
                }
            }
            Err(e) if e.errno() == Errno::TIME => {}
            Err(e) => panic!("do_io: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} requests did not complete in 30 s",
            n - done
        );
    }
    rets.into_iter().map(Option::unwrap).collect()
}

/// One request, waited for; its `ret`.
fn one(q: &mut Blkioq, buf: Buf, req: Req) -> i32 {
    let mut rng = StdRng::seed_from_u64(0);
    submit(q, buf, &[req], &mut rng)[0]
}

/// Reads `[off, off + len)` through `q` in pieces that fit `buf`.
fn read_range(q: &mut Blkioq, buf: Buf, off: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = off;
    while pos < off + len {
        let n = (buf.len as u64).min(off + len - pos) as usize;
        let ret = one(
            q,
            buf,
            Req::Read {
                off: pos,
                len: n,
                segs: 1,
            },
        );
        assert_eq!(ret, 0, "read of {n} bytes at {pos} failed");
        out.extend_from_slice(&buf.sub(0, n).to_vec());
        pos += n as u64;
    }
    out
}

fn write_range(q: &mut Blkioq, buf: Buf, off: u64, data: &[u8]) {
    let mut done = 0;
    while done < data.len() {
        let n = buf.len.min(data.len() - done);
        buf.sub(0, n).fill_from(&data[done..done + n]);
        let ret = one(
            q,
            buf,
            Req::Write {
                off: off + done as u64,
                len: n,
                segs: 1,
                fua: false,
            },
        );
        assert_eq!(ret, 0, "write of {n} bytes at {} failed", off + done as u64);
        done += n;
    }
}

/// Panics with the first differing offset unless `got == want` (which starts at disk offset `at`).
fn assert_same(got: &[u8], want: &[u8], at: u64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: byte {} (sector {}) reads {:#04x}, the model has {:#04x}",
            at + i as u64,
            (at + i as u64) / SECTOR,
            got[i],
            want[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The model

/// What the disk must read as after `req` succeeded. Discards turn whole payload blocks into
/// zeros and leave partial blocks alone (the backend's documented discard semantics, with the
/// block size as advertised discard granularity); write-zeroes zero the exact range.
fn apply(model: &mut [u8], block: u64, req: &Req, data: &[u8]) {
    match *req {
        Req::Write { off, len, .. } => {
            model[off as usize..off as usize + len].copy_from_slice(data);
        }
        Req::Zero { off, len, .. } => {
            model[off as usize..(off + len) as usize].fill(0);
        }
        Req::Discard { off, len } => {
            let first = off.div_ceil(block) * block;
            let last = (off + len) / block * block;
            if first < last {
                model[first as usize..last as usize].fill(0);
            }
        }
        Req::Read { .. } | Req::Flush => {}
    }
}

fn seed() -> u64 {
    let seed = std::env::var("BLKIO_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("BLKIO_SEED={seed}");
    seed
}

/// A random sector-aligned range inside `[base, base + span)`: mostly small, some up to 1 MiB,
/// some multi-MiB (up to `big`).
fn random_range(rng: &mut StdRng, base: u64, span: u64, big: u64) -> (u64, u64) {
    let max = match rng.gen_range(0..10) {
        0..=5 => 64 * SECTOR,
        6..=8 => MIB,
        _ => big,
    }
    .min(span);
    let len = rng.gen_range(1..=max / SECTOR) * SECTOR;
    let off = base + rng.gen_range(0..=(span - len) / SECTOR) * SECTOR;
    (off, len)
}

/// The part of the disk one queue's thread may touch, so that the model stays exact while
/// several queues run at once.
#[derive(Clone, Copy, Debug)]
enum Area {
    /// `[base, base + span)`, block aligned: requests of any size, whole-block discards.
    Region { base: u64, span: u64 },
    /// Stripe `k` of `stripe` bytes for every `k % of == index`: the threads share every
    /// block, so blocks are allocated, written and zeroed by several queues at once.
    Stripes {
        index: u64,
        of: u64,
        stripe: u64,
        size: u64,
    },
}

impl Area {
    fn pick(self, rng: &mut StdRng, block: u64) -> (u64, u64) {
        match self {
            Area::Region { base, span } => {
                // Discards and write-zeroes are often whole, block-aligned ranges: those
                // change block states, the rest writes zeros into or leaves partial blocks.
                if rng.gen_bool(0.2) {
                    let blocks = span / block;
                    let first = rng.gen_range(0..blocks);
                    let count = rng.gen_range(1..=(blocks - first).min(3));
                    (base + first * block, count * block)
                } else {
                    random_range(rng, base, span, 6 * MIB)
                }
            }
            Area::Stripes {
                index,
                of,
                stripe,
                size,
            } => {
                let k = rng.gen_range(0..size / stripe / of) * of + index;
                random_range(rng, k * stripe, stripe, stripe)
            }
        }
    }
}

/// A batch of up to `n` random requests in `area` whose ranges do not overlap (so their order
/// does not matter) and whose data fits in `buf_len`.
fn random_batch(rng: &mut StdRng, n: usize, area: Area, block: u64, buf_len: usize) -> Vec<Req> {
    let mut reqs: Vec<Req> = Vec::new();
    let mut used = 0usize;
    for _ in 0..n * 3 {
        if reqs.len() == n {
            break;
        }
        let kind = rng.gen_range(0..100);
        let req = if kind < 6 {
            Req::Flush
        } else {
            let (off, len) = area.pick(rng, block);
            let segs = if rng.gen_bool(0.3) {
                rng.gen_range(2..=5)
            } else {
                1
            };
            match kind {
                6..=44 => Req::Write {
                    off,
                    len: len as usize,
                    segs,
                    fua: rng.gen_bool(0.1),
                },
                45..=79 => Req::Read {
                    off,
                    len: len as usize,
                    segs,
                },
                80..=89 => Req::Discard { off, len },
                _ => Req::Zero {
                    off,
                    len,
                    unmap: rng.gen_bool(0.5),
                },
            }
        };
        if used + req.data_len() > buf_len {
            continue;
        }
        if let Some((o, l)) = req.range() {
            // Discards reach to whole blocks in the model: keep a batch's requests apart by
            // block (in a striped area, whole blocks are never discarded).
            let grain = match area {
                Area::Region { .. } => block,
                Area::Stripes { .. } => SECTOR,
            };
            let overlaps = reqs.iter().filter_map(Req::range).any(|(ro, rl)| {
                let (a0, a1) = (o / grain * grain, (o + l).div_ceil(grain) * grain);
                let (b0, b1) = (ro / grain * grain, (ro + rl).div_ceil(grain) * grain);
                a0 < b1 && b0 < a1
            });
            if overlaps {
                continue;
            }
        }
        used += req.data_len();
        reqs.push(req);
    }
    reqs
}

/// How many batches of requests, and how many requests a batch has at most (the queue depth).
#[derive(Clone, Copy)]
struct Batches {
    count: usize,
    depth: usize,
}

/// Runs `batches` random batches of requests in `area` on `q`, verifying every read against
/// `model` (the whole disk) and keeping it up to date. Returns the number of requests.
fn exercise(
    q: &mut Blkioq,
    buf: Buf,
    model: &Mutex<Vec<u8>>,
    area: Area,
    block: u64,
    batches: Batches,
    rng: &mut StdRng,
) -> usize {
    let mut count = 0;
    for _ in 0..batches.count {
        let n = rng.gen_range(1..=batches.depth);
        let reqs = random_batch(rng, n, area, block, buf.len);
        let at = layout(&reqs);
        let mut data: Vec<Vec<u8>> = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            let mut d = Vec::new();
            if let Req::Write { len, .. } = *r {
                d = vec![0u8; len];
                rng.fill_bytes(&mut d);
                buf.sub(at[i], len).fill_from(&d);
            }
            data.push(d);
        }
        let rets = submit(q, buf, &reqs, rng);
        let mut model = model.lock().unwrap();
        for (i, r) in reqs.iter().enumerate() {
            assert_eq!(rets[i], 0, "{r:?} failed with {}", rets[i]);
            if let Req::Read { off, len, .. } = *r {
                let got = buf.sub(at[i], len).to_vec();
                let o = off as usize;
                assert_same(&got, &model[o..o + len], off, &format!("{r:?}"));
            }
        }
        for (i, r) in reqs.iter().enumerate() {
            apply(&mut model, block, r, &data[i]);
        }
        count += reqs.len();
    }
    count
}

// ---------------------------------------------------------------------------------------------
// Image helpers

fn create(path: &Path, size: &str, opts: &str) {
    let mut args = vec!["create", "-q"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(path), size]);
    ours_ok(&args);
}

fn info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&ours_ok(&["info", "--output", "json", s(path)])).unwrap()
}

/// The image was closed cleanly: log empty (LogGuid zero), `check` passes.
fn assert_closed_clean(path: &Path) {
    let info = info(path);
    let log = &info["format-specific"]["data"]["log"];
    assert_eq!(
        log["guid"], "00000000-0000-0000-0000-000000000000",
        "LogGuid not cleared: {info:#}"
    );
    ours_ok(&["check", s(path)]);
}

/// `convert -O raw` of `image` (our reader, whole chain) equals `model`.
fn assert_converts_to(image: &Path, model: &[u8], dir: &Path) {
    let raw = dir.join(format!(
        "{}.raw",
        image.file_name().unwrap().to_str().unwrap()
    ));
    let _ = std::fs::remove_file(&raw);
    ours_ok(&["convert", "-O", "raw", s(image), s(&raw)]);
    let got = std::fs::read(&raw).unwrap();
    assert_same(&got, model, 0, "convert -O raw");
    std::fs::remove_file(&raw).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The tests

/// Runs `batches` batches on every queue at once, one thread per queue, in the area
/// `area(thread)`; returns the number of requests.
fn on_all_queues(
    client: &mut Client,
    buf_per_queue: usize,
    model: &Mutex<Vec<u8>>,
    area: impl Fn(u64) -> Area + Sync,
    block: u64,
    batches: Batches,
    seed: u64,
) -> usize {
    let buf = client.buf;
    let area = &area;
    std::thread::scope(|s| {
        let handles: Vec<_> = client
            .queues
            .iter_mut()
            .enumerate()
            .map(|(t, q)| {
                let b = buf.sub(t * buf_per_queue, buf_per_queue);
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(t as u64));
                    exercise(q, b, model, area(t as u64), block, batches, &mut rng)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

/// Random reads, writes (1 to 5 iovecs split anywhere, up to 6 MiB), discards, write-zeroes
/// and flushes on three queues at once, one thread per queue: first each queue on its own
/// third of the disk (requests of any size, whole-block discards), then all queues on
/// interleaved 64 KiB stripes (so several queues allocate and write the same blocks at once);
/// every read checked against the model, then a full read. Then a clean SIGTERM shutdown,
/// and qemu-img and our own reader agree with the model. Batches with a large request run on
/// the helper threads too.
#[test]
fn random_io_on_three_queues() {
    random_io(common::tempdir("blkio-random-"), &[], 8);
}

/// The same one request at a time per queue (`--aio off`, the escape hatch), the helper
/// threads sharing out batches with large requests.
#[test]
fn random_io_one_at_a_time() {
    random_io(common::tempdir("blkio-random-off-"), &["--aio", "off"], 8);
}

/// The same with `--cache none`: every file O_DIRECT; the random iovec splits put guest
/// buffers at odd addresses and lengths, so aligned runs and bounced pieces alternate.
#[test]
fn random_io_on_three_queues_cache_none() {
    random_io(
        common::direct_io_tempdir("blkio-random-direct-"),
        &["--cache", "none"],
        8,
    );
}

/// Requests in flight (`--aio io_uring`): batches of up to 96 requests per queue on three
/// queues, so that many complete out of order; the same checks against the model.
#[test]
fn random_io_in_flight_io_uring() {
    random_io(
        common::tempdir("blkio-random-uring-"),
        &["--aio", "io_uring"],
        96,
    );
}

/// The same on the thread pool (`--aio threads`), the fallback where io_uring is forbidden.
#[test]
fn random_io_in_flight_threads() {
    random_io(
        common::tempdir("blkio-random-threads-"),
        &["--aio", "threads"],
        96,
    );
}

/// Requests in flight with `--cache none`: aligned pieces go to the disk asynchronously,
/// requests with unaligned buffers take the synchronous bounce path, side by side.
#[test]
fn random_io_in_flight_cache_none() {
    random_io(
        common::direct_io_tempdir("blkio-random-uring-direct-"),
        &["--cache", "none", "--aio", "io_uring"],
        96,
    );
}

/// The same on the thread pool.
#[test]
fn random_io_in_flight_threads_cache_none() {
    random_io(
        common::direct_io_tempdir("blkio-random-threads-direct-"),
        &["--cache", "none", "--aio", "threads"],
        96,
    );
}

fn random_io(dir: tempfile::TempDir, extra: &[&str], depth: usize) {
    const QUEUES: u64 = 3;
    const BLOCK: u64 = MIB;
    const SIZE: u64 = 96 * MIB;
    const BUF_PER_QUEUE: usize = 16 << 20;
    let seed = seed();
    let img = dir.path().join("disk.vhdx");
    create(&img, "96M", "block_size=1M");
    // Helper threads on any machine, so that batches with large requests are shared out
    // (completed out of order, from several threads) whatever the core count.
    let mut args = vec!["--num-queues", "4", "--helper-threads", "3"];
    args.extend_from_slice(extra);
    let mut backend = Backend::start(dir.path(), &img, &args);
    let mut client = connect(&mut backend, QUEUES as i32, false, BUF_PER_QUEUE * 3);
    if extra.contains(&"none") {
        let log = backend.log_text();
        assert!(
            log.contains("O_DIRECT"),
            "serve did not open O_DIRECT:\n{log}"
        );
    }
    for (aio, says) in [
        ("io_uring", "data I/O: io_uring"),
        ("threads", "a thread pool"),
    ] {
        if extra.contains(&aio) {
            let log = backend.log_text();
            assert!(log.contains(says), "serve did not use {aio}:\n{log}");
        }
    }

    let model = Mutex::new(vec![0u8; SIZE as usize]);
    let region = SIZE / QUEUES;
    let own_region = |t| Area::Region {
        base: t * region,
        span: region,
    };
    let stripes = |t| Area::Stripes {
        index: t,
        of: QUEUES,
        stripe: 64 << 10,
        size: SIZE,
    };
    let mut total = 0;
    for round in 0..2 {
        let s = seed.wrapping_add(round * 100);
        total += on_all_queues(
            &mut client,
            BUF_PER_QUEUE,
            &model,
            own_region,
            BLOCK,
            Batches { count: 150, depth },
            s,
        );
        total += on_all_queues(
            &mut client,
            BUF_PER_QUEUE,
            &model,
            stripes,
            BLOCK,
            Batches { count: 150, depth },
            s + 10,
        );
    }
    eprintln!("{total} requests on {QUEUES} queues");
    let model = model.into_inner().unwrap();

    let buf = client.buf;
    let q = &mut client.queues[0];
    assert_eq!(one(q, buf, Req::Flush), 0);
    let all = read_range(q, buf.sub(0, 8 << 20), 0, SIZE);
    assert_same(&all, &model, 0, "full read");
    drop(client);
    let log_path = backend.log.clone();
    backend.stop_clean();
    let off = extra.contains(&"off") || common::env_args().iter().any(|a| a == "off");
    if !off {
        // Both kinds of request really went through the asynchronous path (the default):
        // reads in flight; writes in flight with --cache none, and copied into the page cache
        // at once (buffered writes: see src/async_requests.rs) otherwise.
        let log = std::fs::read_to_string(&log_path).unwrap();
        let (mut reads, mut writes, mut copied) = (0u64, 0u64, 0u64);
        for line in log.lines().filter(|l| l.contains("ran in flight")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let count = |what: &str| -> u64 {
                let i = words.iter().position(|w| *w == what).unwrap();
                words[i - 1].parse().unwrap()
            };
            reads += count("reads");
            writes += count("writes");
            copied += count("buffered");
        }
        let direct = extra.contains(&"none") || common::env_args().iter().any(|a| a == "none");
        assert!(
            reads > 0
                && if direct {
                    writes > 0
                } else {
                    writes + copied > 0
                },
            "{reads} reads and {writes} writes in flight, {copied} buffered writes copied:\n{log}"
        );
    }

    assert_closed_clean(&img);
    common::assert_qemu_img_check_clean(&img, "after the backend stopped");
    assert_converts_to(&img, &model, dir.path());
    let raw = dir.path().join("qemu.raw");
    common::qemu_img_convert_raw(&img, &raw);
    assert_same(&std::fs::read(&raw).unwrap(), &model, 0, "qemu-img convert");
}

/// `--read-only`: the device offers VIRTIO_BLK_F_RO (blkio refuses a read-write start with
/// EROFS); reads return the data; writes, discards and write-zeroes fail; flush succeeds; the
/// file is byte-for-byte unchanged afterwards.
#[test]
fn read_only() {
    let dir = common::tempdir("blkio-ro-");
    let img = dir.path().join("ro.vhdx");
    create(&img, "16M", "block_size=1M");
    common::qemu_io_ok(&img, &["write -P 0x5a 0 3M", "write -P 0xc3 5M 1536k"]);
    let mut want = vec![0u8; 16 << 20];
    want[..3 << 20].fill(0x5a);
    want[5 << 20..(5 << 20) + (1536 << 10)].fill(0xc3);
    let before = std::fs::read(&img).unwrap();
    let mtime = std::fs::metadata(&img).unwrap().modified().unwrap();

    let mut backend = Backend::start(dir.path(), &img, &["--read-only", "--num-queues", "2"]);
    // The first client then reads and disconnects, so the ROFS attempt below is a second
    // connection and cannot meet the bind/listen window.
    let mut client = connect(&mut backend, 2, true, 4 << 20);
    assert!(client.blkio.get_bool("read-only").unwrap());
    let buf = client.buf;
    let q = &mut client.queues[1];
    assert_same(&read_range(q, buf, 0, 16 << 20), &want, 0, "read-only read");
    buf.fill_from(&vec![0xee; buf.len]);
    let attempts = [
        Req::Write {
            off: 0,
            len: 4096,
            segs: 1,
            fua: false,
        },
        Req::Write {
            off: 6 << 20,
            len: 2 << 20,
            segs: 3,
            fua: true,
        },
        Req::Discard { off: 0, len: MIB },
        Req::Zero {
            off: 5 << 20,
            len: MIB,
            unmap: true,
        },
        Req::Zero {
            off: 512,
            len: 512,
            unmap: false,
        },
    ];
    for req in attempts {
        let ret = one(q, buf, req.clone());
        assert!(ret < 0, "{req:?} succeeded on a read-only device");
    }
    assert_eq!(one(q, buf, Req::Flush), 0, "flush on a read-only device");
    assert_same(&read_range(q, buf, 0, 16 << 20), &want, 0, "read after");
    drop(client);
    match try_connect(&backend.socket, 1, false, 1 << 20) {
        Ok(_) => panic!("blkio started read-write on a read-only device"),
        Err(e) => assert_eq!(e.errno(), Errno::ROFS, "{e}"),
    }
    let mut client = connect(&mut backend, 1, true, 1 << 20);
    let buf = client.buf;
    let q = &mut client.queues[0];
    assert_same(
        &read_range(q, buf, 0, 16 << 20),
        &want,
        0,
        "read, third client",
    );
    drop(client);
    backend.stop_clean();

    let after = std::fs::read(&img).unwrap();
    assert!(before == after, "serving read-only changed the file");
    assert_eq!(std::fs::metadata(&img).unwrap().modified().unwrap(), mtime);
}

/// One backend process, five connections in a row: what each wrote is there for the next
/// (whose first act is a full read), with 1 and 2 queues alternately, without a flush before
/// the disconnect, and once with 16 reads still in flight when the client goes away. The last
/// connection writes and is still open when SIGTERM comes: the backend exits 0 and the data
/// is in the image, which is clean.
#[test]
fn disconnect_and_reconnect() {
    const SIZE: u64 = 24 * MIB;
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = common::tempdir("blkio-reconnect-");
    let img = dir.path().join("re.vhdx");
    create(&img, "24M", "block_size=1M");
    let mut backend = Backend::start(dir.path(), &img, &["--num-queues", "2"]);
    let model = Mutex::new(vec![0u8; SIZE as usize]);
    let whole = Area::Region {
        base: 0,
        span: SIZE,
    };
    for round in 0..5 {
        let queues = 1 + round % 2;
        let mut client = connect(&mut backend, queues, false, 16 << 20);
        let buf = client.buf;
        let q = client.queues.last_mut().unwrap();
        let all = read_range(q, buf.sub(0, 8 << 20), 0, SIZE);
        assert_same(
            &all,
            &model.lock().unwrap(),
            0,
            &format!("full read at connection {round}"),
        );
        // A few fresh patterns, then random traffic.
        for _ in 0..3 {
            let (off, len) = random_range(&mut rng, 0, SIZE, 4 * MIB);
            let mut d = vec![0u8; len as usize];
            rng.fill_bytes(&mut d);
            write_range(q, buf, off, &d);
            let write = Req::Write {
                off,
                len: len as usize,
                segs: 1,
                fua: false,
            };
            apply(&mut model.lock().unwrap(), MIB, &write, &d);
        }
        if round == 4 {
            // SIGTERM with the client connected: the backend ends the connection itself.
            backend.stop_clean();
            drop(client);
            break;
        }
        exercise(
            q,
            buf,
            &model,
            whole,
            MIB,
            Batches {
                count: 30,
                depth: 8,
            },
            &mut rng,
        );
        if round == 2 {
            // Requests in flight at the disconnect: submitted, not waited for.
            for i in 0..16u64 {
                q.read(
                    i * MIB,
                    buf.sub(i as usize * MIB as usize, MIB as usize).ptr(),
                    MIB as usize,
                    0,
                    ReqFlags::empty(),
                );
            }
            let mut none: [MaybeUninit<Completion>; 0] = [];
            q.do_io(&mut none, 0, Some(&mut Duration::from_secs(0)), None)
                .unwrap();
        }
        drop(client);
        backend.assert_running();
    }
    assert_closed_clean(&img);
    common::assert_qemu_img_check_clean(&img, "after the backend stopped");
    assert_converts_to(&img, &model.into_inner().unwrap(), dir.path());
}

/// base <- mid <- leaf, each level written through the backend in turn. Serving the leaf:
/// reads show the parents' data where the leaf has none (also inside partially written
/// blocks), writes, write-zeroes and discards land in the leaf only (both parents'
/// files are byte-for-byte unchanged), and the result reads the same with our reader and
/// with libvhdi.
#[test]
fn differencing_chain() {
    const SIZE: u64 = 32 * MIB;
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = common::tempdir("blkio-chain-");
    let base = dir.path().join("base.vhdx");
    let mid = dir.path().join("mid.vhdx");
    let leaf = dir.path().join("leaf.vhdx");
    create(&base, "32M", "block_size=1M");
    let mut model = vec![0u8; SIZE as usize];

    // Fill some of `image` with random writes through the backend.
    let mut fill = |image: &Path, model: &mut Vec<u8>, writes: usize| {
        let mut backend = Backend::start(dir.path(), image, &["--num-queues", "1"]);
        let mut client = connect(&mut backend, 1, false, 4 << 20);
        let buf = client.buf;
        let q = &mut client.queues[0];
        for _ in 0..writes {
            let (off, len) = random_range(&mut rng, 0, SIZE, 3 * MIB);
            let mut d = vec![0u8; len as usize];
            rng.fill_bytes(&mut d);
            write_range(q, buf, off, &d);
            model[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
        drop(client);
        backend.stop_clean();
        assert_closed_clean(image);
    };
    fill(&base, &mut model, 30);
    ours_ok(&["create", "-q", "-b", s(&base), s(&mid)]);
    fill(&mid, &mut model, 20);
    ours_ok(&["create", "-q", "-b", s(&mid), s(&leaf)]);
    let base_bytes = std::fs::read(&base).unwrap();
    let mid_bytes = std::fs::read(&mid).unwrap();

    let mut backend = Backend::start(dir.path(), &leaf, &["--num-queues", "2"]);
    let mut client = connect(&mut backend, 2, false, 16 << 20);
    let buf = client.buf;
    let q = &mut client.queues[1];
    assert_same(
        &read_range(q, buf, 0, SIZE),
        &model,
        0,
        "leaf before writes",
    );
    let shared = Mutex::new(model);
    let whole = Area::Region {
        base: 0,
        span: SIZE,
    };
    exercise(
        q,
        buf,
        &shared,
        whole,
        MIB,
        Batches {
            count: 150,
            depth: 8,
        },
        &mut rng,
    );
    let model = shared.into_inner().unwrap();
    assert_same(&read_range(q, buf, 0, SIZE), &model, 0, "leaf after writes");
    drop(client);
    backend.stop_clean();

    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base file changed"
    );
    assert!(
        std::fs::read(&mid).unwrap() == mid_bytes,
        "the middle file changed"
    );
    assert_closed_clean(&leaf);
    assert_converts_to(&leaf, &model, dir.path());
    let raw = dir.path().join("pyvhdi.raw");
    common::pyvhdi_read_raw(&raw, &[&leaf, &mid, &base]);
    assert_same(&std::fs::read(&raw).unwrap(), &model, 0, "libvhdi read");
}

/// What blkio reads from the config space matches the image: capacity, logical sector size
/// (request-alignment), physical sector size (optimal-io-alignment), block size
/// (optimal-io-size, discard-alignment), queues, limits; for a 512-byte and a 4096-byte
/// logical sector image. On the 4K disk, a request not aligned to 4096 fails in the backend,
/// and one past the end fails too.
///
/// GET_ID (the serial) is not covered: blkio has no request for VIRTIO_BLK_T_GET_ID.
#[test]
fn properties_match_the_image() {
    let dir = common::tempdir("blkio-props-");
    for (lss, pss, block, size, queues) in [
        (512u64, 4096u64, 32 * MIB, 40 * MIB + 512 * 3, 3),
        (4096, 4096, 2 * MIB, 40 * MIB, 1),
    ] {
        let img = dir.path().join(format!("p{lss}.vhdx"));
        let size_s = size.to_string();
        create(
            &img,
            &size_s,
            &format!("block_size={block},logical_sector_size={lss},physical_sector_size={pss}"),
        );
        let mut backend = Backend::start(
            dir.path(),
            &img,
            &[
                "--num-queues",
                &queues.to_string(),
                "--serial",
                "blkio-test",
            ],
        );
        let mut client = connect(&mut backend, 1, false, 1 << 20);
        let b = &client.blkio;
        let u = |name: &str| b.get_u64(name).unwrap();
        let i = |name: &str| b.get_i32(name).unwrap() as u64;
        let context = format!("lss {lss}, block {block}");
        assert_eq!(u("capacity"), size, "capacity, {context}");
        assert_eq!(i("request-alignment"), lss, "{context}");
        assert_eq!(i("optimal-io-alignment"), pss, "{context}");
        assert_eq!(i("optimal-io-size"), block, "{context}");
        assert_eq!(i("discard-alignment"), block, "{context}");
        assert_eq!(i("discard-alignment-offset"), 0, "{context}");
        assert_eq!(i("max-queues"), queues, "{context}");
        assert_eq!(i("max-segments"), 128, "{context}");
        assert_eq!(u("max-discard-len"), 1 << 30, "{context}");
        assert_eq!(u("max-write-zeroes-len"), 1 << 30, "{context}");
        assert!(b.get_bool("flush-needed").unwrap(), "writeback cache");
        assert!(!b.get_bool("read-only").unwrap());
        assert!(
            u("max-mem-regions") >= 8,
            "max-mem-regions {}",
            u("max-mem-regions")
        );
        eprintln!(
            "max-mem-regions {}, max-transfer {}, max-segment-len {}",
            u("max-mem-regions"),
            i("max-transfer"),
            i("max-segment-len")
        );

        let buf = client.buf;
        let q = &mut client.queues[0];
        // The last sector is readable and writable; past it is an error.
        let last = size - lss;
        buf.sub(0, lss as usize)
            .fill_from(&vec![0x77; lss as usize]);
        let w = |off, len: u64| Req::Write {
            off,
            len: len as usize,
            segs: 1,
            fua: false,
        };
        let r = |off, len: u64| Req::Read {
            off,
            len: len as usize,
            segs: 1,
        };
        assert_eq!(one(q, buf, w(last, lss)), 0);
        assert_eq!(one(q, buf, r(last, lss)), 0);
        assert_eq!(buf.sub(0, lss as usize).to_vec(), vec![0x77; lss as usize]);
        assert!(one(q, buf, r(last, 2 * lss)) < 0, "read past the end");
        assert!(one(q, buf, w(size, lss)) < 0, "write past the end");
        if lss == 4096 {
            assert!(one(q, buf, w(512, 4096)) < 0, "write not 4K-aligned");
            assert!(one(q, buf, r(0, 512)) < 0, "read shorter than a sector");
            assert!(
                one(
                    q,
                    buf,
                    Req::Zero {
                        off: 4096,
                        len: 512,
                        unmap: false
                    }
                ) < 0,
                "write-zeroes shorter than a sector"
            );
        }
        drop(client);
        backend.stop_clean();
        assert_closed_clean(&img);
        if lss == 512 {
            // QEMU's vhdx driver does not open 4096-byte logical sector images.
            common::assert_qemu_img_check_clean(&img, "after the backend stopped");
        }
    }
}
