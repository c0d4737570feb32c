#!/bin/sh
# pattern.sh DEV FILE OFFSET [OFFSET...]   (in the guest, run by guest-run)
#
# Writes FILE (a host-supplied pattern, size a multiple of 4 KiB) to DEV at every OFFSET (bytes,
# 4 KiB aligned) with O_DIRECT and a flush at the end, all offsets in parallel, writer i pinned
# to vCPU i mod nproc so that with several queues every queue carries requests. Then reads every
# region back with O_DIRECT, on another vCPU than wrote it, and compares its sha256 with FILE's.
#
# Prints: "QUEUES n", "QUEUE q IRQS n" per queue (n: interrupts the queue raised during the
# test, so n > 0 means the queue carried requests), "REGION offset sha256" per offset, and "PATTERN OK" at the end; exits 1 on a
# mismatch or an I/O error.
set -eu
dev=$1 file=$2
shift 2
[ $# -ge 1 ] || { echo "usage: pattern.sh DEV FILE OFFSET..." >&2; exit 2; }
size=$(stat -c %s "$file")
want=$(sha256sum <"$file" | cut -d' ' -f1)
ncpu=$(nproc)
name=${dev##*/}

# Interrupts per request queue of disk $1 so far, one "QUEUE_NUMBER COUNT" line per queue: each
# queue has its own MSI-X vector, "virtioN-req.Q" in /proc/interrupts.
queue_irqs() {
    awk -v v="$(basename "$(readlink "/sys/block/$1/device")")-req." '
        NR == 1 { ncpu = NF }
        index($NF, v) == 1 { n = 0; for (i = 2; i <= ncpu + 1; i++) n += $i
                             print substr($NF, length(v) + 1), n }' /proc/interrupts
}


queue_irqs "$name" >/tmp/irqs.before
i=0
pids=""
for off in "$@"; do
    taskset -c $((i % ncpu)) \
        dd if="$file" of="$dev" bs=1M oflag=direct,seek_bytes seek="$off" conv=fsync 2>/dev/null &
    pids="$pids $!"
    i=$((i + 1))
done
for p in $pids; do
    wait "$p" || { echo "pattern.sh: a writer failed" >&2; exit 1; }
done

i=0
bad=0
for off in "$@"; do
    got=$(taskset -c $(((i + 1) % ncpu)) \
        dd if="$dev" bs=1M iflag=direct,skip_bytes,count_bytes skip="$off" count="$size" 2>/dev/null |
        sha256sum | cut -d' ' -f1)
    echo "REGION $off $got"
    [ "$got" = "$want" ] || { echo "pattern.sh: region at $off reads back wrong" >&2; bad=1; }
    i=$((i + 1))
done

echo "QUEUES $(ls /sys/block/"$name"/mq | wc -l)"
# Requests completed on each queue during the test (interrupts are counted per queue).
queue_irqs "$name" | while read -r q n; do
    echo "QUEUE $q IRQS $((n - $(awk -v q="$q" '$1 == q { print $2 }' /tmp/irqs.before)))"
done
[ $bad = 0 ] || exit 1
echo "PATTERN OK"
