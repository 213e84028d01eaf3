//! A proxy request's head, as a session's client sends it: read within a bound ([`MAX_HEAD`] bytes up to
//! the blank line), parsed strictly into a `CONNECT host:port` or an absolute-form plain HTTP request,
//! and the latter rewritten to the origin-form head the upstream server gets. Everything here is attacker
//! input: whatever is not plainly one of those two forms is refused. No policy (which hosts): `check`.

use std::net::{IpAddr, Ipv6Addr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest request head, its blank line included.
pub const MAX_HEAD: usize = 8 * 1024;
/// The most header lines a head may have.
const MAX_HEADERS: usize = 100;
/// The port of an `http://` URL without one.
const HTTP_PORT: u16 = 80;
/// Headers for this hop only: never forwarded (`Connection: close` replaces them).
const HOP_BY_HOP: [&str; 4] = ["proxy-authorization", "proxy-connection", "connection", "keep-alive"];

/// Why no head could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the request head is longer than {MAX_HEAD} bytes")]
    TooLong,
    /// The client closed before its head ended; `empty`: before sending anything.
    #[error("the client closed before its request head ended")]
    Closed { empty: bool },
    #[error("reading the request head failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads up to the end of the head (`\r\n\r\n`), starting with the bytes already read (`buf`). Returns
/// the bytes and where the head ends in them: what follows is the client's next bytes (a body, a TLS
/// ClientHello). Reads nothing past [`MAX_HEAD`] while looking; the caller bounds the time.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R, mut buf: Vec<u8>) -> Result<(Vec<u8>, usize), ReadError> {
    let mut searched = 0;
    loop {
        let window = &buf[..buf.len().min(MAX_HEAD)];
        if let Some(i) = window[searched..].windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok((buf, searched + i + 4));
        }
        if buf.len() >= MAX_HEAD {
            return Err(ReadError::TooLong);
        }
        searched = buf.len().saturating_sub(3);
        let mut chunk = [0u8; 2048];
        let room = (MAX_HEAD - buf.len()).min(chunk.len());
        let n = r.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(ReadError::Closed { empty: buf.is_empty() });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Why a head is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The absolute URI names another host than the `Host` header: the request's target.
    #[error("the URL's host is not the Host header's")]
    HostMismatch(Authority),
}

/// A host and port as a request names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// As written: a name (any case), an IPv4 address, or an IPv6 address in brackets.
    pub host: String,
    pub port: u16,
}

impl Authority {
    /// The address, when the host is one (`10.0.0.1`, `[::1]`) rather than a name.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
            None => self.host.parse().ok(),
        }
    }

    /// `host:port`, `port` left out when it is `default`.
    fn to_string_with(&self, default: u16) -> String {
        match self.port {
            port if port == default => self.host.clone(),
            port => format!("{}:{port}", self.host),
        }
    }
}

/// What a client asks the proxy for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `CONNECT host:port HTTP/1.x`: a tunnel (TLS, checked by its ClientHello).
    Connect(Authority),
    /// `GET http://host[:port]/path HTTP/1.x`: one plain HTTP request.
    Forward(Forward),
}

/// A plain HTTP request through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub method: String,
    /// The URL's host and port (80 when it names none).
    pub target: Authority,
    /// The origin-form target: the URL's path and query (`/` when empty), no fragment.
    pub path: String,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: &'static str,
    /// The header lines as sent (names and values), in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Forward {
    /// The head the upstream server gets: origin-form, this hop's headers dropped, `Host` kept (added from
    /// the URL when missing), and `Connection: close`: one request per connection, so a second request on
    /// it never reaches the proxy's checks unseen.
    pub fn origin_head(&self) -> Vec<u8> {
        let mut head = format!("{} {} {}\r\n", self.method, self.path, self.version).into_bytes();
        let mut has_host = false;
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            if HOP_BY_HOP.contains(&lower.as_str()) {
                continue;
            }
            has_host |= lower == "host";
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        if !has_host {
            head.extend_from_slice(format!("Host: {}\r\n", self.target.to_string_with(HTTP_PORT)).as_bytes());
        }
        head.extend_from_slice(b"Connection: close\r\n\r\n");
        head
    }
}

/// Parses a head (up to and with its `\r\n\r\n`, as [`read`] returns it).
pub fn parse(head: &[u8]) -> Result<Request, HeadError> {
    let bad = HeadError::Malformed;
    let head = head.strip_suffix(b"\r\n\r\n").ok_or(bad("the head does not end with a blank line"))?;
    let lines = crlf_lines(head)?;
    let (request_line, header_lines) = lines.split_first().ok_or(bad("no request line"))?;
    let line = std::str::from_utf8(request_line).map_err(|_| bad("the request line is not text"))?;
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(bad("the request line is not `METHOD target HTTP/1.1`"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(bad("the method is not a token"));
    }
    let version = match version {
        "HTTP/1.1" => "HTTP/1.1",
        "HTTP/1.0" => "HTTP/1.0",
        _ => return Err(bad("only HTTP/1.0 and HTTP/1.1 are proxied")),
    };
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("the request target is not a URL"));
    }
    let headers = header_lines.iter().map(|line| header(line)).collect::<Result<Vec<_>, _>>()?;
    if method == "CONNECT" {
        return Ok(Request::Connect(authority(target, None)?));
    }
    let (target, path) = absolute_http(target)?;
    let mut hosts = headers.iter().filter(|(name, _)| name.eq_ignore_ascii_case("host"));
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(bad("more than one Host header")),
        (Some((_, value)), None) => {
            let value = std::str::from_utf8(value).map_err(|_| bad("the Host header is not text"))?;
            let named = authority(value, Some(HTTP_PORT)).map_err(|_| HeadError::HostMismatch(target.clone()))?;
            if !same_host(&named.host, &target.host) {
                return Err(HeadError::HostMismatch(target));
            }
        }
        (None, None) | (None, Some(_)) => {}
    }
    Ok(Request::Forward(Forward { method: method.to_owned(), target, path, version, headers }))
}

/// The lines of a head (without its blank line), split on CRLF; a CR or LF alone is refused (a
/// server behind would split where the proxy did not).
fn crlf_lines(head: &[u8]) -> Result<Vec<&[u8]>, HeadError> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < head.len() {
        match head[i] {
            b'\r' if head.get(i + 1) == Some(&b'\n') => {
                lines.push(&head[start..i]);
                i += 2;
                start = i;
            }
            b'\r' | b'\n' => return Err(HeadError::Malformed("a CR or LF alone in the head")),
            _ => i += 1,
        }
        if lines.len() > MAX_HEADERS {
            return Err(HeadError::Malformed("too many header lines"));
        }
    }
    lines.push(&head[start..]);
    Ok(lines)
}

/// One `Name: value` line: the name a token, the value without control characters (tabs aside), its
/// surrounding spaces trimmed. A line folded onto the one before (obsolete) is refused.
fn header(line: &[u8]) -> Result<(String, Vec<u8>), HeadError> {
    let bad = HeadError::Malformed;
    let colon = line.iter().position(|&b| b == b':').ok_or(bad("a header line without `:`"))?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().copied().all(is_tchar) {
        return Err(bad("a header name is not a token (or a folded line)"));
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(bad("a control character in a header value"));
    }
    let value = value.trim_ascii();
    Ok((String::from_utf8_lossy(name).into_owned(), value.to_vec()))
}

/// `http://host[:port]/path?query` → its authority (port 80 by default) and origin-form path.
fn absolute_http(target: &str) -> Result<(Authority, String), HeadError> {
    let bad = HeadError::Malformed;
    let scheme_end = target.find("://").ok_or(bad("not an absolute `http://` URL (a proxy request names its host)"))?;
    match &target[..scheme_end] {
        s if s.eq_ignore_ascii_case("http") => {}
        s if s.eq_ignore_ascii_case("https") => {
            return Err(bad("`https://` goes through CONNECT, not a plain request"));
        }
        _ => return Err(bad("only `http://` URLs are proxied")),
    }
    let rest = &target[scheme_end + 3..];
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let target = authority(&rest[..end], Some(HTTP_PORT))?;
    let path = match &rest[end..] {
        "" => "/".to_owned(),
        query if query.starts_with('?') => format!("/{query}"),
        path => path.to_owned(),
    };
    Ok((target, path))
}

/// `host:port` (or `host` when `default_port` is given); the host a name, an IPv4 address, or an IPv6
/// address in brackets. No user info, no empty parts.
fn authority(text: &str, default_port: Option<u16>) -> Result<Authority, HeadError> {
    let bad = HeadError::Malformed;
    let (host, port) = if text.starts_with('[') {
        let close = text.find(']').ok_or(bad("an IPv6 address without its `]`"))?;
        let (host, after) = text.split_at(close + 1);
        if host[1..host.len() - 1].parse::<Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address in brackets"));
        }
        match after {
            "" => (host, None),
            after => (host, Some(after.strip_prefix(':').ok_or(bad("junk after an IPv6 address"))?)),
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() || !host.bytes().all(|b| b == b'[' || b == b']' || b == b':' || is_host_byte(b)) {
        return Err(bad("the host is not a name or an address"));
    }
    if !host.starts_with('[') && host.contains(':') {
        return Err(bad("an IPv6 address must be in brackets"));
    }
    let port = match (port, default_port) {
        (Some(port), _) => parse_port(port)?,
        (None, Some(default)) => default,
        (None, None) => return Err(bad("no port (`host:port`)")),
    };
    Ok(Authority { host: host.to_owned(), port })
}

fn parse_port(text: &str) -> Result<u16, HeadError> {
    let bad = HeadError::Malformed("the port is not a number from 1 to 65535");
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad),
        Ok(port) => Ok(port),
    }
}

/// Whether two hosts as written are the same host: case and a trailing dot aside.
fn same_host(a: &str, b: &str) -> bool {
    let trim = |h: &str| h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
    trim(a) == trim(b)
}

/// What a host as written may hold (a name's letters, digits, `-`, `.`; `_` seen in the wild, refused
/// later as no name).
fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'
}

/// RFC 9110's `tchar`: what a method or header name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(host: &str, port: u16) -> Request {
        Request::Connect(Authority { host: host.into(), port })
    }

    fn malformed(head: &str) -> &'static str {
        match parse(head.as_bytes()) {
            Err(HeadError::Malformed(why)) => why,
            other => panic!("{head:?}: {other:?}"),
        }
    }

    #[test]
    fn connect_names_a_host_and_its_port() {
        assert_eq!(parse(b"CONNECT Allowed.Test:443 HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(connect("Allowed.Test", 443)));
        assert_eq!(parse(b"CONNECT 10.0.0.1:8443 HTTP/1.0\r\n\r\n"), Ok(connect("10.0.0.1", 8443)));
        let v6 = parse(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(v6, connect("[2001:db8::1]", 443));
        let Request::Connect(target) = v6 else { unreachable!() };
        assert_eq!(target.ip(), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(Authority { host: "a.example".into(), port: 1 }.ip(), None);
    }

    #[test]
    fn connect_without_a_port_or_with_a_bad_one_is_refused() {
        for (head, says) in [
            ("CONNECT allowed.test HTTP/1.1\r\n\r\n", "no port"),
            ("CONNECT allowed.test: HTTP/1.1\r\n\r\n", "port"),
            ("CONNECT allowed.test:0 HTTP/1.1\r\n\r\n", "port"),
            ("CONNECT allowed.test:65536 HTTP/1.1\r\n\r\n", "port"),
            ("CONNECT allowed.test:+443 HTTP/1.1\r\n\r\n", "port"),
            ("CONNECT allowed.test:443:1 HTTP/1.1\r\n\r\n", "port"),
            ("CONNECT 2001:db8::1:443 HTTP/1.1\r\n\r\n", "port"),
            ("CONNECT [2001:db8::1 HTTP/1.1\r\n\r\n", "`]`"),
            ("CONNECT [not-v6]:443 HTTP/1.1\r\n\r\n", "IPv6"),
            ("CONNECT [::1]x:443 HTTP/1.1\r\n\r\n", "junk"),
            ("CONNECT user@allowed.test:443 HTTP/1.1\r\n\r\n", "not a name"),
            ("CONNECT :443 HTTP/1.1\r\n\r\n", "not a name"),
        ] {
            assert!(malformed(head).contains(says), "{head:?}: {}", malformed(head));
        }
    }

    #[test]
    fn malformed_lines_are_refused() {
        for (head, says) in [
            ("CONNECT allowed.test:443 HTTP/1.1\r\n", "blank line"),
            ("CONNECT  allowed.test:443 HTTP/1.1\r\n\r\n", "request line"),
            ("CONNECT allowed.test:443\r\n\r\n", "request line"),
            ("CONNECT allowed.test:443 HTTP/1.1 x\r\n\r\n", "request line"),
            ("CONNECT allowed.test:443 HTTP/2.0\r\n\r\n", "HTTP/1.0"),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/1.0"),
            ("PRI * HTTP/2.0\r\n\r\n", "HTTP/1.0"),
            ("G(T http://allowed.test/ HTTP/1.1\r\n\r\n", "token"),
            ("GET http://allowed.test/ HTTP/1.1\nHost: allowed.test\r\n\r\n", "CR or LF"),
            ("GET http://allowed.test/ HTTP/1.1\r\nHost: a\rb\r\n\r\n", "CR or LF"),
            ("GET http://allowed.test/ HTTP/1.1\r\nNoColon\r\n\r\n", "without `:`"),
            ("GET http://allowed.test/ HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", "without `:`"),
            ("GET http://allowed.test/ HTTP/1.1\r\nA: b\r\n folded: x\r\n\r\n", "folded"),
            ("GET http://allowed.test/ HTTP/1.1\r\nA: b\x01c\r\n\r\n", "control"),
        ] {
            assert!(malformed(head).contains(says), "{head:?}: {}", malformed(head));
        }
        let many = format!("CONNECT a.example:443 HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(MAX_HEADERS + 1));
        assert!(malformed(&many).contains("too many"));
        assert!(parse(b"CONNECT a.example:443 HTTP/1.1\r\n\xff\r\n\r\n").is_err());
    }

    #[test]
    fn a_plain_request_is_absolute_http_and_rewritten_to_origin_form() {
        let head = "GET http://Allowed.Test:8080/a/b?c=d#frag HTTP/1.1\r\nHost: allowed.test.:8080\r\n\
                    Proxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\n\
                    Keep-Alive: 5\r\nAccept:  */*  \r\n\r\n";
        let Ok(Request::Forward(forward)) = parse(head.as_bytes()) else { panic!("{:?}", parse(head.as_bytes())) };
        assert_eq!(forward.target, Authority { host: "Allowed.Test".into(), port: 8080 });
        assert_eq!(forward.path, "/a/b?c=d");
        assert_eq!(
            String::from_utf8(forward.origin_head()).unwrap(),
            "GET /a/b?c=d HTTP/1.1\r\nHost: allowed.test.:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        // No Host header: the URL's, and no path: `/`.
        let Ok(Request::Forward(forward)) = parse(b"POST http://allowed.test?x=1 HTTP/1.0\r\n\r\n") else { panic!() };
        assert_eq!((forward.target.port, forward.path.as_str()), (80, "/?x=1"));
        assert_eq!(
            String::from_utf8(forward.origin_head()).unwrap(),
            "POST /?x=1 HTTP/1.0\r\nHost: allowed.test\r\nConnection: close\r\n\r\n"
        );
        let Ok(Request::Forward(forward)) = parse(b"GET http://[::1]:81/ HTTP/1.1\r\n\r\n") else { panic!() };
        assert_eq!(forward.target.ip(), Some("::1".parse().unwrap()));
        assert!(String::from_utf8(forward.origin_head()).unwrap().contains("Host: [::1]:81\r\n"));
    }

    #[test]
    fn a_plain_request_must_be_absolute_http_to_the_host_it_names() {
        for (head, says) in [
            ("GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n", "absolute"),
            ("OPTIONS * HTTP/1.1\r\n\r\n", "absolute"),
            ("GET https://allowed.test/ HTTP/1.1\r\n\r\n", "CONNECT"),
            ("GET ftp://allowed.test/ HTTP/1.1\r\n\r\n", "only `http://`"),
            ("GET http://user@allowed.test/ HTTP/1.1\r\n\r\n", "not a name"),
            ("GET http:///x HTTP/1.1\r\n\r\n", "not a name"),
            ("GET http://allowed.test/ HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", "more than one Host"),
        ] {
            assert!(malformed(head).contains(says), "{head:?}: {}", malformed(head));
        }
        let target = Authority { host: "allowed.test".into(), port: 80 };
        for host in ["other.test", "allowed.test.evil", "", "a b"] {
            let head = format!("GET http://allowed.test/ HTTP/1.1\r\nHost: {host}\r\n\r\n");
            assert_eq!(parse(head.as_bytes()), Err(HeadError::HostMismatch(target.clone())), "{host}");
        }
    }

    #[tokio::test]
    async fn a_head_is_read_up_to_its_blank_line_and_no_further_than_the_bound() {
        let sent = b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n\x16\x03\x01";
        // In pieces: the first already read (the opening's leftover), the rest from the stream.
        let (buf, end) = read(&mut &sent[10..], sent[..10].to_vec()).await.unwrap();
        assert_eq!((&buf[..end], &buf[end..]), (&sent[..sent.len() - 3], &b"\x16\x03\x01"[..]));
        // Whole in the leftover.
        let (buf, end) = read(&mut &b""[..], sent.to_vec()).await.unwrap();
        assert_eq!(end, sent.len() - 3);
        assert_eq!(buf.len(), sent.len());
        let long = [b"GET http://a.example/ HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_HEAD]].concat();
        assert!(matches!(read(&mut &long[..], vec![]).await, Err(ReadError::TooLong)));
        assert!(matches!(read(&mut &b""[..], long.clone()).await, Err(ReadError::TooLong)));
        assert!(matches!(read(&mut &b"GET"[..], vec![]).await, Err(ReadError::Closed { empty: false })));
        assert!(matches!(read(&mut &b""[..], vec![]).await, Err(ReadError::Closed { empty: true })));
    }
}
