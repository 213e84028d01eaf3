//! A session's only way out: the unix socket `egress` in its run directory (mounted read-only at
//! `/kernel`, see ARCHITECTURE.md's start contract), which the service listens on and the container's
//! `start-kernel` relays its loopback proxy port to. The session's container has no network at all;
//! each connection it makes here is checked against the session's bounds (connections open, bytes
//! moved), then passed to the egress proxy with the session's current allow-list, and its bytes are
//! relayed and counted. The proxy down means the connection is refused: never another way out.
//!
//! The gate knows nothing of HTTP but the one answer it gives itself when it refuses before the proxy
//! sees the connection (a proxy client waits for one).

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::hub::{EgressHub, PROXY_CONNECT};
use super::link::{self, Opening};
use super::session::SessionEgress;

/// The socket's name in the run directory; the container sees `/kernel/egress`.
pub const SOCKET: &str = "egress";
/// The loopback port `start-kernel` listens on inside the container.
pub const PROXY_PORT: u16 = 3128;
/// Each direction's buffer.
const CHUNK: usize = 16 * 1024;
/// Refusals answered at once per session (each reads the request for at most a second first); beyond
/// them a connection is closed without an answer, so a flood costs the service nothing that lasts.
const REFUSING: usize = 16;

/// A boot's gate: listening while it lives.
pub struct Gate {
    _stop: DropGuard,
}

/// The environment that points a session's clients at its proxy port.
pub fn environment(container_dir: &str) -> Vec<String> {
    let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
    let mut env: Vec<String> =
        ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"].iter().map(|k| format!("{k}={proxy}")).collect();
    env.push("NO_PROXY=localhost,127.0.0.1,::1".into());
    env.push("no_proxy=localhost,127.0.0.1,::1".into());
    // Clients that carry their own roots trust the image's system bundle, which holds the operator's extra
    // CA (an intercepting corporate proxy upstream): pip and Deno through these (requests' certifi is the
    // system bundle in the python images; `REQUESTS_CA_BUNDLE` would override a client's own `verify`).
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    for key in ["PIP_CERT", "DENO_CERT"] {
        env.push(format!("{key}={bundle}"));
    }
    env.push(format!("KERNELBOX_EGRESS_SOCKET={container_dir}/{SOCKET}"));
    env.push(format!("KERNELBOX_EGRESS_PORT={PROXY_PORT}"));
    // The JVM reads no proxy variables: its own properties, for HttpClient and URLConnection.
    env.push(format!(
        "JAVA_TOOL_OPTIONS=-Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort={PROXY_PORT} -Dhttps.proxyHost=127.0.0.1 \
         -Dhttps.proxyPort={PROXY_PORT} -Dhttp.nonProxyHosts=localhost|127.0.0.1"
    ));
    env
}

impl Gate {
    /// Binds `dir/egress` (the service's own directory, which the sandbox cannot write; a stale socket
    /// of an earlier boot or run is replaced) and serves it until the gate is dropped or the service stops.
    pub fn open(dir: &Path, session: Arc<SessionEgress>, hub: Arc<EgressHub>) -> io::Result<Gate> {
        let path = dir.join(SOCKET);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&path)?;
        use std::os::unix::fs::PermissionsExt;
        // The container's user connects through the read-only mount.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        let stop = hub.stop.child_token();
        tokio::spawn(serve(listener, session, hub, stop.clone()));
        Ok(Gate { _stop: stop.drop_guard() })
    }
}

async fn serve(listener: UnixListener, session: Arc<SessionEgress>, hub: Arc<EgressHub>, stop: CancellationToken) {
    let refusing = Arc::new(tokio::sync::Semaphore::new(REFUSING));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((mut stream, _)) => {
                // The session's bound is checked before anything is spawned for the connection.
                let conn = hub.next_conn();
                match session.open(conn, hub.config.max_connections) {
                    Some(close) => {
                        let opened = Opened { session: session.clone(), conn, close };
                        tokio::spawn(connection(stream, opened, hub.clone(), stop.child_token()));
                    }
                    None => {
                        hub.refused(&session, "*", 0, "connection_limit");
                        if let Ok(permit) = refusing.clone().try_acquire_owned() {
                            tokio::spawn(async move {
                                refuse(
                                    &mut stream,
                                    429,
                                    "connection_limit",
                                    "too many connections open in this session",
                                )
                                .await;
                                drop(permit);
                            });
                        }
                    }
                }
            }
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(session_id = %session.id(), error = %e, "egress gate: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A connection the session's bound admitted: its slot is given back when it is dropped.
struct Opened {
    session: Arc<SessionEgress>,
    conn: u64,
    close: CancellationToken,
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.session.closed(self.conn);
    }
}

/// One connection of the session's code.
async fn connection(mut client: UnixStream, opened: Opened, hub: Arc<EgressHub>, stop: CancellationToken) {
    let config = &hub.config;
    let (session, conn, close) = (&opened.session, opened.conn, &opened.close);
    if session.total_bytes() >= config.max_bytes {
        hub.refused(session, "*", 0, "byte_limit");
        refuse(&mut client, 403, "byte_limit", "this session moved all the bytes it may").await;
        return;
    }
    let Some(proxy) = hub.proxy() else {
        hub.refused(session, "*", 0, "proxy_down");
        refuse(&mut client, 503, "proxy_down", "the egress proxy is down; try again shortly").await;
        return;
    };
    let upstream = tokio::select! {
        _ = stop.cancelled() => return,
        _ = close.cancelled() => return,
        c = tokio::time::timeout(PROXY_CONNECT, TcpStream::connect(proxy.addr)) => c,
    };
    let mut upstream = match upstream {
        Ok(Ok(s)) => s,
        _ => {
            hub.refused(session, "*", 0, "proxy_down");
            refuse(&mut client, 503, "proxy_down", "the egress proxy does not answer; try again shortly").await;
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    link::bound_buffers(&upstream);
    let opening = Opening::Session { session: session.id().to_owned(), conn, allow: session.allow_list().entries() };
    if upstream.write_all(&link::encode_opening(&proxy.token, &opening)).await.is_err() {
        return;
    }
    let ended = tokio::select! {
        _ = stop.cancelled() => Ended::Closed,
        _ = close.cancelled() => Ended::Closed,
        ended = relay(client, upstream, session, config.max_bytes, config.idle_timeout) => ended,
    };
    if ended == Ended::SessionBytes {
        hub.refused(session, "*", 0, "byte_limit");
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Either side closed, failed, or went quiet past the idle timeout.
    Closed,
    /// The session moved all it may.
    SessionBytes,
}

/// Both ways until both sides closed (a half-close is passed on: the other way may still carry the
/// answer), either fails, nothing moves either way for `idle`, or the session's bytes run out.
async fn relay(
    client: UnixStream,
    upstream: TcpStream,
    session: &SessionEgress,
    max_bytes: u64,
    idle: Duration,
) -> Ended {
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = upstream.into_split();
    let last = std::sync::Mutex::new(tokio::time::Instant::now());
    let both = futures::future::try_join(
        one_way(client_r, up_w, session, max_bytes, &last),
        one_way(up_r, client_w, session, max_bytes, &last),
    );
    let watchdog = async {
        loop {
            let since = *last.lock().unwrap();
            if since.elapsed() >= idle {
                return;
            }
            tokio::time::sleep_until(since + idle).await;
        }
    };
    tokio::select! {
        ended = both => ended.err().unwrap_or(Ended::Closed),
        _ = watchdog => Ended::Closed,
    }
}

/// One direction until EOF (then its write side is shut down) or an error.
async fn one_way<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut from: R,
    mut to: W,
    session: &SessionEgress,
    max_bytes: u64,
    last: &std::sync::Mutex<tokio::time::Instant>,
) -> Result<(), Ended> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = from.read(&mut buf).await.map_err(|_| Ended::Closed)?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        *last.lock().unwrap() = tokio::time::Instant::now();
        if !session.moved(n as u64, max_bytes) {
            return Err(Ended::SessionBytes);
        }
        to.write_all(&buf[..n]).await.map_err(|_| Ended::Closed)?;
    }
}

/// The gate's own refusal, in the proxy's shape (a proxy client reads a status line). The client's request
/// is read first (what arrives within a second, up to 8 KiB): a peer that closes with the request unread
/// may lose the answer on its way.
async fn refuse(client: &mut UnixStream, status: u16, reason: &str, message: &str) {
    let mut head = [0u8; 8192];
    let mut read = 0;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while read < head.len() {
            match client.read(&mut head[read..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
            if head[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    let text = match status {
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Forbidden",
    };
    let body = format!("kernelbox egress: refused ({reason}): {message}\n");
    let response = format!(
        "HTTP/1.1 {status} {text}\r\nX-Kernelbox-Blocked: {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), client.write_all(response.as_bytes())).await;
}
