#!/bin/sh
# Stop the container booted by boot.sh: SIGTERM to systemd-nspawn (clean halt), SIGKILL after
# HALT_TIMEOUT seconds. Leaves nothing running. Same NAME/WORK as boot.sh.
set -u
NAME=${NAME:-dispatch-nspawn}
WORK=${WORK:-$(cd "$(dirname "$0")" && pwd)}
STATE=${STATE:-/run/dispatch-nspawn}
mkdir -p "$STATE"
HALT_TIMEOUT=${HALT_TIMEOUT:-10}
pidfile=$STATE/$NAME.nspawn.pid
[ -s "$pidfile" ] || { echo "teardown.sh: no $pidfile" >&2; exit 0; }
nspawn=$(cat "$pidfile")
leader=$(cat "$STATE/$NAME.leader" 2>/dev/null || true)
# Only signal it if it really is our systemd-nspawn (pid reuse).
if [ "$(cat /proc/"$nspawn"/comm 2>/dev/null)" = systemd-nspawn ]; then
    kill -TERM "$nspawn" 2>/dev/null
    i=0
    while kill -0 "$nspawn" 2>/dev/null && [ $i -lt $((HALT_TIMEOUT * 10)) ]; do
        sleep 0.1; i=$((i + 1))
    done
    if kill -0 "$nspawn" 2>/dev/null; then
        echo "teardown.sh: no halt after ${HALT_TIMEOUT}s, SIGKILL" >&2
        # Killing nspawn kills the container's PID 1 and so its whole pid namespace.
        kill -KILL "$nspawn" 2>/dev/null
        [ -n "$leader" ] && kill -KILL "$leader" 2>/dev/null
        sleep 0.2
    fi
fi
rm -f "$pidfile" "$STATE/$NAME.leader"
if [ -n "$leader" ] && [ -d /proc/"$leader" ] && [ "$(cat /proc/"$leader"/comm 2>/dev/null)" = systemd ]; then
    echo "teardown.sh: container PID 1 ($leader) still alive!" >&2
    exit 1
fi
echo "teardown.sh: $NAME stopped" >&2
