#!/usr/bin/env bash
# The Cloud Hypervisor side of a vhost-user-vhdx disk (start the backend first):
#   vhost-user-vhdx serve --socket-path /tmp/vhdx.sock --num-queues 4 --cache none disk.vhdx &
# (--cache none: O_DIRECT, the production setting, as the guest caches the disk itself; on a
# filesystem without O_DIRECT, such as an old tmpfs, use --cache writeback.)
# Cloud Hypervisor refuses to start when its num_queues exceeds what the backend offers; the
# backend offers 16 by default (--num-queues, up to 64). Guest memory must be shared.
# Queues of up to 1024 entries are accepted. Cloud Hypervisor reconnects by itself when the
# backend restarts and uses the backend's in-flight region (INFLIGHT_SHMFD) so that no request is
# lost: it restarts a ring at the avail index, which only in-flight tracking makes safe.
exec cloud-hypervisor \
    --memory size=2G,shared=on \
    --cpus boot=4 \
    --disk vhost_user=true,socket=/tmp/vhdx.sock,num_queues=4,queue_size=256 \
    "$@"
