//! A started lane's life on the helper's side: watched until it ends, judged, persisted and
//! audited, its slot released; finished records pruned per client; and every lane stopped at
//! shutdown.

use super::*;

/// How long a stopping helper waits for job directories being removed.
const REMOVALS_AT_STOP: Duration = Duration::from_secs(30);

impl Helper {
    pub(super) async fn supervise(
        self: Arc<Self>,
        handle: String,
        owner_uid: u32,
        mut lane: SpawnedLane,
        mut stop: mpsc::UnboundedReceiver<StopReason>,
    ) {
        let settings = self.settings();
        let live = LiveOutput::new(settings.file.limits.output_tail_bytes);
        self.show_live_output(&handle, Some(live.clone()));
        let readers = spool_output(&mut lane, &live);
        let controllers = self.spawner.containment().controllers();
        let plan = lane::WatchPlan::new(&settings, controllers, lane.enforcement.uid);
        let watched = lane::watch(&lane, plan, &mut stop).await;
        // Ends everything the lane left running (its cgroup, its group), reaps it, and counts.
        let ended = tokio::task::spawn_blocking(move || lane.wait()).await;
        // The lane's capacity is free as soon as its processes are gone.
        if let Some(record) = self.record(&handle) {
            self.release(owner_uid, &lane_key(&record.job));
        }
        finish_reading(readers).await;
        let (stdout, stderr) = live.tails(None, true);
        let Some(mut record) = self.record(&handle) else {
            return;
        };
        record.job.finished_at = Some(now_rfc3339());
        record.job.stdout = Some(stdout);
        record.job.stderr = Some(stderr);
        record.pgid = None;
        judge(&mut record, ended, watched, &settings);
        record.job.summary = record.job.output_summary();
        let event = match record.job.state {
            JobState::TimedOut => "timed_out",
            JobState::Cancelled => "cancelled",
            _ => "finished",
        };
        self.persist_and_audit_finish(&record, event).await;
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(mut entry) = jobs.get_mut(&handle) {
                record.job.stdout = None;
                record.job.stderr = None;
                entry.record = record;
                entry.stop = None;
                entry.live = None;
                entry.finished.send_replace(true);
            }
        }
        self.prune_finished(owner_uid).await;
    }

    /// A job's final record with its audit record (`event`), in one journal line: a crash
    /// keeps both or neither. An end that cannot be audited (the log has failed, and every
    /// dispatch is refused until it is repaired) is still saved by itself: what the lane did
    /// has happened, and a record of it is worth more than both-or-neither.
    pub(super) async fn persist_and_audit_finish(&self, record: &JobRecord, event: &'static str) {
        let handle = &record.job.handle;
        let ended = end_event(record, event);
        let saved = Change::Save(Box::new(record.clone()));
        match commit::tied(&self.audit, &self.store, ended, saved, AuditAlone, false).await {
            Ok(()) => {}
            Err(CommitError::Audit(error)) => {
                tracing::error!(%error, %handle, "could not audit a job's end; saving it unaudited");
                if let Err(error) = self.store.save_in_order(record).await {
                    tracing::error!(%error, %handle, "could not persist a finished job");
                }
            }
            Err(CommitError::Journal(error)) => {
                tracing::error!(%error, %handle, "could not persist a finished job");
            }
        }
    }

    pub(super) async fn audit_finish(&self, record: &JobRecord, event: &'static str) {
        if let Err(error) = self.audit.append(end_event(record, event)).await {
            tracing::error!(%error, handle = %record.job.handle, "could not audit a job's end");
        }
    }

    /// A job's directory goes with its record (removed as its lane user), unless the
    /// configuration keeps them.
    pub(super) async fn remove_work_dir(&self, record: &JobRecord) {
        let (Some(path), Some(sandbox)) = (record.work_dir.clone(), record.job.sandbox.as_ref())
        else {
            return;
        };
        if self.settings().file.keep_work_dirs {
            return;
        }
        self.remove_dir_as(path, sandbox.uid, sandbox.gid).await;
    }

    /// Remove a job's directory as its lane user, at most `CONCURRENT_REMOVALS` at a time.
    pub(super) async fn remove_dir_as(&self, path: std::path::PathBuf, uid: u32, gid: u32) {
        // Held by the removal itself, even if nobody waits for it any more. The semaphore is
        // never closed, so a turn always comes.
        let Ok(turn) = self.removals.clone().acquire_owned().await else {
            return;
        };
        let removed = tokio::task::spawn_blocking(move || {
            let removed = crate::workdirs::remove(&path, uid, gid).map_err(|e| (path, e));
            drop(turn);
            removed
        })
        .await;
        if let Ok(Err((path, error))) = removed {
            tracing::warn!(%error, path = %path.display(), "could not remove a job's directory");
        }
    }

    /// Keep at most `max_finished_jobs_per_client` finished records per client: the oldest go,
    /// and each removal is audited.
    pub(super) async fn prune_finished(&self, owner_uid: u32) {
        let keep = self.settings().file.limits.max_finished_jobs_per_client;
        // Taken out of the table at once: prunes that run side by side (every lane's end
        // starts one) each take their own, and none does the others' work again. Only the
        // excess is read, from the client's finished jobs in order.
        let doomed: Vec<JobEntry> = {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let excess = jobs.finished_beyond(owner_uid, keep);
            excess.iter().filter_map(|h| jobs.remove(h)).collect()
        };
        // Nobody waits for retention: its lines share the next commit (or are synced by
        // themselves within `commit::SOON`), all queued at once, so that many (after a reload
        // lowered the limit) do not each wait for company. Each removal is one line with its
        // `pruned` record. The directories go meanwhile, while the client that ended the lane
        // has not yet sent its next dispatch: a crash before the commit brings back a record
        // whose directory is gone (pruned again later), never a directory without a record.
        let removals: Vec<_> = doomed
            .into_iter()
            .map(|entry| {
                let handle = entry.record.job.handle.clone();
                let pruned = pruned_event(handle.clone(), keep, owner_uid);
                let removal = Change::Remove(handle);
                let removed =
                    commit::tied(&self.audit, &self.store, pruned, removal, Neither, true);
                (entry, removed)
            })
            .collect();
        for (entry, _) in &removals {
            self.remove_work_dir(&entry.record).await;
        }
        for (entry, removed) in removals {
            if let Err(error) = removed.await {
                let handle = &entry.record.job.handle;
                tracing::error!(%error, %handle, "could not prune a finished job; it stays listed, without its directory");
                self.jobs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(entry);
            }
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
        // after spawning, and a queued one taking its turn starts or goes back in line; give
        // them a moment to appear in the snapshot below.
        let settle = tokio::time::Instant::now() + Duration::from_secs(5);
        let unsettled = || {
            let claimed = self
                .capacity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .total;
            claimed > self.registered_running() || self.turns.load(Ordering::SeqCst) > 0
        };
        while unsettled() && tokio::time::Instant::now() < settle {
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
        // Job directories whose records are gone are removed before the helper exits: nothing
        // would find them again. The semaphore is first come, first served, so all of them
        // (those removing and those waiting) are done once every permit can be had.
        let removed = self.removals.acquire_many(super::CONCURRENT_REMOVALS);
        if tokio::time::timeout(REMOVALS_AT_STOP, removed)
            .await
            .is_err()
        {
            tracing::warn!("job directories still being removed at stop are left behind");
        }
    }
}

/// The audit record of a job's end.
pub(super) fn end_event(record: &JobRecord, event: &'static str) -> AuditEvent {
    AuditEvent {
        event,
        handle: Some(record.job.handle.clone()),
        orguser: Some(record.job.orguser.clone()),
        repo: Some(record.job.repo.clone()),
        outcome: record.job.state.as_str().into(),
        detail: Some(record.job.detail.clone()),
        ..Default::default()
    }
}

/// Read the lane's stdout and stderr into its live output, each on a task of its own.
fn spool_output(
    lane: &mut SpawnedLane,
    live: &LiveOutput,
) -> [Option<tokio::task::JoinHandle<()>>; 2] {
    [
        lane.stdout
            .take()
            .and_then(|s| tokio::process::ChildStdout::from_std(s).ok())
            .map(|s| tokio::spawn(spool_stream(s, live.stdout.clone()))),
        lane.stderr
            .take()
            .and_then(|s| tokio::process::ChildStderr::from_std(s).ok())
            .map(|s| tokio::spawn(spool_stream(s, live.stderr.clone()))),
    ]
}

/// Wait for the output readers, each a bounded time.
async fn finish_reading(readers: [Option<tokio::task::JoinHandle<()>>; 2]) {
    for reader in readers.into_iter().flatten() {
        // A process outside any cgroup can hold a pipe open forever: a bounded wait, and
        // the tail is what was read by then.
        let mut reader = reader;
        if tokio::time::timeout(Duration::from_secs(2), &mut reader)
            .await
            .is_err()
        {
            reader.abort();
        }
    }
}

/// The lane's outcome in its record: state, exit, what stopped it, and what it used.
fn judge(
    record: &mut JobRecord,
    ended: Result<std::io::Result<dispatch_sandbox::LaneEnd>, tokio::task::JoinError>,
    watched: lane::Watched,
    settings: &Settings,
) {
    let limits = settings.file.sandbox.limits;
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
}

/// The `pruned` record of a job retention removed.
fn pruned_event(handle: String, keep: usize, owner_uid: u32) -> AuditEvent {
    AuditEvent {
        event: "pruned",
        handle: Some(handle),
        outcome: "deleted".into(),
        detail: Some(format!(
            "more than {keep} finished dispatches were kept for uid {owner_uid}"
        )),
        ..Default::default()
    }
}
