#!/usr/bin/env bash
# Compact benchmark: `vhost-user-vhdx compact` of a dynamic VHDX with half its blocks zero,
# against the disk's sequential copy rate (fio) and against `qemu-img convert` of the same file
# to a new VHDX (what a user without `compact` does: it also drops zero blocks). Not a test:
# figures only.
#
#   contrib/bench/compact.sh [SIZE]       (default 4G; 32 MiB blocks, every other block zeros)
#
# Rates are the input file's length over the elapsed time (what the user waits for, per byte
# of image). The copy rate is fio's sequential read and write rates combined as one copy
# (1 / (1/read + 1/write)), O_DIRECT, 1 MiB requests, on the same filesystem.
set -euo pipefail
SIZE=${1:-4G}
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
bench_setup compact

bytes=$(numfmt --from=iec "$SIZE")
blocks=$((bytes / (32 << 20)))

# fio: sequential read and write rates of this filesystem (MiB/s).
fio_rate() { # RW
    fio --name=seq --filename=fio.dat --rw="$1" --bs=1M --size="$SIZE" --direct=1 \
        --ioengine=psync --end_fsync=1 --output-format=json |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; k=sys.argv[1]; print(j[k]["bw"]/1024)' "$2"
}
w=$(fio_rate write write)
r=$(fio_rate read read)
rm -f fio.dat
copy=$(echo "1 / (1/$r + 1/$w)" | bc -l)

# The image: every block allocated, odd blocks zeros.
"$BIN" create -q -o block_size=32M in.vhdx "$SIZE"
cmds=()
for ((b = 0; b < blocks; b++)); do
    if ((b % 2)); then cmds+=(-c "write -P 0 $((b * 32))M 32M")
    else cmds+=(-c "write -P $((b % 250 + 1)) $((b * 32))M 32M"); fi
done
"$BIN" io "${cmds[@]}" in.vhdx >/dev/null
sync
len=$(stat -c %s in.vhdx)
cp --sparse=always in.vhdx ref.vhdx
sync

t0=$(now)
qemu-img convert -f vhdx -O vhdx in.vhdx converted.vhdx
sync -f converted.vhdx
t1=$(now)
out=$("$BIN" compact in.vhdx)
t2=$(now)
qemu-img compare -q ref.vhdx in.vhdx || { echo "compact changed the content" >&2; exit 1; }
qemu-img check -q in.vhdx || { echo "qemu-img check failed" >&2; exit 1; }

mib=$(echo "$len / 1048576" | bc -l)
tq=$(elapsed "$t0" "$t1")
tc=$(elapsed "$t1" "$t2")
printf 'image: %s virtual, %s blocks of 32 MiB, half zeros; file %d -> %d bytes\n' \
    "$SIZE" "$blocks" "$len" "$(stat -c %s in.vhdx)"
echo "compact: $out"
printf '%-28s %10s %12s\n' what seconds "MiB/s"
printf '%-28s %10s %12.0f\n' "fio read" - "$r"
printf '%-28s %10s %12.0f\n' "fio write" - "$w"
printf '%-28s %10s %12.0f\n' "fio copy (combined)" - "$copy"
printf '%-28s %10.2f %12.0f\n' "qemu-img convert -O vhdx" "$tq" "$(echo "$mib / $tq" | bc -l)"
printf '%-28s %10.2f %12.0f\n' "vhost-user-vhdx compact" "$tc" "$(echo "$mib / $tc" | bc -l)"
printf 'compact / copy rate: %.2fx; compact / qemu-img convert: %.2fx faster\n' \
    "$(echo "$mib / $tc / $copy" | bc -l)" "$(echo "$tq / $tc" | bc -l)"
echo "($(nproc) cores; $(qemu-img --version | head -1); page cache as it is)"
