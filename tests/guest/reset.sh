#!/bin/sh
# reset.sh DEV   (in the guest, run by guest-run --reboot; the host resets the VM over QMP
#                 during the first boot)
#
# First boot: writes an 8 MiB random pattern at 16 MiB and, in the disk's 4096th 4 KiB block,
# a marker with the pattern's sha256; then reads 4 MiB blocks with O_DIRECT until the reset.
# Second boot (the marker is on the disk): the pattern reads back, a new write reads back, and
# the kernel logged no I/O error and no broken virtqueue (a stale completion from before the
# reset shows as "id N is not a head").
#
# Prints "RESET OK" on the second boot.
set -eu
dev=$1
marker=$(dd if="$dev" bs=4096 skip=4095 count=1 iflag=direct 2>/dev/null | head -c 8)
if [ "$marker" != "VHDXBOOT" ]; then
    dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
    dd if=/tmp/pat of="$dev" bs=1M seek=16 oflag=direct conv=fsync,notrunc 2>/dev/null
    { printf VHDXBOOT; sha256sum </tmp/pat | cut -d' ' -f1; } >/tmp/marker
    dd if=/tmp/marker of="$dev" bs=4096 seek=4095 conv=sync,fsync,notrunc oflag=direct 2>/dev/null
    while :; do
        dd if="$dev" of=/dev/null bs=4M count=16 iflag=direct 2>/dev/null
    done
fi
want=$(dd if="$dev" bs=4096 skip=4095 count=1 iflag=direct 2>/dev/null | head -c 72 | tail -c 64)
got=$(dd if="$dev" bs=1M skip=16 count=8 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "the pattern written before the reset reads back wrong" >&2; exit 1; }
dd if=/dev/urandom of=/tmp/new bs=1M count=4 2>/dev/null
dd if=/tmp/new of="$dev" bs=1M seek=32 oflag=direct conv=fsync,notrunc 2>/dev/null
dd if="$dev" bs=1M skip=32 count=4 iflag=direct 2>/dev/null | cmp - /tmp/new
if dmesg | grep -iE 'I/O error|not a head|virtqueue.*broken|blk_update_request'; then
    echo "the kernel logged I/O errors (above)" >&2
    exit 1
fi
echo "RESET OK"
