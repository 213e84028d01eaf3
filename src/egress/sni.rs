//! The server name a TLS client asks for (its ClientHello's SNI), read without terminating TLS (issue 22):
//! the egress proxy holds the first bytes a session sends after its `CONNECT`, reads the name from them,
//! and forwards them unchanged only if it matches the `CONNECT` host and the allow-list. rustls's
//! [`Acceptor`] parses the ClientHello (no certificate, no key: it only reads); the bytes are bounded
//! before they are parsed.

use rustls::server::Acceptor;

/// The most a ClientHello may take before it is refused (TLS allows 16 KiB records; post-quantum key
/// shares make hellos of a few KiB, never this).
pub const MAX_HELLO_BYTES: usize = 16 * 1024;

/// What the bytes read so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A complete ClientHello, with the server name it asks for (`None`: it names none).
    Complete(Option<String>),
    /// Not enough bytes yet.
    Partial,
    /// Not a TLS ClientHello, or one over [`MAX_HELLO_BYTES`].
    NotTls,
}

/// Reads the ClientHello at the start of `bytes` (what the client sent after `CONNECT`, unchanged).
pub fn client_hello(bytes: &[u8]) -> Hello {
    let mut acceptor = Acceptor::default();
    let mut input = bytes;
    while !input.is_empty() {
        match acceptor.read_tls(&mut input) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Hello::NotTls,
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Hello::Complete(accepted.client_hello().server_name().map(str::to_ascii_lowercase)),
        Ok(None) if bytes.len() >= MAX_HELLO_BYTES => Hello::NotTls,
        Ok(None) => Hello::Partial,
        Err(_) => Hello::NotTls,
    }
}

/// A real client's first flight for `name` (rustls as the client, no network), for tests here and the
/// proxy's. The ring provider, as everywhere in the project (rustls deprecates it for lacking post-quantum
/// key exchange: see `cluster/tls.rs`).
#[cfg(test)]
#[allow(deprecated)]
pub(crate) fn hello_for(name: &str) -> Vec<u8> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_a_client_asks_for_is_read_from_its_hello() {
        let hello = hello_for("Allowed.Test");
        assert_eq!(client_hello(&hello), Hello::Complete(Some("allowed.test".into())));
        // Byte by byte, as a slow client sends it: partial until the whole record is there.
        for cut in [1, 5, hello.len() / 2, hello.len() - 1] {
            assert_eq!(client_hello(&hello[..cut]), Hello::Partial, "cut at {cut}");
        }
        // An address as the name: rustls sends no SNI for it.
        assert_eq!(client_hello(&hello_for("10.0.0.1")), Hello::Complete(None));
    }

    #[test]
    fn what_is_not_a_hello_is_refused() {
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n"), Hello::NotTls);
        assert_eq!(client_hello(&[0x16, 0x03, 0x01, 0x02, 0x00]), Hello::Partial, "a record header: wait");
        assert_eq!(client_hello(&[0x16, 0x03, 0x01, 0xff, 0xff]), Hello::NotTls, "a record over TLS's limit");
        let mut garbage = vec![0x16, 0x03, 0x01, 0x00, 0x10];
        garbage.extend([0xab; 16]);
        assert_eq!(client_hello(&garbage), Hello::NotTls);
        assert_eq!(client_hello(&vec![0x16; MAX_HELLO_BYTES + 10]), Hello::NotTls);
    }
}
