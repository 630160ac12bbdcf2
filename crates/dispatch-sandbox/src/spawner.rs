//! The long-lived threads every lane is started from, and the lane reaper they register with.
//!
//! `PR_SET_PDEATHSIG` is tied to the thread that created the child: if that thread exits (a
//! blocking-pool thread retiring after idling, say) every lane it started would be killed. So
//! all spawns happen on a fixed pool of threads that live as long as the spawner (the process).
//! More than one, so a slow exec does not hold up every other dispatch.

use crate::cgroup::{CgroupSetting, CgroupTree, Controllers, Established, LaneCgroup};
use crate::child::{self, ChildPlan, ChildStack, ExecImage};
use crate::reaper::{self, Reaper};
use crate::{Enforcement, PreparedLane, Sandbox, SandboxError};
use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{ChildStderr, ChildStdout, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

/// What ends everything a lane starts: one cgroup per lane under a tree the helper owns, or,
/// without one, the lane's process group and the helper as child subreaper (a descendant that
/// leaves the group is reparented to the helper, which kills it when a lane of its user ends).
pub struct Containment {
    tree: Option<CgroupTree>,
    /// Why there is no tree.
    without: String,
    /// [`Containment::describe`], made once: every lane's report carries it.
    description: String,
}

impl Containment {
    pub fn establish(setting: &CgroupSetting) -> Result<Containment, SandboxError> {
        Ok(match CgroupTree::establish(setting)? {
            Established::Tree(tree) => Containment::described(Some(tree), String::new()),
            Established::Unavailable(reason) => Containment::none(reason),
        })
    }

    pub fn none(reason: impl Into<String>) -> Containment {
        Containment::described(None, reason.into())
    }

    fn described(tree: Option<CgroupTree>, without: String) -> Containment {
        let mut containment = Containment {
            tree,
            without,
            description: String::new(),
        };
        containment.description = containment.explain();
        containment
    }

    pub fn tree(&self) -> Option<&CgroupTree> {
        self.tree.as_ref()
    }

    pub fn controllers(&self) -> Option<Controllers> {
        self.tree.as_ref().map(CgroupTree::controllers)
    }

    /// Whether process `pid`, running as `uid`, belongs to a lane: it is in the cgroup of a lane
    /// run as `uid`, or, without cgroups, this process (the helper, a subreaper) is among its
    /// ancestors. The helper refuses such peers: a lane never dispatches. What cannot be told
    /// counts as yes.
    pub fn holds_process(&self, pid: i32, uid: libc::uid_t) -> bool {
        if pid <= 0 {
            // Not a process of this pid namespace: nothing can be checked.
            return true;
        }
        match &self.tree {
            Some(tree) => tree.holds_process(pid, uid),
            None => descends_from_this_process(pid).unwrap_or(true),
        }
    }

    /// One line for `check`, the log and every job's sandbox report.
    pub fn describe(&self) -> String {
        self.description.clone()
    }

    fn explain(&self) -> String {
        match &self.tree {
            Some(tree) => {
                let c = tree.controllers();
                let names: Vec<&str> = [("pids", c.pids), ("memory", c.memory), ("cpu", c.cpu)]
                    .into_iter()
                    .filter_map(|(name, on)| on.then_some(name))
                    .collect();
                format!(
                    "cgroup per lane under {} (cgroup.kill ends every process of a lane; \
                     controllers: {})",
                    tree.lanes_dir().display(),
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(" ")
                    }
                )
            }
            None => format!(
                "process group and subreaper only, no cgroup ({}): a descendant that leaves its \
                 lane's group is killed when a lane of its user ends",
                self.without
            ),
        }
    }
}

/// Whether this process is an ancestor of `pid`, by the parent links in /proc (`None`: a link
/// could not be read). Lanes are this process's children, and it is their subreaper, so
/// whatever they start stays below it.
fn descends_from_this_process(pid: i32) -> Option<bool> {
    let me = std::process::id() as i32;
    let mut current = pid;
    // Bounded: a chain this deep (or a cycle through a reused pid) ends the walk.
    for _ in 0..256 {
        if current == me {
            return Some(true);
        }
        // Checked after the comparison: the helper itself may be pid 1 (a container's init).
        if current <= 1 {
            return Some(false);
        }
        current = parent_of(current)?;
    }
    None
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields resume after the last ')'.
    let rest = stat.rsplit_once(") ")?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A running lane. Its first process leads the lane's process group.
pub struct SpawnedLane {
    pid: libc::pid_t,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    pub enforcement: Enforcement,
    cgroup: Option<Arc<LaneCgroup>>,
    containment: Arc<Containment>,
    uid: libc::uid_t,
    registry: Arc<Registry>,
    reaped: bool,
}

/// How a lane ended and what it cost.
#[derive(Debug, Clone)]
pub struct LaneEnd {
    pub status: ExitStatus,
    pub usage: LaneUsage,
    /// Set when the lane's cgroup could not be emptied or removed (named, for the record).
    pub cleanup_error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneUsage {
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    /// The whole lane's peak (`memory.peak`), or else the largest single process's.
    pub peak_memory_bytes: u64,
    /// True when `peak_memory_bytes` covers the whole lane.
    pub peak_memory_whole_lane: bool,
    pub pids_max_hits: Option<u64>,
    pub oom_kills: Option<u64>,
}

impl SpawnedLane {
    /// The lane's process group id (its first process's pid). Safe to signal until [`wait`]
    /// returns: the unreaped leader keeps the id from being reused.
    ///
    /// [`wait`]: SpawnedLane::wait
    pub fn process_group(&self) -> i32 {
        self.pid
    }

    /// The lane's cgroup, if it has one: for stopping it whole and reading its usage.
    pub fn cgroup(&self) -> Option<Arc<LaneCgroup>> {
        self.cgroup.clone()
    }

    /// SIGKILL the whole lane: its cgroup, and its process group (safe while the unreaped
    /// leader pins the id, i.e. until [`wait`] returns).
    ///
    /// [`wait`]: SpawnedLane::wait
    pub fn kill_all(&self) {
        if let Some(cgroup) = &self.cgroup {
            let _ = cgroup.kill();
        }
        let group = nix::unistd::Pid::from_raw(self.pid);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    }

    /// A pidfd for the lane's first process, readable once it has exited: its end can be
    /// awaited by an event loop instead of a thread blocked in `waitid` for the lane's whole
    /// life. Valid until [`wait`] reaps the process.
    ///
    /// [`wait`]: SpawnedLane::wait
    pub fn exit_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        child::pidfd_open(self.pid)
    }

    /// Whether the lane's first process has exited (it is not reaped here).
    pub fn has_exited(&self) -> io::Result<bool> {
        child::has_exited(self.pid)
    }

    /// Block until the lane's first process has exited, then end everything else in the lane,
    /// reap the first process and remove the lane's cgroup. The reaper forgets the group once
    /// the process has exited but before the reap, while its id cannot be reused.
    pub fn wait(mut self) -> io::Result<LaneEnd> {
        self.finish()
    }

    fn finish(&mut self) -> io::Result<LaneEnd> {
        // From here on the group is never signalled from Drop: if the wait fails the id may
        // no longer be ours.
        self.reaped = true;
        let exited = child::wait_exited(self.pid);
        self.registry.forget(self.pid);
        if exited.is_ok() {
            // The lane is over: nothing it started outlives it. The exited, unreaped leader
            // still holds the group id, so the group kill reaches only this lane. The cgroup
            // is killed below, only if anything is left in it.
            let group = nix::unistd::Pid::from_raw(self.pid);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
        // Whatever happened to the wait, the cgroup is emptied and the leader forgotten.
        let cleanup_error = self.end_cgroup();
        // Reaped and forgotten under one lock: once reaped its pid is free, and a new lane's
        // entry under the same pid must not be the one forgotten.
        let reaped = {
            let mut own = own_children();
            let reaped = exited.and_then(|()| child::reap_with_usage(self.pid));
            own.remove(self.pid);
            reaped
        };
        let cgroup_usage = self.cgroup.as_ref().map(|c| c.usage());
        if cleanup_error.is_none() {
            self.remove_cgroup();
        }
        Registry::reap_adopted(self.cgroup.is_none().then_some(self.uid));
        let (status, rusage) = reaped?;
        Ok(LaneEnd {
            status,
            usage: usage(rusage, cgroup_usage),
            cleanup_error,
        })
    }

    fn end_cgroup(&self) -> Option<String> {
        let cgroup = self.cgroup.as_ref()?;
        cgroup
            .kill_and_wait(Duration::from_secs(10))
            .err()
            .map(|e| e.to_string())
    }

    /// The cgroup is empty: its removal is the janitor's (a leftover is swept at the next start).
    fn remove_cgroup(&self) {
        if let (Some(cgroup), Some(tree)) = (&self.cgroup, self.containment.tree()) {
            tree.release(cgroup);
        }
    }
}

/// The lane's CPU time and peak memory: its cgroup's counters where it has one (every process
/// it ever ran), the first process's resource usage otherwise (it and the descendants it waited for).
fn usage(rusage: libc::rusage, cgroup: Option<crate::cgroup::CgroupUsage>) -> LaneUsage {
    let millis = |t: libc::timeval| (t.tv_sec as u64) * 1000 + (t.tv_usec as u64) / 1000;
    let largest_process = (rusage.ru_maxrss.max(0) as u64) * 1024;
    match cgroup {
        Some(c) => LaneUsage {
            cpu_user_ms: c.cpu_user_usec / 1000,
            cpu_system_ms: c.cpu_system_usec / 1000,
            peak_memory_bytes: c.memory_peak.unwrap_or(largest_process),
            peak_memory_whole_lane: c.memory_peak.is_some(),
            pids_max_hits: c.pids_max_hits,
            oom_kills: c.oom_kills,
        },
        None => LaneUsage {
            cpu_user_ms: millis(rusage.ru_utime),
            cpu_system_ms: millis(rusage.ru_stime),
            peak_memory_bytes: largest_process,
            peak_memory_whole_lane: false,
            pids_max_hits: None,
            oom_kills: None,
        },
    }
}

/// Block until the lane whose group is `pgid` has exited, without reaping it (see
/// [`SpawnedLane::process_group`]). Interrupted waits are resumed, not reported.
pub fn wait_for_exit(pgid: i32) -> io::Result<()> {
    child::wait_exited(pgid)
}

impl Drop for SpawnedLane {
    /// A lane dropped without being waited for is killed, not leaked.
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_all();
            let _ = self.finish();
        }
    }
}

/// Which groups are live, and the reaper that knows them.
struct Registry {
    state: Mutex<RegistryState>,
    /// The lanes' parent `cgroup.kill`, handed to every reaper.
    kill_all: Option<OwnedFd>,
}

struct RegistryState {
    reaper: Arc<Reaper>,
    /// Groups registered with the reaper: lanes whose first process has not exited.
    live: HashSet<libc::pid_t>,
}

/// Every child this process started on purpose, across all spawners (tests run several): lane
/// leaders until they are reaped, and reapers. Any other child is an orphan adopted as
/// subreaper.
pub(crate) struct OwnChildren {
    pids: std::collections::BTreeSet<libc::pid_t>,
    /// Spawns between their reaper check and [`Registry::track`]/[`Registry::abandon`], each
    /// with its child's pid once the kernel wrote it there (0 before the clone): that child is
    /// left alone by orphan reaping, however long it waits at its gate.
    pub(crate) in_flight: Vec<Arc<InFlightSlot>>,
}

/// One spawn in flight, as orphan reaping and the stopped-lane watchdog see it.
#[derive(Default)]
pub(crate) struct InFlightSlot {
    /// The child's pid, written by the kernel at the clone (`CLONE_PARENT_SETTID`).
    pub(crate) child_pid: AtomicI32,
    /// Set (under [`OWN_CHILDREN`]'s lock) once the clone returned: the child has exec'd or
    /// exited, and may be reaped from then on, so its pid is no longer the watchdog's to kill.
    pub(crate) settled: std::sync::atomic::AtomicBool,
    /// The watchdog killed the child because it was stopped before its exec.
    pub(crate) killed_stopped: std::sync::atomic::AtomicBool,
}

pub(crate) static OWN_CHILDREN: Mutex<OwnChildren> = Mutex::new(OwnChildren {
    pids: std::collections::BTreeSet::new(),
    in_flight: Vec::new(),
});

/// A spawn in flight (see [`OwnChildren::in_flight`]); panic-safe.
struct InFlight {
    slot: Arc<InFlightSlot>,
}

impl InFlight {
    /// The clone returned: from here its child may be reaped, and only from here (the
    /// watchdog's kill relies on it; see `watchdog.rs`).
    fn settle(&self) {
        let _own = own_children();
        self.slot.settled.store(true, Ordering::SeqCst);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        own_children()
            .in_flight
            .retain(|slot| !Arc::ptr_eq(slot, &self.slot));
    }
}

pub(crate) fn own_children() -> MutexGuard<'static, OwnChildren> {
    OWN_CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

impl OwnChildren {
    pub(crate) fn insert(&mut self, pid: libc::pid_t) {
        self.pids.insert(pid);
    }

    pub(crate) fn remove(&mut self, pid: libc::pid_t) {
        self.pids.remove(&pid);
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, RegistryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reap (and, without cgroups, kill those of `kill_uid`) the orphans adopted as subreaper,
    /// leaving alone the children of spawns in flight. Skipped while one of those has no pid
    /// yet (it is being cloned); the next lane's end does it.
    fn reap_adopted(kill_uid: Option<libc::uid_t>) {
        let own = own_children();
        let in_flight: Vec<libc::pid_t> = own
            .in_flight
            .iter()
            .map(|slot| slot.child_pid.load(Ordering::SeqCst))
            .collect();
        if in_flight.contains(&0) {
            return;
        }
        if in_flight.is_empty() {
            adopted::reap(&own.pids, kill_uid);
        } else {
            let mut ours = own.pids.clone();
            ours.extend(in_flight);
            adopted::reap(&ours, kill_uid);
        }
    }

    /// Count a spawn as in flight until the returned guard is dropped.
    fn spawn_in_flight() -> InFlight {
        let slot = Arc::new(InFlightSlot::default());
        own_children().in_flight.push(slot.clone());
        InFlight { slot }
    }

    fn kill_all_fd(&self) -> Option<i32> {
        self.kill_all.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// The reaper to register the next lane with. A reaper that died (only SIGKILL can end it
    /// early) or is stopped (it would read no registration and kill nothing) is replaced, and
    /// every live group is registered with its successor.
    fn reaper_for_next_lane(&self) -> Result<Arc<Reaper>, SandboxError> {
        let mut state = self.lock();
        if state.reaper.has_exited() || state.reaper.is_stopped() {
            Self::replace_reaper(&mut state, self.kill_all_fd())?;
        }
        if state.live.len() >= reaper::CAPACITY {
            return Err(SandboxError::TooManyLanes(reaper::CAPACITY));
        }
        Ok(state.reaper.clone())
    }

    /// A spawn that got its reaper failed; `child`, if it was created, has exited: how it
    /// ended, once reaped.
    fn abandon(&self, child: Option<libc::pid_t>) -> Option<ExitStatus> {
        let pid = child?;
        self.forget(pid);
        child::reap(pid).ok()
    }

    /// Stop the current reaper if it still runs (one that missed a message must not act on
    /// what it knows) and start one that knows every live group.
    fn replace_reaper(
        state: &mut RegistryState,
        kill_all: Option<i32>,
    ) -> Result<(), SandboxError> {
        state.reaper.discard();
        let successor = Reaper::start(kill_all).map_err(SandboxError::Reaper)?;
        let told = state
            .live
            .iter()
            .try_for_each(|&pgid| successor.send(reaper::REGISTER, pgid));
        if let Err(error) = told {
            // Its end-of-file would kill the lanes it was told of: stop it first.
            successor.discard();
            return Err(SandboxError::Reaper(error));
        }
        state.reaper = Arc::new(successor);
        Ok(())
    }

    /// Record a started lane, which registered itself with `used`.
    fn track(&self, pgid: libc::pid_t, used: &Arc<Reaper>) {
        own_children().insert(pgid);
        let mut state = self.lock();
        state.live.insert(pgid);
        // If the reaper was replaced while this lane started, the new one must hear of it too;
        // if it cannot be told, a successor is (the next spawn retries if that fails as well).
        if !Arc::ptr_eq(&state.reaper, used) && state.reaper.send(reaper::REGISTER, pgid).is_err() {
            Self::replace_reaper_now(&mut state, self.kill_all_fd());
        }
    }

    fn forget(&self, pgid: libc::pid_t) {
        let mut state = self.lock();
        state.live.remove(&pgid);
        // A reaper that missed a FORGET could later kill whatever reuses the id: replace it.
        if state.reaper.send(reaper::FORGET, pgid).is_err() {
            Self::replace_reaper_now(&mut state, self.kill_all_fd());
        }
    }

    /// [`Registry::replace_reaper`] where no spawn waits to fail: the old reaper is gone either
    /// way, so a failure is said loudly (the running lanes have no reaper until the next spawn,
    /// which tries again and fails closed if it cannot).
    fn replace_reaper_now(state: &mut RegistryState, kill_all: Option<i32>) {
        if let Err(error) = Self::replace_reaper(state, kill_all) {
            tracing::error!(%error, "the lane reaper could not be replaced: until the next spawn, lanes are not killed should the helper die");
        }
    }
}

/// Called on the spawner thread with the outcome; it must not block (it only hands it over).
type Reply = Box<dyn FnOnce(Result<SpawnedLane, SandboxError>) + Send>;

pub struct LaneSpawner {
    requests: Mutex<mpsc::Sender<(PreparedLane, Reply)>>,
    containment: Arc<Containment>,
    /// The seccomp programs the spawner threads run under (and every lane inherits).
    programs: Arc<Vec<seccompiler::BpfProgram>>,
}

impl LaneSpawner {
    /// Start the reaper and `threads` spawner threads.
    ///
    /// The process is made non-dumpable first: each lane runs inside the helper's memory until
    /// its exec, and the reaper is a copy of it, so neither may be readable through /proc by a
    /// lane user, even one running under the helper's own uid. It becomes a child subreaper, so
    /// a lane's orphaned descendants are reparented to it rather than to init.
    pub fn start(
        threads: usize,
        containment: Containment,
        sandbox: &Sandbox,
    ) -> io::Result<LaneSpawner> {
        nix::sys::prctl::set_dumpable(false)?;
        nix::sys::prctl::set_child_subreaper(true)?;
        crate::watchdog::start_once()?;
        let kill_all = match containment.tree() {
            Some(tree) => Some(tree.open_kill_all().map_err(io::Error::other)?),
            None => None,
        };
        let reaper = Reaper::start(kill_all.as_ref().map(|fd| fd.as_raw_fd()))?;
        let registry = Arc::new(Registry {
            state: Mutex::new(RegistryState {
                reaper: Arc::new(reaper),
                live: HashSet::new(),
            }),
            kill_all,
        });
        let containment = Arc::new(containment);
        let (tx, rx) = mpsc::channel::<(PreparedLane, Reply)>();
        let rx = Arc::new(Mutex::new(rx));
        let programs: Arc<Vec<seccompiler::BpfProgram>> = Arc::new(sandbox.seccomp().to_vec());
        for index in 0..threads.max(1) {
            let (rx, registry, containment) = (rx.clone(), registry.clone(), containment.clone());
            let programs = programs.clone();
            let mut stack = ChildStack::new()?;
            let (ready, started) = mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name(format!("lane-spawner-{index}"))
                .spawn(move || {
                    let context = SpawnContext {
                        registry: &registry,
                        containment: &containment,
                        inherited_seccomp: &programs,
                    };
                    spawner_thread(&rx, &mut stack, &context, ready);
                })?;
            started
                .recv()
                .map_err(|_| io::Error::other("a lane spawner thread died at its start"))?
                .map_err(|e| {
                    io::Error::other(format!(
                        "restrict a lane spawner thread with the lanes' seccomp programs: {e}"
                    ))
                })?;
        }
        Ok(LaneSpawner {
            requests: Mutex::new(tx),
            containment,
            programs,
        })
    }

    /// Whether lanes of `sandbox`'s policy run under exactly the spawner threads' programs (if
    /// not, after a reload, they run under both until the helper restarts).
    pub fn inherits_exactly(&self, sandbox: &Sandbox) -> bool {
        self.programs.as_slice() == sandbox.seccomp()
    }

    pub fn containment(&self) -> &Containment {
        &self.containment
    }

    /// Start the lane on a spawner thread. Blocks until exec succeeded or a step failed.
    pub fn spawn(&self, lane: PreparedLane) -> Result<SpawnedLane, SandboxError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.spawn_then(lane, move |outcome| {
            let _ = reply.send(outcome);
        });
        answer.recv().map_err(|_| SandboxError::SpawnerGone)?
    }

    /// Start the lane on a spawner thread and hand the outcome to `done` there, without a thread
    /// of the caller's waiting for it (the helper passes a channel's sender). If the spawner is
    /// gone, `done` gets that at once.
    pub fn spawn_then(
        &self,
        lane: PreparedLane,
        done: impl FnOnce(Result<SpawnedLane, SandboxError>) + Send + 'static,
    ) {
        let sent = match self.requests.lock() {
            Ok(requests) => requests
                .send((lane, Box::new(done)))
                .map_err(|unsent| unsent.0.1),
            Err(_) => Err(Box::new(done) as Reply),
        };
        if let Err(done) = sent {
            done(Err(SandboxError::SpawnerGone));
        }
    }
}

/// A copy of `fd` numbered 3 or above (close-on-exec), so the child's dup2 onto 0–2 always
/// creates a fresh descriptor even if the helper was started with its stdio closed.
pub(crate) fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        Ok(fd)
    } else {
        // std duplicates with F_DUPFD_CLOEXEC starting at 3.
        fd.try_clone()
    }
}

/// Until its exec, the lane shares the helper's memory, and the kernel resets that memory's
/// dumpable flag to `fs.suid_dumpable` when the lane changes uid. At 1 ("debug") the lane's user
/// could attach to the child in that window and reach the helper's memory: refuse instead.
/// Read at every spawn, since the setting can change while the helper runs.
fn refuse_dumpable_credential_change() -> Result<(), SandboxError> {
    check_suid_dumpable(std::path::Path::new("/proc/sys/fs/suid_dumpable"))
}

fn check_suid_dumpable(setting: &std::path::Path) -> Result<(), SandboxError> {
    let value = std::fs::read_to_string(setting).map_err(|e| {
        SandboxError::SuidDumpable(format!("cannot read {}: {e}", setting.display()))
    })?;
    match value.trim() {
        "0" | "2" => Ok(()),
        other => Err(SandboxError::SuidDumpable(format!(
            "{} is {other}: a lane's uid change would leave the helper's memory open to \
             the lane user until exec; set it to 0 or 2 (sysctl fs.suid_dumpable=0)",
            setting.display()
        ))),
    }
}

/// stdin `/dev/null` and the two capture pipes: the lane's ends (all above 2) and the helper's.
struct Stdio {
    lane: [OwnedFd; 3],
    out_read: OwnedFd,
    err_read: OwnedFd,
}

fn capture_stdio() -> io::Result<Stdio> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let (out_read, out_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok(Stdio {
        lane: [
            above_stdio(OwnedFd::from(null))?,
            above_stdio(out_write)?,
            above_stdio(err_write)?,
        ],
        out_read,
        err_read,
    })
}

/// The lane's own cgroup, limits written, before anything of the lane exists.
fn lane_cgroup(
    lane: &PreparedLane,
    containment: &Containment,
) -> Result<Option<LaneCgroup>, SandboxError> {
    let Some(tree) = containment.tree() else {
        return Ok(None);
    };
    let values = lane.limits.cgroup_values(tree.controllers());
    Ok(Some(tree.create_lane(&values, lane.plan.identity.uid)?))
}

/// A spawner thread's life: put itself under the lanes' seccomp programs (reporting whether it
/// could: one that cannot spawns nothing), then serve spawn requests until the spawner is gone.
fn spawner_thread(
    requests: &Mutex<mpsc::Receiver<(PreparedLane, Reply)>>,
    stack: &mut ChildStack,
    context: &SpawnContext<'_>,
    ready: mpsc::SyncSender<io::Result<()>>,
) {
    let restricted = child::restrict_spawner_thread(context.inherited_seccomp);
    let failed = restricted.is_err();
    let _ = ready.send(restricted);
    if failed {
        return;
    }
    loop {
        // The lock is held only while waiting for the next request.
        let next = requests.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((lane, reply)) = next else { return };
        reply(spawn_now(lane, stack, context));
    }
}

/// What a spawner thread lends each spawn.
struct SpawnContext<'a> {
    registry: &'a Arc<Registry>,
    containment: &'a Arc<Containment>,
    /// The programs this thread runs under, which every lane it clones inherits.
    inherited_seccomp: &'a [seccompiler::BpfProgram],
}

/// Start one lane: set-up in the helper (stdio, cgroup, credentials check, reaper), the child's
/// fixed sequence, then either a tracked lane or a failure naming its step, with nothing left
/// behind.
fn spawn_now(
    mut lane: PreparedLane,
    stack: &mut ChildStack,
    context: &SpawnContext<'_>,
) -> Result<SpawnedLane, SandboxError> {
    let (registry, containment) = (context.registry, context.containment);
    let stdio = capture_stdio().map_err(SandboxError::Spawn)?;
    if lane.plan.change_uid {
        refuse_dumpable_credential_change()?;
    }
    let mut cgroup = lane_cgroup(&lane, containment)?;
    // Until the child is tracked (or gone), orphan reaping leaves the helper's children alone.
    let in_flight = Registry::spawn_in_flight();
    let (reaper, child_plan) = match reaper_and_plan(&lane, &stdio, cgroup.as_ref(), context) {
        Ok(both) => both,
        Err(error) => {
            discard_cgroup(cgroup.as_ref(), containment);
            return Err(error);
        }
    };
    let spawned = child::spawn(&child_plan, stack, &in_flight.slot.child_pid);
    in_flight.settle();
    if lane.plan.change_uid {
        // The child's uid change set the shared memory's dumpable flag to fs.suid_dumpable (0
        // or 2); put the helper's own back to 0, so it does not write core dumps either.
        let _ = nix::sys::prctl::set_dumpable(false);
    }
    // The lane has its own copies now (or never will): the helper keeps only the read ends.
    drop(stdio.lane);
    drop(lane.landlock.take());
    drop(lane.gate.take());
    if let Some(cgroup) = cgroup.as_mut() {
        cgroup.close_procs();
    }
    match spawned {
        Ok(pid) => {
            registry.track(pid, &reaper);
            let output = (stdio.out_read, stdio.err_read);
            Ok(tracked_lane(pid, lane, output, cgroup, context))
        }
        Err(failure) => {
            // Its child, if any, has exited (CLONE_VFORK returned without an exec).
            let ended = registry.abandon(failure.child);
            discard_cgroup(cgroup.as_ref(), containment);
            let stopped = in_flight.slot.killed_stopped.load(Ordering::SeqCst);
            Err(spawn_error(failure, ended, stopped))
        }
    }
}

/// Why a spawn failed, as its user can act on it: the step and its error, with the cause
/// where the error alone does not say it. `ended`: how its child ended; `stopped`: the
/// watchdog killed it, stopped before its exec.
fn spawn_error(
    failure: child::SpawnFailure,
    ended: Option<ExitStatus>,
    stopped: bool,
) -> SandboxError {
    if stopped {
        return SandboxError::StoppedBeforeExec;
    }
    let error = match (failure.step, ended) {
        // No step failed: the process was ended from outside. How is the cause.
        (child::ChildStep::EndedBeforeExec, Some(status)) => io::Error::other(status.to_string()),
        // execve's EAGAIN has one cause: the new uid is past its RLIMIT_NPROC.
        (child::ChildStep::Exec, _) if failure.error.raw_os_error() == Some(libc::EAGAIN) => {
            io::Error::other(
                "the lane user already runs as many processes as the lane's process limit \
                 (RLIMIT_NPROC counts every process of that user, lanes or not)",
            )
        }
        _ => failure.error,
    };
    SandboxError::ChildStep {
        step: failure.step,
        error,
    }
}

/// The reaper that will watch the lane's group, and the child's plan: a plan that cannot be
/// made gives the reaper's place back.
fn reaper_and_plan(
    lane: &PreparedLane,
    stdio: &Stdio,
    cgroup: Option<&LaneCgroup>,
    context: &SpawnContext<'_>,
) -> Result<(Arc<Reaper>, ChildPlan), SandboxError> {
    let registry = context.registry;
    let reaper = registry.reaper_for_next_lane()?;
    let controllers = context.containment.controllers();
    let inherited = context.inherited_seccomp;
    match child_plan(lane, stdio, cgroup, &reaper, controllers, inherited) {
        Ok(plan) => Ok((reaper, plan)),
        Err(error) => {
            registry.abandon(None);
            Err(error)
        }
    }
}

/// A lane that exec'd, with what it is held to and the read ends of its output.
fn tracked_lane(
    pid: libc::pid_t,
    mut lane: PreparedLane,
    (stdout, stderr): (OwnedFd, OwnedFd),
    cgroup: Option<LaneCgroup>,
    context: &SpawnContext<'_>,
) -> SpawnedLane {
    let containment = context.containment;
    lane.enforcement.containment = containment.describe();
    let controllers = containment.controllers();
    lane.enforcement.limits = lane.limits.report(controllers, !lane.plan.change_uid);
    SpawnedLane {
        pid,
        stdout: Some(ChildStdout::from(stdout)),
        stderr: Some(ChildStderr::from(stderr)),
        enforcement: lane.enforcement,
        cgroup: cgroup.map(Arc::new),
        containment: containment.clone(),
        uid: lane.plan.identity.uid,
        registry: context.registry.clone(),
        reaped: false,
    }
}

fn discard_cgroup(cgroup: Option<&LaneCgroup>, containment: &Containment) {
    if let (Some(cgroup), Some(tree)) = (cgroup, containment.tree())
        && cgroup.kill_and_wait(Duration::from_secs(5)).is_ok()
    {
        tree.release(cgroup);
    }
}

/// Everything the child needs, as plain data: it cannot allocate.
fn child_plan(
    lane: &PreparedLane,
    stdio: &Stdio,
    cgroup: Option<&LaneCgroup>,
    reaper: &Reaper,
    controllers: Option<Controllers>,
    inherited_seccomp: &[seccompiler::BpfProgram],
) -> Result<ChildPlan, SandboxError> {
    let plan = &lane.plan;
    let identity = &plan.identity;
    let work_dir =
        std::ffi::CString::new(plan.work_dir.as_os_str().as_encoded_bytes()).map_err(|_| {
            SandboxError::WorkDir {
                path: plan.work_dir.display().to_string(),
                reason: "contains NUL".into(),
            }
        })?;
    let exec = ExecImage::new(&plan.argv, &lane.env)
        .map_err(|why| SandboxError::Environment(why.to_owned()))?;
    let mut groups_sorted = identity.groups.clone();
    groups_sorted.sort_unstable();
    Ok(ChildPlan {
        change_uid: plan.change_uid,
        uid: identity.uid,
        gid: identity.gid,
        groups: identity.groups.clone(),
        groups_sorted,
        groups_readback: std::cell::UnsafeCell::new(vec![0; identity.groups.len() + 1]),
        rlimits: lane
            .limits
            .rlimits(controllers, !plan.change_uid)
            .into_iter()
            .map(|(resource, value)| {
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                (resource, limit)
            })
            .collect(),
        helper_pid: std::process::id() as libc::pid_t,
        work_dir,
        make_work_dir: plan.make_work_dir,
        work_dir_access: lane.work_dir_access,
        cgroup_procs_fd: cgroup.and_then(LaneCgroup::procs_fd),
        stdio: stdio.lane.each_ref().map(|fd| fd.as_raw_fd()),
        reaper_fd: reaper.writer.as_raw_fd(),
        landlock_fd: lane.landlock.as_ref().map(|fd| fd.as_raw_fd()),
        gate_fd: lane.gate.as_ref().map(|fd| fd.as_raw_fd()),
        // A lane whose policy changed after this thread started (a reload) adds its own
        // programs on top: it then runs under both, never under less than its own.
        seccomp: if lane.seccomp == inherited_seccomp {
            Vec::new()
        } else {
            lane.seccomp.clone()
        },
        exec,
    })
}

/// Orphans the helper adopted as subreaper: a lane's descendants whose parent exited before
/// them. With cgroups they died with their lane and only need reaping; without, they are the
/// processes that left their lane's group, and are killed when a lane of their user ends.
mod adopted {
    use nix::unistd::Pid;
    use std::collections::BTreeSet;

    pub(super) fn reap(own: &BTreeSet<libc::pid_t>, kill_uid: Option<libc::uid_t>) {
        // With cgroups only exited orphans need reaping: skip the walk of /proc when no child
        // has exited, or only a lane leader that its own supervisor reaps.
        if kill_uid.is_none() && exited_child().is_none_or(|pid| own.contains(&pid)) {
            return;
        }
        let helper_session = nix::unistd::getsid(None).ok();
        for pid in children().into_iter().filter(|pid| !own.contains(pid)) {
            let child = Pid::from_raw(pid);
            // Lanes run in sessions of their own; a child in the helper's session was started
            // some other way (a command the process ran itself) and is not ours to reap.
            let session = nix::unistd::getsid(Some(child)).ok();
            if session.is_none() || session == helper_session {
                continue;
            }
            // Without a cgroup: a process that left a live lane's group is an escapee. Its pgid
            // (or its uid, read from /proc) says whether it is one of the ending lane's user.
            let in_live_lane =
                nix::unistd::getpgid(Some(child)).is_ok_and(|group| own.contains(&group.as_raw()));
            if let Some(uid) = kill_uid
                && !in_live_lane
                && owner(pid) == Some(uid)
            {
                // Our unreaped child, so the pid cannot have been reused.
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            }
            // A killed one that has not died yet is reaped at a later lane's end.
            let _ = nix::sys::wait::waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        }
    }

    /// A child that has exited and is not yet reaped, if any (it is left unreaped).
    fn exited_child() -> Option<libc::pid_t> {
        let flags = nix::sys::wait::WaitPidFlag::WEXITED
            | nix::sys::wait::WaitPidFlag::WNOHANG
            | nix::sys::wait::WaitPidFlag::WNOWAIT;
        match nix::sys::wait::waitid(nix::sys::wait::Id::All, flags) {
            Ok(status) => status.pid().map(|pid| pid.as_raw()),
            Err(_) => None,
        }
    }

    /// Children of every thread of the helper (each thread has its own list).
    fn children() -> Vec<libc::pid_t> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        let mut pids = Vec::new();
        for task in tasks.flatten() {
            let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pids.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<libc::pid_t>().ok()),
            );
        }
        pids
    }

    fn owner(pid: libc::pid_t) -> Option<libc::uid_t> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("Uid:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_reaper_is_replaced_at_the_next_spawn() {
        let registry = Registry {
            state: Mutex::new(RegistryState {
                reaper: Arc::new(Reaper::start(None).unwrap()),
                live: HashSet::new(),
            }),
            kill_all: None,
        };
        let first = registry.reaper_for_next_lane().unwrap();
        assert!(Arc::ptr_eq(
            &first,
            &registry.reaper_for_next_lane().unwrap()
        ));
        let pid = nix::unistd::Pid::from_raw(first.pid());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !first.is_stopped() {
            assert!(
                std::time::Instant::now() < deadline,
                "the reaper never stopped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let next = registry.reaper_for_next_lane().unwrap();
        let kept = Arc::ptr_eq(&first, &next);
        if kept {
            // Ended here, or the stopped copy of this test process would hold its output open.
            first.discard();
        }
        assert!(
            !kept,
            "a stopped reaper was kept: it would kill nothing if the helper died"
        );
        assert!(first.has_exited(), "the stopped reaper was not ended");
        assert!(!next.is_stopped() && !next.has_exited());
        next.discard();
    }

    #[test]
    fn only_a_non_dumpable_credential_change_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let setting = dir.path().join("suid_dumpable");
        for (value, allowed) in [("0\n", true), ("2\n", true), ("1\n", false), ("", false)] {
            std::fs::write(&setting, value).unwrap();
            let result = check_suid_dumpable(&setting);
            assert_eq!(result.is_ok(), allowed, "{value:?}: {result:?}");
            if let Err(error) = result {
                assert!(error.to_string().contains("suid_dumpable"), "{error}");
            }
        }
        let missing = check_suid_dumpable(&dir.path().join("missing")).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
    }
}
