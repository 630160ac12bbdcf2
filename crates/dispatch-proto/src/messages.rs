//! Messages. Every request carries an id chosen by the front; the response to it carries the same
//! id, so one connection can have several requests in flight (the front multiplexes its tool
//! calls over one connection).
//!
//! The wire carries only plain strings for names: the helper re-validates every one of them with
//! the policy crate against its own allowlist and never trusts a value the front computed.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub id: u64,
    pub body: Request,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub id: u64,
    pub body: Response,
}

impl crate::codec::Envelope for RequestEnvelope {
    const BODY_VARIANTS: u32 = 8;
}

impl crate::codec::Envelope for ResponseEnvelope {
    const BODY_VARIANTS: u32 = 6;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Must be the first request on a connection.
    Hello {
        version: u16,
        /// The MCP client's name as the front claims it. Recorded as a claim, never trusted.
        client_name: Option<String>,
    },
    Dispatch(DispatchRequest),
    /// While the job runs, the view carries its output so far (see `OutputTail`).
    Status {
        handle: String,
        /// Only the output after these stream offsets (None: the helper's whole window).
        output_from: Option<OutputOffsets>,
    },
    /// `wait_ms` > 0 waits (up to the helper's own cap) for the job to reach a terminal state.
    Result {
        handle: String,
        wait_ms: u32,
        output_from: Option<OutputOffsets>,
    },
    List {
        /// Glob over the job's description (falling back to its task preview).
        filter: Option<String>,
        detail: bool,
        limit: u32,
    },
    Cancel {
        handle: String,
    },
    Delete {
        handle: String,
    },
    /// The targets this peer may dispatch to.
    Lanes,
}

impl Request {
    pub fn status(handle: impl Into<String>) -> Request {
        Request::Status {
            handle: handle.into(),
            output_from: None,
        }
    }

    pub fn result(handle: impl Into<String>, wait_ms: u32) -> Request {
        Request::Result {
            handle: handle.into(),
            wait_ms,
            output_from: None,
        }
    }
}

/// Byte offsets into a job's stdout and stderr: "what is new since I last looked" (each is an
/// `OutputTail::next_offset` from an earlier answer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputOffsets {
    pub stdout: u64,
    pub stderr: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchRequest {
    pub orguser: String,
    pub repo: String,
    pub task: String,
    pub description: Option<String>,
    /// Values of the caller's environment for the lane (its identity: agent socket, tokens,
    /// PATH). The front sends only the names the helper listed in its [`HelloReply`]; the
    /// helper accepts only names its own configuration passes, and never records a value.
    pub lane_env: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Hello(HelloReply),
    Job(Box<JobView>),
    List { total: u64, jobs: Vec<JobView> },
    Lanes { lanes: Vec<Lane> },
    Deleted { handle: String },
    Error(ErrorReply),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub version: u16,
    pub helper_version: String,
    /// The uid the helper read from SO_PEERCRED: what it will record, whatever the front claims.
    pub peer_uid: u32,
    /// True when the helper runs without root and every lane runs as the helper's own user.
    pub unprivileged: bool,
    /// Requests the helper serves at once on one connection: a client keeps at most this many
    /// in flight and queues the rest, rather than having them refused.
    pub max_in_flight: u32,
    /// The environment variables the helper's configuration passes from the caller to lanes
    /// (`pass_env`); the front sends the values it has of these, and nothing else.
    pub pass_env: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// A field failed validation (the message names the field, the value and the rule).
    Invalid,
    /// The org-user or repo is not in the helper's allowlist.
    NotAllowlisted,
    /// The repo exists but belongs to another org-user.
    OwnerMismatch,
    /// This client may not dispatch to that org, or the lane's unix user cannot be used.
    NotPermitted,
    /// No such handle (or it belongs to another client: the two are indistinguishable).
    UnknownHandle,
    /// `delete` of a job that has not finished.
    NotTerminal,
    /// The audit log could not be written, so nothing ran.
    AuditUnavailable,
    /// The lane could not be started; the message names the failed step.
    SpawnFailed,
    /// A limit was reached (in-flight requests, running jobs).
    Busy,
    /// The request was not valid at this point of the protocol (e.g. before the handshake).
    Protocol,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Running,
    /// Exit status 0.
    Succeeded,
    /// Non-zero exit, death by signal, or a spawn failure (the detail names the reason).
    Failed,
    /// Killed at the timeout: SIGTERM to the process group, SIGKILL after the grace period.
    TimedOut,
    Cancelled,
    /// The helper restarted while the job ran; its outcome is unknown.
    Lost,
    /// Accepted, and waiting for a lane slot (the running caps were reached); it starts, first
    /// in first out for its client and in turn with other clients, when one frees.
    Queued,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Running | JobState::Queued)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::TimedOut => "timed_out",
            JobState::Cancelled => "cancelled",
            JobState::Lost => "lost",
            JobState::Queued => "queued",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputTail {
    /// The stream's bytes from `offset` to `next_offset` (lossy UTF-8), prefixed with a marker
    /// line when bytes before them that were asked for are gone (`truncated`).
    pub text: String,
    /// Bytes the stream has carried so far (all of them, once the lane ended).
    pub total_bytes: u64,
    pub truncated: bool,
    /// Stream offset of the first byte in `text` (after any marker).
    #[serde(default)]
    pub offset: u64,
    /// Stream offset just past the last byte in `text`: ask from here for what is new. While
    /// the lane runs, an incomplete UTF-8 character at the end is held back until it is whole.
    #[serde(default)]
    pub next_offset: u64,
}

/// What the sandbox enforced on the lane, as observed by the helper when it spawned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub landlock_abi: u32,
    /// e.g. "fully enforced", "partially enforced".
    pub landlock: String,
    pub seccomp: bool,
    pub no_new_privs: bool,
    /// True when the helper ran without root and so could not change the uid.
    pub same_uid: bool,
    /// What ends everything the lane starts (its cgroup, or its process group and the helper
    /// as subreaper), in words.
    #[serde(default)]
    pub containment: String,
    /// Each resource limit, its value, and what holds it on this host.
    #[serde(default)]
    pub limits: Vec<LimitReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitReport {
    /// `processes`, `memory`, `swap`, `cpu_time`, `cpu_rate`, `open_files`, `file_size`, `wall_clock`.
    pub limit: String,
    pub value: String,
    pub mechanism: String,
}

/// What a finished lane cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    pub peak_memory_bytes: u64,
    /// True when the peak covers the whole lane (cgroup `memory.peak`); false when it is the
    /// largest single process's (no memory controller).
    pub peak_memory_whole_lane: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub handle: String,
    pub orguser: String,
    pub repo: String,
    pub github: String,
    pub unix_user: String,
    pub description: Option<String>,
    pub task_preview: String,
    pub task_sha256: String,
    pub state: JobState,
    /// RFC 3339 UTC.
    pub requested_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Human-readable summary of the outcome (or the reason for a failure).
    pub detail: String,
    /// Present in detailed views only.
    pub argv: Option<Vec<String>>,
    pub stdout: Option<OutputTail>,
    pub stderr: Option<OutputTail>,
    pub sandbox: Option<SandboxReport>,
    /// Set once the lane has ended.
    #[serde(default)]
    pub usage: Option<ResourceUsage>,
    /// The limit that stopped the lane: `processes`, `memory`, `cpu_time` or `wall_clock`.
    #[serde(default)]
    pub stopped_by: Option<String>,
    /// Once the command has exited by itself having printed something: the end of its stdout
    /// (else its stderr), at most 500 characters. In every view, unlike the output tails.
    #[serde(default)]
    pub summary: Option<String>,
}

/// At most this much of a command's output goes into its summary.
const SUMMARY_CHARS: usize = 500;

impl JobView {
    /// The end of what the command printed (stdout, else stderr; at most 500 characters),
    /// from this view's output tails, once it exited by itself: the Python server's `detail`.
    /// The helper keeps it as [`JobView::summary`] when the lane ends.
    pub fn output_summary(&self) -> Option<String> {
        let exited = self.exit_code.is_some() && self.stopped_by.is_none();
        let printed = |tail: &Option<OutputTail>| {
            tail.as_ref()
                .map(|t| t.text.trim().to_owned())
                .filter(|text| !text.is_empty())
        };
        let text = printed(&self.stdout).or_else(|| printed(&self.stderr))?;
        exited.then(|| {
            let count = text.chars().count();
            let end: String = text
                .chars()
                .skip(count.saturating_sub(SUMMARY_CHARS))
                .collect();
            if count > SUMMARY_CHARS {
                format!("…{end}")
            } else {
                end
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lane {
    pub orguser: String,
    pub repo: String,
    pub github: String,
    pub unix_user: String,
}
