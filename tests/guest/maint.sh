#!/bin/sh
# maint.sh DEV STEP...   (in the guest, run by guest-run; tests/guest_maintenance.rs drives it)
#
# The guest's half of the image-maintenance tests: each STEP works on the ext2 file system on
# DEV (busybox mke2fs; mounted with the ext4 driver), with cold caches so that every read comes
# from the disk. Steps, run in order:
#   mkfs            make the file system
#   copy DIR        copy host-supplied DIR (under /guest) to /DIR on it
#   verify SUMS     check every "sha256  ./path" line of SUMS against the file system
#   size            print "SECTORS n" (the disk's size in 512-byte sectors) and "FS_BLOCKS n"
#   zero PATH       overwrite the file PATH with zeros in place, then delete it (no fstrim: its
#                   blocks stay allocated in the image, all zeros, for the host's compact)
#
# Prints one line per step: "MKFS OK", "COPIED DIR", "VERIFIED n", "SECTORS n", "FS_BLOCKS n",
# "ZEROED bytes"; then "MAINT OK" after the last unmount.
set -eu
dev=$1
shift
mnt=/mnt

modprobe ext4
mounted=0
mnt_on() {
    if [ $mounted = 0 ]; then
        echo 3 >/proc/sys/vm/drop_caches
        mount -t ext4 "$dev" "$mnt"
        mounted=1
    fi
}
mnt_off() {
    if [ $mounted = 1 ]; then
        sync
        umount "$mnt"
        mounted=0
    fi
}

while [ $# -gt 0 ]; do
    step=$1
    shift
    case $step in
        mkfs)
            mke2fs -F -b 4096 -L vhdx-maint "$dev" >&2
            echo "MKFS OK"
            ;;
        copy)
            mnt_on
            cp -r "/guest/$1" "$mnt/$1"
            echo "COPIED $1"
            shift
            ;;
        verify)
            # Remount first: what was just written must come back from the disk.
            mnt_off
            mnt_on
            (cd "$mnt" && sha256sum -c "/guest/$1" >&2) || { echo "files differ" >&2; exit 1; }
            echo "VERIFIED $(wc -l <"/guest/$1")"
            shift
            ;;
        size)
            mnt_on
            echo "SECTORS $(cat "/sys/block/${dev#/dev/}/size")"
            echo "FS_BLOCKS $(df -k "$mnt" | awk 'NR == 2 { print $2 }')"
            ;;
        zero)
            mnt_on
            len=$(stat -c %s "$mnt/$1")
            dd if=/dev/zero of="$mnt/$1" bs=4096 count=$(((len + 4095) / 4096)) conv=notrunc 2>/dev/null
            sync
            rm "${mnt:?}/$1"
            echo "ZEROED $len"
            shift
            ;;
        *)
            echo "maint.sh: unknown step $step" >&2
            exit 2
            ;;
    esac
done
mnt_off
echo "MAINT OK"
