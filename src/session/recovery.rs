//! What an earlier run, or a bug, left behind: adoption of running sessions at start-up, and the orphan
//! sweep that every reaper pass runs.
//!
//! Adoption reads only what the service itself wrote: the container's labels (set at create time, out
//! of the sandbox's reach), the run directory (mounted read-only in the container) and the session's
//! records (`records.rs`: its claim, its installed packages). The orphan sweep
//! is the safety net under the lifecycle: a container labelled with this instance whose session the
//! registry does not know is removed, logged and counted (`kernelbox_orphans_removed_total`); so is a
//! package fetcher (`kernelbox.fetcher`) whose fetch is over. At start-up every fetcher is removed.

use chrono::{DateTime, Utc};

use crate::images::Catalog;
use crate::runtime::{ContainerRuntime, ContainerSummary, labels};

use super::actor::Start;
use super::error::SessionError;
use super::installs::Installs;
use super::launch::Launcher;
use super::model::{Owner, SessionId, SessionSettings};
use super::warm_pool::WarmPool;
use super::{pool, records, rundir};

/// What recovery works with, lent by the manager.
pub struct Recovery<'a> {
    /// The containers of this instance are the ones looked at.
    pub instance: &'a str,
    pub launcher: &'a Launcher,
    pub pool: &'a WarmPool,
    pub installs: &'a Installs,
    /// The sessions were held through a gap that fences them (an agent's stale contact stamp at start):
    /// a session container found dead is tombstoned as it is removed, so its id answers `session_lost`
    /// as the fenced live ones do, not "not found".
    pub bury_dead: bool,
}

impl Recovery<'_> {
    fn runtime(&self) -> &dyn ContainerRuntime {
        self.launcher.planner.runtime.as_ref()
    }

    fn catalog(&self) -> &Catalog {
        &self.launcher.planner.catalog
    }

    /// Whether `id` is a session's or a pooled kernel's: the sweeps leave those alone.
    fn knows(&self, id: &str) -> bool {
        self.launcher.registry.knows(id) || self.pool.knows(id)
    }
}

/// Adopts the running containers of this instance whose kernel answers, removes the rest and any run
/// directory no session needs. Returns (adopted, removed).
pub async fn recover(r: &Recovery<'_>) -> Result<(usize, usize), SessionError> {
    let found = r.runtime().list(labels::INSTANCE, Some(r.instance)).await?;
    let mut removed = 0;
    let mut adopting = Vec::new();
    for container in found {
        match adoptable(r, &container) {
            Ok((session_id, owner, settings, created_at, boot)) => {
                let (session, inbox) = r.launcher.new_session(session_id, owner, settings, created_at);
                // What it installed, so a restart into a new container installs it again.
                r.installs.restore(&session);
                r.launcher.registry.insert(&session);
                let start = Start::Adopt { container_id: container.id.clone(), boot };
                adopting.push((session.clone(), r.launcher.spawn(session, inbox, start)));
            }
            Err(why) => {
                if r.bury_dead
                    && !container.running
                    && let Some((id, owner)) = holder(r, &container)
                {
                    r.launcher.registry.bury(id, owner, Utc::now());
                }
                tracing::info!(container = %container.id, why, "removing a container left by an earlier run");
                r.runtime().remove(&container.id).await?;
                removed += 1;
            }
        }
    }
    let mut adopted = 0;
    for (session, ready) in adopting {
        let outcome = ready.await;
        if !matches!(outcome, Ok(Ok(()))) && r.bury_dead {
            r.launcher.registry.bury(session.id.clone(), session.owner.clone(), Utc::now());
        }
        match outcome {
            Ok(Ok(())) => {
                adopted += 1;
                tracing::info!(session_id = %session.id, "adopted a session from an earlier run");
            }
            Ok(Err(e)) => {
                // The session's task removed the container.
                removed += 1;
                tracing::info!(session_id = %session.id, error = %e, "could not adopt a session; removed it");
            }
            Err(_) => removed += 1,
        }
    }
    r.launcher.dirs.sweep(|session| r.knows(session));
    Ok((adopted, removed))
}

type Adoptable = (SessionId, Owner, SessionSettings, DateTime<Utc>, String);

/// The session a container served and its owner (a claimed pooled kernel's from its claim), if any.
fn holder(r: &Recovery<'_>, c: &ContainerSummary) -> Option<(SessionId, Owner)> {
    let id = c.labels.get(labels::SESSION).and_then(|s| SessionId::parse(s))?;
    if c.labels.contains_key(labels::POOL) {
        let claim: pool::Claim = records::read(&r.launcher.dirs.claims, id.as_str())?;
        return Some((id, claim.owner));
    }
    Some((id, Owner(c.labels.get(labels::OWNER)?.clone())))
}

/// Whether a container can be adopted, from its labels alone.
fn adoptable(r: &Recovery<'_>, c: &ContainerSummary) -> Result<Adoptable, &'static str> {
    if !c.running {
        return Err("not running");
    }
    let label = |key: &str| c.labels.get(key);
    let id = label(labels::SESSION).and_then(|s| SessionId::parse(s)).ok_or("no session id")?;
    if r.launcher.registry.is_tombstoned(&id) {
        return Err("its session was lost to fencing");
    }
    let boot = label(labels::BOOT).cloned().ok_or("no boot id (made by an older version)")?;
    if label(labels::POOL).is_some() {
        // A pooled kernel: its owner is what the service wrote when a session claimed it.
        let claim: pool::Claim =
            records::read(&r.launcher.dirs.claims, id.as_str()).ok_or("an unclaimed pooled kernel")?;
        if r.catalog().language(&claim.settings.language).is_none() {
            return Err("unknown language");
        }
        return Ok((id, claim.owner, claim.settings, claim.created_at, boot));
    }
    let owner = Owner(label(labels::OWNER).cloned().ok_or("no owner")?);
    let settings: SessionSettings =
        label(labels::CONFIG).and_then(|j| serde_json::from_str(j).ok()).ok_or("no settings")?;
    let created_at = label(labels::CREATED)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .ok_or("no creation time")?;
    if r.catalog().language(&settings.language).is_none() {
        return Err("unknown language");
    }
    Ok((id, owner, settings, created_at, boot))
}

/// Removes containers of this instance whose session the registry does not know, and run directories
/// no session needs. Returns how many containers it removed.
pub async fn sweep_orphans(r: &Recovery<'_>) -> usize {
    let found = match r.runtime().list(labels::INSTANCE, Some(r.instance)).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "orphan sweep: could not list containers");
            return 0;
        }
    };
    let mut removed = 0;
    for c in found {
        // An entry exists from before its container is created until after it is removed (a pooled
        // kernel's id is the pool's from before its boot until the registry holds it), so a container
        // whose id is unknown belongs to nobody.
        let known = c.labels.get(labels::SESSION).is_some_and(|s| r.knows(s))
            || c.labels.get(labels::FETCHER).is_some_and(|f| r.installs.packages.is_live_fetcher(f))
            || (c.labels.contains_key(labels::EXPORT) && r.launcher.planner.trees.is_copying())
            // The egress proxy is its keeper's (`egress/keeper.rs`), which removes it at stop.
            || c.labels.contains_key(crate::egress::keeper::LABEL);
        if known {
            continue;
        }
        tracing::warn!(container = %c.id, "removing an orphaned container");
        match r.runtime().remove(&c.id).await {
            Ok(()) => {
                removed += 1;
                metrics::counter!("kernelbox_orphans_removed_total").increment(1);
            }
            Err(e) => tracing::warn!(container = %c.id, error = %e, "could not remove an orphaned container"),
        }
    }
    rundir::sweep(&r.launcher.dirs.runs, |session| r.knows(session));
    removed
}
