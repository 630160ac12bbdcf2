//! A lane's stdout and stderr. Each pipe is read as fast as the lane writes (so output never
//! blocks or slows it) into a spool that keeps only the last `limit` bytes: a hard bound on the
//! helper's memory, however much a lane prints. The spool is readable while the lane runs (its
//! output so far, or what is new since an offset) and gives the final tail when it ends.

use dispatch_proto::{OutputOffsets, OutputTail};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug)]
pub struct Spool {
    kept: VecDeque<u8>,
    /// Bytes the stream has carried, kept or not.
    total: u64,
    limit: usize,
}

pub type SharedSpool = Arc<Mutex<Spool>>;

/// Both streams of a running lane.
#[derive(Debug, Clone)]
pub struct LiveOutput {
    pub stdout: SharedSpool,
    pub stderr: SharedSpool,
}

impl LiveOutput {
    pub fn new(limit: usize) -> LiveOutput {
        LiveOutput {
            stdout: Arc::new(Mutex::new(Spool::new(limit))),
            stderr: Arc::new(Mutex::new(Spool::new(limit))),
        }
    }

    /// Both streams from the given offsets (None: all that is kept); see `Spool::tail`.
    pub fn tails(&self, from: Option<OutputOffsets>, ended: bool) -> (OutputTail, OutputTail) {
        let tail = |spool: &SharedSpool, from: Option<u64>| {
            let spool = spool.lock().unwrap_or_else(|p| p.into_inner());
            spool.tail(from, ended)
        };
        (
            tail(&self.stdout, from.map(|f| f.stdout)),
            tail(&self.stderr, from.map(|f| f.stderr)),
        )
    }
}

impl Spool {
    pub fn new(limit: usize) -> Spool {
        Spool {
            kept: VecDeque::with_capacity(limit.min(64 * 1024)),
            total: 0,
            limit,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let bytes = &bytes[bytes.len().saturating_sub(self.limit)..];
        let excess = (self.kept.len() + bytes.len()).saturating_sub(self.limit);
        self.kept.drain(..excess);
        self.kept.extend(bytes);
    }

    /// The stream from offset `from` on (None: everything still kept). While the stream is
    /// open, an incomplete UTF-8 character at the end waits for its remaining bytes.
    pub fn tail(&self, from: Option<u64>, ended: bool) -> OutputTail {
        let window_start = self.total - self.kept.len() as u64;
        let asked = from.unwrap_or(window_start).min(self.total);
        let mut start = asked.max(window_start);
        let mut bytes: Vec<u8> = self
            .kept
            .range((start - window_start) as usize..)
            .copied()
            .collect();
        // A cut inside a character: start at the next whole one.
        let partial = bytes
            .iter()
            .take(3)
            .take_while(|&&b| is_continuation(b))
            .count();
        if start > 0 && partial > 0 {
            bytes.drain(..partial);
            start += partial as u64;
        }
        if !ended {
            let held = incomplete_suffix(&bytes);
            bytes.truncate(bytes.len() - held);
        }
        let lost = start - asked;
        let truncated = window_start > asked || (from.is_none() && window_start > 0);
        let mut text = String::new();
        if truncated {
            text.push_str(&match from {
                None => format!(
                    "[… {window_start} earlier bytes truncated; showing the last {} of {} …]\n",
                    bytes.len(),
                    self.total
                ),
                Some(asked) => format!(
                    "[… {lost} bytes after offset {asked} are gone (only the last {} are kept) …]\n",
                    self.limit
                ),
            });
        }
        text.push_str(&String::from_utf8_lossy(&bytes));
        OutputTail {
            text,
            total_bytes: self.total,
            truncated,
            offset: start,
            next_offset: start + bytes.len() as u64,
        }
    }
}

fn is_continuation(byte: u8) -> bool {
    byte & 0xC0 == 0x80
}

/// How many bytes at the end begin a character whose remaining bytes have not arrived yet.
fn incomplete_suffix(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if is_continuation(byte) {
            continue;
        }
        let needs = match byte {
            0xF0..=0xFF => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

/// Read `reader` to its end into `spool`; the final tail is then `spool.tail(None, true)`.
pub async fn spool_stream<R: AsyncRead + Unpin>(mut reader: R, spool: SharedSpool) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => spool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(&chunk[..n]),
        }
    }
}

/// The part of a finished job's stored tail after stream offset `from`. Offsets are bytes of
/// the stream; the stored text is exact for UTF-8 output, which is what lanes print.
pub fn stored_from(tail: &OutputTail, from: u64) -> OutputTail {
    let (next, total) = (stored_next_offset(tail), tail.total_bytes);
    let body = match tail.text.split_once(" …]\n") {
        Some((_, rest)) if tail.truncated => rest,
        _ => tail.text.as_str(),
    };
    // Records written before offsets were kept know only where their stream ended.
    let offset = if tail.next_offset == 0 {
        next.saturating_sub(body.len() as u64)
    } else {
        tail.offset
    };
    if from < offset {
        // Bytes asked for are gone: the whole tail, with its marker.
        return OutputTail {
            offset,
            next_offset: next,
            ..tail.clone()
        };
    }
    let mut skip = usize::try_from(from.min(next) - offset)
        .unwrap_or(usize::MAX)
        .min(body.len());
    while !body.is_char_boundary(skip) {
        skip += 1;
    }
    OutputTail {
        text: body[skip..].to_owned(),
        total_bytes: total,
        truncated: false,
        offset: offset + skip as u64,
        next_offset: next,
    }
}

/// Records written before offsets were kept have `next_offset` 0: their stream ended at its
/// total.
fn stored_next_offset(tail: &OutputTail) -> u64 {
    if tail.next_offset == 0 {
        tail.total_bytes
    } else {
        tail.next_offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spooled(data: &[u8], limit: usize) -> Spool {
        let mut spool = Spool::new(limit);
        for chunk in data.chunks(777) {
            spool.push(chunk);
        }
        spool
    }

    #[test]
    fn keeps_the_last_bytes_and_marks_the_cut() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        let tail = spooled(&data, 1000).tail(None, true);
        assert!(tail.truncated);
        assert_eq!(tail.total_bytes, data.len() as u64);
        assert_eq!(tail.next_offset, data.len() as u64);
        assert_eq!(tail.offset, data.len() as u64 - 1000);
        assert!(
            tail.text
                .starts_with(&format!("[… {} earlier bytes truncated", data.len() - 1000)),
            "{}",
            &tail.text[..80]
        );
        assert!(tail.text.ends_with("99999\n"));
    }

    #[test]
    fn short_output_is_whole() {
        let tail = spooled(b"hello\n", 1000).tail(None, true);
        assert_eq!(
            (tail.text.as_str(), tail.total_bytes, tail.truncated),
            ("hello\n", 6, false)
        );
        assert_eq!((tail.offset, tail.next_offset), (0, 6));
    }

    #[test]
    fn asking_from_an_offset_gives_only_what_is_new() {
        let mut spool = Spool::new(1000);
        spool.push(b"line 1\nline 2\n");
        let first = spool.tail(None, false);
        assert_eq!(first.text, "line 1\nline 2\n");
        spool.push(b"line 3\n");
        let new = spool.tail(Some(first.next_offset), false);
        assert_eq!((new.text.as_str(), new.truncated), ("line 3\n", false));
        assert_eq!((new.offset, new.next_offset), (14, 21));
        let nothing = spool.tail(Some(new.next_offset), false);
        assert_eq!((nothing.text.as_str(), nothing.next_offset), ("", 21));
    }

    #[test]
    fn an_offset_older_than_the_window_says_what_is_gone() {
        let spool = spooled(&[b'x'; 5000], 1000);
        let tail = spool.tail(Some(1000), false);
        assert!(tail.truncated);
        assert!(
            tail.text
                .starts_with("[… 3000 bytes after offset 1000 are gone"),
            "{}",
            tail.text
        );
        assert_eq!((tail.offset, tail.next_offset), (4000, 5000));
    }

    #[test]
    fn a_character_split_across_writes_is_held_until_whole() {
        let mut spool = Spool::new(1000);
        let check = "✓".as_bytes();
        spool.push(b"ok ");
        spool.push(&check[..1]);
        let early = spool.tail(None, false);
        assert_eq!((early.text.as_str(), early.next_offset), ("ok ", 3));
        spool.push(&check[1..]);
        let later = spool.tail(Some(early.next_offset), false);
        assert_eq!((later.text.as_str(), later.offset), ("✓", 3));
    }

    #[test]
    fn a_window_cut_inside_a_character_starts_at_the_next_one() {
        let text = "é".repeat(600);
        let spool = spooled(text.as_bytes(), 999);
        let tail = spool.tail(None, true);
        let body = tail.text.split_once(" …]\n").unwrap().1;
        assert!(body.chars().all(|c| c == 'é'), "{body:?}");
        assert_eq!(tail.next_offset - tail.offset, body.len() as u64);
    }

    #[test]
    fn a_stored_tail_is_cut_at_an_offset() {
        let spool = spooled(b"alpha\nbeta\ngamma\n", 1000);
        let stored = spool.tail(None, true);
        let cut = stored_from(&stored, 6);
        assert_eq!(
            (cut.text.as_str(), cut.offset, cut.next_offset),
            ("beta\ngamma\n", 6, 17)
        );
        let whole = stored_from(&stored, 0);
        assert_eq!(
            (whole.text.as_str(), whole.truncated),
            (stored.text.as_str(), false)
        );
        let truncated = spooled(&[b'y'; 3000], 1000).tail(None, true);
        let at_window = stored_from(&truncated, 2000);
        assert_eq!(
            (at_window.text.len(), at_window.truncated),
            (1000, false),
            "nothing asked for is gone"
        );
        let before = stored_from(&truncated, 1999);
        assert!(before.truncated && before.text.starts_with("[… 2000 earlier bytes"));
        let truncated = spooled(&[b'y'; 3000], 1000).tail(None, true);
        let cut = stored_from(&truncated, 2900);
        assert_eq!(
            (cut.text.len(), cut.offset, cut.truncated),
            (100, 2900, false)
        );
    }

    #[tokio::test]
    async fn a_stream_is_read_to_its_end() {
        let spool: SharedSpool = Arc::new(Mutex::new(Spool::new(4)));
        spool_stream(&b"abcdefgh"[..], spool.clone()).await;
        let tail = spool.lock().unwrap().tail(None, true);
        assert_eq!((tail.total_bytes, tail.offset), (8, 4));
        assert!(tail.text.ends_with("efgh"));
    }
}
