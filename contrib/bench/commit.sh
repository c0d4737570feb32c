#!/usr/bin/env bash
# Commit benchmark (issue 13): `commit` of a differencing child with half its blocks allocated
# into a fully written parent, against the disk's sequential copy rate (fio) and against
# qemu-img moving the same bytes. Not a test: figures only. One round; each round needs a fresh
# chain, so more rounds cost more setup than measurement.
#
#   contrib/bench/commit.sh [SIZE]        (default 4G; needs about 2.5 x SIZE of free space)
#
# What is timed (all through the page cache, as a user runs them; each ends with its fsync):
#   ours       vhost-user-vhdx commit CHILD: reads the child's SIZE/2 of data, writes it into
#              the parent's blocks in place, logs nothing but the locator and header changes
#   fio-copy   the disk's sequential copy rate: fio reads SIZE/2 from one file and then writes
#              SIZE/2 to another (1 MiB requests, end_fsync); rate = bytes / (read + write time)
#   qemu       qemu-img convert -O vhdx of a sparse raw file holding the same SIZE/2 of data.
#              qemu has no differencing VHDX (it cannot open the chain at all), so this is the
#              nearest job it can do: copy the same bytes into a VHDX.
# Rates are MB/s of the child's data; the target is ours >= 0.8 x fio-copy.
set -euo pipefail
SIZE=${1:-4G}
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
bench_setup commit

bytes=$(numfmt --from=iec "$SIZE")
block=$((32 << 20))
blocks=$((bytes / block))
half=$((blocks / 2 * block))
rate() { awk -v b="$1" -v t="$2" 'BEGIN { printf "%.0f", b / t / 1e6 }'; }

echo "setting up: a $SIZE parent, fully written; a child with every other 32 MiB block written"
"$BIN" create -q -o block_size=32M parent.vhdx "$SIZE"
cmds=()
for ((i = 0; i < blocks; i++)); do cmds+=(-c "write -P 0x11 $((i * block)) $block"); done
"$BIN" io "${cmds[@]}" parent.vhdx >/dev/null
"$BIN" create -q -b parent.vhdx child.vhdx
cmds=()
for ((i = 0; i < blocks; i += 2)); do cmds+=(-c "write -P 0x22 $((i * block)) $block"); done
"$BIN" io "${cmds[@]}" child.vhdx >/dev/null
# The same data as a sparse raw file, for qemu.
truncate -s "$SIZE" half.raw
for ((i = 0; i < blocks; i += 2)); do
    dd if=/dev/zero bs=1M count=32 status=none | tr '\0' '\042' |
        dd of=half.raw bs=1M seek=$((i * 32)) conv=notrunc status=none
done
sync

t0=$(now)
"$BIN" commit -q child.vhdx >/dev/null
t1=$(now)
ours=$(elapsed "$t0" "$t1")
# The parent now reads the child's data where the child had some, its own elsewhere.
"$BIN" io -r -c "read -P 0x22 0 $block" -c "read -P 0x11 $block $block" \
    -c "read -P 0x22 $(((blocks - 2) * block)) $block" parent.vhdx >/dev/null ||
    { echo "the committed parent does not read what the chain did" >&2; exit 1; }

t0=$(now)
qemu-img convert -t writeback -f raw -O vhdx -o block_size=32M half.raw qemu.vhdx
sync -f qemu.vhdx
t1=$(now)
qemu=$(elapsed "$t0" "$t1")

fio_secs() { # fio JSON -> seconds of the job's run
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print((j["read"]["runtime"] or j["write"]["runtime"]) / 1000)'
}
fio --name=w --filename=fio.src --rw=write --bs=1M --size="$half" --end_fsync=1 \
    --output-format=json >/dev/null
sync
r=$(fio --name=r --filename=fio.src --rw=read --bs=1M --size="$half" --output-format=json | fio_secs)
t0=$(now)
fio --name=w --filename=fio.dst --rw=write --bs=1M --size="$half" --end_fsync=1 \
    --output-format=json >/dev/null
t1=$(now)
w=$(elapsed "$t0" "$t1")
fio=$(awk -v r="$r" -v w="$w" 'BEGIN { print r + w }')

printf '%-10s %10s %10s\n' job seconds "MB/s"
printf '%-10s %10.2f %10s\n' ours "$ours" "$(rate "$half" "$ours")"
printf '%-10s %10.2f %10s   (read %.2f s + write %.2f s)\n' fio-copy "$fio" "$(rate "$half" "$fio")" "$r" "$w"
printf '%-10s %10.2f %10s\n' qemu "$qemu" "$(rate "$half" "$qemu")"
awk -v o="$ours" -v f="$fio" -v q="$qemu" 'BEGIN {
    printf "ours / fio-copy = %.2fx (target >= 0.8x: %s)   ours / qemu = %.2fx\n",
        f / o, (f / o >= 0.8 ? "met" : "MISSED"), q / o }'
echo "($SIZE chain, $((half >> 20)) MiB of child data; $(nproc) cores, $(uname -r), $(qemu-img --version | head -1))"
