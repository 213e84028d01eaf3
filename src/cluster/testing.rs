//! Test fixtures for the cluster link: one set of certificates per test binary, an agent serving a router
//! over mutual TLS on a loopback port, an API replica's link to it, and a replica that forwards every
//! request to it.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::certs::{ClusterCerts, DEFAULT_AGENT_NAME, Pair};
use super::forward::forward;
use super::link::AgentLink;
use super::listener::serve_mtls;
use super::tls::{agent_server_config_from_pem, api_client_config_from_pem};
use crate::session::Owner;

/// The owner the test replica forwards requests as.
pub const OWNER: &str = "0123456789abcdef";

pub fn certs() -> &'static ClusterCerts {
    static CERTS: OnceLock<ClusterCerts> = OnceLock::new();
    CERTS.get_or_init(|| ClusterCerts::generate(DEFAULT_AGENT_NAME, 2).unwrap())
}

pub fn agent_tls() -> Arc<ServerConfig> {
    let c = certs();
    agent_server_config_from_pem(c.ca.cert_pem.as_bytes(), c.agent.cert_pem.as_bytes(), c.agent.key_pem.as_bytes())
        .unwrap()
}

/// A link that trusts the cluster CA and presents `client`.
pub fn link_as(client: &Pair) -> AgentLink {
    let c = certs();
    let tls =
        api_client_config_from_pem(c.ca.cert_pem.as_bytes(), client.cert_pem.as_bytes(), client.key_pem.as_bytes())
            .unwrap();
    AgentLink::new(tls, DEFAULT_AGENT_NAME).unwrap().with_timeouts(Duration::from_secs(3), Duration::from_secs(3))
}

/// An API replica's link.
pub fn link() -> AgentLink {
    link_as(&certs().api)
}

/// A server on a loopback port that stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: CancellationToken,
    pub done: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An agent serving `router` over mutual TLS.
pub async fn spawn_agent(router: Router) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let done = tokio::spawn(serve_mtls(listener, router, agent_tls(), stop.clone(), Duration::from_secs(5)));
    Server { addr, stop, done }
}

/// An API replica (plain HTTP, as `kernelbox serve` serves) forwarding every request to `agent` as
/// [`OWNER`]; a link error becomes a 502 naming it.
pub async fn spawn_replica(agent: SocketAddr) -> Server {
    let link = link();
    let router = Router::new().fallback(move |req: Request<Body>| {
        let link = link.clone();
        async move {
            match forward(&link, agent, req, Some(&Owner(OWNER.into()))).await {
                Ok(response) => response,
                Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
            }
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let done = tokio::spawn(crate::api::serve::serve(listener, router, Duration::from_secs(5), stop.clone()));
    Server { addr, stop, done }
}

/// The body of a response, whole (tests only).
pub async fn text(response: Response) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}
