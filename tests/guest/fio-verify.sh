#!/bin/sh
# fio-verify.sh DEV SIZE   (in the guest, run by guest-run with --file verify.fio)
#
# Runs verify.fio on DEV: random writes of 4-64 KiB with libaio, iodepth 16, then a read-back
# checking every block's crc32c. One job per queue (at most 2; each pinned to its own vCPU, so
# each submits on its own queue), each over its own SIZE-byte region.
#
# Prints: "JOBS n", "QUEUES n", "QUEUE q IRQS n" per queue (interrupts it raised during the
# test) and "FIO VERIFY OK".
set -eu
dev=$1 size=$2
name=${dev##*/}

# Interrupts per request queue of disk $1 so far, one "QUEUE_NUMBER COUNT" line per queue: each
# queue has its own MSI-X vector, "virtioN-req.Q" in /proc/interrupts.
queue_irqs() {
    awk -v v="$(basename "$(readlink "/sys/block/$1/device")")-req." '
        NR == 1 { ncpu = NF }
        index($NF, v) == 1 { n = 0; for (i = 2; i <= ncpu + 1; i++) n += $i
                             print substr($NF, length(v) + 1), n }' /proc/interrupts
}

queues=$(ls /sys/block/"$name"/mq | wc -l)
jobs=1
[ "$queues" -ge 2 ] && [ "$(nproc)" -ge 2 ] && jobs=2
queue_irqs "$name" >/tmp/irqs.before
echo "JOBS $jobs"
echo "QUEUES $queues"
FIO_DEV=$dev FIO_SIZE=$size FIO_JOBS=$jobs FIO_CPUS=0-$((jobs - 1)) \
    fio --output-format=terse --terse-version=3 verify.fio >/tmp/fio.out 2>/tmp/fio.err ||
    { cat /tmp/fio.err /tmp/fio.out >&2; echo "fio failed" >&2; exit 1; }
# terse v3: field 5 is the error number; fio exits non-zero on verify errors anyway.
cut -d';' -f1-5 /tmp/fio.out >&2
# Requests completed on each queue during the test (interrupts are counted per queue).
queue_irqs "$name" | while read -r q n; do
    echo "QUEUE $q IRQS $((n - $(awk -v q="$q" '$1 == q { print $2 }' /tmp/irqs.before)))"
done
echo "FIO VERIFY OK"
