//! What an earlier run, or a bug, left behind: adoption of running sessions at start-up, and the orphan
//! sweep that every reaper pass runs.
//!
//! Adoption reads only what the service itself wrote: the container's labels (set at create time, out
//! of the sandbox's reach), the run directory (mounted read-only in the container) and the session's
//! records (`records.rs`: its claim, its installed packages). The orphan sweep
//! is the safety net under the lifecycle: a container labelled with this instance whose session the
//! registry does not know is removed, logged and counted (`kernelbox_orphans_removed_total`); so is a
//! package fetcher (`kernelbox.fetcher`) whose fetch is over. At start-up every fetcher is removed.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::runtime::{ContainerSummary, labels};

use super::actor::Start;
use super::error::SessionError;
use super::manager::SessionManager;
use super::model::{Owner, SessionId, SessionSettings};
use super::{pool, records, rundir};

/// Adopts the running containers of this instance whose kernel answers, removes the rest and any run
/// directory no session needs. Returns (adopted, removed).
pub async fn recover(manager: &Arc<SessionManager>) -> Result<(usize, usize), SessionError> {
    let instance = manager.config().instance.clone();
    let found = manager.runtime().list(labels::INSTANCE, Some(&instance)).await?;
    let mut removed = 0;
    let mut adopting = Vec::new();
    for container in found {
        match adoptable(manager, &container) {
            Ok((session_id, owner, settings, created_at, boot)) => {
                let (session, inbox) = manager.new_session(session_id, owner, settings, created_at);
                // What it installed, so a restart into a new container installs it again.
                if let Some(specs) = records::read::<Vec<String>>(&manager.installed_dir(), session.id.as_str()) {
                    *session.packages.lock().unwrap() = specs;
                }
                manager.registry().insert(&session);
                let start = Start::Adopt { container_id: container.id.clone(), boot };
                adopting.push((session.clone(), manager.spawn(session, inbox, start)));
            }
            Err(why) => {
                tracing::info!(container = %container.id, why, "removing a container left by an earlier run");
                manager.runtime().remove(&container.id).await?;
                removed += 1;
            }
        }
    }
    let mut adopted = 0;
    for (session, ready) in adopting {
        match ready.await {
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
    rundir::sweep(&manager.runs_dir(), |session| manager.knows(session));
    records::sweep(&manager.claims_dir(), |session| manager.knows(session));
    records::sweep(&manager.installed_dir(), |session| manager.knows(session));
    Ok((adopted, removed))
}

type Adoptable = (SessionId, Owner, SessionSettings, DateTime<Utc>, String);

/// Whether a container can be adopted, from its labels alone.
fn adoptable(manager: &SessionManager, c: &ContainerSummary) -> Result<Adoptable, &'static str> {
    if !c.running {
        return Err("not running");
    }
    let label = |key: &str| c.labels.get(key);
    let id = label(labels::SESSION).and_then(|s| SessionId::parse(s)).ok_or("no session id")?;
    let boot = label(labels::BOOT).cloned().ok_or("no boot id (made by an older version)")?;
    if label(labels::POOL).is_some() {
        // A pooled kernel: its owner is what the service wrote when a session claimed it.
        let claim: pool::Claim =
            records::read(&manager.claims_dir(), id.as_str()).ok_or("an unclaimed pooled kernel")?;
        if manager.catalog().language(&claim.settings.language).is_none() {
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
    if manager.catalog().language(&settings.language).is_none() {
        return Err("unknown language");
    }
    Ok((id, owner, settings, created_at, boot))
}

/// Removes containers of this instance whose session the registry does not know, and run directories
/// no session needs. Returns how many containers it removed.
pub async fn sweep_orphans(manager: &SessionManager) -> usize {
    let instance = &manager.config().instance;
    let found = match manager.runtime().list(labels::INSTANCE, Some(instance)).await {
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
        let known = c.labels.get(labels::SESSION).is_some_and(|s| manager.knows(s))
            || c.labels.get(labels::FETCHER).is_some_and(|f| manager.packages().is_live_fetcher(f));
        if known {
            continue;
        }
        tracing::warn!(container = %c.id, "removing an orphaned container");
        match manager.runtime().remove(&c.id).await {
            Ok(()) => {
                removed += 1;
                metrics::counter!("kernelbox_orphans_removed_total").increment(1);
            }
            Err(e) => tracing::warn!(container = %c.id, error = %e, "could not remove an orphaned container"),
        }
    }
    rundir::sweep(&manager.runs_dir(), |session| manager.knows(session));
    removed
}
