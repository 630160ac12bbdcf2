//! The long-lived threads every lane is forked from.
//!
//! `PR_SET_PDEATHSIG` is tied to the thread that forked the child: if that thread exits (a
//! blocking-pool thread retiring after idling, say) every lane it started would be killed. So
//! all forks happen on a fixed pool of threads that live as long as the spawner (the process).
//! More than one, so a slow fork+exec does not hold up every other dispatch.

use crate::child::{ChildPlan, ExecImage, decode_spawn_error, install};
use crate::{Enforcement, PreparedLane, SandboxError};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, mpsc};

pub struct SpawnedLane {
    /// The lane guard; its pid is the lane's process group id.
    pub child: Child,
    pub enforcement: Enforcement,
}

impl SpawnedLane {
    pub fn process_group(&self) -> i32 {
        self.child.id() as i32
    }
}

type Reply = mpsc::SyncSender<Result<SpawnedLane, SandboxError>>;

pub struct LaneSpawner {
    requests: Mutex<mpsc::Sender<(PreparedLane, Reply)>>,
}

impl LaneSpawner {
    pub fn start(threads: usize) -> std::io::Result<LaneSpawner> {
        let (tx, rx) = mpsc::channel::<(PreparedLane, Reply)>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for index in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("lane-spawner-{index}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next request, not while forking.
                        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((lane, reply)) = next else { return };
                        let _ = reply.send(spawn_now(lane));
                    }
                })?;
        }
        Ok(LaneSpawner {
            requests: Mutex::new(tx),
        })
    }

    /// Fork and exec the lane on the spawner thread. Blocks until exec succeeded or failed.
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

fn spawn_now(lane: PreparedLane) -> Result<SpawnedLane, SandboxError> {
    let plan = &lane.plan;
    // std provides the fork, the stdio plumbing and the error pipe; the lane's own argv and
    // environment go through `ExecImage` (std never execs: the guard does, see child.rs).
    let mut command = Command::new(&plan.argv[0]);
    command
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

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
    install(
        &mut command,
        ChildPlan {
            change_uid: plan.change_uid,
            uid: identity.uid,
            gid: identity.gid,
            groups: identity.groups.clone(),
            rlimits: rlimits
                .into_iter()
                .map(|(resource, value)| {
                    (
                        resource,
                        libc::rlimit {
                            rlim_cur: value,
                            rlim_max: value,
                        },
                    )
                })
                .collect(),
            helper_pid: std::process::id() as libc::pid_t,
            work_dir,
            landlock_fd: lane.landlock.as_ref().map(|fd| fd.as_raw_fd()),
            seccomp: lane.seccomp.clone(),
            exec,
            lane_stack: vec![0u8; 64 * 1024],
        },
    );
    let child = command.spawn().map_err(|error| {
        let (step, error) = decode_spawn_error(error);
        SandboxError::ChildStep { step, error }
    })?;
    // The ruleset fd closes here, in the helper, now that the child has used it.
    drop(lane.landlock);
    Ok(SpawnedLane {
        child,
        enforcement: lane.enforcement,
    })
}
