//! Carries MCP 2025-11-25 core tasks past rmcp.
//!
//! rmcp 3.9 implements the Tasks extension (SEP-2663) and not the 2025-11-25 tasks, and its
//! typed model drops what it does not know: a `tools/call`'s `params.task`, the server's
//! `tasks` capability, a tool's `execution`. In a session that begins with `initialize` and
//! negotiates 2025-11-25 (the version that defines core tasks), this adapter sits between stdio
//! and rmcp, reads each JSON-RPC line, and:
//! - gives a task-augmented `tools/call`, and `tasks/get|result|list|cancel`, private method
//!   names, so they reach `DispatchServer::on_custom_request` whole (`mcp.rs`);
//! - adds `capabilities.tasks` to the `initialize` result, and takes the extension out of it
//!   (SEP-2663: it MUST NOT enable tasks under these versions);
//! - adds `execution.taskSupport: "optional"` to the task tools in `tools/list`.
//!
//! Every other line passes unchanged, byte for byte. Sessions without `initialize` (the
//! 2026-07-28 stateless protocol) are not touched: there rmcp's own extension support applies.

use crate::tasks::TASK_TOOLS;
use serde_json::{Value, json};
use std::collections::HashSet;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, DuplexStream};

/// The private name a task-augmented `tools/call` is given.
pub const CALL_AS_TASK: &str = "dispatch-mcp/tools/call-as-task";
/// Prefix of the private names of the 2025-11-25 `tasks/*` methods.
pub const CORE_TASKS: &str = "dispatch-mcp/";

/// The first protocol version with core tasks.
const CORE_TASKS_SINCE: &str = "2025-11-25";

/// Longer lines are dropped, as rmcp's own stdio transport does (a peer that never sends a
/// newline must not grow this process without bound).
const MAX_LINE: usize = 16 * 1024 * 1024;

const CORE_TASK_METHODS: [&str; 4] = ["tasks/get", "tasks/result", "tasks/list", "tasks/cancel"];

/// What the adapter has seen of the session.
#[derive(Debug, Default)]
pub struct WireState {
    /// The session began with `initialize` and negotiated a version with core tasks.
    core_tasks: bool,
    /// Ids of requests whose results are completed on the way out.
    initialize: HashSet<String>,
    tools_list: HashSet<String>,
}

/// A line from the client, rewritten if it needs to be.
pub fn inbound(state: &mut WireState, line: &[u8]) -> Option<Vec<u8>> {
    if !mentions(
        line,
        &[b"initialize", b"tasks/", b"\"task\"", b"tools/list"],
    ) {
        return None;
    }
    let mut message: Value = serde_json::from_slice(line).ok()?;
    let method = message.get("method")?.as_str()?.to_owned();
    let id = message.get("id").map(Value::to_string);
    match (method.as_str(), id) {
        ("initialize", Some(id)) => {
            state.initialize.insert(id);
            None
        }
        ("tools/list", Some(id)) if state.core_tasks => {
            state.tools_list.insert(id);
            None
        }
        ("tools/call", Some(_))
            if state.core_tasks && message["params"].get("task").is_some_and(Value::is_object) =>
        {
            message["method"] = json!(CALL_AS_TASK);
            Some(to_line(&message))
        }
        (name, Some(_)) if state.core_tasks && CORE_TASK_METHODS.contains(&name) => {
            message["method"] = json!(format!("{CORE_TASKS}{name}"));
            Some(to_line(&message))
        }
        _ => None,
    }
}

/// A line from the server, completed if it answers `initialize` or `tools/list`.
pub fn outbound(state: &mut WireState, line: &[u8]) -> Option<Vec<u8>> {
    if state.initialize.is_empty() && state.tools_list.is_empty() {
        return None;
    }
    if !mentions(line, &[b"\"result\"", b"\"error\""]) {
        return None;
    }
    let mut message: Value = serde_json::from_slice(line).ok()?;
    if message.get("method").is_some() {
        // A request or notification of the server's own, not an answer.
        return None;
    }
    let id = message.get("id")?.to_string();
    let result = message.get_mut("result");
    if state.initialize.remove(&id) {
        let result = result?;
        let version = result["protocolVersion"].as_str().unwrap_or_default();
        // Versions are dates: 2025-11-25 defines core tasks; later ones with `initialize`
        // would too, until they say otherwise.
        if version < CORE_TASKS_SINCE {
            return None;
        }
        state.core_tasks = true;
        add_core_tasks_capability(result);
    } else if state.tools_list.remove(&id) {
        mark_task_tools(result?);
    } else {
        return None;
    }
    Some(to_line(&message))
}

fn add_core_tasks_capability(result: &mut Value) {
    let capabilities = &mut result["capabilities"];
    capabilities["tasks"] = json!({
        "list": {},
        "cancel": {},
        "requests": { "tools": { "call": {} } }
    });
    if let Some(extensions) = capabilities
        .get_mut("extensions")
        .and_then(Value::as_object_mut)
    {
        extensions.remove(rmcp::model::TASKS_EXTENSION_ID);
        if extensions.is_empty() {
            capabilities.as_object_mut().map(|c| c.remove("extensions"));
        }
    }
}

fn mark_task_tools(result: &mut Value) {
    let Some(tools) = result.get_mut("tools").and_then(Value::as_array_mut) else {
        return;
    };
    for tool in tools {
        if tool["name"]
            .as_str()
            .is_some_and(|n| TASK_TOOLS.contains(&n))
        {
            tool["execution"] = json!({ "taskSupport": "optional" });
        }
    }
}

fn mentions(line: &[u8], needles: &[&[u8]]) -> bool {
    needles
        .iter()
        .any(|needle| line.windows(needle.len()).any(|w| w == *needle))
}

fn to_line(message: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("a parsed message serializes");
    line.push(b'\n');
    line
}

/// Read one line (with its newline) into `line`, at most `max` bytes: Ok(false) at the end of
/// the stream. A longer line is read to its end and dropped, and `line` comes back empty.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    line.clear();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(!line.is_empty() || too_long);
        }
        let (taken, ended) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        if !too_long && line.len() + taken <= max {
            line.extend_from_slice(&available[..taken]);
        } else {
            too_long = true;
            line.clear();
        }
        reader.consume(taken);
        if ended {
            if too_long {
                tracing::warn!("dropped a JSON-RPC line longer than {max} bytes");
            }
            return Ok(true);
        }
    }
}

/// The adapter between `input`/`output` (the client's stdio) and rmcp: the reader and writer
/// rmcp serves on, and the task that writes rmcp's last answers out (await it before exiting).
pub struct Adapted {
    pub reader: DuplexStream,
    pub writer: DuplexStream,
    pub flushed: tokio::task::JoinHandle<()>,
}

pub fn adapt<R, W>(input: R, output: W) -> Adapted
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    const BUFFER: usize = 256 * 1024;
    let (mut to_rmcp, rmcp_reads) = tokio::io::duplex(BUFFER);
    let (rmcp_writes, from_rmcp) = tokio::io::duplex(BUFFER);
    let state = std::sync::Arc::new(std::sync::Mutex::new(WireState::default()));
    let inbound_state = state.clone();
    tokio::spawn(async move {
        let mut input = BufReader::new(input);
        let mut line = Vec::new();
        while let Ok(true) = read_line(&mut input, &mut line, MAX_LINE).await {
            if line.is_empty() {
                continue;
            }
            let rewritten = inbound(&mut inbound_state.lock().expect("not poisoned"), &line);
            let bytes = rewritten.as_deref().unwrap_or(&line);
            if to_rmcp.write_all(bytes).await.is_err() {
                break;
            }
        }
        let _ = to_rmcp.shutdown().await;
    });
    let flushed = tokio::spawn(async move {
        let mut from_rmcp = BufReader::new(from_rmcp);
        let mut output = output;
        let mut line = Vec::new();
        while let Ok(true) = read_line(&mut from_rmcp, &mut line, usize::MAX).await {
            let rewritten = outbound(&mut state.lock().expect("not poisoned"), &line);
            let bytes = rewritten.as_deref().unwrap_or(&line);
            if output.write_all(bytes).await.is_err() || output.flush().await.is_err() {
                break;
            }
        }
        let _ = output.shutdown().await;
    });
    Adapted {
        reader: rmcp_reads,
        writer: rmcp_writes,
        flushed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Option<Vec<u8>>) -> Option<Value> {
        bytes.map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn nothing_changes_before_an_initialize() {
        let mut state = WireState::default();
        let call = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"dispatch_unit","task":{}}}"#;
        assert_eq!(inbound(&mut state, call), None);
        assert_eq!(
            inbound(
                &mut state,
                br#"{"jsonrpc":"2.0","id":2,"method":"tasks/get","params":{"taskId":"x"}}"#
            ),
            None
        );
    }

    fn initialized(version: &str) -> WireState {
        let mut state = WireState::default();
        let init = br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#;
        assert_eq!(inbound(&mut state, init), None);
        let result = format!(
            r#"{{"jsonrpc":"2.0","id":0,"result":{{"protocolVersion":"{version}","capabilities":{{}}}}}}"#
        );
        outbound(&mut state, result.as_bytes());
        state
    }

    #[test]
    fn an_older_protocol_gets_no_core_tasks() {
        let mut state = initialized("2025-06-18");
        let call = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"dispatch_unit","task":{}}}"#;
        assert_eq!(inbound(&mut state, call), None);
    }

    #[test]
    fn a_server_request_is_not_taken_for_an_answer() {
        let mut state = WireState::default();
        inbound(
            &mut state,
            br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#,
        );
        let ping = br#"{"jsonrpc":"2.0","id":0,"method":"ping"}"#;
        assert_eq!(outbound(&mut state, ping), None);
        let result = br#"{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-11-25","capabilities":{}}}"#;
        assert!(
            outbound(&mut state, result).is_some(),
            "the answer still comes"
        );
    }

    #[tokio::test]
    async fn lines_are_bounded_and_an_overlong_one_is_dropped() {
        let data = b"short\nwaaaaaaaaaaaay too long\nnext\nlast".to_vec();
        let mut reader = BufReader::with_capacity(4, &data[..]);
        let mut line = Vec::new();
        let mut seen = Vec::new();
        while read_line(&mut reader, &mut line, 8).await.unwrap() {
            seen.push(String::from_utf8(line.clone()).unwrap());
        }
        assert_eq!(seen, ["short\n", "", "next\n", "last"]);
    }

    #[test]
    fn task_requests_get_private_names_in_an_initialized_session() {
        let mut state = initialized("2025-11-25");
        let call = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"dispatch_unit","arguments":{},"task":{"ttl":5}}}"#;
        let rewritten = text(inbound(&mut state, call)).unwrap();
        assert_eq!(rewritten["method"], CALL_AS_TASK);
        assert_eq!(rewritten["params"]["task"]["ttl"], 5);
        let plain = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"dispatch_unit","arguments":{"task_description":"the \"task\""}}}"#;
        assert_eq!(inbound(&mut state, plain), None);
        for method in CORE_TASK_METHODS {
            let line = format!(r#"{{"jsonrpc":"2.0","id":3,"method":"{method}","params":{{}}}}"#);
            let rewritten = text(inbound(&mut state, line.as_bytes())).unwrap();
            assert_eq!(rewritten["method"], format!("dispatch-mcp/{method}"));
        }
    }

    #[test]
    fn the_initialize_result_offers_core_tasks_and_not_the_extension() {
        let mut state = WireState::default();
        inbound(
            &mut state,
            br#"{"jsonrpc":"2.0","id":"a","method":"initialize","params":{}}"#,
        );
        let result = br#"{"jsonrpc":"2.0","id":"a","result":{"protocolVersion":"2025-11-25","capabilities":{"tools":{},"extensions":{"io.modelcontextprotocol/tasks":{}}}}}"#;
        let patched = text(outbound(&mut state, result)).unwrap();
        let capabilities = &patched["result"]["capabilities"];
        assert_eq!(
            capabilities["tasks"]["requests"]["tools"]["call"],
            json!({})
        );
        assert_eq!(capabilities["tasks"]["cancel"], json!({}));
        assert!(capabilities.get("extensions").is_none(), "{capabilities}");
        assert_eq!(outbound(&mut state, result), None, "answered once");
    }

    #[test]
    fn tools_list_marks_the_task_tools_only() {
        let mut state = initialized("2025-11-25");
        inbound(
            &mut state,
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#,
        );
        let result = br#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"dispatch_unit"},{"name":"dispatch_status"}]}}"#;
        let patched = text(outbound(&mut state, result)).unwrap();
        let tools = &patched["result"]["tools"];
        assert_eq!(tools[0]["execution"]["taskSupport"], "optional");
        assert!(tools[1].get("execution").is_none());
    }
}
