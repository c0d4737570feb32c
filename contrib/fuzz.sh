#!/usr/bin/env bash
# Short fuzz runs of every target in fuzz/ (see fuzz/README.md), for CI and by hand:
#   contrib/fuzz.sh                  # every target, 60 s each
#   contrib/fuzz.sh 300 write_model  # one target, 5 minutes
# With a nightly toolchain the targets are built with AddressSanitizer (cargo-fuzz's default);
# without one, on stable with the sanitizer off (`-s none`): coverage-guided, with panics,
# overflow checks and debug assertions, but no ASan. A finding fails the run and is left in
# fuzz/artifacts/<target>/; replay it with `cargo fuzz run <target> <file>`.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO/fuzz"

SECONDS_PER_TARGET=${1:-60}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(open_image log_replay virtio_parse queue_requests inflight_region write_model restart)
fi

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

if rustup run nightly true >/dev/null 2>&1; then
    TOOLCHAIN=+nightly
    SANITIZER=(-s address)
else
    TOOLCHAIN=
    SANITIZER=(-s none)
fi

# Each target by name: `cargo fuzz build` of every binary would also build make_seeds with
# the coverage instrumentation, which does not link without the sanitizer runtime (`-s none`).
for t in "${TARGETS[@]}"; do
    cargo $TOOLCHAIN fuzz build "${SANITIZER[@]}" "$t"
done
# The seeder is an ordinary program.
cargo build --release --bin make_seeds

# Seed corpora (gitignored; grown corpora of earlier runs are kept): made images, the
# fixtures, the damaged files of tests/hostile.rs (seeds/hostile/), and their logs.
target/release/make_seeds corpus "$REPO"/tests/data/fixtures/*.vhdx.gz seeds/hostile

for t in "${TARGETS[@]}"; do
    # A target the seeder has nothing for starts from an empty corpus (libFuzzer needs the folder).
    mkdir -p "corpus/$t"
    echo "== fuzz $t: ${SECONDS_PER_TARGET}s ${TOOLCHAIN:-+stable} ${SANITIZER[*]}"
    cargo $TOOLCHAIN fuzz run "${SANITIZER[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -dict=vhdx.dict -rss_limit_mb=2048 \
        -timeout=60 -max_len=1048576 -print_final_stats=1
done
