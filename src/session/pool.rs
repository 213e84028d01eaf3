//! The warm pool: per language, kernels booted ahead of demand, so that starting a session is a claim
//! instead of a boot.
//!
//! A pooled kernel is a [`KernelHost`] (container, run directory, connection) with a session id chosen at
//! boot and the language's default settings; it belongs to nobody and has run nothing. A claim takes one
//! atomically (under the pool's lock), applies the caller's memory and CPU limits to the running
//! container, and hands it to a new session's task; the container is never returned to the pool, so no
//! state ever passes from one user to another. Requests a pooled container cannot serve (environment
//! variables, mounts, a tmpfs of another size) start cold.
//!
//! Who owns a claimed container cannot be written on it (labels are fixed at create time), so the claim
//! is written to `<state>/claims/<session>.json` (`records.rs`) by the service before the session exists;
//! adoption at start-up reads it. An unclaimed pooled container found at start-up is removed.
//!
//! The ids of pooled kernels, booting or ready, count as known to the orphan sweep, and a claimed one is
//! in the registry before it leaves the pool: at no moment does a sweep see an owned container as an
//! orphan.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use crate::config::{PoolBounds, PoolConfig};

use super::kernel_host::KernelHost;
use super::model::{Owner, SessionId, SessionSettings};
use crate::node::NodeTag;

/// A kernel booted ahead of demand.
pub struct Pooled {
    pub id: SessionId,
    pub settings: SessionSettings,
    pub created_at: DateTime<Utc>,
    pub host: KernelHost,
}

/// What a claim leaves for adoption to read: who owns the container and with which settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub owner: Owner,
    pub settings: SessionSettings,
    pub created_at: DateTime<Utc>,
}

/// The pool's numbers for one language.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PoolStatus {
    /// Kernels kept ready when possible, now: between the floor and the ceiling, following recent creates.
    pub target: usize,
    pub floor: usize,
    pub ceiling: usize,
    pub ready: usize,
    pub booting: usize,
    /// Creates served by a pooled kernel since the service started.
    pub hits: u64,
    /// Creates that could have been, but found none ready and started cold.
    pub misses: u64,
}

/// The pool's state; the boots themselves are run by the manager.
#[derive(Default)]
pub struct Pool {
    inner: Mutex<Inner>,
    /// The node's tag on a cluster's agent: a pooled kernel's id is its future session's id.
    node: Option<NodeTag>,
}

#[derive(Default)]
struct Inner {
    ready: HashMap<String, VecDeque<Pooled>>,
    booting: HashMap<String, usize>,
    /// Ids of every pooled kernel, booting or ready (the orphan sweep must not take them).
    members: HashSet<String>,
    /// A language whose boot failed is not retried before this.
    retry_after: HashMap<String, Instant>,
    /// Per language: creates served from the pool, and those that found it empty.
    hits: HashMap<String, u64>,
    misses: HashMap<String, u64>,
    closed: bool,
}

/// After a failed boot, how long a language waits before the next.
const RETRY_DELAY: Duration = Duration::from_secs(15);

impl Pool {
    /// An empty pool whose kernels' ids end with `node`'s tag (none: single-node ids).
    pub fn on(node: Option<NodeTag>) -> Self {
        Pool { inner: Mutex::default(), node }
    }

    /// Whether `id` is a pooled kernel's (booting or ready).
    pub fn knows(&self, id: &str) -> bool {
        self.inner.lock().unwrap().members.contains(id)
    }

    /// Reserves a boot for `language` if it is below `target` (counting boots under way) and not
    /// waiting after a failure; the id is a member from now on.
    pub fn begin_boot(&self, language: &str, target: usize, max_boots: usize) -> Option<SessionId> {
        let mut inner = self.inner.lock().unwrap();
        if inner.closed || inner.retry_after.get(language).is_some_and(|t| *t > Instant::now()) {
            return None;
        }
        if inner.booting.values().sum::<usize>() >= max_boots {
            return None;
        }
        let have =
            inner.ready.get(language).map_or(0, VecDeque::len) + inner.booting.get(language).copied().unwrap_or(0);
        if have >= target {
            return None;
        }
        let id = SessionId::new_on(self.node);
        *inner.booting.entry(language.to_owned()).or_default() += 1;
        inner.members.insert(id.to_string());
        Some(id)
    }

    /// A boot ended: its kernel joins the pool, or (pool closed, boot failed) comes back to be removed.
    pub fn end_boot(&self, language: &str, id: &SessionId, booted: Option<Pooled>) -> Option<Pooled> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(n) = inner.booting.get_mut(language) {
            *n = n.saturating_sub(1);
        }
        match booted {
            Some(pooled) if !inner.closed => {
                inner.ready.entry(language.to_owned()).or_default().push_back(pooled);
                None
            }
            Some(pooled) => {
                inner.members.remove(pooled.id.as_str());
                Some(pooled)
            }
            None => {
                inner.members.remove(id.as_str());
                inner.retry_after.insert(language.to_owned(), Instant::now() + RETRY_DELAY);
                None
            }
        }
    }

    /// Takes a live pooled kernel of `language`; dead ones found on the way are returned for removal.
    /// The id stays a member until [`Pool::release`].
    pub fn take(&self, language: &str) -> (Option<Pooled>, Vec<Pooled>) {
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        let mut dead = Vec::new();
        let mut found = None;
        if let Some(queue) = inner.ready.get_mut(language) {
            while let Some(pooled) = queue.pop_front() {
                if pooled.host.is_alive() {
                    found = Some(pooled);
                    break;
                }
                dead.push(pooled);
            }
        }
        for d in &dead {
            inner.members.remove(d.id.as_str());
        }
        (found, dead)
    }

    /// Ready kernels of `language` beyond `target` (counting boots under way), oldest first, taken out
    /// for removal: a target that fell back after a quiet spell frees their memory.
    pub fn take_surplus(&self, language: &str, target: usize) -> Vec<Pooled> {
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        let booting = inner.booting.get(language).copied().unwrap_or(0);
        let mut surplus = Vec::new();
        if let Some(queue) = inner.ready.get_mut(language) {
            while queue.len() + booting > target {
                let Some(pooled) = queue.pop_front() else { break };
                surplus.push(pooled);
            }
        }
        surplus
    }

    /// The id is no longer the pool's (the registry holds it now, or it is being removed).
    pub fn release(&self, id: &str) {
        self.inner.lock().unwrap().members.remove(id);
    }

    /// Dead kernels waiting in the pool, taken out for removal.
    pub fn take_dead(&self) -> Vec<Pooled> {
        let mut inner = self.inner.lock().unwrap();
        let mut dead = Vec::new();
        for queue in inner.ready.values_mut() {
            let (alive, gone): (VecDeque<Pooled>, VecDeque<Pooled>) = queue.drain(..).partition(|p| p.host.is_alive());
            *queue = alive;
            dead.extend(gone);
        }
        for d in &dead {
            inner.members.remove(d.id.as_str());
        }
        dead
    }

    /// Closes the pool: no more boots; every ready kernel is handed back for removal.
    pub fn close(&self) -> Vec<Pooled> {
        let mut inner = self.inner.lock().unwrap();
        inner.closed = true;
        let all: Vec<Pooled> = inner.ready.drain().flat_map(|(_, q)| q).collect();
        for p in &all {
            inner.members.remove(p.id.as_str());
        }
        all
    }

    pub fn status(&self, language: &str, target: usize, bounds: PoolBounds) -> PoolStatus {
        let inner = self.inner.lock().unwrap();
        PoolStatus {
            target,
            floor: bounds.floor,
            ceiling: bounds.ceiling,
            ready: inner.ready.get(language).map_or(0, VecDeque::len),
            booting: inner.booting.get(language).copied().unwrap_or(0),
            hits: inner.hits.get(language).copied().unwrap_or(0),
            misses: inner.misses.get(language).copied().unwrap_or(0),
        }
    }

    /// A create of `language` was served by a pooled kernel (`hit`), or found none ready.
    pub fn count(&self, language: &str, hit: bool) {
        let mut inner = self.inner.lock().unwrap();
        let counts = if hit { &mut inner.hits } else { &mut inner.misses };
        *counts.entry(language.to_owned()).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_are_reserved_up_to_the_target_and_failures_back_off() {
        let pool = Pool::default();
        let a = pool.begin_boot("python", 2, 3).unwrap();
        let b = pool.begin_boot("python", 2, 3).unwrap();
        assert!(pool.begin_boot("python", 2, 3).is_none(), "two under way is the target");
        assert!(pool.knows(a.as_str()) && pool.knows(b.as_str()), "booting ids are known to the sweep");
        let two = PoolBounds::fixed(2);
        let status = pool.status("python", 2, two);
        assert_eq!(status, PoolStatus { target: 2, floor: 2, ceiling: 2, ready: 0, booting: 2, hits: 0, misses: 0 });
        pool.count("python", true);
        pool.count("python", false);
        pool.count("python", false);
        let status = pool.status("python", 2, two);
        assert_eq!((status.hits, status.misses), (1, 2), "hits and misses counted");
        assert!(pool.end_boot("python", &a, None).is_none());
        assert!(!pool.knows(a.as_str()));
        assert!(pool.begin_boot("python", 2, 3).is_none(), "a failed boot waits before the next");
        assert!(pool.begin_boot("javascript", 1, 3).is_some(), "other languages are not held back");
        assert!(pool.begin_boot("java", 1, 2).is_none(), "at most max_boots at once, all languages together");
        assert!(pool.take("python").0.is_none());
        assert!(pool.close().is_empty());
        assert!(pool.begin_boot("bash", 1, 9).is_none(), "a closed pool boots nothing");
    }
}
