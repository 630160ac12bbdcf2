//! The MCP layer: thin. Each tool forwards to `DispatchService` and turns a `ToolFailure` into
//! a tool error (`isError`) whose text tells the agent what to do next.

use crate::service::{
    Blame, DeleteOutput, DispatchArgs, DispatchOutput, DispatchService, HandleArgs, LanesOutput,
    ListArgs, ListOutput, NoArgs, ResultArgs, StatusArgs, ToolFailure, output_from,
};
use crate::task_wire;
use crate::tasks::{self, TaskState};
use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{
    CallToolResponse, CallToolResult, CancelTaskParams, ContentBlock, CreateTaskResult,
    CustomRequest, CustomResult, DetailedTask, ErrorCode, GetTaskParams, GetTaskResult,
    Implementation, ProgressNotificationParam, ServerCapabilities, ServerConfig, Task, TaskPayload,
    TaskStatus, UpdateTaskParams,
};
use rmcp::service::RequestContext;
use rmcp::{
    ErrorData as McpError, Json, RoleServer, ServerHandler, tool, tool_handler, tool_router,
};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const INSTRUCTIONS: &str = "dispatch-mcp dispatches a unit of work to an allowlisted \
org-user/repo lane, then lets you follow it. It cannot run arbitrary commands: the command is \
fixed by the server's administrator, and task_description is passed to it as a single data \
argument, never interpreted by a shell.\n\
Workflow: (1) dispatch_lanes lists the org-user/repo lanes you may use. (2) dispatch_unit \
(orguser, repo, task_description) starts the work and returns a handle. (3) dispatch_result \
(handle, wait_seconds) waits for it to finish and returns the exit code, output tails and what \
the sandbox enforced; or poll dispatch_status. (4) dispatch_list finds earlier dispatches; \
dispatch_cancel stops a running one; dispatch_delete removes a finished record. While a \
dispatch runs, dispatch_status and dispatch_result carry its output so far; pass back an \
output tail's next_offset as stdout_offset/stderr_offset to get only what is new. Clients \
that support MCP tasks may run dispatch_unit as a task: its id is the handle.";

#[derive(Clone)]
pub struct DispatchServer {
    service: Arc<DispatchService>,
    tool_router: ToolRouter<DispatchServer>,
    /// The same tools with draft-07 output schemas, for the clients that check them fastest
    /// that way (`schemas::wants_draft_07`).
    draft_07_tools: Arc<Vec<rmcp::model::Tool>>,
}

fn structured<T: serde::Serialize>(value: &T) -> CallToolResult {
    CallToolResult::structured(serde_json::to_value(value).expect("outputs serialize"))
}

fn tool_error(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

#[tool_router]
impl DispatchServer {
    pub fn new(service: DispatchService) -> DispatchServer {
        DispatchServer {
            service: Arc::new(service),
            tool_router: Self::tool_router(),
            draft_07_tools: Arc::new(Self::draft_07_tools()),
        }
    }

    /// The tools, their output schemas in draft-07 where that says the same (`schemas`).
    fn draft_07_tools() -> Vec<rmcp::model::Tool> {
        let mut tools = Self::tool_router().list_all();
        for tool in &mut tools {
            let converted = tool
                .output_schema
                .as_deref()
                .and_then(crate::schemas::as_draft_07);
            if let Some(schema) = converted {
                tool.output_schema = Some(Arc::new(schema));
            }
        }
        tools
    }

    #[cfg(test)]
    pub(crate) fn tool_list_for_tests() -> Vec<rmcp::model::Tool> {
        Self::draft_07_tools()
    }

    fn note_client(&self, ctx: &RequestContext<RoleServer>) {
        self.service
            .helper
            .set_client_name(ctx.client_info().map(|info| info.name));
    }

    #[tool(
        name = "dispatch_unit",
        title = "Dispatch a unit of work",
        description = "Dispatch a unit of work to an allowlisted org-user/repo lane; returns a handle. \
                       task_description is data for the lane's fixed command, not a command.",
        output_schema = schema_for_output::<DispatchOutput>(),
        annotations(read_only_hint = false, destructive_hint = false, idempotent_hint = false, open_world_hint = true)
    )]
    async fn dispatch_unit(
        &self,
        Parameters(args): Parameters<DispatchArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        self.note_client(&ctx);
        let dispatched = match self.service.dispatch(args).await {
            Ok(output) => output,
            Err(failure) => return Ok(tool_error(failure.0).into()),
        };
        if extension_tasks_negotiated(&ctx) {
            return Ok(CallToolResponse::Task(CreateTaskResult::new(
                extension_task(&dispatched),
            )));
        }
        Ok(structured(&dispatched).into())
    }

    #[tool(
        name = "dispatch_status",
        title = "Status of a dispatch",
        description = "Structured status of a dispatched handle (status, returncode once finished, detail, sandbox).",
        annotations(
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn dispatch_status(
        &self,
        Parameters(args): Parameters<StatusArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<DispatchOutput>, String> {
        self.note_client(&ctx);
        let from = output_from(args.stdout_offset, args.stderr_offset);
        self.service
            .status(args.handle, from)
            .await
            .map(Json)
            .map_err(|f| f.0)
    }

    #[tool(
        name = "dispatch_result",
        title = "Result of a dispatch",
        description = "Structured result of a handle: returncode, signal, detail, stdout/stderr tails, times and \
                       what the sandbox enforced. With wait_seconds, waits for the dispatch to finish \
                       (sending progress notifications if asked); cancelling the wait leaves the job running.",
        annotations(
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn dispatch_result(
        &self,
        Parameters(args): Parameters<ResultArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<DispatchOutput>, String> {
        self.note_client(&ctx);
        let wait = Duration::from_secs(u64::from(args.wait_seconds.unwrap_or(0)));
        let progress_token = ctx.meta.get_progress_token();
        let from = output_from(args.stdout_offset, args.stderr_offset);
        let started = Instant::now();
        loop {
            let remaining = wait.saturating_sub(started.elapsed());
            let slice = remaining.min(Duration::from_secs(1)).as_millis() as u32;
            let job = tokio::select! {
                _ = ctx.ct.cancelled() => {
                    return Err("the wait was cancelled; the dispatch keeps running (check it with dispatch_status)".into());
                }
                job = self.service.result_once(args.handle.clone(), slice, from) => job.map_err(|f| f.0)?,
            };
            if job.state.is_terminal() || remaining.is_zero() {
                return Ok(Json(job.into()));
            }
            let job = DispatchOutput::from(job);
            if let Some(token) = &progress_token {
                let elapsed = started.elapsed().as_secs_f64();
                let _ = ctx
                    .peer
                    .notify_progress(
                        ProgressNotificationParam::new(token.clone(), elapsed)
                            .with_total(wait.as_secs_f64())
                            .with_message(tasks::status_message(&job)),
                    )
                    .await;
            }
        }
    }

    #[tool(
        name = "dispatch_list",
        title = "List dispatches",
        description = "Every dispatch this user launched (newest first), optionally filtered by a glob over the description.",
        annotations(
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn dispatch_list(
        &self,
        Parameters(args): Parameters<ListArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<ListOutput>, String> {
        self.note_client(&ctx);
        self.service.list(args).await.map(Json).map_err(|f| f.0)
    }

    #[tool(
        name = "dispatch_cancel",
        title = "Cancel a dispatch",
        description = "Stop a running dispatch (its whole process group: SIGTERM, then SIGKILL). Cancelling a finished dispatch changes nothing.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn dispatch_cancel(
        &self,
        Parameters(args): Parameters<HandleArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<DispatchOutput>, String> {
        self.note_client(&ctx);
        self.service
            .cancel(args.handle)
            .await
            .map(Json)
            .map_err(|f| f.0)
    }

    #[tool(
        name = "dispatch_delete",
        title = "Delete a finished dispatch",
        description = "Remove the record of a finished dispatch (running ones must be cancelled first). The audit log keeps its history.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn dispatch_delete(
        &self,
        Parameters(args): Parameters<HandleArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<DeleteOutput>, String> {
        self.note_client(&ctx);
        self.service
            .delete(args.handle)
            .await
            .map(Json)
            .map_err(|f| f.0)
    }

    #[tool(
        name = "dispatch_lanes",
        title = "Lanes you may dispatch to",
        description = "The org-user/repo lanes this user may dispatch to, with the GitHub repo and the account each runs as.",
        annotations(
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn dispatch_lanes(
        &self,
        Parameters(_): Parameters<NoArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<LanesOutput>, String> {
        self.note_client(&ctx);
        self.service.lanes().await.map(Json).map_err(|f| f.0)
    }
}

/// Whether this request may be answered with a task by the server's choice: the Tasks
/// extension, declared by the client, under a protocol version that defines it (SEP-2663: not
/// the versions that begin with `initialize`; those use core tasks, see `task_wire`).
fn extension_tasks_negotiated(ctx: &RequestContext<RoleServer>) -> bool {
    let stateless = ctx
        .protocol_version()
        .is_some_and(|version| !version.has_initialize());
    stateless
        && ctx
            .client_capabilities()
            .is_some_and(|caps| caps.supports_tasks())
}

/// A dispatch as a Tasks-extension task.
fn extension_task(output: &DispatchOutput) -> Task {
    let status = match TaskState::of(output) {
        TaskState::Working => TaskStatus::Working,
        // The extension's `failed` is for JSON-RPC errors; a tool result with isError is a
        // completed task.
        TaskState::Completed | TaskState::Failed => TaskStatus::Completed,
        TaskState::Cancelled => TaskStatus::Cancelled,
    };
    Task::new(
        output.handle.clone(),
        status,
        output.requested_at.clone(),
        tasks::last_updated(output).to_owned(),
    )
    .with_status_message(tasks::status_message(output))
    .with_poll_interval_ms(tasks::POLL_INTERVAL_MS)
}

fn extension_detailed_task(output: &DispatchOutput) -> DetailedTask {
    let task = extension_task(output);
    let payload = match task.status {
        TaskStatus::Working => TaskPayload::Working,
        TaskStatus::Cancelled => TaskPayload::Cancelled,
        _ => TaskPayload::Completed {
            result: tasks::tool_result(output),
        },
    };
    DetailedTask::new(task, payload)
}

fn invalid_params(message: impl Into<String>) -> McpError {
    McpError::new(ErrorCode::INVALID_PARAMS, message.into(), None)
}

/// A failure of the helper or of a request it refused, as a JSON-RPC error.
fn task_error(failure: ToolFailure) -> McpError {
    match failure.1 {
        Blame::Request => invalid_params(failure.0),
        Blame::Server => McpError::internal_error(failure.0, None),
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaskIdParams {
    task_id: String,
}

#[derive(serde::Deserialize, Default)]
struct ListTasksParams {
    cursor: Option<String>,
}

#[derive(serde::Deserialize)]
struct CallAsTaskParams {
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
}

fn params<T: serde::de::DeserializeOwned>(
    method: &str,
    params: Option<Value>,
) -> Result<T, McpError> {
    serde_json::from_value(params.unwrap_or(Value::Object(Default::default())))
        .map_err(|e| invalid_params(format!("invalid params for {method}: {e}")))
}

/// MCP 2025-11-25 core tasks (see `task_wire`): each answer is read from the helper.
impl DispatchServer {
    async fn call_as_task(&self, call: CallAsTaskParams) -> Result<Value, McpError> {
        if !tasks::TASK_TOOLS.contains(&call.name.as_str()) {
            let known = self.tool_router.has_route(&call.name);
            return Err(if known {
                McpError::new(
                    ErrorCode::METHOD_NOT_FOUND,
                    format!(
                        "{} cannot run as a task (its execution.taskSupport is forbidden); call it without params.task",
                        call.name
                    ),
                    None,
                )
            } else {
                invalid_params(format!("unknown tool {:?}", call.name))
            });
        }
        let args: DispatchArgs = serde_json::from_value(call.arguments.unwrap_or(Value::Null))
            .map_err(|e| invalid_params(format!("invalid arguments for {}: {e}", call.name)))?;
        let dispatched = self.service.dispatch(args).await.map_err(task_error)?;
        Ok(serde_json::json!({ "task": tasks::core_task(&dispatched) }))
    }

    async fn core_task_get(&self, id: TaskIdParams) -> Result<Value, McpError> {
        let output = self
            .service
            .status(id.task_id, None)
            .await
            .map_err(task_error)?;
        Ok(tasks::core_task(&output))
    }

    /// Blocks until the dispatch has finished (or the client cancels this request), asking the
    /// helper in slices short enough that a few such waits do not hold every place the helper
    /// leaves for waits for long.
    async fn core_task_result(
        &self,
        id: TaskIdParams,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<Value, McpError> {
        loop {
            let job = tokio::select! {
                _ = ctx.ct.cancelled() => {
                    return Err(McpError::internal_error("tasks/result was cancelled; the task keeps running", None));
                }
                job = self.service.result_once(id.task_id.clone(), TASK_RESULT_SLICE_MS, None) => job.map_err(task_error)?,
            };
            if job.state.is_terminal() {
                return Ok(tasks::core_result(&job.into()));
            }
        }
    }

    async fn core_task_list(&self, list: ListTasksParams) -> Result<Value, McpError> {
        const PAGE: usize = 50;
        let skip = tasks::parse_cursor(list.cursor.as_deref()).map_err(invalid_params)?;
        let wanted = skip.saturating_add(PAGE + 1);
        let all = self
            .service
            .list(ListArgs {
                limit: Some(u32::try_from(wanted).unwrap_or(u32::MAX)),
                ..ListArgs::default()
            })
            .await
            .map_err(task_error)?;
        Ok(tasks::core_list(&all.dispatches, skip, PAGE))
    }

    /// Only an unfinished task can be cancelled; the answer says `cancelled` (the lane is
    /// being stopped, and its record will say so).
    async fn core_task_cancel(&self, id: TaskIdParams) -> Result<Value, McpError> {
        let current = self
            .service
            .status(id.task_id.clone(), None)
            .await
            .map_err(task_error)?;
        let state = TaskState::of(&current);
        if state.is_terminal() {
            return Err(invalid_params(format!(
                "Cannot cancel task: already in terminal status '{}'",
                state.as_str()
            )));
        }
        let mut cancelled = self.service.cancel(id.task_id).await.map_err(task_error)?;
        match TaskState::of(&cancelled) {
            TaskState::Cancelled => {}
            // Stopped (SIGTERM, then SIGKILL after the grace period); its record says so once
            // its last process is gone.
            TaskState::Working => cancelled.status = "cancelled".into(),
            // It ended by itself between the check and the cancel.
            ended => {
                return Err(invalid_params(format!(
                    "Cannot cancel task: already in terminal status '{}'",
                    ended.as_str()
                )));
            }
        }
        Ok(tasks::core_task(&cancelled))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for DispatchServer {
    fn get_info(&self) -> ServerConfig {
        // The extension is offered where it is defined (the stateless protocol); `task_wire`
        // replaces it with core tasks in sessions that begin with `initialize`.
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tasks()
                .build(),
        )
        .with_server_info(
            Implementation::new("dispatch-mcp", env!("CARGO_PKG_VERSION"))
                .with_title("dispatch-mcp"),
        )
        .with_instructions(INSTRUCTIONS)
    }

    /// The tools, with their output schemas in the dialect this client checks fastest.
    async fn list_tools(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListToolsResult, McpError> {
        let cache_hints = ctx
            .protocol_version()
            .is_some_and(|version| version >= rmcp::model::ProtocolVersion::V_2026_07_28);
        let tools = if crate::schemas::wants_draft_07(ctx.client_info().as_ref()) {
            self.draft_07_tools.as_ref().clone()
        } else {
            self.tool_router.list_all()
        };
        Ok(rmcp::model::ListToolsResult {
            result_type: Some(rmcp::model::ResultType::COMPLETE),
            tools,
            meta: None,
            next_cursor: None,
            ttl_ms: cache_hints.then_some(0),
            cache_scope: cache_hints.then_some(rmcp::model::CacheScope::Public),
        })
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CustomResult, McpError> {
        self.note_client(&ctx);
        let CustomRequest {
            method,
            params: raw,
            ..
        } = request;
        let core = method.strip_prefix(task_wire::CORE_TASKS);
        let result = match (method.as_str(), core) {
            (task_wire::CALL_AS_TASK, _) => self.call_as_task(params("tools/call", raw)?).await,
            (_, Some("tasks/get")) => self.core_task_get(params("tasks/get", raw)?).await,
            (_, Some("tasks/result")) => {
                self.core_task_result(params("tasks/result", raw)?, &ctx)
                    .await
            }
            (_, Some("tasks/list")) => self.core_task_list(params("tasks/list", raw)?).await,
            (_, Some("tasks/cancel")) => self.core_task_cancel(params("tasks/cancel", raw)?).await,
            _ => Err(McpError::new(
                ErrorCode::METHOD_NOT_FOUND,
                format!("method not found: {method}"),
                None,
            )),
        };
        result.map(CustomResult::new)
    }

    /// Tasks extension: `tasks/get`.
    async fn get_task(
        &self,
        request: GetTaskParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        self.note_client(&ctx);
        // A result that does not wait: the full view (tails, argv) a completed payload carries.
        let job = self.service.result_once(request.task_id, 0, None).await;
        let output = DispatchOutput::from(job.map_err(task_error)?);
        Ok(GetTaskResult::new(extension_detailed_task(&output)))
    }

    /// Tasks extension: a dispatch never waits for input.
    async fn update_task(
        &self,
        request: UpdateTaskParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        Err(invalid_params(format!(
            "task {} does not wait for input: a dispatch never asks for any",
            request.task_id
        )))
    }

    /// Tasks extension: `tasks/cancel` (cooperative: the lane is stopped, and `tasks/get`
    /// says `cancelled` once it is).
    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.note_client(&ctx);
        self.service
            .cancel(request.task_id)
            .await
            .map(|_| ())
            .map_err(task_error)
    }
}

/// How long one wait of `tasks/result` asks the helper for.
const TASK_RESULT_SLICE_MS: u32 = 5_000;
