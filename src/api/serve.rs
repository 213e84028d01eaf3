//! The HTTP server loop, in place of `axum::serve`, which has no header read timeout: a client that sends
//! its headers one byte at a time (slow loris) would hold a connection, and a task, forever.
//!
//! HTTP/1.1 only, through hyper's connection builder: its header read timeout covers the request line and
//! headers and also closes keep-alive connections that stay idle that long. (HTTP/2 is left out: hyper
//! has no header timeout for it, and its protocol sniffing waits for a preface with no deadline at all; a
//! proxy in front can speak HTTP/2 to clients.) Request bodies have their own deadline, in [`super::body`].
//! Each accepted socket gets TCP_NODELAY (small JSON answers and SSE events go out at once) and the
//! client's address as [`ConnectInfo`], for the rate limit when no API keys are configured.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Extensions;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Serves `router` on `listener` until `stop` is cancelled; then stops accepting, closes idle
/// connections, lets each busy one finish the response it is working on, and returns once every
/// connection is closed. Dropping (aborting) the future closes every connection at once.
pub async fn serve(listener: TcpListener, router: Router, header_read_timeout: Duration, stop: CancellationToken) {
    let http = http1(header_read_timeout);
    // Owns the connection tasks, so that they end with this future.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        set_nodelay(&stream);
        connections.spawn(serve_connection(http.clone(), stream, router.clone(), remote, |_| {}, stop.clone()));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// The HTTP/1.1 connection settings: the header read timeout (which also closes idle keep-alive
/// connections), keep-alive.
pub(crate) fn http1(header_read_timeout: Duration) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(true);
    http
}

/// Small JSON answers and SSE events go out at once.
pub(crate) fn set_nodelay(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
}

/// Serves `router` on one accepted connection (plain TCP, or TLS in `cluster::listener`) until it closes;
/// once `stop` is cancelled, finishes the response under way and closes. Every request carries the
/// client's address as [`ConnectInfo`] and whatever `mark` puts in its extensions.
pub(crate) async fn serve_connection<I>(
    http: http1::Builder,
    io: I,
    router: Router,
    remote: SocketAddr,
    mark: impl Fn(&mut Extensions) + Clone + Send + Sync + 'static,
    stop: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(remote));
        mark(req.extensions_mut());
        router.clone().oneshot(req)
    });
    // Upgrades: the gateway's kernel WebSocket. An upgraded connection leaves hyper (and the graceful
    // shutdown below); it ends when its kernel's session does.
    let connection = http.serve_connection(TokioIo::new(io), service).with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = stop.cancelled() => {
            // Finish the response under way, then close.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        // Header timeouts, clients that hang up, malformed requests: the client's problem.
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}

/// Like axum's: a connection that died before we accepted it is nothing; anything else (out of file
/// descriptors) is worth a log line and a pause, not a busy loop.
pub(crate) async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
