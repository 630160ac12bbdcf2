#!/usr/bin/python3
"""Minimal MCP stdio client (stdlib only) for dispatch-mcp.

    client.py [--timeout S] PLAN_JSON -- FRONT_COMMAND [ARGS...]

Starts FRONT_COMMAND (e.g. `setpriv ... /opt/dispatch/bin/dispatch-mcp`), speaks newline-
delimited JSON-RPC on its stdin/stdout: initialize (2025-06-18), notifications/initialized,
then each step of PLAN_JSON, a list of
    {"tool": NAME, "args": {...}, "save": "h1"}   tools/call; "save" keeps structuredContent.handle
    {"list_tools": true}                          tools/list
    {"sleep": 1.5}
A string argument "$h1" is replaced by the saved handle. Prints one JSON line per step:
    {"step": i, "tool": NAME, "isError": bool, "structured": {...}|null, "text": "...", "error": rpc error|null}
Exit 0 when every step got an answer (tool errors included), 2 on protocol failure or timeout.
"""
import json
import os
import select
import subprocess
import sys
import time


def main():
    argv = sys.argv[1:]
    timeout = 60.0
    if argv[:1] == ["--timeout"]:
        timeout = float(argv[1])
        argv = argv[2:]
    if "--" not in argv or argv.index("--") != 1:
        sys.exit(__doc__)
    plan = json.loads(argv[0])
    front = argv[2:]
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(front, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr)
    buf = b""
    next_id = [0]

    def send(obj):
        proc.stdin.write((json.dumps(obj) + "\n").encode())
        proc.stdin.flush()

    def read_message():
        nonlocal buf
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out waiting for the front")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError("front closed stdout (exit %s)" % proc.poll())
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        return json.loads(line) if line.strip() else None

    def request(method, params):
        next_id[0] += 1
        rid = next_id[0]
        send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        while True:
            msg = read_message()
            if msg is None:
                continue
            if msg.get("id") == rid and ("result" in msg or "error" in msg):
                return msg
            if "method" in msg and "id" in msg:  # a server->client request: refuse politely
                send({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "not supported"}})
            # notifications (progress, logging) are ignored

    saved = {}

    def subst(value):
        if isinstance(value, str) and value.startswith("$") and value[1:] in saved:
            return saved[value[1:]]
        if isinstance(value, dict):
            return {k: subst(v) for k, v in value.items()}
        if isinstance(value, list):
            return [subst(v) for v in value]
        return value

    status = 0
    try:
        init = request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                      "clientInfo": {"name": "nspawn-client", "version": "0"}})
        if "error" in init:
            raise RuntimeError("initialize failed: %s" % init["error"])
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        print(json.dumps({"step": "initialize", "server": init["result"].get("serverInfo"),
                          "protocolVersion": init["result"].get("protocolVersion")}), flush=True)
        for i, step in enumerate(plan):
            if "sleep" in step:
                time.sleep(float(step["sleep"]))
                continue
            if step.get("list_tools"):
                msg = request("tools/list", {})
                names = [t["name"] for t in msg.get("result", {}).get("tools", [])]
                print(json.dumps({"step": i, "tools": names, "error": msg.get("error")}), flush=True)
                continue
            msg = request("tools/call", {"name": step["tool"], "arguments": subst(step.get("args", {}))})
            result = msg.get("result") or {}
            structured = result.get("structuredContent")
            text = "\n".join(c.get("text", "") for c in result.get("content", []) if c.get("type") == "text")
            if step.get("save") and isinstance(structured, dict) and "handle" in structured:
                saved[step["save"]] = structured["handle"]
            print(json.dumps({"step": i, "tool": step["tool"], "isError": bool(result.get("isError")),
                              "structured": structured, "text": text if structured is None else "",
                              "error": msg.get("error")}), flush=True)
    except (TimeoutError, EOFError, RuntimeError, ValueError) as error:
        print(json.dumps({"step": "fatal", "error": str(error)}), flush=True)
        status = 2
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    sys.exit(status)


if __name__ == "__main__":
    main()
