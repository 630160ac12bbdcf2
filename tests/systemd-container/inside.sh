#!/bin/bash
# Runs INSIDE the container booted by boot.sh, as root, e.g.
#   nsenter -t "$(cat /tmp/nspawn-work/dispatch-nspawn.leader)" -a \
#       env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin bash /nspawn/inside.sh [STEP...]
# Steps (default: all, in this order):
#   install   users, systemd/install.sh as the README says (PREFIX=/opt/dispatch: /usr is
#             read-only here; BIN_SRC=/opt/dbins), config, work dirs, `dispatch-helper check`,
#             `systemctl enable --now dispatch-helper.socket`
#   dispatch  the unit exactly as shipped: a dispatch through the real front as alice runs as
#             acme with no_new_privs, seccomp, Landlock, and in its own cgroup
#   access    eve (not in dispatch) and bob (in dispatch, not in [clients]) are refused
#   proc      a lane of acme cannot read a running lane of globex in /proc (ProtectProc=invisible)
#   setsid    escaped descendants (setsid double fork, setpgid) are gone within 1 s of their lane
#   reload    `systemctl reload` with a broken config keeps the old one
#   restart   restart while a lane runs: job ends final, no lane left in the unit's cgroup
#   kill9     SIGKILL to the helper while a lane runs: lane and escaped descendant gone, job `lost`
#   stop      `systemctl stop` while a lane runs: no lane left
#   escape    the project's escape probe as a lane of the real unit
#   security  systemd-analyze security of the installed unit (goal <= 2.0)
#   journal   the helper's log lines in the journal
#   personal  the personal helper as carol's `systemd --user` socket + service (systemd/user/)
# Output: free text, plus machine-readable lines
#   CHECK <name> PASS|FAIL <detail>     TIME <step> <ms>
# Exit status: number of FAILed checks (0 = all as expected).
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
PREFIX=/opt/dispatch
BIN=$PREFIX/bin
SRC=/src/dispatch-mcp            # the project, read-only (boot.sh binds it)
BIN_SRC=/opt/dbins               # the prebuilt binaries, read-only (boot.sh binds them)
HERE=/nspawn                     # this directory, read-only (boot.sh binds it)
UNIT=dispatch-helper.service
DROPIN=/etc/systemd/system/$UNIT.d
CONF=/etc/dispatch-mcp/helper.toml
SOCK=/run/dispatch-mcp/helper.sock
failures=0

check() { # check NAME CONDITION-RESULT(0/1) DETAIL
    if [ "$2" = 0 ]; then echo "CHECK $1 PASS $3"; else echo "CHECK $1 FAIL $3"; failures=$((failures + 1)); fi
}
ms() { echo $(( $(date +%s%N) / 1000000 )); }

# front USER PLAN_JSON: run the real front as USER, driven by client.py; prints JSON lines.
# runuser needs /etc/pam.d/runuser (step_install writes one: the volatile /etc has no pam.d);
# `setpriv --reuid=U --regid=U --init-groups --reset-env` works without PAM.
front() {
    python3 "$HERE/client.py" --timeout 40 "$2" -- runuser -u "$1" -- "$BIN/dispatch-mcp"
}
# plan_dispatch ORGUSER REPO TASK [WAIT]: dispatch_unit, then dispatch_result (WAIT s, default 20)
plan_dispatch() {
    python3 -c 'import json,sys; print(json.dumps([
      {"tool":"dispatch_unit","args":{"orguser":sys.argv[1],"repo":sys.argv[2],"task_description":sys.argv[3]},"save":"h"},
      {"tool":"dispatch_result","args":{"handle":"$h","wait_seconds":int(sys.argv[4])}}]))' "$1" "$2" "$3" "${4:-20}"
}
# pick STEP EXPR < client output: evaluate a python expression on that step's message m
# (s = m["structured"] or {}); prints the value (JSON for dicts/lists).
pick() {
    python3 -c '
import json,sys
step, expr = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    m = json.loads(line)
    if str(m.get("step")) == step:
        s = m.get("structured") or {}
        v = eval(expr)
        print(json.dumps(v) if isinstance(v, (dict, list)) else v)
' "$1" "$2"
}
# dispatch ORGUSER REPO TASK [WAIT] [CLIENT]: full dispatch, prints the client output
dispatch() { front "${5:-alice}" "$(plan_dispatch "$1" "$2" "$3" "${4:-20}")"; }
# start_lane ORGUSER REPO TASK: dispatch without waiting; prints the handle
start_lane() {
    front alice "$(python3 -c 'import json,sys; print(json.dumps([{"tool":"dispatch_unit","args":{"orguser":sys.argv[1],"repo":sys.argv[2],"task_description":sys.argv[3]}}]))' "$1" "$2" "$3")" \
        | pick 0 's.get("handle") or m.get("text")'
}
status_of() { # status_of HANDLE -> status string (dispatch_status as alice)
    front alice "[{\"tool\":\"dispatch_status\",\"args\":{\"handle\":\"$1\"}}]" | pick 0 's.get("status") or m.get("text")'
}
lane_out() { pick 1 '(s.get("stdout") or {}).get("text","").strip() or m.get("text") or s.get("detail")'; }
wait_pid() { # wait_pid USER PATTERN: up to 5 s for a process of USER matching PATTERN; prints pid
    local i p
    for i in $(seq 50); do
        p=$(pgrep -u "$1" -f "$2" | head -n 1)
        [ -n "$p" ] && { echo "$p"; return 0; }
        sleep 0.1
    done
    return 1
}
dropin() { # dropin NAME [CONTENT]: write (or with no content remove) a drop-in, reload, restart
    if [ $# -ge 2 ]; then mkdir -p "$DROPIN"; printf '[Service]\n%s\n' "$2" > "$DROPIN/$1.conf"
    else rm -f "$DROPIN/$1.conf"; fi
    systemctl daemon-reload
    systemctl restart "$UNIT"
}
service_procs() { # every process in the service's cgroup: "pid user comm"
    local cg
    cg=/sys/fs/cgroup$(systemctl show -P ControlGroup "$UNIT")
    [ -d "$cg" ] || cg=/sys/fs/cgroup/unified$(systemctl show -P ControlGroup "$UNIT")  # hybrid layout
    [ -r "$cg/cgroup.procs" ] || return 0
    while read -r pid; do echo "$pid $(ps -o user=,comm= -p "$pid")"; done < "$cg/cgroup.procs"
}

step_install() {
    # install.sh as the README says; /usr is the host's, read-only, hence PREFIX=/opt/dispatch.
    (cd /tmp && PREFIX=$PREFIX BIN_SRC=$BIN_SRC "$SRC/systemd/install.sh") || { check install 1 "install.sh failed"; return; }
    # The volatile /etc has no pam.d (runuser aborts: "Critical error - immediate abort").
    mkdir -p /etc/pam.d
    printf 'auth sufficient pam_rootok.so\naccount required pam_permit.so\nsession required pam_permit.so\n' > /etc/pam.d/runuser
    # No /etc/login.defs here: ask for user private groups and 0700 homes explicitly.
    for u in acme globex; do
        useradd -U -m -K HOME_MODE=0700 "$u"
        install -d -o "$u" -g "$u" -m 0700 "/var/lib/dispatch-mcp/lanes/$u"
        printf 'secret-of-%s\n' "$u" > "/home/$u/.secret"; chown "$u:$u" "/home/$u/.secret"
    done
    useradd -U -m -K HOME_MODE=0700 -G dispatch alice   # client, admitted
    useradd -U -m -K HOME_MODE=0700 -G dispatch bob     # in the group, not in [clients]
    useradd -U -m -K HOME_MODE=0700 eve                 # not in the group
    # Test lane: a root-owned script run by a root-owned python (argv[0] must be root's alone);
    # tasks not starting with "py:" are handed to the escape probe.
    install -m 0755 "$BIN_SRC/dispatch-escape-probe" "$BIN/"
    install -d -m 0755 "$PREFIX/libexec"
    install -m 0644 "$HERE/testlane.py" "$PREFIX/libexec/testlane.py"
    cat > /etc/dispatch-mcp/repos.json <<'EOF'
{
  "orgs": {"acme": {"unix_user": "acme"}, "globex": {"unix_user": "globex"}},
  "repos": {"widgets": {"org": "acme", "github": "acme/widgets"},
            "gadgets": {"org": "globex", "github": "globex/gadgets"}}
}
EOF
    sed -i \
        -e 's|^argv = .*|argv = ["/usr/bin/python3.11", "-I", "-S", "'"$PREFIX"'/libexec/testlane.py", "{orguser}", "{repo}", "{task}"]|' \
        -e 's|^timeout_seconds = .*|timeout_seconds = 120|' \
        -e 's|^kill_grace_seconds = .*|kill_grace_seconds = 1|' \
        -e 's|^groups = \["dispatch"\]|groups = []|' \
        -e 's|^users = \[\]|users = ["alice"]|' \
        -e 's|^read_exec_paths = .*|read_exec_paths = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "'"$PREFIX"'"]|' \
        "$CONF"
    chmod 0600 /etc/dispatch-mcp/repos.json
    [ "$(stat -c %a /etc/dispatch-mcp)" = 700 ] && [ "$(stat -c %a "$CONF")" = 600 ]
    check config_root_only $? "install.sh: /etc/dispatch-mcp $(stat -c %a /etc/dispatch-mcp), helper.toml $(stat -c %a "$CONF")"
    "$BIN/dispatch-helper" check; check helper_check $? "dispatch-helper check"
    systemctl enable --now dispatch-helper.socket
    [ -S "$SOCK" ] && [ "$(stat -c '%U:%G %a' "$SOCK")" = "root:dispatch 660" ]
    check socket $? "$(stat -c '%n %U:%G %a' "$SOCK" 2>&1)"
}


step_dispatch() {
    local out
    out=$(dispatch acme widgets "hello world" 10)
    echo "dispatch: $(echo "$out" | pick 1 's.get("status"), s.get("detail")')"
    echo "  sandbox: $(echo "$out" | pick 1 's.get("sandbox")')"
    echo "$out" | pick 1 's.get("status")=="succeeded" and s["sandbox"]["uid"]=='"$(id -u acme)"' and s["sandbox"]["no_new_privs"] and s["sandbox"]["seccomp"] and s["sandbox"]["landlock"].startswith("enforced")' | grep -q True
    check dispatch_as_orguser_sandboxed $? "succeeded as acme with no_new_privs, seccomp, Landlock"
    echo "$out" | pick 1 '"cgroup per lane" in s["sandbox"]["containment"] and "dispatch-helper.service/lanes" in s["sandbox"]["containment"]' | grep -q True
    check dispatch_in_its_own_cgroup $? "$(echo "$out" | pick 1 's["sandbox"]["containment"]')"
    echo "$out" | pick 1 's.get("usage") is not None and s["usage"]["peak_memory_bytes"] > 0' | grep -q True
    check dispatch_reports_usage $? "$(echo "$out" | pick 1 's.get("usage")')"
    # The job's own directory: made by its lane as acme (the unit has no CAP_DAC_OVERRIDE or
    # CAP_CHOWN to do it), and removed with its record, as acme.
    local h dir
    h=$(echo "$out" | pick 1 's.get("handle")')
    dir="/var/lib/dispatch-mcp/lanes/acme/$h"
    [ -n "$h" ] && [ -d "$dir" ] && [ "$(stat -c '%U %a' "$dir")" = "acme 700" ]
    check job_dir_made_by_its_lane $? "$(stat -c '%n %U %a' "$dir" 2>&1)"
    front alice "[{\"tool\":\"dispatch_delete\",\"args\":{\"handle\":\"$h\"}}]" >/dev/null
    [ -n "$h" ] && [ ! -e "$dir" ]
    check job_dir_removed_with_its_record $? "$dir after dispatch_delete"
    local file r
    for file in "$CONF" /etc/dispatch-mcp/repos.json /var/log/dispatch-mcp/audit.jsonl; do
        r=$(dispatch acme widgets "py:read $file" 10 | lane_out)
        echo "$r" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["ok"] is False else 1)'
        check "lane_cannot_read_$(basename "$file")" $? "$r"
    done
}

step_access() {
    local out
    out=$(runuser -u eve -- python3 -c '
import socket
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("'"$SOCK"'"); print("connected")
except OSError as e:
    print(e.strerror)' 2>&1)
    [ "$out" = "Permission denied" ]; check eve_socket_denied $? "eve connect(): $out"
    out=$(front bob '[{"tool":"dispatch_lanes"}]' | pick 0 'm.get("text") or s')
    echo "  bob via front: $out"
    # The system helper's refusal, not a personal helper started in its place.
    ! echo "$out" | grep -q '"lanes"' && echo "$out" | grep -q 'not an admitted client'
    check bob_not_admitted $? "bob (in group dispatch, not in [clients]) refused"
    grep -q '"client_refused"' /var/log/dispatch-mcp/audit.jsonl; check bob_audited $? "client_refused in the audit log"
}

# proc_probe: acme's lane reads a running globex lane's /proc entries. Prints "<cmdline ok> <environ ok>".
proc_probe() {
    local h victim c e
    h=$(start_lane globex gadgets "py:sleep 30")
    victim=$(wait_pid globex testlane.py) || { echo "no-victim"; return; }
    c=$(dispatch acme widgets "py:read /proc/$victim/cmdline" 10 | lane_out)
    e=$(dispatch acme widgets "py:read /proc/$victim/environ" 10 | lane_out)
    echo "victim $victim ($h): cmdline $c; environ $e" >&2
    front alice "[{\"tool\":\"dispatch_cancel\",\"args\":{\"handle\":\"$h\"}}]" >/dev/null
    echo "$(echo "$c" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])') $(echo "$e" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])')"
}

step_proc() {
    local r
    r=$(proc_probe); echo "with ProtectProc=invisible: cmdline/environ readable: $r"
    [ "$r" = "False False" ]; check proc_other_lane_hidden $? "$r"
    dropin 90-test "ProtectProc=default"
    r=$(proc_probe); echo "with ProtectProc=default: cmdline/environ readable: $r"
    [ "$r" = "True False" ]; check proc_visible_without_protectproc $? "$r (so ProtectProc=invisible is what hides another lane's task text)"
    dropin 90-test
}

LANES=/var/lib/dispatch-mcp/lanes/acme
# pid_of TAG: what the probe's escaped descendant wrote in its job's own directory (one of
# acme's under $LANES; tags are unique)
pid_of() {
    cat "$LANES"/*/"$1.pid" 2>/dev/null | head -n 1
}
# escaped_pid TAG: that pid, once it is there
escaped_pid() {
    local i
    for i in $(seq 100); do [ -n "$(pid_of "$1")" ] && break; sleep 0.05; done
    pid_of "$1"
}
gone_within_1s() { # gone_within_1s PID: it is gone (or a zombie) within a second
    local i
    for i in $(seq 20); do
        [ -d /proc/"$1" ] || return 0
        grep -q '^State:.*Z' /proc/"$1"/status 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

step_setsid() {
    local how out pid st h
    for how in escape-setsid escape-setpgid; do
        # The lane ends by itself a second after its descendant started.
        out=$(dispatch acme widgets "$how:nspawn-$how:1" 15)
        st=$(echo "$out" | pick 1 's.get("status")')
        pid=$(pid_of "nspawn-$how")
        echo "$how: lane $st, escaped descendant ${pid:-none}"
        [ "$st" = succeeded ] && [ -n "$pid" ] && gone_within_1s "$pid"
        check "${how}_gone_with_its_lane" $? "descendant ${pid:-none} gone within 1 s of the lane's end"
        # Cancelled while it runs.
        h=$(start_lane acme widgets "$how:nspawn-$how-cancel:60")
        pid=$(escaped_pid "nspawn-$how-cancel")
        front alice "[{\"tool\":\"dispatch_cancel\",\"args\":{\"handle\":\"$h\"}}]" >/dev/null
        st=$(status_of "$h")
        [ "$st" = cancelled ] && [ -n "$pid" ] && gone_within_1s "$pid"
        check "${how}_gone_when_cancelled" $? "job $st, descendant ${pid:-none} gone within 1 s"
    done
    # Timed out: a 3 s timeout for this one check.
    cp "$CONF" /root/helper.toml.pre-timeout
    sed -i 's|^timeout_seconds = .*|timeout_seconds = 3|' "$CONF"
    systemctl reload "$UNIT"; sleep 0.5
    out=$(dispatch acme widgets "escape-setsid:nspawn-timeout:60" 20)
    st=$(echo "$out" | pick 1 's.get("status")')
    pid=$(pid_of "nspawn-timeout")
    [ "$st" = timed_out ] && [ -n "$pid" ] && gone_within_1s "$pid"
    check escape-setsid_gone_when_timed_out $? "job $st, descendant ${pid:-none} gone within 1 s"
    cp /root/helper.toml.pre-timeout "$CONF"; systemctl reload "$UNIT"; sleep 0.5
}

step_reload() {
    local out cursor
    cp "$CONF" /root/helper.toml.good
    cursor=$(journalctl -u "$UNIT" -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
    echo 'argv = "not a list"' >> "$CONF"
    systemctl reload "$UNIT"
    for _ in $(seq 30); do
        journalctl -u "$UNIT" --after-cursor "$cursor" --no-pager -o cat | grep -qi 'keep' && break
        sleep 0.1
    done
    journalctl -u "$UNIT" --after-cursor "$cursor" --no-pager -o cat | grep -qi 'keep'
    check reload_bad_config_kept $? "journal says the old configuration is kept"
    out=$(dispatch acme widgets hello 10 | pick 1 's.get("status")')
    [ "$out" = succeeded ]; check reload_still_serves $? "dispatch after bad reload: $out"
    cp /root/helper.toml.good "$CONF"; systemctl reload "$UNIT"
}

lane_procs() { # processes of acme anywhere
    pgrep -u acme | tr '\n' ' '
}

step_restart() {
    local h p st
    h=$(start_lane acme widgets "py:sleep 60")
    p=$(wait_pid acme testlane.py)
    systemctl restart "$UNIT"
    st=$(status_of "$h"); echo "after restart: $h is $st; acme processes: [$(lane_procs)]"
    [ "$st" = cancelled ] || [ "$st" = lost ]; check restart_job_final $? "job state after restart: $st"
    ! kill -0 "$p" 2>/dev/null && [ -z "$(lane_procs)" ]
    check restart_no_lane_left $? "lane pid $p gone, no acme process left"
}

step_kill9() {
    local h p st esc
    h=$(start_lane acme widgets "escape-setsid:nspawn-kill9:60")
    esc=$(escaped_pid nspawn-kill9)
    echo "lane $h, escaped descendant $esc; SIGKILL to the helper's main process only"
    systemctl kill -s SIGKILL --kill-who=main "$UNIT"
    [ -n "$esc" ] && gone_within_1s "$esc"
    check kill9_escaped_descendant_gone $? "setsid descendant ${esc:-none} gone within 1 s of the helper's death"
    st=$(status_of "$h")
    [ "$st" = lost ]; check kill9_job_lost $? "job state after helper SIGKILL + restart: $st"
    [ -z "$(lane_procs)" ]; check kill9_nothing_left $? "acme processes: [$(lane_procs)]"
}

step_stop() {
    local h p st
    h=$(start_lane acme widgets "py:sleep 60")
    p=$(wait_pid acme testlane.py)
    systemctl stop "$UNIT"
    ! kill -0 "$p" 2>/dev/null && [ -z "$(lane_procs)" ]
    check stop_kills_lanes $? "lane pid $p gone after systemctl stop"
    st=$(status_of "$h")   # socket activation starts the helper again
    [ "$st" = lost ] || [ "$st" = cancelled ]; check stop_job_final $? "job state: $st"
}

escape_task() {
    python3 -c 'import json,sys; a=sys.argv; print("escape " + json.dumps({
        "outside_file": "/var/lib/dispatch-mcp/outside.txt", "other_home_file": "/home/globex/readable.txt",
        "setuid_binary": "'"$PREFIX"'/libexec/suid-id", "helper_pid": int(a[1]),
        "work_dir": "/var/lib/dispatch-mcp/lanes/acme", "helper_socket": "'"$SOCK"'",
        "allowed_port": int(a[2]), "denied_port": int(a[3]), "fsize": 1048576}))' "$@"
}
step_escape() {
    local allowed denied out
    install -m 0666 /dev/null /var/lib/dispatch-mcp/outside.txt
    chmod 0755 /home/globex; install -o globex -g globex -m 0644 /dev/null /home/globex/readable.txt
    echo "globex's" > /home/globex/readable.txt
    install -m 4755 /usr/bin/id "$PREFIX/libexec/suid-id"
    systemd-run -q --unit nspawn-listeners -p StandardOutput=truncate:/run/nspawn-ports python3 -c '
import socket, time
ss = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
print(" ".join(str(s.getsockname()[1]) for s in ss), flush=True)
time.sleep(3600)'
    for _ in $(seq 50); do [ -s /run/nspawn-ports ] && break; sleep 0.1; done
    read -r allowed denied < /run/nspawn-ports
    cp "$CONF" /root/helper.toml.pre-escape
    sed -i -e "s|^tcp_connect_ports = .*|tcp_connect_ports = [22, 443, $allowed]|" \
        -e "s|^fsize = .*|fsize = 1048576|" "$CONF"
    systemctl reload "$UNIT"
    out=$(dispatch acme widgets "$(escape_task "$(systemctl show -P MainPID "$UNIT")" "$allowed" "$denied")" 20)
    echo "escape probe: $(echo "$out" | pick 1 's.get("status"), s.get("detail")')"
    echo "$out" | pick 1 '(s.get("stdout") or {}).get("text","")' | python3 -c '
import json, sys
checks = {d["check"]: d for d in (json.loads(l) for l in sys.stdin if l.startswith("{")) if "check" in d}
forbidden = ("write_outside_work_dir", "write_work_area", "write_home_bashrc", "write_home_authorized_keys",
    "write_home_systemd_user_unit", "read_other_home", "setresuid_root", "ptrace_traceme",
    "process_vm_readv", "bpf", "mount", "unshare_newuser", "io_uring_setup", "keyctl", "tiocsti",
    "tiocsti_high_bits", "kill_helper", "connect_helper_socket", "x32_syscall", "tcp_bind",
    "tcp_connect_denied_port", "cgroup_leave", "cgroup_raise_limit", "cgroup_mkdir",
    "cgroup_kill_others")
missing = [n for n in forbidden if n not in checks]
breaches = [n for n in forbidden if checks.get(n, {}).get("succeeded") is not False]
print("    %d checks reported; not denied: %s" % (len(checks), breaches or "none"))
ok = not missing and not breaches and checks.get("identity", {}).get("NoNewPrivs") == "1"
sys.exit(0 if ok else 1)'
    check escape_probe_denied_under_the_unit $? "the probe ran as a lane of the shipped unit and every forbidden action failed"
    cp /root/helper.toml.pre-escape "$CONF"; systemctl reload "$UNIT"
    systemctl stop nspawn-listeners.service
}

step_security() {
    local score
    score=$(systemd-analyze security --no-pager "$UNIT" 2>/dev/null | tail -n 1 | sed 's/.*: //' | cut -d' ' -f1)
    echo "systemd-analyze security $UNIT (installed): $score"
    python3 -c "import sys; sys.exit(0 if float('$score') <= 2.0 else 1)"
    check security_exposure_at_most_2 $? "exposure $score"
}

step_journal() {
    journalctl -u "$UNIT" --no-pager -o cat | grep -q 'serving'; check journal_has_helper_logs $? "'serving' in journalctl -u $UNIT"
    journalctl -u "$UNIT" --no-pager -o verbose | grep -q 'cgroup per lane'; check journal_has_containment $? "the lane containment is logged"
    # Under the unit's SystemCallFilter every lane's end was awaited on its pidfd (never on a
    # thread of the blocking pool), and the helper left systemd's soft limit of 1024 fds.
    ! journalctl -u "$UNIT" --no-pager -o cat | grep -q 'pidfd could not be watched'
    check lanes_watched_on_pidfds $? "no lane fell back to a blocking wait"
    journalctl -u "$UNIT" --no-pager -o verbose | grep -q 'raised the open file limit'
    check open_file_limit_raised $? "$(journalctl -u "$UNIT" --no-pager -o verbose | grep -m1 -A3 'raised the open file limit' | tr '\n' ' ')"
}

# personal: the personal helper as a `systemd --user` socket + service (systemd/user/), for a
# user outside the `dispatch` group, with the README's steps: units copied to
# ~/.config/systemd/user, ExecStart pointed at the installed binary, socket enabled. The
# front (no arguments) finds no system helper it may use, joins the user's socket; systemd
# starts the helper; a lane outlives its front; the helper stops when idle and systemd starts
# it again on the next connection, with every job still there.
carol_env() { # carol_env CMD...: as carol, with her user manager's runtime dir
    runuser -u carol -- env HOME=/home/carol XDG_RUNTIME_DIR="/run/user/$(id -u carol)" \
        PATH="$PREFIX/personal-bin:/usr/bin:/bin" DISPATCH_IDLE_EXIT_SECONDS=3 "$@"
}
carol_front() { python3 "$HERE/client.py" --timeout 40 "$1" -- runuser -u carol -- env HOME=/home/carol \
    XDG_RUNTIME_DIR="/run/user/$(id -u carol)" PATH="$PREFIX/personal-bin:/usr/bin:/bin" \
    DISPATCH_IDLE_EXIT_SECONDS=3 "$BIN/dispatch-mcp"; }
carol_unit() { carol_env systemctl --user show -P "$1" dispatch-mcp-helper.service; }
step_personal() {
    local uid units out h st pid i
    id carol >/dev/null 2>&1 || useradd -U -m -K HOME_MODE=0700 carol
    uid=$(id -u carol)
    install -d -m 0755 "$PREFIX/personal-bin"
    printf '#!/bin/sh\nfor a in "$@"; do printf "<%%s>" "$a"; done; echo\ncase "$3" in sleep*) sleep "${3#sleep }";; esac\necho done\n' \
        > "$PREFIX/personal-bin/dotfiles-dispatch"
    chmod 0755 "$PREFIX/personal-bin/dotfiles-dispatch"
    printf '{"orgs": {"carol-org": {}}, "repos": {"notes": {"org": "carol-org"}}}\n' > /home/carol/.repos.json
    chown carol:carol /home/carol/.repos.json
    # What logind and pam_systemd do on a real machine: this container's volatile /etc has no
    # PAM configuration, and no login session sets the user manager's XDG_RUNTIME_DIR.
    printf 'auth required pam_permit.so\naccount required pam_permit.so\nsession required pam_permit.so\n' \
        | tee /etc/pam.d/systemd-user > /etc/pam.d/other
    mkdir -p /etc/systemd/system/user@.service.d
    printf '[Service]\nEnvironment=XDG_RUNTIME_DIR=/run/user/%%i\n' > /etc/systemd/system/user@.service.d/runtime-dir.conf
    systemctl daemon-reload
    systemctl start "user@$uid.service"
    for i in $(seq 50); do [ -S "/run/user/$uid/systemd/private" ] && break; sleep 0.1; done
    units=/home/carol/.config/systemd/user
    runuser -u carol -- mkdir -p "$units/dispatch-mcp-helper.service.d"
    runuser -u carol -- cp "$SRC/systemd/user/dispatch-mcp-helper.socket" "$SRC/systemd/user/dispatch-mcp-helper.service" "$units/"
    printf '[Service]\nExecStart=\nExecStart=%s/dispatch-helper serve --config %%h/.local/state/dispatch-mcp/helper.toml\n' "$BIN" \
        | runuser -u carol -- tee "$units/dispatch-mcp-helper.service.d/prefix.conf" >/dev/null
    carol_env systemctl --user daemon-reload
    carol_env systemctl --user enable --now dispatch-mcp-helper.socket
    [ "$(carol_env systemctl --user is-active dispatch-mcp-helper.socket)" = active ]
    check personal_socket_listening $? "dispatch-mcp-helper.socket of carol: $(carol_env systemctl --user is-active dispatch-mcp-helper.socket)"

    out=$(carol_front '[{"tool":"dispatch_unit","args":{"orguser":"carol-org","repo":"notes","task_description":"sleep 3"},"save":"h"}]')
    h=$(echo "$out" | pick 0 's.get("handle") or m.get("text")')
    pid=$(carol_unit MainPID)
    echo "personal: dispatched $h; the helper is carol's dispatch-mcp-helper.service, pid $pid"
    [ "$(carol_unit ActiveState)" = active ] && [ "${pid:-0}" != 0 ] && [ "$(stat -c %U "/proc/$pid")" = carol ]
    check personal_helper_socket_activated $? "service $(carol_unit ActiveState), main pid $pid"
    pgrep -u carol -f 'dotfiles-dispatch carol-org' >/dev/null
    check personal_lane_outlives_front $? "a lane of $h still runs after its front exited"
    out=$(carol_front '[{"tool":"dispatch_result","args":{"handle":"'"$h"'","wait_seconds":20}}]')
    st=$(echo "$out" | pick 0 's.get("status") or m.get("text")')
    [ "$st" = succeeded ] && echo "$out" | pick 0 's.get("detail")' | grep -q done
    check personal_result_from_a_new_front $? "$h: $st, detail $(echo "$out" | pick 0 's.get("detail")')"
    # Idle (no client, no lane, nothing queued) for 3 s: the service stops by itself, cleanly.
    for i in $(seq 100); do [ "$(carol_unit ActiveState)" = inactive ] && break; sleep 0.1; done
    [ "$(carol_unit ActiveState)" = inactive ] && [ "$(carol_unit Result)" = success ] \
        && [ "$(carol_env systemctl --user is-active dispatch-mcp-helper.socket)" = active ]
    check personal_idle_exit $? "service $(carol_unit ActiveState) ($(carol_unit Result)), socket still listening"
    out=$(carol_front '[{"tool":"dispatch_list","args":{}}]')
    echo "$out" | pick 0 '[d["handle"] for d in s.get("dispatches", [])]' | grep -q "$h" \
        && [ "$(carol_unit ActiveState)" = active ]
    check personal_restarted_on_demand_with_its_jobs $? "service $(carol_unit ActiveState); list has $h"
    grep -q '"helper_stopped"' /home/carol/.local/state/dispatch-mcp/audit.jsonl \
        && "$BIN/dispatch-helper" audit verify /home/carol/.local/state/dispatch-mcp/audit.jsonl >/dev/null
    check personal_audit_intact $? "carol's audit log records the idle stop and verifies"
    carol_env systemctl --user stop dispatch-mcp-helper.socket dispatch-mcp-helper.service
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(install dispatch access proc setsid reload restart kill9 stop escape journal security personal)
for s in "${steps[@]}"; do
    t0=$(ms)
    echo "=== $s"
    "step_$s"
    echo "TIME $s $(( $(ms) - t0 ))"
done
echo "FAILURES $failures"
exit "$failures"
