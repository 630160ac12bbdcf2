//! The job table: every job the helper knows, by handle, and each client's jobs in the order
//! they were requested. A client's list and the pruning of its finished jobs read only its own
//! entries, however many other clients have (each may keep `max_finished_jobs_per_client`):
//! one client's history never makes another's requests slower.

use super::JobEntry;
use std::collections::{BTreeSet, HashMap};

/// Where a job sits in its client's order: when it was requested, then its handle (unique).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    requested_at: String,
    handle: String,
}

struct Slot {
    /// As entered: the index is kept by these, whatever later updates of the record say.
    owner: u32,
    place: Place,
    entry: JobEntry,
}

#[derive(Default)]
pub(super) struct JobTable {
    slots: HashMap<String, Slot>,
    by_owner: HashMap<u32, BTreeSet<Place>>,
}

impl JobTable {
    /// Enter `entry` under its handle, replacing (and returning) any entry already there.
    pub fn insert(&mut self, entry: JobEntry) -> Option<JobEntry> {
        let handle = entry.record.job.handle.clone();
        let replaced = self.remove(&handle);
        let owner = entry.record.owner_uid;
        let place = Place {
            requested_at: entry.record.job.requested_at.clone(),
            handle: handle.clone(),
        };
        self.by_owner
            .entry(owner)
            .or_default()
            .insert(place.clone());
        self.slots.insert(
            handle,
            Slot {
                owner,
                place,
                entry,
            },
        );
        replaced
    }

    pub fn remove(&mut self, handle: &str) -> Option<JobEntry> {
        let slot = self.slots.remove(handle)?;
        if let Some(places) = self.by_owner.get_mut(&slot.owner) {
            places.remove(&slot.place);
            if places.is_empty() {
                self.by_owner.remove(&slot.owner);
            }
        }
        Some(slot.entry)
    }

    pub fn get(&self, handle: &str) -> Option<&JobEntry> {
        self.slots.get(handle).map(|s| &s.entry)
    }

    pub fn get_mut(&mut self, handle: &str) -> Option<&mut JobEntry> {
        self.slots.get_mut(handle).map(|s| &mut s.entry)
    }

    pub fn contains_key(&self, handle: &str) -> bool {
        self.slots.contains_key(handle)
    }

    pub fn values(&self) -> impl Iterator<Item = &JobEntry> {
        self.slots.values().map(|s| &s.entry)
    }

    /// The jobs of client `uid`, oldest request first (reverse it for newest first).
    pub fn owned_by(&self, uid: u32) -> impl DoubleEndedIterator<Item = &JobEntry> {
        self.by_owner
            .get(&uid)
            .into_iter()
            .flatten()
            .filter_map(|place| self.get(&place.handle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::JobRecord;

    fn entry(owner: u32, handle: &str, requested_at: &str) -> JobEntry {
        let record: JobRecord = serde_json::from_value(serde_json::json!({
            "handle": handle, "orguser": "acme", "repo": "widgets", "github": "acme/widgets",
            "unix_user": "acme", "task_preview": "t", "task_sha256": "00", "state": "Succeeded",
            "requested_at": requested_at, "detail": "done", "owner_uid": owner,
        }))
        .unwrap();
        JobEntry::new(record, None)
    }

    fn handles<'a>(jobs: impl Iterator<Item = &'a JobEntry>) -> Vec<String> {
        jobs.map(|e| e.record.job.handle.clone()).collect()
    }

    #[test]
    fn each_client_sees_only_its_jobs_in_request_order_through_replacements_and_removals() {
        let mut table = JobTable::default();
        table.insert(entry(1, "d-b", "2026-01-01T00:00:02Z"));
        table.insert(entry(2, "d-x", "2026-01-01T00:00:01Z"));
        table.insert(entry(1, "d-a", "2026-01-01T00:00:01Z"));
        // Same request time: the handle orders them.
        table.insert(entry(1, "d-c", "2026-01-01T00:00:02Z"));
        assert_eq!(handles(table.owned_by(1)), ["d-a", "d-b", "d-c"]);
        assert_eq!(handles(table.owned_by(1).rev()), ["d-c", "d-b", "d-a"]);
        assert_eq!(handles(table.owned_by(2)), ["d-x"]);
        assert!(table.owned_by(3).next().is_none());

        // A replaced entry is in the order once.
        assert!(
            table
                .insert(entry(1, "d-b", "2026-01-01T00:00:02Z"))
                .is_some()
        );
        assert_eq!(handles(table.owned_by(1)), ["d-a", "d-b", "d-c"]);

        // An entry whose record changed after it was entered is still removed whole.
        table.get_mut("d-a").unwrap().record.job.requested_at = "changed".into();
        assert!(table.remove("d-a").is_some());
        assert!(table.remove("d-a").is_none());
        assert_eq!(handles(table.owned_by(1)), ["d-b", "d-c"]);
        table.remove("d-x");
        assert!(
            !table.by_owner.contains_key(&2),
            "an emptied client is forgotten"
        );
        assert_eq!(table.values().count(), 2);
        assert!(table.contains_key("d-c") && !table.contains_key("d-x"));
    }
}
