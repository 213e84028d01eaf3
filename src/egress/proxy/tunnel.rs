//! `CONNECT host:port`: a tunnel, for TLS only. The host is checked and connected to first (a refusal is
//! still an HTTP answer then); once the tunnel is open, the client's TLS ClientHello is read (bounded in
//! size and time) and its server name must be the `CONNECT` host, so that a client cannot name an allowed
//! host to the proxy and another to a server behind a shared address. Only then does a byte go upstream.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::check::Destination;
use super::conn::Link;
use super::head::Authority;
use super::relay;
use crate::egress::allow::normalize_host;
use crate::egress::link::Reason;
use crate::egress::sni::{self, Hello, MAX_HELLO_BYTES};

const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Serves a `CONNECT` to `target`; `rest`: the client's bytes after its head.
pub(super) async fn serve(link: &Link<'_>, mut client: TcpStream, rest: Vec<u8>, target: Authority) {
    let (destination, mut upstream) = match link.open(&target).await {
        Ok(opened) => opened,
        Err(reason) => return link.refuse(&mut client, Some(&target), reason, &"before the tunnel").await,
    };
    let head_timeout = link.shared.config.head_timeout;
    match tokio::time::timeout(head_timeout, client.write_all(ESTABLISHED)).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let hello = match tokio::time::timeout(head_timeout, read_hello(&mut client, rest)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(why)) => return link.blocked(&target, Reason::NotTls, &why),
        Err(_) => return link.blocked(&target, Reason::NotTls, &"no ClientHello within the head timeout"),
    };
    if let Err(reason) = check_name(&destination, hello.name.as_deref()) {
        let why = format!("the ClientHello names {:?}", hello.name);
        return link.blocked(&target, reason, &why);
    }
    link.allowed(&target);
    let idle = link.shared.config.idle_timeout;
    match tokio::time::timeout(idle, upstream.write_all(&hello.bytes)).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let end = relay::relay(&mut client, &mut upstream, link.limits(), hello.bytes.len() as u64).await;
    link.ended(&target, end);
}

/// A client's first flight, whole.
struct ClientHello {
    /// Every byte read, to go upstream unchanged (what follows the hello included).
    bytes: Vec<u8>,
    /// The server name it asks for.
    name: Option<String>,
}

/// Reads until the bytes hold a whole ClientHello, or are not one; never more than [`MAX_HELLO_BYTES`]
/// (unless the client's first bytes, read with its head, were already more).
async fn read_hello(client: &mut TcpStream, mut bytes: Vec<u8>) -> Result<ClientHello, &'static str> {
    let mut parsed_to = 0;
    loop {
        // Parse only when another record is whole (a client sending a byte at a time costs nothing more),
        // and a hello only in a few records (one, or two with large key shares): at most a few parses of at
        // most 16 KiB each, however the client splits its bytes.
        let (whole, records) = whole_records(&bytes);
        if records > MAX_HELLO_RECORDS {
            return Err("a ClientHello in too many records");
        }
        if whole > parsed_to || (parsed_to == 0 && bytes.len() >= first_record_end(&bytes)) {
            parsed_to = whole.max(1);
            match sni::client_hello(&bytes) {
                Hello::Complete(name) => return Ok(ClientHello { bytes, name }),
                Hello::NotTls => return Err("not a TLS ClientHello"),
                Hello::Partial => {}
            }
        }
        let room = MAX_HELLO_BYTES.saturating_sub(bytes.len());
        if room == 0 {
            return Err("a ClientHello over the size limit");
        }
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk[..room.min(4096)]).await.map_err(|_| "the client failed")?;
        if n == 0 {
            return Err("the client closed before its ClientHello ended");
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
}

/// The most TLS records a ClientHello may be split into.
const MAX_HELLO_RECORDS: usize = 8;

/// Where the last whole TLS record ends, and how many whole records there are.
fn whole_records(bytes: &[u8]) -> (usize, usize) {
    let (mut end, mut count) = (0, 0);
    while let [_, _, _, hi, lo, ..] = bytes[end..] {
        let next = end + 5 + usize::from(u16::from_be_bytes([hi, lo]));
        if next > bytes.len() {
            break;
        }
        end = next;
        count += 1;
    }
    (end, count)
}

/// Where the first TLS record ends, from its header (5 bytes: type, version, length); 0 when there is no
/// header yet, or it is no handshake record or too long for one (parse now: it is refused at once).
fn first_record_end(bytes: &[u8]) -> usize {
    match bytes {
        [0x16, _, _, hi, lo, ..] => match 5 + usize::from(u16::from_be_bytes([*hi, *lo])) {
            end if end <= MAX_HELLO_BYTES => end,
            _ => 0,
        },
        _ => 0,
    }
}

/// The server name must be the `CONNECT` host; a tunnel to an opened address needs none.
fn check_name(destination: &Destination, sni: Option<&str>) -> Result<(), Reason> {
    match (destination, sni) {
        (Destination::Opened(_), _) => Ok(()),
        (Destination::Name(host), Some(sni)) if normalize_host(sni).as_deref() == Some(host.as_str()) => Ok(()),
        (Destination::Name(_), Some(_)) => Err(Reason::SniMismatch),
        (Destination::Name(_), None) => Err(Reason::SniMissing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_must_be_the_connect_host() {
        let name = Destination::Name("allowed.test".into());
        assert_eq!(check_name(&name, Some("allowed.test")), Ok(()));
        assert_eq!(check_name(&name, Some("Allowed.Test.")), Ok(()));
        assert_eq!(check_name(&name, Some("other.test")), Err(Reason::SniMismatch));
        assert_eq!(check_name(&name, None), Err(Reason::SniMissing));
        let opened = Destination::Opened("10.1.2.3".parse().unwrap());
        assert_eq!(check_name(&opened, None), Ok(()));
    }

    #[test]
    fn a_hello_is_parsed_once_its_first_record_is_whole() {
        assert_eq!(first_record_end(&[0x16, 3, 1]), 0);
        assert_eq!(first_record_end(&[0x16, 3, 1, 0x02, 0x00]), 5 + 512);
        assert_eq!(first_record_end(&[0x16, 3, 1, 0xff, 0xff]), 0, "too long: refused by the parse");
        assert_eq!(first_record_end(b"GET / HTTP/1.1"), 0);
    }

    #[test]
    fn records_are_counted_whole_and_a_hello_in_many_is_refused_before_it_costs() {
        let record = |len: usize| [vec![0x16, 3, 1, (len >> 8) as u8, len as u8], vec![0u8; len]].concat();
        let two = [record(3), record(1)].concat();
        assert_eq!(whole_records(&two), (two.len(), 2));
        assert_eq!(whole_records(&two[..two.len() - 1]), (8, 1), "the second is not whole yet");
        assert_eq!(whole_records(&[0x16, 3]), (0, 0));
        let many: Vec<u8> = (0..=MAX_HELLO_RECORDS).flat_map(|_| record(1)).collect();
        assert_eq!(whole_records(&many).1, MAX_HELLO_RECORDS + 1);
    }
}
