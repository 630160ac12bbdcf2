//! The helper's decisions: every request is re-validated here against the helper's own
//! settings, then run, tracked, persisted and audited.

use crate::audit::{AuditEvent, AuditLog, PeerIdentity, sha256_hex};
use crate::commit::IfNotJournaled::{AuditAlone, Neither};
use crate::commit::{self, Change, CommitError};
use crate::config::{Settings, work_dir};
use crate::now_rfc3339;
use crate::output::{LiveOutput, spool_stream};
use crate::store::{Detail, JobRecord, JobStore};
use dispatch_policy::{Handle, OrgPolicy, PolicyError, Task, TemplateValues};
use dispatch_proto::{
    DispatchRequest, ErrorKind, ErrorReply, JobState, JobView, Lane, OutputOffsets, SandboxReport,
};
use dispatch_sandbox::{LaneIdentity, LanePlan, LaneSpawner, SpawnedLane};
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

mod held;
mod recover;
mod requests;
mod start;
mod supervise;
mod table;

use table::JobTable;

struct Decision {
    argv: Vec<String>,
    github: String,
    task: Task,
    unix_user: String,
    identity: dispatch_sandbox::LaneIdentity,
    /// The lane user's area, and the job's own directory in it.
    work_area: std::path::PathBuf,
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
    /// The output of its running lane so far (its final tails are on disk once it ended).
    live: Option<LiveOutput>,
}

impl JobEntry {
    fn new(record: JobRecord, stop: Option<StopChannel>) -> Self {
        let (finished, _) = watch::channel(record.job.state.is_terminal());
        let (stop, stop_receiver) = match stop {
            Some((sender, receiver)) => (Some(sender), Some(receiver)),
            None => (None, None),
        };
        JobEntry {
            record,
            finished,
            stop,
            stop_receiver,
            live: None,
        }
    }

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
    jobs: Mutex<JobTable>,
    spawner: Arc<LaneSpawner>,
    /// Running lanes, in all and per client uid.
    capacity: Mutex<Capacity>,
    /// Open connections per client uid.
    connections: Arc<Mutex<HashMap<u32, usize>>>,
    /// Set once shutdown begins: no new lane may start after its snapshot of running ones.
    draining: std::sync::atomic::AtomicBool,
    /// Queued dispatches taking their turn (slot claimed, not yet started or back in line): a
    /// stop waits for them before it looks at what runs.
    turns: Arc<std::sync::atomic::AtomicUsize>,
    /// The passed environment of queued dispatches, by handle: in memory only, as its values
    /// (tokens) are never written down. A dispatch queued before a restart starts without it.
    queued_env: Mutex<HashMap<String, Vec<(String, String)>>>,
    /// Job directories being removed at once: each removal holds a thread of the blocking pool
    /// (and under the shipped unit forks `chmod` and `rm` as the lane user) for as long as a
    /// big checkout takes, and the pool also serves every dispatch and every accepted peer.
    removals: Arc<tokio::sync::Semaphore>,
    /// What the accept loop's connection semaphore was sized to (a reload cannot resize it).
    pub max_connections_at_start: usize,
}

/// How many job directories are removed at once; the others wait their turn without a thread.
const CONCURRENT_REMOVALS: u32 = 4;

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
            max_connections_at_start: settings.file.limits.max_connections,
            settings: RwLock::new(Arc::new(settings)),
            refusals: crate::admission::RefusalAudit::new(audit.clone()),
            audit,
            store,
            jobs: Mutex::default(),
            spawner: Arc::new(spawner),
            capacity: Mutex::new(Capacity::default()),
            connections: Arc::default(),
            draining: std::sync::atomic::AtomicBool::new(false),
            turns: Arc::default(),
            queued_env: Mutex::default(),
            removals: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_REMOVALS as usize)),
        })
    }

    /// Whether process `pid` belongs to one of this helper's lanes (see
    /// `Containment::holds_process`). Reads cgroupfs or /proc: blocking.
    pub fn is_lane_process(&self, pid: i32, uid: u32) -> bool {
        self.spawner.containment().holds_process(pid, uid)
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
        let task = Self::check_text(settings, request)?;
        // Orgs this client may not use are unknown to it, exactly as dispatch_lanes shows them.
        let (org, target) = settings
            .allowlist
            .resolve_visible(&request.orguser, &request.repo, |org| {
                client_may_use(settings, org, peer)
            })
            .map_err(|e| policy_reply(&e))?;
        let unix_user =
            lane_unix_user(settings, org).map_err(|m| reply(ErrorKind::NotPermitted, m))?;
        let identity = Self::lane_identity(settings, org, &unix_user)?;
        let argv = settings.template.render(&TemplateValues {
            orguser: &target.orguser,
            repo: &target.repo,
            github: &target.github,
            task: &task,
            host: &settings.file.host,
            max_iterations: settings.file.max_iterations,
            handle,
        });
        let work_area = work_dir(
            &settings.file.work_dir,
            &settings.file.state_dir,
            &identity.home,
            &unix_user,
            org.orguser.as_str(),
        );
        Ok(Decision {
            argv,
            github: target.github.clone(),
            task,
            unix_user,
            // The job's own, made by its lane (as the lane user) in the area.
            work_dir: work_area.join(handle.to_string()),
            identity,
            work_area,
        })
    }

    /// The task and the description: data within their bounds, never an option unless the
    /// configuration allows it.
    fn check_text(settings: &Settings, request: &DispatchRequest) -> Result<Task, ErrorReply> {
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
        Ok(task)
    }

    /// Who the lane runs as: the org's unix user, or the helper's own user in personal mode.
    fn lane_identity(
        settings: &Settings,
        org: &OrgPolicy,
        unix_user: &str,
    ) -> Result<LaneIdentity, ErrorReply> {
        if settings.unprivileged {
            settings.identities.resolve_own()
        } else {
            settings.identities.resolve(unix_user)
        }
        .map_err(|e| {
            reply(
                ErrorKind::NotPermitted,
                format!("orguser {}: {e}", org.orguser),
            )
        })
    }

    /// A job about to start, with the sender that stops it: its entry is updated in place (so
    /// waiters on a queued job keep waiting), or made.
    fn enter_starting(&self, record: JobRecord, stop: mpsc::UnboundedSender<StopReason>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut entry) = jobs.get_mut(&record.job.handle) {
            entry.record = record;
            entry.stop = Some(stop);
            return;
        }
        let (finished, _) = watch::channel(false);
        jobs.insert(JobEntry {
            record,
            finished,
            stop: Some(stop),
            stop_receiver: None,
            live: None,
        });
    }

    /// The running record of a job already in the table (its stop channel stays).
    fn update_entry(&self, record: JobRecord) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut entry) = jobs.get_mut(&record.job.handle) {
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

    /// A job whose turn a stop interrupted, waiting again: its waiting record, and a stop
    /// channel again.
    fn requeue_entry(&self, record: JobRecord) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut entry) = jobs.get_mut(&record.job.handle) {
            let (sender, receiver) = mpsc::unbounded_channel();
            entry.record = record;
            entry.stop = Some(sender);
            entry.stop_receiver = Some(receiver);
            entry.live = None;
        }
    }

    /// A job back in line: those who waited for its turn's end are woken (they see it
    /// waiting, and a cancel among them takes it out of line); a new wait is for its real end.
    /// A cancel request already sent stays: a cancel that reached it takes effect at its next
    /// turn, even one whose own caller was told the cancellation could not be recorded.
    fn wake_waiters_of_turn(&self, handle: &str) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut entry) = jobs.get_mut(handle) {
            let turn_ended = std::mem::replace(&mut entry.finished, watch::channel(false).0);
            turn_ended.send_replace(true);
        }
    }

    /// A job that ended without a lane (a queued one cancelled or refused at its turn): its
    /// entry takes the final record, and waiters for its result are woken.
    fn finish_entry(&self, mut record: JobRecord) {
        record.job.stdout = None;
        record.job.stderr = None;
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut entry) = jobs.get_mut(&record.job.handle) {
            entry.record = record;
            entry.stop = None;
            entry.stop_receiver = None;
            entry.live = None;
            entry.finished.send_replace(true);
        }
    }

    /// Enter a job in the table: a finished one, or (with its stop channel) one that waits or
    /// runs.
    fn insert(&self, record: JobRecord, stop: Option<StopChannel>) {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(JobEntry::new(record, stop));
    }

    /// The stop channel of a job about to start: the one it was given when it was queued, or a
    /// new one. Its sender stays in the table, so a cancel reaches the lane from now on.
    fn stop_channel_for(&self, record: &JobRecord) -> StopChannel {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let entry = jobs.get_mut(&record.job.handle);
        if let Some(mut entry) = entry
            && let (Some(sender), Some(receiver)) = (entry.stop.clone(), entry.stop_receiver.take())
        {
            return (sender, receiver);
        }
        mpsc::unbounded_channel()
    }

    fn show_live_output(&self, handle: &str, live: Option<LiveOutput>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut entry) = jobs.get_mut(handle) {
            entry.live = live;
        }
    }

    fn live_output(&self, handle: &str) -> Option<LiveOutput> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.get(handle).and_then(|e| e.live.clone())
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

    /// No client connected, no lane running, nothing waiting: a helper started on demand may
    /// stop (see `exit_when_idle_seconds`).
    pub fn is_idle(&self) -> bool {
        let no_clients = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        let capacity = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        no_clients && capacity.total == 0 && capacity.queue.is_empty()
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
