//! The link between the service and the egress proxy (issue 22), used by both sides. The service opens a
//! TCP connection to the proxy for each connection a session's code makes, writes one opening line
//! (`KBEGRESS1 <token> <json>\n`: which session, which connection, its allow-list) and then relays the
//! client's bytes unchanged; or it opens the events stream, on which the proxy writes one JSON line per
//! decision ([`Event`]). The token is the service's secret: the proxy serves nobody else. Pure encoding
//! and decoding, and one bounded async read; no policy.

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The first word of every opening line: this protocol, this version.
pub const MAGIC: &str = "KBEGRESS1";
/// The longest opening line (an allow-list of a few hundred names fits many times over).
pub const MAX_OPENING: usize = 64 * 1024;
/// The longest event line, its `\n` included (a host is capped at 255 characters: far below).
pub const MAX_EVENT_LINE: usize = 4 * 1024;
/// How much [`read_opening`] asks the stream for at a time.
const READ_CHUNK: usize = 4 * 1024;

/// What a link connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Opening {
    /// A session's connection: what follows is the client's bytes.
    Session { session: String, conn: u64, allow: Vec<String> },
    /// The events stream: the proxy writes Event lines on it until it closes.
    Events,
}

/// Why a link line is refused.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("reading the opening line failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection closed before its opening line ended")]
    Closed,
    #[error("the opening line is longer than {MAX_OPENING} bytes")]
    TooLong,
    #[error("not a kernelbox egress opening line (expected `{MAGIC} <token> <json>`)")]
    BadMagic,
    #[error("the opening line's token is wrong")]
    BadToken,
    #[error("the opening line's JSON is not an opening: {0}")]
    BadOpening(serde_json::Error),
    #[error("an event line is longer than {MAX_EVENT_LINE} bytes")]
    EventTooLong,
    #[error("not an event line: {0}")]
    BadEvent(serde_json::Error),
}

/// `KBEGRESS1 <token> <json>\n`.
pub fn encode_opening(token: &str, opening: &Opening) -> Vec<u8> {
    let json = serde_json::to_string(opening).expect("an opening always serializes");
    format!("{MAGIC} {token} {json}\n").into_bytes()
}

/// Reads the opening line (at most [`MAX_OPENING`] bytes, else an error), checks the magic and the token
/// (in constant time), and returns the opening and the bytes read past the `\n`: the client's first bytes,
/// which belong to what follows.
pub async fn read_opening<R: AsyncRead + Unpin>(r: &mut R, token: &str) -> Result<(Opening, Vec<u8>), LinkError> {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut searched = 0;
    let end = loop {
        if let Some(i) = buf[searched..].iter().position(|&b| b == b'\n') {
            break searched + i;
        }
        searched = buf.len();
        if buf.len() >= MAX_OPENING {
            return Err(LinkError::TooLong);
        }
        let mut chunk = [0u8; READ_CHUNK];
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Err(LinkError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if end > MAX_OPENING {
        return Err(LinkError::TooLong);
    }
    let opening = parse_opening(&buf[..end], token)?;
    Ok((opening, buf[end + 1..].to_vec()))
}

/// One opening line, without its `\n`.
fn parse_opening(line: &[u8], token: &str) -> Result<Opening, LinkError> {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(magic), Some(given), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(LinkError::BadMagic);
    };
    if magic != MAGIC.as_bytes() {
        return Err(LinkError::BadMagic);
    }
    if !bool::from(given.ct_eq(token.as_bytes())) {
        return Err(LinkError::BadToken);
    }
    serde_json::from_slice(json).map_err(LinkError::BadOpening)
}

/// One decision of the proxy about one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub session: String,
    pub conn: u64,
    /// The host as the client named it (a name lowercased; an address as written), at most 255 characters.
    pub host: String,
    pub port: u16,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Allowed,
    Blocked { reason: Reason },
}

/// Why a connection was refused or ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The host is not on the session's list (also: the list is empty).
    NotAllowed,
    /// The operator forbids the name.
    Forbidden,
    /// An address instead of a name, not in an operator-opened range.
    IpLiteral,
    /// The TLS ClientHello names another server than the `CONNECT` host.
    SniMismatch,
    /// A TLS ClientHello without a server name.
    SniMissing,
    /// The bytes after `CONNECT` are not a TLS ClientHello (or too big, or too slow).
    NotTls,
    /// Plain HTTP: the absolute URI's host is not the `Host` header's.
    HostMismatch,
    /// The name resolves only to refused addresses (`addr::refusal`).
    PrivateAddress,
    /// The name does not resolve.
    Unresolved,
    /// Connecting failed or timed out.
    Unreachable,
    /// Not a proxy request the proxy understands (malformed, too long, too slow, unsupported form).
    BadRequest,
    /// (The service's) too many connections for the session.
    ConnectionLimit,
    /// A bytes limit was reached.
    ByteLimit,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::NotAllowed,
        Reason::Forbidden,
        Reason::IpLiteral,
        Reason::SniMismatch,
        Reason::SniMissing,
        Reason::NotTls,
        Reason::HostMismatch,
        Reason::PrivateAddress,
        Reason::Unresolved,
        Reason::Unreachable,
        Reason::BadRequest,
        Reason::ConnectionLimit,
        Reason::ByteLimit,
    ];

    /// The word on the wire, in the session's report and in the metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::NotAllowed => "not_allowed",
            Reason::Forbidden => "forbidden",
            Reason::IpLiteral => "ip_literal",
            Reason::SniMismatch => "sni_mismatch",
            Reason::SniMissing => "sni_missing",
            Reason::NotTls => "not_tls",
            Reason::HostMismatch => "host_mismatch",
            Reason::PrivateAddress => "private_address",
            Reason::Unresolved => "unresolved",
            Reason::Unreachable => "unreachable",
            Reason::BadRequest => "bad_request",
            Reason::ConnectionLimit => "connection_limit",
            Reason::ByteLimit => "byte_limit",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event as one JSON line (with its `\n`).
pub fn encode_event(e: &Event) -> Vec<u8> {
    let mut line = serde_json::to_vec(e).expect("an event always serializes");
    line.push(b'\n');
    line
}

/// Parses one line (its `\n` optional); lines over [`MAX_EVENT_LINE`] bytes are an error.
pub fn decode_event(line: &[u8]) -> Result<Event, LinkError> {
    if line.len() > MAX_EVENT_LINE {
        return Err(LinkError::EventTooLong);
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    serde_json::from_slice(line).map_err(LinkError::BadEvent)
}

/// The kernel's buffers of one side of a relayed connection, each way: with autotuning a peer that reads
/// fast and then trickles can park megabytes per socket in the kernel, charged to whoever holds it (the
/// proxy's memory limit, the service). A fixed size turns autotuning off.
pub const SOCKET_BUFFER: usize = 256 * 1024;

/// Sets [`SOCKET_BUFFER`] both ways on a TCP socket (a failure leaves the kernel's default).
pub fn bound_buffers(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let size = SOCKET_BUFFER as libc::c_int;
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt on a descriptor the stream owns, with a pointer to a live c_int.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn session() -> Opening {
        Opening::Session { session: "s-1".into(), conn: 7, allow: vec!["pypi.org".into(), "*.example.com:8443".into()] }
    }

    async fn read(bytes: &[u8], token: &str) -> Result<(Opening, Vec<u8>), LinkError> {
        read_opening(&mut &bytes[..], token).await
    }

    #[tokio::test]
    async fn an_opening_round_trips_and_keeps_the_clients_first_bytes() {
        let mut bytes = encode_opening(TOKEN, &session());
        assert!(bytes.starts_with(b"KBEGRESS1 0123"));
        bytes.extend_from_slice(b"CONNECT pypi.org:443 HTTP/1.1\r\n");
        let (opening, rest) = read(&bytes, TOKEN).await.unwrap();
        assert_eq!(opening, session());
        assert_eq!(rest, b"CONNECT pypi.org:443 HTTP/1.1\r\n");
        let (opening, rest) = read(&encode_opening(TOKEN, &Opening::Events), TOKEN).await.unwrap();
        assert_eq!((opening, rest), (Opening::Events, vec![]));
        let json = String::from_utf8(encode_opening(TOKEN, &Opening::Events)).unwrap();
        assert_eq!(json, format!("KBEGRESS1 {TOKEN} {{\"kind\":\"events\"}}\n"));
    }

    #[tokio::test]
    async fn a_wrong_token_magic_or_shape_is_refused() {
        let bytes = encode_opening(TOKEN, &session());
        assert!(matches!(read(&bytes, "0123456789abcdef0123456789abcdeX").await, Err(LinkError::BadToken)));
        assert!(matches!(read(&bytes, "short").await, Err(LinkError::BadToken)));
        let other = String::from_utf8(bytes.clone()).unwrap().replacen("KBEGRESS1", "KBEGRESS2", 1);
        assert!(matches!(read(other.as_bytes(), TOKEN).await, Err(LinkError::BadMagic)));
        assert!(matches!(read(b"CONNECT a.example:443 HTTP/1.1\n", TOKEN).await, Err(LinkError::BadMagic)));
        for json in [
            r#"{"kind":"session","session":"s","conn":1,"allow":[],"extra":1}"#,
            r#"{"kind":"session","session":"s","allow":[]}"#,
            r#"{"kind":"other"}"#,
            "not json",
        ] {
            let line = format!("KBEGRESS1 {TOKEN} {json}\n");
            assert!(matches!(read(line.as_bytes(), TOKEN).await, Err(LinkError::BadOpening(_))), "{json}");
        }
        assert!(matches!(read(&bytes[..bytes.len() - 1], TOKEN).await, Err(LinkError::Closed)));
    }

    #[tokio::test]
    async fn an_over_long_opening_is_refused_without_reading_on() {
        let allow = vec!["a.example.com".to_owned(); MAX_OPENING / 10];
        let bytes = encode_opening(TOKEN, &Opening::Session { session: "s".into(), conn: 1, allow });
        assert!(bytes.len() > MAX_OPENING);
        assert!(matches!(read(&bytes, TOKEN).await, Err(LinkError::TooLong)));
        // No newline at all: refused once the bound is passed, not when the peer stops.
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        tokio::io::AsyncWriteExt::write_all(&mut client, &vec![b'x'; MAX_OPENING + 10]).await.unwrap();
        assert!(matches!(read_opening(&mut server, TOKEN).await, Err(LinkError::TooLong)));
    }

    #[test]
    fn events_round_trip_as_one_line_each() {
        let blocked = Event {
            session: "s-1".into(),
            conn: 7,
            host: "example.com".into(),
            port: 443,
            outcome: Outcome::Blocked { reason: Reason::NotAllowed },
        };
        let line = encode_event(&blocked);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"session\":\"s-1\",\"conn\":7,\"host\":\"example.com\",\"port\":443,\"outcome\":\"blocked\",\
             \"reason\":\"not_allowed\"}\n"
        );
        assert_eq!(decode_event(&line).unwrap(), blocked);
        let allowed = Event { outcome: Outcome::Allowed, ..blocked };
        assert_eq!(decode_event(&encode_event(&allowed)).unwrap(), allowed);
        assert!(matches!(decode_event(&vec![b' '; MAX_EVENT_LINE + 1]), Err(LinkError::EventTooLong)));
        assert!(matches!(decode_event(b"{\"session\":\"s\"}\n"), Err(LinkError::BadEvent(_))));
    }

    #[test]
    fn every_reason_has_the_word_serde_writes() {
        for reason in Reason::ALL {
            assert_eq!(serde_json::to_string(&reason).unwrap(), format!("\"{}\"", reason.as_str()));
        }
    }
}
