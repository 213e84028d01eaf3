//! A fake kernel peer for unit tests: like start-kernel's relay, it reads a session directory's connection
//! file and *connects* to the service's sockets `k-<port>`, then answers like a tiny kernel. It speaks
//! through the `zeromq` crate (ROUTER for shell, control and stdin, PUB for IOPub), so our own ZMTP is
//! tested against an independent implementation. Never used instead of the end-to-end tests with real
//! kernels.
//!
//! Code it understands: `sleep:<seconds>` (interruptible; an interrupt ends it with `KeyboardInterrupt`),
//! `hang` (ignores interrupts), `error` (raises), `print:<text>` (stdout), `input:<prompt>` (asks on stdin
//! and prints the answer; an interrupt ends the wait with `KeyboardInterrupt`), `big:<bytes>` (one stdout message of that many bytes), `noidle:<text>` (prints, then
//! replies but never publishes its `status: idle`, like a kernel whose IOPub queue dropped it); anything else is echoed
//! back as the execution's result.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketEvent, SocketRecv, SocketSend, ZmqMessage};

use super::connection::{self, ConnectionInfo};
use super::wire::{Header, Message, Signer};

/// A running fake kernel; stops when dropped.
pub struct FakeKernel {
    task: JoinHandle<()>,
    interrupt: Arc<Notify>,
    stop: Arc<Notify>,
}

impl Drop for FakeKernel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Out {
    Shell(Message),
    IOPub(Message),
    Stdin(Message),
}

/// The fake's four sockets, connected, and their event streams (to notice the service going away).
struct Sockets {
    shell: RouterSocket,
    control: RouterSocket,
    stdin: RouterSocket,
    iopub: PubSocket,
    monitors: [futures::channel::mpsc::Receiver<SocketEvent>; 4],
}

impl FakeKernel {
    /// Reads `dir/connection.json` and starts connecting to the service's sockets in the background (the
    /// connections complete when the service accepts them), then serves. Like start-kernel's relay, it
    /// connects again whenever the service drops a connection (a new service process adopting the
    /// session), keeping the kernel's state.
    pub async fn start(dir: &Path) -> std::io::Result<FakeKernel> {
        let info = connection::read_connection_file(dir)?;
        let interrupt = Arc::new(Notify::new());
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(run(dir.to_owned(), info, interrupt.clone(), stop.clone()));
        Ok(FakeKernel { task, interrupt, stop })
    }

    /// Stops the kernel and waits until its connections are closed, as start-kernel does on SIGHUP.
    pub async fn stop(mut self) {
        self.stop.notify_one();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }

    /// What SIGINT would do.
    pub fn interrupt(&self) {
        self.interrupt.notify_one();
    }
}

/// The kernel: a runner (its main thread) that lives as long as the kernel, and connections that come and go.
async fn run(dir: PathBuf, info: ConnectionInfo, interrupt: Arc<Notify>, stop: Arc<Notify>) {
    let signer = Signer::new(&info.key);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Out>();
    let (exec_tx, mut exec_rx) = mpsc::unbounded_channel::<Message>();
    let (input_tx, input_rx) = mpsc::unbounded_channel::<Message>();
    // Shell requests run one at a time, like a kernel's main thread; control stays responsive.
    let mut runner = Runner { count: 0, out: out_tx, interrupt: interrupt.clone(), input: input_rx, skip_idle: false };
    let runner = tokio::spawn(async move {
        while let Some(request) = exec_rx.recv().await {
            runner.handle_shell(&request).await;
        }
    });
    // Aborting the kernel must stop the runner too, even one stuck in `hang`.
    let _runner = AbortOnDrop(runner);
    let channels = Channels { exec: exec_tx, input: input_tx };
    loop {
        let connected = tokio::select! {
            s = connect(&dir, &info) => s,
            _ = stop.notified() => return,
        };
        let sockets = match connected {
            Ok(sockets) => sockets,
            Err(error) => {
                tracing::warn!(%error, "the fake kernel could not connect");
                return;
            }
        };
        if !serve(&signer, sockets, &channels, &mut out_rx, &interrupt, &stop).await {
            return;
        }
    }
}

/// Where the connections hand requests to the runner.
struct Channels {
    exec: mpsc::UnboundedSender<Message>,
    input: mpsc::UnboundedSender<Message>,
}

async fn connect(dir: &Path, info: &ConnectionInfo) -> Result<Sockets, zeromq::ZmqError> {
    let at = |port: u16| format!("ipc://{}", connection::socket_path(dir, port).display());
    let (mut shell, mut control, mut stdin, mut iopub) =
        (RouterSocket::new(), RouterSocket::new(), RouterSocket::new(), PubSocket::new());
    let monitors = [shell.monitor(), control.monitor(), stdin.monitor(), iopub.monitor()];
    let ends = [at(info.shell_port), at(info.control_port), at(info.stdin_port), at(info.iopub_port)];
    // All at once: the service accepts the four together.
    tokio::try_join!(
        shell.connect(&ends[0]),
        control.connect(&ends[1]),
        stdin.connect(&ends[2]),
        iopub.connect(&ends[3])
    )?;
    Ok(Sockets { shell, control, stdin, iopub, monitors })
}

/// Serves one set of connections; `true` when the service dropped them (connect again), `false` when the
/// kernel stops. Dropping the sockets closes the connections: what the service's `closed()` waits for.
async fn serve(
    signer: &Signer,
    sockets: Sockets,
    channels: &Channels,
    out_rx: &mut mpsc::UnboundedReceiver<Out>,
    interrupt: &Notify,
    stop: &Notify,
) -> bool {
    let Sockets { mut shell, mut control, mut stdin, mut iopub, monitors } = sockets;
    let mut monitors = futures::stream::select_all(monitors);
    let encode = |m: &Message| ZmqMessage::try_from(signer.encode(m)).expect("frames");
    loop {
        tokio::select! {
            _ = stop.notified() => return false,
            event = monitors.next() => {
                if matches!(event, None | Some(SocketEvent::Disconnected(_))) {
                    return true;
                }
            }
            m = shell.recv() => match m.ok().and_then(|m| signer.decode(m.into_vec()).ok()) {
                Some(msg) => { let _ = channels.exec.send(msg); }
                None => return true,
            },
            m = stdin.recv() => match m.ok().and_then(|m| signer.decode(m.into_vec()).ok()) {
                Some(msg) => { let _ = channels.input.send(msg); }
                None => return true,
            },
            m = control.recv() => match m.ok().and_then(|m| signer.decode(m.into_vec()).ok()) {
                Some(msg) => {
                    let reply_type = msg.msg_type().replace("_request", "_reply");
                    if msg.msg_type() == "interrupt_request" {
                        interrupt.notify_one();
                    }
                    // Like ipykernel: control is answered while shell is busy, between busy and idle.
                    let status = |state: &str| match publish(&msg, "status", json!({"execution_state": state})) {
                        Out::IOPub(m) => encode(&m),
                        _ => unreachable!("a status is published"),
                    };
                    let reply = reply_to(&msg, &reply_type, json!({"status": "ok"}));
                    let sent = async {
                        iopub.send(status("busy")).await?;
                        control.send(encode(&reply)).await?;
                        iopub.send(status("idle")).await
                    };
                    if sent.await.is_err() { return true; }
                }
                None => return true,
            },
            Some(out) = out_rx.recv() => {
                // Like a kernel's ROUTER, a reply for a client that is gone (an earlier run of the
                // service) is dropped; the connections' end is what the monitors report.
                let result = match out {
                    Out::Shell(m) => { let _ = shell.send(encode(&m)).await; Ok(()) }
                    Out::Stdin(m) => { let _ = stdin.send(encode(&m)).await; Ok(()) }
                    Out::IOPub(m) => iopub.send(encode(&m)).await,
                };
                if result.is_err() { return true; }
            }
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn reply_to(request: &Message, msg_type: &str, content: Value) -> Message {
    Message {
        identities: request.identities.clone(),
        header: Header::new(msg_type, "fake-kernel"),
        parent_header: serde_json::to_value(&request.header).expect("a header serializes"),
        metadata: json!({}),
        content,
        buffers: Vec::new(),
        dropped_bytes: 0,
    }
}

fn publish(request: &Message, msg_type: &str, content: Value) -> Out {
    let mut m = reply_to(request, msg_type, content);
    m.identities = vec![Bytes::from(msg_type.to_owned())];
    Out::IOPub(m)
}

/// The kernel's main thread.
struct Runner {
    count: u64,
    out: mpsc::UnboundedSender<Out>,
    interrupt: Arc<Notify>,
    /// `input_reply`s from stdin.
    input: mpsc::UnboundedReceiver<Message>,
    /// The current request's `status: idle` is not sent (`noidle:`), as when a full IOPub queue drops it.
    skip_idle: bool,
}

impl Runner {
    fn send(&self, o: Out) {
        let _ = self.out.send(o);
    }

    async fn handle_shell(&mut self, request: &Message) {
        self.send(publish(request, "status", json!({"execution_state": "busy"})));
        match request.msg_type() {
            "kernel_info_request" => self.send(Out::Shell(reply_to(
                request,
                "kernel_info_reply",
                json!({"status": "ok", "protocol_version": "5.3", "implementation": "fake", "language_info": {"name": "fake"}}),
            ))),
            "execute_request" => {
                self.count += 1;
                let code = request.content["code"].as_str().unwrap_or_default().to_owned();
                let mut reply = self.execute(request, &code).await;
                reply["execution_count"] = json!(self.count);
                self.send(Out::Shell(reply_to(request, "execute_reply", reply)));
            }
            other => {
                let reply_type = other.replace("_request", "_reply");
                self.send(Out::Shell(reply_to(request, &reply_type, json!({"status": "ok"}))));
            }
        }
        if !std::mem::take(&mut self.skip_idle) {
            self.send(publish(request, "status", json!({"execution_state": "idle"})));
        }
    }

    /// Runs `code`; returns the `execute_reply` content.
    async fn execute(&mut self, request: &Message, code: &str) -> Value {
        let error = |ename: &str| json!({"ename": ename, "evalue": "", "traceback": [format!("{ename}!")]});
        let stdout = |text: String| publish(request, "stream", json!({"name": "stdout", "text": text}));
        if let Some(secs) = code.strip_prefix("sleep:") {
            let secs: f64 = secs.parse().unwrap_or(1.0);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs_f64(secs)) => json!({"status": "ok"}),
                _ = self.interrupt.notified() => {
                    self.send(publish(request, "error", error("KeyboardInterrupt")));
                    let mut reply = error("KeyboardInterrupt");
                    reply["status"] = json!("error");
                    reply
                }
            }
        } else if let Some(text) = code.strip_prefix("noidle:") {
            self.skip_idle = true;
            self.send(stdout(format!("{text}\n")));
            json!({"status": "ok"})
        } else if code == "hang" {
            std::future::pending::<()>().await;
            unreachable!()
        } else if code == "error" {
            self.send(publish(request, "error", error("ValueError")));
            json!({"status": "error", "ename": "ValueError", "evalue": "", "traceback": []})
        } else if let Some(text) = code.strip_prefix("print:") {
            self.send(stdout(format!("{text}\n")));
            json!({"status": "ok"})
        } else if let Some(prompt) = code.strip_prefix("input:") {
            // Like ipykernel: the request goes to the identity of the shell request, on stdin.
            let mut ask = reply_to(request, "input_request", json!({"prompt": prompt, "password": false}));
            ask.identities = request.identities.clone();
            self.send(Out::Stdin(ask));
            // Like ipykernel, an interrupt while waiting for input raises KeyboardInterrupt.
            let answer = tokio::select! {
                answer = self.input.recv() => answer,
                _ = self.interrupt.notified() => {
                    self.send(publish(request, "error", error("KeyboardInterrupt")));
                    let mut reply = error("KeyboardInterrupt");
                    reply["status"] = json!("error");
                    return reply;
                }
            };
            match answer {
                Some(answer) => {
                    let value = answer.content["value"].as_str().unwrap_or_default().to_owned();
                    self.send(stdout(format!("{value}\n")));
                    json!({"status": "ok"})
                }
                None => json!({"status": "error", "ename": "EOFError", "evalue": "", "traceback": []}),
            }
        } else if let Some(size) = code.strip_prefix("big:") {
            self.send(stdout("x".repeat(size.parse().unwrap_or(0))));
            json!({"status": "ok"})
        } else {
            let data = json!({"text/plain": code});
            self.send(publish(
                request,
                "execute_result",
                json!({"execution_count": self.count, "data": data, "metadata": {}}),
            ));
            json!({"status": "ok"})
        }
    }
}
