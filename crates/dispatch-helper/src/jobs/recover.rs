//! The job table at start: every record read back, a job left running by a previous helper
//! marked lost (its stale group killed if it is still the same process), and waiting ones put
//! back in line.

use super::*;

impl Helper {
    /// Load the job store; every record left `running` by a previous helper becomes `lost`.
    pub async fn recover(&self) -> Result<Vec<String>, String> {
        let (records, warnings) = self
            .store
            .load_all()
            .map_err(|e| format!("cannot read the job store: {e}"))?;
        let mut jobs = JobTable::default();
        // Every lost job's record (with its audit record) is queued before any is awaited, so
        // a restart that lost a thousand lanes commits them together instead of one by one.
        let mut lost = Vec::new();
        for mut record in records {
            if record.job.state == JobState::Running {
                kill_stale_group(&record);
                mark_lost(&mut record);
                // One line with its `lost` record: a start that cannot audit it changes
                // nothing, and the next start finds the job running and tries again.
                let event = lost_event(&record);
                let saved = Change::Save(Box::new(record.clone()));
                let saved = commit::tied(&self.audit, &self.store, event, saved, Neither, false);
                lost.push((record.job.handle.clone(), saved));
            }
            record.job.stdout = None;
            record.job.stderr = None;
            // A queued job gets its stop channel back: a cancel during its start must reach it.
            let stop = (record.job.state == JobState::Queued).then(mpsc::unbounded_channel);
            jobs.insert(JobEntry::new(record, stop));
        }
        for (handle, saved) in lost {
            saved.await.map_err(|e| match e {
                CommitError::Audit(e) => format!("cannot audit lost job {handle}: {e}"),
                CommitError::Journal(e) => format!("cannot record lost job {handle}: {e}"),
            })?;
        }
        self.queue_again(&jobs);
        *self.jobs.lock().unwrap_or_else(|p| p.into_inner()) = jobs;
        Ok(warnings)
    }
}

impl Helper {
    /// What waited for a slot waits again, oldest first (not bounded: it was all accepted).
    fn queue_again(&self, jobs: &JobTable) {
        let mut queued: Vec<&JobRecord> = jobs
            .values()
            .map(|e| &e.record)
            .filter(|r| r.job.state == JobState::Queued)
            .collect();
        queued.sort_by(|a, b| a.job.requested_at.cmp(&b.job.requested_at));
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
}

fn mark_lost(record: &mut JobRecord) {
    record.job.state = JobState::Lost;
    record.job.finished_at = Some(now_rfc3339());
    record.job.detail =
        "lost: the helper restarted while the lane was running; its outcome is unknown".into();
    record.pgid = None;
}

fn lost_event(record: &JobRecord) -> AuditEvent {
    AuditEvent {
        event: "lost",
        handle: Some(record.job.handle.clone()),
        orguser: Some(record.job.orguser.clone()),
        repo: Some(record.job.repo.clone()),
        outcome: "lost".into(),
        detail: Some(record.job.detail.clone()),
        ..Default::default()
    }
}

pub(super) fn process_start_ticks(pid: i32) -> Option<u64> {
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
