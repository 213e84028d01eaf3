//! The service's side of the egress proxy: where the proxy is right now (or that it is down: then every
//! connection is refused, never let through another way), the sessions' networks by id, and the events
//! stream the proxy reports its decisions on, which it files under each session (its report, its
//! streaming client, `/metrics`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::allow::{AllowList, NetworkPolicy};
use super::link::{self, MAX_EVENT_LINE, Opening, Outcome};
use super::session::SessionEgress;
use super::settings::EgressConfig;

/// How long to wait for the proxy to answer a connect.
pub(super) const PROXY_CONNECT: Duration = Duration::from_secs(5);

/// Where the running proxy listens, and the secret it takes from the service alone.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyAddr {
    pub addr: SocketAddr,
    pub token: Arc<str>,
}

impl std::fmt::Debug for ProxyAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyAddr").field("addr", &self.addr).field("token", &"<secret>").finish()
    }
}

/// The sessions' networks and the proxy's state.
pub struct EgressHub {
    pub config: EgressConfig,
    sessions: Mutex<HashMap<String, Arc<SessionEgress>>>,
    proxy: watch::Sender<Option<ProxyAddr>>,
    /// The events stream is connected (the proxy is up and reporting).
    reporting: AtomicBool,
    next_conn: AtomicU64,
    /// Cancelled when the service stops: every gate and connection ends.
    pub(super) stop: CancellationToken,
}

impl EgressHub {
    pub fn new(config: EgressConfig) -> Arc<EgressHub> {
        Arc::new(EgressHub {
            config,
            sessions: Mutex::default(),
            proxy: watch::channel(None).0,
            reporting: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            stop: CancellationToken::new(),
        })
    }

    pub fn policy(&self) -> &NetworkPolicy {
        &self.config.policy
    }

    /// A session's network, made (with `allow`) if it has none yet.
    pub fn session(&self, id: &str, allow: impl FnOnce() -> AllowList) -> Arc<SessionEgress> {
        let mut sessions = self.sessions.lock().unwrap();
        sessions.entry(id.to_owned()).or_insert_with(|| Arc::new(SessionEgress::new(id, allow()))).clone()
    }

    /// A session's network, if it has one.
    pub fn get(&self, id: &str) -> Option<Arc<SessionEgress>> {
        self.sessions.lock().unwrap().get(id).cloned()
    }

    /// The session is gone: its connections close.
    pub fn forget(&self, id: &str) {
        if let Some(session) = self.sessions.lock().unwrap().remove(id) {
            session.close_all();
        }
    }

    pub(super) fn next_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Where the proxy is; `None`: down.
    pub fn proxy(&self) -> Option<ProxyAddr> {
        self.proxy.borrow().clone()
    }

    /// The keeper's word: the proxy is up at `addr`, or down (`None`). Down closes every connection.
    pub fn set_proxy(&self, addr: Option<ProxyAddr>) {
        let down = addr.is_none();
        self.proxy.send_replace(addr);
        metrics::gauge!("kernelbox_egress_proxy_up").set(if down { 0.0 } else { 1.0 });
        if down {
            self.reporting.store(false, Ordering::Relaxed);
            for session in self.sessions.lock().unwrap().values() {
                session.close_all();
            }
        }
    }

    /// The proxy runs and reports: what `/readyz` asks.
    pub fn is_up(&self) -> bool {
        self.proxy().is_some() && self.reporting.load(Ordering::Relaxed)
    }

    /// Stops every gate and connection (the service stops).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Reads the proxy's events while the service runs: connects whenever the proxy is up, files each
    /// event under its session.
    pub async fn report_events(self: Arc<Self>) {
        let mut proxy = self.proxy.subscribe();
        loop {
            let current = proxy.borrow_and_update().clone();
            let Some(addr) = current else {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    changed = proxy.changed() => if changed.is_err() { return } else { continue },
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = proxy.changed() => {}
                ended = self.read_events(&addr) => {
                    self.reporting.store(false, Ordering::Relaxed);
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "the egress proxy's events stream ended");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn read_events(&self, proxy: &ProxyAddr) -> std::io::Result<()> {
        let mut stream = tokio::time::timeout(PROXY_CONNECT, TcpStream::connect(proxy.addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting to the egress proxy"))??;
        stream.write_all(&link::encode_opening(&proxy.token, &Opening::Events)).await?;
        let mut reader = BufReader::with_capacity(MAX_EVENT_LINE, stream);
        self.reporting.store(true, Ordering::Relaxed);
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            // Bounded: at most one buffer's worth per line.
            let n = (&mut reader).take(MAX_EVENT_LINE as u64).read_until(b'\n', &mut line).await?;
            if n == 0 {
                return Ok(());
            }
            if line.last() != Some(&b'\n') {
                return Err(std::io::Error::other("an over-long event line"));
            }
            match link::decode_event(&line) {
                Ok(event) => self.file(event),
                Err(e) => tracing::warn!(error = %e, "an event the service does not understand"),
            }
        }
    }

    /// Files one of the proxy's events.
    fn file(&self, event: link::Event) {
        let Some(session) = self.get(&event.session) else { return };
        match event.outcome {
            Outcome::Allowed => {
                metrics::counter!("kernelbox_egress_connections_total", "outcome" => "allowed").increment(1);
                session.allowed(event.conn, &event.host, event.port, self.policy());
            }
            Outcome::Blocked { reason } => {
                self.refused(&session, &event.host, event.port, reason.as_str());
            }
        }
    }

    /// A refusal: the session's report and the metrics.
    pub(super) fn refused(&self, session: &SessionEgress, host: &str, port: u16, reason: &'static str) {
        metrics::counter!("kernelbox_egress_connections_total", "outcome" => "blocked", "reason" => reason)
            .increment(1);
        tracing::debug!(session_id = %session.id(), host, port, reason, "egress refused");
        session.refused(host, port, reason);
    }
}
