#!/usr/bin/env bash
# The project's one test command: install/verify the test peers, then run every test.
# Extra arguments go to `cargo test --release`, e.g.
#   contrib/test.sh --test peers_smoke
#   contrib/test.sh -- --nocapture
#
# Before the tests, every fuzz target runs for a short while (contrib/fuzz.sh; a finding fails
# the run). VHDX_FUZZ_SECONDS sets the seconds per target (default 20; 6 targets);
# VHDX_FUZZ_SECONDS=0 skips fuzzing. It runs first so that cargo test's summaries stay the last
# output.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

FUZZ_SECONDS=${VHDX_FUZZ_SECONDS:-20}
if ! [[ "$FUZZ_SECONDS" =~ ^[0-9]+$ ]]; then
    echo "VHDX_FUZZ_SECONDS must be a number of seconds (0: no fuzzing), not '$FUZZ_SECONDS'" >&2
    exit 2
fi

"$REPO/contrib/setup-test-deps.sh"

# The interpreter with pyvhdi, for tests/common (tests/peers/*.py).
export VHDX_PYTHON="${VHDX_VENV:-$REPO/.venv}/bin/python"

if (( 10#$FUZZ_SECONDS > 0 )); then
    "$REPO/contrib/fuzz.sh" "$((10#$FUZZ_SECONDS))"
fi

cargo test --release "$@"

# serve's data path is io_uring where it works (`--aio auto`), so the run above used io_uring
# here; the suites that drive serve run again on the thread pool, the fallback for kernels and
# containers without io_uring, so that both stay tested (about two minutes). Only on a full
# run: with arguments, the caller chose what to run.
if (( $# == 0 )); then
    echo "--- again with VHDX_SERVE_ARGS=\"--aio threads\": blkio, vmm_lifecycle, serve_kill9, hostile_vmm, guest pattern_*"
    VHDX_SERVE_ARGS="--aio threads" cargo test --release \
        --test blkio --test vmm_lifecycle --test serve_kill9 --test hostile_vmm
    # One guest pass of each cache mode on the pool too (about 20 s under TCG).
    VHDX_SERVE_ARGS="--aio threads" cargo test --release --test guest pattern_
fi
