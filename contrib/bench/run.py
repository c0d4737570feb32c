#!/usr/bin/env python3
"""Backend benchmark: vhost-user-vhdx against qemu-storage-daemon, in one run.

    contrib/bench/run.py [--seconds 5] [--rounds 2] [--size 2G] [--out DIR]
                         [--jobs NAME,...] [--backends ours,...] [--no-footprint]
                         [--cold] [--pin] [--client-mem memfd|hugetlb]

Builds the images (a dynamic VHDX with 32 MiB blocks fully written once, an empty one for
first-touch writes, a raw file with the same content), then drives every backend with the same
client -- examples/blk_bench.rs on the blkio crate, a real vhost-user-blk client, no VM -- one
after another and interleaved, the order turned by one each round (A B C, B C A, C A B, ...) so
that drift cancels and no backend always runs first (right after the previous round's last job,
whose I/O the disk may still be paying for):

    ours      vhost-user-vhdx serve on the VHDX
    qsd-vhdx  qemu-storage-daemon vhost-user-blk export, driver=vhdx, on the same VHDX
    qsd-raw   qemu-storage-daemon on the raw file
    fio-raw   fio on the host against the raw file, psync on one thread per core (the
              ceiling: the host's own page-cache I/O, no vhost-user at all)

These use the host page cache. With --backends (or --cold) also:

    ours-direct         vhost-user-vhdx serve --cache none (O_DIRECT)
    qsd-direct-uring    qemu-storage-daemon, driver=vhdx, cache.direct=on, aio=io_uring
    qsd-direct-threads  qemu-storage-daemon, driver=vhdx, cache.direct=on, aio=threads
    fio-direct          fio, io_uring, O_DIRECT, at the job's queue depth, reading the VHDX
                        file itself, writing the raw file (the disk's limit: no format, no
                        vhost-user)

--cold measures the disk, not the page cache: as root the host page cache is dropped before
every job (and the default backends become ours-direct, ours, qsd-direct-uring,
qsd-direct-threads, fio-direct); otherwise only the O_DIRECT backends run (said in the output).
Each cold job's line also says what the disk saw (requests, their mean size, merges), from
the counters of the disk that holds the images.
--pin puts the client (or fio) on core 0 and the backend on core 1, so that figures on a small
machine repeat. The *-qd1 jobs measure latency (p50/p99) at queue depth 1.
--client-mem hugetlb puts the client's request buffers in 2 MiB huge pages (reserved for the
run as root, given back after), as a VM's RAM often is, instead of a memfd of 4 KiB pages. It matters for large O_DIRECT reads: the disk takes at most so many segments per
request, and with 4 KiB pages how contiguous a 1 MiB buffer is depends on the kernel's free
lists when the client started, which moved cold 1 MiB figures by +-30 % from run to run
(README, "Cold").

Prints a table (IOPS or MB/s, p50/p99 latency,
backend CPU seconds per GiB moved -- for fio-raw, fio's own CPU -- our ratio to each anchor),
then each performance target the run covers as met or MISSED, then the footprint (serving
1 TiB, opening 64 TiB, replaying a full log, with their limits); writes results.json,
results.csv and footprint.json beside it. Figures only: this is not a test.

An optional in-guest pass runs the same backends (not fio-raw) under a real Linux guest booted
by the project's QEMU harness, tests/guest/guest-run, with fio inside it on /dev/vda:

    contrib/bench/guest.py [--seconds 5] [--rounds 1] [--size 2G]

It reuses this file's images, backends, fio parsing and table, and writes guest-results.json.
Without usable KVM the guest runs under TCG, where small-block figures measure the emulator.
"""
import argparse, json, os, resource, signal, statistics, subprocess, sys, tempfile, time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(REPO, "target/release/vhost-user-vhdx")
BENCH = os.path.join(REPO, "target/release/examples/blk_bench")
TICK = os.sysconf("SC_CLK_TCK")

# name, client args, image kind ("full" or "empty"), fio args
JOBS = [
    ("4k-randread-qd32", ["--job", "randread", "--bs", "4k", "--qd", "32"], "full",
     ["--rw=randread", "--bs=4k"]),
    ("4k-randwrite-qd32", ["--job", "randwrite", "--bs", "4k", "--qd", "32"], "full",
     ["--rw=randwrite", "--bs=4k"]),
    ("4k-firsttouch-qd32-flush64", ["--job", "randwrite", "--bs", "4k", "--qd", "32",
                                    "--flush-every", "64"], "empty",
     ["--rw=randwrite", "--bs=4k", "--fsync=64"]),
    ("1m-seqread-qd8", ["--job", "read", "--bs", "1M", "--qd", "8"], "full",
     ["--rw=read", "--bs=1M"]),
    ("1m-seqwrite-qd8", ["--job", "write", "--bs", "1M", "--qd", "8"], "full",
     ["--rw=write", "--bs=1M"]),
    ("4k-randread-qd32-1q", ["--job", "randread", "--bs", "4k", "--qd", "32", "--queues", "1"],
     "full", ["--rw=randread", "--bs=4k"]),
    ("4k-randread-qd32-2q", ["--job", "randread", "--bs", "4k", "--qd", "32", "--queues", "2"],
     "full", ["--rw=randread", "--bs=4k"]),
    ("4k-randread-qd1", ["--job", "randread", "--bs", "4k", "--qd", "1", "--queues", "1"],
     "full", ["--rw=randread", "--bs=4k"]),
    ("4k-randwrite-qd1", ["--job", "randwrite", "--bs", "4k", "--qd", "1", "--queues", "1"],
     "full", ["--rw=randwrite", "--bs=4k"]),
]
BACKENDS = ["ours", "qsd-vhdx", "qsd-raw", "fio-raw"]
# More arguments for our serve (--serve-args).
SERVE_ARGS = []
# --variant NAME=ARGS: backends ours@NAME and ours-direct@NAME run with SERVE_ARGS + ARGS, so
# that settings (e.g. --poll-us values) are compared in the same interleaved rounds.
VARIANTS = {}
ALL_BACKENDS = BACKENDS + ["ours-direct", "qsd-direct-uring", "qsd-direct-threads", "fio-direct"]
COLD_BACKENDS = ["ours-direct", "ours", "qsd-direct-uring", "qsd-direct-threads", "fio-direct"]
# Backends that never read through the host page cache.
DIRECT = {"ours-direct", "qsd-direct-uring", "qsd-direct-threads", "fio-direct"}
# --pin: the client (or fio) on CLIENT_CPU, the backend on BACKEND_CPU.
PIN = None
CLIENT_CPU, BACKEND_CPU = "0", "1"


def pinned(cmd, cpu):
    return ["taskset", "-c", cpu] + cmd if PIN else cmd


def drop_caches():
    """Writes back and drops the host page cache (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def disk_counters(path):
    """The block device counters of the disk holding `path` (/sys/dev/block/MAJ:MIN/stat):
    read requests, read merges, sectors read, the same for writes, milliseconds spent by
    requests (read and write), milliseconds weighted by requests in flight, and the time they
    were read. None if unreadable."""
    dev = os.stat(path).st_dev
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat") as f:
            v = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return None
    return v[0], v[1], v[2], v[4], v[5], v[6], v[3] + v[7], v[10], time.monotonic() * 1000


def disk_delta(before, after):
    """What the disk saw during a job: requests, merges and the mean request size (KiB) --
    a 1 MiB read that reaches the disk as 1016 + 8 KiB (the client's buffer pages are not
    physically contiguous and the disk takes 254 segments) costs two requests."""
    if before is None or after is None:
        return {}
    d = [b - a for a, b in zip(before, after)]
    reqs, merges, sectors = d[0] + d[3], d[1] + d[4], d[2] + d[5]
    return {"disk_reqs": reqs, "disk_merges": merges,
            "disk_kib_per_req": sectors / 2 / reqs if reqs else 0.0,
            # Time from the block layer's queue to completion, and how many requests the
            # disk held on average: what the backend leaves the disk to do.
            "disk_ms_per_req": d[6] / reqs if reqs else 0.0,
            "disk_depth": d[7] / d[8] if d[8] else 0.0}


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def is_listening(sock):
    # A socket file exists from bind(); a client that connects before listen() is refused, and
    # QEMU does not retry. /proc/net/unix shows the listening state (__SO_ACCEPTCON) without
    # connecting, which could use up a backend's one connection.
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == sock and int(fields[3], 16) & 0x10000:
                return True
    return False


def start_backend(kind, image, sock, queues, log=subprocess.DEVNULL):
    """Starts backend `kind` serving `image` on `sock`; returns its Popen once it listens.
    Its stdout and stderr go to `log` (a file object; discarded by default)."""
    if os.path.exists(sock):
        os.unlink(sock)
    kind, _, variant = kind.partition("@")
    if kind in ("ours", "ours-direct"):
        cache = ["--cache", "none"] if kind == "ours-direct" else []
        extra = VARIANTS.get(variant, [])
        # A variant's --bin=PATH: another build of serve (e.g. before a change).
        binary = next((a[len("--bin="):] for a in extra if a.startswith("--bin=")), BIN)
        extra = [a for a in extra if not a.startswith("--bin=")]
        cmd = ([binary, "serve", "--socket-path", sock, "--num-queues", str(queues)] + cache
               + SERVE_ARGS + extra + [image])
    else:
        fmt = "raw" if kind == "qsd-raw" else "vhdx"
        opts = {"qsd-direct-uring": ",cache.direct=on,aio=io_uring",
                "qsd-direct-threads": ",cache.direct=on,aio=threads"}.get(kind, "")
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,node-name=file,filename={image}{opts}",
               "--blockdev", f"driver={fmt},node-name=disk,file=file",
               "--export", f"type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,"
                           f"addr.path={sock},writable=on,num-queues={queues}"]
    p = subprocess.Popen(pinned(cmd, BACKEND_CPU), stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log)
    for _ in range(500):
        if p.poll() is not None:
            raise SystemExit(f"{kind} exited with status {p.returncode} before listening on {sock}")
        if is_listening(sock):
            return p
        time.sleep(0.02)
    p.kill()
    p.wait()
    raise SystemExit(f"{kind} did not listen on {sock} within 10 s")


def stop_backend(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def children_cpu_seconds():
    """CPU seconds of every finished child process and of the descendants they waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# fio-direct's buffers: with --client-mem hugetlb, huge pages too (SysV shm, SHM_HUGETLB), so
# that the disk's limit is measured with buffers as contiguous as the client's.
FIO_DIRECT_MEM = []


def fio(image, fio_args, seconds, size, direct_qd=None, queues=1):
    """fio on the host: page-cache psync on one thread per core, or (direct_qd) io_uring with
    O_DIRECT at that depth on `queues` threads."""
    if direct_qd:
        engine = ["--ioengine=io_uring", "--direct=1", f"--iodepth={direct_qd}",
                  f"--numjobs={queues}"] + FIO_DIRECT_MEM
    else:
        # Synchronous page-cache I/O on one thread per core: what the host itself does with
        # the raw file (buffered io_uring punts to worker threads and measures far less).
        engine = ["--ioengine=psync", "--direct=0", "--invalidate=0",
                  f"--numjobs={os.cpu_count()}"]
    c0 = children_cpu_seconds()
    out = subprocess.run(
        pinned(["fio", "--name=j", f"--filename={image}"] + engine + [
         # fio reads a bare --runtime as whole seconds: 0.5 would be 0.
         f"--size={size}", f"--runtime={int(seconds * 1000)}ms", "--time_based",
         "--group_reporting", "--output-format=json"] + fio_args, CLIENT_CPU),
        check=True, capture_output=True, text=True).stdout
    r = parse_fio_json(out)
    # fio's CPU (its job processes included): the host doing the I/O itself.
    r["cpu_s"] = children_cpu_seconds() - c0
    return r


def parse_fio_json(out):
    """IOPS, MB/s, p50/p99 completion latency (us) and bytes moved of the first job in fio's
    --output-format=json output (anything fio printed before the JSON is skipped)."""
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6,
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000,
            "bytes": side["io_bytes"]}


def build_images(work, size):
    """A raw file of `size` bytes of incompressible data and a dynamic VHDX (32 MiB blocks)
    converted from it, so every block is allocated: returns (raw, vhdx) paths in `work`."""
    raw = os.path.join(work, "full.raw")
    full = os.path.join(work, "full.vhdx")
    print(f"building {size} images in {work} ...", file=sys.stderr)
    run(["fio", "--name=fill", f"--filename={raw}", f"--size={size}", "--rw=write",
         "--bs=1M", "--ioengine=psync", "--refill_buffers", "--output=/dev/null"])
    run([BIN, "convert", "-q", "-f", "raw", "-O", "vhdx", "-o", "block_size=32M", raw, full])
    return raw, full


def print_table(results, jobs, backends):
    """Prints the medians of `results` ((job, backend) -> list of runs) with our IOPS ratio to
    every other backend under each job; returns the rows. "ours" is ours-direct when it ran,
    else ours. A run whose cpu_s_per_gib is None (not measured) shows n/a."""
    me = ("ours-direct" if "ours-direct" in backends else "ours" if "ours" in backends
          else next(b for b in backends if b.startswith("ours")))
    def med(name, backend, key):
        values = [r[key] for r in results[(name, backend)]]
        return None if None in values else statistics.median(values)

    rows = []
    print(f"{'job':28} {'backend':18} {'IOPS':>10} {'MB/s':>9} {'p50 us':>8} {'p99 us':>8} "
          f"{'CPU s/GiB':>10}")
    for name in jobs:
        for backend in backends:
            row = {"job": name, "backend": backend}
            for key in ("iops", "mbps", "p50_us", "p99_us", "cpu_s_per_gib"):
                row[key] = med(name, backend, key)
            rows.append(row)
            cpu = "n/a" if row["cpu_s_per_gib"] is None else f"{row['cpu_s_per_gib']:.3f}"
            print(f"{name:28} {backend:18} {row['iops']:10.0f} {row['mbps']:9.1f} "
                  f"{row['p50_us']:8.0f} {row['p99_us']:8.0f} {cpu:>10}")
        ours = med(name, me, "iops")
        ratios = "  ".join(f"{me}/{b} = {ours / max(med(name, b, 'iops'), 1e-9):.2f}x"
                           for b in backends if b != me)
        print(f"{'':28} {ratios}")
    return rows


def machine():
    """One line naming the host: cores, kernel, QEMU version."""
    return f"{os.cpu_count()} cores, {os.uname().release}, " + subprocess.run(
        ["qemu-storage-daemon", "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--out", default=os.path.join(REPO, "target/bench"))
    ap.add_argument("--jobs", help="comma-separated job names to run (default: all)")
    ap.add_argument("--backends", help="comma-separated backends to run (default: all)")
    ap.add_argument("--no-footprint", action="store_true", help="skip the footprint figures")
    ap.add_argument("--cold", action="store_true",
                    help="measure the disk: drop the page cache before every job (root), "
                         "else O_DIRECT backends only")
    ap.add_argument("--pin", action="store_true",
                    help=f"client on core {CLIENT_CPU}, backend on core {BACKEND_CPU}")
    ap.add_argument("--client-mem", choices=["memfd", "hugetlb"], default="memfd",
                    help="where the client's request buffers live: a memfd of 4 KiB pages or "
                         "2 MiB huge pages, reserved for the run (root)")
    ap.add_argument("--serve-args", default="",
                    help="more arguments for our serve, e.g. '--aio io_uring'")
    ap.add_argument("--idle", action="store_true",
                    help="also measure each of our backends' CPU while a client stays connected "
                         "and idle for 10 s after 1 s of 4k QD32 reads")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="adds backends ours@NAME and ours-direct@NAME, our serve with ARGS "
                         "too (after --serve-args), e.g. --variant p0='--poll-us 0'; repeatable. "
                         "--bin=PATH among ARGS runs that build of serve instead")
    a = ap.parse_args()
    global JOBS, BACKENDS, PIN, SERVE_ARGS
    PIN = a.pin
    SERVE_ARGS = a.serve_args.split()
    for v in a.variant:
        name, eq, args = v.partition("=")
        if not eq or not name:
            raise SystemExit(f"--variant {v!r}: NAME=ARGS expected")
        VARIANTS[name] = args.split()
        ALL_BACKENDS.extend([f"ours@{name}", f"ours-direct@{name}"])
        DIRECT.add(f"ours-direct@{name}")
    if a.pin and os.cpu_count() < 2:
        raise SystemExit("--pin needs two cores")
    if a.jobs:
        JOBS = [j for j in JOBS if j[0] in a.jobs.split(",")]
    if a.cold:
        BACKENDS = COLD_BACKENDS
    if a.backends:
        BACKENDS = [b for b in ALL_BACKENDS if b in a.backends.split(",")]
    can_drop = a.cold and os.geteuid() == 0
    if a.cold and not can_drop:
        BACKENDS = [b for b in BACKENDS if b in DIRECT]
        print("cold: not root, so the page cache cannot be dropped: O_DIRECT backends only "
              f"({', '.join(BACKENDS)})")
    elif a.cold:
        print("cold: the host page cache is dropped before every job")
    if not any(b.startswith("ours") for b in BACKENDS):
        raise SystemExit("--backends must include ours or ours-direct: every ratio is ours "
                         "over an anchor")
    run(["cargo", "build", "--release", "--quiet", "--example", "blk_bench"], cwd=REPO)
    run(["cargo", "build", "--release", "--quiet"], cwd=REPO)
    client_mem = ["--mem", a.client_mem]
    given_back = None
    if a.client_mem == "hugetlb":
        given_back = reserve_huge_pages(JOBS)
        FIO_DIRECT_MEM[:] = ["--iomem=shmhuge"]
    try:
        results, work = measure(a, can_drop, client_mem)
    finally:
        if given_back is not None:
            given_back()
    report(a, results, work, can_drop)


def reserve_huge_pages(jobs):
    """Reserves enough 2 MiB pages for the hungriest job's buffers; returns what undoes it."""
    path = "/proc/sys/vm/nr_hugepages"
    # Twice the buffers: the client's, then fio's (rounded up, with its alignment) when the
    # client has left.
    need = 2 * max(-(-client_opt(c, "--qd", 32) * client_opt(c, "--bs", 4096)
                     * client_opt(c, "--queues", 1) // (2 << 20)) + 1 for _, c, _, _ in jobs)
    with open(path) as f:
        before = int(f.read())
    try:
        with open(path, "w") as f:
            f.write(str(before + need))
        with open(path) as f:
            got = int(f.read())
    except OSError as e:
        raise SystemExit(f"--client-mem hugetlb: cannot reserve huge pages ({e}); run as root")
    if got < before + need:
        with open(path, "w") as f:
            f.write(str(before))
        raise SystemExit(f"--client-mem hugetlb: {need} huge pages wanted, the kernel gave "
                         f"{got - before}")

    def give_back():
        with open(path, "w") as f:
            f.write(str(before))
    return give_back


def client_opt(client, flag, default):
    """A number among a job's client arguments (sizes may end in k, m or g), else `default`."""
    if flag not in client:
        return default
    v = client[client.index(flag) + 1].lower()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(v[:-1]) * units[v[-1]] if v[-1] in units else int(v)


def measure(a, can_drop, client_mem):
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="vhdx-bench-")
    raw, full = build_images(work, a.size)
    results = {}  # (job, backend) -> list of runs
    sock = os.path.join(work, "vhost.sock")
    for rnd in range(a.rounds):
        for name, client, kind, fio_args in JOBS:
            queues = client_opt(client, "--queues", 1)
            turn = rnd % len(BACKENDS)
            for backend in BACKENDS[turn:] + BACKENDS[:turn]:
                if kind == "empty":
                    image = os.path.join(work, f"empty-{backend}")
                    if os.path.exists(image):
                        os.unlink(image)
                    if backend not in ("qsd-raw", "fio-raw", "fio-direct"):
                        image += ".vhdx"
                        if os.path.exists(image):
                            os.unlink(image)
                        run([BIN, "create", "-q", "-o", "block_size=32M", image, "1T"])
                    else:
                        with open(image, "wb") as f:
                            f.truncate(1 << 40)
                else:
                    # fio-direct reads the VHDX file itself (the same bytes on the same disk);
                    # it writes to the raw file, as writing over the VHDX would destroy it.
                    writes = "write" in client[client.index("--job") + 1]
                    image = (raw if backend in ("qsd-raw", "fio-raw")
                             or (backend == "fio-direct" and writes) else full)
                region = ["--region", "1T" if kind == "empty" else a.size]
                if can_drop:
                    drop_caches()
                if backend in ("fio-raw", "fio-direct"):
                    qd = client_opt(client, "--qd", 32) if backend == "fio-direct" else None
                    disk0 = disk_counters(work)
                    r = fio(image, fio_args, a.seconds, "1T" if kind == "empty" else a.size,
                            direct_qd=qd, queues=queues)
                    disk1 = disk_counters(work)
                else:
                    p = start_backend(backend, image, sock, max(queues, 2))
                    c0 = cpu_seconds(p.pid)
                    disk0 = disk_counters(work)
                    out = subprocess.run(pinned([BENCH, "--socket", sock, "--seconds",
                                                 str(a.seconds)] + region + client_mem
                                                + client, CLIENT_CPU),
                                         check=True, capture_output=True, text=True).stdout
                    disk1 = disk_counters(work)
                    c1 = cpu_seconds(p.pid)
                    stop_backend(p)
                    r = json.loads(out)
                    r["cpu_s"] = c1 - c0
                r["cpu_s_per_gib"] = r["cpu_s"] / max(r["bytes"] / (1 << 30), 1e-9)
                r.update(disk_delta(disk0, disk1))
                results.setdefault((name, backend), []).append(r)
                disk = (f"  disk: {r['disk_reqs']} requests of {r['disk_kib_per_req']:.0f} KiB, "
                        f"{r['disk_merges']} merges, {r['disk_ms_per_req']:.2f} ms each, "
                        f"depth {r['disk_depth']:.2f}" if a.cold and "disk_reqs" in r else "")
                print(f"round {rnd + 1} {name:28} {backend:18} {r['iops']:10.0f} IOPS "
                      f"{r['mbps']:8.1f} MB/s{disk}", file=sys.stderr)
                if kind == "empty" and os.path.exists(image):
                    os.unlink(image)
    return results, work


def report(a, results, work, can_drop):
    full = os.path.join(work, "full.vhdx")
    sock = os.path.join(work, "vhost.sock")
    if a.idle:
        idle_cpu(work, full, sock)
    rows = print_table(results, [j[0] for j in JOBS], BACKENDS)
    machine_line = machine()
    mode = ("cold: page cache dropped before every job" if can_drop else
            "cold: O_DIRECT backends only" if a.cold else "page cache")
    mode += ", pinned" if a.pin else ""
    mode += ", client buffers in huge pages" if a.client_mem == "hugetlb" else ""
    print(f"({a.rounds} rounds x {a.seconds} s per job; {mode}; {machine_line}; medians)")

    def med(name, backend, key):
        return statistics.median(r[key] for r in results[(name, backend)])

    verdicts = targets(med, {name for name, *_ in JOBS})
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"machine": machine_line, "mode": mode, "rounds": a.rounds,
                   "seconds": a.seconds,
                   "size": a.size, "rows": rows, "targets": verdicts}, f, indent=1)
    with open(os.path.join(a.out, "results.csv"), "w") as f:
        f.write("job,backend,iops,mbps,p50_us,p99_us,cpu_s_per_gib\n")
        for r in rows:
            f.write(",".join(str(r[k]) for k in ("job", "backend", "iops", "mbps", "p50_us",
                                                  "p99_us", "cpu_s_per_gib")) + "\n")
    if not a.no_footprint:
        footprint(a, work, sock)
    subprocess.run(["rm", "-rf", work])


def targets(med, jobs):
    """Prints each of issue 5's and issue 9's targets that this run's jobs and backends cover,
    met or not."""
    verdicts = []

    def check(what, got, want, note=""):
        ok = got >= want
        verdicts.append({"target": what, "got": round(got, 3), "want": want, "met": ok})
        print(f"  {'met   ' if ok else 'MISSED'} {what}: {got:.2f}x (want >= {want}x){note}")

    def ratio(job, b, key="iops"):
        return med(job, "ours", key) / max(med(job, b, key), 1e-9)

    print("targets:")
    have = lambda job, *b: job in jobs and all(x in BACKENDS for x in b)

    def direct_ratio(job, b):
        return med(job, "ours-direct", "iops") / max(med(job, b, "iops"), 1e-9)

    # Issue 9's (cold: meaningful with --cold).
    if have("4k-randread-qd32-1q", "ours-direct", "qsd-direct-uring"):
        check("--cache none 4 KiB random read QD32 vs qsd-direct-uring",
              direct_ratio("4k-randread-qd32-1q", "qsd-direct-uring"), 1.0)
    if have("4k-randread-qd32-1q", "ours-direct", "fio-direct"):
        check("--cache none 4 KiB random read QD32 vs fio-direct",
              direct_ratio("4k-randread-qd32-1q", "fio-direct"), 0.85)
    if have("4k-randwrite-qd32", "ours-direct", "qsd-direct-uring"):
        check("--cache none 4 KiB random write QD32 vs qsd-direct-uring",
              direct_ratio("4k-randwrite-qd32", "qsd-direct-uring"), 1.0)
    if have("1m-seqread-qd8", "ours-direct", "qsd-direct-uring", "qsd-direct-threads"):
        best = max(med("1m-seqread-qd8", b, "iops")
                   for b in ("qsd-direct-uring", "qsd-direct-threads"))
        check("--cache none 1 MiB sequential read QD8 vs qsd's better mode",
              med("1m-seqread-qd8", "ours-direct", "iops") / max(best, 1e-9), 1.0)
    # The page-cache targets compare ours (writeback).
    have = lambda job, *b: job in jobs and all(x in BACKENDS for x in ("ours",) + b)
    if have("4k-randread-qd32", "qsd-vhdx"):
        check("4 KiB random read vs qsd-vhdx", ratio("4k-randread-qd32", "qsd-vhdx"), 1.3)
    if have("4k-randread-qd32-1q", "qsd-vhdx"):
        check("4 KiB random read QD32, one queue, vs qsd-vhdx",
              ratio("4k-randread-qd32-1q", "qsd-vhdx"), 1.3)
    if have("4k-randread-qd1", "qsd-vhdx"):
        # Latency: lower is better, so qsd's p50 over ours must reach 1 / 0.7.
        p50 = med("4k-randread-qd1", "ours", "p50_us")
        check("4 KiB random read QD1 p50 latency, qsd-vhdx / ours",
              med("4k-randread-qd1", "qsd-vhdx", "p50_us") / max(p50, 1e-9), round(1 / 0.7, 2),
              "  [ours <= 0.7x qsd's]")
    if have("4k-randread-qd32", "qsd-raw"):
        check("4 KiB random read vs qsd-raw", ratio("4k-randread-qd32", "qsd-raw"), 1.0)
    if have("4k-firsttouch-qd32-flush64", "qsd-vhdx"):
        check("first-touch random writes vs qsd-vhdx",
              ratio("4k-firsttouch-qd32-flush64", "qsd-vhdx"), 2.0)
    for job, what in (("1m-seqread-qd8", "sequential read"), ("1m-seqwrite-qd8", "sequential write")):
        if have(job, "qsd-raw"):
            check(f"{what} vs qsd-raw", ratio(job, "qsd-raw"), 0.9)
    if have("4k-randread-qd32-1q") and have("4k-randread-qd32-2q"):
        cores = os.cpu_count()
        # Each queue wants a core for its client thread and one for its queue thread.
        note = "" if cores >= 4 else (f"  [{cores} cores: the 2 client and 2 queue threads "
                                      "share them, so this is not the machine for it]")
        check("2 queues vs 1 queue, random read",
              med("4k-randread-qd32-2q", "ours", "iops") /
              max(med("4k-randread-qd32-1q", "ours", "iops"), 1e-9), 1.5, note)
    for job in sorted(jobs):
        for b in ("qsd-vhdx", "qsd-raw"):
            if b in BACKENDS and "ours" in BACKENDS:
                # Less CPU per GiB than the anchor: the anchor's figure over ours, above 1.
                check(f"CPU per GiB, {job}, {b} / ours",
                      med(job, b, "cpu_s_per_gib") / max(med(job, "ours", "cpu_s_per_gib"), 1e-9),
                      1.0)
    return verdicts


def idle_cpu(work, image, sock):
    """The CPU each of our backends uses over 10 s while a client is connected and idle, right
    after 1 s of 4k random reads at QD32 (the issue's target: 0.0 %)."""
    for backend in [b for b in BACKENDS if b.startswith("ours")]:
        p = start_backend(backend, image, sock, 2)
        client = subprocess.Popen(pinned([BENCH, "--socket", sock, "--seconds", "1", "--job",
                                          "randread", "--bs", "4k", "--qd", "32", "--idle",
                                          "11"], CLIENT_CPU), stdout=subprocess.DEVNULL)
        time.sleep(1.5)  # the job, then the last polling window (at most --poll-us)
        c0 = cpu_seconds(p.pid)
        time.sleep(10)
        c1 = cpu_seconds(p.pid)
        client.wait()
        stop_backend(p)
        print(f"idle, connected, 10 s after load: {backend:22} {100 * (c1 - c0) / 10:5.2f} % "
              f"of a core ({c1 - c0:.2f} s)")


def footprint(a, work, sock):
    # Footprint: serving a 1 TiB dynamic VHDX under first-touch load; opening a 64 TiB sparse
    # VHDX; replaying a full 1 MiB log.
    big = os.path.join(work, "1t.vhdx")
    run([BIN, "create", "-q", "-o", "block_size=32M", big, "1T"])
    p = start_backend("ours", big, sock, 2)
    subprocess.run([BENCH, "--socket", sock, "--seconds", str(a.seconds), "--region", "1T",
                    "--job", "randwrite", "--bs", "4k", "--qd", "32", "--flush-every", "64"],
                   check=True, capture_output=True)
    with open(f"/proc/{p.pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    stop_backend(p)
    kib = lambda k: int(status[k].split()[0]) // 1024
    figures = {"serve_1t_peak_rss_mib": kib("VmHWM"), "serve_1t_rss_anon_mib": kib("RssAnon"),
                 "serve_1t_rss_shared_mib": kib("RssShmem") + kib("RssFile")}
    print(f"serving a 1 TiB dynamic VHDX under first-touch load: peak RSS "
          f"{figures['serve_1t_peak_rss_mib']} MiB (private {figures['serve_1t_rss_anon_mib']}"
          f" MiB; mapped client memory and binary {figures['serve_1t_rss_shared_mib']} MiB)")
    fp = os.path.join(REPO, "target/release/examples/footprint")
    run(["cargo", "build", "--release", "--quiet", "--example", "footprint"], cwd=REPO)
    rss_ok = figures["serve_1t_peak_rss_mib"] < 64
    print(f"  {'met   ' if rss_ok else 'MISSED'} serving 1 TiB in < 64 MiB RSS")
    for what, limit_ms in (("open-64t", 100), ("replay-1m", 50)):
        line = subprocess.run([fp, what, work], check=True, capture_output=True,
                              text=True).stdout.strip()
        print(line)
        ms = float(line.rsplit(":", 1)[1].split()[0])
        print(f"  {'met   ' if ms < limit_ms else 'MISSED'} {what} in < {limit_ms} ms")
        figures[what] = line
        figures[what + "_ms"] = ms
    with open(os.path.join(a.out, "footprint.json"), "w") as f:
        json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
