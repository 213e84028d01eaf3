//! An execution in the session's task: the wait on the kernel with everything that may cut it short
//! (cancellation, the container's death, control requests, the deadline, a caller who left), prompts and
//! their answers, output events for a streaming caller, and the result made from how it ended.

use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};

use crate::kernel::stdin::{self, Answer, Answers};
use crate::kernel::wire::Message;
use crate::kernel::{ErrorInfo, Event, ExecutionTracker, InputRequest, KernelError, ReplyStatus, Report};

use crate::session::handle::{Control, ExecuteCommand};
use crate::session::kernel_host::death_reason;
use crate::session::model::{ExecStatus, ExecuteResult, SessionStatus};
use crate::session::peers::PeerEvent;

use super::Actor;

/// How an execution loop ended, before it becomes an [`ExecuteResult`].
pub(super) enum Ending {
    Complete,
    TimedOut { restarted: bool },
    Killed(String),
}

/// What woke the execution loop.
/// After the `execute_reply`, how long the kernel may be silent before the execution ends without its
/// `status: idle`: a flood can make the kernel's own IOPub queue drop it (see `ExecutionTracker::idle_lost`).
/// Every message received restarts the wait, so output still draining after the reply is kept.
const IDLE_GRACE: Duration = Duration::from_secs(2);

enum Wake {
    Cancelled,
    Died,
    Control(Control),
    Deadline,
    GraceOver,
    IdleLost,
    /// The wait for late output after completion is over.
    Settled,
    Abandoned,
    /// The caller answered the prompt (or the slot was closed: `Err`).
    Input(Result<String, oneshot::error::RecvError>),
    Peer(Box<PeerEvent>),
    Message(Box<Result<(crate::kernel::Channel, crate::kernel::wire::Message), KernelError>>),
}

impl Actor {
    pub(super) async fn run_command(&mut self, cmd: ExecuteCommand) {
        if cmd.abandoned() {
            metrics::counter!("kernelbox_executions_abandoned_total", "when" => "queued").increment(1);
            return;
        }
        let ExecuteCommand { code, timeout, events, interrupt_when_abandoned, stdin, ask_for_input, mut reply } = cmd;
        // Checked by the manager; a command that bypassed it gets no answers rather than unbounded ones.
        let answers = Answers::new(stdin, ask_for_input && events.is_some()).unwrap_or_default();
        let mut input = InputState { answers, waiting: None, refused: None };
        let mut result = self.execute(&code, timeout, events, &mut reply, interrupt_when_abandoned, &mut input).await;
        // The kernel died under it and is being restarted automatically: its state is gone.
        result.kernel_restarted |= self.pending_restart.is_some();
        self.copy_outputs(Some(&mut result)).await;
        self.record(&code, &result);
        let _ = reply.send(result);
    }

    async fn execute(
        &mut self,
        code: &str,
        timeout: Duration,
        events: Option<mpsc::Sender<Event>>,
        reply: &mut oneshot::Sender<ExecuteResult>,
        interrupt_when_abandoned: bool,
        input: &mut InputState,
    ) -> ExecuteResult {
        let started = Instant::now();
        self.session.update(|s| s.last_used = Utc::now());
        if self.session.snapshot().status == SessionStatus::Idle {
            self.session.set_status(SessionStatus::Busy);
        }
        let mut stream = EventSink { events, dropped: 0 };
        if let Some(network) = &self.session.network {
            network.begin_report();
        }
        let (ending, tracker) = match self.host.as_mut() {
            None => {
                let reason = self.session.snapshot().dead_reason.unwrap_or_else(|| "unknown".into());
                (Ending::Killed(reason), None)
            }
            Some(_) => {
                self.run_code(code, started + timeout, &mut stream, reply, interrupt_when_abandoned, input).await
            }
        };
        self.session.stop_waiting_for_input();
        let mut result = finish(ending, tracker, started.elapsed());
        result.stream_events_dropped = stream.dropped;
        result.network = self.session.network.as_ref().map(|n| n.report());
        if let Some(prompt) = input.refused.take()
            && matches!(result.status, ExecStatus::Ok | ExecStatus::Error)
        {
            result.status = ExecStatus::Error;
            result.error = Some(ErrorInfo {
                ename: "InputRequired".into(),
                evalue: stdin::refusal(&prompt),
                traceback: Vec::new(),
            });
        }
        self.session.update(|s| {
            s.last_used = Utc::now();
            s.executions += 1;
        });
        if self.session.snapshot().status == SessionStatus::Busy {
            self.session.set_status(SessionStatus::Idle);
        }
        metrics::counter!("kernelbox_executions_total", "language" => self.session.settings.language.clone(), "status" => result.status.as_str()).increment(1);
        metrics::histogram!("kernelbox_execution_duration_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    async fn run_code(
        &mut self,
        code: &str,
        deadline: Instant,
        stream: &mut EventSink,
        reply: &mut oneshot::Sender<ExecuteResult>,
        interrupt_when_abandoned: bool,
        input: &mut InputState,
    ) -> (Ending, Option<ExecutionTracker>) {
        let host = self.host.as_mut().expect("checked by the caller");
        let msg_id = match host.client.execute(code, true).await {
            Ok(id) => id,
            Err(e) => return (self.killed_or(format!("could not reach the kernel: {e}")).await, None),
        };
        let mut tracker = ExecutionTracker::new(msg_id, self.output_limit);
        let cancel = self.session.cancel.clone();
        // Set once the time limit passed and the kernel was interrupted: the restart deadline.
        let mut grace: Option<Instant> = None;
        let mut abandoned = false;
        // Set once the reply came without its idle status: when the wait for it ends.
        let mut quiet: Option<Instant> = None;
        // What the kernel had sent when the quiet wait was armed: bytes still arriving are not quiet.
        let mut quiet_mark: u64 = 0;
        // Set once the execution is complete, for kernels whose output may follow it: when to stop.
        let mut settle: Option<Instant> = None;
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        loop {
            let wake = {
                let host = self.host.as_mut().expect("present during an execution");
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => Wake::Cancelled,
                    _ = host.exit.wait_for(Option::is_some) => Wake::Died,
                    Some(control) = self.inbox.control.recv() => Wake::Control(control),
                    _ = sleep_until(deadline), if grace.is_none() => Wake::Deadline,
                    _ = sleep_until(grace.unwrap_or(far)), if grace.is_some() => Wake::GraceOver,
                    _ = sleep_until(quiet.unwrap_or(far)), if quiet.is_some() => Wake::IdleLost,
                    _ = sleep_until(settle.unwrap_or(far)), if settle.is_some() => Wake::Settled,
                    _ = reply.closed(), if interrupt_when_abandoned && !abandoned => Wake::Abandoned,
                    answer = wait_answer(&mut input.waiting), if input.waiting.is_some() => Wake::Input(answer),
                    Some(event) = self.inbox.peers.recv() => Wake::Peer(Box::new(event)),
                    received = host.client.recv() => Wake::Message(Box::new(received)),
                }
            };
            match wake {
                Wake::Cancelled => {
                    return (Ending::Killed(self.session.closing_reason().to_owned()), Some(tracker));
                }
                Wake::Died => {
                    let reason = self.exit_reason();
                    self.on_death();
                    return (Ending::Killed(reason), Some(tracker));
                }
                Wake::Peer(event) => self.on_peer(*event).await,
                Wake::Message(received) => match *received {
                    Ok((channel, msg)) => {
                        self.peers.deliver(channel, &msg);
                        if channel == crate::kernel::Channel::Stdin
                            && let Some(asked) = InputRequest::from_message(&msg, tracker.msg_id())
                        {
                            self.on_input_request(msg, asked, stream, input).await;
                            continue;
                        }
                        for event in tracker.handle(channel, &msg) {
                            stream.send(event);
                        }
                        if tracker.is_complete() {
                            if grace.is_none() && !self.late_output.is_zero() {
                                settle.get_or_insert_with(|| Instant::now() + self.late_output);
                                continue;
                            }
                            let ending =
                                if grace.is_some() { Ending::TimedOut { restarted: false } } else { Ending::Complete };
                            return (ending, Some(tracker));
                        }
                        if tracker.awaits_only_idle() {
                            quiet = Some(Instant::now() + IDLE_GRACE);
                            quiet_mark = self.host.as_ref().map_or(0, |h| h.client.bytes_received());
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
                Wake::IdleLost if self.host.as_ref().is_some_and(|h| h.client.bytes_received() != quiet_mark) => {
                    // A message is still arriving (a huge one is read and dropped at wire speed): wait on.
                    quiet = Some(Instant::now() + IDLE_GRACE);
                    quiet_mark = self.host.as_ref().map_or(0, |h| h.client.bytes_received());
                }
                Wake::IdleLost => {
                    tracing::warn!(session_id = %self.session.id, "the kernel's idle status never came after its reply (IOPub dropped it?); ending the execution as truncated");
                    metrics::counter!("kernelbox_executions_idle_lost_total").increment(1);
                    tracker.idle_lost();
                    let ending = if grace.is_some() { Ending::TimedOut { restarted: false } } else { Ending::Complete };
                    return (ending, Some(tracker));
                }
                Wake::Settled => return (Ending::Complete, Some(tracker)),
                Wake::GraceOver => {
                    tracing::warn!(session_id = %self.session.id, "the kernel ignored the interrupt; restarting it");
                    let restarted = self.restart().await.is_ok();
                    return (Ending::TimedOut { restarted }, Some(tracker));
                }
                Wake::Abandoned => {
                    // The caller left: stop the code like Ctrl-C; the session keeps its state.
                    tracing::info!(session_id = %self.session.id, "the caller left; interrupting the kernel");
                    metrics::counter!("kernelbox_executions_abandoned_total", "when" => "running").increment(1);
                    abandoned = true;
                    self.interrupt().await;
                }
                Wake::Input(Ok(value)) => {
                    if let Some((_, asked)) = input.waiting.take() {
                        self.input_reply(&asked, &value).await;
                    }
                }
                Wake::Input(Err(_)) => input.waiting = None,
                Wake::Control(Control::Interrupt) => self.interrupt().await,
                Wake::Control(Control::Restart(restart_reply)) => {
                    if restart_reply.is_closed() {
                        continue;
                    }
                    let result = self.restart().await;
                    let _ = restart_reply.send(result);
                    return (Ending::Killed("restarted".into()), Some(tracker));
                }
            }
        }
    }

    /// The code asks for input: answer from the request's list, ask the streaming caller, or refuse
    /// (interrupt the kernel, so it does not wait forever; the result says how to answer).
    async fn on_input_request(
        &mut self,
        msg: Message,
        asked: InputRequest,
        stream: &mut EventSink,
        input: &mut InputState,
    ) {
        if stream.events.is_none() {
            input.answers.stop_asking();
        }
        match input.answers.next_answer() {
            Answer::Given(value) => self.input_reply(&msg, &value).await,
            Answer::Ask => {
                input.waiting = Some((self.session.wait_for_input(), msg));
                stream.send_always(Event::InputRequested(asked), &self.plan.tracker);
            }
            Answer::Refuse => {
                tracing::info!(session_id = %self.session.id, "the code asked for input nobody can give; interrupting");
                input.refused.get_or_insert(asked.prompt);
                self.interrupt().await;
            }
        }
    }

    async fn input_reply(&mut self, asked: &Message, value: &str) {
        let Some(host) = self.host.as_mut() else { return };
        // Bounded like an interrupt: a kernel that stops reading stdin must not hold the session.
        match tokio::time::timeout(Duration::from_secs(2), host.client.input_reply(asked, value)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(session_id = %self.session.id, error = %e, "could not answer the kernel's prompt")
            }
            Err(_) => tracing::warn!(session_id = %self.session.id, "the kernel did not take the answer in time"),
        }
    }

    pub(super) async fn interrupt(&mut self) {
        let Some(host) = self.host.as_mut() else { return };
        // Bounded: a kernel that stops reading its control socket must not hold the session.
        match tokio::time::timeout(Duration::from_secs(2), host.client.interrupt()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(session_id = %self.session.id, error = %e, "could not interrupt the kernel"),
            Err(_) => tracing::warn!(session_id = %self.session.id, "the kernel did not take the interrupt in time"),
        }
    }

    /// Why the container stopped, once it has.
    pub(super) fn exit_reason(&self) -> String {
        self.host.as_ref().and_then(|h| h.exit.borrow().as_ref().map(death_reason)).unwrap_or_else(|| "unknown".into())
    }

    /// After a socket error: if the container is dying, say why; otherwise report the error.
    pub(super) async fn killed_or(&mut self, otherwise: String) -> Ending {
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

/// The prompts of one execution: where answers come from, the prompt waiting on the caller (its answer
/// slot and the `input_request` to reply to), and the first prompt refused.
struct InputState {
    answers: Answers,
    waiting: Option<(oneshot::Receiver<String>, Message)>,
    refused: Option<String>,
}

/// Resolves with the caller's answer (never, when nothing waits).
async fn wait_answer(
    waiting: &mut Option<(oneshot::Receiver<String>, Message)>,
) -> Result<String, oneshot::error::RecvError> {
    match waiting {
        Some((rx, _)) => rx.await,
        None => std::future::pending().await,
    }
}

/// Output events for a streaming client. Never waits: a client that does not keep up loses events (the
/// final result still carries every output within the cap), and the count is reported.
struct EventSink {
    events: Option<mpsc::Sender<Event>>,
    dropped: u64,
}

impl EventSink {
    fn send(&mut self, event: Event) {
        let Some(tx) = &self.events else { return };
        match tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.dropped += 1,
            Err(mpsc::error::TrySendError::Closed(_)) => self.events = None,
        }
    }

    /// An event the client must see to go on (a prompt): when the queue is full, the oldest events are
    /// not droppable from here, so the prompt waits in a task until there is room (one per prompt, and a
    /// session has at most one prompt waiting), or the client is gone.
    fn send_always(&mut self, event: Event, tasks: &tokio_util::task::TaskTracker) {
        let Some(tx) = &self.events else { return };
        match tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                let tx = tx.clone();
                tasks.spawn(async move {
                    let _ = tx.send(event).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.events = None,
        }
    }
}

/// The kernel's next message (never, when there is no kernel).
pub(super) async fn recv_kernel(
    client: Option<&mut crate::kernel::KernelClient>,
) -> Result<(crate::kernel::Channel, Message), KernelError> {
    match client {
        Some(client) => client.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the host's container has stopped (never, when there is none).
pub(super) async fn wait_exit(exit: Option<&mut tokio::sync::watch::Receiver<Option<crate::runtime::ExitInfo>>>) {
    match exit {
        Some(exit) => {
            let _ = exit.wait_for(Option::is_some).await;
        }
        None => std::future::pending().await,
    }
}

fn finish(ending: Ending, tracker: Option<ExecutionTracker>, elapsed: Duration) -> ExecuteResult {
    let Report { reply, outputs, stdout, stderr, streams_abridged, error, truncated } =
        tracker.map(ExecutionTracker::into_report).unwrap_or_default();
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
        stdout,
        stderr,
        streams_abridged,
        outputs,
        error,
        duration_ms: elapsed.as_millis() as u64,
        truncated,
        killed_reason,
        kernel_restarted,
        stream_events_dropped: 0,
        network: None,
    }
}
