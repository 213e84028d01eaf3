//! Who holds which MCP session, and whose goes when there is no room: the admission rules of
//! [`BoundedSessions`](super::BoundedSessions) as plain data, with no rmcp and no clock of its own (the
//! time is passed in), so every rule is a unit test.
//!
//! A new session of a key that holds its share closes that key's least recently used idle session; one
//! that would overfill the service closes the least recently used idle session of the key holding the
//! most. A session is idle when no request or stream of it is under way. Only when nothing can be closed
//! is the new session refused ([`Refusal`]).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

use crate::config::McpSessionLimits;
use crate::session::Owner;

/// Why a new MCP session was refused: every session that would have to make room is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The key holds `per_key` sessions, all of them in use.
    PerKey(usize),
    /// The service holds `total` sessions, all of them in use (or being made).
    Total(usize),
}

#[derive(Debug)]
struct Entry {
    owner: Owner,
    /// The end of its last request (or the start of one under way).
    last_used: Instant,
    /// Requests and streams of it under way: it is not idle while this is above zero.
    busy: usize,
}

/// The sessions held, by id, and by owner.
#[derive(Debug)]
pub struct Table<Id> {
    limits: McpSessionLimits,
    entries: HashMap<Id, Entry>,
    /// Sessions per owner, those admitted but not yet named included (no zero counts are kept).
    held: HashMap<Owner, usize>,
    /// Admitted, not yet named: rmcp is making them.
    pending: usize,
}

impl<Id: Clone + Eq + Hash> Table<Id> {
    pub fn new(limits: McpSessionLimits) -> Self {
        Table { limits, entries: HashMap::new(), held: HashMap::new(), pending: 0 }
    }

    /// Sessions held, those being made included.
    pub fn len(&self) -> usize {
        self.entries.len() + self.pending
    }

    /// Makes room for a new session of `owner` and counts it (pending until [`name`](Self::name)d):
    /// returns the sessions to close for it, or why there is no room. Nothing changes on a refusal.
    pub fn admit(&mut self, owner: &Owner) -> Result<Vec<Id>, Refusal> {
        let mut close = Vec::new();
        if self.held.get(owner).copied().unwrap_or(0) >= self.limits.per_key {
            let own = self.least_recently_used(|e| &e.owner == owner).ok_or(Refusal::PerKey(self.limits.per_key))?;
            close.push(self.remove(&own).expect("picked from the table"));
        } else if self.len() >= self.limits.total {
            let heaviest = |e: &Entry| self.held.get(&e.owner).copied().unwrap_or(0);
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| e.busy == 0)
                .max_by(|(_, a), (_, b)| heaviest(a).cmp(&heaviest(b)).then(b.last_used.cmp(&a.last_used)))
                .map(|(id, _)| id.clone())
                .ok_or(Refusal::Total(self.limits.total))?;
            close.push(self.remove(&victim).expect("picked from the table"));
        }
        self.pending += 1;
        *self.held.entry(owner.clone()).or_insert(0) += 1;
        Ok(close)
    }

    /// The admitted session of `owner` got its id.
    pub fn name(&mut self, owner: &Owner, id: Id, now: Instant) {
        self.pending = self.pending.saturating_sub(1);
        self.entries.insert(id, Entry { owner: owner.clone(), last_used: now, busy: 0 });
    }

    /// The admitted session of `owner` was not made after all.
    pub fn cancel(&mut self, owner: &Owner) {
        self.pending = self.pending.saturating_sub(1);
        self.release(owner);
    }

    /// The session is gone (closed by its client, by rmcp after its keep-alive, or to make room); its
    /// owner, if it was still held.
    pub fn remove(&mut self, id: &Id) -> Option<Id> {
        let entry = self.entries.remove(id)?;
        self.release(&entry.owner);
        Some(id.clone())
    }

    /// A request of the session (a stream, when `busy`) begins; says whether the session is held.
    pub fn begin(&mut self, id: &Id, now: Instant, busy: bool) -> bool {
        match self.entries.get_mut(id) {
            Some(e) => {
                e.last_used = now;
                e.busy += usize::from(busy);
                true
            }
            None => false,
        }
    }

    /// A stream of the session ended.
    pub fn end(&mut self, id: &Id, now: Instant) {
        if let Some(e) = self.entries.get_mut(id) {
            e.last_used = now;
            e.busy = e.busy.saturating_sub(1);
        }
    }

    fn least_recently_used(&self, of: impl Fn(&Entry) -> bool) -> Option<Id> {
        self.entries
            .iter()
            .filter(|(_, e)| e.busy == 0 && of(e))
            .min_by_key(|(_, e)| e.last_used)
            .map(|(id, _)| id.clone())
    }

    fn release(&mut self, owner: &Owner) {
        if let Some(n) = self.held.get_mut(owner) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(name: &str) -> Owner {
        Owner(name.into())
    }

    /// A table of `total` with `per_key`; `open` admits and names a session at `t` seconds.
    struct Check {
        table: Table<String>,
        t0: Instant,
    }

    impl Check {
        fn new(total: usize, per_key: usize) -> Self {
            Check { table: Table::new(McpSessionLimits { total, per_key }), t0: Instant::now() }
        }

        fn at(&self, s: u64) -> Instant {
            self.t0 + Duration::from_secs(s)
        }

        /// Opens `id` for `owner` at second `s`; returns what was closed to make room.
        fn open(&mut self, owner: &str, id: &str, s: u64) -> Result<Vec<String>, Refusal> {
            let closed = self.table.admit(&key(owner))?;
            self.table.name(&key(owner), id.to_owned(), self.at(s));
            Ok(closed)
        }
    }

    #[test]
    fn a_key_at_its_share_makes_room_with_its_own_least_recently_used_idle_session() {
        let mut c = Check::new(10, 3);
        c.open("a", "a1", 1).unwrap();
        c.open("a", "a2", 2).unwrap();
        c.open("a", "a3", 3).unwrap();
        c.table.begin(&"a1".to_owned(), c.at(4), false); // used again: a2 is now the oldest
        assert_eq!(c.open("a", "a4", 5).unwrap(), vec!["a2"]);
        assert_eq!(c.open("a", "a5", 6).unwrap(), vec!["a3"]);
        assert_eq!(c.table.len(), 3, "the key never holds more than its share");
        assert_eq!(c.open("b", "b1", 7).unwrap(), Vec::<String>::new(), "another key is not touched");
    }

    #[test]
    fn a_key_whose_sessions_are_all_in_use_is_refused_for_its_share() {
        let mut c = Check::new(10, 2);
        c.open("a", "a1", 1).unwrap();
        c.open("a", "a2", 2).unwrap();
        c.table.begin(&"a1".to_owned(), c.at(3), true);
        c.table.begin(&"a2".to_owned(), c.at(3), true);
        assert_eq!(c.table.admit(&key("a")), Err(Refusal::PerKey(2)));
        assert_eq!(c.table.len(), 2, "a refusal changes nothing");
        c.table.end(&"a2".to_owned(), c.at(4));
        assert_eq!(c.open("a", "a3", 5).unwrap(), vec!["a2"], "the stream ended: a2 is idle again");
        assert_eq!(c.open("b", "b1", 6).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_full_service_makes_room_with_the_heaviest_keys_least_recently_used_idle_session() {
        let mut c = Check::new(5, 4);
        c.open("b", "b1", 1).unwrap(); // the oldest of all, but b holds only two
        c.open("b", "b2", 2).unwrap();
        c.open("a", "a1", 3).unwrap();
        c.open("a", "a2", 4).unwrap();
        c.open("a", "a3", 5).unwrap();
        assert_eq!(c.open("c", "c1", 6).unwrap(), vec!["a1"]);
        assert_eq!(c.open("d", "d1", 7).unwrap(), vec!["b1"], "now a and b hold two each: the older idle goes");
        assert_eq!(c.table.len(), 5);
    }

    #[test]
    fn a_full_service_whose_sessions_are_all_in_use_is_refused_and_says_so() {
        let mut c = Check::new(2, 2);
        c.open("a", "a1", 1).unwrap();
        c.open("b", "b1", 1).unwrap();
        for id in ["a1", "b1"] {
            c.table.begin(&id.to_owned(), c.at(2), true);
        }
        assert_eq!(c.table.admit(&key("c")), Err(Refusal::Total(2)));
        // Sessions being made count, and cannot be closed to make room.
        let mut c = Check::new(2, 2);
        c.table.admit(&key("a")).unwrap();
        c.table.admit(&key("a")).unwrap();
        assert_eq!(c.table.admit(&key("b")), Err(Refusal::Total(2)));
        c.table.cancel(&key("a"));
        c.table.admit(&key("b")).unwrap();
    }

    #[test]
    fn closed_sessions_free_their_place_and_unknown_ids_are_ignored() {
        let mut c = Check::new(2, 1);
        c.open("a", "a1", 1).unwrap();
        assert_eq!(c.table.remove(&"a1".to_owned()), Some("a1".to_owned()));
        assert_eq!(c.table.remove(&"a1".to_owned()), None, "closed twice (rmcp reports its own closes too)");
        assert!(!c.table.begin(&"a1".to_owned(), c.at(2), true));
        c.table.end(&"nope".to_owned(), c.at(2));
        assert_eq!(c.open("a", "a2", 3).unwrap(), Vec::<String>::new(), "a holds nothing any more");
        assert_eq!(c.table.len(), 1);
        assert!(c.table.held.values().all(|n| *n > 0));
    }

    #[test]
    fn thousands_of_abandoned_sessions_of_one_key_leave_room_for_every_other_key() {
        let mut c = Check::new(1024, 256);
        for i in 0..3000u64 {
            c.open("careless", &format!("s{i}"), i).unwrap();
            assert!(c.table.len() <= 256);
        }
        for other in ["b", "c", "d"] {
            for i in 0..256u64 {
                let closed = c.open(other, &format!("{other}{i}"), 3000 + i).unwrap();
                assert_eq!(closed, Vec::<String>::new(), "another key's sessions closed nobody's");
            }
        }
        assert_eq!(c.table.len(), 1024);
        assert_eq!(c.open("e", "e1", 4000).unwrap().len(), 1, "full: an idle session makes room");
    }
}
