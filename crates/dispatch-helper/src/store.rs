//! Durable job state, in `<state_dir>/jobs/`: a snapshot (`snapshot.jsonl`, one record per
//! line) and a journal (`journal.jsonl`, appended: `{"save":record}`, `{"remove":handle}`, and
//! the audit records it keeps durable for the audit log, `{"audit":line}` and a dispatch's
//! acceptance with its record, `{"accepted":{"audit":line,"record":record}}`).
//! Appends are group-committed (see `commit`): one `fdatasync` covers every record written
//! meanwhile, and nobody is told a record is saved before that. At open the snapshot and the
//! journal are read back (a torn last journal line, a write the crash interrupted before its
//! sync returned, is cut), and compaction folds the journal into a new snapshot (written
//! aside, synced, renamed). Records of older helpers (one `<handle>.json` each) are read and
//! folded in too. Only an index (where each record's latest line is) stays in memory.

use crate::audit::KeptAudit;
use dispatch_proto::JobView;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// Everything its owner may see: argv, output tails and sandbox included.
    #[serde(flatten)]
    pub job: JobView,
    /// The peer uid (SO_PEERCRED) that created the job: the only uid that can see it.
    pub owner_uid: u32,
    pub claimed_client: Option<String>,
    /// Process group of a running lane and its start time (clock ticks since boot, from
    /// /proc), so a stale group is only ever signalled if it is still the same process.
    pub pgid: Option<i32>,
    pub pgid_start_ticks: Option<u64>,
    /// While queued: the request in full, to be validated again and started when a slot
    /// frees (the helper's own state, root-only like the rest of this record).
    #[serde(default)]
    pub queued: Option<QueuedRequest>,
    /// The job's own directory (made by the helper; removed with this record unless the
    /// configuration keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueuedRequest {
    pub task: String,
}

/// How much of a record a view carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Status and list: no argv, no output.
    Summary,
    /// Detailed list: argv, no output.
    Argv,
    /// Result: everything.
    Full,
}

impl JobRecord {
    pub fn view(&self, detail: Detail) -> JobView {
        let mut view = self.job.clone();
        if detail == Detail::Summary {
            view.argv = None;
        }
        if detail != Detail::Full {
            view.stdout = None;
            view.stderr = None;
        }
        view
    }
}

/// The journal is folded into a new snapshot once it holds more bytes than the snapshot (and
/// at least this many): a compaction rewrites every live record, so its cost is paid for by
/// as many bytes written since the last one, whatever the records' size.
const COMPACT_MIN_BYTES: u64 = 4 << 20;

/// One journal line.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalOp {
    Save(Box<JobRecord>),
    Remove(String),
    /// An audit record's line, kept durable here for the audit log (see `audit`).
    Audit(KeptAudit),
    /// A job record and the audit record's line of the event that made it (a dispatch
    /// accepted, a lane ended, a job found lost), in one line: a crash keeps both or neither.
    /// Named for the first such event in the journal's text.
    #[serde(rename = "accepted")]
    Audited {
        audit: KeptAudit,
        record: Box<JobRecord>,
    },
    /// A job's removal (deleted, pruned) and its audit record's line, in one line.
    #[serde(rename = "removed")]
    AuditedRemove {
        audit: KeptAudit,
        handle: String,
    },
}

impl JournalOp {
    /// The record this line saves, if any.
    fn saved(&self) -> Option<&JobRecord> {
        match self {
            JournalOp::Save(record) | JournalOp::Audited { record, .. } => Some(record),
            JournalOp::Remove(_) | JournalOp::AuditedRemove { .. } | JournalOp::Audit(_) => None,
        }
    }

    /// The job this line removes, if any.
    fn removed(&self) -> Option<&str> {
        match self {
            JournalOp::Remove(handle) | JournalOp::AuditedRemove { handle, .. } => Some(handle),
            JournalOp::Save(_) | JournalOp::Audited { .. } | JournalOp::Audit(_) => None,
        }
    }

    /// The audit record's line this one keeps, if any.
    fn audit_line(&self) -> Option<&KeptAudit> {
        match self {
            JournalOp::Audit(line)
            | JournalOp::Audited { audit: line, .. }
            | JournalOp::AuditedRemove { audit: line, .. } => Some(line),
            JournalOp::Save(_) | JournalOp::Remove(_) => None,
        }
    }
}

/// Where a record's latest line is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Snapshot {
        offset: u64,
        len: u64,
    },
    Journal {
        offset: u64,
        len: u64,
    },
    /// A `<handle>.json` of an older helper, until the next compaction.
    Legacy(PathBuf),
}

struct State {
    index: HashMap<String, Location>,
    /// The journal's length, and the snapshot's as last written or read.
    journal_bytes: u64,
    snapshot_bytes: u64,
    /// Every `<handle>.json` of an older helper found at open: all are deleted by the next
    /// compaction, whether or not a later line superseded them (one left behind would come
    /// back at a later open, after its record was removed).
    legacy: Vec<PathBuf>,
    /// Set when a failed append could not be undone: later appends are refused (fail closed)
    /// rather than written after a damaged line.
    damaged: Option<String>,
    /// The audit records the journal held at open, in order, until taken for the audit log.
    kept_audit: Vec<KeptAudit>,
}

#[derive(Clone)]
pub struct JobStore {
    dir: PathBuf,
    state: Arc<Mutex<State>>,
    /// The group-commit writer, once started (`commit::start`); before that, and for the
    /// `jobs` command, appends are committed one by one.
    committer: Arc<std::sync::OnceLock<crate::commit::Committer>>,
}

fn io_error(message: impl Into<String>) -> std::io::Error {
    std::io::Error::other(message.into())
}

/// A record whose bytes are there but are not a record.
fn damaged(why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string())
}

/// Whether a failed read found a damaged record (not JSON, not a record, or cut short), as
/// opposed to failing to read at all.
fn is_damage(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
    )
}

impl JobStore {
    /// The helper's store: a torn journal tail is cut, interrupted temp files go.
    pub fn open(state_dir: &Path) -> std::io::Result<JobStore> {
        JobStore::open_as(state_dir, true)
    }

    /// For reading beside a running helper (`dispatch-helper jobs`): nothing is changed on
    /// disk, so a line the helper is writing just now is only left out, never cut.
    pub fn open_read_only(state_dir: &Path) -> std::io::Result<JobStore> {
        JobStore::open_as(state_dir, false)
    }

    fn open_as(state_dir: &Path, writable: bool) -> std::io::Result<JobStore> {
        let dir = state_dir.join("jobs");
        if writable {
            create_dir_durably(&dir, 0o700)?;
        }
        let mut state = State {
            index: HashMap::new(),
            journal_bytes: 0,
            snapshot_bytes: 0,
            legacy: Vec::new(),
            damaged: None,
            kept_audit: Vec::new(),
        };
        read_legacy(&dir, &mut state, writable)?;
        state.snapshot_bytes = read_snapshot(&dir.join("snapshot.jsonl"), &mut state.index)?;
        replay_journal(&dir.join("journal.jsonl"), &mut state, writable)?;
        let store = JobStore {
            dir,
            state: Arc::new(Mutex::new(state)),
            committer: Arc::default(),
        };
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("journal.jsonl")
    }

    /// The audit records the journal held when it was opened, in order (once): at start, for
    /// [`crate::audit::AuditLog::restore`], before the first compaction drops them.
    pub fn take_kept_audit(&self) -> Vec<KeptAudit> {
        std::mem::take(&mut self.lock().kept_audit)
    }

    pub(crate) fn attach(&self, committer: crate::commit::Committer) {
        let _ = self.committer.set(committer);
    }

    /// The group-commit writer, once it runs.
    pub(crate) fn committer(&self) -> Option<&crate::commit::Committer> {
        self.committer.get()
    }

    /// Durable once it returns Ok: through the group-commit writer when it runs.
    pub async fn save_async(&self, record: &JobRecord) -> std::io::Result<()> {
        let op = JournalOp::Save(Box::new(record.clone()));
        self.append_async(op).await
    }

    /// Queue a save now, in order with (and perhaps in one commit with) every later one, and
    /// return what says when it is durable. Without the writer (before it starts), it is saved
    /// on the spot.
    pub fn save_in_order(
        &self,
        record: &JobRecord,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'static {
        self.save_queued(record, false)
    }

    /// [`JobStore::save_in_order`] for a record nobody waits for: synced with the next commit,
    /// or by itself within `commit::SOON`, rather than costing a sync of its own at once.
    pub fn save_soon(
        &self,
        record: &JobRecord,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'static {
        self.save_queued(record, true)
    }

    fn save_queued(
        &self,
        record: &JobRecord,
        soon: bool,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'static {
        self.queue_op(JournalOp::Save(Box::new(record.clone())), soon)
    }

    /// Queue `op` now (see [`JobStore::save_in_order`]); without the writer, appended on the
    /// spot.
    fn queue_op(
        &self,
        op: JournalOp,
        soon: bool,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send + use<> {
        let queued = match self.committer.get() {
            Some(committer) => Ok(committer.queue_journal(op, soon)),
            None => Err(self.append_now(vec![op])),
        };
        async move {
            match queued {
                Ok(durable) => durable.await,
                Err(appended) => appended,
            }
        }
    }

    pub async fn remove_async(&self, handle: &str) -> std::io::Result<()> {
        self.append_async(JournalOp::Remove(handle.to_owned()))
            .await
    }

    async fn append_async(&self, op: JournalOp) -> std::io::Result<()> {
        match self.committer.get() {
            Some(committer) => committer.queue_journal(op, false).await,
            None => {
                let store = self.clone();
                tokio::task::spawn_blocking(move || store.append_now(vec![op]))
                    .await
                    .map_err(std::io::Error::other)?
            }
        }
    }

    pub async fn load_async(&self, handle: &str) -> std::io::Result<JobRecord> {
        let (store, handle) = (self.clone(), handle.to_owned());
        tokio::task::spawn_blocking(move || store.load(&handle))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Save one record now (blocking), committed on its own.
    pub fn save(&self, record: &JobRecord) -> std::io::Result<()> {
        self.append_now(vec![JournalOp::Save(Box::new(record.clone()))])
    }

    /// Append `ops` to the journal with one `fdatasync` (blocking): the writer's commit, and
    /// the path for single saves. All or nothing: a failed write is cut off again.
    pub(crate) fn append_now(&self, ops: Vec<JournalOp>) -> std::io::Result<()> {
        let mut lines = Vec::with_capacity(ops.len());
        for op in &ops {
            let mut line = serde_json::to_vec(op).map_err(std::io::Error::other)?;
            line.push(b'\n');
            lines.push(line);
        }
        let mut state = self.lock();
        if let Some(why) = &state.damaged {
            return Err(io_error(why.clone()));
        }
        let path = self.journal_path();
        // Opened per commit, so a journal (or a jobs directory) that was replaced or made
        // unwritable is noticed at once rather than written to an unlinked inode.
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        if created {
            // Its name durable before anything in it is acknowledged.
            sync_dir(&self.dir)?;
        }
        let before = file.metadata()?.len();
        let bytes: Vec<u8> = lines.concat();
        if let Err(error) = file.write_all(&bytes).and_then(|()| sync_data(&file)) {
            if file
                .set_len(before)
                .and_then(|()| sync_data(&file))
                .is_err()
            {
                state.damaged = Some(format!(
                    "the job journal {}: a failed write could not be undone ({error}); restart the helper",
                    path.display()
                ));
            }
            return Err(error);
        }
        let mut offset = before;
        for (op, line) in ops.iter().zip(&lines) {
            let len = line.len() as u64 - 1;
            index_line(&mut state.index, op, Location::Journal { offset, len });
            offset += line.len() as u64;
        }
        state.journal_bytes = offset;
        Ok(())
    }

    /// Whether a failed write could not be undone: the journal may hold part of it.
    pub(crate) fn is_damaged(&self) -> bool {
        self.lock().damaged.is_some()
    }

    pub fn load(&self, handle: &str) -> std::io::Result<JobRecord> {
        // Read under the lock: a compaction may not move the record meanwhile.
        let state = self.lock();
        let at = state.index.get(handle).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no record of {handle}"),
            )
        })?;
        self.read(at)
    }

    fn read(&self, at: &Location) -> std::io::Result<JobRecord> {
        self.read_with(at, &mut Readers::default())
    }

    /// As [`JobStore::read`], through files opened once for a pass over many records.
    fn read_with(&self, at: &Location, readers: &mut Readers) -> std::io::Result<JobRecord> {
        let parse = |bytes: &[u8]| serde_json::from_slice(bytes).map_err(damaged);
        match at {
            // Gone since it was listed: a running helper's compaction moved it into its new
            // snapshot, as a read-only `jobs` beside it may see (which then leaves it out and
            // says so: run it again). A helper itself folds these files in at its start.
            Location::Legacy(path) => match fs::read(path) {
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    Err(damaged(format!("{} is gone: {error}", path.display())))
                }
                read => parse(&read?),
            },
            Location::Snapshot { offset, len } => {
                let file = opened(&mut readers.snapshot, &self.dir.join("snapshot.jsonl"))?;
                parse(&read_at(file, *offset, *len)?)
            }
            Location::Journal { offset, len } => {
                let file = opened(&mut readers.journal, &self.journal_path())?;
                match serde_json::from_slice(&read_at(file, *offset, *len)?) {
                    Ok(JournalOp::Save(record) | JournalOp::Audited { record, .. }) => Ok(*record),
                    Ok(
                        JournalOp::Remove(_)
                        | JournalOp::AuditedRemove { .. }
                        | JournalOp::Audit(_),
                    ) => Err(damaged("the index points at a line that saves no record")),
                    Err(error) => Err(damaged(error)),
                }
            }
        }
    }

    /// Every record, plus a warning for each that is damaged. Any other failure to read one
    /// (an I/O error, no file descriptor left) fails the whole load: a record left out of the
    /// helper's table would be a job nobody marks lost or starts again.
    pub fn load_all(&self) -> std::io::Result<(Vec<JobRecord>, Vec<String>)> {
        let state = self.lock();
        let mut records = Vec::with_capacity(state.index.len());
        let mut warnings = Vec::new();
        let mut readers = Readers::default();
        for (handle, at) in &state.index {
            match self.read_with(at, &mut readers) {
                Ok(record) => records.push(record),
                Err(why) if is_damage(&why) => {
                    warnings.push(format!("job record {handle} unreadable: {why}"))
                }
                Err(why) => {
                    return Err(std::io::Error::new(
                        why.kind(),
                        format!("job record {handle}: {why}"),
                    ));
                }
            }
        }
        Ok((records, warnings))
    }

    /// Whether the journal has grown enough to fold into a new snapshot.
    pub(crate) fn wants_compaction(&self) -> bool {
        let state = self.lock();
        state.journal_bytes >= state.snapshot_bytes.max(COMPACT_MIN_BYTES)
            || !state.legacy.is_empty()
    }

    /// Fold the journal (and older helpers' files) into a new snapshot: every live record is
    /// written aside, synced and renamed over the snapshot before the journal is emptied, so a
    /// crash at any point leaves a snapshot and a journal that replay to the same records.
    pub fn compact(&self) -> std::io::Result<()> {
        let mut state = self.lock();
        let snapshot = self.dir.join("snapshot.jsonl");
        let aside = self.dir.join(".snapshot.jsonl.tmp");
        let mut readers = Readers::default();
        let read = |at: &Location| self.read_with(at, &mut readers);
        let (lines, index) = Self::snapshot_lines(&state, read)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&aside)?;
        file.write_all(&lines)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&aside, &snapshot)?;
        // From here the new snapshot holds every record: the old offsets mean nothing.
        state.index = index;
        sync_dir(&self.dir)?;
        let journal = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.journal_path())?;
        journal.set_len(0)?;
        journal.sync_all()?;
        state.journal_bytes = 0;
        state.snapshot_bytes = lines.len() as u64;
        for path in std::mem::take(&mut state.legacy) {
            if let Err(error) = fs::remove_file(&path)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                state.legacy.push(path);
                return Err(error);
            }
        }
        sync_dir(&self.dir)
    }

    /// Every live record as one line, in handle order, and where each will be in the snapshot.
    /// A damaged record is left out (and said so): it must not stop the helper (this runs at
    /// start) or make every later compaction fail. Any other failure to read one stops the
    /// compaction, which leaves the snapshot and the journal as they are: a record left out
    /// here would be gone for good.
    fn snapshot_lines(
        state: &State,
        mut read: impl FnMut(&Location) -> std::io::Result<JobRecord>,
    ) -> std::io::Result<(Vec<u8>, HashMap<String, Location>)> {
        let mut index = HashMap::with_capacity(state.index.len());
        let mut lines = Vec::new();
        let mut handles: Vec<&String> = state.index.keys().collect();
        handles.sort();
        for handle in handles {
            let record = match read(&state.index[handle]) {
                Ok(record) => record,
                Err(error) if is_damage(&error) => {
                    tracing::error!(%error, %handle, "job record damaged; left out of the snapshot");
                    continue;
                }
                Err(error) => {
                    let why = format!("job record {handle}: {error}");
                    return Err(std::io::Error::new(error.kind(), why));
                }
            };
            let line = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
            let (offset, len) = (lines.len() as u64, line.len() as u64);
            lines.extend_from_slice(&line);
            lines.push(b'\n');
            index.insert(handle.clone(), Location::Snapshot { offset, len });
        }
        Ok((lines, index))
    }
}

/// Every sync the store and the audit log make, for the benchmark's "syncs per dispatch".
pub static SYNCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub(crate) fn sync_data(file: &File) -> std::io::Result<()> {
    SYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    file.sync_data()
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    SYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    File::open(dir)?.sync_all()
}

/// Make `dir` and any missing parents (each with `mode`), every new name synced into its
/// parent: a directory a power cut takes back takes every record written in it since.
pub(crate) fn create_dir_durably(dir: &Path, mode: u32) -> std::io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    // Outermost first: each parent holds its child's name once synced.
    for made in missing.iter().rev() {
        if let Some(parent) = made.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn read_at(file: &File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0; len as usize];
    file.read_exact_at(&mut bytes, offset)?;
    Ok(bytes)
}

/// The snapshot and the journal, each opened at its first read and kept for the rest of a pass
/// (a compaction, a load of every record) instead of opened once per record.
#[derive(Default)]
struct Readers {
    snapshot: Option<File>,
    journal: Option<File>,
}

fn opened<'a>(slot: &'a mut Option<File>, path: &Path) -> std::io::Result<&'a File> {
    let file = match slot.take() {
        Some(file) => file,
        None => File::open(path)?,
    };
    Ok(slot.insert(file))
}

/// `<handle>.json` files of helpers before the journal (and their interrupted temp files).
fn read_legacy(dir: &Path, state: &mut State, writable: bool) -> std::io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if !writable && error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            // A write interrupted before its rename: the previous state stands.
            if writable {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        if let Some(handle) = name.strip_suffix(".json") {
            state
                .index
                .insert(handle.to_owned(), Location::Legacy(path.clone()));
            state.legacy.push(path);
        }
    }
    Ok(())
}

/// Index the snapshot's records; its length.
fn read_snapshot(path: &Path, index: &mut HashMap<String, Location>) -> std::io::Result<u64> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut offset = 0u64;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        #[derive(Deserialize)]
        struct Handle {
            handle: String,
        }
        let handle: Handle = serde_json::from_slice(body)
            .map_err(|e| io_error(format!("snapshot {} at byte {offset}: {e}", path.display())))?;
        let at = Location::Snapshot {
            offset,
            len: body.len() as u64,
        };
        index.insert(handle.handle, at);
        offset += line.len() as u64;
    }
    Ok(offset)
}

/// Where the journal's last acknowledged commit ends: after its last newline, or before the
/// first line holding a NUL byte if no whole line follows it. No line the helper writes holds
/// one (JSON escapes control characters), but a power cut during a commit can leave its pages
/// half written, and a filesystem may read back zeros where they did not reach the disk. Every
/// commit syncs everything before it, so nothing from such a line on was acknowledged, as long
/// as it is the journal's damaged end: a whole line after it may have been (zeros in the middle
/// of synced data are the disk's damage, not a commit's), and then nothing is cut and the start
/// stops at the damaged line.
fn torn_end(bytes: &[u8]) -> usize {
    let complete = bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    let Some(nul) = bytes[..complete].iter().position(|&b| b == 0) else {
        return complete;
    };
    let torn = bytes[..nul]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    let after = bytes[nul..complete]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(complete, |at| nul + at + 1);
    let whole_line_after = bytes[after..complete]
        .split(|&b| b == b'\n')
        .any(|line| serde_json::from_slice::<JournalOp>(line).is_ok());
    if whole_line_after { complete } else { torn }
}

/// Where the record a journal line saves now is (or that a removed one is gone).
fn index_line(index: &mut HashMap<String, Location>, op: &JournalOp, at: Location) {
    if let Some(record) = op.saved() {
        index.insert(record.job.handle.clone(), at);
    } else if let Some(handle) = op.removed() {
        index.remove(handle);
    }
}

/// Apply the journal to the index; a torn end (a commit that never returned) is cut off. A
/// damaged line before it stops the helper (nothing guesses).
fn replay_journal(path: &Path, state: &mut State, writable: bool) -> std::io::Result<()> {
    let mut file = match OpenOptions::new().read(true).write(writable).open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut bytes)?;
    let complete = torn_end(&bytes);
    if complete < bytes.len() {
        tracing::warn!(
            journal = %path.display(),
            cut = bytes.len() - complete,
            "the job journal ends in a commit a crash interrupted; its bytes are cut off"
        );
        if writable {
            file.set_len(complete as u64)?;
            file.sync_all()?;
        }
        bytes.truncate(complete);
    }
    let mut offset = 0u64;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        let body = &line[..line.len() - 1];
        let op: JournalOp = serde_json::from_slice(body)
            .map_err(|e| io_error(format!("journal {} at byte {offset}: {e}", path.display())))?;
        let at = Location::Journal {
            offset,
            len: body.len() as u64,
        };
        index_line(&mut state.index, &op, at);
        if let Some(audit) = op.audit_line() {
            state.kept_audit.push(audit.clone());
        }
        offset += line.len() as u64;
    }
    state.journal_bytes = offset;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(handle: &str, state: &str) -> JobRecord {
        serde_json::from_value(serde_json::json!({
            "handle": handle, "orguser": "acme", "repo": "widgets", "github": "acme/widgets",
            "unix_user": "acme", "task_preview": "t", "task_sha256": "00", "state": state,
            "requested_at": "2026-11-30T00:00:00Z", "detail": state, "owner_uid": 1000,
            "stdout": {"text": "out ✓", "total_bytes": 5, "truncated": false}
        }))
        .unwrap()
    }

    fn states(store: &JobStore) -> Vec<(String, String)> {
        let (mut records, warnings) = store.load_all().unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        records.sort_by(|a, b| a.job.handle.cmp(&b.job.handle));
        records
            .into_iter()
            .map(|r| (r.job.handle, r.job.state.as_str().to_owned()))
            .collect()
    }

    fn kept(at: u64, line: &str) -> KeptAudit {
        KeptAudit {
            at,
            line: line.into(),
        }
    }

    #[test]
    fn compaction_leaves_out_a_damaged_record_and_stops_at_a_record_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        store.save(&record("d-1", "Succeeded")).unwrap();
        store.save(&record("d-2", "Queued")).unwrap();
        let d2 = store.lock().index["d-2"].clone();
        let failing = |kind: std::io::ErrorKind| {
            let state = store.lock();
            JobStore::snapshot_lines(&state, |at| {
                if *at == d2 {
                    Err(std::io::Error::new(kind, "as the test says"))
                } else {
                    store.read(at)
                }
            })
        };
        // Damaged: the others are kept.
        let (lines, index) = failing(std::io::ErrorKind::InvalidData).unwrap();
        assert_eq!(index.keys().collect::<Vec<_>>(), ["d-1"]);
        assert!(!lines.is_empty());
        // Not read (EIO, no descriptor left, ...): no snapshot is made without it.
        let Err(error) = failing(std::io::ErrorKind::Other) else {
            panic!("a snapshot was made without a record that could not be read");
        };
        assert!(error.to_string().contains("d-2"), "{error}");
        // A damaged line in the journal is damage, not an I/O error.
        let Location::Journal { offset, len } = d2 else {
            panic!("{d2:?}")
        };
        let file = OpenOptions::new()
            .write(true)
            .open(store.journal_path())
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &vec![b'x'; len as usize], offset).unwrap();
        store.compact().unwrap();
        assert_eq!(
            states(&JobStore::open(dir.path()).unwrap()),
            vec![("d-1".to_owned(), "succeeded".to_owned())]
        );
    }

    #[test]
    fn audited_lines_save_or_remove_their_record_and_audit_lines_are_kept_for_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        store
            .append_now(vec![
                JournalOp::Audit(kept(0, "{\"seq\":1}")),
                JournalOp::Audited {
                    audit: kept(11, "{\"seq\":2}"),
                    record: Box::new(record("d-1", "Running")),
                },
                JournalOp::Save(Box::new(record("d-2", "Queued"))),
                JournalOp::Save(Box::new(record("d-3", "Succeeded"))),
                JournalOp::AuditedRemove {
                    audit: kept(22, "{\"seq\":3}"),
                    handle: "d-3".into(),
                },
            ])
            .unwrap();
        assert_eq!(store.load("d-1").unwrap().job.state.as_str(), "running");
        assert!(store.load("d-3").is_err(), "an audited removal removes");
        drop(store);
        let reopened = JobStore::open(dir.path()).unwrap();
        assert_eq!(
            states(&reopened),
            vec![
                ("d-1".to_owned(), "running".to_owned()),
                ("d-2".to_owned(), "queued".to_owned())
            ]
        );
        assert_eq!(
            reopened.take_kept_audit(),
            vec![
                kept(0, "{\"seq\":1}"),
                kept(11, "{\"seq\":2}"),
                kept(22, "{\"seq\":3}")
            ]
        );
        assert!(reopened.take_kept_audit().is_empty(), "taken once");
        // Compaction keeps the records, not the audit lines (the log is synced before it).
        reopened.compact().unwrap();
        drop(reopened);
        let compacted = JobStore::open(dir.path()).unwrap();
        assert_eq!(states(&compacted).len(), 2);
        assert!(compacted.take_kept_audit().is_empty());
    }

    #[test]
    fn saves_removes_and_reopens_to_the_same_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        store.save(&record("d-1", "Running")).unwrap();
        store
            .append_now(vec![
                JournalOp::Save(Box::new(record("d-2", "Queued"))),
                JournalOp::Save(Box::new(record("d-1", "Succeeded"))),
                JournalOp::Save(Box::new(record("d-3", "Failed"))),
                JournalOp::Remove("d-3".into()),
            ])
            .unwrap();
        let expected = vec![
            ("d-1".to_owned(), "succeeded".to_owned()),
            ("d-2".to_owned(), "queued".to_owned()),
        ];
        assert_eq!(states(&store), expected);
        assert_eq!(store.load("d-1").unwrap().job.stdout.unwrap().text, "out ✓");
        assert!(store.load("d-3").is_err());
        let reopened = JobStore::open(dir.path()).unwrap();
        assert_eq!(states(&reopened), expected);
        // Compacted: the same records from the snapshot, an empty journal, and again after a
        // reopen, with what is saved afterwards on top.
        reopened.compact().unwrap();
        assert_eq!(states(&reopened), expected);
        assert_eq!(fs::metadata(reopened.journal_path()).unwrap().len(), 0);
        reopened.save(&record("d-4", "Lost")).unwrap();
        let again = JobStore::open(dir.path()).unwrap();
        assert_eq!(states(&again).len(), 3);
        assert_eq!(again.load("d-4").unwrap().job.state.as_str(), "lost");
    }

    #[test]
    fn the_journal_is_compacted_once_it_outgrows_the_snapshot_whatever_its_line_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        // Records of 256 KiB each (two full output tails, escaped): 4 MiB of journal is 17
        // lines, far fewer than any line count would have waited for.
        let big = |handle: &str| {
            let mut record = record(handle, "Succeeded");
            record.job.stdout.as_mut().unwrap().text = "\"".repeat(128 << 10);
            JournalOp::Save(Box::new(record))
        };
        let mut lines = 0;
        while !store.wants_compaction() {
            store
                .append_now(vec![big(&format!("d-{}", lines % 12))])
                .unwrap();
            lines += 1;
            assert!(lines < 40, "not compacted after {lines} lines of 256 KiB");
        }
        assert!((16..=18).contains(&lines), "compacted after {lines} lines");
        store.compact().unwrap();
        let snapshot = fs::metadata(dir.path().join("jobs/snapshot.jsonl"))
            .unwrap()
            .len();
        assert!(
            snapshot > 12 * (256 << 10),
            "12 records live: {snapshot} bytes"
        );
        // Now the snapshot (3 MiB) is below the floor: again at 4 MiB of journal.
        let mut after = 0;
        while !store.wants_compaction() {
            store.append_now(vec![big("d-0")]).unwrap();
            after += 1;
        }
        assert_eq!(after, lines);
        // Reopened, it knows both lengths again.
        assert!(JobStore::open(dir.path()).unwrap().wants_compaction());
    }

    #[test]
    fn a_torn_last_journal_line_is_cut_and_the_rest_stands() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        store.save(&record("d-1", "Running")).unwrap();
        let journal = store.journal_path();
        let mut file = OpenOptions::new().append(true).open(&journal).unwrap();
        file.write_all(b"{\"save\":{\"handle\":\"d-2\",\"orgu")
            .unwrap();
        let reopened = JobStore::open(dir.path()).unwrap();
        assert_eq!(
            states(&reopened),
            vec![("d-1".to_owned(), "running".to_owned())]
        );
        assert!(fs::read(&journal).unwrap().ends_with(b"\n"));
    }

    #[test]
    fn a_commit_a_power_cut_left_with_zeroed_pages_is_cut_and_other_damage_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        store.save(&record("d-1", "Running")).unwrap();
        let journal = store.journal_path();
        let acknowledged = fs::metadata(&journal).unwrap().len();
        let line = |op: JournalOp| {
            let mut line = serde_json::to_vec(&op).unwrap();
            line.push(b'\n');
            line
        };
        let saved = |handle: &str| line(JournalOp::Save(Box::new(record(handle, "Running"))));
        // The interrupted commit: a line whose middle page never reached the disk (zeros), and
        // after it a page of zeros ending in a newline. None of it was acknowledged.
        let mut torn = saved("d-2");
        torn.splice(20..20, std::iter::repeat_n(0u8, 4096));
        torn.extend(std::iter::repeat_n(0u8, 4095));
        torn.push(b'\n');
        let append = |bytes: &[u8]| {
            let mut file = OpenOptions::new().append(true).open(&journal).unwrap();
            file.write_all(bytes).unwrap();
        };
        append(&torn);
        drop(store);
        let reopened = JobStore::open(dir.path()).unwrap();
        assert_eq!(
            states(&reopened),
            vec![("d-1".to_owned(), "running".to_owned())]
        );
        assert_eq!(fs::metadata(&journal).unwrap().len(), acknowledged);
        drop(reopened);
        // Zeros followed by a whole line: the line may have been acknowledged, so the start
        // stops at the damage rather than drop it.
        append(&torn);
        append(&saved("d-3"));
        let refused = JobStore::open(dir.path())
            .err()
            .expect("a whole line was dropped");
        assert!(
            refused
                .to_string()
                .contains(&format!("at byte {acknowledged}")),
            "{refused}"
        );
        // As does a damaged line that is no torn write.
        OpenOptions::new()
            .write(true)
            .open(&journal)
            .unwrap()
            .set_len(acknowledged)
            .unwrap();
        append(b"{\"save\":not json}\n");
        append(&line(JournalOp::Remove("d-1".into())));
        let refused = JobStore::open(dir.path())
            .err()
            .expect("a damaged line was skipped");
        assert!(refused.to_string().contains("at byte"), "{refused}");
    }

    #[test]
    fn records_of_an_older_helper_are_read_and_folded_into_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = dir.path().join("jobs");
        fs::create_dir(&jobs).unwrap();
        let old = serde_json::to_vec_pretty(&record("d-9", "Succeeded")).unwrap();
        fs::write(jobs.join("d-9.json"), old).unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        assert!(store.wants_compaction());
        store.compact().unwrap();
        assert!(!jobs.join("d-9.json").exists());
        let reopened = JobStore::open(dir.path()).unwrap();
        assert_eq!(
            states(&reopened),
            vec![("d-9".to_owned(), "succeeded".to_owned())]
        );
        // An older file whose record the snapshot already holds still goes at the next
        // compaction, so a record removed since cannot come back from it.
        let again = serde_json::to_vec(&record("d-9", "Succeeded")).unwrap();
        fs::write(jobs.join("d-9.json"), again).unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        store
            .append_now(vec![JournalOp::Remove("d-9".into())])
            .unwrap();
        store.compact().unwrap();
        assert!(!jobs.join("d-9.json").exists());
        assert!(states(&JobStore::open(dir.path()).unwrap()).is_empty());
    }

    #[test]
    fn a_reader_beside_the_helper_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        store.save(&record("d-1", "Running")).unwrap();
        let journal = store.journal_path();
        // A line the helper is writing at this moment.
        let mut file = OpenOptions::new().append(true).open(&journal).unwrap();
        file.write_all(b"{\"save\":{\"handle\":\"d-2\"").unwrap();
        let before = fs::metadata(&journal).unwrap().len();
        let reader = JobStore::open_read_only(dir.path()).unwrap();
        assert_eq!(states(&reader).len(), 1);
        let after = fs::metadata(&journal).unwrap().len();
        assert_eq!(after, before, "the reader cut the journal");
    }
}
