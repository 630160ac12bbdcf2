//! The audit log: JSON Lines, append-only, one record per event, each durable before the
//! helper acts on it, each carrying the hash of the previous record.
//!
//! Durable how: while the helper runs, a commit's records go into the job journal first, whose
//! sync is what makes them durable (one sync per commit for audit and job records together),
//! and then into the log (see [`ahead`]); the log is synced every 64 KiB and always before the
//! journal is compacted, and at start whatever the journal kept that the log lost or holds
//! damaged is written back ([`AuditLog::restore`]).
//!
//! A line is a JSON object whose last member is `"hash"`: the SHA-256 (hex) of the line's bytes
//! without that member, i.e. of `{…,"prev":"<previous hash>"}`. Because `prev` is inside what
//! is hashed, editing, removing or reordering any line breaks the chain at that line, which
//! `verify` names.

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

mod ahead;
pub(crate) use ahead::Chained;
pub use ahead::KeptAudit;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PeerIdentity {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// One event. Fields that do not apply are omitted.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditEvent {
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerIdentity>,
    /// The client name the front claims; never verified, recorded as a claim.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claimed_client: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orguser: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub github: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_preview: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    time: String,
    #[serde(flatten)]
    event: &'a AuditEvent,
    #[serde(skip_serializing_if = "Option::is_none")]
    claimed_client_note: Option<&'static str>,
    prev: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("audit log {path}: {message}")]
    Corrupt { path: String, message: String },
    /// A group commit's failure, as the writer reported it.
    #[error("{0}")]
    Commit(String),
}

struct Writer {
    path: PathBuf,
    /// Set when the log can no longer be trusted to take records (a write or sync failed, or
    /// could not be undone): every later append is refused (fail closed) rather than chained
    /// onto a damaged file. Records the journal kept go back into the log at the next start.
    damaged: Option<String>,
    seq: u64,
    prev: String,
    /// The log (as the last commit opened it) and how many bytes were written to it since its
    /// last sync: durable in the job journal meanwhile.
    unsynced: Option<(File, u64)>,
}

#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Mutex<Writer>>,
    /// The group-commit writer, once started (`commit::start`); before that (and in tests)
    /// each append is committed on its own.
    committer: Arc<std::sync::OnceLock<crate::commit::Committer>>,
}

impl AuditLog {
    /// Open (creating, mode 0600) and find the chain's head from the last line. A torn last
    /// record (a write the crash interrupted before its fsync returned, so nothing acted on it)
    /// is cut off; the returned note says so, for the log itself to record.
    pub fn open(path: &Path) -> Result<(AuditLog, Option<String>), AuditError> {
        let io = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        let created = !path.exists();
        let mut file = open_for_append(path).map_err(io)?;
        if created && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Its name durable before any record in it is: the log is synced before each
            // compaction drops the journal's copies of its records.
            crate::store::sync_dir(dir).map_err(io)?;
        }
        let repaired = cut_torn_tail(&mut file).map_err(io)?;
        let (seq, prev) = last_link(&mut file).map_err(io)?;
        let log = AuditLog {
            inner: Arc::new(Mutex::new(Writer {
                path: path.to_owned(),
                seq,
                prev,
                damaged: None,
                unsynced: None,
            })),
            committer: Arc::default(),
        };
        let note = repaired.map(|bytes| {
            format!(
                "cut {bytes} bytes of a torn record from the end of {}",
                path.display()
            )
        });
        Ok((log, note))
    }

    pub(crate) fn attach(&self, committer: crate::commit::Committer) {
        let _ = self.committer.set(committer);
    }

    /// Append and fsync one record. Blocking: call from a blocking context.
    pub fn append_blocking(&self, event: &AuditEvent) -> Result<(), AuditError> {
        self.append_many_blocking(std::slice::from_ref(event))
    }

    /// Append `events` in order, chained, with one `fdatasync` for all of them (before the
    /// writer runs, and for tests). All or nothing: a failed write is cut off again.
    pub fn append_many_blocking(&self, events: &[AuditEvent]) -> Result<(), AuditError> {
        self.chain(events)?.write_and_sync()
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Append from async code without blocking a runtime worker on fsync: through the group
    /// commit when it runs. Durable once it returns Ok.
    pub async fn append(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.append_in_order(event).await
    }

    /// [`AuditLog::append`], queued now: in order with (and perhaps in one commit with) what is
    /// queued after it.
    pub fn append_in_order(
        &self,
        event: AuditEvent,
    ) -> impl std::future::Future<Output = Result<(), AuditError>> + Send + use<> {
        self.append_queued(event, false)
    }

    fn append_queued(
        &self,
        event: AuditEvent,
        soon: bool,
    ) -> impl std::future::Future<Output = Result<(), AuditError>> + Send + use<> {
        // Queued now, or (before the writer runs) kept for a commit of its own.
        let queued = match self.committer.get() {
            Some(committer) => Ok(committer.audit(event, soon)),
            None => Err(event),
        };
        let log = self.clone();
        async move {
            match queued {
                Ok(durable) => durable.await.map_err(AuditError::Commit),
                Err(event) => log.append_unqueued(event).await,
            }
        }
    }

    async fn append_unqueued(&self, event: AuditEvent) -> Result<(), AuditError> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || log.append_blocking(&event))
            .await
            .unwrap_or_else(|join| {
                Err(AuditError::Corrupt {
                    path: String::new(),
                    message: format!("audit writer panicked: {join}"),
                })
            })
    }
}

fn open_for_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
}

/// If the file does not end with a newline, cut it back to its last complete line. Returns how
/// many bytes were cut.
fn cut_torn_tail(file: &mut File) -> std::io::Result<Option<u64>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(256 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.take(len - start).read_to_end(&mut tail)?;
    if tail.last() == Some(&b'\n') {
        return Ok(None);
    }
    let keep = match tail.iter().rposition(|&b| b == b'\n') {
        Some(at) => start + at as u64 + 1,
        None if start == 0 => 0,
        None => {
            return Err(std::io::Error::other(
                "the last 256 KiB hold no complete record; refusing to guess where the log ends",
            ));
        }
    };
    file.set_len(keep)?;
    file.sync_all()?;
    Ok(Some(len - keep))
}

/// Sequence number and hash of the last complete line.
fn last_link(file: &mut File) -> std::io::Result<(u64, String)> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok((0, GENESIS.to_owned()));
    }
    let start = len.saturating_sub(256 * 1024);
    file.seek(SeekFrom::Start(start))?;
    // Bytes, not a string: the window may begin inside a multibyte character (any client's
    // claimed name can put emoji in a record), which must not stop the helper from starting.
    let mut tail = Vec::new();
    file.take(len - start).read_to_end(&mut tail)?;
    let mut lines: Vec<&[u8]> = tail.split(|&b| b == b'\n').collect();
    if start > 0 {
        // The first line of the window is (most likely) the end of an earlier record.
        lines.remove(0);
    }
    for line in lines.into_iter().rev() {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(line)
            && let (Some(seq), Some(hash)) = (value["seq"].as_u64(), value["hash"].as_str())
        {
            return Ok((seq, hash.to_owned()));
        }
    }
    Err(std::io::Error::other(
        "no complete record in the last 256 KiB; refusing to start a new chain",
    ))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Check the chain. Returns the number of records, or the first broken line and why.
pub fn verify(path: &Path) -> Result<u64, AuditError> {
    let io_error = |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let mut prev = GENESIS.to_owned();
    let mut expected_seq = 1u64;
    for (index, line) in BufReader::new(&file).lines().enumerate() {
        let line = line.map_err(io_error)?;
        prev = verify_link(&line, &prev, expected_seq).map_err(|mut message| {
            if torn_at_end(path, &line) {
                message.push_str(
                    " (the log's last line, with no newline: a write a crash interrupted, which \
                     the helper cuts off and writes back from its job journal at its next start)",
                );
            }
            AuditError::Corrupt {
                path: path.display().to_string(),
                message: format!("line {}: {message}", index + 1),
            }
        })?;
        expected_seq += 1;
    }
    Ok(expected_seq - 1)
}

/// Whether `line` is the end of the file at `path`, unterminated.
fn torn_at_end(path: &Path, line: &str) -> bool {
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let Ok(len) = file.seek(SeekFrom::End(0)) else {
        return false;
    };
    let mut last = [0u8; 1];
    let ends_unterminated = len > 0
        && file.seek(SeekFrom::Start(len - 1)).is_ok()
        && file.read_exact(&mut last).is_ok()
        && last[0] != b'\n';
    ends_unterminated
        && file
            .seek(SeekFrom::Start(len.saturating_sub(line.len() as u64)))
            .is_ok()
        && {
            let mut tail = Vec::new();
            file.read_to_end(&mut tail).is_ok() && tail == line.as_bytes()
        }
}

/// One record: its own hash over its content, and its place in the chain (`prev`, the hash of
/// the record before; `seq`, its number). Its hash, or why the chain breaks here.
fn verify_link(line: &str, prev: &str, seq: u64) -> Result<String, String> {
    const SUFFIX_LEN: usize = ",\"hash\":\"\"}".len() + 64;
    if line.len() < SUFFIX_LEN || !line.ends_with("\"}") {
        return Err("not a complete audit record".into());
    }
    let (body_open, suffix) = line.split_at(line.len() - SUFFIX_LEN);
    let Some(stated) = suffix
        .strip_prefix(",\"hash\":\"")
        .and_then(|s| s.strip_suffix("\"}"))
    else {
        return Err("the record does not end with its hash".into());
    };
    let body = format!("{body_open}}}");
    if sha256_hex(&body) != stated {
        return Err("the record was edited (its hash does not match its content)".into());
    }
    let value: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("not JSON: {e}"))?;
    if value["prev"].as_str() != Some(prev) {
        return Err(
            "the chain is broken here: a record before it was removed, reordered or edited".into(),
        );
    }
    if value["seq"].as_u64() != Some(seq) {
        return Err(format!(
            "sequence number {} where {seq} was expected",
            value["seq"]
        ));
    }
    Ok(stated.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_last_link_is_found_when_the_window_starts_inside_a_character() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // A record full of four-byte characters, then a short one: for every offset of the
        // window's start within a character, the chain's last link is still found.
        for shift in 0..4 {
            let pad = "x".repeat(shift);
            let first = format!(
                "{{\"seq\":1,\"hash\":\"aa\",\"claimed_client\":\"{pad}{}\"}}\n",
                "😀".repeat(70_000)
            );
            let last = "{\"seq\":2,\"hash\":\"bb\"}\n";
            std::fs::write(&path, format!("{first}{last}")).unwrap();
            let mut file = File::open(&path).unwrap();
            assert_eq!(
                last_link(&mut file).unwrap(),
                (2, "bb".to_owned()),
                "shift {shift}"
            );
        }
    }

    fn write_log(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let (log, _) = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.append_blocking(&AuditEvent {
                event: "dispatch_accepted",
                handle: Some(format!("d-{i}")),
                outcome: "accepted".into(),
                claimed_client: Some("claude".into()),
                ..Default::default()
            })
            .unwrap();
        }
        path
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn rewrite(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    fn event(handle: &str) -> AuditEvent {
        AuditEvent {
            event: "dispatch_accepted",
            handle: Some(handle.into()),
            outcome: "accepted".into(),
            ..Default::default()
        }
    }

    /// What the journal keeps of a log's lines: each with its offset.
    fn kept(path: &Path) -> Vec<KeptAudit> {
        let mut at = 0;
        lines(path)
            .into_iter()
            .map(|line| {
                let record = KeptAudit { at, line };
                at += record.line.len() as u64 + 1;
                record
            })
            .collect()
    }

    #[test]
    fn chained_records_reach_the_log_only_when_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 2);
        let (log, _) = AuditLog::open(&path).unwrap();
        let chained = log.chain(&[event("d-x"), event("d-y")]).unwrap();
        let offsets: Vec<u64> = chained.lines().iter().map(|k| k.at).collect();
        assert_eq!(offsets[0], std::fs::metadata(&path).unwrap().len());
        assert_eq!(
            lines(&path).len(),
            2,
            "nothing written before the journal has them"
        );
        drop(chained);
        log.chain(&[event("d-z")]).unwrap().write().unwrap();
        assert!(log.unsynced_bytes() > 0);
        log.sync().unwrap();
        assert_eq!(log.unsynced_bytes(), 0);
        assert_eq!(verify(&path).unwrap(), 3);
        assert!(lines(&path)[2].contains("d-z"));
    }

    #[test]
    fn records_the_journal_kept_that_a_crash_took_go_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 5);
        let all = lines(&path);
        let journal = kept(&path);
        // A crash took the last two from the log before its sync; the journal kept four.
        rewrite(&path, &all[..3]);
        let (log, _) = AuditLog::open(&path).unwrap();
        let note = log.restore(&journal[1..]).unwrap().expect("a note");
        assert!(note.contains("wrote back 2 records (seq 4 to 5)"), "{note}");
        assert!(!note.contains("replaced"), "{note}");
        assert_eq!(lines(&path), all);
        // The chain goes on from them, and nothing is written twice.
        assert_eq!(log.restore(&journal).unwrap(), None);
        log.append_blocking(&event("d-6")).unwrap();
        assert_eq!(verify(&path).unwrap(), 6);
    }

    #[test]
    fn a_damaged_unsynced_stretch_is_rewritten_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 5);
        let all = lines(&path);
        let journal = kept(&path);
        // A power loss left zeros where record 3 was, and records 4 and 5 whole.
        let mut bytes = std::fs::read(&path).unwrap();
        let third = journal[2].at as usize..journal[2].at as usize + journal[2].line.len();
        bytes[third].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        assert!(verify(&path).is_err());
        let (log, _) = AuditLog::open(&path).unwrap();
        let note = log.restore(&journal).unwrap().expect("a note");
        assert!(note.contains("wrote back 3 records (seq 3 to 5)"), "{note}");
        assert!(note.contains("damaged bytes were replaced"), "{note}");
        assert_eq!(lines(&path), all);
        assert_eq!(verify(&path).unwrap(), 5);
    }

    #[test]
    fn a_damaged_end_after_every_kept_record_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3);
        let journal = kept(&path);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"\0\0\0\0\"seq\":4}\n");
        std::fs::write(&path, &bytes).unwrap();
        let (log, _) = AuditLog::open(&path).unwrap();
        let note = log.restore(&journal).unwrap().expect("a note");
        assert!(note.contains("cut 13 damaged bytes"), "{note}");
        log.append_blocking(&event("d-4")).unwrap();
        assert_eq!(verify(&path).unwrap(), 4);
    }

    #[test]
    fn kept_records_that_do_not_continue_a_replaced_log_are_appended_and_said_so() {
        let dir = tempfile::tempdir().unwrap();
        let old = write_log(dir.path(), 4);
        let journal = kept(&old);
        // The log was replaced by a shorter one of another chain while the helper was down:
        // nothing of it is cut.
        let other = tempfile::tempdir().unwrap();
        let path = write_log(other.path(), 2);
        let before = lines(&path);
        let (log, _) = AuditLog::open(&path).unwrap();
        let note = log.restore(&journal[2..]).unwrap().expect("a note");
        assert!(note.contains("wrote back 2 records (seq 3 to 4)"), "{note}");
        assert!(note.contains("do not continue this log's chain"), "{note}");
        assert_eq!(lines(&path)[..2], before[..]);
        assert_eq!(lines(&path).len(), 4);
        // verify names the break rather than passing it.
        assert!(verify(&path).is_err());
    }

    #[test]
    fn a_real_log_verifies_and_reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3);
        assert_eq!(verify(&path).unwrap(), 3);
        let (log, repaired) = AuditLog::open(&path).unwrap();
        assert!(repaired.is_none());
        log.append_blocking(&AuditEvent {
            event: "lost",
            outcome: "lost".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(verify(&path).unwrap(), 4);
        assert!(
            lines(&path)[0]
                .contains("\"claimed_client_note\":\"claimed by the front, not verified\"")
        );
    }

    #[test]
    fn a_torn_last_record_is_cut_at_open_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 2);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        let torn = b"{\"seq\":3,\"time\":\"2026";
        file.write_all(torn).unwrap();
        drop(file);
        let (log, repaired) = AuditLog::open(&path).unwrap();
        let note = repaired.unwrap();
        let expected = format!("cut {} bytes of a torn record", torn.len());
        assert!(note.starts_with(&expected), "{note}");
        log.append_blocking(&AuditEvent {
            event: "helper_started",
            outcome: "serving".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(verify(&path).unwrap(), 3);
    }

    #[test]
    fn an_edited_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3);
        let mut all = lines(&path);
        all[1] = all[1].replace("d-1", "d-9");
        rewrite(&path, &all);
        let err = verify(&path).unwrap_err().to_string();
        assert!(err.contains("line 2: the record was edited"), "{err}");
    }

    #[test]
    fn a_removed_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3);
        let mut all = lines(&path);
        all.remove(1);
        rewrite(&path, &all);
        let err = verify(&path).unwrap_err().to_string();
        assert!(err.contains("line 2: the chain is broken"), "{err}");
    }

    #[test]
    fn reordered_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3);
        let mut all = lines(&path);
        all.swap(1, 2);
        rewrite(&path, &all);
        let err = verify(&path).unwrap_err().to_string();
        assert!(err.contains("line 2: the chain is broken"), "{err}");
    }

    #[test]
    fn a_rehashed_edit_still_breaks_the_next_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 3);
        let mut all = lines(&path);
        // Edit line 1 and recompute its own hash: line 2's "prev" no longer matches.
        let body_end = all[0].len() - (",\"hash\":\"\"}".len() + 64);
        let body = format!("{}}}", &all[0][..body_end]).replace("d-0", "d-X");
        all[0] = format!(
            "{},\"hash\":\"{}\"}}",
            &body[..body.len() - 1],
            sha256_hex(&body)
        );
        rewrite(&path, &all);
        let err = verify(&path).unwrap_err().to_string();
        assert!(err.contains("line 2: the chain is broken"), "{err}");
    }

    #[test]
    fn a_truncated_tail_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 2);
        let mut all = lines(&path);
        let cut = all[1].len() / 2;
        all[1].truncate(cut);
        rewrite(&path, &all);
        let err = verify(&path).unwrap_err().to_string();
        assert!(err.contains("line 2: not a complete audit record"), "{err}");
    }
}
