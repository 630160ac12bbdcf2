//! One running lane, from its start to its end: watched for its deadline, a stop request and its
//! CPU budget ([`watch`]), then judged ([`outcome`]): what state it ended in, why, and what it cost.

use crate::config::Settings;
use dispatch_proto::{JobState, ResourceUsage};
use dispatch_sandbox::cgroup::{Controllers, LaneCgroup};
use dispatch_sandbox::{LaneEnd, Limits, SpawnedLane, bytes};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancel,
    Timeout,
    Shutdown,
    /// The whole lane used its CPU time (counted in its cgroup by the helper).
    CpuTime,
}

/// How often a lane's cgroup counters are read: its CPU time against the budget, its task count
/// for the report.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// What watching the lane saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Watched {
    pub reason: Option<StopReason>,
    /// Most tasks (processes and threads) seen at once in the lane's cgroup, or of the lane's
    /// user where `RLIMIT_NPROC` holds the process limit.
    pub peak_tasks: usize,
    /// `RLIMIT_DATA` holds the memory limit (no memory controller): a lane that reached it
    /// can only be recognised by its peak.
    pub memory_by_rlimit: bool,
}

pub struct WatchPlan {
    pub timeout: Duration,
    pub grace: Duration,
    pub cpu_budget: Duration,
    /// The process limit, when `RLIMIT_NPROC` holds it: it counts every task of the lane's
    /// user, so near it those are counted too.
    pub user_process_limit: Option<u64>,
    pub memory_by_rlimit: bool,
    pub uid: u32,
}

impl WatchPlan {
    /// The helper's settings for one lane, and which limits rlimits hold (no controller).
    pub fn new(settings: &Settings, controllers: Option<Controllers>, uid: u32) -> WatchPlan {
        let limits = &settings.file.sandbox.limits;
        let pids_by_cgroup = controllers.is_some_and(|c| c.pids);
        WatchPlan {
            timeout: settings.timeout(),
            grace: settings.grace(),
            cpu_budget: Duration::from_secs(limits.cpu_seconds),
            // Unprivileged lanes get no RLIMIT_NPROC (it would count the user's whole session).
            user_process_limit: (!pids_by_cgroup && !settings.unprivileged)
                .then_some(limits.processes),
            memory_by_rlimit: !controllers.is_some_and(|c| c.memory),
            uid,
        }
    }
}

/// Wait until the lane's first process exits, stopping the lane on its deadline, a stop
/// request, or its CPU budget: SIGTERM to its group, SIGKILL to all of it after the grace period
/// (at once for the CPU budget). Returns without reaping: [`SpawnedLane::wait`] does that.
pub async fn watch(
    lane: &SpawnedLane,
    plan: WatchPlan,
    stop: &mut mpsc::UnboundedReceiver<StopReason>,
) -> Watched {
    let pgid = nix::unistd::Pid::from_raw(lane.process_group());
    let cgroup = lane.cgroup();
    let exited = first_process_exit(lane);
    tokio::pin!(exited);
    let deadline = tokio::time::sleep(plan.timeout);
    tokio::pin!(deadline);
    // The first sample after one period: a lane that ends sooner is counted at its end (below),
    // so most lanes cost no sample at all. After a stall, missed samples are skipped rather
    // than taken at once by every lane.
    let first = tokio::time::Instant::now() + SAMPLE_EVERY;
    let mut sample = tokio::time::interval_at(first, SAMPLE_EVERY);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut watched = Watched {
        memory_by_rlimit: plan.memory_by_rlimit,
        ..Watched::default()
    };
    let mut escalate: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let terminate = |escalate: &mut Option<_>| {
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
        *escalate = Some(Box::pin(tokio::time::sleep(plan.grace)));
    };
    loop {
        tokio::select! {
            _ = &mut exited => break,
            _ = &mut deadline, if watched.reason.is_none() => {
                watched.reason = Some(StopReason::Timeout);
                terminate(&mut escalate);
            }
            Some(why) = stop.recv(), if watched.reason.is_none() => {
                watched.reason = Some(why);
                terminate(&mut escalate);
            }
            _ = async { escalate.as_mut().unwrap().await }, if escalate.is_some() => {
                lane.kill_all();
                escalate = None;
            }
            _ = sample.tick() => take_sample(lane, cgroup.as_deref(), &plan, &mut watched),
        }
    }
    // What the first process left running is still there until the wait kills it: count it.
    if let Some(cgroup) = &cgroup {
        watched.peak_tasks = watched.peak_tasks.max(cgroup.task_count().unwrap_or(0));
    }
    watched
}

/// One periodic look at a running lane: its peak task count so far, and its CPU budget, at
/// which all of it is killed at once.
fn take_sample(
    lane: &SpawnedLane,
    cgroup: Option<&LaneCgroup>,
    plan: &WatchPlan,
    watched: &mut Watched,
) {
    let tasks = cgroup.map_or(0, |c| c.task_count().unwrap_or(0));
    watched.peak_tasks = watched.peak_tasks.max(tasks);
    if let Some(limit) = plan.user_process_limit
        && (cgroup.is_none() || tasks as u64 * 2 >= limit)
    {
        watched.peak_tasks = watched.peak_tasks.max(recent_user_tasks(plan.uid));
    }
    let Some(cgroup) = cgroup else { return };
    let usage = cgroup.usage();
    let used = Duration::from_micros(usage.cpu_user_usec + usage.cpu_system_usec);
    if used >= plan.cpu_budget && watched.reason.is_none() {
        watched.reason = Some(StopReason::CpuTime);
        lane.kill_all();
    }
}

/// Until the lane's first process has exited (it is not reaped). Watched on its pidfd by the
/// event loop, so a running lane holds no thread: the blocking pool has at most 512, and
/// every dispatch needs one. Only where no pidfd can be had does a blocking thread wait.
async fn first_process_exit(lane: &SpawnedLane) {
    let Err(error) = exit_on_pidfd(lane).await else {
        return;
    };
    let leader = lane.process_group();
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(%error, pid = leader, "a lane's pidfd could not be watched: a thread of the blocking pool waits for its end instead (said once; at 512 such lanes, requests wait for one to end)");
    }
    let _ = tokio::task::spawn_blocking(move || dispatch_sandbox::wait_for_exit(leader)).await;
}

async fn exit_on_pidfd(lane: &SpawnedLane) -> std::io::Result<()> {
    // Deprecated because an arbitrary `AsRawFd` may close or change its fd while registered;
    // an `OwnedFd` owned by the `AsyncFd` can do neither, which is what its unsafe successor
    // asks the caller to promise (this crate forbids unsafe code).
    #[allow(deprecated)]
    let pidfd = AsyncFd::with_interest(lane.exit_fd()?, Interest::READABLE)?;
    loop {
        let mut ready = pidfd.readable().await?;
        if lane.has_exited()? {
            return Ok(());
        }
        ready.clear_ready();
    }
}

/// [`user_tasks`], walked at most once per sample period for each uid, whatever the number of
/// its lanes that ask (a walk reads every process's status on the machine).
fn recent_user_tasks(uid: u32) -> usize {
    static RECENT: std::sync::Mutex<BTreeMap<u32, (Instant, usize)>> =
        std::sync::Mutex::new(BTreeMap::new());
    let recent = |uid| {
        let known = RECENT.lock().unwrap_or_else(|p| p.into_inner());
        known
            .get(&uid)
            .filter(|(at, _)| at.elapsed() < SAMPLE_EVERY)
            .map(|(_, tasks)| *tasks)
    };
    if let Some(tasks) = recent(uid) {
        return tasks;
    }
    let tasks = user_tasks(uid);
    let mut known = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    known.retain(|_, (at, _)| at.elapsed() < SAMPLE_EVERY);
    known.insert(uid, (Instant::now(), tasks));
    tasks
}

/// Tasks (processes and threads) whose real uid is `uid`: what `RLIMIT_NPROC` counts. Read
/// only while a lane is near its process limit: it walks /proc.
fn user_tasks(uid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter_map(|status| {
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next()?.parse::<usize>().ok())
            };
            (field("Uid:")? == uid as usize).then(|| field("Threads:").unwrap_or(1))
        })
        .sum()
}

/// The judged end of a lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub state: JobState,
    pub detail: String,
    pub stopped_by: Option<String>,
    pub usage: ResourceUsage,
}

/// Decide the job's final state and say why, naming the limit that stopped it when one did.
pub fn outcome(end: &LaneEnd, watched: Watched, limits: &Limits, timeout_seconds: u64) -> Outcome {
    let status = end.status;
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "ended".to_owned(),
    };
    let limit = limit_reached(end, watched, limits);
    let (state, detail, stopped_by) = match (watched.reason, limit) {
        (Some(StopReason::Timeout), _) => (
            JobState::TimedOut,
            format!("timed out after {timeout_seconds} s and was stopped ({how})"),
            Some("wall_clock".to_owned()),
        ),
        (Some(StopReason::Cancel), _) => (JobState::Cancelled, format!("cancelled ({how})"), None),
        (Some(StopReason::Shutdown), _) => (
            JobState::Cancelled,
            format!("stopped because the helper shut down ({how})"),
            None,
        ),
        (_, Some((name, why))) if !status.success() || name == "cpu_time" => (
            JobState::Failed,
            format!("{why} ({how})"),
            Some(name.to_owned()),
        ),
        (_, Some((_, why))) => (JobState::Succeeded, format!("{how}; note: {why}"), None),
        (None, None) if status.success() => (JobState::Succeeded, how, None),
        (_, None) => (JobState::Failed, how, None),
    };
    let detail = match &end.cleanup_error {
        Some(error) => format!("{detail}; the lane's cgroup could not be removed: {error}"),
        None => detail,
    };
    Outcome {
        state,
        detail,
        stopped_by,
        usage: ResourceUsage {
            cpu_user_ms: end.usage.cpu_user_ms,
            cpu_system_ms: end.usage.cpu_system_ms,
            peak_memory_bytes: end.usage.peak_memory_bytes,
            peak_memory_whole_lane: end.usage.peak_memory_whole_lane,
        },
    }
}

/// Which limit the lane reached, if any, and a sentence a user can act on. Exact where a cgroup
/// controller or the helper counted it; inferred from the lane's peaks where an rlimit held it.
fn limit_reached(
    end: &LaneEnd,
    watched: Watched,
    limits: &Limits,
) -> Option<(&'static str, String)> {
    counted_limit(end, &watched, limits).or_else(|| inferred_limit(end, &watched, limits))
}

/// A limit the helper or a cgroup controller counted the lane reaching.
fn counted_limit(
    end: &LaneEnd,
    watched: &Watched,
    limits: &Limits,
) -> Option<(&'static str, String)> {
    let usage = &end.usage;
    let cpu_ms = usage.cpu_user_ms + usage.cpu_system_ms;
    if watched.reason == Some(StopReason::CpuTime) {
        return Some((
            "cpu_time",
            format!(
                "CPU time limit {} s reached: the lane used {:.1} s in all and was stopped",
                limits.cpu_seconds,
                cpu_ms as f64 / 1000.0
            ),
        ));
    }
    if let Some(kills) = usage.oom_kills.filter(|&k| k > 0) {
        let memory = bytes(limits.memory_bytes);
        return Some((
            "memory",
            format!(
                "memory limit {memory} reached: the kernel killed {kills} of its processes (memory.max)"
            ),
        ));
    }
    let refused = usage.pids_max_hits.filter(|&r| r > 0)?;
    Some((
        "processes",
        format!(
            "process limit {} reached: {refused} forks were refused (pids.max)",
            limits.processes
        ),
    ))
}

/// A limit an rlimit held, inferred from how the lane ended and its peaks.
fn inferred_limit(
    end: &LaneEnd,
    watched: &Watched,
    limits: &Limits,
) -> Option<(&'static str, String)> {
    let usage = &end.usage;
    let cpu_ms = usage.cpu_user_ms + usage.cpu_system_ms;
    // SIGKILL at the hard limit, SIGXCPU at the soft one (they are equal here).
    let killed_by_cpu = matches!(end.status.signal(), Some(9 | 24));
    if killed_by_cpu && cpu_ms + 500 >= limits.cpu_seconds * 1000 {
        return Some((
            "cpu_time",
            format!(
                "CPU time limit {} s reached by one process (RLIMIT_CPU)",
                limits.cpu_seconds
            ),
        ));
    }
    if usage.pids_max_hits.is_none() && watched.peak_tasks as u64 >= limits.processes {
        return Some((
            "processes",
            format!(
                "process limit {} reached: {} tasks of the lane's user ran at once and \
                 further forks failed (RLIMIT_NPROC)",
                limits.processes, watched.peak_tasks
            ),
        ));
    }
    if watched.memory_by_rlimit && usage.peak_memory_bytes * 10 >= limits.memory_bytes * 9 {
        return Some((
            "memory",
            format!(
                "memory limit {} reached, judging by its peak: a process grew to {} \
                 (RLIMIT_DATA holds the limit for each process; an allocation past it fails)",
                bytes(limits.memory_bytes),
                bytes_rounded(usage.peak_memory_bytes)
            ),
        ));
    }
    None
}

fn bytes_rounded(value: u64) -> String {
    format!("{} MiB", value >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispatch_sandbox::LaneUsage;
    use std::process::ExitStatus;

    fn end(raw_status: i32, usage: LaneUsage) -> LaneEnd {
        LaneEnd {
            status: ExitStatus::from_raw(raw_status),
            usage,
            cleanup_error: None,
        }
    }

    fn limits() -> Limits {
        Limits {
            processes: 64,
            memory_bytes: 256 << 20,
            cpu_seconds: 10,
            ..Limits::default()
        }
    }

    const EXIT_1: i32 = 1 << 8;

    #[test]
    fn a_clean_exit_succeeds_and_reports_its_cost() {
        let usage = LaneUsage {
            cpu_user_ms: 120,
            cpu_system_ms: 30,
            peak_memory_bytes: 8 << 20,
            ..LaneUsage::default()
        };
        let judged = outcome(&end(0, usage), Watched::default(), &limits(), 60);
        assert_eq!(judged.state, JobState::Succeeded);
        assert_eq!(judged.detail, "exited with status 0");
        assert_eq!(judged.stopped_by, None);
        assert_eq!(judged.usage.cpu_user_ms, 120);
        assert_eq!(judged.usage.peak_memory_bytes, 8 << 20);
    }

    #[test]
    fn each_limit_is_named_when_it_stopped_the_lane() {
        let cases = [
            (
                LaneUsage {
                    oom_kills: Some(2),
                    ..LaneUsage::default()
                },
                Watched::default(),
                "memory",
                "memory limit 256 MiB reached",
            ),
            (
                LaneUsage {
                    pids_max_hits: Some(40),
                    ..LaneUsage::default()
                },
                Watched::default(),
                "processes",
                "process limit 64 reached: 40 forks were refused (pids.max)",
            ),
            (
                LaneUsage::default(),
                Watched {
                    reason: None,
                    peak_tasks: 64,
                    ..Watched::default()
                },
                "processes",
                "(RLIMIT_NPROC)",
            ),
            (
                LaneUsage {
                    peak_memory_bytes: 250 << 20,
                    ..LaneUsage::default()
                },
                Watched {
                    memory_by_rlimit: true,
                    ..Watched::default()
                },
                "memory",
                "RLIMIT_DATA holds the limit for each process",
            ),
        ];
        for (usage, watched, limit, words) in cases {
            let judged = outcome(&end(EXIT_1, usage), watched, &limits(), 60);
            assert_eq!(judged.state, JobState::Failed, "{judged:?}");
            assert_eq!(judged.stopped_by.as_deref(), Some(limit), "{judged:?}");
            assert!(judged.detail.contains(words), "{judged:?}");
            assert!(
                judged.detail.ends_with("(exited with status 1)"),
                "{judged:?}"
            );
        }
    }

    #[test]
    fn the_cpu_budget_fails_the_lane_even_if_it_exits_cleanly_when_killed() {
        let usage = LaneUsage {
            cpu_user_ms: 10_400,
            ..LaneUsage::default()
        };
        let watched = Watched {
            reason: Some(StopReason::CpuTime),
            peak_tasks: 3,
            ..Watched::default()
        };
        let judged = outcome(&end(9, usage), watched, &limits(), 60);
        assert_eq!(judged.state, JobState::Failed);
        assert_eq!(judged.stopped_by.as_deref(), Some("cpu_time"));
        assert!(
            judged.detail.starts_with("CPU time limit 10 s reached"),
            "{judged:?}"
        );
        // One process killed at its own RLIMIT_CPU, without a cgroup.
        let alone = LaneUsage {
            cpu_user_ms: 9_900,
            ..LaneUsage::default()
        };
        let judged = outcome(&end(9, alone), Watched::default(), &limits(), 60);
        assert!(judged.detail.contains("RLIMIT_CPU"), "{judged:?}");
    }

    #[test]
    fn stops_asked_for_keep_their_state_and_a_lane_under_its_limits_is_not_blamed() {
        let timeout = Watched {
            reason: Some(StopReason::Timeout),
            peak_tasks: 1,
            ..Watched::default()
        };
        let judged = outcome(&end(15, LaneUsage::default()), timeout, &limits(), 60);
        assert_eq!(judged.state, JobState::TimedOut);
        assert_eq!(judged.stopped_by.as_deref(), Some("wall_clock"));
        let cancel = Watched {
            reason: Some(StopReason::Cancel),
            peak_tasks: 1,
            ..Watched::default()
        };
        let judged = outcome(&end(15, LaneUsage::default()), cancel, &limits(), 60);
        assert_eq!(judged.state, JobState::Cancelled);
        let modest = LaneUsage {
            peak_memory_bytes: 100 << 20,
            ..LaneUsage::default()
        };
        let judged = outcome(
            &end(EXIT_1, modest),
            Watched {
                reason: None,
                peak_tasks: 5,
                ..Watched::default()
            },
            &limits(),
            60,
        );
        assert_eq!((judged.state, judged.stopped_by), (JobState::Failed, None));
    }
}
