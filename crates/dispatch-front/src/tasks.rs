//! MCP tasks as views of dispatches. A task *is* a dispatch: its id is the dispatch's handle,
//! and every answer is read from the helper, which stores the job durably and shows a client
//! only its own. So a task outlives the front that created it, and nothing about it lives in
//! front memory.
//!
//! Two task protocols exist, and they are not wire-compatible:
//! - MCP 2025-11-25 core tasks (sessions that begin with `initialize`): the client asks for a
//!   task per request (`params.task`), tools say whether they may run as one
//!   (`execution.taskSupport`), and `tasks/get`, `tasks/result`, `tasks/list` and
//!   `tasks/cancel` follow it. This module shapes those answers; `task_wire` carries them past
//!   rmcp, which implements only the other protocol.
//! - The Tasks extension (SEP-2663, `io.modelcontextprotocol/tasks`), defined only for the
//!   2026-07-28 stateless protocol: the server decides, per request, to answer with a task
//!   (rmcp's `CallToolResponse::Task`); `mcp.rs` does that only when the request negotiated it.

use crate::service::{DispatchOutput, OutputTail};
use serde_json::{Value, json};

/// The tools a client may run as a task (`execution.taskSupport: "optional"`); the others
/// forbid it.
pub const TASK_TOOLS: [&str; 1] = ["dispatch_unit"];

/// How often a client should poll `tasks/get`, in milliseconds.
pub const POLL_INTERVAL_MS: u64 = 1000;

/// Key of the `_meta` entry that ties a result to its task.
pub const RELATED_TASK: &str = "io.modelcontextprotocol/related-task";

/// A task's status in both protocols' words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Working,
    Completed,
    Failed,
    Cancelled,
}

impl TaskState {
    /// 2025-11-25: a tool result with `isError` makes the task `failed`.
    pub fn of(output: &DispatchOutput) -> TaskState {
        match output.status.as_str() {
            "queued" | "running" => TaskState::Working,
            "succeeded" => TaskState::Completed,
            "cancelled" => TaskState::Cancelled,
            _ => TaskState::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Working => "working",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        self != TaskState::Working
    }
}

/// What the task is doing, in a line: queued, or running with the newest line of its stdout
/// (else of its stderr) when the view carries output, or how it ended.
pub fn status_message(output: &DispatchOutput) -> String {
    let newest = [&output.stdout, &output.stderr]
        .into_iter()
        .flatten()
        .find_map(OutputTail::newest_line);
    match (output.status.as_str(), newest) {
        ("queued", _) => format!("{} is queued for a free lane", output.handle),
        ("running", Some(line)) => format!("{} is running: {}", output.handle, clip(line)),
        ("running", None) => format!("{} is running", output.handle),
        (status, _) => format!("{} {status}: {}", output.handle, output.outcome),
    }
}

fn clip(line: &str) -> String {
    const MAX: usize = 200;
    if line.chars().count() <= MAX {
        return line.to_owned();
    }
    let kept: String = line.chars().take(MAX).collect();
    format!("{kept}…")
}

/// When the dispatch last changed: its end, else its start, else its request.
pub fn last_updated(output: &DispatchOutput) -> &str {
    output
        .finished_at
        .as_deref()
        .or(output.started_at.as_deref())
        .unwrap_or(&output.requested_at)
}

/// A 2025-11-25 `Task`. Its `ttl` is null: the helper keeps a dispatch's record until it is
/// deleted or pruned (`max_finished_jobs_per_client`), not for a fixed time.
pub fn core_task(output: &DispatchOutput) -> Value {
    json!({
        "taskId": output.handle,
        "status": TaskState::of(output).as_str(),
        "statusMessage": status_message(output),
        "createdAt": output.requested_at,
        "lastUpdatedAt": last_updated(output),
        "ttl": Value::Null,
        "pollInterval": POLL_INTERVAL_MS,
    })
}

/// The tool result a finished dispatch's task carries: the dispatch as `structuredContent`
/// (and as text, for clients that read only content), an error unless it succeeded.
pub fn tool_result(output: &DispatchOutput) -> serde_json::Map<String, Value> {
    let structured = serde_json::to_value(output).expect("outputs serialize");
    let mut result = serde_json::Map::new();
    result.insert(
        "content".into(),
        json!([{"type": "text", "text": structured.to_string()}]),
    );
    result.insert("structuredContent".into(), structured);
    let is_error = TaskState::of(output) != TaskState::Completed;
    result.insert("isError".into(), Value::Bool(is_error));
    result
}

/// 2025-11-25 `tasks/result` of a finished dispatch: its tool result, tied to the task.
pub fn core_result(output: &DispatchOutput) -> Value {
    let mut result = tool_result(output);
    let related = json!({ RELATED_TASK: { "taskId": output.handle } });
    result.insert("_meta".into(), related);
    Value::Object(result)
}

/// A `tasks/list` cursor: how many tasks the earlier pages held.
pub fn parse_cursor(cursor: Option<&str>) -> Result<usize, String> {
    match cursor {
        None => Ok(0),
        Some(text) => text
            .strip_prefix("after:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("invalid cursor {text:?}: pass back a nextCursor unchanged")),
    }
}

/// One page of `tasks/list` from the newest-first dispatches after `skip`.
pub fn core_list(dispatches: &[DispatchOutput], skip: usize, page: usize) -> Value {
    let tasks: Vec<Value> = dispatches
        .iter()
        .skip(skip)
        .take(page)
        .map(core_task)
        .collect();
    let mut result = json!({ "tasks": tasks });
    // The cursor is the client's: any number may come back.
    let next = skip.saturating_add(page);
    if dispatches.len() > next {
        result["nextCursor"] = json!(format!("after:{next}"));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatch(status: &str) -> DispatchOutput {
        serde_json::from_value(json!({
            "handle": "d-0123", "orguser": "acme", "repo": "web", "github": "acme/web",
            "status": status, "requested_at": "2026-11-30T10:00:00Z", "returncode": null,
            "detail": "", "outcome": "exited with status 1", "description": null,
            "task_preview": "t", "task_sha256": "00", "unix_user": "acme",
            "started_at": "2026-11-30T10:00:01Z", "finished_at": null, "signal": null,
            "finished": false, "sandbox": null, "usage": null, "stopped_by": null,
            "stdout": {"text": "step 1\nstep 2\n\n", "total_bytes": 15, "truncated": false,
                       "offset": 0, "next_offset": 15}
        }))
        .unwrap()
    }

    #[test]
    fn dispatch_states_map_to_task_states() {
        for (status, task) in [
            ("queued", "working"),
            ("running", "working"),
            ("succeeded", "completed"),
            ("failed", "failed"),
            ("timed_out", "failed"),
            ("lost", "failed"),
            ("cancelled", "cancelled"),
        ] {
            assert_eq!(core_task(&dispatch(status))["status"], task, "{status}");
        }
    }

    #[test]
    fn a_running_task_says_its_newest_output_line() {
        let task = core_task(&dispatch("running"));
        assert_eq!(task["statusMessage"], "d-0123 is running: step 2");
        assert_eq!(task["taskId"], "d-0123");
        assert_eq!(task["lastUpdatedAt"], "2026-11-30T10:00:01Z");
        assert!(task["ttl"].is_null());
    }

    #[test]
    fn a_failed_dispatch_is_an_error_result_tied_to_its_task() {
        let result = core_result(&dispatch("failed"));
        assert_eq!(result["isError"], true);
        assert_eq!(result["structuredContent"]["status"], "failed");
        assert_eq!(result["_meta"][RELATED_TASK]["taskId"], "d-0123");
        assert_eq!(core_result(&dispatch("succeeded"))["isError"], false);
    }

    #[test]
    fn lists_page_with_cursors_that_are_checked() {
        let all: Vec<DispatchOutput> = (0..5).map(|_| dispatch("running")).collect();
        let first = core_list(&all, 0, 2);
        assert_eq!(first["tasks"].as_array().unwrap().len(), 2);
        let cursor = first["nextCursor"].as_str().unwrap();
        let skip = parse_cursor(Some(cursor)).unwrap();
        let last = core_list(&all, parse_cursor(Some("after:4")).unwrap(), 2);
        assert_eq!((skip, last["tasks"].as_array().unwrap().len()), (2, 1));
        assert!(last.get("nextCursor").is_none());
        // A cursor past every number pages past the end, never round to the start.
        let past = core_list(
            &all,
            parse_cursor(Some("after:18446744073709551615")).unwrap(),
            2,
        );
        assert_eq!(past["tasks"].as_array().unwrap().len(), 0);
        assert!(past.get("nextCursor").is_none(), "{past}");
        assert!(
            parse_cursor(Some("page-2"))
                .unwrap_err()
                .contains("invalid cursor")
        );
    }
}
