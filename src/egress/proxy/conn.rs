//! One session connection as `tunnel` and `forward` share it ([`Link`]): the checks and the connect to the
//! upstream, the refusals (an HTTP error with the reason, then a gentle close) and the events.

use std::fmt::Display;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Shared;
use super::check::{self, Destination};
use super::head::Authority;
use super::relay::{End, Limits};
use crate::egress::allow::AllowList;
use crate::egress::link::{Event, Outcome, Reason};

/// How long a refused client has to read its answer before the connection is dropped.
const LINGER: Duration = Duration::from_secs(1);
/// The most a refused client's unread bytes are drained before the connection is dropped.
const LINGER_BYTES: usize = 64 * 1024;

/// A session's connection, for its checks and events.
pub(super) struct Link<'a> {
    /// The session's id, as the service named it.
    pub session: String,
    /// The service's number for this connection (its events name it).
    pub conn: u64,
    /// What the session may reach (empty when its list was refused).
    pub list: AllowList,
    pub shared: &'a Shared,
}

impl Link<'_> {
    /// Checks the target and connects to it.
    pub async fn open(&self, target: &Authority) -> Result<(Destination, TcpStream), Reason> {
        let config = &self.shared.config;
        let destination = check::destination(target, &self.list, &config.policy, &config.opened)?;
        let upstream = self.shared.resolver.connect(&destination, target.port).await?;
        let _ = upstream.set_nodelay(true);
        Ok((destination, upstream))
    }

    /// The bounds of a relay.
    pub fn limits(&self) -> Limits {
        Limits { idle: self.shared.config.idle_timeout, max_bytes: self.shared.config.max_conn_bytes }
    }

    pub fn allowed(&self, target: &Authority) {
        self.emit(Some(target), Outcome::Allowed);
    }

    /// A refusal the client is not told of (the tunnel is open: it only sees the close).
    pub fn blocked(&self, target: &Authority, reason: Reason, why: &(dyn Display + Sync)) {
        tracing::debug!(session = %self.session, conn = self.conn, host = %target.host, port = target.port,
            %reason, %why, "egress refused");
        self.emit(Some(target), Outcome::Blocked { reason });
    }

    /// How a relay ended, in the events (only the byte cap is a refusal).
    pub fn ended(&self, target: &Authority, end: End) {
        match end {
            End::ByteLimit => self.blocked(target, Reason::ByteLimit, &"the connection's byte cap"),
            End::Idle => tracing::debug!(session = %self.session, conn = self.conn, "egress connection idle: closed"),
            End::Closed => {}
        }
    }

    /// A refusal before the tunnel is open: the event, an HTTP answer naming the reason, a gentle close.
    pub async fn refuse(
        &self,
        client: &mut TcpStream,
        target: Option<&Authority>,
        reason: Reason,
        why: &(dyn Display + Sync),
    ) {
        match target {
            Some(target) => self.blocked(target, reason, why),
            None => {
                tracing::debug!(session = %self.session, conn = self.conn, %reason, %why, "egress refused");
                self.emit(None, Outcome::Blocked { reason });
            }
        }
        let answer = refusal(target, reason);
        let head_timeout = self.shared.config.head_timeout;
        if let Ok(Ok(())) = tokio::time::timeout(head_timeout, client.write_all(&answer)).await {
            close_gently(client).await;
        }
    }

    fn emit(&self, target: Option<&Authority>, outcome: Outcome) {
        self.shared.events.emit(Event {
            session: self.session.clone(),
            conn: self.conn,
            host: target.map(check::event_host).unwrap_or_default(),
            port: target.map_or(0, |t| t.port),
            outcome,
        });
    }
}

/// The answer to a refused request: `400` for a request not understood, `502` for an upstream that
/// cannot be reached, `403` for the rest; the reason in a header and in a one-line body.
pub fn refusal(target: Option<&Authority>, reason: Reason) -> Vec<u8> {
    let status = match reason {
        Reason::BadRequest => "400 Bad Request",
        Reason::Unresolved | Reason::Unreachable => "502 Bad Gateway",
        _ => "403 Forbidden",
    };
    let body = match target {
        Some(target) => format!("kernelbox egress: {}:{} refused ({reason})\n", check::event_host(target), target.port),
        None => format!("kernelbox egress: request refused ({reason})\n"),
    };
    format!(
        "HTTP/1.1 {status}\r\nX-Kernelbox-Blocked: {reason}\r\nContent-Type: text/plain\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Closes our side and drains what the client still sends for a moment, so that its unread bytes do not
/// turn the close into a reset that loses the answer.
async fn close_gently(client: &mut TcpStream) {
    let _ = client.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while let Ok(n @ 1..) = client.read(&mut sink).await {
            drained += n;
            if drained > LINGER_BYTES {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_its_reason_in_a_header_and_a_line() {
        let target = Authority { host: "Other.Test".into(), port: 443 };
        let answer = String::from_utf8(refusal(Some(&target), Reason::NotAllowed)).unwrap();
        assert_eq!(
            answer,
            "HTTP/1.1 403 Forbidden\r\nX-Kernelbox-Blocked: not_allowed\r\nContent-Type: text/plain\r\n\
             Connection: close\r\nContent-Length: 55\r\n\r\nkernelbox egress: other.test:443 refused (not_allowed)\n"
        );
        assert!(String::from_utf8(refusal(None, Reason::BadRequest)).unwrap().starts_with("HTTP/1.1 400 "));
        let answer = String::from_utf8(refusal(Some(&target), Reason::Unreachable)).unwrap();
        assert!(answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
    }
}
