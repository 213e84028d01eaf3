//! The one thing the routing tier needs of the link to an agent: send it a request, get its response
//! (streamed). The product's implementation is the mutually authenticated TLS link (`cluster::link`);
//! tests use a fake, or plain HTTP ([`PlainHttp`], compiled only for tests and the `test-support`
//! feature: the binary never speaks plain HTTP to an agent).

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::{Request, Response};

use super::link::{AgentLink, LinkError};
use crate::session::Owner;

/// Why an agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No connection (refused, unreachable, TLS handshake refused): the agent is away.
    #[error("could not reach the agent at {addr}: {why}")]
    Connect { addr: SocketAddr, why: String },
    /// The agent answered something that is not HTTP, or broke off mid-answer.
    #[error("the agent at {addr} answered garbage: {why}")]
    Protocol { addr: SocketAddr, why: String },
    /// No answer in time.
    #[error("the agent at {addr} did not answer in time")]
    Timeout { addr: SocketAddr },
}

/// A link to the agents.
#[async_trait::async_trait]
pub trait AgentTransport: Send + Sync + 'static {
    /// Sends `req` (its URI is a path and query; the implementation adds scheme and authority) to the
    /// agent at `addr`; the response body streams.
    async fn send(&self, addr: SocketAddr, req: Request<Body>) -> Result<Response<Body>, TransportError>;

    /// Forwards a client's request as it is (see [`prepare_forward`]), for `owner` (`None`: a signed link
    /// the agent checks itself). The mTLS link overrides this to bridge WebSocket upgrades both ways.
    async fn forward(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        owner: Option<&Owner>,
    ) -> Result<Response<Body>, TransportError> {
        self.send(addr, prepare_forward(req, owner)).await
    }
}

/// `req` as an agent gets it (see [`super::forward::prepare`]), without the client's side of an upgrade:
/// what a transport that bridges no upgrades sends.
pub fn prepare_forward(req: Request<Body>, owner: Option<&Owner>) -> Request<Body> {
    super::forward::prepare(req, owner).0
}

/// The product's transport: the mutually authenticated link, which bridges WebSocket upgrades too.
#[async_trait::async_trait]
impl AgentTransport for AgentLink {
    async fn send(&self, addr: SocketAddr, req: Request<Body>) -> Result<Response<Body>, TransportError> {
        AgentLink::send(self, addr, req).await.map_err(|e| TransportError::from_link(addr, e))
    }

    async fn forward(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        owner: Option<&Owner>,
    ) -> Result<Response<Body>, TransportError> {
        super::forward::forward(self, addr, req, owner).await.map_err(|e| TransportError::from_link(addr, e))
    }
}

impl TransportError {
    /// A link's error as routing sees it: not reached (503), too slow, or garbage (502).
    pub fn from_link(addr: SocketAddr, e: LinkError) -> Self {
        match e {
            LinkError::Timeout { addr, .. } => TransportError::Timeout { addr },
            e if e.is_unreachable() => TransportError::Connect { addr, why: e.to_string() },
            e => TransportError::Protocol { addr, why: e.to_string() },
        }
    }
}

#[cfg(any(test, feature = "test-support"))]
pub use plain::PlainHttp;

/// Plain HTTP/1.1 to an agent, for tests only (real single-node services stand in for agents).
#[cfg(any(test, feature = "test-support"))]
mod plain {
    use super::*;
    use axum::http::{HeaderValue, header};
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;

    /// One connection per request: simple, and enough for tests.
    #[derive(Debug, Default, Clone)]
    pub struct PlainHttp;

    #[async_trait::async_trait]
    impl AgentTransport for PlainHttp {
        async fn send(&self, addr: SocketAddr, req: Request<Body>) -> Result<Response<Body>, TransportError> {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| TransportError::Connect { addr, why: e.to_string() })?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| TransportError::Connect { addr, why: e.to_string() })?;
            tokio::spawn(async move {
                let _ = connection.with_upgrades().await;
            });
            let mut req = req;
            if !req.headers().contains_key(header::HOST)
                && let Ok(host) = HeaderValue::from_str(&addr.to_string())
            {
                req.headers_mut().insert(header::HOST, host);
            }
            let response =
                sender.send_request(req).await.map_err(|e| TransportError::Protocol { addr, why: e.to_string() })?;
            Ok(response.map(|body| Body::new(body.map_err(axum::Error::new))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::OWNER_HEADER;

    #[test]
    fn a_forwarded_request_loses_the_clients_key_and_owner_claim_and_gains_the_checked_owner() {
        let req = Request::builder()
            .uri("/v1/sessions?x=1")
            .header("authorization", "Bearer secret")
            .header("x-api-key", "secret")
            .header(OWNER_HEADER, "forged")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("host", "api.example")
            .header("accept", "text/event-stream")
            .body(Body::empty())
            .unwrap();
        let out = prepare_forward(req, Some(&Owner("abcd".into())));
        let h = out.headers();
        assert!(h.get("authorization").is_none() && h.get("x-api-key").is_none() && h.get("x-hop").is_none());
        assert_eq!(h[OWNER_HEADER], "abcd");
        assert_eq!(h["host"], "api.example", "handlers build URLs from Host");
        assert_eq!(h["accept"], "text/event-stream");
        assert_eq!(out.uri(), "/v1/sessions?x=1");
    }

    #[test]
    fn a_link_request_carries_no_owner_and_an_upgrade_keeps_its_pair() {
        let req = Request::builder()
            .uri("/api/kernels/x/channels")
            .header(OWNER_HEADER, "forged")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(Body::empty())
            .unwrap();
        let out = prepare_forward(req, None);
        assert!(out.headers().get(OWNER_HEADER).is_none());
        assert_eq!(out.headers()["upgrade"], "websocket");
        assert_eq!(out.headers()["connection"], "upgrade");
    }
}
