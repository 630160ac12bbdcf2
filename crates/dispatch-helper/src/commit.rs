//! The one durable writer: audit events and job-journal appends from every task go to one
//! thread, which writes what has queued up while it was busy and makes it durable with one
//! `fdatasync` per file (audit log, job journal) for the whole batch: a group commit. Nobody
//! is answered before the sync that covers their record has returned, so "acknowledged"
//! still means "durable" (the record before a lane is spawned, the audit record before a
//! dispatch is accepted); what changes is that 16 concurrent dispatches share those syncs
//! instead of making 6 each.

use crate::audit::{AuditEvent, AuditLog};
use crate::store::{JobStore, JournalOp};
use std::sync::mpsc;
use tokio::sync::oneshot;

/// At most this many records per commit, so one batch never holds callers for long.
const MAX_BATCH: usize = 1024;

enum Work {
    Audit(Box<AuditEvent>),
    Journal(JournalOp),
    /// An audit record and the journal entry that may exist only with it (a dispatch's
    /// acceptance and its job record): one hand-off, the entry written only once the record
    /// is durable, and not at all if the record could not be made so.
    Tied(Box<AuditEvent>, JournalOp),
}

/// Which file a commit failed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// The audit record: nothing tied to it was written either.
    Audit(String),
    Journal(String),
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitError::Audit(why) | CommitError::Journal(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for CommitError {}

type Answer = Result<(), CommitError>;

struct Pending {
    work: Work,
    done: oneshot::Sender<Answer>,
}

/// A handle to the writer thread.
#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<Pending>,
}

impl Committer {
    /// Queue `work` now (its place in the order is taken here, not when the answer is
    /// awaited) and return what says when it is durable.
    fn queue(&self, work: Work) -> impl std::future::Future<Output = Answer> + Send + 'static {
        let (done, answer) = oneshot::channel();
        let stopped_on = match &work {
            Work::Journal(_) => CommitError::Journal,
            Work::Audit(_) | Work::Tied(..) => CommitError::Audit,
        };
        let sent = self.queue.send(Pending { work, done });
        async move {
            let stopped = || stopped_on("the durable writer has stopped".to_owned());
            sent.map_err(|_| stopped())?;
            answer.await.unwrap_or_else(|_| Err(stopped()))
        }
    }

    pub async fn audit(&self, event: AuditEvent) -> Result<(), String> {
        self.queue(Work::Audit(Box::new(event)))
            .await
            .map_err(|e| e.to_string())
    }

    /// Queue `op` now and return what says when it is durable.
    pub fn queue_journal(
        &self,
        op: JournalOp,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'static {
        let durable = self.queue(Work::Journal(op));
        async move { durable.await.map_err(std::io::Error::other) }
    }

    /// Commit `event`, then `op` only if `event` is durable; the error says which failed.
    /// Queued now, as [`Committer::queue`].
    pub fn tied(
        &self,
        event: AuditEvent,
        op: JournalOp,
    ) -> impl std::future::Future<Output = Answer> + Send + 'static {
        self.queue(Work::Tied(Box::new(event), op))
    }
}

/// Start the writer and route every later append of `audit` and `store` through it.
pub fn start(audit: &AuditLog, store: &JobStore) -> std::io::Result<()> {
    let (queue, work) = mpsc::channel();
    let (log, jobs) = (audit.clone(), store.clone());
    std::thread::Builder::new()
        .name("dispatch-commit".into())
        .spawn(move || run(&work, &log, &jobs))?;
    audit.attach(Committer {
        queue: queue.clone(),
    });
    store.attach(Committer { queue });
    Ok(())
}

/// Take what is queued, commit it, answer everyone in it; again.
fn run(work: &mpsc::Receiver<Pending>, audit: &AuditLog, store: &JobStore) {
    while let Ok(first) = work.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match work.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        commit(batch, audit, store);
        if store.wants_compaction()
            && let Err(error) = store.compact()
        {
            tracing::error!(%error, "could not compact the job journal; it keeps growing");
        }
    }
}

/// One batch: the audit records first (in order, chained) with one sync, then the journal
/// entries (in order; a tied one only if the audit records were made durable) with one sync;
/// each caller gets the outcome of what it waits for.
fn commit(batch: Vec<Pending>, audit: &AuditLog, store: &JobStore) {
    let mut events = Vec::new();
    let mut waiting_audit = Vec::new();
    // Journal entries in queue order; `true` marks one tied to an audit record.
    let mut journal: Vec<(JournalOp, oneshot::Sender<Answer>, bool)> = Vec::new();
    for pending in batch {
        match pending.work {
            Work::Audit(event) => {
                events.push(*event);
                waiting_audit.push(pending.done);
            }
            Work::Journal(op) => journal.push((op, pending.done, false)),
            Work::Tied(event, op) => {
                events.push(*event);
                journal.push((op, pending.done, true));
            }
        }
    }
    let mut audit_failed = None;
    if !events.is_empty() {
        let outcome = audit
            .append_many_blocking(&events)
            .map_err(|e| CommitError::Audit(e.to_string()));
        audit_failed = outcome.clone().err();
        for done in waiting_audit {
            let _ = done.send(outcome.clone());
        }
    }
    let mut ops = Vec::new();
    let mut waiting_journal = Vec::new();
    for (op, done, tied) in journal {
        match (&audit_failed, tied) {
            (Some(failed), true) => {
                let _ = done.send(Err(failed.clone()));
            }
            _ => {
                ops.push(op);
                waiting_journal.push(done);
            }
        }
    }
    if !ops.is_empty() {
        let outcome = store
            .append_now(ops)
            .map_err(|e| CommitError::Journal(e.to_string()));
        for done in waiting_journal {
            let _ = done.send(outcome.clone());
        }
    }
}
