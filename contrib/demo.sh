#!/usr/bin/env bash
# A tour of vhost-user-vhdx on this machine, judged by QEMU's own tools at every step:
#
#   contrib/demo.sh [IMAGE]
#
# Builds the binary; creates IMAGE (default: a new 10 GiB dynamic VHDX in a temporary
# directory) unless it exists; writes to it, makes a differencing child over it and writes to
# that, trims, and shows what `info` and `check` say, what `qemu-img check` says, and that
# `qemu-img compare` finds the flattened chain identical to what was written.
#
# Then it serves the chain with `vhost-user-vhdx serve` to a real QEMU guest (the project's
# harness tests/guest/guest-run: Debian's kernel, a busybox initramfs; TCG when KVM is not
# usable), which writes and reads a pattern; after the backend's clean shutdown our check runs
# again and the pattern is read back on the host. DEMO_NO_GUEST=1 skips the guest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --quiet
BIN=$PWD/target/release/vhost-user-vhdx
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vhdx-demo-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
IMAGE=${1:-$WORK/disk.vhdx}

step() { printf '\n== %s\n' "$*"; }

if [ ! -e "$IMAGE" ]; then
    step "create a 10 GiB dynamic VHDX"
    "$BIN" create "$IMAGE" 10G
fi
step "write 8 MiB of 0x5a at 1 GiB, flush, read it back"
"$BIN" io -c "write -P 0x5a 1G 8M" -c flush -c "read -P 0x5a 1G 8M" "$IMAGE"

step "a differencing child over it; write 64 KiB of 0x77 at 1 GiB + 4 KiB in the child"
CHILD=$WORK/child.vhdx
"$BIN" create -b "$IMAGE" "$CHILD"
"$BIN" io -c "write -P 0x77 1073745920 64k" -c "discard 2G 64M" "$CHILD"

step "info of the chain"
"$BIN" info "$CHILD"

step "our check and qemu-img check"
"$BIN" check "$CHILD"
qemu-img check "$IMAGE"

step "flatten the chain to raw; compare with qemu-img"
"$BIN" convert -O raw "$CHILD" "$WORK/flat.raw"
python3 - "$WORK/expected.raw" <<'EOF'
import sys
with open(sys.argv[1], "wb") as f:
    f.truncate(10 << 30)
    f.seek(1 << 30); f.write(b"\x5a" * (8 << 20))
    f.seek((1 << 30) + 4096); f.write(b"\x77" * (64 << 10))
EOF
qemu-img compare -f raw -F raw "$WORK/expected.raw" "$WORK/flat.raw"
if [ "${DEMO_NO_GUEST:-}" != 1 ]; then
    step "serve the chain to a QEMU guest over vhost-user-blk (2 queues)"
    contrib/setup-test-deps.sh >/dev/null
    SOCK=$WORK/vhdx.sock
    RUST_LOG=info "$BIN" serve --socket-path "$SOCK" --num-queues 2 "$CHILD" 2> "$WORK/serve.log" &
    SERVE=$!
    for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
    cat > "$WORK/guest.sh" <<'EOF'
echo "guest sees $(cat /sys/block/vda/size) sectors on $(ls /sys/block/vda/mq | wc -l) queues"
dd if=/dev/zero bs=1M count=4 2>/dev/null | tr '\000' 'G' > /tmp/g
dd if=/tmp/g of=/dev/vda bs=1M seek=100 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda of=/tmp/h bs=1M skip=100 count=4 iflag=direct 2>/dev/null
cmp /tmp/g /tmp/h && echo "guest: 4 MiB written and read back through virtio-blk"
EOF
    tests/guest/guest-run --socket "$SOCK" --queues 2 "$WORK/guest.sh"
    kill -TERM "$SERVE"; wait "$SERVE"
    step "after the backend's clean shutdown"
    "$BIN" check "$CHILD"
    "$BIN" io -r -c "read -P 0x47 100M 4M" "$CHILD"
fi
echo "demo finished: every step was checked by qemu-img or read back"
