#!/bin/sh
# guest-fio.sh SECONDS NAME 'FIO ARGS' [NAME 'FIO ARGS']...
#
# In the guest, run by contrib/bench/guest.py through tests/guest/guest-run: one fio run per
# NAME on the first disk (libaio, O_DIRECT, SECONDS each), one after another. Prints, on stdout:
#
#   VCPUS <n>
#   CPU <the guest's CPU model>          (QEMU's "QEMU TCG CPU ..." under TCG)
#   DISK <device> <bytes> <queues>
#   BEGIN <name> / END <name>            just before and just after each fio run: the host
#                                        watches for them as they arrive, to read the backend's
#                                        CPU time around the run without the boot
#   JSON <name>, fio's JSON output, JSON-END   for every run, after the last END, so that the
#                                        serial port's traffic falls outside every run
set -eu
secs=$1
shift
dev=${VHDX_GUEST_DISKS%% *}
[ -b "$dev" ] || { echo "no disk (VHDX_GUEST_DISKS='${VHDX_GUEST_DISKS:-}')" >&2; exit 1; }
name=${dev##*/}
echo "VCPUS $(nproc)"
echo "CPU $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
# shellcheck disable=SC2012  # sysfs names are plain
echo "DISK $dev $(($(cat /sys/block/"$name"/size) * 512)) $(ls /sys/block/"$name"/mq | wc -l)"

names=""
while [ $# -ge 2 ]; do
    job=$1 args=$2
    shift 2
    names="$names $job"
    echo "BEGIN $job"
    # $args is split into words on purpose: it is a list of --key=value options.
    # shellcheck disable=SC2086
    fio --name="$job" --filename="$dev" --ioengine=libaio --direct=1 --time_based \
        --runtime="$secs" --eta=never --output-format=json --output="/tmp/$job.json" \
        $args 2>"/tmp/$job.err" ||
        { cat "/tmp/$job.err" >&2; echo "fio failed on job $job" >&2; exit 1; }
    echo "END $job"
done
for job in $names; do
    echo "JSON $job"
    cat "/tmp/$job.json"
    echo "JSON-END"
done
