//! An agent's cluster listener: the public router served over mutual TLS only.
//!
//! Each accepted socket does its TLS handshake in a task of its own within [`HANDSHAKE_TIMEOUT`], so a
//! slow or silent client never holds up the accept loop; at most [`MAX_HANDSHAKES`] handshakes run at
//! once (further sockets wait in the kernel's backlog). A peer without a certificate of the API role
//! signed by the cluster CA (see `tls.rs`), or one that speaks plain HTTP, fails the handshake and has its
//! connection closed: it never reaches HTTP. A verified connection is then served exactly as
//! `api::serve` serves a plain one (HTTP/1.1, header read timeout, upgrades, graceful stop), and each of
//! its requests carries the verified [`ClusterPeer`], which the agent's trust in the owner header
//! requires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::tls::PeerRole;
use crate::api::serve::{accept_failed, http1, serve_connection, set_nodelay};

/// How long a peer may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many handshakes may be under way at once.
pub const MAX_HANDSHAKES: usize = 128;

/// The verified peer of a request on the cluster listener: in the request's extensions of every request
/// served by [`serve_mtls`], never in any other (a plain listener's requests have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterPeer {
    /// The role its certificate names (the listener admits only [`PeerRole::Api`]).
    pub role: PeerRole,
    /// Its address, for logs.
    pub addr: SocketAddr,
}

/// Serves `router` on `listener` over mutual TLS (see the module doc) until `shutdown` is cancelled;
/// then stops accepting, drops handshakes under way, lets each connection finish the response it is
/// working on, and returns once every connection is closed.
pub async fn serve_mtls(
    listener: TcpListener,
    router: Router,
    tls: Arc<ServerConfig>,
    shutdown: CancellationToken,
    header_read_timeout: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let http = http1(header_read_timeout);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    // Owns the handshake and connection tasks, so that they end with this future.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = handshakes.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        set_nodelay(&stream);
        let (acceptor, http, router, stop) = (acceptor.clone(), http.clone(), router.clone(), shutdown.clone());
        connections.spawn(async move {
            let verified = tokio::select! {
                _ = stop.cancelled() => return,
                verified = handshake(&acceptor, stream, remote) => verified,
            };
            drop(permit);
            if let Some((stream, peer)) = verified {
                serve_connection(
                    http,
                    stream,
                    router,
                    remote,
                    move |ext| {
                        ext.insert(peer);
                    },
                    stop,
                )
                .await;
            }
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// The TLS handshake of one socket, and who is on the other end; `None` (the socket closed) when the
/// handshake fails or takes too long.
async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    remote: SocketAddr,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, ClusterPeer)> {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            // Someone on the internal network without the API certificate, or plain HTTP.
            tracing::info!(%remote, error = %e, "refused a cluster connection: TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::info!(%remote, "refused a cluster connection: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
            return None;
        }
    };
    // The verifier admitted the certificate only with the API role; read it back rather than assume it.
    let role = stream.get_ref().1.peer_certificates().and_then(|certs| certs.first()).and_then(PeerRole::of);
    let Some(role) = role else {
        tracing::warn!(%remote, "a verified cluster peer without a role; closing");
        return None;
    };
    Some((stream, ClusterPeer { role, addr: remote }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Extension;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::cluster::certs::{ClusterCerts, DEFAULT_AGENT_NAME};
    use crate::cluster::link::{AgentLink, LinkError};
    use crate::cluster::testing::{self, certs, link, link_as, spawn_agent, text};

    /// An agent whose router counts the requests that reached it and says who asked.
    async fn counting_agent() -> (testing::Server, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let router = Router::new().route(
            "/who",
            get(move |Extension(peer): Extension<ClusterPeer>| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move { format!("{:?}", peer.role) }
            }),
        );
        (spawn_agent(router).await, hits)
    }

    fn who() -> Request<Body> {
        Request::get("/who").body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn serves_the_router_to_an_api_replica_and_names_its_role() {
        let (agent, hits) = counting_agent().await;
        let response = link().send(agent.addr, who()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response).await, "Api");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn plain_http_gets_no_http_and_a_closed_connection() {
        let (agent, hits) = counting_agent().await;
        let mut tcp = TcpStream::connect(agent.addr).await.unwrap();
        tcp.write_all(b"GET /who HTTP/1.1\r\nHost: kernelbox-agent\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the agent must close the connection, not wait");
        assert!(!answer.starts_with(b"HTTP"), "{:?}", String::from_utf8_lossy(&answer));
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn refuses_clients_without_the_api_certificate() {
        let (agent, hits) = counting_agent().await;
        let c = certs();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(c.ca.cert_pem.as_bytes()).unwrap()).unwrap();
        let no_certificate = rustls::ClientConfig::builder_with_provider(crate::cluster::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let no_certificate = AgentLink::new(Arc::new(no_certificate), DEFAULT_AGENT_NAME).unwrap();
        let other_ca = ClusterCerts::generate(DEFAULT_AGENT_NAME, 2).unwrap();
        for (what, link) in [
            ("no certificate", no_certificate),
            ("another CA's API certificate", link_as(&other_ca.api)),
            ("the agent's certificate (wrong role)", link_as(&c.agent)),
        ] {
            let err = link.send(agent.addr, who()).await.unwrap_err();
            assert!(matches!(err, LinkError::Handshake { .. }), "{what}: {err}");
            assert!(err.is_unreachable(), "{what}");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0, "no request reached the router");
    }

    #[tokio::test]
    async fn a_replica_refuses_an_agent_with_another_name_or_ca() {
        let (agent, hits) = counting_agent().await;
        let c = certs();
        let tls = crate::cluster::tls::api_client_config_from_pem(
            c.ca.cert_pem.as_bytes(),
            c.api.cert_pem.as_bytes(),
            c.api.key_pem.as_bytes(),
        )
        .unwrap();
        let wrong_name = AgentLink::new(tls, "someone-else").unwrap();
        let err = wrong_name.send(agent.addr, who()).await.unwrap_err();
        assert!(matches!(err, LinkError::Handshake { .. }), "{err}");

        let other = ClusterCerts::generate(DEFAULT_AGENT_NAME, 2).unwrap();
        let trusts_other_ca = crate::cluster::tls::api_client_config_from_pem(
            other.ca.cert_pem.as_bytes(),
            other.api.cert_pem.as_bytes(),
            other.api.key_pem.as_bytes(),
        )
        .unwrap();
        let err =
            AgentLink::new(trusts_other_ca, DEFAULT_AGENT_NAME).unwrap().send(agent.addr, who()).await.unwrap_err();
        assert!(matches!(err, LinkError::Handshake { .. }), "{err}");
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_up_the_others() {
        let (agent, _) = counting_agent().await;
        let _silent = TcpStream::connect(agent.addr).await.unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(2), link().send(agent.addr, who())).await;
        assert_eq!(answered.expect("served while a handshake hangs").unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn stops_on_shutdown_even_with_a_handshake_pending() {
        let (mut agent, _) = counting_agent().await;
        let _silent = TcpStream::connect(agent.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        agent.stop();
        tokio::time::timeout(Duration::from_secs(2), &mut agent.done).await.expect("stopped").unwrap();
    }
}
