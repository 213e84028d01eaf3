//! The egress proxy (`kernelbox egress-proxy`, issue 22): the only process that reaches the outside for
//! sessions, in its own hardened container. The service accepts a session's connection, opens a link
//! connection here, writes an opening line (`link`: the session, the connection, its allow-list) and
//! relays the client's bytes; the proxy speaks the HTTP proxy protocol with the client (`CONNECT` for TLS,
//! absolute-form plain HTTP), reaches names on the list (never addresses but the operator's ranges), and
//! reports each decision on the events stream. Everything a client sends is attacker input: every read,
//! buffer and wait is bounded.
//!
//! The modules: `config` (flags → [`ProxyConfig`]), `listener` (accepting, the opening line, the
//! connection limit), `request` (one session connection: its head read and handed on), `conn` (what
//! `tunnel` and `forward` share: the checks, the connect, refusals, events), `head` (request
//! heads), `check` (may the session reach that host), `resolve` (names → checked addresses → a socket),
//! `tunnel` (`CONNECT` and the ClientHello's name), `forward` (plain HTTP), `relay` (the bytes, with the
//! idle timeout and the byte cap), `events` (the events stream). It must not know the service's state:
//! the opening line is all it learns of a session.

mod check;
pub mod config;
mod conn;
mod events;
mod forward;
mod head;
mod listener;
mod relay;
mod request;
mod resolve;
mod tunnel;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

pub use config::{ConfigError, ProxyArgs, ProxyConfig, Token};
use events::EventsHub;
use resolve::Resolver;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("could not listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// What every connection's task shares.
struct Shared {
    config: ProxyConfig,
    resolver: Resolver,
    /// The events stream's sending side.
    events: EventsHub,
    /// Link connections open at once (`--max-connections`).
    permits: Arc<Semaphore>,
    /// Every connection's task, and the events writer.
    tracker: TaskTracker,
    /// Cancelled when the proxy is dropped: every task ends.
    stop: CancellationToken,
}

/// A bound proxy, not yet serving. Dropping it (or [`Proxy::serve`]'s future) ends every connection.
pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
    _stop: DropGuard,
}

impl Proxy {
    /// Binds `config.listen` and starts the events writer.
    pub async fn bind(config: ProxyConfig) -> Result<Proxy, ProxyError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ProxyError::Bind { addr: config.listen, source })?;
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let events = EventsHub::start(&tracker, stop.clone());
        let resolver = Resolver::new(config.test_names.clone(), config.opened.clone(), config.connect_timeout);
        let permits = Arc::new(Semaphore::new(config.max_connections));
        let shared = Arc::new(Shared { config, resolver, events, permits, tracker, stop: stop.clone() });
        Ok(Proxy { listener, shared, _stop: stop.drop_guard() })
    }

    /// Where it listens (the port chosen, when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the future is dropped.
    pub async fn serve(self) {
        let Proxy { listener, shared, _stop } = self;
        listener::serve(listener, shared).await;
    }
}

/// Binds, logs where, and serves until the future is dropped (`main` selects it against the signals).
pub async fn run(config: ProxyConfig) -> anyhow::Result<()> {
    let proxy = Proxy::bind(config).await?;
    let addr = proxy.local_addr()?;
    tracing::info!(%addr, "egress proxy listening on {addr}");
    proxy.serve().await;
    Ok(())
}
