//! Fencing a cluster's agent that lost contact with the API tier: the contact clock and the tombstones.
//!
//! An API replica declares a node lost after `lost_after` without a successful probe (and the node gone
//! from DNS), and from then on answers `session_lost` for its sessions. The agent applies the same rule
//! to itself, so a "lost" session never comes back: when a request arrives after more than `lost_after`
//! without one, or the agent starts and its persisted stamp (`<state>/last-contact`) is older than that,
//! the sessions it held through the gap are removed and their ids kept as tombstones
//! (`<state>/tombstones.json`, one day each, bounded in number) that answer `session_lost`, never "not
//! found". The decisions are pure ([`ContactClock`], [`Tombstones`]); the manager acts on them. Both files
//! are written whole through a temporary file and a rename (never following a link), read `O_NOFOLLOW`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::model::{Owner, SessionId};
use super::records;

/// How long a fenced session's id answers `session_lost`.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 3600);
/// The most tombstones kept; past it, those that expire first go first.
pub const MAX_TOMBSTONES: usize = 100_000;
/// How often the contact stamp is written to the state directory.
pub const PERSIST_EVERY: Duration = Duration::from_secs(5);

const LAST_CONTACT: &str = "last-contact";
const TOMBSTONES: &str = "tombstones.json";
/// The largest tombstones file read back (an entry is under 100 bytes).
const MAX_TOMBSTONES_FILE: u64 = 16 << 20;

/// Whether contact at `now`, after the last at `last`, comes after a gap long enough to fence.
pub fn gap_is_fatal(last: DateTime<Utc>, now: DateTime<Utc>, lost_after: Duration) -> bool {
    let lost_after = chrono::Duration::from_std(lost_after).unwrap_or(chrono::Duration::MAX);
    now.signed_duration_since(last) > lost_after
}

/// When the API tier last reached this agent, and what of it is on disk.
#[derive(Debug)]
pub struct ContactClock {
    last: DateTime<Utc>,
    lost_after: Duration,
    /// The stamp on disk (`None`: nothing written by this process yet).
    persisted: Option<DateTime<Utc>>,
}

impl ContactClock {
    /// The clock of an agent starting at `now`, given the stamp an earlier run left; and whether the
    /// sessions it adopted were held through a fatal gap (then they must go before anything is served).
    /// Without a stamp (a first start) nothing was held, nothing is fenced.
    pub fn starting(persisted: Option<DateTime<Utc>>, now: DateTime<Utc>, lost_after: Duration) -> (Self, bool) {
        let fence = persisted.is_some_and(|last| gap_is_fatal(last, now, lost_after));
        let last = match persisted {
            Some(last) if !fence && last <= now => last,
            _ => now,
        };
        (ContactClock { last, lost_after, persisted: None }, fence)
    }

    /// Contact at `now`. True when it ends a fatal gap: the caller fences before serving the request.
    pub fn touch(&mut self, now: DateTime<Utc>) -> bool {
        let fatal = gap_is_fatal(self.last, now, self.lost_after);
        self.last = self.last.max(now);
        fatal
    }

    /// The stamp to write, if it changed since the last write.
    pub fn unsaved(&self) -> Option<DateTime<Utc>> {
        (self.persisted != Some(self.last)).then_some(self.last)
    }

    pub fn saved(&mut self, at: DateTime<Utc>) {
        self.persisted = Some(at);
    }
}

/// The stamp an earlier run persisted (`None`: none, or unreadable).
pub fn read_last_contact(state_dir: &Path) -> Option<DateTime<Utc>> {
    let bytes = records::read_small(&state_dir.join(LAST_CONTACT), 256)?;
    DateTime::parse_from_rfc3339(std::str::from_utf8(&bytes).ok()?.trim()).ok().map(|t| t.with_timezone(&Utc))
}

/// Persists the contact stamp, whole or not at all.
pub fn write_last_contact(state_dir: &Path, at: DateTime<Utc>) -> std::io::Result<()> {
    records::write_atomically(state_dir, LAST_CONTACT, at.to_rfc3339().as_bytes())
}

/// The ids of fenced sessions, with their owner (another owner still gets "not found") and expiry.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tombstones {
    entries: HashMap<SessionId, Tombstone>,
}

#[derive(Debug, Clone, PartialEq)]
struct Tombstone {
    owner: Owner,
    expires: DateTime<Utc>,
}

/// A tombstone as stored in `tombstones.json`.
#[derive(Serialize, Deserialize)]
struct Stored {
    id: String,
    owner: String,
    expires: DateTime<Utc>,
}

impl Tombstones {
    /// Keeps `id` (of `owner`) as lost for a day from `now`.
    pub fn bury(&mut self, id: SessionId, owner: Owner, now: DateTime<Utc>) {
        let expires = now + chrono::Duration::from_std(TOMBSTONE_TTL).expect("a day fits");
        self.entries.insert(id, Tombstone { owner, expires });
        if self.entries.len() > MAX_TOMBSTONES {
            self.prune(now);
        }
    }

    /// Whether `owner`'s session `id` was fenced and its tombstone is still there at `now`.
    pub fn is_lost(&self, owner: &Owner, id: &SessionId, now: DateTime<Utc>) -> bool {
        self.entries.get(id).is_some_and(|t| &t.owner == owner && t.expires > now)
    }

    /// Whether `id` has a tombstone (whoever's): adoption never brings such a session back.
    pub fn contains(&self, id: &SessionId) -> bool {
        self.entries.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops expired tombstones, then the soonest to expire while there are too many.
    pub fn prune(&mut self, now: DateTime<Utc>) {
        self.entries.retain(|_, t| t.expires > now);
        if self.entries.len() > MAX_TOMBSTONES {
            let mut by_expiry: Vec<(DateTime<Utc>, SessionId)> =
                self.entries.iter().map(|(id, t)| (t.expires, id.clone())).collect();
            by_expiry.sort();
            let excess = self.entries.len() - MAX_TOMBSTONES;
            for (_, id) in by_expiry.into_iter().take(excess) {
                self.entries.remove(&id);
            }
        }
    }

    fn to_json(&self) -> Vec<u8> {
        let stored: Vec<Stored> = self
            .entries
            .iter()
            .map(|(id, t)| Stored { id: id.to_string(), owner: t.owner.0.clone(), expires: t.expires })
            .collect();
        serde_json::to_vec(&stored).expect("tombstones serialize")
    }

    /// Reads stored tombstones; malformed entries and expired ones are left out.
    fn from_json(bytes: &[u8], now: DateTime<Utc>) -> Option<Self> {
        let stored: Vec<Stored> = serde_json::from_slice(bytes).ok()?;
        let mut tombstones = Tombstones::default();
        for s in stored {
            if let Some(id) = SessionId::parse(&s.id) {
                tombstones.entries.insert(id, Tombstone { owner: Owner(s.owner), expires: s.expires });
            }
        }
        tombstones.prune(now);
        Some(tombstones)
    }

    /// The tombstones an earlier run kept (none when there is no file; an unreadable one is logged).
    pub fn load(state_dir: &Path, now: DateTime<Utc>) -> Self {
        let path = state_dir.join(TOMBSTONES);
        if std::fs::symlink_metadata(&path).is_err() {
            return Tombstones::default();
        }
        match records::read_small(&path, MAX_TOMBSTONES_FILE).and_then(|bytes| Self::from_json(&bytes, now)) {
            Some(tombstones) => tombstones,
            None => {
                tracing::warn!(path = %path.display(), "the tombstones file is unreadable; starting without it");
                Tombstones::default()
            }
        }
    }

    /// Writes the tombstones, whole or not at all (expired ones are left out when loaded).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        records::write_atomically(state_dir, TOMBSTONES, &self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn id(n: u32) -> SessionId {
        SessionId::parse(&format!("{n:016x}0123abcd")).unwrap()
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn contact_after_more_than_lost_after_is_a_fatal_gap_and_within_it_is_not() {
        let (mut clock, fence) = ContactClock::starting(None, at(0), MINUTE);
        assert!(!fence, "a first start has held nothing");
        assert!(!clock.touch(at(30)));
        assert!(!clock.touch(at(90)), "60 s after the last contact is not more than lost_after");
        assert!(clock.touch(at(151)), "61 s without contact");
        assert!(!clock.touch(at(152)), "the gap is over once contact resumed");
        assert!(!clock.touch(at(100)), "a request stamped earlier (clocks, concurrency) moves nothing back");
        assert!(clock.touch(at(213)));
    }

    #[test]
    fn a_start_after_a_stale_stamp_fences_and_after_a_fresh_one_carries_on_from_it() {
        let (_, fence) = ContactClock::starting(Some(at(0)), at(61), MINUTE);
        assert!(fence);
        let (mut clock, fence) = ContactClock::starting(Some(at(0)), at(50), MINUTE);
        assert!(!fence);
        assert!(clock.touch(at(61)), "the gap counts from the persisted stamp, not from the start");
    }

    #[test]
    fn the_stamp_is_written_only_when_it_moved_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut clock, _) = ContactClock::starting(None, at(0), MINUTE);
        let stamp = clock.unsaved().unwrap();
        write_last_contact(dir.path(), stamp).unwrap();
        clock.saved(stamp);
        assert_eq!(clock.unsaved(), None);
        clock.touch(at(5));
        assert_eq!(clock.unsaved(), Some(at(5)));
        assert_eq!(read_last_contact(dir.path()), Some(at(0)));
        assert_eq!(read_last_contact(&dir.path().join("nowhere")), None);
    }

    #[test]
    fn a_tombstone_answers_for_its_owner_until_it_expires() {
        let mut t = Tombstones::default();
        let a = Owner("a".into());
        t.bury(id(1), a.clone(), at(0));
        assert!(t.is_lost(&a, &id(1), at(3600)));
        assert!(!t.is_lost(&Owner("b".into()), &id(1), at(3600)), "another owner's id stays not found");
        assert!(!t.is_lost(&a, &id(2), at(3600)));
        assert!(!t.is_lost(&a, &id(1), at(24 * 3600)), "a day later it is gone");
        t.prune(at(24 * 3600));
        assert!(t.is_empty());
    }

    #[test]
    fn tombstones_are_bounded_and_the_soonest_to_expire_go_first() {
        let mut t = Tombstones::default();
        for n in 0..(MAX_TOMBSTONES as u32 + 5) {
            t.bury(id(n), Owner("a".into()), at(n as i64 / 100));
        }
        assert_eq!(t.len(), MAX_TOMBSTONES);
        assert!(!t.contains(&id(4)));
        assert!(t.contains(&id(5)));
    }

    #[test]
    fn tombstones_survive_a_restart_and_a_planted_link_is_neither_read_nor_followed() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tombstones::default();
        t.bury(id(1), Owner("a".into()), at(0));
        t.save(dir.path()).unwrap();
        assert_eq!(Tombstones::load(dir.path(), at(10)), t);
        assert!(Tombstones::load(dir.path(), at(24 * 3600 + 1)).is_empty(), "expired ones are not loaded");

        let target = dir.path().join("elsewhere.json");
        std::fs::write(&target, b"[]").unwrap();
        std::fs::remove_file(dir.path().join(TOMBSTONES)).unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(TOMBSTONES)).unwrap();
        assert!(Tombstones::load(dir.path(), at(10)).is_empty());
        t.save(dir.path()).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"[]", "the link's target is untouched");
        assert!(!std::fs::symlink_metadata(dir.path().join(TOMBSTONES)).unwrap().file_type().is_symlink());
        assert_eq!(Tombstones::load(dir.path(), at(10)), t);
    }
}
