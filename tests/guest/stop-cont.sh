#!/bin/sh
# stop-cont.sh DEV SECONDS   (in the guest, run by guest-run)
#
# For SECONDS of guest time: large O_DIRECT reads (4 MiB each, 64 MiB a round) and a 8 MiB
# write with fsync (a flush) a round, while the host pauses and resumes the VM (QMP stop/cont).
# Then both copies of the pattern must read back, and the kernel must have logged no I/O error.
#
# Prints "ROUNDS n" and "STOP CONT OK".
set -eu
dev=$1 secs=$2
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
dd if=/tmp/pat of="$dev" bs=1M oflag=direct conv=fsync 2>/dev/null
now() { cut -d. -f1 /proc/uptime; }
end=$(($(now) + secs))
n=0
while [ "$(now)" -lt "$end" ]; do
    dd if="$dev" of=/dev/null bs=4M count=16 iflag=direct 2>/dev/null
    dd if=/tmp/pat of="$dev" bs=1M seek=8 oflag=direct conv=fsync,notrunc 2>/dev/null
    n=$((n + 1))
done
dd if="$dev" bs=1M count=8 iflag=direct 2>/dev/null | cmp - /tmp/pat
dd if="$dev" bs=1M skip=8 count=8 iflag=direct 2>/dev/null | cmp - /tmp/pat
if dmesg | grep -iE 'I/O error|not a head|virtqueue.*broken|blk_update_request'; then
    echo "the kernel logged I/O errors (above)" >&2
    exit 1
fi
echo "ROUNDS $n"
echo "STOP CONT OK"
