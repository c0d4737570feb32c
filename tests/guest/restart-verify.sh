#!/bin/sh
# restart-verify.sh DEV SIZE   (in the guest, run by guest-run with --file verify.fio
#                               --file fio-verify.sh)
#
# fio-verify.sh while the host kills and restarts the backend: the job must finish with no
# verify error, and the kernel must have logged no I/O error and no broken virtqueue.
#
# Prints what fio-verify.sh prints, then "NO IO ERRORS".
set -eu
sh ./fio-verify.sh "$@"
if dmesg | grep -iE 'I/O error|not a head|virtqueue.*broken|blk_update_request|hung_task'; then
    echo "the kernel logged I/O errors (above)" >&2
    exit 1
fi
echo "NO IO ERRORS"
