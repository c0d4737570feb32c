#!/usr/bin/env bash
# instructions.sh [JOB...]: the backend's own (user-space) instructions per 4 KiB request,
# counted by callgrind while examples/blk_bench drives it over vhost-user. Instruction counts
# do not depend on the machine's load, so this is how a change to the request path is judged
# (the kernel's share, the page-cache copy, is not counted: see a perf profile for that).
#
#   contrib/bench/instructions.sh                 # randread randwrite
#   contrib/bench/instructions.sh randread        # one job
# Then: callgrind_annotate --inclusive=no target/bench/callgrind.JOB | head -40
set -euo pipefail
cd "$(dirname "$0")/../.."
jobs=("$@")
((${#jobs[@]})) || jobs=(randread randwrite)
cargo build --release --quiet
cargo build --release --quiet --example blk_bench
mkdir -p target/bench
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A 256 MiB dynamic VHDX, fully written, so that reads and writes meet allocated blocks.
head -c 256M /dev/urandom >"$work/raw"
target/release/vhost-user-vhdx convert -q -f raw -O vhdx -o block_size=32M "$work/raw" "$work/disk.vhdx"
# --sandbox off: valgrind cannot run a sandboxed process (it refuses the open-files limit, and
# its translations need executable memory and its output file an open, which seccomp and
# Landlock refuse). The filters run in the kernel, which callgrind does not count anyway.
for job in "${jobs[@]}"; do
    out=target/bench/callgrind.$job
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        target/release/vhost-user-vhdx serve --sandbox off --socket-path "$work/s" --num-queues 1 \
        "$work/disk.vhdx" \
        2>"$work/valgrind.err" &
    pid=$!
    for _ in $(seq 300); do [[ -S $work/s ]] && break; sleep 0.1; done
    [[ -S $work/s ]] || { echo "the backend did not start under valgrind" >&2; cat "$work/valgrind.err" >&2; exit 1; }
    ops=$(target/release/examples/blk_bench --socket "$work/s" --seconds 5 --job "$job" --bs 4k \
        --qd 32 --region 256M | python3 -c 'import json, sys; print(json.load(sys.stdin)["ops"])')
    kill -TERM "$pid"
    wait "$pid"
    rm -f "$work/s"
    ir=$(grep -o 'Collected : [0-9]*' "$work/valgrind.err" | awk '{print $3}')
    echo "$job: $ops requests, $((ir / ops)) backend instructions per request (startup included; $out)"
done
