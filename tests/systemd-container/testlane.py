"""Test-only lane program for the nspawn recipe (installed root-owned as
/opt/dispatch/libexec/testlane.py; helper.toml argv = [python3.11, -I, -S, THIS, {orguser}, {repo}, {task}]).

Task text "py:MODE ARGS" runs one check and prints one JSON line; any other task execs the
escape probe exactly as the test suite's template would ([probe, "lane", orguser, repo, task]).
  py:info                  identity, NoNewPrivs/Seccomp/CapEff, cgroup, what /proc shows
  py:read PATH             read a file: length or errno
  py:connect HOST PORT     TCP connect: ok or errno
  py:cmd PROG ARGS...      run a program (ssh -V, git ..., node -e ...): rc and output tails
  py:sleep N               sleep N seconds (a long-running lane)
  py:setsid-escape N       double-fork + setsid a grandchild that sleeps N s; print its pid, exit
"""
import json
import os
import socket
import subprocess
import sys
import time

PROBE = "/opt/dispatch/bin/dispatch-escape-probe"


def out(obj):
    print(json.dumps(obj), flush=True)


def status_fields():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "CapEff", "CapPrm", "CapBnd"):
                fields[key] = value.strip()
    return fields


def main():
    orguser, repo, task = sys.argv[1], sys.argv[2], sys.argv[3]
    if not task.startswith("py:"):
        os.execv(PROBE, [PROBE, "lane", orguser, repo, task])
    mode, _, rest = task[3:].partition(" ")
    args = rest.split()
    if mode == "info":
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        out({"mode": mode, "status": status_fields(), "cwd": os.getcwd(),
             "cgroup": open("/proc/self/cgroup").read().split("\n")[:-1],
             "proc_entries": sorted(os.listdir("/proc"))[-12:], "visible_pids": len(pids),
             "suid_dumpable": open("/proc/sys/fs/suid_dumpable").read().strip()
             if os.path.exists("/proc/sys/fs/suid_dumpable") else None})
    elif mode == "read":
        try:
            with open(args[0], "rb") as f:
                data = f.read()
            out({"mode": mode, "path": args[0], "ok": True, "len": len(data),
                 "head": data[:120].replace(b"\0", b" ").decode(errors="replace")})
        except OSError as e:
            out({"mode": mode, "path": args[0], "ok": False, "errno": e.errno, "error": e.strerror})
    elif mode == "connect":
        try:
            socket.create_connection((args[0], int(args[1])), timeout=1).close()
            out({"mode": mode, "target": args, "ok": True})
        except OSError as e:
            out({"mode": mode, "target": args, "ok": False, "errno": e.errno, "error": str(e)})
    elif mode == "cmd":
        try:
            p = subprocess.run(args, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
            out({"mode": mode, "argv": args, "rc": p.returncode,
                 "stdout": p.stdout[-300:].decode(errors="replace"),
                 "stderr": p.stderr[-300:].decode(errors="replace")})
        except (OSError, subprocess.TimeoutExpired) as e:
            out({"mode": mode, "argv": args, "error": str(e)})
    elif mode == "sleep":
        out({"mode": mode, "pid": os.getpid()})
        time.sleep(float(args[0]))
    elif mode == "setsid-escape":
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(r)
            os.setsid()  # leaves the lane's process group and session
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                os.close(w)
                devnull = os.open("/dev/null", os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                time.sleep(float(args[0]))
                os._exit(0)
            os._exit(0)
        os.close(w)
        os.waitpid(child, 0)
        grandchild = int(os.read(r, 32) or b"0")
        out({"mode": mode, "lane_pid": os.getpid(), "escaped_pid": grandchild,
             "escaped_pgid": os.getpgid(grandchild) if grandchild else None})
    else:
        out({"mode": mode, "error": "unknown mode"})
        sys.exit(2)


if __name__ == "__main__":
    main()
