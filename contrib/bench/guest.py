#!/usr/bin/env python3
"""In-guest fio pass: the backends of run.py under a real Linux guest.

    contrib/bench/guest.py [--seconds 5] [--rounds 1] [--size 2G] [--queues 1] [--cpus N]
                           [--backends ours,qsd-vhdx,qsd-raw] [--timeout S] [--out DIR]

Builds the same images as run.py (a dynamic VHDX with 32 MiB blocks, fully written once, and a
raw file with the same content) and, for every backend -- ours, qsd-vhdx, qsd-raw, as in
run.py -- interleaved over the rounds (A B C A B C ...), starts the backend, boots one guest on
it with tests/guest/guest-run and runs contrib/bench/guest-fio.sh there: fio on /dev/vda
(libaio, direct=1), one run per job, --seconds each:

    4k-randread-qd32  4k-randwrite-qd32  1m-seqread-qd8  1m-seqwrite-qd8

The backend's CPU time (utime + stime of /proc/PID/stat) is read when the guest prints BEGIN
and END around each fio run, which the host sees as they arrive by watching the file QEMU
writes the guest's stdout serial port to (guest-run keeps it in its work directory, which
TMPDIR places); so the guest's boot is not counted. Where that fails the CPU column says n/a.

guest-run uses KVM only when /dev/kvm is usable and the CPU has vmx/svm, TCG otherwise (its
status line says which, accel=...). Under TCG every guest instruction is emulated: the
small-block figures measure the emulator, not the backends. Prints a table (IOPS, MB/s, p50/p99
completion latency in the guest, backend CPU seconds per GiB moved, our ratio to each qsd) and
writes target/bench/guest-results.json. Figures only: this is not a test.
"""
import argparse, glob, json, os, re, shutil, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (contrib/bench/run.py: backends, images, fio JSON, table)

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_RUN = os.path.join(bench.REPO, "tests/guest/guest-run")
GUEST_SCRIPT = os.path.join(HERE, "guest-fio.sh")

# name (as in run.py), fio options for guest-fio.sh
JOBS = [
    ("4k-randread-qd32", "--rw=randread --bs=4k --iodepth=32"),
    ("4k-randwrite-qd32", "--rw=randwrite --bs=4k --iodepth=32"),
    ("1m-seqread-qd8", "--rw=read --bs=1M --iodepth=8"),
    ("1m-seqwrite-qd8", "--rw=write --bs=1M --iodepth=8"),
]
BACKENDS = ["ours", "qsd-vhdx", "qsd-raw"]
GUEST_RUN_STATUS = {124: "the guest timed out", 125: "guest-run or the guest's boot failed"}


class Failed(Exception):
    """A failure worth one line: a backend that died, a guest that failed."""


def watch(guest, backend, backend_name, rundir):
    """While guest-run runs, follows the guest's stdout as QEMU writes it and reads the
    backend's CPU seconds at every BEGIN/END line: returns {job: {"begin": (t, cpu), "end":
    (t, cpu)}}, empty if the live file never showed up. Stops the guest if the backend dies."""
    marks, live, seen, buf = {}, None, 0, b""
    while guest.poll() is None:
        if backend.poll() is not None:
            stop_guest(guest)
            raise Failed(f"{backend_name} {ended(backend.returncode)} while the guest ran")
        if live is None:
            found = glob.glob(os.path.join(rundir, "guest-run.*", "stdout"))
            live = found[0] if found else None
        if live is not None:
            try:
                with open(live, "rb") as f:
                    f.seek(seen)
                    data = f.read()
            except FileNotFoundError:  # guest-run removed its work directory: it is ending
                data = b""
            seen += len(data)
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                m = re.fullmatch(rb"(BEGIN|END) (\S+)\r?", line)
                if m:
                    marks.setdefault(m[2].decode(), {})[m[1].decode().lower()] = (
                        time.monotonic(), bench.cpu_seconds(backend.pid))
        time.sleep(0.01)
    return marks


def ended(returncode):
    """How a process ended, from Popen.returncode (negative: killed by that signal)."""
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def stop_guest(guest):
    """Stops guest-run and everything it started if it still runs. guest-run was started in a
    session of its own; its `timeout` puts itself and QEMU into a process group of their own
    (so a signal to guest-run's group misses them), but not into another session."""
    if guest.poll() is not None:
        return
    for pid in session_members(guest.pid):
        try:
            os.kill(pid, signal.SIGTERM)  # timeout passes it on to QEMU
        except ProcessLookupError:
            pass
    guest.wait()
    for _ in range(100):  # QEMU, no longer our child, may take a moment to go
        if not session_members(guest.pid):
            break
        time.sleep(0.1)


def session_members(sid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[3]) == sid:  # field 6 of stat, the session id
                pids.append(int(entry))
    return pids


def parse_stdout(out):
    """guest-fio.sh's stdout -> (info lines {"CPU": ..., "DISK": ...}, {job: fio JSON text})."""
    info, blocks, current = {}, {}, None
    for line in out.splitlines():
        if current is not None:
            if line == "JSON-END":
                current = None
            else:
                blocks[current].append(line)
        elif line.startswith("JSON "):
            current = line[5:]
            blocks[current] = []
        elif " " in line and line.split(" ", 1)[0] in ("CPU", "VCPUS", "DISK"):
            key, value = line.split(" ", 1)
            info[key] = value
    return info, {job: "\n".join(lines) for job, lines in blocks.items()}


def one_boot(a, backend_name, image, work, rnd):
    """Serves `image` with `backend_name`, boots one guest that runs every job on it; returns
    the run's record: per-job fio figures and backend CPU, accel, boot time, guest info."""
    sock = os.path.join(work, "vhost.sock")
    rundir = tempfile.mkdtemp(dir=work, prefix="guest-")
    log_path = os.path.join(work, f"{backend_name}.log")
    tag = f"round {rnd + 1} {backend_name}"
    backend_log = f"guest-{backend_name}-round{rnd + 1}-backend.log"  # names of kept logs
    guest_log = f"guest-{backend_name}-round{rnd + 1}-guest-run.log"
    cmd = [GUEST_RUN, "--socket", sock, "--queues", str(a.queues), "--timeout", str(a.timeout)]
    if a.cpus:
        cmd += ["--cpus", str(a.cpus)]
    cmd += [GUEST_SCRIPT, str(a.seconds)] + [word for job in JOBS for word in job]
    with open(log_path, "w") as log:
        try:
            backend = bench.start_backend(backend_name, image, sock, a.queues, log)
        except SystemExit as e:  # start_backend's one-line message
            raise Failed(f"{tag}: {e}; its log: {keep(log_path, a.out, backend_log)}") from None
    guest = None
    try:
        cpu_start = bench.cpu_seconds(backend.pid)
        with open(os.path.join(rundir, "out"), "w") as out, \
                open(os.path.join(rundir, "err"), "w") as err:
            # Its own session, so that stopping it stops its timeout and QEMU too.
            guest = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                     env=dict(os.environ, TMPDIR=rundir),
                                     start_new_session=True)
            marks = watch(guest, backend, backend_name, rundir)
        cpu_total = bench.cpu_seconds(backend.pid) - cpu_start
    except Failed as e:
        raise Failed(f"{tag}: {e}; its log: {keep(log_path, a.out, backend_log)}") from None
    finally:
        if guest is not None:
            stop_guest(guest)
        bench.stop_backend(backend)
    with open(os.path.join(rundir, "out")) as f:
        stdout = f.read()
    with open(os.path.join(rundir, "err")) as f:
        stderr = f.read()
    if backend.returncode != 0:
        print(f"{tag}: warning: the backend {ended(backend.returncode)} after SIGTERM; its "
              f"log: {keep(log_path, a.out, backend_log)}", file=sys.stderr)
    if guest.returncode != 0:
        why = GUEST_RUN_STATUS.get(guest.returncode, "the script in the guest failed")
        # The most telling line: guest-run's own error, else the script's last words.
        lines = [ln for ln in stderr.splitlines()
                 if ln.strip() and not ln.startswith("guest-run: ---")]
        first = next((ln for ln in lines if ln.startswith("guest-run:")),
                     lines[-1] if lines else "")
        saved = keep(os.path.join(rundir, "err"), a.out, guest_log)
        raise Failed(f"{tag}: guest-run exited with {guest.returncode} ({why}): {first.strip()} "
                     f"(all of its stderr: {saved})")
    status = re.search(r"^guest-run: accel=(\S+) boot=([\d.]+)s script=([\d.]+)s", stderr, re.M)
    info, blocks = parse_stdout(stdout)
    record = {"round": rnd + 1, "backend": backend_name,
              "accel": status[1] if status else "unknown",
              "boot_s": float(status[2]) if status else None,
              "script_s": float(status[3]) if status else None,
              "guest_cpu": info.get("CPU", "unknown"), "vcpus": info.get("VCPUS", "?"),
              "disk": info.get("DISK", "?"), "backend_cpu_total_s": cpu_total, "jobs": {}}
    for name, _ in JOBS:
        if name not in blocks:
            raise Failed(f"{tag}: the guest printed no fio output for {name}")
        try:
            r = bench.parse_fio_json(blocks[name])
        except (ValueError, KeyError, IndexError) as e:
            raise Failed(f"{tag}: unreadable fio output for {name} ({e})") from None
        m = marks.get(name, {})
        if "begin" in m and "end" in m:
            r["cpu_s"] = m["end"][1] - m["begin"][1]
            r["window_s"] = m["end"][0] - m["begin"][0]
            r["cpu_s_per_gib"] = r["cpu_s"] / max(r["bytes"] / (1 << 30), 1e-9)
        else:
            r["cpu_s"] = r["window_s"] = r["cpu_s_per_gib"] = None
        record["jobs"][name] = r
    return record


def keep(path, out, name):
    """Copies a log out of the work directory (which goes away) to `out`/`name`; returns that."""
    dest = os.path.join(out, name)
    shutil.copyfile(path, dest)
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="per fio job (default 5)")
    ap.add_argument("--rounds", type=int, default=1, help="boots per backend (default 1)")
    ap.add_argument("--size", default="2G", help="image size (default 2G)")
    ap.add_argument("--queues", type=int, default=1, help="virtio queues (default 1)")
    ap.add_argument("--cpus", type=int, help="guest vCPUs (default: guest-run's)")
    ap.add_argument("--backends", help="comma-separated subset of " + ",".join(BACKENDS))
    ap.add_argument("--timeout", type=int,
                    help="per guest, seconds (default: 120 + 30 per job + the fio time)")
    ap.add_argument("--out", default=os.path.join(bench.REPO, "target/bench"),
                    help="where guest-results.json and failure logs go (default target/bench)")
    a = ap.parse_args()
    backends = BACKENDS
    if a.backends:
        backends = [b for b in BACKENDS if b in a.backends.split(",")]
        if "ours" not in backends:
            raise SystemExit("--backends must include ours: every ratio is ours over an anchor")
    if a.timeout is None:
        # Generous: under TCG a boot takes seconds (more on a loaded host), and so does fio's
        # own start-up in the guest before every job.
        a.timeout = 120 + len(JOBS) * (30 + a.seconds)
    bench.run(["cargo", "build", "--release", "--quiet"], cwd=bench.REPO)
    # Builds the cached guest image now if needed, so that no boot's timeout pays for it.
    bench.run([GUEST_RUN, "--build-only"])
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="vhdx-guest-bench-")
    try:
        raw, full = bench.build_images(work, a.size)
        runs, results = [], {}  # results: (job, backend) -> list of runs, as in run.py
        for rnd in range(a.rounds):
            for backend in backends:
                image = raw if backend == "qsd-raw" else full
                rec = one_boot(a, backend, image, work, rnd)
                runs.append(rec)
                for name, r in rec["jobs"].items():
                    results.setdefault((name, backend), []).append(r)
                print(f"round {rnd + 1} {backend:9} accel={rec['accel']} boot {rec['boot_s']} s: "
                      + ", ".join(f"{n} {r['iops']:.0f} IOPS" for n, r in rec["jobs"].items()),
                      file=sys.stderr)
    except Failed as e:
        raise SystemExit(f"guest.py: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    accels = sorted({r["accel"] for r in runs})
    guest_cpu = runs[0]["guest_cpu"]
    if accels == ["kvm"]:
        print(f"In-guest fio; the guest runs under KVM (guest-run accel=kvm; guest CPU "
              f"'{guest_cpu}'): hardware virtualisation, so the figures include the guest's own "
              f"virtio stack but not an emulator.")
    else:
        print(f"In-guest fio; the guest runs under {'/'.join(x.upper() for x in accels)} "
              f"(guest-run accel={','.join(accels)}; guest CPU '{guest_cpu}'): every guest "
              f"instruction is emulated, so the small-block (4 KiB) figures measure the emulator, not the "
              f"backends; the 1 MiB jobs, with little guest work per byte, say more.")
    rows = bench.print_table(results, [j[0] for j in JOBS], backends)
    machine = bench.machine()
    cpu_note = ("CPU s/GiB: backend CPU between the guest's BEGIN/END lines around each fio run, "
                "which include fio's start-up in the guest"
                if all(r["cpu_s"] is not None for rs in results.values() for r in rs) else
                "CPU s/GiB: n/a where the backend's CPU could not be separated from the boot")
    print(f"({a.rounds} rounds x {a.seconds} s per job; guest {runs[0]['vcpus']} vCPUs, "
          f"{a.queues} queue(s), disk {runs[0]['disk'].split()[0]}; {machine}; medians; "
          f"{cpu_note})")
    with open(os.path.join(a.out, "guest-results.json"), "w") as f:
        json.dump({"accel": accels, "guest_cpu": guest_cpu, "machine": machine,
                   "rounds": a.rounds, "seconds": a.seconds, "size": a.size,
                   "queues": a.queues, "vcpus": runs[0]["vcpus"],
                   "rows": rows, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
