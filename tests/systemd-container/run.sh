#!/bin/sh
# boot.sh + inside.sh [STEP...] + teardown.sh (always), bounded by RUN_TIMEOUT seconds.
# Exit status: inside.sh's (number of failed checks), or 100 if the boot failed.
# Same environment as boot.sh (NAME, WORK, SRC, BINS, UNIFIED, SYSCALLS, ...).
WORK=${WORK:-$(cd "$(dirname "$0")" && pwd)}
STATE=${STATE:-/run/dispatch-nspawn}
mkdir -p "$STATE"
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
here=$(cd "$(dirname "$0")" && pwd)
trap '"$here/teardown.sh"' EXIT INT TERM
leader=$("$here/boot.sh") || exit 100
timeout -k 5 "$RUN_TIMEOUT" nsenter -t "$leader" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    bash /nspawn/inside.sh "$@"
