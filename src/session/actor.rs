//! The session actor: one task per session that owns its kernel connection and runs executions one at a
//! time, in arrival order.
//!
//! Executions arrive on a bounded queue (full → 429); interrupts and restarts arrive on a separate control
//! channel so they reach a busy kernel at once. The actor also watches the container: a kernel that dies
//! is noticed when it happens, not at the next timeout. No lock is held across an `.await`: the only
//! shared state ([`Session::state`]) is a std mutex touched briefly.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};

use crate::kernel::execution::stream_text;
use crate::kernel::{Channel, Event, ExecutionTracker, ReplyStatus, Report};

use super::error::SessionError;
use super::kernel_host::{BootPlan, KernelHost, death_reason};
use super::manager::Session;
use super::model::{ExecStatus, ExecuteResult, SessionStatus};

/// What a streaming client receives while code runs.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    Kernel(Event),
    Done(Box<ExecuteResult>),
}

/// A queued execution.
pub struct ExecuteCommand {
    pub code: String,
    pub timeout: Duration,
    /// Receives outputs as they come, for server-sent events.
    pub events: Option<mpsc::UnboundedSender<StreamEvent>>,
    pub reply: oneshot::Sender<ExecuteResult>,
}

/// Requests that must not wait behind queued executions.
pub enum Control {
    Interrupt,
    Restart(oneshot::Sender<Result<(), SessionError>>),
}

pub struct Actor {
    pub session: Arc<Session>,
    pub plan: BootPlan,
    pub host: Option<KernelHost>,
    pub output_limit: usize,
    pub interrupt_grace: Duration,
    pub commands: mpsc::Receiver<ExecuteCommand>,
    pub control: mpsc::UnboundedReceiver<Control>,
}

/// How an execution loop ended, before it becomes an [`ExecuteResult`].
enum Ending {
    Complete,
    TimedOut { restarted: bool },
    Killed(String),
}

impl Actor {
    pub async fn run(mut self) {
        let cancel = self.session.cancel.clone();
        loop {
            let alive = self.host.as_ref().is_some_and(|h| h.exit.borrow().is_none());
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = wait_exit(&mut self.host), if alive => self.on_death(),
                Some(control) = self.control.recv() => match control {
                    Control::Interrupt => self.interrupt().await,
                    Control::Restart(reply) => { let _ = reply.send(self.restart().await); }
                },
                Some(cmd) = self.commands.recv() => {
                    let events = cmd.events.clone();
                    let result = self.execute(&cmd.code, cmd.timeout, events.as_ref()).await;
                    if let Some(events) = events {
                        let _ = events.send(StreamEvent::Done(Box::new(result.clone())));
                    }
                    let _ = cmd.reply.send(result);
                }
            }
        }
        self.shut_down().await;
    }

    /// Removes the container and the session directory, unless the service keeps sessions for adoption.
    async fn shut_down(&mut self) {
        if !self.session.keep_on_exit() {
            if let Some(host) = self.host.take()
                && let Err(e) = self.plan.runtime.remove(&host.container_id).await
            {
                tracing::error!(session_id = %self.session.id, error = %e, "could not remove the session container");
            }
            let _ = std::fs::remove_dir_all(&self.plan.dir);
        }
    }

    fn on_death(&mut self) {
        let reason = self.exit_reason();
        tracing::warn!(session_id = %self.session.id, %reason, "the kernel died");
        self.session.update(|s| {
            s.status = SessionStatus::Dead;
            s.dead_reason = Some(reason.clone());
        });
        // A dead container is of no use; remove it now so nothing lingers.
        if let Some(host) = self.host.take() {
            let runtime = self.plan.runtime.clone();
            self.plan.tracker.spawn(async move { runtime.remove(&host.container_id).await });
        }
    }

    async fn restart(&mut self) -> Result<(), SessionError> {
        self.session.update(|s| s.status = SessionStatus::Restarting);
        let result = self.plan.restart(self.host.take()).await;
        match result {
            Ok(host) => {
                self.session.update(|s| {
                    s.status = SessionStatus::Idle;
                    s.dead_reason = None;
                    s.container_id = host.container_id.clone();
                    s.kernel = Some(host.info.clone());
                });
                self.host = Some(host);
                Ok(())
            }
            Err(e) => {
                self.session.update(|s| {
                    s.status = SessionStatus::Dead;
                    s.dead_reason = Some(format!("restart failed: {e}"));
                });
                Err(e)
            }
        }
    }

    async fn execute(
        &mut self,
        code: &str,
        timeout: Duration,
        events: Option<&mpsc::UnboundedSender<StreamEvent>>,
    ) -> ExecuteResult {
        let started = Instant::now();
        self.session.update(|s| {
            s.last_used = Utc::now();
            if s.status == SessionStatus::Idle {
                s.status = SessionStatus::Busy;
            }
        });
        let (ending, tracker) = match self.host.as_mut() {
            None => {
                let reason = self.session.snapshot().dead_reason.unwrap_or_else(|| "unknown".into());
                (Ending::Killed(reason), None)
            }
            Some(_) => self.run_code(code, started + timeout, events).await,
        };
        let result = finish(ending, tracker, started.elapsed());
        self.session.update(|s| {
            s.last_used = Utc::now();
            s.executions += 1;
            if s.status == SessionStatus::Busy {
                s.status = SessionStatus::Idle;
            }
        });
        metrics::counter!("kernelbox_executions_total", "language" => self.session.settings.language.clone(), "status" => result.status.as_str()).increment(1);
        metrics::histogram!("kernelbox_execution_duration_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    async fn run_code(
        &mut self,
        code: &str,
        deadline: Instant,
        events: Option<&mpsc::UnboundedSender<StreamEvent>>,
    ) -> (Ending, Option<ExecutionTracker>) {
        let content = json!({
            "code": code, "silent": false, "store_history": true,
            "user_expressions": {}, "allow_stdin": false, "stop_on_error": true,
        });
        let host = self.host.as_mut().expect("checked by the caller");
        let msg_id = match host.client.send(Channel::Shell, "execute_request", content).await {
            Ok(id) => id,
            Err(e) => {
                return (self.killed_or(format!("could not reach the kernel: {e}")).await, None);
            }
        };
        let mut tracker = ExecutionTracker::new(msg_id, self.output_limit);
        let cancel = self.session.cancel.clone();
        // Set once the time limit passed and the kernel was interrupted: the restart deadline.
        let mut grace: Option<Instant> = None;
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        loop {
            let wake = {
                let host = self.host.as_mut().expect("present during an execution");
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => Wake::Cancelled,
                    _ = host.exit.wait_for(Option::is_some) => Wake::Died,
                    received = host.client.recv() => Wake::Message(Box::new(received)),
                    _ = sleep_until(deadline), if grace.is_none() => Wake::Deadline,
                    _ = sleep_until(grace.unwrap_or(far)), if grace.is_some() => Wake::GraceOver,
                    Some(control) = self.control.recv() => Wake::Control(control),
                }
            };
            match wake {
                Wake::Cancelled => {
                    return (Ending::Killed(self.session.closing_reason()), Some(tracker));
                }
                Wake::Died => {
                    let reason = self.exit_reason();
                    self.on_death();
                    return (Ending::Killed(reason), Some(tracker));
                }
                Wake::Message(received) => match *received {
                    Ok((channel, msg)) => {
                        for event in tracker.handle(channel, &msg) {
                            if let Some(tx) = events {
                                let _ = tx.send(StreamEvent::Kernel(event));
                            }
                        }
                        if tracker.is_complete() {
                            let ending =
                                if grace.is_some() { Ending::TimedOut { restarted: false } } else { Ending::Complete };
                            return (ending, Some(tracker));
                        }
                    }
                    Err(e) => {
                        return (self.killed_or(format!("lost the kernel connection: {e}")).await, Some(tracker));
                    }
                },
                Wake::Deadline => {
                    tracing::info!(session_id = %self.session.id, "execution timed out; interrupting the kernel");
                    self.interrupt().await;
                    grace = Some(Instant::now() + self.interrupt_grace);
                }
                Wake::GraceOver => {
                    tracing::warn!(session_id = %self.session.id, "the kernel ignored the interrupt; restarting it");
                    let restarted = self.restart().await.is_ok();
                    return (Ending::TimedOut { restarted }, Some(tracker));
                }
                Wake::Control(Control::Interrupt) => self.interrupt().await,
                Wake::Control(Control::Restart(reply)) => {
                    let result = self.restart().await;
                    let _ = reply.send(result);
                    return (Ending::Killed("restarted".into()), Some(tracker));
                }
            }
        }
    }

    async fn interrupt(&mut self) {
        if let Some(host) = self.host.as_mut()
            && let Err(e) = self.plan.interrupt(host).await
        {
            tracing::warn!(session_id = %self.session.id, error = %e, "could not interrupt the kernel");
        }
    }

    /// Why the container stopped, once it has.
    fn exit_reason(&self) -> String {
        self.host.as_ref().and_then(|h| h.exit.borrow().as_ref().map(death_reason)).unwrap_or_else(|| "unknown".into())
    }

    /// After a socket error: if the container is dying, say why; otherwise report the error.
    async fn killed_or(&mut self, otherwise: String) -> Ending {
        let exit = self.host.as_ref().map(|h| h.exit.clone());
        if let Some(mut exit) = exit {
            let died = tokio::time::timeout(Duration::from_secs(2), exit.wait_for(Option::is_some)).await;
            if matches!(died, Ok(Ok(_))) {
                let reason = self.exit_reason();
                self.on_death();
                return Ending::Killed(reason);
            }
        }
        Ending::Killed(otherwise)
    }
}

/// What woke the execution loop.
enum Wake {
    Cancelled,
    Died,
    Message(Box<Result<(Channel, crate::kernel::wire::Message), crate::kernel::KernelError>>),
    Deadline,
    GraceOver,
    Control(Control),
}
/// Resolves when the host's container has stopped (never, when there is none).
async fn wait_exit(host: &mut Option<KernelHost>) {
    match host {
        Some(h) => {
            let _ = h.exit.wait_for(Option::is_some).await;
        }
        None => std::future::pending().await,
    }
}

fn finish(ending: Ending, tracker: Option<ExecutionTracker>, elapsed: Duration) -> ExecuteResult {
    let Report { reply, outputs, error, truncated } = tracker.map(ExecutionTracker::into_report).unwrap_or_default();
    let execution_count = reply.and_then(|r| r.1);
    let (status, killed_reason, kernel_restarted) = match ending {
        Ending::Complete => match reply.map(|r| r.0) {
            Some(ReplyStatus::Ok) => (ExecStatus::Ok, None, false),
            _ => (ExecStatus::Error, None, false),
        },
        Ending::TimedOut { restarted } => (ExecStatus::Timeout, None, restarted),
        Ending::Killed(reason) => (ExecStatus::Killed, Some(reason), false),
    };
    let error = match status {
        ExecStatus::Error => error,
        _ => None,
    };
    ExecuteResult {
        status,
        execution_count,
        stdout: stream_text(&outputs, "stdout"),
        stderr: stream_text(&outputs, "stderr"),
        outputs,
        error,
        duration_ms: elapsed.as_millis() as u64,
        truncated,
        killed_reason,
        kernel_restarted,
    }
}
