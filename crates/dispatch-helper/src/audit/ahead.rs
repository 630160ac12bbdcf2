//! The audit log's write-ahead: while the helper runs, a commit's audit records are chained,
//! made durable in the job journal (as [`KeptAudit`] copies), and only then written to the log,
//! so the log never holds a record the journal does not. The log itself is synced now and then
//! (`commit`), always before a compaction drops the journal's copies; at start,
//! [`AuditLog::restore`] writes back whatever of them the log lost or holds damaged.

use super::{AuditError, AuditEvent, AuditLog, GENESIS, Line, Writer, hex, open_for_append};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::MutexGuard;

/// An audit record's line as the journal keeps it, with the offset it has in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptAudit {
    pub at: u64,
    pub line: String,
}

/// Audit records chained after the log's head, written nowhere yet (see [`AuditLog::chain`]).
pub(crate) struct Chained<'a> {
    writer: MutexGuard<'a, Writer>,
    file: File,
    /// The log's length before them.
    before: u64,
    lines: Vec<KeptAudit>,
    /// The chain's head after them.
    head: (u64, String),
}

impl AuditLog {
    /// Chain `events` after the head, and open the log for them: a log that cannot be opened
    /// refuses them here, before anything is written anywhere.
    pub(crate) fn chain(&self, events: &[AuditEvent]) -> Result<Chained<'_>, AuditError> {
        let mut writer = self.writer();
        if let Some(why) = &writer.damaged {
            return Err(writer.corrupt(why.clone()));
        }
        let io = |source| writer_io(&writer, source);
        // Opened per commit, so a log that was replaced or made unwritable is noticed at once
        // (and the dispatch refused) rather than written to an unlinked inode. A log that was
        // removed is started again; `verify` then reports its first line as a broken link.
        let created = !writer.path.exists();
        let file = open_for_append(&writer.path).map_err(io)?;
        if created && let Some(dir) = writer.path.parent() {
            // The new file's name durable before any record in it is acknowledged.
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        let meta = file.metadata().map_err(io)?;
        writer.sync_if_replaced(&meta)?;
        let (mut seq, mut prev) = (writer.seq, writer.prev.clone());
        let mut at = meta.len();
        let mut lines = Vec::with_capacity(events.len());
        for event in events {
            seq += 1;
            let (line, hash) = chained_line(seq, event, &prev);
            prev = hash;
            let len = line.len() as u64 + 1;
            lines.push(KeptAudit { at, line });
            at += len;
        }
        Ok(Chained {
            writer,
            file,
            before: meta.len(),
            lines,
            head: (seq, prev),
        })
    }

    /// Sync the log if records were written to it since its last sync. A failed sync stops
    /// the log for good (the kernel reports a lost write once only; a retry would lie).
    pub(crate) fn sync(&self) -> Result<(), AuditError> {
        self.writer().sync_written()
    }

    /// Bytes written to the log since its last sync.
    pub(crate) fn unsynced_bytes(&self) -> u64 {
        self.writer()
            .unsynced
            .as_ref()
            .map_or(0, |(_, bytes)| *bytes)
    }

    /// At start, before a compaction drops them: make the log hold, byte for byte and where the
    /// journal says, every record the journal `kept` (a crash may have taken or damaged the
    /// log's unsynced end). From the first one it lacks, the log is cut and written again from
    /// the journal, if it is still the same chain; a log that was replaced meanwhile gets them
    /// appended instead, and the note says so. Then the log is synced.
    pub fn restore(&self, kept: &[KeptAudit]) -> Result<Option<String>, AuditError> {
        let Some(last) = kept.last() else {
            return Ok(None);
        };
        let mut writer = self.writer();
        let file = open_for_append(&writer.path).map_err(|e| writer_io(&writer, e))?;
        let len = file.metadata().map_err(|e| writer_io(&writer, e))?.len();
        let Some(first_lacking) = kept.iter().position(|k| !holds(&file, len, k)) else {
            return writer.cut_damaged_end(&file, len, last);
        };
        let from = &kept[first_lacking];
        let same_chain = first_lacking > 0 || continues_at(&file, len, from);
        let cut = if same_chain { from.at.min(len) } else { len };
        let mut bytes = String::new();
        for record in &kept[first_lacking..] {
            bytes.push_str(&record.line);
            bytes.push('\n');
        }
        file.set_len(cut)
            .and_then(|()| (&file).write_all(bytes.as_bytes()))
            .and_then(|()| crate::store::sync_data(&file))
            .map_err(|e| writer_io(&writer, e))?;
        let (seq, hash) = link_of(&last.line).ok_or_else(|| {
            writer.corrupt("a record the job journal kept has no seq or hash".into())
        })?;
        (writer.seq, writer.prev) = (seq, hash);
        let mut note = format!(
            "wrote back {} records (seq {} to {seq}) that the job journal kept and the log lacked after a crash",
            kept.len() - first_lacking,
            link_of(&from.line).map_or(0, |(seq, _)| seq),
        );
        if cut < len {
            note.push_str(&format!("; {} damaged bytes were replaced", len - cut));
        }
        if !same_chain {
            note.push_str("; they do not continue this log's chain (was the log replaced?)");
        }
        Ok(Some(note))
    }
}

impl Chained<'_> {
    /// Each record's line and its place in the log, for the journal.
    pub(crate) fn lines(&self) -> &[KeptAudit] {
        &self.lines
    }

    /// They are durable in the journal: write them to the log (synced later) and go on from
    /// them. If the write fails the log is stopped; the journal keeps them for the next start.
    pub(crate) fn write(mut self) -> Result<(), AuditError> {
        let bytes = self.bytes();
        let written = (&self.file).write_all(&bytes);
        self.advance();
        if let Err(error) = written {
            let error = writer_io(&self.writer, error);
            self.writer.damaged = Some(format!(
                "a write failed ({error}); its records are kept in the job journal and go back into the log at the next start"
            ));
            return Err(error);
        }
        let pending = self.writer.unsynced.take().map_or(0, |(_, bytes)| bytes);
        self.writer.unsynced = Some((self.file, pending + bytes.len() as u64));
        Ok(())
    }

    /// Make them durable in the log itself (the journal could not, or does not run yet) and go
    /// on from them. All or nothing: a failed write or sync is cut off again, and a failed
    /// sync stops the log.
    pub(crate) fn write_and_sync(mut self) -> Result<(), AuditError> {
        let before = self.before;
        let written = (&self.file).write_all(&self.bytes());
        if let Err(error) = written.and_then(|()| crate::store::sync_data(&self.file)) {
            let error = writer_io(&self.writer, error);
            let undone = self
                .file
                .set_len(before)
                .and_then(|()| self.file.sync_data());
            self.writer.damaged = Some(format!(
                "a write or sync failed ({error}){}; restart the helper",
                if undone.is_ok() {
                    ""
                } else {
                    " and could not be undone"
                }
            ));
            return Err(error);
        }
        self.advance();
        self.writer.unsynced = None;
        Ok(())
    }

    fn bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for record in &self.lines {
            bytes.extend_from_slice(record.line.as_bytes());
            bytes.push(b'\n');
        }
        bytes
    }

    fn advance(&mut self) {
        self.writer.seq = self.head.0;
        self.writer.prev = std::mem::take(&mut self.head.1);
    }
}

impl Writer {
    /// The log holds every record the journal kept; what follows the last of them must be
    /// whole records (a refusal the log took by itself while the journal failed), else the
    /// log is cut where they stop. Then it is synced.
    fn cut_damaged_end(
        &mut self,
        file: &File,
        len: u64,
        last: &KeptAudit,
    ) -> Result<Option<String>, AuditError> {
        let end = last.at + last.line.len() as u64 + 1;
        let whole = whole_records_from(file, end, len).map_err(|e| writer_io(self, e))?;
        let mut note = None;
        if let Some((good_end, link)) = whole.filter(|(good_end, _)| *good_end < len) {
            file.set_len(good_end).map_err(|e| writer_io(self, e))?;
            (self.seq, self.prev) = link.or_else(|| link_of(&last.line)).unwrap_or_default();
            note = Some(format!(
                "cut {} damaged bytes after the last record the job journal kept",
                len - good_end
            ));
        }
        crate::store::sync_data(file).map_err(|e| writer_io(self, e))?;
        Ok(note)
    }

    fn sync_written(&mut self) -> Result<(), AuditError> {
        if let Some(why) = &self.damaged {
            return Err(self.corrupt(why.clone()));
        }
        let Some((file, _)) = &self.unsynced else {
            return Ok(());
        };
        if let Err(source) = crate::store::sync_data(file) {
            let error = writer_io(self, source);
            self.damaged = Some(format!(
                "a sync failed ({error}); its records are kept in the job journal and go back into the log at the next start"
            ));
            return Err(error);
        }
        self.unsynced = None;
        Ok(())
    }

    /// The log was replaced since the last commit (or the old one can no longer be examined):
    /// what went to the one before is synced now, while it can still be reached.
    fn sync_if_replaced(&mut self, now: &std::fs::Metadata) -> Result<(), AuditError> {
        let replaced = self.unsynced.as_ref().is_some_and(|(last, _)| {
            !last
                .metadata()
                .is_ok_and(|last| (last.dev(), last.ino()) == (now.dev(), now.ino()))
        });
        if replaced {
            self.sync_written()
        } else {
            Ok(())
        }
    }

    fn corrupt(&self, message: String) -> AuditError {
        AuditError::Corrupt {
            path: self.path.display().to_string(),
            message,
        }
    }
}

fn writer_io(writer: &Writer, source: std::io::Error) -> AuditError {
    AuditError::Io {
        path: writer.path.display().to_string(),
        source,
    }
}

/// A record's line (its JSON with `"hash"` last, the SHA-256 of everything before it) and
/// that hash.
fn chained_line(seq: u64, event: &AuditEvent, prev: &str) -> (String, String) {
    let body = serde_json::to_string(&Line {
        seq,
        time: crate::now_rfc3339(),
        event,
        claimed_client_note: event
            .claimed_client
            .as_ref()
            .map(|_| "claimed by the front, not verified"),
        prev,
    })
    .expect("audit records serialize");
    let hash = hex(&Sha256::digest(body.as_bytes()));
    let line = format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1]);
    (line, hash)
}

/// A record's seq and hash.
type Link = (u64, String);

/// The seq and hash a line states.
fn link_of(line: &str) -> Option<Link> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    Some((value["seq"].as_u64()?, value["hash"].as_str()?.to_owned()))
}

/// From `from` to `len`: where the whole records (lines that state a seq and hash) end, and the
/// last one's link; None when they run to `len`.
fn whole_records_from(
    file: &File,
    from: u64,
    len: u64,
) -> std::io::Result<Option<(u64, Option<Link>)>> {
    let mut bytes = vec![0; len.saturating_sub(from) as usize];
    file.read_exact_at(&mut bytes, from)?;
    let (mut end, mut link) = (from, None);
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        let stated = std::str::from_utf8(line.strip_suffix(b"\n").unwrap_or(b"\0"))
            .ok()
            .and_then(link_of);
        match stated {
            Some(stated) => {
                end += line.len() as u64;
                link = Some(stated);
            }
            None => return Ok(Some((end, link))),
        }
    }
    Ok(None)
}

/// Whether the log holds `record`, byte for byte, where the journal says.
fn holds(file: &File, len: u64, record: &KeptAudit) -> bool {
    let size = record.line.len() as u64 + 1;
    if record.at + size > len {
        return false;
    }
    let mut bytes = vec![0; size as usize];
    file.read_exact_at(&mut bytes, record.at).is_ok()
        && bytes[..bytes.len() - 1] == *record.line.as_bytes()
        && bytes.last() == Some(&b'\n')
}

/// Whether `record` continues the chain of what the log holds before its place: the line that
/// ends there has the hash `record` names as its `prev` (or the log starts there).
fn continues_at(file: &File, len: u64, record: &KeptAudit) -> bool {
    let Some(prev) = serde_json::from_str::<serde_json::Value>(&record.line)
        .ok()
        .and_then(|v| v["prev"].as_str().map(str::to_owned))
    else {
        return false;
    };
    if record.at == 0 {
        return prev == GENESIS;
    }
    if record.at > len {
        return false;
    }
    // The line before: within the 64 KiB before its end (records are far smaller).
    let start = record.at.saturating_sub(64 * 1024);
    let mut window = vec![0; (record.at - start) as usize];
    if file.read_exact_at(&mut window, start).is_err() || window.last() != Some(&b'\n') {
        return false;
    }
    let body = &window[..window.len() - 1];
    let line_start = body
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    std::str::from_utf8(&body[line_start..])
        .ok()
        .and_then(link_of)
        .is_some_and(|(_, hash)| hash == prev)
}
