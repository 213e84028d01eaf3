//! The HTTP server loop, in place of `axum::serve`, which has no header read timeout: a client that sends
//! its headers one byte at a time (slow loris) would hold a connection, and a task, forever.
//!
//! HTTP/1.1 only, through hyper's connection builder: its header read timeout covers the request line and
//! headers and also closes keep-alive connections that stay idle that long. (HTTP/2 is left out: hyper
//! has no header timeout for it, and its protocol sniffing waits for a preface with no deadline at all; a
//! proxy in front can speak HTTP/2 to clients.) Request bodies have their own deadline, in [`super::body`].
//! Each accepted socket gets TCP_NODELAY (small JSON answers and SSE events go out at once) and the
//! client's address as [`ConnectInfo`], for the rate limit when no API keys are configured.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Serves `router` on `listener` until `stop` is cancelled; then stops accepting, closes idle
/// connections, lets each busy one finish the response it is working on, and returns once every
/// connection is closed. Dropping (aborting) the future closes every connection at once.
pub async fn serve(listener: TcpListener, router: Router, header_read_timeout: Duration, stop: CancellationToken) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(true);
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
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let router = router.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(remote));
            router.clone().oneshot(req)
        });
        // Upgrades: the gateway's kernel WebSocket. An upgraded connection leaves hyper (and the graceful
        // shutdown below); it ends when its kernel's session does.
        let connection = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
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
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Like axum's: a connection that died before we accepted it is nothing; anything else (out of file
/// descriptors) is worth a log line and a pause, not a busy loop.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
