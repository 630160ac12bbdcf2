//! Bounded capture of a lane's stdout/stderr: only the last `limit` bytes are kept, and a
//! visible marker says how much was cut.

use dispatch_proto::OutputTail;
use std::collections::VecDeque;
use tokio::io::{AsyncRead, AsyncReadExt};

pub async fn capture_tail<R: AsyncRead + Unpin>(mut reader: R, limit: usize) -> OutputTail {
    let mut tail: VecDeque<u8> = VecDeque::with_capacity(limit.min(64 * 1024));
    let mut total = 0u64;
    let mut chunk = [0u8; 8192];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n as u64;
                tail.extend(&chunk[..n]);
                if tail.len() > limit {
                    let excess = tail.len() - limit;
                    tail.drain(..excess);
                }
            }
        }
    }
    let kept = Vec::from(tail);
    let truncated = total > kept.len() as u64;
    let mut text = String::new();
    if truncated {
        text.push_str(&format!(
            "[… {} earlier bytes truncated; showing the last {} of {total} …]\n",
            total - kept.len() as u64,
            kept.len()
        ));
    }
    text.push_str(&String::from_utf8_lossy(&kept));
    OutputTail {
        text,
        total_bytes: total,
        truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_last_bytes_and_marks_the_cut() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        let tail = capture_tail(&data[..], 1000).await;
        assert!(tail.truncated);
        assert_eq!(tail.total_bytes, data.len() as u64);
        assert!(
            tail.text
                .starts_with(&format!("[… {} earlier bytes truncated", data.len() - 1000)),
            "{}",
            &tail.text[..80]
        );
        assert!(tail.text.ends_with("99999\n"));
    }

    #[tokio::test]
    async fn short_output_is_whole() {
        let tail = capture_tail(&b"hello\n"[..], 1000).await;
        assert_eq!(
            (tail.text.as_str(), tail.total_bytes, tail.truncated),
            ("hello\n", 6, false)
        );
    }
}
