//! [`AgentLink`]: an API replica's HTTP/1.1 client to agents, over the cluster's mutual TLS (`tls.rs`).
//!
//! One connection per request (no idle pool yet; TLS 1.3 session resumption keeps the handshake short),
//! with bounded waits for the TCP connect and the TLS handshake. What the agent answers comes back as it
//! comes: the body is streamed, never buffered (except by [`AgentLink::get_json`], bounded), and a
//! `101 Switching Protocols` response keeps its upgrade (`hyper::upgrade::on`) reachable.
//!
//! [`LinkError`] tells a caller which answer to make: the agent could not be reached
//! ([`LinkError::is_unreachable`]: 503 `node_unreachable`) or it answered something that is not HTTP
//! (502 `agent_protocol_error`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::{InvalidDnsNameError, ServerName};
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::node::OWNER_HEADER;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most a [`AgentLink::get_json`] answer may weigh.
pub const MAX_JSON_BYTES: usize = 1 << 20;
/// The default wait for a TCP connection to an agent: long enough for one retransmitted SYN (Linux sends
/// the second after 1 s), short enough that a request to a node that just died answers 503
/// `node_unreachable` within 2 s (every request opens its connection; a dead host sends no reset).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// The default wait for the TLS handshake with an agent.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No TCP connection (refused, no route, or not within the connect timeout).
    #[error("could not connect to the agent at {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    /// TCP, but no mutually authenticated TLS (the agent refused our certificate or we refused its, or it
    /// took too long).
    #[error("the TLS handshake with the agent at {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: std::io::Error },
    /// A [`AgentLink::get_json`] answer did not come within its time.
    #[error("the agent at {addr} did not answer within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    /// The agent's answer is not HTTP, breaks off, is too large or is not the JSON expected.
    #[error("the agent at {addr} answered something unusable: {source}")]
    Protocol { addr: SocketAddr, source: BoxError },
    /// A [`AgentLink::get_json`] answer that is not a success.
    #[error("the agent at {addr} answered {status}")]
    Status { addr: SocketAddr, status: StatusCode },
    /// The request could not be sent as given (a bug of the caller's, not the agent's).
    #[error("the request to the agent could not be made: {0}")]
    Request(String),
}

impl LinkError {
    /// The agent was not reached (or not in time): the caller answers 503 `node_unreachable`.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, LinkError::Connect { .. } | LinkError::Handshake { .. } | LinkError::Timeout { .. })
    }
}

/// An API replica's client to agents. Cheap to clone (clones share their connections' tasks).
#[derive(Clone)]
pub struct AgentLink {
    connector: TlsConnector,
    /// The name the agents' certificate must carry (`--agent-server-name`); also the `Host` of requests
    /// that have none.
    server_name: ServerName<'static>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    /// The connections' drivers and the bridges of upgraded connections, so that [`AgentLink::close`]
    /// can end them all.
    tasks: TaskTracker,
    /// Cancelled by [`AgentLink::close`].
    closing: CancellationToken,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl AgentLink {
    /// A link with `tls` (from `tls::api_client_config`) to agents whose certificate names `server_name`.
    pub fn new(tls: Arc<ClientConfig>, server_name: &str) -> Result<Self, InvalidDnsNameError> {
        Ok(AgentLink {
            connector: TlsConnector::from(tls),
            server_name: ServerName::try_from(server_name.to_string())?,
            connect_timeout: CONNECT_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            tasks: TaskTracker::new(),
            closing: CancellationToken::new(),
        })
    }

    /// Ends every connection this link (and its clones) opened, upgraded ones included, and waits until
    /// they are closed. Calls made after it fail.
    pub async fn close(&self) {
        self.closing.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Runs `task` (a connection's life) until it ends or the link closes.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let closing = self.closing.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = task => {}
                () = closing.cancelled() => {}
            }
        });
    }

    /// The same link with other connect and handshake timeouts.
    pub fn with_timeouts(mut self, connect: Duration, handshake: Duration) -> Self {
        self.connect_timeout = connect;
        self.handshake_timeout = handshake;
        self
    }

    /// Sends `req` to the agent at `addr` as it is (its URI reduced to path and query; a `Host` added if
    /// it has none) and returns the agent's response as soon as its head arrives, the body streaming
    /// behind. A 101 response keeps its upgrade in its extensions.
    pub async fn send(&self, addr: SocketAddr, mut req: Request<Body>) -> Result<Response<Body>, LinkError> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = Uri::try_from(path).map_err(|e| LinkError::Request(e.to_string()))?;
        *req.version_mut() = axum::http::Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            let host = HeaderValue::try_from(self.host()).map_err(|e| LinkError::Request(e.to_string()))?;
            req.headers_mut().insert(header::HOST, host);
        }
        let mut sender = self.connect(addr).await?;
        let response = sender.send_request(req).await.map_err(|e| classify(addr, e))?;
        Ok(response.map(Body::new))
    }

    /// GETs `path` from the agent at `addr` (as `owner`, when given) and reads its JSON answer, at most
    /// [`MAX_JSON_BYTES`], all within `timeout`: for probes and fan-outs.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        path: &str,
        owner: Option<&str>,
        timeout: Duration,
    ) -> Result<T, LinkError> {
        let mut req = Request::get(path).header(header::ACCEPT, "application/json");
        if let Some(owner) = owner {
            req = req.header(OWNER_HEADER, owner);
        }
        let req = req.body(Body::empty()).map_err(|e| LinkError::Request(e.to_string()))?;
        let call = async {
            let response = self.send(addr, req).await?;
            if !response.status().is_success() {
                return Err(LinkError::Status { addr, status: response.status() });
            }
            let bytes = axum::body::to_bytes(response.into_body(), MAX_JSON_BYTES)
                .await
                .map_err(|e| LinkError::Protocol { addr, source: e.into() })?;
            serde_json::from_slice(&bytes).map_err(|e| LinkError::Protocol { addr, source: e.into() })
        };
        tokio::time::timeout(timeout, call).await.map_err(|_| LinkError::Timeout { addr, after: timeout })?
    }

    fn host(&self) -> String {
        match &self.server_name {
            ServerName::DnsName(name) => name.as_ref().to_string(),
            other => other.to_str().into_owned(),
        }
    }

    /// A fresh HTTP/1.1 connection to `addr` over mutual TLS, its driver spawned (it ends when the
    /// response is read or dropped, or when an upgraded connection closes).
    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<Body>, LinkError> {
        if self.closing.is_cancelled() {
            return Err(LinkError::Connect { addr, source: std::io::Error::other("the link is closed") });
        }
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => return Err(LinkError::Connect { addr, source }),
            Err(_) => return Err(LinkError::Connect { addr, source: timed_out(self.connect_timeout) }),
        };
        let _ = tcp.set_nodelay(true);
        let tls =
            match tokio::time::timeout(self.handshake_timeout, self.connector.connect(self.server_name.clone(), tcp))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(source)) => return Err(LinkError::Handshake { addr, source }),
                Err(_) => return Err(LinkError::Handshake { addr, source: timed_out(self.handshake_timeout) }),
            };
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| classify(addr, e))?;
        self.spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "agent connection ended with an error");
            }
        });
        Ok(sender)
    }
}

fn timed_out(after: Duration) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no progress within {after:?}"))
}

/// A failed exchange: a TLS alert behind it means the handshake failed after all (with TLS 1.3 the
/// server judges the client's certificate after the client thinks the handshake is done, so its refusal
/// arrives with the first read); anything else is the agent's protocol error.
fn classify(addr: SocketAddr, e: hyper::Error) -> LinkError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return LinkError::Handshake { addr, source: std::io::Error::new(io.kind(), io.to_string()) };
        }
        source = error.source();
    }
    LinkError::Protocol { addr, source: e.into() }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::Router;
    use axum::routing::get;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::cluster::testing::{OWNER, agent_tls, link, spawn_agent};

    fn request(path: &str) -> Request<Body> {
        Request::get(path).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn a_closed_port_is_a_prompt_connect_error() {
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let started = Instant::now();
        let err = link().send(addr, request("/")).await.unwrap_err();
        assert!(matches!(err, LinkError::Connect { .. }), "{err}");
        assert!(err.is_unreachable());
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_silent_peer_is_a_handshake_error_within_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let link = link().with_timeouts(Duration::from_secs(1), Duration::from_millis(300));
        let err = link.send(addr, request("/")).await.unwrap_err();
        assert!(matches!(err, LinkError::Handshake { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        drop(listener);
    }

    /// An agent that completes the TLS handshake and then writes `answer` whatever it is asked.
    async fn scripted_agent(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(agent_tls());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut tls = acceptor.accept(tcp).await.unwrap();
                    tls.write_all(answer).await.unwrap();
                    tls.shutdown().await.unwrap();
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn garbage_from_the_agent_is_a_protocol_error() {
        let addr = scripted_agent(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        let err = link().send(addr, request("/")).await.unwrap_err();
        assert!(matches!(err, LinkError::Protocol { .. }), "{err}");
        assert!(!err.is_unreachable());
    }

    #[tokio::test]
    async fn get_json_reads_a_bounded_answer_within_its_time() {
        let router = Router::new()
            .route(
                "/info",
                get(|headers: axum::http::HeaderMap| async move {
                    axum::Json(serde_json::json!({"owner": headers.get(OWNER_HEADER).and_then(|v| v.to_str().ok())}))
                }),
            )
            .route("/huge", get(|| async { vec![b' '; MAX_JSON_BYTES + 1] }))
            .route("/slow", get(|| async { tokio::time::sleep(Duration::from_secs(5)).await }))
            .route("/teapot", get(|| async { StatusCode::IM_A_TEAPOT }));
        let agent = spawn_agent(router).await;
        let link = link();
        let second = Duration::from_secs(1);
        let info: serde_json::Value = link.get_json(agent.addr, "/info", Some(OWNER), second).await.unwrap();
        assert_eq!(info["owner"], OWNER);
        let info: serde_json::Value = link.get_json(agent.addr, "/info", None, second).await.unwrap();
        assert_eq!(info["owner"], serde_json::Value::Null);
        let err = link.get_json::<serde_json::Value>(agent.addr, "/huge", None, second).await.unwrap_err();
        assert!(matches!(err, LinkError::Protocol { .. }), "{err}");
        let err = link
            .get_json::<serde_json::Value>(agent.addr, "/slow", None, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, LinkError::Timeout { .. }) && err.is_unreachable(), "{err}");
        let err = link.get_json::<serde_json::Value>(agent.addr, "/teapot", None, second).await.unwrap_err();
        assert!(matches!(err, LinkError::Status { status: StatusCode::IM_A_TEAPOT, .. }), "{err}");
    }
}
