//! A lane handed to a spawner thread before its job's record is durable. The spawner clones
//! it and starts its set-up while the record is synced, and it waits at its gate
//! (`dispatch_sandbox::LaneGate`), before it takes its user's identity, until `launch` lets it
//! run, or gives it up: then it exits without making or running anything.

use super::*;
use dispatch_sandbox::{LaneGate, PreparedLane, SandboxError, SpawnedLane};
use tokio::sync::oneshot;

pub(super) struct HeldLane {
    gate: LaneGate,
    started: oneshot::Receiver<Result<SpawnedLane, SandboxError>>,
}

impl Helper {
    /// Hand `prepared` to a spawner thread now, held at its gate.
    pub(super) fn spawn_held(&self, mut prepared: PreparedLane) -> Result<HeldLane, SandboxError> {
        let gate = prepared.hold_before_exec()?;
        let (done, started) = oneshot::channel();
        self.spawner.spawn_then(prepared, move |outcome| {
            // Nobody waits any more (the runtime is shutting down): ending the lane blocks, so
            // not on the spawner thread.
            if let Err(Ok(lane)) = done.send(outcome) {
                std::thread::spawn(move || drop(lane));
            }
        });
        Ok(HeldLane { gate, started })
    }
}

impl HeldLane {
    /// Let the lane go on; its spawn's outcome, answered once it has exec'd or a step failed.
    pub(super) async fn release(self) -> Result<SpawnedLane, SandboxError> {
        let HeldLane { gate, started } = self;
        if let Err(error) = gate.open() {
            // Gone already (its spawn failed before the clone, and says why below), or never
            // told, so it will not run: its spawn fails at the gate.
            tracing::debug!(%error, "could not let a held lane run");
        }
        started.await.unwrap_or(Err(SandboxError::SpawnerGone))
    }

    /// Give the lane up: it exits at its gate, having made and run nothing.
    pub(super) async fn abandon(self) {
        let HeldLane { gate, started } = self;
        drop(gate);
        if let Ok(Ok(lane)) = started.await {
            // Cannot be (only the go byte lets it on), but if it ran it does not run on.
            tracing::error!("a lane given up at its gate was started; ending it");
            let _ = tokio::task::spawn_blocking(move || drop(lane)).await;
        }
    }
}
