//! The proxy over real sockets on 127.0.0.1: a proxy on port 0 with `127.0.0.0/8` opened (so the test
//! servers are reachable) and `.test` names (`allowed.test` and `other.test` at 127.0.0.1, `rebind.test`
//! at a private address not opened), a TLS server for `allowed.test`, small HTTP servers, and the link's
//! events read as the service reads them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::*;
use crate::egress::link::{Event, Opening, Outcome, Reason, decode_event, encode_opening};
use crate::egress::sni::hello_for;

const TOKEN: &str = "a-test-token-of-at-least-32-characters";
const TEST_NAMES: &str =
    "allowed.test=127.0.0.1,other.test=127.0.0.1,rebind.test=10.255.255.1,forbidden.test=127.0.0.1";
/// Longest any test waits for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(5);

fn config(allow_cidr: &str) -> ProxyConfig {
    let mut config = ProxyArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        forbid: "forbidden.test".into(),
        max_allow: 64,
        allow_cidr: allow_cidr.into(),
        test_names: TEST_NAMES.into(),
        connect_timeout_s: 2,
        head_timeout_s: 2,
        idle_timeout_s: 10,
        max_conn_bytes: 1 << 30,
        max_connections: 1024,
        token: Some(TOKEN.into()),
    }
    .validate()
    .unwrap();
    config.head_timeout = Duration::from_secs(2);
    config
}

/// A proxy serving in a task (aborted, so dropped, when this is), with its events subscriber.
struct TestProxy {
    addr: SocketAddr,
    events: BufReader<TcpStream>,
    task: JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn spawn_proxy(config: ProxyConfig) -> TestProxy {
    let proxy = Proxy::bind(config).await.unwrap();
    let addr = proxy.local_addr().unwrap();
    let task = tokio::spawn(proxy.serve());
    TestProxy { addr, events: subscribe(addr).await, task }
}

async fn subscribe(addr: SocketAddr) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&encode_opening(TOKEN, &Opening::Events)).await.unwrap();
    BufReader::new(stream)
}

async fn next_event(events: &mut BufReader<TcpStream>) -> Event {
    let mut line = Vec::new();
    let n = tokio::time::timeout(PATIENCE, events.read_until(b'\n', &mut line)).await.expect("an event").unwrap();
    assert!(n > 0, "the events stream closed");
    decode_event(&line).unwrap()
}

impl TestProxy {
    /// A session connection as the service opens it, for a session with `allow`.
    async fn session(&self, conn: u64, allow: &[&str]) -> TcpStream {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        let allow = allow.iter().map(|a| a.to_string()).collect();
        let opening = Opening::Session { session: "s-1".into(), conn, allow };
        stream.write_all(&encode_opening(TOKEN, &opening)).await.unwrap();
        stream
    }

    async fn next_event(&mut self) -> Event {
        next_event(&mut self.events).await
    }

    /// The check every refusal test makes: the client's request, the proxy's answer (its status line and
    /// the reason header) and the event.
    async fn check_refused(
        &mut self,
        allow: &[&str],
        request: &str,
        status: &str,
        reason: Reason,
        host: &str,
        port: u16,
    ) {
        let mut client = self.session(3, allow).await;
        client.write_all(request.as_bytes()).await.unwrap();
        let answer = String::from_utf8(read_to_end(&mut client).await).unwrap();
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{request:?}: {answer}");
        assert!(answer.contains(&format!("X-Kernelbox-Blocked: {reason}\r\n")), "{answer}");
        assert!(answer.ends_with(&format!("refused ({reason})\n")), "{answer}");
        assert_eq!(self.next_event().await, blocked(3, host, port, reason), "{request:?}");
    }
}

fn blocked(conn: u64, host: &str, port: u16, reason: Reason) -> Event {
    Event { session: "s-1".into(), conn, host: host.into(), port, outcome: Outcome::Blocked { reason } }
}

fn allowed(conn: u64, host: &str, port: u16) -> Event {
    Event { session: "s-1".into(), conn, host: host.into(), port, outcome: Outcome::Allowed }
}

async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut bytes)).await.expect("the proxy closes");
    bytes
}

/// Reads an HTTP answer's head, byte by byte (nothing past it).
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(PATIENCE, stream.read_u8()).await.expect("an answer").unwrap();
        head.push(byte);
    }
    String::from_utf8(head).unwrap()
}

/// A listener on 127.0.0.1 whose connections `serve` handles.
async fn server<F, Fut>(serve: F) -> u16
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    port
}

/// An HTTP server that reports each request head it gets and answers `ok`.
async fn http_server() -> (u16, mpsc::UnboundedReceiver<String>) {
    let (heads, rx) = mpsc::unbounded_channel();
    let port = server(move |mut stream| {
        let heads = heads.clone();
        async move {
            let Ok((buf, end)) = head::read(&mut stream, vec![]).await else { return };
            let _ = heads.send(String::from_utf8_lossy(&buf[..end]).into_owned());
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
        }
    })
    .await;
    (port, rx)
}

/// The ring provider, as everywhere in the project (see `cluster/tls.rs`).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS echo server for `allowed.test`, and a client config that trusts it.
async fn tls_echo_server() -> (u16, Arc<rustls::ClientConfig>) {
    let certified = rcgen::generate_simple_self_signed(vec!["allowed.test".to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let port = server_with(acceptor, |acceptor, stream| async move {
        let Ok(mut tls) = acceptor.accept(stream).await else { return };
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = tls.read(&mut buf).await {
            if tls.write_all(&buf[..n]).await.is_err() {
                return;
            }
            let _ = tls.flush().await;
        }
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (port, Arc::new(client))
}

async fn server_with<S, F, Fut>(state: S, serve: F) -> u16
where
    S: Clone + Send + 'static,
    F: Fn(S, TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    server(move |stream| serve(state.clone(), stream)).await
}

/// Opens a tunnel to `allowed.test:port` and says TLS through it.
async fn tls_through(
    proxy: &TestProxy,
    conn: u64,
    port: u16,
    client: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut stream = proxy.session(conn, &[&format!("allowed.test:{port}")]).await;
    let request = format!("CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut stream).await, "HTTP/1.1 200 Connection established\r\n\r\n");
    let name = rustls::pki_types::ServerName::try_from("allowed.test").unwrap();
    tokio_rustls::TlsConnector::from(client).connect(name, stream).await.unwrap()
}

#[tokio::test]
async fn connect_to_an_allowed_name_works_end_to_end_over_tls_and_is_reported_allowed() {
    let (port, client) = tls_echo_server().await;
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    let mut tls = tls_through(&proxy, 1, port, client).await;
    tls.write_all(b"hello through the proxy").await.unwrap();
    tls.flush().await.unwrap();
    let mut echo = [0u8; 23];
    tokio::time::timeout(PATIENCE, tls.read_exact(&mut echo)).await.unwrap().unwrap();
    assert_eq!(&echo, b"hello through the proxy");
    assert_eq!(proxy.next_event().await, allowed(1, "allowed.test", port));
}

#[tokio::test]
async fn a_name_not_on_the_list_is_refused_with_403_and_not_allowed() {
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    let request = "CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n\r\n";
    proxy.check_refused(&["allowed.test"], request, "403 Forbidden", Reason::NotAllowed, "other.test", 443).await;
    // The right name on another port than the list's.
    let request = "CONNECT allowed.test:8443 HTTP/1.1\r\n\r\n";
    proxy.check_refused(&["allowed.test"], request, "403 Forbidden", Reason::NotAllowed, "allowed.test", 8443).await;
    // An empty list reaches nothing.
    let request = "CONNECT Allowed.Test:443 HTTP/1.1\r\n\r\n";
    proxy.check_refused(&[], request, "403 Forbidden", Reason::NotAllowed, "allowed.test", 443).await;
}

#[tokio::test]
async fn a_forbidden_name_is_refused_as_forbidden_whatever_the_list_says() {
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    let request = "CONNECT forbidden.test:443 HTTP/1.1\r\n\r\n";
    proxy.check_refused(&["allowed.test"], request, "403 Forbidden", Reason::Forbidden, "forbidden.test", 443).await;
    // A list naming it is refused whole here (the service should never send one): it reaches nothing.
    proxy.check_refused(&["forbidden.test"], request, "403 Forbidden", Reason::Forbidden, "forbidden.test", 443).await;
    let request = "CONNECT allowed.test:443 HTTP/1.1\r\n\r\n";
    let list = ["allowed.test", "forbidden.test"];
    proxy.check_refused(&list, request, "403 Forbidden", Reason::NotAllowed, "allowed.test", 443).await;
}

#[tokio::test]
async fn an_ip_literal_is_refused_unless_the_operator_opened_its_range() {
    let (port, _) = http_server().await;
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    for (target, host) in [("10.0.0.1:443", "10.0.0.1"), ("93.184.216.34:443", "93.184.216.34"), ("[::1]:443", "[::1]")]
    {
        let request = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
        proxy.check_refused(&["allowed.test"], &request, "403 Forbidden", Reason::IpLiteral, host, 443).await;
    }
    // In the opened range, but on a port that is not a web port, or for a session with no list: refused
    // all the same (an opened range is reached on 80 and 443 by sessions that have a network: `check.rs`).
    let request = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n");
    proxy.check_refused(&["allowed.test"], &request, "403 Forbidden", Reason::IpLiteral, "127.0.0.1", port).await;
    let request = "CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n";
    proxy.check_refused(&[], request, "403 Forbidden", Reason::IpLiteral, "127.0.0.1", 443).await;
}

#[tokio::test]
async fn without_opened_ranges_loopback_is_refused_as_a_literal_and_as_a_resolved_name() {
    let (port, _) = http_server().await;
    let mut proxy = spawn_proxy(config("")).await;
    let list = [format!("allowed.test:{port}")];
    let list = [list[0].as_str()];
    let request = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n");
    proxy.check_refused(&list, &request, "403 Forbidden", Reason::IpLiteral, "127.0.0.1", port).await;
    let request = format!("CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n");
    proxy.check_refused(&list, &request, "403 Forbidden", Reason::PrivateAddress, "allowed.test", port).await;
    let request = format!("GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
    proxy.check_refused(&list, &request, "403 Forbidden", Reason::PrivateAddress, "allowed.test", port).await;
}

#[tokio::test]
async fn a_name_that_resolves_to_a_private_address_is_refused_as_private_address() {
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    let request = "CONNECT rebind.test:443 HTTP/1.1\r\n\r\n";
    proxy.check_refused(&["rebind.test"], request, "403 Forbidden", Reason::PrivateAddress, "rebind.test", 443).await;
}

#[tokio::test]
async fn a_name_that_does_not_resolve_or_answer_is_a_502() {
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    let request = "CONNECT missing.test:443 HTTP/1.1\r\n\r\n";
    proxy.check_refused(&["missing.test"], request, "502 Bad Gateway", Reason::Unresolved, "missing.test", 443).await;
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let list = [format!("allowed.test:{closed}")];
    let request = format!("CONNECT allowed.test:{closed} HTTP/1.1\r\n\r\n");
    proxy.check_refused(&[&list[0]], &request, "502 Bad Gateway", Reason::Unreachable, "allowed.test", closed).await;
}

#[tokio::test]
async fn a_client_hello_for_another_name_closes_the_tunnel_as_sni_mismatch() {
    let (port, _) = tls_echo_server().await;
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    for (name, reason) in [("other.test", Reason::SniMismatch), ("127.0.0.1", Reason::SniMissing)] {
        let mut client = proxy.session(5, &[&format!("allowed.test:{port}"), "other.test"]).await;
        client.write_all(format!("CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
        assert_eq!(read_head(&mut client).await, "HTTP/1.1 200 Connection established\r\n\r\n");
        client.write_all(&hello_for(name)).await.unwrap();
        assert_eq!(read_to_end(&mut client).await, b"", "closed, nothing from upstream");
        assert_eq!(proxy.next_event().await, blocked(5, "allowed.test", port, reason), "{name}");
    }
}

#[tokio::test]
async fn bytes_after_connect_that_are_not_tls_close_the_tunnel_as_not_tls() {
    let (port, mut heads) = http_server().await;
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    let mut client = proxy.session(6, &[&format!("allowed.test:{port}")]).await;
    // Sent with the head: the proxy holds them until it has judged them.
    let request = format!("CONNECT allowed.test:{port} HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
    client.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut client).await, "HTTP/1.1 200 Connection established\r\n\r\n");
    assert_eq!(read_to_end(&mut client).await, b"");
    assert_eq!(proxy.next_event().await, blocked(6, "allowed.test", port, Reason::NotTls));
    assert!(heads.try_recv().is_err(), "no byte reached the server");
}

#[tokio::test]
async fn plain_http_reaches_the_server_in_origin_form_with_connection_close() {
    let (port, mut heads) = http_server().await;
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    let mut client = proxy.session(7, &[&format!("allowed.test:{port}")]).await;
    let request = format!(
        "GET http://allowed.test:{port}/path?q=1 HTTP/1.1\r\nHost: allowed.test:{port}\r\n\
         Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\n\
         User-Agent: test\r\n\r\n"
    );
    client.write_all(request.as_bytes()).await.unwrap();
    let answer = read_to_end(&mut client).await;
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n") && answer.ends_with(b"\r\n\r\nok"));
    let head = heads.recv().await.unwrap();
    assert_eq!(
        head,
        format!("GET /path?q=1 HTTP/1.1\r\nHost: allowed.test:{port}\r\nUser-Agent: test\r\nConnection: close\r\n\r\n")
    );
    assert_eq!(proxy.next_event().await, allowed(7, "allowed.test", port));
}

#[tokio::test]
async fn a_second_request_on_a_plain_connection_never_reaches_another_host() {
    let (port, mut heads) = http_server().await;
    let (other_port, mut other_heads) = http_server().await;
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    let list = [format!("allowed.test:{port}"), format!("other.test:{other_port}")];
    let mut client = proxy.session(8, &[&list[0], &list[1]]).await;
    let requests = format!(
        "GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n\
         GET http://other.test:{other_port}/ HTTP/1.1\r\nHost: other.test:{other_port}\r\n\r\n"
    );
    client.write_all(requests.as_bytes()).await.unwrap();
    let answer = read_to_end(&mut client).await;
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "one answer, then the close");
    assert!(heads.recv().await.unwrap().starts_with("GET / HTTP/1.1\r\n"));
    assert_eq!(proxy.next_event().await, allowed(8, "allowed.test", port));
    assert!(other_heads.try_recv().is_err(), "the other host got nothing");
}

#[tokio::test]
async fn a_plain_request_whose_host_header_names_another_host_is_refused_as_host_mismatch() {
    let (port, mut heads) = http_server().await;
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    let list = [format!("allowed.test:{port}"), format!("other.test:{port}")];
    let list = [list[0].as_str(), list[1].as_str()];
    let request = format!("GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: other.test\r\n\r\n");
    proxy.check_refused(&list, &request, "403 Forbidden", Reason::HostMismatch, "allowed.test", port).await;
    assert!(heads.try_recv().is_err(), "no byte reached the server");
}

#[tokio::test]
async fn what_is_not_a_proxy_request_is_a_400() {
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    for request in [
        "GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        "GET https://allowed.test/ HTTP/1.1\r\n\r\n",
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "CONNECT allowed.test HTTP/1.1\r\n\r\n",
    ] {
        proxy.check_refused(&["allowed.test"], request, "400 Bad Request", Reason::BadRequest, "", 0).await;
    }
    let long = format!("GET http://allowed.test/ HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(head::MAX_HEAD));
    proxy.check_refused(&["allowed.test"], &long, "400 Bad Request", Reason::BadRequest, "", 0).await;
}

#[tokio::test]
async fn a_bad_token_is_closed_without_an_event() {
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let opening = Opening::Session { session: "s-1".into(), conn: 9, allow: vec!["other.test".into()] };
    stream.write_all(&encode_opening("not-the-token-but-just-as-long-as-it", &opening)).await.unwrap();
    stream.write_all(b"CONNECT other.test:443 HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(read_to_end(&mut stream).await, b"");
    // A bad token can't take the events stream either.
    let mut thief = TcpStream::connect(proxy.addr).await.unwrap();
    thief.write_all(&encode_opening("not-the-token-but-just-as-long-as-it", &Opening::Events)).await.unwrap();
    assert_eq!(read_to_end(&mut thief).await, b"");
    // The next event is the next refusal's, not the bad token's.
    let request = "CONNECT other.test:443 HTTP/1.1\r\n\r\n";
    proxy.check_refused(&[], request, "403 Forbidden", Reason::NotAllowed, "other.test", 443).await;
}

#[tokio::test]
async fn a_slow_client_that_never_finishes_its_head_is_cut_after_the_head_timeout() {
    let mut config = config("127.0.0.0/8");
    config.head_timeout = Duration::from_millis(300);
    let mut proxy = spawn_proxy(config).await;
    let mut client = proxy.session(10, &["allowed.test"]).await;
    let started = tokio::time::Instant::now();
    client.write_all(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allo").await.unwrap();
    let answer = read_to_end(&mut client).await;
    assert!(answer.starts_with(b"HTTP/1.1 400 Bad Request\r\n"), "{}", String::from_utf8_lossy(&answer));
    assert!(started.elapsed() >= Duration::from_millis(300) && started.elapsed() < Duration::from_secs(3));
    assert_eq!(proxy.next_event().await, blocked(10, "", 0, Reason::BadRequest));
}

#[tokio::test]
async fn the_byte_cap_closes_a_connection_and_is_reported() {
    // A server that answers without end.
    let port = server(|mut stream| async move {
        let _ = head::read(&mut stream, vec![]).await;
        let chunk = vec![b'x'; 16 * 1024];
        while stream.write_all(&chunk).await.is_ok() {}
    })
    .await;
    let mut config = config("127.0.0.0/8");
    config.max_conn_bytes = 100_000;
    let mut proxy = spawn_proxy(config).await;
    let mut client = proxy.session(11, &[&format!("allowed.test:{port}")]).await;
    client.write_all(format!("GET http://allowed.test:{port}/ HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
    let got = read_to_end(&mut client).await;
    assert!(got.len() > 50_000 && got.len() <= 100_000, "{} bytes", got.len());
    assert_eq!(proxy.next_event().await, allowed(11, "allowed.test", port));
    assert_eq!(proxy.next_event().await, blocked(11, "allowed.test", port, Reason::ByteLimit));
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    let (port, client) = tls_echo_server().await;
    let mut config = config("127.0.0.0/8");
    config.idle_timeout = Duration::from_millis(400);
    let mut proxy = spawn_proxy(config).await;
    let mut tls = tls_through(&proxy, 12, port, client).await;
    assert_eq!(proxy.next_event().await, allowed(12, "allowed.test", port));
    // Bytes keep it open...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tls.write_all(b"ping").await.unwrap();
        tls.flush().await.unwrap();
        let mut echo = [0u8; 4];
        tls.read_exact(&mut echo).await.unwrap();
    }
    // ... silence closes it.
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut rest)).await.expect("closed");
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
}

#[tokio::test]
async fn the_events_subscriber_gets_events_in_order_and_a_newer_one_replaces_it() {
    let mut proxy = spawn_proxy(config("127.0.0.0/8")).await;
    for conn in 20..25 {
        let mut client = proxy.session(conn, &[]).await;
        client.write_all(format!("CONNECT other.test:{conn} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
        read_to_end(&mut client).await;
    }
    for conn in 20..25 {
        assert_eq!(proxy.next_event().await, blocked(conn, "other.test", conn as u16, Reason::NotAllowed));
    }
    let mut newer = subscribe(proxy.addr).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, proxy.events.read_to_end(&mut rest)).await.expect("the older is closed");
    assert!(rest.is_empty());
    let mut client = proxy.session(30, &[]).await;
    client.write_all(b"CONNECT other.test:443 HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(next_event(&mut newer).await, blocked(30, "other.test", 443, Reason::NotAllowed));
}

#[tokio::test]
async fn events_wait_in_the_queue_until_a_subscriber_comes() {
    let proxy = Proxy::bind(config("127.0.0.0/8")).await.unwrap();
    let addr = proxy.local_addr().unwrap();
    let task = tokio::spawn(proxy.serve());
    let mut client = TcpStream::connect(addr).await.unwrap();
    let opening = Opening::Session { session: "s-1".into(), conn: 40, allow: vec![] };
    client.write_all(&encode_opening(TOKEN, &opening)).await.unwrap();
    client.write_all(b"CONNECT other.test:443 HTTP/1.1\r\n\r\n").await.unwrap();
    read_to_end(&mut client).await;
    let mut events = subscribe(addr).await;
    assert_eq!(next_event(&mut events).await, blocked(40, "other.test", 443, Reason::NotAllowed));
    task.abort();
}

#[tokio::test]
async fn beyond_the_connection_limit_new_connections_are_closed_at_once() {
    let mut config = config("127.0.0.0/8");
    config.max_connections = 1;
    let mut proxy = spawn_proxy(config).await;
    // The events subscriber holds no place once subscribed; this one does (it has not sent its head yet).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut first = proxy.session(50, &[]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = proxy.session(51, &[]).await;
    let _ = second.write_all(b"CONNECT other.test:443 HTTP/1.1\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, second.read_to_end(&mut answer)).await.expect("closed");
    assert!(answer.is_empty());
    first.write_all(b"CONNECT other.test:443 HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(read_to_end(&mut first).await.starts_with(b"HTTP/1.1 403 "));
    assert_eq!(proxy.next_event().await, blocked(50, "other.test", 443, Reason::NotAllowed));
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_open_connections() {
    let (port, client) = tls_echo_server().await;
    let proxy = spawn_proxy(config("127.0.0.0/8")).await;
    let mut tls = tls_through(&proxy, 60, port, client).await;
    drop(proxy);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut rest)).await.expect("closed on shutdown");
}
