//! The MCP layer: thin. Each tool forwards to `DispatchService` and turns a `ToolFailure` into
//! a tool error (`isError`) whose text tells the agent what to do next.

use crate::service::{
    DeleteOutput, DispatchArgs, DispatchOutput, DispatchService, HandleArgs, LanesOutput, ListArgs,
    ListOutput, NoArgs, ResultArgs,
};
use dispatch_proto::{JobState, JobView};
use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{
    CallToolResponse, CallToolResult, CancelTaskParams, ContentBlock, CreateTaskResult,
    GetTaskParams, GetTaskResult, Implementation, ProgressNotificationParam, ServerCapabilities,
    ServerConfig, UpdateTaskParams,
};
use rmcp::service::RequestContext;
use rmcp::task_manager::{TaskExit, TaskManager, TaskOptions};
use rmcp::{
    ErrorData as McpError, Json, RoleServer, ServerHandler, tool, tool_handler, tool_router,
};
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
dispatch_cancel stops a running one; dispatch_delete removes a finished record. Clients that \
support the MCP tasks extension get dispatch_unit as a task that follows the job.";

#[derive(Clone)]
pub struct DispatchServer {
    service: Arc<DispatchService>,
    tool_router: ToolRouter<DispatchServer>,
    tasks: TaskManager,
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
            tasks: TaskManager::new(),
        }
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
        if !ctx
            .client_capabilities()
            .is_some_and(|caps| caps.supports_tasks())
        {
            return Ok(structured(&dispatched).into());
        }
        let service = self.service.clone();
        let handle = dispatched.handle.clone();
        let options = TaskOptions::new()
            .with_poll_interval_ms(1000)
            .with_ttl_ms(24 * 3600 * 1000)
            .with_status_message(format!("dispatch {handle} is running"));
        let task = self.tasks.spawn(options, move |task| {
            Box::pin(async move {
                loop {
                    tokio::select! {
                        _ = task.cancelled() => {
                            let _ = service.cancel(handle.clone()).await;
                            return Err(TaskExit::Cancelled);
                        }
                        answer = service.result_once(handle.clone(), 5_000) => match answer {
                            Ok(job) if job.state.is_terminal() => return task_outcome(job),
                            Ok(job) => task.set_status_message(format!("dispatch {handle}: {}", job.detail)),
                            Err(failure) => return Err(TaskExit::Error(McpError::internal_error(failure.0, None))),
                        }
                    }
                }
            })
        });
        Ok(CallToolResponse::Task(CreateTaskResult::new(task)))
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
        Parameters(args): Parameters<HandleArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<Json<DispatchOutput>, String> {
        self.note_client(&ctx);
        self.service
            .status(args.handle)
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
        let started = Instant::now();
        loop {
            let remaining = wait.saturating_sub(started.elapsed());
            let slice = remaining.min(Duration::from_secs(1)).as_millis() as u32;
            let job = tokio::select! {
                _ = ctx.ct.cancelled() => {
                    return Err("the wait was cancelled; the dispatch keeps running (check it with dispatch_status)".into());
                }
                job = self.service.result_once(args.handle.clone(), slice) => job.map_err(|f| f.0)?,
            };
            if job.state.is_terminal() || remaining.is_zero() {
                return Ok(Json(job.into()));
            }
            if let Some(token) = &progress_token {
                let elapsed = started.elapsed().as_secs_f64();
                let _ = ctx
                    .peer
                    .notify_progress(
                        ProgressNotificationParam::new(token.clone(), elapsed)
                            .with_total(wait.as_secs_f64())
                            .with_message(format!(
                                "{} is {}: {}",
                                job.handle,
                                job.state.as_str(),
                                job.detail
                            )),
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

/// A finished job as a task outcome: succeeded → completed, cancelled → cancelled, anything else → failed.
fn task_outcome(job: JobView) -> Result<CallToolResult, TaskExit> {
    let output = DispatchOutput::from(job);
    match output.status.as_str() {
        s if s == JobState::Succeeded.as_str() => Ok(structured(&output)),
        s if s == JobState::Cancelled.as_str() => Err(TaskExit::Cancelled),
        _ => Err(TaskExit::Error(McpError::internal_error(
            format!(
                "dispatch {} {}: {}",
                output.handle, output.status, output.detail
            ),
            Some(serde_json::to_value(&output).expect("outputs serialize")),
        ))),
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for DispatchServer {
    fn get_info(&self) -> ServerConfig {
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

    async fn get_task(
        &self,
        request: GetTaskParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        Ok(GetTaskResult::new(self.tasks.get_task(&request.task_id)?))
    }

    async fn update_task(
        &self,
        request: UpdateTaskParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.tasks
            .update_task(&request.task_id, request.input_responses)
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.tasks.cancel_task(&request.task_id)
    }
}
