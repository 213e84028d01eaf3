//! A client for one kernel: the shell, control and IOPub sockets, with timeouts the `zeromq` crate does not
//! give by itself.
//!
//! zmq.rs DEALER sockets do not reconnect: after a kernel restart the caller builds a new client
//! ([`KernelClient::connect`]) rather than reusing this one. `recv` is cancel-safe, so callers can `select!`
//! on it against deadlines.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::time::{Instant, timeout_at};
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use super::connection::Endpoints;
use super::wire::{Message, Signer, WireError};

/// What went wrong talking to a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("could not connect to the kernel at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: zeromq::ZmqError,
    },
    #[error("the kernel socket failed: {0}")]
    Socket(#[from] zeromq::ZmqError),
    #[error("the kernel did not answer within {0:?}")]
    Timeout(Duration),
}

/// Which socket a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Shell,
    Control,
    IOPub,
}

/// Connected sockets to one kernel.
pub struct KernelClient {
    /// Signs what we send and checks what we read.
    signer: Signer,
    /// The `session` field of our headers: identifies this client to the kernel.
    session: String,
    shell: DealerSocket,
    control: DealerSocket,
    iopub: SubSocket,
}

impl KernelClient {
    /// Connects all sockets. `connect_timeout` bounds each connect: zmq.rs waits for the peer to listen.
    pub async fn connect(endpoints: &Endpoints, key: &str, connect_timeout: Duration) -> Result<Self, KernelError> {
        let options = || {
            let mut o = SocketOptions::default();
            o.connect_timeout(connect_timeout);
            o
        };
        let mut iopub = SubSocket::with_options(options());
        iopub.subscribe("").await?;
        connect(&mut iopub, &endpoints.iopub).await?;
        let mut shell = DealerSocket::with_options(options());
        connect(&mut shell, &endpoints.shell).await?;
        let mut control = DealerSocket::with_options(options());
        connect(&mut control, &endpoints.control).await?;
        Ok(KernelClient {
            signer: Signer::new(key),
            session: uuid::Uuid::new_v4().simple().to_string(),
            shell,
            control,
            iopub,
        })
    }

    /// Sends a new request of `msg_type` on `channel` and returns its `msg_id`.
    pub async fn send(&mut self, channel: Channel, msg_type: &str, content: Value) -> Result<String, KernelError> {
        let msg = Message::request(msg_type, &self.session, content);
        let id = msg.header.msg_id.clone();
        let frames = ZmqMessage::try_from(self.signer.encode(&msg)).expect("an encoded message has frames");
        match channel {
            Channel::Shell => self.shell.send(frames).await?,
            Channel::Control => self.control.send(frames).await?,
            Channel::IOPub => unreachable!("clients never send on IOPub"),
        }
        Ok(id)
    }

    /// The next valid message from any socket. Messages that fail their signature or do not parse are
    /// logged and skipped: a kernel cannot make us act on a message it could not have signed.
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Result<(Channel, Message), KernelError> {
        loop {
            let (channel, frames) = tokio::select! {
                m = self.shell.recv() => (Channel::Shell, m?),
                m = self.control.recv() => (Channel::Control, m?),
                m = self.iopub.recv() => (Channel::IOPub, m?),
            };
            let frames: Vec<Bytes> = frames.into_vec();
            match self.signer.decode(frames) {
                Ok(msg) => return Ok((channel, msg)),
                Err(error) => log_bad_message(channel, &error),
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
                pending = self.send(Channel::Shell, "kernel_info_request", json!({})).await?;
                next_send = Instant::now() + Duration::from_millis(500);
            }
            let wait_until = next_send.min(deadline);
            match timeout_at(wait_until, self.recv()).await {
                Ok(Ok((Channel::IOPub, _))) => iopub_seen = true,
                Ok(Ok((Channel::Shell, msg))) if msg.msg_type() == "kernel_info_reply" => {
                    if info.is_none() || msg.parent_msg_id() == Some(pending.as_str()) {
                        info = Some(msg.content);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) if Instant::now() >= deadline => {
                    return Err(KernelError::Timeout(Duration::ZERO));
                }
                Err(_) => {}
            }
        }
    }
}

async fn connect<S: Socket>(socket: &mut S, endpoint: &str) -> Result<(), KernelError> {
    socket.connect(endpoint).await.map_err(|source| KernelError::Connect { endpoint: endpoint.to_owned(), source })
}

fn log_bad_message(channel: Channel, error: &WireError) {
    tracing::warn!(?channel, %error, "dropped a malformed or badly signed message from the kernel");
}
