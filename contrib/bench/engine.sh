#!/usr/bin/env bash
# Engine benchmark: our VHDX engine against `qemu-img bench` on the same VHDX geometry, in one
# run, interleaved (ours, qemu, ours, qemu, ...) so that drift cancels. Not a test: figures only.
#
#   contrib/bench/engine.sh [ROUNDS]      (default 3 rounds)
#
# Jobs (4 KiB writes, page cache, one request at a time; qemu-img bench has no random pattern,
# so both sides write one 4 KiB request per 32 MiB block, scattered over the disk):
#   first-touch   2000 writes to unallocated blocks (each allocates a block), no flush
#   first-touch+f 2000 more writes to unallocated blocks, a flush every 64 writes
#   allocated     the first 2000 writes again, now to allocated blocks
#   flush         500 writes to allocated blocks, a flush after each: flush latency
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROUNDS=${1:-3}
cargo build --release --quiet --example engine_bench
BIN=target/release/vhost-user-vhdx
BENCH=target/release/examples/engine_bench
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vhdx-bench-XXXXXX")
trap 'rm -rf "$WORK"' EXIT

secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'; }

run_job() { # TOOL JOB IMAGE -> seconds
    local tool=$1 job=$2 img=$3 args
    case $job in
        first-touch|allocated) args=(-w -d 1 -c 2000 -s 4k -S 32M) ;;
        first-touch+f) args=(-w -d 1 -c 2000 -s 4k -S 32M -o 128G --flush-interval=64) ;;
        flush) args=(-w -d 1 -c 500 -s 4k -S 32M --flush-interval=1) ;;
    esac
    if [ "$tool" = ours ]; then "$BENCH" "${args[@]}" "$img" | secs
    else qemu-img bench -f vhdx -t writeback "${args[@]}" "$img" | secs; fi
}

declare -A total
for round in $(seq "$ROUNDS"); do
    for tool in ours qemu; do
        img="$WORK/$tool.vhdx"; rm -f "$img"
        if [ "$tool" = ours ]; then "$BIN" create -q -o block_size=32M "$img" 256G
        else qemu-img create -q -f vhdx -o block_size=32M "$img" 256G; fi
        for job in first-touch first-touch+f allocated flush; do
            s=$(run_job "$tool" "$job" "$img")
            total[$tool,$job]=$(echo "${total[$tool,$job]:-0} + $s" | bc -l)
        done
        qemu-img check -q "$img" || { echo "qemu-img check failed on $img" >&2; exit 1; }
    done
done

printf '%-14s %14s %14s %10s\n' job "ours (us/req)" "qemu (us/req)" "qemu/ours"
for job in first-touch first-touch+f allocated flush; do
    n=2000; [ "$job" = flush ] && n=500
    o=$(echo "${total[ours,$job]} / $ROUNDS / $n * 1000000" | bc -l)
    q=$(echo "${total[qemu,$job]} / $ROUNDS / $n * 1000000" | bc -l)
    printf '%-14s %14.1f %14.1f %9.2fx\n' "$job" "$o" "$q" "$(echo "$q / $o" | bc -l)"
done
echo "($ROUNDS rounds; $(nproc) cores; $(qemu-img --version | head -1); us/req = microseconds per request)"
