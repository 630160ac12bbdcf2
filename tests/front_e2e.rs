//! End to end through the real binaries: an rmcp client drives `dispatch-mcp` over stdio, which
//! talks to a real `dispatch-helper`, which runs real sandboxed lanes.

mod support;

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams,
    ClientCapabilities, ClientConfig, ClientRequest, GetTaskParams, Implementation, JsonObject,
    ProgressNotificationParam, ProtocolVersion, TaskPayload, TaskStatus,
};
use rmcp::service::{NotificationContext, PeerRequestOptions, RunningService};
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::{ClientHandler, ClientLifecycleMode, ClientServiceExt, RoleClient, ServiceExt};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

#[derive(Clone, Default)]
struct TestClient {
    tasks: bool,
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
    /// Its `clientInfo.name`, if not the usual one.
    name: Option<String>,
}

impl ClientHandler for TestClient {
    fn get_info(&self) -> ClientConfig {
        let caps = if self.tasks {
            ClientCapabilities::builder().enable_tasks().build()
        } else {
            ClientCapabilities::default()
        };
        let name = self.name.as_deref().unwrap_or("e2e-test-client");
        ClientConfig::new(caps, Implementation::new(name, "1.0.0"))
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _ctx: NotificationContext<RoleClient>,
    ) {
        self.progress.lock().unwrap().push(params);
    }
}

type Client = RunningService<RoleClient, TestClient>;

async fn front(socket: &Path, handler: TestClient) -> Client {
    let command = tokio::process::Command::new(front_bin()).configure(|cmd| {
        cmd.arg("serve").arg("--socket").arg(socket);
    });
    handler
        .serve(TokioChildProcess::new(command).unwrap())
        .await
        .expect("MCP initialize")
}

/// Dispatch `task` to alice's lane with a plain call; its handle.
async fn dispatched(client: &Client, task: &str) -> String {
    let job = ok(call(
        client,
        "dispatch_unit",
        json!({"orguser": "alice-org", "repo": "alice-repo", "task_description": task}),
    )
    .await);
    job["handle"].as_str().unwrap().to_owned()
}

fn args(value: Value) -> JsonObject {
    value.as_object().unwrap().clone()
}

async fn call(client: &Client, tool: &str, arguments: Value) -> CallToolResult {
    client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args(arguments)))
        .await
        .unwrap_or_else(|e| panic!("{tool}: protocol error {e}"))
}

fn text(result: &CallToolResult) -> String {
    result
        .content
        .first()
        .and_then(|c| c.as_text())
        .map(|t| t.text.clone())
        .unwrap_or_default()
}

fn ok(result: CallToolResult) -> Value {
    assert_ne!(result.is_error, Some(true), "tool error: {}", text(&result));
    result.structured_content.expect("structured output")
}

fn tool_error(result: CallToolResult) -> String {
    assert_eq!(
        result.is_error,
        Some(true),
        "expected a tool error, got {:?}",
        result.structured_content
    );
    text(&result)
}

#[tokio::test]
async fn every_tool_works_and_describes_itself() {
    let Some(helper) = start_helper("front tools", HelperOptions::default()) else {
        return;
    };
    let client = front(&helper.socket, TestClient::default()).await;

    let info = client.peer_info().unwrap();
    assert_eq!(info.server_info.as_ref().unwrap().name, "dispatch-mcp");
    assert!(
        info.instructions
            .as_deref()
            .unwrap()
            .contains("cannot run arbitrary commands")
    );
    let tools = client.list_all_tools().await.unwrap();
    let mut names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(names, TOOLS);
    for tool in &tools {
        let schema = tool
            .output_schema
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no output schema", tool.name));
        // The dialect every client must support; draft-07 only for the Python SDKs.
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{}",
            tool.name
        );
        let hints = tool
            .annotations
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no annotations", tool.name));
        let read_only = matches!(
            tool.name.as_ref(),
            "dispatch_status" | "dispatch_result" | "dispatch_list" | "dispatch_lanes"
        );
        assert_eq!(hints.read_only_hint, Some(read_only), "{}", tool.name);
        assert!(
            hints.destructive_hint.is_some()
                && hints.idempotent_hint.is_some()
                && hints.open_world_hint.is_some()
        );
    }
    let unit = tools.iter().find(|t| t.name == "dispatch_unit").unwrap();
    let hints = unit.annotations.as_ref().unwrap();
    assert_eq!(
        (hints.idempotent_hint, hints.open_world_hint),
        (Some(false), Some(true))
    );
    let required: Vec<&str> = unit.input_schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        required,
        ["orguser", "repo", "task_description"],
        "the Python server's argument names"
    );
    for tool in ["dispatch_cancel", "dispatch_delete"] {
        let hints = tools
            .iter()
            .find(|t| t.name == tool)
            .unwrap()
            .annotations
            .clone()
            .unwrap();
        assert_eq!(hints.destructive_hint, Some(true), "{tool}");
    }

    let lanes = ok(call(&client, "dispatch_lanes", json!({})).await);
    assert_eq!(lanes["count"], 2);
    assert_eq!(lanes["lanes"][0]["orguser"], "alice-org");

    let dispatched = ok(call(&client, "dispatch_unit", json!({"orguser": "alice-org", "repo": "alice-repo", "task_description": "exit:0", "description": "build widgets"})).await);
    for field in [
        "handle",
        "orguser",
        "repo",
        "github",
        "status",
        "requested_at",
    ] {
        assert!(
            !dispatched[field].is_null(),
            "dispatch_unit lacks the Python field {field}"
        );
    }
    assert_eq!(dispatched["github"], "alice/alice-repo");
    let handle = dispatched["handle"].as_str().unwrap().to_owned();

    let status = ok(call(&client, "dispatch_status", json!({"handle": handle})).await);
    assert_eq!(status["handle"], handle.as_str());

    let result = ok(call(
        &client,
        "dispatch_result",
        json!({"handle": handle, "wait_seconds": 20}),
    )
    .await);
    assert_eq!(result["status"], "succeeded");
    assert_eq!(result["returncode"], 0);
    assert_eq!(result["outcome"], "exited with status 0");
    // As the Python server's detail: what the command printed (its end).
    let printed = result["stdout"]["text"].as_str().unwrap().trim();
    assert_eq!(result["detail"], printed);
    // The same detail whichever tool reports the dispatch, and however much output a result
    // asks for (these carry no output).
    let status = ok(call(&client, "dispatch_status", json!({"handle": handle})).await);
    assert_eq!(status["detail"], printed, "{status}");
    let next = result["stdout"]["next_offset"].clone();
    let newer = json!({"handle": handle, "stdout_offset": next, "stderr_offset": 1 << 30});
    let nothing_new = ok(call(&client, "dispatch_result", newer).await);
    assert_eq!(nothing_new["detail"], printed, "{nothing_new}");
    assert!(
        result["stdout"]["text"]
            .as_str()
            .unwrap()
            .contains("lane ran")
    );
    assert_eq!(result["sandbox"]["seccomp"], true);
    assert_eq!(result["sandbox"]["uid"], user(ALICE).uid.as_raw());

    let list = ok(call(
        &client,
        "dispatch_list",
        json!({"filter": "build*", "detail": true}),
    )
    .await);
    assert_eq!(list["count"], 1);
    assert_eq!(list["dispatches"][0]["handle"], handle.as_str());
    assert!(list["dispatches"][0]["argv"].is_array());
    assert_eq!(list["dispatches"][0]["detail"], printed);
    let limited = ok(call(&client, "dispatch_list", json!({"limit": "1"})).await);
    assert_eq!(limited["count"], 1);
    let none = ok(call(&client, "dispatch_list", json!({"filter": "deploy*"})).await);
    assert_eq!(none["count"], 0);

    let running = ok(call(
        &client,
        "dispatch_unit",
        json!({"orguser": "bob-org", "repo": "bob-repo", "task_description": "sleep:60"}),
    )
    .await);
    let running_handle = running["handle"].as_str().unwrap();
    let error = tool_error(
        call(
            &client,
            "dispatch_delete",
            json!({"handle": running_handle}),
        )
        .await,
    );
    assert!(
        error.contains("still running; cancel it first") && error.contains("dispatch_cancel"),
        "{error}"
    );
    let cancelled = ok(call(
        &client,
        "dispatch_cancel",
        json!({"handle": running_handle}),
    )
    .await);
    assert_eq!(cancelled["status"], "cancelled");
    let deleted = ok(call(
        &client,
        "dispatch_delete",
        json!({"handle": running_handle}),
    )
    .await);
    assert_eq!(deleted["deleted"], true);

    // The helper recorded the MCP client's name as a claim, beside the real peer uid.
    let accepted = helper.audited("dispatch_accepted");
    assert_eq!(accepted[0]["claimed_client"], "e2e-test-client");
    assert_eq!(accepted[0]["peer"]["uid"], 0);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn expected_failures_are_tool_errors_that_say_what_to_do() {
    let Some(helper) = start_helper("front failures", HelperOptions::default()) else {
        return;
    };
    let client = front(&helper.socket, TestClient::default()).await;

    let error = tool_error(
        call(
            &client,
            "dispatch_unit",
            json!({"orguser": "alice-org", "repo": "nope", "task_description": "x"}),
        )
        .await,
    );
    assert_eq!(
        error,
        "unknown repo \"nope\"; known targets: alice-org/alice-repo, bob-org/bob-repo. Call dispatch_lanes to see the org-user/repo lanes you may dispatch to."
    );
    let error = tool_error(
        call(
            &client,
            "dispatch_unit",
            json!({"orguser": "alice-org", "repo": "bob-repo", "task_description": "x"}),
        )
        .await,
    );
    assert!(
        error.starts_with("repo bob-repo belongs to orguser bob-org, not alice-org.")
            && error.contains("dispatch_lanes"),
        "{error}"
    );
    let error = tool_error(call(&client, "dispatch_unit", json!({"orguser": "alice-org", "repo": "alice-repo", "task_description": "x".repeat(8001)})).await);
    assert!(
        error.contains("8001 characters long") && error.contains("Fix that argument"),
        "{error}"
    );
    // Too long even to reach the helper: said as such, never as the helper's fault.
    let error = tool_error(call(&client, "dispatch_unit", json!({"orguser": "alice-org", "repo": "alice-repo", "task_description": "x".repeat(70_000)})).await);
    assert!(
        error.contains("too large to send")
            && error.contains("task_description")
            && !error.contains("broke the protocol"),
        "{error}"
    );
    let error = tool_error(
        call(
            &client,
            "dispatch_status",
            json!({"handle": "d-00000000000000000000000000000000"}),
        )
        .await,
    );
    assert!(
        error.contains("unknown handle") && error.contains("dispatch_list"),
        "{error}"
    );
    let error = tool_error(
        call(
            &client,
            "dispatch_result",
            json!({"handle": "not a handle"}),
        )
        .await,
    );
    assert!(error.contains("invalid handle"), "{error}");
    // A missing argument is rejected by the MCP layer with the field's name.
    let error = tool_error(
        call(
            &client,
            "dispatch_unit",
            json!({"orguser": "alice-org", "repo": "alice-repo"}),
        )
        .await,
    );
    assert!(error.contains("task_description"), "{error}");
    // An unknown tool cannot be routed: a protocol error, not a tool error.
    let unknown = client
        .call_tool(
            CallToolRequestParams::new("run_shell").with_arguments(args(json!({"cmd": "id"}))),
        )
        .await;
    assert!(unknown.is_err(), "an unknown tool must be a protocol error");

    // Helper unreachable.
    let nowhere = helper.dir.path().join("nowhere.sock");
    let orphan = front(&nowhere, TestClient::default()).await;
    let error = tool_error(call(&orphan, "dispatch_lanes", json!({})).await);
    assert!(
        error.contains("not reachable at")
            && error.contains("systemctl start dispatch-helper.socket")
            && error.contains("personal helper"),
        "{error}"
    );
    orphan.cancel().await.unwrap();
    client.cancel().await.unwrap();
}

/// A client's name is only a claim the helper records (its first 128 characters): one too long
/// to send whole used to fail the handshake, as if the user were not admitted.
#[tokio::test]
async fn a_client_with_a_huge_name_is_served_and_recorded_by_the_start_of_it() {
    let Some(helper) = start_helper("huge client name", HelperOptions::default()) else {
        return;
    };
    let name = "é".repeat(100_000);
    let handler = TestClient {
        name: Some(name.clone()),
        ..TestClient::default()
    };
    let client = front(&helper.socket, handler).await;
    dispatched(&client, "exit:0").await;
    let accepted = helper.audited("dispatch_accepted");
    let claimed = accepted[0]["claimed_client"].as_str().unwrap_or_default();
    assert_eq!(claimed, "é".repeat(128));
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn the_front_reconnects_after_the_helper_restarts() {
    let Some(mut helper) = start_helper("front reconnect", HelperOptions::default()) else {
        return;
    };
    let client = front(&helper.socket, TestClient::default()).await;
    ok(call(&client, "dispatch_lanes", json!({})).await);
    helper.kill9();
    let error = tool_error(call(&client, "dispatch_lanes", json!({})).await);
    assert!(error.contains("dispatch helper"), "{error}");
    helper.launch();
    let lanes = ok(call(&client, "dispatch_lanes", json!({})).await);
    assert_eq!(
        lanes["count"], 2,
        "the next call works without restarting the front"
    );
    let dispatched = ok(call(
        &client,
        "dispatch_unit",
        json!({"orguser": "alice-org", "repo": "alice-repo", "task_description": "exit:0"}),
    )
    .await);
    assert_eq!(dispatched["status"], "running");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn calls_beyond_what_the_helper_serves_at_once_wait_their_turn() {
    // The helper serves two requests at once on a connection; the front has 26 at once.
    let options = HelperOptions {
        extra_toml: "[limits]\nmax_in_flight_per_connection = 2\n".into(),
        ..Default::default()
    };
    let Some(helper) = start_helper("front queue", options) else {
        return;
    };
    let client = std::sync::Arc::new(front(&helper.socket, TestClient::default()).await);
    let sleeper = ok(call(
        &client,
        "dispatch_unit",
        json!({"orguser": "alice-org", "repo": "alice-repo", "task_description": "sleep:2"}),
    )
    .await);
    let handle = sleeper["handle"].as_str().unwrap().to_owned();
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..26 {
        let (client, handle) = (client.clone(), handle.clone());
        calls.spawn(async move {
            let (tool, arguments) = match n % 13 {
                // Waits for the result: they may hold at most half the places.
                0 => ("dispatch_result", json!({"handle": handle, "wait_seconds": 10})),
                1 => (
                    "dispatch_unit",
                    json!({"orguser": "alice-org", "repo": "alice-repo", "task_description": "exit:0"}),
                ),
                _ => ("dispatch_status", json!({"handle": handle})),
            };
            let result = call(&client, tool, arguments).await;
            (tool, result.is_error == Some(true), text(&result))
        });
    }
    let mut refused = Vec::new();
    while let Some(done) = calls.join_next().await {
        let (tool, failed, said) = done.unwrap();
        if failed {
            refused.push(format!("{tool}: {said}"));
        }
    }
    assert!(
        refused.is_empty(),
        "calls refused instead of queued: {refused:#?}"
    );
}

#[tokio::test]
async fn result_waits_report_progress_and_stop_when_cancelled() {
    let Some(helper) = start_helper("front progress", HelperOptions::default()) else {
        return;
    };
    let handler = TestClient::default();
    let progress = handler.progress.clone();
    let client = front(&helper.socket, handler).await;

    let handle = dispatched(&client, "sleep:3").await;
    let result = ok(call(
        &client,
        "dispatch_result",
        json!({"handle": handle, "wait_seconds": 30}),
    )
    .await);
    assert_eq!(result["status"], "succeeded");
    let received = progress.lock().unwrap().clone();
    assert!(received.len() >= 2, "progress notifications: {received:?}");
    assert!(
        received[0]
            .message
            .as_deref()
            .unwrap()
            .contains("is running"),
        "{:?}",
        received[0]
    );
    assert_eq!(received[0].total, Some(30.0));

    // Cancel a waiting dispatch_result: the wait stops (no more progress), the job keeps running.
    let handle = dispatched(&client, "sleep:30").await;
    let request = client
        .send_cancellable_request(
            ClientRequest::CallToolRequest(CallToolRequest::new(
                CallToolRequestParams::new("dispatch_result")
                    .with_arguments(args(json!({"handle": handle, "wait_seconds": 60}))),
            )),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    let token = request.progress_token.clone();
    let for_token = |all: &[ProgressNotificationParam]| {
        all.iter().filter(|p| p.progress_token == token).count()
    };
    wait_until_async(
        "progress for the waiting call",
        Duration::from_secs(10),
        || for_token(&progress.lock().unwrap()) >= 1,
    )
    .await;
    request
        .cancel(Some("the user moved on".into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let settled = for_token(&progress.lock().unwrap());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        for_token(&progress.lock().unwrap()),
        settled,
        "the cancelled wait kept sending progress"
    );
    let status = ok(call(&client, "dispatch_status", json!({"handle": handle})).await);
    assert_eq!(
        status["status"], "running",
        "cancelling the wait must not cancel the job"
    );
    ok(call(&client, "dispatch_cancel", json!({"handle": handle})).await);
    client.cancel().await.unwrap();
}

async fn poll_task(client: &Client, task_id: &str) -> rmcp::model::DetailedTask {
    for _ in 0..400 {
        let got = client
            .get_task(GetTaskParams::new(task_id.to_owned()))
            .await
            .unwrap();
        if got.task.status().is_terminal() {
            return got.task;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {task_id} never finished");
}

async fn dispatch_as_task(client: &Client, task: &str) -> String {
    let response = client
        .call_tool_once(
            CallToolRequestParams::new("dispatch_unit").with_arguments(args(
                json!({"orguser": "alice-org", "repo": "alice-repo", "task_description": task}),
            )),
        )
        .await
        .unwrap();
    let CallToolResponse::Task(created) = response else {
        panic!("a client that negotiated the Tasks extension must get a task, got {response:?}")
    };
    assert_eq!(created.task.status, TaskStatus::Working);
    created.task.task_id
}

/// A client of the stateless protocol (2026-07-28, `server/discover`, no `initialize`) that
/// declares the Tasks extension: the one case where the server may answer with a task.
async fn stateless_tasks_front(socket: &Path) -> Client {
    let command = tokio::process::Command::new(front_bin()).configure(|cmd| {
        cmd.arg("serve").arg("--socket").arg(socket);
    });
    let handler = TestClient {
        tasks: true,
        ..Default::default()
    };
    handler
        .serve_with_lifecycle(
            TokioChildProcess::new(command).unwrap(),
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .expect("MCP server/discover")
}

fn completed_output(task: rmcp::model::DetailedTask) -> (Value, bool) {
    let TaskPayload::Completed { result } = task.payload else {
        panic!("expected completed, got {:?}", task.payload)
    };
    let result: CallToolResult = serde_json::from_value(Value::Object(result)).unwrap();
    (
        result.structured_content.unwrap(),
        result.is_error == Some(true),
    )
}

#[tokio::test]
async fn extension_tasks_are_the_helpers_jobs_and_outlive_the_front() {
    let Some(helper) = start_helper("front tasks", HelperOptions::default()) else {
        return;
    };
    let client = stateless_tasks_front(&helper.socket).await;

    let (output, is_error) =
        completed_output(poll_task(&client, &dispatch_as_task(&client, "exit:0").await).await);
    assert_eq!(
        (
            output["status"].as_str(),
            output["returncode"].as_i64(),
            is_error
        ),
        (Some("succeeded"), Some(0), false)
    );
    assert!(
        output["stdout"]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("lane ran"),
        "the completed payload carries the full result: {output}"
    );
    // The extension's `failed` is for JSON-RPC errors: a lane that failed is a completed task
    // whose tool result is an error.
    let (output, is_error) =
        completed_output(poll_task(&client, &dispatch_as_task(&client, "exit:4").await).await);
    assert_eq!(
        (output["status"].as_str(), is_error),
        (Some("failed"), true)
    );

    // Two tasks outlive the front that created them.
    let finishing = dispatch_as_task(&client, "sleep:2").await;
    let long = dispatch_as_task(&client, "sleep:60").await;
    client.cancel().await.unwrap();
    let client = stateless_tasks_front(&helper.socket).await;
    let (output, _) = completed_output(poll_task(&client, &finishing).await);
    assert_eq!(
        (output["handle"].as_str(), output["status"].as_str()),
        (Some(finishing.as_str()), Some("succeeded"))
    );
    let running = client
        .get_task(GetTaskParams::new(long.clone()))
        .await
        .unwrap();
    assert_eq!(running.task.status(), TaskStatus::Working);
    assert!(
        running
            .task
            .task
            .status_message
            .unwrap()
            .contains("is running: sleeping")
    );
    client
        .cancel_task(CancelTaskParams::new(long.clone()))
        .await
        .unwrap();
    assert_eq!(
        poll_task(&client, &long).await.status(),
        TaskStatus::Cancelled
    );
    let lane = ok(call(&client, "dispatch_status", json!({"handle": long})).await);
    assert_eq!(
        lane["status"], "cancelled",
        "tasks/cancel stopped the lane: {lane}"
    );
    let unknown = client
        .get_task(GetTaskParams::new("d-00000000000000000000000000000000"))
        .await;
    assert!(
        format!("{unknown:?}").contains("unknown handle"),
        "{unknown:?}"
    );
    client.cancel().await.unwrap();

    // A session that began with `initialize` declaring the extension gets a plain result:
    // SEP-2663 does not define the extension under these protocol versions.
    let legacy = front(
        &helper.socket,
        TestClient {
            tasks: true,
            ..Default::default()
        },
    )
    .await;
    let output = ok(call(
        &legacy,
        "dispatch_unit",
        json!({"orguser": "alice-org", "repo": "alice-repo", "task_description": "exit:0"}),
    )
    .await);
    assert_eq!(output["status"], "running");
    legacy.cancel().await.unwrap();
}

/// A lane that floods its stdout runs to its end at its own pace: the helper drains the pipe
/// and keeps only the bounded tail.
#[tokio::test]
async fn a_flood_of_output_neither_blocks_the_lane_nor_grows_the_helper() {
    let Some(helper) = start_helper("front output flood", HelperOptions::default()) else {
        return;
    };
    let client = front(&helper.socket, TestClient::default()).await;
    let handle = dispatched(&client, "flood:64").await;
    let result = ok(call(
        &client,
        "dispatch_result",
        json!({"handle": handle, "wait_seconds": 60}),
    )
    .await);
    assert_eq!(result["status"], "succeeded", "{result}");
    let stdout = &result["stdout"];
    assert_eq!(stdout["total_bytes"].as_u64(), Some(64 << 20));
    assert_eq!(stdout["next_offset"].as_u64(), Some(64 << 20));
    assert_eq!(stdout["truncated"], true);
    // The default bound (16 KiB) plus the marker line.
    let kept = stdout["text"].as_str().unwrap().len();
    assert!(kept <= 16 * 1024 + 200, "{kept} bytes kept");
    let helper_rss = std::fs::read_to_string(format!("/proc/{}/status", helper.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_owned()))
        .unwrap();
    let kib: u64 = helper_rss.trim_end_matches(" kB").parse().unwrap();
    assert!(
        kib < 64 * 1024,
        "the helper holds {kib} KiB after 64 MiB of output"
    );
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn a_running_dispatch_shows_its_output_as_it_comes() {
    let Some(helper) = start_helper("front live output", HelperOptions::default()) else {
        return;
    };
    let handler = TestClient::default();
    let progress = handler.progress.clone();
    let client = front(&helper.socket, handler).await;
    let handle = dispatched(&client, "ticks:30").await;

    // The first lines, while the lane still runs.
    let mut early = Value::Null;
    for _ in 0..100 {
        early = ok(call(&client, "dispatch_status", json!({"handle": handle})).await);
        if early["stdout"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("tick 2\n"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(early["status"], "running", "{early}");
    assert!(
        early["stdout"]["text"]
            .as_str()
            .unwrap()
            .starts_with("tick 1\n"),
        "{early}"
    );
    assert!(
        early["stderr"]["text"].as_str().unwrap().contains("err 1"),
        "{early}"
    );
    assert_eq!(early["stdout"]["offset"], 0);

    // Only what is new since the offset it gave.
    let seen = early["stdout"]["next_offset"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let newer = ok(call(
        &client,
        "dispatch_status",
        json!({"handle": handle, "stdout_offset": seen, "stderr_offset": early["stderr"]["next_offset"]}),
    )
    .await);
    let text = newer["stdout"]["text"].as_str().unwrap();
    assert_eq!(newer["stdout"]["offset"].as_u64(), Some(seen), "{newer}");
    assert!(
        text.starts_with("tick ") && !text.contains("tick 1\n"),
        "{newer}"
    );
    assert!(
        !newer["stderr"]["text"]
            .as_str()
            .unwrap()
            .contains("err 1\n"),
        "{newer}"
    );

    // A wait reports progress with the newest line.
    let result = ok(call(
        &client,
        "dispatch_result",
        json!({"handle": handle, "wait_seconds": 30}),
    )
    .await);
    assert_eq!(result["status"], "succeeded", "{result}");
    assert!(
        result["stdout"]["text"]
            .as_str()
            .unwrap()
            .ends_with("tick 30\n")
    );
    let messages: Vec<String> = progress
        .lock()
        .unwrap()
        .iter()
        .filter_map(|p| p.message.clone())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("is running: tick ") || m.contains("is running: err ")),
        "progress messages carry the newest output line: {messages:?}"
    );
    // And the final tail, too, from an offset.
    let end = ok(call(
        &client,
        "dispatch_result",
        json!({"handle": handle, "stdout_offset": seen}),
    )
    .await);
    assert_eq!(end["stdout"]["offset"].as_u64(), Some(seen), "{end}");
    assert!(
        !end["stdout"]["text"].as_str().unwrap().contains("tick 1\n"),
        "{end}"
    );
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn embedded_drop_in_mode_honours_the_python_servers_environment() {
    let Some((client, bin, fake)) = drop_in_front(&[
        ("DISPATCH_SSH_HOST", "build-host"),
        ("DISPATCH_MAX_ITERATIONS", "7"),
        ("DISPATCH_TIMEOUT", "30"),
    ])
    .await
    else {
        return;
    };
    let lanes = ok(call(&client, "dispatch_lanes", json!({})).await);
    assert_eq!(lanes["lanes"][0]["repo"], "gizmos");
    let job = ok(call(
        &client,
        "dispatch_unit",
        json!({"orguser": ALICE, "repo": "widgets", "task_description": "ship it; $(id)"}),
    )
    .await);
    let result = ok(call(
        &client,
        "dispatch_result",
        json!({"handle": job["handle"], "wait_seconds": 20}),
    )
    .await);
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(
        result["stdout"]["text"].as_str().unwrap().trim(),
        format!("<{ALICE}><widgets><ship it; $(id)><--host><build-host><--max><7>")
    );
    assert_eq!(
        result["argv"][0],
        fake.display().to_string(),
        "argv[0] resolved through PATH at load"
    );
    client.cancel().await.unwrap();
    drop(bin);
}

/// The Python server's defaults and leniency, each as its README and code had them.
#[tokio::test]
async fn drop_in_mode_keeps_the_python_servers_defaults_and_leniency() {
    // A malformed number is a warning and the default, never a dead server.
    let Some((client, bin, _)) = drop_in_front(&[("DISPATCH_TIMEOUT", "abc")]).await else {
        return;
    };
    // Surrounding whitespace is stripped; a Markdown list item is a task, not an option; a repo
    // without "github" is known by its name.
    let job = ok(call(
        &client,
        "dispatch_unit",
        json!({"orguser": format!(" {ALICE} "), "repo": "gizmos\n", "task_description": "- fix the flaky test "}),
    )
    .await);
    assert_eq!(job["github"], "gizmos");
    // A handle copied with a trailing newline still names the dispatch.
    let handle = format!("{}\n", job["handle"].as_str().unwrap());
    let result = ok(call(
        &client,
        "dispatch_result",
        json!({"handle": handle, "wait_seconds": 20}),
    )
    .await);
    assert_eq!(result["status"], "succeeded", "{result}");
    // Max iterations 50 by default (DISPATCH_MAX_ITERATIONS unset), as in Python.
    assert_eq!(
        result["stdout"]["text"].as_str().unwrap().trim(),
        format!("<{ALICE}><gizmos><- fix the flaky test><--host><localhost><--max><50>")
    );
    // A real option is still refused, naming the rule.
    let refused = tool_error(
        call(
            &client,
            "dispatch_unit",
            json!({"orguser": ALICE, "repo": "gizmos", "task_description": "--help"}),
        )
        .await,
    );
    assert!(refused.contains("option"), "{refused}");
    client.cancel().await.unwrap();
    drop(bin);
}

/// The front in drop-in mode (`--embedded-helper` with `DISPATCH_REPOS_JSON`), with a stand-in
/// for dotfiles-dispatch on PATH that prints the argv it received, and an allowlist of two
/// repos of the test user's org, one without "github". `None` (skipped) without root.
async fn drop_in_front(env: &[(&str, &str)]) -> Option<(Client, tempfile::TempDir, PathBuf)> {
    if !is_root() {
        skip(
            "embedded drop-in",
            "needs root so the lane can run as a test user's org",
        );
        return None;
    }
    ensure_users();
    let bin = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = bin.path().join("dotfiles-dispatch");
    std::fs::write(
        &fake,
        "#!/bin/sh\nfor arg in \"$@\"; do printf '<%s>' \"$arg\"; done\necho\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let repos = bin.path().join("repos.json");
    std::fs::write(&repos, format!(r#"{{"orgs": {{"{ALICE}": {{}}}}, "repos": {{"widgets": {{"org": "{ALICE}", "github": "acme/widgets"}}, "gizmos": {{"org": "{ALICE}"}}}}}}"#)).unwrap();
    std::fs::set_permissions(&repos, std::fs::Permissions::from_mode(0o644)).unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let path = format!("{}:/usr/bin:/bin", bin.path().display());
    // The personal helper's state and socket in this test's own directories (reachable by
    // the lane user, as root's personal helper runs lanes as the org's account); it stops by
    // itself a second after the test's front goes.
    let (state, runtime) = (bin.path().join("state"), bin.path().join("run"));
    for dir in [&state, &runtime] {
        std::fs::create_dir(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let command = tokio::process::Command::new(front_bin()).configure(|cmd| {
        cmd.args(["serve", "--embedded-helper"])
            .env("DISPATCH_REPOS_JSON", &repos)
            .env("XDG_STATE_HOME", &state)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("DISPATCH_IDLE_EXIT_SECONDS", "1")
            .envs(env)
            .env("PATH", path);
    });
    let client = TestClient::default()
        .serve(TokioChildProcess::new(command).unwrap())
        .await
        .unwrap();
    Some((client, bin, fake))
}
