//! The service's end of one kernel: it binds the four unix sockets of a session directory, accepts the
//! kernel side's connections (start-kernel's relay), and speaks Jupyter over them with our own ZMTP
//! (`zmtp.rs`, `wire.rs`): DEALER on shell, control and stdin (one shared identity, so the kernel routes
//! `input_request` to us), SUB on IOPub.
//!
//! The service binds and the kernel connects (start contract v2): the sockets live in a directory only the
//! service can write, mounted read-only into the container. What the kernel sends is read with bounded
//! memory: [`KernelClient::recv`] only reads while it is called, so a kernel that publishes faster than we
//! consume is held back by the socket buffers (flow control), never by our memory.
//!
//! Timeouts are the caller's: `accept`, `send` (a peer that never reads blocks a write) and `recv` are all
//! cancel-safe, so wrap them in `tokio::time::timeout` or `select!`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::{Instant, timeout, timeout_at};

use super::connection::{ConnectionInfo, socket_path};
use super::wire::{Message, MessageReader, Signer, WireError, WireLimits};
use super::zmtp::{SocketType, ZmtpError, ZmtpStream};

/// How long one accepted connection may take to complete its ZMTP handshake before we give up on it and
/// accept the next (a stray or stuck peer must not block the kernel's real connection).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes run side by side, so connections that never speak (the sandbox can open them) cannot delay
/// the real kernel's by 5 s each; bounded, so they cannot cost unbounded memory either.
const MAX_PENDING_HANDSHAKES: usize = 64;
/// How often `wait_ready` asks again: a `kernel_info_request` sent before IOPub was subscribed still gets
/// its reply, but its IOPub status may be lost.
const KERNEL_INFO_INTERVAL: Duration = Duration::from_millis(500);
/// How long an adopted kernel's shell may take to answer after its control channel did, before the kernel
/// counts as busy with a cell. A wrong guess corrects itself: the shell's answer then comes a little later.
const SHELL_SETTLE: Duration = Duration::from_millis(500);

/// What went wrong talking to a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("could not bind the kernel socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not accept the kernel's {channel:?} connection: {source}")]
    Accept {
        channel: Channel,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel's {channel:?} connection failed: {source}")]
    Connection {
        channel: Channel,
        #[source]
        source: ZmtpError,
    },
    #[error("messages cannot be sent on {0:?}")]
    NotSendable(Channel),
    #[error("the kernel did not answer in time")]
    Timeout,
}

/// Which connection a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Shell,
    Control,
    IOPub,
    Stdin,
}

impl Channel {
    /// The name Jupyter's WebSocket protocols give it.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Shell => "shell",
            Channel::Control => "control",
            Channel::IOPub => "iopub",
            Channel::Stdin => "stdin",
        }
    }

    fn socket_type(self) -> SocketType {
        match self {
            Channel::IOPub => SocketType::Sub,
            Channel::Shell | Channel::Control | Channel::Stdin => SocketType::Dealer,
        }
    }
}

/// The four listening sockets of one session directory. Lives as long as the session: a kernel restart
/// accepts new connections on the same listener. Dropping it closes the sockets but leaves their files
/// (the next `bind` removes them): removing a path on drop could remove a successor's socket.
#[derive(Debug)]
pub struct KernelListener {
    shell: UnixListener,
    iopub: UnixListener,
    stdin: UnixListener,
    control: UnixListener,
}

impl KernelListener {
    /// Binds `dir/k-<port>` for the shell, IOPub, stdin and control ports of `info`, replacing stale
    /// socket files of an earlier boot or service run. `dir` must be the service's own directory (the
    /// sandbox cannot write it). The sockets are made mode 0666: the container's user must connect.
    /// Call it inside a tokio runtime (the listeners register with its reactor).
    pub fn bind(dir: &Path, info: &ConnectionInfo) -> Result<KernelListener, KernelError> {
        let bind = |port: u16| -> Result<UnixListener, KernelError> {
            let path = socket_path(dir, port);
            let failed = |source| KernelError::Bind { path: path.clone(), source };
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(failed(e)),
            }
            let listener = UnixListener::bind(&path).map_err(failed)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(failed)?;
            Ok(listener)
        };
        Ok(KernelListener {
            shell: bind(info.shell_port)?,
            iopub: bind(info.iopub_port)?,
            stdin: bind(info.stdin_port)?,
            control: bind(info.control_port)?,
        })
    }

    /// Accepts one connection per channel, handshakes each, and returns the client. Connections that fail
    /// their handshake (within [`HANDSHAKE_TIMEOUT`]) are closed and the next one is accepted. Never
    /// returns on its own while no kernel connects: bound it with a timeout. Dropping it closes whatever
    /// it had accepted; connections beyond one per channel stay in the listen backlog, costing us nothing.
    pub async fn accept(&self, key: &str, limits: WireLimits) -> Result<KernelClient, KernelError> {
        let session = uuid::Uuid::new_v4().simple().to_string();
        // shell and stdin must share the identity: the kernel sends `input_request` to the identity of the
        // shell request that asked for input.
        let identity = session.as_bytes();
        let (shell, iopub, stdin, control) = tokio::try_join!(
            accept_one(&self.shell, Channel::Shell, Some(identity)),
            accept_one(&self.iopub, Channel::IOPub, None),
            accept_one(&self.stdin, Channel::Stdin, Some(identity)),
            accept_one(&self.control, Channel::Control, Some(identity)),
        )?;
        let signer = Signer::new(key);
        let link = |channel, stream| Link { channel, stream, reader: MessageReader::new(signer.clone(), limits) };
        Ok(KernelClient {
            shell: link(Channel::Shell, shell),
            iopub: link(Channel::IOPub, iopub),
            stdin: link(Channel::Stdin, stdin),
            control: link(Channel::Control, control),
            signer,
            session,
            skipped: 0,
        })
    }
}

async fn accept_one(
    listener: &UnixListener,
    channel: Channel,
    identity: Option<&[u8]>,
) -> Result<ZmtpStream<UnixStream>, KernelError> {
    use futures::StreamExt;
    let mut pending = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            accepted = listener.accept(), if pending.len() < MAX_PENDING_HANDSHAKES => {
                let (stream, _) = accepted.map_err(|source| KernelError::Accept { channel, source })?;
                pending.push(timeout(HANDSHAKE_TIMEOUT, ZmtpStream::handshake(stream, channel.socket_type(), identity)));
            }
            Some(done) = pending.next(), if !pending.is_empty() => match done {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(error)) => tracing::warn!(?channel, %error, "refused a kernel connection"),
                Err(_) => tracing::warn!(?channel, "a kernel connection did not complete its handshake in time"),
            },
        }
    }
}

/// One accepted connection and the message being read from it.
struct Link {
    channel: Channel,
    stream: ZmtpStream<UnixStream>,
    reader: MessageReader,
}

impl Link {
    /// The next message, or why it was rejected; an `Err` ends the connection. Cancel-safe: the only
    /// await is one read into the stream's own buffer, and the partial message lives in `reader`.
    async fn next(&mut self) -> Result<Result<Message, WireError>, KernelError> {
        let channel = self.channel;
        let failed = |source| KernelError::Connection { channel, source };
        loop {
            while let Some(event) = self.stream.next_event().map_err(failed)? {
                if let Some(result) = self.reader.feed(event) {
                    return Ok(result);
                }
            }
            self.stream.fill().await.map_err(failed)?;
        }
    }

    async fn send(&mut self, frames: &[bytes::Bytes]) -> Result<(), KernelError> {
        let parts: Vec<&[u8]> = frames.iter().map(|f| f.as_ref()).collect();
        self.stream.queue_message(&parts);
        self.stream.flush().await.map_err(|source| KernelError::Connection { channel: self.channel, source })
    }
}

/// What a kernel that an earlier run of the service left is doing (see [`KernelClient::wait_adopted`]).
#[derive(Debug)]
pub struct Adopted {
    /// The `kernel_info_reply` content.
    pub info: Value,
    /// `Some(msg_id)` while a cell started before the adoption runs: the kernel answers shell requests in
    /// order, so the reply to this `kernel_info_request` comes when that cell has ended.
    pub busy_until: Option<String>,
}

/// Connected, handshaken connections to one kernel.
pub struct KernelClient {
    /// Signs what we send and checks what we read.
    signer: Signer,
    /// The `session` field of our headers, and our ZMTP identity: identifies this client to the kernel.
    session: String,
    shell: Link,
    control: Link,
    iopub: Link,
    stdin: Link,
    /// Messages skipped so far; logged at powers of two, so a kernel flooding bad messages cannot flood
    /// the log.
    skipped: u64,
}

impl std::fmt::Debug for KernelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelClient").field("session", &self.session).finish_non_exhaustive()
    }
}

impl KernelClient {
    /// Sends a new request of `msg_type` on `channel` (not IOPub) and returns its `msg_id`. Waits until
    /// the bytes are in the socket, which a kernel that does not read can delay forever: bound it with a
    /// timeout. If a send is cancelled, the next send on that channel completes it first (frames are never
    /// torn).
    pub async fn send(&mut self, channel: Channel, msg_type: &str, content: Value) -> Result<String, KernelError> {
        let msg = Message::request(msg_type, &self.session, content);
        let frames = self.signer.encode(&msg);
        self.outgoing(channel)?.send(&frames).await?;
        Ok(msg.header.msg_id)
    }

    /// The connection messages for `channel` go out on (IOPub takes none).
    fn outgoing(&mut self, channel: Channel) -> Result<&mut Link, KernelError> {
        match channel {
            Channel::Shell => Ok(&mut self.shell),
            Channel::Control => Ok(&mut self.control),
            Channel::Stdin => Ok(&mut self.stdin),
            Channel::IOPub => Err(KernelError::NotSendable(channel)),
        }
    }

    /// Sends a client's message on `channel` (not IOPub) as it is, signed with the kernel's key; replies
    /// come to this client (one ZMTP identity for all), so the caller routes them by their parent.
    /// Bound it with a timeout, like [`KernelClient::send`].
    pub async fn forward(&mut self, channel: Channel, msg: &Message) -> Result<(), KernelError> {
        let frames = self.signer.encode(msg);
        let link = self.outgoing(channel)?;
        // A client cannot pile messages up behind a kernel that does not read: what an earlier call left
        // unsent goes out first, and only then is this one queued, so at most one waits per channel. A
        // call cut off by its timeout before that queues nothing.
        let failed = |source| KernelError::Connection { channel, source };
        link.stream.flush().await.map_err(failed)?;
        link.send(&frames).await
    }

    /// Sends an `execute_request` for `code` and returns its `msg_id`.
    pub async fn execute(&mut self, code: &str, allow_stdin: bool) -> Result<String, KernelError> {
        let content = json!({
            "code": code, "silent": false, "store_history": true,
            "user_expressions": {}, "allow_stdin": allow_stdin, "stop_on_error": true,
        });
        self.send(Channel::Shell, "execute_request", content).await
    }

    /// Answers the kernel's `input_request` on stdin: the reply's parent is the request, so the kernel
    /// knows which prompt it answers. Bound it with a timeout, like [`KernelClient::send`].
    pub async fn input_reply(&mut self, request: &Message, value: &str) -> Result<(), KernelError> {
        let mut msg = Message::request("input_reply", &self.session, json!({"value": value}));
        msg.parent_header = serde_json::to_value(&request.header).unwrap_or_else(|_| json!({}));
        self.stdin.send(&self.signer.encode(&msg)).await
    }

    /// Sends an `interrupt_request` on the control channel (for kernels whose interrupt mode is
    /// `message`) and returns its `msg_id`.
    pub async fn interrupt(&mut self) -> Result<String, KernelError> {
        self.send(Channel::Control, "interrupt_request", json!({})).await
    }

    /// Bytes read from the kernel so far on every channel, messages complete or not: a message still
    /// arriving (a huge one, streamed through the HMAC) is activity too.
    pub fn bytes_received(&self) -> u64 {
        [&self.shell, &self.control, &self.iopub, &self.stdin].iter().map(|l| l.stream.bytes_in()).sum()
    }

    /// The next valid message from any connection. Messages that fail their signature, do not parse or
    /// break the [`WireLimits`] are logged and skipped: a kernel cannot make us act on a message it could
    /// not have signed. A message cut to the limits has `dropped_bytes > 0`. An error means a connection
    /// ended (the kernel closed it, died or broke the protocol). Cancel-safe.
    pub async fn recv(&mut self) -> Result<(Channel, Message), KernelError> {
        loop {
            let (channel, result) = tokio::select! {
                r = self.shell.next() => (Channel::Shell, r?),
                r = self.control.next() => (Channel::Control, r?),
                r = self.iopub.next() => (Channel::IOPub, r?),
                r = self.stdin.next() => (Channel::Stdin, r?),
            };
            match result {
                Ok(msg) => {
                    if msg.dropped_bytes > 0 {
                        tracing::debug!(
                            ?channel,
                            msg_type = msg.msg_type(),
                            dropped_bytes = msg.dropped_bytes,
                            "cut a kernel message to the limits"
                        );
                    }
                    return Ok((channel, msg));
                }
                Err(error) => {
                    self.skipped += 1;
                    if self.skipped.is_power_of_two() {
                        tracing::warn!(
                            ?channel,
                            %error,
                            skipped = self.skipped,
                            "dropped a malformed, oversize or badly signed message from the kernel"
                        );
                    }
                }
            }
        }
    }

    /// Waits until the kernel answers `kernel_info` *and* we have seen a message on IOPub, so that no output
    /// of the first execution can be lost to the subscription race (jupyter_client #593). Returns the
    /// `kernel_info_reply` content.
    pub async fn wait_ready(&mut self, deadline: Instant) -> Result<Value, KernelError> {
        let mut info: Option<Value> = None;
        let mut iopub_seen = false;
        let mut pending = String::new();
        let mut next_send = Instant::now();
        loop {
            if let (Some(info), true) = (&info, iopub_seen) {
                return Ok(info.clone());
            }
            if Instant::now() >= next_send {
                pending = self.ask_info(Channel::Shell, deadline).await?;
                next_send = Instant::now() + KERNEL_INFO_INTERVAL;
            }
            match self.recv_before(next_send, deadline).await? {
                Some((Channel::IOPub, _)) => iopub_seen = true,
                Some((Channel::Shell, msg))
                    if msg.msg_type() == "kernel_info_reply"
                        && (info.is_none() || msg.parent_msg_id() == Some(pending.as_str())) =>
                {
                    info = Some(msg.content);
                }
                _ => {}
            }
        }
    }

    /// Waits until a kernel that an earlier run of the service left answers, busy or not. One
    /// `kernel_info` goes on shell: answered (and a message seen on IOPub, so the subscription is live),
    /// the kernel is idle. `kernel_info` on the control channel, which a kernel answers while a cell runs
    /// on shell, shows it alive: if shell has not answered within [`SHELL_SETTLE`] of it, the kernel runs a
    /// cell, and the shell reply will mark the cell's end ([`Adopted::busy_until`]). A kernel that answers
    /// neither by `deadline` is not alive.
    pub async fn wait_adopted(&mut self, deadline: Instant) -> Result<Adopted, KernelError> {
        let marker = self.ask_info(Channel::Shell, deadline).await?;
        let (mut shell_info, mut control_info, mut iopub_seen) = (None::<Value>, None::<Value>, false);
        let mut asked = String::new();
        let mut next_ask = Instant::now();
        let mut settle: Option<Instant> = None;
        loop {
            if iopub_seen && let Some(info) = shell_info.take() {
                return Ok(Adopted { info, busy_until: None });
            }
            // Busy: IOPub need not have spoken (Deno publishes nothing for a control request); by the time
            // the cell ends and the next execution starts, the subscription is long in place.
            if let Some(info) = &control_info {
                let until = *settle.get_or_insert_with(|| (Instant::now() + SHELL_SETTLE).min(deadline));
                if Instant::now() >= until && shell_info.is_none() {
                    return Ok(Adopted { info: info.clone(), busy_until: Some(marker) });
                }
            }
            // Asked again until something answers on control, or (idle) until IOPub has spoken: the
            // status of a request sent before the subscription was in place is lost.
            let asking = match (&shell_info, &control_info) {
                (None, None) => Some(Channel::Control),
                (Some(_), _) => Some(Channel::Shell),
                (None, Some(_)) => None,
            };
            if let Some(channel) = asking
                && Instant::now() >= next_ask
            {
                let id = self.ask_info(channel, deadline).await?;
                if channel == Channel::Control {
                    asked = id;
                }
                next_ask = Instant::now() + KERNEL_INFO_INTERVAL;
            }
            let wake = match asking {
                Some(_) => next_ask,
                None => settle.unwrap_or(deadline),
            };
            match self.recv_before(wake, deadline).await? {
                Some((Channel::IOPub, _)) => iopub_seen = true,
                Some((Channel::Shell, msg)) if msg.parent_msg_id() == Some(marker.as_str()) => {
                    shell_info = Some(msg.content);
                }
                Some((Channel::Control, msg))
                    if msg.msg_type() == "kernel_info_reply"
                        && (control_info.is_none() || msg.parent_msg_id() == Some(asked.as_str())) =>
                {
                    control_info = Some(msg.content);
                }
                _ => {}
            }
        }
    }

    /// The next message, or `None` when `wake` comes first; a timeout once `deadline` has passed.
    async fn recv_before(
        &mut self,
        wake: Instant,
        deadline: Instant,
    ) -> Result<Option<(Channel, Message)>, KernelError> {
        match timeout_at(wake.min(deadline), self.recv()).await {
            Ok(received) => received.map(Some),
            Err(_) if Instant::now() >= deadline => Err(KernelError::Timeout),
            Err(_) => Ok(None),
        }
    }

    /// Sends a `kernel_info_request` on `channel` by `deadline`; returns its `msg_id`.
    async fn ask_info(&mut self, channel: Channel, deadline: Instant) -> Result<String, KernelError> {
        timeout_at(deadline, self.send(channel, "kernel_info_request", json!({})))
            .await
            .map_err(|_| KernelError::Timeout)?
    }

    /// Waits until the kernel side has closed all four connections, reading and discarding what it still
    /// sends (with bounded memory). At a kernel restart this tells the old kernel from the new one: accept
    /// the new connections only after this returned. Cancel-safe and resumable.
    pub async fn closed(&mut self, deadline: Instant) -> Result<(), KernelError> {
        let KernelClient { shell, control, iopub, stdin, .. } = self;
        let all = async {
            // Any end counts: EOF, a reset, an error.
            let _ =
                tokio::join!(shell.stream.drain(), control.stream.drain(), iopub.stream.drain(), stdin.stream.drain());
        };
        timeout_at(deadline, all).await.map_err(|_| KernelError::Timeout)
    }
}

#[cfg(test)]
mod tests;
