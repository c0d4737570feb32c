# shellcheck shell=bash
# What the maintenance benchmarks (commit.sh, compact.sh) share. Source it, then call
# `bench_setup NAME`: it builds the release binary (BIN), makes a scratch directory (WORK,
# removed on exit) and changes into it.

bench_setup() { # NAME
    cd "$(dirname "${BASH_SOURCE[0]}")/../.."
    cargo build --release --quiet
    BIN=$PWD/target/release/vhost-user-vhdx
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/vhdx-bench-$1-XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    cd "$WORK"
}

now() { date +%s.%N; }

# Seconds from START to END (two `now` values).
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { print b - a }'; }
