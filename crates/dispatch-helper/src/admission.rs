//! Refusals reach the audit log rate-limited per uid and kind: a burst of records one by one,
//! then a few a second, each saying how many it stands for, so that a flooding peer can only
//! hurt itself (with the per-uid connection limit, which the accept loop applies before any
//! shared slot is held and before any account lookup).

use crate::audit::{AuditEvent, AuditLog, PeerIdentity};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Records one uid may cause of one kind one by one, before the rate below applies.
const BURST: f64 = 20.0;
/// Records a second after the burst; the rest are counted into the next record.
const PER_SECOND: f64 = 5.0;
/// How long held-back refusals wait for a record to carry their count.
pub const COALESCE_WINDOW: Duration = Duration::from_secs(1);

type Key = (Option<u32>, &'static str);

/// One audited refusal or violation.
pub struct Refusal {
    pub event: &'static str,
    pub peer: Option<PeerIdentity>,
    pub claimed_client: Option<String>,
    pub detail: String,
}

/// A token bucket of records for one uid and kind.
struct Window {
    tokens: f64,
    refilled: Instant,
    /// Refusals since the last record that were not written.
    held_back: u64,
    /// A flush of `held_back` is scheduled.
    flush_pending: bool,
}

impl Window {
    fn new() -> Window {
        Window {
            tokens: BURST,
            refilled: Instant::now(),
            held_back: 0,
            flush_pending: false,
        }
    }

    /// Take a token if one has accrued.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let accrued = now.duration_since(self.refilled).as_secs_f64() * PER_SECOND;
        self.tokens = (self.tokens + accrued).min(BURST);
        self.refilled = now;
        let available = self.tokens >= 1.0;
        if available {
            self.tokens -= 1.0;
        }
        available
    }
}

/// Coalesces refusal records per (uid, event) and writes them in the background, so that a
/// refused connection frees its slot at once instead of waiting for an fsync.
#[derive(Clone)]
pub struct RefusalAudit {
    audit: AuditLog,
    windows: Arc<Mutex<HashMap<Key, Window>>>,
}

impl RefusalAudit {
    pub fn new(audit: AuditLog) -> RefusalAudit {
        RefusalAudit {
            audit,
            windows: Arc::default(),
        }
    }

    /// Record `refusal`: now while this uid's bucket for its kind has a token, otherwise counted
    /// and written with the next record (or by a flush a window later).
    pub fn record(&self, refusal: Refusal) {
        tracing::warn!(
            event = refusal.event,
            detail = %refusal.detail,
            uid = refusal.peer.map(|p| p.uid),
            "connection closed"
        );
        let key = (refusal.peer.map(|p| p.uid), refusal.event);
        let (write_now, schedule_flush, held_back) = {
            let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            let window = windows.entry(key).or_insert_with(Window::new);
            if window.take() {
                (true, false, std::mem::take(&mut window.held_back))
            } else {
                window.held_back += 1;
                let schedule = !std::mem::replace(&mut window.flush_pending, true);
                (false, schedule, 0)
            }
        };
        if write_now {
            self.write(refusal, held_back);
        } else if schedule_flush {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(COALESCE_WINDOW).await;
                this.flush(key, refusal);
            });
        }
    }

    /// Write what a window held back, if the next record has not already said it.
    fn flush(&self, key: Key, last: Refusal) {
        let held_back = {
            let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            let window = windows.entry(key).or_insert_with(Window::new);
            window.flush_pending = false;
            if window.held_back == 0 {
                return;
            }
            // The flushed record stands for itself and the others held back.
            std::mem::take(&mut window.held_back) - 1
        };
        self.write(last, held_back);
    }

    fn write(&self, refusal: Refusal, also: u64) {
        let detail = if also == 0 {
            refusal.detail
        } else {
            format!(
                "{} (and {also} more of this kind from this uid since the last record, not \
                 written one by one)",
                refusal.detail
            )
        };
        let record = AuditEvent {
            event: refusal.event,
            peer: refusal.peer,
            claimed_client: refusal.claimed_client,
            outcome: "closed".into(),
            detail: Some(detail),
            ..Default::default()
        };
        let audit = self.audit.clone();
        tokio::spawn(async move {
            if let Err(error) = audit.append(record).await {
                tracing::error!(%error, "could not audit a refused connection");
            }
        });
    }
}
