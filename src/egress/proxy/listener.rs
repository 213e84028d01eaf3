//! Accepting link connections: the connection limit (beyond it, closed at once), the opening line (within
//! the head timeout, with the service's token: anything else is closed without a word), then the events
//! stream or a session connection. Each connection is a tracked task that ends when the proxy stops.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;

use super::Shared;
use super::conn::Link;
use super::request;
use crate::egress::allow::AllowList;
use crate::egress::link::{self, Opening};

/// The longest session id an opening may carry (the service's ids are far shorter; events stay small).
const MAX_SESSION_ID: usize = 256;
/// How long to wait after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts until the future is dropped.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "the egress proxy could not accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "egress proxy at its connection limit: a connection is closed");
            continue;
        };
        let task = shared.clone();
        shared.tracker.spawn(async move {
            tokio::select! {
                _ = task.stop.cancelled() => {}
                () = link_connection(stream, permit, &task) => {}
            }
        });
    }
}

/// One link connection, from its opening line on.
async fn link_connection(mut stream: TcpStream, permit: OwnedSemaphorePermit, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    link::bound_buffers(&stream);
    let token = shared.config.token.expose();
    let read = tokio::time::timeout(shared.config.head_timeout, link::read_opening(&mut stream, token)).await;
    let (opening, first) = match read {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => return tracing::debug!(error = %e, "egress link connection refused"),
        Err(_) => return tracing::debug!("egress link connection refused: no opening line in time"),
    };
    match opening {
        Opening::Events => {
            // The one subscriber holds no permit: a busy proxy still reports.
            drop(permit);
            shared.events.subscribe(stream).await;
        }
        Opening::Session { session, .. } if session.len() > MAX_SESSION_ID => {
            tracing::debug!("egress link connection refused: an over-long session id");
        }
        Opening::Session { session, conn, allow } => {
            let list = AllowList::parse(&allow, &shared.config.policy).unwrap_or_else(|e| {
                tracing::warn!(%session, error = %e, "a session's allow-list is refused here: it reaches nothing");
                AllowList::default()
            });
            request::serve(stream, first, Link { session, conn, list, shared }).await;
            drop(permit);
        }
    }
}
