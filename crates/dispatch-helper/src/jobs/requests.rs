//! The requests that read or change a job: status, result (waiting for the end), list, cancel
//! and delete. Each checks ownership first; another uid's job is unknown to the caller.

use super::*;

impl Helper {
    /// A job's summary; while its lane runs, with the output so far (the final tails are the
    /// result's).
    pub fn status(
        &self,
        peer: &Peer,
        handle: &str,
        output_from: Option<OutputOffsets>,
    ) -> Result<JobView, ErrorReply> {
        let mut view = self.owned(peer, handle)?.view(Detail::Summary);
        self.add_live_output(&mut view, output_from);
        Ok(view)
    }

    /// The output of a job's running lane so far, from the given offsets.
    fn add_live_output(&self, view: &mut JobView, from: Option<OutputOffsets>) {
        if view.state.is_terminal() {
            return;
        }
        let Some(live) = self.live_output(&view.handle) else {
            return;
        };
        let (stdout, stderr) = live.tails(from, false);
        (view.stdout, view.stderr) = (Some(stdout), Some(stderr));
    }

    pub async fn result(
        &self,
        peer: &Peer,
        handle: &str,
        wait_ms: u32,
        output_from: Option<OutputOffsets>,
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
            // Output tails live on disk only. A record deleted or pruned meanwhile is answered
            // from memory; one that cannot be read is an error, not a result without output.
            match self.store.load_async(handle).await {
                Ok(full) => return Ok(stored_view(&full, output_from)),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    let message = format!("could not read the record of {handle}: {error}");
                    return Err(reply(ErrorKind::Internal, message));
                }
            }
        }
        let mut view = record.view(Detail::Full);
        self.add_live_output(&mut view, output_from);
        Ok(view)
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
        // Newest first: the table keeps each client's jobs in request order.
        let matching: Vec<&JobRecord> = jobs
            .owned_by(peer.identity.uid)
            .rev()
            .map(|e| &e.record)
            .filter(|r| r.owner_uid == peer.identity.uid)
            .filter(|r| {
                matcher.as_ref().is_none_or(|m| {
                    m.is_match(r.job.description.as_deref().unwrap_or(&r.job.task_preview))
                })
            })
            .collect();
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
        if self.cancel_if_waiting(peer, handle).await? {
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
        // Back in line meanwhile (a stop interrupted its turn before this cancel reached it):
        // taken out of line, now or once that turn has ended.
        if !self.cancel_if_waiting(peer, handle).await? {
            let grace = self.settings().grace() + Duration::from_secs(3);
            let mut receiver = receiver;
            let _ = tokio::time::timeout(grace, receiver.wait_for(|done| *done)).await;
            self.cancel_if_waiting(peer, handle).await?;
        }
        Ok(self.owned(peer, handle)?.view(Detail::Summary))
    }

    /// Cancel `handle` if it is waiting in line: whether it was.
    async fn cancel_if_waiting(
        self: &Arc<Self>,
        peer: &Peer,
        handle: &str,
    ) -> Result<bool, ErrorReply> {
        if self.owned(peer, handle)?.job.state != JobState::Queued {
            return Ok(false);
        }
        self.cancel_queued(handle).await
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
        // The removal and its `deleted` record are one journal line: a deletion that cannot be
        // audited is not made.
        let deleted = AuditEvent {
            event: "deleted",
            peer: Some(peer.identity),
            claimed_client: peer.claimed_client.clone(),
            handle: Some(handle.to_owned()),
            outcome: "deleted".into(),
            ..Default::default()
        };
        let removal = Change::Remove(handle.to_owned());
        if let Err(error) =
            commit::tied(&self.audit, &self.store, deleted, removal, Neither, false).await
        {
            // Not deleted after all: the job stays listed, as its record does.
            self.jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(entry);
            let what = match error {
                CommitError::Audit(_) => "its deletion could not be audited",
                CommitError::Journal(_) => "its record could not be removed",
            };
            return Err(reply(
                ErrorKind::Internal,
                format!("{handle} was not deleted: {what}: {error}"),
            ));
        }
        self.remove_work_dir(&entry.record).await;
        Ok(handle.to_owned())
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
    let optional = [
        &view.description,
        &view.started_at,
        &view.finished_at,
        &view.stopped_by,
        &view.summary,
    ];
    let argv: usize = view.argv.iter().flatten().map(|a| a.len() + 5).sum();
    let sandbox = view.sandbox.as_ref().map_or(0, |s| {
        let limits: usize = s
            .limits
            .iter()
            .map(|l| l.limit.len() + l.value.len() + l.mechanism.len() + 15)
            .sum();
        s.landlock.len() + s.containment.len() + s.groups.len() * 5 + limits + 64
    });
    strings.iter().map(|s| s.len() + 5).sum::<usize>()
        + optional
            .iter()
            .flat_map(|s| s.as_ref())
            .map(|s| s.len() + 5)
            .sum::<usize>()
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

/// A finished job's stored record as a full view, its output from `output_from` on.
fn stored_view(full: &JobRecord, output_from: Option<OutputOffsets>) -> JobView {
    let mut view = full.view(Detail::Full);
    if let Some(from) = output_from {
        let cut = |tail: &mut Option<dispatch_proto::OutputTail>, from: u64| {
            *tail = tail.as_ref().map(|t| crate::output::stored_from(t, from));
        };
        cut(&mut view.stdout, from.stdout);
        cut(&mut view.stderr, from.stderr);
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The list budget relies on it: a view's estimate is never below its encoded size, with
    /// every field that has text at its longest (multibyte, where a client may choose it).
    #[test]
    fn a_views_estimate_is_at_least_its_encoded_size() {
        let long = |n: usize| "✓".repeat(n);
        let limit = serde_json::json!({
            "limit": "processes", "value": "256",
            "mechanism": "RLIMIT_NPROC (counts every process of the lane's user, across its lanes)"
        });
        let view: JobView = serde_json::from_value(serde_json::json!({
            "handle": format!("d-{}", "0".repeat(32)), "orguser": long(64), "repo": long(64),
            "github": long(128), "unix_user": "someone", "description": long(500),
            "task_preview": long(120), "task_sha256": "0".repeat(64), "state": "Succeeded",
            "requested_at": "2026-12-01T03:00:00.000Z", "started_at": "2026-12-01T03:00:00.000Z",
            "finished_at": "2026-12-01T03:00:01.000Z", "exit_code": 0, "signal": null,
            "detail": long(200), "argv": [long(300), long(8000)], "stdout": null, "stderr": null,
            "sandbox": {
                "uid": 1000, "gid": 1000, "groups": [1000, 27, 100], "landlock_abi": 7,
                "landlock": long(200), "seccomp": true, "no_new_privs": true, "same_uid": false,
                "containment": long(200), "limits": vec![limit; 8]
            },
            "usage": {"cpu_user_ms": 1, "cpu_system_ms": 1, "peak_memory_bytes": 1,
                      "peak_memory_whole_lane": true},
            "stopped_by": "wall_clock", "summary": long(500)
        }))
        .unwrap();
        let encoded = dispatch_proto::encode_frame(&view, dispatch_proto::FrameLimit::RESPONSE)
            .unwrap()
            .len();
        assert!(
            approximate_size(&view) >= encoded,
            "estimated {} for {encoded} bytes",
            approximate_size(&view)
        );
    }
}
