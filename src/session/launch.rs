//! Starting a session's task: the handle made from its settings, its [`Actor`] spawned and tracked, and
//! what happens when the task ends, however it ends (a panic included): its records go unless it is kept
//! for adoption, then it leaves the registry. Also the wait for readiness that closes the session when
//! the caller goes away first.
//!
//! Create, a pool claim and adoption all start sessions through here, so the registry and the engine
//! agree the same way for each.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use super::actor::{Actor, ActorSettings, Refit, Start};
use super::boot::BootPlanner;
use super::error::SessionError;
use super::handle::{Inbox, Session};
use super::model::{Owner, SessionId, SessionLimits, SessionSettings};
use super::network::Networks;
use super::notebook_store::NotebookStore;
use super::outputs::{FolderLocks, OutputCopier};
use super::policy::RestartBound;
use super::records::StateDirs;
use super::registry::Registry;

/// Makes sessions and spawns their tasks.
pub struct Launcher {
    pub registry: Arc<Registry>,
    pub planner: Arc<BootPlanner>,
    pub notebooks: Arc<NotebookStore>,
    /// Shared by every session's output copier: one copy per user folder at a time.
    pub output_locks: Arc<FolderLocks>,
    pub dirs: StateDirs,
    /// Tracks session tasks, so shutdown waits for them.
    pub tracker: TaskTracker,
    /// Puts a session's packages into the new container an automatic or dead-session restart gives it.
    pub refit: Arc<dyn Refit>,
}

impl Launcher {
    /// A session's handle and the inbox its task reads.
    pub fn new_session(
        &self,
        id: SessionId,
        owner: Owner,
        settings: SessionSettings,
        created_at: DateTime<Utc>,
    ) -> (Arc<Session>, Inbox) {
        let l = &self.planner.limits;
        let limits = SessionLimits {
            memory_mb: settings.memory_mb,
            cpus: settings.cpus,
            pids: l.pids_limit,
            timeout_s: settings.timeout_s,
            idle_timeout_s: settings.idle_timeout_s,
            tmpfs_mb: self.planner.tmpfs_mb(settings.memory_mb),
        };
        let network = self.planner.network.as_ref().map(|n| n.attach(&id, &settings));
        Session::new(id, owner, settings, created_at, limits, l.queue_depth, network)
    }

    /// Spawns the session's task. The registry entry stays until the task has ended, whatever ends it.
    pub fn spawn(
        &self,
        session: Arc<Session>,
        inbox: Inbox,
        start: Start,
    ) -> oneshot::Receiver<Result<(), SessionError>> {
        let (ready_tx, ready) = oneshot::channel();
        let planner = &self.planner;
        let outputs = match (&planner.datasets_dir, &session.settings.output) {
            (Some(datasets), Some(user)) => {
                Some(OutputCopier::new(datasets, user, planner.user_output, self.output_locks.clone()))
            }
            _ => None,
        };
        let plan = planner.plan(&session.id, &session.owner, &session.settings, session.created_at, false);
        let l = &planner.limits;
        let settings = ActorSettings {
            notebook: self.notebooks.open(&session),
            outputs,
            output_limit: l.output_limit_bytes,
            interrupt_grace: l.interrupt_grace,
            late_output: planner
                .catalog
                .language(&session.settings.language)
                .map(|l| l.late_output())
                .unwrap_or_default(),
            restart_bound: RestartBound { max: l.auto_restart_limit, window: l.auto_restart_window },
            max_timeout: l.max_timeout,
            refit: self.refit.clone(),
        };
        let actor = Box::new(Actor::new(session.clone(), inbox, plan, settings));
        let leave = Deregister {
            registry: self.registry.clone(),
            session,
            dirs: self.dirs.clone(),
            networks: planner.network.clone(),
        };
        self.tracker.spawn(async move {
            let _leave = leave;
            actor.run(start, ready_tx).await;
        });
        ready
    }

    /// Waits until the session's kernel answers. If the caller goes away first (this future dropped), the
    /// session is closed and its task removes whatever it made.
    pub async fn until_ready(
        session: &Arc<Session>,
        ready: oneshot::Receiver<Result<(), SessionError>>,
    ) -> Result<Result<(), SessionError>, oneshot::error::RecvError> {
        let guard = CloseOnDrop(Some(session.clone()));
        let outcome = ready.await;
        guard.disarm();
        outcome
    }
}

/// Closes a session whose creator went away before it was ready (dropped with the create future).
struct CloseOnDrop(Option<Arc<Session>>);

impl CloseOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(session) = self.0.take()
            && session.close("client_gone", false)
        {
            tracing::info!(session_id = %session.id, "the client left during the boot; removing the session");
            metrics::counter!("kernelbox_sessions_abandoned_total").increment(1);
        }
    }
}

/// Leaves the registry when a session's task ends, however it ends.
struct Deregister {
    registry: Arc<Registry>,
    session: Arc<Session>,
    dirs: StateDirs,
    networks: Option<Arc<Networks>>,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        // A claim (pooled sessions) and the installed packages go with their session, unless the session
        // is kept for adoption.
        if !self.session.keep_on_exit() {
            self.dirs.forget(self.session.id.as_str());
        }
        if let Some(networks) = &self.networks {
            networks.forget(self.session.id.as_str(), self.session.keep_on_exit());
        }
        self.registry.remove(&self.session.id);
        self.session.finished.cancel();
    }
}
