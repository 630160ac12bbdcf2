#!/bin/sh
# Boot a throw-away systemd (PID 1) container over this machine's own /usr and print the
# container's PID 1 as seen from the host (use it with: nsenter -t PID -a ...).
#
#   NAME=dispatch-nspawn  machine name (also names the state files below)
#   WORK=this directory   scripts, bound read-only at /nspawn inside
#   STATE=/run/dispatch-nspawn  where the pid, leader and console files are written
#   SRC=the checkout      project checkout, bound read-only at /src/dispatch-mcp
#   BINS=$SRC/target/debug built binaries, bound read-only at /opt/dbins
#   BOOT_TIMEOUT=30       seconds to wait for `systemctl is-system-running` = running|degraded
#   UNIFIED=1             container cgroup layout: 1 = pure cgroup2 (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1),
#                         auto = nspawn's choice from the host (here: hybrid, v1 controllers read-only +
#                         cgroup2 at /sys/fs/cgroup/unified), 0 = pure legacy v1 (no cgroup2 at all)
#   SYSCALLS=...          system calls added to nspawn's seccomp allow-list (--system-call-filter):
#                         Landlock (lanes' sandbox) and bpf (systemd's IPAddressDeny= firewall)
#   NSPAWN_ARGS=          extra systemd-nspawn options (word-split)
#   INIT_ARGS=            extra arguments for the container's systemd (e.g. systemd.log_level=debug)
#
# Writes $STATE/$NAME.nspawn.pid (the systemd-nspawn process, kill it to stop the container),
# $STATE/$NAME.leader (container PID 1) and $STATE/$NAME.console (boot console).
# Exit status: 0 booted (stdout: leader pid), 1 failed (nspawn killed again).
set -eu
NAME=${NAME:-dispatch-nspawn}
WORK=${WORK:-$(cd "$(dirname "$0")" && pwd)}
STATE=${STATE:-/run/dispatch-nspawn}
mkdir -p "$STATE"
SRC=${SRC:-$(cd "$WORK/../.." && pwd)}
BINS=${BINS:-$SRC/target/debug}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-30}
UNIFIED=${UNIFIED:-1}
SYSCALLS=${SYSCALLS:-landlock_create_ruleset landlock_add_rule landlock_restrict_self bpf}
if [ "$UNIFIED" = auto ]; then unset SYSTEMD_NSPAWN_UNIFIED_HIERARCHY
else SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=$UNIFIED; export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY; fi
NSPAWN_ARGS=${NSPAWN_ARGS:-}
INIT_ARGS=${INIT_ARGS:-}
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

[ "$(id -u)" = 0 ] || { echo "boot.sh: must run as root" >&2; exit 1; }
if [ -s "$STATE/$NAME.nspawn.pid" ] && kill -0 "$(cat "$STATE/$NAME.nspawn.pid")" 2>/dev/null; then
    echo "boot.sh: $NAME already running (pid $(cat "$STATE/$NAME.nspawn.pid")); run teardown.sh first" >&2
    exit 1
fi
# One container at a time: with --keep-unit and no systemd on the host, every nspawn started
# from the same cgroup puts its container in the same "payload" cgroup (a second one would share
# system.slice/dispatch-helper.service with the first). The lock is inherited by systemd-nspawn
# and held until it exits.
LOCK=${LOCK:-/run/lock/dispatch-nspawn.lock}
mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
flock -n 9 || { echo "boot.sh: another container holds $LOCK (only one at a time; see teardown.sh)" >&2; exit 1; }
rm -f "$STATE/$NAME.nspawn.pid" "$STATE/$NAME.leader"
start=$(date +%s%N)

# --volatile=yes       fresh tmpfs root, only /usr comes from the host (read-only)
# --register=no --keep-unit   the host has no systemd/machined to register with
# --system-call-filter  nspawn's own seccomp allow-list lacks Landlock; add it
# -b --console=passive  boot an init, no tty needed (stdin from /dev/null)
# systemd.firstboot=off       otherwise systemd-firstboot waits for a locale prompt
# setsid: the container must not share our session/process group (a ^C or a test harness's
# group kill must go through teardown.sh, which halts it properly).
setsid systemd-nspawn -q -D / --volatile=yes --register=no --keep-unit -M "$NAME" \
    --system-call-filter="$SYSCALLS" $NSPAWN_ARGS \
    --bind-ro="$BINS":/opt/dbins \
    --bind-ro="$SRC":/src/dispatch-mcp \
    --bind-ro="$WORK":/nspawn \
    -b --console=passive -- systemd.firstboot=off $INIT_ARGS \
    </dev/null >"$STATE/$NAME.console" 2>&1 &
nspawn=$!
echo "$nspawn" > "$STATE/$NAME.nspawn.pid"

fail() {
    echo "boot.sh: $*" >&2
    tail -n 20 "$STATE/$NAME.console" >&2 || true
    # SIGKILL to nspawn alone would orphan the container: its PID 1 must be killed too.
    [ -n "${leader:-}" ] && kill -9 "$leader" 2>/dev/null
    kill -9 "$nspawn" 2>/dev/null || true
    exit 1
}

deadline=$(( $(date +%s) + BOOT_TIMEOUT ))
leader=
state=
while [ "$(date +%s)" -lt "$deadline" ]; do
    kill -0 "$nspawn" 2>/dev/null || fail "systemd-nspawn exited"
    # The container's PID 1 is the child of nspawn that runs systemd; early on, nspawn's child
    # may still be its short-lived "outer child", so look until one has exec'd systemd.
    [ -n "$leader" ] && [ "$(cat /proc/"$leader"/comm 2>/dev/null)" = systemd ] \
        || leader=$(pgrep -P "$nspawn" -x systemd | head -n 1 || true)
    if [ -n "$leader" ]; then
        # Clean environment: nsenter keeps ours (PATH, HOME, ...), which need not exist inside.
        state=$(timeout 5 nsenter -t "$leader" -a env -i PATH="$PATH" \
            systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
    fi
    sleep 0.2
done
case "$state" in
    running) ;;
    degraded)
        echo "boot.sh: degraded; failed units:" >&2
        nsenter -t "$leader" -a env -i PATH="$PATH" systemctl --failed --no-legend >&2 || true ;;
    *) fail "not running after ${BOOT_TIMEOUT}s (state: ${state:-none})" ;;
esac
echo "$leader" > "$STATE/$NAME.leader"
echo "boot.sh: $NAME $state in $(( ($(date +%s%N) - start) / 1000000 )) ms, leader $leader, nspawn $nspawn" >&2
echo "$leader"
