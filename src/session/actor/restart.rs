//! Restarts in the session's task: a client's (in place when the container lives, else in a new one), the
//! one after a timeout whose interrupt was ignored, and the automatic one after the kernel died on its own
//! (it exited, crashed, ran out of memory, or a client sent `shutdown_request`), as Jupyter's server
//! restarts a dead kernel. The container dies with its kernel, so an automatic restart is a new container
//! (fresh state, files gone), with the session's installed packages put back ([`Refit`]).
//!
//! An automatic restart is bounded by the operator (`policy::RestartBound`: at most N within a window),
//! so a kernel that exits in a loop ends `dead`, not restarted forever. Each one is told to attached
//! Jupyter clients as IOPub statuses (`restarting`, `starting`, then `idle` or `dead`), to the streams
//! open on the session as `auto_restart` notices, in the session's view (`auto_restarts`,
//! `last_auto_restart`) and as a metric (`kernelbox_kernel_auto_restarts_total{outcome}`).

use chrono::Utc;
use futures::future::BoxFuture;

use crate::session::error::SessionError;
use crate::session::handle::Session;
use crate::session::kernel_host::KernelHost;
use crate::session::model::{AutoRestart, AutoRestartNotice, AutoRestartPhase, SessionStatus};
use crate::session::policy::AfterDeath;

use super::Actor;

/// What a session needs again in a new container before it serves: its installed packages. Done by a
/// part above the actor (`installs.rs`), lent to it at spawn.
pub trait Refit: Send + Sync {
    fn refit<'a>(&'a self, session: &'a Session) -> BoxFuture<'a, ()>;
}

impl Actor {
    /// The container stopped (the kernel died with it): says why, removes it, and decides whether the
    /// serve loop restarts it ([`Actor::pending_restart`]) or the session stays dead.
    pub(super) fn on_death(&mut self) {
        let reason = match std::mem::take(&mut self.killed_after_shutdown) {
            true => format!(
                "it answered shutdown_request but did not exit within {} s, and was killed",
                super::SHUTDOWN_EXIT_WAIT.as_secs()
            ),
            false => self.exit_reason(),
        };
        self.exit_expected = None;
        tracing::warn!(session_id = %self.session.id, %reason, "the kernel died");
        self.orphan = None;
        // A dead container is of no use; remove it now so nothing lingers.
        if let Some(host) = self.host.take() {
            let plan = self.plan.clone();
            self.plan.tracker.spawn(async move { plan.remove(&host.container_id).await });
        }
        let now = Utc::now();
        match self.restarts.after_death(now, self.session.settings.auto_restart, self.restart_bound) {
            AfterDeath::Restart => {
                let last = AutoRestart { at: now, reason: reason.clone() };
                self.session.update(|s| {
                    s.auto_restarts += 1;
                    s.last_auto_restart = Some(last);
                });
                tracing::info!(session_id = %self.session.id, "restarting the kernel automatically");
                self.session.set_status(SessionStatus::Restarting);
                self.peers.status("restarting");
                self.notify(AutoRestartPhase::Restarting, &reason);
                self.pending_restart = Some(reason);
            }
            AfterDeath::Off => self.dead(reason),
            AfterDeath::BoundReached => {
                let bound = self.restart_bound;
                let why = format!(
                    "{reason}; not restarted automatically: it was restarted {} times within {} s already \
                     (restart the session to go on)",
                    bound.max,
                    bound.window.as_secs()
                );
                self.lost(why, "refused");
            }
        }
    }

    /// The kernel answered `shutdown_request` but its process did not exit: its container is killed, and
    /// the death is handled as any other (restarted automatically, within the bound).
    pub(super) async fn kill_after_shutdown(&mut self) {
        self.exit_expected = None;
        let Some(container) = self.host.as_ref().map(|h| h.container_id.clone()) else { return };
        tracing::warn!(session_id = %self.session.id, "the kernel answered shutdown_request but did not exit; killing it");
        self.killed_after_shutdown = true;
        if let Err(e) = self.plan.runtime.signal(&container, "SIGKILL").await {
            tracing::warn!(session_id = %self.session.id, error = %e, "could not kill a kernel that did not exit");
        }
    }

    /// The automatic restart decided by [`Actor::on_death`]: a new container. On failure the session is
    /// dead; cancelled, it ends.
    pub(super) async fn restart_after_death(&mut self, died: String) {
        let cancel = self.session.cancel.clone();
        self.peers.status("starting");
        match self.plan.boot(&cancel).await {
            Ok(host) => {
                self.serve_new(host, true).await;
                metrics::counter!("kernelbox_kernel_auto_restarts_total", "language" => self.session.settings.language.clone(), "outcome" => "restarted").increment(1);
                self.notify(AutoRestartPhase::Restarted, &died);
            }
            Err(SessionError::Closing) => {}
            Err(e) => self.lost(format!("{died}; the automatic restart failed: {e}"), "failed"),
        }
    }

    /// A client's restart, or the one after an ignored interrupt: in the same container when it lives
    /// (its files stay), else in a new one.
    pub(super) async fn restart(&mut self) -> Result<(), SessionError> {
        self.orphan = None;
        self.session.set_status(SessionStatus::Restarting);
        self.peers.status("restarting");
        let cancel = self.session.cancel.clone();
        let before = self.host.as_ref().map(|h| h.container_id.clone());
        self.peers.status("starting");
        let result = match self.host.take() {
            Some(host) => self.plan.restart(host, &cancel).await,
            None => self.plan.boot(&cancel).await,
        };
        match result {
            Ok(host) => {
                let new_container = before.as_deref() != Some(host.container_id.as_str());
                self.serve_new(host, new_container).await;
                Ok(())
            }
            Err(e) => {
                self.dead(format!("restart failed: {e}"));
                Err(e)
            }
        }
    }

    /// A restarted kernel takes over; a new container first gets the session's packages again (the
    /// session is busy meanwhile: an install may outlast the reaper's patience with a restart).
    async fn serve_new(&mut self, host: KernelHost, new_container: bool) {
        self.took(&host);
        self.host = Some(host);
        if new_container {
            self.session.set_status(SessionStatus::Busy);
            let (refit, cancel) = (self.refit.clone(), self.session.cancel.clone());
            tokio::select! {
                _ = refit.refit(&self.session) => {}
                _ = cancel.cancelled() => return,
            }
        }
        self.session.set_status(SessionStatus::Idle);
        self.peers.status("idle");
    }

    /// An automatic restart that did not happen (`outcome`: `refused` past the bound, `failed`).
    fn lost(&mut self, why: String, outcome: &'static str) {
        tracing::warn!(session_id = %self.session.id, %why, "the kernel stays dead");
        metrics::counter!("kernelbox_kernel_auto_restarts_total", "language" => self.session.settings.language.clone(), "outcome" => outcome).increment(1);
        self.notify(AutoRestartPhase::Dead, &why);
        self.dead(why);
    }

    /// The session is dead until a client restarts it.
    fn dead(&mut self, why: String) {
        self.session.update(|s| s.dead_reason = Some(why));
        self.session.set_status(SessionStatus::Dead);
        self.peers.status("dead");
    }

    fn notify(&self, phase: AutoRestartPhase, reason: &str) {
        let auto_restarts = self.session.snapshot().auto_restarts;
        self.session.notify(AutoRestartNotice { phase, reason: reason.to_owned(), auto_restarts });
    }
}
