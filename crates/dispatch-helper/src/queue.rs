//! Dispatches waiting for a lane slot: first in, first out for each client, and fair across
//! clients (they take turns), bounded per client and in all. Plain data: the job table decides
//! when a slot is free and what is eligible.

use std::collections::{BTreeMap, VecDeque};

/// One waiting dispatch: its handle and its lane (`orguser/repo`, for the per-lane cap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub handle: String,
    pub lane: String,
}

#[derive(Debug, Default)]
pub struct Queue {
    by_client: BTreeMap<u32, VecDeque<Waiting>>,
    /// Clients with something waiting, in the order their turns come.
    turns: VecDeque<u32>,
    len: usize,
}

impl Queue {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `client` has dispatches waiting.
    pub fn has_waiting(&self, client: u32) -> bool {
        self.by_client
            .get(&client)
            .is_some_and(|waiting| !waiting.is_empty())
    }

    /// Whether `client` could queue one more, or why not (the queue or its share is full).
    pub fn room_for(&self, client: u32, per_client: usize, total: usize) -> Result<(), String> {
        if self.len >= total {
            return Err(format!(
                "{total} dispatches are already waiting for a lane (the queue's limit); try again \
                 later"
            ));
        }
        let mine = self.by_client.get(&client).map_or(0, VecDeque::len);
        if mine >= per_client {
            return Err(format!(
                "this client already has {per_client} dispatches waiting for a lane (its share of \
                 the queue); wait for some to start or cancel some"
            ));
        }
        Ok(())
    }

    /// Queue `waiting` for `client`, or say why not (the queue or the client's share is full).
    pub fn push(
        &mut self,
        client: u32,
        waiting: Waiting,
        per_client: usize,
        total: usize,
    ) -> Result<(), String> {
        self.room_for(client, per_client, total)?;
        let mine = self.by_client.entry(client).or_default();
        if mine.is_empty() {
            self.turns.push_back(client);
        }
        mine.push_back(waiting);
        self.len += 1;
        Ok(())
    }

    /// Take a waiting dispatch out (it was cancelled). Whether it was there.
    pub fn remove(&mut self, handle: &str) -> bool {
        let found = self.by_client.iter_mut().find_map(|(&client, waiting)| {
            let index = waiting.iter().position(|w| w.handle == handle)?;
            waiting.remove(index);
            Some((client, waiting.is_empty()))
        });
        match found {
            Some((client, now_empty)) => {
                self.len -= 1;
                if now_empty {
                    self.forget_client(client);
                }
                true
            }
            None => false,
        }
    }

    /// The next dispatch to start: clients take turns, each its oldest first. A client whose
    /// next dispatch `may_start` refuses (its own cap, or its lane's) is passed over this time.
    pub fn next(&mut self, may_start: impl Fn(u32, &Waiting) -> bool) -> Option<(u32, Waiting)> {
        for _ in 0..self.turns.len() {
            let client = self.turns.pop_front()?;
            let waiting = self.by_client.get_mut(&client)?;
            let startable = waiting.front().is_some_and(|w| may_start(client, w));
            if !startable {
                self.turns.push_back(client);
                continue;
            }
            let next = waiting.pop_front()?;
            self.len -= 1;
            if waiting.is_empty() {
                self.by_client.remove(&client);
            } else {
                // Back of the line: the others have their turn first.
                self.turns.push_back(client);
            }
            return Some((client, next));
        }
        None
    }

    fn forget_client(&mut self, client: u32) {
        self.by_client.remove(&client);
        self.turns.retain(|&c| c != client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(handle: &str) -> Waiting {
        Waiting {
            handle: handle.into(),
            lane: "acme/widgets".into(),
        }
    }

    #[test]
    fn clients_take_turns_each_first_in_first_out() {
        let mut queue = Queue::default();
        for handle in ["a1", "a2", "a3"] {
            queue.push(1, job(handle), 10, 100).unwrap();
        }
        for handle in ["b1", "b2"] {
            queue.push(2, job(handle), 10, 100).unwrap();
        }
        let order: Vec<String> = std::iter::from_fn(|| queue.next(|_, _| true))
            .map(|(_, w)| w.handle)
            .collect();
        assert_eq!(order, ["a1", "b1", "a2", "b2", "a3"]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_client_that_may_not_start_now_is_passed_over_not_dropped() {
        let mut queue = Queue::default();
        queue.push(1, job("a1"), 10, 100).unwrap();
        queue.push(2, job("b1"), 10, 100).unwrap();
        let (client, next) = queue.next(|client, _| client == 2).unwrap();
        assert_eq!((client, next.handle.as_str()), (2, "b1"));
        assert_eq!(queue.len(), 1);
        assert!(queue.next(|client, _| client == 2).is_none());
        assert_eq!(queue.next(|_, _| true).unwrap().1.handle, "a1");
    }

    #[test]
    fn the_queue_and_each_clients_share_are_bounded_and_say_so() {
        let mut queue = Queue::default();
        queue.push(1, job("a1"), 2, 3).unwrap();
        queue.push(1, job("a2"), 2, 3).unwrap();
        let share = queue.push(1, job("a3"), 2, 3).unwrap_err();
        assert!(share.contains("its share of the queue"), "{share}");
        queue.push(2, job("b1"), 2, 3).unwrap();
        let full = queue.push(3, job("c1"), 2, 3).unwrap_err();
        assert!(full.contains("the queue's limit"), "{full}");
        assert!(queue.remove("a1") && !queue.remove("a1"));
        assert_eq!(queue.len(), 2);
        assert!(queue.remove("b1"));
        assert_eq!(queue.next(|_, _| true).unwrap().1.handle, "a2");
    }
}
