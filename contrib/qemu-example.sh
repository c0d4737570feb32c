#!/usr/bin/env bash
# The QEMU side of a vhost-user-vhdx disk (start the backend first):
#   vhost-user-vhdx serve --socket-path /tmp/vhdx.sock --num-queues 4 --cache none disk.vhdx &
# (--cache none: O_DIRECT, the production setting, as the guest caches the disk itself; on a
# filesystem without O_DIRECT, such as an old tmpfs, use --cache writeback.)
# Guest RAM must be shared memory (memory-backend-memfd,share=on) so the backend can map it.
# reconnect-ms: when the backend dies or is restarted (an upgrade, a crash, systemd's
# Restart=always), QEMU reconnects on its own and hands it the in-flight region, so every request
# the guest had submitted completes exactly once (INFLIGHT_SHMFD). Start the backend first: some
# QEMU versions abort when the very first connect fails.
exec qemu-system-x86_64 \
    -machine q35,accel=kvm:tcg,memory-backend=mem -m 2G -smp 4 \
    -object memory-backend-memfd,id=mem,size=2G,share=on \
    -chardev socket,id=vhdx0,path=/tmp/vhdx.sock,reconnect-ms=1000 \
    -device vhost-user-blk-pci,chardev=vhdx0,num-queues=4 \
    "$@"
