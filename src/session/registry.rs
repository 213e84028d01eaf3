//! The registry: which sessions exist. A std mutex over a map, never held across `.await`.
//!
//! An entry is added before a session's container is created and removed only by the session's own task
//! after the container is gone, so the registry and the engine agree: every container of this instance
//! belongs to an entry (the reaper's orphan sweep removes any that does not), and a quota slot is freed
//! only when its container is gone. Lookups that mark a session in use do so under the same lock as the
//! reaper's pick, so a session with work queued is never reaped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::error::SessionError;
use super::fence::Tombstones;
use super::handle::{InUse, Session};
use super::model::{Owner, SessionId, SessionSettings};
use super::policy;
use crate::config::Limits;

#[derive(Default)]
struct Inner {
    sessions: HashMap<SessionId, Arc<Session>>,
    /// Set at shutdown: no new entries.
    closed: bool,
}

#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    /// Sessions removed by fencing (an agent only): their ids answer `session_lost`. Locked after
    /// `inner` when both are.
    tombstones: Mutex<Tombstones>,
}

impl Registry {
    /// An empty registry that remembers `tombstones` (what an earlier run fenced).
    pub fn with_tombstones(tombstones: Tombstones) -> Self {
        Registry { inner: Mutex::default(), tombstones: Mutex::new(tombstones) }
    }

    /// Adds a starting session if the service is open and the quotas allow it. Closing sessions still
    /// count: their containers are not gone yet.
    pub fn reserve(&self, session: &Arc<Session>, limits: &Limits) -> Result<(), SessionError> {
        let mut inner = self.inner.lock().unwrap();
        if inner.closed {
            return Err(SessionError::Closing);
        }
        let held = Self::held(&inner, &session.owner);
        policy::admit(held, session.settings.memory_mb, session.settings.cpus, limits)?;
        inner.sessions.insert(session.id.clone(), session.clone());
        Ok(())
    }

    /// Whether `owner` could add a session of `settings` now (a hint: [`Registry::reserve`] decides).
    pub fn check_admit(&self, owner: &Owner, settings: &SessionSettings, limits: &Limits) -> Result<(), SessionError> {
        let inner = self.inner.lock().unwrap();
        if inner.closed {
            return Err(SessionError::Closing);
        }
        policy::admit(Self::held(&inner, owner), settings.memory_mb, settings.cpus, limits)
    }

    /// What the registered sessions hold, `owner`'s counted apart.
    fn held(inner: &Inner, owner: &Owner) -> policy::Held {
        let mut held = policy::Held::default();
        for s in inner.sessions.values() {
            held.sessions += 1;
            held.owned += usize::from(&s.owner == owner);
            held.memory_mb = held.memory_mb.saturating_add(s.settings.memory_mb);
            held.cpus += s.settings.cpus;
        }
        held
    }

    /// Adds an adopted session (start-up only; quotas do not apply to what already runs).
    pub fn insert(&self, session: &Arc<Session>) {
        self.inner.lock().unwrap().sessions.insert(session.id.clone(), session.clone());
    }

    /// Called by a session's task once its container is gone.
    pub fn remove(&self, id: &SessionId) {
        self.inner.lock().unwrap().sessions.remove(id);
    }

    /// The session `id` if `owner` owns it and it is not closing (another owner's session is "not
    /// found", not "forbidden").
    pub fn get(&self, owner: &Owner, id: &str) -> Result<Arc<Session>, SessionError> {
        let found = Self::find(&self.inner.lock().unwrap(), owner, id);
        found.map_err(|e| self.lost_or(owner, id, e))
    }

    /// Like [`Registry::get`], and marks the session in use under the same lock, so the reaper (which
    /// picks under this lock too) either sees the mark or has already made the session unfindable.
    pub fn get_in_use(&self, owner: &Owner, id: &str) -> Result<(Arc<Session>, InUse), SessionError> {
        let inner = self.inner.lock().unwrap();
        let session = Self::find(&inner, owner, id).map_err(|e| self.lost_or(owner, id, e))?;
        let in_use = session.mark_in_use();
        Ok((session, in_use))
    }

    /// `Lost` when `owner`'s `id` was fenced, else `otherwise`.
    fn lost_or(&self, owner: &Owner, id: &str, otherwise: SessionError) -> SessionError {
        let lost = SessionId::parse(id)
            .is_some_and(|sid| self.tombstones.lock().unwrap().is_lost(owner, &sid, chrono::Utc::now()));
        match lost {
            true => SessionError::Lost(id.to_owned()),
            false => otherwise,
        }
    }

    /// Fencing: closes every session (`reason` in their logs) and keeps a tombstone of each, under one
    /// lock, so that from this moment each id answers `session_lost`. Returns the sessions (their tasks
    /// remove their containers) and the tombstones to persist.
    pub fn fence_all(&self, reason: &'static str, now: DateTime<Utc>) -> (Vec<Arc<Session>>, Tombstones) {
        let inner = self.inner.lock().unwrap();
        let mut tombstones = self.tombstones.lock().unwrap();
        let sessions: Vec<Arc<Session>> = inner.sessions.values().cloned().collect();
        for session in &sessions {
            tombstones.bury(session.id.clone(), session.owner.clone(), now);
            session.close(reason, false);
        }
        (sessions, tombstones.clone())
    }

    /// Tombstones a session that is gone already (its container died with the node during a gap that
    /// fences it): its id answers `session_lost`, like those [`fence_all`](Self::fence_all) closes.
    pub fn bury(&self, id: SessionId, owner: Owner, now: DateTime<Utc>) {
        self.tombstones.lock().unwrap().bury(id, owner, now);
    }

    /// Whether `id` was fenced (whoever's): adoption removes such a container instead.
    pub fn is_tombstoned(&self, id: &SessionId) -> bool {
        self.tombstones.lock().unwrap().contains(id)
    }

    fn find(inner: &Inner, owner: &Owner, id: &str) -> Result<Arc<Session>, SessionError> {
        let not_found = || SessionError::NotFound(id.to_owned());
        let id = SessionId::parse(id).ok_or_else(not_found)?;
        inner.sessions.get(&id).filter(|s| &s.owner == owner && !s.is_closing()).cloned().ok_or_else(not_found)
    }

    /// Whether an entry (in any state, closing included) exists for `id`.
    pub fn knows(&self, id: &str) -> bool {
        SessionId::parse(id).is_some_and(|id| self.inner.lock().unwrap().sessions.contains_key(&id))
    }

    /// The sessions clients can see.
    pub fn visible(&self) -> Vec<Arc<Session>> {
        self.inner.lock().unwrap().sessions.values().filter(|s| !s.is_closing()).cloned().collect()
    }

    /// Every entry, closing ones included.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.inner.lock().unwrap().sessions.values().cloned().collect()
    }

    /// Picks the sessions `why` says to remove and marks them closing, all under the lock.
    pub fn pick_and_close(
        &self,
        mut why: impl FnMut(&Session) -> Option<&'static str>,
    ) -> Vec<(Arc<Session>, &'static str)> {
        let inner = self.inner.lock().unwrap();
        let mut picked = Vec::new();
        for session in inner.sessions.values() {
            if session.is_closing() {
                continue;
            }
            if let Some(reason) = why(session)
                && session.close("reaped", false)
            {
                picked.push((session.clone(), reason));
            }
        }
        picked
    }

    /// Closes the registry to new sessions and returns every live one.
    pub fn close_all(&self) -> Vec<Arc<Session>> {
        let mut inner = self.inner.lock().unwrap();
        inner.closed = true;
        inner.sessions.values().cloned().collect()
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().unwrap().closed
    }
}
