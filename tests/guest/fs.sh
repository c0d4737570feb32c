#!/bin/sh
# fs.sh DEV FILES_DIR BULK_FILE BULK_COUNT   (in the guest, run by guest-run)
#
# Makes an ext2 file system on DEV (busybox mke2fs; mounted with the ext4 driver), copies
# FILES_DIR (host-supplied files) to /files on it, and BULK_COUNT concatenated copies of
# BULK_FILE to /bulk; syncs, unmounts, drops the caches, mounts again and checks the sha256 of
# every copy against the originals. Then deletes /bulk and runs fstrim on the file system, and
# unmounts it cleanly for the host to inspect.
#
# Prints: "FILES n VERIFIED", "TRIMMED bytes" (what fstrim -v reported), "FS OK".
set -eu
dev=$1 files=$2 bulk=$3 count=$4
mnt=/mnt

modprobe ext4
mke2fs -F -b 4096 -L vhdx-guest "$dev" >&2
mount -t ext4 "$dev" "$mnt"
cp -r "$files" "$mnt/files"
i=0
while [ $i -lt "$count" ]; do cat "$bulk"; i=$((i + 1)); done >"$mnt/bulk"
(cd "$files" && find . -type f | sort | xargs sha256sum) >/tmp/files.sha256
i=0
while [ $i -lt "$count" ]; do cat "$bulk"; i=$((i + 1)); done | sha256sum | sed 's|-$|bulk|' >/tmp/bulk.sha256
sync
umount "$mnt"

# Read everything back from the disk, not from the page cache.
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 "$dev" "$mnt"
(cd "$mnt/files" && sha256sum -c /tmp/files.sha256 >&2) || { echo "copies differ" >&2; exit 1; }
(cd "$mnt" && sha256sum -c /tmp/bulk.sha256 >&2) || { echo "bulk differs" >&2; exit 1; }
echo "FILES $(wc -l </tmp/files.sha256) VERIFIED"

rm "$mnt/bulk"
sync
out=$(fstrim -v "$mnt")
echo "fstrim: $out" >&2
echo "TRIMMED $(echo "$out" | sed -n 's/.*: \([0-9]*\) bytes trimmed.*/\1/p')"
umount "$mnt"
echo "FS OK"
