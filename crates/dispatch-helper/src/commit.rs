//! The one durable writer: audit events and job-journal appends from every task go to one
//! thread, which writes what has queued up while it was busy and makes all of it durable with
//! one `fdatasync`: a group commit. The audit records go into the job journal with the rest,
//! whose sync is the one that counts, and then into the audit log (synced every 64 KiB and
//! before every compaction; see `audit::ahead`). Nobody is answered before the
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
    /// A change to the job store and the audit record of the event that made it, which exist
    /// together or not at all: one journal line holds both.
    Tied(Box<AuditEvent>, Change, IfNotJournaled),
}

/// What becomes of a tied change's audit record if the journal cannot be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfNotJournaled {
    /// Written to the log by itself: it tells of something that happened whatever the store
    /// says (a dispatch accepted, then refused for want of its record; a lane that ended).
    AuditAlone,
    /// Dropped with the change: it tells of the change itself (a deletion, a pruning, a job
    /// marked lost or ended without its lane), which was not made.
    Neither,
}

/// A change to the job store that is made only with its audit record (see [`tied`]).
pub enum Change {
    Save(Box<JobRecord>),
    Remove(String),
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
    /// Nobody waits for it to be durable at once: it may wait up to [`SOON`] for a commit to
    /// join rather than cost one of its own.
    soon: bool,
}

/// How long a record nobody waits for may wait for other work to share its sync.
const SOON: std::time::Duration = std::time::Duration::from_millis(20);

/// A handle to the writer thread.
#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<Pending>,
}

impl Committer {
    /// Queue `work` now (its place in the order is taken here, not when the answer is
    /// awaited) and return what says when it is durable.
    fn queue(
        &self,
        work: Work,
        soon: bool,
    ) -> impl std::future::Future<Output = Answer> + Send + use<> {
        let (done, answer) = oneshot::channel();
        let stopped_on = match &work {
            Work::Journal(_) => CommitError::Journal,
            Work::Audit(_) | Work::Tied(..) => CommitError::Audit,
        };
        let sent = self.queue.send(Pending { work, done, soon });
        async move {
            let stopped = || stopped_on("the durable writer has stopped".to_owned());
            sent.map_err(|_| stopped())?;
            answer.await.unwrap_or_else(|_| Err(stopped()))
        }
    }

    /// Queue `event` now and return what says when it is durable; with `soon`, as
    /// [`Committer::queue_journal`].
    pub fn audit(
        &self,
        event: AuditEvent,
        soon: bool,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send + use<> {
        let durable = self.queue(Work::Audit(Box::new(event)), soon);
        async move { durable.await.map_err(|e| e.to_string()) }
    }

    /// Queue `op` now and return what says when it is durable. With `soon`, it is synced with
    /// the next commit, or on its own after [`SOON`] if no other work came.
    pub fn queue_journal(
        &self,
        op: JournalOp,
        soon: bool,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send + use<> {
        let durable = self.queue(Work::Journal(op), soon);
        async move { durable.await.map_err(std::io::Error::other) }
    }

    /// Commit `event` and `change` together, both or neither; queued now, as
    /// [`Committer::queue`].
    fn tied(
        &self,
        event: AuditEvent,
        change: Change,
        unjournaled: IfNotJournaled,
        soon: bool,
    ) -> impl std::future::Future<Output = Answer> + Send + use<> {
        self.queue(Work::Tied(Box::new(event), change, unjournaled), soon)
    }
}

/// Commit `change` with the audit record `event` of what made it, both or neither (one journal
/// line, queued now: its place in the writer's order is taken here); an error says which file
/// failed, and `unjournaled` what became of the audit record if the journal failed. Before the
/// writer runs, the audit record is made durable first and the change only then: a crash
/// between the two leaves a record of an event whose change is made again.
pub fn tied(
    audit: &AuditLog,
    store: &JobStore,
    event: AuditEvent,
    change: Change,
    unjournaled: IfNotJournaled,
    soon: bool,
) -> impl std::future::Future<Output = Answer> + Send + 'static {
    let queued = match store.committer() {
        Some(committer) => Ok(committer.tied(event, change, unjournaled, soon)),
        None => Err((event, change, audit.clone(), store.clone())),
    };
    async move {
        let (event, change, audit, store) = match queued {
            Ok(durable) => return durable.await,
            Err(unqueued) => unqueued,
        };
        audit
            .append(event)
            .await
            .map_err(|e| CommitError::Audit(e.to_string()))?;
        let changed = match change {
            Change::Save(record) => store.save_async(&record).await,
            Change::Remove(handle) => store.remove_async(&handle).await,
        };
        changed.map_err(|e| CommitError::Journal(e.to_string()))
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
/// synced once enough is written to it, and before every compaction (which drops the
/// journal's copies of its records); until then its records are durable in the journal.
fn run(work: &mpsc::Receiver<Pending>, audit: &AuditLog, store: &JobStore) {
    while let Ok(first) = work.recv() {
        commit(gather(first, work), audit, store);
        let compact = store.wants_compaction();
        if (compact || audit.unsynced_bytes() >= AUDIT_SYNC_BYTES)
            && let Err(error) = audit.sync()
        {
            // The log is stopped (fail closed); the journal keeps its records, uncompacted.
            tracing::error!(%error, "could not sync the audit log");
            continue;
        }
        if compact && let Err(error) = store.compact() {
            tracing::error!(%error, "could not compact the job journal; it keeps growing");
        }
    }
}

/// `first` and what queued behind it. A batch of records nobody waits for yet waits up to
/// [`SOON`] for one somebody does, and then shares its sync.
fn gather(first: Pending, work: &mpsc::Receiver<Pending>) -> Vec<Pending> {
    let deadline = std::time::Instant::now() + SOON;
    let mut batch = vec![first];
    loop {
        while batch.len() < MAX_BATCH {
            match work.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        if batch.len() >= MAX_BATCH || batch.iter().any(|pending| !pending.soon) {
            return batch;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match work.recv_timeout(left) {
            Ok(more) => batch.push(more),
            Err(_) => return batch,
        }
    }
}

/// The audit log is synced once this much was written to it unsynced: what a crash can take
/// from its end stays small (the journal has it all the same).
const AUDIT_SYNC_BYTES: u64 = 64 * 1024;

/// What one queued item becomes in the journal.
enum Entry {
    Journal(JournalOp),
    /// An audit record: its line.
    Audit,
    /// An audit record (its line) with the change it goes with.
    Tied(Change, IfNotJournaled),
}

/// What a caller in a batch waits for.
#[derive(Clone, Copy)]
enum Awaits {
    Journal,
    Audit,
    /// Both: the audit record first.
    Both,
    /// The change, which carries its audit record (`IfNotJournaled::Neither`): if the journal
    /// failed, neither was made, whatever became of the batch's other audit records.
    Change,
}

/// One batch, one sync: the audit records are chained (the log opened for them), every journal
/// line (the audit records' lines among them, in queue order) is appended to the journal and
/// synced, and only then are the audit records written to the log: it never holds one the
/// journal does not. Should the journal fail, those that stand without it are written to the
/// log and synced there (see [`audit_alone`]). Each caller gets the outcome of what it waits
/// for; one whose audit record could not be written has nothing in the journal.
fn commit(batch: Vec<Pending>, audit: &AuditLog, store: &JobStore) {
    let Sorted {
        events,
        alone,
        entries,
    } = sort_batch(batch);
    let (chained, refused) = match (!events.is_empty()).then(|| audit.chain(&events)) {
        Some(Ok(chained)) => (Some(chained), None),
        Some(Err(error)) => (None, Some(CommitError::Audit(error.to_string()))),
        None => (None, None),
    };
    let lines = chained.as_ref().map_or(&[][..], |c| c.lines());
    let (ops, waiting) = journal_lines(entries, lines, refused.as_ref());
    if ops.is_empty() {
        return;
    }
    let damaged_before = store.is_damaged();
    let journal = store
        .append_now(ops)
        .map_err(|e| CommitError::Journal(e.to_string()));
    // This write failed half-way and could not be undone (not one refused for an earlier one).
    let torn = !damaged_before && store.is_damaged();
    let audited = match chained {
        None => Ok(()),
        Some(chained) if journal.is_ok() => {
            if let Err(error) = chained.write() {
                // Durable in the journal all the same: the log is stopped, and gets them back
                // at the next start.
                tracing::error!(%error, "could not write the audit log");
            }
            Ok(())
        }
        Some(chained) => audit_alone(chained, audit, torn, events, &alone),
    };
    for (done, awaits) in waiting {
        let answer = match awaits {
            Awaits::Journal => journal.clone(),
            Awaits::Audit => audited.clone(),
            Awaits::Both => audited.clone().and(journal.clone()),
            Awaits::Change => journal.clone().and(audited.clone()),
        };
        let _ = done.send(answer);
    }
}

/// The journal failed: the batch's audit records that stand without it (all but those of
/// changes that were not made) are made durable in the log itself, so that refusals, ends and
/// an acceptance whose record could not be saved are still audited. They are chained again
/// without the others, unless all stand (then the lines as chained, as the journal would have
/// kept them), or the journal's write of this batch failed half-way and could not be undone
/// (`torn`): it may hold some of the lines as chained, which the next start writes back at
/// their offsets, so those go to the log as they are.
fn audit_alone(
    chained: crate::audit::Chained<'_>,
    audit: &AuditLog,
    torn: bool,
    events: Vec<AuditEvent>,
    alone: &[bool],
) -> Answer {
    let written = if alone.iter().all(|&a| a) || torn {
        chained.write_and_sync()
    } else {
        drop(chained);
        let standing: Vec<AuditEvent> = events
            .into_iter()
            .zip(alone)
            .filter_map(|(event, &alone)| alone.then_some(event))
            .collect();
        if standing.is_empty() {
            return Ok(());
        }
        audit.chain(&standing).and_then(|c| c.write_and_sync())
    };
    written.map_err(|e| CommitError::Audit(e.to_string()))
}

/// A batch sorted for its commit.
struct Sorted {
    /// Its audit events, in order.
    events: Vec<AuditEvent>,
    /// Whether each stands without the journal (see [`IfNotJournaled`]).
    alone: Vec<bool>,
    /// What each item becomes, and who waits for it.
    entries: Vec<(Entry, oneshot::Sender<Answer>)>,
}

fn sort_batch(batch: Vec<Pending>) -> Sorted {
    let mut sorted = Sorted {
        events: Vec::new(),
        alone: Vec::new(),
        entries: Vec::with_capacity(batch.len()),
    };
    for pending in batch {
        let entry = match pending.work {
            Work::Journal(op) => Entry::Journal(op),
            Work::Audit(event) => {
                sorted.events.push(*event);
                sorted.alone.push(true);
                Entry::Audit
            }
            Work::Tied(event, change, unjournaled) => {
                sorted.events.push(*event);
                sorted.alone.push(unjournaled == IfNotJournaled::AuditAlone);
                Entry::Tied(change, unjournaled)
            }
        };
        sorted.entries.push((entry, pending.done));
    }
    sorted
}

/// The journal lines of a batch, in queue order, with who waits for what. Audit records take
/// their chained `lines` in order; if they were `refused`, their callers are answered now and
/// nothing of theirs is written.
fn journal_lines(
    entries: Vec<(Entry, oneshot::Sender<Answer>)>,
    lines: &[crate::audit::KeptAudit],
    refused: Option<&CommitError>,
) -> (Vec<JournalOp>, Vec<(oneshot::Sender<Answer>, Awaits)>) {
    let mut lines = lines.iter().cloned();
    let mut ops = Vec::with_capacity(entries.len());
    let mut waiting = Vec::with_capacity(entries.len());
    for (entry, done) in entries {
        let (op, awaits) = match (entry, refused) {
            (Entry::Journal(op), _) => (op, Awaits::Journal),
            (Entry::Audit | Entry::Tied(..), Some(refused)) => {
                let _ = done.send(Err(refused.clone()));
                continue;
            }
            (Entry::Audit, None) => (
                JournalOp::Audit(lines.next().expect("one line per event")),
                Awaits::Audit,
            ),
            (Entry::Tied(change, unjournaled), None) => {
                let audit = lines.next().expect("one line per event");
                let op = match change {
                    Change::Save(record) => JournalOp::Audited { audit, record },
                    Change::Remove(handle) => JournalOp::AuditedRemove { audit, handle },
                };
                let awaits = match unjournaled {
                    IfNotJournaled::AuditAlone => Awaits::Both,
                    IfNotJournaled::Neither => Awaits::Change,
                };
                (op, awaits)
            }
        };
        ops.push(op);
        waiting.push((done, awaits));
    }
    (ops, waiting)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(handle: &str, soon: bool) -> Pending {
        Pending {
            work: Work::Journal(JournalOp::Remove(handle.into())),
            done: oneshot::channel().0,
            soon,
        }
    }

    fn handles(batch: &[Pending]) -> Vec<String> {
        batch
            .iter()
            .map(|p| match &p.work {
                Work::Journal(JournalOp::Remove(handle)) => handle.clone(),
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn a_record_nobody_waits_for_waits_for_company_then_commits_alone() {
        let (queue, work) = mpsc::channel();
        let started = std::time::Instant::now();
        let batch = gather(pending("soon", true), &work);
        assert!(
            started.elapsed() >= SOON,
            "it did not wait for others to join"
        );
        assert_eq!(handles(&batch), ["soon"]);
        drop(queue);
    }

    #[test]
    fn a_record_somebody_waits_for_takes_the_waiting_ones_along_at_once() {
        let (queue, work) = mpsc::channel();
        queue.send(pending("also soon", true)).unwrap();
        queue.send(pending("awaited", false)).unwrap();
        let batch = gather(pending("soon", true), &work);
        assert_eq!(handles(&batch), ["soon", "also soon", "awaited"]);
        // And one that is awaited from the start does not wait for anything.
        queue.send(pending("behind", true)).unwrap();
        let batch = gather(pending("first", false), &work);
        assert_eq!(handles(&batch), ["first", "behind"]);
    }

    #[test]
    fn at_shutdown_a_waiting_record_is_committed() {
        let (queue, work) = mpsc::channel::<Pending>();
        drop(queue);
        assert_eq!(handles(&gather(pending("last", true), &work)), ["last"]);
    }
}
