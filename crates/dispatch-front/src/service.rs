//! The tools' logic as plain Rust: typed arguments in, typed outputs or a `ToolFailure` out.
//! The MCP layer (`mcp.rs`) only adapts these to rmcp.
//!
//! Field names follow the Python server (`handle`, `orguser`, `repo`, `github`, `status`,
//! `requested_at`, `returncode`, `detail`, `count`, `dispatches`) so existing clients keep
//! working; everything else is an addition beside them.

use crate::helper_client::{HelperClient, HelperError};
use dispatch_proto::{
    DispatchRequest, ErrorKind, ErrorReply, JobState, JobView, OutputOffsets, Request, Response,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, JsonSchema)]
pub struct DispatchArgs {
    /// The org-user that owns the repo (an allowlisted lane owner; see dispatch_lanes).
    pub orguser: String,
    /// The repo to dispatch to; must belong to `orguser` in the allowlist.
    pub repo: String,
    /// What the lane should do: plain text, passed as a single argument and never interpreted
    /// by a shell. 1 to 8000 characters.
    pub task_description: String,
    /// Optional short label for dispatch_list filtering (defaults to the task's first line).
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct HandleArgs {
    /// A handle returned by dispatch_unit.
    pub handle: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct StatusArgs {
    /// A handle returned by dispatch_unit.
    pub handle: String,
    /// Only the stdout after this byte offset (a `next_offset` from an earlier answer).
    #[serde(default, deserialize_with = "lenient::stdout_offset")]
    pub stdout_offset: Option<u64>,
    /// Only the stderr after this byte offset (a `next_offset` from an earlier answer).
    #[serde(default, deserialize_with = "lenient::stderr_offset")]
    pub stderr_offset: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ResultArgs {
    /// A handle returned by dispatch_unit.
    pub handle: String,
    /// Wait up to this many seconds for the dispatch to finish (0 or absent: answer at once).
    #[serde(default, deserialize_with = "lenient::seconds")]
    pub wait_seconds: Option<u32>,
    /// Only the stdout after this byte offset (a `next_offset` from an earlier answer).
    #[serde(default, deserialize_with = "lenient::stdout_offset")]
    pub stdout_offset: Option<u64>,
    /// Only the stderr after this byte offset (a `next_offset` from an earlier answer).
    #[serde(default, deserialize_with = "lenient::stderr_offset")]
    pub stderr_offset: Option<u64>,
}

/// The offsets a caller gave, if any (one alone means "from the start" for the other).
pub fn output_from(stdout: Option<u64>, stderr: Option<u64>) -> Option<OutputOffsets> {
    (stdout.is_some() || stderr.is_some()).then(|| OutputOffsets {
        stdout: stdout.unwrap_or(0),
        stderr: stderr.unwrap_or(0),
    })
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct ListArgs {
    /// Glob over each dispatch's description, e.g. "build*".
    #[serde(default)]
    pub filter: Option<String>,
    /// Include the argv of each dispatch.
    #[serde(default, deserialize_with = "lenient::detail")]
    pub detail: Option<bool>,
    /// At most this many dispatches, newest first (default and cap: the helper's `max_list`).
    #[serde(default, deserialize_with = "lenient::limit")]
    pub limit: Option<u32>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct NoArgs {}

/// Some clients (the MCP Inspector CLI, agents writing JSON by hand) send numbers and booleans
/// as strings, or whole numbers as `30.0`. The schema says integer/boolean; a value that means
/// one is accepted too, and anything else is refused naming the argument and the value.
mod lenient {
    use serde::{Deserialize, Deserializer, de::Error};
    use serde_json::Value;

    /// A whole number `T` from a number (`30`, `30.0`) or a string of one.
    fn whole<'de, D, T>(deserializer: D, field: &str, what: &str) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        let refuse =
            |shown: String| D::Error::custom(format!("{field}: expected {what}, got {shown}"));
        let value = match Option::<Value>::deserialize(deserializer)? {
            None | Some(Value::Null) => return Ok(None),
            Some(value) => value,
        };
        let number = match &value {
            Value::Number(number) => number.as_u64().or_else(|| {
                number
                    .as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
                    .map(|f| f as u64)
            }),
            Value::String(text) => text.trim().parse().ok(),
            _ => None,
        };
        number
            .and_then(|n| T::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| refuse(value.to_string()))
    }

    pub fn seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
        whole(deserializer, "wait_seconds", "a whole number of seconds")
    }

    pub fn limit<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
        whole(deserializer, "limit", "a whole number of dispatches")
    }

    pub fn stdout_offset<'de, D>(deserializer: D) -> Result<Option<u64>, D::Error>
    where
        D: Deserializer<'de>,
    {
        whole(
            deserializer,
            "stdout_offset",
            "a byte offset (a whole number)",
        )
    }

    pub fn stderr_offset<'de, D>(deserializer: D) -> Result<Option<u64>, D::Error>
    where
        D: Deserializer<'de>,
    {
        whole(
            deserializer,
            "stderr_offset",
            "a byte offset (a whole number)",
        )
    }

    /// true or false, as a boolean, a string (any case) or 1/0.
    pub fn detail<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
        let value = match Option::<Value>::deserialize(deserializer)? {
            None | Some(Value::Null) => return Ok(None),
            Some(value) => value,
        };
        let meant = match &value {
            Value::Bool(b) => Some(*b),
            Value::String(text) => match text.trim().to_ascii_lowercase().as_str() {
                "true" | "1" => Some(true),
                "false" | "0" => Some(false),
                _ => None,
            },
            Value::Number(n) => match n.as_u64() {
                Some(1) => Some(true),
                Some(0) => Some(false),
                _ => None,
            },
            _ => None,
        };
        meant
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("detail: expected true or false, got {value}")))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct OutputTail {
    /// The stream's bytes from `offset` to `next_offset`; starts with a "[… …]" marker line
    /// when bytes before them are gone (`truncated`).
    pub text: String,
    /// Bytes the stream has carried so far.
    pub total_bytes: u64,
    pub truncated: bool,
    /// Byte offset in the stream of the first byte of `text` (after any marker).
    pub offset: u64,
    /// Pass this back as `stdout_offset`/`stderr_offset` to get only what is new.
    pub next_offset: u64,
}

impl OutputTail {
    /// The last non-empty line of the text, for a progress message.
    pub fn newest_line(&self) -> Option<&str> {
        self.text
            .lines()
            .rev()
            .map(str::trim)
            .find(|line| !line.is_empty())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct SandboxOutput {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub landlock: String,
    pub landlock_abi: u32,
    pub seccomp: bool,
    pub no_new_privs: bool,
    /// True when the helper ran without root, so the lane kept the helper's own uid.
    pub same_uid: bool,
    /// What ends everything the lane starts: its own cgroup, or its process group.
    pub containment: String,
    /// Each resource limit (`processes`, `memory`, `swap`, `cpu_time`, `cpu_rate`,
    /// `open_files`, `file_size`, `wall_clock`), its value and what holds it on this host.
    pub limits: Vec<LimitOutput>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct LimitOutput {
    pub limit: String,
    pub value: String,
    pub mechanism: String,
}

/// What a finished dispatch cost.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct UsageOutput {
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    pub peak_memory_bytes: u64,
    /// True when the peak covers the whole lane; false when it is its largest process's.
    pub peak_memory_whole_lane: bool,
}

/// One dispatch, as the Python server reported it plus what it lacked.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct DispatchOutput {
    pub handle: String,
    pub orguser: String,
    pub repo: String,
    /// `owner/repo` on GitHub.
    pub github: String,
    /// queued, running, succeeded, failed, timed_out, cancelled or lost.
    pub status: String,
    /// RFC 3339 UTC.
    pub requested_at: String,
    /// Exit code of the dispatch command, once it has exited.
    pub returncode: Option<i32>,
    /// As the Python server's: once the command has exited, a short summary of its output
    /// (the end of stdout, else of stderr); otherwise, and when it printed nothing or a limit
    /// stopped it, the same words as `outcome`.
    pub detail: String,
    /// What happened, in words (or why it failed).
    pub outcome: String,
    pub description: Option<String>,
    pub task_preview: String,
    pub task_sha256: String,
    pub unix_user: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Signal that ended the dispatch command, if any.
    pub signal: Option<i32>,
    /// True once the dispatch has reached a final state.
    pub finished: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout: Option<OutputTail>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr: Option<OutputTail>,
    /// What the sandbox enforced on the lane.
    pub sandbox: Option<SandboxOutput>,
    /// CPU time and peak memory, once finished.
    pub usage: Option<UsageOutput>,
    /// The limit that stopped it (`processes`, `memory`, `cpu_time`, `wall_clock`), if one did.
    pub stopped_by: Option<String>,
}

impl From<JobView> for DispatchOutput {
    fn from(job: JobView) -> Self {
        let tail = |t: dispatch_proto::OutputTail| OutputTail {
            text: t.text,
            total_bytes: t.total_bytes,
            truncated: t.truncated,
            offset: t.offset,
            next_offset: t.next_offset,
        };
        // Kept by the helper since protocol 5; from the tails for a job that ended before.
        let summary = job.summary.clone().or_else(|| job.output_summary());
        DispatchOutput {
            handle: job.handle,
            orguser: job.orguser,
            repo: job.repo,
            github: job.github,
            status: job.state.as_str().to_owned(),
            requested_at: job.requested_at,
            returncode: job.exit_code,
            detail: summary.unwrap_or_else(|| job.detail.clone()),
            outcome: job.detail,
            description: job.description,
            task_preview: job.task_preview,
            task_sha256: job.task_sha256,
            unix_user: job.unix_user,
            started_at: job.started_at,
            finished_at: job.finished_at,
            signal: job.signal,
            finished: job.state.is_terminal(),
            argv: job.argv,
            stdout: job.stdout.map(tail),
            stderr: job.stderr.map(tail),
            sandbox: job.sandbox.map(|s| SandboxOutput {
                uid: s.uid,
                gid: s.gid,
                groups: s.groups,
                landlock: s.landlock,
                landlock_abi: s.landlock_abi,
                seccomp: s.seccomp,
                no_new_privs: s.no_new_privs,
                same_uid: s.same_uid,
                containment: s.containment,
                limits: s
                    .limits
                    .into_iter()
                    .map(|l| LimitOutput {
                        limit: l.limit,
                        value: l.value,
                        mechanism: l.mechanism,
                    })
                    .collect(),
            }),
            usage: job.usage.map(|u| UsageOutput {
                cpu_user_ms: u.cpu_user_ms,
                cpu_system_ms: u.cpu_system_ms,
                peak_memory_bytes: u.peak_memory_bytes,
                peak_memory_whole_lane: u.peak_memory_whole_lane,
            }),
            stopped_by: job.stopped_by,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct ListOutput {
    /// Number of dispatches returned.
    pub count: usize,
    /// Number of dispatches matching the filter (may exceed `count`).
    pub total: u64,
    pub dispatches: Vec<DispatchOutput>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct LaneOutput {
    pub orguser: String,
    pub repo: String,
    pub github: String,
    /// The local account the lane runs as.
    pub unix_user: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct LanesOutput {
    pub count: usize,
    pub lanes: Vec<LaneOutput>,
    /// True when the helper runs without root (every lane runs as the helper's own user).
    pub unprivileged_helper: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct DeleteOutput {
    pub handle: String,
    pub deleted: bool,
}

/// An expected failure, worded for the agent: what went wrong and what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolFailure(pub String, pub Blame);

/// Whose the failure is: the request's (the helper refused it: fix the arguments), or the
/// server's (the helper is unreachable, or failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Request,
    Server,
}

impl ToolFailure {
    fn server(message: impl Into<String>) -> ToolFailure {
        ToolFailure(message.into(), Blame::Server)
    }
}

impl std::fmt::Display for ToolFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub struct DispatchService {
    pub helper: HelperClient,
}

impl DispatchService {
    pub fn new(helper: HelperClient) -> DispatchService {
        DispatchService { helper }
    }

    fn helper_failure(&self, error: HelperError) -> ToolFailure {
        if let HelperError::TooLarge { .. } = error {
            return ToolFailure(error.to_string(), Blame::Request);
        }
        ToolFailure::server(match error {
            HelperError::Unreachable { .. } if self.helper.is_personal() => format!(
                "{error}. This is your personal dispatch helper (no system helper answered at \
                 {}).",
                crate::DEFAULT_SOCKET
            ),
            HelperError::Unreachable { .. } => format!(
                "{error}. The dispatch helper must be running: start it with `systemctl start \
                 dispatch-helper.socket`, or run this server without --socket and \
                 DISPATCH_HELPER_SOCKET to use your personal helper, then retry. If it runs, \
                 check DISPATCH_HELPER_SOCKET (now {}).",
                self.helper.socket().display()
            ),
            HelperError::Disconnected => format!(
                "{error}. If this was dispatch_unit, check dispatch_list before retrying so the \
                 work is not dispatched twice."
            ),
            HelperError::Timeout(_) => format!(
                "{error}. It may be overloaded; check it with `systemctl status dispatch-helper`. \
                 If this was dispatch_unit, check dispatch_list before retrying."
            ),
            HelperError::Protocol(_)
            | HelperError::TooLarge { .. }
            | HelperError::NotAdmitted { .. }
            | HelperError::PersonalHelperRefused { .. } => error.to_string(),
        })
    }

    fn refused(error: ErrorReply) -> ToolFailure {
        let next = match error.kind {
            ErrorKind::NotAllowlisted | ErrorKind::OwnerMismatch => {
                " Call dispatch_lanes to see the org-user/repo lanes you may dispatch to."
            }
            ErrorKind::UnknownHandle => {
                " Call dispatch_list to see your dispatches and their handles."
            }
            ErrorKind::NotTerminal => " Call dispatch_cancel first, or wait with dispatch_result.",
            ErrorKind::Invalid => " Fix that argument and retry.",
            ErrorKind::NotPermitted => {
                " Ask the administrator to allow this user for that lane, or use another lane from dispatch_lanes."
            }
            ErrorKind::AuditUnavailable => {
                " This is a server-side problem; tell the administrator. Retrying will not help until the audit log is fixed."
            }
            ErrorKind::SpawnFailed => {
                " The lane could not be started; tell the administrator (the reason above names the failed step)."
            }
            ErrorKind::Busy => {
                " Wait for running dispatches to finish (dispatch_result with wait_seconds), then retry."
            }
            ErrorKind::Protocol | ErrorKind::Internal => "",
        };
        let stop = if error.message.ends_with('.') || next.is_empty() {
            ""
        } else {
            "."
        };
        let blame = match error.kind {
            ErrorKind::AuditUnavailable
            | ErrorKind::SpawnFailed
            | ErrorKind::Busy
            | ErrorKind::Protocol
            | ErrorKind::Internal => Blame::Server,
            _ => Blame::Request,
        };
        ToolFailure(format!("{}{stop}{next}", error.message), blame)
    }

    async fn call(&self, request: Request) -> Result<Response, ToolFailure> {
        match self.helper.request(request).await {
            Ok(Response::Error(error)) => Err(Self::refused(error)),
            Ok(response) => Ok(response),
            Err(error) => Err(self.helper_failure(error)),
        }
    }

    async fn job(&self, request: Request) -> Result<JobView, ToolFailure> {
        match self.call(request).await? {
            Response::Job(job) => Ok(*job),
            other => Err(ToolFailure::server(format!(
                "unexpected helper reply {other:?}"
            ))),
        }
    }

    /// As the Python server did, surrounding whitespace of the names, the handle and the task
    /// is stripped before anything is checked (the helper then validates what is left).
    pub async fn dispatch(&self, args: DispatchArgs) -> Result<DispatchOutput, ToolFailure> {
        let lane_env = self
            .helper
            .lane_env()
            .await
            .map_err(|e| self.helper_failure(e))?;
        let request = Request::Dispatch(DispatchRequest {
            orguser: args.orguser.trim().to_owned(),
            repo: args.repo.trim().to_owned(),
            task: args.task_description.trim().to_owned(),
            description: args.description,
            lane_env,
        });
        self.job(request).await.map(Into::into)
    }

    /// A dispatch's status; while it runs, with its output so far (or after the offsets).
    pub async fn status(
        &self,
        handle: String,
        output_from: Option<OutputOffsets>,
    ) -> Result<DispatchOutput, ToolFailure> {
        let handle = stripped(handle);
        let request = Request::Status {
            handle,
            output_from,
        };
        self.job(request).await.map(Into::into)
    }

    /// One result request; `wait_ms` is passed to the helper, which caps it.
    pub async fn result_once(
        &self,
        handle: String,
        wait_ms: u32,
        output_from: Option<OutputOffsets>,
    ) -> Result<JobView, ToolFailure> {
        let handle = stripped(handle);
        let request = Request::Result {
            handle,
            wait_ms,
            output_from,
        };
        self.job(request).await
    }

    pub async fn list(&self, args: ListArgs) -> Result<ListOutput, ToolFailure> {
        match self
            .call(Request::List {
                filter: args.filter,
                detail: args.detail.unwrap_or(false),
                limit: args.limit.unwrap_or(0),
            })
            .await?
        {
            Response::List { total, jobs } => Ok(ListOutput {
                count: jobs.len(),
                total,
                dispatches: jobs.into_iter().map(Into::into).collect(),
            }),
            other => Err(ToolFailure::server(format!(
                "unexpected helper reply {other:?}"
            ))),
        }
    }

    pub async fn cancel(&self, handle: String) -> Result<DispatchOutput, ToolFailure> {
        let handle = stripped(handle);
        self.job(Request::Cancel { handle }).await.map(Into::into)
    }

    pub async fn delete(&self, handle: String) -> Result<DeleteOutput, ToolFailure> {
        let handle = stripped(handle);
        match self.call(Request::Delete { handle }).await? {
            Response::Deleted { handle } => Ok(DeleteOutput {
                handle,
                deleted: true,
            }),
            other => Err(ToolFailure::server(format!(
                "unexpected helper reply {other:?}"
            ))),
        }
    }

    pub async fn lanes(&self) -> Result<LanesOutput, ToolFailure> {
        let unprivileged = self
            .helper
            .hello()
            .await
            .map_err(|e| self.helper_failure(e))?
            .unprivileged;
        match self.call(Request::Lanes).await? {
            Response::Lanes { lanes } => Ok(LanesOutput {
                count: lanes.len(),
                lanes: lanes
                    .into_iter()
                    .map(|l| LaneOutput {
                        orguser: l.orguser,
                        repo: l.repo,
                        github: l.github,
                        unix_user: l.unix_user,
                    })
                    .collect(),
                unprivileged_helper: unprivileged,
            }),
            other => Err(ToolFailure::server(format!(
                "unexpected helper reply {other:?}"
            ))),
        }
    }
}

/// True for a state the job will not leave.
/// A handle without surrounding whitespace (a copied one often ends in a newline).
fn stripped(handle: String) -> String {
    handle.trim().to_owned()
}

pub fn is_terminal(state: JobState) -> bool {
    state.is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_booleans_may_arrive_as_strings() {
        let args: ResultArgs =
            serde_json::from_value(serde_json::json!({"handle": "h", "wait_seconds": "30"}))
                .unwrap();
        assert_eq!(args.wait_seconds, Some(30));
        let args: ResultArgs =
            serde_json::from_value(serde_json::json!({"handle": "h", "wait_seconds": 5})).unwrap();
        assert_eq!(args.wait_seconds, Some(5));
        let args: ResultArgs = serde_json::from_value(serde_json::json!({"handle": "h"})).unwrap();
        assert_eq!(args.wait_seconds, None);
        let error = serde_json::from_value::<ResultArgs>(
            serde_json::json!({"handle": "h", "wait_seconds": "soon"}),
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("expected a whole number of seconds, got \"soon\""),
            "{error}"
        );
        let args: ListArgs = serde_json::from_value(serde_json::json!({"detail": "true"})).unwrap();
        assert_eq!(args.detail, Some(true));
    }

    /// `detail` is the helper's summary of the output; a job that ended under an older helper
    /// has none, and gets it from its tails as before.
    #[test]
    fn detail_is_the_helpers_summary_or_else_the_end_of_the_tails() {
        let job = |summary: Option<&str>, stdout: Option<&str>| -> JobView {
            serde_json::from_value(serde_json::json!({
                "handle": "d-1", "orguser": "acme", "repo": "web", "github": "acme/web",
                "unix_user": "acme", "description": null, "task_preview": "t",
                "task_sha256": "00", "state": "Succeeded", "requested_at": "2026-12-01T00:00:00Z",
                "started_at": null, "finished_at": null, "exit_code": 0, "signal": null,
                "detail": "exited with status 0", "argv": null,
                "stdout": stdout.map(|text| serde_json::json!({"text": text, "total_bytes": 4,
                    "truncated": false, "offset": 0, "next_offset": 4})),
                "stderr": null, "sandbox": null, "summary": summary
            }))
            .unwrap()
        };
        let detail = |view: JobView| DispatchOutput::from(view).detail;
        assert_eq!(detail(job(Some("done"), None)), "done");
        assert_eq!(detail(job(None, Some("old\n"))), "old");
        assert_eq!(detail(job(None, None)), "exited with status 0");
    }

    #[test]
    fn a_whole_number_written_as_a_float_is_taken_and_anything_else_is_named_when_refused() {
        let result = |args: serde_json::Value| serde_json::from_value::<ResultArgs>(args);
        let list = |args: serde_json::Value| serde_json::from_value::<ListArgs>(args);
        let args = result(serde_json::json!({"handle": "h", "wait_seconds": 30.0})).unwrap();
        assert_eq!(args.wait_seconds, Some(30));
        let args = list(serde_json::json!({"detail": "True", "limit": "7"})).unwrap();
        assert_eq!((args.detail, args.limit), (Some(true), Some(7)));
        let refused = [
            (
                result(serde_json::json!({"handle": "h", "wait_seconds": -1})).err(),
                "wait_seconds: expected a whole number of seconds, got -1",
            ),
            (
                result(serde_json::json!({"handle": "h", "wait_seconds": 2.5})).err(),
                "wait_seconds: expected a whole number of seconds, got 2.5",
            ),
            (
                result(serde_json::json!({"handle": "h", "wait_seconds": true})).err(),
                "wait_seconds: expected a whole number of seconds, got true",
            ),
            (
                result(serde_json::json!({"handle": "h", "stderr_offset": [1]})).err(),
                "stderr_offset: expected a byte offset (a whole number), got [1]",
            ),
            (
                list(serde_json::json!({"limit": 5_000_000_000u64})).err(),
                "limit: expected a whole number of dispatches, got 5000000000",
            ),
            (
                list(serde_json::json!({"detail": "maybe"})).err(),
                "detail: expected true or false, got \"maybe\"",
            ),
        ];
        for (error, expected) in refused {
            let error = error.expect("refused").to_string();
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn refusals_say_what_to_do_next() {
        let failure = DispatchService::refused(ErrorReply {
            kind: ErrorKind::UnknownHandle,
            message: "unknown handle \"x\"".into(),
        });
        assert_eq!(
            failure.0,
            "unknown handle \"x\". Call dispatch_list to see your dispatches and their handles."
        );
    }
}
