//! A lane handed to a spawner thread before its job's record is durable. The spawner sets it
//! up (clone, cgroup, identity, job directory, Landlock, seccomp) while the record is synced,
//! and holds it at its gate (`dispatch_sandbox::LaneGate`), just before its exec, until
//! `launch` lets it run, or gives it up: then it exits without running anything.

use super::*;
use dispatch_sandbox::{LaneGate, PreparedLane, SandboxError, SpawnedLane};
use std::path::PathBuf;
use tokio::sync::oneshot;

pub(super) struct HeldLane {
    gate: LaneGate,
    started: oneshot::Receiver<Result<SpawnedLane, SandboxError>>,
    /// The job directory its set-up makes, and its owner: removed if the lane never runs.
    work_dir: PathBuf,
    owner: (u32, u32),
}

impl Helper {
    /// Hand `prepared` to a spawner thread now, held before its exec.
    pub(super) fn spawn_held(
        &self,
        mut prepared: PreparedLane,
        work_dir: PathBuf,
        owner: (u32, u32),
    ) -> Result<HeldLane, SandboxError> {
        let gate = prepared.hold_before_exec()?;
        let (done, started) = oneshot::channel();
        self.spawner.spawn_then(prepared, move |outcome| {
            // Nobody waits any more (the runtime is shutting down): ending the lane blocks, so
            // not on the spawner thread.
            if let Err(Ok(lane)) = done.send(outcome) {
                std::thread::spawn(move || drop(lane));
            }
        });
        Ok(HeldLane {
            gate,
            started,
            work_dir,
            owner,
        })
    }
}

impl HeldLane {
    /// Let the lane exec; its spawn's outcome, answered once it has exec'd or a step failed.
    pub(super) async fn release(self) -> Result<SpawnedLane, SandboxError> {
        let HeldLane { gate, started, .. } = self;
        if let Err(error) = gate.open() {
            // Not told, so it will not run: its spawn fails at the gate, and says so below.
            tracing::error!(%error, "could not let a held lane run");
        }
        started.await.unwrap_or(Err(SandboxError::SpawnerGone))
    }

    /// Give the lane up: it exits at its gate, having run nothing, and the directory its
    /// set-up made goes.
    pub(super) async fn abandon(self, helper: &Helper) {
        let HeldLane {
            gate,
            started,
            work_dir,
            owner: (uid, gid),
        } = self;
        drop(gate);
        if let Ok(Ok(lane)) = started.await {
            // Cannot be (only the go byte lets it exec), but if it ran it does not run on.
            tracing::error!("a lane given up at its gate was started; ending it");
            let _ = tokio::task::spawn_blocking(move || drop(lane)).await;
        }
        helper.remove_dir_as(work_dir, uid, gid).await;
    }
}
