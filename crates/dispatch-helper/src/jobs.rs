//! The helper's decisions: every request is re-validated here against the helper's own
//! settings, then run, tracked, persisted and audited.

use crate::audit::{AuditEvent, AuditLog, PeerIdentity, sha256_hex};
use crate::config::{Settings, work_dir};
use crate::now_rfc3339;
use crate::output::capture_tail;
use crate::store::{Detail, JobRecord, JobStore};
use dispatch_policy::{Handle, OrgPolicy, PolicyError, Task, TemplateValues};
use dispatch_proto::{
    DispatchRequest, ErrorKind, ErrorReply, JobState, JobView, Lane, SandboxReport,
};
use dispatch_sandbox::{LanePlan, LaneSpawner, SpawnedLane, resolve_identity};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, User};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// A connected client, as the kernel reported it, plus what the front claims.
#[derive(Debug, Clone)]
pub struct Peer {
    pub identity: PeerIdentity,
    pub user_name: Option<String>,
    /// Primary and supplementary groups of the peer's account.
    pub groups: Vec<u32>,
    pub claimed_client: Option<String>,
}

impl Peer {
    pub fn from_cred(uid: u32, gid: u32, pid: Option<i32>) -> Peer {
        let user = User::from_uid(uid.into()).ok().flatten();
        let mut groups = vec![gid];
        if let Some(user) = &user
            && let Ok(name) = std::ffi::CString::new(user.name.clone())
            && let Ok(list) = nix::unistd::getgrouplist(&name, user.gid)
        {
            groups.extend(list.into_iter().map(|g| g.as_raw()));
        }
        groups.sort_unstable();
        groups.dedup();
        Peer {
            identity: PeerIdentity { uid, gid, pid },
            user_name: user.map(|u| u.name),
            groups,
            claimed_client: None,
        }
    }
}

use crate::lane::{self, StopReason};

mod start;

struct Decision {
    argv: Vec<String>,
    github: String,
    task: Task,
    unix_user: String,
    identity: dispatch_sandbox::LaneIdentity,
    work_dir: std::path::PathBuf,
}

/// Running lanes (in all, per client uid, per lane) and the dispatches waiting for one, under
/// one lock: a slot that frees is never missed by a dispatch about to queue.
#[derive(Default)]
struct Capacity {
    total: usize,
    by_uid: HashMap<u32, usize>,
    by_lane: HashMap<String, usize>,
    queue: crate::queue::Queue,
}

/// One open connection of a client; frees its place when dropped.
pub struct ConnectionSlot {
    connections: Arc<Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mine) = open.get_mut(&self.uid) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

struct JobEntry {
    /// Terminal records drop their output tails here; `result` reads them from disk.
    record: JobRecord,
    finished: watch::Sender<bool>,
    /// Stops the job's lane; given to a job from its acceptance, so a cancel that comes while
    /// it waits or starts is not lost.
    stop: Option<mpsc::UnboundedSender<StopReason>>,
    /// The other end, until the lane's supervisor takes it.
    stop_receiver: Option<mpsc::UnboundedReceiver<StopReason>>,
}

impl JobEntry {
    fn is_running(&self) -> bool {
        self.stop.is_some() && self.record.job.state == JobState::Running
    }
}

type StopChannel = (
    mpsc::UnboundedSender<StopReason>,
    mpsc::UnboundedReceiver<StopReason>,
);

pub struct Helper {
    settings: RwLock<Arc<Settings>>,
    pub audit: AuditLog,
    /// Refused connections and protocol violations, coalesced per uid before they are audited.
    pub refusals: crate::admission::RefusalAudit,
    store: JobStore,
    jobs: Mutex<HashMap<String, JobEntry>>,
    spawner: Arc<LaneSpawner>,
    /// Running lanes, in all and per client uid.
    capacity: Mutex<Capacity>,
    /// Open connections per client uid.
    connections: Arc<Mutex<HashMap<u32, usize>>>,
    /// Set once shutdown begins: no new lane may start after its snapshot of running ones.
    draining: std::sync::atomic::AtomicBool,
}

fn reply(kind: ErrorKind, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        kind,
        message: message.into(),
    }
}

fn policy_reply(error: &PolicyError) -> ErrorReply {
    let kind = match error {
        PolicyError::InvalidName { .. } | PolicyError::InvalidTask { .. } => ErrorKind::Invalid,
        PolicyError::UnknownRepo { .. } | PolicyError::UnknownOrgUser { .. } => {
            ErrorKind::NotAllowlisted
        }
        PolicyError::OwnerMismatch { .. } => ErrorKind::OwnerMismatch,
    };
    reply(kind, error.to_string())
}

fn unknown_handle(handle: &str) -> ErrorReply {
    reply(
        ErrorKind::UnknownHandle,
        format!("unknown handle {}", dispatch_policy::escape_value(handle)),
    )
}

impl Helper {
    pub fn new(
        settings: Settings,
        audit: AuditLog,
        store: JobStore,
        spawner: LaneSpawner,
    ) -> Arc<Helper> {
        Arc::new(Helper {
            settings: RwLock::new(Arc::new(settings)),
            refusals: crate::admission::RefusalAudit::new(audit.clone()),
            audit,
            store,
            jobs: Mutex::new(HashMap::new()),
            spawner: Arc::new(spawner),
            capacity: Mutex::new(Capacity::default()),
            connections: Arc::default(),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether process `pid` belongs to one of this helper's lanes (see
    /// `Containment::holds_process`). Reads cgroupfs or /proc: blocking.
    pub fn is_lane_process(&self, pid: i32) -> bool {
        self.spawner.containment().holds_process(pid)
    }

    /// See `LaneSpawner::inherits_exactly`.
    pub fn spawner_inherits_exactly(&self, sandbox: &dispatch_sandbox::Sandbox) -> bool {
        self.spawner.inherits_exactly(sandbox)
    }

    /// What contains the lanes, in words.
    pub fn containment(&self) -> String {
        self.spawner.containment().describe()
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn replace_settings(&self, settings: Settings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
    }

    /// Load the job store; every record left `running` by a previous helper becomes `lost`.
    pub async fn recover(&self) -> Result<Vec<String>, String> {
        let (records, warnings) = self
            .store
            .load_all()
            .map_err(|e| format!("cannot read the job store: {e}"))?;
        let mut jobs = HashMap::new();
        for mut record in records {
            if record.job.state == JobState::Running {
                kill_stale_group(&record);
                record.job.state = JobState::Lost;
                record.job.finished_at = Some(now_rfc3339());
                record.job.detail =
                    "lost: the helper restarted while the lane was running; its outcome is unknown"
                        .into();
                record.pgid = None;
                self.store
                    .save(&record)
                    .map_err(|e| format!("cannot record lost job {}: {e}", record.job.handle))?;
                self.audit
                    .append(AuditEvent {
                        event: "lost",
                        handle: Some(record.job.handle.clone()),
                        orguser: Some(record.job.orguser.clone()),
                        repo: Some(record.job.repo.clone()),
                        outcome: "lost".into(),
                        detail: Some(record.job.detail.clone()),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("cannot audit lost job {}: {e}", record.job.handle))?;
            }
            record.job.stdout = None;
            record.job.stderr = None;
            let (finished, _) = watch::channel(record.job.state.is_terminal());
            // A queued job gets its stop channel back: a cancel during its start must reach it.
            let (stop, stop_receiver) = match record.job.state {
                JobState::Queued => {
                    let (sender, receiver) = mpsc::unbounded_channel();
                    (Some(sender), Some(receiver))
                }
                _ => (None, None),
            };
            jobs.insert(
                record.job.handle.clone(),
                JobEntry {
                    record,
                    finished,
                    stop,
                    stop_receiver,
                },
            );
        }
        // What waited for a slot waits again, oldest first (not bounded: it was all accepted).
        let mut queued: Vec<&JobRecord> = jobs
            .values()
            .map(|e| &e.record)
            .filter(|r| r.job.state == JobState::Queued)
            .collect();
        queued.sort_by(|a, b| a.job.requested_at.cmp(&b.job.requested_at));
        {
            let mut capacity = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
            for record in queued {
                let waiting = crate::queue::Waiting {
                    handle: record.job.handle.clone(),
                    lane: lane_key(&record.job),
                };
                let _ = capacity
                    .queue
                    .push(record.owner_uid, waiting, usize::MAX, usize::MAX);
            }
        }
        *self.jobs.lock().unwrap_or_else(|p| p.into_inner()) = jobs;
        Ok(warnings)
    }

    pub fn lanes(&self, peer: &Peer) -> Vec<Lane> {
        let settings = self.settings();
        settings
            .allowlist
            .targets()
            .filter_map(|target| {
                let org = settings.allowlist.org(&target.orguser)?;
                client_may_use(&settings, org, peer).then_some(())?;
                let unix_user = lane_unix_user(&settings, org).ok()?;
                Some(Lane {
                    orguser: target.orguser.to_string(),
                    repo: target.repo.to_string(),
                    github: target.github.clone(),
                    unix_user,
                })
            })
            .collect()
    }

    /// Validate and resolve a request against the helper's own settings. Blocking (NSS
    /// lookups): run it off the async runtime.
    fn decide(
        settings: &Settings,
        peer: &Peer,
        request: &DispatchRequest,
        handle: &Handle,
    ) -> Result<Decision, ErrorReply> {
        let task = Task::parse(&request.task).map_err(|e| policy_reply(&e))?;
        if task.is_option_like() && !settings.file.allow_option_like_tasks {
            return Err(policy_reply(&task.option_like_error()));
        }
        if let Some(description) = &request.description
            && (description.chars().count() > 512 || description.contains('\0'))
        {
            return Err(reply(
                ErrorKind::Invalid,
                "invalid description: at most 512 characters, no NUL",
            ));
        }
        // Orgs this client may not use are unknown to it, exactly as dispatch_lanes shows them.
        let (org, target) = settings
            .allowlist
            .resolve_visible(&request.orguser, &request.repo, |org| {
                client_may_use(settings, org, peer)
            })
            .map_err(|e| policy_reply(&e))?;
        let unix_user =
            lane_unix_user(settings, org).map_err(|m| reply(ErrorKind::NotPermitted, m))?;
        let identity = if settings.unprivileged {
            dispatch_sandbox::current_identity()
        } else {
            resolve_identity(&unix_user)
        }
        .map_err(|e| {
            reply(
                ErrorKind::NotPermitted,
                format!("orguser {}: {e}", org.orguser),
            )
        })?;
        let argv = settings.template.render(&TemplateValues {
            orguser: &target.orguser,
            repo: &target.repo,
            github: &target.github,
            task: &task,
            host: &settings.file.host,
            max_iterations: settings.file.max_iterations,
            handle,
        });
        let work_dir = work_dir(
            &settings.file.work_dir,
            &identity.home,
            &unix_user,
            org.orguser.as_str(),
        );
        Ok(Decision {
            argv,
            github: target.github.clone(),
            task,
            unix_user,
            identity,
            work_dir,
        })
    }

    /// A job about to start, with the sender that stops it: its entry is updated in place (so
    /// waiters on a queued job keep waiting), or made.
    fn enter_starting(&self, record: JobRecord, stop: mpsc::UnboundedSender<StopReason>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        match jobs.get_mut(&record.job.handle) {
            Some(entry) => {
                entry.record = record;
                entry.stop = Some(stop);
            }
            None => {
                let (finished, _) = watch::channel(false);
                jobs.insert(
                    record.job.handle.clone(),
                    JobEntry {
                        record,
                        finished,
                        stop: Some(stop),
                        stop_receiver: None,
                    },
                );
            }
        }
    }

    /// The running record of a job already in the table (its stop channel stays).
    fn update_entry(&self, record: JobRecord) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = jobs.get_mut(&record.job.handle) {
            entry.record = record;
        }
    }

    /// A finished job that may or may not be in the table yet.
    fn finish_or_insert(&self, record: JobRecord) {
        let known = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&record.job.handle);
        if known {
            self.finish_entry(record);
        } else {
            self.insert(record, None);
        }
    }

    /// A job that ended without a lane (a queued one cancelled or refused at its turn): its
    /// entry takes the final record, and waiters for its result are woken.
    fn finish_entry(&self, mut record: JobRecord) {
        record.job.stdout = None;
        record.job.stderr = None;
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = jobs.get_mut(&record.job.handle) {
            entry.record = record;
            entry.stop = None;
            entry.stop_receiver = None;
            let _ = entry.finished.send(true);
        }
    }

    /// Enter a job in the table: a finished one, or (with its stop channel) one that waits or
    /// runs.
    fn insert(&self, record: JobRecord, stop: Option<StopChannel>) {
        let (finished, _) = watch::channel(record.job.state.is_terminal());
        let (stop, stop_receiver) = match stop {
            Some((sender, receiver)) => (Some(sender), Some(receiver)),
            None => (None, None),
        };
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(
            record.job.handle.clone(),
            JobEntry {
                record,
                finished,
                stop,
                stop_receiver,
            },
        );
    }

    /// The stop channel of a job about to start: the one it was given when it was queued, or a
    /// new one. Its sender stays in the table, so a cancel reaches the lane from now on.
    fn stop_channel_for(&self, record: &JobRecord) -> StopChannel {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let entry = jobs.get_mut(&record.job.handle);
        if let Some(entry) = entry
            && let (Some(sender), Some(receiver)) = (entry.stop.clone(), entry.stop_receiver.take())
        {
            return (sender, receiver);
        }
        mpsc::unbounded_channel()
    }

    async fn supervise(
        self: Arc<Self>,
        handle: String,
        owner_uid: u32,
        mut lane: SpawnedLane,
        mut stop: mpsc::UnboundedReceiver<StopReason>,
    ) {
        let settings = self.settings();
        let limits = settings.file.sandbox.limits;
        let tail_limit = settings.file.limits.output_tail_bytes;
        let stdout = lane
            .stdout
            .take()
            .and_then(|s| tokio::process::ChildStdout::from_std(s).ok())
            .map(|s| tokio::spawn(capture_tail(s, tail_limit)));
        let stderr = lane
            .stderr
            .take()
            .and_then(|s| tokio::process::ChildStderr::from_std(s).ok())
            .map(|s| tokio::spawn(capture_tail(s, tail_limit)));
        let controllers = self.spawner.containment().controllers();
        let plan = lane::WatchPlan::new(&settings, controllers, lane.enforcement.uid);
        let watched = lane::watch(&lane, plan, &mut stop).await;
        // Ends everything the lane left running (its cgroup, its group), reaps it, and counts.
        let ended = tokio::task::spawn_blocking(move || lane.wait()).await;
        // The lane's capacity is free as soon as its processes are gone.
        if let Some(record) = self.record(&handle) {
            self.release(owner_uid, &lane_key(&record.job));
        }
        let collect = |task: Option<tokio::task::JoinHandle<dispatch_proto::OutputTail>>| async move {
            let mut task = task?;
            // A process outside any cgroup can hold the pipe open forever: bounded wait.
            match tokio::time::timeout(Duration::from_secs(2), &mut task).await {
                Ok(Ok(tail)) => Some(tail),
                _ => {
                    task.abort();
                    None
                }
            }
        };
        let stdout = collect(stdout).await;
        let stderr = collect(stderr).await;

        let Some(mut record) = self.record(&handle) else {
            return;
        };
        record.job.finished_at = Some(now_rfc3339());
        record.job.stdout = stdout;
        record.job.stderr = stderr;
        record.pgid = None;
        match ended {
            Ok(Ok(end)) => {
                let judged = lane::outcome(&end, watched, &limits, settings.file.timeout_seconds);
                use std::os::unix::process::ExitStatusExt;
                record.job.exit_code = end.status.code();
                record.job.signal = end.status.signal();
                record.job.state = judged.state;
                record.job.detail = judged.detail;
                record.job.stopped_by = judged.stopped_by;
                record.job.usage = Some(judged.usage);
            }
            other => {
                record.job.state = JobState::Failed;
                record.job.detail = format!("could not wait for the lane: {other:?}");
            }
        }
        let event = match record.job.state {
            JobState::TimedOut => "timed_out",
            JobState::Cancelled => "cancelled",
            _ => "finished",
        };
        self.persist_and_audit_finish(&record, event).await;
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = jobs.get_mut(&handle) {
                record.job.stdout = None;
                record.job.stderr = None;
                entry.record = record;
                entry.stop = None;
                let _ = entry.finished.send(true);
            }
        }
        self.prune_finished(owner_uid).await;
    }

    async fn persist_and_audit_finish(&self, record: &JobRecord, event: &'static str) {
        if let Err(error) = self.store.save_async(record).await {
            tracing::error!(%error, handle = %record.job.handle, "could not persist a finished job");
        }
        self.audit_finish(record, event).await;
    }

    async fn audit_finish(&self, record: &JobRecord, event: &'static str) {
        let audit = AuditEvent {
            event,
            handle: Some(record.job.handle.clone()),
            orguser: Some(record.job.orguser.clone()),
            repo: Some(record.job.repo.clone()),
            outcome: record.job.state.as_str().into(),
            detail: Some(record.job.detail.clone()),
            ..Default::default()
        };
        if let Err(error) = self.audit.append(audit).await {
            tracing::error!(%error, handle = %record.job.handle, "could not audit a job's end");
        }
    }

    fn record(&self, handle: &str) -> Option<JobRecord> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(handle)
            .map(|e| e.record.clone())
    }

    /// The record for `handle` if `peer` owns it. Another uid's handle is indistinguishable
    /// from one that never existed.
    fn owned(&self, peer: &Peer, handle: &str) -> Result<JobRecord, ErrorReply> {
        Handle::parse(handle).map_err(|e| policy_reply(&e))?;
        match self.record(handle) {
            Some(record) if record.owner_uid == peer.identity.uid => Ok(record),
            _ => Err(unknown_handle(handle)),
        }
    }

    pub fn status(&self, peer: &Peer, handle: &str) -> Result<JobView, ErrorReply> {
        Ok(self.owned(peer, handle)?.view(Detail::Summary))
    }

    pub async fn result(
        &self,
        peer: &Peer,
        handle: &str,
        wait_ms: u32,
    ) -> Result<JobView, ErrorReply> {
        let record = self.owned(peer, handle)?;
        if !record.job.state.is_terminal() && wait_ms > 0 {
            let cap = Duration::from_secs(self.settings().file.limits.max_result_wait_seconds);
            let wait = Duration::from_millis(u64::from(wait_ms)).min(cap);
            let receiver = self
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(handle)
                .map(|e| e.finished.subscribe());
            if let Some(mut receiver) = receiver {
                let _ = tokio::time::timeout(wait, receiver.wait_for(|done| *done)).await;
            }
        }
        let record = self.owned(peer, handle)?;
        if record.job.state.is_terminal() {
            // Output tails live on disk only.
            if let Ok(full) = self.store.load_async(handle).await {
                return Ok(full.view(Detail::Full));
            }
        }
        Ok(record.view(Detail::Full))
    }

    pub fn list(
        &self,
        peer: &Peer,
        filter: Option<&str>,
        detail: bool,
        limit: u32,
    ) -> Result<(u64, Vec<JobView>), ErrorReply> {
        let matcher = match filter.filter(|f| !f.is_empty()) {
            None => None,
            Some(pattern) => Some(compile_filter(pattern)?),
        };
        let max = self.settings().file.limits.max_list;
        let limit = if limit == 0 { max } else { limit.min(max) } as usize;
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut matching: Vec<&JobRecord> = jobs
            .values()
            .map(|e| &e.record)
            .filter(|r| r.owner_uid == peer.identity.uid)
            .filter(|r| {
                matcher.as_ref().is_none_or(|m| {
                    m.is_match(r.job.description.as_deref().unwrap_or(&r.job.task_preview))
                })
            })
            .collect();
        matching.sort_by(|a, b| {
            b.job
                .requested_at
                .cmp(&a.job.requested_at)
                .then(b.job.handle.cmp(&a.job.handle))
        });
        let level = if detail {
            Detail::Argv
        } else {
            Detail::Summary
        };
        // Stop well inside one response frame, however long the argvs are; `total` still counts
        // every match, so the caller can see that the list was cut.
        let mut budget = LIST_BYTE_BUDGET;
        Ok((
            matching.len() as u64,
            matching
                .into_iter()
                .take(limit)
                .map(|r| r.view(level))
                .take_while(|view| {
                    let size = approximate_size(view);
                    let fits = size <= budget;
                    budget = budget.saturating_sub(size);
                    fits
                })
                .collect(),
        ))
    }

    pub async fn cancel(
        self: &Arc<Self>,
        peer: &Peer,
        handle: &str,
    ) -> Result<JobView, ErrorReply> {
        let record = self.owned(peer, handle)?;
        if record.job.state.is_terminal() {
            return Ok(record.view(Detail::Summary));
        }
        if record.job.state == JobState::Queued && self.cancel_queued(handle).await {
            return Ok(self.owned(peer, handle)?.view(Detail::Summary));
        }
        let (stop, receiver) = {
            let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let entry = jobs.get(handle).ok_or_else(|| unknown_handle(handle))?;
            (entry.stop.clone(), entry.finished.subscribe())
        };
        let _ = self
            .audit
            .append(AuditEvent {
                event: "cancel_requested",
                peer: Some(peer.identity),
                claimed_client: peer.claimed_client.clone(),
                handle: Some(handle.to_owned()),
                outcome: "requested".into(),
                ..Default::default()
            })
            .await;
        if let Some(stop) = stop {
            let _ = stop.send(StopReason::Cancel);
        }
        let grace = self.settings().grace() + Duration::from_secs(3);
        let mut receiver = receiver;
        let _ = tokio::time::timeout(grace, receiver.wait_for(|done| *done)).await;
        Ok(self.owned(peer, handle)?.view(Detail::Summary))
    }

    pub async fn delete(&self, peer: &Peer, handle: &str) -> Result<String, ErrorReply> {
        let record = self.owned(peer, handle)?;
        if !record.job.state.is_terminal() {
            return Err(reply(
                ErrorKind::NotTerminal,
                format!("job {handle} is still running; cancel it first, then delete it"),
            ));
        }
        // Exactly one of several concurrent deletes takes the entry; the others find no such
        // handle, as they would a moment later.
        let entry = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(handle)
            .ok_or_else(|| unknown_handle(handle))?;
        if let Err(error) = self.store.remove_async(handle).await {
            // Not deleted after all: the job stays listed, as its record does.
            self.jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(handle.to_owned(), entry);
            return Err(reply(
                ErrorKind::Internal,
                format!("could not delete the record of {handle}: {error}"),
            ));
        }
        let _ = self
            .audit
            .append(AuditEvent {
                event: "deleted",
                peer: Some(peer.identity),
                claimed_client: peer.claimed_client.clone(),
                handle: Some(handle.to_owned()),
                outcome: "deleted".into(),
                ..Default::default()
            })
            .await;
        Ok(handle.to_owned())
    }

    /// A connection slot for `uid`, or None if it already holds `max` connections.
    pub fn connection_slot(&self, uid: u32, max: usize) -> Option<ConnectionSlot> {
        let mut open = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let mine = open.entry(uid).or_default();
        if *mine >= max {
            return None;
        }
        *mine += 1;
        Some(ConnectionSlot {
            connections: self.connections.clone(),
            uid,
        })
    }

    /// Keep at most `max_finished_jobs_per_client` finished records per client: the oldest go,
    /// and each removal is audited.
    async fn prune_finished(&self, owner_uid: u32) {
        let keep = self.settings().file.limits.max_finished_jobs_per_client;
        let doomed: Vec<String> = {
            let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let mut finished: Vec<&JobRecord> = jobs
                .values()
                .filter(|e| e.stop.is_none() && e.record.owner_uid == owner_uid)
                .map(|e| &e.record)
                .filter(|r| r.job.state.is_terminal())
                .collect();
            if finished.len() <= keep {
                return;
            }
            finished.sort_by(|a, b| a.job.requested_at.cmp(&b.job.requested_at));
            let excess = finished.len() - keep;
            finished
                .into_iter()
                .take(excess)
                .map(|r| r.job.handle.clone())
                .collect()
        };
        for handle in doomed {
            if let Err(error) = self.store.remove_async(&handle).await {
                tracing::error!(%error, %handle, "could not prune a finished job");
                continue;
            }
            self.jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&handle);
            let _ = self
                .audit
                .append(AuditEvent {
                    event: "pruned",
                    handle: Some(handle),
                    outcome: "deleted".into(),
                    detail: Some(format!(
                        "more than {keep} finished dispatches were kept for uid {owner_uid}"
                    )),
                    ..Default::default()
                })
                .await;
        }
    }

    /// Jobs with a lane (or about to have one): queued ones wait for none and are kept, so a
    /// restart starts them.
    fn registered_running(&self) -> usize {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.values().filter(|e| e.is_running()).count()
    }

    /// Stop every running lane (SIGTERM, then SIGKILL after the grace period) and wait for
    /// their records to be written.
    pub async fn shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        // A dispatch that claimed capacity just before the flag was set registers its job right
        // after spawning; give it a moment to appear in the snapshot below.
        let settle = tokio::time::Instant::now() + Duration::from_secs(5);
        while self
            .capacity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .total
            > self.registered_running()
            && tokio::time::Instant::now() < settle
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let receivers: Vec<_> = {
            let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            jobs.values()
                .filter(|e| e.is_running())
                .filter_map(|e| {
                    let stop = e.stop.as_ref()?;
                    let _ = stop.send(StopReason::Shutdown);
                    Some(e.finished.subscribe())
                })
                .collect()
        };
        let grace = self.settings().grace() + Duration::from_secs(3);
        for mut receiver in receivers {
            let _ = tokio::time::timeout(grace, receiver.wait_for(|done| *done)).await;
        }
    }
}

/// What a list response may carry, well below the response frame limit.
const LIST_BYTE_BUDGET: usize = dispatch_proto::MAX_RESPONSE_FRAME as usize / 2;

/// An upper bound on a view's encoded size (postcard adds at most a few bytes per field).
fn approximate_size(view: &JobView) -> usize {
    let strings = [
        &view.handle,
        &view.orguser,
        &view.repo,
        &view.github,
        &view.unix_user,
        &view.task_preview,
        &view.task_sha256,
        &view.requested_at,
        &view.detail,
    ];
    let argv: usize = view.argv.iter().flatten().map(|a| a.len() + 5).sum();
    let sandbox = view
        .sandbox
        .as_ref()
        .map_or(0, |s| s.landlock.len() + s.groups.len() * 5 + 64);
    strings.iter().map(|s| s.len() + 5).sum::<usize>()
        + view.description.as_ref().map_or(0, String::len)
        + argv
        + sandbox
        + 256
}

/// A list filter from a client: short and shallow, compiled without panicking.
fn compile_filter(pattern: &str) -> Result<globset::GlobSet, ErrorReply> {
    const MAX_FILTER_CHARS: usize = 200;
    const MAX_ALTERNATION_DEPTH: usize = 4;
    let invalid = |why: String| {
        reply(
            ErrorKind::Invalid,
            format!(
                "invalid filter {}: {why}",
                dispatch_policy::escape_value(pattern)
            ),
        )
    };
    if pattern.chars().count() > MAX_FILTER_CHARS {
        return Err(invalid(format!(
            "longer than {MAX_FILTER_CHARS} characters"
        )));
    }
    let mut depth = 0usize;
    for c in pattern.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_ALTERNATION_DEPTH {
            return Err(invalid(format!(
                "alternations nested deeper than {MAX_ALTERNATION_DEPTH}"
            )));
        }
    }
    let glob = globset::Glob::new(pattern).map_err(|e| invalid(e.to_string()))?;
    // GlobSetBuilder reports a regex that cannot be built; Glob::compile_matcher would panic.
    globset::GlobSetBuilder::new()
        .add(glob)
        .build()
        .map_err(|e| invalid(e.to_string()))
}

/// Whether `peer` is among the org's allowed clients (no list: every admitted client is).
fn client_may_use(settings: &Settings, org: &OrgPolicy, peer: &Peer) -> bool {
    let Some(clients) = &org.allowed_clients else {
        return true;
    };
    let by_user = peer
        .user_name
        .as_deref()
        .is_some_and(|name| clients.users.iter().any(|u| u.as_str() == name));
    // Group names were resolved to gids when the configuration was loaded.
    let by_group = settings
        .org_client_gids
        .get(org.orguser.as_str())
        .is_some_and(|gids| peer.groups.iter().any(|g| gids.contains(g)));
    by_user || by_group
}

/// The account an org's lanes run as. Without root every lane runs as the helper's own user,
/// so an org that explicitly names another account cannot be served.
fn lane_unix_user(settings: &Settings, org: &OrgPolicy) -> Result<String, String> {
    if !settings.unprivileged {
        // The reason (which may name other orgs and accounts) is the administrator's, in the
        // log and `dispatch-helper check`; the client learns only that the lane is refused.
        if settings.refused_orgs.contains_key(org.orguser.as_str()) {
            return Err(format!(
                "orguser {} cannot run lanes on this host: its account was refused when the \
                 helper loaded its configuration (the administrator's `dispatch-helper check` \
                 says why)",
                org.orguser
            ));
        }
        return Ok(org.unix_user.to_string());
    }
    if org.unix_user_explicit && org.unix_user.as_str() != settings.own_user {
        return Err(format!(
            "orguser {} runs as unix user {}, but the helper is not running as root and can only \
             run lanes as its own user {}",
            org.orguser, org.unix_user, settings.own_user
        ));
    }
    Ok(settings.own_user.clone())
}

fn new_handle() -> Handle {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the kernel's random source is available");
    Handle::parse(&format!("d-{}", crate::audit::hex(&bytes))).expect("hex handles are valid names")
}

/// What the sandbox enforces on a lane, with the helper's own wall-clock limit beside the rest.
fn sandbox_report(
    enforcement: &dispatch_sandbox::Enforcement,
    settings: &Settings,
) -> SandboxReport {
    let mut limits: Vec<dispatch_proto::LimitReport> = enforcement
        .limits
        .iter()
        .map(|l| dispatch_proto::LimitReport {
            limit: l.limit.clone(),
            value: l.value.clone(),
            mechanism: l.mechanism.clone(),
        })
        .collect();
    limits.push(dispatch_proto::LimitReport {
        limit: "wall_clock".into(),
        value: format!("{} s", settings.file.timeout_seconds),
        mechanism: format!(
            "the helper's timeout (SIGTERM, then SIGKILL to the whole lane after {} s)",
            settings.file.kill_grace_seconds
        ),
    });
    SandboxReport {
        uid: enforcement.uid,
        gid: enforcement.gid,
        groups: enforcement.groups.clone(),
        landlock_abi: enforcement.landlock_abi,
        landlock: enforcement.landlock.clone(),
        seccomp: enforcement.seccomp,
        no_new_privs: enforcement.no_new_privs,
        same_uid: enforcement.same_uid,
        containment: enforcement.containment.clone(),
        limits,
    }
}

/// Start time of a process, from /proc/<pid>/stat (field 22), to recognise it later.
/// The lane a job runs in, for the per-lane cap.
fn lane_key(job: &JobView) -> String {
    format!("{}/{}", job.orguser, job.repo)
}

fn process_start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

/// A lane group left by a crashed helper: kill it only if the leader is the same process.
fn kill_stale_group(record: &JobRecord) {
    let (Some(pgid), Some(ticks)) = (record.pgid, record.pgid_start_ticks) else {
        return;
    };
    if process_start_ticks(pgid) == Some(ticks) {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}
