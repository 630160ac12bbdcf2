//! The long-lived threads every lane is started from, and the lane reaper they register with.
//!
//! `PR_SET_PDEATHSIG` is tied to the thread that created the child: if that thread exits (a
//! blocking-pool thread retiring after idling, say) every lane it started would be killed. So
//! all spawns happen on a fixed pool of threads that live as long as the spawner (the process).
//! More than one, so a slow exec does not hold up every other dispatch.

use crate::child::{self, ChildPlan, ChildStack, ExecImage};
use crate::reaper::{self, Reaper};
use crate::{Enforcement, PreparedLane, SandboxError};
use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{ChildStderr, ChildStdout, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

/// A running lane. Its first process leads the lane's process group.
pub struct SpawnedLane {
    pid: libc::pid_t,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    pub enforcement: Enforcement,
    registry: Arc<Registry>,
    reaped: bool,
}

impl SpawnedLane {
    /// The lane's process group id (its first process's pid). Safe to signal until [`wait`]
    /// returns: the unreaped leader keeps the id from being reused.
    ///
    /// [`wait`]: SpawnedLane::wait
    pub fn process_group(&self) -> i32 {
        self.pid
    }

    /// Reap the lane's first process, blocking until it has exited. The reaper forgets the
    /// group once the process has exited but before the reap, while its id cannot be reused.
    pub fn wait(mut self) -> io::Result<ExitStatus> {
        self.finish()
    }

    fn finish(&mut self) -> io::Result<ExitStatus> {
        // From here on the group is never signalled from Drop: if the wait fails the id may
        // no longer be ours.
        self.reaped = true;
        let exited = child::wait_exited(self.pid);
        self.registry.forget(self.pid);
        exited?;
        child::reap(self.pid)
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
            let group = nix::unistd::Pid::from_raw(self.pid);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = self.finish();
        }
    }
}

/// Which groups are live, and the reaper that knows them.
struct Registry {
    state: Mutex<RegistryState>,
}

struct RegistryState {
    reaper: Arc<Reaper>,
    live: HashSet<libc::pid_t>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, RegistryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reaper to register the next lane with. A reaper that died (only SIGKILL can end it
    /// early) is replaced, and every live group is registered with its successor.
    fn reaper_for_next_lane(&self) -> Result<Arc<Reaper>, SandboxError> {
        let mut state = self.lock();
        if state.reaper.has_exited() {
            Self::replace_reaper(&mut state)?;
        }
        if state.live.len() >= reaper::CAPACITY {
            return Err(SandboxError::TooManyLanes(reaper::CAPACITY));
        }
        Ok(state.reaper.clone())
    }

    /// Stop the current reaper if it still runs (one that missed a message must not act on
    /// what it knows) and start one that knows every live group.
    fn replace_reaper(state: &mut RegistryState) -> Result<(), SandboxError> {
        state.reaper.discard();
        let successor = Reaper::start().map_err(SandboxError::Reaper)?;
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
        let mut state = self.lock();
        state.live.insert(pgid);
        // If the reaper was replaced while this lane started, the new one must hear of it too;
        // if it cannot be told, a successor is (the next spawn retries if that fails as well).
        if !Arc::ptr_eq(&state.reaper, used) && state.reaper.send(reaper::REGISTER, pgid).is_err() {
            let _ = Self::replace_reaper(&mut state);
        }
    }

    fn forget(&self, pgid: libc::pid_t) {
        let mut state = self.lock();
        state.live.remove(&pgid);
        // A reaper that missed a FORGET could later kill whatever reuses the id: replace it.
        if state.reaper.send(reaper::FORGET, pgid).is_err() {
            let _ = Self::replace_reaper(&mut state);
        }
    }
}

type Reply = mpsc::SyncSender<Result<SpawnedLane, SandboxError>>;

pub struct LaneSpawner {
    requests: Mutex<mpsc::Sender<(PreparedLane, Reply)>>,
}

impl LaneSpawner {
    /// Start the reaper and `threads` spawner threads.
    ///
    /// The process is made non-dumpable first: each lane runs inside the helper's memory until
    /// its exec, and the reaper is a copy of it, so neither may be readable through /proc by a
    /// lane user, even one running under the helper's own uid.
    pub fn start(threads: usize) -> io::Result<LaneSpawner> {
        nix::sys::prctl::set_dumpable(false)?;
        let registry = Arc::new(Registry {
            state: Mutex::new(RegistryState {
                reaper: Arc::new(Reaper::start()?),
                live: HashSet::new(),
            }),
        });
        let (tx, rx) = mpsc::channel::<(PreparedLane, Reply)>();
        let rx = Arc::new(Mutex::new(rx));
        for index in 0..threads.max(1) {
            let rx = rx.clone();
            let registry = registry.clone();
            let mut stack = ChildStack::new()?;
            std::thread::Builder::new()
                .name(format!("lane-spawner-{index}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next request.
                        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((lane, reply)) = next else { return };
                        let _ = reply.send(spawn_now(lane, &mut stack, &registry));
                    }
                })?;
        }
        Ok(LaneSpawner {
            requests: Mutex::new(tx),
        })
    }

    /// Start the lane on a spawner thread. Blocks until exec succeeded or a step failed.
    pub fn spawn(&self, lane: PreparedLane) -> Result<SpawnedLane, SandboxError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .lock()
            .map_err(|_| SandboxError::SpawnerGone)?
            .send((lane, reply))
            .map_err(|_| SandboxError::SpawnerGone)?;
        answer.recv().map_err(|_| SandboxError::SpawnerGone)?
    }
}

/// A copy of `fd` numbered 3 or above (close-on-exec), so the child's dup2 onto 0–2 always
/// creates a fresh descriptor even if the helper was started with its stdio closed.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
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

fn spawn_now(
    lane: PreparedLane,
    stack: &mut ChildStack,
    registry: &Arc<Registry>,
) -> Result<SpawnedLane, SandboxError> {
    let plan = &lane.plan;
    let limits = lane.limits;
    let mut rlimits = vec![
        (libc::RLIMIT_CORE, 0),
        (libc::RLIMIT_NOFILE, limits.nofile),
        (libc::RLIMIT_FSIZE, limits.fsize),
    ];
    if let Some(cpu) = limits.cpu_seconds {
        rlimits.push((libc::RLIMIT_CPU, cpu));
    }
    if let Some(bytes) = limits.address_space {
        rlimits.push((libc::RLIMIT_AS, bytes));
    }
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

    let stdio = || -> io::Result<_> {
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        let (out_read, out_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok((
            [
                above_stdio(OwnedFd::from(null))?,
                above_stdio(out_write)?,
                above_stdio(err_write)?,
            ],
            out_read,
            err_read,
        ))
    };
    let (child_stdio, out_read, err_read) = stdio().map_err(SandboxError::Spawn)?;

    if plan.change_uid {
        refuse_dumpable_credential_change()?;
    }
    let reaper = registry.reaper_for_next_lane()?;
    let child_plan = ChildPlan {
        change_uid: plan.change_uid,
        uid: identity.uid,
        gid: identity.gid,
        groups: identity.groups.clone(),
        groups_sorted: {
            let mut sorted = identity.groups.clone();
            sorted.sort_unstable();
            sorted
        },
        groups_readback: std::cell::UnsafeCell::new(vec![0; identity.groups.len() + 1]),
        rlimits: rlimits
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
        stdio: child_stdio.each_ref().map(|fd| fd.as_raw_fd()),
        reaper_fd: reaper.writer.as_raw_fd(),
        landlock_fd: lane.landlock.as_ref().map(|fd| fd.as_raw_fd()),
        seccomp: lane.seccomp.clone(),
        exec,
    };
    let spawned = child::spawn(&child_plan, stack);
    if plan.change_uid {
        // The child's uid change set the shared memory's dumpable flag to fs.suid_dumpable (0
        // or 2); put the helper's own back to 0, so it does not write core dumps either.
        let _ = nix::sys::prctl::set_dumpable(false);
    }
    // The lane has its own copies now (or never will): the helper keeps only the read ends.
    drop(child_stdio);
    drop(lane.landlock);
    match spawned {
        Ok(pid) => {
            registry.track(pid, &reaper);
            Ok(SpawnedLane {
                pid,
                stdout: Some(ChildStdout::from(out_read)),
                stderr: Some(ChildStderr::from(err_read)),
                enforcement: lane.enforcement,
                registry: registry.clone(),
                reaped: false,
            })
        }
        Err(failure) => {
            if let Some(pid) = failure.child {
                // It has exited (CLONE_VFORK returned without an exec).
                registry.forget(pid);
                let _ = child::reap(pid);
            }
            Err(SandboxError::ChildStep {
                step: failure.step,
                error: failure.error,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
