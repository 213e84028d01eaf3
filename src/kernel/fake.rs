//! A fake kernel peer for unit tests: binds the shell, control and IOPub sockets of a connection file over
//! ipc and answers like a tiny kernel. Never used instead of the end-to-end tests with real kernels.
//!
//! Code it understands: `sleep:<seconds>` (interruptible; an interrupt ends it with `KeyboardInterrupt`),
//! `hang` (ignores interrupts), `error` (raises), `print:<text>` (stdout); anything else is echoed back as
//! the execution's result.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

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
}

impl FakeKernel {
    /// Binds the sockets named by `dir/connection.json`, then writes `dir/ready`.
    pub async fn start(dir: &Path) -> std::io::Result<FakeKernel> {
        let info: ConnectionInfo = serde_json::from_slice(&std::fs::read(connection::connection_file(dir))?)?;
        let ends = info.host_endpoints(dir);
        // A restarted kernel binds where its predecessor did.
        for end in [&ends.shell, &ends.control, &ends.iopub] {
            let _ = std::fs::remove_file(end.trim_start_matches("ipc://"));
        }
        let to_io = |e: zeromq::ZmqError| std::io::Error::other(e.to_string());
        let mut shell = RouterSocket::new();
        shell.bind(&ends.shell).await.map_err(to_io)?;
        let mut control = RouterSocket::new();
        control.bind(&ends.control).await.map_err(to_io)?;
        let mut iopub = PubSocket::new();
        iopub.bind(&ends.iopub).await.map_err(to_io)?;
        std::fs::write(connection::ready_file(dir), b"fake")?;
        let interrupt = Arc::new(Notify::new());
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(serve(Signer::new(&info.key), shell, control, iopub, interrupt.clone(), stop.clone()));
        Ok(FakeKernel { task, interrupt, stop })
    }

    /// Stops the kernel and waits until its sockets are closed (a closing ipc socket removes its file,
    /// which must not happen after a successor has bound the same path).
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

async fn serve(
    signer: Signer,
    mut shell: RouterSocket,
    mut control: RouterSocket,
    mut iopub: PubSocket,
    interrupt: Arc<Notify>,
    stop: Arc<Notify>,
) {
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Out>();
    let (exec_tx, mut exec_rx) = mpsc::unbounded_channel::<Message>();
    // Shell requests run one at a time, like a kernel's main thread; control stays responsive.
    let runner_out = out_tx.clone();
    let runner_interrupt = interrupt.clone();
    let runner = tokio::spawn(async move {
        let mut count = 0u64;
        while let Some(request) = exec_rx.recv().await {
            handle_shell(&request, &mut count, &runner_out, &runner_interrupt).await;
        }
    });
    // Aborting `serve` must stop the runner too, even one stuck in `hang`.
    let _runner = AbortOnDrop(runner);
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            m = shell.recv() => match m.ok().and_then(|m| signer.decode(m.into_vec()).ok()) {
                Some(msg) => { let _ = exec_tx.send(msg); }
                None => break,
            },
            m = control.recv() => match m.ok().and_then(|m| signer.decode(m.into_vec()).ok()) {
                Some(msg) => {
                    let reply_type = msg.msg_type().replace("_request", "_reply");
                    if msg.msg_type() == "interrupt_request" {
                        interrupt.notify_one();
                    }
                    let reply = reply_to(&msg, &reply_type, json!({"status": "ok"}));
                    let frames = ZmqMessage::try_from(signer.encode(&reply)).expect("frames");
                    if control.send(frames).await.is_err() { break; }
                }
                None => break,
            },
            Some(out) = out_rx.recv() => {
                let result = match out {
                    Out::Shell(m) => shell.send(ZmqMessage::try_from(signer.encode(&m)).expect("frames")).await,
                    Out::IOPub(m) => iopub.send(ZmqMessage::try_from(signer.encode(&m)).expect("frames")).await,
                };
                if result.is_err() { break; }
            }
        }
    }
    // Close the binds before returning, so their socket files are gone before a successor binds.
    shell.close().await;
    control.close().await;
    iopub.close().await;
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

async fn handle_shell(request: &Message, count: &mut u64, out: &mpsc::UnboundedSender<Out>, interrupt: &Notify) {
    let send = |o: Out| {
        let _ = out.send(o);
    };
    send(publish(request, "status", json!({"execution_state": "busy"})));
    match request.msg_type() {
        "kernel_info_request" => send(Out::Shell(reply_to(
            request,
            "kernel_info_reply",
            json!({"status": "ok", "protocol_version": "5.3", "implementation": "fake", "language_info": {"name": "fake"}}),
        ))),
        "execute_request" => {
            *count += 1;
            let code = request.content["code"].as_str().unwrap_or_default().to_owned();
            let error = |ename: &str| json!({"ename": ename, "evalue": "", "traceback": [format!("{ename}!")]});
            let reply = if let Some(secs) = code.strip_prefix("sleep:") {
                let secs: f64 = secs.parse().unwrap_or(1.0);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs_f64(secs)) => json!({"status": "ok"}),
                    _ = interrupt.notified() => {
                        send(publish(request, "error", error("KeyboardInterrupt")));
                        let mut reply = error("KeyboardInterrupt");
                        reply["status"] = json!("error");
                        reply
                    }
                }
            } else if code == "hang" {
                std::future::pending::<()>().await;
                unreachable!()
            } else if code == "error" {
                send(publish(request, "error", error("ValueError")));
                json!({"status": "error", "ename": "ValueError", "evalue": "", "traceback": []})
            } else if let Some(text) = code.strip_prefix("print:") {
                send(publish(request, "stream", json!({"name": "stdout", "text": format!("{text}\n")})));
                json!({"status": "ok"})
            } else {
                let data = json!({"text/plain": code});
                send(publish(
                    request,
                    "execute_result",
                    json!({"execution_count": *count, "data": data, "metadata": {}}),
                ));
                json!({"status": "ok"})
            };
            let mut reply = reply;
            reply["execution_count"] = json!(*count);
            send(Out::Shell(reply_to(request, "execute_reply", reply)));
        }
        other => {
            let reply_type = other.replace("_request", "_reply");
            send(Out::Shell(reply_to(request, &reply_type, json!({"status": "ok"}))));
        }
    }
    send(publish(request, "status", json!({"execution_state": "idle"})));
}
