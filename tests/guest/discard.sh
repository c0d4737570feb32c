#!/bin/sh
# discard.sh DEV FILL_OFF FILL_LEN ZERO_OFF ZERO_LEN DISCARD_OFF DISCARD_LEN   (in the guest)
#
# Fills [FILL_OFF, +FILL_LEN) of DEV with 0xff bytes (O_DIRECT), then, inside that range,
#   * write-zeroes [ZERO_OFF, +ZERO_LEN) (util-linux blkdiscard -z, BLKZEROOUT; busybox's
#     blkdiscard has no -z): must read back as zeros with any backend;
#   * discards [DISCARD_OFF, +DISCARD_LEN) (blkdiscard): reads back as zeros with a backend
#     that deallocates (ours), unchanged with one that ignores discards (QEMU's vhdx driver).
# Everything is read back with O_DIRECT.
#
# Prints: "QUEUES n", the device's discard limits, "ZEROES OK", then "DISCARD READS ZEROS" or
# "DISCARD KEPT DATA" (not an error: discarding is advisory), and "DISCARD DONE".
set -eu
dev=$1 fill_off=$2 fill_len=$3 zero_off=$4 zero_len=$5 disc_off=$6 disc_len=$7
name=${dev##*/}
q=/sys/block/$name/queue
echo "QUEUES $(ls /sys/block/"$name"/mq | wc -l)"
echo "DISCARD_MAX $(cat "$q"/discard_max_bytes) GRANULARITY $(cat "$q"/discard_granularity) WRITE_ZEROES_MAX $(cat "$q"/write_zeroes_max_bytes)"

# Do LEN bytes of DEV at OFF, read with O_DIRECT, equal the first LEN bytes of FILE?
same() { # OFF LEN FILE
    dd if="$dev" bs=1M iflag=direct,skip_bytes,count_bytes skip="$1" count="$2" 2>/dev/null |
        cmp -s -n "$2" - "$3"
}
head -c "$fill_len" /dev/zero | tr '\000' '\377' >/tmp/ones

dd if=/tmp/ones of="$dev" bs=1M oflag=direct,seek_bytes seek="$fill_off" conv=fsync 2>/dev/null
same "$fill_off" "$fill_len" /tmp/ones || { echo "the 0xff fill does not read back" >&2; exit 1; }

/usr/local/sbin/blkdiscard -z -o "$zero_off" -l "$zero_len" "$dev"
same "$zero_off" "$zero_len" /dev/zero ||
    { echo "the write-zeroes range does not read back as zeros" >&2; exit 1; }
echo "ZEROES OK"

blkdiscard -o "$disc_off" -l "$disc_len" "$dev"
if same "$disc_off" "$disc_len" /dev/zero; then
    echo "DISCARD READS ZEROS"
elif same "$disc_off" "$disc_len" /tmp/ones; then
    echo "DISCARD KEPT DATA"
else
    echo "the discarded range reads back as neither zeros nor the old data" >&2
    exit 1
fi
echo "DISCARD DONE"
