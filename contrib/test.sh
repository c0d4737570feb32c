#!/usr/bin/env bash
# The project's one test command: install/verify the test peers, then run every test.
# Extra arguments go to `cargo test --release`, e.g.
#   contrib/test.sh --test peers_smoke
#   contrib/test.sh -- --nocapture
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

"$REPO/contrib/setup-test-deps.sh"

# The interpreter with pyvhdi, for tests/common (tests/peers/*.py).
export VHDX_PYTHON="${VHDX_VENV:-$REPO/.venv}/bin/python"

exec cargo test --release "$@"
