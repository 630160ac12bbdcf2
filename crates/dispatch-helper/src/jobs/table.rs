//! The job table: every job the helper knows, by handle, and each client's jobs in the order
//! they were requested. A client's list and the pruning of its finished jobs read only its own
//! entries, however many other clients have (each may keep `max_finished_jobs_per_client`):
//! one client's history never makes another's requests slower. Each client's finished jobs
//! are also kept in their own order, so pruning the oldest reads only those it removes, not
//! every finished job a client keeps.

use super::JobEntry;
use std::collections::{BTreeSet, HashMap};
use std::ops::{Deref, DerefMut};

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
    /// The finished ones among them (see [`is_finished`]); kept right by every change,
    /// since changes go through [`JobTable::get_mut`]'s guard.
    finished: HashMap<u32, BTreeSet<Place>>,
}

/// Ended, and its supervisor done with it: what retention may remove.
fn is_finished(entry: &JobEntry) -> bool {
    entry.stop.is_none() && entry.record.job.state.is_terminal()
}

/// Put `place` in or out of `owner`'s finished jobs, as `finished` says.
fn index_finished(
    index: &mut HashMap<u32, BTreeSet<Place>>,
    owner: u32,
    place: &Place,
    finished: bool,
) {
    if finished {
        index.entry(owner).or_default().insert(place.clone());
    } else if let Some(places) = index.get_mut(&owner) {
        places.remove(place);
        if places.is_empty() {
            index.remove(&owner);
        }
    }
}

/// A job entry being changed: its place among the finished is brought up to date when the
/// change is done (when this is dropped).
pub(super) struct EntryMut<'a> {
    slot: &'a mut Slot,
    finished: &'a mut HashMap<u32, BTreeSet<Place>>,
}

impl Deref for EntryMut<'_> {
    type Target = JobEntry;
    fn deref(&self) -> &JobEntry {
        &self.slot.entry
    }
}

impl DerefMut for EntryMut<'_> {
    fn deref_mut(&mut self) -> &mut JobEntry {
        &mut self.slot.entry
    }
}

impl Drop for EntryMut<'_> {
    fn drop(&mut self) {
        let finished = is_finished(&self.slot.entry);
        index_finished(self.finished, self.slot.owner, &self.slot.place, finished);
    }
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
        index_finished(&mut self.finished, owner, &place, is_finished(&entry));
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
        index_finished(&mut self.finished, slot.owner, &slot.place, false);
        Some(slot.entry)
    }

    pub fn get(&self, handle: &str) -> Option<&JobEntry> {
        self.slots.get(handle).map(|s| &s.entry)
    }

    pub fn get_mut(&mut self, handle: &str) -> Option<EntryMut<'_>> {
        let finished = &mut self.finished;
        self.slots
            .get_mut(handle)
            .map(|slot| EntryMut { slot, finished })
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

    /// The handles of client `uid`'s finished jobs but its newest `keep`, oldest first.
    pub fn finished_beyond(&self, uid: u32, keep: usize) -> Vec<String> {
        let Some(places) = self.finished.get(&uid) else {
            return Vec::new();
        };
        let excess = places.len().saturating_sub(keep);
        places
            .iter()
            .take(excess)
            .map(|place| place.handle.clone())
            .collect()
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

    #[test]
    fn the_finished_beyond_the_kept_ones_are_found_oldest_first_as_entries_change() {
        use dispatch_proto::JobState;
        let mut table = JobTable::default();
        for (handle, at) in [
            ("d-2", "2026-01-01T00:00:02Z"),
            ("d-1", "2026-01-01T00:00:01Z"),
            ("d-4", "2026-01-01T00:00:04Z"),
            ("d-3", "2026-01-01T00:00:03Z"),
        ] {
            table.insert(entry(1, handle, at));
        }
        table.insert(entry(2, "d-x", "2026-01-01T00:00:00Z"));
        assert_eq!(table.finished_beyond(1, 2), ["d-1", "d-2"]);
        assert!(table.finished_beyond(1, 4).is_empty());
        assert!(table.finished_beyond(3, 0).is_empty());

        // Running again, or ended but its supervisor not done with it: not finished.
        table.get_mut("d-1").unwrap().record.job.state = JobState::Running;
        assert_eq!(table.finished_beyond(1, 2), ["d-2"]);
        table.get_mut("d-2").unwrap().stop = Some(tokio::sync::mpsc::unbounded_channel().0);
        assert_eq!(table.finished_beyond(1, 1), ["d-3"]);
        // Finished again: back in its place.
        table.get_mut("d-1").unwrap().record.job.state = JobState::Succeeded;
        assert_eq!(table.finished_beyond(1, 1), ["d-1", "d-3"]);

        table.remove("d-1");
        assert_eq!(table.finished_beyond(1, 1), ["d-3"]);
        assert_eq!(table.finished_beyond(2, 0), ["d-x"]);
        table.remove("d-x");
        assert!(
            !table.finished.contains_key(&2),
            "an emptied client is forgotten"
        );
    }
}
