//! The session handle: what the registry holds for one session, shared by the manager, the API and the
//! session's own task. It owns the session's mutable state (a std mutex, never held across `.await`), the
//! senders of its task's inbox, the marks that decide its life (in use, closing, finished), and the
//! broadcast that tells the streams open on the session of automatic restarts (bounded: a stream that
//! falls behind loses the oldest notices).
//!
//! The types a caller gets back from queueing work ([`Pending`]) live here too, so that the manager and
//! the actor depend on this module and not on each other.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::egress::session::{Blocked, SessionEgress};
use crate::kernel::Event;

use super::error::SessionError;
use super::model::{
    AutoRestart, AutoRestartNotice, ExecStatus, ExecuteResult, KernelInfo, Owner, SessionId, SessionInfo,
    SessionLimits, SessionSettings, SessionStatus, Submission,
};
use super::peers::{self, PeerEvent, PeerId, PeerOutbox};

/// The mutable part of a session.
#[derive(Debug, Clone)]
pub struct SessionState {
    pub status: SessionStatus,
    /// When `status` last changed: a session stuck starting or restarting is found by it.
    pub status_since: DateTime<Utc>,
    pub last_used: DateTime<Utc>,
    pub container_id: String,
    pub dead_reason: Option<String>,
    pub executions: u64,
    pub kernel: Option<KernelInfo>,
    /// Automatic restarts so far, and the latest.
    pub auto_restarts: u64,
    pub last_auto_restart: Option<AutoRestart>,
}

/// How long output events wait for a streaming client: beyond this many, events are dropped from the
/// stream (the final result still carries every output within the cap).
pub const STREAM_EVENTS: usize = 64;
/// File transfers running at once on one session (each is a process in its container).
pub const MAX_TRANSFERS: usize = 4;
/// Control requests (interrupt, restart) waiting for the session's task.
pub const CONTROL_DEPTH: usize = 4;
/// Messages from attached Jupyter clients waiting for the session's task (the clients wait beyond).
pub const PEER_EVENTS: usize = 64;
/// Automatic-restart notices waiting for one stream; a stream that falls further behind loses the oldest.
pub const NOTICES: usize = 16;

/// A queued execution, as the session's task receives it.
pub struct ExecuteCommand {
    pub code: String,
    pub timeout: Duration,
    /// Outputs as they come, for streaming clients. Bounded; the task never waits on it.
    pub events: Option<mpsc::Sender<Event>>,
    /// Interrupt the kernel when the caller goes away mid-run (the `/v1` rule; a Jupyter client that
    /// disconnects may come back, so its adapter sets this to false).
    pub interrupt_when_abandoned: bool,
    /// Answers to the code's prompts, in order (checked against `kernel::stdin`'s bounds).
    pub stdin: Vec<String>,
    /// When the answers run out, ask the streaming caller (`/v1`) instead of refusing the prompt.
    pub ask_for_input: bool,
    pub reply: oneshot::Sender<ExecuteResult>,
}

impl ExecuteCommand {
    /// The caller is gone: nobody will read the result.
    pub fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// Requests that must not wait behind queued executions.
pub enum Control {
    Interrupt,
    Restart(oneshot::Sender<Result<(), SessionError>>),
}

/// The receiving ends of a session's inbox, owned by its task.
pub struct Inbox {
    pub commands: mpsc::Receiver<ExecuteCommand>,
    pub control: mpsc::Receiver<Control>,
    pub peers: mpsc::Receiver<PeerEvent>,
}

/// One session, as the registry holds it.
pub struct Session {
    pub id: SessionId,
    pub owner: Owner,
    pub settings: SessionSettings,
    pub created_at: DateTime<Utc>,
    /// Kept for the API's view of the limits.
    pub limits: SessionLimits,
    state: Mutex<SessionState>,
    /// Executions and restarts queued or running: a session in use is never reaped. Only changed under
    /// the registry's lock (see `Registry::get_in_use`), so the reaper and a new request agree.
    in_use: AtomicUsize,
    /// Set when the session is being removed: it is gone for clients, but still counts against the
    /// quotas until its task has removed its container.
    closing: AtomicBool,
    commands: mpsc::Sender<ExecuteCommand>,
    control: mpsc::Sender<Control>,
    /// Stops the session's task, in any state.
    pub cancel: CancellationToken,
    /// Cancelled by the task when it has ended and its container is gone.
    pub finished: CancellationToken,
    /// When set, the task leaves its container running on exit (for adoption by the next run).
    keep: AtomicBool,
    /// Why the session is closing, for the executions it cuts short.
    closing_reason: Mutex<&'static str>,
    /// File transfers under way (at most [`MAX_TRANSFERS`]).
    pub transfers: Arc<tokio::sync::Semaphore>,
    /// One package install at a time (two pips writing one directory would mix their files).
    pub installing: Arc<tokio::sync::Semaphore>,
    /// The package specs installed so far, in order: installed again (from the cache) when a restart
    /// gives the session a new container.
    pub packages: Mutex<Vec<String>>,
    /// Held while the notebook is appended to or read whole, so a reader never sees half a cell.
    pub notebook_lock: Arc<Mutex<()>>,
    /// The prompt the running execution waits on, answered by `POST /input`: at most one per session.
    input: Mutex<Option<oneshot::Sender<String>>>,
    /// Attached Jupyter clients' messages to the session's task.
    peer_events: mpsc::Sender<PeerEvent>,
    /// Automatic restarts told to every stream open on the session (its executions' SSE streams).
    notices: broadcast::Sender<AutoRestartNotice>,
    /// Jupyter clients attached now (the gateway's `connections`).
    connections: AtomicUsize,
    /// Its network by name (`src/egress/`), when the server offers it.
    pub network: Option<Arc<SessionEgress>>,
    next_peer: AtomicU64,
}

impl Session {
    pub fn new(
        id: SessionId,
        owner: Owner,
        settings: SessionSettings,
        created_at: DateTime<Utc>,
        limits: SessionLimits,
        queue_depth: usize,
        network: Option<Arc<SessionEgress>>,
    ) -> (Arc<Session>, Inbox) {
        let (commands_tx, commands) = mpsc::channel(queue_depth.max(1));
        let (control_tx, control) = mpsc::channel(CONTROL_DEPTH);
        let (peers_tx, peers) = mpsc::channel(PEER_EVENTS);
        let (notices, _) = broadcast::channel(NOTICES);
        let now = Utc::now();
        let session = Arc::new(Session {
            id,
            owner,
            settings,
            created_at,
            limits,
            state: Mutex::new(SessionState {
                status: SessionStatus::Starting,
                status_since: now,
                last_used: now,
                container_id: String::new(),
                dead_reason: None,
                executions: 0,
                kernel: None,
                auto_restarts: 0,
                last_auto_restart: None,
            }),
            in_use: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            commands: commands_tx,
            control: control_tx,
            cancel: CancellationToken::new(),
            finished: CancellationToken::new(),
            keep: AtomicBool::new(false),
            closing_reason: Mutex::new("session_deleted"),
            transfers: Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS)),
            installing: Arc::new(tokio::sync::Semaphore::new(1)),
            packages: Mutex::new(Vec::new()),
            notebook_lock: Arc::new(Mutex::new(())),
            input: Mutex::new(None),
            peer_events: peers_tx,
            notices,
            connections: AtomicUsize::new(0),
            next_peer: AtomicU64::new(1),
            network,
        });
        (session, Inbox { commands, control, peers })
    }

    pub fn update(&self, f: impl FnOnce(&mut SessionState)) {
        f(&mut self.state.lock().unwrap());
    }

    /// Changes the status (and when it changed).
    pub fn set_status(&self, status: SessionStatus) {
        self.update(|s| {
            if s.status != status {
                s.status = status;
                s.status_since = Utc::now();
            }
        });
    }

    pub fn snapshot(&self) -> SessionState {
        self.state.lock().unwrap().clone()
    }

    /// Tells the streams open now (none listening is fine).
    pub(super) fn notify(&self, notice: AutoRestartNotice) {
        let _ = self.notices.send(notice);
    }

    pub fn in_use(&self) -> bool {
        self.in_use.load(Ordering::SeqCst) > 0
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    pub fn keep_on_exit(&self) -> bool {
        self.keep.load(Ordering::SeqCst)
    }

    pub fn closing_reason(&self) -> &'static str {
        *self.closing_reason.lock().unwrap()
    }

    /// Marks the session closing (gone for clients) and stops its task. Returns false if it was closing
    /// already. Never waits: the task removes the container, then the registry entry.
    pub fn close(&self, reason: &'static str, keep: bool) -> bool {
        if self.closing.swap(true, Ordering::SeqCst) {
            return false;
        }
        *self.closing_reason.lock().unwrap() = reason;
        self.keep.store(keep, Ordering::SeqCst);
        self.cancel.cancel();
        true
    }

    /// Waits until the task has ended (its container removed), at most `limit`.
    pub async fn wait_finished(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.finished.cancelled()).await.is_ok()
    }

    /// Marks one use. Call only under the registry's lock (see `Registry::get_in_use`).
    pub(super) fn mark_in_use(self: &Arc<Self>) -> InUse {
        self.in_use.fetch_add(1, Ordering::SeqCst);
        InUse(self.clone())
    }

    /// Queues an execution (its timeout checked by the caller, `None`: the session's) and returns what
    /// its caller holds while it is queued or runs.
    pub fn submit(
        &self,
        in_use: InUse,
        submission: Submission,
        timeout: Option<Duration>,
        depth: usize,
    ) -> Result<Pending, SessionError> {
        let Submission { code, stream, stdin, ask_for_input, .. } = submission;
        let (reply, result) = oneshot::channel();
        let (events, events_rx, notices) = match stream {
            true => {
                let (tx, rx) = mpsc::channel(STREAM_EVENTS);
                (Some(tx), Some(rx), Some(self.notices.subscribe()))
            }
            false => (None, None, None),
        };
        let command = ExecuteCommand {
            code,
            timeout: timeout.unwrap_or_else(|| self.settings.timeout()),
            events,
            interrupt_when_abandoned: true,
            stdin,
            ask_for_input,
            reply,
        };
        self.queue(command, depth)?;
        let blocked = (stream && self.network.is_some()).then(|| self.network.as_ref().unwrap().notices());
        Ok(Pending { _in_use: in_use, result, events: events_rx, notices, blocked })
    }

    /// Queues an execution; a full queue is the caller's problem (429).
    pub fn queue(&self, command: ExecuteCommand, depth: usize) -> Result<(), SessionError> {
        self.commands.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SessionError::QueueFull(depth),
            mpsc::error::TrySendError::Closed(_) => SessionError::Closing,
        })
    }

    /// Asks for an interrupt. Interrupts coalesce: when the control queue is full, one is pending anyway.
    pub fn request_interrupt(&self) -> Result<(), SessionError> {
        match self.control.try_send(Control::Interrupt) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SessionError::Closing),
        }
    }

    /// Asks for a restart; the control queue is bounded, so a burst of restarts is refused (429).
    pub fn request_restart(&self) -> Result<oneshot::Receiver<Result<(), SessionError>>, SessionError> {
        let (tx, rx) = oneshot::channel();
        self.control.try_send(Control::Restart(tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SessionError::TooMany(
                "too many control requests are waiting on this session; retry when they are done".into(),
            ),
            mpsc::error::TrySendError::Closed(_) => SessionError::Closing,
        })?;
        Ok(rx)
    }

    /// Answers the prompt the running execution waits on; [`SessionError::NoInputWaiting`] when none does.
    pub fn answer_input(&self, value: String) -> Result<(), SessionError> {
        crate::kernel::stdin::check_value(&value).map_err(|e| SessionError::Invalid(e.to_string()))?;
        let waiting = self.input.lock().unwrap().take();
        match waiting {
            Some(tx) => tx.send(value).map_err(|_| SessionError::NoInputWaiting),
            None => Err(SessionError::NoInputWaiting),
        }
    }

    /// Opens the slot for one answer (the session's task, when its execution asks the caller).
    pub(super) fn wait_for_input(&self) -> oneshot::Receiver<String> {
        let (tx, rx) = oneshot::channel();
        *self.input.lock().unwrap() = Some(tx);
        rx
    }

    /// Closes the slot: the execution no longer waits.
    pub(super) fn stop_waiting_for_input(&self) {
        self.input.lock().unwrap().take();
    }

    /// Jupyter clients attached now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Attaches a Jupyter client to the kernel (see `peers.rs`); `session_key` is the client's own session
    /// id, if it gave one. At most [`peers::MAX_PEERS`] at once.
    pub async fn attach(self: &Arc<Self>, session_key: Option<String>) -> Result<PeerLink, SessionError> {
        if self.connections.fetch_add(1, Ordering::SeqCst) >= peers::MAX_PEERS {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            return Err(SessionError::TooMany(format!(
                "at most {} clients may be connected to one kernel",
                peers::MAX_PEERS
            )));
        }
        let id = PeerId(self.next_peer.fetch_add(1, Ordering::SeqCst));
        // From here the link counts the connection and detaches on drop, whatever happens next.
        let (peer, outbox) = peers::attachment(id, session_key);
        let link = PeerLink { id, outbox, session: self.clone() };
        self.peer_events.send(PeerEvent::Attach(peer)).await.map_err(|_| SessionError::Closing)?;
        Ok(link)
    }

    pub fn info(&self) -> SessionInfo {
        let s = self.snapshot();
        SessionInfo {
            id: self.id.clone(),
            language: self.settings.language.clone(),
            runtime: self.settings.runtime.clone(),
            status: s.status,
            created_at: self.created_at,
            last_used_at: s.last_used,
            limits: self.limits.clone(),
            metadata: self.settings.metadata.clone(),
            kernel: s.kernel,
            dead_reason: s.dead_reason,
            executions: s.executions,
            auto_restart: self.settings.auto_restart,
            auto_restarts: s.auto_restarts,
            last_auto_restart: s.last_auto_restart,
        }
    }
}

/// One attached Jupyter client: its messages to the kernel go through it, the kernel's come out of
/// [`PeerLink::outbox`]. Dropping it detaches the client.
pub struct PeerLink {
    id: PeerId,
    pub outbox: PeerOutbox,
    session: Arc<Session>,
}

impl PeerLink {
    /// Sends a client's message to the kernel. Waits while the session's task is busy (the client's reads
    /// stop, so a fast sender is held back); fails once the session is gone.
    pub async fn send(&self, channel: crate::kernel::Channel, msg: crate::kernel::Message) -> Result<(), SessionError> {
        let event = PeerEvent::Message { from: self.id, channel, msg: Box::new(msg) };
        self.session.peer_events.send(event).await.map_err(|_| SessionError::Closing)
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.session.connections.fetch_sub(1, Ordering::SeqCst);
        let detach = PeerEvent::Detach(self.id);
        if let Err(mpsc::error::TrySendError::Full(detach)) = self.session.peer_events.try_send(detach) {
            // The task is behind: detach when it has room (the task also notices a closed client itself).
            let events = self.session.peer_events.clone();
            tokio::spawn(async move {
                let _ = events.send(detach).await;
            });
        }
    }
}

/// Marks a session in use while alive.
pub struct InUse(Arc<Session>);

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A queued execution. Keeps its session in use until dropped; dropping it before the result means the
/// caller left: a queued execution then never runs, a running one is interrupted (`/v1`).
pub struct Pending {
    _in_use: InUse,
    result: oneshot::Receiver<ExecuteResult>,
    events: Option<mpsc::Receiver<Event>>,
    /// For streaming: the session's automatic restarts while the execution is queued or runs.
    notices: Option<broadcast::Receiver<AutoRestartNotice>>,
    /// For streaming: the session's network refusals as they happen.
    blocked: Option<broadcast::Receiver<Blocked>>,
}

/// What a stream carries before its result.
#[derive(Debug)]
pub enum Streamed {
    /// An output, an update, a prompt.
    Event(Event),
    /// The session's kernel died and is restarted automatically (or stays dead).
    AutoRestart(AutoRestartNotice),
    /// The code's connection was refused by its network's rules (it is in the result's report too).
    NetworkBlocked(Blocked),
}

impl Pending {
    /// The result. A session removed under a queued execution answers it with `killed`, so an error here
    /// means the session's task ended without a word (a bug): reported as closing.
    pub async fn wait(self) -> Result<ExecuteResult, SessionError> {
        self.result.await.map_err(|_| SessionError::Closing)
    }

    /// For streaming: the next output event, then (once the outputs end) `None`. Call [`Pending::wait`]
    /// after it for the result, which always comes.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.as_mut()?.recv().await
    }

    /// For streaming: like [`Pending::next_event`], with the session's automatic restarts among the
    /// events (a notice first when both are ready: the death comes before the result it causes).
    pub async fn next_streamed(&mut self) -> Option<Streamed> {
        let events = self.events.as_mut()?;
        enum Next {
            Notice(Result<AutoRestartNotice, broadcast::error::RecvError>),
            Blocked(Result<Blocked, broadcast::error::RecvError>),
            Event(Option<Event>),
        }
        loop {
            let next = tokio::select! {
                biased;
                notice = recv_or_never(&mut self.notices) => Next::Notice(notice),
                blocked = recv_or_never(&mut self.blocked) => Next::Blocked(blocked),
                event = events.recv() => Next::Event(event),
            };
            match next {
                Next::Notice(Ok(notice)) => return Some(Streamed::AutoRestart(notice)),
                Next::Blocked(Ok(blocked)) => return Some(Streamed::NetworkBlocked(blocked)),
                // Missed notices are older news than what follows; missed refusals are in the result.
                Next::Notice(Err(broadcast::error::RecvError::Lagged(_)))
                | Next::Blocked(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Next::Notice(Err(broadcast::error::RecvError::Closed)) => self.notices = None,
                Next::Blocked(Err(broadcast::error::RecvError::Closed)) => self.blocked = None,
                Next::Event(event) => return event.map(Streamed::Event),
            }
        }
    }

    /// The result of a stream: like [`Pending::wait`], but never fails: a stream always ends with a result.
    pub async fn finish(self) -> ExecuteResult {
        self.result.await.unwrap_or_else(|_| ExecuteResult::killed("session_closed", 0))
    }
}

/// The next message of a receiver that may be absent (then never).
async fn recv_or_never<T: Clone>(rx: &mut Option<broadcast::Receiver<T>>) -> Result<T, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl ExecuteResult {
    /// The result of an execution that never ran or was cut short by the session's end.
    pub fn killed(reason: &str, duration_ms: u64) -> Self {
        ExecuteResult {
            status: ExecStatus::Killed,
            execution_count: None,
            outputs: Vec::new(),
            stdout: String::new(),
            stderr: String::new(),
            streams_abridged: false,
            error: None,
            duration_ms,
            truncated: false,
            killed_reason: Some(reason.to_owned()),
            kernel_restarted: false,
            stream_events_dropped: 0,
            network: None,
        }
    }
}
