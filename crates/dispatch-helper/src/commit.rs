//! The one durable writer: audit events and job-journal appends from every task go to one
//! thread, which writes what has queued up while it was busy and makes all of it durable with
//! one `fdatasync`: a group commit. The audit records are written to the audit log and, in the
//! same commit, to the job journal, whose sync is the one that counts (the log is synced when
//! the writer is idle and before every compaction; see `audit`). Nobody is answered before the
//! sync that covers their record has returned, so "acknowledged" still means "durable" (the
//! record before a lane is spawned, the audit record before a dispatch is accepted); what
//! changes is that concurrent dispatches share one sync instead of making 6 each.

use crate::audit::{AuditEvent, AuditLog};
use crate::store::{JobRecord, JobStore, JournalOp};
use std::sync::mpsc;
use tokio::sync::oneshot;

/// At most this many records per commit, so one batch never holds callers for long.
const MAX_BATCH: usize = 1024;

enum Work {
    Audit(Box<AuditEvent>),
    Journal(JournalOp),
    /// A dispatch's acceptance and its job record, which exist together or not at all: one
    /// journal line holds both.
    Tied(Box<AuditEvent>, Box<JobRecord>),
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

    /// Commit a dispatch's acceptance `event` and its `record` together, both or neither;
    /// queued now, as [`Committer::queue`].
    pub fn tied(
        &self,
        event: AuditEvent,
        record: JobRecord,
    ) -> impl std::future::Future<Output = Answer> + Send + 'static {
        self.queue(Work::Tied(Box::new(event), Box::new(record)))
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

/// Take what is queued, commit it, answer everyone in it; again. The audit log itself is
/// synced before every compaction, which drops the journal's copies of its records (and when
/// the helper stops): until then its records are durable in the journal.
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
        if store.wants_compaction() {
            let compacted = audit
                .sync()
                .map_err(|e| e.to_string())
                .and_then(|()| store.compact().map_err(|e| e.to_string()));
            if let Err(error) = compacted {
                tracing::error!(%error, "could not compact the job journal; it keeps growing");
            }
        }
    }
}

/// What one queued item becomes in the journal.
enum Entry {
    Journal(JournalOp),
    /// An audit record: its line.
    Audit,
    /// An acceptance (its line) with its record.
    Accepted(Box<JobRecord>),
}

/// What a caller in a batch waits for.
#[derive(Clone, Copy)]
enum Awaits {
    Journal,
    Audit,
    /// Both: the acceptance first.
    Accepted,
}

/// One batch, one sync: the audit records are chained and written to the log, then every
/// journal line (the audit records' lines among them, in queue order) is appended to the
/// journal and synced. Should the journal fail, the log is synced itself, so that audit
/// records (a refusal, a lane's end, an acceptance whose record could not be saved) are still
/// kept; should that fail too, they are cut off the log again. Each caller gets the outcome of
/// what it waits for; one whose audit record could not be written has nothing in the journal.
fn commit(batch: Vec<Pending>, audit: &AuditLog, store: &JobStore) {
    let mut events = Vec::new();
    let mut entries = Vec::with_capacity(batch.len());
    for pending in batch {
        let entry = match pending.work {
            Work::Journal(op) => Entry::Journal(op),
            Work::Audit(event) => {
                events.push(*event);
                Entry::Audit
            }
            Work::Tied(event, record) => {
                events.push(*event);
                Entry::Accepted(record)
            }
        };
        entries.push((entry, pending.done));
    }
    let staged = (!events.is_empty()).then(|| audit.stage(&events));
    let (staged, audit_failed) = match staged {
        Some(Ok(staged)) => (Some(staged), None),
        Some(Err(error)) => (None, Some(CommitError::Audit(error.to_string()))),
        None => (None, None),
    };
    let mut lines = staged.iter().flat_map(|s| s.lines().iter().cloned());
    let mut ops = Vec::with_capacity(entries.len());
    let mut waiting = Vec::with_capacity(entries.len());
    for (entry, done) in entries {
        let (op, awaits) = match (entry, &audit_failed) {
            (Entry::Journal(op), _) => (op, Awaits::Journal),
            (Entry::Audit | Entry::Accepted(_), Some(failed)) => {
                let _ = done.send(Err(failed.clone()));
                continue;
            }
            (Entry::Audit, None) => (
                JournalOp::Audit(lines.next().expect("one line per event")),
                Awaits::Audit,
            ),
            (Entry::Accepted(record), None) => (
                JournalOp::Accepted {
                    audit: lines.next().expect("one line per event"),
                    record,
                },
                Awaits::Accepted,
            ),
        };
        ops.push(op);
        waiting.push((done, awaits));
    }
    drop(lines);
    if ops.is_empty() {
        return;
    }
    let journal = store
        .append_now(ops)
        .map_err(|e| CommitError::Journal(e.to_string()));
    let audited = match staged {
        None => Ok(()),
        Some(staged) if journal.is_ok() => {
            staged.keep();
            Ok(())
        }
        Some(staged) => staged
            .sync_and_keep()
            .map_err(|e| CommitError::Audit(e.to_string())),
    };
    for (done, awaits) in waiting {
        let answer = match awaits {
            Awaits::Journal => journal.clone(),
            Awaits::Audit => audited.clone(),
            Awaits::Accepted => audited.clone().and(journal.clone()),
        };
        let _ = done.send(answer);
    }
}
