//! From a dispatch request to a running lane, step by step: check (decide and plan); admit (a
//! slot now, a place in the queue, or a refusal); audit the acceptance and save the record in
//! one commit, preparing the lane and starting its set-up as far as its gate meanwhile; let it
//! run; supervise. A queued dispatch is checked
//! and prepared again, against the settings of the moment, when a slot frees
//! ([`Helper::start_queued`]).

use super::held::HeldLane;
use super::recover::process_start_ticks;
use super::*;
use crate::config::LimitsConfig;
use crate::queue::Waiting;
use crate::store::QueuedRequest;

/// What admission decided.
enum Admitted {
    /// A lane slot is claimed for it.
    Now,
    /// It waits for one (it fits in the queue).
    Queued,
}

impl Capacity {
    fn may_claim(&self, uid: u32, lane: &str, limits: &LimitsConfig) -> Result<(), String> {
        if self.total >= limits.max_running_jobs {
            return Err(format!(
                "{} lanes are running (the limit)",
                limits.max_running_jobs
            ));
        }
        let mine = self.by_uid.get(&uid).copied().unwrap_or(0);
        if mine >= limits.max_running_jobs_per_client {
            return Err(format!("this client has {mine} running (its limit)"));
        }
        let on_lane = self.by_lane.get(lane).copied().unwrap_or(0);
        if on_lane >= limits.max_running_jobs_per_lane {
            return Err(format!("lane {lane} has {on_lane} running (its limit)"));
        }
        Ok(())
    }

    fn take(&mut self, uid: u32, lane: &str) {
        self.total += 1;
        *self.by_uid.entry(uid).or_default() += 1;
        *self.by_lane.entry(lane.to_owned()).or_default() += 1;
    }

    fn give_back(&mut self, uid: u32, lane: &str) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.by_uid.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_uid.remove(&uid);
            }
        }
        if let Some(n) = self.by_lane.get_mut(lane) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_lane.remove(lane);
            }
        }
    }
}

impl Helper {
    pub async fn dispatch(
        self: &Arc<Self>,
        peer: &Peer,
        request: DispatchRequest,
    ) -> Result<JobView, ErrorReply> {
        let settings = self.settings();
        let handle = new_handle();
        let owner = peer.identity.uid;
        let Checked {
            decision,
            lane: planned,
        } = match check(&settings, peer, &request, &handle).await {
            Ok(checked) => checked,
            Err(reason) => return Err(self.rejected(peer, &request, reason).await),
        };
        let enforcement = &planned.enforcement;
        let mut record = new_record(peer, &request, &handle, decision, enforcement, &settings);
        let lane = lane_key(&record.job);
        // Decided before the audit record, so that a refused dispatch is never "accepted".
        let admitted = match self.admit(owner, &lane, &settings.file.limits) {
            Ok(admitted) => admitted,
            Err(why) => {
                return Err(self
                    .rejected(peer, &request, reply(ErrorKind::Busy, why))
                    .await);
            }
        };
        if let Admitted::Queued = admitted {
            record.job.state = JobState::Queued;
            record.job.detail = "queued: waiting for a lane slot".into();
            record.queued = Some(QueuedRequest {
                task: request.task.clone(),
            });
            self.queued_env
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(handle.to_string(), request.lane_env.clone());
        }
        let accepted = accepted_event(peer, &record, enforcement);
        match admitted {
            Admitted::Now => {
                self.accept_and_launch(&settings, record, planned, accepted)
                    .await
            }
            Admitted::Queued => self.enqueue(record, accepted).await,
        }
    }

    /// The acceptance and the job's record are committed together (both or neither), and the
    /// lane is prepared, cloned and set up as far as its gate while they are synced: part of
    /// the cost of a start overlaps the wait for the disk. The lane runs only once both are
    /// done.
    ///
    /// `settings` are the ones the dispatch was checked and its acceptance audited against:
    /// the lane is prepared under them too, whatever a reload changed meanwhile.
    async fn accept_and_launch(
        self: &Arc<Self>,
        settings: &Arc<Settings>,
        mut record: JobRecord,
        lane: PlannedLane,
        accepted: AuditEvent,
    ) -> Result<JobView, ErrorReply> {
        let durable = self.commit_tied(accepted, &record);
        let (durable, held) = tokio::join!(durable, self.prepare_held(settings, lane));
        if let Err(refusal) = self.record_before_start(&mut record, durable).await {
            if let Ok(held) = held {
                held.abandon().await;
            }
            return Err(refusal);
        }
        match held {
            Ok(held) => self.launch(record, held, None).await,
            Err(refusal) => {
                let why = refusal.message.clone();
                Err(self.never_ran(record, refusal.kind, why.clone(), why).await)
            }
        }
    }

    /// Prepare the lane and hand it to a spawner thread, held before its exec.
    async fn prepare_held(
        &self,
        settings: &Arc<Settings>,
        lane: PlannedLane,
    ) -> Result<HeldLane, ErrorReply> {
        let prepared = prepare(settings, lane).await?;
        self.spawn_held(prepared)
            .map_err(|error| preparation_failed(&error))
    }

    /// An accepted and recorded job whose lane never ran (it could not be prepared, or did not
    /// start): its slot goes back, its record says `detail`, the audit log says so, and the
    /// caller is told `why`.
    async fn never_ran(
        self: &Arc<Self>,
        mut record: JobRecord,
        kind: ErrorKind,
        detail: String,
        why: String,
    ) -> ErrorReply {
        self.release(record.owner_uid, &lane_key(&record.job));
        record.job.state = JobState::Failed;
        record.job.finished_at = Some(now_rfc3339());
        record.job.detail = detail;
        self.persist_and_audit_finish(&record, "spawn_failed").await;
        let message = format!(
            "dispatch {} failed before the lane ran: {why}",
            record.job.handle
        );
        self.finish_and_prune(record);
        reply(kind, message)
    }

    /// A job that ended without its lane running, in the table as finished; its client's
    /// finished records are then pruned to the limit, off the caller's path.
    fn finish_and_prune(self: &Arc<Self>, record: JobRecord) {
        let owner = record.owner_uid;
        self.finish_or_insert(record);
        let helper = self.clone();
        tokio::spawn(async move { helper.prune_finished(owner).await });
    }

    /// A slot now, else a place in the queue, else why neither.
    fn admit(&self, uid: u32, lane: &str, limits: &LimitsConfig) -> Result<Admitted, String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("the helper is shutting down; retry once it is back".into());
        }
        let mut capacity = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        // First in, first out for each client: behind its own waiting dispatches, a new one waits.
        let behind_own = capacity.queue.has_waiting(uid);
        let claim = if behind_own {
            Err("this client's earlier dispatches are waiting".to_owned())
        } else {
            capacity.may_claim(uid, lane, limits)
        };
        match claim {
            Ok(()) => {
                capacity.take(uid, lane);
                Ok(Admitted::Now)
            }
            // Only checked here; the place is taken once the record is saved (`enqueue`).
            Err(busy) => {
                match capacity
                    .queue
                    .room_for(uid, limits.max_queued_per_client, limits.max_queued)
                {
                    Ok(()) => Ok(Admitted::Queued),
                    Err(full) => Err(format!("{busy}; {full}")),
                }
            }
        }
    }

    /// Save a queued dispatch and put it in line; a slot may have freed meanwhile.
    async fn enqueue(
        self: &Arc<Self>,
        mut record: JobRecord,
        accepted: AuditEvent,
    ) -> Result<JobView, ErrorReply> {
        let durable = self.commit_tied(accepted, &record).await;
        if let Err(refusal) = self.record_before_start(&mut record, durable).await {
            self.forget_queued_env(&record.job.handle);
            return Err(refusal);
        }
        // In the table before it is in line: whoever takes it from the line finds it.
        let view = record.view(Detail::Summary);
        let (owner, handle) = (record.owner_uid, record.job.handle.clone());
        let waiting = Waiting {
            handle: handle.clone(),
            lane: lane_key(&record.job),
        };
        self.insert(record, Some(mpsc::unbounded_channel()));
        let limits = self.settings().file.limits.clone();
        let placed = self
            .capacity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue
            .push(
                owner,
                waiting,
                limits.max_queued_per_client,
                limits.max_queued,
            );
        if let Err(why) = placed {
            let Some(record) = self.record(&handle) else {
                return Err(reply(ErrorKind::Busy, why));
            };
            let detail = format!("not queued: {why}");
            let lane = lane_key(&record.job);
            return match self
                .end_without_lane(record, JobState::Failed, detail, "spawn_failed")
                .await
            {
                Ok(()) => Err(reply(ErrorKind::Busy, why)),
                // Saved as waiting, and that cannot be undone: so it waits, past the bound
                // (a cancel can take it out of line).
                Err(error) => {
                    self.wait_again(
                        owner,
                        Waiting {
                            handle: handle.to_string(),
                            lane,
                        },
                    );
                    self.start_queued();
                    Err(reply(
                        ErrorKind::Internal,
                        format!(
                            "{why}; but {handle} was already recorded as waiting, and that \
                             could not be undone ({error}): it waits for its turn"
                        ),
                    ))
                }
            };
        }
        self.start_queued();
        Ok(view)
    }

    /// A job that ends without ever having a lane (cancelled while it waited, refused at its
    /// turn, or not queued after all). Its final record must reach the store (with its audit
    /// record, in one line): one left saying `queued` would run at the next start. If it cannot
    /// be saved it is removed instead. Only then is its end shown; if neither can be done
    /// nothing changes here, and the error says why.
    async fn end_without_lane(
        self: &Arc<Self>,
        record: JobRecord,
        state: JobState,
        detail: String,
        event: &'static str,
    ) -> Result<(), String> {
        let ended = ended_without_lane(record, state, detail);
        let audited = self.record_end_without_lane(&ended, event).await?;
        self.announce_end_without_lane(ended, event, audited).await;
        Ok(())
    }

    /// [`Helper::end_without_lane`] where the job is over in this helper whether or not its end
    /// can be recorded; if it cannot, its detail says so, and what the next start will do.
    async fn end_without_lane_anyway(
        self: &Arc<Self>,
        record: JobRecord,
        state: JobState,
        detail: String,
        event: &'static str,
    ) {
        let was_waiting = record.job.state == JobState::Queued;
        let mut ended = ended_without_lane(record, state, detail);
        let audited = match self.record_end_without_lane(&ended, event).await {
            Ok(audited) => audited,
            Err(error) => {
                let next_start = match was_waiting {
                    true => "it waits for its turn again",
                    false => "it is recorded lost",
                };
                ended.job.detail = format!(
                    "{}; this end could not be recorded ({error}): after a restart {next_start}",
                    ended.job.detail
                );
                false
            }
        };
        self.announce_end_without_lane(ended, event, audited).await;
    }

    /// A dispatch whose turn did not come after all, back in line (first among its client's
    /// next ones only by the next start's order: here it goes last), and whoever waited for
    /// that turn told.
    fn wait_again(&self, owner: u32, waiting: Waiting) {
        let handle = waiting.handle.clone();
        let _ = self
            .capacity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue
            .push(owner, waiting, usize::MAX, usize::MAX);
        self.wake_waiters_of_turn(&handle);
    }

    /// Saved as ended with its audit record (`event`), or failing the audit saved alone, or
    /// failing the save removed: an error only if none could be done. Whether the end was
    /// audited with it.
    async fn record_end_without_lane(
        &self,
        ended: &JobRecord,
        event: &'static str,
    ) -> Result<bool, String> {
        let handle = &ended.job.handle;
        let audit_record = super::supervise::end_event(ended, event);
        let saved = Change::Save(Box::new(ended.clone()));
        let error = match commit::tied(
            &self.audit,
            &self.store,
            audit_record,
            saved,
            Neither,
            false,
        )
        .await
        {
            Ok(()) => return Ok(true),
            Err(CommitError::Audit(error)) => {
                tracing::error!(%error, %handle, "could not audit the end of a job that never ran; saving it unaudited");
                match self.store.save_async(ended).await {
                    Ok(()) => return Ok(false),
                    Err(error) => error.to_string(),
                }
            }
            Err(CommitError::Journal(error)) => error,
        };
        tracing::error!(%error, %handle, "could not record the end of a job that never ran; removing its record");
        match self.store.remove_async(handle).await {
            Ok(()) => Ok(false),
            Err(removal) => {
                tracing::error!(error = %removal, %handle, "could not remove its record either");
                Err(format!("{error}; removing its record instead: {removal}"))
            }
        }
    }

    /// The end audited (unless `audited` with its record already), the entry finished
    /// (waiters woken), and its client's finished records pruned off the caller's path.
    async fn announce_end_without_lane(
        self: &Arc<Self>,
        ended: JobRecord,
        event: &'static str,
        audited: bool,
    ) {
        self.forget_queued_env(&ended.job.handle);
        if !audited {
            self.audit_finish(&ended, event).await;
        }
        self.finish_and_prune(ended);
    }

    /// Start waiting dispatches while slots are free: clients in turn, each first in first out.
    pub fn start_queued(self: &Arc<Self>) {
        loop {
            let next = {
                if self.draining.load(Ordering::SeqCst) {
                    return;
                }
                let limits = self.settings().file.limits.clone();
                let mut capacity = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
                let capacity = &mut *capacity;
                let counts = (&capacity.by_uid, &capacity.by_lane, capacity.total);
                let next = capacity.queue.next(|uid, waiting| {
                    let (by_uid, by_lane, total) = counts;
                    total < limits.max_running_jobs
                        && by_uid.get(&uid).copied().unwrap_or(0)
                            < limits.max_running_jobs_per_client
                        && by_lane.get(&waiting.lane).copied().unwrap_or(0)
                            < limits.max_running_jobs_per_lane
                });
                if let Some((uid, waiting)) = &next {
                    capacity.take(*uid, &waiting.lane);
                }
                next
            };
            let Some((uid, waiting)) = next else { return };
            let helper = self.clone();
            let turn = TurnInFlight::count(&self.turns);
            tokio::spawn(async move {
                helper.start_waiting(uid, waiting).await;
                drop(turn);
            });
        }
    }

    /// Start one dispatch that waited, holding the slot claimed for it: validated and prepared
    /// again, as its owner, against today's settings. A helper shutting down leaves it queued in
    /// the store, for the next start.
    async fn start_waiting(self: Arc<Self>, owner: u32, waiting: Waiting) {
        let Some(record) = self.record(&waiting.handle) else {
            return self.release(owner, &waiting.lane);
        };
        if self.draining.load(Ordering::SeqCst) {
            // Stopping: it keeps its place, here and in the store (which still has it waiting).
            self.release(owner, &waiting.lane);
            return self.wait_again(owner, waiting);
        }
        let fail = |reason: String| (reason, JobState::Failed);
        let turn = match (record.queued.clone(), Handle::parse(&waiting.handle)) {
            (Some(queued), Ok(handle)) if record.job.state == JobState::Queued => {
                self.take_turn(&record, queued, handle).await
            }
            _ => Err(fail("its record is not a waiting dispatch".into())),
        };
        match turn {
            Ok((mut fresh, held)) => {
                let waited = record.clone();
                let durable = self
                    .store
                    .save_async(&fresh)
                    .await
                    .map_err(|e| CommitError::Journal(e.to_string()));
                let started = match self.record_before_start(&mut fresh, durable).await {
                    Ok(()) => self.launch(fresh, held, Some(waited)).await,
                    Err(refusal) => {
                        held.abandon().await;
                        Err(refusal)
                    }
                };
                if let Err(refusal) = started {
                    tracing::warn!(handle = %waiting.handle, message = %refusal.message, "a queued dispatch did not start");
                }
            }
            Err((reason, state)) => {
                self.release(owner, &waiting.lane);
                let detail = format!("not started when its turn came: {reason}");
                // Not put back in line if its end cannot be recorded: a broken store would
                // make that a loop. The store still has it waiting: the next start tries again.
                self.end_without_lane_anyway(record, state, detail, "spawn_failed")
                    .await;
            }
        }
    }

    /// Validate and prepare a waiting dispatch as its owner now, and audit its turn (no audit,
    /// no lane): its record as it will run, or why it will not.
    async fn take_turn(
        self: &Arc<Self>,
        record: &JobRecord,
        queued: QueuedRequest,
        handle: Handle,
    ) -> Result<(JobRecord, HeldLane), (String, JobState)> {
        let failed = |reason: String| (reason, JobState::Failed);
        let owner = record.owner_uid;
        let mut peer = tokio::task::spawn_blocking(move || owner_as_peer(owner))
            .await
            .ok()
            .flatten()
            .ok_or_else(|| failed(format!("its owner, uid {owner}, no longer has an account")))?;
        peer.claimed_client = record.claimed_client.clone();
        let request = DispatchRequest {
            orguser: record.job.orguser.clone(),
            repo: record.job.repo.clone(),
            task: queued.task,
            description: record.job.description.clone(),
            lane_env: self
                .queued_env
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&record.job.handle)
                .unwrap_or_default(),
        };
        let settings = self.settings();
        let checked = check(&settings, &peer, &request, &handle)
            .await
            .map_err(|reason| failed(reason.message))?;
        let fresh = new_record(
            &peer,
            &request,
            &handle,
            checked.decision,
            &checked.lane.enforcement,
            &settings,
        );
        let prepared = prepare(&settings, checked.lane)
            .await
            .map_err(|reason| failed(reason.message))?;
        let mut record = record.clone();
        record.job.argv = fresh.job.argv;
        record.job.github = fresh.job.github;
        record.job.sandbox = fresh.job.sandbox;
        record.job.unix_user = fresh.job.unix_user;
        record.job.state = JobState::Running;
        record.job.detail = "running".into();
        record.queued = None;
        self.audit_turn(&record)
            .await
            .map_err(|error| failed(format!("the audit log could not be written: {error}")))?;
        // Held from here only through its record's commit, as a new dispatch's lane is.
        let held = self
            .spawn_held(prepared)
            .map_err(|error| failed(preparation_failed(&error).message))?;
        Ok((record, held))
    }

    /// A dispatch whose turn a stopping helper interrupted, before its lane ran: saved back as
    /// it waited (its task kept), so the next start queues it again in its place, and audited.
    /// If that save fails, the store still says it started, and the next start records it as
    /// lost: it never runs twice.
    async fn back_in_line(self: &Arc<Self>, waited: JobRecord) -> JobView {
        if let Err(error) = self.store.save_async(&waited).await {
            tracing::error!(%error, handle = %waited.job.handle, "could not put an interrupted turn back in line");
        }
        let event = AuditEvent {
            event: "queued_dispatch_requeued",
            handle: Some(waited.job.handle.clone()),
            orguser: Some(waited.job.orguser.clone()),
            repo: Some(waited.job.repo.clone()),
            outcome: "queued".into(),
            detail: Some("the helper stopped as its turn came; it waits for the next start".into()),
            ..Default::default()
        };
        if let Err(error) = self.audit.append(event).await {
            tracing::error!(%error, handle = %waited.job.handle, "could not audit an interrupted turn");
        }
        let view = waited.view(Detail::Summary);
        // In line here too (nothing starts while the helper stops): a cancel takes it out.
        let waiting = Waiting {
            handle: waited.job.handle.clone(),
            lane: lane_key(&waited.job),
        };
        let owner = waited.owner_uid;
        self.requeue_entry(waited);
        self.wait_again(owner, waiting);
        view
    }

    /// Take a queued dispatch out of line: cancelled before it ran. False if it has started;
    /// an error if the cancellation could not be recorded (the store still holds it waiting, so
    /// the next start would run it: its client must know).
    pub(super) async fn cancel_queued(self: &Arc<Self>, handle: &str) -> Result<bool, ErrorReply> {
        let removed = self
            .capacity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue
            .remove(handle);
        let Some(record) = self.record(handle).filter(|_| removed) else {
            return Ok(false);
        };
        // Its passed environment goes with its end (kept if the end cannot be recorded).
        let detail = "cancelled while it waited for a lane; it never ran".to_owned();
        let (owner, lane) = (record.owner_uid, lane_key(&record.job));
        let durable = self
            .end_without_lane(record, JobState::Cancelled, detail, "cancelled")
            .await;
        if let Err(error) = durable {
            // Nothing changed: it waits again (at the back of its client's line).
            let waiting = Waiting {
                handle: handle.to_owned(),
                lane,
            };
            self.wait_again(owner, waiting);
            self.start_queued();
            let message = format!(
                "{handle} could not be cancelled: its end could not be recorded ({error}); it \
                 is still waiting for its turn"
            );
            return Err(reply(ErrorKind::Internal, message));
        }
        // Behind it, its client's next dispatch may now be startable.
        self.start_queued();
        Ok(true)
    }

    /// Let the held lane of an admitted job (its slot claimed) whose record is durable run,
    /// and supervise it. On failure the slot is released and the record says why. `waited`:
    /// the record of a dispatch that waited for its turn, as it waited.
    async fn launch(
        self: &Arc<Self>,
        mut record: JobRecord,
        held: HeldLane,
        waited: Option<JobRecord>,
    ) -> Result<JobView, ErrorReply> {
        // In the table (with its stop channel) before the lane runs: a cancel from now on
        // reaches the lane's supervisor, which stops the lane as soon as it runs.
        let (stop, mut stop_receiver) = self.stop_channel_for(&record);
        self.enter_starting(record.clone(), stop);
        // A cancel that came while it started, or a shutdown: it is given up at its gate.
        let (mut stopped, mut cancelled) = (false, false);
        while let Ok(reason) = stop_receiver.try_recv() {
            stopped = true;
            cancelled |= reason == StopReason::Cancel;
        }
        if stopped || self.draining.load(Ordering::SeqCst) {
            held.abandon().await;
            self.release(record.owner_uid, &lane_key(&record.job));
            // A stop is not a cancel: what waited for its turn waits again, for the next start.
            if let (false, Some(waited)) = (cancelled, waited) {
                return Ok(self.back_in_line(waited).await);
            }
            let view_state = JobState::Cancelled;
            let detail = "cancelled before its lane started; it never ran".to_owned();
            // Saved as running before: if this end cannot be recorded, the next start records
            // it lost, and it never runs.
            self.end_without_lane_anyway(record.clone(), view_state, detail, "cancelled")
                .await;
            return Ok(self
                .record(&record.job.handle)
                .map_or_else(|| record.view(Detail::Summary), |r| r.view(Detail::Summary)));
        }
        let lane = match held.release().await {
            Ok(lane) => lane,
            Err(error) => {
                let detail = format!("the lane did not start: {error}");
                let refusal =
                    self.never_ran(record, ErrorKind::SpawnFailed, detail, error.to_string());
                return Err(refusal.await);
            }
        };
        self.record_started(&mut record, &lane);
        let view = record.view(Detail::Summary);
        let (handle, owner) = (record.job.handle.clone(), record.owner_uid);
        self.update_entry(record);
        let helper = self.clone();
        tokio::spawn(async move { helper.supervise(handle, owner, lane, stop_receiver).await });
        tracing::info!(handle = %view.handle, orguser = %view.orguser, repo = %view.repo, "lane started");
        Ok(view)
    }

    /// The running lane in its record: start time, enforcement, and the group to kill should a
    /// crash leave it running. Queued for the journal now (so it lands before the lane's end),
    /// not waited for, and synced with the next commit (within `commit::SOON` at most): the
    /// record that makes a crash recoverable is the one saved before the spawn, and the lanes
    /// of a helper that dies die with it.
    fn record_started(&self, record: &mut JobRecord, lane: &dispatch_sandbox::SpawnedLane) {
        record.job.started_at = Some(now_rfc3339());
        record.job.sandbox = Some(sandbox_report(&lane.enforcement, &self.settings()));
        record.pgid = Some(lane.process_group());
        record.pgid_start_ticks = process_start_ticks(lane.process_group());
        let started = self.store.save_soon(record);
        let handle = record.job.handle.clone();
        tokio::spawn(async move {
            if let Err(error) = started.await {
                tracing::error!(%error, %handle, "could not persist a started job");
            }
        });
    }

    /// The job's record is durable before its lane may start: a helper that dies after the
    /// spawn finds it at its next start and marks it lost. `durable` is how its commit went
    /// (with the acceptance's audit record, or alone). If the record could not be saved,
    /// nothing runs (and a claimed slot is released), and the audit log says so after the
    /// acceptance; if the acceptance could not be audited, there is no record either.
    async fn record_before_start(
        self: &Arc<Self>,
        record: &mut JobRecord,
        durable: Result<(), CommitError>,
    ) -> Result<(), ErrorReply> {
        let error = match durable {
            Ok(()) => return Ok(()),
            Err(CommitError::Audit(error)) => {
                if record.job.state == JobState::Running {
                    self.release(record.owner_uid, &lane_key(&record.job));
                }
                tracing::error!(%error, "audit write failed; dispatch refused");
                return Err(audit_unavailable(&error));
            }
            Err(CommitError::Journal(error)) => error,
        };
        if record.job.state == JobState::Running {
            self.release(record.owner_uid, &lane_key(&record.job));
        }
        record.queued = None;
        record.job.state = JobState::Failed;
        record.job.finished_at = Some(now_rfc3339());
        record.job.detail =
            format!("the job's record could not be saved, so its lane was not started: {error}");
        self.persist_and_audit_finish(record, "spawn_failed").await;
        self.finish_and_prune(record.clone());
        Err(reply(
            ErrorKind::Internal,
            format!(
                "dispatch {} refused: {}",
                record.job.handle, record.job.detail
            ),
        ))
    }

    /// Commit a dispatch's acceptance `event` and its `record`, both or neither, queued now
    /// (their place in the writer's order is taken here).
    fn commit_tied(
        &self,
        event: AuditEvent,
        record: &JobRecord,
    ) -> impl Future<Output = Result<(), CommitError>> + Send + 'static {
        let record = Change::Save(Box::new(record.clone()));
        commit::tied(&self.audit, &self.store, event, record, AuditAlone, false)
    }

    /// A lane's slot is free: give it back and start whatever waited for one.
    pub(super) fn release(self: &Arc<Self>, uid: u32, lane: &str) {
        self.capacity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .give_back(uid, lane);
        self.start_queued();
    }

    async fn audit_turn(&self, record: &JobRecord) -> Result<(), crate::audit::AuditError> {
        self.audit
            .append(AuditEvent {
                event: "queued_dispatch_started",
                handle: Some(record.job.handle.clone()),
                orguser: Some(record.job.orguser.clone()),
                repo: Some(record.job.repo.clone()),
                unix_user: Some(record.job.unix_user.clone()),
                argv: record.job.argv.clone(),
                outcome: "starting".into(),
                ..Default::default()
            })
            .await
    }

    /// Audit a refused dispatch and hand back the reason.
    async fn rejected(
        &self,
        peer: &Peer,
        request: &DispatchRequest,
        reason: ErrorReply,
    ) -> ErrorReply {
        let record = AuditEvent {
            event: "dispatch_rejected",
            peer: Some(peer.identity),
            claimed_client: peer.claimed_client.clone(),
            orguser: Some(dispatch_policy::escape_value(&request.orguser)),
            repo: Some(dispatch_policy::escape_value(&request.repo)),
            task_sha256: Some(sha256_hex(&request.task)),
            outcome: "rejected".into(),
            detail: Some(reason.message.clone()),
            ..Default::default()
        };
        if let Err(audit_error) = self.audit.append(record).await {
            tracing::error!(%audit_error, "could not audit a rejected dispatch");
        }
        reason
    }
}

impl Helper {
    /// A queued dispatch's passed values, dropped once it will not start from the queue.
    fn forget_queued_env(&self, handle: &str) {
        self.queued_env
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(handle);
    }
}

/// The audit record of an accepted dispatch (started now, or queued).
fn accepted_event(
    peer: &Peer,
    record: &JobRecord,
    enforcement: &dispatch_sandbox::Enforcement,
) -> AuditEvent {
    let queued = record.job.state == JobState::Queued;
    AuditEvent {
        event: "dispatch_accepted",
        peer: Some(peer.identity),
        claimed_client: peer.claimed_client.clone(),
        handle: Some(record.job.handle.clone()),
        orguser: Some(record.job.orguser.clone()),
        repo: Some(record.job.repo.clone()),
        github: Some(record.job.github.clone()),
        unix_user: Some(record.job.unix_user.clone()),
        task_preview: Some(record.job.task_preview.clone()),
        task_sha256: Some(record.job.task_sha256.clone()),
        argv: record.job.argv.clone(),
        outcome: if queued { "queued" } else { "accepted" }.into(),
        detail: Some(format!(
            "sandbox: uid {} gid {}, landlock {}, seccomp on{}",
            enforcement.uid,
            enforcement.gid,
            enforcement.landlock,
            if queued {
                "; queued for a lane slot"
            } else {
                ""
            }
        )),
    }
}

fn audit_unavailable(error: &impl std::fmt::Display) -> ErrorReply {
    reply(
        ErrorKind::AuditUnavailable,
        format!("the audit log could not be written, so nothing ran: {error}"),
    )
}

/// What is settled about a dispatch before it is accepted.
struct Checked {
    decision: Decision,
    lane: PlannedLane,
}

/// A lane checked but not yet prepared.
struct PlannedLane {
    plan: LanePlan,
    /// What it will run under, as its record and audit record state it.
    enforcement: dispatch_sandbox::Enforcement,
}

/// Decide a dispatch and plan its lane: the allowlist, the account, the argv, the variables
/// passed, the work area, and whether the sandbox can run the plan. Nothing is opened for the
/// lane yet (see [`prepare`]).
async fn check(
    settings: &Arc<Settings>,
    peer: &Peer,
    request: &DispatchRequest,
    handle: &Handle,
) -> Result<Checked, ErrorReply> {
    let (settings, peer, request, handle) = (
        settings.clone(),
        peer.clone(),
        request.clone(),
        handle.clone(),
    );
    off_the_runtime(move || {
        let decision = Helper::decide(&settings, &peer, &request, &handle)?;
        let own = [
            settings.file.state_dir.as_path(),
            settings.file.audit_log.as_path(),
        ];
        let (passed_env, exec_paths) =
            passed_env(&settings.file.pass_env, &request.lane_env, &own)?;
        // The job's own directory is made by its lane; the area it goes in must be there.
        crate::workdirs::ensure_area(&decision.work_area, &decision.identity).map_err(|error| {
            reply(
                ErrorKind::SpawnFailed,
                format!("the lane's work area is not usable, nothing ran: {error}"),
            )
        })?;
        let plan = LanePlan {
            identity: decision.identity.clone(),
            argv: decision.argv.clone(),
            work_dir: decision.work_dir.clone(),
            make_work_dir: true,
            passed_env,
            exec_paths,
            change_uid: !settings.unprivileged,
        };
        let enforcement = settings
            .sandbox
            .check(&plan)
            .map_err(|error| preparation_failed(&error))?;
        Ok(Checked {
            decision,
            lane: PlannedLane { plan, enforcement },
        })
    })
    .await
}

/// The lane's Landlock ruleset and environment: what opens paths before the fork.
async fn prepare(
    settings: &Arc<Settings>,
    lane: PlannedLane,
) -> Result<dispatch_sandbox::PreparedLane, ErrorReply> {
    let settings = settings.clone();
    off_the_runtime(move || {
        settings
            .sandbox
            .prepare_checked(lane.plan, lane.enforcement)
            .map_err(|error| preparation_failed(&error))
    })
    .await
}

fn preparation_failed(error: &dispatch_sandbox::SandboxError) -> ErrorReply {
    reply(
        ErrorKind::SpawnFailed,
        format!("sandbox preparation failed, nothing ran: {error}"),
    )
}

/// Validation asks NSS (users, groups) and preparation opens paths for Landlock: both block, so
/// neither runs on a runtime worker.
async fn off_the_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ErrorReply> + Send + 'static,
) -> Result<T, ErrorReply> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| {
            Err(reply(
                ErrorKind::Internal,
                format!("validation failed: {join}"),
            ))
        })
}

/// The variables passed to a lane, and the directories of its PATH it may run programs from.
type PassedEnv = (Vec<(String, String)>, Vec<std::path::PathBuf>);

/// The caller's values for the variables this helper passes, checked: only names in
/// `pass_env`, bounded, no NUL. A PATH keeps its absolute entries, and the directories among
/// them are where the lane may also run programs, except any that holds the helper's own files
/// (its state, its audit log). Values are never logged or recorded.
fn passed_env(
    pass: &[String],
    sent: &[(String, String)],
    own: &[&std::path::Path],
) -> Result<PassedEnv, ErrorReply> {
    const MAX_VALUE: usize = 4096;
    const MAX_TOTAL: usize = 16 * 1024;
    let invalid = |message: String| reply(ErrorKind::Invalid, message);
    let mut total = 0;
    let mut env: Vec<(String, String)> = Vec::new();
    let mut exec_paths = Vec::new();
    // A name this helper does not pass is dropped, never used: a front that learned the list
    // before a reload narrowed it keeps working, and nothing unlisted reaches a lane.
    for (name, value) in sent.iter().filter(|(name, _)| pass.contains(name)) {
        if env.iter().any(|(seen, _)| seen == name) {
            return Err(invalid(format!("lane_env: {name} is given twice")));
        }
        total += name.len() + value.len();
        if value.len() > MAX_VALUE || total > MAX_TOTAL || value.contains('\0') {
            return Err(invalid(format!(
                "lane_env: the value of {name} must have no NUL and at most {MAX_VALUE} bytes \
                 ({MAX_TOTAL} bytes in all)"
            )));
        }
        let value = if name == "PATH" {
            let absolute: Vec<&str> = value.split(':').filter(|d| d.starts_with('/')).collect();
            exec_paths.extend(
                absolute
                    .iter()
                    .map(std::path::PathBuf::from)
                    .filter(|dir| dir.is_dir())
                    .filter(|dir| {
                        let dir = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                        !own.iter().any(|own| {
                            let own = own.canonicalize().unwrap_or_else(|_| own.to_path_buf());
                            own.starts_with(&dir) || dir.starts_with(&own)
                        })
                    }),
            );
            absolute.join(":")
        } else {
            value.clone()
        };
        env.push((name.clone(), value));
    }
    exec_paths.sort();
    exec_paths.dedup();
    Ok((env, exec_paths))
}

/// The record of a dispatch just accepted (running until admission says otherwise).
fn new_record(
    peer: &Peer,
    request: &DispatchRequest,
    handle: &Handle,
    decision: Decision,
    enforcement: &dispatch_sandbox::Enforcement,
    settings: &Settings,
) -> JobRecord {
    let Decision {
        argv,
        github,
        task,
        unix_user,
        work_dir,
        ..
    } = decision;
    JobRecord {
        work_dir: Some(work_dir),
        owner_uid: peer.identity.uid,
        claimed_client: peer.claimed_client.clone(),
        pgid: None,
        pgid_start_ticks: None,
        queued: None,
        job: JobView {
            handle: handle.to_string(),
            orguser: request.orguser.clone(),
            repo: request.repo.clone(),
            github,
            unix_user,
            description: request.description.clone().filter(|d| !d.trim().is_empty()),
            task_preview: task.preview(),
            task_sha256: sha256_hex(task.as_str()),
            argv: Some(argv),
            state: JobState::Running,
            requested_at: now_rfc3339(),
            started_at: None,
            finished_at: None,
            exit_code: None,
            signal: None,
            detail: "running".into(),
            stdout: None,
            stderr: None,
            sandbox: Some(sandbox_report(enforcement, settings)),
            usage: None,
            stopped_by: None,
            summary: None,
        },
    }
}

/// The owner of a queued dispatch, as a peer: its account's groups, from NSS now. `None` if
/// the account is gone (its dispatch does not start).
fn owner_as_peer(uid: u32) -> Option<Peer> {
    let user = User::from_uid(uid.into()).ok().flatten()?;
    Some(Peer::from_cred(uid, user.gid.as_raw(), None))
}

/// `record` as it ends without a lane: `state`, now, saying `detail`, no longer waiting.
fn ended_without_lane(mut record: JobRecord, state: JobState, detail: String) -> JobRecord {
    record.queued = None;
    record.job.state = state;
    record.job.finished_at = Some(now_rfc3339());
    record.job.detail = detail;
    record
}

/// One queued dispatch taking its turn, counted until its task ends (or is dropped unrun).
struct TurnInFlight(Arc<std::sync::atomic::AtomicUsize>);

impl TurnInFlight {
    fn count(turns: &Arc<std::sync::atomic::AtomicUsize>) -> TurnInFlight {
        turns.fetch_add(1, Ordering::SeqCst);
        TurnInFlight(turns.clone())
    }
}

impl Drop for TurnInFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::passed_env;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_passed_names_reach_a_lane_and_bad_values_are_refused() {
        let pass = ["GH_TOKEN".to_owned(), "PATH".to_owned()];
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(state.join("lanes")).unwrap();
        std::fs::create_dir(&tools).unwrap();
        let path = format!(
            "{}:relative/bin:{}:{}",
            tools.display(),
            state.display(),
            state.join("lanes").display()
        );
        let sent = pairs(&[("GH_TOKEN", "t"), ("LD_PRELOAD", "/x.so"), ("PATH", &path)]);
        let (env, exec) = passed_env(&pass, &sent, &[state.as_path()]).unwrap();
        let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["GH_TOKEN", "PATH"], "unlisted names are dropped");
        // Relative entries leave PATH; the helper's state (and anything in it) gets no exec.
        assert!(!env[1].1.contains("relative"));
        assert_eq!(exec, [tools]);
        for bad in [
            pairs(&[("GH_TOKEN", "a"), ("GH_TOKEN", "b")]),
            pairs(&[("GH_TOKEN", "nul\0byte")]),
            pairs(&[("GH_TOKEN", &"x".repeat(4097))]),
        ] {
            assert!(passed_env(&pass, &bad, &[]).is_err(), "{:?}", bad[0].0);
        }
    }
}
