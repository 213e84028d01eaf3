//! The session's task: it boots (or adopts) the kernel, runs executions one at a time in arrival order,
//! and on the way out removes everything the session made. It is the single owner of the session's
//! container: whatever ends the session (DELETE, the reaper, shutdown, a client that left mid-create, a
//! failed boot), the container is gone when this task ends.
//!
//! Executions arrive on a bounded queue (full → 429); interrupts and restarts on a bounded control queue
//! that is also watched while code runs; attached Jupyter clients' messages on a bounded queue of their
//! own, sent to the kernel as they come, while the kernel's messages are routed back to them
//! (`peers.rs`) whether or not a `/v1` execution is running. Work whose caller has gone is skipped
//! (queued) or interrupted (running, `/v1`). In every wait, cancellation, the container's death, control requests and deadlines
//! come before the kernel's messages, so a kernel that always has a message ready cannot starve them.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::oneshot;

use crate::kernel::wire::Message;

use super::error::SessionError;
use super::handle::{Control, Inbox, Session};
use super::kernel_host::{BootPlan, KernelHost};
use super::model::{ExecuteResult, SessionStatus};
use super::notebook::NotebookHandle;
use super::outputs::OutputCopier;
use super::peers::{PeerEvent, Peers};

mod execute;

use execute::{Ending, recv_kernel, wait_exit};

/// How the session's task begins.
pub enum Start {
    /// A new container.
    Fresh,
    /// A container an earlier run of the service left running.
    Adopt { container_id: String, boot: String },
    /// A kernel booted ahead of demand (the warm pool), ready now.
    Ready(Box<KernelHost>),
}

/// How long the copy of the output folder after an execution may take before it is cut (what it did not
/// copy goes with the next one).
const COPY_AFTER_EXECUTION: Duration = Duration::from_secs(60);
/// The same at the session's end (shutdown waits 10 s for all sessions at once).
const COPY_AT_END: Duration = Duration::from_secs(5);

pub struct Actor {
    pub notebook: Option<NotebookHandle>,
    /// The session API's output folder: copied out after each execution and at the end.
    pub outputs: Option<OutputCopier>,
    pub session: Arc<Session>,
    pub plan: BootPlan,
    pub host: Option<KernelHost>,
    pub inbox: Inbox,
    pub output_limit: usize,
    pub interrupt_grace: Duration,
    /// How long an execution keeps listening after its reply and idle status (`Language::late_output`).
    pub late_output: Duration,
    /// Jupyter clients attached to the kernel.
    pub peers: Peers,
    /// The kernel connection failed outside an execution while the container lives on: it is not read
    /// again until a restart gives a new one (else a broken connection would be polled in a loop).
    pub link_broken: bool,
}

impl Actor {
    /// The whole life of the session. `ready` hears once whether the kernel came up.
    pub async fn run(mut self, start: Start, ready: oneshot::Sender<Result<(), SessionError>>) {
        let cancel = self.session.cancel.clone();
        let booted = match start {
            Start::Fresh => self.plan.boot(&cancel).await,
            Start::Adopt { container_id, boot } => self.plan.adopt(container_id, &boot, &cancel).await,
            Start::Ready(host) => Ok(*host),
        };
        match booted {
            Ok(host) => {
                self.took(&host);
                self.host = Some(host);
                let _ = ready.send(Ok(()));
                self.serve().await;
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        }
        self.shut_down().await;
    }

    async fn serve(&mut self) {
        let cancel = self.session.cancel.clone();
        loop {
            let alive = self.host.as_ref().is_some_and(KernelHost::is_alive);
            let read_kernel = alive && !self.link_broken && self.peers.is_active();
            let (exit, client) = match self.host.as_mut() {
                Some(h) => (Some(&mut h.exit), Some(&mut h.client)),
                None => (None, None),
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = wait_exit(exit), if alive => self.on_death(),
                Some(control) = self.inbox.control.recv() => match control {
                    Control::Interrupt => self.interrupt().await,
                    Control::Restart(reply) => {
                        // A restart whose caller left never runs.
                        if !reply.is_closed() {
                            let result = self.restart().await;
                            let _ = reply.send(result);
                        }
                    }
                },
                Some(event) = self.inbox.peers.recv() => self.on_peer(event).await,
                Some(cmd) = self.inbox.commands.recv() => self.run_command(cmd).await,
                received = recv_kernel(client), if read_kernel => match received {
                    Ok((channel, msg)) => self.for_peers(channel, &msg),
                    Err(e) => {
                        if let Ending::Killed(reason) = self.killed_or(format!("lost the kernel connection: {e}")).await
                            && self.host.is_some()
                        {
                            tracing::warn!(session_id = %self.session.id, %reason, "the kernel connection failed; it is read again after a restart");
                            self.link_broken = true;
                        }
                    }
                },
            }
        }
    }

    /// A Jupyter client attached, left or sent a message for the kernel.
    async fn on_peer(&mut self, event: PeerEvent) {
        match event {
            PeerEvent::Attach(peer) => self.peers.attach(peer),
            PeerEvent::Detach(id) => self.peers.detach(id),
            PeerEvent::Message { from, channel, msg } => {
                // A replaced or let-go client's late messages are not sent.
                if !self.peers.is_attached(from) {
                    return;
                }
                self.session.update(|s| s.last_used = Utc::now());
                self.peers.sent(from, &msg.header.msg_id);
                let Some(host) = self.host.as_mut() else { return };
                // Bounded like an interrupt: a kernel that stops reading must not hold the session.
                match tokio::time::timeout(Duration::from_secs(2), host.client.forward(channel, &msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(session_id = %self.session.id, error = %e, "could not pass a client's message to the kernel")
                    }
                    Err(_) => {
                        tracing::warn!(session_id = %self.session.id, "the kernel did not take a client's message in time")
                    }
                }
            }
        }
    }

    /// A kernel message outside a `/v1` execution: to the attached clients; its IOPub status is the
    /// session's (a client's code running makes the session busy, and so not idle for the reaper).
    fn for_peers(&mut self, channel: crate::kernel::Channel, msg: &Message) {
        if channel == crate::kernel::Channel::IOPub && msg.msg_type() == "status" {
            let now = match msg.content.get("execution_state").and_then(serde_json::Value::as_str) {
                Some("busy") => Some(SessionStatus::Busy),
                Some("idle") => Some(SessionStatus::Idle),
                _ => None,
            };
            if let Some(now) = now
                && matches!(self.session.snapshot().status, SessionStatus::Idle | SessionStatus::Busy)
            {
                self.session.set_status(now);
            }
        }
        self.session.update(|s| s.last_used = Utc::now());
        self.peers.deliver(channel, msg);
    }

    /// Answers what is still queued, then removes the container and the run directory, unless the
    /// service keeps sessions for adoption.
    async fn shut_down(&mut self) {
        let reason = self.session.closing_reason();
        self.inbox.commands.close();
        while let Ok(cmd) = self.inbox.commands.try_recv() {
            let _ = cmd.reply.send(ExecuteResult::killed(reason, 0));
        }
        self.inbox.control.close();
        while let Ok(control) = self.inbox.control.try_recv() {
            if let Control::Restart(reply) = control {
                let _ = reply.send(Err(SessionError::Closing));
            }
        }
        self.peers.close_all("the kernel's session ended");
        self.inbox.peers.close();
        // Whatever ends the session (DELETE, the reaper, shutdown), its output folder is copied a last time.
        self.copy_outputs(None).await;
        let kept = self.session.keep_on_exit();
        if let Some(host) = self.host.take() {
            if kept && host.is_alive() {
                host.keep();
            } else {
                self.plan.remove(&host.container_id).await;
            }
        }
        // A per-session notebook goes with its session (unless the session is kept for adoption).
        if let Some(handle) = self.notebook.take()
            && !handle.keep
            && !kept
        {
            let _ = std::fs::remove_file(handle.notebook.path());
        }
    }

    /// Copies the session API's output folder out (`outputs.rs`), bounded in time: after an execution
    /// (`result`; a DELETE cuts it short and the last copy takes over) or at the end (`None`). What was not
    /// copied is logged and, after an execution, said in its stderr; the execution never fails for it.
    pub(super) async fn copy_outputs(&mut self, result: Option<&mut ExecuteResult>) {
        let (Some(copier), Some(host)) = (self.outputs.as_mut(), self.host.as_ref()) else { return };
        if !host.is_alive() {
            return;
        }
        let (container, runtime) = (host.container_id.clone(), self.plan.runtime.clone());
        let cancel = self.session.cancel.clone();
        let limit = if result.is_some() { COPY_AFTER_EXECUTION } else { COPY_AT_END };
        let copy = tokio::time::timeout(limit, copier.copy(runtime.as_ref(), &container));
        let outcome = if result.is_some() {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                outcome = copy => outcome,
            }
        } else {
            copy.await
        };
        let id = &self.session.id;
        let note = match outcome {
            Ok(Ok(report)) => {
                let skipped = report.over_cap + report.refused;
                metrics::counter!("kernelbox_user_output_files_total", "outcome" => "copied").increment(report.copied);
                metrics::counter!("kernelbox_user_output_files_total", "outcome" => "skipped").increment(skipped);
                if skipped > 0 {
                    tracing::warn!(session_id = %id, copied = report.copied, over_cap = report.over_cap, refused = report.refused, names = ?report.quoted, "files of /mnt/data/output were not copied out");
                }
                report.note(copier.caps())
            }
            Ok(Err(e)) => {
                tracing::warn!(session_id = %id, error = %e, "could not copy /mnt/data/output out");
                Some(format!("[kernelbox: /mnt/data/output was not copied out: {e}]\n"))
            }
            Err(_) => {
                tracing::warn!(session_id = %id, limit_s = limit.as_secs(), "copying /mnt/data/output out took too long; cut");
                Some(format!(
                    "[kernelbox: /mnt/data/output: the copy out was cut after {} s; what it missed goes with the next one]\n",
                    limit.as_secs()
                ))
            }
        };
        if let (Some(result), Some(note)) = (result, note) {
            result.note(note);
        }
    }

    /// Appends the execution to the session's notebook (a few small writes to a local file).
    fn record(&mut self, code: &str, result: &ExecuteResult) {
        let lock = self.session.notebook_lock.clone();
        if let Some(handle) = self.notebook.as_mut()
            && let Err(e) = {
                let _writing = lock.lock().unwrap_or_else(|p| p.into_inner());
                handle.notebook.append(code, result)
            }
        {
            tracing::error!(session_id = %self.session.id, error = %e, "cannot append to the notebook; no more cells are written");
            self.notebook = None;
        }
    }

    fn took(&mut self, host: &KernelHost) {
        self.link_broken = false;
        self.session.update(|s| {
            s.dead_reason = None;
            s.container_id = host.container_id.clone();
            s.kernel = Some(host.info.clone());
        });
        self.session.set_status(SessionStatus::Idle);
    }

    fn on_death(&mut self) {
        let reason = self.exit_reason();
        tracing::warn!(session_id = %self.session.id, %reason, "the kernel died");
        self.session.update(|s| s.dead_reason = Some(reason.clone()));
        self.session.set_status(SessionStatus::Dead);
        self.peers.status("dead");
        // A dead container is of no use; remove it now so nothing lingers.
        if let Some(host) = self.host.take() {
            let plan = self.plan.clone();
            self.plan.tracker.spawn(async move { plan.remove(&host.container_id).await });
        }
    }

    async fn restart(&mut self) -> Result<(), SessionError> {
        self.session.set_status(SessionStatus::Restarting);
        self.peers.status("restarting");
        let cancel = self.session.cancel.clone();
        let result = match self.host.take() {
            Some(host) => self.plan.restart(host, &cancel).await,
            None => self.plan.boot(&cancel).await,
        };
        match result {
            Ok(host) => {
                self.took(&host);
                self.host = Some(host);
                Ok(())
            }
            Err(e) => {
                self.session.update(|s| s.dead_reason = Some(format!("restart failed: {e}")));
                self.session.set_status(SessionStatus::Dead);
                Err(e)
            }
        }
    }
}
